"""Feetech STS/SMS control table (protocol 0, little-endian), baud rates, models and error bits."""
from __future__ import annotations

import math

from edgeact.drivers.motors.serial_types import ModelSpec, Register, table

# Baud rate -> value of the baud_rate register (the STS/SMS memory table, address 6).
BAUD_RATES = {1_000_000: 0, 500_000: 1, 250_000: 2, 128_000: 3, 115_200: 4, 76_800: 5, 57_600: 6, 38_400: 7}

# Signed registers use sign-magnitude: bit 15 for positions and speeds, bit 11 for the homing offset.
STS_SMS_REGISTERS = table(
    firmware_major=Register(0, 1, eeprom=True, read_only=True),
    firmware_minor=Register(1, 1, eeprom=True, read_only=True),
    model_number=Register(3, 2, eeprom=True, read_only=True),
    id=Register(5, 1, eeprom=True),
    baud_rate=Register(6, 1, eeprom=True),
    return_delay_time=Register(7, 1, eeprom=True),        # 2 us per unit
    response_status_level=Register(8, 1, eeprom=True),    # 1: every instruction answers
    min_position_limit=Register(9, 2, eeprom=True),
    max_position_limit=Register(11, 2, eeprom=True),
    max_temperature_limit=Register(13, 1, eeprom=True),
    max_voltage_limit=Register(14, 1, eeprom=True),
    min_voltage_limit=Register(15, 1, eeprom=True),
    max_torque_limit=Register(16, 2, eeprom=True),        # 0.1 % per unit
    phase=Register(18, 1, eeprom=True),
    unloading_condition=Register(19, 1, eeprom=True),
    led_alarm_condition=Register(20, 1, eeprom=True),
    p_coefficient=Register(21, 1, eeprom=True),
    d_coefficient=Register(22, 1, eeprom=True),
    i_coefficient=Register(23, 1, eeprom=True),
    minimum_startup_force=Register(24, 2, eeprom=True),
    cw_dead_zone=Register(26, 1, eeprom=True),
    ccw_dead_zone=Register(27, 1, eeprom=True),
    protection_current=Register(28, 2, eeprom=True),
    angular_resolution=Register(30, 1, eeprom=True),
    homing_offset=Register(31, 2, eeprom=True, sign_bit=11),
    operating_mode=Register(33, 1, eeprom=True),          # 0 position, 1 constant speed, 2 PWM, 3 step
    protective_torque=Register(34, 1, eeprom=True),
    protection_time=Register(35, 1, eeprom=True),
    overload_torque=Register(36, 1, eeprom=True),
    torque_enable=Register(40, 1),
    acceleration=Register(41, 1),
    goal_position=Register(42, 2, sign_bit=15),
    goal_time=Register(44, 2),
    goal_velocity=Register(46, 2, sign_bit=15),           # steps/s
    torque_limit=Register(48, 2),
    lock=Register(55, 1),                                 # 0: EEPROM writes persist, 1: locked
    present_position=Register(56, 2, read_only=True, sign_bit=15),
    present_velocity=Register(58, 2, read_only=True, sign_bit=15),
    present_load=Register(60, 2, read_only=True, sign_bit=10),
    present_voltage=Register(62, 1, read_only=True),      # 0.1 V per unit
    present_temperature=Register(63, 1, read_only=True),  # deg C
    status=Register(65, 1, read_only=True),
    moving=Register(66, 1, read_only=True),
    present_current=Register(69, 2, read_only=True, sign_bit=15),   # sign-magnitude, as Feetech's ReadCurrent
)

OPERATING_MODES = {"position": 0, "velocity": 1}

# Written by `edgeact motors setup`: answer at once, full single-turn range, full torque, position mode.
SETUP_DEFAULTS = {"return_delay_time": 0, "response_status_level": 1, "min_position_limit": 0,
                  "max_position_limit": 4095, "max_torque_limit": 1000, "operating_mode": 0}

# One velocity unit is one encoder step per second (50 steps/s = 0.732 rpm).
STEP_RAD = 2 * math.pi / 4096


def _model(name: str, number: int, max_velocity_raw: int) -> ModelSpec:
    return ModelSpec(name=name, model_number=number, registers=STS_SMS_REGISTERS, baud_rates=BAUD_RATES,
                     operating_modes=OPERATING_MODES, setup_defaults=SETUP_DEFAULTS,
                     velocity_unit_rad_s=STEP_RAD, max_velocity_raw=max_velocity_raw)


MODELS = {spec.name: spec for spec in (
    _model("sts3215", 777, 3400),     # SO-100/SO-101 arms, LeKiwi base
    _model("sts3250", 2825, 3400),
    _model("sm8512bl", 11272, 3000),
)}

# Status-packet error byte (same bits as the status register, address 65): name, and what to do.
ERROR_BITS = {
    0x01: ("input voltage out of range", "check the power supply voltage"),
    0x02: ("magnetic encoder fault", "the position sensor failed; power-cycle, then replace the motor if it stays"),
    0x04: ("overheating", "let it cool down and reduce the load"),
    0x08: ("overcurrent", "look for a stall or a short; power-cycle to clear"),
    0x10: ("angle limit", "the goal lies outside the position limits; check min/max_position_limit"),
    0x20: ("overload", "remove the load, let it cool, then power-cycle the motor to clear the error"),
}
