"""Build the Berth image without a Docker engine: `make image-local`.

    python -m berth_dev.image build     # prints progress, then the archive's path
    python -m berth_dev.image ref       # prints the image reference

The result is an OCI image archive (a tar of an OCI image layout whose index.json names
the image `ghcr.io/berth-dev/berth:<version>` in `org.opencontainers.image.ref.name`)
for linux/amd64, ready for `ctr images import` or `skopeo copy oci-archive:<path>:<ref>`.
`IMAGE` and `TAG` override the name and tag, as for `make image`.

It follows the Dockerfile's recipe over a base made here instead of python:3.11-slim:

1. base: `debootstrap --variant=minbase` of Debian bookworm from the mirror this
   machine's apt uses, with python3, python3-venv and ca-certificates, upgraded from
   bookworm-updates and -security, the Dockerfile's user (65532 `berth`, home
   /var/lib/berth), and no apt lists, caches, docs, man pages or locales;
2. deps: the /opt/berth venv with the `[project] dependencies` pinned by
   constraints.txt, kubernetes/aio removed, bytecode compiled;
3. app: berth itself (non-editable, `--no-deps`), the Dockerfile's `pip check` and
   import smoke check.

The venv is built in a chroot of the base (so its paths and interpreter are the
image's) into a directory bind-mounted at /opt/berth, so a layer holds only what its
step added; the app step starts from the deps layer unpacked there and keeps what
changed. The base stays unpacked in the cache and the chroots see it through an
overlay whose writes go to a tmpfs, so no step can alter it. pip is run from Debian's
pip wheel with `--python`, so the venv never contains pip or setuptools and no layer
has to delete anything (our layers only add; there are no whiteouts). The chroots run
in a private mount and pid namespace (`unshare`): their mounts and processes end with
them, even when a build is killed.

The image config (user, env, workdir, ports, command, labels) is read from the
Dockerfile's final stage, so both paths give the same one.

Each layer is cached under `${BERTH_CACHE:-~/.cache/berth}/image/` keyed by a hash of
its inputs and its recipe: the base by the recipe and the apt sources, the deps by the
base, the dependency list and constraints.txt, the app by the deps and the source
trees. Nothing changed: the archive is found by its key and nothing runs. A source
change rebuilds only the app layer. Delete the cache directory to force a rebuild
(e.g. for newer Debian security updates).

The OCI layout is written here with tarfile and hashlib rather than with umoci:
umoci would need an unpacked bundle per layer and its own rootless/ownership rules,
while what we need (add-only layers, one manifest, one config) is a page of code that
also gives us deterministic tar ordering and mtimes. Needs root (debootstrap, chroot,
mount); installs the `debootstrap` package with apt when missing.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gzip
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IMAGE = "ghcr.io/berth-dev/berth"

MEDIA_TYPE_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_TYPE_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_TYPE_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_TYPE_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
REF_NAME = "org.opencontainers.image.ref.name"
# containerd's own name annotation: `ctr images import` names the image with it.
CONTAINERD_NAME = "io.containerd.image.name"

SUITE = "bookworm"
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
VENV = "/opt/berth"
# What the image's Env starts from before the Dockerfile's ENV (the python image sets
# LANG too; Debian has the C.UTF-8 locale built in).
BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
}
# The mtime of every file of the venv layers: their bytecode is hash-based (unchecked),
# so no timestamp has to match and the layers are byte-for-byte reproducible.
VENV_MTIME = 0
# Bump to invalidate every cached layer (a change to how layers are written).
FORMAT = "1"
# The files of the repository the image is built from (the .dockerignore allowlist).
CONTEXT = ("pyproject.toml", "constraints.txt", "README.md", "registry_server", "operator")
# Kept per kind when pruning the cache.
KEEP = {"base": 2, "deps": 3, "app": 4, "archive": 3}

# Runs in the chroot of the fresh debootstrap, network and apt sources in place.
BASE_SCRIPT = r"""
export DEBIAN_FRONTEND=noninteractive
printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
chmod 0755 /usr/sbin/policy-rc.d
apt-get update -qq
apt-get upgrade -y -qq -o Dpkg::Options::=--force-confold >/dev/null
apt-get clean
rm -f /usr/sbin/policy-rc.d
# Keep later package installs from bringing back what is stripped below.
cat >/etc/dpkg/dpkg.cfg.d/berth-slim <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
path-exclude /usr/share/lintian/*
EOF
# The Dockerfile's runtime user: 65532 is the runAsUser the operator renders.
groupadd --system --gid 65532 berth
useradd --system --uid 65532 --gid 65532 --no-create-home \
    --home-dir /var/lib/berth --shell /usr/sbin/nologin berth
install -d -o 65532 -g 65532 -m 0750 /var/lib/berth
rm -rf /var/lib/apt/lists/* /var/cache/apt/* /usr/share/man/* /usr/share/info/* \
    /usr/share/lintian /var/cache/debconf/*-old /var/lib/dpkg/*-old
find /usr/share/doc -mindepth 1 ! -type d ! -name copyright -delete
find /usr/share/doc -mindepth 1 -type d -empty -delete
find /usr/share/locale -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
find /var/log -type f -delete
"""

# Written over what debootstrap copied from this machine (/etc/hostname is removed).
ETC_FILES = {
    "etc/resolv.conf": "",
    "etc/hosts": "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n",
}

# The venv and the dependencies. /src holds constraints.txt and requirements.txt (the
# `[project] dependencies`).
DEPS_SCRIPT = r"""
set -- /usr/share/python-wheels/pip-*.whl
pip="python3 $1/pip --python /opt/berth/bin/python"
python3 -m venv --without-pip /opt/berth
$pip install -q --no-compile -c /src/constraints.txt -r /src/requirements.txt
$pip check
# The operator uses the synchronous client, Kopf its own: a third of the venv.
rm -rf /opt/berth/lib/python3*/site-packages/kubernetes/aio
/opt/berth/bin/python -m compileall -q -f -j 0 --invalidation-mode unchecked-hash /opt/berth/lib
"""

# Berth itself, from the copied build context in /src.
APP_SCRIPT = r"""
set -- /usr/share/python-wheels/pip-*.whl
pip="python3 $1/pip --python /opt/berth/bin/python"
touch /tmp/.before
$pip install -q --no-compile --no-deps -c /src/constraints.txt /src
$pip check
find /opt/berth -name '*.py' -newer /tmp/.before -exec \
    /opt/berth/bin/python -m compileall -q -f --invalidation-mode unchecked-hash {} +
export PATH="/opt/berth/bin:$PATH"
test "$(command -v python)" = /opt/berth/bin/python
cd /var/lib/berth
python -c 'import registry_operator.__main__, registry_server.app'
"""

# Mounts for a chroot, run by /bin/sh inside `unshare`: $1 the root, $2 an empty
# directory for a writable overlay over a read-only root (or "": the root itself is
# written), then pairs of bind mounts (host path, path in the root), `--`, and the
# command to chroot into.
CHROOT_SETUP = r"""
set -eu
root=$1
scratch=$2
shift 2
if [ -n "$scratch" ]; then
    mount -t tmpfs -o mode=0755 scratch "$scratch"
    mkdir "$scratch/upper" "$scratch/work" "$scratch/root"
    mount -t overlay overlay \
        -o "lowerdir=$root,upperdir=$scratch/upper,workdir=$scratch/work" "$scratch/root"
    root=$scratch/root
fi
mount -t proc proc "$root/proc"
mount -t tmpfs -o mode=0755,nosuid dev "$root/dev"
for node in null:1:3 zero:1:5 full:1:7 random:1:8 urandom:1:9 tty:5:0; do
    IFS=: read -r name major minor <<EOF
$node
EOF
    mknod -m 0666 "$root/dev/$name" c "$major" "$minor"
done
mkdir -m 1777 "$root/dev/shm"
mkdir -m 0755 "$root/dev/pts"
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts "$root/dev/pts"
ln -s pts/ptmx "$root/dev/ptmx"
ln -s /proc/self/fd "$root/dev/fd"
ln -s fd/0 "$root/dev/stdin"
ln -s fd/1 "$root/dev/stdout"
ln -s fd/2 "$root/dev/stderr"
mount -t tmpfs -o mode=1777 tmp "$root/tmp"
while [ "$1" != -- ]; do
    [ -e "$root$2" ] || mkdir -p "$root$2"
    mount --bind "$1" "$root$2"
    shift 2
done
shift
exec chroot "$root" "$@"
"""

# Passed into the chroots: how this machine reaches PyPI.
PASS_ENV = (
    "PIP_INDEX_URL",
    "PIP_EXTRA_INDEX_URL",
    "PIP_TRUSTED_HOST",
    "PIP_DEFAULT_TIMEOUT",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
)
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


class BuildError(RuntimeError):
    """A step failed; the message names the step and carries its log's tail."""


@dataclass(frozen=True)
class Layer:
    digest: str
    diff_id: str
    size: int
    created_by: str


@dataclass(frozen=True)
class Source:
    """An apt source: `deb <uri> <suite> main`."""

    uri: str
    suite: str


def cache_root() -> Path:
    configured = os.environ.get("BERTH_CACHE")
    base = Path(configured) if configured else Path.home() / ".cache" / "berth"
    return base / "image"


def project_version(root: Path = REPO_ROOT) -> str:
    with (root / "pyproject.toml").open("rb") as f:
        version: str = tomllib.load(f)["project"]["version"]
    return version


def image_reference(image: str | None = None, tag: str | None = None) -> str:
    """`ghcr.io/berth-dev/berth:<version>`, the tag hack/image.sh gives `make image`."""
    return f"{image or DEFAULT_IMAGE}:{tag or project_version()}"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _key(*parts: str) -> str:
    return _sha256("\0".join((FORMAT, *parts)).encode())[:32]


def _canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


# --- inputs ---------------------------------------------------------------------------


def _source_entries(path: Path, text: str) -> Iterator[tuple[str, str]]:
    """(uri, suite) of each `deb` source in a one-line `.list` or a deb822 `.sources`."""
    if path.suffix == ".sources":
        for stanza in re.split(r"\n\s*\n", text):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if not line.startswith("#") and ":" in line and not line[:1].isspace():
                    name, _, value = line.partition(":")
                    fields[name.strip().lower()] = value.strip()
            if fields.get("enabled", "yes").lower() == "no":
                continue
            if "deb" in fields.get("types", "").split():
                for uri in fields.get("uris", "").split():
                    for suite in fields.get("suites", "").split():
                        yield uri, suite
    else:
        for raw in text.splitlines():
            words = re.sub(r"\[[^]]*\]", "", raw.split("#", 1)[0]).split()
            if len(words) >= 3 and words[0] == "deb":
                yield words[1], words[2]


def apt_sources(files: Sequence[Path] | None = None) -> list[Source]:
    """The machine's Debian sources for the bookworm suites (main only), in order.

    Reads one-line `.list` files and deb822 `.sources` files. Falls back to
    deb.debian.org when the machine names none (e.g. not a Debian host).
    """
    if files is None:
        files = [Path("/etc/apt/sources.list")]
        directory = Path("/etc/apt/sources.list.d")
        if directory.is_dir():
            files += sorted(p for p in directory.iterdir() if p.suffix in (".list", ".sources"))
    found: list[Source] = []
    for path in files:
        try:
            text = path.read_text()
        except OSError:
            continue
        for uri, suite in _source_entries(path, text):
            source = Source(uri.rstrip("/"), suite)
            is_bookworm = suite == SUITE or suite.startswith(SUITE + "-")
            web = uri.startswith(("http://", "https://"))
            if is_bookworm and web and source not in found:
                found.append(source)
    if not any(s.suite == SUITE for s in found):
        found.insert(0, Source("http://deb.debian.org/debian", SUITE))
    return found


def _mirror(sources: Sequence[Source]) -> str:
    return next(s.uri for s in sources if s.suite == SUITE)


def dependencies(root: Path = REPO_ROOT) -> list[str]:
    """The `[project] dependencies` of pyproject.toml (what the Dockerfile installs)."""
    with (root / "pyproject.toml").open("rb") as f:
        deps: list[str] = tomllib.load(f)["project"]["dependencies"]
    return deps


def _context_files(root: Path) -> Iterator[tuple[Path, str]]:
    """The build context's files, as (path, relative name), sorted; no bytecode."""
    for entry in CONTEXT:
        path = root / entry
        if path.is_file():
            yield path, entry
            continue
        for directory, dirnames, filenames in os.walk(path):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            for name in sorted(filenames):
                if not name.endswith(".pyc"):
                    file = Path(directory, name)
                    yield file, file.relative_to(root).as_posix()


def context_hash(root: Path = REPO_ROOT) -> str:
    digest = hashlib.sha256()
    for path, name in _context_files(root):
        mode = "x" if os.access(path, os.X_OK) else "-"
        digest.update(f"{name}\0{mode}\0{_sha256(path.read_bytes())}\n".encode())
    return digest.hexdigest()


def _copy_context(root: Path, dest: Path) -> None:
    for path, name in _context_files(root):
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)


# --- the image config, from the Dockerfile ---------------------------------------------


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined."""
    result: list[tuple[str, str]] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        if current.strip():
            word, _, args = current.strip().partition(" ")
            result.append((word.upper(), args.strip()))
        current = ""
    return result


def _expand(value: str, env: Mapping[str, str]) -> str:
    return re.sub(r"\$(?:\{(\w+)\}|(\w+))", lambda m: env.get(m.group(1) or m.group(2), ""), value)


def dockerfile_config(text: str) -> dict[str, Any]:
    """The runtime `config` of the Dockerfile's final stage (LABEL, ENV, USER, WORKDIR,
    EXPOSE, CMD, ENTRYPOINT), over BASE_ENV. Other forms than the ones the Dockerfile
    uses (e.g. `ENV KEY value`) are refused rather than guessed."""
    stages: list[list[tuple[str, str]]] = []
    for instruction in _instructions(text):
        if instruction[0] == "FROM":
            stages.append([])
        elif stages:
            stages[-1].append(instruction)
    if not stages:
        raise ValueError("Dockerfile: no FROM")
    env = dict(BASE_ENV)
    config: dict[str, Any] = {}
    for word, args in stages[-1]:
        if word in ("LABEL", "ENV"):
            for token in shlex.split(args):
                name, sep, value = token.partition("=")
                if not sep:
                    raise ValueError(f"Dockerfile: {word} {args!r}: expected KEY=value pairs")
                if word == "LABEL":
                    config.setdefault("Labels", {})[name] = value
                else:
                    env[name] = _expand(value, env)
        elif word == "USER":
            config["User"] = args
        elif word == "WORKDIR":
            config["WorkingDir"] = args
        elif word == "EXPOSE":
            ports = config.setdefault("ExposedPorts", {})
            for port in args.split():
                ports[port if "/" in port else f"{port}/tcp"] = {}
        elif word in ("CMD", "ENTRYPOINT"):
            value = json.loads(args)
            if not isinstance(value, list):
                raise ValueError(f"Dockerfile: {word} must be in exec (JSON) form")
            config["Cmd" if word == "CMD" else "Entrypoint"] = value
    config["Env"] = [f"{name}={value}" for name, value in env.items()]
    return config


# --- layers -------------------------------------------------------------------------


class _Hashing:
    """A write-only file that hashes and counts what passes through it."""

    def __init__(self, out: IO[bytes] | gzip.GzipFile) -> None:
        self.out = out
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.out.write(data)
        self.hash.update(data)
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        self.out.flush()


def _walk(top: Path, prefix: str, skip_contents: Sequence[str] = ()) -> Iterator[tuple[Path, str]]:
    """(path, name in the layer) for `top` and everything below it, sorted, without
    following symlinks; directories named in `skip_contents` are kept empty."""

    def walk(directory: Path, name: str) -> Iterator[tuple[Path, str]]:
        if name in skip_contents:
            return
        with os.scandir(directory) as it:
            children = sorted(it, key=lambda e: e.name)
        for child in children:
            child_name = f"{name}/{child.name}" if name else child.name
            yield Path(child.path), child_name
            if child.is_dir(follow_symlinks=False):
                yield from walk(Path(child.path), child_name)

    if prefix:
        yield top, prefix
    yield from walk(top, prefix)


def _write_layer(
    store: Path, entries: Iterator[tuple[Path, str]], created_by: str, mtime: int | None
) -> Layer:
    """A gzip'd tar of `entries` into the blob store; numeric owners, no user names,
    mtimes whole seconds (or all `mtime`), hard links kept."""
    tmp = store / f".layer-{os.getpid()}"
    with tmp.open("wb") as raw:
        compressed = _Hashing(raw)
        with gzip.GzipFile(fileobj=compressed, mode="wb", compresslevel=6, mtime=0) as gz:
            plain = _Hashing(gz)
            with tarfile.open(fileobj=plain, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
                for path, name in entries:
                    info = tar.gettarinfo(str(path), arcname=name)
                    if info is None:  # a socket
                        continue
                    if info.ischr() or info.isblk() or info.isfifo():
                        continue
                    info.uname = info.gname = ""
                    info.mtime = int(info.mtime) if mtime is None else mtime
                    if info.isreg():
                        with path.open("rb") as f:
                            tar.addfile(info, f)
                    else:
                        tar.addfile(info)
    digest = "sha256:" + compressed.hash.hexdigest()
    tmp.rename(store / compressed.hash.hexdigest())
    return Layer(digest, "sha256:" + plain.hash.hexdigest(), compressed.size, created_by)


def _extract(blob: Path, dest: Path) -> None:
    with tarfile.open(blob, mode="r:gz") as tar:
        tar.extractall(dest, numeric_owner=True, filter="fully_trusted")


Snapshot = dict[str, tuple[int, int, int, int, int, str]]


def _snapshot(top: Path) -> Snapshot:
    """What tells a changed entry from an unchanged one: type and mode, owner, size,
    mtime and link target."""
    result: Snapshot = {}
    for path, name in _walk(top, "."):
        st = path.lstat()
        link = os.readlink(path) if path.is_symlink() else ""
        result[name] = (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, link)
    return result


# --- running steps ----------------------------------------------------------------------


class _Build:
    def __init__(self, cache: Path, repo: Path, log: Callable[[str], None]) -> None:
        self.cache = cache
        self.repo = repo
        self.log = log
        self.store = cache / "blobs" / "sha256"
        self.records = cache / "layers"
        self.work = cache / "tmp"
        self.log_path = cache / "build.log"
        self.log_started = False

    def run(
        self, argv: Sequence[str | os.PathLike[str]], step: str, shown: str | None = None
    ) -> None:
        """Run a command, its output appended to build.log; a failure shows the tail.
        The log names the command, or `shown` instead."""
        # The log of the last build that ran something: a warm build keeps it.
        with self.log_path.open("ab" if self.log_started else "wb") as out:
            self.log_started = True
            shown = shown or shlex.join(os.fspath(a) for a in argv)
            out.write(f"--- {step}: {shown}\n".encode())
            out.flush()
            start = time.monotonic()
            code = subprocess.run(
                [os.fspath(a) for a in argv],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                check=False,
            ).returncode
            out.write(f"--- {step}: exit {code} after {time.monotonic() - start:.1f}s\n".encode())
        if code != 0:
            lines = self.log_path.read_text(errors="replace").splitlines()[-40:]
            raise BuildError(
                f"{step} failed (exit {code}); log: {self.log_path}\n" + "\n".join(lines)
            )

    def chroot(
        self,
        root: Path,
        script: str,
        step: str,
        binds: Sequence[tuple[Path, str]] = (),
        *,
        host_ca: bool = False,
        overlay: bool = False,
    ) -> None:
        """`script` under /bin/sh -eu in a chroot of `root`, in its own mount and pid
        namespace: /proc, a minimal /dev, a tmpfs /tmp, the host's resolv.conf (and with
        `host_ca` its CA bundle: how this machine reaches PyPI), and `binds`. With
        `overlay`, writes outside the binds go to a tmpfs and `root` stays as it was."""
        all_binds = [(Path("/etc/resolv.conf"), "/etc/resolv.conf")]
        bundle = "/etc/ssl/certs/ca-certificates.crt"
        if host_ca and HOST_CA_BUNDLE.is_file() and (root / bundle.lstrip("/")).is_file():
            all_binds.append((HOST_CA_BUNDLE, bundle))
        all_binds += binds
        env = {
            "PATH": BASE_ENV["PATH"],
            "HOME": "/root",
            "LANG": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1",
            "PIP_NO_CACHE_DIR": "1",
            "PIP_DISABLE_PIP_VERSION_CHECK": "1",
            "PIP_CERT": "/etc/ssl/certs/ca-certificates.crt",
            **{name: os.environ[name] for name in PASS_ENV if os.environ.get(name)},
        }
        scratch = self.tempdir("scratch") if overlay else None
        argv: list[str | os.PathLike[str]] = [
            *_unshare(),
            "/bin/sh",
            "-c",
            CHROOT_SETUP,
            "setup",
            root,
            scratch or "",
        ]
        for host, inside in all_binds:
            argv += [host, inside]
        argv += ["--", "/usr/bin/env", "-i", *(f"{k}={v}" for k, v in env.items())]
        argv += ["/bin/sh", "-euc", script]
        try:
            self.run(argv, step, shown=f"chroot {root} /bin/sh -euc <<EOF{script}EOF")
        finally:
            if scratch is not None:
                scratch.rmdir()  # its tmpfs went with the namespace

    def rootfs(self, base: Layer) -> Path:
        """The base layer unpacked (kept, and only read: chroots over it use an overlay)."""
        path = self.cache / "rootfs" / base.digest.removeprefix("sha256:")[:32]
        if not path.is_dir():
            work = self.tempdir("rootfs")
            try:
                _extract(self.blob(base), work / "rootfs")
                path.parent.mkdir(exist_ok=True)
                (work / "rootfs").rename(path)
            finally:
                shutil.rmtree(work, ignore_errors=True)
        return path

    def tempdir(self, name: str) -> Path:
        self.work.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f"{name}.", dir=self.work))

    # -- the layer cache

    def cached(self, kind: str, key: str) -> Layer | None:
        record = self.records / f"{kind}-{key}.json"
        try:
            layer = Layer(**json.loads(record.read_text()))
        except (OSError, ValueError, TypeError):
            return None
        blob = self.store / layer.digest.removeprefix("sha256:")
        if not blob.is_file() or blob.stat().st_size != layer.size:
            return None
        now = time.time()
        os.utime(record, (now, now))  # recently used: pruned last
        return layer

    def remember(self, kind: str, key: str, layer: Layer) -> None:
        self.records.mkdir(parents=True, exist_ok=True)
        tmp = self.records / f".{kind}-{key}.json"
        tmp.write_text(json.dumps(asdict(layer), indent=2))
        tmp.rename(self.records / f"{kind}-{key}.json")

    def blob(self, layer: Layer) -> Path:
        return self.store / layer.digest.removeprefix("sha256:")

    def layer(self, kind: str, key: str, build: Callable[[], Layer]) -> Layer:
        start = time.monotonic()
        layer = self.cached(kind, key)
        state = "cached"
        if layer is None:
            layer = build()
            self.remember(kind, key, layer)
            state = "built"
        self.log(
            f"{kind:<8} {key[:12]}  {state:<6}  {layer.size / 1e6:6.1f} MB  "
            f"{time.monotonic() - start:.1f}s"
        )
        return layer

    # -- the steps

    def base(self, sources: Sequence[Source]) -> tuple[str, Layer]:
        sources_list = "".join(f"deb {s.uri} {s.suite} main\n" for s in sources)
        argv = [
            "debootstrap",
            "--variant=minbase",
            "--components=main",
            f"--include={','.join(BASE_PACKAGES)}",
            SUITE,
            "ROOT",
            _mirror(sources),
        ]
        key = _key(
            "base", shlex.join(argv), sources_list, BASE_SCRIPT, CHROOT_SETUP, repr(ETC_FILES)
        )

        def build() -> Layer:
            _ensure_debootstrap(self)
            work = self.tempdir("base")
            try:
                root = work / "rootfs"
                # Its own mount namespace: debootstrap mounts /proc and /sys in the
                # root, and they go with the namespace however debootstrap ends.
                self.run(
                    [*_unshare(), *(str(root) if a == "ROOT" else a for a in argv)],
                    "debootstrap",
                )
                (root / "etc/apt/sources.list").write_text(sources_list)
                self.chroot(root, BASE_SCRIPT, "base: upgrade, user, strip")
                # debootstrap copied this machine's; the runtime provides its own.
                (root / "etc/hostname").unlink(missing_ok=True)
                for name, content in ETC_FILES.items():
                    (root / name).write_text(content)
                    (root / name).chmod(0o644)
                layer = _write_layer(
                    self.store,
                    _walk(root, "", skip_contents=("dev", "proc", "sys", "tmp")),
                    f"debootstrap --variant=minbase {SUITE} + {', '.join(BASE_PACKAGES)}"
                    " + user berth (65532)",
                    mtime=None,
                )
                # Kept as the root of the later steps' chroots (what the layer holds,
                # plus debootstrap's /dev nodes, which the chroots mount over).
                keep = self.cache / "rootfs" / layer.digest.removeprefix("sha256:")[:32]
                keep.parent.mkdir(exist_ok=True)
                shutil.rmtree(keep, ignore_errors=True)
                root.rename(keep)
                return layer
            finally:
                shutil.rmtree(work, ignore_errors=True)

        return key, self.layer("base", key, build)

    def deps(self, base_key: str, base: Layer) -> tuple[str, Layer]:
        requirements = "".join(f"{d}\n" for d in dependencies(self.repo))
        constraints = (self.repo / "constraints.txt").read_text()
        key = _key("deps", base_key, requirements, constraints, DEPS_SCRIPT)

        def build() -> Layer:
            work = self.tempdir("deps")
            try:
                src, venv = work / "src", work / "venv"
                src.mkdir()
                shutil.copy2(self.repo / "constraints.txt", src)
                (src / "requirements.txt").write_text(requirements)
                venv.mkdir(mode=0o755)
                self.chroot(
                    self.rootfs(base),
                    DEPS_SCRIPT,
                    "deps: venv",
                    binds=[(venv, VENV), (src, "/src")],
                    host_ca=True,
                    overlay=True,
                )
                return _write_layer(
                    self.store,
                    _walk(venv, VENV.lstrip("/")),
                    "venv /opt/berth: [project] dependencies, -c constraints.txt",
                    mtime=VENV_MTIME,
                )
            finally:
                shutil.rmtree(work, ignore_errors=True)

        return key, self.layer("deps", key, build)

    def app(self, deps_key: str, base: Layer, deps: Layer) -> tuple[str, Layer]:
        key = _key("app", deps_key, context_hash(self.repo), APP_SCRIPT)

        def build() -> Layer:
            work = self.tempdir("app")
            try:
                src, lower = work / "src", work / "lower"
                # The venv as the deps layer holds it; what the step changes is the layer.
                _extract(self.blob(deps), lower)
                venv = lower / VENV.lstrip("/")
                _copy_context(self.repo, src)
                before = _snapshot(venv)
                self.chroot(
                    self.rootfs(base),
                    APP_SCRIPT,
                    "app: install berth",
                    binds=[(venv, VENV), (src, "/src")],
                    host_ca=True,
                    overlay=True,
                )
                after = _snapshot(venv)
                changed = sorted(n for n, state in after.items() if before.get(n) != state)
                prefix = VENV.lstrip("/")
                entries = (
                    (venv / name, prefix if name == "." else f"{prefix}/{name[2:]}")
                    for name in changed
                )
                return _write_layer(
                    self.store, entries, "berth (pip install --no-deps .)", mtime=VENV_MTIME
                )
            finally:
                shutil.rmtree(work, ignore_errors=True)

        return key, self.layer("app", key, build)

    def archive(self, reference: str, layers: Sequence[Layer], config: dict[str, Any]) -> Path:
        image_config = {
            "architecture": "amd64",
            "os": "linux",
            "config": config,
            "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
            "history": [{"created_by": layer.created_by} for layer in layers],
        }
        config_bytes = _canonical_json(image_config)
        manifest = {
            "schemaVersion": 2,
            "mediaType": MEDIA_TYPE_MANIFEST,
            "config": {
                "mediaType": MEDIA_TYPE_CONFIG,
                "digest": "sha256:" + _sha256(config_bytes),
                "size": len(config_bytes),
            },
            "layers": [
                {"mediaType": MEDIA_TYPE_LAYER, "digest": layer.digest, "size": layer.size}
                for layer in layers
            ],
        }
        manifest_bytes = _canonical_json(manifest)
        index = {
            "schemaVersion": 2,
            "mediaType": MEDIA_TYPE_INDEX,
            "manifests": [
                {
                    "mediaType": MEDIA_TYPE_MANIFEST,
                    "digest": "sha256:" + _sha256(manifest_bytes),
                    "size": len(manifest_bytes),
                    "platform": {"architecture": "amd64", "os": "linux"},
                    "annotations": {REF_NAME: reference, CONTAINERD_NAME: reference},
                }
            ],
        }
        index_bytes = json.dumps(index, indent=2).encode()
        name = reference.rsplit("/", 1)[-1].replace(":", "-")
        path = self.cache / f"{name}-{_sha256(index_bytes)[:12]}.oci.tar"
        if path.is_file():
            now = time.time()
            os.utime(path, (now, now))
            return path
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        with tarfile.open(tmp, mode="w", format=tarfile.PAX_FORMAT) as tar:

            def add_bytes(arcname: str, data: bytes) -> None:
                info = tarfile.TarInfo(arcname)
                info.size, info.mode, info.mtime = len(data), 0o644, 0
                tar.addfile(info, io.BytesIO(data))

            for directory in ("blobs", "blobs/sha256"):
                info = tarfile.TarInfo(directory)
                info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 0
                tar.addfile(info)
            add_bytes("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
            add_bytes("index.json", index_bytes)
            add_bytes(f"blobs/sha256/{_sha256(manifest_bytes)}", manifest_bytes)
            add_bytes(f"blobs/sha256/{_sha256(config_bytes)}", config_bytes)
            for layer in layers:
                info = tarfile.TarInfo(f"blobs/sha256/{layer.digest.removeprefix('sha256:')}")
                info.size, info.mode, info.mtime = layer.size, 0o644, 0
                with self.blob(layer).open("rb") as f:
                    tar.addfile(info, f)
        tmp.rename(path)
        return path

    def prune(self, keep: Sequence[Path]) -> None:
        """Drop the least recently used records and archives beyond KEEP, then the blobs
        no record names. Never what this build uses."""

        def newest_first(paths: list[Path]) -> list[Path]:
            return sorted(paths, key=lambda p: p.stat().st_mtime, reverse=True)

        for kind in ("base", "deps", "app"):
            records = newest_first(list(self.records.glob(f"{kind}-*.json")))
            for record in records[KEEP[kind] :]:
                if record not in keep:
                    record.unlink(missing_ok=True)
        archives = newest_first(list(self.cache.glob("*.oci.tar")))
        for archive in archives[KEEP["archive"] :]:
            if archive not in keep:
                archive.unlink(missing_ok=True)
        named = set()
        for record in self.records.glob("*.json"):
            with contextlib.suppress(OSError, ValueError, KeyError):
                named.add(json.loads(record.read_text())["digest"].removeprefix("sha256:"))
        for blob in self.store.iterdir():
            if blob.name not in named and not blob.name.startswith("."):
                blob.unlink(missing_ok=True)
        rootfs = self.cache / "rootfs"
        if rootfs.is_dir():
            for tree in rootfs.iterdir():
                if not any(name.startswith(tree.name) for name in named):
                    shutil.rmtree(tree, ignore_errors=True)


def _unshare() -> list[str]:
    # A private mount namespace (mounts vanish with it) and pid namespace (so does every
    # process started inside; --kill-child if unshare itself is killed).
    return [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "--pid",
        "--fork",
        "--kill-child",
        "--",
    ]


def _ensure_debootstrap(build: _Build) -> None:
    """Install Debian's debootstrap when missing, as tools/apt.sh installs the test tools
    (waiting for a concurrent apt rather than failing on its lock)."""
    if shutil.which("debootstrap", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin"):
        return
    apt = ["apt-get", "-qq", "-o", "DPkg::Lock::Timeout=300"]
    build.run([*apt, "update"], "apt-get update")
    build.run(
        [
            "env",
            "DEBIAN_FRONTEND=noninteractive",
            *apt,
            "install",
            "-y",
            "--no-install-recommends",
            "debootstrap",
        ],
        "apt-get install debootstrap",
    )


def _log_to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def build(
    reference: str | None = None,
    *,
    cache: Path | None = None,
    repo: Path = REPO_ROOT,
    log: Callable[[str], None] = _log_to_stderr,
) -> Path:
    """Build (or find in the cache) the image archive and return its path.

    `reference` defaults to `image_reference()`. Needs root. One build at a time per
    cache directory (a lock file); a second caller waits and then finds the first's
    result in the cache.
    """
    if os.geteuid() != 0:
        raise BuildError(
            "building the image needs root (debootstrap, chroot, mount): "
            "run `sudo make image-local`"
        )
    reference = reference or image_reference()
    cache = cache or cache_root()
    cache.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with (cache / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        steps = _Build(cache, repo, log)
        # Left by a build that was killed; we hold the lock, so none is running.
        shutil.rmtree(steps.work, ignore_errors=True)
        steps.store.mkdir(parents=True, exist_ok=True)
        for stale in steps.store.glob(".layer-*"):
            stale.unlink()
        base_key, base = steps.base(apt_sources())
        deps_key, deps = steps.deps(base_key, base)
        _, app = steps.app(deps_key, base, deps)
        config = dockerfile_config((repo / "Dockerfile").read_text())
        path = steps.archive(reference, [base, deps, app], config)
        total = base.size + deps.size + app.size
        log(f"image    {reference}  {total / 1e6:.1f} MB  {time.monotonic() - start:.1f}s")
        steps.prune(keep=[path])
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m berth_dev.image", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("build", help="build the image archive; prints its path last")
    commands.add_parser("ref", help="print the image reference")
    args = parser.parse_args(argv)
    reference = image_reference(os.environ.get("IMAGE"), os.environ.get("TAG"))
    if args.command == "ref":
        print(reference)
        return 0
    try:
        path = build(reference)
    except BuildError as error:
        print(f"image: {error}", file=sys.stderr)
        return 1
    print(path, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
