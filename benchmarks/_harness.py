"""Shared machinery for the benchmark runners (``overhead.py``, ``idle.py``).

Starts the stub and one worker program as separate processes, pins each to
its own core, talks to the stub's control routes, reads ``/proc`` for CPU
time and peak RSS, and stops only the processes it started, by PID.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import platform
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
WORKERS_DIR = BENCH_DIR / "workers"
RESULTS_DIR = BENCH_DIR / "results"
REF_VENV = BENCH_DIR / ".venv-ref"
REF_PYTHON = REF_VENV / "bin" / "python"
STUB = BENCH_DIR / "stub.py"
SKIP_EXIT_CODE = 3
TOKEN = "bench-token"
CLK_TCK = os.sysconf("SC_CLK_TCK")

# Variables that would change how a worker program reads its configuration.
_SCRUBBED_ENV = (
    "ORCHESTRATORS_CONFIG",
    "WORKER_INDIVIDUAL_TOKEN",
    "MULTI_ORCHESTRATOR_MODE",
    "WORKER_ENABLE_WEBSOCKETS",
    "IDLE_POLL_DELAY",
    "HEARTBEAT_INTERVAL",
    "TASK_POLL_TIMEOUT",
    "PYTHONASYNCIODEBUG",
    "PYTHONDEVMODE",
)


@dataclass(frozen=True)
class WorkerSpec:
    """One worker program the runners can start."""

    key: str
    label: str
    script: str
    args: tuple[str, ...] = ()
    reference: bool = False  # runs from benchmarks/.venv-ref

    def python(self) -> Path:
        return REF_PYTHON if self.reference else Path(sys.executable)

    def command(self) -> list[str]:
        return [str(self.python()), str(WORKERS_DIR / self.script), *self.args]


WORKERS: dict[str, WorkerSpec] = {
    spec.key: spec
    for spec in (
        WorkerSpec("ref", "reference SDK 1.0b3 (aiohttp)", "ref_worker.py", reference=True),
        WorkerSpec("bare_aiohttp", "bare aiohttp loop", "bare_aiohttp.py"),
        WorkerSpec(
            "bare_httpx_asyncio",
            "bare httpx loop, asyncio",
            "bare_httpx.py",
            ("--backend", "asyncio"),
        ),
        WorkerSpec(
            "bare_httpx_trio", "bare httpx loop, trio", "bare_httpx.py", ("--backend", "trio")
        ),
        WorkerSpec("rca_aiohttp", "ours: rca_aiohttp", "rca_aiohttp_worker.py"),
        WorkerSpec(
            "rca_httpx_asyncio",
            "ours: rca_httpx, asyncio",
            "rca_httpx_worker.py",
            ("--backend", "asyncio"),
        ),
        WorkerSpec(
            "rca_httpx_trio",
            "ours: rca_httpx, trio",
            "rca_httpx_worker.py",
            ("--backend", "trio"),
        ),
    )
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- /proc -------------------------------------------------------------------------------


def proc_cpu_seconds(pid: int) -> float | None:
    """utime + stime of a whole process (all threads, live and dead), in seconds."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = raw[raw.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_status_kib(pid: int, key: str) -> int | None:
    """A ``kB`` line of /proc/PID/status, e.g. ``VmHWM`` (peak RSS)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return None


def proc_context_switches(pid: int) -> int | None:
    """Voluntary + involuntary context switches of all live threads: wake-ups."""
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for tid in tids:
        try:
            text = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith(("voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:")):
                total += int(line.split()[1])
    return total


# -- processes ---------------------------------------------------------------------------


def pick_cores() -> tuple[int | None, int | None]:
    """(stub core, worker core): the last two cores this process may use."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        log("warning: fewer than 2 usable cores; not pinning (figures will be noisy)")
        return None, None
    return cores[-2], cores[-1]


def _pinner(core: int | None) -> Any:
    if core is None:
        return None

    def pin() -> None:
        os.sched_setaffinity(0, {core})

    return pin


def stop_process(proc: subprocess.Popen[Any], grace: float = 5.0) -> int | None:
    """SIGTERM this one process (by its PID), then SIGKILL after ``grace`` seconds."""
    if proc.poll() is not None:
        return proc.returncode
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)
    try:
        return proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        return proc.wait(grace)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def ensure_reference_sdk() -> bool:
    """Create benchmarks/.venv-ref (via refsdk.sh) if it is missing."""
    if REF_PYTHON.exists():
        return True
    log("creating benchmarks/.venv-ref (avtomatika-worker==1.0b3 from PyPI)...")
    proc = subprocess.run(
        ["bash", str(BENCH_DIR / "refsdk.sh")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        timeout=600,
        check=False,
    )
    if proc.returncode != 0:
        log(f"refsdk.sh failed (rc={proc.returncode}):\n{proc.stderr[-2000:]}")
        return False
    return REF_PYTHON.exists()


def probe(spec: WorkerSpec) -> str | None:
    """None if the worker program can be built; otherwise why it is skipped."""
    if spec.reference and not ensure_reference_sdk():
        return "reference SDK venv could not be created (benchmarks/refsdk.sh)"
    try:
        proc = subprocess.run(
            [*spec.command(), "--probe"],
            capture_output=True,
            text=True,
            timeout=60,
            env=worker_env({}),
            cwd=REPO_DIR,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return "probe timed out after 60 s"
    if proc.returncode == 0:
        return None
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    skip_lines = [ln for ln in lines if ln.startswith("bench-skip:")]
    if proc.returncode == SKIP_EXIT_CODE and skip_lines:
        return skip_lines[-1].removeprefix("bench-skip:").strip()
    return f"probe failed (rc={proc.returncode}): {lines[-1] if lines else 'no output'}"


def probe_all(keys: Sequence[str]) -> list[WorkerSpec]:
    usable = []
    for key in keys:
        spec = WORKERS[key]
        why = probe(spec)
        if why is None:
            usable.append(spec)
        else:
            log(f"SKIP {key} ({spec.label}): {why}")
    return usable


def worker_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def package_versions(python: Path, names: Sequence[str]) -> dict[str, str | None]:
    code = (
        "import json, sys, importlib.metadata as m\n"
        "out = {}\n"
        "for n in sys.argv[1:]:\n"
        "    try: out[n] = m.version(n)\n"
        "    except m.PackageNotFoundError: out[n] = None\n"
        "print(json.dumps(out))\n"
    )
    try:
        proc = subprocess.run(
            [str(python), "-c", code, *names],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return dict(json.loads(proc.stdout))
    except (OSError, subprocess.SubprocessError, ValueError):
        return dict.fromkeys(names)


def environment_info() -> dict[str, Any]:
    cpu_model = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    commit = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(
            ["git", "-C", str(REPO_DIR), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    names = ["aiohttp", "httpx", "httpcore", "anyio", "trio", "rca-worker"]
    info: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "cpu_model": cpu_model,
        "cpus": os.cpu_count(),
        "git_commit": commit,
        "packages": package_versions(Path(sys.executable), names),
    }
    if REF_PYTHON.exists():
        info["reference_venv_packages"] = package_versions(
            REF_PYTHON, ["avtomatika-worker", "aiohttp"]
        )
    return info


class StubError(RuntimeError):
    pass


@dataclass
class StubProcess:
    """The stub orchestrator in its own process, and a client for its control routes."""

    proc: subprocess.Popen[str]
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def request(
        self, method: str, path: str, body: Any = None, timeout: float = 10.0
    ) -> dict[str, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            data = None if body is None else json.dumps(body).encode()
            headers = {"Content-Type": "application/json"} if data is not None else {}
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            payload = resp.read()
            if resp.status != 200:
                raise StubError(f"{method} {path}: HTTP {resp.status}")
            return dict(json.loads(payload))
        finally:
            conn.close()

    def stats(self) -> dict[str, Any]:
        return self.request("GET", "/_control/stats")

    def start(self, pid: int) -> dict[str, Any]:
        return self.request("POST", "/_control/start", {"pid": pid})

    def wait(self, timeout: float) -> dict[str, Any]:
        return self.request("GET", f"/_control/wait?timeout={timeout}", timeout=timeout + 10)


@contextlib.contextmanager
def running_stub(
    *, budget: int, hold: float, core: int | None, max_seconds: float, workdir: Path
) -> Iterator[StubProcess]:
    log_path = workdir / "stub.log"
    cmd = [
        sys.executable,
        str(STUB),
        "--port",
        "0",
        "--tasks",
        str(budget),
        "--hold",
        str(hold),
        "--token",
        TOKEN,
        "--max-seconds",
        str(max_seconds),
    ]
    if core is not None:
        cmd += ["--cpu", str(core)]
    with log_path.open("w") as err:
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            start_new_session=True,
            cwd=REPO_DIR,
        )
    try:
        port = _read_ready(proc, timeout=15.0)
        yield StubProcess(proc, port, log_path)
    finally:
        stop_process(proc)
        if proc.stdout is not None:
            proc.stdout.close()


def _read_ready(proc: subprocess.Popen[str], timeout: float) -> int:
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        if not sel.select(timeout):
            raise StubError("stub did not print READY in time")
    finally:
        sel.close()
    line = proc.stdout.readline().strip()
    if not line.startswith("READY "):
        raise StubError(f"stub said {line!r} instead of READY")
    return int(line.split()[1])


@dataclass
class WorkerProcess:
    spec: WorkerSpec
    proc: subprocess.Popen[bytes]
    log_path: Path
    peak_rss_kib: int | None = None
    cpu_total_s: float | None = None
    exit_code: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def sample_final(self) -> None:
        """Peak RSS and total CPU, read while the process still exists."""
        if self.alive():
            self.peak_rss_kib = proc_status_kib(self.pid, "VmHWM")
            self.cpu_total_s = proc_cpu_seconds(self.pid)


@contextlib.contextmanager
def running_worker(
    spec: WorkerSpec,
    *,
    stub: StubProcess,
    concurrency: int,
    core: int | None,
    workdir: Path,
    worker_id: str,
    extra_env: dict[str, str] | None = None,
    max_seconds: float = 3600.0,
) -> Iterator[WorkerProcess]:
    log_path = workdir / f"{worker_id}.log"
    files_dir = workdir / f"{worker_id}-files"
    env = worker_env(
        {
            "ORCHESTRATOR_URL": stub.url,
            "WORKER_TOKEN": TOKEN,
            "WORKER_ID": worker_id,
            "MAX_CONCURRENT_TASKS": str(concurrency),
            "WORKER_PORT": str(free_port()),
            "TASK_FILES_DIR": str(files_dir),
            "BENCH_MAX_SECONDS": str(max_seconds),
            **(extra_env or {}),
        }
    )
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            spec.command(),
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO_DIR,
            preexec_fn=_pinner(core),
            start_new_session=True,
        )
    worker = WorkerProcess(spec, proc, log_path)
    try:
        yield worker
    finally:
        worker.sample_final()
        worker.exit_code = stop_process(proc)


def wait_until_polling(stub: StubProcess, worker: WorkerProcess, timeout: float = 60.0) -> None:
    """Block until the worker has a poll parked at the (not yet started) stub."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not worker.alive():
            raise StubError(
                f"worker exited (rc={worker.proc.returncode}) before polling:\n"
                + tail(worker.log_path)
            )
        if stub.stats()["polls_parked"] >= 1:
            return
        time.sleep(0.05)
    raise StubError(f"worker did not poll within {timeout:.0f} s:\n" + tail(worker.log_path))


@contextlib.contextmanager
def scratch_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="rca-bench-") as d:
        yield Path(d)


def median(values: Sequence[float | None]) -> float | None:
    clean = [v for v in values if v is not None]
    return statistics.median(clean) if clean else None


def results_path(prefix: str) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stem = f"{prefix}-{time.strftime('%Y-%m-%d')}"
    path = RESULTS_DIR / f"{stem}.json"
    n = 2
    while path.exists():
        path = RESULTS_DIR / f"{stem}-{n}.json"
        n += 1
    return path


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def fmt(value: float | None, spec: str = ",.0f", missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """A Markdown table, column-aligned, on stdout."""
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
