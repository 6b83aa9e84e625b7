"""Events and subscribers: the hub's order, threads and failures; the recorder's file; the timing summary and plot."""
import importlib.util
import json
import logging
import math
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from edgeact.drivers.motors.safety import SafetyTrip
from edgeact.runtime import loop_events, telemetry
from edgeact.runtime.errors import ConfigError
from edgeact.runtime.loop_events import (CommandEvent, EventHub, FrameEvent, OverrunEvent, PlanEvent, StopEvent,
                                         Subscriber, TripEvent)
from edgeact.runtime.policy import Plan
from edgeact.runtime.recorder import CommandRecorder, read_recording, recording_parts
from edgeact.runtime.telemetry import LogSubscriber, TimingStats

pytestmark = pytest.mark.timeout(60)


class Collect(Subscriber):
    def __init__(self):
        self.events, self.threads, self.closed = [], set(), False

    def _add(self, event):
        self.events.append(event)
        self.threads.add(threading.current_thread().name)

    on_frame = on_plan = on_command = on_overrun = on_trip = on_stop = _add

    def close(self):
        self.closed = True


class Broken(Collect):
    def on_command(self, event):
        raise OSError("disk full")


def command(tick, t, period=0.01, new_plan=False, frame_to_command=math.nan, mode="follow"):
    return CommandEvent(time_s=t, tick=tick, period_s=period, mode=mode, targets_rad={"a": 0.1}, sent_rad={"a": 0.1},
                        measured_rad={"a": 0.0}, action_index=0, skipped_actions=2 if new_plan else 0,
                        new_plan=new_plan, frame_to_command_s=frame_to_command, state_read_s=0.001,
                        command_write_s=0.0005, work_s=0.002)


def plan_event(index, t, latency=0.1):
    plan = Plan(actions=np.zeros((8, 7)), actions_normalized=np.zeros((8, 7)), trace_px=None, depth_codes=None,
                observation_time_s=t - latency, created_time_s=t, stage_seconds={"vision": 0.03, "decode": 0.06},
                decode_steps=40, choices=88)
    return PlanEvent(time_s=t, plan=plan, index=index, frame_number=index, frame_age_s=0.01, step_s=0.09)


def test_hub_delivers_in_order_on_its_own_thread_then_closes_subscribers():
    a, b = Collect(), Collect()
    hub = EventHub([a, b]).start()
    events = [FrameEvent(1.0, 1, 1.0), command(0, 1.0), OverrunEvent(1.0, 0, 0.002), StopEvent(2.0, "duration", "x")]
    for e in events:
        hub.publish(e)
    hub.close()
    assert a.events == events and b.events == events
    assert a.threads == {"loop-events"}
    assert a.closed and b.closed
    hub.publish(command(1, 3.0))        # after close: dropped, not delivered half-way
    assert len(a.events) == len(events)


def test_a_failing_subscriber_is_reported_and_the_others_still_get_everything():
    broken, good = Broken(), Collect()
    hub = EventHub([broken, good]).start()
    for i in range(3):
        hub.publish(command(i, float(i)))
    hub.publish(StopEvent(3.0, "error", "x"))
    hub.close()
    assert isinstance(hub.error, OSError)
    assert len(good.events) == 4 and broken.closed and good.closed


def test_recorder_writes_json_lines_and_flushes_on_close(tmp_path):
    path = tmp_path / "runs" / "commands.jsonl"
    hub = EventHub([CommandRecorder(path)]).start()
    hub.publish(plan_event(0, 10.0))
    hub.publish(command(0, 10.0))
    hub.trip(SafetyTrip("estop", "torque_off", 10.5, "e-stop file exists"))
    hub.publish(StopEvent(10.6, "estop", "e-stop file exists"))
    hub.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["event"] for r in lines] == ["plan", "command", "trip", "stop"]
    assert lines[0]["actions"] == [[0.0] * 7] * 8 and lines[0]["stage_s"] == {"vision": 0.03, "decode": 0.06}
    assert lines[1]["sent_rad"] == {"a": 0.1} and lines[2]["safe_state"] == "torque_off"
    assert lines[3] == {"event": "stop", "t": 10.6, "reason": "estop", "detail": "e-stop file exists"}


def test_recorder_goes_on_in_numbered_parts_keeping_the_newest(tmp_path):
    # One file forever grew 218 MiB an hour: 5 GB a day.
    path = tmp_path / "rec.jsonl"
    (tmp_path / "rec.99.jsonl").write_text('{"event": "command", "tick": -1}\n')     # an older recording's part
    recorder = CommandRecorder(path, part_bytes=4096, keep_parts=3)
    assert not (tmp_path / "rec.99.jsonl").exists()
    for tick in range(300):
        recorder.on_command(command(tick, tick * 0.01))
    recorder.on_stop(StopEvent(3.0, "duration", "3 s elapsed"))
    recorder.close()
    parts = recording_parts(path)
    assert [p.name for p in parts] == [f"rec.{n}.jsonl" for n in range(recorder.part - 2, recorder.part + 1)]
    assert recorder.part > 3 and not path.exists()                      # the oldest parts deleted, PATH first
    line_bytes = len(parts[0].read_text().splitlines()[0]) + 1
    assert all(p.stat().st_size < 4096 + line_bytes for p in parts)
    records = list(read_recording(path))
    ticks = [r["tick"] for r in records if r["event"] == "command"]
    assert ticks == list(range(ticks[0], 300)) and ticks[0] > 0 and records[-1]["event"] == "stop"


def test_recorder_flushes_about_every_flush_every_s_and_syncs_on_close(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(telemetry.os, "fsync", synced.append)
    path = tmp_path / "rec.jsonl"
    recorder = CommandRecorder(path, flush_every_s=0.05)
    for tick in range(3):
        recorder.on_command(command(tick, tick * 0.01))
    assert path.stat().st_size == 0                     # not a flush per line
    time.sleep(0.06)
    recorder.on_command(command(3, 0.03))
    assert len(path.read_text().splitlines()) == 4      # a killed run keeps what came until the last second
    fileno = recorder._file.fileno()
    recorder.close()
    assert synced == [fileno]


def test_recorder_to_a_device_neither_rotates_nor_fails_to_sync():
    recorder = CommandRecorder("/dev/null", part_bytes=100)
    for tick in range(20):
        recorder.on_command(command(tick, tick * 0.01))
    recorder.close()
    assert recorder.part == 0 and recorder.lines == 20 and not Path("/dev/null.1").exists()


def test_a_killed_runs_cut_last_line_is_skipped_when_read(tmp_path):
    path = tmp_path / "rec.jsonl"
    path.write_text('{"event": "command", "tick": 0}\n{"event": "comm')
    assert [r["tick"] for r in read_recording(path)] == [0]


def _filled_stats():
    stats = TimingStats(target_hz=100.0)
    for tick in range(101):         # 1 s at 100 Hz, periods alternating 9 and 11 ms
        period = math.nan if tick == 0 else (0.009 if tick % 2 else 0.011)
        new_plan = tick in (10, 60)
        stats.on_command(command(tick, tick * 0.01, period, new_plan, 0.12 if new_plan else math.nan))
    for i in range(5):
        stats.on_plan(plan_event(i, 0.1 + 0.2 * i))
    stats.on_frame(FrameEvent(0.0, 0, 0.0))
    stats.on_overrun(OverrunEvent(0.5, 50, 0.003))
    stats.on_trip(TripEvent(SafetyTrip("exit", "hold", 1.0, "loop ended")))
    stats.on_stop(StopEvent(1.0, "duration", "1 s elapsed"))
    return stats


def test_timing_summary_has_the_bench_fields():
    s = _filled_stats().summary()
    c = s["control"]
    assert c["ticks"] == 101 and c["achieved_hz"] == pytest.approx(100.0)
    assert c["period_ms"]["p50"] == pytest.approx(10.0, abs=1.01) and c["period_ms"]["max"] == pytest.approx(11.0)
    assert c["period_error_ms"]["p99"] == pytest.approx(1.0) and c["overruns"] == 1
    assert c["modes"] == {"follow": 101}
    p = s["policy"]
    assert p["plans"] == 5 and p["plans_per_s"] == pytest.approx(5.0)
    assert p["latency_ms"]["p50"] == pytest.approx(100.0) and p["decode_steps_mean"] == 40.0
    assert p["choices_mean"] == 88.0      # beside the decoder calls: what drafting saved
    assert p["skipped_actions_mean"] == 2.0
    assert list(s["stages_ms"]) == ["capture", "vision", "decode", "state_read", "control_tick", "command_write"]
    assert s["stages_ms"]["decode"]["p99"] == pytest.approx(60.0)
    assert s["frame_to_command_ms"]["n"] == 2 and s["frame_to_command_ms"]["max"] == pytest.approx(120.0)
    assert s["trips"][0]["reason"] == "exit" and s["stop"]["reason"] == "duration"


def test_plans_stale_on_arrival_are_counted_apart_from_the_latency_and_the_skips():
    stats = _filled_stats()
    for tick in (101, 102):     # two plans too old on arrival: held, no command of theirs was sent
        stats.on_command(CommandEvent(time_s=tick * 0.01, tick=tick, period_s=0.01, mode="stale",
                                      targets_rad={"a": 0.1}, sent_rad={"a": 0.1}, measured_rad={"a": 0.0},
                                      action_index=None, skipped_actions=0, new_plan=False,
                                      frame_to_command_s=math.nan, state_read_s=0.001, command_write_s=0.0005,
                                      work_s=0.002, stale_plan=True))
    s = stats.summary()
    assert stats.stale_plans == s["policy"]["stale_plans"] == 2
    assert s["frame_to_command_ms"]["n"] == 2 and s["policy"]["skipped_actions_mean"] == 2.0    # as without them
    assert _filled_stats().summary()["policy"]["stale_plans"] == 0


def test_summary_json_and_png(tmp_path):
    pytest.importorskip("matplotlib", reason="the timing plot needs matplotlib")
    stats = _filled_stats()
    data = json.loads(stats.write_json(tmp_path / "bench.json").read_text())
    assert data["schema"] == "edgeact.bench/1" and data["control"]["ticks"] == 101
    png = stats.plot_png(tmp_path / "bench.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_percentiles_and_max_cover_the_whole_run_not_only_its_newest_samples():
    # 35 min at 100 Hz whose first 2 % of ticks were slow: the newest 200 000 samples had forgotten them, though the
    # tick count covered them.
    stats = TimingStats(100.0)
    slow, normal = command(1, 0.0, period=0.030), command(2, 100.0, period=0.010)
    for tick in range(210_000):
        stats.on_command(slow if tick < 4_200 else normal)
    period = stats.summary()["control"]["period_ms"]
    assert period["n"] == stats.ticks == 210_000
    assert period["max"] == 30.0 and period["p99"] == pytest.approx(30.0, rel=0.005)
    assert period["p50"] == pytest.approx(10.0, rel=0.005) and period["mean"] == pytest.approx(10.4)


def test_timing_stats_hold_bounded_memory_however_long_the_run():
    # Every sample was kept: the control process grew ~85 MB an hour.
    stats, normal, plan = TimingStats(100.0), command(2, 0.0), plan_event(0, 0.0)

    def run(ticks):
        for tick in range(ticks):
            stats.on_command(normal)
            if tick % 7 == 0:
                stats.on_plan(plan)

    run(80_000)                 # past the exact samples (plans too): every block and histogram allocated
    tracemalloc.start()
    try:
        run(60_000)
        grown = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert grown < 64 * 1024, grown


def test_percentiles_beyond_the_exact_samples_are_within_half_a_percent():
    rng = np.random.default_rng(0)
    periods = 0.01 + rng.gamma(2.0, 2e-4, 3 * telemetry.EXACT_SAMPLES + 123)
    stats = TimingStats(100.0)
    for tick, period in enumerate(periods):
        stats.on_command(command(tick, tick * 0.01, float(period)))
    c = stats.summary()["control"]
    errors = np.abs(periods - 0.01)
    for key, seconds in (("period_ms", periods), ("period_error_ms", errors)):
        p50, p99 = np.percentile(seconds, [50, 99]) * 1e3
        assert c[key]["p50"] == pytest.approx(p50, rel=0.005) and c[key]["p99"] == pytest.approx(p99, rel=0.005)
        assert c[key]["max"] == round(seconds.max() * 1e3, 6) and c[key]["mean"] == pytest.approx(seconds.mean() * 1e3)
        assert c[key]["n"] == periods.size


def test_the_plot_shows_the_newest_ticks_and_the_summary_says_which(tmp_path):
    stats = TimingStats(100.0, plot_ticks=100)
    for tick in range(250):
        stats.on_command(command(tick, 5.0 + tick * 0.01, period=0.01 + tick * 1e-6))
    assert np.asarray(stats.period_s) == pytest.approx(0.01 + np.arange(150, 250) * 1e-6)    # oldest first
    coverage = stats.summary()["coverage"]
    assert coverage["plot_ticks"] == 100 and coverage["plot_periods_s"] == [1.5, 2.49]
    assert stats.summary()["control"]["period_ms"]["n"] == 250
    if importlib.util.find_spec("matplotlib"):
        stats.on_plan(plan_event(0, 5.0))
        assert stats.plot_png(tmp_path / "bench.png").stat().st_size > 10_000


def test_empty_run_summary_is_valid_json():
    data = TimingStats(50.0).summary()
    assert data["control"]["achieved_hz"] is None and data["policy"]["latency_ms"]["n"] == 0
    json.dumps(data, allow_nan=False)


def test_camera_fps_counts_only_the_frames_within_the_control_ticks():
    # The camera runs from the torque on to the teardown (here 4 s at 30 fps), the ticks only from 1 s to 2 s: the
    # frames before the first tick and after the last one are not the ticks' (counting them said 120 fps).
    stats = TimingStats(target_hz=100.0)
    frames = [FrameEvent(n / 30, n, n / 30) for n in range(120)]
    ticks = [command(tick, 1.0 + tick * 0.01) for tick in range(101)]
    for event in sorted(frames + ticks, key=lambda e: e.time_s):    # the hub delivers in publishing order
        (stats.on_frame if isinstance(event, FrameEvent) else stats.on_command)(event)
    camera = stats.summary()["camera"]
    assert camera["frames"] == 30 and camera["fps"] == pytest.approx(30.0)     # the frames at 1.033 ... 2.0 s


class Slow(Collect):
    """A subscriber slower than the control rate (a plot, a slow disk): `delay_s` per command."""

    def __init__(self, hub_thread, delay_s=0.01):
        super().__init__()
        self.delay_s, self.hub_thread, self.closed_while_delivering = delay_s, hub_thread, None

    def on_command(self, event):
        time.sleep(self.delay_s)
        self._add(event)

    def close(self):
        self.closed_while_delivering = self.hub_thread().is_alive()
        super().close()


def test_subscribers_too_slow_for_the_drain_get_the_stop_and_are_closed_only_after_the_hub_thread(tmp_path):
    hub = EventHub()
    slow = Slow(lambda: hub._thread)
    record = tmp_path / "commands.jsonl"
    hub.subscribers = [slow, CommandRecorder(record)]
    hub.start()
    for tick in range(200):             # 2 s of commands for this subscriber
        hub.publish(command(tick, tick * 0.01))
    hub.trip(SafetyTrip("exit", "hold", 2.0, "loop ended"))
    hub.publish(StopEvent(2.0, "duration", "2 s elapsed"))
    hub.close(timeout_s=0.3)
    assert slow.closed and slow.closed_while_delivering is False
    assert hub.error is None                                    # the recorder never wrote to a closed file
    assert isinstance(slow.events[-1], StopEvent) and isinstance(slow.events[-2], TripEvent)
    commands = [e for e in slow.events if isinstance(e, CommandEvent)]
    assert 0 < hub.undelivered == 200 - len(commands) < 200
    lines = [json.loads(line) for line in record.read_text().splitlines()]   # complete lines, ending as the run did
    assert [r["event"] for r in lines[-2:]] == ["trip", "stop"]


def test_the_hub_logs_its_backlog_as_it_grows(caplog, monkeypatch):
    monkeypatch.setattr(loop_events, "FIRST_LAG_WARNING", 20)
    hub = EventHub()
    hub.subscribers = [Slow(lambda: hub._thread, delay_s=0.005)]
    hub.start()
    for tick in range(100):
        hub.publish(command(tick, time.monotonic()))
    hub.close()
    behind = [int(r.getMessage().split()[3]) for r in caplog.records if "behind the loop" in r.getMessage()]
    # "event subscribers are 20 events ...", logged by the publisher as the backlog grows (the hub thread may be
    # stuck), each time it doubles: a few lines, not one per event though the backlog stays over 20.
    assert 1 <= len(behind) <= 3 and behind[0] >= 20 and all(b >= 2 * a for a, b in zip(behind, behind[1:]))
    assert hub.undelivered == 0


def test_the_log_says_so_when_no_plan_came_while_the_control_thread_goes_on(caplog):
    caplog.set_level(logging.INFO)
    sub = LogSubscriber(every_s=0.05)
    sub.on_command(command(0, 0.0))
    sub.on_plan(plan_event(0, 0.0))
    time.sleep(0.06)
    sub.on_command(command(1, 0.06))
    time.sleep(0.06)
    sub.on_command(command(2, 0.12))            # the model hangs: commands only
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and "plans/s" in messages[0]
    assert messages[1].startswith("0 plans in the last 0 s: the policy has not finished a step")
    assert caplog.records[1].levelname == "WARNING"


def test_the_summary_json_is_replaced_at_the_start_and_written_atomically(tmp_path):
    path = tmp_path / "bench.json"
    path.write_text('{"older": "run"}')
    stats = TimingStats(100.0)
    stats.start_json(path, "--out")
    assert json.loads(path.read_text())["incomplete"] is True and "older" not in path.read_text()
    stats.on_command(command(0, 0.0))
    stats.write_json(path, {"incomplete": False})
    assert json.loads(path.read_text())["control"]["ticks"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json"]      # no temporary left behind
    with pytest.raises(ConfigError, match=r"--out .*: cannot be written .*; give a path in a writable folder"):
        stats.start_json(tmp_path / "bench.json" / "x.json", "--out")


def test_the_command_period_sees_a_read_that_delays_the_send_though_the_tick_woke_on_time():
    """Ticks wake exactly every 10 ms, but a joint read of 1 ms then 5 ms delays every other send: the wake-up
    period error is 0, the period between the commands sent 4 ms off."""
    import dataclasses

    stats = TimingStats(target_hz=100.0)
    for tick in range(100):
        e = command(tick, tick * 0.01, math.nan if tick == 0 else 0.01)
        stats.on_command(dataclasses.replace(e, work_s=0.001 if tick % 2 else 0.005))
    stats.on_command(dataclasses.replace(command(102, 1.02), work_s=0.05))     # after a gap: not a period
    c = stats.summary()["control"]
    assert c["period_error_ms"]["p99"] == pytest.approx(0.0, abs=1e-9)
    assert c["command_period_error_ms"]["p99"] == pytest.approx(4.0) and c["command_period_ms"]["n"] == 99
    assert c["command_period_ms"]["max"] == pytest.approx(14.0)


def test_capture_is_the_cameras_latency_and_the_wait_for_the_planner_its_own_stage():
    stats = TimingStats(target_hz=100.0)
    stats.on_frame(FrameEvent(time_s=0.105, frame_number=7, capture_s=0.100))       # 5 ms to arrive
    stats.on_frame(FrameEvent(time_s=0.138, frame_number=8, capture_s=0.133))
    event = plan_event(0, 0.3)
    stats.on_plan(PlanEvent(event.time_s, event.plan, 0, frame_number=7, frame_age_s=0.030, step_s=0.09))
    stages = stats.summary()["stages_ms"]
    assert list(stages)[:2] == ["capture", "frame_wait"]
    assert stages["capture"]["n"] == 2 and stages["capture"]["max"] == pytest.approx(5.0)
    assert stages["frame_wait"]["n"] == 1 and stages["frame_wait"]["p50"] == pytest.approx(25.0)


def test_a_png_is_written_whole_or_not_at_all(tmp_path):
    """A full disk or an interrupt mid-write left a truncated picture under the name an older run's had."""
    from edgeact.runtime.telemetry import png_figure, save_png

    path = tmp_path / "bench.png"
    path.write_bytes(b"an older run's picture")
    fig = png_figure(path, (2, 2), "a test plot", "")

    def full_disk(target, **kwargs):
        with open(target, "wb") as f:
            f.write(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    fig.savefig = full_disk
    with pytest.raises(OSError, match="No space left"):
        save_png(fig, path, 50)
    assert path.read_bytes() == b"an older run's picture" and [p.name for p in tmp_path.iterdir()] == ["bench.png"]
    fig = png_figure(path, (2, 2), "a test plot", "")
    save_png(fig, path, 50)
    assert path.read_bytes().startswith(b"\x89PNG") and [p.name for p in tmp_path.iterdir()] == ["bench.png"]
