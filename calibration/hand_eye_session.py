"""The robot's side of `edgeact calibrate-hand-eye CONFIG`: move the arm through poses, photograph the marker, solve.

Everything runs as `edgeact run` builds it from the config: the motor bus (on the built-in MuJoCo robot the simulated
Feetech bus on a pty, whose world then carries the marker on its gripper, as a printed one is taped onto a real
one), the config's camera, and the SafetyGuard with the config's limits, watchdog and e-stop. The arm moves only
through the guard, at its velocity limit, to seeded poses around where it stands (each joint within +-spread of its
start and within the mapper's and the guard's limits), and never lower than it started: a pose that would put the
hand more than `max_drop_m` below its start height is not visited (the arm starts clear of the table; the seeded
offsets know nothing of what is below it). At each it holds still, a frame taken after it settled is searched for
the marker, and the joints are read back for forward kinematics. A pose the arm stops short of (an obstacle, a
limit) is given up as soon as the joints stop closing in, and the arm held where it stopped: a servo pushing on an
obstacle heats and the marker may come loose. Then it returns to the start. Any way out (done, Ctrl-C, `kill`, an
error, the e-stop) leaves through the guard: the robot's safe state, then the bus disconnect (torque off unless
robot.disable_torque_on_exit is false); a start refused (a joint outside its limits) turns torque off at once, as
`edgeact run` does.

The pose is in the actions' reference frame (the "ik" mapper's `frame`): what `plan.trace_camera_pose` takes.
"""
from __future__ import annotations

import math
import time
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from edgeact.calibration.hand_eye import (METHODS, HandEyeResult, HandEyeSample, MarkerSpec,
                                          calibration_poses, detect_marker, rotation_angle_deg, solve_fixed_camera,
                                          transform)
from edgeact.runtime.errors import ConfigError

COMMAND_HZ = 50.0               # goals sent this often while moving or holding (the guard's watchdog is fed by them)
NEAR_RAD = 0.05                 # every arm joint this near its goal (a servo under gravity sags a little) ...
STILL_RAD = 0.002               # ... and moving less than this ...
STILL_S = 0.3                   # ... over this long: the arm has settled (its joints are read back, not assumed)
MOVE_TIMEOUT_S = 20.0           # a pose not reached in this time is skipped
STALL_S = 0.5                   # the joints closing in on the goal by less than STALL_RAD over this long: stopped short
STALL_RAD = 0.003
FRAME_TIMEOUT_S = 2.0
CANDIDATES_PER_POSE = 10         # seeded poses drawn per pose asked for: those that go below the start are dropped
SIM_MARKER_PIXELS = 240         # the simulated marker's texture: its black square this many texels wide


@dataclass(frozen=True)
class SessionOptions:
    poses: int = 15
    spread_rad: float = 0.35
    seed: int = 0
    method: str = "park"
    max_drop_m: float = 0.0         # how far below its start height the hand may go (base frame's z)

    def __post_init__(self) -> None:
        if self.poses < 6:
            raise ConfigError(f"--poses {self.poses}: give at least 6 (a few are usually not seen; 15 is the default)")
        if not (math.isfinite(self.spread_rad) and 0.05 <= self.spread_rad <= 1.0):
            raise ConfigError(f"--spread-rad {self.spread_rad}: give 0.05..1.0 rad (how far each joint moves from "
                              "its start)")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"--seed {self.seed!r}: give an integer >= 0")
        if not (math.isfinite(self.max_drop_m) and 0.0 <= self.max_drop_m <= 0.5):
            raise ConfigError(f"--max-drop-m {self.max_drop_m}: give 0..0.5 m (how far below its start height the hand "
                              "may go; 0: never lower)")
        if self.method not in METHODS:
            raise ConfigError(f"--method {self.method!r} unknown; use one of {', '.join(METHODS)}")


@dataclass
class PoseRecord:
    index: int
    target_rad: dict[str, float]
    reached: bool
    seen: bool
    reprojection_px: float | None = None
    side_px: float | None = None            # the marker's side in the image


def sim_hand_marker(marker: MarkerSpec) -> Any:
    """The marker as the simulated robot's gripper carries it (drivers/sim/mujoco_robot.py: HandMarker)."""
    from edgeact.drivers.sim.mujoco_robot import HandMarker

    image = marker.image(SIM_MARKER_PIXELS)
    return HandMarker(image, marker.side_m * image.shape[0] / SIM_MARKER_PIXELS)


def calibrate(config: Any, marker: MarkerSpec, options: SessionOptions = SessionOptions(),
              on_pose: Callable[[PoseRecord, int], None] | None = None,
              estop: Any = None) -> tuple[HandEyeResult, list[PoseRecord]]:
    """Run the session on a validated RobotConfig; (result, what happened at each pose). HandEyeError when the
    poses seen cannot give a trustworthy pose (too few, one axis, a chain that does not close); the guard's
    EStopLatchedError when the e-stop (the config's file, or `estop`, a threading.Event) stopped it."""
    from edgeact.drivers.motors.safety import SafetyGuard, StartRefusedError
    from edgeact.runtime.loop import estop_check
    from edgeact.runtime.sim_robot import make_robot_camera, start_sim_bus

    estop_input = estop_check(config, estop)
    if estop_input():
        raise ConfigError("the e-stop is active before the start; release it to start")
    records: list[PoseRecord] = []
    samples: list[HandEyeSample] = []
    with ExitStack() as stack:
        sim = (stack.enter_context(start_sim_bus(config.robot, config.rates.control_priority,
                                                 sim_hand_marker(marker)))
               if config.robot.bus == "sim" else None)
        bus = config.robot.make_bus(sim.port if sim is not None else None)
        mapper = config.actions.make_mapper(list(bus.motors))
        kinematics = getattr(mapper, "kinematics", None)
        if kinematics is None:
            raise ConfigError(f"actions.type {config.actions.type_name!r}: the hand's pose comes from the \"ik\" "
                              "mapper's kinematics (its description and frame); calibrate with an \"ik\" actions section")
        camera = stack.enter_context(make_robot_camera(config))
        guard = stack.enter_context(SafetyGuard(bus, config.limits, estop=estop_input))
        joints = list(kinematics.joints)
        guard.enable_torque()
        start = guard.read_state(joints).position_rad
        try:
            guard.check_start_positions()
        except StartRefusedError:
            guard.disable_torque()      # the message tells the person to move the joint by hand
            raise
        low, high = _joint_bounds(kinematics, config.limits.joint_limits_rad)
        candidates = calibration_poses([start[j] for j in joints], low, high, CANDIDATES_PER_POSE * options.poses,
                                       options.spread_rad, options.seed)
        targets = above_start(kinematics, candidates, options.max_drop_m)[:options.poses]
        for index, q in enumerate(targets):
            goal = dict(zip(joints, (float(v) for v in q)))
            reached = move_to(guard, goal)
            record = PoseRecord(index, goal, reached, False)
            if reached:
                frame = camera.next_frame(FRAME_TIMEOUT_S)
                measured = guard.read_state(joints).position_rad
                guard.send(goal)        # fed again: the watchdog runs on while the frame is searched
                view = detect_marker(np.asarray(frame.color), camera.intrinsics, marker)
                if view is not None:
                    hand = kinematics.forward([measured[j] for j in joints])
                    samples.append(HandEyeSample(dict(measured), transform(hand.rotation, hand.position_m), view))
                    record.seen, record.reprojection_px, record.side_px = True, view.reprojection_px, view.side_px
            records.append(record)
            if on_pose is not None:
                on_pose(record, len(targets))
        move_to(guard, dict(start))
        intrinsics = camera.intrinsics
    result = solve_fixed_camera(samples, intrinsics, marker, options.method)
    result.reference_frame = kinematics.reference_frame
    frame_name = config.plan.trace_camera_frame
    if frame_name:
        try:
            nominal = kinematics.frame_pose(frame_name, [start[j] for j in joints])
        except ConfigError:
            nominal = None
        if nominal is not None:
            result.camera_frame = frame_name
            result.nominal_offset_m = float(np.linalg.norm(result.ref_T_cam[:3, 3] - nominal.position_m))
            result.nominal_offset_deg = rotation_angle_deg(result.ref_T_cam[:3, :3].T @ nominal.rotation)
    return result, records


def above_start(kinematics: Any, poses: list[np.ndarray], max_drop_m: float) -> list[np.ndarray]:
    """The poses (the first is the start) whose hand is at most `max_drop_m` below the start's, in the description's
    base frame (z up), whatever frame the actions are in."""
    from edgeact.runtime.kinematics import BASE_FRAME, ArmKinematics

    base = ArmKinematics(kinematics.description, kinematics.joints, kinematics.ee_frame, BASE_FRAME)
    floor = base.forward(poses[0]).position_m[2] - max_drop_m
    return [q for q in poses if base.forward(q).position_m[2] >= floor - 1e-9]


def _joint_bounds(kinematics: Any, guard_limits: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    low, high = kinematics.lower_rad.copy(), kinematics.upper_rad.copy()
    for i, joint in enumerate(kinematics.joints):
        if joint in guard_limits:
            low[i], high[i] = max(low[i], guard_limits[joint][0]), min(high[i], guard_limits[joint][1])
    return low, high


def move_to(guard: Any, goal: dict[str, float], timeout_s: float = MOVE_TIMEOUT_S) -> bool:
    """Send `goal` at COMMAND_HZ (the guard walks the joints there at its velocity limit) until every joint is within
    NEAR_RAD of it and has moved less than STILL_RAD over STILL_S: True. False when the joints stop closing in while
    still short of it (by less than STALL_RAD over STALL_S: an obstacle, a limit) or after `timeout_s`; the arm is
    then commanded to stay where it stopped, not to push on."""
    period = 1.0 / COMMAND_HZ
    deadline = time.monotonic() + timeout_s
    names = list(goal)
    still_from: tuple[float, dict[str, float]] | None = None     # since when, and where, the arm has stood
    progress_from: tuple[float, float] | None = None             # since when, and how far off, it last closed in
    while time.monotonic() < deadline:
        guard.send(goal)
        measured = guard.read_state(names).position_rad
        now = time.monotonic()
        off = max(abs(measured[n] - goal[n]) for n in names)
        near = off <= NEAR_RAD
        if not near or still_from is None or any(abs(measured[n] - still_from[1][n]) > STILL_RAD for n in names):
            still_from = (now, dict(measured)) if near else None
        elif now - still_from[0] >= STILL_S:
            return True
        if near or progress_from is None or off < progress_from[1] - STALL_RAD:
            progress_from = (now, off)
        elif now - progress_from[0] >= STALL_S:
            break
        time.sleep(max(0.0, period - (time.monotonic() - now)))
    guard.send(guard.read_state(names).position_rad)
    return False
