"""Subscribers of the loop's events: timing statistics (JSON, PNG plot) and a logger (the JSONL command recorder:
runtime/recorder.py)."""
from __future__ import annotations

import collections
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgeact.runtime.errors import ConfigError, EdgeactError
from edgeact.runtime.samples import EXACT_SAMPLES, RecentSamples, Series
from edgeact.runtime.recorder import CommandRecorder  # noqa: F401  (its home until runtime/recorder.py)
from edgeact.runtime.loop_events import (CommandEvent, FrameEvent, OverrunEvent, PlanEvent, StopEvent, Subscriber,
                                         TripEvent)

log = logging.getLogger(__name__)


# -- subscribers -----------------------------------------------------------------------------

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
                                 "policy process?), or the frames were too old to plan on (then a warning about "
                                 "plan.max_frame_age_s says so); %d control overruns", now - self._last_s,
                                 self._overruns)
            self._last_s, self._plans, self._overruns = now, 0, 0

    def on_trip(self, e: TripEvent) -> None:
        t = e.trip
        level = logging.INFO if t.reason == "exit" and not t.error else logging.WARNING   # every run ends with one
        self.log.log(level, "safe state %r (%s): %s%s", t.safe_state, t.reason, t.detail,
                     f"; FAILED: {t.error}" if t.error else "")

    def on_stop(self, e: StopEvent) -> None:
        self.log.info("loop stopped: %s (%s)", e.reason, e.detail)


PLOT_TICKS = 30_000          # the period plot's newest ticks (5 min at 100 Hz); older ones are only in the numbers


class TimingStats(Subscriber):
    """Everything `edgeact bench` reports: control periods and overruns, plan rate, stage latencies.

    Every number covers the whole run in bounded memory (a few MB however long it runs), so it may ride along a
    robot's day: counts, means and maxima are exact; percentiles are exact up to EXACT_SAMPLES samples of a
    quantity, beyond that within 0.5 % (`Series`). The period plot shows the newest `plot_ticks` ticks.
    """

    def __init__(self, target_hz: float, plot_ticks: int = PLOT_TICKS):
        self.target_hz = target_hz
        self.period_s, self.tick_time_s = RecentSamples(plot_ticks), RecentSamples(plot_ticks)     # the plot's (and the sheet's)
        self.step_s = RecentSamples(plot_ticks)                                               # newest samples
        self.period_stats_s, self.period_error_s, self.work_s = Series(), Series(), Series()
        # The period between successive commands reaching the driver (each send's return): a slow or varying joint
        # read delays the command though the tick woke on time, which the tick-start period cannot see.
        self.command_period_s, self.command_period_error_s = Series(), Series()
        self._last_command: tuple[int, float] | None = None      # (tick, when its send returned)
        # Per frame, capture -> arrival in the loop (the camera's own latency), and arrival -> the planner took it
        # (waiting for the planner); their sum is the frame's age when taken.
        self.capture_s, self.frame_wait_s = Series(), Series()
        self._arrivals: collections.OrderedDict[int, float] = collections.OrderedDict()
        self.state_read_s, self.command_write_s = Series(), Series()
        self.frame_to_command_s, self.skipped_actions = Series(), Series()
        self.plan_latency_s, self.step_stats_s = Series(), Series()
        self.frame_age_s, self.decode_steps, self.choices = Series(), Series(), Series()
        self.stage_s: dict[str, Series] = {}
        self.modes: collections.Counter = collections.Counter()
        self.ticks = self.overruns = self.plans = self.frames = 0
        self._frames_since_first_tick = self._frames_in_ticks = 0     # the camera's rate over the ticks' span
        self.stale_plans = 0            # plans too old on arrival: held, so in neither frame -> command nor the skips
        self.trace_followed = 0         # plans whose translations were moved onto their trace (plan.follow_trace)
        self.first_tick_s = self.last_tick_s = self.first_plan_s = self.last_plan_s = math.nan
        self.trips: list[dict[str, Any]] = []
        self.stop: dict[str, str] | None = None
        self._exact: tuple[int, int, float] | None = None      # the loop's own tick and overrun counts (exact_counts)

    # -- hooks -------------------------------------------------------------------------------
    def on_frame(self, e: FrameEvent) -> None:
        self.frames += 1
        if math.isfinite(e.capture_s):
            self.capture_s.append(e.time_s - e.capture_s)
            self._arrivals[e.frame_number] = e.time_s - e.capture_s
            while len(self._arrivals) > 64:         # the planner takes one of the newest frames
                self._arrivals.popitem(last=False)
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
        self.period_stats_s.append(e.period_s)
        self.period_error_s.append(abs(e.period_s - 1.0 / self.target_hz))
        sent_s = e.time_s + e.work_s
        if self._last_command is not None and self._last_command[0] == e.tick - 1:   # consecutive ticks only
            period = sent_s - self._last_command[1]
            self.command_period_s.append(period)
            self.command_period_error_s.append(abs(period - 1.0 / self.target_hz))
        self._last_command = (e.tick, sent_s)
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
        if self.plans == 1:
            self.first_plan_s = e.time_s
        self.last_plan_s = e.time_s
        self.plan_latency_s.append(e.plan.latency_s)
        self.step_s.append(e.step_s)
        self.step_stats_s.append(e.step_s)
        self.frame_age_s.append(e.frame_age_s)
        arrival = self._arrivals.get(e.frame_number)
        if arrival is not None:
            self.frame_wait_s.append(max(e.frame_age_s - arrival, 0.0))
        self.decode_steps.append(e.plan.decode_steps)
        self.choices.append(e.plan.choices)
        self.trace_followed += e.plan.trace_followed
        for stage, seconds in e.plan.stage_seconds.items():
            self.stage_s.setdefault(stage, Series()).append(seconds)

    def on_trip(self, e: TripEvent) -> None:
        t = e.trip
        self.trips.append({"reason": t.reason, "safe_state": t.safe_state, "detail": t.detail, "error": t.error})

    def on_stop(self, e: StopEvent) -> None:
        self.stop = {"reason": e.reason, "detail": e.detail}

    # -- results -----------------------------------------------------------------------------
    def stages(self) -> dict[str, Series]:
        """Stage name -> its seconds, in pipeline order. "capture" is capture -> the frame's arrival in the loop (every
        frame), "frame_wait" arrival -> the planner took it (the frames planned on); then the policy's own
        stage_seconds; then the control tick's joint read, whole tick, and command write. Without frame events
        (a camera that reports no capture time), "capture" is the whole age of the frames planned on."""
        front = ({"capture": self.capture_s, "frame_wait": self.frame_wait_s} if self.capture_s
                 else {"capture": self.frame_age_s})
        out = {**front, **self.stage_s, "state_read": self.state_read_s,
               "control_tick": self.work_s, "command_write": self.command_write_s}
        return {name: series for name, series in out.items() if series}

    def finish(self, result: Any, bundle: dict[str, Any] | None, device: Any) -> dict[str, Any]:
        """After the run: the loop's exact counts where events were dropped (exact_counts), then run_summary's
        sections (the `extra` of summary() and write_json)."""
        self.exact_counts(result)
        return run_summary(result, bundle, device)

    def exact_counts(self, result: Any) -> None:
        """Take the control loop's own counts from its RunResult where events were dropped on the way here (a stuck
        subscriber): the ticks, overruns and achieved rate then count every tick, not the delivered ones; the
        percentiles stay those of the delivered ticks (the summary is marked incomplete)."""
        if getattr(result, "undelivered_events", 0):
            self._exact = (result.ticks, result.overruns, result.tick_span_s)

    def _counts(self) -> tuple[int, int, float]:
        """(ticks, overruns, span from the first tick to the last): the loop's own where events were dropped on the
        way here (exact_counts), else the delivered ones."""
        if self._exact is not None:
            return self._exact
        return self.ticks, self.overruns, self.last_tick_s - self.first_tick_s if self.ticks > 1 else math.nan

    def summary(self) -> dict[str, Any]:
        ticks, overruns, span_s = self._counts()
        plan_span_s = self.last_plan_s - self.first_plan_s if self.plans > 1 else math.nan
        times = np.asarray(self.tick_time_s)
        return {
            "schema": "edgeact.bench/1",
            "duration_s": _num(span_s),
            "control": {
                "target_hz": self.target_hz,
                "achieved_hz": _num((ticks - 1) / span_s if ticks > 1 and span_s > 0 else math.nan),
                "ticks": ticks,
                "period_ms": _stats_ms(self.period_stats_s),
                "period_error_ms": _stats_ms(self.period_error_s),
                "command_period_ms": _stats_ms(self.command_period_s),
                "command_period_error_ms": _stats_ms(self.command_period_error_s),
                "overruns": overruns,
                "overrun_fraction": _num(overruns / ticks if ticks else math.nan),
                "modes": dict(self.modes),
            },
            "policy": {
                "plans": self.plans,
                "plans_per_s": _num((self.plans - 1) / plan_span_s if self.plans > 1 else math.nan),
                "latency_ms": _stats_ms(self.plan_latency_s),
                "step_ms": _stats_ms(self.step_stats_s),
                "decode_steps_mean": _mean(self.decode_steps),
                "choices_mean": _mean(self.choices),        # beside decode_steps_mean: what drafting saved
                "skipped_actions_mean": _mean(self.skipped_actions),
                "stale_plans": self.stale_plans,
                "trace_followed": self.trace_followed,
            },
            "stages_ms": {name: _stats_ms(series) for name, series in self.stages().items()},
            "frame_to_command_ms": _stats_ms(self.frame_to_command_s),
            # Frames between the first and the last tick, over that span: not those of the start and the teardown.
            "camera": {"frames": self._frames_in_ticks,
                       "fps": _num(self._frames_in_ticks / span_s if self.ticks > 1 else math.nan)},
            "trips": list(self.trips),
            "stop": self.stop,
            # What the numbers cover: the whole run, but the period plot only its newest ticks.
            "coverage": {"percentiles": f"the whole run: exact up to {EXACT_SAMPLES} samples of a quantity, beyond "
                                        f"that within 0.5 % (a log histogram); n, mean and max exact",
                         "plot_periods_s": ([_num(times[0] - self.first_tick_s), _num(times[-1] - self.first_tick_s)]
                                            if times.size else None),
                         "plot_ticks": int(times.size)},
        }

    def write_json(self, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """The summary, plus `extra` sections (run_summary's), as JSON: via a hidden temporary + os.replace, so an
        interrupt never leaves a truncated file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        summary = {**self.summary(), **(extra or {})}
        tmp = path.with_name(f".{path.name}.partial")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(json.dumps(summary, indent=2, allow_nan=False) + "\n")
                f.flush()
                os.fsync(f.fileno())        # on the storage before it replaces the older file (a power cut)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return path

    def write_final_json(self, path: str | Path, extra: dict[str, Any]) -> tuple[Path | None, str]:
        """write_json at a run's end: (the path, "") or, where it could not be written (a full disk), (None, why), so
        the run's end (the tables, the motors' state, its status) is still told; the caller reports the loss."""
        try:
            return self.write_json(path, extra), ""
        except OSError as exc:
            return None, f"{path}: {exc.strerror or exc}"

    def start_json(self, path: str | Path, option: str) -> Path:
        """Before the run: replace an older run's JSON at `path` by this empty summary marked "incomplete" (a run
        that dies leaves no stale numbers behind), checking that it can be written at all."""
        try:
            return self.write_json(path, {"incomplete": True})
        except OSError as exc:
            raise ConfigError(f"{option} {path}: cannot be written ({exc.strerror or exc}); give a path in a "
                              f"writable folder") from None

    def plot_title(self) -> str:
        """The period plot's title, with the counts the JSON and the table give: the loop's own where events were
        dropped on the way here (exact_counts)."""
        ticks, overruns, _ = self._counts()
        plotted = len(self.tick_time_s)
        shown = f" (the newest {plotted} shown)" if plotted < ticks else ""
        missed = f"; incomplete: {ticks - self.ticks} ticks' events missed" if self._exact is not None else ""
        return f"control loop: {ticks} ticks{shown}, {overruns} overruns{missed}"

    def plot_png(self, path: str | Path) -> Path:
        """Control periods over time (the newest `plot_ticks` ticks) and the stage latencies of the whole run, as one
        PNG (needs matplotlib)."""
        path = Path(path)
        fig = png_figure(path, (10, 7), "the timing plot", "the JSON has the same numbers")
        top, bottom = fig.subplots(2, 1)
        times = np.asarray(self.tick_time_s)
        if times.size:
            top.plot(times - self.first_tick_s, np.asarray(self.period_s) * 1e3, lw=0.6, label="period")
        top.axhline(1e3 / self.target_hz, color="black", ls="--", lw=0.8, label=f"target {self.target_hz:g} Hz")
        top.set(xlabel="time since the first tick (s)", ylabel="control period (ms)", title=self.plot_title())
        top.legend(loc="upper right")
        stages = self.stages()
        if stages:     # boxes from the whole run's percentiles: its samples are not kept
            bottom.bxp([_box_ms(name, series) for name, series in stages.items()])
            bottom.set_yscale("log")
        bottom.set(ylabel="latency per step or tick (ms)",
                   title="stage latencies over the whole run: box p25-p75, whiskers p1-p99, dots min and max")
        bottom.tick_params(axis="x", labelrotation=20)
        return save_png(fig, path, 100)


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


def _first_json(path: Path, whole: bool) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.loads(f.read(1 << 24) if whole else f.readline(1 << 20))    # a summary is far smaller
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def is_timing_json(path: Path) -> bool:
    """Whether `path` holds a run's timing summary (TimingStats.write_json's, or the placeholder of a run that died)."""
    data = _first_json(path, whole=True)
    return isinstance(data, dict) and (data.get("incomplete") is True or isinstance(data.get("control"), dict))


def is_recording(path: Path) -> bool:
    """Whether `path` holds a CommandRecorder recording (its first line one of its events)."""
    data = _first_json(path, whole=False)
    return isinstance(data, dict) and data.get("event") in ("command", "plan", "trip", "stop")


def is_check_report(path: Path) -> bool:
    """Whether `path` holds an `edgeact check --json` report (preflight.report's)."""
    data = _first_json(path, whole=True)
    return isinstance(data, dict) and set(data) == {"passed", "checks"}


def not_another_file(path: Path, option: str, ours: Callable[[Path], bool], what: str) -> None:
    """Refuse an output path that holds a file other than an older output of the same kind (a robot config, some
    other file): the run replaces what is there."""
    if path.is_file() and path.stat().st_size > 0 and not ours(path):
        raise ConfigError(f"{option} {path} holds a file that is not {what}: the run would replace it; give {option} "
                          "another path, or remove that file yourself")


def distinct_outputs(outputs: dict[str, Path]) -> None:
    """Refuse one file for two outputs (option -> path): the last one written would replace the other."""
    seen: dict[Path, str] = {}
    for option, path in outputs.items():
        other = seen.setdefault(Path(path).resolve(), option)
        if other != option:
            raise ConfigError(f"{other} and {option} name the same file {path}: the one written last would replace "
                              f"the other (the JSON is written at the end); give them different paths")


def outputs_not_inputs(outputs: dict[str, Path], inputs: dict[str, Path | None]) -> None:
    """Refuse an output (option -> path) that is one of the run's inputs (the robot config, the e-stop file): the
    run would write over it (a config replaced by the timing JSON no longer loads)."""
    named = {Path(path).resolve(): what for what, path in inputs.items() if path is not None}
    for option, path in outputs.items():
        what = named.get(Path(path).resolve())
        if what is not None:
            raise ConfigError(f"{option} {path} is {what}: the run would write over it; give {option} another path")


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


def save_png(fig: Any, path: Path, dpi: int) -> Path:
    """Write `fig` as PNG via a hidden temporary + os.replace: an interrupt or a full disk never leaves a truncated
    picture under the name."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, dpi=dpi, format="png")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# -- the run's own numbers ----------------------------------------------------------------------

MEMORY_BUDGET_FACTOR = 1.3          # the runtime's resident memory <= 1.3 x the bundle's bytes + 300 MB
MEMORY_BUDGET_EXTRA_BYTES = 300 * 2**20
RUNTIME_ROLES = ("control", "policy")   # the robot's processes; "sim" stands in for hardware and is shown apart


def bundle_identity(bundle_dir: str | Path) -> dict[str, Any]:
    """Which bundle a run loads, read when it starts (the folder may be switched, rebuilt or removed while it runs):
    its folder (a store's `current` link resolved: runtime/bundle_store.py), its manifest's sha256 (which lists every
    file's sha256) and its bytes."""
    from edgeact.runtime.bundle import manifest_sha256

    try:
        digest = manifest_sha256(bundle_dir)
    except OSError:
        digest = None
    return {"path": str(bundle_dir), "manifest_sha256": digest, "bytes": directory_bytes(bundle_dir)}


def run_summary(result: Any, bundle: dict[str, Any] | str | Path | None = None, device: Any = None) -> dict[str, Any]:
    """What a RunResult adds to the timing summary: the control thread's scheduling, the peak memory, the bundle
    (`bundle`: a bundle_identity read when the run began, or a folder to read now) and the device it ran on
    (`device`: a device_info.DeviceInfo read when the run began; None: read now).

    The runtime's figure sums each process's VmHWM: an upper bound (shared library pages count in
    each process, and peaks need not coincide).
    """
    rss = dict(result.peak_rss_bytes)
    runtime_bytes = sum(rss[role] for role in RUNTIME_ROLES if role in rss)
    if bundle is not None and not isinstance(bundle, dict):
        bundle = bundle_identity(bundle)
    bundle_bytes = bundle["bytes"] if bundle is not None else None
    budget = MEMORY_BUDGET_FACTOR * bundle_bytes + MEMORY_BUDGET_EXTRA_BYTES if bundle_bytes is not None else None
    undelivered = getattr(result, "undelivered_events", 0)
    teardown_error = getattr(result, "teardown_error", None)
    if device is None:
        from edgeact.runtime.device_info import read_device_info

        device = read_device_info()
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
        # Frames the planner did not plan on: older than plan.max_frame_age_s when taken (the robot held).
        "frames_too_old": getattr(result, "stale_frames", 0),
        "device": device.to_dict(),
        "bundle": None if bundle is None else {"path": bundle["path"], "manifest_sha256": bundle["manifest_sha256"]},
    }


def directory_bytes(path: str | Path) -> int:
    """Bytes of every file under `path` (a bundle: stages, weights, tokenizer, manifest)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _mb(value: float | None) -> float | None:
    return None if value is None else round(value / 2**20, 1)


def _mean(series: Series) -> float | None:
    return _num(series.mean()) if series else None


def _num(value: float) -> float | None:
    return round(float(value), 6) if math.isfinite(value) else None


def _stats_ms(seconds: Series) -> dict[str, float | None | int]:
    if not seconds:
        return {"n": 0, "p50": None, "p99": None, "max": None, "mean": None}
    p50, p99 = seconds.percentiles([50, 99])
    return {"n": seconds.n, "p50": _num(p50 * 1e3), "p99": _num(p99 * 1e3),
            "max": _num(seconds.max() * 1e3), "mean": _num(seconds.mean() * 1e3)}


def _box_ms(name: str, seconds: Series) -> dict[str, Any]:
    """A matplotlib `bxp` box from a series' percentiles, in ms."""
    p1, p25, p50, p75, p99 = (v * 1e3 for v in seconds.percentiles([1, 25, 50, 75, 99]))
    return {"label": name, "med": p50, "q1": p25, "q3": p75, "whislo": p1, "whishi": p99,
            "fliers": [seconds.min() * 1e3, seconds.max() * 1e3]}
