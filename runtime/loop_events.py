"""The loop's events and the hub that hands them to subscribers, on its own thread, off the control path.

The loop's threads only `publish` events (a queue put); one hub thread hands them to the
subscribers in order, so a slow disk or a plot never delays a control tick. A subscriber that
raises is kept as the hub's `error`, and the loop stops on it (into the safe state).
Subscribers slower than the loop fall behind: the publishers report the backlog as it grows and, at most
every DROP_REPORT_S, how many events they drop: every event beyond MAX_BACKLOG but the trips and the
stop. They only queue those reports: the hub's reporter thread logs them, so a slow log stream (stderr on a
hung disk) never delays a control tick either. At the end the hub waits DRAIN_S for the subscribers to catch
up; what they never got is counted in `undelivered` (the run's summary is then "incomplete").
"""
from __future__ import annotations

import logging
import math
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

from edgeact.drivers.motors.safety import SafetyTrip
from edgeact.runtime.policy import Plan

log = logging.getLogger(__name__)


# -- events ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FrameEvent:
    time_s: float
    frame_number: int
    capture_s: float


@dataclass(frozen=True)
class PlanEvent:
    time_s: float                   # when the plan was ready
    plan: Plan
    index: int                      # plans made so far in this run, from 0
    frame_number: int
    frame_age_s: float              # capture -> the worker took the frame (the "capture" + "frame_wait" stages)
    step_s: float                   # the policy's step, wall time


@dataclass(frozen=True)
class CommandEvent:
    time_s: float                   # tick start
    tick: int
    period_s: float                 # since the previous tick's start (nan on the first)
    mode: str                       # see control.MODES
    targets_rad: dict[str, float]
    sent_rad: dict[str, float]
    measured_rad: dict[str, float] | None
    action_index: int | None
    skipped_actions: int
    new_plan: bool                  # the first command that follows a new plan
    frame_to_command_s: float       # on a plan's first tick: frame capture -> this command written; else nan
    state_read_s: float
    command_write_s: float
    work_s: float                   # the whole tick, before sleeping
    stale_plan: bool = False        # a plan's first tick, the plan older than plan_max_age_s on arrival: held, not
                                    # followed (new_plan is False, no frame -> command, no skipped actions)


@dataclass(frozen=True)
class OverrunEvent:
    time_s: float
    tick: int
    late_s: float                   # how far past its deadline the tick ended


@dataclass(frozen=True)
class TripEvent:
    trip: SafetyTrip


@dataclass(frozen=True)
class StopEvent:
    time_s: float
    reason: str
    detail: str


class Subscriber:
    """Override the hooks you need; all run on the hub thread, in event order."""

    def on_frame(self, event: FrameEvent) -> None: ...
    def on_plan(self, event: PlanEvent) -> None: ...
    def on_command(self, event: CommandEvent) -> None: ...
    def on_overrun(self, event: OverrunEvent) -> None: ...
    def on_trip(self, event: TripEvent) -> None: ...
    def on_stop(self, event: StopEvent) -> None: ...

    def close(self) -> None:
        """Flush and release; called once, after the last event."""


_HOOKS = {FrameEvent: "on_frame", PlanEvent: "on_plan", CommandEvent: "on_command", OverrunEvent: "on_overrun",
          TripEvent: "on_trip", StopEvent: "on_stop"}
_CLOSE = object()
_KEPT = (TripEvent, StopEvent)     # delivered even to subscribers too far behind: how the run ended
DRAIN_S = 10.0              # close(): how long the subscribers may take to catch up with the queue
MAX_BACKLOG = 20_000        # queued events beyond which all but trips and the stop are dropped (~200 s at 100 Hz)
FIRST_LAG_WARNING = 200     # a backlog this long is logged, and again each time it doubles, until it drains
DROP_REPORT_S = 10.0        # dropped events are logged at most this often
REPORTER_JOIN_S = 1.0       # close(): how long the reporter may take to log what is left (a hung log stream: no longer)


class EventHub:
    """Delivers published events to subscribers on its own thread; `close()` drains, then closes them."""

    def __init__(self, subscribers: list[Subscriber] | None = None):
        self.subscribers = list(subscribers or [])
        self.error: BaseException | None = None
        self.close_error: BaseException | None = None      # a subscriber that failed to close (its file unflushed)
        self.published = 0
        self.dropped = 0            # events no subscriber got: over MAX_BACKLOG, or skipped after the drain timed out
        self.abandoned = False      # a subscriber stuck past the drain: the hub thread left behind, subscribers open
        self._skip = False          # the drain timed out: deliver only the trips and the stop
        self._lag_warning = FIRST_LAG_WARNING
        self._reported_s, self._reported_dropped = -math.inf, 0     # the last drop report: when, and the count then
        self._delivering_s = math.nan       # time_s of the event the hub thread delivers: how far behind it is
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._reports: queue.SimpleQueue = queue.SimpleQueue()     # (level, format, args), or _CLOSE
        self._reporter: threading.Thread | None = None
        self._closed = False

    @property
    def undelivered(self) -> int:
        """Events that did not reach the subscribers (after close(); about, when a subscriber was `abandoned`)."""
        return self.dropped + self._queue.qsize()

    def start(self) -> "EventHub":
        if self._thread is None and not self._closed:
            self._reporter = threading.Thread(target=self._log_reports, name="loop-events-log", daemon=True)
            self._reporter.start()
            self._thread = threading.Thread(target=self._run, name="loop-events", daemon=True)
            self._thread.start()
        return self

    def publish(self, event: Any) -> None:
        """Queue `event` for the subscribers; never blocks (the control tick calls it): no logging, no I/O."""
        if self._closed:
            return
        backlog = self._queue.qsize()
        if backlog >= self._lag_warning:      # reported here, as it grows: the hub thread may be stuck in a subscriber
            self._lag_warning = 2 * backlog
            behind_s = getattr(event, "time_s", math.nan) - self._delivering_s
            self._report(logging.WARNING, "event subscribers are %d events%s behind the loop: one is slower than the "
                         "events come or stuck (a slow or hung disk under --record, a plot); the summary may end "
                         "incomplete", backlog, f" ({behind_s:.1f} s)" if math.isfinite(behind_s) else "")
        if backlog >= MAX_BACKLOG and not isinstance(event, _KEPT):
            self._drop(backlog)         # bounded memory (plans too): the subscribers are minutes behind
            return
        self.published += 1
        self._queue.put(event)

    def _drop(self, backlog: int) -> None:
        self.dropped += 1
        now = time.monotonic()
        if now - self._reported_s >= DROP_REPORT_S:
            since = (f" ({self.dropped - self._reported_dropped} in the last {now - self._reported_s:.0f} s)"
                     if math.isfinite(self._reported_s) else "")
            self._report(logging.WARNING, "event subscribers are %d events behind the loop: dropping the commands, "
                         "plans, frames and overruns beyond %d queued (trips and the stop are kept); %d dropped so "
                         "far%s. A subscriber is stuck or too slow (a hung disk under --record?); the run's summary "
                         "will be marked incomplete", backlog, MAX_BACKLOG, self.dropped, since)
            self._reported_s, self._reported_dropped = now, self.dropped

    def _report(self, level: int, msg: str, *args: Any) -> None:
        """Hand a log line to the reporter thread: a queue put, so the publisher never waits on the log stream."""
        self._reports.put((level, msg, args))

    def _log_reports(self) -> None:
        while (report := self._reports.get()) is not _CLOSE:
            level, msg, args = report
            log.log(level, msg, *args)

    def trip(self, trip: SafetyTrip) -> None:
        """SafetyGuard's on_trip hook."""
        self.publish(TripEvent(trip))

    def close(self, timeout_s: float | None = None) -> None:
        """Deliver what is queued, stop the thread, close every subscriber (each even if another fails).

        Subscribers still behind after `timeout_s` (DRAIN_S) get only the trips and the stop from then on;
        the rest counts as `undelivered`. No subscriber is closed while the hub thread may still call it:
        one stuck even then leaves them all open (`abandoned`)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._drain(DRAIN_S if timeout_s is None else timeout_s)
        finally:
            self._end_reporter()
        if self.abandoned:
            return
        for sub in self.subscribers:
            try:
                sub.close()
            except Exception as exc:    # keep closing the others: each holds its own file
                log.exception("closing subscriber %s failed", type(sub).__name__)
                self.error = self.error or exc
                self.close_error = self.close_error or exc

    def _drain(self, timeout_s: float) -> None:
        if self._thread is None:
            return
        self._queue.put(_CLOSE)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            self._report(logging.ERROR, "event subscribers still %d events behind after %.0f s; skipping the "
                         "commands, frames and plans left, delivering only the trips and the stop (the summary is "
                         "marked incomplete)", self._queue.qsize(), timeout_s)
            self._skip = True
            self._thread.join(timeout_s)
        if self._thread.is_alive():
            self.abandoned = True
            self._report(logging.ERROR, "an event subscriber is stuck in one call for over %.0f s; leaving the "
                         "subscribers open (their files may lack the run's end)", timeout_s)

    def _end_reporter(self) -> None:
        """Let the reporter log what is queued and end; a hung log stream keeps close() no longer than
        REPORTER_JOIN_S (the daemon thread then ends once the stream lets its last line through)."""
        if self._reporter is None:
            return
        self._reports.put(_CLOSE)
        self._reporter.join(REPORTER_JOIN_S)

    def __enter__(self) -> "EventHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def _run(self) -> None:
        while (event := self._queue.get()) is not _CLOSE:
            if self.abandoned:
                return
            if self._skip and not isinstance(event, _KEPT):
                self.dropped += 1
                continue
            hook = _HOOKS[type(event)]
            self._delivering_s = getattr(event, "time_s", self._delivering_s)
            for sub in self.subscribers:
                try:
                    getattr(sub, hook)(event)
                except BaseException as exc:    # the loop sees self.error and stops into the safe state; a
                    if self.error is None:      # SystemExit too: it ended this thread, and every event after it
                        log.exception("subscriber %s failed on %s", type(sub).__name__, hook)
                        self.error = exc if isinstance(exc, Exception) else RuntimeError(
                            f"subscriber {type(sub).__name__} raised {type(exc).__name__}({exc}) on {hook}")
            if self._lag_warning != FIRST_LAG_WARNING and self._queue.qsize() == 0:    # caught up: warn again
                self._lag_warning, self._reported_s = FIRST_LAG_WARNING, -math.inf     # at the next lag
                self._report(logging.WARNING if self.dropped else logging.INFO, "event subscribers caught up with "
                             "the loop; %d events dropped so far%s", self.dropped,    # via the reporter: in order
                             " (the run's summary will be marked incomplete)" if self.dropped else "")
