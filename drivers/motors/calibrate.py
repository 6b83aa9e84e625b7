"""Joint calibration from the motors' own readings: a zero pose and a sweep become `robot.calibration` entries.

No prompts here: `edgeact motors calibrate` (drivers/calibrate_session.py) asks the operator. This module reads
raw positions with torque off, records each joint's sweep, and refuses a joint that did not move or whose
travel crosses its encoder's seam, with the fix.

The entries are in the units the drivers convert (SerialMotion._raw_to_rad, DamiaoBus._to_joint):
    joint rad = (-1 if drive_mode else 1) * (raw - homing_offset) * rad_per_tick
and `send` clamps raw goals to [range_min, range_max]. The raw unit is
    feetech / dynamixel: the present_position register, in encoder ticks of one turn (0..4095 on STS3215 and X);
    damiao-can: the 16-bit MIT position field, 0..65535 over the motor's -PMAX..+PMAX.
So the zero pose's raw reading is the homing offset whatever drive_mode says (drive_mode only flips the sign).
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

from edgeact.drivers.motors.bus import MotorCalibration, MotorsBus
from edgeact.runtime.errors import EdgeactError

SAMPLE_PERIOD_S = 0.02      # 50 Hz: a hand cannot turn a joint half a turn in one period, so a bigger jump is a wrap
MIN_TRAVEL_RAD = 0.05       # about 3 degrees: below this a joint "did not move" (torque-off jitter is a tick or two)
ZERO_SAMPLES = 5            # zero pose: the median of a few reads, so one noisy tick does not become the offset

SERIAL_SEAM_FIX = ("re-mount the horn on the spline, or set the servo's own offset register (homing_offset, in "
                   "its EEPROM; torque off)")
DAMIAO_SEAM_FIX = ("with the joint in the middle of its travel and torque off, set the motor's zero (Damiao's "
                   "set-zero command: DamiaoBus.set_zero_position, or the vendor's tool)")


class CalibrationError(EdgeactError):
    """A sweep that cannot become a calibration (a joint did not move, or crossed the encoder's seam)."""


@dataclass(frozen=True)
class RawField:
    """One motor's raw position: whole numbers 0..size-1, `rad_per_tick` apart; past either end it wraps."""

    size: int
    rad_per_tick: float
    seam_fix: str                   # what moves a joint's travel off the seam, on this kind of motor
    ends_are_limits: bool = False   # Damiao: the field's ends are ±PMAX, where the reading stops being the angle

    def degrees(self, ticks: float) -> float:
        return math.degrees(ticks * self.rad_per_tick)


class RawReader:
    """Raw positions, in the calibration's units, of some motors on a connected bus (serial or Damiao).

    It never writes: the caller turns torque off first. The Damiao field is read from the motor's own
    feedback frame (`last_feedback`), so whatever calibration the bus holds does not enter it."""

    def __init__(self, bus: MotorsBus, names: list[str]):
        from edgeact.drivers.motors.damiao import DamiaoBus
        from edgeact.drivers.motors.serial_bus import SerialMotorsBus

        self.bus, self.names = bus, list(names)
        if isinstance(bus, SerialMotorsBus):
            self.fields = {}
            for name in self.names:
                spec = bus.MODELS[bus.motors[name].model]
                self.fields[name] = RawField(spec.resolution_ticks, spec.rad_per_tick, SERIAL_SEAM_FIX)
            self._read = self._read_serial
        elif isinstance(bus, DamiaoBus):
            from edgeact.drivers.motors import damiao_table as dt

            self.fields = {n: RawField(dt.POSITION_MAX_UINT + 1, bus.model[n].rad_per_tick, DAMIAO_SEAM_FIX, True)
                           for n in self.names}
            self._read = self._read_damiao
        else:
            raise CalibrationError(f"{type(bus).__name__} has no raw position to calibrate from; calibration works "
                                   "on feetech, dynamixel and damiao-can buses")

    def read(self) -> dict[str, int]:
        return self._read()

    def _read_serial(self) -> dict[str, int]:
        return self.bus.sync_read("present_position", self.names)

    def _read_damiao(self) -> dict[str, int]:
        from edgeact.drivers.motors import damiao_table as dt

        # refreshes last_feedback (the motor-frame angle, before calibration); a motor in "communication lost" is
        # torque-free, as calibration wants it
        self.bus.read_state_torque_free(self.names)
        out = {}
        for name in self.names:
            p_max = self.bus.model[name].p_max_rad
            motor_rad = self.bus.last_feedback[name].position_rad
            # the inverse of dt.uint_to_float, which decoded the field: round, not truncate, to get it back exactly
            out[name] = min(max(round((motor_rad + p_max) / (2 * p_max) * dt.POSITION_MAX_UINT), 0), dt.POSITION_MAX_UINT)
        return out


def read_zero_pose(reader: RawReader, samples: int = ZERO_SAMPLES) -> dict[str, int]:
    """Each motor's raw position now: the median of `samples` reads."""
    reads = [reader.read() for _ in range(samples)]
    return {name: round(statistics.median(r[name] for r in reads)) for name in reader.names}


@dataclass
class JointSweep:
    """What one motor's raw position did from the zero pose on: extremes, seam jumps, readings off the field."""

    raw_field: RawField
    zero_raw: int
    low: int = field(init=False)
    high: int = field(init=False)
    current: int = field(init=False)
    samples: int = 0
    seam_jump: tuple[int, int] | None = None    # the first (before, after) pair over half the field apart
    off_field: int | None = None                # the first reading outside 0..size-1 (a motor counting turns)
    at_end: int | None = None                   # Damiao: the first reading at an end of the field (±PMAX)
    _unwrapped: int = field(init=False)         # the position counted across the seam: the travel's real extent
    _unwrapped_low: int = field(init=False)
    _unwrapped_high: int = field(init=False)

    def __post_init__(self) -> None:
        self.low = self.high = self.current = self.zero_raw
        self._unwrapped = self._unwrapped_low = self._unwrapped_high = self.zero_raw

    def add(self, raw: int) -> None:
        size = self.raw_field.size
        step = raw - self.current
        if abs(step) > size // 2 and self.seam_jump is None:
            self.seam_jump = (self.current, raw)
        if not 0 <= raw < size and self.off_field is None:
            self.off_field = raw
        if self.raw_field.ends_are_limits and raw in (0, size - 1) and self.at_end is None:
            self.at_end = raw
        self._unwrapped += (step + size // 2) % size - size // 2     # the short way round
        self._unwrapped_low = min(self._unwrapped_low, self._unwrapped)
        self._unwrapped_high = max(self._unwrapped_high, self._unwrapped)
        self.low, self.high, self.current = min(self.low, raw), max(self.high, raw), raw
        self.samples += 1

    @property
    def travel_ticks(self) -> int:
        return self._unwrapped_high - self._unwrapped_low

    def problem(self, name: str, min_travel_rad: float = MIN_TRAVEL_RAD) -> str | None:
        """Why this sweep cannot be a calibration, with the fix; None when it can."""
        f, size = self.raw_field, self.raw_field.size
        if self.seam_jump is not None or self.off_field is not None or self.at_end is not None:
            if self.at_end is not None:
                how = (f"read {self.at_end}, the end of the MIT position field (the motor's angle reached "
                       f"{'-' if self.at_end == 0 else '+'}PMAX, where the field stops following it)")
            elif self.seam_jump is not None:
                before, after = self.seam_jump
                how = (f"jumped from raw {before} to {after} between two samples, more than half a turn: the "
                       f"reading wrapped past 0/{size - 1}")
            else:
                how = f"read raw {self.off_field}, outside one turn (0..{size - 1}): the motor counts turns past the seam"
            middle = ((self._unwrapped_low + self._unwrapped_high) // 2) % size
            return (f"motor '{name}' crossed the encoder's seam ({how}); one calibrated range cannot hold a travel "
                    f"across it. Fix: {f.seam_fix}, so that the whole travel reads inside 0..{size - 1} (the "
                    f"middle of this travel reads raw {middle} now; about {size // 2} is best), then calibrate again")
        if self.travel_ticks * f.rad_per_tick < min_travel_rad:
            return (f"motor '{name}' did not move (travel {self.travel_ticks} ticks, {f.degrees(self.travel_ticks):.1f}"
                    f" degrees); move it through its range, end to end, in step 2")
        return None

    def near_seam(self, margin_rad: float = MIN_TRAVEL_RAD) -> bool:
        """The range ends within `margin_rad` of the field's end: a sag past it would read as the far end."""
        margin = margin_rad / self.raw_field.rad_per_tick
        return self.low < margin or self.high > self.raw_field.size - 1 - margin

    def calibration(self, drive_mode: int = 0) -> MotorCalibration:
        """Zero pose -> homing_offset (it reads 0 rad there in either direction); extremes -> the range."""
        return MotorCalibration(homing_offset=self.zero_raw, range_min=self.low, range_max=self.high,
                                drive_mode=drive_mode)


def sample_sweeps(reader: RawReader, sweeps: dict[str, JointSweep], stop: Callable[[], bool],
                  period_s: float = SAMPLE_PERIOD_S,
                  on_sample: Callable[[dict[str, JointSweep]], None] | None = None) -> int:
    """Read every motor each period until `stop()` says so; returns the samples taken.

    Paced on perf_counter; a read that overruns the period is followed at once (no catching up)."""
    taken, next_s = 0, time.perf_counter()
    while not stop():
        for name, raw in reader.read().items():
            sweeps[name].add(raw)
        taken += 1
        if on_sample is not None:
            on_sample(sweeps)
        next_s += period_s
        delay = next_s - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        else:
            next_s = time.perf_counter()
    return taken


def calibrations(sweeps: dict[str, JointSweep], drive_modes: dict[str, int] | None = None,
                 min_travel_rad: float = MIN_TRAVEL_RAD) -> dict[str, MotorCalibration]:
    """Every sweep's calibration, or one CalibrationError naming every joint that cannot have one."""
    problems = [p for name, sweep in sweeps.items() if (p := sweep.problem(name, min_travel_rad)) is not None]
    if problems:
        raise CalibrationError("; ".join(problems) + "; nothing was written")
    return {name: sweep.calibration((drive_modes or {}).get(name, 0)) for name, sweep in sweeps.items()}
