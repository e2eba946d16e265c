"""Where the test tools are: Go tools in the version-keyed cache, Debian tools on PATH.

`make tools` (tools/build.sh) builds the Go tools into
`${BERTH_CACHE:-~/.cache/berth}/<name>-<version>/<binary>` with the versions pinned
in tools/versions.env, and installs the Debian ones. A test that needs a tool calls
`require_tool(name)`: when the tool is missing the test is skipped on a developer
machine, and fails in CI (environment variable CI set), where a skip would hide a
broken setup.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
VERSIONS_FILE = REPO_ROOT / "tools" / "versions.env"

# Debian puts daemons in sbin, which a non-root PATH may lack.
_EXTRA_BIN_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin")


@dataclass(frozen=True)
class GoTool:
    """A binary built by tools/build.sh: `<directory>-<version>/<binary>`."""

    directory: str
    version_key: str


GO_TOOLS: dict[str, GoTool] = {
    "kube-apiserver": GoTool("kubernetes", "KUBERNETES_VERSION"),
    "kube-controller-manager": GoTool("kubernetes", "KUBERNETES_VERSION"),
    "kubectl": GoTool("kubernetes", "KUBERNETES_VERSION"),
    # The test node (tests/support/node.py), from the same wrapper module.
    "kubelet": GoTool("kubernetes-node", "KUBERNETES_VERSION"),
    "kube-scheduler": GoTool("kubernetes-node", "KUBERNETES_VERSION"),
    "kube-proxy": GoTool("kubernetes-node", "KUBERNETES_VERSION"),
    "coredns": GoTool("coredns", "COREDNS_VERSION"),
    "pause": GoTool("pause", "PAUSE_VERSION"),
    "etcd": GoTool("etcd", "ETCD_VERSION"),
    "crane": GoTool("crane", "CRANE_VERSION"),
    "oras": GoTool("oras", "ORAS_VERSION"),
    "helm": GoTool("helm", "HELM_VERSION"),
    # SeaweedFS: the S3-compatible object store of the S3 storage driver's tests.
    "weed": GoTool("seaweedfs", "SEAWEEDFS_VERSION"),
    # The conformance suite as a command (OCI_REGISTRY, OCI_REPO1, ...).
    "conformance": GoTool("conformance", "CONFORMANCE_VERSION"),
    # The same suite as a `go test -c` binary (legacy OCI_ROOT_URL, OCI_NAMESPACE, ...).
    "conformance.test": GoTool("conformance", "CONFORMANCE_VERSION"),
    # The v1.1 release line of the suite (ginkgo, OCI_ROOT_URL / OCI_TEST_*).
    "conformance-v1.1": GoTool("conformance-v1.1", "CONFORMANCE_V11_VERSION"),
}

# Debian tools: binary name -> the package that provides it (installed by tools/apt.sh).
DEBIAN_TOOLS: dict[str, str] = {
    "skopeo": "skopeo",
    "docker-registry": "docker-registry",
    "nginx": "nginx-light",
    "containerd": "containerd",
    "ctr": "containerd",
    "runc": "runc",
    "iptables": "iptables",
    "iptables-save": "iptables",
    "iptables-restore": "iptables",
    "conntrack": "conntrack",
    "busybox": "busybox-static",
    # PostgreSQL's cluster wrappers; initdb and pg_ctl themselves are found by
    # tests/support/postgres.py in /usr/lib/postgresql/<version>/bin.
    "pg_ctlcluster": "postgresql",
    "curl": "curl",  # the TLS bench's client
    # The web UI's browser tests (tests/support/browser.py).
    "chromium": "chromium",
    "chromedriver": "chromium-driver",
}


def read_versions(path: Path = VERSIONS_FILE) -> dict[str, str]:
    """Parse tools/versions.env: KEY=VALUE lines, '#' comments and blank lines ignored."""
    versions: dict[str, str] = {}
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"{path}:{number}: expected KEY=VALUE, got {raw!r}")
        versions[key] = value.strip()
    return versions


def cache_dir() -> Path:
    """The tool cache: $BERTH_CACHE, or ~/.cache/berth."""
    configured = os.environ.get("BERTH_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "berth"


def in_ci() -> bool:
    """True when CI is set to anything but an explicit no ('', '0', 'false', 'no')."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def find_tool(name: str) -> Path | None:
    """The path of a known tool, or None when it is not installed."""
    go_tool = GO_TOOLS.get(name)
    if go_tool is not None:
        version = read_versions()[go_tool.version_key]
        path = cache_dir() / f"{go_tool.directory}-{version}" / name
        return path if os.access(path, os.X_OK) else None
    if name in DEBIAN_TOOLS:
        search = os.pathsep.join([os.environ.get("PATH", os.defpath), *_EXTRA_BIN_DIRS])
        found = shutil.which(name, path=search)
        return Path(found) if found else None
    raise KeyError(f"unknown tool {name!r}; known: {sorted({*GO_TOOLS, *DEBIAN_TOOLS})}")


def require_tool(name: str) -> Path:
    """The path of a tool; skips the test when it is missing (fails it in CI)."""
    path = find_tool(name)
    if path is not None:
        return path
    if name in GO_TOOLS:
        where = f"{cache_dir()}/{GO_TOOLS[name].directory}-<version>/{name}"
    else:
        where = f"Debian package {DEBIAN_TOOLS[name]}"
    message = f"test tool {name!r} is missing ({where}); run `make tools` to install it"
    if in_ci():
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def require_root(message: str) -> None:
    """Skips the test unless it runs as root (fails it in CI, which runs as root)."""
    if os.geteuid() == 0:
        return
    if in_ci():
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


# The name the rest of the suite may prefer; same behaviour.
tool_path = require_tool
