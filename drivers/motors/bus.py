"""The motor-bus interface: one life and one vocabulary whether bytes go over serial or CAN."""
from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field

from edgeact.runtime.errors import EdgeactError


class MotorBusError(EdgeactError):
    """A bus or motor failure, translated at the boundary into words that name the fix."""


class MotorTimeoutError(MotorBusError):
    """A motor did not answer within the bounded timeout (after the bounded retries)."""


class MotorProtocolError(MotorBusError):
    """Garbage, a bad checksum, or a malformed packet on the wire."""


class MotorHardwareError(MotorBusError):
    """A motor reported error bits (overload, overheat, voltage ...)."""


@dataclass
class Motor:
    id: int
    model: str                      # key into the vendor's model table, e.g. "sts3215", "xl430-w250", "dm4310"
    mode: str = "position"          # "position" (joints) or "velocity" (wheels)


@dataclass
class MotorCalibration:
    """Maps raw encoder units to radians: rad = sign * (raw - homing_offset) * rad_per_tick."""

    homing_offset: int = 0          # raw reading at the joint's zero
    range_min: int = 0              # raw limits found by moving the joint through its range
    range_max: int = 4095
    drive_mode: int = 0             # 0: raw increases with the joint angle, 1: inverted

    def to_dict(self) -> dict:
        return {"homing_offset": self.homing_offset, "range_min": self.range_min,
                "range_max": self.range_max, "drive_mode": self.drive_mode}


@dataclass
class MotorState:
    """One synchronous read: every motor's position and velocity at (nearly) one instant."""

    position_rad: dict[str, float] = field(default_factory=dict)
    velocity_rad_s: dict[str, float] = field(default_factory=dict)
    timestamp_s: float = math.nan   # time.monotonic() when the read completed


class MotorsBus(abc.ABC):
    """A set of named motors on one bus.

    Life: `connect()` ... `disconnect()` or a `with` block; leaving the block, including by
    an exception or Ctrl-C, turns torque off unless `disable_torque_on_exit=False`.
    """

    def __init__(self, motors: dict[str, Motor], calibration: dict[str, MotorCalibration] | None = None,
                 disable_torque_on_exit: bool = True):
        self.motors = dict(motors)
        self.calibration = dict(calibration or {})
        self.disable_torque_on_exit = disable_torque_on_exit

    # -- life ------------------------------------------------------------------------
    @abc.abstractmethod
    def connect(self) -> None: ...

    @abc.abstractmethod
    def disconnect(self, disable_torque: bool | None = None) -> None:
        """Close the bus; with torque on, first turn it off (default: disable_torque_on_exit)."""

    @property
    @abc.abstractmethod
    def is_connected(self) -> bool: ...

    def __enter__(self) -> "MotorsBus":
        self.connect()
        return self

    def __exit__(self, *exc) -> None:
        self.disconnect()

    # -- discovery -------------------------------------------------------------------
    @abc.abstractmethod
    def ping(self, motor_id: int) -> int | None:
        """Model number of the motor at `motor_id`, or None when nothing answers."""

    @abc.abstractmethod
    def scan(self, ids: range | list[int] | None = None) -> dict[int, int]:
        """{id: model number} of every motor that answers."""

    # -- registers by name, from the model's table ------------------------------------
    @abc.abstractmethod
    def read(self, register: str, motor: str) -> int: ...

    @abc.abstractmethod
    def write(self, register: str, motor: str, value: int) -> None: ...

    @abc.abstractmethod
    def sync_read(self, register: str, motors: list[str] | None = None) -> dict[str, int]: ...

    @abc.abstractmethod
    def sync_write(self, register: str, values: dict[str, int]) -> None: ...

    # -- torque and motion -----------------------------------------------------------
    @abc.abstractmethod
    def enable_torque(self, motors: list[str] | None = None) -> None: ...

    @abc.abstractmethod
    def disable_torque(self, motors: list[str] | None = None) -> None: ...

    @abc.abstractmethod
    def read_state(self, motors: list[str] | None = None) -> MotorState:
        """Positions and velocities of many motors in one transaction, in rad and rad/s."""

    @abc.abstractmethod
    def send(self, goal_position_rad: dict[str, float]) -> dict[str, float]:
        """Write goal positions in one transaction; return what was really sent after the
        calibrated range limits were applied (in rad)."""
