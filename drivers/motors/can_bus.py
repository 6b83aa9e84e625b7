"""A python-can bus with bounded receive and errors translated into words that name the fix.

python-can is imported when a link opens, so importing this module needs no CAN stack.

On a robot (Linux SocketCAN, e.g. a USB-CAN adapter with gs_usb or the Jetson's mttcan):
    sudo ip link set can0 type can bitrate 1000000
    sudo ip link set can0 up
    sudo ip link set can0 txqueuelen 1000     # many motors per cycle: avoid "No buffer space available"
Tests use python-can's in-process `virtual` interface with any channel name.
"""
from __future__ import annotations

import errno

import logging
from dataclasses import dataclass

from edgeact.drivers.motors.bus import MotorBusError
from edgeact.runtime.errors import ConfigError

log = logging.getLogger(__name__)

INTERFACES = ("socketcan", "virtual", "slcan", "pcan", "gs_usb", "kvaser", "vector", "seeedstudio")
_STD_ID_MAX = 0x7FF
_DRAIN_MAX_FRAMES = 10_000      # bounds a drain even if a device floods the bus


@dataclass
class CanConfig:
    interface: str = "socketcan"
    channel: str = "can0"
    bitrate: int = 1_000_000

    def __post_init__(self):
        if self.interface not in INTERFACES:
            raise ConfigError(f"CAN interface {self.interface!r} unknown; use one of {', '.join(INTERFACES)}")
        if not self.channel:
            raise ConfigError("CAN channel is empty; use e.g. 'can0' (see `ip link show`)")
        if self.bitrate not in (125_000, 250_000, 500_000, 1_000_000):
            raise ConfigError(f"CAN bitrate {self.bitrate} not supported by Damiao motors; "
                              "use 1000000 (factory default), 500000, 250000 or 125000")


def _fix_hint(cfg: CanConfig) -> str:
    if cfg.interface == "socketcan":
        return (f"is {cfg.channel} up? `sudo ip link set {cfg.channel} up type can bitrate {cfg.bitrate}`"
                f" (list interfaces with `ip -details link show {cfg.channel}`)")
    return f"is the {cfg.interface} adapter plugged in and its driver installed?"


class CanLink:
    """One open CAN bus: send standard frames, receive with a timeout, never block forever."""

    def __init__(self, config: CanConfig):
        self.config = config
        self._bus = None
        self._can = None

    @property
    def is_open(self) -> bool:
        return self._bus is not None

    def open(self) -> None:
        try:
            import can
        except ImportError as e:
            raise MotorBusError("python-can is not installed; `pip install 'edgeact[can]'`") from e
        cfg = self.config
        try:
            self._bus = can.Bus(interface=cfg.interface, channel=cfg.channel, bitrate=cfg.bitrate)
        except (OSError, can.CanError) as e:
            raise MotorBusError(f"cannot open CAN channel {cfg.channel!r} on {cfg.interface} ({e}); "
                                f"{_fix_hint(cfg)}") from e
        self._can = can

    def close(self) -> None:
        bus, self._bus = self._bus, None
        if bus is not None:
            bus.shutdown()

    def send(self, arbitration_id: int, data: bytes) -> None:
        if self._bus is None:
            raise MotorBusError("CAN bus is not open; call connect() first (or use a `with` block)")
        if not 0 <= arbitration_id <= _STD_ID_MAX or len(data) > 8:
            raise MotorBusError(f"bad CAN frame id=0x{arbitration_id:X} len={len(data)}; ids are 11-bit, data <= 8 bytes")
        msg = self._can.Message(arbitration_id=arbitration_id, data=data, is_extended_id=False)
        try:
            self._bus.send(msg, timeout=0.1)
        except (OSError, self._can.CanError) as e:
            if getattr(e, "errno", None) == errno.ENOBUFS or getattr(e, "error_code", None) == errno.ENOBUFS:
                raise MotorBusError(
                    f"sending on CAN channel {self.config.channel!r} failed: its transmit queue is full ({e}); "
                    f"lengthen it (`sudo ip link set {self.config.channel} txqueuelen 1000`) or send fewer frames "
                    "per cycle") from e
            raise MotorBusError(
                f"sending on CAN channel {self.config.channel!r} failed ({e}); no device acknowledges frames: "
                f"check that the motors are powered, the CAN-H/CAN-L wiring, the 120 ohm termination at both "
                f"ends, and that every device runs at {self.config.bitrate} bit/s") from e

    def recv(self, timeout_s: float):
        """The next frame (a can.Message) or None once `timeout_s` has passed."""
        if self._bus is None:
            raise MotorBusError("CAN bus is not open; call connect() first (or use a `with` block)")
        try:
            return self._bus.recv(timeout=max(timeout_s, 0.0))
        except (OSError, self._can.CanError) as e:
            raise MotorBusError(f"receiving on CAN channel {self.config.channel!r} failed ({e}); "
                                f"{_fix_hint(self.config)}") from e

    def drain(self) -> list:
        """Frames already waiting (late replies of an earlier transaction), without blocking."""
        frames = []
        for _ in range(_DRAIN_MAX_FRAMES):
            msg = self.recv(0.0)
            if msg is None:
                break
            frames.append(msg)
        return frames


def is_plain_data_frame(msg) -> bool:
    """A standard-id data frame: what Damiao motors send. Error, remote and extended frames are not."""
    return not (msg.is_error_frame or msg.is_remote_frame or msg.is_extended_id)
