"""pytest plugin: the REAL Avtomatika orchestrator (1.0b10) for interop tests.

Fixtures
--------
``redis_server`` (session)
    A private ``redis-server`` on 127.0.0.1 (see ``tests.support.redis_server``).
``orchestrator_factory`` (function)
    ``orchestrator_factory(**settings) -> RealOrchestrator``: starts one more
    orchestrator subprocess, each on its own free port and its own freshly
    flushed Redis database; all are stopped at teardown. ``settings`` are the
    fields of ``OrchestratorSettings`` (e.g. ``poll_timeout=2``), plus
    ``redis_db=<int>`` to share a database (= one orchestrator "cluster").
``real_orchestrator`` (function)
    ``orchestrator_factory()`` with default settings.

If redis-server, avtomatika, redis or aiohttp is missing the fixtures FAIL
(never skip): CI must install them.

A test that fails gets the tail of every orchestrator log it used appended
to its report. An orchestrator process that died without being asked to is
reported as a teardown error.
"""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Collection, Generator, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from secrets import token_urlsafe
from typing import Any

import pytest

from tests.support.redis_server import (
    DEFAULT_DATABASES,
    RedisServer,
    RedisServerError,
    find_redis_server,
    free_port,
    start_redis_server,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
APP_MODULE = "tests.support.orchestrator_app"
HOST = "127.0.0.1"

# Mirrors tests.support.orchestrator_app (importing that module needs
# avtomatika, and this plugin must load - and fail clearly - without it).
INTEROP_BLUEPRINT = "interop"
INSTANT_BLUEPRINT = "interop_instant"
START_STATE = "start"
DONE_STATE = "done"
REVIEWED_STATE = "reviewed"
CANCELLED_STATE = "cancelled_state"
END_STATES: tuple[str, ...] = (DONE_STATE, REVIEWED_STATE, CANCELLED_STATE)
# Job ``status`` values after which nothing more happens to the job.
FINAL_STATUSES: tuple[str, ...] = ("failed", "quarantined", "error", "finished")
READY_MARKER = "ORCHESTRATOR READY"

REQUIRED_MODULES = ("avtomatika", "rxon", "redis", "aiohttp", "opentelemetry")


class OrchestratorStartError(RuntimeError):
    """The orchestrator subprocess did not come up."""


class OrchestratorAPIError(RuntimeError):
    """A client API call got an unexpected HTTP status."""

    def __init__(self, method: str, path: str, status: int, body: Any) -> None:
        super().__init__(f"{method} {path} -> HTTP {status}: {body!r}")
        self.method = method
        self.path = path
        self.status = status
        self.body = body


@dataclass(frozen=True)
class OrchestratorSettings:
    """Knobs passed to ``tests.support.orchestrator_app`` (see its --help)."""

    job_max_retries: int = 2  # JOB_MAX_RETRIES: TRANSIENT_ERROR => 1 + 2 attempts
    watcher_interval: int = 1  # WATCHER_INTERVAL_SECONDS (real default 20)
    poll_timeout: int = 30  # WORKER_POLL_TIMEOUT_SECONDS: the real long-poll hold
    worker_timeout: int = 300  # WORKER_TIMEOUT_SECONDS
    health_check_interval: int = 60  # worker record TTL = 2x this
    stream_block_ms: int = 1000  # REDIS_STREAM_BLOCK_MS (real default 5000)
    stream_min_idle_ms: int = 60000  # reclaim of unacked job messages
    shutdown_timeout: float = 2.0  # grace for in-flight requests on SIGTERM
    log_level: str = "INFO"

    def argv(self) -> list[str]:
        out: list[str] = []
        for key, value in asdict(self).items():
            out += ["--" + key.replace("_", "-"), str(value)]
        return out


def missing_requirements() -> list[str]:
    """Names of what the real-orchestrator harness needs but cannot find."""
    missing = [name for name in REQUIRED_MODULES if importlib.util.find_spec(name) is None]
    if find_redis_server() is None:
        missing.append("redis-server (Debian package `redis-server`)")
    return missing


def _require_everything() -> None:
    missing = missing_requirements()
    if missing:
        pytest.fail(
            "The real-orchestrator harness needs: "
            + ", ".join(missing)
            + ". Install the pinned set from /work/shared/spec/orchestrator-1.0b10.lock "
            "(avtomatika==1.0b10, rxon, redis, opentelemetry-api, ...) and Debian's "
            "redis-server; these tests are required, not optional.",
            pytrace=False,
        )


def _no_proxy_opener() -> urllib.request.OpenerDirector:
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


class RealOrchestrator:
    """One orchestrator subprocess plus a small client for its client API."""

    def __init__(
        self,
        *,
        redis: RedisServer,
        redis_db: int,
        workdir: Path,
        settings: OrchestratorSettings,
        startup_timeout: float = 30.0,
    ) -> None:
        self.redis = redis
        self.redis_db = redis_db
        self.redis_url = redis.url(redis_db)
        self.settings = settings
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.worker_token = "wt-" + token_urlsafe(16)
        self.client_token = "ct-" + token_urlsafe(16)
        self.workdir = workdir
        self.log_path = workdir / f"orchestrator-{self.port}.log"
        self.clients_config_path = workdir / f"clients-{self.port}.toml"
        self.startup_timeout = startup_timeout
        self.startup_seconds: list[float] = []
        self._process: subprocess.Popen[bytes] | None = None
        self._starts = 0
        self._unexpected_exit: int | None = None
        self._stopped_by_us = False
        self._write_clients_config()

    # ------------------------------------------------------------------ process

    def _write_clients_config(self) -> None:
        self.clients_config_path.write_text(
            "[interop_tests]\n"
            f'token = "{self.client_token}"\n'
            'plan = "test"\n'
            "monthly_attempts = 1000000000\n"
        )

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _argv(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            APP_MODULE,
            "--port",
            str(self.port),
            "--redis-url",
            self.redis_url,
            "--worker-token",
            self.worker_token,
            "--clients-config",
            str(self.clients_config_path),
            "--instance-id",
            f"rca-test-orchestrator-{self.port}",
            *self.settings.argv(),
        ]

    def start(self) -> None:
        """Start the subprocess and wait (bounded) until it serves requests."""
        if self.is_running():
            raise RuntimeError(f"orchestrator on {self.url} is already running")
        self._check_unexpected_exit()
        self._starts += 1
        self._stopped_by_us = False
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p
        )
        began = time.monotonic()
        with open(self.log_path, "ab") as log:
            offset = log.tell()
            log.write(f"\n===== start #{self._starts} on {self.url} =====\n".encode())
            log.flush()
            self._process = subprocess.Popen(
                self._argv(),
                cwd=REPO_ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            self._wait_ready(offset)
        except BaseException:
            self._stopped_by_us = True
            self._terminate(graceful=False, timeout=5.0)
            raise
        self.startup_seconds.append(time.monotonic() - began)

    def _wait_ready(self, log_offset: int) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self.startup_timeout
        interval = 0.05
        opener = _no_proxy_opener()
        marker = f"{READY_MARKER} {self.url}".encode()
        for _ in range(int(self.startup_timeout / interval) + 10):
            code = self._process.poll()
            if code is not None:
                raise OrchestratorStartError(
                    f"orchestrator exited with code {code} during startup.\n"
                    f"--- log tail ({self.log_path}) ---\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                break
            if self._log_contains(marker, log_offset):
                try:
                    with opener.open(f"{self.url}/_public/status", timeout=1.0) as resp:
                        if resp.status == 200:
                            return
                except (OSError, urllib.error.URLError):
                    pass
            time.sleep(interval)
        raise OrchestratorStartError(
            f"orchestrator on {self.url} not ready within {self.startup_timeout}s.\n"
            f"--- log tail ({self.log_path}) ---\n{self.log_tail()}"
        )

    def _log_contains(self, needle: bytes, offset: int) -> bool:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                return needle in f.read()
        except OSError:
            return False

    def _terminate(self, *, graceful: bool, timeout: float) -> None:
        proc = self._process
        if proc is None or proc.poll() is not None:
            return
        if graceful:
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
            else:
                # Our app exits 0 on SIGTERM; anything else means it was
                # already dying (crash, foreign signal) or failed to shut down.
                if code != 0 and self._unexpected_exit is None:
                    self._unexpected_exit = code
                return
        proc.kill()
        proc.wait(timeout=timeout)

    def _check_unexpected_exit(self) -> None:
        proc = self._process
        if proc is not None and not self._stopped_by_us:
            code = proc.poll()
            if code is not None and self._unexpected_exit is None:
                self._unexpected_exit = code

    @property
    def unexpected_exit_code(self) -> int | None:
        """Exit code of a process that died without stop()/kill()/restart(),
        or that did not exit cleanly (code 0) on a graceful stop()."""
        self._check_unexpected_exit()
        return self._unexpected_exit

    def stop(self, *, graceful: bool = True, timeout: float = 10.0) -> None:
        """Stop our subprocess by PID: SIGTERM (graceful; SIGKILL after
        ``timeout``) or SIGKILL right away. Bounded."""
        self._check_unexpected_exit()
        self._stopped_by_us = True
        self._terminate(graceful=graceful, timeout=timeout)

    def kill(self) -> None:
        """SIGKILL the orchestrator (a crash: no shutdown, unacked work stays)."""
        self.stop(graceful=False)

    def restart(self, *, graceful: bool = False, downtime: float = 0.0) -> None:
        """Kill (default) or stop the orchestrator, then start it again on the
        SAME port with the SAME Redis database and tokens."""
        self.stop(graceful=graceful)
        if downtime > 0:
            time.sleep(downtime)
        self.start()

    async def astart(self) -> None:
        await _run_in_thread(self.start)

    async def astop(self, *, graceful: bool = True, timeout: float = 10.0) -> None:
        await _run_in_thread(lambda: self.stop(graceful=graceful, timeout=timeout))

    async def arestart(self, *, graceful: bool = False, downtime: float = 0.0) -> None:
        """``restart`` without blocking the event loop (workers keep running)."""
        await _run_in_thread(lambda: self.restart(graceful=graceful, downtime=downtime))

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    # -------------------------------------------------------------- client API

    def _headers(self) -> dict[str, str]:
        return {"X-Client-Token": self.client_token}

    async def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        client_auth: bool = True,
        timeout: float = 10.0,
    ) -> tuple[int, Any]:
        """One HTTP request to the orchestrator; returns (status, parsed body)."""
        import aiohttp

        headers = self._headers() if client_auth else {}
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session,
            session.request(method, self.url + path, json=json_body, headers=headers) as resp,
        ):
            text = await resp.text()
            body: Any
            try:
                body = await resp.json(content_type=None) if text else None
            except ValueError:
                body = text
            return resp.status, body

    async def _expect(
        self, method: str, path: str, statuses: Collection[int], json_body: Any = None
    ) -> Any:
        status, body = await self.request(method, path, json_body=json_body)
        if status not in statuses:
            raise OrchestratorAPIError(method, path, status, body)
        return body

    async def create_job(self, blueprint: str, params: dict[str, Any]) -> str:
        """Create a job of ``blueprint`` with ``params`` as its initial data."""
        path = f"/api/jobs/{blueprint}"
        body = await self._expect("POST", path, (202,), {"initial_data": params})
        job_id = body.get("job_id") if isinstance(body, dict) else None
        if not isinstance(job_id, str):
            raise OrchestratorAPIError("POST", path, 202, body)
        return job_id

    async def get_job(self, job_id: str) -> dict[str, Any]:
        """The orchestrator's stored job state (``GET /api/jobs/{id}``)."""
        body = await self._expect("GET", f"/api/jobs/{job_id}", (200,))
        assert isinstance(body, dict)
        return body

    async def wait_for_job(
        self,
        job_id: str,
        *,
        states: Collection[str] | None = None,
        statuses: Collection[str] | None = None,
        timeout: float = 30.0,
        interval: float = 0.05,
    ) -> dict[str, Any]:
        """Poll the job until its ``current_state`` is in ``states`` or its
        ``status`` is in ``statuses``; return the job. Bounded in time and
        count; raises TimeoutError with the last job seen.

        With neither given, waits for any end: ``END_STATES`` or
        ``FINAL_STATUSES``.
        """
        if states is None and statuses is None:
            states, statuses = END_STATES, FINAL_STATUSES
        want_states = frozenset(states or ())
        want_statuses = frozenset(statuses or ())
        deadline = time.monotonic() + timeout
        last: dict[str, Any] | None = None
        for _ in range(int(timeout / interval) + 2):
            last = await self.get_job(job_id)
            if last.get("current_state") in want_states or last.get("status") in want_statuses:
                return last
            if time.monotonic() >= deadline:
                break
            await asyncio.sleep(interval)
        summary = (
            {k: last.get(k) for k in ("current_state", "status", "retry_count", "error_message")}
            if last
            else None
        )
        raise TimeoutError(
            f"job {job_id} did not reach states={sorted(want_states)} / "
            f"statuses={sorted(want_statuses)} within {timeout}s; last seen: {summary}"
        )

    async def cancel_job(self, job_id: str) -> dict[str, Any]:
        """``POST /api/jobs/{id}/cancel``; returns the reply body.

        200 ``{"status": "cancellation_request_sent"}`` when the command went
        out over the worker's WebSocket, ``cancellation_request_accepted``
        when only the Redis flag was set. 409 (job not waiting for a worker)
        raises OrchestratorAPIError.
        """
        body = await self._expect("POST", f"/api/jobs/{job_id}/cancel", (200,))
        assert isinstance(body, dict)
        return body

    async def get_workers(self) -> list[dict[str, Any]]:
        """Live worker records (``GET /api/workers``)."""
        body = await self._expect("GET", "/api/workers", (200,))
        assert isinstance(body, list)
        return body

    async def get_quarantined_job_ids(self) -> list[str]:
        """``GET /_public/jobs/quarantined``."""
        status, body = await self.request("GET", "/_public/jobs/quarantined", client_auth=False)
        if status != 200 or not isinstance(body, list):
            raise OrchestratorAPIError("GET", "/_public/jobs/quarantined", status, body)
        return [str(x) for x in body]


async def _run_in_thread(func: Callable[[], None]) -> None:
    try:
        import anyio.to_thread
    except ImportError:  # pragma: no cover - anyio is a test dependency
        await asyncio.get_running_loop().run_in_executor(None, func)
        return
    await anyio.to_thread.run_sync(func)


@dataclass
class _Registry:
    orchestrators: list[RealOrchestrator] = field(default_factory=list)


_REGISTRY_KEY = pytest.StashKey[_Registry]()
_db_counter = itertools.count(1)


def _next_db() -> int:
    # db 0 is left alone; 1..DEFAULT_DATABASES-1 are handed out round-robin
    # and flushed before each use.
    return 1 + (next(_db_counter) - 1) % (DEFAULT_DATABASES - 1)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A private redis-server (127.0.0.1, free port, no persistence)."""
    _require_everything()
    try:
        server = start_redis_server(tmp_path_factory.mktemp("redis"))
    except RedisServerError as exc:
        pytest.fail(f"could not start redis-server: {exc}", pytrace=False)
    try:
        yield server
    finally:
        server.stop()


OrchestratorFactory = Callable[..., RealOrchestrator]


@pytest.fixture
def orchestrator_factory(
    request: pytest.FixtureRequest,
    redis_server: RedisServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[OrchestratorFactory]:
    """``make(**settings, redis_db=None) -> RealOrchestrator`` (started)."""
    _require_everything()
    registry = _Registry()
    request.node.stash[_REGISTRY_KEY] = registry
    workdir = tmp_path_factory.mktemp("orchestrator")

    def make(*, redis_db: int | None = None, **overrides: Any) -> RealOrchestrator:
        settings = replace(OrchestratorSettings(), **overrides)
        if redis_db is None:
            redis_db = _next_db()
            redis_server.flushdb(redis_db)
        orch = RealOrchestrator(
            redis=redis_server, redis_db=redis_db, workdir=workdir, settings=settings
        )
        registry.orchestrators.append(orch)
        try:
            orch.start()
        except OrchestratorStartError as exc:
            pytest.fail(str(exc), pytrace=False)
        return orch

    yield make

    died: list[str] = []
    for orch in registry.orchestrators:
        orch.stop()
        code = orch.unexpected_exit_code
        if code is not None:
            died.append(
                f"orchestrator {orch.url} died on its own or did not stop cleanly: code "
                f"{code}.\n--- log tail ---\n{orch.log_tail()}"
            )
    if died:
        pytest.fail("\n\n".join(died), pytrace=False)


@pytest.fixture
def real_orchestrator(orchestrator_factory: OrchestratorFactory) -> RealOrchestrator:
    """A fresh real orchestrator (default settings, its own Redis database)."""
    return orchestrator_factory()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed and report.when in ("call", "setup"):
        registry = item.stash.get(_REGISTRY_KEY, None)
        if registry is not None:
            for orch in registry.orchestrators:
                report.sections.append(
                    (f"orchestrator {orch.url} (pid {orch.pid}) log tail", orch.log_tail())
                )
    return report
