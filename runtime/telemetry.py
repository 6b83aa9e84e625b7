"""Subscribers of the loop's events: timing statistics (JSON, PNG plot), a JSONL command recorder, a logger."""
from __future__ import annotations

import collections
import errno
import json
import logging
import math
import os
import re
import stat
import time
from collections.abc import Iterator
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


RECORD_PART_BYTES = 256 * 2**20     # a recording goes on in a new part beyond this (~220 MiB an hour at 100 Hz)
RECORD_PARTS = 8                    # parts kept, the oldest deleted beyond: about 9 h at that rate, 2 GiB
RECORD_FLUSH_S = 1.0                # written to the OS at least this often: a killed run loses about this much


class CommandRecorder(Subscriber):
    """Every command, plan, trip and the stop as JSON lines: handed to the OS about every `flush_every_s` (a killed
    run loses about that much), synced to the disk on close however the run ended.

    Beyond `part_bytes` the recording goes on in a new part, PATH with a number (commands.jsonl, commands.1.jsonl,
    commands.2.jsonl ...), and only the newest `keep_parts` are kept: a day's run fills no disk. `recording_parts`
    lists a recording's parts, `read_recording` reads them in order. Parts of an older recording at PATH are deleted
    at the start, as PATH itself is replaced.
    """

    def __init__(self, path: str | Path, part_bytes: int = RECORD_PART_BYTES, keep_parts: int = RECORD_PARTS,
                 flush_every_s: float = RECORD_FLUSH_S):
        if part_bytes < 1 or keep_parts < 1:
            raise ConfigError(f"recording parts of {part_bytes} bytes, {keep_parts} kept: give at least 1 byte and 1 "
                              f"part (defaults {RECORD_PART_BYTES} bytes, {RECORD_PARTS} parts)")
        self.path, self.part_bytes, self.keep_parts = Path(path), part_bytes, keep_parts
        self.flush_every_s = flush_every_s
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("w", encoding="utf-8")
        self._rotates = stat.S_ISREG(os.fstat(self._file.fileno()).st_mode)     # not /dev/null or a pipe
        older = recording_parts(self.path)[1:] if self._rotates else []
        for part in older:
            part.unlink()
        if older:
            log.info("deleted %d parts of an older recording at %s", len(older), self.path)
        self.part, self._bytes, self._flushed_s = 0, 0, time.monotonic()
        self.lines = 0

    def _write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, allow_nan=False, default=_json_default) + "\n"
        self._file.write(line)
        self.lines += 1
        self._bytes += len(line)            # bytes: json.dumps escapes every non-ASCII character
        now = time.monotonic()
        if self._bytes >= self.part_bytes and self._rotates:
            self._next_part()
        elif now - self._flushed_s >= self.flush_every_s:
            self._file.flush()
            self._flushed_s = now

    def _next_part(self) -> None:
        self._close_file()
        self.part += 1
        deleted = ""
        if self.part >= self.keep_parts:
            oldest = record_part_path(self.path, self.part - self.keep_parts)
            oldest.unlink(missing_ok=True)
            deleted = f"; deleted the oldest part, {oldest.name}"
        path = record_part_path(self.path, self.part)
        self._file, self._bytes, self._flushed_s = path.open("w", encoding="utf-8"), 0, time.monotonic()
        log.info("recording goes on in %s (parts of %.0f MiB, the newest %d kept%s)", path, self.part_bytes / 2**20,
                 self.keep_parts, deleted)

    def _close_file(self) -> None:
        if self._file.closed:           # a new part that could not be opened: the error was the hub's already
            return
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as exc:
            if exc.errno != errno.EINVAL:   # EINVAL: a file that cannot sync (a pipe, /dev/null); else the disk failed
                raise
        finally:
            self._file.close()

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
        self._close_file()


def record_part_path(path: str | Path, part: int) -> Path:
    """Part `part` of the recording at `path`: `path` itself for 0, else the number before its suffix."""
    path = Path(path)
    return path if part == 0 else path.with_name(f"{path.stem}.{part}{path.suffix}")


def recording_parts(path: str | Path) -> list[Path]:
    """The parts of the recording at `path` (CommandRecorder) that exist, oldest first."""
    path = Path(path)
    numbered = re.compile(re.escape(path.stem) + r"\.([1-9][0-9]*)" + re.escape(path.suffix))
    parts = {0: path} if path.is_file() else {}
    if path.parent.is_dir():
        for other in path.parent.iterdir():
            if match := numbered.fullmatch(other.name):
                parts[int(match[1])] = other
    return [parts[n] for n in sorted(parts)]


def read_recording(path: str | Path) -> Iterator[dict[str, Any]]:
    """The records of a recording, every part in order; a last line cut short (a killed run) is skipped."""
    for part in recording_parts(path):
        with part.open(encoding="utf-8") as lines:
            for line in lines:
                if line.endswith("\n"):
                    yield json.loads(line)


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


PLOT_TICKS = 30_000          # the period plot's newest ticks (5 min at 100 Hz); older ones are only in the numbers
EXACT_SAMPLES = 10_000       # per quantity: exact percentiles up to this many samples, a histogram's beyond


class TimingStats(Subscriber):
    """Everything `edgeact bench` reports: control periods and overruns, plan rate, stage latencies.

    Every number covers the whole run in bounded memory (a few MB however long it runs), so it may ride along a
    robot's day: counts, means and maxima are exact; percentiles are exact up to EXACT_SAMPLES samples of a
    quantity, beyond that within 0.5 % (`_Series`). The period plot shows the newest `plot_ticks` ticks.
    """

    def __init__(self, target_hz: float, plot_ticks: int = PLOT_TICKS):
        self.target_hz = target_hz
        self.period_s, self.tick_time_s = _Recent(plot_ticks), _Recent(plot_ticks)     # the plot's (and the sheet's)
        self.step_s = _Recent(plot_ticks)                                               # newest samples
        self.period_stats_s, self.period_error_s, self.work_s = _Series(), _Series(), _Series()
        self.state_read_s, self.command_write_s = _Series(), _Series()
        self.frame_to_command_s, self.skipped_actions = _Series(), _Series()
        self.plan_latency_s, self.step_stats_s = _Series(), _Series()
        self.frame_age_s, self.decode_steps = _Series(), _Series()
        self.stage_s: dict[str, _Series] = {}
        self.modes: collections.Counter = collections.Counter()
        self.ticks = self.overruns = self.plans = self.frames = 0
        self._frames_since_first_tick = self._frames_in_ticks = 0     # the camera's rate over the ticks' span
        self.stale_plans = 0            # plans too old on arrival: held, so in neither frame -> command nor the skips
        self.first_tick_s = self.last_tick_s = self.first_plan_s = self.last_plan_s = math.nan
        self.trips: list[dict[str, Any]] = []
        self.stop: dict[str, str] | None = None

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
        self.period_stats_s.append(e.period_s)
        self.period_error_s.append(abs(e.period_s - 1.0 / self.target_hz))
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
        self.decode_steps.append(e.plan.decode_steps)
        for stage, seconds in e.plan.stage_seconds.items():
            self.stage_s.setdefault(stage, _Series()).append(seconds)

    def on_trip(self, e: TripEvent) -> None:
        t = e.trip
        self.trips.append({"reason": t.reason, "safe_state": t.safe_state, "detail": t.detail, "error": t.error})

    def on_stop(self, e: StopEvent) -> None:
        self.stop = {"reason": e.reason, "detail": e.detail}

    # -- results -----------------------------------------------------------------------------
    def stages(self) -> dict[str, _Series]:
        """Stage name -> its seconds, in pipeline order. "capture" is a frame's age when the planner took it;
        then the policy's own stage_seconds; then the control tick's joint read, whole tick, and command write."""
        out = {"capture": self.frame_age_s, **self.stage_s, "state_read": self.state_read_s,
               "control_tick": self.work_s, "command_write": self.command_write_s}
        return {name: series for name, series in out.items() if series}

    def summary(self) -> dict[str, Any]:
        span_s = self.last_tick_s - self.first_tick_s if self.ticks > 1 else math.nan
        plan_span_s = self.last_plan_s - self.first_plan_s if self.plans > 1 else math.nan
        times = np.asarray(self.tick_time_s)
        return {
            "schema": "edgeact.bench/1",
            "duration_s": _num(span_s),
            "control": {
                "target_hz": self.target_hz,
                "achieved_hz": _num((self.ticks - 1) / span_s if self.ticks > 1 else math.nan),
                "ticks": self.ticks,
                "period_ms": _stats_ms(self.period_stats_s),
                "period_error_ms": _stats_ms(self.period_error_s),
                "overruns": self.overruns,
                "overrun_fraction": _num(self.overruns / self.ticks if self.ticks else math.nan),
                "modes": dict(self.modes),
            },
            "policy": {
                "plans": self.plans,
                "plans_per_s": _num((self.plans - 1) / plan_span_s if self.plans > 1 else math.nan),
                "latency_ms": _stats_ms(self.plan_latency_s),
                "step_ms": _stats_ms(self.step_stats_s),
                "decode_steps_mean": _mean(self.decode_steps),
                "skipped_actions_mean": _mean(self.skipped_actions),
                "stale_plans": self.stale_plans,
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
        """Control periods over time (the newest `plot_ticks` ticks) and the stage latencies of the whole run, as one
        PNG (needs matplotlib)."""
        path = Path(path)
        fig = png_figure(path, (10, 7), "the timing plot", "the JSON has the same numbers")
        top, bottom = fig.subplots(2, 1)
        times = np.asarray(self.tick_time_s)
        if times.size:
            top.plot(times - self.first_tick_s, np.asarray(self.period_s) * 1e3, lw=0.6, label="period")
        top.axhline(1e3 / self.target_hz, color="black", ls="--", lw=0.8, label=f"target {self.target_hz:g} Hz")
        shown = f" (the newest {times.size} shown)" if times.size < self.ticks else ""
        top.set(xlabel="time since the first tick (s)", ylabel="control period (ms)",
                title=f"control loop: {self.ticks} ticks{shown}, {self.overruns} overruns")
        top.legend(loc="upper right")
        stages = self.stages()
        if stages:     # boxes from the whole run's percentiles: its samples are not kept
            bottom.bxp([_box_ms(name, series) for name, series in stages.items()])
            bottom.set_yscale("log")
        bottom.set(ylabel="latency per step or tick (ms)",
                   title="stage latencies over the whole run: box p25-p75, whiskers p1-p99, dots min and max")
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


def _mean(series: _Series) -> float | None:
    return _num(series.mean()) if series else None


def _num(value: float) -> float | None:
    return round(float(value), 6) if math.isfinite(value) else None


def _stats_ms(seconds: _Series) -> dict[str, float | None | int]:
    if not seconds:
        return {"n": 0, "p50": None, "p99": None, "max": None, "mean": None}
    p50, p99 = seconds.percentiles([50, 99])
    return {"n": seconds.n, "p50": _num(p50 * 1e3), "p99": _num(p99 * 1e3),
            "max": _num(seconds.max() * 1e3), "mean": _num(seconds.mean() * 1e3)}


def _box_ms(name: str, seconds: _Series) -> dict[str, Any]:
    """A matplotlib `bxp` box from a series' percentiles, in ms."""
    p1, p25, p50, p75, p99 = (v * 1e3 for v in seconds.percentiles([1, 25, 50, 75, 99]))
    return {"label": name, "med": p50, "q1": p25, "q3": p75, "whislo": p1, "whishi": p99,
            "fliers": [seconds.min() * 1e3, seconds.max() * 1e3]}


# -- samples in bounded memory ------------------------------------------------------------------

# Histogram bins for |value| from 1 ns to ~3 h (seconds; counts such as decode steps fit too), each 1 % wider than
# the last: its geometric middle is within 0.5 % of any sample in it. Under 1 ns counts as 0, over the top in the top
# bin (the max is kept exactly). Index order is value order: negatives, zero, positives.
_HIST_LOW, _HIST_HIGH, _HIST_STEP = 1e-9, 1e4, math.log(1.01)
_HIST_BINS = math.ceil(math.log(_HIST_HIGH / _HIST_LOW) / _HIST_STEP)
_HIST_MIDDLES = _HIST_LOW * np.exp((np.arange(_HIST_BINS) + 0.5) * _HIST_STEP)
_HIST_VALUES = np.concatenate([-_HIST_MIDDLES[::-1], [0.0], _HIST_MIDDLES])


def _histogram(values: np.ndarray) -> np.ndarray:
    magnitude = np.abs(values)
    bins = np.floor(np.log(np.maximum(magnitude, _HIST_LOW) / _HIST_LOW) / _HIST_STEP).astype(np.intp)
    np.minimum(bins, _HIST_BINS - 1, out=bins)
    index = np.where(magnitude < _HIST_LOW, _HIST_BINS,
                     np.where(values > 0, _HIST_BINS + 1 + bins, _HIST_BINS - 1 - bins))
    return np.bincount(index, minlength=_HIST_VALUES.size)


class _Series:
    """One quantity's finite samples over a whole run in bounded memory (~130 kB): n, mean, min and max exact;
    percentiles exact while it has at most EXACT_SAMPLES samples, beyond that from a histogram of them all.

    The samples go into a block of EXACT_SAMPLES; a full block is added to the histogram when the next one comes, so
    a short run keeps every sample and a long one allocates nothing more.
    """

    def __init__(self):
        self._block: np.ndarray | None = None
        self._filled = 0
        self._counts: np.ndarray | None = None      # the histogram of the blocks binned so far
        self._binned, self._sum, self._min, self._max = 0, 0.0, math.inf, -math.inf

    @property
    def n(self) -> int:
        return self._binned + self._filled

    def __len__(self) -> int:
        return self.n

    def append(self, value: float) -> None:
        if not math.isfinite(value):
            return
        if self._block is None:
            self._block = np.empty(EXACT_SAMPLES)
        elif self._filled == EXACT_SAMPLES:
            block, self._filled = self._block, 0
            if self._counts is None:
                self._counts = np.zeros(_HIST_VALUES.size, dtype=np.int64)
            self._counts += _histogram(block)
            self._binned += block.size
            self._sum += float(block.sum())
            self._min, self._max = min(self._min, float(block.min())), max(self._max, float(block.max()))
        self._block[self._filled] = value
        self._filled += 1

    def _pending(self) -> np.ndarray:
        return self._block[:self._filled] if self._block is not None else np.empty(0)

    def min(self) -> float:
        pending = self._pending()
        return min(self._min, float(pending.min())) if pending.size else self._min

    def max(self) -> float:
        pending = self._pending()
        return max(self._max, float(pending.max())) if pending.size else self._max

    def mean(self) -> float:
        return (self._sum + float(self._pending().sum())) / self.n if self.n else math.nan

    def percentiles(self, qs: list[float]) -> list[float]:
        """numpy's default (linear) percentiles: exact, or each order statistic from its bin's middle (within 0.5 %)."""
        if self._counts is None:
            return [float(v) for v in np.percentile(self._pending(), qs)]
        counts = self._counts + _histogram(self._pending()) if self._filled else self._counts
        cumulative, low, high = np.cumsum(counts), self.min(), self.max()
        out = []
        for q in qs:
            rank = q / 100 * (self.n - 1)
            below, above = _HIST_VALUES[np.searchsorted(cumulative, [math.floor(rank), math.ceil(rank)], "right")]
            out.append(min(max(float(below + (above - below) * (rank - math.floor(rank))), low), high))
        return out


class _Recent:
    """The newest `size` samples, NaN kept, as an array oldest first (`np.asarray`): what the plots draw."""

    def __init__(self, size: int):
        if size < 1:
            raise ConfigError(f"plot_ticks is {size}; give at least 1 (the period plot's newest ticks)")
        self._values = np.empty(size)
        self._count = 0

    def __len__(self) -> int:
        return min(self._count, self._values.size)

    def append(self, value: float) -> None:
        self._values[self._count % self._values.size] = value
        self._count += 1

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        start = self._count % self._values.size
        values = (self._values[:self._count] if self._count <= self._values.size
                  else np.concatenate([self._values[start:], self._values[:start]]))
        return values.astype(dtype or np.float64, copy=True)
