"""The serial MotorsBus shared by Feetech and Dynamixel: tables, port life, bounded exchanges, torque safety.

A vendor module supplies a `PacketCodec` (framing, checksums), its model tables and a few hooks
(how a ping yields a model number, how EEPROM is unlocked, what error bits mean). Retries,
timeouts, error translation, sync read/write, torque safety and the raw<->rad mapping live
here once. pyserial is imported only when a port is opened.
"""
from __future__ import annotations

import abc
import errno
import importlib
import logging
import math
import threading
import time
from dataclasses import dataclass, replace
from typing import ClassVar

from edgeact.drivers.motors.bus import (Motor, MotorBusError, MotorCalibration, MotorHardwareError,
                                        MotorProtocolError, MotorState, MotorsBus, MotorTimeoutError)
from edgeact.runtime.errors import ConfigError

log = logging.getLogger(__name__)

# Short protocol name -> module exposing BUS_TYPE (imported on demand, so neither vendor loads the other).
SERIAL_PROTOCOLS = {"feetech": "edgeact.drivers.motors.feetech", "dynamixel": "edgeact.drivers.motors.dynamixel"}
READ_SLICE_S = 0.005   # pyserial read timeout: short, so an exchange's own deadline decides when to give up


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
@dataclass
class SerialBusConfig:
    port: str                           # e.g. /dev/ttyACM0, or a simulator's /dev/pts/N
    baud_rate: int = 1_000_000
    timeout_s: float = 0.05             # wait for a status packet beyond its transfer time
    retries: int = 2                    # extra attempts after a timeout or a garbled reply

    PROTOCOL: ClassVar[str] = ""
    BAUD_RATES: ClassVar[tuple[int, ...]] = ()

    def __post_init__(self):
        if not isinstance(self.port, str) or not self.port:
            raise MotorConfigError("port is empty; name the serial device, e.g. /dev/ttyACM0")
        check_baud_rate(self.PROTOCOL, self.baud_rate, self.BAUD_RATES)
        if not 0 < self.timeout_s <= 5.0:
            raise MotorConfigError(f"timeout_s {self.timeout_s} out of range; use (0, 5] seconds (0.05 suits 1 Mbaud)")
        if not isinstance(self.retries, int) or not 0 <= self.retries <= 10:
            raise MotorConfigError(f"retries {self.retries} out of range; use an integer in [0, 10]")


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


def _open_failure(port: str, exc: Exception) -> str:
    code = getattr(exc, "errno", None)
    if code in (errno.ENOENT, errno.ENODEV, errno.ENXIO):
        return f"port {port} not found; is the adapter plugged in? (list ports with `ls /dev/ttyACM* /dev/ttyUSB*`)"
    if code in (errno.EAGAIN, errno.EBUSY):
        return f"port {port} busy; is another process using it (another edgeact, a LeRobot script, a serial monitor)?"
    if code in (errno.EACCES, errno.EPERM):
        return (f"no permission to open {port}; add your user to the dialout group "
                "(`sudo usermod -aG dialout $USER`, then log in again)")
    return f"cannot open port {port} ({exc}); is it plugged in / used by another process?"


# -- the bus ------------------------------------------------------------------------------
class SerialMotorsBus(MotorsBus):
    """Named motors on one serial port speaking one vendor protocol (see feetech.py, dynamixel.py).

    Every exchange is bounded: `config.timeout_s` per reply and `config.retries` extra attempts,
    then a MotorBusError subclass that names the motor and the fix. One lock serializes the
    bus, so a watchdog thread (the mobile base's) may share it with the control loop.
    """

    CONFIG_TYPE: ClassVar[type[SerialBusConfig]]
    CODEC: ClassVar[PacketCodec]
    MODELS: ClassVar[dict[str, ModelSpec]]

    def __init__(self, config: SerialBusConfig, motors: dict[str, Motor],
                 calibration: dict[str, MotorCalibration] | None = None, disable_torque_on_exit: bool = True):
        super().__init__(motors, calibration, disable_torque_on_exit)
        if not isinstance(config, self.CONFIG_TYPE):
            raise MotorConfigError(f"{type(self).__name__} needs a {self.CONFIG_TYPE.__name__}, got {type(config).__name__}")
        self.config = config
        self.codec = self.CODEC
        self._baud_rate = config.baud_rate
        self._port = None
        self._port_errors: tuple[type[BaseException], ...] = ()
        self._port_gone = False
        self._lock = threading.RLock()
        self._validate()

    def _validate(self) -> None:
        by_id: dict[int, str] = {}
        for name, motor in self.motors.items():
            if motor.model not in self.MODELS:
                raise MotorConfigError(f"motor '{name}': model '{motor.model}' is not a {self.codec.name} model; "
                                       f"known: {', '.join(self.MODELS)}")
            if motor.mode not in self.MODELS[motor.model].operating_modes:
                raise MotorConfigError(f"motor '{name}': mode '{motor.mode}' unknown; use 'position' or 'velocity'")
            if not 0 <= motor.id <= self.codec.max_id:
                raise MotorConfigError(f"motor '{name}': id {motor.id} outside [0, {self.codec.max_id}]")
            if motor.id in by_id:
                raise MotorConfigError(f"motors '{by_id[motor.id]}' and '{name}' both have id {motor.id}; "
                                       "give each motor its own id (`edgeact motors setup`)")
            by_id[motor.id] = name
        for name, cal in self.calibration.items():
            if name not in self.motors:
                raise MotorConfigError(f"calibration for unknown motor '{name}'; motors: {', '.join(self.motors)}")
            if cal.range_min >= cal.range_max or cal.drive_mode not in (0, 1):
                raise MotorConfigError(f"motor '{name}': calibration range [{cal.range_min}, {cal.range_max}] or "
                                       f"drive_mode {cal.drive_mode} invalid; recalibrate the joint")

    # -- names ---------------------------------------------------------------------------
    @property
    def baud_rate(self) -> int:
        return self._baud_rate

    @classmethod
    def model_name(cls, model_number: int) -> str | None:
        return next((spec.name for spec in cls.MODELS.values() if spec.model_number == model_number), None)

    def model_spec(self, model: str | int | ModelSpec) -> ModelSpec:
        if isinstance(model, ModelSpec):
            return model
        name = self.model_name(model) if isinstance(model, int) else model
        if name not in self.MODELS:
            raise MotorConfigError(f"{model!r} is not a known {self.codec.name} model; known: "
                                   + ", ".join(f"{s.name} ({s.model_number})" for s in self.MODELS.values()))
        return self.MODELS[name]

    def describe_ids(self, ids: list[int]) -> str:
        names = {motor.id: name for name, motor in self.motors.items()}
        parts = [f"'{names[i]}' (id {i})" if i in names else f"id {i}" for i in ids]
        return ("motor " if len(parts) == 1 else "motors ") + ", ".join(parts)

    def _motor(self, name: str) -> tuple[Motor, ModelSpec]:
        if name not in self.motors:
            raise MotorBusError(f"unknown motor '{name}'; this bus has: {', '.join(self.motors) or 'no motors'}")
        motor = self.motors[name]
        return motor, self.MODELS[motor.model]

    def _names(self, motors: list[str] | None) -> list[str]:
        names = list(self.motors) if motors is None else list(motors)
        for name in names:
            self._motor(name)
        return names

    # -- port ----------------------------------------------------------------------------
    @property
    def is_connected(self) -> bool:
        return self._port is not None

    def _open_port(self) -> None:
        import termios

        try:
            import serial  # the optional `serial` extra: only a real connection needs it
        except ImportError:
            raise MotorBusError("pyserial is not installed; install it with `pip install 'edgeact[serial]'`") from None
        self._port_errors = (serial.SerialException, OSError, termios.error)
        try:
            self._port = serial.Serial(self.config.port, self._baud_rate, timeout=READ_SLICE_S,
                                       write_timeout=1.0, exclusive=True)
        except self._port_errors as exc:
            raise MotorPortError(_open_failure(self.config.port, exc)) from None
        self._port_gone = False

    def _close_port(self) -> None:
        port, self._port = self._port, None
        try:
            if not self._port_gone:
                port.flush()  # the last sync write (torque off) must leave before the port closes
        except self._port_errors as exc:  # gone meanwhile: nothing left to drain
            log.debug("draining %s: %s", self.config.port, exc)
        finally:
            port.close()

    def _io(self, action, *args):
        """One port operation; any failure means the port is busy or gone (unplugged, taken)."""
        try:
            return action(*args)
        except self._port_errors as exc:
            self._port_gone = True
            raise MotorPortError(f"port {self.config.port} busy or gone; is it plugged in / used by another "
                                 f"process? ({exc})") from None

    def _require_port(self) -> None:
        if self._port is None:
            raise MotorBusError(f"bus on {self.config.port} is not connected; call connect() or use a with block")
        if self._port_gone:
            raise MotorPortError(f"port {self.config.port} is gone; plug it back in and connect again")

    def set_baud_rate(self, baud_rate: int) -> None:
        """Talk at another baud rate from now on (scanning, or after a motor's baud rate changed)."""
        check_baud_rate(self.codec.name, baud_rate, self.CONFIG_TYPE.BAUD_RATES)
        with self._lock:
            if self._port is not None:
                self._io(setattr, self._port, "baudrate", baud_rate)
            self._baud_rate = baud_rate

    # -- exchanges -------------------------------------------------------------------------
    def _send(self, packet: bytes) -> None:
        self._io(self._port.reset_input_buffer)  # a late reply to an earlier request must not answer this one
        self._io(self._port.write, packet)

    def _collect(self, want: set[int] | None, max_params: int, deadline: float,
                 accept_from: dict[int, int]) -> tuple[dict[int, StatusPacket], int]:
        """Status packets until every id in `want` answered (None: all until the deadline), and the bad-byte count."""
        buf, replies, bad, received = bytearray(), {}, 0, 0
        expected = len(want or (0,)) * (self.codec.status_overhead + max_params)
        while (want is None or not want <= replies.keys()) and time.monotonic() < deadline:
            chunk = self._io(self._port.read, max(1, expected - received) if want else 4096)
            received += len(chunk)
            buf += chunk
            while True:
                status, dropped = self.codec.take_status(buf, max_params)
                bad += dropped
                if status is None:
                    break
                motor_id = accept_from.get(status.motor_id, status.motor_id)
                if motor_id in replies:  # two clean answers under one id: a collision that happened to parse
                    bad += len(status.raw) or 1
                elif want is None or motor_id in want:
                    replies[motor_id] = status
        return replies, bad + len(buf)

    def _exchange(self, packet: bytes, reply_ids: list[int], max_params: int, *, retries: int | None = None,
                  timeout_s: float | None = None, check_errors: bool = True,
                  accept_from: dict[int, int] | None = None) -> dict[int, StatusPacket]:
        """Send one instruction and collect one status packet per id in `reply_ids`, with bounded retries."""
        want = set(reply_ids)
        attempts = 1 + (self.config.retries if retries is None else retries)
        reply_bytes = len(want) * (self.codec.status_overhead + max_params)
        with self._lock:
            self._require_port()
            for _ in range(attempts):
                self._send(packet)
                if not want:
                    return {}
                wire_s = (len(packet) + reply_bytes) * 10 / self._baud_rate
                deadline = time.monotonic() + (timeout_s or self.config.timeout_s) + wire_s
                replies, bad = self._collect(want, max_params, deadline, accept_from or {})
                if want <= replies.keys():
                    break
            else:
                raise self._silence_error(sorted(want - replies.keys()), bad)
            if check_errors:
                self._check_status_errors(replies)
        return replies

    def _silence_error(self, missing: list[int], bad_bytes: int) -> MotorBusError:
        who = self.describe_ids(missing)
        if bad_bytes:
            return MotorProtocolError(
                f"{who}: garbled reply at {self._baud_rate} baud ({bad_bytes} bad bytes: wrong header or checksum); "
                "two motors may share one id (connect them one at a time and give each its own id with "
                "`edgeact motors setup`), or the wiring is noisy")
        return MotorTimeoutError(f"{who} did not answer at {self._baud_rate} baud; check power and the ID "
                                 f"(`edgeact motors scan --port {self.config.port}` lists what answers)")

    def _check_status_errors(self, replies: dict[int, StatusPacket]) -> None:
        hardware, refused = [], []
        for motor_id, status in sorted(replies.items()):
            if status.error:
                is_hardware, text = self._describe_status_error(motor_id, status.error)
                (hardware if is_hardware else refused).append(f"{self.describe_ids([motor_id])} {text}")
        if hardware:
            raise MotorHardwareError("; ".join(hardware + refused))
        if refused:
            raise MotorBusError("; ".join(refused))

    def _params_of(self, motor_id: int, status: StatusPacket, size: int) -> bytes:
        if len(status.params) != size:
            raise MotorProtocolError(f"{self.describe_ids([motor_id])} sent {len(status.params)} bytes where {size} "
                                     f"were asked; is it a {self.codec.name} motor?")
        return status.params

    # -- vendor hooks ----------------------------------------------------------------------
    @abc.abstractmethod
    def _ping_model(self, motor_id: int, retries: int, timeout_s: float | None = None) -> int:
        """Model number of `motor_id`; MotorTimeoutError when silent, MotorProtocolError when garbled."""

    @abc.abstractmethod
    def _describe_status_error(self, motor_id: int, error: int) -> tuple[bool, str]:
        """(is it a hardware fault?, words naming it and the fix) for a status packet's error byte."""

    def _ping_reply_model(self, status: StatusPacket) -> int | None:
        return None

    # -- registers by id (setup works on motors the config does not name yet) ----------------
    def read_register(self, motor_id: int, register: str, model: str | int | ModelSpec, *,
                      check_errors: bool = True) -> int:
        reg = self.model_spec(model).register(register)
        replies = self._exchange(self.codec.read(motor_id, reg.address, reg.size), [motor_id], reg.size,
                                 check_errors=check_errors)
        return reg.decode(self._params_of(motor_id, replies[motor_id], reg.size))

    def write_register(self, motor_id: int, register: str, value: int, model: str | int | ModelSpec) -> None:
        spec = self.model_spec(model)
        reg = spec.register(register)
        if reg.read_only:
            raise MotorBusError(f"register '{register}' of {spec.name} is read-only")
        data = reg.encode(value)
        with self._lock:
            if reg.eeprom:
                self._write_eeprom(motor_id, reg, data, spec)
            else:
                self._exchange(self.codec.write(motor_id, reg.address, data), [motor_id], 0)

    def _write_eeprom(self, motor_id: int, reg: Register, data: bytes, spec: ModelSpec) -> None:
        """EEPROM wants torque off; a new id answers under itself, a new baud rate takes the bus along."""
        if self.read_register(motor_id, "torque_enable", spec):
            raise MotorBusError(f"{self.describe_ids([motor_id])} has torque on; EEPROM register '{reg.name}' can "
                                "only be written with torque off (disable_torque first)")
        value = reg.decode(data)
        new_id = value if reg.name == "id" else motor_id
        self._exchange(self.codec.write(motor_id, reg.address, data), [motor_id], 0, accept_from={new_id: motor_id})
        if reg.name == "baud_rate":
            self.set_baud_rate(spec.baud_for_code(value))

    # -- registers by name ---------------------------------------------------------------------
    def read(self, register: str, motor: str) -> int:
        m, spec = self._motor(motor)
        return self.read_register(m.id, register, spec)

    def write(self, register: str, motor: str, value: int) -> None:
        m, spec = self._motor(motor)
        self.write_register(m.id, register, value, spec)

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

    def _sync_read_bytes(self, address: int, size: int, ids: list[int], check_errors: bool = True) -> dict[int, bytes]:
        replies = self._exchange(self.codec.sync_read(address, size, ids), ids, size, check_errors=check_errors)
        return {i: self._params_of(i, replies[i], size) for i in ids}

    # -- discovery -----------------------------------------------------------------------------
    def ping(self, motor_id: int) -> int | None:
        try:
            return self._ping_model(motor_id, self.config.retries)
        except MotorTimeoutError:
            return None

    def probe(self, motor_id: int, timeout_s: float | None = None) -> int | None:
        """A ping with a single attempt, as scanning wants (most ids are silent); raises when garbled."""
        try:
            return self._ping_model(motor_id, 0, timeout_s)
        except MotorTimeoutError:
            return None

    def scan(self, ids: range | list[int] | None = None) -> dict[int, int]:
        found, garbled = {}, []
        for motor_id in range(self.codec.max_id + 1) if ids is None else ids:
            try:
                model = self.probe(motor_id)
            except MotorProtocolError:
                garbled.append(motor_id)
                continue
            if model is not None:
                found[motor_id] = model
        if garbled:
            raise MotorProtocolError(
                f"id{'s' * (len(garbled) > 1)} {', '.join(map(str, garbled))} answer garbled at {self._baud_rate} baud: "
                "two motors probably share the id; connect them one at a time and give each its own id with "
                f"`edgeact motors setup` (clean answers from: {sorted(found) or 'none'})")
        return found

    def broadcast_ping(self, window_s: float) -> tuple[dict[int, int | None], int]:
        """Every answer to one broadcast ping within `window_s`: ({id: model number or None}, bad bytes)."""
        with self._lock:
            self._require_port()
            self._send(self.codec.ping(self.codec.broadcast_id))
            replies, bad = self._collect(None, self.codec.ping_params_len, time.monotonic() + window_s, {})
        return {motor_id: self._ping_reply_model(s) for motor_id, s in sorted(replies.items())}, bad

    # -- torque and motion -------------------------------------------------------------------
    def enable_torque(self, motors: list[str] | None = None) -> None:
        names = self._names(motors)
        with self._lock:
            self._hold_in_place(names)  # a stale goal would make the joint jump the instant torque comes on
            self.sync_write("torque_enable", dict.fromkeys(names, 1))
            self._expect_torque(names, True)

    def disable_torque(self, motors: list[str] | None = None) -> None:
        names = self._names(motors)
        with self._lock:
            self._stop_wheels(names)
            self.sync_write("torque_enable", dict.fromkeys(names, 0))
            self._expect_torque(names, False)
            self._hold_in_place(names)  # no stale goal is left for the next enable

    def _hold_in_place(self, names: list[str], check_errors: bool = True) -> None:
        joints = [n for n in names if self.motors[n].mode == "position"]
        if joints:
            present = self._sync_read_registers(["present_position"], joints, check_errors)["present_position"]
            self.sync_write("goal_position", present)
        self._stop_wheels(names)

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

    def send(self, goal_position_rad: dict[str, float]) -> dict[str, float]:
        raws, sent = {}, {}
        for name, rad in goal_position_rad.items():
            motor, _ = self._motor(name)
            if motor.mode != "position":
                raise MotorBusError(f"motor '{name}' is a wheel (velocity mode); drive it with send_velocity")
            if not math.isfinite(rad):
                raise MotorBusError(f"goal for motor '{name}' is {rad}; refusing to send a non-finite position")
            raws[name] = self._rad_to_raw(name, rad)
            sent[name] = self._raw_to_rad(name, raws[name])
        self.sync_write("goal_position", raws)
        return sent

    def send_velocity(self, goal_velocity_rad_s: dict[str, float]) -> dict[str, float]:
        """Wheel speeds in one transaction, clamped to each model's top speed; returns what was sent."""
        raws, sent = {}, {}
        for name, rad_s in goal_velocity_rad_s.items():
            motor, spec = self._motor(name)
            if motor.mode != "velocity":
                raise MotorBusError(f"motor '{name}' is a joint (position mode); drive it with send")
            if not math.isfinite(rad_s):
                raise MotorBusError(f"velocity for motor '{name}' is {rad_s}; refusing to send it")
            raw = round(self._sign(name) * rad_s / spec.velocity_unit_rad_s)
            raws[name] = max(-spec.max_velocity_raw, min(spec.max_velocity_raw, raw))
            sent[name] = self._sign(name) * raws[name] * spec.velocity_unit_rad_s
        self.sync_write("goal_velocity", raws)
        return sent

    def _sign(self, name: str) -> float:
        return -1.0 if self.calibration.get(name, MotorCalibration()).drive_mode else 1.0

    def _raw_to_rad(self, name: str, raw: int) -> float:
        cal = self.calibration.get(name, MotorCalibration())
        return self._sign(name) * (raw - cal.homing_offset) * self._motor(name)[1].rad_per_tick

    def _rad_to_raw(self, name: str, rad: float) -> int:
        cal = self.calibration.get(name, MotorCalibration())
        raw = round(cal.homing_offset + self._sign(name) * rad / self._motor(name)[1].rad_per_tick)
        return min(max(raw, cal.range_min), cal.range_max)

    # -- life ----------------------------------------------------------------------------------
    def connect(self) -> None:
        with self._lock:
            if self._port is not None:
                raise MotorBusError(f"bus on {self.config.port} is already connected")
            self._open_port()
            try:
                self._check_motors()
                self._apply_operating_modes()
            except BaseException:
                self._close_port()
                raise

    def _check_motors(self) -> None:
        missing, wrong = [], []
        for motor in self.motors.values():
            try:
                model = self._ping_model(motor.id, self.config.retries)
            except MotorTimeoutError:
                missing.append(motor.id)
                continue
            if model != self.MODELS[motor.model].model_number:
                wrong.append(f"{self.describe_ids([motor.id])} is model {model} ({self.model_name(model) or 'unknown'}), "
                             f"the config says {motor.model}")
        if missing:
            raise self._silence_error(missing, 0)
        if wrong:
            raise MotorConfigError("; ".join(wrong) + "; fix the model in the config or the motor's id")

    def _apply_operating_modes(self) -> None:
        """Wheels must be in velocity mode and joints in position mode before anything moves."""
        if not self.motors:
            return
        modes = self.sync_read("operating_mode")
        for name, motor in self.motors.items():
            spec = self.MODELS[motor.model]
            if modes[name] != spec.operating_modes[motor.mode]:
                log.info("motor '%s': switching to %s mode", name, motor.mode)
                self.write_register(motor.id, "torque_enable", 0, spec)
                self.write_register(motor.id, "operating_mode", spec.operating_modes[motor.mode], spec)

    def disconnect(self, disable_torque: bool | None = None) -> None:
        with self._lock:
            if self._port is None:
                return
            disable = self.disable_torque_on_exit if disable_torque is None else disable_torque
            failures = []
            try:
                if disable and self.motors:
                    failures = self._safe_stop()
            finally:
                self._close_port()
        if failures:
            raise MotorBusError(f"disconnected from {self.config.port}, but {'; '.join(failures)}; "
                                "the motors may still hold torque: cut their power")

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

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.disconnect()
        except MotorBusError as secondary:
            if exc_type is None:
                raise
            # The exception in flight says what went wrong first; keep it and log what the exit could not do.
            log.error("leaving the bus after %s: %s", exc_type.__name__, secondary)
