"""Push a small image to a registry with skopeo and pull it back, digests compared.

    python -m berth_dev.smoke HOST:PORT --username U --password-file F [--repository R]
        [--puller-username P --puller-password-file G] [--cert-dir D]

With --cert-dir (a directory holding the registry's CA as ca.crt) it speaks verified
HTTPS; without, plain HTTP (or HTTPS unverified).

The check that the local stack's test and `make e2e-kind` share, so that both prove
the same thing: a client with the registry's credentials pushes an image and gets the
same bytes back.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import os
import secrets
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from tests.support import images


class SmokeError(RuntimeError):
    """The round trip failed; the message says which step."""


@dataclasses.dataclass(frozen=True)
class Result:
    reference: str
    pushed: str  # manifest digest in the local layout that was pushed
    pulled: str  # manifest digest of what came back


def _skopeo() -> str:
    found = shutil.which("skopeo")
    if found is None:
        raise SmokeError("skopeo is missing (Debian package skopeo; `make tools` installs it)")
    return found


def _run(argv: Sequence[str], step: str) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    if result.returncode != 0:
        raise SmokeError(f"{step} failed ({result.returncode}):\n{result.stderr.strip()}")


def round_trip(
    registry: str,
    username: str,
    password: str,
    *,
    repository: str = "team-a/api",
    tag: str | None = None,
    workdir: Path | None = None,
    cert_dir: Path | None = None,
) -> Result:
    """Push a fresh image to `registry/repository:tag` and pull it back; verified HTTPS
    with `cert_dir` (the registry's CA as ca.crt), plain HTTP without."""
    tag = tag or f"smoke-{secrets.token_hex(4)}"
    reference = f"{registry}/{repository}:{tag}"
    creds = f"{username}:{password}"
    with tempfile.TemporaryDirectory(prefix="berth-smoke-", dir=workdir) as scratch:
        source, back = Path(scratch) / "source", Path(scratch) / "back"
        pushed = images.make_oci_layout(source, tag, layers=2, layer_size=64 * 1024)
        skopeo = _skopeo()
        _run(
            [
                skopeo,
                "copy",
                "--preserve-digests",
                *_trust("dest", cert_dir),
                "--dest-creds",
                creds,
                f"oci:{source}:{tag}",
                f"docker://{reference}",
            ],
            f"push of {reference}",
        )
        pulled = pull(reference, username, password, back, cert_dir)
    if pulled != pushed:
        raise SmokeError(f"pulled {pulled} from {reference}, but pushed {pushed}")
    return Result(reference, pushed, pulled)


def _trust(side: str, cert_dir: Path | None) -> list[str]:
    """skopeo's flags for one side of a copy: the CA, or no verification."""
    if cert_dir is not None:
        return [f"--{side}-cert-dir={cert_dir}"]
    return [f"--{side}-tls-verify=false"]


def pull(
    reference: str,
    username: str,
    password: str,
    destination: Path,
    cert_dir: Path | None = None,
) -> str:
    """Pull `reference` (host:port/repository:tag) into an OCI layout; its digest."""
    tag = reference.rpartition(":")[2]
    _run(
        [
            _skopeo(),
            "copy",
            "--preserve-digests",
            *_trust("src", cert_dir),
            "--src-creds",
            f"{username}:{password}",
            f"docker://{reference}",
            f"oci:{destination}:{tag}",
        ],
        f"pull of {reference}",
    )
    return images.tagged_digest(destination, tag)


def wait_accepted(
    registry: str,
    username: str,
    password: str,
    attempts: int = 8,
    cert_dir: Path | None = None,
) -> None:
    """Wait until the server knows a credential Berth just wrote into a pull Secret.

    The Secret can land before the server has reloaded its policy (about two seconds, see
    docs/auth.md); a kubelet retries such a pull, so does this. Polls slowly: each refusal
    counts towards the server's failed-login limit.
    """
    context = None
    if cert_dir is not None:
        context = ssl.create_default_context(cafile=str(cert_dir / "ca.crt"))
    scheme = "https" if context is not None else "http"
    request = urllib.request.Request(f"{scheme}://{registry}/v2/")
    token = base64.b64encode(f"{username}:{password}".encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    for attempt in range(attempts):
        try:
            with urllib.request.urlopen(request, timeout=5, context=context) as response:
                if response.status == 200:
                    return
        except urllib.error.HTTPError as exc:
            if exc.code != 401:
                raise SmokeError(f"{username} at {registry}: HTTP {exc.code}") from exc
        if attempt + 1 < attempts:
            time.sleep(2)
    raise SmokeError(f"{registry} never accepted the credentials of {username}")


def check_puller(
    result: Result,
    username: str,
    password: str,
    *,
    workdir: Path | None = None,
    cert_dir: Path | None = None,
) -> None:
    """`username` (say, the robot of a pull Secret) pulls what `result` pushed, and may
    not push."""
    wait_accepted(result.reference.partition("/")[0], username, password, cert_dir=cert_dir)
    with tempfile.TemporaryDirectory(prefix="berth-smoke-", dir=workdir) as scratch:
        pulled = pull(result.reference, username, password, Path(scratch) / "pulled", cert_dir)
    if pulled != result.pushed:
        raise SmokeError(f"{username} pulled {pulled} from {result.reference}")
    registry, _, rest = result.reference.partition("/")
    repository = rest.rpartition(":")[0]
    try:
        round_trip(
            registry,
            username,
            password,
            repository=repository,
            workdir=workdir,
            cert_dir=cert_dir,
        )
    except SmokeError as exc:
        if "push of" in str(exc):
            return
        raise
    raise SmokeError(f"{username} could push to {registry}/{repository}")


def _secret(file: Path | None, variable: str) -> str:
    if file is not None:
        return file.read_text().strip()
    return os.environ.get(variable, "")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m berth_dev.smoke", description=__doc__)
    parser.add_argument("registry", help="host:port of the registry")
    parser.add_argument(
        "--cert-dir", type=Path, help="directory with the registry's CA (ca.crt): HTTPS, verified"
    )
    parser.add_argument("--username", required=True)
    parser.add_argument(
        "--password-file",
        type=Path,
        help="file holding the password (default: $BERTH_SMOKE_PASSWORD)",
    )
    parser.add_argument("--repository", default="team-a/api")
    parser.add_argument("--tag", default=None, help="default: a fresh smoke-<random> tag")
    parser.add_argument(
        "--puller-username",
        help="also check that this account pulls the image and cannot push "
        "(password: --puller-password-file or $BERTH_SMOKE_PULLER_PASSWORD)",
    )
    parser.add_argument("--puller-password-file", type=Path)
    args = parser.parse_args(argv)
    password = _secret(args.password_file, "BERTH_SMOKE_PASSWORD")
    if not password:
        parser.error("give --password-file or set BERTH_SMOKE_PASSWORD")
    puller_password = _secret(args.puller_password_file, "BERTH_SMOKE_PULLER_PASSWORD")
    if args.puller_username and not puller_password:
        parser.error("give --puller-password-file or set BERTH_SMOKE_PULLER_PASSWORD")
    try:
        result = round_trip(
            args.registry,
            args.username,
            password,
            repository=args.repository,
            tag=args.tag,
            cert_dir=args.cert_dir,
        )
        print(f"smoke: pushed and pulled {result.reference} ({result.pulled})")
        if args.puller_username:
            check_puller(result, args.puller_username, puller_password, cert_dir=args.cert_dir)
            print(f"smoke: {args.puller_username} pulled it and could not push")
    except SmokeError as exc:
        print(f"smoke: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
