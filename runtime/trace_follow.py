"""Trace as a plan: the answer's image trace, lifted onto the camera's rays, sets where the chunk's translations go.

MolmoAct's trace is the end effector's planned path in the first image: its point i is where the hand is to be
seen after b_i = round(i * H / (n - 1)) actions (n the trace's most points, H the actions it spans: the reference
task's demonstrations draw n = 5 points over the 8-action chunk, boundaries 0, 2, 4, 6, 8; drivers/sim/demos.py).
An image point fixes two of a position's three degrees of freedom: the camera's ray through it. The chunk fixes
the third. The plan's predicted hand positions P_k (the hand at the observation, by forward kinematics of its
joint positions, plus the chunk's translations as the "ik" mapper scales and caps them) are moved, at each
boundary, onto the nearest point of that boundary's ray; a position between two boundaries moves by the linear
blend of their two moves; the chunk's translations become the differences of the moved positions (the mapper caps
each one as it executes it, as it caps the answer's: a step moved past `max_translation_m` is shortened then).
Rotations and the gripper stay the answer's, and so do `actions_normalized` (the answer's bins, for telemetry).

The trace is read relative to the hand: its first point is moved onto the hand's projection now, and the rest of
the path with it (a model's first point is where it sees the hand, a few pixels off). Read so, the path is lifted
through the camera's pose only as a change of place, and an error in that pose moves the hand far less than it
moves a path read as places (the tests' arm: a pose tilted 3 degrees moves a 96 mm chunk's end by under 1 mm so, by
27 mm as places). A path drawn once and kept by `Policy.steer` for plan after plan (`Plan.trace_kept`, the same
trace as the last plan's) is followed on from its point nearest to the hand, searched only ahead of where the hand
had got (`path_ahead`: a path that comes back near itself is not begun again), its points then one per boundary in
turn; where it ends the hand is held, in space too (`forget()` between episodes). Any other trace (the model's, or
one given with each observation as the evaluation's expert's, which is drawn from the hand every time) of fewer
than n points (a repeated point is written once: the hand still over a stretch) is spread over the boundaries so
that it pauses where the chunk does (`spread_trace`). A trace of one point, a plan without one, or an observation
without joint positions leaves the plan as it is.

When (`plan.follow_trace`): "never"; "steered", plans whose trace was given (`Policy.steer`, the evaluation's
expert trace): the robot goes where the drawn path goes, not only where the actions alone would take it;
"always", the model's own trace too. Lens distortion is not undone (the simulated camera has none; a camera whose
intrinsics carry distortion coefficients is warned about). Measured on the reference task: README, "Trace as a
plan".
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import math
from typing import Any

import numpy as np

from edgeact.runtime.answer import MAX_TRACE_POINTS
from edgeact.runtime.errors import ConfigError
from edgeact.runtime.kinematics import Pose
from edgeact.runtime.policy import Plan

FOLLOW_TRACE = ("never", "steered", "always")
log = logging.getLogger(__name__)


def trace_boundaries(horizon_actions: int, points: int = MAX_TRACE_POINTS) -> list[int]:
    """The action boundary each trace point stands for: evenly spaced over the horizon, as the demonstrations draw."""
    return [round(i * horizon_actions / (points - 1)) for i in range(points)]


def check_trace_horizon(horizon_actions: Any) -> None:
    """Refuse a horizon that gives two trace points one boundary (fewer actions than points after the first)."""
    least = MAX_TRACE_POINTS - 1
    if isinstance(horizon_actions, bool) or not isinstance(horizon_actions, int) or horizon_actions < least:
        raise ConfigError(f"trace_horizon_actions: the actions the trace's points span, an integer >= {least} (one "
                          f"action at least per point after the first; the reference task's: 8), got "
                          f"{horizon_actions!r}")


def project_points(points_m: np.ndarray, camera_position_m: np.ndarray, camera_rotation: np.ndarray,
                   intrinsics: Any) -> np.ndarray:
    """Points (n, 3) -> pixels (n, 2) [u, v] through an optical frame (x right, y down, z forward) at that pose,
    the points and the pose in one frame."""
    in_camera = (np.asarray(points_m, dtype=np.float64) - camera_position_m) @ camera_rotation
    z = np.maximum(in_camera[:, 2], 1e-6)
    return np.stack([intrinsics.fx * in_camera[:, 0] / z + intrinsics.cx,
                     intrinsics.fy * in_camera[:, 1] / z + intrinsics.cy], axis=1)


def spread_trace(trace_px: np.ndarray, predicted_px: np.ndarray) -> np.ndarray:
    """A trace of k <= n points (repeats written once) as n points, one per boundary: the k points kept in order, each
    repeated over a run of boundaries, the runs chosen so that the lengths of the trace's steps from boundary to
    boundary are nearest (least squares) to those of `predicted_px` (n, 2), where the plan's own positions project:
    the hand pauses where the chunk pauses (lengths, not places or directions: a chunk that strays goes elsewhere,
    but its timing is the answer's)."""
    trace_px, predicted_px = np.asarray(trace_px, dtype=np.float64), np.asarray(predicted_px, dtype=np.float64)
    k, n = len(trace_px), len(predicted_px)
    if not 1 <= k <= n:
        raise ValueError(f"spread_trace: {k} trace points for {n} boundaries")
    moved = np.linalg.norm(np.diff(predicted_px, axis=0), axis=1)     # how far the chunk moves the hand per step
    best, best_cost = trace_px[np.zeros(n, dtype=int)], math.inf
    for starts in itertools.combinations(range(1, n), k - 1):    # where each point after the first begins
        index = np.zeros(n, dtype=int)
        for j, start in enumerate(starts):
            index[start:] = j + 1
        cost = float(np.sum((np.linalg.norm(np.diff(trace_px[index], axis=0), axis=1) - moved) ** 2))
        if cost < best_cost:
            best, best_cost = trace_px[index], cost
    return best


def camera_pose_from_dict(data: Any) -> Pose:
    """`plan.trace_camera_pose` as a Pose: {"position_m": [x, y, z], "quaternion_xyzw": [x, y, z, w]}, the colour
    camera's optical frame (x right, y down, z forward) in the actions' reference frame, as a hand-eye calibration
    gives it (ROS's order of the quaternion)."""
    where = "plan.trace_camera_pose"
    if not isinstance(data, dict) or set(data) != {"position_m", "quaternion_xyzw"}:
        raise ConfigError(f"{where}: give {{\"position_m\": [x, y, z], \"quaternion_xyzw\": [x, y, z, w]}} (the "
                          f"camera's optical frame in the actions' reference frame), got {data!r}")
    position, quaternion = data["position_m"], data["quaternion_xyzw"]
    for name, value, n in (("position_m", position, 3), ("quaternion_xyzw", quaternion, 4)):
        if not (isinstance(value, list) and len(value) == n and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)):
            raise ConfigError(f"{where}.{name}: {n} finite numbers, got {value!r}")
    x, y, z, w = quaternion
    norm = math.sqrt(x * x + y * y + z * z + w * w)
    if abs(norm - 1.0) > 1e-3:
        raise ConfigError(f"{where}.quaternion_xyzw: a rotation's quaternion has length 1, this one {norm:.4f}; check "
                          f"its order (x, y, z, w) or divide it by its length")
    x, y, z, w = x / norm, y / norm, z / norm, w / norm
    # The rotation matrix of a unit quaternion, written out rather than asked of Pinocchio: the config validates
    # without the kinematics installed (tests/runtime/test_trace_follow.py builds its poses with Pinocchio's).
    rotation = np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                         [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                         [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])
    return Pose(np.array(position, dtype=np.float64), rotation)


def path_ahead(trace_px: np.ndarray, hand_px: np.ndarray, reached: tuple[int, float] = (0, 0.0),
               tolerance_px: float = 1.0) -> tuple[np.ndarray, tuple[int, float]]:
    """The drawn path (k, 2) from its point nearest to `hand_px` on, searched only from `reached` (segment, fraction
    along it) on: where the hand had got to, so a path that comes back near itself is not begun again. Of points
    about as near (within `tolerance_px` of the nearest), the earliest. Returns that point followed by the trace's
    points after it (the end alone once it is reached), and where it lies, for the next search."""
    trace_px = np.asarray(trace_px, dtype=np.float64)
    nearest = []
    for j in range(reached[0], len(trace_px) - 1):
        a, b = trace_px[j], trace_px[j + 1]
        ab = b - a
        length2 = float(ab @ ab)
        low = reached[1] if j == reached[0] else 0.0
        t = low if length2 == 0.0 else min(max(float((hand_px - a) @ ab) / length2, low), 1.0)
        nearest.append((float(np.linalg.norm(hand_px - (a + t * ab))), j, t, a + t * ab))
    if not nearest:
        return trace_px[-1:], (max(len(trace_px) - 2, 0), 1.0)
    least = min(n[0] for n in nearest)
    _, j, t, point = next(n for n in nearest if n[0] <= least + tolerance_px)
    rest = trace_px[j + 1:]
    if np.allclose(point, rest[0]):        # cut at a point of the trace: written once
        return rest, (j, t)
    return np.vstack([point, rest]), (j, t)


def check_follow_trace(mapper: Any, camera_frame: str, camera_pose: Any = None) -> None:
    """Refuse, with the fix, an action mapper without the robot's kinematics, a camera frame not in them (where no
    calibrated pose replaces it) or a calibrated pose that is not one."""
    kinematics = getattr(mapper, "kinematics", None)
    if kinematics is None:
        raise ConfigError("plan.follow_trace needs the \"ik\" action mapper (end-effector deltas through the robot's "
                          "kinematics); set actions.type to \"ik\", or plan.follow_trace to \"never\"")
    if camera_pose is not None:
        camera_pose_from_dict(camera_pose)
        return
    try:
        kinematics.frame_pose(camera_frame, np.zeros(len(kinematics.joints)))
    except ConfigError as exc:
        raise ConfigError(f"plan.trace_camera_frame: {exc}; name the colour camera's optical frame (x right, y down, "
                          "z forward) of the robot description") from None


class TraceFollower:
    """Moves a plan's translations onto its trace's rays (see the module docstring); built from the "ik" mapper."""

    def __init__(self, mapper: Any, intrinsics: Any, camera_frame: str, horizon_actions: int, when: str = "steered",
                 camera_pose: dict | None = None):
        """`camera_pose` (plan.trace_camera_pose, a calibrated camera fixed to the base) replaces `camera_frame`."""
        if when not in FOLLOW_TRACE:
            raise ConfigError(f"follow_trace: {when!r} unknown; use one of {', '.join(FOLLOW_TRACE)}")
        check_follow_trace(mapper, camera_frame, camera_pose)
        self.fixed_camera = None if camera_pose is None else camera_pose_from_dict(camera_pose)
        check_trace_horizon(horizon_actions)
        if any(getattr(intrinsics, "distortion_coeffs", ())):
            log.warning("plan.follow_trace: the camera's lens distortion (%s %s) is not undone; the trace's points "
                        "are lifted as if through a pinhole, off by as much as the distortion moves them",
                        intrinsics.distortion_model, list(intrinsics.distortion_coeffs))
        self.mapper, self.kinematics, self.intrinsics = mapper, mapper.kinematics, intrinsics
        self.camera_frame, self.when = camera_frame, when
        self.boundaries = trace_boundaries(horizon_actions)
        self.followed = 0        # plans moved onto their trace (telemetry, tests)
        self._last_trace: np.ndarray | None = None      # the last steered plan's trace (a path steered again?)
        self._reached = (0, 0.0)                         # how far along it the hand has got (path_ahead)

    def forget(self) -> None:
        """A new episode: the next trace is not the last one's path steered again."""
        self._last_trace, self._reached = None, (0, 0.0)

    def applies(self, plan: Plan) -> bool:
        return self.when == "always" or (self.when == "steered" and plan.trace_forced)

    def apply(self, plan: Plan, joints_rad: dict[str, float] | None) -> Plan:
        """The plan with its translations moved onto its trace's rays; itself where that does not apply."""
        if not self.applies(plan) or plan.trace_px is None or len(plan.trace_px) < 2 or not joints_rad:
            return plan
        trace_px = np.asarray(plan.trace_px, dtype=np.float64)
        # The path steer() keeps, the same as the last plan's: followed on from where the hand got. A trace given
        # with each observation (the evaluation's expert's) is drawn from the hand every time, even when it repeats.
        again = plan.trace_kept and self._last_trace is not None and np.array_equal(self._last_trace, trace_px)
        if not again:
            self._last_trace, self._reached = (trace_px.copy() if plan.trace_kept else None), (0, 0.0)
        translations = self.translations(trace_px, plan.actions, joints_rad, again)
        actions = plan.actions.copy()
        actions[:, :3] = translations / self.mapper.config.translation_scale
        self.followed += 1
        return dataclasses.replace(plan, actions=actions, trace_followed=True)

    def translations(self, trace_px: np.ndarray, actions: np.ndarray, joints_rad: dict[str, float],
                     again: bool = False) -> np.ndarray:
        """(n_actions, 3) metres in the mapper's reference frame: the chunk's translations moved onto the trace.
        `again`: the trace is a path steered again, followed on from the hand, its points one per boundary in turn,
        and the hand held where the path ends."""
        q = self.kinematics.q_from(joints_rad)
        hand = self.kinematics.forward(q).position_m
        camera = self.fixed_camera or self.kinematics.frame_pose(self.camera_frame, q)
        steps = np.array([self.mapper.delta(a)[:3] for a in actions])
        predicted = np.vstack([hand, hand + np.cumsum(steps, axis=0)])      # (n_actions + 1, 3): P_0 .. P_n
        # The trace is laid over every boundary of its horizon (the chunk's end standing for those past it: spread
        # where the chunk pauses, or a kept path's points in turn), then only the boundaries the chunk reaches are
        # followed.
        last = len(predicted) - 1
        projected = project_points(predicted[[min(b, last) for b in self.boundaries]], camera.position_m,
                                   camera.rotation, self.intrinsics)
        end = len(self.boundaries)          # the first boundary the path's end holds (again only)
        if again:
            ahead, self._reached = path_ahead(trace_px, projected[0], self._reached)
            ahead = ahead[:len(self.boundaries)]
            end = len(ahead) - 1
            trace_px = ahead[np.minimum(np.arange(len(self.boundaries)), end)]
        else:
            trace_px = spread_trace(trace_px[:len(self.boundaries)], projected)
        trace_px = trace_px - trace_px[0] + projected[0]                   # drawn from the hand as it is now
        boundaries = [b for b in self.boundaries if b <= last]
        moves = np.zeros_like(predicted)
        for b, pixel in zip(boundaries[1:], trace_px[1:len(boundaries)]):
            ray = camera.rotation @ np.array([(pixel[0] - self.intrinsics.cx) / self.intrinsics.fx,
                                               (pixel[1] - self.intrinsics.cy) / self.intrinsics.fy, 1.0])
            ray /= np.linalg.norm(ray)
            on_ray = camera.position_m + ray * float((predicted[b] - camera.position_m) @ ray)
            moves[b] = on_ray - predicted[b]
        # Positions between two boundaries move by the linear blend of theirs; past the last boundary, by its move.
        slots = np.arange(len(predicted))
        moves = np.stack([np.interp(slots, boundaries, moves[boundaries, axis]) for axis in range(3)], axis=1)
        positions = predicted + moves
        if end < len(boundaries):           # the path's end reached: the hand stays where it gets there
            positions[self.boundaries[end]:] = positions[self.boundaries[end]]
        return np.diff(positions, axis=0)
