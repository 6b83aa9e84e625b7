"""Damiao's vendor table and wire format: model ranges, registers, status codes, and the 8-byte frame codec.

Sources: the Damiao DM-J4310-2EC manual (MIT mode, 0x7FF parameter frames), Damiao's own
Python example (`DM_CAN.py`, its `Limit_Param` table) and the open-source drivers that
follow it. Pure functions only (no python-can), so the driver and the simulated motor
share exactly one definition of every bit.

MIT command (to the motor's CAN id, ESC_ID), big-endian bit fields:
    p 16 bit | v 12 bit | kp 12 bit | kd 12 bit | t 12 bit
Feedback (from the motor, on its MST_ID):
    byte 0 = status << 4 | (ESC_ID & 0xF); p 16 bit; v 12 bit; t 12 bit; T_mos °C; T_rotor °C
Floats map linearly onto unsigned ints over [min, max]: u = (x - min) / (max - min) * (2^bits - 1),
truncated, as the vendor's code does.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass

from edgeact.runtime.errors import ConfigError

# -- models ------------------------------------------------------------------------------


@dataclass(frozen=True)
class DamiaoModel:
    """The factory PMAX / VMAX / TMAX mapping ranges of one model (registers 21-23)."""

    name: str
    number: int             # what `ping` reports; motors have no model register, so it is inferred from the ranges
    p_max_rad: float
    v_max_rad_s: float
    t_max_nm: float

    @property
    def rad_per_tick(self) -> float:
        """Size of one step of the 16-bit position field (the calibration's raw unit)."""
        return 2.0 * self.p_max_rad / POSITION_MAX_UINT


_MODELS = (
    # name        number  PMAX    VMAX   TMAX    (the 48 V "p" variants, DM_CAN's *_48V, share the number)
    ("dm3507", 3507, 12.566, 50.0, 5.0),
    ("dm4310", 4310, 12.5, 30.0, 10.0),
    ("dm4310p", 4310, 12.5, 50.0, 10.0),
    ("dm4340", 4340, 12.5, 8.0, 28.0),         # DM_CAN Limit_Param DM4340 (24 V)
    ("dm4340p", 4340, 12.5, 10.0, 28.0),        # DM_CAN Limit_Param DM4340_48V
    ("dm6006", 6006, 12.5, 45.0, 20.0),
    ("dm8006", 8006, 12.5, 45.0, 40.0),
    ("dm8009", 8009, 12.5, 45.0, 54.0),
    ("dm10010l", 10010, 12.5, 25.0, 200.0),
    ("dm10010", 10010, 12.5, 20.0, 200.0),
    ("dmh3510", 3510, 12.5, 280.0, 1.0),
    ("dmh6215", 6215, 12.5, 45.0, 10.0),      # DM_CAN DMH6215
    ("dmg6220", 6220, 12.5, 45.0, 10.0),      # DM_CAN DMG6220
    ("dm6248p", 6248, 12.566, 20.0, 120.0),
)
MODELS: dict[str, DamiaoModel] = {m[0]: DamiaoModel(*m) for m in _MODELS}


def model(name: str) -> DamiaoModel:
    """The table entry for `name` (e.g. "dm4310"), or a ConfigError that lists the known models."""
    try:
        return MODELS[name]
    except KeyError:
        raise ConfigError(f"unknown Damiao model {name!r}; use one of {', '.join(MODELS)}") from None


def model_number_for_ranges(p_max: float, v_max: float, t_max: float) -> int:
    """The number of the first model whose ranges match (motors report ranges, not a model); 0 if none."""
    for m in MODELS.values():
        if all(math.isclose(a, b, abs_tol=1e-3) for a, b in
               ((p_max, m.p_max_rad), (v_max, m.v_max_rad_s), (t_max, m.t_max_nm))):
            return m.number
    return 0


# -- MIT gains (fixed ranges on every model) ---------------------------------------------
KP_MAX = 500.0
KD_MAX = 5.0
POSITION_MAX_UINT = (1 << 16) - 1

# -- CAN ids and command bytes -------------------------------------------------------------
PARAM_CAN_ID = 0x7FF            # parameter, save and refresh frames go here, addressed by data[0:2]
CMD_ENABLE = 0xFC
CMD_DISABLE = 0xFD
CMD_SET_ZERO = 0xFE
CMD_CLEAR_ERROR = 0xFB
PARAM_READ = 0x33
PARAM_WRITE = 0x55
PARAM_SAVE = 0xAA
REFRESH = 0xCC
PARAM_REPLY_CODES = (PARAM_READ, PARAM_WRITE, PARAM_SAVE)
CTRL_MODE_MIT = 1

# -- status codes (feedback byte 0, high nibble) -------------------------------------------
STATUS_DISABLED = 0x0
STATUS_ENABLED = 0x1
STATUS_COMMUNICATION_LOST = 0xD
STATUS_ERRORS: dict[int, tuple[str, str]] = {
    # code: (what the motor reports, what to do about it)
    0x8: ("overvoltage", "check the supply voltage (above OV_Value) and regenerative braking"),
    0x9: ("undervoltage", "check the supply voltage and its current capacity (below UV_Value)"),
    0xA: ("overcurrent", "check for a blocked joint or too-stiff gains (kp/kd), then clear the error"),
    0xB: ("MOS overtemperature", "let the driver cool down and reduce the load"),
    0xC: ("coil overtemperature", "let the motor cool down and reduce the continuous torque"),
    0xD: ("communication lost", "no command reached it for longer than its TIMEOUT (bus_watchdog_s), so it turned "
                                "torque off; keep the command loop running, or raise bus_watchdog_s"),
    0xE: ("overload", "reduce the load or the commanded torque"),
}


def status_text(code: int) -> str:
    if code == STATUS_DISABLED:
        return "disabled"
    if code == STATUS_ENABLED:
        return "enabled"
    return STATUS_ERRORS.get(code, (f"unknown status 0x{code:X}", ""))[0]


# -- registers ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Register:
    name: str
    rid: int
    kind: str               # "float" (IEEE float32) or "uint" (uint32), little-endian on the wire
    writable: bool


_REGISTERS = (
    ("UV_Value", 0, "float", True), ("KT_Value", 1, "float", True), ("OT_Value", 2, "float", True),
    ("OC_Value", 3, "float", True), ("ACC", 4, "float", True), ("DEC", 5, "float", True),
    ("MAX_SPD", 6, "float", True), ("MST_ID", 7, "uint", True), ("ESC_ID", 8, "uint", True),
    ("TIMEOUT", 9, "uint", True),   # in TIMEOUT_UNIT_S; 0 disables the motor's own command timeout
    ("CTRL_MODE", 10, "uint", True),  # 1 MIT, 2 position-velocity, 3 velocity, 4 force-position
    ("Damp", 11, "float", False), ("Inertia", 12, "float", False), ("hw_ver", 13, "uint", False),
    ("sw_ver", 14, "uint", False), ("SN", 15, "uint", False), ("NPP", 16, "uint", False),
    ("Rs", 17, "float", False), ("Ls", 18, "float", False), ("Flux", 19, "float", False),
    ("Gr", 20, "float", False), ("PMAX", 21, "float", True), ("VMAX", 22, "float", True),
    ("TMAX", 23, "float", True), ("I_BW", 24, "float", True), ("KP_ASR", 25, "float", True),
    ("KI_ASR", 26, "float", True), ("KP_APR", 27, "float", True), ("KI_APR", 28, "float", True),
    ("OV_Value", 29, "float", True), ("GREF", 30, "float", True), ("Deta", 31, "float", True),
    ("V_BW", 32, "float", True), ("IQ_c1", 33, "float", True), ("VL_c1", 34, "float", True),
    ("can_br", 35, "uint", True), ("sub_ver", 36, "uint", False),
    ("p_m", 80, "float", False), ("xout", 81, "float", False),
)
REGISTERS: dict[str, Register] = {r[0]: Register(*r) for r in _REGISTERS}
REGISTERS_BY_RID: dict[int, Register] = {r.rid: r for r in REGISTERS.values()}
TIMEOUT_UNIT_S = 50e-6              # the TIMEOUT register counts 50 µs units
TIMEOUT_MAX_UNITS = (1 << 32) - 1   # uint32


def register(name: str) -> Register:
    try:
        return REGISTERS[name]
    except KeyError:
        raise ConfigError(f"unknown Damiao register {name!r}; use one of {', '.join(REGISTERS)}") from None


def encode_value(reg: Register, value: float | int) -> bytes:
    if reg.kind == "uint":
        if isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"register {reg.name} holds an integer, got {value}")
        if not 0 <= int(value) <= 0xFFFFFFFF:
            raise ConfigError(f"register {reg.name} holds a uint32, got {value}")
        return struct.pack("<I", int(value))
    return struct.pack("<f", float(value))


def decode_value(reg: Register, raw: bytes) -> float | int:
    return struct.unpack("<I" if reg.kind == "uint" else "<f", raw)[0]


# -- float <-> uint mapping ------------------------------------------------------------


def float_to_uint(x: float, x_min: float, x_max: float, bits: int) -> int:
    """Clamp `x` to [x_min, x_max] and map it onto 0 .. 2^bits-1 (truncating, like the firmware)."""
    x = min(max(x, x_min), x_max)
    return int((x - x_min) / (x_max - x_min) * ((1 << bits) - 1))


def uint_to_float(u: int, x_min: float, x_max: float, bits: int) -> float:
    return x_min + u / ((1 << bits) - 1) * (x_max - x_min)


# -- frames ------------------------------------------------------------------------------


@dataclass(frozen=True)
class MitCommand:
    """One MIT-mode set-point: torque = kp*(p - p_meas) + kd*(v - v_meas) + t_ff."""

    position_rad: float = 0.0
    velocity_rad_s: float = 0.0
    kp: float = 0.0
    kd: float = 0.0
    torque_nm: float = 0.0


@dataclass(frozen=True)
class DamiaoFeedback:
    """One decoded feedback frame, in the motor's own frame (before calibration)."""

    motor_id_low: int       # ESC_ID & 0xF, as the frame carries it
    status: int
    position_rad: float
    velocity_rad_s: float
    torque_nm: float
    mos_temp_c: int
    rotor_temp_c: int

    @property
    def enabled(self) -> bool:
        return self.status == STATUS_ENABLED

    @property
    def error(self) -> int | None:
        return None if self.status in (STATUS_DISABLED, STATUS_ENABLED) else self.status


def pack_mit(cmd: MitCommand, m: DamiaoModel) -> bytes:
    p = float_to_uint(cmd.position_rad, -m.p_max_rad, m.p_max_rad, 16)
    v = float_to_uint(cmd.velocity_rad_s, -m.v_max_rad_s, m.v_max_rad_s, 12)
    kp = float_to_uint(cmd.kp, 0.0, KP_MAX, 12)
    kd = float_to_uint(cmd.kd, 0.0, KD_MAX, 12)
    t = float_to_uint(cmd.torque_nm, -m.t_max_nm, m.t_max_nm, 12)
    return bytes((p >> 8, p & 0xFF, v >> 4, (v & 0xF) << 4 | kp >> 8, kp & 0xFF,
                  kd >> 4, (kd & 0xF) << 4 | t >> 8, t & 0xFF))


def unpack_mit(data: bytes, m: DamiaoModel) -> MitCommand:
    p = data[0] << 8 | data[1]
    v = data[2] << 4 | data[3] >> 4
    kp = (data[3] & 0xF) << 8 | data[4]
    kd = data[5] << 4 | data[6] >> 4
    t = (data[6] & 0xF) << 8 | data[7]
    return MitCommand(uint_to_float(p, -m.p_max_rad, m.p_max_rad, 16),
                      uint_to_float(v, -m.v_max_rad_s, m.v_max_rad_s, 12),
                      uint_to_float(kp, 0.0, KP_MAX, 12), uint_to_float(kd, 0.0, KD_MAX, 12),
                      uint_to_float(t, -m.t_max_nm, m.t_max_nm, 12))


def pack_feedback(fb: DamiaoFeedback, m: DamiaoModel) -> bytes:
    p = float_to_uint(fb.position_rad, -m.p_max_rad, m.p_max_rad, 16)
    v = float_to_uint(fb.velocity_rad_s, -m.v_max_rad_s, m.v_max_rad_s, 12)
    t = float_to_uint(fb.torque_nm, -m.t_max_nm, m.t_max_nm, 12)
    return bytes(((fb.status & 0xF) << 4 | fb.motor_id_low & 0xF, p >> 8, p & 0xFF, v >> 4,
                  (v & 0xF) << 4 | t >> 8, t & 0xFF, fb.mos_temp_c & 0xFF, fb.rotor_temp_c & 0xFF))


def unpack_feedback(data: bytes, m: DamiaoModel) -> DamiaoFeedback:
    p = data[1] << 8 | data[2]
    v = data[3] << 4 | data[4] >> 4
    t = (data[4] & 0xF) << 8 | data[5]
    return DamiaoFeedback(data[0] & 0xF, data[0] >> 4,
                          uint_to_float(p, -m.p_max_rad, m.p_max_rad, 16),
                          uint_to_float(v, -m.v_max_rad_s, m.v_max_rad_s, 12),
                          uint_to_float(t, -m.t_max_nm, m.t_max_nm, 12), data[6], data[7])


def system_frame(cmd: int) -> bytes:
    """Enable / disable / set-zero / clear-error: seven 0xFF then the command byte."""
    return b"\xff" * 7 + bytes((cmd,))


def param_frame(can_id: int, code: int, rid: int = 0, value: bytes = b"\x00\x00\x00\x00") -> bytes:
    """A 0x7FF frame: [CANID_L, CANID_H, code, RID, value0..3]; also the layout of the motor's reply."""
    return bytes((can_id & 0xFF, can_id >> 8 & 0xFF, code, rid)) + value


def is_param_reply(data: bytes, can_id: int) -> bool:
    """A reply to a 0x7FF frame for `can_id` (as opposed to a state frame): addressed by data[0:2]."""
    return (len(data) == 8 and data[0] == can_id & 0xFF and data[1] == can_id >> 8 & 0xFF
            and data[2] in PARAM_REPLY_CODES)
