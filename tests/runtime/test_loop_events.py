"""The event hub behind a stuck subscriber: bounded memory (plans too), logged while it lasts, again at the next lag."""
import logging
import threading
import time

import pytest

from edgeact.drivers.motors.safety import SafetyTrip
from edgeact.runtime import loop_events
from edgeact.runtime.loop_events import CommandEvent, EventHub, PlanEvent, StopEvent, TripEvent
from tests.runtime.test_telemetry import Collect, command, plan_event

pytestmark = pytest.mark.timeout(60)


class Stuck(Collect):
    """A subscriber whose commands wait for `release` (a recorder on a hung disk); `entered` once it waits."""

    def __init__(self):
        super().__init__()
        self.entered, self.release = threading.Event(), threading.Event()

    def on_command(self, event):
        self.entered.set()
        self.release.wait()
        self._add(event)


def stuck_hub(monkeypatch, max_backlog=100, first_lag_warning=10**9):
    monkeypatch.setattr(loop_events, "MAX_BACKLOG", max_backlog)
    monkeypatch.setattr(loop_events, "FIRST_LAG_WARNING", first_lag_warning)
    stuck = Stuck()
    hub = EventHub([stuck]).start()
    hub.publish(command(0, 0.0))
    assert stuck.entered.wait(5)            # the hub thread holds the first command: all the rest queues
    return hub, stuck


def logged(caplog, text, count, since=0, timeout_s=5.0):
    """The messages with `text` after record `since`, once `count` have come: the hub's reporter thread logs them."""
    deadline = time.monotonic() + timeout_s
    while True:
        messages = [r.getMessage() for r in caplog.records[since:] if text in r.getMessage()]
        if len(messages) >= count or time.monotonic() > deadline:
            return messages
        time.sleep(0.005)


def drained(hub, timeout_s=5.0):
    deadline = time.monotonic() + timeout_s
    while hub._queue.qsize() and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(0.02)                        # the last event's delivery
    return hub._queue.qsize() == 0


def test_a_stuck_subscriber_holds_at_most_max_backlog_events_plans_too(monkeypatch):
    # Plans went around MAX_BACKLOG: a subscriber stuck for two hours held 341 MiB of them.
    hub, stuck = stuck_hub(monkeypatch)
    for i in range(1, 1000):
        hub.publish(command(i, i * 0.01))
        hub.publish(plan_event(i, i * 0.01))
    hub.trip(SafetyTrip("exit", "hold", 10.0, "loop ended"))
    hub.publish(StopEvent(10.0, "duration", "10 s elapsed"))
    assert hub._queue.qsize() == 100 + 2                # the backlog, then the trip and the stop
    stuck.release.set()
    hub.close()
    plans = [e.index for e in stuck.events if isinstance(e, PlanEvent)]
    assert plans == list(range(1, 51))          # as the commands: those of the backlog's span, the later ones dropped
    assert isinstance(stuck.events[-2], TripEvent) and isinstance(stuck.events[-1], StopEvent)   # never dropped
    assert len(stuck.events) + hub.undelivered == 1 + 2 * 999 + 2      # every event delivered or counted
    assert hub.undelivered == hub.dropped > 0


def test_dropping_is_logged_while_the_subscriber_is_stuck_at_most_every_drop_report_s(monkeypatch, caplog):
    hub, stuck = stuck_hub(monkeypatch, max_backlog=50)
    try:
        for i in range(1, 200):
            hub.publish(command(i, i * 0.01))
        dropping = logged(caplog, "dropping", 1)
        time.sleep(0.05)                                # a second report would be logged by now
        assert dropping == logged(caplog, "dropping", 1)
        assert len(dropping) == 1 and dropping[0].startswith("event subscribers are 50 events behind the loop: "
                                                             "dropping the commands, plans")
        assert "; 1 dropped so far." in dropping[0] and "hung disk under --record" in dropping[0]
        monkeypatch.setattr(loop_events, "DROP_REPORT_S", 0.0)
        hub.publish(command(200, 2.0))                  # the next report says how many since the last one
        dropping = logged(caplog, "dropping", 2)
        assert len(dropping) == 2 and "; 150 dropped so far (149 in the last 0 s)." in dropping[1]
    finally:
        stuck.release.set()
        hub.close()
    assert hub.undelivered == 150


def test_the_lag_is_logged_while_it_lasts_and_again_at_the_next_lag(monkeypatch, caplog):
    # The lag warning came from the hub thread (after a stall, not during it), and its threshold only doubled: a
    # second, longer stall that dropped commands was never logged.
    caplog.set_level(logging.INFO, logger=loop_events.__name__)
    hub, stuck = stuck_hub(monkeypatch, max_backlog=1000, first_lag_warning=10)
    try:
        for episode in (1, 2):
            before = len(caplog.records)
            for i in range(40):
                hub.publish(command(i, i * 0.01))
            behind = logged(caplog, "behind the loop", 2, since=before)
            assert [int(m.split()[3]) for m in behind] == [10, 20], episode    # while stuck, as it doubles
            stuck.release.set()
            assert drained(hub)
            assert logged(caplog, "caught up", 1, since=before) == [
                "event subscribers caught up with the loop; 0 events dropped so far"]
            stuck.release.clear()
            stuck.entered.clear()
            hub.publish(command(0, 0.0))                # the next stall
            assert stuck.entered.wait(5)
    finally:
        stuck.release.set()
        hub.close()
    assert hub.undelivered == 0
    assert len([e for e in stuck.events if isinstance(e, CommandEvent)]) == 1 + 2 * 41


class SlowLog(logging.Handler):
    """A log stream that takes `delay_s` a line (stderr on a hung disk, a full pipe)."""

    def __init__(self, delay_s):
        super().__init__(logging.WARNING)
        self.delay_s = delay_s

    def emit(self, record):
        time.sleep(self.delay_s)


def test_publish_never_waits_for_a_slow_log_handler(monkeypatch, caplog):
    # publish() logged the lag and the drops itself: behind a stuck subscriber, a log line that took 0.5 s to
    # write held the control tick that published for 0.5 s.
    slow_log = SlowLog(delay_s=0.3)
    logging.getLogger(loop_events.__name__).addHandler(slow_log)
    hub, stuck = stuck_hub(monkeypatch, max_backlog=50, first_lag_warning=10)
    try:
        publish_s = []
        for i in range(1, 100):     # past FIRST_LAG_WARNING (10, 20, 40) and MAX_BACKLOG (dropping)
            start = time.perf_counter()
            hub.publish(command(i, i * 0.01))
            publish_s.append(time.perf_counter() - start)
        assert max(publish_s) < 0.05
        behind = logged(caplog, "behind the loop", 4)       # still logged while the subscriber is stuck
        assert not stuck.release.is_set()
        assert [int(m.split()[3]) for m in behind] == [10, 20, 40, 50] and "dropping" in behind[-1]
    finally:
        stuck.release.set()
        hub.close()
        logging.getLogger(loop_events.__name__).removeHandler(slow_log)
    assert hub.undelivered == 99 - 50


def test_closed_hubs_leave_no_thread_behind(monkeypatch):
    # Many hubs in one process (`edgeact eval`'s episodes, these tests): each ends its hub and reporter threads.
    before = set(threading.enumerate())
    for episode in range(20):
        hub, stuck = stuck_hub(monkeypatch, max_backlog=20, first_lag_warning=5)
        for i in range(1, 40):
            hub.publish(command(i, i * 0.01))
        stuck.release.set()
        hub.close()
    assert set(threading.enumerate()) - before == set()


def test_a_subscriber_raising_system_exit_is_the_runs_error_and_the_others_get_every_event():
    """SystemExit is not an Exception: it ended the hub's thread silently, every later event undelivered (a
    recording without its stop), and the run went on as if nothing had happened."""
    class Quits(Collect):
        def on_command(self, event):
            raise SystemExit(3)

    after = Collect()
    hub = EventHub([Quits(), after]).start()
    for tick in range(5):
        hub.publish(command(tick, tick * 0.01))
    hub.publish(StopEvent(0.1, "duration", ""))
    hub.close()
    assert isinstance(hub.error, RuntimeError) and "subscriber Quits raised SystemExit(3) on on_command" in str(hub.error)
    assert [type(e).__name__ for e in after.events] == ["CommandEvent"] * 5 + ["StopEvent"]
