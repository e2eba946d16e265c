// The test node's sandbox (pause) binary: no dependencies.
module berth.local/tools/pause

go 1.24.0
