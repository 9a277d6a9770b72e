"""Run the real Avtomatika orchestrator (1.0b10) for interop tests.

Usage (as a subprocess, with the test interpreter)::

    python -m tests.support.orchestrator_app --port P \
        --redis-url redis://127.0.0.1:R/0 --worker-token T --clients-config clients.toml

Every option can also come from an environment variable (``RCA_ORCH_*``,
listed in ``--help``). The server binds 127.0.0.1 only. It prints
``ORCHESTRATOR READY <url>`` once it is listening, stops cleanly on SIGTERM /
SIGINT, and exits non-zero if it cannot start (e.g. Redis unreachable).

Blueprints (job creation: ``POST /api/jobs/<name>`` with
``{"initial_data": {...}}``):

``interop``
    ``initial_data = {"task": <task type>, "params": {...},
    "timeout_seconds": <int, default 60>, "priority": <number, default 0>}``.
    The start state dispatches ONE task of type ``task`` with ``params``.
    Transitions: ``success`` -> ``done``, ``needs_review`` -> ``reviewed``,
    ``cancelled`` -> ``cancelled_state``; all three are end states (no action).
    Failures never reach a transition: the orchestrator itself handles them
    (TRANSIENT_ERROR: re-dispatch up to JOB_MAX_RETRIES times, then
    ``status: quarantined``; PERMANENT_ERROR: ``status: quarantined``;
    INVALID_INPUT_ERROR: ``status: failed``). The worker's result ``data``
    (a dict) is merged into the job's ``state_history``.

``interop_instant``
    Goes straight from ``start`` to ``done`` without any task (client API
    smoke tests; no worker needed).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

# Both imports must succeed: the harness fails loudly (never skips) otherwise.
import redis.asyncio as redis_asyncio
from aiohttp import web
from avtomatika import OrchestratorEngine, StateMachineBlueprint
from avtomatika.config import Config
from avtomatika.context import ActionFactory
from avtomatika.data_types import JobContext
from avtomatika.storage.redis import RedisStorage

HOST = "127.0.0.1"
READY_MARKER = "ORCHESTRATOR READY"

INTEROP_BLUEPRINT = "interop"
INSTANT_BLUEPRINT = "interop_instant"
START_STATE = "start"
DONE_STATE = "done"
REVIEWED_STATE = "reviewed"
CANCELLED_STATE = "cancelled_state"
END_STATES: tuple[str, ...] = (DONE_STATE, REVIEWED_STATE, CANCELLED_STATE)
DEFAULT_TASK_TIMEOUT_SECONDS = 60

DEFAULT_JOB_MAX_RETRIES = 2
DEFAULT_WATCHER_INTERVAL_SECONDS = 1
DEFAULT_POLL_TIMEOUT_SECONDS = 30  # the orchestrator's real long-poll hold
DEFAULT_WORKER_TIMEOUT_SECONDS = 300
DEFAULT_HEALTH_CHECK_INTERVAL_SECONDS = 60  # worker record TTL is twice this
DEFAULT_STREAM_BLOCK_MS = 1000
DEFAULT_STREAM_MIN_IDLE_MS = 60000
DEFAULT_SHUTDOWN_TIMEOUT_SECONDS = 2.0


def _endpoint(name: str) -> str:
    return f"/jobs/{name}"


def build_interop_blueprint() -> StateMachineBlueprint:
    bp = StateMachineBlueprint(INTEROP_BLUEPRINT, api_endpoint=_endpoint(INTEROP_BLUEPRINT))

    @bp.handler_for("start", is_start=True)
    async def start(context: JobContext, actions: ActionFactory) -> None:
        data: dict[str, Any] = context.initial_data
        params = data.get("params") or {}
        if not isinstance(params, dict):
            raise ValueError("initial_data.params must be an object")
        # The transitions dict must stay a literal: the blueprint validator
        # finds reachable states by parsing this call's source.
        actions.dispatch_task(
            str(data["task"]),
            params=params,
            transitions={
                "success": "done",
                "needs_review": "reviewed",
                "cancelled": "cancelled_state",
            },
            timeout_seconds=int(data.get("timeout_seconds", DEFAULT_TASK_TIMEOUT_SECONDS)),
            priority=float(data.get("priority", 0.0)),
        )

    @bp.handler_for("done", is_end=True)
    async def done(context: JobContext) -> None:
        return None

    @bp.handler_for("reviewed", is_end=True)
    async def reviewed(context: JobContext) -> None:
        return None

    @bp.handler_for("cancelled_state", is_end=True)
    async def cancelled_state(context: JobContext) -> None:
        return None

    return bp


def build_instant_blueprint() -> StateMachineBlueprint:
    bp = StateMachineBlueprint(INSTANT_BLUEPRINT, api_endpoint=_endpoint(INSTANT_BLUEPRINT))

    @bp.handler_for("start", is_start=True)
    async def start(context: JobContext, actions: ActionFactory) -> None:
        actions.transition_to("done")

    @bp.handler_for("done", is_end=True)
    async def done(context: JobContext) -> None:
        return None

    return bp


def build_blueprints() -> list[StateMachineBlueprint]:
    return [build_interop_blueprint(), build_instant_blueprint()]


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"RCA_ORCH_{name}", default)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)

    def opt(flag: str, env: str, typ: Any, default: Any, help_: str) -> None:
        raw = _env(env)
        p.add_argument(
            flag,
            type=typ,
            default=typ(raw) if raw is not None else default,
            help=f"{help_} (env RCA_ORCH_{env}; default {default!r})",
        )

    opt("--port", "PORT", int, None, "TCP port on 127.0.0.1")
    opt("--redis-url", "REDIS_URL", str, None, "redis://127.0.0.1:PORT/DB")
    opt("--worker-token", "WORKER_TOKEN", str, None, "GLOBAL_WORKER_TOKEN")
    opt("--clients-config", "CLIENTS_CONFIG", str, None, "clients TOML (CLIENTS_CONFIG_PATH)")
    opt("--instance-id", "INSTANCE_ID", str, None, "INSTANCE_ID / stream consumer name")
    opt("--job-max-retries", "JOB_MAX_RETRIES", int, DEFAULT_JOB_MAX_RETRIES, "JOB_MAX_RETRIES")
    opt(
        "--watcher-interval",
        "WATCHER_INTERVAL",
        int,
        DEFAULT_WATCHER_INTERVAL_SECONDS,
        "WATCHER_INTERVAL_SECONDS (task timeout sweep)",
    )
    opt(
        "--poll-timeout",
        "POLL_TIMEOUT",
        int,
        DEFAULT_POLL_TIMEOUT_SECONDS,
        "WORKER_POLL_TIMEOUT_SECONDS (long-poll hold)",
    )
    opt(
        "--worker-timeout",
        "WORKER_TIMEOUT",
        int,
        DEFAULT_WORKER_TIMEOUT_SECONDS,
        "WORKER_TIMEOUT_SECONDS (task timeout when a blueprint gives none)",
    )
    opt(
        "--health-check-interval",
        "HEALTH_CHECK_INTERVAL",
        int,
        DEFAULT_HEALTH_CHECK_INTERVAL_SECONDS,
        "WORKER_HEALTH_CHECK_INTERVAL_SECONDS (worker record TTL = 2x)",
    )
    opt(
        "--stream-block-ms",
        "STREAM_BLOCK_MS",
        int,
        DEFAULT_STREAM_BLOCK_MS,
        "REDIS_STREAM_BLOCK_MS (executor XREADGROUP block)",
    )
    opt(
        "--stream-min-idle-ms",
        "STREAM_MIN_IDLE_MS",
        int,
        DEFAULT_STREAM_MIN_IDLE_MS,
        "RedisStorage min_idle_time_ms (reclaim of unacked job messages)",
    )
    opt(
        "--shutdown-timeout",
        "SHUTDOWN_TIMEOUT",
        float,
        DEFAULT_SHUTDOWN_TIMEOUT_SECONDS,
        "seconds to wait for in-flight requests (parked long polls) on SIGTERM",
    )
    opt("--log-level", "LOG_LEVEL", str, "INFO", "orchestrator log level")
    args = p.parse_args(argv)
    missing = [
        name
        for name in ("port", "redis_url", "worker_token", "clients_config")
        if getattr(args, name) is None
    ]
    if missing:
        p.error("missing required settings: " + ", ".join(missing))
    return args


def build_config(args: argparse.Namespace) -> Config:
    config = Config()  # type: ignore[no-untyped-call]
    config.INSTANCE_ID = args.instance_id or f"rca-test-orchestrator-{args.port}"
    config.API_HOST = HOST
    config.API_PORT = args.port
    config.ENABLE_CLIENT_API = True
    config.GLOBAL_WORKER_TOKEN = args.worker_token
    config.CLIENTS_CONFIG_PATH = args.clients_config
    config.WORKERS_CONFIG_PATH = ""
    config.SCHEDULES_CONFIG_PATH = ""
    config.HISTORY_DATABASE_URI = ""
    config.TLS_ENABLED = False
    config.LOG_LEVEL = args.log_level.upper()
    config.LOG_FORMAT = "text"
    config.JOB_MAX_RETRIES = args.job_max_retries
    config.WATCHER_INTERVAL_SECONDS = args.watcher_interval
    config.WORKER_POLL_TIMEOUT_SECONDS = args.poll_timeout
    config.WORKER_TIMEOUT_SECONDS = args.worker_timeout
    config.WORKER_HEALTH_CHECK_INTERVAL_SECONDS = args.health_check_interval
    config.REDIS_STREAM_BLOCK_MS = args.stream_block_ms
    # 1.0b10 defines RATE_LIMITING_ENABLED but never installs a rate limiter.
    config.RATE_LIMITING_ENABLED = False
    # S3 stays unconfigured (empty endpoint): task files are not used here.
    config.S3_ENDPOINT_URL = ""
    return config


async def serve(args: argparse.Namespace) -> int:
    config = build_config(args)
    redis_client = redis_asyncio.Redis.from_url(args.redis_url)
    storage = RedisStorage(
        redis_client,  # type: ignore[arg-type]  # annotated as sync Redis, used as asyncio
        consumer_name=config.INSTANCE_ID,
        min_idle_time_ms=args.stream_min_idle_ms,
    )
    engine = OrchestratorEngine(storage, config)
    # setup_logging() puts the root logger at DEBUG; keep the log readable.
    # It also gives "avtomatika" its own handler AND the root one: log once.
    logging.getLogger().setLevel(config.LOG_LEVEL)
    logging.getLogger("avtomatika").propagate = False
    for blueprint in build_blueprints():
        engine.register_blueprint(blueprint)
    engine.setup()

    runner = web.AppRunner(engine.app, shutdown_timeout=args.shutdown_timeout)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await runner.setup()  # runs on_startup: pings Redis, loads clients
        site = web.TCPSite(runner, HOST, args.port)
        await site.start()
        print(f"{READY_MARKER} http://{HOST}:{args.port}", flush=True)
        await stop.wait()
        print("ORCHESTRATOR STOPPING", flush=True)
    finally:
        await runner.cleanup()
        await redis_client.aclose()
    print("ORCHESTRATOR STOPPED", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return asyncio.run(serve(args))
    except Exception as exc:
        print(f"ORCHESTRATOR FAILED: {exc!r}", file=sys.stderr, flush=True)
        raise


if __name__ == "__main__":
    sys.exit(main())
