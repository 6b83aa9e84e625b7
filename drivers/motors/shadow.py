"""A bus that reads the real motors and writes nothing: `edgeact run --shadow`, a rehearsal of a run on a real arm.

Bringing up a new bundle on a real arm, one first watches what it would do: the whole run goes on (camera, policy,
plans, the control thread at its rate, the safety layer's checks, the recording) while the arm stays as it is,
limp to be moved by hand or holding where a previous run left it. Wrapped around the robot's bus below the
SafetyGuard, this passes every read through and withholds every write: goals, wheel velocities, torque on and off,
register writes. What it reports as sent is where the joints are (nothing moved them), so a plan's actions start
from the measured pose, as they would on the real run from the pose the robot was told to hold.

`connect` is the real bus's read-only one: the motors are checked as the run checks them, and what the run's
connect would change or warn of (a motor in another operating mode than the config's, which the run switches with
its torque off; limit registers narrower than the calibrated range) is logged, not done, and kept in
`mode_changes_withheld`.
"""
from __future__ import annotations

import logging
import threading

from edgeact.drivers.motors.bus import BusWrapper, MotorsBus, MotorState
from edgeact.runtime.errors import ConfigError

log = logging.getLogger(__name__)


class ShadowBus(BusWrapper):
    """`bus`, read-only: reads pass through, writes are counted in `withheld` and not sent."""

    def __init__(self, bus: MotorsBus):
        wheels = [name for name, motor in bus.motors.items() if motor.mode == "velocity"]
        if wheels and not hasattr(bus, "send_velocity"):    # as the SafetyGuard refuses it on the real run
            raise ConfigError(f"wheels {wheels} need a bus with send_velocity(); {type(bus).__name__} has none")
        super().__init__(bus, disable_torque_on_exit=False)
        self.withheld = 0                  # writes not sent: goals, velocities, torque changes, registers
        self._measured: dict[str, float] = {}   # the last reading, per joint: what "sent" reports
        self._lock = threading.Lock()
        self.mode_changes_withheld: list[str] = []     # what the run's connect would have changed, in words

    def connect(self) -> None:
        self.mode_changes_withheld = self.bus.connect_read_only()
        for change in self.mode_changes_withheld:
            log.warning("shadow run (it writes nothing to the motors): %s", change)

    def connect_read_only(self) -> list[str]:
        self.connect()
        return list(self.mode_changes_withheld)

    def disconnect(self, disable_torque: bool | None = None) -> None:
        self.bus.disconnect(False)          # the real bus's close, its torque never touched

    def read_state(self, motors: list[str] | None = None) -> MotorState:
        state = self.bus.read_state_torque_free(motors)     # the shadow never turns torque on
        with self._lock:
            self._measured.update(state.position_rad)
        return state

    # -- writes are withheld ----------------------------------------------------------------------------
    def _withhold(self) -> None:
        with self._lock:
            self.withheld += 1

    def write(self, register: str, motor: str, value: int) -> None:
        self._withhold()

    def sync_write(self, register: str, values: dict[str, int]) -> None:
        self._withhold()

    def enable_torque(self, motors: list[str] | None = None) -> None:
        self._withhold()

    def disable_torque(self, motors: list[str] | None = None) -> None:
        self._withhold()

    def send(self, goal_position_rad: dict[str, float], origin_rad: dict[str, float] | None = None) -> dict[str, float]:
        """Nothing is sent: returns where each joint is (the last reading; read now for one not read yet)."""
        self._withhold()
        with self._lock:
            missing = [name for name in goal_position_rad if name not in self._measured]
        if missing:
            self.read_state(missing)
        with self._lock:
            return {name: self._measured[name] for name in goal_position_rad}

    def send_velocity(self, goal_velocity_rad_s: dict[str, float]) -> dict[str, float]:
        """Nothing is sent: the wheels keep what they were doing (stopped, on a shadow run); returns zeros."""
        self._withhold()
        return {name: 0.0 for name in goal_velocity_rad_s}
