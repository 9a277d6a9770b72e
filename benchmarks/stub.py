"""A minimal, fast orchestrator stub for benchmarks (raw asyncio, no HTTP framework).

It speaks just enough of the worker protocol (``PROTOCOL.md``) for a worker to
run flat out against it, on 127.0.0.1 only:

- ``POST /_worker/workers/register``: ``200 {"status": "registered"}``;
- ``PATCH /_worker/workers/{id}``: shallow-merges the body into the worker's
  record and answers ``200`` with the record (``null`` for an unknown worker,
  as orchestrator 1.0b10 does);
- ``GET /_worker/workers/{id}/tasks/next``: a fresh no-op task (``type``
  ``"noop"``, ``params`` ``{}``) while the task budget lasts; once it is spent
  (or with ``--tasks 0``) the poll is held ``--hold`` seconds, then ``204``;
- ``POST /_worker/tasks/result``: ``200 {"status": "ok"}``, counted per task;
- WebSocket upgrades and anything else: ``404``.

Polls that arrive before the harness says ``start`` are parked until then, so
the measured window begins with a worker that is already up and polling.

Control routes (for the harness, not counted as worker traffic):

- ``POST /_control/start`` with ``{"pid": WORKER_PID}``: open the tap; the
  stub samples that process's CPU time (``/proc/PID/stat``) and RSS (``VmRSS``)
  at the start and at every result mark (10 %, 50 %, 100 % of the budget), so
  the measured window is exact;
- ``GET /_control/stats``: counters and marks as JSON;
- ``GET /_control/wait?timeout=S``: answers when every budgeted task has its
  result, or after S seconds, with the same JSON.

The first line on stdout is ``READY <port>``; on SIGTERM/SIGINT the final stats
are printed as one ``STATS {...}`` line. Run ``python benchmarks/stub.py -h``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import sys
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

CLK_TCK = os.sysconf("SC_CLK_TCK")
MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 16 * 1024 * 1024
MARK_FRACTIONS = (0.1, 0.5, 1.0)

REASONS = {
    100: "Continue",
    200: "OK",
    204: "No Content",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Payload Too Large",
}

WORKER_PREFIX = "/_worker/"
REGISTER_PATH = "/_worker/workers/register"
RESULT_PATH = "/_worker/tasks/result"
WORKERS_PREFIX = "/_worker/workers/"
POLL_SUFFIX = "/tasks/next"

COUNTER_NAMES = (
    "requests",
    "register",
    "heartbeat",
    "heartbeat_unknown",
    "poll",
    "poll_task",
    "poll_204",
    "result",
    "result_duplicate",
    "result_unknown_task",
    "result_job_mismatch",
    "result_not_success",
    "ws_refused",
    "unauthorized",
    "not_found",
    "bad_request",
)


def proc_cpu_seconds(pid: int) -> float | None:
    """utime + stime of a whole process (all its threads), in seconds."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    # Fields after the parenthesised command name; utime and stime are the
    # 14th and 15th fields of the line, i.e. the 12th and 13th after ")".
    fields = raw[raw.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_rss_kib(pid: int) -> int | None:
    """Resident set size (``VmRSS``) of a process, in KiB."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def self_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


class Request:
    __slots__ = ("body", "headers", "method", "target", "version")

    def __init__(
        self, method: str, target: str, version: str, headers: dict[str, str], body: bytes
    ) -> None:
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        self.body = body


class BadRequest(Exception):
    pass


def _parse_chunked(buf: bytearray, start: int) -> tuple[bytes, int] | None:
    """Decode a chunked body starting at ``start``; None if incomplete."""
    out = bytearray()
    pos = start
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None
        size_text = bytes(buf[pos:eol]).split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError as exc:
            raise BadRequest("bad chunk size") from exc
        pos = eol + 2
        if size == 0:
            # Skip trailers up to the empty line.
            while True:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    return None
                if eol == pos:
                    return bytes(out), eol + 2
                pos = eol + 2
        if len(buf) < pos + size + 2:
            return None
        out += buf[pos : pos + size]
        if len(out) > MAX_BODY_BYTES:
            raise BadRequest("body too large")
        pos += size + 2


class Stub:
    """Shared state: counters, the task budget, parked polls, marks."""

    def __init__(self, *, budget: int, hold: float, token: str | None) -> None:
        self.budget = budget  # < 0: unlimited
        self.hold = hold
        self.token = token
        self.counts: dict[str, int] = dict.fromkeys(COUNTER_NAMES, 0)
        self.counts_at_start: dict[str, int] | None = None
        self.records: dict[str, dict[str, Any]] = {}
        self.issued: dict[str, str] = {}  # task_id -> job_id
        self.results_per_task: dict[str, int] = {}
        self.unique_results = 0
        self.next_task = 0
        self.nonce = os.urandom(4).hex()
        self.started = False
        self.watch_pid: int | None = None
        self.t_start: float | None = None
        self.marks: list[dict[str, Any]] = []
        self.mark_targets: list[tuple[float, int]] = []
        self.parked: list[Connection] = []  # polls waiting for ``start``
        self.holding: set[Connection] = set()  # polls held before a 204
        self.waiters: list[Connection] = []  # /_control/wait requests
        self.done_event = asyncio.Event()

    # -- tasks ---------------------------------------------------------------------------

    def budget_left(self) -> bool:
        return self.budget < 0 or self.next_task < self.budget

    def issue_task(self) -> bytes:
        self.next_task += 1
        n = self.next_task
        task_id = f"task-{self.nonce}-{n}"
        job_id = f"job-{self.nonce}-{n}"
        self.issued[task_id] = job_id
        self.counts["poll_task"] += 1
        return (
            b'{"job_id":"%s","task_id":"%s","type":"noop","params":{},'
            b'"tracing_context":{},"params_metadata":{}}' % (job_id.encode(), task_id.encode())
        )

    def record_result(self, body: bytes) -> None:
        self.counts["result"] += 1
        try:
            payload = json.loads(body)
            task_id = payload["task_id"]
            job_id = payload.get("job_id")
            result = payload.get("result")
        except (ValueError, KeyError, TypeError):
            self.counts["bad_request"] += 1
            return
        expected_job = self.issued.get(task_id)
        if expected_job is None:
            self.counts["result_unknown_task"] += 1
            return
        if job_id != expected_job:
            self.counts["result_job_mismatch"] += 1
        if not isinstance(result, dict) or result.get("status") != "success":
            self.counts["result_not_success"] += 1
        seen = self.results_per_task.get(task_id, 0)
        self.results_per_task[task_id] = seen + 1
        if seen:
            self.counts["result_duplicate"] += 1
            return
        self.unique_results += 1
        while self.mark_targets and self.unique_results >= self.mark_targets[0][1]:
            fraction, count = self.mark_targets.pop(0)
            self.add_mark(f"{round(fraction * 100)}%", count)
        if self.budget > 0 and self.unique_results >= self.budget:
            self.finish()

    # -- measurement ---------------------------------------------------------------------

    def add_mark(self, name: str, results: int) -> None:
        now = time.perf_counter()
        cpu = proc_cpu_seconds(self.watch_pid) if self.watch_pid else None
        rss = proc_rss_kib(self.watch_pid) if self.watch_pid else None
        self.marks.append(
            {
                "name": name,
                "results": results,
                "t": now - (self.t_start or now),
                "worker_cpu_s": cpu,
                "worker_rss_kib": rss,
                "stub_cpu_s": self_cpu_seconds(),
            }
        )

    def start(self, pid: int | None) -> None:
        if self.started:
            return
        self.started = True
        self.watch_pid = pid
        self.t_start = time.perf_counter()
        self.counts_at_start = dict(self.counts)
        self.add_mark("start", 0)
        if self.budget > 0:
            self.mark_targets = [(f, max(1, math.ceil(f * self.budget))) for f in MARK_FRACTIONS]
        parked, self.parked = self.parked, []
        for conn in parked:
            conn.release_parked()

    def finish(self) -> None:
        self.done_event.set()
        waiters, self.waiters = self.waiters, []
        for conn in waiters:
            conn.answer_wait()

    def stats(self) -> dict[str, Any]:
        since = None
        if self.counts_at_start is not None:
            since = {k: v - self.counts_at_start[k] for k, v in self.counts.items()}
        now = time.perf_counter()
        missing = sum(1 for t in self.issued if t not in self.results_per_task)
        return {
            "budget": self.budget,
            "started": self.started,
            "done": self.done_event.is_set(),
            "elapsed_s": now - self.t_start if self.t_start is not None else None,
            "issued": self.next_task,
            "unique_results": self.unique_results,
            "tasks_without_result": missing,
            "max_results_per_task": max(self.results_per_task.values(), default=0),
            "polls_parked": len(self.parked),
            "polls_holding": len(self.holding),
            "registered_workers": sorted(self.records),
            "counts": dict(self.counts),
            "counts_since_start": since,
            "marks": self.marks,
            "worker_cpu_s_now": proc_cpu_seconds(self.watch_pid) if self.watch_pid else None,
            "stub_cpu_s_now": self_cpu_seconds(),
        }


def _json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


class Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; requests are handled strictly in order."""

    def __init__(self, stub: Stub) -> None:
        self.stub = stub
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiting = False  # a parked/held/wait request owns this connection
        self.keep_alive = True
        self.closed = False
        self.hold_handle: asyncio.TimerHandle | None = None
        self.wait_handle: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.hold_handle is not None:
            self.hold_handle.cancel()
            self.hold_handle = None
        if self.wait_handle is not None:
            self.wait_handle.cancel()
            self.wait_handle = None
        stub = self.stub
        stub.holding.discard(self)
        if self in stub.parked:
            stub.parked.remove(self)
        if self in stub.waiters:
            stub.waiters.remove(self)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self.process()

    # -- parsing -------------------------------------------------------------------------

    def process(self) -> None:
        while not self.waiting and not self.closed:
            try:
                req = self.parse_one()
            except BadRequest as exc:
                self.stub.counts["bad_request"] += 1
                self.keep_alive = False
                self.respond(400, _json({"error": str(exc)}))
                return
            if req is None:
                if len(self.buf) > MAX_HEADER_BYTES + MAX_BODY_BYTES:
                    self.keep_alive = False
                    self.respond(413, b"")
                return
            self.handle(req)

    def parse_one(self) -> Request | None:
        buf = self.buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > MAX_HEADER_BYTES:
                raise BadRequest("header too large")
            return None
        head = bytes(buf[:end]).decode("latin-1")
        lines = head.split("\r\n")
        try:
            method, target, version = lines[0].split(" ")
        except ValueError as exc:
            raise BadRequest("bad request line") from exc
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                raise BadRequest("bad header line")
            headers[name.strip().lower()] = value.strip()
        body_start = end + 4
        if "chunked" in headers.get("transfer-encoding", "").lower():
            if headers.get("expect", "").lower() == "100-continue" and len(buf) == body_start:
                self.write_status_only(100)
            parsed = _parse_chunked(buf, body_start)
            if parsed is None:
                return None
            body, consumed = parsed
        else:
            try:
                length = int(headers.get("content-length", "0"))
            except ValueError as exc:
                raise BadRequest("bad content-length") from exc
            if length < 0 or length > MAX_BODY_BYTES:
                raise BadRequest("bad content-length")
            if len(buf) < body_start + length:
                if headers.get("expect", "").lower() == "100-continue" and len(buf) == body_start:
                    self.write_status_only(100)
                return None
            body = bytes(buf[body_start : body_start + length])
            consumed = body_start + length
        del buf[:consumed]
        conn_header = headers.get("connection", "").lower()
        if version == "HTTP/1.0":
            self.keep_alive = "keep-alive" in conn_header
        elif "close" in conn_header:
            self.keep_alive = False
        return Request(method, target, version, headers, body)

    # -- writing -------------------------------------------------------------------------

    def write_status_only(self, status: int) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(b"HTTP/1.1 %d %s\r\n\r\n" % (status, REASONS[status].encode()))

    def respond(self, status: int, body: bytes) -> None:
        transport = self.transport
        if transport is None or self.closed:
            return
        if status == 204:
            head = b"HTTP/1.1 204 No Content\r\n"
        else:
            head = b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n" % (
                status,
                REASONS.get(status, "Unknown").encode(),
                len(body),
            )
        if self.keep_alive:
            transport.write(head + b"\r\n" + body)
        else:
            transport.write(head + b"Connection: close\r\n\r\n" + body)
            transport.close()
            self.closed = True

    # -- routing -------------------------------------------------------------------------

    def handle(self, req: Request) -> None:
        stub = self.stub
        path = req.target.split("?", 1)[0]
        if path.startswith("/_control/"):
            self.handle_control(req, path)
            return
        counts = stub.counts
        counts["requests"] += 1
        if not path.startswith(WORKER_PREFIX):
            counts["not_found"] += 1
            self.respond(404, b'{"error":"not found"}')
            return
        if stub.token is not None and req.headers.get("x-worker-token") != stub.token:
            counts["unauthorized"] += 1
            self.respond(401, b'{"error":"unauthorized"}')
            return
        method = req.method
        if method == "GET" and path.endswith(POLL_SUFFIX) and path.startswith(WORKERS_PREFIX):
            counts["poll"] += 1
            if not stub.started:
                self.waiting = True
                stub.parked.append(self)
            elif stub.budget_left():
                self.respond(200, stub.issue_task())
            else:
                self.hold_poll()
            return
        if method == "POST" and path == RESULT_PATH:
            stub.record_result(req.body)
            self.respond(200, b'{"status":"ok"}')
            return
        if method == "POST" and path == REGISTER_PATH:
            counts["register"] += 1
            try:
                payload = json.loads(req.body or b"{}")
                worker_id = str(payload["worker_id"])
            except (ValueError, KeyError, TypeError):
                counts["bad_request"] += 1
                self.respond(400, b'{"error":"bad register body"}')
                return
            stub.records[worker_id] = payload
            self.respond(200, b'{"status":"registered"}')
            return
        if method == "PATCH" and path.startswith(WORKERS_PREFIX):
            worker_id = path[len(WORKERS_PREFIX) :]
            if "/" not in worker_id:
                counts["heartbeat"] += 1
                try:
                    payload = json.loads(req.body or b"{}")
                    if not isinstance(payload, dict):
                        raise TypeError
                except (ValueError, TypeError):
                    counts["bad_request"] += 1
                    self.respond(400, b'{"error":"bad heartbeat body"}')
                    return
                record = stub.records.get(worker_id)
                if record is None:
                    counts["heartbeat_unknown"] += 1
                    self.respond(200, b"null")
                    return
                record.update(payload)
                self.respond(200, _json(record))
                return
        if req.headers.get("upgrade", "").lower() == "websocket":
            counts["ws_refused"] += 1
        else:
            counts["not_found"] += 1
        self.respond(404, b'{"error":"not found"}')

    def release_parked(self) -> None:
        """The tap opened: answer the poll parked before ``start``."""
        if self.closed:
            return
        self.waiting = False
        if self.stub.budget_left():
            self.respond(200, self.stub.issue_task())
            self.process()
        else:
            self.hold_poll()

    def hold_poll(self) -> None:
        """No task to give: hold the poll, then answer 204 (as the real server does)."""
        self.waiting = True
        self.stub.holding.add(self)
        loop = asyncio.get_running_loop()
        self.hold_handle = loop.call_later(self.stub.hold, self.end_hold)

    def end_hold(self) -> None:
        self.hold_handle = None
        self.stub.holding.discard(self)
        self.waiting = False
        self.stub.counts["poll_204"] += 1
        self.respond(204, b"")
        self.process()

    # -- control -------------------------------------------------------------------------

    def handle_control(self, req: Request, path: str) -> None:
        stub = self.stub
        if path == "/_control/stats":
            self.respond(200, _json(stub.stats()))
        elif path == "/_control/start" and req.method == "POST":
            try:
                payload = json.loads(req.body or b"{}")
                pid = payload.get("pid")
                pid = int(pid) if pid is not None else None
            except (ValueError, TypeError, AttributeError):
                self.respond(400, b'{"error":"bad start body"}')
                return
            stub.start(pid)
            self.respond(200, _json(stub.stats()))
        elif path == "/_control/wait":
            query = parse_qs(urlsplit(req.target).query)
            try:
                timeout = float(query.get("timeout", ["60"])[0])
            except ValueError:
                timeout = 60.0
            if stub.done_event.is_set():
                self.respond(200, _json(stub.stats()))
                return
            self.waiting = True
            stub.waiters.append(self)
            loop = asyncio.get_running_loop()
            self.wait_handle = loop.call_later(max(0.0, timeout), self.answer_wait)
        else:
            self.respond(404, b'{"error":"no such control route"}')

    def answer_wait(self) -> None:
        if self.wait_handle is not None:
            self.wait_handle.cancel()
            self.wait_handle = None
        if self in self.stub.waiters:
            self.stub.waiters.remove(self)
        self.waiting = False
        self.respond(200, _json(self.stub.stats()))
        self.process()


async def serve(args: argparse.Namespace) -> Stub:
    stub = Stub(budget=args.tasks, hold=args.hold, token=args.token)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: Connection(stub), host="127.0.0.1", port=args.port, backlog=1024
    )
    port = server.sockets[0].getsockname()[1]
    print(f"READY {port}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        if args.max_seconds > 0:
            try:
                await asyncio.wait_for(stop.wait(), args.max_seconds)
            except TimeoutError:
                print("stub: --max-seconds reached, exiting", file=sys.stderr)
        else:
            await stop.wait()
    finally:
        server.close()
    return stub


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0, help="0 = pick a free port (default)")
    parser.add_argument(
        "--tasks",
        type=int,
        default=-1,
        help="task budget: N tasks then polls are held; 0 = none; -1 = unlimited (default)",
    )
    parser.add_argument(
        "--hold", type=float, default=30.0, help="seconds a poll is held before 204 (default 30)"
    )
    parser.add_argument("--token", default=None, help="require this X-Worker-Token (default: any)")
    parser.add_argument("--cpu", type=int, default=None, help="pin this process to one CPU core")
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=3600.0,
        help="exit by itself after this long (default 3600; 0 = never)",
    )
    args = parser.parse_args(argv)
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    stub = asyncio.run(serve(args))
    print("STATS " + json.dumps(stub.stats(), separators=(",", ":")), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
