"""The simulator's side of each wire protocol: take instruction packets in, build status packets out.

Checksum, CRC and byte stuffing come from the driver modules, which tests pin to golden vectors
and to ROBOTIS' dynamixel_sdk; the parsing here runs the other direction from the driver's.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass

from edgeact.drivers.motors.dynamixel import HEADER as DXL_HEADER
from edgeact.drivers.motors.dynamixel import crc16, stuff, unstuff
from edgeact.drivers.motors.dynamixel_table import ALERT_BIT
from edgeact.drivers.motors.feetech import checksum
from edgeact.drivers.sim.servo_motor import SimServo

DATA_RANGE_ERROR = 4   # Protocol 2.0: also the answer to a goal write while the Bus Watchdog is tripped
DATA_LIMIT_ERROR = 6   # Protocol 2.0: a goal beyond its limit register (position limits, Velocity Limit(44))
ACCESS_ERROR = 7   # Protocol 2.0: EEPROM written with torque on, or a read-only register written
GOALS = ("goal_pwm", "goal_current", "goal_velocity", "goal_position")


@dataclass(frozen=True)
class Instruction:
    motor_id: int
    code: int
    params: bytes


def collide(replies: list[bytes]) -> bytes:
    """Motors answering at once: their bytes interleave on the half-duplex line into garbage."""
    longest = max(len(r) for r in replies)
    return bytes(r[i] for i in range(longest) for r in replies if i < len(r))


class SimWire(abc.ABC):
    field_bytes: int
    # Modelled choice: Feetech motors answer a broadcast ping at once (so several collide), Protocol 2.0
    # motors one after another. The driver never relies on either.
    broadcast_ping_collides: bool

    @abc.abstractmethod
    def take_instruction(self, buf: bytearray) -> Instruction | None:
        """Remove the first valid instruction packet from `buf` (corrupt ones are ignored, as servos do)."""

    @abc.abstractmethod
    def status(self, motor_id: int, error: int, params: bytes = b"") -> bytes: ...

    @abc.abstractmethod
    def error_byte(self, servo: SimServo) -> int: ...

    @abc.abstractmethod
    def ping_params(self, servo: SimServo) -> bytes: ...

    @abc.abstractmethod
    def check_write(self, servo: SimServo, address: int, data: bytes) -> tuple[bool, int]:
        """(apply the write?, error byte for the reply)."""

    def answers(self, servo: SimServo, kind: str) -> bool:
        """Whether `servo` sends a status packet for an instruction of this kind ("ping", "read" or "write")."""
        return True

    def field(self, params: bytes, index: int) -> int:
        at = index * self.field_bytes
        return int.from_bytes(params[at:at + self.field_bytes], "little")

    def address_size(self, params: bytes) -> tuple[int, int, bytes]:
        """(address, size, the rest) of read / sync read / sync write parameters."""
        return self.field(params, 0), self.field(params, 1), params[2 * self.field_bytes:]

    def address_data(self, params: bytes) -> tuple[int, bytes]:
        return self.field(params, 0), params[self.field_bytes:]


class FeetechWire(SimWire):
    field_bytes = 1
    broadcast_ping_collides = True

    def take_instruction(self, buf: bytearray) -> Instruction | None:
        while True:
            start = buf.find(b"\xff\xff")
            if start < 0:
                del buf[: len(buf) - (1 if buf.endswith(b"\xff") else 0)]
                return None
            del buf[:start]
            if len(buf) < 4:
                return None
            if buf[2] == 0xFF or buf[3] < 2:
                del buf[0]
                continue
            end = 4 + buf[3]
            if len(buf) < end:
                return None
            frame = bytes(buf[:end])
            if checksum(frame[2:-1]) != frame[-1]:
                del buf[0]
                continue
            del buf[:end]
            return Instruction(frame[2], frame[4], frame[5:-1])

    def status(self, motor_id: int, error: int, params: bytes = b"") -> bytes:
        body = bytes([motor_id, len(params) + 2, error]) + params
        return b"\xff\xff" + body + bytes([checksum(body)])

    def error_byte(self, servo: SimServo) -> int:
        return servo.hardware_error & 0xFF

    def ping_params(self, servo: SimServo) -> bytes:
        return b""

    def check_write(self, servo: SimServo, address: int, data: bytes) -> tuple[bool, int]:
        # STS firmware silently skips read-only bytes and reports no instruction errors.
        return not servo.touches(address, len(data), read_only=True), self.error_byte(servo)


class DynamixelWire(SimWire):
    field_bytes = 2
    broadcast_ping_collides = False     # Protocol 2.0 motors answer a broadcast ping one after another

    def take_instruction(self, buf: bytearray) -> Instruction | None:
        while True:
            start = buf.find(DXL_HEADER)
            if start < 0:
                del buf[: max(0, len(buf) - 3)]
                return None
            del buf[:start]
            if len(buf) < 8:
                return None
            length = int.from_bytes(buf[5:7], "little")
            if length < 3 or length > 1024:
                del buf[0]
                continue
            end = 7 + length
            if len(buf) < end:
                return None
            frame = bytes(buf[:end])
            if crc16(frame[:-2]) != int.from_bytes(frame[-2:], "little"):
                del buf[0]
                continue
            del buf[:end]
            body = unstuff(frame[7:-2])
            return Instruction(frame[4], body[0], body[1:])

    def status(self, motor_id: int, error: int, params: bytes = b"") -> bytes:
        body = stuff(bytes([0x55, error]) + params)
        frame = DXL_HEADER + bytes([motor_id]) + (len(body) + 2).to_bytes(2, "little") + body
        return frame + crc16(frame).to_bytes(2, "little")

    def fast_sync_read_status(self, blocks: list[tuple[int, int, bytes]], count: int, size: int) -> bytes:
        """One packet for all: each motor appends `ERR ID data` and the CRC of everything so far."""
        frame = bytearray(DXL_HEADER + b"\xfe" + (1 + count * (size + 4)).to_bytes(2, "little") + b"\x55")
        for error, motor_id, data in blocks:
            frame += bytes([error, motor_id]) + data
            frame += crc16(bytes(frame)).to_bytes(2, "little")
        return bytes(frame)

    def error_byte(self, servo: SimServo) -> int:
        return ALERT_BIT if servo.hardware_error else 0

    def ping_params(self, servo: SimServo) -> bytes:
        return servo.spec.model_number.to_bytes(2, "little") + bytes([servo.get("firmware_version")])

    def answers(self, servo: SimServo, kind: str) -> bool:
        # Status Return Level(68): 0 answers PING only, 1 PING and READ, 2 every instruction.
        level = servo.memory[servo.spec.register("status_return_level").address]
        return kind == "ping" or level >= 2 or (kind == "read" and level >= 1)

    def check_write(self, servo: SimServo, address: int, data: bytes) -> tuple[bool, int]:
        size = len(data)
        refused = servo.touches(address, size, read_only=True) or (
            servo.get("torque_enable") and servo.touches(address, size, eeprom=True))
        if refused:
            return False, ACCESS_ERROR | self.error_byte(servo)
        touched = {r.name for r in servo.touches(address, size)}
        if servo.watchdog_tripped and touched & set(GOALS):
            return False, DATA_RANGE_ERROR | self.error_byte(servo)   # goals stay read-only until 98 is 0
        after = bytearray(servo.memory)
        after[address:address + size] = data

        def value(name: str) -> int:
            reg = servo.spec.register(name)
            return reg.decode(after[reg.address:reg.address + reg.size])

        if "baud_rate" in touched and value("baud_rate") not in servo.spec.baud_rates.values():
            return False, DATA_RANGE_ERROR | self.error_byte(servo)   # e.g. code 7 (4.5 Mbps) on an XL330
        if "status_return_level" in touched and value("status_return_level") > 2:
            return False, DATA_RANGE_ERROR | self.error_byte(servo)
        if "goal_position" in touched and value("operating_mode") == servo.spec.operating_modes["position"] and not (
                value("min_position_limit") <= value("goal_position") <= value("max_position_limit")):
            return False, DATA_LIMIT_ERROR | self.error_byte(servo)
        if "goal_velocity" in touched and abs(value("goal_velocity")) > value("velocity_limit"):
            return False, DATA_LIMIT_ERROR | self.error_byte(servo)
        if "torque_enable" in touched and value("torque_enable") and servo.shut_down:
            return False, self.error_byte(servo)   # only a reboot brings torque back after a Shutdown
        return True, self.error_byte(servo)


WIRES = {"feetech": FeetechWire, "dynamixel": DynamixelWire}
