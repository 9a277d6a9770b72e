"""Logging: secrets never reach a log line, and lines about a task name it.

The records go through real loggers (the SDK's own names) and real
formatters; what a test checks is the text a handler would write.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import sys
from collections.abc import Iterator

import pytest

from rca_core._logs import (
    SDK_LOGGERS,
    JsonFormatter,
    Redactor,
    TaskContext,
    TextFormatter,
    configure_logging,
    reset_current_task,
    set_current_task,
)

TOKEN = "s3cr3t-token-value"
PASSWORD = "hunter2"


class Capture(logging.Handler):
    """Formats every record it gets, as a real handler would, into ``lines``."""

    def __init__(self, formatter: logging.Formatter | None = None) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(formatter or logging.Formatter("%(name)s %(levelname)s %(message)s"))
        self.lines: list[str] = []
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.lines.append(self.format(record))


@pytest.fixture
def capture() -> Iterator[Capture]:
    """A handler on every SDK logger and on ``app`` (a user's logger), at DEBUG."""
    handler = Capture()
    names = (*SDK_LOGGERS, "app")
    saved = {
        name: (logging.getLogger(name).level, logging.getLogger(name).propagate) for name in names
    }
    for name in names:
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
        logger.propagate = False
    try:
        yield handler
    finally:
        for name, (level, propagate) in saved.items():
            logger = logging.getLogger(name)
            logger.removeHandler(handler)
            logger.setLevel(level)
            logger.propagate = propagate


@pytest.fixture
def redactor() -> Iterator[Redactor]:
    installed = Redactor([TOKEN, PASSWORD, ""])
    installed.install()
    try:
        yield installed
    finally:
        installed.remove()


def leak(exc_message: str) -> None:
    try:
        try:
            raise OSError("connection reset")
        except OSError as inner:
            raise RuntimeError(exc_message) from inner
    except RuntimeError:
        logging.getLogger("rca_core.worker").exception("task t-1: handler %r raised", "echo")


# -- Redactor -------------------------------------------------------------------------------------


def test_secrets_in_arguments_are_replaced(capture: Capture, redactor: Redactor) -> None:
    logging.getLogger("rca_aiohttp").warning("POST %s with token %s", "http://orch/x", TOKEN)
    assert capture.lines == ["rca_aiohttp WARNING POST http://orch/x with token ***"]
    record = capture.records[0]
    assert record.args is None and record.msg == "POST http://orch/x with token ***"


def test_secrets_in_the_message_itself_are_replaced(capture: Capture, redactor: Redactor) -> None:
    logging.getLogger("rca_core.config").info(f"password={PASSWORD}; token={TOKEN}")
    assert capture.lines == ["rca_core.config INFO password=***; token=***"]


def test_a_clean_message_keeps_its_arguments(capture: Capture, redactor: Redactor) -> None:
    logging.getLogger("rca_httpx").info("polling %s every %d s", "http://orch", 30)
    record = capture.records[0]
    assert record.msg == "polling %s every %d s" and record.args == ("http://orch", 30)
    assert capture.lines == ["rca_httpx INFO polling http://orch every 30 s"]


def test_an_exception_text_is_redacted_chain_included(capture: Capture, redactor: Redactor) -> None:
    leak(f"GET https://user:{PASSWORD}@s3.example/bucket failed (token {TOKEN})")
    [line] = capture.lines
    assert PASSWORD not in line and TOKEN not in line
    assert line.startswith("rca_core.worker ERROR task t-1: handler 'echo' raised\nTraceback")
    assert "RuntimeError: GET https://user:***@s3.example/bucket failed (token ***)" in line
    assert "OSError: connection reset" in line  # the cause is kept
    assert not line.endswith("\n")
    record = capture.records[0]
    assert record.exc_info is None and record.exc_text is not None
    assert PASSWORD not in record.exc_text


def test_an_exception_without_secrets_is_still_logged(capture: Capture, redactor: Redactor) -> None:
    leak("nothing to hide")
    [line] = capture.lines
    assert "RuntimeError: nothing to hide" in line and "Traceback" in line


def test_exception_outside_an_except_block(capture: Capture, redactor: Redactor) -> None:
    # logging.exception with no exception being handled: exc_info is (None, None, None)
    logging.getLogger("rca_core.driver").exception("odd %s", TOKEN)
    assert capture.lines == ["rca_core.driver ERROR odd ***\nNoneType: None"]


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no text")


def test_a_log_call_that_cannot_be_formatted_does_not_raise(
    capture: Capture, redactor: Redactor
) -> None:
    log = logging.getLogger("rca_core.worker")
    log.warning("expected a number, got %d", TOKEN)  # a bad format: logging only reports those
    log.warning("task %s failed: %s", "t-1", Unprintable())
    log.warning(Unprintable())
    assert capture.lines == [
        "rca_core.worker WARNING expected a number, got %d "
        "[log arguments could not be formatted: TypeError]",
        "rca_core.worker WARNING task %s failed: %s "
        "[log arguments could not be formatted: RuntimeError]",
        "rca_core.worker WARNING Unprintable [log arguments could not be formatted: RuntimeError]",
    ]
    assert all(r.args is None for r in capture.records)  # the arguments, maybe secret, are gone


def test_the_longest_secret_is_replaced_first(capture: Capture) -> None:
    # "abc" is also the start of "abcdef": replacing it first would leave "def" in the line
    redactor = Redactor(["abc", "abcdef", "xyz"])
    assert redactor.redact("token=abcdef, short=abc") == "token=***, short=***"
    redactor.install(["app"])
    try:
        logging.getLogger("app").info("token=%s", "abcdef")
    finally:
        redactor.remove(["app"])
    assert capture.lines == ["app INFO token=***"]


def test_only_the_loggers_it_is_installed_on_are_redacted(capture: Capture) -> None:
    redactor = Redactor([TOKEN])
    redactor.install()
    try:
        for name in SDK_LOGGERS:
            logging.getLogger(name).info("t=%s", TOKEN)
        logging.getLogger("app").info("t=%s", TOKEN)  # a user's own logger: not ours to touch
    finally:
        redactor.remove()
    assert capture.lines == [*(f"{name} INFO t=***" for name in SDK_LOGGERS), f"app INFO t={TOKEN}"]

    capture.lines.clear()
    logging.getLogger("rca_core.worker").info("t=%s", TOKEN)  # removed: no longer filtered
    assert capture.lines == [f"rca_core.worker INFO t={TOKEN}"]
    assert all(redactor not in logging.getLogger(name).filters for name in SDK_LOGGERS)


def test_a_redactor_with_no_secrets_leaves_records_alone(capture: Capture) -> None:
    redactor = Redactor(["", ""])  # unset secrets are empty strings: never "redact" nothing
    redactor.install(["app"])
    try:
        leak_record = logging.getLogger("app")
        try:
            raise ValueError("boom")
        except ValueError:
            leak_record.exception("x %s", "y")
    finally:
        redactor.remove(["app"])
    record = capture.records[0]
    assert record.args == ("y",) and record.exc_info is not None
    assert redactor.redact("text") == "text"


# -- task context and formatters ------------------------------------------------------------


def make_record(msg: str = "hello %s", *args: object) -> logging.LogRecord:
    return logging.LogRecord("app", logging.INFO, __file__, 1, msg, args or ("world",), None)


def test_task_context_tags_records_only_while_a_task_runs() -> None:
    context = TaskContext()
    outside = make_record()
    assert context.filter(outside) is True
    assert not hasattr(outside, "task_id")

    token = set_current_task("t-9", "j-9")
    try:
        inside = make_record()
        assert context.filter(inside) is True
        assert (inside.task_id, inside.job_id) == ("t-9", "j-9")  # type: ignore[attr-defined]
        explicit = make_record()
        explicit.task_id, explicit.job_id = "mine", "own"
        context.filter(explicit)
        assert (explicit.task_id, explicit.job_id) == ("mine", "own")  # type: ignore[attr-defined]
    finally:
        reset_current_task(token)

    after = make_record()
    context.filter(after)
    assert not hasattr(after, "task_id")


def test_text_formatter_appends_the_ids_to_the_first_line() -> None:
    formatter = TextFormatter()
    plain = formatter.format(make_record())
    assert plain.endswith(" INFO app: hello world")

    tagged = make_record()
    tagged.task_id, tagged.job_id = "t-1", "j-1"
    assert formatter.format(tagged).endswith("app: hello world [task=t-1 job=j-1]")

    try:
        raise KeyError("k")
    except KeyError:
        failing = logging.LogRecord("app", logging.ERROR, __file__, 1, "bad", (), sys.exc_info())
    failing.task_id = "t-2"
    first, _, rest = formatter.format(failing).partition("\n")
    assert first.endswith("ERROR app: bad [task=t-2 job=]")
    assert rest.startswith("Traceback") and rest.endswith("KeyError: 'k'")


def test_json_formatter_one_object_per_line() -> None:
    formatter = JsonFormatter()
    entry = json.loads(formatter.format(make_record()))
    assert entry.keys() == {"time", "level", "logger", "message"}
    assert (entry["level"], entry["logger"], entry["message"]) == ("INFO", "app", "hello world")
    assert len(entry["time"]) == len("2024-01-01T00:00:00.000")

    tagged = make_record()
    tagged.task_id, tagged.job_id = "t-1", None
    entry = json.loads(formatter.format(tagged))
    assert entry["task_id"] == "t-1" and "job_id" not in entry


def test_json_formatter_carries_the_exception_redacted_or_not(capture: Capture) -> None:
    capture.setFormatter(JsonFormatter())
    try:
        raise ValueError(f"token {TOKEN}")
    except ValueError:
        logging.getLogger("app").exception("plain")
    redactor = Redactor([TOKEN])
    redactor.install(["app"])
    try:
        try:
            raise ValueError(f"token {TOKEN}")
        except ValueError:
            logging.getLogger("app").exception("redacted")
    finally:
        redactor.remove(["app"])
    plain, redacted = (json.loads(line) for line in capture.lines)
    assert plain["exception"].startswith("Traceback") and TOKEN in plain["exception"]
    assert redacted["exception"].startswith("Traceback")
    assert redacted["exception"].endswith("ValueError: token ***")


# -- configure_logging --------------------------------------------------------------------------


@contextlib.contextmanager
def bare_root() -> Iterator[logging.Logger]:
    """The root logger as a fresh program has it: no handlers (pytest's own are put back).

    A context manager, not a fixture: pytest adds its capture handlers to the
    root logger after the fixtures are set up.
    """
    root = logging.getLogger()
    handlers, level = root.handlers, root.level
    root.handlers = []
    try:
        yield root
    finally:
        root.handlers = handlers
        root.setLevel(level)


@pytest.mark.parametrize(("log_format", "kind"), [("text", TextFormatter), ("json", JsonFormatter)])
def test_configure_logging_sets_up_a_bare_root(
    log_format: str, kind: type[logging.Formatter]
) -> None:
    stream = io.StringIO()
    with bare_root() as root:
        assert configure_logging(log_format, logging.DEBUG) is True
        [handler] = root.handlers
        assert isinstance(handler, logging.StreamHandler)
        assert type(handler.formatter) is kind
        assert any(isinstance(f, TaskContext) for f in handler.filters)
        assert root.level == logging.DEBUG

        handler.setStream(stream)
        token = set_current_task("t-3", "j-3")
        try:
            logging.getLogger("app.module").info("inside")
        finally:
            reset_current_task(token)
    line = stream.getvalue().strip()
    if log_format == "json":
        assert json.loads(line)["task_id"] == "t-3"
    else:
        assert line.endswith("app.module: inside [task=t-3 job=j-3]")


def test_configure_logging_keeps_a_program_s_own_setup() -> None:
    mine, tagged = logging.StreamHandler(io.StringIO()), logging.StreamHandler(io.StringIO())
    tagged.addFilter(TaskContext())
    with bare_root() as root:
        root.handlers.extend([mine, tagged])
        root.setLevel(logging.WARNING)
        assert configure_logging("json") is False
        assert configure_logging("json") is False  # twice: still one TaskContext per handler
        assert root.handlers == [mine, tagged]
        assert root.level == logging.WARNING
    for handler in (mine, tagged):
        assert sum(isinstance(f, TaskContext) for f in handler.filters) == 1
        assert handler.formatter is None
