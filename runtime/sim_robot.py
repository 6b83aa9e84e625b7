"""The built-in simulated robot: a 6-motor Feetech arm on the simulated servo bus, a synthetic camera, its config.

The arm speaks the real Feetech protocol on a pty, so `edgeact run` drives it through the real
serial driver, the real SafetyGuard and the real loop; only the motors and the camera are fake.
Joint names follow the SO-101 arm: five arm joints and a gripper.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Any, Iterator

from edgeact.drivers.sim.servo_bus import SimServoBus
from edgeact.runtime.errors import ConfigError

ARM_JOINTS = ("shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll")
GRIPPER = "gripper"
CENTRE_TICKS = 2048                 # the sim's motors start here; calibrated as 0 rad

SIM_ROBOT_CONFIG: dict[str, Any] = {
    "robot": {
        "bus": "sim",
        "baud_rate": 1_000_000,
        "motors": {name: {"id": i + 1, "model": "sts3215"} for i, name in enumerate(ARM_JOINTS + (GRIPPER,))},
        # +-90 degrees about the centre: the calibrated range the driver clamps every goal to.
        "calibration": {name: {"homing_offset": CENTRE_TICKS, "range_min": 1024, "range_max": 3072, "drive_mode": 0}
                        for name in ARM_JOINTS + (GRIPPER,)},
    },
    "camera": {"type": "synthetic", "name": "front", "width": 128, "height": 96, "fps": 30.0},
    "policy": {"type": "scripted", "chunk_size": 8, "latency_s": 0.1},
    "actions": {
        "type": "joint_delta",
        # Interim mapping until IK: dx, dy, dz drive the first three joints; dpitch the wrist flex, droll the roll.
        "joints": list(ARM_JOINTS),
        "dims": [0, 1, 2, 4, 3],
        "gains": [5.0, 5.0, 5.0, 1.0, 1.0],
        "gripper_joint": GRIPPER,
        "gripper_action_range": [-1.0, 1.0],
        "gripper_range_rad": [0.0, 0.8],
    },
    "instruction": "pick up the red block",
    "rates": {"control_hz": 100.0, "action_rate_hz": 10.0},
    "limits": {
        "joint_limits_rad": {**{name: [-1.4, 1.4] for name in ARM_JOINTS}, GRIPPER: [-0.1, 1.0]},
        "max_step_rad": 0.1,
        "max_velocity_rad_s": 2.0,
        "watchdog_timeout_s": 0.5,
        "safe_state": "hold",
    },
    "plan": {"max_age_s": 1.5, "max_frame_age_s": 0.25},
    "watchdog": {"control_stall_s": 0.5},
    "estop": {"file": None, "key": None},
}


def sim_robot_config_dict(**overrides: Any) -> dict[str, Any]:
    """A fresh copy of the sample config; `overrides` replace whole top-level sections."""
    data = copy.deepcopy(SIM_ROBOT_CONFIG)
    unknown = sorted(set(overrides) - set(data))
    if unknown:
        raise ConfigError(f"no sections {unknown} in the sample config; it has {', '.join(data)}")
    data.update(copy.deepcopy(overrides))
    return data


@contextlib.contextmanager
def start_sim_bus(section) -> Iterator[SimServoBus]:
    """The simulated Feetech bus for a "sim" robot section: its motors, ids and models, each at its zero."""
    sim = SimServoBus("feetech", ids=(), baud_rate=section.baud_rate)
    for name, motor in section.motors.items():
        cal = section.calibration.get(name)
        try:
            sim.add_motor(motor.id, motor.model, position_ticks=cal.homing_offset if cal else CENTRE_TICKS)
        except ValueError as exc:
            raise ConfigError(f"robot.motors.{name}: the simulator cannot build it: {exc}") from None
    sim.start()
    try:
        yield sim
    finally:
        sim.stop()
