"""Serial-bus vocabulary shared by Feetech and Dynamixel: register tables, packet codecs, config, protocol registry."""
from __future__ import annotations

import abc
import importlib
import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, ClassVar

from edgeact.drivers.motors.bus import Motor, MotorBusError, MotorCalibration, bus_watchdog_units
from edgeact.runtime.errors import ConfigError

if TYPE_CHECKING:  # annotations only: serial_bus imports this module, so a runtime import would be circular
    from edgeact.drivers.motors.serial_bus import SerialMotorsBus

# Short protocol name -> module exposing BUS_TYPE (imported on demand, so neither vendor loads the other).
SERIAL_PROTOCOLS = {"feetech": "edgeact.drivers.motors.feetech", "dynamixel": "edgeact.drivers.motors.dynamixel"}


class MotorPortError(MotorBusError):
    """The serial port cannot be opened, is busy, or vanished mid-run."""


class MotorConfigError(MotorBusError, ConfigError):
    """A bus or motor setting is invalid (bad baud rate, unknown model, duplicate id ...)."""


# -- register tables ---------------------------------------------------------------------
@dataclass(frozen=True)
class Register:
    """One entry of a control table; values are little-endian on both vendors' wires."""

    address: int
    size: int                       # bytes
    eeprom: bool = False            # persisted: written with torque off (and Feetech's lock open)
    read_only: bool = False
    signed: bool = False            # two's complement (Dynamixel)
    sign_bit: int | None = None     # sign-magnitude with this bit as the sign (Feetech)
    name: str = ""

    def encode(self, value: int) -> bytes:
        value = int(value)
        if self.sign_bit is not None:
            if abs(value) >= 1 << self.sign_bit:
                raise MotorBusError(f"value {value} does not fit register '{self.name}' (magnitude below {1 << self.sign_bit})")
            raw = abs(value) | ((1 << self.sign_bit) if value < 0 else 0)
        elif self.signed:
            half = 1 << (8 * self.size - 1)
            if not -half <= value < half:
                raise MotorBusError(f"value {value} does not fit register '{self.name}' ([{-half}, {half - 1}])")
            raw = value & ((1 << 8 * self.size) - 1)
        else:
            if not 0 <= value < 1 << 8 * self.size:
                raise MotorBusError(f"value {value} does not fit register '{self.name}' ([0, {(1 << 8 * self.size) - 1}])")
            raw = value
        return raw.to_bytes(self.size, "little")

    def decode(self, data: bytes) -> int:
        raw = int.from_bytes(bytes(data[: self.size]), "little")
        if self.sign_bit is not None:
            magnitude = raw & ((1 << self.sign_bit) - 1)
            return -magnitude if raw >> self.sign_bit & 1 else magnitude
        if self.signed and raw >> (8 * self.size - 1):
            return raw - (1 << 8 * self.size)
        return raw


def table(**registers: Register) -> dict[str, Register]:
    """A control table keyed by register name (each Register learns its own name)."""
    return {name: replace(reg, name=name) for name, reg in registers.items()}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    model_number: int
    registers: dict[str, Register]
    baud_rates: dict[int, int]          # baud rate -> value of the baud_rate register
    operating_modes: dict[str, int]     # Motor.mode -> value of the operating_mode register
    setup_defaults: dict[str, int]      # known-safe values `edgeact motors setup` writes
    velocity_unit_rad_s: float          # one raw unit of present/goal velocity
    max_velocity_raw: int               # goal velocity clamp (about the no-load speed)
    resolution_ticks: int = 4096        # encoder ticks per turn

    @property
    def rad_per_tick(self) -> float:
        return 2 * math.pi / self.resolution_ticks

    def register(self, name: str) -> Register:
        if name not in self.registers:
            raise MotorBusError(f"{self.name} has no register '{name}'; known: {', '.join(sorted(self.registers))}")
        return self.registers[name]

    def baud_for_code(self, code: int) -> int:
        for baud, value in self.baud_rates.items():
            if value == code:
                return baud
        raise MotorBusError(f"{self.name}: baud_rate register value {code} unknown; known: {sorted(self.baud_rates.values())}")


# -- packets -------------------------------------------------------------------------------
@dataclass(frozen=True)
class StatusPacket:
    motor_id: int
    error: int
    params: bytes
    raw: bytes = b""                    # the whole frame as received (Dynamixel's fast sync read splits it)


class PacketCodec(abc.ABC):
    """One protocol's bytes: builds instruction packets and takes status packets out of a stream."""

    name: ClassVar[str]
    field_bytes: ClassVar[int]          # width of the address and length fields (Feetech 1, Dynamixel 2)
    status_overhead: ClassVar[int]      # bytes of a status packet besides its params
    ping_params_len: ClassVar[int]      # params of a ping's status packet
    broadcast_id: ClassVar[int] = 0xFE
    max_id: ClassVar[int] = 252
    PING, READ, WRITE, REG_WRITE, ACTION, SYNC_READ, SYNC_WRITE = 0x01, 0x02, 0x03, 0x04, 0x05, 0x82, 0x83

    @abc.abstractmethod
    def packet(self, motor_id: int, instruction: int, params: bytes = b"") -> bytes: ...

    @abc.abstractmethod
    def take_status(self, buf: bytearray, max_params: int) -> tuple[StatusPacket | None, int]:
        """Remove the first valid status packet (at most `max_params` params) from `buf`.

        Returns it (None: more bytes are needed) and how many bytes were dropped as garbage,
        bad headers or bad checksums on the way."""

    def _field(self, value: int) -> bytes:
        return int(value).to_bytes(self.field_bytes, "little")

    def ping(self, motor_id: int) -> bytes:
        return self.packet(motor_id, self.PING)

    def read(self, motor_id: int, address: int, size: int) -> bytes:
        return self.packet(motor_id, self.READ, self._field(address) + self._field(size))

    def write(self, motor_id: int, address: int, data: bytes, instruction: int = WRITE) -> bytes:
        return self.packet(motor_id, instruction, self._field(address) + bytes(data))

    def sync_read(self, address: int, size: int, ids: list[int], instruction: int = SYNC_READ) -> bytes:
        return self.packet(self.broadcast_id, instruction, self._field(address) + self._field(size) + bytes(ids))

    def sync_write(self, address: int, size: int, data_by_id: dict[int, bytes]) -> bytes:
        body = b"".join(bytes([motor_id]) + bytes(data) for motor_id, data in data_by_id.items())
        return self.packet(self.broadcast_id, self.SYNC_WRITE, self._field(address) + self._field(size) + body)


# -- config and registry ---------------------------------------------------------------
WATCHDOG_UNIT_S = 0.02   # the Dynamixel bus_watchdog register's unit


@dataclass
class SerialBusConfig:
    port: str                           # e.g. /dev/ttyACM0, or a simulator's /dev/pts/N
    baud_rate: int = 1_000_000
    timeout_s: float = 0.05             # wait for a status packet beyond its transfer time
    retries: int = 2                    # extra attempts after a timeout or a garbled reply
    # Dynamixel Bus Watchdog (register 98): with torque on, each motor stops by itself once no instruction
    # has reached it for this long, so a host that dies (SIGKILL, segfault, OOM) cannot leave wheels driving.
    # None or 0: off. Set it a few control periods above the loop's worst pause (0.1-0.2 s at 100 Hz);
    # 0.02-2.54 s in 20 ms steps. Feetech motors have no such register.
    bus_watchdog_s: float | None = None

    PROTOCOL: ClassVar[str] = ""
    BAUD_RATES: ClassVar[tuple[int, ...]] = ()
    HAS_BUS_WATCHDOG: ClassVar[bool] = False

    def __post_init__(self):
        if not isinstance(self.port, str) or not self.port:
            raise MotorConfigError("port is empty; name the serial device, e.g. /dev/ttyACM0")
        check_baud_rate(self.PROTOCOL, self.baud_rate, self.BAUD_RATES)
        if not 0 < self.timeout_s <= 5.0:
            raise MotorConfigError(f"timeout_s {self.timeout_s} out of range; use (0, 5] seconds (0.05 suits 1 Mbaud)")
        if not isinstance(self.retries, int) or not 0 <= self.retries <= 10:
            raise MotorConfigError(f"retries {self.retries} out of range; use an integer in [0, 10]")
        self._watchdog_units = self._checked_watchdog_units()   # once: goal writes read it every control tick

    @property
    def bus_watchdog_units(self) -> int:
        """bus_watchdog_s in the register's 20 ms units (0: off)."""
        return self._watchdog_units

    def _checked_watchdog_units(self) -> int:
        if self.bus_watchdog_s not in (None, 0) and not self.HAS_BUS_WATCHDOG:   # before its range: no value works
            raise MotorConfigError(f"bus_watchdog_s {self.bus_watchdog_s}: {self.PROTOCOL} motors have no bus "
                                   "watchdog register (a Dynamixel Protocol 2.0 feature); remove bus_watchdog_s or "
                                   "set it to None")
        return bus_watchdog_units(self.bus_watchdog_s, WATCHDOG_UNIT_S, 127, MotorConfigError, steps=" in 20 ms steps")


def check_baud_rate(protocol: str, baud_rate: int, supported: tuple[int, ...]) -> None:
    if baud_rate not in supported:
        raise MotorConfigError(f"baud rate {baud_rate} not supported by {protocol} motors; "
                               f"use one of {', '.join(str(b) for b in supported)}")


def serial_bus_class(protocol: str) -> type["SerialMotorsBus"]:
    if protocol not in SERIAL_PROTOCOLS:
        raise MotorConfigError(f"unknown serial protocol {protocol!r}; use one of {', '.join(SERIAL_PROTOCOLS)}")
    return importlib.import_module(SERIAL_PROTOCOLS[protocol]).BUS_TYPE


def make_serial_bus(protocol: str, port: str, motors: dict[str, Motor] | None = None,
                    calibration: dict[str, MotorCalibration] | None = None,
                    disable_torque_on_exit: bool = True, **options) -> "SerialMotorsBus":
    """A bus by protocol name; `options` are fields of that protocol's config (baud_rate, timeout_s ...)."""
    bus_type = serial_bus_class(protocol)
    return bus_type(bus_type.CONFIG_TYPE(port=port, **options), motors or {}, calibration, disable_torque_on_exit)
