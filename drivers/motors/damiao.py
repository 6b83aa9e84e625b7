"""Damiao motors (DM4310, DM4340, DM8009 ...) in MIT mode over CAN: a MotorsBus on python-can.

Wiring and set-up (Linux SocketCAN, 1 Mbit/s is the motors' factory rate):
    sudo ip link set can0 up type can bitrate 1000000
    candump can0          # (can-utils) motors answer every frame; silence means power/wiring/termination
Each motor has two ids: ESC_ID (register 8, `Motor.id`), where commands go, and MST_ID (register 7,
the "feedback id"), where it answers. This bus assumes MST_ID = ESC_ID + 0x10 unless told otherwise
(`DamiaoBusConfig.feedback_ids`); `connect()` checks both ids, the MIT control mode, and that the
motor's PMAX/VMAX/TMAX match its model in `damiao_table`, and says how to fix a mismatch.

Every exchange is one request, one reply: commands are sent to all motors first, then replies are
collected until a deadline; missing motors get a bounded number of resends, then MotorTimeoutError.
Positions use the calibration's raw unit = the 16-bit MIT position field (see `DamiaoModel.rad_per_tick`);
without a calibration a joint's angle is the motor's own angle.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field

from edgeact.drivers.motors import damiao_table as dt
from edgeact.drivers.motors.bus import (Motor, MotorBusError, MotorCalibration, MotorHardwareError, MotorsBus,
                                        MotorState, MotorTimeoutError, bus_watchdog_units)
from edgeact.drivers.motors.can_bus import CanConfig, CanLink, is_plain_data_frame
from edgeact.runtime.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_FEEDBACK_OFFSET = 0x10
SCAN_IDS = range(1, 0x20)


@dataclass
class DamiaoBusConfig:
    interface: str = "socketcan"                                    # "virtual" in tests
    channel: str = "can0"
    bitrate: int = 1_000_000
    feedback_ids: dict[str, int] = field(default_factory=dict)      # MST_ID per motor; default id + 0x10
    kp: float = 20.0                                                # MIT stiffness of `send` (Nm/rad)
    kd: float = 1.0                                                 # MIT damping of `send` (Nm s/rad)
    gains: dict[str, tuple[float, float]] = field(default_factory=dict)   # per-motor (kp, kd) overrides
    velocity_kd: float = 1.0                                        # damping gain of `send_velocity`
    timeout_s: float = 0.02                                         # per try; a motor answers in < 1 ms
    retries: int = 2                                                # resends to a silent motor before giving up
    check_on_connect: bool = True
    # The motors' own command timeout (register TIMEOUT, 50 µs units), written by enable_torque: a motor
    # that hears no command for this long turns torque off by itself ("communication lost"), so a host
    # that dies (SIGKILL, segfault, OOM) cannot leave wheels driving. None or 0: the motors' setting is
    # left as it is. Set it a few control periods above the loop's worst pause (0.1-0.2 s at 100 Hz).
    bus_watchdog_s: float | None = None

    def __post_init__(self):
        CanConfig(self.interface, self.channel, self.bitrate)     # validates them
        for name, (kp, kd) in [("default", (self.kp, self.kd)), *self.gains.items()]:
            if not (0.0 <= kp <= dt.KP_MAX and 0.0 <= kd <= dt.KD_MAX):
                raise ConfigError(f"gains of {name!r} (kp={kp}, kd={kd}) out of range; "
                                  f"MIT mode takes kp in 0..{dt.KP_MAX:g} and kd in 0..{dt.KD_MAX:g}")
        if not 0.0 <= self.velocity_kd <= dt.KD_MAX:
            raise ConfigError(f"velocity_kd must be in 0..{dt.KD_MAX:g}, got {self.velocity_kd}")
        if not 0.0 < self.timeout_s <= 1.0:
            raise ConfigError(f"timeout_s must be in (0, 1] s, got {self.timeout_s}")
        if not 0 <= self.retries <= 10:
            raise ConfigError(f"retries must be in 0..10, got {self.retries}")
        self._timeout_units = bus_watchdog_units(self.bus_watchdog_s, dt.TIMEOUT_UNIT_S, dt.TIMEOUT_MAX_UNITS,
                                                 off="the motors' own TIMEOUT setting is kept")

    @property
    def timeout_units(self) -> int:
        """bus_watchdog_s in the TIMEOUT register's 50 µs units (0: leave the motors' setting)."""
        return self._timeout_units

    @property
    def can_config(self) -> CanConfig:
        return CanConfig(self.interface, self.channel, self.bitrate)


def _label(name: str, motor: Motor) -> str:
    return f"motor {name!r} (CAN id 0x{motor.id:02X})"


class DamiaoBus(MotorsBus):
    """Damiao motors on one CAN bus, commanded in MIT mode; thread-safe (one exchange at a time)."""

    def __init__(self, motors: dict[str, Motor], calibration: dict[str, MotorCalibration] | None = None,
                 disable_torque_on_exit: bool = True, config: DamiaoBusConfig | None = None):
        super().__init__(motors, calibration, disable_torque_on_exit)
        self.config = config or DamiaoBusConfig()
        self.model = {name: dt.model(m.model) for name, m in self.motors.items()}
        self.feedback_id = {name: self.config.feedback_ids.get(name, m.id + DEFAULT_FEEDBACK_OFFSET)
                            for name, m in self.motors.items()}
        self._validate()
        self.last_feedback: dict[str, dt.DamiaoFeedback] = {}    # motor frame, from any reply
        self.ignored_frames = 0         # garbage, foreign or unparseable frames seen and dropped
        self._link = CanLink(self.config.can_config)
        self._lock = threading.RLock()

    def _validate(self) -> None:
        cfg = self.config
        for what, names in (("feedback_ids", cfg.feedback_ids), ("gains", cfg.gains), ("calibration", self.calibration)):
            unknown = sorted(set(names) - set(self.motors))
            if unknown:
                raise ConfigError(f"{what} names unknown motors {unknown}; motors are {sorted(self.motors)}")
        esc_ids, routes = {}, {}
        for name, m in self.motors.items():
            if m.mode not in ("position", "velocity"):
                raise ConfigError(f"motor {name!r} has mode {m.mode!r}; use 'position' or 'velocity'")
            fb = self.feedback_id[name]
            if not (1 <= m.id < dt.PARAM_CAN_ID and 0 <= fb < dt.PARAM_CAN_ID):
                raise ConfigError(f"{_label(name, m)}: ids must be 11-bit and not 0x7FF (feedback id 0x{fb:X})")
            if m.id in esc_ids:
                raise ConfigError(f"motors {esc_ids[m.id]!r} and {name!r} share CAN id 0x{m.id:02X}; give each its own ESC_ID")
            esc_ids[m.id] = name
            route = (fb, m.id & 0xF)    # feedback frames carry only the low nibble of ESC_ID
            if route in routes:
                raise ConfigError(f"motors {routes[route]!r} and {name!r} answer on feedback id 0x{fb:X} with the "
                                  "same low id nibble, so their replies cannot be told apart; give them distinct MST_IDs")
            routes[route] = name
        for name, fb in self.feedback_id.items():
            if fb in esc_ids:     # that motor would take another motor's feedback as a command
                raise ConfigError(f"feedback id 0x{fb:X} of {name!r} is the CAN id of motor {esc_ids[fb]!r}; "
                                  "feedback ids (MST_ID) must differ from every command id (ESC_ID)")
        for name, cal in self.calibration.items():
            # A partial calibration is refused rather than completed: MotorCalibration's defaults are serial
            # ticks (zero 0, range 0..4095), which here would put joint zero at -PMAX inside a ~1.6 rad window
            # at the end of the motor's travel. Completing it with Damiao defaults (zero at the motor's zero,
            # range the whole ±PMAX) would be safe to start, but would silently drop the joint's range limits
            # that whoever wrote homing_offset most likely meant to give: the person must say.
            missing = [f for f in cal.unset_fields() if f != "drive_mode"]     # drive_mode 0 is right on any bus
            if missing:
                mid = dt.POSITION_MAX_UINT // 2
                raise ConfigError(
                    f"calibration of {name!r} lacks {', '.join(missing)}: a Damiao calibration needs homing_offset, "
                    f"range_min and range_max in the 16-bit MIT position unit (0..{dt.POSITION_MAX_UINT}; the serial "
                    f"defaults would put the joint's zero at -PMAX); give all three, e.g. homing_offset: {mid} "
                    f"(the motor's own zero), range_min: 0, range_max: {dt.POSITION_MAX_UINT} (the whole ±PMAX), "
                    "or remove the calibration entry")
            if not 0 <= cal.range_min < cal.range_max <= dt.POSITION_MAX_UINT:
                raise ConfigError(f"calibration of {name!r} has range {cal.range_min}..{cal.range_max}; Damiao raw "
                                  f"positions are the 16-bit MIT field, 0..{dt.POSITION_MAX_UINT}, with min < max")

    # -- life ------------------------------------------------------------------------
    @property
    def is_connected(self) -> bool:
        return self._link.is_open

    def connect(self) -> None:
        with self._lock:
            if self._link.is_open:
                return
            self._link.open()
            try:
                if self.config.check_on_connect:
                    self._check_motors()
            except BaseException:
                self._link.close()
                raise

    def disconnect(self, disable_torque: bool | None = None) -> None:
        """Close the bus; with torque on, disable every motor first. A motor that does not confirm it is
        named in a MotorBusError raised after the bus is closed (as the serial buses do)."""
        with self._lock:
            if not self._link.is_open:
                return
            failure = None
            try:
                if self.disable_torque_on_exit if disable_torque is None else disable_torque:
                    try:
                        self.disable_torque()   # the disable frame goes to every motor before any reply is awaited
                    except MotorBusError as e:  # keep going: close the bus, then tell the caller
                        failure = e
            finally:
                self._link.close()
        if failure is not None:
            raise MotorBusError(f"disconnected from CAN channel {self.config.channel!r}, but disabling torque "
                                f"failed ({failure}); the motors may still hold torque: cut their power")

    def _check_motors(self) -> None:
        names = list(self.motors)
        mst = self._param_exchange(dt.PARAM_READ, dt.register("MST_ID"), {n: None for n in names}, "connect")
        for name, (arb_id, _) in mst.items():
            if arb_id != self.feedback_id[name]:
                raise ConfigError(f"{_label(name, self.motors[name])} answers on feedback id 0x{arb_id:X} but the bus "
                                  f"expects 0x{self.feedback_id[name]:X}; pass feedback_ids={{{name!r}: 0x{arb_id:X}}} "
                                  f"or write MST_ID=0x{self.feedback_id[name]:X} and save_params")
        mode = self.sync_read("CTRL_MODE", names)
        for name, value in mode.items():
            if value != dt.CTRL_MODE_MIT:
                raise ConfigError(f"{_label(name, self.motors[name])} is in control mode {value}, this driver uses MIT "
                                  f"(1): connect with check_on_connect=False, then write('CTRL_MODE', {name!r}, 1) "
                                  f"and save_params([{name!r}])")
        if not self.config.timeout_units:   # the motors' own TIMEOUT is kept: say when one is set (an earlier run's)
            for name, units in self.sync_read("TIMEOUT", names).items():
                if units:
                    log.warning("%s has its own command timeout set (TIMEOUT %d = %.3f s, from an earlier run or its "
                                "saved settings): it turns torque off that long after the last command, whatever "
                                "robot.disable_torque_on_exit says; set robot.options.bus_watchdog_s to choose it, or "
                                "power-cycle the motor to clear it", _label(name, self.motors[name]), units,
                                units * dt.TIMEOUT_UNIT_S)
        ranges = [self.sync_read(r, names) for r in ("PMAX", "VMAX", "TMAX")]
        for name in names:
            m, got = self.model[name], tuple(r[name] for r in ranges)
            want = (m.p_max_rad, m.v_max_rad_s, m.t_max_nm)
            if not all(math.isclose(g, w, abs_tol=1e-3) for g, w in zip(got, want)):
                number = dt.model_number_for_ranges(*got)
                guess = f" (that looks like a {number})" if number else ""
                raise ConfigError(
                    f"{_label(name, self.motors[name])} maps ±{got[0]:g} rad, ±{got[1]:g} rad/s, ±{got[2]:g} Nm but "
                    f"is configured as {m.name} (±{want[0]:g}, ±{want[1]:g}, ±{want[2]:g}){guess}; fix the model "
                    "name or write PMAX/VMAX/TMAX to the model's values")

    # -- the one exchange ----------------------------------------------------------------
    def _exchange(self, requests: dict, what: str, labels: dict | None = None, must_answer: bool = True) -> dict:
        """Send each request (key: (arbitration_id, data, matcher)); return {key: matcher's reply}.

        Silent motors get `retries` resends; after that MotorTimeoutError names them (or, with
        must_answer=False, they are just absent from the result). A frame the CAN interface refuses (a full
        transmit queue) does not stop the others being sent: every motor of a torque-off gets its frame; the
        refused one is resent with the silent ones, and named if it never went out."""
        with self._lock:
            for msg in self._link.drain():  # late replies of an earlier exchange must not answer this one
                self._route_unsolicited(msg)
            pending, replies, refused = dict(requests), {}, {}
            for _ in range(self.config.retries + 1):
                for key, (arb_id, data, _) in pending.items():
                    try:
                        self._link.send(arb_id, data)
                        refused.pop(key, None)
                    except MotorBusError as exc:
                        refused[key] = exc
                deadline = time.monotonic() + self.config.timeout_s
                while any(k not in refused for k in pending) and (left := deadline - time.monotonic()) > 0:
                    msg = self._link.recv(left)
                    if msg is None:
                        break
                    self._route(msg, pending, replies)
                if not pending:
                    break
            unsent = [k for k in pending if k in refused]
            if unsent:
                who = ", ".join(labels[k] if labels else str(k) for k in unsent)
                answered = f"; the other motors' frames went out ({len(replies)} answered)" if replies else ""
                raise MotorBusError(f"{who}: {what} not sent: {refused[unsent[-1]]}{answered}")
            if pending and must_answer:
                who = ", ".join(labels[k] if labels else str(k) for k in pending)
                tries = f"{self.config.retries + 1} tries of {self.config.timeout_s * 1000:.0f} ms"
                raise MotorTimeoutError(f"{who} stopped answering (no reply to {what} after {tries}); "
                                        "check the CAN cable/termination, the motor's power, and that its ESC_ID "
                                        "(CAN id) is the one configured")
            return replies

    def _route(self, msg, pending: dict, replies: dict) -> None:
        if is_plain_data_frame(msg) and len(msg.data) == 8:
            for key, (_, _, match) in pending.items():
                reply = match(msg)
                if reply is not None:
                    replies[key] = reply
                    del pending[key]
                    return
        self._route_unsolicited(msg)

    def _route_unsolicited(self, msg) -> None:
        if is_plain_data_frame(msg) and len(msg.data) == 8:
            for name in self.motors:
                if self._match_state(name)(msg) is not None:
                    return
        self.ignored_frames += 1
        log.debug("ignored CAN frame %s", msg)

    def _match_state(self, name: str):
        motor, model, fb_id = self.motors[name], self.model[name], self.feedback_id[name]

        def match(msg):
            data = bytes(msg.data)
            if (msg.arbitration_id != fb_id or len(data) != 8 or data[0] & 0xF != motor.id & 0xF
                    or dt.is_param_reply(data, motor.id)):
                return None
            fb = self.last_feedback[name] = dt.unpack_feedback(data, model)   # every state frame refreshes it
            return fb
        return match

    @staticmethod
    def _match_param(can_id: int, code: int, rid: int | None):
        def match(msg):     # parameter replies are addressed by data[0:2], whatever MST_ID they come on
            data = bytes(msg.data)
            if dt.is_param_reply(data, can_id) and data[2] == code and (rid is None or data[3] == rid):
                return msg.arbitration_id, data
            return None
        return match

    def _labels(self, names) -> dict[str, str]:
        return {n: _label(n, self.motors[n]) for n in names}

    def _names(self, motors: list[str] | None) -> list[str]:
        names = list(self.motors) if motors is None else list(motors)
        unknown = [n for n in names if n not in self.motors]
        if unknown:
            raise ConfigError(f"unknown motors {unknown}; this bus has {sorted(self.motors)}")
        return names

    def _state_exchange(self, frames: dict[str, tuple[int, bytes]], what: str) -> dict[str, dt.DamiaoFeedback]:
        requests = {n: (arb, data, self._match_state(n)) for n, (arb, data) in frames.items()}
        return self._exchange(requests, what, self._labels(frames))

    def _system(self, cmd: int, motors: list[str] | None, what: str) -> dict[str, dt.DamiaoFeedback]:
        names = self._names(motors)
        return self._state_exchange({n: (self.motors[n].id, dt.system_frame(cmd)) for n in names}, what)

    def _raise_on_errors(self, feedback: dict[str, dt.DamiaoFeedback]) -> None:
        faults = [(n, fb.error) for n, fb in feedback.items() if fb.error is not None]
        if faults:
            names = [n for n, _ in faults]
            raise MotorHardwareError("; ".join(
                f"{_label(n, self.motors[n])} reports {dt.status_text(code)}: "
                f"{dt.STATUS_ERRORS.get(code, ('', 'see the Damiao manual'))[1]}" for n, code in faults)
                + f"; remove the cause, then power-cycle the motor to clear the fault (from Python: clear_error({names}) "
                f"and enable_torque({names}))")

    # -- discovery -------------------------------------------------------------------
    def ping(self, motor_id: int) -> int | None:
        return self.scan([motor_id]).get(motor_id)

    def scan(self, ids: range | list[int] | None = None) -> dict[int, int]:
        """{CAN id: model number inferred from the motor's PMAX/VMAX/TMAX (0: no known model)}."""
        ids = list(SCAN_IDS if ids is None else ids)
        values: dict[int, list[float]] = {i: [] for i in ids}
        for name in ("PMAX", "VMAX", "TMAX"):
            reg = dt.register(name)
            requests = {i: (dt.PARAM_CAN_ID, dt.param_frame(i, dt.PARAM_READ, reg.rid), self._match_param(i, dt.PARAM_READ, reg.rid))
                        for i in values}
            replies = self._exchange(requests, f"scan {name}", must_answer=False)
            values = {i: [*values[i], dt.decode_value(reg, replies[i][1][4:])] for i in replies}
        return {i: dt.model_number_for_ranges(*v) for i, v in sorted(values.items())}

    # -- registers -------------------------------------------------------------------
    def _param_exchange(self, code: int, reg: dt.Register, values: dict[str, float | int | None], what: str) -> dict:
        requests = {}
        for name, value in values.items():
            can_id = self.motors[name].id
            raw = dt.encode_value(reg, value) if value is not None else b"\x00" * 4
            requests[name] = (dt.PARAM_CAN_ID, dt.param_frame(can_id, code, reg.rid, raw),
                              self._match_param(can_id, code, reg.rid))
        return self._exchange(requests, what, self._labels(values))

    def read(self, register: str, motor: str) -> int | float:
        """A register by name (see damiao_table.REGISTERS): int for uint32 registers, float for float ones."""
        return self.sync_read(register, [motor])[motor]

    def sync_read(self, register: str, motors: list[str] | None = None) -> dict[str, int | float]:
        reg, names = dt.register(register), self._names(motors)
        replies = self._param_exchange(dt.PARAM_READ, reg, {n: None for n in names}, f"read {register}")
        return {n: dt.decode_value(reg, replies[n][1][4:]) for n in names}

    def write(self, register: str, motor: str, value: int | float) -> None:
        """Write a register (in RAM: it is lost at power-off unless `save_params` follows)."""
        self.sync_write(register, {motor: value})

    def sync_write(self, register: str, values: dict[str, int | float]) -> None:
        reg = dt.register(register)
        if not reg.writable:
            raise ConfigError(f"Damiao register {register} is read-only")
        self._names(values)
        replies = self._param_exchange(dt.PARAM_WRITE, reg, values, f"write {register}")
        for name, value in values.items():
            wanted = dt.decode_value(reg, dt.encode_value(reg, value))    # as float32 / uint32 on the wire
            got = dt.decode_value(reg, replies[name][1][4:])
            if got != wanted:
                raise MotorBusError(f"{_label(name, self.motors[name])} kept {register} = {got} after writing "
                                    f"{value}; the value is out of the register's range")

    def save_params(self, motors: list[str] | None = None) -> None:
        """Store the registers in flash; torque goes off first, as the vendor requires."""
        names = self._names(motors)
        self.disable_torque(names)
        requests = {n: (dt.PARAM_CAN_ID, dt.param_frame(self.motors[n].id, dt.PARAM_SAVE),
                        self._match_param(self.motors[n].id, dt.PARAM_SAVE, None)) for n in names}
        self._exchange(requests, "save parameters", self._labels(names))

    # -- torque and motion -----------------------------------------------------------
    def enable_torque(self, motors: list[str] | None = None) -> None:
        """Torque on, after arming the motors' own command timeout (`bus_watchdog_s`). A motor that turned
        torque off because its timeout ran out ("communication lost": the last host went silent) is cleared
        and enabled; any other fault is raised."""
        names = self._names(motors)
        with self._lock:
            if self.config.timeout_units:
                self.sync_write("TIMEOUT", dict.fromkeys(names, self.config.timeout_units))
            feedback = self._system(dt.CMD_ENABLE, names, "enable")
            lost = [n for n, fb in feedback.items() if fb.error == dt.STATUS_COMMUNICATION_LOST]
            if lost:
                log.warning("%s turned torque off after hearing no command for longer than its TIMEOUT; "
                            "clearing that and enabling", ", ".join(self._labels(lost).values()))
                self.clear_error(lost)
                feedback.update(self._system(dt.CMD_ENABLE, lost, "enable"))
            self._raise_on_errors(feedback)

    def disable_torque(self, motors: list[str] | None = None) -> None:
        self._system(dt.CMD_DISABLE, motors, "disable")    # a motor in error is already torque-free

    def set_zero_position(self, motors: list[str] | None = None) -> None:
        """Make each motor's present angle its 0 rad (do it with torque off)."""
        self._system(dt.CMD_SET_ZERO, motors, "set zero")

    def clear_error(self, motors: list[str] | None = None) -> None:
        """Clear a latched fault; the motor comes back disabled."""
        self._system(dt.CMD_CLEAR_ERROR, motors, "clear error")

    def torque_enabled(self, motors: list[str] | None = None) -> dict[str, bool]:
        """Damiao motors have no torque register: every feedback frame says whether the motor is enabled."""
        return {n: fb.enabled for n, fb in self._read_feedback(motors).items()}

    def read_state(self, motors: list[str] | None = None) -> MotorState:
        feedback = self._read_feedback(motors)
        self._raise_on_errors(feedback)
        return self._state(feedback)

    def read_state_torque_free(self, motors: list[str] | None = None) -> MotorState:
        """A motor whose own TIMEOUT turned torque off ("communication lost") is torque-free and reads where it is,
        so it is read, not refused (the real run clears that when it turns torque on); any other fault is raised."""
        feedback = self._read_feedback(motors)
        self._raise_on_errors({n: fb for n, fb in feedback.items() if fb.error != dt.STATUS_COMMUNICATION_LOST})
        return self._state(feedback)

    def read_state_with_faults(self, motors: list[str] | None = None) -> tuple[MotorState, dict[str, int]]:
        """read_state that does not raise on a latched fault: the state (a motor in fault still reports where it
        is) and {motor: fault code} (damiao_table.STATUS_ERRORS). `edgeact check` reads a "communication lost"
        this way: the run clears that one when it turns torque on."""
        feedback = self._read_feedback(motors)
        return self._state(feedback), {n: fb.error for n, fb in feedback.items() if fb.error is not None}

    def _read_feedback(self, motors: list[str] | None) -> dict[str, dt.DamiaoFeedback]:
        names = self._names(motors)
        return self._state_exchange(
            {n: (dt.PARAM_CAN_ID, dt.param_frame(self.motors[n].id, dt.REFRESH)) for n in names}, "read_state")

    def _state(self, feedback: dict[str, dt.DamiaoFeedback]) -> MotorState:
        state = MotorState(timestamp_s=time.monotonic())
        for n, fb in feedback.items():
            state.position_rad[n] = self._to_joint(n, fb.position_rad)
            state.velocity_rad_s[n] = self._sign(n) * fb.velocity_rad_s
        return state

    def send(self, goal_position_rad: dict[str, float], origin_rad: dict[str, float] | None = None) -> dict[str, float]:
        """Hold each joint at its goal with the configured MIT gains; returns the positions sent
        (`origin_rad`: see MotorsBus.send)."""
        commands = {}
        self._names(goal_position_rad)
        for name, goal in goal_position_rad.items():
            if self.motors[name].mode == "velocity":
                raise ConfigError(f"motor {name!r} is a velocity (wheel) motor; command it with send_velocity")
            kp, kd = self.config.gains.get(name, (self.config.kp, self.config.kd))
            commands[name] = dt.MitCommand(goal, 0.0, kp, kd, 0.0)
        return {n: c.position_rad for n, c in self.send_mit(commands, origin_rad).items()}

    def send_velocity(self, goal_velocity_rad_s: dict[str, float]) -> dict[str, float]:
        """Spin each wheel at its goal velocity (MIT with kp = 0); returns the velocities sent."""
        joints = [n for n in self._names(goal_velocity_rad_s) if self.motors[n].mode != "velocity"]
        if joints:      # kp = 0 lets a joint spin through its range limits: only wheels take velocities
            raise ConfigError(f"motors {joints} are joints (position mode); send_velocity would spin them past "
                              "their range limits: command them with send, or configure them with mode 'velocity'")
        commands = {n: dt.MitCommand(0.0, v, 0.0, self.config.velocity_kd, 0.0) for n, v in goal_velocity_rad_s.items()}
        return {n: c.velocity_rad_s for n, c in self.send_mit(commands).items()}

    def send_mit(self, commands: dict[str, dt.MitCommand],
                 origin_rad: dict[str, float] | None = None) -> dict[str, dt.MitCommand]:
        """Full MIT set-points in the joint frame; each field is clamped (position to the calibrated and the
        model's range, the former widened to `origin_rad` as MotorsBus.send says, velocity/torque to the
        model's, kp/kd to 0..500/0..5) and what was really sent (the decoded frame) is returned."""
        self._names(commands)
        frames, sent = {}, {}
        for name, cmd in commands.items():
            bad = [f for f, v in vars(cmd).items() if not math.isfinite(v)]
            if bad:
                raise MotorBusError(f"command for {name!r} has non-finite {bad}; refusing to send it")
            lo, hi = self.position_limits_rad(name)
            origin = (origin_rad or {}).get(name)
            if origin is not None and math.isfinite(origin):
                lo, hi = min(lo, origin), max(hi, origin)
            sign, model = self._sign(name), self.model[name]
            motor_cmd = dt.MitCommand(self._to_motor(name, min(max(cmd.position_rad, lo), hi)),
                                      sign * cmd.velocity_rad_s, cmd.kp, cmd.kd, sign * cmd.torque_nm)
            data = dt.pack_mit(motor_cmd, model)
            frames[name] = (self.motors[name].id, data)
            echo = dt.unpack_mit(data, model)
            sent[name] = dt.MitCommand(min(max(self._to_joint(name, echo.position_rad), lo), hi),
                                       sign * echo.velocity_rad_s, echo.kp, echo.kd, sign * echo.torque_nm)
        feedback = self._state_exchange(frames, "MIT command")
        self._raise_on_errors(feedback)
        off = [n for n, fb in feedback.items() if not fb.enabled]
        if off:
            raise MotorBusError(f"{', '.join(self._labels(off).values())} is disabled (torque off) and ignored the "
                                f"command; call enable_torque({off}) first")
        return sent

    # -- joint <-> motor frame -----------------------------------------------------------
    def _sign(self, name: str) -> float:
        cal = self.calibration.get(name)
        return -1.0 if cal is not None and cal.drive_mode else 1.0

    def _offset_rad(self, name: str) -> float:
        cal, m = self.calibration.get(name), self.model[name]
        return 0.0 if cal is None else dt.uint_to_float(cal.homing_offset, -m.p_max_rad, m.p_max_rad, 16)

    def _to_joint(self, name: str, motor_rad: float) -> float:
        return self._sign(name) * (motor_rad - self._offset_rad(name))

    def _to_motor(self, name: str, joint_rad: float) -> float:
        return self._offset_rad(name) + self._sign(name) * joint_rad

    def position_limits_rad(self, name: str) -> tuple[float, float]:
        """(low, high) joint angle `send` clamps to: the calibrated range, else the model's ±PMAX."""
        m, cal = self.model[name], self.calibration.get(name)
        raw = (0, dt.POSITION_MAX_UINT) if cal is None else (cal.range_min, cal.range_max)
        ends = [self._to_joint(name, dt.uint_to_float(r, -m.p_max_rad, m.p_max_rad, 16)) for r in raw]
        return min(ends), max(ends)
