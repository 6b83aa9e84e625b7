"""Named-motor half of SerialMotorsBus: registers by name, torque, state, goals, raw<->rad and the safe stop."""
from __future__ import annotations

import logging
import math
import time

from edgeact.drivers.motors.bus import START_TOLERANCE_RAD, MotorBusError, MotorCalibration, MotorState
from edgeact.drivers.motors.serial_types import (WATCHDOG_UNIT_S, ModelSpec, MotorConfigError, MotorPortError,
                                                 Register)

log = logging.getLogger(__name__)
WATCHDOG_TRIPPED = -1    # bus_watchdog reads 0xFF once it stopped the motor
POSITION_LIMITS = ("min_position_limit", "max_position_limit")   # a joint's own limits (EEPROM), raw ticks
VENDOR_TOOL = {"dynamixel": "Dynamixel Wizard", "feetech": "Feetech's FD"}


def check_calibration(spec: ModelSpec, calibration: MotorCalibration, name: str) -> None:
    """What a valid calibration entry of a single-turn serial servo is; MotorConfigError with the fix if not.

    Raw readings are used as the servo reports them, never unwrapped: every raw value (homing_offset,
    range_min, range_max) must be one the encoder can read, 0..resolution-1 (0..4095 on 12-bit models),
    with range_min < range_max, and drive_mode 0 or 1. A joint whose travel crosses the encoder's seam
    (4095 -> 0) has no such range: a reading just past the seam would be taken a whole turn away."""
    top = spec.resolution_ticks - 1
    where = f"motor '{name}' ({spec.name}, raw positions 0..{top})"
    if calibration.drive_mode not in (0, 1):
        raise MotorConfigError(f"{where}: calibration drive_mode {calibration.drive_mode} invalid; use 0 (raw grows "
                               "with the joint angle) or 1 (inverted)")
    seam = (f"raw readings are single-turn and never unwrapped, so a joint whose travel crosses the encoder's "
            f"{top} -> 0 seam cannot be calibrated as is: re-mount its horn so the whole travel reads inside "
            f"0..{top} (mid-travel near {spec.resolution_ticks // 2}), or write the servo's own homing offset "
            "register so it does; then measure the calibration again with torque off")
    if not 0 <= calibration.range_min < calibration.range_max <= top:
        raise MotorConfigError(f"{where}: calibration range [{calibration.range_min}, {calibration.range_max}] "
                               f"must lie within 0..{top} with range_min < range_max; {seam}")
    if not 0 <= calibration.homing_offset <= top:
        raise MotorConfigError(f"{where}: calibration homing_offset {calibration.homing_offset} (the raw reading at "
                               f"the joint's zero) must lie within 0..{top}; {seam}")


class SerialMotion:
    """The MotorsBus calls on the config's named motors; a mixin of SerialMotorsBus, useless alone.

    Every byte goes through the host bus's bounded exchanges (`_exchange`, `_sync_read_bytes`) and
    id-level register access (`read_register`, `write_register`) under its lock, and names resolve
    through its `_motor` / `_names`, so the port, its retries and its errors live in one place.
    """

    # -- registers by name ---------------------------------------------------------------------
    def read(self, register: str, motor: str) -> int:
        m, spec = self._motor(motor)
        return self.read_register(m.id, register, spec)

    def write(self, register: str, motor: str, value: int) -> None:
        m, spec = self._motor(motor)
        if register == "velocity_limit":
            self._forget_velocity_limits([motor])
        self.write_register(m.id, register, value, spec)
        if register in POSITION_LIMITS:
            self._read_position_limits([motor])   # send's clamp follows at once (torque is off: EEPROM)

    def reg_write(self, register: str, motor: str, value: int) -> None:
        """Stage a RAM write that takes effect at `action()`: many motors start at one instant."""
        m, spec = self._motor(motor)
        reg = self._ram_register(spec, register)
        self._exchange(self.codec.write(m.id, reg.address, reg.encode(value), self.codec.REG_WRITE), [m.id], 0)

    def action(self) -> None:
        self._exchange(self.codec.packet(self.codec.broadcast_id, self.codec.ACTION), [], 0)

    def sync_read(self, register: str, motors: list[str] | None = None) -> dict[str, int]:
        return self._sync_read_registers([register], self._names(motors))[register]

    def sync_write(self, register: str, values: dict[str, int]) -> None:
        data, layout = {}, None
        for name, value in values.items():
            motor, spec = self._motor(name)
            layout = self._same_layout(layout, self._ram_register(spec, register))
            data[motor.id] = layout.encode(value)
        if data:
            self._exchange(self.codec.sync_write(layout.address, layout.size, data), [], 0)

    @staticmethod
    def _ram_register(spec: ModelSpec, register: str) -> Register:
        reg = spec.register(register)
        if reg.read_only or reg.eeprom:
            raise MotorBusError(f"register '{register}' is {'read-only' if reg.read_only else 'in EEPROM'}; "
                                "write EEPROM one motor at a time with write() and torque off")
        return reg

    @staticmethod
    def _same_layout(layout: Register | None, reg: Register) -> Register:
        if layout is not None and (layout.address, layout.size) != (reg.address, reg.size):
            raise MotorBusError(f"register '{reg.name}' sits at different addresses on this bus's models; "
                                "access it motor by motor")
        return reg

    def _sync_read_registers(self, registers: list[str], names: list[str],
                             check_errors: bool = True) -> dict[str, dict[str, int]]:
        """Several registers of several motors in one transaction over the span that covers them."""
        out: dict[str, dict[str, int]] = {r: {} for r in registers}
        if not names:
            return out
        layouts: list[Register | None] = [None] * len(registers)
        for name in names:
            spec = self._motor(name)[1]
            layouts = [self._same_layout(lay, spec.register(r)) for lay, r in zip(layouts, registers, strict=True)]
        start = min(reg.address for reg in layouts)
        size = max(reg.address + reg.size for reg in layouts) - start
        ids = [self.motors[n].id for n in names]
        raw = self._sync_read_bytes(start, size, ids, check_errors)
        for name, motor_id in zip(names, ids, strict=True):
            for reg in layouts:
                out[reg.name][name] = reg.decode(raw[motor_id][reg.address - start:])
        return out

    # -- torque and motion -------------------------------------------------------------------
    def enable_torque(self, motors: list[str] | None = None) -> None:
        names = self._names(motors)
        units = self.config.bus_watchdog_units
        with self._lock:
            if units:  # a tripped watchdog refuses goals: clear it so the hold below takes
                self.sync_write("bus_watchdog", dict.fromkeys(names, 0))
            else:
                self._clear_a_tripped_watchdog(names)
            # EEPROM may have changed while torque was off; once torque is on it cannot.
            self._forget_velocity_limits(names)
            known = {n: self._position_limit_raw.get(n) for n in names}
            for name, words in self._read_position_limits(names).items():
                if self._position_limit_raw.get(name) != known[name]:
                    log.warning("%s", words)      # changed since connect (which said it of the others)
            # A stale goal would make the joint jump the instant torque comes on: hold where the joints are.
            held = self._hold_in_place(names, arming=True)
            self._expect_goals(held)
            self.sync_write("torque_enable", dict.fromkeys(names, 1))
            self._expect_torque(names, True)
            if units:
                self.sync_write("bus_watchdog", dict.fromkeys(names, units))
                self._watchdog_fed_s.update(dict.fromkeys(names, time.monotonic()))

    def _clear_a_tripped_watchdog(self, names: list[str]) -> None:
        """Without a bus watchdog of our own: one an earlier run or tool armed may have tripped (register 98 reads
        0xFF), and a tripped motor refuses every goal, the holding one too. Cleared, and said; one left armed but
        not tripped is left as it is (it is not ours)."""
        tripped = self._tripped_watchdogs([n for n in names if "bus_watchdog" in self._motor(n)[1].registers])
        if tripped:
            log.warning("the bus watchdog of %s had stopped it (armed by an earlier run or tool, which then fell "
                        "silent); clearing it so the motor takes goals again", ", ".join(tripped))
            self.sync_write("bus_watchdog", dict.fromkeys(tripped, 0))

    def _tripped_watchdogs(self, names: list[str]) -> list[str]:
        """Those of `names` whose bus watchdog stopped them (register 98 reads 0xFF): one sync read."""
        if not names:
            return []
        return [n for n, v in self.sync_read("bus_watchdog", names).items() if v == WATCHDOG_TRIPPED]

    def _write_goals(self, register: str, raws: dict[str, int]) -> None:
        """Goals in one sync write, after re-arming motors whose bus watchdog may have tripped meanwhile.

        A sync write gets no status packet, so a tripped motor's Data Range Error is never heard: after a
        silence toward a motor longer than half its watchdog time, read register 98 first, and clear and
        re-arm those reading 0xFF, so this write is not dropped."""
        units = self.config.bus_watchdog_units
        if not units:
            self.sync_write(register, raws)
            return
        with self._lock:
            now = time.monotonic()
            stale = [n for n in raws if now - self._watchdog_fed_s.get(n, now) > units * WATCHDOG_UNIT_S / 2]
            tripped = self._tripped_watchdogs(stale)
            if tripped:
                log.warning("bus watchdog stopped %s (the host was silent over %.2f s); clearing and "
                            "re-arming it", ", ".join(tripped), units * WATCHDOG_UNIT_S)
                self.sync_write("bus_watchdog", dict.fromkeys(tripped, 0))
                self.sync_write("bus_watchdog", dict.fromkeys(tripped, units))
            self.sync_write(register, raws)
            self._watchdog_fed_s.update(dict.fromkeys(raws, time.monotonic()))

    def disable_torque(self, motors: list[str] | None = None) -> None:
        names = self._names(motors)
        with self._lock:
            self._forget_velocity_limits(names)   # with torque off, EEPROM (Velocity Limit) may be written
            # Goals to where the joints are first, torque still on (they hold, nothing moves): no stale goal is
            # left for the next enable, and no goal is written after the torque off, which some servo firmwares
            # take as "torque on".
            try:
                self._hold_in_place(names)
            except MotorPortError:
                raise
            except MotorBusError:
                # A silent or faulted motor spoils the group read; the others must still go limp (the e-stop's and
                # the watchdog's torque_off): torque off by broadcast, unanswered, then the error naming the motor.
                self.sync_write("torque_enable", dict.fromkeys(names, 0))
                raise
            self.sync_write("torque_enable", dict.fromkeys(names, 0))
            self._expect_torque(names, False)

    def _hold_in_place(self, names: list[str], check_errors: bool = True, *, arming: bool = False) -> dict[str, int]:
        """Goals to the joints' present positions, wheels to 0; returns the goals written.

        `arming` (torque is about to come on): a Dynamixel counts whole turns while its torque is off, and resets
        Present Position to within one turn the instant torque comes on in position mode. A joint turned by hand
        past the encoder's seam reads a turn away (5000 for 904): as a goal that reading is refused (beyond
        Max Position Limit), and the joint would jump to its older goal. The reading within one turn is the
        same shaft angle, and where Present Position will be once torque is on: hold there. Only motors whose
        torque is off: with torque on the reading is the motor's own, and a joint holding at 0 may read -1."""
        joints = [n for n in names if self.motors[n].mode == "position"]
        present = {}
        if joints:
            registers = ["present_position", "torque_enable"] if arming else ["present_position"]
            got = self._sync_read_registers(registers, joints, check_errors)
            present = got["present_position"]
            if arming:
                present = {n: raw if got["torque_enable"][n] else raw % self._motor(n)[1].resolution_ticks
                           for n, raw in present.items()}
            self.sync_write("goal_position", present)
        self._stop_wheels(names)
        return present

    def _expect_goals(self, goals: dict[str, int]) -> None:
        """Refuse torque on where a holding goal did not take: a sync write gets no answer, so a goal the motor
        refused (a Dynamixel's Data Limit Error: outside its Min/Max Position Limit registers) would go unheard,
        and the joint would jump to its older goal the instant torque came on."""
        if not goals:
            return
        got = self._sync_read_registers(["goal_position"], list(goals))["goal_position"]
        wrong = [n for n in goals if got[n] != goals[n]]
        # A Feetech takes a goal beyond them and clamps it: at torque on the joint would drive to the limit. A tick or
        # two past (a joint resting on its end stop; the safety layer's start tolerance) is walked back in, as before.
        beyond = {}
        for n in goals:
            if n in wrong or n not in self._position_limit_raw:
                continue
            (lo, hi), slack = self._position_limit_raw[n], START_TOLERANCE_RAD / self._motor(n)[1].rad_per_tick
            if not lo - slack <= goals[n] <= hi + slack:
                beyond[n] = (lo, hi)
        if beyond and not wrong:
            raise MotorBusError(
                f"{self.describe_ids([self.motors[n].id for n in beyond])} would move the instant torque came on ("
                + ", ".join(f"'{n}' reads {goals[n]}, beyond its position limit registers [{lo}, {hi}]"
                            + (" and its calibrated range" if self._limits_cover_calibration(n) else "")
                            for n, (lo, hi) in beyond.items())
                + "): the motor clamps the holding goal to them and drives there at full speed, so torque stays off. "
                "Turn the joint back within them by hand"
                + ("" if all(self._limits_cover_calibration(n) for n in beyond) else
                   ", or widen them (with torque off) to cover the calibrated range"))
        if wrong:
            raise MotorBusError(
                f"{self.describe_ids([self.motors[n].id for n in wrong])} did not take the goal of holding where "
                f"{'they are' if len(wrong) > 1 else 'it is'} ("
                + ", ".join(f"'{n}' reads {goals[n]}, goal stays {got[n]}" for n in wrong)
                + "); torque stays off, so nothing jumps to the older goal. A motor refuses a goal outside its own "
                "position limit registers (min/max_position_limit): turn the joint back within them by hand, or "
                "widen them (with torque off) to cover the calibrated range")

    def _limits_cover_calibration(self, name: str) -> bool:
        """Whether the joint's limit registers (cached) hold its whole calibrated range."""
        cal, limits = self.calibration.get(name), self._position_limit_raw.get(name)
        return cal is not None and limits is not None and limits[0] <= cal.range_min and cal.range_max <= limits[1]

    def _stop_wheels(self, names: list[str]) -> None:
        self.sync_write("goal_velocity", {n: 0 for n in names if self.motors[n].mode == "velocity"})

    def _expect_torque(self, names: list[str], on: bool, check_errors: bool = True) -> None:
        got = self._sync_read_registers(["torque_enable"], names, check_errors)["torque_enable"]
        wrong = [self.motors[n].id for n in names if bool(got[n]) != on]
        if wrong:
            raise MotorBusError(f"{self.describe_ids(wrong)} still {'without' if on else 'with'} torque after the "
                                "write; check the motor's error state and power")

    def read_state(self, motors: list[str] | None = None) -> MotorState:
        names = self._names(motors)
        raw = self._sync_read_registers(["present_position", "present_velocity"], names)
        state = MotorState(timestamp_s=time.monotonic())
        for name in names:
            spec = self._motor(name)[1]
            state.position_rad[name] = self._raw_to_rad(name, raw["present_position"][name])
            state.velocity_rad_s[name] = self._sign(name) * raw["present_velocity"][name] * spec.velocity_unit_rad_s
        return state

    def send(self, goal_position_rad: dict[str, float], origin_rad: dict[str, float] | None = None) -> dict[str, float]:
        raws, sent = {}, {}
        for name, rad in goal_position_rad.items():
            motor, _ = self._motor(name)
            if motor.mode != "position":
                raise MotorBusError(f"motor '{name}' is a wheel (velocity mode); drive it with send_velocity")
            if not math.isfinite(rad):
                raise MotorBusError(f"goal for motor '{name}' is {rad}; refusing to send a non-finite position")
            raws[name] = self._rad_to_raw(name, rad, (origin_rad or {}).get(name))
            sent[name] = self._raw_to_rad(name, raws[name])
        self._write_goals("goal_position", raws)
        return sent

    def send_velocity(self, goal_velocity_rad_s: dict[str, float]) -> dict[str, float]:
        """Wheel speeds in one transaction, clamped to each motor's top speed; returns what was sent."""
        for name, rad_s in goal_velocity_rad_s.items():
            motor, _ = self._motor(name)
            if motor.mode != "velocity":
                raise MotorBusError(f"motor '{name}' is a joint (position mode); drive it with send")
            if not math.isfinite(rad_s):
                raise MotorBusError(f"velocity for motor '{name}' is {rad_s}; refusing to send it")
        raws, sent = {}, {}
        with self._lock:
            limits = self._velocity_limits(list(goal_velocity_rad_s))
            for name, rad_s in goal_velocity_rad_s.items():
                spec = self._motor(name)[1]
                raw = round(self._sign(name) * rad_s / spec.velocity_unit_rad_s)
                raws[name] = max(-limits[name], min(limits[name], raw))
                sent[name] = self._sign(name) * raws[name] * spec.velocity_unit_rad_s
            self._write_goals("goal_velocity", raws)
        return sent

    def _velocity_limits(self, names: list[str]) -> dict[str, int]:
        """Each wheel's top speed in raw units: its Velocity Limit register where the model has one, else the model's.

        A Dynamixel refuses a Goal Velocity beyond its Velocity Limit(44) (Data Limit Error), and in a sync write
        nobody hears it: the wheel would keep its older speed. The register is EEPROM, so it holds while torque is
        on: read once, and again after the torque was off (enable_torque / disable_torque forget it)."""
        cache = self._velocity_limit_raw
        missing = [n for n in names if n not in cache and "velocity_limit" in self._motor(n)[1].registers]
        if missing:
            cache.update(self._sync_read_registers(["velocity_limit"], missing)["velocity_limit"])
        return {n: cache[n] if n in cache else self._motor(n)[1].max_velocity_raw for n in names}

    def _forget_velocity_limits(self, names: list[str]) -> None:
        for name in names:
            self._velocity_limit_raw.pop(name, None)

    def _sign(self, name: str) -> float:
        return -1.0 if self.calibration.get(name, MotorCalibration()).drive_mode else 1.0

    def _raw_to_rad(self, name: str, raw: int) -> float:
        cal = self.calibration.get(name, MotorCalibration())
        return self._sign(name) * (raw - cal.homing_offset) * self._motor(name)[1].rad_per_tick

    def _rad_to_raw(self, name: str, rad: float, origin_rad: float | None = None) -> int:
        """Raw goal, clamped to the calibrated range widened to the origin (see MotorsBus.send), then to the motor's
        own position limit registers (cached): a Dynamixel refuses a goal beyond them (in a sync write, unheard) and
        a Feetech clamps it, so the goal sent is the one the motor takes."""
        cal = self.calibration.get(name, MotorCalibration())
        lo, hi = cal.range_min, cal.range_max
        if origin_rad is not None and math.isfinite(origin_rad):
            origin = self._unclamped_raw(name, origin_rad)
            lo, hi = min(lo, origin), max(hi, origin)
        raw = min(max(self._unclamped_raw(name, rad), lo), hi)
        limits = self._position_limit_raw.get(name)
        return raw if limits is None else min(max(raw, limits[0]), limits[1])

    def _read_position_limits(self, names: list[str]) -> dict[str, str]:
        """Read (one sync read) and cache the Min/Max Position Limit registers of the position-mode `names`; returns
        {joint: the words saying so} for each calibrated joint whose registers are narrower than its calibrated range.

        A pair with min >= max sets no limit on a Feetech (its 0/0; the simulated Feetech clamps only where min < max);
        a Dynamixel refuses every goal outside it, so there it allows none: said, not cached (no clamp can help).
        EEPROM: they hold while torque is on, so connect, enable_torque and write() read them, never send."""
        joints = [n for n in names if self.motors[n].mode == "position"
                  and all(r in self._motor(n)[1].registers for r in POSITION_LIMITS)]
        got = self._sync_read_registers(list(POSITION_LIMITS), joints) if joints else {}
        narrow = {}
        for name in names:
            self._position_limit_raw.pop(name, None)
            if name not in joints:
                continue
            low, high = (got[r][name] for r in POSITION_LIMITS)
            if low >= high:
                if self.codec.name == "dynamixel":
                    narrow[name] = (f"{self.describe_ids([self.motors[name].id])}: its position limit registers are "
                                    f"min {low} >= max {high}, so it refuses every goal (Data Limit Error): set "
                                    "min_position_limit below max_position_limit, around the calibrated range, with "
                                    "torque off (e.g. Dynamixel Wizard)")
                continue
            self._position_limit_raw[name] = (low, high)
            cal = self.calibration.get(name)
            if cal is not None and (low > cal.range_min or high < cal.range_max):
                narrow[name] = self._narrow_limits_words(name, cal, low, high)
        return narrow

    def _narrow_limits_words(self, name: str, cal: MotorCalibration, low: int, high: int) -> str:
        lo, hi = max(low, cal.range_min), min(high, cal.range_max)
        clamp = (f"goals are clamped to [{lo}, {hi}]" if lo <= hi else
                 "the two do not overlap: every goal is sent to the registers' end nearest the range")
        return (f"{self.describe_ids([self.motors[name].id])}: its own position limit registers allow raw [{low}, "
                f"{high}], narrower than its calibrated range [{cal.range_min}, {cal.range_max}] (robot.calibration); "
                f"the motor refuses or clamps a goal beyond them, so {clamp}. To reach the whole range, widen them "
                f"(min_position_limit / max_position_limit, with torque off, e.g. with "
                f"{VENDOR_TOOL.get(self.codec.name, 'the vendor tool')}), or narrow robot.calibration's range_min / "
                "range_max to them")

    def _unclamped_raw(self, name: str, rad: float) -> int:
        cal = self.calibration.get(name, MotorCalibration())
        return round(cal.homing_offset + self._sign(name) * rad / self._motor(name)[1].rad_per_tick)

    def position_limits_rad(self, name: str) -> tuple[float, float]:
        """(low, high) joint angle `send` clamps to: the calibrated range (the whole turn without a calibration).
        Once connected, `send` also keeps within the motor's own position limit registers (connect warns where
        those are narrower); the range told here stays the calibrated one, as before connect."""
        cal = self.calibration.get(name, MotorCalibration())
        ends = (self._raw_to_rad(name, cal.range_min), self._raw_to_rad(name, cal.range_max))
        return min(ends), max(ends)

    # -- the safe stop (disconnect turns torque off through it) -------------------------------
    def _safe_stop(self) -> list[str]:
        """Best effort on the way out: wheels to 0, torque off, goals to present. Returns what failed."""
        names = list(self.motors)
        try:
            self._stop_wheels(names)
            self.sync_write("torque_enable", dict.fromkeys(names, 0))   # broadcasts: no reply to lose
            self._settle(names)
            return []
        except MotorPortError as exc:
            return [f"the port vanished before torque could be turned off ({exc})"]
        except MotorBusError:
            pass  # a silent or garbled motor spoils the group read: go one by one so the others settle
        failures = []
        for name in names:
            try:
                self._settle([name])
            except MotorBusError as exc:
                failures.append(f"could not confirm torque off ({exc})")
        return failures

    def _settle(self, names: list[str]) -> None:
        self._expect_torque(names, False, check_errors=False)
        self._hold_in_place(names, check_errors=False)
        # The goal write came after the torque off (which had to go first, unanswered): torque off once more and
        # checked, should a firmware have taken the goal as "torque on".
        self.sync_write("torque_enable", dict.fromkeys(names, 0))
        self._expect_torque(names, False, check_errors=False)
