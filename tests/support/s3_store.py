"""A real S3-compatible object store for tests: SeaweedFS (`weed server -s3`).

`S3Store(workdir).start()` runs one `weed` process (master, volume server, filer and the
S3 gateway) on free loopback ports, with all its data, sockets and its log under
`workdir`, and an identity of its own (random access and secret keys, admin rights). It
waits until the gateway accepts a PUT (the volume server must have joined the master
first), so a test never sees a store that is half up. `stop()` ends the process group
and removes the data.
"""

from __future__ import annotations

import json
import secrets
import shutil
from pathlib import Path
from typing import Any

import botocore.session
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from .processes import ManagedProcess, ReservedPort, wait_until
from .tools import require_tool

REGION = "us-east-1"


class S3Store:
    """One SeaweedFS process serving S3 on 127.0.0.1; see the module docstring."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.data = workdir / "data"
        self.log_path = workdir / "weed.log"
        self.access_key = "berth" + secrets.token_hex(6)
        self.secret_key = secrets.token_hex(20)
        self.region = REGION
        self.bucket = "berth"
        self.port = 0
        self.process: ManagedProcess | None = None
        self._grpc_ports: dict[str, int] = {}
        self._prefixes = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> S3Store:
        weed = require_tool("weed")
        self.data.mkdir(parents=True, exist_ok=True)
        identities = {
            "identities": [
                {
                    "name": "berth",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                }
            ]
        }
        config = self.workdir / "s3.json"
        config.write_text(json.dumps(identities))
        ports = {
            name: ReservedPort()
            for name in (
                "master.port",
                "master.port.grpc",
                "volume.port",
                "volume.port.grpc",
                "filer.port",
                "filer.port.grpc",
                "s3.port",
                "s3.port.grpc",
            )
        }
        self.port = ports["s3.port"].port
        self._grpc_ports = {
            name.split(".")[0]: reserved.port
            for name, reserved in ports.items()
            if name.endswith(".grpc")
        }
        argv: list[str | Path] = [
            weed,
            # Logs to our log file only (glog's default is files in /tmp), and no
            # filer.toml or s3 settings of the machine's (/etc/seaweedfs, ~/.seaweedfs).
            "-logtostderr",
            f"-config_dir={self.workdir}",
            "server",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-dir={self.data}",
            "-filer",
            "-s3",
            f"-s3.config={config}",
            # Sockets default to /tmp; keep them with the data so nothing outlives stop().
            f"-filer.localSocket={self.workdir / 'filer.sock'}",
            f"-s3.localSocket={self.workdir / 's3.sock'}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
            # Volumes are created per bucket (collection); small ones, as many as fit.
            "-master.volumeSizeLimitMB=256",
            "-volume.max=0",
            "-volume.preStopSeconds=0",
            *(f"-{name}={reserved.release()}" for name, reserved in ports.items()),
        ]
        self.process = ManagedProcess("seaweedfs", argv, self.log_path, cwd=self.workdir)
        self.process.start()
        try:
            wait_until(self._accepts_writes, timeout=60, what="an S3 PUT", process=self.process)
        except BaseException:
            self.stop()
            raise
        return self

    def client(self, signature_version: str | None = None) -> Any:
        """A synchronous botocore S3 client (for setting up and inspecting; pre-signed
        URLs for plain HTTP clients want ``signature_version="s3v4"``, which signs no
        Content-Type)."""
        return botocore.session.get_session().create_client(
            "s3",
            region_name=self.region,
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=Config(
                s3={"addressing_style": "path"},
                retries={"max_attempts": 2},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                signature_version=signature_version,
            ),
        )

    def _accepts_writes(self) -> bool:
        # The bucket is a collection, whose first write makes SeaweedFS grow volumes:
        # one bucket for the session (tests take a prefix each) keeps that to one time.
        try:
            client = self.client()
            try:
                client.create_bucket(Bucket=self.bucket)
            except ClientError as err:
                if err.response.get("Error", {}).get("Code") != "BucketAlreadyOwnedByYou":
                    raise
            client.put_object(Bucket=self.bucket, Key="probe", Body=b"ok")
            client.delete_object(Bucket=self.bucket, Key="probe")
            return True
        except (BotoCoreError, ClientError):
            return False

    def new_prefix(self, stem: str = "t") -> str:
        """A fresh key prefix in the bucket: one per test keeps tests apart."""
        self._prefixes += 1
        return f"{stem}-{self._prefixes}-{secrets.token_hex(3)}"

    def keys(self, prefix: str) -> list[str]:
        """Every key under ``prefix/``, relative to it."""
        client = self.client()
        found: list[str] = []
        for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=f"{prefix}/"
        ):
            found.extend(obj["Key"][len(prefix) + 1 :] for obj in page.get("Contents", []))
        return found

    def multipart_uploads(self, prefix: str) -> list[dict[str, Any]]:
        """The incomplete multipart uploads under ``prefix/``."""
        listed = self.client().list_multipart_uploads(Bucket=self.bucket, Prefix=f"{prefix}/")
        uploads: list[dict[str, Any]] = listed.get("Uploads", [])
        return uploads

    def driver_args(self, prefix: str) -> dict[str, Any]:
        """Keyword arguments of an S3Driver on ``prefix`` in the bucket."""
        return {
            "endpoint": self.endpoint,
            "bucket": self.bucket,
            "region": self.region,
            "prefix": prefix,
            "access_key": self.access_key,
            "secret_key": self.secret_key,
        }

    def server_config(self, prefix: str, **extra: object) -> dict[str, object]:
        """The `storage` section of a Berth config keeping its blobs under ``prefix``."""
        s3: dict[str, object] = {
            "endpoint": self.endpoint,
            "bucket": self.bucket,
            "prefix": prefix,
            "region": self.region,
            "access_key": self.access_key,
            "secret_key": self.secret_key,
            **extra,
        }
        return {"driver": "s3", "s3": s3}

    def stop(self) -> None:
        """End the process group; remove the data, credentials and sockets (the log stays,
        with pytest's other temporary files)."""
        if self.process is not None:
            # On SIGTERM the volume server and filer stop at once, but the master and
            # the gateway linger; the store is throwaway, so SIGKILL after a moment.
            self.process.stop(timeout=3)
        shutil.rmtree(self.data, ignore_errors=True)
        for name in ("filer.sock", "s3.sock", "s3.json"):
            (self.workdir / name).unlink(missing_ok=True)
        # Each service's gRPC socket, at a path weed fixes in /tmp (by gRPC port).
        for service, port in self._grpc_ports.items():
            Path(f"/tmp/seaweedfs-{service}-grpc-{port}.sock").unlink(missing_ok=True)
