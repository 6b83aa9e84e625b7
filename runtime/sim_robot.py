"""The built-in simulated robots: a 6-motor Feetech arm on the simulated servo bus, a synthetic camera, its config;
and the MuJoCo mobile manipulator (physics "mujoco"): the same arm and three wheels as MuJoCo joints, a rendered camera
(its world, bus and camera in sim_mujoco.py; the cameras' frames out of child processes in sim_camera.py).

The motors speak the real Feetech protocol on a pty, so `edgeact run` drives them through the real
serial driver, the real SafetyGuard and the real loop; only the motors and the camera are fake.
Joint names follow the SO-101 arm: five arm joints and a gripper; the wheels LeKiwi's base.
"""
from __future__ import annotations

import contextlib
import copy
import os
from typing import Any, Iterator

from edgeact.drivers.cameras.base import Camera, make_camera
from edgeact.drivers.motors.bus import MotorBusError
from edgeact.drivers.sim.servo_bus import SimServoBus
from edgeact.runtime.errors import ConfigError
from edgeact.runtime.process_policy import ChildProcess, ignore_interrupts, send_quietly, serve_until_stop
from edgeact.runtime.sim_camera import ProcessCamera

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
    # The reference ARM's action bins are uncertain: averaging each slot over the plans that predicted it
    # (temporal ensembling, runtime/ensemble.py) makes it succeed more often (README). A trace given by steering is
    # followed (runtime/trace_follow.py); the model's own is not: it is worse than its actions (README).
    "plan": {"max_age_s": 1.5, "max_frame_age_s": 0.25, "ensemble": True, "follow_trace": "steered",
             "trace_camera_frame": "camera_optical", "trace_horizon_actions": 8},
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


def episode_config_dict(base: dict[str, Any], seed: int, template: str | None = None) -> dict[str, Any]:
    """`base` (a MuJoCo robot config dict) as the task's episode `seed`: robot.task set, and the instruction the
    episode's (drivers/sim/task.py; `template` None draws one from the seed, as the episode does)."""
    from edgeact.drivers.sim.task import sample_episode

    data = copy.deepcopy(base)
    if not isinstance(data.get("robot"), dict):
        raise ConfigError("episode_config_dict: the base config needs a robot section (see mujoco_robot_config_dict)")
    data["robot"]["task"] = {"seed": seed, "template": template}
    data["instruction"] = sample_episode(seed, template).instruction
    return data


@contextlib.contextmanager
def start_sim_bus(section, priority: int | None = None, hand_marker: Any = None) -> Iterator[Any]:
    """The simulated Feetech bus for a "sim" robot section: its motors, ids and models, each at its zero.

    Served from a child process when `section.sim_in_own_process` (the default), in this process
    otherwise (tests that inspect the simulated registers or poke the MuJoCo world). The child asks
    for SCHED_FIFO `priority` (best effort): real motors answer in microseconds however busy the
    robot computer is, and a simulator starved by the machine's load would be blamed on the loop.
    Physics "mujoco" yields a MujocoSimProcess (sim_mujoco.py), or the in-process MujocoServoBus; its world carries
    `hand_marker` (drivers/sim/mujoco_robot.py: HandMarker) when given: a hand-eye calibration's target.
    """
    if section.physics == "mujoco":
        from edgeact.runtime.sim_mujoco import start_mujoco_sim

        with start_mujoco_sim(section, priority, hand_marker) as sim:
            yield sim
        return
    if hand_marker is not None:
        raise ConfigError('robot.physics "simple": its simulated arm has no body to carry a marker and no camera that '
                          'sees it; use the MuJoCo robot (robot.physics "mujoco")')
    motors = [(name, motor.id, motor.model,
               section.calibration[name].homing_offset if name in section.calibration else CENTRE_TICKS)
              for name, motor in section.motors.items()]
    sim = (SimBusProcess(motors, section.baud_rate, priority) if section.sim_in_own_process
           else _make_sim_bus(motors, section.baud_rate).start())
    try:
        yield sim
    finally:
        sim.stop()


def _make_sim_bus(motors: list[tuple[str, int, str, int]], baud_rate: int) -> SimServoBus:
    """A simulated Feetech bus (not started) with motors (name, id, model, starting position in ticks)."""
    sim = SimServoBus("feetech", ids=(), baud_rate=baud_rate)
    for name, motor_id, model, position_ticks in motors:
        try:
            sim.add_motor(motor_id, model, position_ticks=position_ticks)
        except ValueError as exc:
            raise ConfigError(f"robot.motors.{name}: the simulator cannot build it: {exc}") from None
    return sim


class SimChild:
    """What the simulators served from a child process share: the child, its liveness, and answers to requests."""

    label = "simulator"                 # how messages name it
    _child: ChildProcess

    @property
    def pid(self) -> int | None:
        return self._child.pid

    @property
    def running(self) -> bool:
        return self._child.alive

    def _answer(self, timeout_s: float, doing: str):
        """The child's reply to the last request: its value, or its error raised here."""
        message = self._child.receive(timeout_s)
        if message is None:
            raise MotorBusError(f"the {self.label} process gave no answer within {timeout_s:g} s while {doing} "
                                f"({self._child.exit_status()}); its error output says why")
        kind, value = message
        if kind == "error":
            raise value
        return value


class SimBusProcess(SimChild):
    """The simulated bus served from a child process, as real motors answer from their own microcontrollers.

    In the robot's process the simulator's packet parsing would hold the GIL that the control thread
    needs, and load the measurement with work no real robot does. Same face as SimServoBus for the
    loop (`port`, `stop()`) and for checks (`register(id, name)`, answered over the pipe).
    """

    label = "simulated bus"

    def __init__(self, motors: list[tuple[str, int, str, int]], baud_rate: int, priority: int | None = None,
                 start_timeout_s: float = 60.0):
        self._child = ChildProcess(_serve_sim_bus, (motors, baud_rate, priority), "edgeact-sim-bus")
        try:
            self.port: str = self._answer(start_timeout_s, "starting")
        except BaseException:
            self._child.stop()
            raise

    def register(self, motor_id: int, name: str, timeout_s: float = 5.0) -> int:
        """A register of a simulated motor's control table, as the simulator holds it now."""
        self._child.send(("register", motor_id, name))
        return self._answer(timeout_s, f"reading {name} of motor {motor_id}")

    def stop(self) -> None:
        """Close the pty and end the process; safe to call twice."""
        self._child.stop()


def ask_realtime(priority: int | None) -> None:
    """SCHED_FIFO `priority` for the calling thread, or normal scheduling for None; best effort, silently.

    Refused, the simulator answers at normal priority (later under load); threads the caller starts
    afterwards inherit what it got.
    """
    policy, param = (os.SCHED_OTHER, 0) if priority is None else (os.SCHED_FIFO, priority)
    try:
        os.sched_setscheduler(0, policy, os.sched_param(param))
    except (OSError, AttributeError):   # no permission, or not Linux
        pass


def _register_reply(sim: SimServoBus, motor_id: int, name: str) -> tuple:
    try:
        return ("value", sim.register(motor_id, name))
    except (KeyError, MotorBusError) as exc:     # no such motor / register: the caller's mistake
        return ("error", exc)


def _serve_sim_bus(conn, motors: list[tuple[str, int, str, int]], baud_rate: int, priority: int | None) -> None:
    """The simulated bus's process: serve the pty, answer register reads, stop on "stop" or when the parent is gone."""
    ignore_interrupts()     # like real motors, Ctrl-C does not stop it: the safe state needs it
    if priority is not None:
        ask_realtime(priority)      # before the bus thread starts: threads inherit their creator's scheduling
    try:
        sim = _make_sim_bus(motors, baud_rate).start()
    except ConfigError as exc:
        send_quietly(conn, ("error", exc))
        return
    try:
        if send_quietly(conn, ("ready", sim.port)):
            serve_until_stop(conn, lambda message: _register_reply(sim, *message[1:]))
    finally:
        sim.stop()


# -- the simulated cameras ---------------------------------------------------------------------------

SIMULATED_CAMERAS = ("synthetic",)  # rendered in a process of their own; "mujoco" renders in the simulator's


def make_robot_camera(config) -> Camera:
    """The camera of a robot config (not connected). A simulated robot whose simulator runs in its own process
    (robot.sim_in_own_process) has its simulated camera out of this process too: a synthetic camera in a process
    of its own, a "mujoco" camera in the MuJoCo simulator's process (the world it renders is there)."""
    robot, camera = config.robot, config.camera_config     # a recording's relative path: beside the config file
    if robot.bus == "sim" and robot.sim_in_own_process:
        if camera.type_name in SIMULATED_CAMERAS:
            return ProcessCamera(camera)
        if camera.type_name == "mujoco" and robot.physics == "mujoco":
            from edgeact.runtime.sim_mujoco import MujocoProcessCamera

            return MujocoProcessCamera(camera)
    return make_camera(camera)
