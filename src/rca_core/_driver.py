"""The part of every adapter that is not I/O: feeding the machine and routing its effects.

An adapter subclasses :class:`Driver` and implements the ``do_*`` methods with
its own library (aiohttp tasks, anyio task groups…). This class owns the
bookkeeping that must behave identically everywhere: one place that feeds
the machine, reports a core bug instead of hanging, keeps a single timer on
the machine's next deadline, and never lets the machine see a time earlier
than the deadline it asked for (which would re-arm the timer in a spin).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod

from ._events import (
    CancelHandler,
    CancelRequest,
    CleanupTask,
    CloseCommandChannel,
    DrainRequested,
    Effect,
    Event,
    HandlerFinished,
    OpenCommandChannel,
    RequestFailed,
    ResponseReceived,
    SendCommandMessage,
    SendRequest,
    StartHandler,
)
from ._machine import WorkerMachine
from ._metrics import WorkerMetrics

__all__ = ["Driver"]

log = logging.getLogger("rca_core.driver")


class Driver(ABC):
    """Feeds a :class:`WorkerMachine` and dispatches its effects to ``do_*`` methods."""

    def __init__(self, machine: WorkerMachine, *, metrics: WorkerMetrics | None = None) -> None:
        self.machine = machine
        self.metrics = metrics
        self.failure: BaseException | None = None
        self.finished = False
        self.signals = 0
        self._timer_at: float | None = None

    # -- what adapters implement ------------------------------------------------------

    @abstractmethod
    def now(self) -> float:
        """The adapter's monotonic clock."""

    @abstractmethod
    def set_timer(self, deadline: float | None) -> None:
        """Call :meth:`on_timer` at ``deadline`` (replacing any earlier timer; None: none)."""

    @abstractmethod
    def do_send_request(self, effect: SendRequest) -> None: ...

    @abstractmethod
    def do_cancel_request(self, request_id: int) -> None: ...

    @abstractmethod
    def do_start_handler(self, effect: StartHandler) -> None: ...

    @abstractmethod
    def do_cancel_handler(self, task_id: str) -> None: ...

    @abstractmethod
    def do_cleanup(self, task_id: str) -> None: ...

    @abstractmethod
    def do_open_channel(self, effect: OpenCommandChannel) -> None: ...

    @abstractmethod
    def do_close_channel(self, channel: int) -> None: ...

    @abstractmethod
    def do_send_message(self, channel: int, text: str) -> None: ...

    @abstractmethod
    def do_stopped(self) -> None:
        """The machine stopped (or failed): wake whoever waits for the worker to end."""

    # -- what adapters call ------------------------------------------------------------

    def start(self) -> None:
        try:
            self.machine.start(self.now())
        except Exception as exc:
            self._fail(exc)
            return
        self._flush()

    def feed(self, event: Event) -> None:
        if self.finished:
            return
        now = self.now()
        metrics = self.metrics
        if metrics is not None:
            if isinstance(event, ResponseReceived):
                metrics.request_done(event.request_id, event.status, now)
            elif isinstance(event, RequestFailed):
                metrics.request_done(event.request_id, None, now)
            elif isinstance(event, HandlerFinished):
                metrics.handler_finished(event.task_id, event.result, now)
        try:
            self.machine.handle(event, now)
        except Exception as exc:  # a bug in the core must stop the worker loudly, not hang it
            self._fail(exc)
            return
        self._flush()

    def on_timer(self) -> None:
        if self.finished:
            return
        at, self._timer_at = self._timer_at, None
        now = max(self.now(), at if at is not None else 0.0)
        try:
            self.machine.handle_timer(now)
        except Exception as exc:
            self._fail(exc)
            return
        self._flush()

    def signal(self, name: str) -> None:
        """SIGTERM/SIGINT: the first drains, the next cancels what is left."""
        self.signals += 1
        log.warning(
            "%s received: %s",
            name,
            "draining" if self.signals == 1 else "cancelling the tasks still running",
        )
        self.feed(DrainRequested(reason=name))

    # -- internals -------------------------------------------------------------------

    def _fail(self, exc: BaseException) -> None:
        log.critical("internal error in the worker core; stopping", exc_info=exc)
        self.failure = exc
        self.finished = True
        self.set_timer(None)
        self.do_stopped()

    def _flush(self) -> None:
        for effect in self.machine.effects():
            self._perform(effect)
        if self.finished:
            return
        deadline = self.machine.next_deadline()
        if deadline != self._timer_at:
            self._timer_at = deadline
            self.set_timer(deadline)

    def _perform(self, effect: Effect) -> None:
        if isinstance(effect, SendRequest):
            if self.metrics is not None:
                self.metrics.request_sent(effect.request_id, effect.purpose, self.now())
            self.do_send_request(effect)
        elif isinstance(effect, StartHandler):
            if self.metrics is not None:
                self.metrics.handler_started(effect.task.task_id, effect.task.name, self.now())
            self.do_start_handler(effect)
        elif isinstance(effect, CleanupTask):
            self.do_cleanup(effect.task_id)
        elif isinstance(effect, CancelRequest):
            self.do_cancel_request(effect.request_id)
        elif isinstance(effect, CancelHandler):
            self.do_cancel_handler(effect.task_id)
        elif isinstance(effect, OpenCommandChannel):
            self.do_open_channel(effect)
        elif isinstance(effect, CloseCommandChannel):
            self.do_close_channel(effect.channel)
        elif isinstance(effect, SendCommandMessage):
            self.do_send_message(effect.channel, effect.text)
        else:  # WorkerStopped: the effects are a closed union
            if effect.undelivered:
                log.error("worker stopped with %d result(s) undelivered", effect.undelivered)
            else:
                log.info("worker stopped; every result was delivered")
            self.finished = True
            self.set_timer(None)
            self.do_stopped()
