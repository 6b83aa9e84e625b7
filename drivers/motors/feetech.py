"""Feetech STS/SMS serial servos (protocol 0): packet codec and bus, as on SO-101 arms and the LeKiwi base."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from edgeact.drivers.motors.feetech_table import BAUD_RATES, ERROR_BITS, MODELS, STS_SMS_REGISTERS
from edgeact.drivers.motors.serial_bus import SerialMotorsBus
from edgeact.drivers.motors.serial_types import ModelSpec, PacketCodec, Register, SerialBusConfig, StatusPacket

HEADER = b"\xff\xff"


def checksum(body: bytes) -> int:
    """Protocol 0 checksum of ID..params: the low byte of the inverted sum."""
    return ~sum(body) & 0xFF


class FeetechCodec(PacketCodec):
    """`FF FF ID LEN INSTR params CHK` out, `FF FF ID LEN ERR params CHK` back; LEN = len(params) + 2."""

    name = "feetech"
    field_bytes = 1
    status_overhead = 6
    ping_params_len = 0

    def packet(self, motor_id: int, instruction: int, params: bytes = b"") -> bytes:
        if len(params) > 253:
            raise ValueError(f"{len(params)} parameter bytes do not fit one Feetech packet (253 at most)")
        body = bytes([motor_id, len(params) + 2, instruction]) + bytes(params)
        return HEADER + body + bytes([checksum(body)])

    def take_status(self, buf: bytearray, max_params: int) -> tuple[StatusPacket | None, int]:
        dropped = 0
        while True:
            start = buf.find(HEADER)
            if start < 0:
                keep = 1 if buf.endswith(b"\xff") else 0  # half a header may still be on its way
                dropped += len(buf) - keep
                del buf[: len(buf) - keep]
                return None, dropped
            dropped += start
            del buf[:start]
            if len(buf) < 4:
                return None, dropped
            motor_id, length = buf[2], buf[3]
            # 0xFE/0xFF are no motor's id, and a length beyond what was asked means a false header:
            # skip one byte and look again rather than wait for bytes that will never come.
            if motor_id > 0xFD or not 2 <= length <= max_params + 2:
                del buf[0]
                dropped += 1
                continue
            end = 4 + length
            if len(buf) < end:
                return None, dropped
            frame = bytes(buf[:end])
            if checksum(frame[2:-1]) != frame[-1]:
                del buf[0]
                dropped += 1
                continue
            del buf[:end]
            return StatusPacket(motor_id, frame[4], frame[5:-1], frame), dropped


@dataclass
class FeetechBusConfig(SerialBusConfig):
    PROTOCOL: ClassVar[str] = "feetech"
    BAUD_RATES: ClassVar[tuple[int, ...]] = tuple(BAUD_RATES)


class FeetechMotorsBus(SerialMotorsBus):
    """Feetech STS/SMS motors on one serial port (see SerialMotorsBus for the life and the API)."""

    CONFIG_TYPE = FeetechBusConfig
    CODEC = FeetechCodec()
    MODELS = MODELS

    def _ping_model(self, motor_id: int, retries: int, timeout_s: float | None = None) -> int:
        # A Feetech ping answers without params: the model number is a register read after it.
        self._exchange(self.codec.ping(motor_id), [motor_id], 0, retries=retries, timeout_s=timeout_s,
                       check_errors=False)
        reg = STS_SMS_REGISTERS["model_number"]
        replies = self._exchange(self.codec.read(motor_id, reg.address, reg.size), [motor_id], reg.size,
                                 retries=retries, timeout_s=timeout_s, check_errors=False)
        return reg.decode(self._params_of(motor_id, replies[motor_id], reg.size))

    def _describe_status_error(self, motor_id: int, error: int) -> tuple[bool, str]:
        bits = [ERROR_BITS.get(bit, (f"error bit {bit:#04x}", "power-cycle the motor"))
                for bit in (1 << i for i in range(8)) if error & bit]
        return True, f"reports {', '.join(name for name, _ in bits)}: {'; '.join(fix for _, fix in bits)}"

    def _write_eeprom(self, motor_id: int, reg: Register, data: bytes, spec: ModelSpec) -> None:
        """Open the EEPROM lock so the value survives a power cycle, write, then lock again.

        The lock closes under the id the motor answers to after the write (a new id when the
        id itself was written; the base class already moved the bus to a new baud rate)."""
        lock = spec.register("lock")
        self._exchange(self.codec.write(motor_id, lock.address, lock.encode(0)), [motor_id], 0)
        final_id = motor_id
        try:
            super()._write_eeprom(motor_id, reg, data, spec)
            if reg.name == "id":
                final_id = reg.decode(data)
        finally:
            if not self._port_gone:
                self._exchange(self.codec.write(final_id, lock.address, lock.encode(1)), [final_id], 0)


BUS_TYPE = FeetechMotorsBus
