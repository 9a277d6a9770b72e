"""A throw-away ``redis-server`` for tests.

Starts Debian's ``redis-server`` bound to 127.0.0.1 on a free port, without
persistence (``--save "" --appendonly no``), in its own temporary directory,
and stops it again by PID. Only the process started here is ever signalled.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

HOST = "127.0.0.1"
DEFAULT_DATABASES = 64
_FALLBACK_PATHS = ("/usr/bin/redis-server", "/usr/local/bin/redis-server")


class RedisServerError(RuntimeError):
    """redis-server is missing or did not come up."""


def find_redis_server() -> str | None:
    """Path of a ``redis-server`` executable, or None."""
    found = shutil.which("redis-server")
    if found:
        return found
    for candidate in _FALLBACK_PATHS:
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _encode_command(args: Sequence[str]) -> bytes:
    parts = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        raw = arg.encode()
        parts.append(f"${len(raw)}\r\n".encode() + raw + b"\r\n")
    return b"".join(parts)


def redis_commands(port: int, *commands: Sequence[str], timeout: float = 2.0) -> list[bytes]:
    """Send commands over one RESP connection; return each reply's first line.

    Enough for admin commands whose reply is a single simple-string or error
    line (PING, SELECT, FLUSHDB, FLUSHALL).
    """
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall(b"".join(_encode_command(cmd) for cmd in commands))
        buf = b""
        deadline = time.monotonic() + timeout
        while buf.count(b"\r\n") < len(commands):
            if time.monotonic() > deadline:
                raise TimeoutError(f"redis on port {port} did not answer {commands!r}")
            chunk = sock.recv(4096)
            if not chunk:
                break
            buf += chunk
        return buf.split(b"\r\n")[: len(commands)]


def redis_command(port: int, *args: str, timeout: float = 2.0) -> bytes:
    """Send one command; return the first line of its reply (no CRLF)."""
    return redis_commands(port, args, timeout=timeout)[0]


def ping(port: int, timeout: float = 1.0) -> bool:
    """True if a redis on 127.0.0.1:port answers PING with PONG."""
    try:
        return redis_command(port, "PING", timeout=timeout) == b"+PONG"
    except OSError:
        return False


@dataclass
class RedisServer:
    """A running redis-server that this process started."""

    port: int
    process: subprocess.Popen[bytes]
    workdir: Path
    log_path: Path
    _log_file: IO[bytes] | None = field(default=None, repr=False)
    _owns_workdir: bool = field(default=False, repr=False)

    @property
    def host(self) -> str:
        return HOST

    @property
    def pid(self) -> int:
        return self.process.pid

    def url(self, db: int = 0) -> str:
        return f"redis://{HOST}:{self.port}/{db}"

    def is_running(self) -> bool:
        return self.process.poll() is None

    def ping(self) -> bool:
        return ping(self.port)

    def flushall(self) -> None:
        reply = redis_command(self.port, "FLUSHALL")
        if reply != b"+OK":
            raise RedisServerError(f"FLUSHALL failed: {reply!r}")

    def flushdb(self, db: int) -> None:
        replies = redis_commands(self.port, ("SELECT", str(db)), ("FLUSHDB",))
        if replies != [b"+OK", b"+OK"]:
            raise RedisServerError(f"SELECT {db} / FLUSHDB failed: {replies!r}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM our redis-server, SIGKILL it if it outlives ``timeout``."""
        try:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(timeout=timeout)
        finally:
            if self._log_file is not None:
                self._log_file.close()
                self._log_file = None
            if self._owns_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)


def start_redis_server(
    workdir: Path | None = None,
    *,
    startup_timeout: float = 10.0,
    executable: str | None = None,
    databases: int = DEFAULT_DATABASES,
    attempts: int = 3,
) -> RedisServer:
    """Start redis-server on 127.0.0.1:<free port> and wait until it answers PING.

    Raises RedisServerError if the binary is missing or the server does not
    come up (a few attempts with fresh ports, in case a port was taken).
    """
    exe = executable or find_redis_server()
    if exe is None:
        raise RedisServerError("redis-server not found (install Debian's `redis-server` package)")
    owns_workdir = workdir is None
    base = Path(tempfile.mkdtemp(prefix="rca-redis-")) if workdir is None else workdir
    base.mkdir(parents=True, exist_ok=True)

    last_tail = ""
    for _attempt in range(max(1, attempts)):
        port = free_port()
        log_path = base / f"redis-{port}.log"
        log_file = open(log_path, "wb")  # closed by RedisServer.stop
        argv = [
            exe,
            "--bind",
            HOST,
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(base),
            "--daemonize",
            "no",
            "--protected-mode",
            "yes",
            "--databases",
            str(databases),
            "--logfile",
            "",
        ]
        proc = subprocess.Popen(
            argv,
            cwd=base,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        server = RedisServer(
            port=port,
            process=proc,
            workdir=base,
            log_path=log_path,
            _log_file=log_file,
            _owns_workdir=False,
        )
        deadline = time.monotonic() + startup_timeout
        max_checks = int(startup_timeout / 0.05) + 10
        for _ in range(max_checks):
            if proc.poll() is not None or time.monotonic() > deadline:
                break
            if ping(port, timeout=0.5):
                server._owns_workdir = owns_workdir
                return server
            time.sleep(0.05)
        last_tail = server.log_tail()
        server.stop()
    if owns_workdir:
        shutil.rmtree(base, ignore_errors=True)
    raise RedisServerError(
        f"redis-server did not answer PING within {startup_timeout}s "
        f"after {attempts} attempt(s). Log tail:\n{last_tail}"
    )
