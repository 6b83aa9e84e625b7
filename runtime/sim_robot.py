"""The built-in simulated robots: a 6-motor Feetech arm on the simulated servo bus, a synthetic camera, its config;
and the MuJoCo mobile manipulator (physics "mujoco"): the same arm and three wheels as MuJoCo joints, a rendered camera.

The motors speak the real Feetech protocol on a pty, so `edgeact run` drives them through the real
serial driver, the real SafetyGuard and the real loop; only the motors and the camera are fake.
Joint names follow the SO-101 arm: five arm joints and a gripper; the wheels LeKiwi's base.
"""
from __future__ import annotations

import contextlib
import copy
import os
import signal
import threading
from typing import Any, Iterator

import numpy as np

from edgeact.drivers.cameras.base import Camera, CameraConfig, CameraError, Intrinsics, RGBDFrame, make_camera
from edgeact.drivers.motors.bus import MotorBusError
from edgeact.drivers.sim.servo_bus import SimServoBus
from edgeact.runtime.errors import ConfigError
from edgeact.runtime.process_policy import ChildProcess, FrameSlab, portable_error, send_quietly

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
def start_sim_bus(section, priority: int | None = None) -> Iterator[SimServoBus | SimBusProcess]:
    """The simulated Feetech bus for a "sim" robot section: its motors, ids and models, each at its zero.

    Served from a child process when `section.sim_in_own_process` (the default for the simple physics),
    in this process otherwise (tests that inspect the simulated registers, the MuJoCo world). The
    child asks for SCHED_FIFO `priority` (best effort): real motors answer in microseconds however busy
    the robot computer is, and a simulator starved by the machine's load would be blamed on the loop.
    """
    if section.physics == "mujoco":
        with _start_mujoco_bus(section) as sim:
            yield sim
        return
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


class SimBusProcess:
    """The simulated bus served from a child process, as real motors answer from their own microcontrollers.

    In the robot's process the simulator's packet parsing would hold the GIL that the control thread
    needs, and load the measurement with work no real robot does. Same face as SimServoBus for the
    loop (`port`, `stop()`) and for checks (`register(id, name)`, answered over the pipe).
    """

    def __init__(self, motors: list[tuple[str, int, str, int]], baud_rate: int, priority: int | None = None,
                 start_timeout_s: float = 60.0):
        self._child = ChildProcess(_serve_sim_bus, (motors, baud_rate, priority), "edgeact-sim-bus")
        try:
            self.port: str = self._answer(start_timeout_s, "starting")
        except BaseException:
            self._child.stop()
            raise

    @property
    def pid(self) -> int | None:
        return self._child.pid

    @property
    def running(self) -> bool:
        return self._child.alive

    def register(self, motor_id: int, name: str, timeout_s: float = 5.0) -> int:
        """A register of a simulated motor's control table, as the simulator holds it now."""
        self._child.send(("register", motor_id, name))
        return self._answer(timeout_s, f"reading {name} of motor {motor_id}")

    def _answer(self, timeout_s: float, doing: str):
        message = self._child.receive(timeout_s)
        if message is None:
            raise MotorBusError(f"the simulated bus process gave no answer while {doing} "
                                f"({self._child.exit_status()}); its error output says why")
        kind, value = message
        if kind == "error":
            raise value
        return value

    def stop(self) -> None:
        """Close the pty and end the process; safe to call twice."""
        self._child.stop()


def _serve_sim_bus(conn, motors: list[tuple[str, int, str, int]], baud_rate: int, priority: int | None) -> None:
    """The simulated bus's process: serve the pty, answer register reads, stop on "stop" or when the parent is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # like real motors, Ctrl-C does not stop it: the safe state needs it
    if priority is not None:
        try:    # before the bus thread starts: threads inherit their creator's scheduling
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
        except (OSError, AttributeError):   # refused: the simulator answers at normal priority, later under load
            pass
    try:
        sim = _make_sim_bus(motors, baud_rate).start()
    except ConfigError as exc:
        send_quietly(conn, ("error", exc))
        return
    try:
        if not send_quietly(conn, ("ready", sim.port)):
            return
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):     # the parent is gone
                return
            if message[0] == "stop":
                return
            _, motor_id, name = message
            try:
                reply = ("value", sim.register(motor_id, name))
            except (KeyError, MotorBusError) as exc:     # no such motor / register: the caller's mistake
                reply = ("error", exc)
            if not send_quietly(conn, reply):
                return
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


# -- the simulated camera in its own process -------------------------------------------------------

SIMULATED_CAMERAS = ("synthetic",)  # "mujoco" renders this process's world; playback and realsense are real sources
CAMERA_SLABS = 3                    # frames in flight: one being read here, one being written there, one spare
CAMERA_START_TIMEOUT_S = 60.0


def make_robot_camera(config) -> Camera:
    """The camera of a robot config (not connected): a simulated camera of a simulated robot whose simulator runs
    in its own process (robot.sim_in_own_process) runs in a process of its own too, like the bus."""
    robot = config.robot
    if robot.bus == "sim" and robot.sim_in_own_process and config.camera.type_name in SIMULATED_CAMERAS:
        return ProcessCamera(config.camera)
    return make_camera(config.camera)


class ProcessCamera(Camera):
    """A camera run in a child process, its frames handed over in shared memory (a ring of CAMERA_SLABS).

    A synthetic camera ray-casts every frame in numpy (milliseconds of held GIL, 30 times a second);
    in the robot's process that work delays the control thread's wake-ups whenever the machine is
    busy. Here the capture thread only copies the newest frame out of its slab and hands the slab
    back; frames the child finds no free slab for are dropped (gaps in the frame numbers, as on a
    real sensor whose host lags).
    """

    timeout_hint = "is the camera process alive? (its errors go to stderr)"

    def __init__(self, config: CameraConfig):
        super().__init__(config)
        self._child: ChildProcess | None = None
        self._slabs: list[FrameSlab] = []

    @property
    def pid(self) -> int | None:
        return self._child.pid if self._child is not None else None

    def _open(self) -> Intrinsics:
        self._child = ChildProcess(_serve_camera, (self.config,), f"edgeact-camera-{self.name}")
        try:
            message = self._child.receive(CAMERA_START_TIMEOUT_S)
            if message is None:
                raise CameraError(f"the process of camera {self.name!r} did not start within "
                                  f"{CAMERA_START_TIMEOUT_S:g} s ({self._child.exit_status()})")
            kind, *payload = message
            if kind == "error":
                raise payload[0]
            intrinsics, names, shape_hw = payload
            self._slabs = [FrameSlab(*shape_hw, name=name) for name in names]
        except BaseException:
            self._close()
            raise
        return intrinsics

    def _read(self, timeout_s: float) -> RGBDFrame | None:
        if not self._child.conn.poll(timeout_s):
            return None
        newest = None
        while newest is None or self._child.conn.poll(0):      # take the newest announced frame, hand older ones back
            message = self._child.receive(0)
            if message is None:
                raise CameraError(f"the process of camera {self.name!r} exited ({self._child.exit_status()}); "
                                  "its error output says why")
            if message[0] == "error":
                raise message[1]
            if newest is not None:
                self._child.send(("free", newest[1]))
            newest = message
        _, index, timestamp_s, capture_monotonic_s, frame_number = newest
        slab = self._slabs[index]
        color, depth_m = slab.rgb.copy(), slab.depth_m.copy()     # the frame outlives the slab's next use
        self._child.send(("free", index))
        return RGBDFrame(color=color, depth_m=depth_m, timestamp_s=timestamp_s,
                         capture_monotonic_s=capture_monotonic_s, frame_number=frame_number)

    def _close(self) -> None:
        for slab in self._slabs:
            slab.close()                # the child created them and unlinks them
        self._slabs = []
        if self._child is not None:
            self._child.stop()


def _serve_camera(conn, config: CameraConfig) -> None:
    """The camera's process: capture, write each frame into a free slab, announce it; stop on "stop" or EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # the parent stops us, after the robot is safe
    slabs: list[FrameSlab] = []
    free = set(range(CAMERA_SLABS))
    lock = threading.Lock()

    def on_frame(frame: RGBDFrame) -> None:         # on the camera's capture thread
        with lock:
            if not slabs or not free:               # not ready yet, or every slab is with the parent: dropped
                return
            index = min(free)
            free.discard(index)
        np.copyto(slabs[index].rgb, frame.color)
        np.copyto(slabs[index].depth_m, frame.depth_m)
        send_quietly(conn, ("frame", index, frame.timestamp_s, frame.capture_monotonic_s, frame.frame_number))

    try:
        camera = make_camera(config)
        camera.add_listener(on_frame)
        camera.connect()
    except Exception as exc:        # the process boundary: the parent raises it from connect()
        send_quietly(conn, ("error", portable_error(exc)))
        return
    try:
        shape_hw = (camera.intrinsics.height, camera.intrinsics.width)
        ring = [FrameSlab(*shape_hw) for _ in range(CAMERA_SLABS)]
        ready = send_quietly(conn, ("ready", camera.intrinsics, [slab.name for slab in ring], shape_hw))
        slabs[:] = ring                 # only now may frames be announced: the parent reads "ready" first
        if not ready:
            return
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):     # the parent is gone
                return
            if message[0] == "stop":
                return
            with lock:
                free.add(message[1])
    finally:
        camera.disconnect()
        for slab in slabs:
            slab.close(unlink=True)
