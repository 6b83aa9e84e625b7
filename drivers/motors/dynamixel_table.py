"""Dynamixel X-series control table (Protocol 2.0), baud rates, models and error codes."""
from __future__ import annotations

import math

from edgeact.drivers.motors.serial_types import ModelSpec, Register, table

# Baud rate -> value of the baud_rate register (address 8): 0..7 on the XL430 / XC430 / XM430 (the bus's set).
BAUD_RATES = {9_600: 0, 57_600: 1, 115_200: 2, 1_000_000: 3, 2_000_000: 4, 3_000_000: 5, 4_000_000: 6, 4_500_000: 7}
# The XL330 takes 0..6: no 4.5 Mbps (e-Manual, XL330-M077 / XL330-M288 control tables).
XL330_BAUD_RATES = {baud: code for baud, code in BAUD_RATES.items() if code <= 6}

# Signed registers are two's complement.
X_SERIES_REGISTERS = table(
    model_number=Register(0, 2, eeprom=True, read_only=True),
    model_information=Register(2, 4, eeprom=True, read_only=True),
    firmware_version=Register(6, 1, eeprom=True, read_only=True),
    id=Register(7, 1, eeprom=True),
    baud_rate=Register(8, 1, eeprom=True),
    return_delay_time=Register(9, 1, eeprom=True),        # 2 us per unit
    drive_mode=Register(10, 1, eeprom=True),
    operating_mode=Register(11, 1, eeprom=True),          # 1 velocity, 3 position, 4 extended, 16 PWM
    secondary_id=Register(12, 1, eeprom=True),
    protocol_type=Register(13, 1, eeprom=True),
    homing_offset=Register(20, 4, eeprom=True, signed=True),
    moving_threshold=Register(24, 4, eeprom=True),
    temperature_limit=Register(31, 1, eeprom=True),
    max_voltage_limit=Register(32, 2, eeprom=True),
    min_voltage_limit=Register(34, 2, eeprom=True),
    pwm_limit=Register(36, 2, eeprom=True),               # 885 = 100 % of the supply
    current_limit=Register(38, 2, eeprom=True),
    velocity_limit=Register(44, 4, eeprom=True),
    max_position_limit=Register(48, 4, eeprom=True),
    min_position_limit=Register(52, 4, eeprom=True),
    shutdown=Register(63, 1, eeprom=True),
    torque_enable=Register(64, 1),
    led=Register(65, 1),
    status_return_level=Register(68, 1),
    registered_instruction=Register(69, 1, read_only=True),
    hardware_error_status=Register(70, 1, read_only=True),
    velocity_i_gain=Register(76, 2),
    velocity_p_gain=Register(78, 2),
    position_d_gain=Register(80, 2),
    position_i_gain=Register(82, 2),
    position_p_gain=Register(84, 2),
    bus_watchdog=Register(98, 1, signed=True),           # 1..127: 20 ms units, 0 off/clear, -1 tripped
    goal_pwm=Register(100, 2, signed=True),
    goal_current=Register(102, 2, signed=True),
    goal_velocity=Register(104, 4, signed=True),          # 0.229 rpm per unit
    profile_acceleration=Register(108, 4),
    profile_velocity=Register(112, 4),
    goal_position=Register(116, 4, signed=True),
    realtime_tick=Register(120, 2, read_only=True),
    moving=Register(122, 1, read_only=True),
    moving_status=Register(123, 1, read_only=True),
    present_pwm=Register(124, 2, read_only=True, signed=True),
    present_current=Register(126, 2, read_only=True, signed=True),
    present_velocity=Register(128, 4, read_only=True, signed=True),
    present_position=Register(132, 4, read_only=True, signed=True),
    velocity_trajectory=Register(136, 4, read_only=True, signed=True),
    position_trajectory=Register(140, 4, read_only=True, signed=True),
    present_input_voltage=Register(144, 2, read_only=True),   # 0.1 V per unit
    present_temperature=Register(146, 1, read_only=True),
)

OPERATING_MODES = {"position": 3, "velocity": 1}

# Written by `edgeact motors setup`: answer at once, plain position mode, full range and PWM.
SETUP_DEFAULTS = {"return_delay_time": 0, "drive_mode": 0, "operating_mode": 3, "min_position_limit": 0,
                  "max_position_limit": 4095, "pwm_limit": 885}

RPM_UNIT_RAD_S = 0.229 * 2 * math.pi / 60


def _model(name: str, number: int, max_velocity_raw: int, baud_rates: dict[int, int] = BAUD_RATES) -> ModelSpec:
    return ModelSpec(name=name, model_number=number, registers=X_SERIES_REGISTERS, baud_rates=baud_rates,
                     operating_modes=OPERATING_MODES, setup_defaults=SETUP_DEFAULTS,
                     velocity_unit_rad_s=RPM_UNIT_RAD_S, max_velocity_raw=max_velocity_raw)


# max_velocity_raw: the factory velocity_limit (about the no-load speed at the nominal voltage).
MODELS = {spec.name: spec for spec in (
    _model("xl430-w250", 1060, 265),
    _model("xc430-w150", 1070, 460),
    _model("xm430-w350", 1020, 200),
    _model("xm430-w210", 1030, 330),
    _model("xl330-m288", 1200, 445, XL330_BAUD_RATES),
    _model("xl330-m077", 1190, 1620, XL330_BAUD_RATES),
)}

# Shutdown(63) as shipped (e-Manual control tables): 52 = 0x34 (overheating, electrical shock, overload) on the
# XL430 / XC430 / XM430; the XL330 adds input voltage: 53 = 0x35. A hardware error whose bit is set there turns
# the motor's torque off, and only a reboot lets it back on.
SHUTDOWN_FACTORY = {"xl430-w250": 0x34, "xc430-w150": 0x34, "xm430-w350": 0x34, "xm430-w210": 0x34,
                    "xl330-m288": 0x35, "xl330-m077": 0x35}

# Hardware Error Status (address 70), reported through the status packet's alert bit 0x80.
HARDWARE_ERROR_BITS = {
    0x01: ("input voltage out of range", "check the power supply voltage"),
    0x04: ("overheating", "let it cool down and reduce the load"),
    0x08: ("motor encoder fault", "power-cycle; replace the motor if it stays"),
    0x10: ("electrical shock", "check the wiring for a short"),
    0x20: ("overload", "remove the load and reboot or power-cycle the motor to clear the error"),
}
ALERT_BIT = 0x80

# The status packet's low 7 error bits: why an instruction was refused.
GARBLED_INSTRUCTION_ERRORS = frozenset({3, 5})     # CRC, data length: the packet arrived damaged (retried)
INSTRUCTION_ERRORS = {
    1: "result fail (the motor could not process the instruction)",
    2: "instruction error (unknown instruction, or ACTION without REG_WRITE)",
    3: "CRC error (the packet was corrupted on the wire; check the cabling)",
    4: "data range error (the value is outside the register's range)",
    5: "data length error (too few bytes for the register)",
    6: "data limit error (the value exceeds a limit register)",
    7: "access error (EEPROM written with torque on, or a read-only register written)",
}
