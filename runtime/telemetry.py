"""Subscribers of the loop's events: timing statistics (JSON, PNG plot), a JSONL command recorder, a logger."""
from __future__ import annotations

import collections
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgeact.runtime.errors import ConfigError, EdgeactError
from edgeact.runtime.loop_events import (CommandEvent, FrameEvent, OverrunEvent, PlanEvent, StopEvent, Subscriber,
                                         TripEvent)

log = logging.getLogger(__name__)


# -- subscribers -----------------------------------------------------------------------------

def _rounded(values: dict[str, float] | None, digits: int = 5) -> dict[str, float] | None:
    return None if values is None else {k: round(v, digits) for k, v in values.items()}


class CommandRecorder(Subscriber):
    """Every command, plan, trip and the stop as JSON lines; flushed on close, however the run ended."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("w", encoding="utf-8")
        self.lines = 0

    def _write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, allow_nan=False, default=_json_default) + "\n")
        self.lines += 1

    def on_command(self, e: CommandEvent) -> None:
        self._write({"event": "command", "t": round(e.time_s, 6), "tick": e.tick, "mode": e.mode,
                     "action": e.action_index, "targets_rad": _rounded(e.targets_rad),
                     "sent_rad": _rounded(e.sent_rad), "measured_rad": _rounded(e.measured_rad)})

    def on_plan(self, e: PlanEvent) -> None:
        self._write({"event": "plan", "t": round(e.time_s, 6), "index": e.index, "frame": e.frame_number,
                     "latency_s": round(e.plan.latency_s, 6), "actions": e.plan.actions.round(6).tolist(),
                     "stage_s": {k: round(v, 6) for k, v in e.plan.stage_seconds.items()}})

    def on_trip(self, e: TripEvent) -> None:
        t = e.trip
        self._write({"event": "trip", "t": round(t.time_s, 6), "reason": t.reason, "safe_state": t.safe_state,
                     "detail": t.detail, "error": t.error})

    def on_stop(self, e: StopEvent) -> None:
        self._write({"event": "stop", "t": round(e.time_s, 6), "reason": e.reason, "detail": e.detail})

    def close(self) -> None:
        self._file.close()


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


class LogSubscriber(Subscriber):
    """Trips, the stop, and (at most once per `every_s`) overruns and the plan rate, to the log; checked on every
    command too, so a policy that stopped answering is reported ("0 plans in the last N s") while the control
    thread goes on."""

    def __init__(self, every_s: float = 5.0, logger: logging.Logger = log):
        self.every_s, self.log = every_s, logger
        self._last_s = time.monotonic()
        self._plans = self._overruns = 0
        self._started = False

    def on_plan(self, e: PlanEvent) -> None:
        self._plans += 1
        self._maybe_report()

    def on_overrun(self, e: OverrunEvent) -> None:
        self._overruns += 1
        self._maybe_report()

    def on_command(self, e: CommandEvent) -> None:
        if not self._started:       # the rates count from the loop's start, not the policy's load
            self._started, self._last_s = True, time.monotonic()
        self._maybe_report()

    def _maybe_report(self) -> None:
        now = time.monotonic()
        if now - self._last_s >= self.every_s:
            if self._plans:
                self.log.info("%.2f plans/s, %d control overruns in the last %.0f s",
                              self._plans / (now - self._last_s), self._overruns, now - self._last_s)
            else:
                self.log.warning("0 plans in the last %.0f s: the policy has not finished a step (a stuck model or "
                                 "policy process?); %d control overruns", now - self._last_s, self._overruns)
            self._last_s, self._plans, self._overruns = now, 0, 0

    def on_trip(self, e: TripEvent) -> None:
        t = e.trip
        level = logging.INFO if t.reason == "exit" and not t.error else logging.WARNING   # every run ends with one
        self.log.log(level, "safe state %r (%s): %s%s", t.safe_state, t.reason, t.detail,
                     f"; FAILED: {t.error}" if t.error else "")

    def on_stop(self, e: StopEvent) -> None:
        self.log.info("loop stopped: %s (%s)", e.reason, e.detail)


class TimingStats(Subscriber):
    """Everything `edgeact bench` reports: control periods and overruns, plan rate, stage latencies.

    Samples are bounded (the newest `max_samples` of each quantity), so it may ride along a long run.
    """

    def __init__(self, target_hz: float, max_samples: int = 200_000):
        self.target_hz = target_hz
        self._n = max_samples
        self.tick_time_s, self.period_s, self.work_s = self._series(), self._series(), self._series()
        self.state_read_s, self.command_write_s = self._series(), self._series()
        self.frame_to_command_s, self.skipped_actions = self._series(), self._series()
        self.plan_time_s, self.plan_latency_s, self.step_s = self._series(), self._series(), self._series()
        self.frame_age_s, self.decode_steps = self._series(), self._series()
        self.stage_s: dict[str, collections.deque] = {}
        self.modes: collections.Counter = collections.Counter()
        self.ticks = self.overruns = self.plans = self.frames = 0
        self._frames_since_first_tick = self._frames_in_ticks = 0     # the camera's rate over the ticks' span
        self.stale_plans = 0            # plans too old on arrival: held, so in neither frame -> command nor the skips
        self.first_tick_s = self.last_tick_s = math.nan
        self.trips: list[dict[str, Any]] = []
        self.stop: dict[str, str] | None = None

    def _series(self) -> collections.deque:
        return collections.deque(maxlen=self._n)

    # -- hooks -------------------------------------------------------------------------------
    def on_frame(self, e: FrameEvent) -> None:
        self.frames += 1
        if self.ticks and e.time_s >= self.first_tick_s:
            self._frames_since_first_tick += 1

    def on_command(self, e: CommandEvent) -> None:
        self.ticks += 1
        if self.ticks == 1:
            self.first_tick_s = e.time_s
        self.last_tick_s = e.time_s
        self._frames_in_ticks = self._frames_since_first_tick     # frames from the first tick to this one
        self.tick_time_s.append(e.time_s)
        self.period_s.append(e.period_s)
        for series, value in ((self.work_s, e.work_s), (self.state_read_s, e.state_read_s),
                              (self.command_write_s, e.command_write_s)):
            series.append(value)
        self.modes[e.mode] += 1
        if e.stale_plan:
            self.stale_plans += 1
        elif e.new_plan:
            self.frame_to_command_s.append(e.frame_to_command_s)
            self.skipped_actions.append(e.skipped_actions)

    def on_overrun(self, e: OverrunEvent) -> None:
        self.overruns += 1

    def on_plan(self, e: PlanEvent) -> None:
        self.plans += 1
        self.plan_time_s.append(e.time_s)
        self.plan_latency_s.append(e.plan.latency_s)
        self.step_s.append(e.step_s)
        self.frame_age_s.append(e.frame_age_s)
        self.decode_steps.append(e.plan.decode_steps)
        for stage, seconds in e.plan.stage_seconds.items():
            self.stage_s.setdefault(stage, self._series()).append(seconds)

    def on_trip(self, e: TripEvent) -> None:
        t = e.trip
        self.trips.append({"reason": t.reason, "safe_state": t.safe_state, "detail": t.detail, "error": t.error})

    def on_stop(self, e: StopEvent) -> None:
        self.stop = {"reason": e.reason, "detail": e.detail}

    # -- results -----------------------------------------------------------------------------
    def stages(self) -> dict[str, collections.deque]:
        """Stage name -> seconds, in pipeline order. "capture" is a frame's age when the planner took it;
        then the policy's own stage_seconds; then the control tick's joint read, whole tick, and command write."""
        out = {"capture": self.frame_age_s, **self.stage_s, "state_read": self.state_read_s,
               "control_tick": self.work_s, "command_write": self.command_write_s}
        return {name: series for name, series in out.items() if series}

    def summary(self) -> dict[str, Any]:
        span_s = self.last_tick_s - self.first_tick_s if self.ticks > 1 else math.nan
        periods = _array(self.period_s)
        target_period_s = 1.0 / self.target_hz
        plan_span_s = (self.plan_time_s[-1] - self.plan_time_s[0]) if self.plans > 1 else math.nan
        return {
            "schema": "edgeact.bench/1",
            "duration_s": _num(span_s),
            "control": {
                "target_hz": self.target_hz,
                "achieved_hz": _num((self.ticks - 1) / span_s if self.ticks > 1 else math.nan),
                "ticks": self.ticks,
                "period_ms": _stats_ms(periods),
                "period_error_ms": _stats_ms(np.abs(periods - target_period_s)),
                "overruns": self.overruns,
                "overrun_fraction": _num(self.overruns / self.ticks if self.ticks else math.nan),
                "modes": dict(self.modes),
            },
            "policy": {
                "plans": self.plans,
                "plans_per_s": _num((self.plans - 1) / plan_span_s if self.plans > 1 else math.nan),
                "latency_ms": _stats_ms(_array(self.plan_latency_s)),
                "step_ms": _stats_ms(_array(self.step_s)),
                "decode_steps_mean": _mean(self.decode_steps),
                "skipped_actions_mean": _mean(self.skipped_actions),
                "stale_plans": self.stale_plans,
            },
            "stages_ms": {name: _stats_ms(_array(series)) for name, series in self.stages().items()},
            "frame_to_command_ms": _stats_ms(_array(self.frame_to_command_s)),
            # Frames between the first and the last tick, over that span: not those of the start and the teardown.
            "camera": {"frames": self._frames_in_ticks,
                       "fps": _num(self._frames_in_ticks / span_s if self.ticks > 1 else math.nan)},
            "trips": list(self.trips),
            "stop": self.stop,
        }

    def write_json(self, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """The summary, plus `extra` sections (run_summary's), as JSON: via a hidden temporary + os.replace, so an
        interrupt never leaves a truncated file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        summary = {**self.summary(), **(extra or {})}
        tmp = path.with_name(f".{path.name}.partial")
        tmp.write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return path

    def start_json(self, path: str | Path, option: str) -> Path:
        """Before the run: replace an older run's JSON at `path` by this empty summary marked "incomplete" (a run
        that dies leaves no stale numbers behind), checking that it can be written at all."""
        try:
            return self.write_json(path, {"incomplete": True})
        except OSError as exc:
            raise ConfigError(f"{option} {path}: cannot be written ({exc.strerror or exc}); give a path in a "
                              f"writable folder") from None

    def plot_png(self, path: str | Path) -> Path:
        """Control periods over time and the stage latencies, as one PNG (needs matplotlib)."""
        path = Path(path)
        fig = png_figure(path, (10, 7), "the timing plot", "the JSON has the same numbers")
        top, bottom = fig.subplots(2, 1)
        times = _array(self.tick_time_s)
        if times.size:
            top.plot(times - times[0], _array(self.period_s, keep_nan=True) * 1e3, lw=0.6, label="period")
        top.axhline(1e3 / self.target_hz, color="black", ls="--", lw=0.8, label=f"target {self.target_hz:g} Hz")
        top.set(xlabel="time (s)", ylabel="control period (ms)",
                title=f"control loop: {self.ticks} ticks, {self.overruns} overruns")
        top.legend(loc="upper right")
        stages = self.stages()
        if stages:
            bottom.boxplot([_array(s) * 1e3 for s in stages.values()], tick_labels=list(stages), showfliers=True)
            bottom.set_yscale("log")
        bottom.set(ylabel="latency (ms)", title="stage latencies per step (policy stages) or tick (control)")
        bottom.tick_params(axis="x", labelrotation=20)
        fig.savefig(path, dpi=100)
        return path


def output_file(path: str | Path, option: str) -> Path:
    """Check an output file before the run (not after it, losing every number): not a folder, its folder made."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{option} {path} is a folder; give a file path (e.g. {path / 'run.json'})")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:          # a file where a folder should be, no permission
        raise ConfigError(f"{option} {path}: cannot make the folder {exc.filename or path.parent} "
                          f"({exc.strerror or exc}); give a path in a folder that exists or can be made") from None
    return path


def distinct_outputs(outputs: dict[str, Path]) -> None:
    """Refuse one file for two outputs (option -> path): the last one written would replace the other."""
    seen: dict[Path, str] = {}
    for option, path in outputs.items():
        other = seen.setdefault(Path(path).resolve(), option)
        if other != option:
            raise ConfigError(f"{other} and {option} name the same file {path}: the one written last would replace "
                              f"the other (the JSON is written at the end); give them different paths")


def png_figure(path: Path, figsize: tuple[float, float], what: str, fallback: str) -> Any:
    """A matplotlib Figure on the Agg canvas (no pyplot: no global state, any thread), its folder made.

    Without matplotlib: an EdgeactError naming `what` needs it and the `fallback` the user still has.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise EdgeactError(f"{what} needs matplotlib; install it with `pip install matplotlib` ({fallback})") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


# -- the run's own numbers ----------------------------------------------------------------------

MEMORY_BUDGET_FACTOR = 1.3          # the runtime's resident memory <= 1.3 x the bundle's bytes + 300 MB
MEMORY_BUDGET_EXTRA_BYTES = 300 * 2**20
RUNTIME_ROLES = ("control", "policy")   # the robot's processes; "sim" stands in for hardware and is shown apart


def run_summary(result: Any, bundle_dir: str | Path | None = None) -> dict[str, Any]:
    """What a RunResult adds to the timing summary: the control thread's scheduling and the peak memory.

    The runtime's figure sums each process's VmHWM: an upper bound (shared library pages count in
    each process, and peaks need not coincide).
    """
    rss = dict(result.peak_rss_bytes)
    runtime_bytes = sum(rss[role] for role in RUNTIME_ROLES if role in rss)
    bundle_bytes = directory_bytes(bundle_dir) if bundle_dir is not None else None
    budget = MEMORY_BUDGET_FACTOR * bundle_bytes + MEMORY_BUDGET_EXTRA_BYTES if bundle_bytes is not None else None
    undelivered = getattr(result, "undelivered_events", 0)
    teardown_error = getattr(result, "teardown_error", None)
    return {
        # Events the subscribers (these statistics among them) never got: a subscriber fell too far behind.
        "incomplete": bool(undelivered),
        "undelivered_events": undelivered,
        "teardown_error": None if teardown_error is None else f"{type(teardown_error).__name__}: {teardown_error}",
        "control_thread": {"scheduling": result.control_scheduling},
        "memory": {
            "peak_rss_mb": {role: _mb(value) for role, value in rss.items()},
            "runtime_peak_rss_mb": _mb(runtime_bytes) if rss else None,
            "bundle_mb": _mb(bundle_bytes),
            "budget_mb": _mb(budget),
            "within_budget": None if budget is None or not rss else runtime_bytes <= budget,
        },
    }


def directory_bytes(path: str | Path) -> int:
    """Bytes of every file under `path` (a bundle: stages, weights, tokenizer, manifest)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _mb(value: float | None) -> float | None:
    return None if value is None else round(value / 2**20, 1)


def _array(series, keep_nan: bool = False) -> np.ndarray:
    values = np.fromiter(series, dtype=np.float64, count=len(series))
    return values if keep_nan else values[np.isfinite(values)]


def _mean(series) -> float | None:
    return _num(float(np.mean(series))) if series else None


def _num(value: float) -> float | None:
    return round(float(value), 6) if math.isfinite(value) else None


def _stats_ms(seconds: np.ndarray) -> dict[str, float | None | int]:
    if seconds.size == 0:
        return {"n": 0, "p50": None, "p99": None, "max": None, "mean": None}
    p50, p99 = np.percentile(seconds, [50, 99])
    return {"n": int(seconds.size), "p50": _num(p50 * 1e3), "p99": _num(p99 * 1e3),
            "max": _num(seconds.max() * 1e3), "mean": _num(seconds.mean() * 1e3)}
