"""S3 transfers against real servers: SeaweedFS (and moto for odd keys).

Every test runs on each adapter and backend it supports: ``rca_aiohttp`` on
asyncio, ``rca_httpx`` on asyncio and on trio. The adapters only move bytes;
their decisions are tested exhaustively in ``tests/core/test_s3plan.py``.
Here we check that the bytes really move, that failures carry the right error
code, and that a large object is streamed, not buffered.
"""

from __future__ import annotations

import hashlib
import importlib
import pathlib
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import anyio
import pytest

from rca_core._errors import INVALID_INPUT_ERROR, PERMANENT_ERROR, TRANSIENT_ERROR, TaskFailure
from rca_core._s3plan import S3Settings
from tests.support.seaweed import MotoServer, S3Server, free_ports

pytestmark = pytest.mark.anyio

MiB = 1 << 20


@dataclass(frozen=True)
class Case:
    package: str
    backend: str

    def transfers(self, settings: S3Settings | None) -> Any:
        module = importlib.import_module(f"{self.package}._s3")
        return module.S3Transfers(settings) if settings else module.S3Transfers.disabled()


CASES = [
    pytest.param(Case("rca_aiohttp", "asyncio"), id="aiohttp-asyncio"),
    pytest.param(Case("rca_httpx", "asyncio"), id="httpx-asyncio"),
    pytest.param(Case("rca_httpx", "trio"), id="httpx-trio"),
]


@pytest.fixture(params=CASES)
def case(request: pytest.FixtureRequest) -> Case:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def anyio_backend(case: Case) -> str:
    return case.backend


@pytest.fixture
def prefix() -> str:
    """A fresh key prefix per test, so tests never see each other's objects."""
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def task_dir(tmp_path: pathlib.Path) -> pathlib.Path:
    folder = tmp_path / "task"
    folder.mkdir()
    return folder


def seaweed_settings(server: S3Server, **overrides: Any) -> S3Settings:
    options: dict[str, Any] = {
        "endpoint_url": server.endpoint_url,
        "access_key": server.access_key,
        "secret_key": server.secret_key,
        "region": server.region,
        "default_bucket": server.bucket,
        "max_retries": 1,
        "retry_timeout": 5.0,
    }
    options.update(overrides)
    return S3Settings(**options)


def moto_settings(server: MotoServer, bucket: str) -> S3Settings:
    return S3Settings(
        endpoint_url=server.endpoint_url,
        access_key=server.access_key,
        secret_key=server.secret_key,
        region=server.region,
        default_bucket=bucket,
        max_retries=1,
    )


def tree(folder: pathlib.Path) -> dict[str, bytes]:
    """Every file below ``folder`` by relative path, with its content."""
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def write_blocks(path: pathlib.Path, size: int, seed: bytes) -> None:
    with path.open("wb") as file:
        for block in _blocks(size, seed):
            file.write(block)


def write_file(path: pathlib.Path, data: bytes) -> None:
    path.write_bytes(data)


def read(path: str | pathlib.Path) -> bytes:
    return pathlib.Path(path).read_bytes()


def sha256_file(path: str) -> str:
    """Hash a file without reading it whole."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(MiB), b""):
            digest.update(block)
    return digest.hexdigest()


def leftovers(folder: pathlib.Path) -> list[str]:
    return [str(p) for p in folder.rglob("*.part")]


async def fail_with(coro: Any) -> TaskFailure:
    with pytest.raises(TaskFailure) as info:
        await coro
    return info.value


# -- downloads --------------------------------------------------------------


@pytest.mark.s3
async def test_download_single_object(
    case: Case, s3_server: S3Server, prefix: str, task_dir: pathlib.Path
) -> None:
    s3_server.put(f"{prefix}/in/photo.jpg", b"jpeg bytes")
    s3_server.put(f"{prefix}/in/other/photo.jpg", b"another photo")
    uri = f"s3://{s3_server.bucket}/{prefix}/in/photo.jpg"
    uri2 = f"s3://{s3_server.bucket}/{prefix}/in/other/photo.jpg"
    params = {"image": uri, "again": [uri, {"deep": uri2}], "count": 3, "text": "s3 is nice"}
    transfers = case.transfers(seaweed_settings(s3_server))
    try:
        local = await transfers.download_inputs(params, task_dir)
    finally:
        await transfers.close()

    assert params["image"] == uri, "the caller's params are never mutated"
    path = pathlib.Path(local["image"])
    assert path == task_dir / "inputs" / s3_server.bucket / prefix / "in" / "photo.jpg"
    assert read(path) == b"jpeg bytes"
    assert local["again"][0] == local["image"]
    assert read(local["again"][1]["deep"]) == b"another photo"
    assert (local["count"], local["text"]) == (3, "s3 is nice")
    assert leftovers(task_dir) == []


@pytest.mark.s3
async def test_download_prefix_recursively(
    case: Case, s3_server: S3Server, prefix: str, task_dir: pathlib.Path
) -> None:
    s3_server.put(f"{prefix}/data/", b"")  # folder marker
    s3_server.put(f"{prefix}/data/a.txt", b"A")
    s3_server.put(f"{prefix}/data/sub/", b"")  # nested folder marker
    s3_server.put(f"{prefix}/data/sub/b.txt", b"B" * 1000)
    s3_server.put(f"{prefix}/data/empty.txt", b"")
    s3_server.put(f"{prefix}/data_old/not-me.txt", b"no")
    uri = f"s3://{s3_server.bucket}/{prefix}/data/"
    transfers = case.transfers(seaweed_settings(s3_server))
    try:
        local = await transfers.download_inputs({"folder": uri}, task_dir)
    finally:
        await transfers.close()

    folder = pathlib.Path(local["folder"])
    assert folder == task_dir / "inputs" / s3_server.bucket / prefix / "data"
    assert tree(folder) == {"a.txt": b"A", "sub/b.txt": b"B" * 1000, "empty.txt": b""}
    assert not (task_dir / "inputs" / s3_server.bucket / prefix / "data_old").exists()
    assert leftovers(task_dir) == []


@pytest.mark.s3
async def test_empty_prefix_is_an_empty_folder_or_an_error_when_asked(
    case: Case, s3_server: S3Server, prefix: str, task_dir: pathlib.Path
) -> None:
    uri = f"s3://{s3_server.bucket}/{prefix}/nothing/"
    transfers = case.transfers(seaweed_settings(s3_server))
    strict = case.transfers(seaweed_settings(s3_server, empty_prefix_is_error=True))
    try:
        local = await transfers.download_inputs({"folder": uri}, task_dir)
        failure = await fail_with(strict.download_inputs({"folder": uri}, task_dir))
    finally:
        await transfers.close()
        await strict.close()
    assert tree(pathlib.Path(local["folder"])) == {}
    assert local["folder"].endswith("/nothing")
    assert failure.code == INVALID_INPUT_ERROR
    assert uri in failure.message


class PeakRss:
    """Peak resident memory of this process during a block, in bytes.

    Resets the kernel's high-water mark (``/proc/self/clear_refs``) when
    allowed, and also samples ``VmRSS`` every 2 ms, so the figure holds even
    where the reset is not permitted.
    """

    def __init__(self) -> None:
        self.baseline = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._hwm_reset = False

    @staticmethod
    def _status(field: str) -> int:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise AssertionError(f"{field} missing from /proc/self/status")

    def _sample(self) -> None:
        for _ in range(100_000):
            self.peak = max(self.peak, self._status("VmRSS"))
            if self._stop.wait(0.002):
                return

    def __enter__(self) -> PeakRss:
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as refs:
                refs.write("5")
            self._hwm_reset = True
        except OSError:
            self._hwm_reset = False
        self.baseline = self._status("VmRSS")
        self.peak = self.baseline
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if self._hwm_reset:
            self.peak = max(self.peak, self._status("VmHWM"))

    @property
    def growth(self) -> int:
        return self.peak - self.baseline


def _blocks(total: int, seed: bytes) -> Iterator[bytes]:
    """Deterministic incompressible test data, 1 MiB at a time."""
    block = hashlib.sha256(seed).digest() * (MiB // 32)
    for index in range(total // MiB):
        yield index.to_bytes(8, "big") + block[8:]


@pytest.mark.s3
async def test_large_object_is_streamed_not_buffered(
    case: Case, s3_server: S3Server, prefix: str, task_dir: pathlib.Path
) -> None:
    size = 50 * MiB
    key = f"{prefix}/big.bin"
    s3_server.put(key, _blocks(size, prefix.encode()))
    expected = hashlib.sha256()
    for block in _blocks(size, prefix.encode()):
        expected.update(block)

    transfers = case.transfers(seaweed_settings(s3_server))
    try:
        # Warm up: stores, thread pools and the first connection are not the
        # object's cost.
        s3_server.put(f"{prefix}/warm", b"w")
        await transfers.download_inputs({"w": f"s3://{s3_server.bucket}/{prefix}/warm"}, task_dir)
        started = time.perf_counter()
        with PeakRss() as rss:
            local = await transfers.download_inputs(
                {"big": f"s3://{s3_server.bucket}/{key}"}, task_dir
            )
        elapsed = time.perf_counter() - started
    finally:
        await transfers.close()

    assert sha256_file(local["big"]) == expected.hexdigest()
    print(
        f"\n[{case.package}/{case.backend}] 50 MiB download: {size / elapsed / MiB:.0f} MiB/s, "
        f"peak RSS growth {rss.growth / MiB:.1f} MiB"
    )
    assert rss.growth < size / 2, f"RSS grew by {rss.growth / MiB:.1f} MiB for a 50 MiB object"


@pytest.mark.s3
async def test_cancelled_download_leaves_no_partial_file(
    case: Case, s3_server: S3Server, prefix: str, task_dir: pathlib.Path
) -> None:
    key = f"{prefix}/big.bin"
    s3_server.put(key, _blocks(40 * MiB, b"cancel"))
    transfers = case.transfers(seaweed_settings(s3_server, chunk_size=256 * 1024))
    target = task_dir / "inputs" / s3_server.bucket / key
    try:
        for delay in (0.0, 0.005, 0.02, 0.05):
            with anyio.move_on_after(delay):
                await transfers.download_inputs({"big": f"s3://{s3_server.bucket}/{key}"}, task_dir)
            assert leftovers(task_dir) == []
            if target.exists():
                assert target.stat().st_size == 40 * MiB  # whole, or not there at all
                target.unlink()
    finally:
        await transfers.close()


@pytest.mark.s3
async def test_missing_object_is_invalid_input(
    case: Case, s3_server: S3Server, prefix: str, task_dir: pathlib.Path
) -> None:
    uri = f"s3://{s3_server.bucket}/{prefix}/missing.bin"
    transfers = case.transfers(seaweed_settings(s3_server))
    try:
        failure = await fail_with(transfers.download_inputs({"x": uri}, task_dir))
        no_bucket = await fail_with(
            transfers.download_inputs({"x": "s3://no-such-bkt/a/"}, task_dir)
        )
    finally:
        await transfers.close()
    assert failure.code == INVALID_INPUT_ERROR
    assert uri in failure.message and "not found" in failure.message
    assert no_bucket.code == INVALID_INPUT_ERROR
    assert leftovers(task_dir) == []


@pytest.mark.s3
async def test_bad_credentials_are_permanent(
    case: Case, s3_server: S3Server, prefix: str, task_dir: pathlib.Path
) -> None:
    s3_server.put(f"{prefix}/a.txt", b"A")
    wrong_secret = "wrong-" + s3_server.secret_key
    settings = seaweed_settings(s3_server, secret_key=wrong_secret)
    transfers = case.transfers(settings)
    data_file = task_dir / "out.txt"
    data_file.write_text("result")
    try:
        single = await fail_with(
            transfers.download_inputs({"x": f"s3://{s3_server.bucket}/{prefix}/a.txt"}, task_dir)
        )
        listing = await fail_with(
            transfers.download_inputs({"x": f"s3://{s3_server.bucket}/{prefix}/"}, task_dir)
        )
        upload = await fail_with(
            transfers.upload_outputs({"out": str(data_file)}, task_dir, job_id="j", task_id="t")
        )
    finally:
        await transfers.close()
    for failure in (single, listing, upload):
        assert failure.code == PERMANENT_ERROR, failure.message
        assert "denied" in failure.message
        assert wrong_secret not in failure.message
        assert s3_server.access_key not in failure.message


@pytest.mark.s3
async def test_server_down_is_transient(case: Case, task_dir: pathlib.Path) -> None:
    (port,) = free_ports(1)  # nothing listens there
    settings = S3Settings(
        endpoint_url=f"http://127.0.0.1:{port}",
        access_key="k",
        secret_key="s",
        default_bucket="b",
        max_retries=1,
        connect_timeout=1.0,
    )
    data_file = task_dir / "out.txt"
    data_file.write_text("result")
    transfers = case.transfers(settings)
    try:
        started = time.monotonic()
        download = await fail_with(transfers.download_inputs({"x": "s3://b/k"}, task_dir))
        listing = await fail_with(transfers.download_inputs({"x": "s3://b/k/"}, task_dir))
        upload = await fail_with(
            transfers.upload_outputs({"out": str(data_file)}, task_dir, job_id="j", task_id="t")
        )
        elapsed = time.monotonic() - started
    finally:
        await transfers.close()
    for failure in (download, listing, upload):
        assert failure.code == TRANSIENT_ERROR, failure.message
    assert elapsed < 30


@pytest.mark.s3
async def test_dotdot_key_is_refused_naming_the_key(
    case: Case, moto_server: MotoServer, prefix: str, task_dir: pathlib.Path
) -> None:
    bucket = f"odd-{prefix}"
    moto_server.create_bucket(bucket)
    assert moto_server.raw_put(f"/{bucket}/data/ok.txt", b"fine") == 200
    assert moto_server.raw_put(f"/{bucket}/data/../evil", b"escape") == 200
    transfers = case.transfers(moto_settings(moto_server, bucket))
    try:
        listed = await fail_with(transfers.download_inputs({"x": f"s3://{bucket}/data/"}, task_dir))
        direct = await fail_with(
            transfers.download_inputs({"x": f"s3://{bucket}/data/../evil"}, task_dir)
        )
    finally:
        await transfers.close()
    for failure in (listed, direct):
        assert failure.code == INVALID_INPUT_ERROR, failure.message
        assert "data/../evil" in failure.message
    assert tree(task_dir.parent) == {}, "nothing was written anywhere"


@pytest.mark.s3
async def test_markers_as_aws_lists_them(
    case: Case, moto_server: MotoServer, prefix: str, task_dir: pathlib.Path
) -> None:
    bucket = f"mark-{prefix}"
    moto_server.create_bucket(bucket)
    for path, body in [
        ("data/", b""),
        ("data/sub/", b""),
        ("data/sub/x.txt", b"x"),
        ("data/emptysub/", b""),
        ("data/top.txt", b"top"),
    ]:
        assert moto_server.raw_put(f"/{bucket}/{path}", body) == 200
    transfers = case.transfers(moto_settings(moto_server, bucket))
    try:
        local = await transfers.download_inputs({"x": f"s3://{bucket}/data/"}, task_dir)
    finally:
        await transfers.close()
    # 'data/emptysub/' is listed as a zero-size 'data/emptysub' with nothing
    # below it: indistinguishable from an empty file, so it becomes one.
    assert tree(pathlib.Path(local["x"])) == {"sub/x.txt": b"x", "top.txt": b"top", "emptysub": b""}


@pytest.mark.s3
async def test_local_disk_failure_is_transient_and_says_so(
    case: Case, s3_server: S3Server, prefix: str, task_dir: pathlib.Path
) -> None:
    s3_server.put(f"{prefix}/a.txt", b"A")
    write_file(task_dir / "inputs", b"a file where the inputs folder belongs")
    transfers = case.transfers(seaweed_settings(s3_server))
    try:
        failure = await fail_with(
            transfers.download_inputs({"x": f"s3://{s3_server.bucket}/{prefix}/a.txt"}, task_dir)
        )
    finally:
        await transfers.close()
    assert failure.code == TRANSIENT_ERROR
    assert "local disk" in failure.message


async def test_without_s3_an_input_fails_and_outputs_pass(
    case: Case, task_dir: pathlib.Path
) -> None:
    transfers = case.transfers(None)
    data = {"out": str(task_dir / "x.txt")}
    try:
        failure = await fail_with(transfers.download_inputs({"x": "s3://b/k"}, task_dir))
        assert await transfers.download_inputs({"x": "no uri"}, task_dir) == {"x": "no uri"}
        assert await transfers.upload_outputs(data, task_dir, job_id="j", task_id="t") is data
    finally:
        await transfers.close()
    assert failure.code == PERMANENT_ERROR
    assert "s3://b/k" in failure.message and "no S3" in failure.message


# -- uploads -----------------------------------------------------------------


@pytest.mark.s3
async def test_upload_file_and_folder(
    case: Case, s3_server: S3Server, prefix: str, task_dir: pathlib.Path
) -> None:
    result = task_dir / "result.bin"
    result.write_bytes(b"R" * 100)
    frames = task_dir / "frames"
    (frames / "deep").mkdir(parents=True)
    (frames / "1.png").write_bytes(b"one")
    (frames / "deep" / "2.png").write_bytes(b"two")
    (frames / "empty.txt").write_bytes(b"")
    big = task_dir / "big.bin"
    write_blocks(big, 12 * MiB, b"upload")
    data = {
        "output": str(result),
        "frames": str(frames),
        "big": [str(big)],
        "note": "done",
        "elsewhere": "/etc/hostname",
    }
    settings = seaweed_settings(s3_server, key_prefix=f"{prefix}/results", part_size=5 * MiB)
    transfers = case.transfers(settings)
    try:
        uploaded = await transfers.upload_outputs(data, task_dir, job_id="job-1", task_id="task-1")
    finally:
        await transfers.close()

    base = f"{prefix}/results/job-1/task-1"
    bucket = s3_server.bucket
    assert data["output"] == str(result), "the handler's data is never mutated"
    assert uploaded["output"] == f"s3://{bucket}/{base}/result.bin"
    assert uploaded["frames"] == f"s3://{bucket}/{base}/frames/"
    assert uploaded["big"] == [f"s3://{bucket}/{base}/big.bin"]
    assert (uploaded["note"], uploaded["elsewhere"]) == ("done", "/etc/hostname")
    assert s3_server.get(f"{base}/result.bin") == b"R" * 100
    assert s3_server.get(f"{base}/big.bin") == big.read_bytes()
    assert s3_server.list(f"{base}/frames/") == {
        f"{base}/frames/1.png": 3,
        f"{base}/frames/deep/2.png": 3,
        f"{base}/frames/empty.txt": 0,
    }
    assert s3_server.get(f"{base}/frames/deep/2.png") == b"two"


@pytest.mark.s3
async def test_cancelled_upload_publishes_nothing_partial(
    case: Case, s3_server: S3Server, prefix: str, task_dir: pathlib.Path
) -> None:
    big = task_dir / "big.bin"
    write_blocks(big, 40 * MiB, b"cancel-up")
    transfers = case.transfers(seaweed_settings(s3_server, key_prefix=prefix, part_size=5 * MiB))
    try:
        for index, delay in enumerate((0.0, 0.02, 0.1)):
            started = time.monotonic()
            with anyio.move_on_after(delay):
                await transfers.upload_outputs(
                    {"big": str(big)}, task_dir, job_id="j", task_id=f"t{index}"
                )
            assert time.monotonic() - started < 10, "cancellation is prompt"
            stored = s3_server.list(f"{prefix}/j/t{index}/")
            assert stored in ({}, {f"{prefix}/j/t{index}/big.bin": 40 * MiB})
    finally:
        await transfers.close()


@pytest.mark.s3
async def test_uploaded_folder_downloads_again(
    case: Case, s3_server: S3Server, prefix: str, tmp_path: pathlib.Path
) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    (first / "out" / "a").mkdir(parents=True)
    second.mkdir()
    (first / "out" / "a" / "x.txt").write_bytes(b"x")
    settings = seaweed_settings(s3_server, key_prefix=prefix)
    transfers = case.transfers(settings)
    try:
        uploaded = await transfers.upload_outputs(
            {"out": str(first / "out")}, first, job_id="j", task_id="t"
        )
        local = await transfers.download_inputs({"in": uploaded["out"]}, second)
    finally:
        await transfers.close()
    assert tree(pathlib.Path(local["in"])) == {"a/x.txt": b"x"}


@pytest.mark.s3
async def test_upload_refuses_links_out_of_the_task_folder(
    case: Case, s3_server: S3Server, prefix: str, tmp_path: pathlib.Path
) -> None:
    task_dir = tmp_path / "task"
    (task_dir / "out").mkdir(parents=True)
    secret = tmp_path / "secret.txt"
    secret.write_text("not for upload")
    (task_dir / "out" / "leak.txt").symlink_to(secret)
    (task_dir / "direct").symlink_to(secret)
    transfers = case.transfers(seaweed_settings(s3_server, key_prefix=prefix))
    try:
        failure = await fail_with(
            transfers.upload_outputs(
                {"out": str(task_dir / "out")}, task_dir, job_id="j", task_id="t"
            )
        )
        # A returned link to outside is not an output at all: left as it is.
        kept = await transfers.upload_outputs(
            {"x": str(task_dir / "direct")}, task_dir, job_id="j", task_id="t"
        )
        bad_id = await fail_with(
            transfers.upload_outputs(
                {"out": str(task_dir / "out")}, task_dir, job_id="../x", task_id="t"
            )
        )
    finally:
        await transfers.close()
    assert failure.code == PERMANENT_ERROR and "leak.txt" in failure.message
    assert kept == {"x": str(task_dir / "direct")}
    assert bad_id.code == INVALID_INPUT_ERROR and "job_id" in bad_id.message
    assert s3_server.list(f"{prefix}/") == {}


@pytest.mark.s3
async def test_many_small_objects_are_bounded(
    case: Case, s3_server: S3Server, prefix: str, task_dir: pathlib.Path
) -> None:
    for index in range(40):
        s3_server.put(f"{prefix}/many/{index:03d}.txt", str(index).encode())
    transfers = case.transfers(seaweed_settings(s3_server, max_concurrency=3))
    try:
        local = await transfers.download_inputs(
            {"x": f"s3://{s3_server.bucket}/{prefix}/many/"}, task_dir
        )
    finally:
        await transfers.close()
    files = tree(pathlib.Path(local["x"]))
    assert len(files) == 40 and files["007.txt"] == b"7"



async def test_closed_transfers_refuse_new_work(case: Case, task_dir: pathlib.Path) -> None:
    transfers = case.transfers(S3Settings(endpoint_url="http://127.0.0.1:1", default_bucket="b"))
    assert transfers.enabled and not case.transfers(None).enabled
    await transfers.close()
    await transfers.close()  # idempotent
    for call in (
        transfers.download_inputs({"x": "s3://b/k"}, task_dir),
        transfers.upload_outputs({"x": str(task_dir)}, task_dir, job_id="j", task_id="t"),
    ):
        failure = await fail_with(call)
        assert failure.code == TRANSIENT_ERROR and "closed" in failure.message


def test_obstore_import_is_lazy() -> None:
    """Importing the adapters' S3 modules does not import obstore."""
    import subprocess
    import sys

    code = (
        "import sys, rca_aiohttp._s3, rca_httpx._s3; sys.exit(1 if 'obstore' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False, timeout=60).returncode == 0
