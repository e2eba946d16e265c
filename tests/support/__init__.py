"""Test support: real tools (tools.py), processes and registry servers
(processes.py), the Kubernetes control plane (control_plane.py) and tiny OCI
images (images.py). The fixtures built on them live in tests/conftest.py."""
