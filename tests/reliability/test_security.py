"""Secrets stay secret, files stay in their folder, TLS is verified; on every adapter.

A real worker (``rca_aiohttp`` on asyncio, ``rca_httpx`` on asyncio and trio)
talks to fault-injecting fake orchestrators over real HTTP on 127.0.0.1
(and, for TLS, to a small HTTPS server with a self-signed certificate made by
``openssl`` for the test). What is checked:

* a token travels only in the ``X-Worker-Token`` header of the orchestrator it
  belongs to: never in a URL, a body, another header, a WebSocket message, a
  log record (every logger, DEBUG) or a failure message, even when a handler's
  exception or a server's reply quotes it;
* ``TaskFiles`` refuses names that leave the task folder (``..``, absolute
  paths, symlinks pointing out): the handler gets a clear ``TaskFailure`` and
  the task fails ``INVALID_INPUT_ERROR`` naming the name;
* a hostile ``task_id`` (``../../etc/x``, ``a/b``, ``..``) cannot steer the task
  folder outside ``TASK_FILES_DIR``, and the folder is removed after the result;
* certificates are verified by default: a self-signed orchestrator is refused
  (the certificate error is logged) and never sees a request.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import ssl
import subprocess
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import pytest
from aiohttp import web

from tests.support.fault_orchestrator import FaultOrchestrator, RecordedRequest, Reply, make_task
from tests.support.workers import AdapterCase, await_until, serving_worker

if TYPE_CHECKING:
    from rca_aiohttp import TaskFiles  # resolved by class name: each adapter has its own

pytestmark = pytest.mark.anyio

SOON = 20.0
TOKEN_A = "tokA-" + uuid.uuid4().hex  # orchestrator A's own token (ORCHESTRATORS_CONFIG)
TOKEN_B = "tokB-" + uuid.uuid4().hex  # WORKER_INDIVIDUAL_TOKEN: used for B
TOKEN_C = "tokC-" + uuid.uuid4().hex  # WORKER_TOKEN: overridden everywhere, never sent
SECRETS = (TOKEN_A, TOKEN_B, TOKEN_C)

Factory = Callable[..., Awaitable[FaultOrchestrator]]


@pytest.fixture
def case(adapter_case: AdapterCase) -> AdapterCase:
    pytest.importorskip(adapter_case.package)
    return adapter_case


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


class AllLogs(logging.Handler):
    """Every log record of every logger at DEBUG, formatted (exception text included).

    Not ``caplog``: it works with ``-p no:logging`` too. Records are formatted
    as they arrive, after the loggers' own filters (the SDK's redactor) ran.
    """

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
        except Exception as exc:  # keep whatever there is to search
            text = f"{record.name} unformattable {record.msg!r} {record.args!r} ({exc})"
        self.lines.append(f"{text} {record.args!r}")

    def find(self, *parts: str) -> list[str]:
        return [line for line in list(self.lines) if all(p in line for p in parts)]


@pytest.fixture
def all_logs() -> Iterator[AllLogs]:
    handler = AllLogs()
    root = logging.getLogger()
    saved = {"": root.level}
    root.setLevel(logging.DEBUG)
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger) and logger.level > logging.DEBUG:
            saved[name] = logger.level
            logger.setLevel(logging.DEBUG)
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        for name, level in saved.items():
            logging.getLogger(name or None).setLevel(level)


def leaks(text: str) -> list[str]:
    return [secret for secret in SECRETS if secret in text]


class RawRecordingOrchestrator(FaultOrchestrator):
    """The fake, also keeping each request's raw target (path and query) and raw body."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.raw: list[tuple[str, str, bytes]] = []  # (route, raw target, raw body)

    async def _record(self, request: web.Request, route: str) -> RecordedRequest:
        rec = await super()._record(request, route)
        body = await request.read() if request.can_read_body else b""  # cached by aiohttp
        self.raw.append((route, request.raw_path, body))
        return rec


def make_worker(case: AdapterCase, tmp_path: Path, **env: str) -> Any:
    mod = case.module()
    settings = {
        "WORKER_ID": f"security-{case.id}",
        "WORKER_HOST": "127.0.0.1",
        "WORKER_PORT": "0",
        "HEARTBEAT_INTERVAL": "1",
        "TASK_POLL_ERROR_DELAY": "1",
        "RESULT_RETRY_INITIAL_DELAY": "0.2",
        "SHUTDOWN_TIMEOUT": "10",
        "TASK_FILES_DIR": str(tmp_path / "files"),
        **env,
    }
    return mod.Worker(worker_type="security", config=mod.WorkerConfig(settings))


def task_dirs(files_dir: Path) -> list[str]:
    return sorted(os.listdir(files_dir)) if files_dir.is_dir() else []


# ---------------------------------------------------------------------------------------------
# tokens
# ---------------------------------------------------------------------------------------------


async def test_tokens_travel_only_in_the_token_header(
    case: AdapterCase, tmp_path: Path, all_logs: AllLogs
) -> None:
    mod = case.module()
    async with (
        RawRecordingOrchestrator(token=TOKEN_A, poll_hold=1.0) as orch_a,
        RawRecordingOrchestrator(token=TOKEN_B, poll_hold=1.0) as orch_b,
    ):
        worker = make_worker(
            case,
            tmp_path,
            ORCHESTRATORS_CONFIG=json.dumps(
                [
                    {"url": orch_a.url, "token": TOKEN_A, "weight": 1},
                    {"url": orch_b.url, "weight": 1},
                ]
            ),
            MULTI_ORCHESTRATOR_MODE="ROUND_ROBIN",
            WORKER_INDIVIDUAL_TOKEN=TOKEN_B,
            WORKER_TOKEN=TOKEN_C,
            WORKER_ENABLE_WEBSOCKETS="true",
        )

        @worker.task("progress")
        async def progress(
            params: dict[str, Any], send_progress: Any, **kwargs: Any
        ) -> dict[str, Any]:
            await send_progress(0.5, "half way")
            return {"data": {"done": True}}

        @worker.task("leaky")
        async def leaky(params: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
            # A library that quotes the request's headers back in its error.
            raise RuntimeError(f"upstream said: bad header X-Worker-Token: {TOKEN_A} / {TOKEN_B}")

        @worker.task("leaky_failure")
        async def leaky_failure(params: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
            raise mod.TaskFailure(mod.PERMANENT_ERROR, f"credentials {TOKEN_C} were refused")

        # Replies that quote a token back: the worker must not repeat them in its logs.
        orch_a.script("register", Reply.error(401, f"Unauthorized: {TOKEN_A}"))
        orch_b.script("heartbeat", Reply.error(500, f"heartbeat failed for token {TOKEN_B}"))
        orch_a.script("poll", Reply(status=200, text=f'{{"task_id": "{TOKEN_A}", "ty'))
        orch_b.script("result", Reply.error(503, f"try again, {TOKEN_B}"))

        wid = worker.config.WORKER_ID
        async with serving_worker(worker, case):
            await orch_a.wait_for_ws(wid, timeout=SOON)
            await orch_b.wait_for_ws(wid, timeout=SOON)
            tasks: list[tuple[FaultOrchestrator, dict[str, Any]]] = []
            for orch in (orch_a, orch_b):
                for task_type in ("progress", "leaky", "leaky_failure"):
                    tasks.append((orch, orch.enqueue(make_task(task_type))))
            for orch, task in tasks:
                await orch.wait_for_results(task["task_id"], timeout=SOON)
            for orch in (orch_a, orch_b):  # progress went over each one's command channel
                await orch.wait_for(lambda o=orch: o.ws_messages, SOON)

        # Every scripted fault was met (the worker saw the quoted tokens).
        for orch in (orch_a, orch_b):
            for route in ("register", "heartbeat", "poll", "result"):
                assert orch.scripted(route) == 0, (route, orch.url)

        for orch in (orch_a, orch_b):
            assert orch.requests, orch.url
            assert {r.route for r in orch.requests} >= {
                "register",
                "heartbeat",
                "poll",
                "result",
                "ws",
            }
            for rec in orch.requests:
                # The right token, in X-Worker-Token (recorded redacted), on every request.
                assert rec.token_ok, (rec.route, rec.path)
                tokens = [v for k, v in rec.headers.items() if k.lower() == "x-worker-token"]
                assert tokens == ["<redacted>"], rec.headers
                assert not leaks(json.dumps(rec.headers)), (rec.route, rec.headers)
                assert not leaks(rec.path)
            for route, target, body in orch.raw:
                assert not leaks(target), (route, target)
                assert not leaks(body.decode("utf-8", "replace")), (route, body[:300])
            for message in orch.ws_messages:
                raw = message.raw if isinstance(message.raw, str) else message.raw.decode()
                assert not leaks(raw), raw

        # Failure messages name the problem, with the tokens masked.
        for orch, task in tasks:
            (record,) = orch.results_for(task["task_id"])
            assert not leaks(json.dumps(record.result)), record.result
            if task["type"] == "leaky":
                message = record.result["error"]["message"]
                assert record.result["error"]["code"] == "TRANSIENT_ERROR"
                assert "RuntimeError" in message and "***" in message, message
            elif task["type"] == "leaky_failure":
                assert record.result["error"] == {
                    "code": "PERMANENT_ERROR",
                    "message": "credentials *** were refused",
                }
            else:
                assert record.result == {"status": "success", "data": {"done": True}}

    # No log record of the run, from any logger at DEBUG, carries a token.
    assert all_logs.lines
    assert all_logs.find("refused")  # the 401 was logged (without the token)
    assert any("handler 'leaky' raised" in line for line in all_logs.lines)
    leaked = [line for line in all_logs.lines if leaks(line)]
    assert not leaked, leaked[:5]


# ---------------------------------------------------------------------------------------------
# TaskFiles
# ---------------------------------------------------------------------------------------------


async def test_task_files_refuse_names_that_leave_the_task_folder(
    case: AdapterCase, tmp_path: Path, fault_orchestrator_factory: Factory
) -> None:
    mod = case.module()
    orch = await fault_orchestrator_factory(poll_hold=1.0)
    files_dir = tmp_path / "files"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("outside-secret-content")
    before = sorted(p.name for p in outside.iterdir())
    worker = make_worker(
        case, tmp_path, ORCHESTRATOR_URL=orch.url, WORKER_TOKEN=orch.token, MAX_CONCURRENT_TASKS="4"
    )
    seen: dict[str, Any] = {}

    @worker.task("files_op")
    async def files_op(params: dict[str, Any], files: TaskFiles, task_id: str) -> dict[str, Any]:
        root = await files.get_root()
        if params.get("link"):  # a symlink inside the folder that points outside
            os.symlink(params["link"], os.path.join(root, "link"))
        name, op = params["name"], params["op"]
        try:
            if op == "write":
                await files.write(name, "x")
            elif op == "read":
                await files.read(name)
            elif op == "path_to":
                await files.path_to(name)
            elif op == "exists":
                await files.exists(name)
            elif op == "open":
                async with files.open(name, "w") as f:
                    await f.write("x")
            else:
                raise AssertionError(op)
        except Exception as exc:
            seen[task_id] = exc
            raise
        seen[task_id] = None
        return {"data": {"content": await files.read(name)}}

    cases = [
        ("write", "../escape.txt", None),
        ("write", "sub/../../escape.txt", None),
        ("write", str(outside / "absolute.txt"), None),
        ("read", "../../outside/secret.txt", None),
        ("path_to", "../../outside/x", None),
        ("exists", "/etc/passwd", None),
        ("open", "../opened.txt", None),
        ("write", "link/evil.txt", str(outside)),  # a symlinked folder pointing out
        ("read", "link", str(outside / "secret.txt")),  # a symlinked file pointing out
        ("write", "link", str(outside / "new.txt")),  # a dangling symlink pointing out
    ]
    async with serving_worker(worker, case):
        tasks = [
            orch.enqueue(make_task("files_op", {"op": op, "name": name, "link": link}))
            for op, name, link in cases
        ]
        good = orch.enqueue(make_task("files_op", {"op": "write", "name": "ok/inner.txt"}))
        for task in [*tasks, good]:
            await orch.wait_for_results(task["task_id"], timeout=SOON)
        await await_until(lambda: task_dirs(files_dir) == [], timeout=SOON)

    for (op, name, _link), task in zip(cases, tasks, strict=True):
        exc = seen[task["task_id"]]
        # The handler got a clear error: a TaskFailure naming the name.
        assert isinstance(exc, mod.TaskFailure), (op, name, exc)
        assert exc.code == "INVALID_INPUT_ERROR", (op, name, exc.code)
        assert repr(name) in exc.message and "task folder" in exc.message, exc.message
        (record,) = orch.results_for(task["task_id"])
        assert record.result["status"] == "failure"
        assert record.result["error"]["code"] == "INVALID_INPUT_ERROR"
        assert repr(name) in record.result["error"]["message"], record.result
        assert "outside-secret-content" not in json.dumps(record.result)
    # Nothing was written outside, nothing escaped above the files folder.
    assert sorted(p.name for p in outside.iterdir()) == before
    assert (outside / "secret.txt").read_text() == "outside-secret-content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["files", "outside"]
    # A name that stays inside works.
    assert seen[good["task_id"]] is None
    assert orch.results_for(good["task_id"])[0].result == {
        "status": "success",
        "data": {"content": "x"},
    }


async def test_a_hostile_task_id_cannot_steer_the_task_folder(
    case: AdapterCase, tmp_path: Path, fault_orchestrator_factory: Factory
) -> None:
    orch = await fault_orchestrator_factory(poll_hold=1.0)
    files_dir = tmp_path / "a" / "b" / "files"
    worker = make_worker(
        case,
        tmp_path,
        ORCHESTRATOR_URL=orch.url,
        WORKER_TOKEN=orch.token,
        TASK_FILES_DIR=str(files_dir),
        MAX_CONCURRENT_TASKS="4",
    )
    written: dict[str, dict[str, str]] = {}

    @worker.task("write_here")
    async def write_here(params: dict[str, Any], files: TaskFiles, task_id: str) -> dict[str, Any]:
        await files.write("out.txt", "payload")
        path = await files.path_to("out.txt")
        written[task_id] = {"root": files.root, "path": os.path.realpath(path)}
        return {"data": {"ok": True}}

    hostile = [
        "../../etc/x",
        "../../../escape",
        "a/b",
        "..",
        ".",
        "/abs/olute",
        "x/../../../y",
        "..\\..\\win",
        "plain-id",
    ]
    real_files_dir = os.path.realpath(files_dir)
    async with serving_worker(worker, case):
        for task_id in hostile:
            orch.enqueue(make_task("write_here", task_id=task_id))
        for task_id in hostile:
            await orch.wait_for_results(task_id, timeout=SOON)
        # Folders go once their result is acknowledged.
        await await_until(lambda: task_dirs(files_dir) == [], timeout=SOON)

    for task_id in hostile:
        (record,) = orch.results_for(task_id)
        assert record.result == {"status": "success", "data": {"ok": True}}, (task_id, record)
        where = written[task_id]
        # The folder is one level below TASK_FILES_DIR, and the file is inside it.
        assert os.path.dirname(os.path.realpath(where["root"])) == real_files_dir, where
        assert where["path"].startswith(real_files_dir + os.sep), where
        assert not os.path.exists(where["path"])  # removed after the result
    assert len({w["root"] for w in written.values()}) == len(hostile)  # one folder per task
    assert written["plain-id"]["root"] == os.path.join(files_dir, "plain-id")
    # Nothing appeared anywhere else under tmp_path.
    allowed = {tmp_path / "a", tmp_path / "a" / "b", files_dir}
    stray = [p for p in tmp_path.rglob("*") if p not in allowed and files_dir not in p.parents]
    assert stray == []


# ---------------------------------------------------------------------------------------------
# TLS
# ---------------------------------------------------------------------------------------------


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    openssl = shutil.which("openssl") or "/usr/bin/openssl"
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes",
            "-keyout", str(key), "-out", str(cert),
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-days", "1",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )  # fmt: skip
    return cert, key


async def test_tls_certificates_are_verified_by_default(
    case: AdapterCase, tmp_path: Path, all_logs: AllLogs
) -> None:
    cert, key = self_signed(tmp_path)
    seen: list[tuple[str, str]] = []

    async def record(request: web.Request) -> web.Response:
        seen.append((request.method, request.path))
        return web.json_response({"status": "registered"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    url = f"https://127.0.0.1:{port}"
    site = web.SockSite(runner, sock, ssl_context=server_ctx)
    await site.start()
    try:
        # The server is fine for a client that trusts its certificate...
        def trusted_get() -> int:
            ctx = ssl.create_default_context(cafile=str(cert))
            with urllib.request.urlopen(f"{url}/probe", timeout=10, context=ctx) as resp:
                return int(resp.status)

        assert await anyio.to_thread.run_sync(trusted_get) == 200
        assert seen == [("GET", "/probe")]
        seen.clear()

        # ...but the worker, with default settings, refuses it, and says why.
        def refused() -> list[str]:
            return all_logs.find("registration with", url, "CERTIFICATE_VERIFY_FAILED")

        worker = make_worker(case, tmp_path, ORCHESTRATOR_URL=url, WORKER_TOKEN=TOKEN_C)
        async with serving_worker(worker, case, wait_ready=None) as running:
            await await_until(lambda: seen or refused(), timeout=SOON)
            assert seen == [], "the server accepted a request from a worker that should refuse it"
            assert refused(), all_logs.find("registration with")
            await await_until(
                lambda: len(all_logs.find("registration with", "failed")) >= 2, timeout=SOON
            )
            snapshot = running.snapshot()
            assert running.alive
            assert [link["state"] for link in snapshot["orchestrators"]] != ["registered"]
            assert not any(link["announced"] for link in snapshot["orchestrators"])
        assert seen == [], "the server accepted a request from a worker that should refuse it"
    finally:
        await runner.cleanup()
    leaked = [line for line in all_logs.lines if leaks(line)]
    assert not leaked, leaked[:5]
