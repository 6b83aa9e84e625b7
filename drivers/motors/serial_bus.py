"""SerialMotorsBus: one serial port, its bounded exchanges, registers by id, discovery and the bus's life."""
from __future__ import annotations

import abc
import errno
import logging
import threading
import time
from typing import ClassVar

from edgeact.drivers.motors.bus import (Motor, MotorBusError, MotorCalibration, MotorHardwareError,
                                        MotorProtocolError, MotorsBus, MotorTimeoutError)
from edgeact.drivers.motors.serial_motion import SerialMotion, check_calibration
from edgeact.drivers.motors.serial_types import (ModelSpec, MotorConfigError, MotorPortError, PacketCodec, Register,
                                                 SerialBusConfig, StatusPacket, check_baud_rate)
# This module used to hold the whole serial vocabulary; what was importable from it still is.
from edgeact.drivers.motors.bus import MotorState  # noqa: F401
from edgeact.drivers.motors.serial_types import SERIAL_PROTOCOLS, make_serial_bus, serial_bus_class, table  # noqa: F401
from edgeact.runtime.errors import ConfigError  # noqa: F401

log = logging.getLogger(__name__)

READ_SLICE_S = 0.005   # pyserial read timeout: short, so an exchange's own deadline decides when to give up


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
class SerialMotorsBus(SerialMotion, MotorsBus):
    """Named motors on one serial port speaking one vendor protocol (see feetech.py, dynamixel.py).

    Every exchange is bounded: `config.timeout_s` per reply and `config.retries` extra attempts,
    then a MotorBusError subclass that names the motor and the fix. One lock serializes the
    bus, so a watchdog thread (the mobile base's) may share it with the control loop. A vendor
    supplies the codec, model tables and hooks below; the named-motor calls come from SerialMotion.
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
        self._watchdog_fed_s: dict[str, float] = {}   # motor -> last goal or arming write (bus_watchdog_s)
        self._velocity_limit_raw: dict[str, int] = {}  # wheel -> its Velocity Limit register (SerialMotion)
        # joint -> its (Min, Max) Position Limit registers where they set a limit: read at connect and enable_torque,
        # and where write() changes them (SerialMotion); send clamps to them from this cache, no read per tick.
        self._position_limit_raw: dict[str, tuple[int, int]] = {}
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
            check_calibration(self.MODELS[self.motors[name].model], cal, name)

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
            for attempt in range(attempts):
                self._send(packet)
                if not want:
                    return {}
                wire_s = (len(packet) + reply_bytes) * 10 / self._baud_rate
                deadline = time.monotonic() + (timeout_s or self.config.timeout_s) + wire_s
                replies, bad = self._collect(want, max_params, deadline, accept_from or {})
                if want <= replies.keys():
                    # A motor that got the instruction garbled refused it unexecuted: send it again, as a garbled
                    # reply is asked again (noise hits both directions of the line).
                    if attempt + 1 < attempts and any(self._garbled_instruction(s.error) for s in replies.values()):
                        continue
                    break
            else:
                raise self._silence_error(sorted(want - replies.keys()), bad)
            if check_errors:
                self._check_status_errors(replies)
        return replies

    def _garbled_instruction(self, error: int) -> bool:
        """Whether a status error says the motor received the instruction corrupted (and so did not execute it)."""
        return False

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

    # Under every named-motor sync read; Dynamixel overrides it with the fast sync read.
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


    # -- life ----------------------------------------------------------------------------------
    def connect(self) -> None:
        self._connect(write=True)

    def connect_read_only(self) -> list[str]:
        """The motors checked as `connect` does; a motor in another operating mode is not switched but told."""
        return self._connect(write=False)

    def _connect(self, write: bool) -> list[str]:
        with self._lock:
            if self._port is not None:
                raise MotorBusError(f"bus on {self.config.port} is already connected")
            self._open_port()
            try:
                self._check_motors()
                wrong = self._wrong_operating_modes()
                if write:
                    self._apply_operating_modes(wrong)
                self._position_limit_raw.clear()
                narrow = self._read_position_limits(list(self.motors))
            except BaseException:
                self._close_port()
                raise
        if write:
            for words in narrow.values():
                log.warning("%s", words)
        modes = [f"motor '{name}' is in {mode} mode, the config says {self.motors[name].mode}: `edgeact run` "
                 "switches it as it connects, with its torque off (a joint holding goes limp meanwhile: support the "
                 "arm)" for name, mode in wrong.items()]
        return modes + list(narrow.values())

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

    def _wrong_operating_modes(self) -> dict[str, str]:
        """{motor: the mode it is in} for each motor not in the config's mode (a value no mode has: its number)."""
        if not self.motors:
            return {}
        modes = self.sync_read("operating_mode")
        wrong = {}
        for name, motor in self.motors.items():
            spec = self.MODELS[motor.model]
            if modes[name] != spec.operating_modes[motor.mode]:
                names = {value: mode for mode, value in spec.operating_modes.items()}
                wrong[name] = names.get(modes[name], f"operating_mode {modes[name]}")
        return wrong

    def _apply_operating_modes(self, wrong: dict[str, str]) -> None:
        """Wheels must be in velocity mode and joints in position mode before anything moves."""
        for name in wrong:
            motor = self.motors[name]
            spec = self.MODELS[motor.model]
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
