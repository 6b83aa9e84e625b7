"""A simulated serial servo bus on a pty: the real driver opens `.port` like /dev/ttyUSB0 and hears real packets.

    with SimServoBus("feetech", ids=[1, 2, 3]) as sim:
        bus = FeetechMotorsBus(FeetechBusConfig(port=sim.port), motors)

A thread parses the instruction packets of the configured protocol and answers with real
status packets (checksums/CRC, stuffing) from each simulated motor's control table. Motors
only hear the baud rate the driver set on the pty (read back with TCGETS2). Faults are
injectable: dropped, corrupted or garbled replies, raw noise, motor error bits, silent
motors, duplicate ids (their replies collide), and `unplug()` (the port vanishes).
"""
from __future__ import annotations

import array
import collections
import fcntl
import os
import select
import threading
import tty
from dataclasses import dataclass

from edgeact.drivers.motors import dynamixel_table, feetech_table
from edgeact.drivers.motors.serial_types import ModelSpec
from edgeact.drivers.sim.servo_motor import SimServo
from edgeact.drivers.sim.servo_wire import WIRES, Instruction, SimWire, collide

PING, READ, WRITE, REG_WRITE, ACTION = 0x01, 0x02, 0x03, 0x04, 0x05
SYNC_READ, SYNC_WRITE, FAST_SYNC_READ = 0x82, 0x83, 0x8A
CRC_ERROR = 3           # Protocol 2.0 status error: the instruction's CRC did not match
BROADCAST_ID = 0xFE
TCGETS2 = 0x802C542A   # Linux ioctl: struct termios2, whose c_ospeed is the slave's numeric baud rate
IDLE_S = 0.02          # a packet stalled this long is abandoned, like a servo's inter-byte timeout


@dataclass(frozen=True)
class _Family:
    models: dict[str, ModelSpec]
    default_model: str
    wrap_ticks: int | None
    factory: dict[str, dict[str, int]]     # model -> its own factory values of registers (beyond the generic ones)


FAMILIES = {"feetech": _Family(feetech_table.MODELS, "sts3215", 4096, {}),
            "dynamixel": _Family(dynamixel_table.MODELS, "xl430-w250", None,
                                 {name: {"shutdown": shutdown} for name, shutdown in
                                  dynamixel_table.SHUTDOWN_FACTORY.items()})}


@dataclass
class SimFaults:
    """Faults for the next replies; each counter is spent one reply (one instruction's answer) at a time."""

    drop: int = 0           # the reply vanishes: the driver times out
    corrupt: int = 0        # the reply's last byte (checksum / CRC) is flipped
    garble: int = 0         # the reply is replaced by noise of the same length
    prefix_count: int = 0   # the next replies are preceded by `prefix` (noise the driver must skip)
    prefix: bytes = b""
    # The next instructions reach the motors damaged (noise on the way out): nothing is executed; a Dynamixel
    # (Protocol 2.0) answers its CRC error status (error 3), a Feetech ignores the packet (no answer).
    damaged_instruction: int = 0

    def apply(self, reply: bytes) -> bytes:
        if self.drop:
            self.drop -= 1
            return b""
        if self.garble:
            self.garble -= 1
            reply = bytes((0xA5 + 7 * i) & 0xFF for i in range(len(reply)))  # never FF FF: no header in it
        elif self.corrupt:
            self.corrupt -= 1
            reply = reply[:-1] + bytes([reply[-1] ^ 0xFF])
        if self.prefix_count:
            self.prefix_count -= 1
            reply = self.prefix + reply
        return reply


class SimServoBus:
    def __init__(self, protocol: str = "feetech", ids=(1,), model: str | None = None, baud_rate: int = 1_000_000,
                 *, max_speed_ticks_s: float = 3000.0, fast_sync_read: bool = True):
        if protocol not in FAMILIES:
            raise ValueError(f"unknown protocol {protocol!r}; the simulator speaks {', '.join(FAMILIES)}")
        self.protocol = protocol
        self.wire: SimWire = WIRES[protocol]()
        self.family = FAMILIES[protocol]
        self.default_model = model or self.family.default_model
        self.default_baud_rate = baud_rate
        self.max_speed_ticks_s = max_speed_ticks_s
        self.fast_sync_read = fast_sync_read       # answer 0x8A (X-series firmware >= 45); False: stay silent
        self.faults = SimFaults()
        self.received: collections.deque[Instruction] = collections.deque(maxlen=10_000)
        self.servos: list[SimServo] = []
        self.port: str | None = None
        self.lock = threading.RLock()              # hold it to inspect servos while the bus runs
        self._master: int | None = None
        self._slave: int | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._idle = threading.Condition()
        self._idle_passes = 0                     # quiet polls with nothing pending (see wait_idle)
        for motor_id in ids:
            self.add_motor(motor_id)

    # -- motors ------------------------------------------------------------------------------
    def add_motor(self, motor_id: int, model: str | None = None, baud_rate: int | None = None,
                  position_ticks: int = 2048) -> SimServo:
        name = model or self.default_model
        if name not in self.family.models:
            raise ValueError(f"{name!r} is not a {self.protocol} model; known: {', '.join(self.family.models)}")
        spec = self.family.models[name]
        baud = baud_rate or self.default_baud_rate
        if baud not in spec.baud_rates:
            raise ValueError(f"{name} does not run at {baud} baud; use one of {', '.join(map(str, spec.baud_rates))}")
        servo = SimServo(spec, motor_id, baud, position_ticks=position_ticks,
                         max_speed_ticks_s=self.max_speed_ticks_s, wrap_ticks=self.family.wrap_ticks,
                         factory=self.family.factory.get(name))
        with self.lock:
            self.servos.append(servo)
        return servo

    def servo(self, motor_id: int) -> SimServo:
        with self.lock:
            found = [s for s in self.servos if s.id == motor_id]
        if len(found) != 1:
            raise KeyError(f"{len(found)} simulated motors have id {motor_id}")
        return found[0]

    def register(self, motor_id: int, name: str) -> int:
        with self.lock:
            return self.servo(motor_id).get(name)

    def set_register(self, motor_id: int, name: str, value: int) -> None:
        with self.lock:
            self.servo(motor_id).set(name, value)

    def inject_error(self, motor_id: int, bits: int) -> None:
        """Vendor error bits (feetech_table.ERROR_BITS / dynamixel_table.HARDWARE_ERROR_BITS); 0 clears.

        A Dynamixel shuts down on the bits set in its Shutdown(63): torque off, and refused until a power cycle
        (or until the bits are cleared here)."""
        with self.lock:
            self.servo(motor_id).set_hardware_error(bits)

    def send_garbage(self, data: bytes) -> None:
        """Unsolicited noise on the line, now."""
        self._write(data)

    # -- life ----------------------------------------------------------------------------------
    def start(self) -> "SimServoBus":
        if self._thread is not None:
            raise RuntimeError(f"simulated bus already running on {self.port}")
        master, slave = os.openpty()
        tty.setraw(slave)          # no echo of the driver's bytes before pyserial configures the line
        os.set_blocking(master, False)
        # Holding the slave open keeps the master readable between driver connections.
        self._master, self._slave, self.port = master, slave, os.ttyname(slave)
        self._stop.clear()
        self._thread = threading.Thread(target=self._serve, name=f"sim-{self.protocol}-bus", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop answering and close the pty; its path disappears. Safe to call twice."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stop.set()
            thread.join(timeout=5.0)
        for fd in (self._master, self._slave):
            if fd is not None:
                os.close(fd)
        self._master = self._slave = None

    def unplug(self) -> None:
        """The adapter vanishes mid-run: the driver's next read or write fails."""
        self.stop()

    def wait_idle(self, timeout_s: float = 5.0) -> None:
        """Return once every byte written to the port so far has been answered (sync writes get no answer)."""
        with self._idle:
            # The second quiet poll after this call began after it too, so it saw every earlier byte.
            target = self._idle_passes + 2
            if not self._idle.wait_for(lambda: self._idle_passes >= target or not self.running, timeout_s):
                raise TimeoutError(f"simulated bus on {self.port} still busy after {timeout_s} s")

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> "SimServoBus":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- the wire ------------------------------------------------------------------------------
    def _serve(self) -> None:
        buf = bytearray()
        while not self._stop.is_set():
            ready, _, _ = select.select([self._master], [], [], IDLE_S)
            if ready:
                try:
                    buf += os.read(self._master, 4096)
                except BlockingIOError:
                    continue
                except OSError:    # EIO while no process holds the slave: wait, do not spin
                    self._stop.wait(IDLE_S)
                    continue
            elif buf:
                del buf[0]         # a stalled partial packet: drop a byte and look for a header again
            else:
                with self._idle:
                    self._idle_passes += 1
                    self._idle.notify_all()
            while (instruction := self.wire.take_instruction(buf)) is not None:
                self._answer(instruction)

    def _line_baud(self) -> int | None:
        termios2 = array.array("I", [0] * 11)   # 4 flag words, c_line + 19 c_cc (5 words), ispeed, ospeed
        try:
            fcntl.ioctl(self._master, TCGETS2, termios2)
        except OSError:
            return None                          # not Linux: every motor hears every baud rate
        return termios2[10]

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view and self._master is not None:
            try:
                view = view[os.write(self._master, view):]
            except (BlockingIOError, OSError):   # nobody reads or the pty is gone: the bytes are lost
                return

    def _answer(self, instruction: Instruction) -> None:
        with self.lock:
            self.received.append(instruction)
            baud = self._line_baud()
            live = [s for s in self.servos if s.powered and (baud is None or s.baud_rate == baud)]
            addressed = self._addressed(instruction, live)
            if self.faults.damaged_instruction:
                self.faults.damaged_instruction -= 1
                reply = self._damaged_reply(instruction, addressed)
            else:
                for servo in addressed:
                    servo.heard()
                reply = self._dispatch(instruction, live)
            reply = self.faults.apply(reply) if reply else reply
        if reply:
            self._write(reply)

    def _addressed(self, ins: Instruction, live: list[SimServo]) -> list[SimServo]:
        """The servos an instruction packet speaks to (its id, or the ids a sync read / write names)."""
        if ins.motor_id != BROADCAST_ID:
            return [s for s in live if s.id == ins.motor_id]
        if ins.code in (SYNC_READ, FAST_SYNC_READ):
            ids = set(self.wire.address_size(ins.params)[2])
        elif ins.code == SYNC_WRITE:
            _, size, rest = self.wire.address_size(ins.params)
            ids = {rest[at] for at in range(0, len(rest) - size, size + 1)}
        else:
            return live
        return [s for s in live if s.id in ids]

    def _damaged_reply(self, ins: Instruction, addressed: list[SimServo]) -> bytes:
        """What motors answer to an instruction whose CRC does not match: Protocol 2.0's error 3 from each motor
        that would have answered (broadcast writes get no answer); Feetech firmware drops the packet."""
        answers = ins.motor_id != BROADCAST_ID or ins.code in (PING, SYNC_READ, FAST_SYNC_READ)
        if self.protocol != "dynamixel" or not answers:
            return b""
        return b"".join(self.wire.status(s.id, CRC_ERROR) for s in sorted(addressed, key=lambda s: s.id)
                        if self.wire.answers(s, _kind(ins.code)))

    def _dispatch(self, ins: Instruction, live: list[SimServo]) -> bytes:
        wire = self.wire
        if ins.motor_id != BROADCAST_ID:
            return _one_voice([self._unicast(s, ins) for s in live if s.id == ins.motor_id])
        if ins.code == PING:
            if wire.broadcast_ping_collides:
                return _one_voice([wire.status(s.id, wire.error_byte(s), wire.ping_params(s)) for s in live])
            ids = sorted({s.id for s in live})   # Protocol 2.0: one after another, in id order
            return b"".join(_one_voice([wire.status(s.id, wire.error_byte(s), wire.ping_params(s))
                                        for s in live if s.id == i]) for i in ids)
        if ins.code == SYNC_READ:
            address, size, ids = wire.address_size(ins.params)
            return b"".join(_one_voice([wire.status(s.id, wire.error_byte(s), s.read_bytes(address, size))
                                        for s in live if s.id == i and wire.answers(s, "read")]) for i in ids)
        if ins.code == FAST_SYNC_READ and self.protocol == "dynamixel" and self.fast_sync_read:
            address, size, ids = wire.address_size(ins.params)
            blocks = []
            for motor_id in ids:
                found = [s for s in live if s.id == motor_id and wire.answers(s, "read")]
                if len(found) != 1:
                    break          # the chain breaks at a silent or doubled id: the packet stays short
                blocks.append((wire.error_byte(found[0]), motor_id, found[0].read_bytes(address, size)))
            return wire.fast_sync_read_status(blocks, len(ids), size) if blocks else b""
        if ins.code == SYNC_WRITE:
            address, size, rest = wire.address_size(ins.params)
            for at in range(0, len(rest) - size, size + 1):
                for servo in (s for s in live if s.id == rest[at]):
                    self._apply_write(servo, address, rest[at + 1:at + 1 + size])
        elif ins.code == WRITE:
            address, data = wire.address_data(ins.params)
            for servo in live:
                self._apply_write(servo, address, data)
        elif ins.code == ACTION:
            for servo in live:
                _act(servo)
        return b""   # broadcasts other than ping and reads get no answer

    def _unicast(self, servo: SimServo, ins: Instruction) -> bytes:
        reply = self._execute(servo, ins)
        return reply if reply and self.wire.answers(servo, _kind(ins.code)) else b""

    def _execute(self, servo: SimServo, ins: Instruction) -> bytes:
        """Carry out an instruction addressed to `servo` alone; the status packet it would send."""
        wire = self.wire
        if ins.code == PING:
            return wire.status(servo.id, wire.error_byte(servo), wire.ping_params(servo))
        if ins.code == READ:
            address, size, _ = wire.address_size(ins.params)
            return wire.status(servo.id, wire.error_byte(servo), servo.read_bytes(address, size))
        if ins.code in (WRITE, REG_WRITE):
            address, data = wire.address_data(ins.params)
            if ins.code == REG_WRITE:   # checked as it is staged: a refused value is never staged
                stage, error = wire.check_write(servo, address, data)
                if stage:
                    servo.staged = (address, data)
                return wire.status(servo.id, error)
            error = self._apply_write(servo, address, data)
            return wire.status(servo.id, error)   # after an id change the motor answers as its new self
        if ins.code == ACTION:
            _act(servo)
            return wire.status(servo.id, wire.error_byte(servo))
        return b""   # instructions the simulator does not model stay unanswered

    def _apply_write(self, servo: SimServo, address: int, data: bytes) -> int:
        apply, error = self.wire.check_write(servo, address, data)
        if apply:
            servo.write_bytes(address, data)
        return error


def _kind(code: int) -> str:
    """The instruction's class for Status Return Level(68): "ping", "read" or "write" (all the others)."""
    return "ping" if code == PING else "read" if code in (READ, SYNC_READ, FAST_SYNC_READ) else "write"


def _one_voice(replies: list[bytes]) -> bytes:
    """One motor's reply as is; several motors under one id talk over each other."""
    replies = [r for r in replies if r]
    return collide(replies) if len(replies) > 1 else (replies[0] if replies else b"")


def _act(servo: SimServo) -> None:
    if servo.staged is not None:
        address, data = servo.staged
        servo.staged = None
        servo.write_bytes(address, data)
