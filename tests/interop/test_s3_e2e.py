"""S3 offloading end to end: real orchestrator, real S3 server (SeaweedFS), every adapter.

A job's params name an ``s3://`` object and an ``s3://`` prefix; the handler
reads the downloaded copies, writes an output file and an output folder, and
the job's result (as the orchestrator stores it) carries ``s3://`` URIs whose
objects hold the bytes the handler wrote.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.interop.test_real_orchestrator import make_worker
from tests.support.orchestrator import DONE_STATE, INTEROP_BLUEPRINT, RealOrchestrator
from tests.support.seaweed import S3Server
from tests.support.workers import AdapterCase, running_worker

# ``TaskFiles`` is deliberately not imported: the annotation stays a string that the
# SDK matches by name to whichever adapter's TaskFiles runs the test.

pytestmark = [pytest.mark.orchestrator, pytest.mark.s3, pytest.mark.anyio]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def case(adapter_case: AdapterCase) -> AdapterCase:
    pytest.importorskip(adapter_case.package)
    return adapter_case


def configure_s3(worker: Any, s3: S3Server, prefix: str) -> None:
    config = worker.config
    config.S3_ENDPOINT_URL = s3.endpoint_url
    config.S3_ACCESS_KEY = s3.access_key
    config.S3_SECRET_KEY = s3.secret_key
    config.S3_REGION = s3.region
    config.S3_DEFAULT_BUCKET = s3.bucket
    config.S3_KEY_PREFIX = prefix


def split(uri: str) -> tuple[str, str]:
    assert uri.startswith("s3://"), uri
    bucket, _, key = uri[len("s3://") :].partition("/")
    return bucket, key


async def test_inputs_downloaded_outputs_uploaded(
    case: AdapterCase, real_orchestrator: RealOrchestrator, s3_server: S3Server, tmp_path: Path
) -> None:
    run = uuid.uuid4().hex[:8]
    photo = os.urandom(300_000)
    s3_server.put(f"in-{run}/photo.jpg", photo)
    s3_server.put(f"in-{run}/set/a.txt", b"alpha")
    s3_server.put(f"in-{run}/set/sub/b.txt", b"beta")

    worker = make_worker(case, real_orchestrator, tmp_path)
    configure_s3(worker, s3_server, prefix=f"out-{run}")
    seen: dict[str, Any] = {}

    @worker.task("process")
    async def process(params: dict[str, Any], files: TaskFiles, **kwargs: Any) -> dict[str, Any]:  # noqa: F821
        image = Path(params["image"])
        folder = Path(params["inputs"]["folder"])
        seen["image"] = image.read_bytes()
        seen["folder"] = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        seen["texts"] = [(folder / "a.txt").read_text(), (folder / "sub" / "b.txt").read_text()]
        out = await files.path_to("report.bin")
        Path(out).write_bytes(image.read_bytes()[::-1])
        out_dir = Path(await files.path_to("thumbs/x.txt")).parent
        (out_dir / "x.txt").write_text("x")
        (out_dir / "deep").mkdir()
        (out_dir / "deep" / "y.txt").write_text("y")
        return {"data": {"report": out, "thumbs": str(out_dir), "note": "kept as is"}}

    with running_worker(worker, case):
        job_id = await real_orchestrator.create_job(
            INTEROP_BLUEPRINT,
            {
                "task": "process",
                "params": {
                    "image": f"s3://{s3_server.bucket}/in-{run}/photo.jpg",
                    "inputs": {"folder": f"s3://{s3_server.bucket}/in-{run}/set/"},
                },
                "timeout_seconds": 60,
            },
        )
        job = await real_orchestrator.wait_for_job(job_id, states=[DONE_STATE], timeout=60)

    assert seen["image"] == photo
    assert seen["folder"] == ["a.txt", "sub/b.txt"]
    assert seen["texts"] == ["alpha", "beta"]
    data = job["state_history"]
    assert data["note"] == "kept as is"
    bucket, key = split(data["report"])
    assert bucket == s3_server.bucket
    assert key.startswith(f"out-{run}/{job_id}/")  # unique per job and task, never the bucket root
    assert s3_server.get(key) == photo[::-1]
    bucket, prefix = split(data["thumbs"])
    assert prefix.endswith("/")
    listed = s3_server.list(prefix)
    assert sorted(k[len(prefix) :] for k in listed) == ["deep/y.txt", "x.txt"]
    assert s3_server.get(prefix + "deep/y.txt") == b"y"
    # The task folder is gone once the result was acknowledged.
    assert not any((tmp_path / "files").iterdir())


async def test_missing_object_fails_with_invalid_input(
    case: AdapterCase, real_orchestrator: RealOrchestrator, s3_server: S3Server, tmp_path: Path
) -> None:
    worker = make_worker(case, real_orchestrator, tmp_path)
    configure_s3(worker, s3_server, prefix="out")
    called = False

    @worker.task("process")
    async def process(params: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        nonlocal called
        called = True
        return {"data": {}}

    with running_worker(worker, case):
        job_id = await real_orchestrator.create_job(
            INTEROP_BLUEPRINT,
            {"task": "process", "params": {"image": f"s3://{s3_server.bucket}/no/such/key.jpg"}, "timeout_seconds": 60},
        )
        job = await real_orchestrator.wait_for_job(job_id, statuses=["failed"], timeout=30)
    assert not called
    assert "no/such/key.jpg" in job["error_message"]


async def test_s3_uri_without_s3_configured_fails_clearly(
    case: AdapterCase, real_orchestrator: RealOrchestrator, tmp_path: Path
) -> None:
    worker = make_worker(case, real_orchestrator, tmp_path)

    @worker.task("process")
    async def process(params: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        return {"data": {"got": params}}

    with running_worker(worker, case):
        job_id = await real_orchestrator.create_job(
            INTEROP_BLUEPRINT,
            {"task": "process", "params": {"image": "s3://bucket/key.jpg"}, "timeout_seconds": 60},
        )
        job = await real_orchestrator.wait_for_job(job_id, statuses=["quarantined", "failed"], timeout=30)
    assert "S3" in job["error_message"]
