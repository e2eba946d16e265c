"""The kubelet stand-in keeps a starting pod's volumes current, not only a ready one's."""

from __future__ import annotations

import textwrap
from pathlib import Path

from tests.support import podspec_runner

# A container that answers its readiness probe once its mounted file says so, as the
# registry waits for a policy whose shards agree with its main file.
SERVER = textwrap.dedent(
    """
    import http.server, os, pathlib
    host, port = os.environ["BERTH_HTTP_ADDR"].split(":")
    state = pathlib.Path("/etc/state/state")

    class Probe(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            ready = state.read_text() == "ready"
            self.send_response(200 if ready else 503)
            self.end_headers()

        def log_message(self, *args):
            pass

    http.server.HTTPServer((host, int(port)), Probe).serve_forever()
    """
)


def _config_map(state: str) -> dict[str, object]:
    return {"kind": "ConfigMap", "metadata": {"name": "state"}, "data": {"state": state}}


def test_a_starting_pod_sees_its_inputs_change(tmp_path: Path) -> None:
    deployment = {
        "metadata": {"name": "probe"},
        "spec": {
            "template": {
                "spec": {
                    "containers": [
                        {
                            "name": "main",
                            "command": ["python", "-c", SERVER],
                            "readinessProbe": {"httpGet": {"path": "/ready"}},
                            "volumeMounts": [{"name": "state", "mountPath": "/etc/state"}],
                        }
                    ],
                    "volumes": [{"name": "state", "configMap": {"name": "state"}}],
                }
            }
        },
    }
    # Read while being written: the pod cannot get ready from what it started with.
    pod = podspec_runner.start(
        deployment,
        [_config_map("waiting")],
        [],
        tmp_path / "pod",
        ready_timeout=20,
        fetch=lambda: ([_config_map("ready")], []),
        follow_interval=0.1,
    )
    try:
        assert pod.updates == 2  # the start, then the sync loop's first change
        assert (tmp_path / "pod" / "volumes" / "state" / "state").read_text() == "ready"
    finally:
        pod.stop()
