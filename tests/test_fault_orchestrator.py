"""Tests of the fault-injecting fake orchestrator itself, with a plain aiohttp client."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Protocol

import aiohttp
import anyio
import pytest

from tests.support.fault_orchestrator import (
    DEFAULT_TOKEN,
    NORMAL,
    REDACTED,
    Action,
    Delay,
    FaultOrchestrator,
    FaultOrchestratorProcess,
    Hang,
    RawTask,
    Reply,
    Reset,
    action_from_json,
    huge_params_task,
    make_task,
    task_without,
)

pytestmark = pytest.mark.anyio

H = {"X-Worker-Token": DEFAULT_TOKEN}
BAD = {"X-Worker-Token": "wrong"}
Factory = Callable[..., Awaitable[FaultOrchestrator]]


class Target(Protocol):
    @property
    def url(self) -> str: ...


@asynccontextmanager
async def session(**kwargs: Any) -> AsyncIterator[aiohttp.ClientSession]:
    # a fresh connection per request keeps "refuse"/"restart" tests deterministic
    kwargs.setdefault("connector", aiohttp.TCPConnector(force_close=True))
    async with aiohttp.ClientSession(**kwargs) as s:
        yield s


def registration(worker_id: str = "w1", **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "worker_id": worker_id,
        "worker_type": "cpu",
        "supported_tasks": ["echo"],
        "max_concurrent_tasks": 1,
        "cost_per_skill": {},
        "installed_models": [],
        "hostname": "localhost",
        "ip_address": "127.0.0.1",
        "resources": {"cpu_cores": 1, "gpu_info": None},
        "capabilities": {"websockets": True},
    }
    body.update(extra)
    return body


def heartbeat(status: str = "idle", **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "load": 0,
        "status": status,
        "supported_tasks": ["echo"],
        "hot_cache": [],
        "skill_dependencies": {},
        "hot_skills": [],
    }
    body.update(extra)
    return body


async def register(s: aiohttp.ClientSession, orch: Target, wid: str = "w1") -> int:
    async with s.post(
        f"{orch.url}/_worker/workers/register", json=registration(wid), headers=H
    ) as r:
        return r.status


async def beat(
    s: aiohttp.ClientSession, orch: Target, wid: str = "w1", status: str = "idle"
) -> tuple[int, Any]:
    async with s.patch(f"{orch.url}/_worker/workers/{wid}", json=heartbeat(status), headers=H) as r:
        return r.status, await r.json()


async def poll(
    s: aiohttp.ClientSession, url: str, wid: str = "w1", give_up: float = 10.0
) -> tuple[int, str, dict[str, str]]:
    async with s.get(
        f"{url}/_worker/workers/{wid}/tasks/next",
        headers=H,
        timeout=aiohttp.ClientTimeout(total=give_up),
    ) as r:
        return r.status, await r.text(), dict(r.headers)


async def post_result(
    s: aiohttp.ClientSession, url: str, task_id: str, status: str = "success"
) -> tuple[int, str]:
    body = {
        "job_id": "job-1",
        "task_id": task_id,
        "worker_id": "w1",
        "result": {"status": status, "data": {"ok": True}},
    }
    async with s.post(f"{url}/_worker/tasks/result", json=body, headers=H) as r:
        return r.status, await r.text()


# ------------------------------------------------------------------------------ basics


async def test_happy_path_records_everything(fault_orchestrator: FaultOrchestrator) -> None:
    orch = fault_orchestrator
    t0 = orch.now()
    async with session() as s:
        assert await register(s, orch) == 200
        assert orch.workers["w1"]["worker_type"] == "cpu"
        status, record = await beat(s, orch, status="busy")
        assert status == 200
        assert record["status"] == "busy" and record["worker_type"] == "cpu"
        task = orch.enqueue(make_task("echo", {"x": 1}))
        status, text, _ = await poll(s, orch.url)
        assert status == 200
        got = json.loads(text)
        assert got == task
        assert set(got) >= {"job_id", "task_id", "type", "params", "tracing_context"}
        assert await post_result(s, orch.url, task["task_id"]) == (200, '{"status": "ok"}')
    [res] = orch.results_for(task["task_id"])
    assert res.result == {"status": "success", "data": {"ok": True}}
    assert res.worker_id == "w1" and res.attempt == 1
    assert orch.count(since=t0) == 4
    assert [orch.count(r, since=t0) for r in ("register", "heartbeat", "poll", "result")] == [
        1,
        1,
        1,
        1,
    ]
    assert orch.dispatched[0].task == task
    for rec in orch.requests:
        assert rec.token_ok and rec.status == 200 and rec.outcome == "normal"
        assert rec.headers["X-Worker-Token"] == REDACTED
        assert DEFAULT_TOKEN not in repr(rec)
    assert orch.requests[0].body["worker_id"] == "w1"


async def test_wrong_or_missing_token_is_401(fault_orchestrator: FaultOrchestrator) -> None:
    orch = fault_orchestrator
    async with session() as s:
        for headers in (BAD, {}):
            async with s.post(
                f"{orch.url}/_worker/workers/register", json=registration(), headers=headers
            ) as r:
                assert r.status == 401
            async with s.patch(f"{orch.url}/_worker/workers/w1", json={}, headers=headers) as r:
                assert r.status == 401
            async with s.get(f"{orch.url}/_worker/workers/w1/tasks/next", headers=headers) as r:
                assert r.status == 401
            async with s.post(f"{orch.url}/_worker/tasks/result", json={}, headers=headers) as r:
                assert r.status == 401
            with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                await s.ws_connect(orch.ws_url("w1"), headers=headers)
            assert info.value.status == 401
    assert orch.count(status=401) == 10
    assert not orch.workers
    assert all(not r.token_ok and r.outcome == "unauthorized" for r in orch.requests)
    assert "wrong" not in repr(orch.requests)


async def test_invalid_bodies_are_400(fault_orchestrator: FaultOrchestrator) -> None:
    orch = fault_orchestrator
    async with session() as s:
        async with s.post(f"{orch.url}/_worker/tasks/result", data=b"{not json", headers=H) as r:
            assert r.status == 400
            assert await r.json() == {"error": "Invalid JSON body"}
        async with s.post(f"{orch.url}/_worker/workers/register", json=[1], headers=H) as r:
            assert r.status == 400
    assert orch.requests[0].body_error and orch.requests[0].body is None


# ------------------------------------------------------------------------------ long poll


async def test_poll_hold_then_204_and_wakeup_on_enqueue(
    fault_orchestrator: FaultOrchestrator,
) -> None:
    orch = fault_orchestrator
    orch.poll_hold = 0.3
    async with session() as s:
        started = time.monotonic()
        status, text, _ = await poll(s, orch.url)
        elapsed = time.monotonic() - started
        assert status == 204 and text == ""
        assert 0.25 <= elapsed < 2.0

        orch.poll_hold = 10.0
        parked = asyncio.create_task(poll(s, orch.url))
        await orch.wait_for_count("poll", 2)
        await asyncio.sleep(0.05)
        assert not parked.done()
        started = time.monotonic()
        task = orch.enqueue(make_task())
        status, text, _ = await parked
        assert status == 200 and json.loads(text) == task
        assert time.monotonic() - started < 2.0


async def test_tasks_for_one_worker(fault_orchestrator: FaultOrchestrator) -> None:
    orch = fault_orchestrator
    orch.poll_hold = 0.1
    task = orch.enqueue(make_task(), worker_id="w2")
    async with session() as s:
        assert (await poll(s, orch.url, "w1"))[0] == 204
        status, text, _ = await poll(s, orch.url, "w2")
    assert status == 200 and json.loads(text) == task
    assert orch.pending_tasks() == []


async def test_client_giving_up_on_a_parked_poll_loses_no_task(
    fault_orchestrator: FaultOrchestrator,
) -> None:
    orch = fault_orchestrator
    orch.poll_hold = 5.0
    async with session() as s:
        with pytest.raises(TimeoutError):
            await poll(s, orch.url, give_up=0.3)
        await orch.wait_for(lambda: orch.requests[-1].outcome == "client_gone", 5)
        assert orch.requests[-1].status is None
        task = orch.enqueue(make_task())
        await asyncio.sleep(0.1)
        assert orch.pending_tasks() == [task]
        orch.poll_hold = 0.5
        status, text, _ = await poll(s, orch.url)
    assert status == 200 and json.loads(text) == task
    assert orch.swallowed == []


async def test_swallow_abandoned_polls_reproduces_the_1_0b10_bug(
    fault_orchestrator: FaultOrchestrator,
) -> None:
    orch = fault_orchestrator
    orch.swallow_abandoned_polls = True
    orch.poll_hold = 5.0
    async with session() as s:
        with pytest.raises(TimeoutError):
            await poll(s, orch.url, give_up=0.3)
        await orch.wait_for(lambda: orch.requests[-1].outcome == "client_gone", 5)
        lost = orch.enqueue(make_task())
        await orch.wait_for(lambda: orch.swallowed, 5)
        assert orch.swallowed[0].task == lost and orch.pending_tasks() == []

        # a worker that said "busy" before abandoning its poll loses nothing
        orch.poll_hold = 0.6
        assert await register(s, orch) == 200
        assert (await beat(s, orch, status="busy"))[0] == 200
        with pytest.raises(TimeoutError):
            await poll(s, orch.url, give_up=0.2)
        await orch.wait_for(lambda: orch.requests[-1].outcome == "client_gone", 5)
        kept = orch.enqueue(make_task())
        await asyncio.sleep(0.8)  # past the zombie's hold
    assert orch.pending_tasks() == [kept]
    assert len(orch.swallowed) == 1


async def test_strict_dispatch_needs_idle_heartbeat_with_the_type(
    fault_orchestrator: FaultOrchestrator,
) -> None:
    orch = fault_orchestrator
    orch.strict_dispatch = True
    orch.poll_hold = 0.2
    echo = orch.enqueue(make_task("echo"))
    other = orch.enqueue(make_task("other"))
    async with session() as s:
        assert (await poll(s, orch.url))[0] == 204  # not registered
        await register(s, orch)
        assert (await poll(s, orch.url))[0] == 204  # no heartbeat yet
        await beat(s, orch, status="busy")
        assert (await poll(s, orch.url))[0] == 204
        await beat(s, orch, status="idle")
        status, text, _ = await poll(s, orch.url)
        assert status == 200 and json.loads(text) == echo
        assert (await poll(s, orch.url))[0] == 204  # "other" is not supported
    assert orch.pending_tasks() == [other]


async def test_malformed_and_odd_tasks(fault_orchestrator: FaultOrchestrator) -> None:
    orch = fault_orchestrator
    huge = huge_params_task(5 * 1024 * 1024)
    tasks: list[Any] = [
        [1, 2, 3],
        "just a string",
        None,
        task_without("task_id"),
        task_without("type"),
        make_task("no-such-type"),
        make_task(priority=None),
        huge,
    ]
    for task in tasks:
        orch.enqueue(task)
    orch.enqueue(RawTask('{"job_id": "j", "task_id": '))
    async with session() as s:
        for task in tasks:
            status, text, headers = await poll(s, orch.url)
            assert status == 200
            assert headers["Content-Type"].startswith("application/json")
            assert json.loads(text) == task
        status, text, _ = await poll(s, orch.url)
    assert status == 200 and text == '{"job_id": "j", "task_id": '
    assert "task_id" not in tasks[3] and "type" not in tasks[4] and "priority" not in tasks[6]
    assert len(huge["params"]["blob"]) == 5 * 1024 * 1024
    assert orch.dispatched[-1].task == '{"job_id": "j", "task_id": '


async def test_compressed_responses(fault_orchestrator: FaultOrchestrator) -> None:
    orch = fault_orchestrator
    orch.compress_responses = True
    task = orch.enqueue(huge_params_task(100_000))
    async with session() as s:
        status, text, headers = await poll(s, orch.url)
    assert status == 200 and json.loads(text) == task
    assert headers.get("Content-Encoding") in ("gzip", "deflate", "br", "zstd")


# ------------------------------------------------------------------------------ scripted faults


async def test_script_is_consumed_in_order_then_normal(
    fault_orchestrator: FaultOrchestrator,
) -> None:
    orch = fault_orchestrator
    orch.script("register", Reply.error(500), Reply.error(502, "bad gateway"), NORMAL)
    async with session() as s:
        statuses = [await register(s, orch) for _ in range(4)]
    assert statuses == [500, 502, 200, 200]
    assert orch.scripted("register") == 0
    assert [r.action for r in orch.requests] == ["reply", "reply", "normal", "normal"]
    assert [r.outcome for r in orch.requests] == ["scripted", "scripted", "normal", "normal"]


async def test_sticky_fault_until_cleared(fault_orchestrator: FaultOrchestrator) -> None:
    orch = fault_orchestrator
    orch.set_fault("heartbeat", Reply.error(503))
    orch.script("heartbeat", Reply.error(500))
    async with session() as s:
        await register(s, orch)
        assert [(await beat(s, orch))[0] for _ in range(3)] == [500, 503, 503]
        orch.clear_faults("heartbeat")
        assert (await beat(s, orch))[0] == 200
    assert len(orch.heartbeats) == 1  # faulted heartbeats never reached the handler


async def test_429_with_and_without_retry_after(fault_orchestrator: FaultOrchestrator) -> None:
    orch = fault_orchestrator
    date = "Wed, 21 Oct 2015 07:28:00 GMT"
    orch.script(
        "poll",
        Reply.rate_limited(2),
        Reply.rate_limited(0.5),
        Reply.rate_limited(None),
        Reply.rate_limited(date),
    )
    async with session() as s:
        seen = [await poll(s, orch.url) for _ in range(4)]
    assert [st for st, _, _ in seen] == [429] * 4
    assert [h.get("Retry-After") for _, _, h in seen] == ["2", "0.5", None, date]


async def test_malformed_json_reply(fault_orchestrator: FaultOrchestrator) -> None:
    orch = fault_orchestrator
    orch.script("poll", Reply.malformed_json())
    orch.script("heartbeat", Reply.malformed_json(text="<html>oops</html>"))
    async with session() as s:
        async with s.get(f"{orch.url}/_worker/workers/w1/tasks/next", headers=H) as r:
            assert r.status == 200
            assert r.content_type == "application/json"
            with pytest.raises(ValueError):
                await r.json()
        async with s.patch(f"{orch.url}/_worker/workers/w1", json={}, headers=H) as r:
            assert await r.text() == "<html>oops</html>"


@pytest.mark.parametrize(
    "action", [Reset.immediately(), Reset.mid_headers(), Reset.mid_body()], ids=repr
)
async def test_reset_aborts_the_connection(
    fault_orchestrator: FaultOrchestrator, action: Reset
) -> None:
    orch = fault_orchestrator
    orch.script("result", action)
    async with session() as s:
        with pytest.raises(aiohttp.ClientError):
            await post_result(s, orch.url, "t1")
        assert await post_result(s, orch.url, "t1") == (200, '{"status": "ok"}')
    assert orch.requests[0].outcome == "reset" and orch.requests[0].status is None
    assert len(orch.results_for("t1")) == 1


async def test_reset_mid_body_really_sends_a_partial_response(
    fault_orchestrator: FaultOrchestrator,
) -> None:
    orch = fault_orchestrator
    orch.script("poll", Reset(prefix=Reset.mid_body().prefix, rst=False))
    reader, writer = await asyncio.open_connection("127.0.0.1", orch.port)
    try:
        writer.write(
            b"GET /_worker/workers/w1/tasks/next HTTP/1.1\r\nHost: x\r\n"
            + f"X-Worker-Token: {DEFAULT_TOKEN}\r\n\r\n".encode()
        )
        await writer.drain()
        with anyio.fail_after(5):
            data = await reader.read()  # until the server closes
    finally:
        writer.close()
        await writer.wait_closed()
    assert data == Reset.mid_body().prefix
    assert b"Content-Length: 400" in data


async def test_hang_until_released(fault_orchestrator: FaultOrchestrator) -> None:
    orch = fault_orchestrator
    orch.script("result", Hang(), Hang(then=Reply.error(503)))
    async with session() as s:
        first = asyncio.create_task(post_result(s, orch.url, "t1"))
        second = asyncio.create_task(post_result(s, orch.url, "t2"))
        await orch.wait_for_hanging("result", 2)
        await asyncio.sleep(0.1)
        assert not first.done() and not second.done()
        assert orch.release_hangs("result") == 2
        assert (await first)[0] == 200
        assert (await second)[0] == 503
    assert orch.hanging() == 0
    assert [r.task_id for r in orch.results] == ["t1"]


async def test_hang_when_the_client_gives_up(fault_orchestrator: FaultOrchestrator) -> None:
    orch = fault_orchestrator
    orch.set_fault("register", Hang())
    async with session(timeout=aiohttp.ClientTimeout(total=0.3)) as s:
        with pytest.raises(TimeoutError):
            await register(s, orch)
    await orch.wait_for(lambda: orch.hanging() == 0, 5)
    assert orch.requests[0].outcome == "client_gone" and orch.requests[0].status is None


async def test_hang_and_parked_poll_end_on_stop(fault_orchestrator_factory: Factory) -> None:
    orch = await fault_orchestrator_factory(poll_hold=30.0)
    orch.set_fault("heartbeat", Hang())
    async with session() as s:
        hung = asyncio.create_task(beat(s, orch))
        parked = asyncio.create_task(poll(s, orch.url))
        await orch.wait_for_hanging("heartbeat")
        await orch.wait_for_count("poll")
        started = time.monotonic()
        await orch.stop()
        assert time.monotonic() - started < 3.0
        with pytest.raises(aiohttp.ClientError):
            await hung
        with pytest.raises(aiohttp.ClientError):
            await parked
    assert orch.hanging() == 0


async def test_graceful_stop_answers_parked_polls_with_204(
    fault_orchestrator_factory: Factory,
) -> None:
    orch = await fault_orchestrator_factory(poll_hold=30.0)
    async with session() as s:
        parked = asyncio.create_task(poll(s, orch.url))
        await orch.wait_for_count("poll")
        await asyncio.sleep(0.05)
        await orch.stop(graceful=True)
        assert (await parked)[0] == 204


async def test_delay(fault_orchestrator: FaultOrchestrator) -> None:
    orch = fault_orchestrator
    orch.script("register", Delay(0.3, then=Reply.error(500)), Delay(0.2))
    async with session() as s:
        started = time.monotonic()
        assert await register(s, orch) == 500
        assert await register(s, orch) == 200
        assert time.monotonic() - started >= 0.5


# ------------------------------------------------------------------------------ forgetting


async def test_unknown_worker_200_null_and_404(fault_orchestrator: FaultOrchestrator) -> None:
    orch = fault_orchestrator
    async with session() as s:
        assert await beat(s, orch) == (200, None)  # never registered, 1.0b10 style
        await register(s, orch)
        status, record = await beat(s, orch)
        assert status == 200 and record["worker_id"] == "w1"
        orch.forget_worker("w1")
        async with s.patch(f"{orch.url}/_worker/workers/w1", json={}, headers=H) as r:
            assert r.status == 200 and await r.text() == "null"
        orch.unknown_worker_reply = "404"
        async with s.patch(f"{orch.url}/_worker/workers/w1", json={}, headers=H) as r:
            assert r.status == 404
        await register(s, orch)
        assert (await beat(s, orch))[0] == 200
    assert [h.known for h in orch.heartbeats] == [False, True, False, False, True]


async def test_worker_ttl_expires_silent_workers(fault_orchestrator: FaultOrchestrator) -> None:
    orch = fault_orchestrator
    orch.worker_ttl = 1.0
    async with session() as s:
        await register(s, orch)
        assert (await beat(s, orch))[0] == 200
        await asyncio.sleep(1.2)
        assert await beat(s, orch) == (200, None)


# ------------------------------------------------------------------------------ results


async def test_result_accepted_only_on_the_nth_try(fault_orchestrator: FaultOrchestrator) -> None:
    orch = fault_orchestrator
    orch.result_accept_on_try = 3
    async with session() as s:
        assert [(await post_result(s, orch.url, "t1"))[0] for _ in range(3)] == [503, 503, 200]
        assert (await post_result(s, orch.url, "t2"))[0] == 503  # counted per task
        assert orch.results_for("t1")[0].attempt == 3
        assert len(orch.results_for("t1")) == 1 and orch.results_for("t2") == []
        assert orch.result_attempts == {"t1": 3, "t2": 1}
        assert len(orch.rejected_results) == 3
        assert orch.duplicate_results() == {}
        assert (await post_result(s, orch.url, "t1"))[0] == 200  # a duplicate is visible
    assert orch.duplicate_results() == {"t1": 2}
    assert orch.count("result", status=503) == 3


async def test_scripted_200_does_not_accept_a_result(
    fault_orchestrator: FaultOrchestrator,
) -> None:
    orch = fault_orchestrator
    orch.script("result", Reply.of_json({"status": "ok"}))
    async with session() as s:
        assert (await post_result(s, orch.url, "t1"))[0] == 200
    assert orch.results == []


# ------------------------------------------------------------------------------ websocket


async def test_websocket_commands_progress_and_drops(
    fault_orchestrator: FaultOrchestrator,
) -> None:
    orch = fault_orchestrator
    with pytest.raises(LookupError):
        await orch.send_command("w1", {"command": "cancel_task"})
    async with session() as s:
        async with s.ws_connect(orch.ws_url("w1"), headers=H) as ws:
            await orch.wait_for_ws("w1")
            await orch.cancel_task("w1", "t1", "j1")
            msg = await ws.receive(timeout=5)
            assert msg.type == aiohttp.WSMsgType.TEXT
            assert json.loads(msg.data) == {
                "command": "cancel_task",
                "task_id": "t1",
                "job_id": "j1",
            }
            await orch.send_command("w1", "garbage{")
            assert (await ws.receive(timeout=5)).data == "garbage{"
            await orch.send_command("w1", b"\x00\x01")
            assert (await ws.receive(timeout=5)).data == b"\x00\x01"
            progress = {
                "event": "progress_update",
                "task_id": "t1",
                "job_id": "j1",
                "progress": 0.5,
                "message": "half",
            }
            await ws.send_json(progress)
            await ws.send_str("not json")
            await orch.wait_for(lambda: len(orch.ws_messages) == 2, 5)
            assert orch.ws_messages[0].data == progress
            assert orch.ws_messages[1].data is None and orch.ws_messages[1].raw == "not json"

            assert await orch.drop_ws("w1") == 1
            msg = await ws.receive(timeout=5)
            assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 1001
        async with s.ws_connect(orch.ws_url("w1"), headers=H) as ws:
            await orch.wait_for_ws("w1")
            assert await orch.drop_ws("w1", abort=True) == 1
            msg = await ws.receive(timeout=5)
            assert msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR)
    await orch.wait_for(lambda: orch.ws_open("w1") == 0, 5)
    assert orch.ws_connects["w1"] == 2
    assert [p for _, p in orch.ws_sent][1:] == ["garbage{", b"\x00\x01"]


async def test_websocket_handshake_faults(fault_orchestrator: FaultOrchestrator) -> None:
    orch = fault_orchestrator
    # aiohttp clients retry an idempotent request (GET) once after a reset: script two
    orch.script("ws", Reply.error(503), Reset.immediately(), Reset.immediately())
    async with session() as s:
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await s.ws_connect(orch.ws_url("w1"), headers=H)
        assert info.value.status == 503
        with pytest.raises(aiohttp.ClientError):
            await s.ws_connect(orch.ws_url("w1"), headers=H)
        async with s.ws_connect(orch.ws_url("w1"), headers=H):
            await orch.wait_for_ws("w1")
    assert orch.ws_connects["w1"] == 1
    assert [r.outcome for r in orch.requests_for("ws")] == [
        "scripted",
        "reset",
        "reset",
        "normal",
    ]


async def test_websocket_that_ignores_pings_looks_dead(
    fault_orchestrator: FaultOrchestrator,
) -> None:
    orch = fault_orchestrator
    async with session() as s:
        async with s.ws_connect(orch.ws_url("w1"), headers=H, heartbeat=0.5) as ws:
            # pongs come back: the socket stays up (receive(timeout=) restarts on each pong)
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(1.2):
                    await ws.receive()
        orch.ws_answer_pings = False
        async with s.ws_connect(orch.ws_url("w2"), headers=H, heartbeat=0.5) as ws:
            async with asyncio.timeout(5):
                msg = await ws.receive()
            assert msg.type in (
                aiohttp.WSMsgType.CLOSED,
                aiohttp.WSMsgType.CLOSING,
                aiohttp.WSMsgType.ERROR,
            )


async def test_server_heartbeat_drops_a_client_that_never_pongs(
    fault_orchestrator: FaultOrchestrator,
) -> None:
    orch = fault_orchestrator
    orch.ws_heartbeat = 0.2
    ends = (
        aiohttp.WSMsgType.CLOSE,
        aiohttp.WSMsgType.CLOSING,
        aiohttp.WSMsgType.CLOSED,
        aiohttp.WSMsgType.ERROR,
    )
    async with session() as s:
        async with s.ws_connect(orch.ws_url("w1"), headers=H, autoping=False) as ws:
            await orch.wait_for_ws("w1")
            kinds = []
            async with asyncio.timeout(5):
                for _ in range(50):
                    msg = await ws.receive()
                    kinds.append(msg.type)
                    if msg.type in ends:
                        break
    assert aiohttp.WSMsgType.PING in kinds and kinds[-1] in ends
    await orch.wait_for(lambda: orch.ws_open("w1") == 0, 5)


# ------------------------------------------------------------------------------ connection level


async def test_refuse_then_accept_connections_keeps_state(
    fault_orchestrator: FaultOrchestrator,
) -> None:
    orch = fault_orchestrator
    orch.poll_hold = 30.0
    port = orch.port
    async with session() as s:
        assert await register(s, orch) == 200
        parked = asyncio.create_task(poll(s, orch.url))
        await orch.wait_for_count("poll")
        async with s.ws_connect(orch.ws_url("w1"), headers=H) as ws:
            await orch.wait_for_ws("w1")
            await orch.refuse_connections()
            assert not orch.listening
            msg = await ws.receive(timeout=5)
            assert msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR)
        with pytest.raises(aiohttp.ClientError):
            await parked
        with pytest.raises(aiohttp.ClientConnectorError):
            await register(s, orch)
        await orch.accept_connections()
        assert orch.listening and orch.port == port
        assert (await beat(s, orch))[0] == 200  # still known
    assert orch.count("register") == 1


async def test_restart_on_the_same_port(fault_orchestrator: FaultOrchestrator) -> None:
    orch = fault_orchestrator
    orch.poll_hold = 30.0
    port = orch.port
    async with session() as s:
        await register(s, orch)
        parked = asyncio.create_task(poll(s, orch.url))
        await orch.wait_for_count("poll")
        await orch.restart()
        with pytest.raises(aiohttp.ClientError):
            await parked
        assert orch.port == port
        assert (await beat(s, orch))[0] == 200
        await orch.stop()
        with pytest.raises(aiohttp.ClientConnectorError):
            await register(s, orch)
        await orch.start()
        assert orch.port == port
        assert (await beat(s, orch))[0] == 200
        await orch.restart(forget_workers=True, downtime=0.1)
        assert await beat(s, orch) == (200, None)
    assert orch.count("register") == 1


async def test_given_port(fault_orchestrator_factory: Factory) -> None:
    first = await fault_orchestrator_factory()
    port = first.port
    await first.stop()
    second = await fault_orchestrator_factory(port=port)
    assert second.port == port and second.url == f"http://127.0.0.1:{port}"


async def test_wait_for_is_bounded(fault_orchestrator: FaultOrchestrator) -> None:
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await fault_orchestrator.wait_for(lambda: False, timeout=0.2)
    assert time.monotonic() - started < 2.0
    assert await fault_orchestrator.wait_for(lambda: 42, timeout=0.2) == 42


def test_actions_round_trip_through_json() -> None:
    actions: list[Action] = [
        NORMAL,
        Reply.error(502),
        Reply.rate_limited(3),
        Reply.malformed_json(),
        Reply.null(),
        Reply.empty(),
        Hang(then=Reply.error(503), limit=5),
        Delay(0.5, then=Hang()),
        Reset.immediately(),
        Reset.mid_headers(),
        Reset(prefix=b"HTTP/1.1 2", rst=False),
    ]
    for action in actions:
        assert action_from_json(json.loads(json.dumps(action.to_json()))) == action
    assert action_from_json({"kind": "reset", "at": "mid_body"}) == Reset.mid_body()
    assert action_from_json({"kind": "reply", "status": 201, "json": [1]}) == Reply.of_json(
        [1], 201
    )
    with pytest.raises(ValueError):
        action_from_json({"kind": "nope"})


# ------------------------------------------------------------------------------ other process


async def test_standalone_process_with_control_endpoint(
    fault_orchestrator_process: FaultOrchestratorProcess,
) -> None:
    proc = fault_orchestrator_process
    control = proc.control
    url = proc.url
    assert control.state()["listening"] is True
    task = control.enqueue(make={"type": "echo", "params": {"n": 7}})
    async with session() as s:
        status, text, _ = await poll(s, url)
        assert status == 200 and json.loads(text) == task
        assert (await post_result(s, url, task["task_id"]))[0] == 200
        assert len(control.results(task["task_id"])) == 1

        control.script("poll", Reply.rate_limited(3), {"kind": "error", "status": 502})
        assert (await poll(s, url))[2].get("Retry-After") == "3"
        assert (await poll(s, url))[0] == 502

        assert control.configure(poll_hold=0.2, result_accept_on_try=2)["poll_hold"] == 0.2
        assert (await poll(s, url))[0] == 204
        assert (await post_result(s, url, "t9"))[0] == 503
        assert (await post_result(s, url, "t9"))[0] == 200

        t0 = time.monotonic()  # CLOCK_MONOTONIC is shared with the child
        waited: dict[str, Any] = {}

        async def wait_for_register() -> None:
            waited.update(
                await anyio.to_thread.run_sync(lambda: control.wait(route="register", since=t0))
            )

        async with anyio.create_task_group() as tg:
            tg.start_soon(wait_for_register)
            await asyncio.sleep(0.1)
            assert waited == {}
            assert await register(s, proc) == 200
        assert waited["ok"] is True
        assert control.count("register", since=t0) == 1

        control.set_fault("heartbeat", Hang())
        hung = asyncio.create_task(beat(s, proc))
        assert (await anyio.to_thread.run_sync(lambda: control.wait(route="heartbeat")))["ok"]
        await asyncio.sleep(0.1)
        assert control.release("heartbeat") == 1
        assert (await hung)[0] == 200
        control.clear_faults()

        async with s.ws_connect(f"ws://127.0.0.1:{proc.port}/_worker/ws/w1", headers=H) as ws:
            assert control.wait(ws_worker="w1")["ok"]
            assert control.ws_send("w1", {"command": "cancel_task", "task_id": "t", "job_id": "j"})
            assert json.loads((await ws.receive(timeout=5)).data)["command"] == "cancel_task"
            assert control.ws_drop("w1") == 1
            assert (await ws.receive(timeout=5)).type == aiohttp.WSMsgType.CLOSE
        assert control.ws_send("nobody", "x") is False

        control.forget("w1")
        assert await beat(s, proc) == (200, None)
        state = control.state()
        assert state["counts"]["result"] == 3 and state["result_counts"] == {
            task["task_id"]: 1,
            "t9": 1,
        }
        assert all(r["headers"]["X-Worker-Token"] == REDACTED for r in control.requests())
    pid = proc.pid
    assert proc.stop() == 0  # SIGTERM to that pid: a clean exit
    assert pid > 0


async def test_standalone_control_port_survives_refuse_and_restart() -> None:
    with FaultOrchestratorProcess(control_port=0, poll_hold=0.2) as proc:
        assert proc.control_port and proc.control_port != proc.port
        control = proc.control
        async with session() as s:
            assert await register(s, proc) == 200
            control.refuse()
            await anyio.to_thread.run_sync(lambda: _until(lambda: not control.state()["listening"]))
            with pytest.raises(aiohttp.ClientConnectorError):
                await register(s, proc)
            control.accept()
            assert (await beat(s, proc))[0] == 200

            control.restart(downtime=0.2)
            await anyio.to_thread.run_sync(lambda: _until(lambda: _restarted(control)))
            assert (await beat(s, proc))[0] == 200
            assert control.state()["port"] == proc.port

            port = proc.port
            proc.kill()  # a crash
            with pytest.raises(aiohttp.ClientConnectorError):
                await register(s, proc)
            proc.start()  # a new process on the same port, with empty state
            assert proc.port == port
            assert await beat(s, proc) == (200, None)


def _until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    raise TimeoutError("condition not met")


def _restarted(control: Any) -> bool:
    try:
        state = control.state()
    except OSError:  # down for the restart
        return False
    return bool(state["restarts"] == 1 and state["listening"])
