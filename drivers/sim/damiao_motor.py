"""Simulated Damiao motors on python-can's virtual CAN: parse the real frames, answer with real frames.

One `DamiaoSim` is one CAN bus with any number of `SimDamiaoMotor`s on it, served by a thread:

    with DamiaoSim("test-can", [SimDamiaoMotor(0x01, "dm4310"), SimDamiaoMotor(0x02, "dm4340")]) as sim:
        bus = DamiaoBus(motors, config=DamiaoBusConfig(interface="virtual", channel="test-can"))
        ...
        sim.motor(0x02).stop_answering()        # unplug it

Each motor has an enable state (disabled: no torque), a register table with RAM and flash
(ids and ranges latch at power-up, as on the real motor), fault injection, the motor's own
TIMEOUT (communication lost), and MIT dynamics: a rigid inertia with viscous damping driven by
torque = kp*(p_des - p) + kd*(v_des - v) + t_ff, clamped to ±TMAX, integrated on wall time.
"""
from __future__ import annotations

import logging
import threading
import time

from edgeact.drivers.motors import damiao_table as dt

log = logging.getLogger(__name__)

_MAX_STEP_S = 0.0005        # integration sub-step: stable for kp <= 500, kd <= 5 at 0.01 kg m²
_MAX_CATCH_UP_S = 0.05      # after a stall (a loaded test machine) run at most this much physics at once


class SimDamiaoMotor:
    """One simulated motor: registers, enable state, faults and MIT dynamics (use through DamiaoSim)."""

    def __init__(self, can_id: int, model: str = "dm4310", feedback_id: int | None = None,
                 position_rad: float = 0.0, inertia_kg_m2: float = 0.01, damping_nm_s_rad: float = 0.05):
        m = dt.model(model)
        self.flash: dict[str, float | int] = {r.name: (0 if r.kind == "uint" else 0.0) for r in dt.REGISTERS.values()}
        self.flash.update(MST_ID=can_id + 0x10 if feedback_id is None else feedback_id, ESC_ID=can_id,
                          CTRL_MODE=dt.CTRL_MODE_MIT, PMAX=m.p_max_rad, VMAX=m.v_max_rad_s, TMAX=m.t_max_nm,
                          can_br=4, sw_ver=5015, UV_Value=15.0, OV_Value=32.0, OT_Value=80.0, Gr=10.0,
                          KP_ASR=0.002, KI_ASR=0.002, KP_APR=30.0, KI_APR=0.0)
        self.name = model
        self.inertia_kg_m2 = inertia_kg_m2
        self.damping_nm_s_rad = damping_nm_s_rad
        self.position_rad = position_rad
        self.velocity_rad_s = 0.0
        self.torque_nm = 0.0
        self.mos_temp_c = 32
        self.rotor_temp_c = 30
        self.answering = True
        self.frames_handled = 0
        self.power_cycle()

    def power_cycle(self) -> None:
        """Reload the registers from flash and latch ids and ranges, as at power-up; torque is off."""
        self.registers = dict(self.flash)
        self.can_id = int(self.registers["ESC_ID"])
        self.feedback_id = int(self.registers["MST_ID"])
        self.model = dt.DamiaoModel(self.name, 0, float(self.registers["PMAX"]), float(self.registers["VMAX"]),
                                    float(self.registers["TMAX"]))
        self.enabled = False
        self.error: int | None = None
        self.command = dt.MitCommand()
        self.last_command_s = time.monotonic()

    # -- faults --------------------------------------------------------------------------
    def inject_error(self, code: int) -> None:
        """Latch a fault (0x8..0xE, see damiao_table.STATUS_ERRORS): torque off until cleared."""
        if code not in dt.STATUS_ERRORS:
            raise ValueError(f"fault code 0x{code:X} unknown; use one of {[hex(c) for c in dt.STATUS_ERRORS]}")
        self.error, self.enabled = code, False

    def stop_answering(self) -> None:
        """Ignore every frame from now on (a cut cable or a motor without power)."""
        self.answering = False

    def resume_answering(self) -> None:
        self.answering = True

    @property
    def status(self) -> int:
        return self.error if self.error is not None else int(self.enabled)

    # -- physics -----------------------------------------------------------------------
    def step(self, dt_s: float, now_s: float) -> None:
        timeout_s = int(self.registers["TIMEOUT"]) * dt.TIMEOUT_UNIT_S
        if self.enabled and timeout_s > 0 and now_s - self.last_command_s > timeout_s:
            self.error, self.enabled = 0xD, False
        n = max(1, int(dt_s / _MAX_STEP_S + 0.999))
        h = dt_s / n
        for _ in range(n):
            tau = 0.0
            if self.enabled:
                c, t_max = self.command, self.model.t_max_nm
                tau = c.kp * (c.position_rad - self.position_rad) + c.kd * (c.velocity_rad_s - self.velocity_rad_s) + c.torque_nm
                tau = min(max(tau, -t_max), t_max)
            self.velocity_rad_s += (tau - self.damping_nm_s_rad * self.velocity_rad_s) / self.inertia_kg_m2 * h
            self.position_rad += self.velocity_rad_s * h
            self.torque_nm = tau

    # -- protocol ----------------------------------------------------------------------
    def feedback_frame(self) -> tuple[int, bytes]:
        fb = dt.DamiaoFeedback(self.can_id & 0xF, self.status, self.position_rad, self.velocity_rad_s,
                               self.torque_nm, self.mos_temp_c, self.rotor_temp_c)
        return self.feedback_id, dt.pack_feedback(fb, self.model)

    def handle_command(self, data: bytes, now_s: float) -> tuple[int, bytes]:
        """A frame on this motor's ESC_ID: a system command (FF x7 + code) or an MIT set-point."""
        self.last_command_s = now_s
        system = data[:7] == b"\xff" * 7 and data[7] in (dt.CMD_ENABLE, dt.CMD_DISABLE, dt.CMD_SET_ZERO, dt.CMD_CLEAR_ERROR)
        code = data[7] if system else None
        if code == dt.CMD_ENABLE and self.error is None:
            self.enabled, self.command = True, dt.MitCommand()   # enabled with no set-point: no torque
        elif code == dt.CMD_DISABLE:
            self.enabled = False
        elif code == dt.CMD_SET_ZERO:
            self.position_rad = 0.0
        elif code == dt.CMD_CLEAR_ERROR:
            self.error, self.enabled = None, False
        elif code is None and self.enabled and self.registers["CTRL_MODE"] == dt.CTRL_MODE_MIT:
            self.command = dt.unpack_mit(data, self.model)
        return self.feedback_frame()

    def handle_param(self, data: bytes, now_s: float) -> tuple[int, bytes] | None:
        """A 0x7FF frame addressed to this motor: read / write / save a register, or refresh."""
        code, rid = data[2], data[3]
        if code == dt.REFRESH:
            self.last_command_s = now_s
            return self.feedback_frame()
        if code == dt.PARAM_SAVE:
            if self.enabled:
                return None             # the firmware only saves with torque off
            self.flash = dict(self.registers)
            return self.feedback_id, dt.param_frame(self.can_id, dt.PARAM_SAVE, 0x01)
        reg = dt.REGISTERS_BY_RID.get(rid)
        if reg is None or code not in (dt.PARAM_READ, dt.PARAM_WRITE):
            return None
        if code == dt.PARAM_WRITE and reg.writable:
            self.registers[reg.name] = dt.decode_value(reg, data[4:8])
        # a write echoes the value now held, so a refused write shows up as the old value
        return self.feedback_id, dt.param_frame(self.can_id, code, rid, dt.encode_value(reg, self.registers[reg.name]))


class DamiaoSim:
    """A CAN bus of simulated Damiao motors served by one thread; start()/stop() or a `with` block."""

    def __init__(self, channel: str, motors: list[SimDamiaoMotor], interface: str = "virtual", poll_s: float = 0.002):
        ids = [m.can_id for m in motors]
        if len(set(ids)) != len(ids):
            raise ValueError(f"simulated motors share CAN ids: {ids}")
        self.channel, self.interface, self.poll_s = channel, interface, poll_s
        self.motors = {m.can_id: m for m in motors}
        self.lock = threading.Lock()        # hold it to read or change several motor fields at once
        self.garbage_frames = 0
        self.handler_errors: list[BaseException] = []
        self._bus = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def motor(self, can_id: int) -> SimDamiaoMotor:
        """The motor created with `can_id` (its key stays put if a saved ESC_ID write renumbers it)."""
        return self.motors[can_id]

    def start(self) -> "DamiaoSim":
        import can
        if self._thread is not None:
            return self
        self._bus = can.Bus(interface=self.interface, channel=self.channel)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"damiao-sim-{self.channel}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stop.set()
            thread.join(timeout=5.0)
        if self._bus is not None:
            self._bus.shutdown()
            self._bus = None

    def __enter__(self) -> "DamiaoSim":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _run(self) -> None:
        import can
        last = time.monotonic()
        while not self._stop.is_set():
            msg = self._bus.recv(timeout=self.poll_s)
            now = time.monotonic()
            with self.lock:
                for m in self.motors.values():
                    m.step(min(now - last, _MAX_CATCH_UP_S), now)
                try:
                    reply = self._handle(msg, now) if msg is not None else None
                except Exception as e:      # keep serving the bus; the test reads handler_errors
                    log.exception("simulated Damiao motor failed on %s", msg)
                    self.handler_errors.append(e)
                    reply = None
            last = now
            if reply is not None:
                self._bus.send(can.Message(arbitration_id=reply[0], data=reply[1], is_extended_id=False))

    def _handle(self, msg, now: float) -> tuple[int, bytes] | None:
        data = bytes(msg.data)
        if msg.is_error_frame or msg.is_remote_frame or msg.is_extended_id or len(data) != 8:
            self.garbage_frames += 1
            return None
        is_param = msg.arbitration_id == dt.PARAM_CAN_ID
        target = data[0] | data[1] << 8 if is_param else msg.arbitration_id
        # route by the ids latched at power-up, which a saved ESC_ID write changes
        motor = next((m for m in self.motors.values() if m.can_id == target), None)
        if motor is None or not motor.answering:
            return None
        motor.frames_handled += 1
        return motor.handle_param(data, now) if is_param else motor.handle_command(data, now)
