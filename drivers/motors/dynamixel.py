"""Dynamixel Protocol 2.0 (X-series): CRC-16, byte stuffing, packet codec and bus, with fast sync read."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

from edgeact.drivers.motors.bus import MotorBusError, MotorProtocolError, MotorTimeoutError
from edgeact.drivers.motors.dynamixel_table import (ALERT_BIT, BAUD_RATES, GARBLED_INSTRUCTION_ERRORS,
                                                    HARDWARE_ERROR_BITS, INSTRUCTION_ERRORS, MODELS)
from edgeact.drivers.motors.serial_bus import SerialMotorsBus
from edgeact.drivers.motors.serial_types import MotorConfigError, PacketCodec, SerialBusConfig, StatusPacket

log = logging.getLogger(__name__)

HEADER = b"\xff\xff\xfd\x00"
STATUS = 0x55
FAST_SYNC_READ = 0x8A


def _crc_table() -> list[int]:
    # CRC-16 with polynomial 0x8005, MSB first, no reflection (ROBOTIS' table, computed not pasted).
    rows = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = (crc << 1) ^ 0x8005 if crc & 0x8000 else crc << 1
        rows.append(crc & 0xFFFF)
    return rows


CRC_TABLE = _crc_table()


def crc16(data: bytes, crc: int = 0) -> int:
    for byte in data:
        crc = ((crc << 8) ^ CRC_TABLE[((crc >> 8) ^ byte) & 0xFF]) & 0xFFFF
    return crc


def stuff(data: bytes) -> bytes:
    """Insert FD after every FF FF FD so no header can appear inside a packet's body."""
    out = bytearray()
    for i, byte in enumerate(data):
        out.append(byte)
        if byte == 0xFD and i >= 2 and data[i - 2] == 0xFF and data[i - 1] == 0xFF:
            out.append(0xFD)
    return bytes(out)


def unstuff(data: bytes) -> bytes:
    return bytes(data).replace(b"\xff\xff\xfd\xfd", b"\xff\xff\xfd")


class DynamixelCodec(PacketCodec):
    """`FF FF FD 00 ID LEN_L LEN_H INSTR params CRC_L CRC_H`; a status packet's INSTR is 0x55 + error byte."""

    name = "dynamixel"
    field_bytes = 2
    status_overhead = 11
    ping_params_len = 3

    def packet(self, motor_id: int, instruction: int, params: bytes = b"") -> bytes:
        body = stuff(bytes([instruction]) + bytes(params))
        frame = HEADER + bytes([motor_id]) + (len(body) + 2).to_bytes(2, "little") + body
        return frame + crc16(frame).to_bytes(2, "little")

    def take_status(self, buf: bytearray, max_params: int) -> tuple[StatusPacket | None, int]:
        dropped = 0
        while True:
            start = buf.find(HEADER)
            if start < 0:
                keep = min(len(buf), 3)  # a header may straddle two reads
                dropped += len(buf) - keep
                del buf[: len(buf) - keep]
                return None, dropped
            dropped += start
            del buf[:start]
            if len(buf) < 9:
                return None, dropped
            motor_id, length = buf[4], int.from_bytes(buf[5:7], "little")
            # Stuffing can grow a body by a third at most; anything longer is a false header.
            if buf[7] != STATUS or motor_id == 0xFF or not 4 <= length <= 2 * max_params + 8:
                del buf[0]
                dropped += 1
                continue
            end = 7 + length
            if len(buf) < end:
                return None, dropped
            frame = bytes(buf[:end])
            if crc16(frame[:-2]) != int.from_bytes(frame[-2:], "little"):
                del buf[0]
                dropped += 1
                continue
            del buf[:end]
            if motor_id == self.broadcast_id:  # a fast sync read's chained blocks are not stuffed
                return StatusPacket(motor_id, frame[8], frame[9:-2], frame), dropped
            body = unstuff(frame[8:-2])
            return StatusPacket(motor_id, body[0], body[1:], frame), dropped

    def split_fast_sync_read(self, status: StatusPacket, ids: list[int], size: int) -> dict[int, StatusPacket]:
        """The blocks `ERR ID data CRC` of one fast sync read packet; each CRC covers the packet up to it."""
        frame, block = status.raw, size + 4
        if len(frame) != 8 + len(ids) * block:
            raise MotorProtocolError(f"fast sync read of ids {ids}: {len(frame)} bytes, expected {8 + len(ids) * block}")
        out = {}
        for k, motor_id in enumerate(ids):
            at = 8 + k * block
            crc_at = at + 2 + size
            if frame[at + 1] != motor_id or crc16(frame[:crc_at]) != int.from_bytes(frame[crc_at:crc_at + 2], "little"):
                raise MotorProtocolError(f"fast sync read: block {k} should come from id {motor_id} with a valid CRC")
            out[motor_id] = StatusPacket(motor_id, frame[at], frame[at + 2:crc_at])
        return out


@dataclass
class DynamixelBusConfig(SerialBusConfig):
    fast_sync_read: bool = False        # one chained status packet per sync read (X-series firmware >= 45)

    PROTOCOL: ClassVar[str] = "dynamixel"
    BAUD_RATES: ClassVar[tuple[int, ...]] = tuple(BAUD_RATES)
    HAS_BUS_WATCHDOG: ClassVar[bool] = True


class DynamixelMotorsBus(SerialMotorsBus):
    """Dynamixel X-series motors on one serial port (see SerialMotorsBus for the life and the API)."""

    CONFIG_TYPE = DynamixelBusConfig
    CODEC = DynamixelCodec()
    MODELS = MODELS

    def _validate(self) -> None:
        super()._validate()
        for name, motor in self.motors.items():   # the bus takes 4.5 Mbps; an XL330 does not (Baud Rate 0..6)
            rates = self.MODELS[motor.model].baud_rates
            if self.config.baud_rate not in rates:
                raise MotorConfigError(f"motor '{name}' ({motor.model}) does not run at {self.config.baud_rate} baud; "
                                       f"use one of {', '.join(map(str, rates))} (and set the motors to it with "
                                       "`edgeact motors setup`)")

    def _ping_model(self, motor_id: int, retries: int, timeout_s: float | None = None) -> int:
        replies = self._exchange(self.codec.ping(motor_id), [motor_id], self.codec.ping_params_len, retries=retries,
                                 timeout_s=timeout_s, check_errors=False)
        model = self._ping_reply_model(replies[motor_id])
        if model is None:
            raise MotorProtocolError(f"{self.describe_ids([motor_id])}: ping reply carries "
                                     f"{len(replies[motor_id].params)} bytes, expected 3 (model number, firmware)")
        return model

    def _ping_reply_model(self, status: StatusPacket) -> int | None:
        return int.from_bytes(status.params[:2], "little") if len(status.params) == 3 else None

    def _garbled_instruction(self, error: int) -> bool:
        # CRC error, data length error: bytes lost or flipped on the way to the motor; it executed nothing.
        return (error & 0x7F) in GARBLED_INSTRUCTION_ERRORS

    def _describe_status_error(self, motor_id: int, error: int) -> tuple[bool, str]:
        if error & ALERT_BIT:
            try:  # the alert bit only says "something"; the hardware error register says what
                bits = self.read_register(motor_id, "hardware_error_status", next(iter(MODELS.values())),
                                          check_errors=False)
            except MotorBusError:
                bits = 0
            found = [HARDWARE_ERROR_BITS.get(1 << i, (f"error bit {1 << i:#04x}", "power-cycle the motor"))
                     for i in range(8) if bits & 1 << i] or [("a hardware alert", "reboot or power-cycle the motor")]
            return True, f"reports {', '.join(n for n, _ in found)}: {'; '.join(f for _, f in found)}"
        code = error & 0x7F
        return False, f"refused the instruction: {INSTRUCTION_ERRORS.get(code, f'error code {code}')}"

    def _sync_read_bytes(self, address: int, size: int, ids: list[int], check_errors: bool = True) -> dict[int, bytes]:
        if not self.config.fast_sync_read:
            return super()._sync_read_bytes(address, size, ids, check_errors)
        packet = self.codec.sync_read(address, size, ids, FAST_SYNC_READ)
        try:
            reply = self._exchange(packet, [self.codec.broadcast_id], len(ids) * (size + 4), check_errors=False)
            blocks = self.codec.split_fast_sync_read(reply[self.codec.broadcast_id], ids, size)
        except (MotorTimeoutError, MotorProtocolError) as exc:
            # One silent motor breaks the whole chained packet; a plain sync read names the culprit.
            log.warning("fast sync read failed (%s); retrying as a plain sync read", exc)
            return super()._sync_read_bytes(address, size, ids, check_errors)
        if check_errors:
            self._check_status_errors(blocks)
        return {i: self._params_of(i, blocks[i], size) for i in ids}


BUS_TYPE = DynamixelMotorsBus
