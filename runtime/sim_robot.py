"""The built-in simulated robots: a 6-motor Feetech arm on the simulated servo bus, a synthetic camera, its config;
and the MuJoCo mobile manipulator (physics "mujoco"): the same arm and three wheels as MuJoCo joints, a rendered camera.

The motors speak the real Feetech protocol on a pty, so `edgeact run` drives them through the real
serial driver, the real SafetyGuard and the real loop; only the motors and the camera are fake.
Joint names follow the SO-101 arm: five arm joints and a gripper; the wheels LeKiwi's base.
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


WHEELS = ("base_left_wheel", "base_back_wheel", "base_right_wheel")
# Calibrated ranges inside the description's joint limits (robot.xml), in ticks about the centre; wheels turn freely.
_MUJOCO_RANGE_TICKS = {**dict.fromkeys(ARM_JOINTS, (CENTRE_TICKS - 1000, CENTRE_TICKS + 1000)),
                       GRIPPER: (CENTRE_TICKS - 100, CENTRE_TICKS + 1100), **dict.fromkeys(WHEELS, (0, 4095))}

MUJOCO_ROBOT_SECTIONS: dict[str, Any] = {
    "robot": {
        "bus": "sim",
        "physics": "mujoco",
        "baud_rate": 1_000_000,
        "motors": {**{name: {"id": i + 1, "model": "sts3215"} for i, name in enumerate(ARM_JOINTS + (GRIPPER,))},
                   **{name: {"id": 7 + i, "model": "sts3215", "mode": "velocity"} for i, name in enumerate(WHEELS)}},
        "calibration": {name: {"homing_offset": CENTRE_TICKS, "range_min": lo, "range_max": hi, "drive_mode": 0}
                        for name, (lo, hi) in _MUJOCO_RANGE_TICKS.items()},
    },
    "camera": {"type": "mujoco", "name": "front", "camera": "front", "width": 320, "height": 240, "fps": 15.0},
    # End-effector deltas in the base frame, in metres and radians (the scripted policy's units); IK keeps
    # within the same joint limits as the SafetyGuard below.
    "actions": {"type": "ik", "joints": list(ARM_JOINTS), "frame": "base", "gripper_joint": GRIPPER,
                "gripper_action_range": [-1.0, 1.0], "gripper_range_rad": [0.0, 1.0],
                "joint_limits_rad": {name: [-1.5, 1.5] for name in ARM_JOINTS}},
    "limits": {
        "joint_limits_rad": {**{name: [-1.5, 1.5] for name in ARM_JOINTS}, GRIPPER: [-0.15, 1.6]},
        "max_step_rad": 0.1,
        "max_velocity_rad_s": 2.0,
        "watchdog_timeout_s": 0.5,
        "safe_state": "hold",
    },
}


def sim_robot_config_dict(**overrides: Any) -> dict[str, Any]:
    """A fresh copy of the sample config; `overrides` replace whole top-level sections."""
    data = copy.deepcopy(SIM_ROBOT_CONFIG)
    unknown = sorted(set(overrides) - set(data))
    if unknown:
        raise ConfigError(f"no sections {unknown} in the sample config; it has {', '.join(data)}")
    data.update(copy.deepcopy(overrides))
    return data


def mujoco_robot_config_dict(**overrides: Any) -> dict[str, Any]:
    """The sample config of the MuJoCo mobile manipulator; `overrides` replace whole top-level sections."""
    return sim_robot_config_dict(**{**copy.deepcopy(MUJOCO_ROBOT_SECTIONS), **overrides})


@contextlib.contextmanager
def start_sim_bus(section) -> Iterator[SimServoBus]:
    """The simulated Feetech bus for a "sim" robot section: its motors, ids and models, each at its zero."""
    if section.physics == "mujoco":
        with _start_mujoco_bus(section) as sim:
            yield sim
        return
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


@contextlib.contextmanager
def _start_mujoco_bus(section) -> Iterator[SimServoBus]:
    """The MuJoCo world, started in real time under the name "default" (a "mujoco" camera renders it), and a
    bus whose motors are its joints; each motor's calibration says how its ticks sit on its joint."""
    from edgeact.drivers.sim.mujoco_robot import MujocoWorld, MujocoWorldError
    from edgeact.drivers.sim.mujoco_servo_bus import MujocoServoBus, ServoJoint

    joints = {}
    for name, motor in section.motors.items():
        cal = section.calibration.get(name)
        joints[name] = ServoJoint(motor.id, motor.model, cal.homing_offset if cal else CENTRE_TICKS,
                                  cal.drive_mode if cal else 0)
    try:
        world = MujocoWorld()
        sim = MujocoServoBus(world, joints, baud_rate=section.baud_rate)
    except MujocoWorldError as exc:
        raise ConfigError(f"robot: the MuJoCo simulator cannot build it: {exc}") from None
    with world:
        sim.start()
        try:
            yield sim
        finally:
            sim.stop()
