"""Forward and inverse kinematics of the arm from the robot description (Pinocchio), and the "ik" action mapper.

The description is an MJCF file (the project's own robot, the simulator's) or a URDF (what a real
arm's maker ships), told apart by its root element. Only the kinematic tree is read: joints, their
axes, limits and placements, and the named frames (MJCF sites and bodies, URDF links and fixed
joints); meshes are never opened, so `package://` paths need not resolve.

Frames. The description's base frame (x forward, y left, z up; origin on the floor under the
base's centre; a URDF's root link) is the world here: the base's planar joints, the wheels and the
gripper are locked at zero, leaving the arm's joints. Poses and action deltas are expressed in a *reference frame*:
"base", or any frame of the description fixed to the base, e.g. "camera_optical" (the depth
camera's optical frame: x right, y down, z forward).

A delta [dx, dy, dz, droll, dpitch, dyaw] moves the end-effector frame (the tool centre point,
site "ee") by (dx, dy, dz) metres along the reference frame's axes and turns it about its own
origin by R = Rz(dyaw) Ry(dpitch) Rx(droll), the angles taken about the reference frame's axes:
R_target = R @ R_now.

IK is damped least squares with task priority: the position is the first task, the orientation
the second, solved in the first task's null space. A 5-joint arm cannot reach every orientation
at every position; it then reaches the position and comes as close to the orientation as it can.
Joint limits come from the description; a joint at its limit is taken out of the step, so the
others make up for it. An unreachable target ends at the nearest pose the arm reaches (`converged`
is False), never in an exception.

Pinocchio is imported inside functions: this module imports without it (the config validates).
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from edgeact.runtime.control import GRIPPER_DIM, ActionMapper, MapperConfig, gripper_toward, register_mapper
from edgeact.runtime.errors import ConfigError

ARM_JOINTS = ("shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll")
_MAX_HALVINGS = 8               # an IK step that gains nothing is halved at most this often
# A step that turns the hand toward its target may move the position off by this much per radian gained
# (the orientation's null-space step is exact only to first order); the next step takes that back.
_POSITION_PER_TURN_M = 0.05
_POLISH_ITERATIONS = 10
_CRAWL_M, _CRAWL_RAD = 1e-6, 1e-4    # an accepted step gaining less than both: stop
BASE_FRAME = "base"


def default_description() -> Path:
    """The project's robot description (MJCF), shipped beside the simulator."""
    from edgeact.drivers import sim

    return Path(sim.__file__).resolve().parent / "robot_description" / "robot.xml"


XACRO_NAMESPACE = "{http://www.ros.org/wiki/xacro}"


def description_format(path: Path) -> str:
    """"mjcf" or "urdf", from the file's root element (<mujoco> or <robot>, in any XML namespace); anything else,
    and a xacro file not yet expanded, is refused with the fix."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.parse(path).getroot()         # the whole file: a broken one is named here, with its line
    except ET.ParseError as exc:
        raise ConfigError(f"robot description {path} is not valid XML ({exc}); give a URDF or MJCF file") from None
    if any(e.tag.startswith(XACRO_NAMESPACE) or any("${" in v or "$(" in v for v in e.attrib.values())
           for e in root.iter()):
        raise ConfigError(f"robot description {path} is a xacro file (xacro tags or ${{...}} / $(...) values): expand "
                          f"it first, `xacro {path.name} > {path.name.removesuffix('.xacro')}` (ROS's xacro), and "
                          "give the URDF it writes")
    tag = root.tag.rsplit("}", 1)[-1]
    formats = {"mujoco": "mjcf", "robot": "urdf"}
    if tag not in formats:
        raise ConfigError(f"robot description {path}: its root element is <{tag}>, neither a URDF's <robot> nor an "
                          "MJCF's <mujoco>; give the arm's URDF (or an MJCF file)")
    return formats[tag]


# Which frame a name means where several share it (a URDF link and a joint both called "gripper"): the link's.
_FRAME_PREFERENCE = ("BODY", "OP_FRAME", "FIXED_JOINT", "JOINT")


def _rename_clashing(pin, model) -> dict[str, str]:
    """Rename the joints whose name is also another frame's (a link called like a joint, as exporters write):
    Pinocchio's reduction looks joints up by frame name and refuses the clash. Each such joint and its frame
    become NAME_joint (the link keeps the name); returns {new: old} to give the joints their names back after."""
    renamed = {}
    for joint_id in range(1, model.njoints):
        name = model.names[joint_id]
        if not any(f.name == name and f.type != pin.FrameType.JOINT for f in model.frames):
            continue
        new = f"{name}_joint"
        model.names[joint_id], renamed[new] = new, name
        for i, frame in enumerate(model.frames):
            if frame.name == name and frame.type == pin.FrameType.JOINT:
                frame.name = new
                model.frames[i] = frame
    return renamed


def import_pinocchio():
    try:
        import pinocchio
    except ImportError as exc:
        raise ConfigError(f"the arm's kinematics need Pinocchio ({exc}); install it with `pip install pin==4.1.0` "
                          "(the edgeact[kinematics] extra)") from None
    return pinocchio


def rpy_matrix(roll: float, pitch: float, yaw: float) -> np.ndarray:
    """Rz(yaw) @ Ry(pitch) @ Rx(roll): roll, pitch, yaw about the fixed x, y, z axes, in that order."""
    cr, sr, cp, sp, cy, sy = (math.cos(roll), math.sin(roll), math.cos(pitch), math.sin(pitch),
                              math.cos(yaw), math.sin(yaw))
    return np.array([[cy * cp, cy * sp * sr - sy * cr, cy * sp * cr + sy * sr],
                     [sy * cp, sy * sp * sr + cy * cr, sy * sp * cr - cy * sr],
                     [-sp, cp * sr, cp * cr]])


@dataclass(frozen=True)
class Pose:
    """A frame's position (m) and orientation (3x3 rotation) in the reference frame."""

    position_m: np.ndarray
    rotation: np.ndarray

    def moved(self, delta: Sequence[float]) -> "Pose":
        """This pose moved by [dx, dy, dz, droll, dpitch, dyaw] (see the module docstring)."""
        d = np.asarray(delta, dtype=np.float64)
        return Pose(self.position_m + d[:3], rpy_matrix(*d[3:6]) @ self.rotation)


@dataclass(frozen=True)
class IkResult:
    q_rad: np.ndarray               # joint positions in ArmKinematics.joints order, within the limits
    position_error_m: float         # |target - reached|
    rotation_error_rad: float       # angle of the rotation from reached to target
    iterations: int
    converged: bool                 # both errors within the tolerances


@dataclass(frozen=True)
class IkSettings:
    tolerance_m: float = 1e-5
    tolerance_rad: float = 1e-4
    max_iterations: int = 40
    damping: float = 1e-3           # least-squares damping of the position task (m)
    orientation_damping: float = 0.05   # of the orientation task, solved in the position's null space (rad)
    max_step_rad: float = 0.3       # largest joint change in one iteration: no wild jumps near singularities
    track_orientation: bool = True  # False: position only (the orientation is whatever the arm ends at)


class ArmKinematics:
    """FK and IK of one arm chain of a description; safe to share between threads (calls serialize)."""

    def __init__(self, description: str | Path | None = None, joints: Sequence[str] = ARM_JOINTS,
                 ee_frame: str = "ee", reference_frame: str = BASE_FRAME,
                 limits_rad: dict[str, Sequence[float]] | None = None):
        """`limits_rad` narrows the description's joint limits (e.g. to the SafetyGuard's)."""
        pin = self._pin = import_pinocchio()
        path = Path(description) if description else default_description()
        if not path.is_file():
            raise ConfigError(f"robot description {path} (actions.description) not found; give the arm's URDF or an "
                              f"MJCF file (default: {default_description()})")
        build = pin.buildModelFromUrdf if description_format(path) == "urdf" else pin.buildModelFromMJCF
        try:
            full = build(str(path))
        except (RuntimeError, ValueError) as exc:
            raise ConfigError(f"Pinocchio cannot read the robot description {path}: {exc}") from None
        self.description = path
        self.joints = tuple(joints)
        names = list(full.names)
        missing = [j for j in self.joints if j not in names]
        if missing or len(set(self.joints)) != len(self.joints) or not self.joints:
            raise ConfigError(f"joints {list(self.joints)}: name distinct joints of {path.name}; {missing} are not in "
                              f"it (its joints: {', '.join(names[1:])})")
        keep = {full.getJointId(j) for j in self.joints}
        lock = [i for i in range(1, full.njoints) if i not in keep]
        renamed = _rename_clashing(pin, full)
        try:
            self.model = pin.buildReducedModel(full, lock, pin.neutral(full))
        except (RuntimeError, ValueError) as exc:
            raise ConfigError(f"Pinocchio cannot hold {path.name}'s joints other than {list(self.joints)} still: "
                              f"{exc}") from None
        for new, old in renamed.items():     # the arm's joints answer to their own names again (their frames don't)
            if self.model.existJointName(new):
                self.model.names[self.model.getJointId(new)] = old
        self.data = self.model.createData()
        # The reduced model keeps the description's joint order; map ours onto it.
        self._q_index = np.array([self.model.joints[self.model.getJointId(j)].idx_q for j in self.joints])
        for joint in self.joints:
            nq = self.model.joints[self.model.getJointId(joint)].nq
            if nq == 2:         # Pinocchio's unbounded revolute: a URDF "continuous" joint
                raise ConfigError(f"joint {joint!r} is continuous (no limits) in {path.name}: the IK needs its travel; "
                                  "declare it type=\"revolute\" with <limit lower=... upper=...> (radians)")
            if nq != 1:
                raise ConfigError(f"joints {list(self.joints)}: the arm's joints must each be one hinge or slide "
                                  f"({joint!r} has {nq} coordinates)")
        self.lower_rad = self.model.lowerPositionLimit[self._q_index].copy()
        self.upper_rad = self.model.upperPositionLimit[self._q_index].copy()
        for joint, low, high in zip(self.joints, self.lower_rad, self.upper_rad):
            # A URDF <limit> without lower/upper reads as [0, 0], and exporters write "0 0": the IK would clamp
            # every goal of that joint to 0, a large move the action never asked for.
            if not (np.isfinite(low) and np.isfinite(high) and low < high):
                raise ConfigError(f"joint {joint!r} of {path.name} has the limits [{low:g}, {high:g}]: the IK keeps "
                                  "the arm within them, so they must be its real travel, lower < upper; give "
                                  "<limit lower=... upper=...> in radians (URDF; MJCF: range=\"low high\")")
        for joint, (low, high) in (limits_rad or {}).items():
            if joint not in self.joints:
                raise ConfigError(f"joint limits for {joint!r}: not one of the arm's joints {list(self.joints)}")
            i = self.joints.index(joint)
            self.lower_rad[i], self.upper_rad[i] = max(self.lower_rad[i], low), min(self.upper_rad[i], high)
            if not self.lower_rad[i] < self.upper_rad[i]:
                raise ConfigError(f"joint limits for {joint!r}: [{low}, {high}] leave nothing of the description's "
                                  f"range [{self.model.lowerPositionLimit[self._q_index[i]]}, "
                                  f"{self.model.upperPositionLimit[self._q_index[i]]}]")
        self._frame_ids: dict[str, int] = {}
        self.ee_frame = ee_frame
        self._ee = self._named_frame(ee_frame, "the end effector (actions.ee_frame)")
        self.reference_frame = reference_frame
        self._reference = pin.SE3.Identity()
        if reference_frame != BASE_FRAME:
            frame = self.model.frames[self._named_frame(reference_frame, "the actions' reference (actions.frame)")]
            if frame.parentJoint != 0:
                raise ConfigError(f"reference frame {reference_frame!r} moves with joint "
                                  f"{self.model.names[frame.parentJoint]!r}; use a frame fixed to the base")
            self._reference = frame.placement
        self._lock = threading.Lock()

    def _named_frame(self, name: str, what: str) -> int:
        try:
            return self._frame_id(name)
        except ConfigError as exc:
            raise ConfigError(f"{what}: {exc}") from None

    def _frame_id(self, name: str) -> int:
        found = self._frame_ids.get(name)        # frame_pose asks at every call: looked up once per name
        if found is not None:
            return found
        rank = {kind: n for n, kind in enumerate(_FRAME_PREFERENCE)}
        matches = [(rank.get(str(f.type).rsplit(".", 1)[-1], len(rank)), i)
                   for i, f in enumerate(self.model.frames) if f.name == name]
        if not matches:
            frames = sorted({f.name for f in self.model.frames})
            raise ConfigError(f"no frame {name!r} in {self.description.name}; its frames: {', '.join(frames)}")
        found = self._frame_ids[name] = min(matches)[1]
        return found

    def _full_q(self, q_rad: Sequence[float]) -> np.ndarray:
        q_rad = np.asarray(q_rad, dtype=np.float64)
        if q_rad.shape != (len(self.joints),) or not np.all(np.isfinite(q_rad)):
            raise ValueError(f"joint positions must be {len(self.joints)} finite numbers ({', '.join(self.joints)}), "
                             f"got {q_rad}")
        q = self._pin.neutral(self.model)
        q[self._q_index] = q_rad
        return q

    # -- forward kinematics -----------------------------------------------------------------------
    def forward(self, q_rad: Sequence[float]) -> Pose:
        """The end effector's pose in the reference frame."""
        return self.frame_pose(self.ee_frame, q_rad)

    def frame_pose(self, frame: str, q_rad: Sequence[float]) -> Pose:
        """Any frame of the description, in the reference frame."""
        frame_id = self._frame_id(frame)
        with self._lock:
            self._pin.framesForwardKinematics(self.model, self.data, self._full_q(q_rad))
            placement = self._reference.actInv(self.data.oMf[frame_id])
            return Pose(placement.translation.copy(), placement.rotation.copy())

    def q_from(self, positions_rad: dict[str, float]) -> np.ndarray:
        """Joint positions by name -> the array in `joints` order."""
        missing = [j for j in self.joints if j not in positions_rad]
        if missing:
            raise ValueError(f"no positions for joints {missing}")
        return np.array([positions_rad[j] for j in self.joints], dtype=np.float64)

    # -- inverse kinematics -----------------------------------------------------------------------
    def solve(self, target: Pose, q_start_rad: Sequence[float], settings: IkSettings = IkSettings()) -> IkResult:
        """Joint positions that put the end effector at `target` (reference frame), starting the search
        from `q_start_rad` (the nearest solution to it is found)."""
        q_arm = np.clip(np.asarray(q_start_rad, dtype=np.float64), self.lower_rad, self.upper_rad)
        with self._lock:
            result = self._iterate(target, q_arm, settings)
            if settings.track_orientation and result.position_error_m > settings.tolerance_m:
                # An orientation the arm cannot take at that position keeps trading position for turn: end with
                # the position alone, from there (the hand stays as near its orientation as that allows).
                polished = self._iterate(target, result.q_rad, replace(settings, track_orientation=False,
                                                                      max_iterations=_POLISH_ITERATIONS))
                if polished.position_error_m < result.position_error_m:
                    result = replace(polished, iterations=result.iterations + polished.iterations, converged=False)
        return result

    def _iterate(self, target: Pose, q_arm: np.ndarray, settings: IkSettings) -> IkResult:
        """Damped least-squares iterations from q_arm (within the limits); the caller holds the lock."""
        pin = self._pin
        ref_rotation_t = self._reference.rotation.T
        best = None             # (distance, angle, q, step taken from q) of the last accepted iterate
        halvings = 0
        for iteration in range(settings.max_iterations + 1):
            q = self._full_q(q_arm)
            pin.computeJointJacobians(self.model, self.data, q)
            pin.updateFramePlacements(self.model, self.data)
            reached = self._reference.actInv(self.data.oMf[self._ee])
            error_p = target.position_m - reached.translation
            error_r = pin.log3(target.rotation @ reached.rotation.T)
            distance_m, angle_rad = float(np.linalg.norm(error_p)), float(np.linalg.norm(error_r))
            if best is not None and not self._better(distance_m, angle_rad, best, settings):
                # The step overshot (the Jacobian is only good near where it was taken): try half of it
                # from the last accepted point; when even a small step gains nothing, that point is the
                # nearest pose the arm reaches.
                previous_q, step = best[2], best[3] * 0.5
                if halvings < _MAX_HALVINGS and np.any(np.abs(step) > 1e-9) and iteration < settings.max_iterations:
                    halvings += 1
                    q_arm = np.clip(previous_q + step, self.lower_rad, self.upper_rad)
                    best = (*best[:3], step)
                    continue
                distance_m, angle_rad, q_arm = best[:3]
                break
            halvings = 0
            converged = distance_m <= settings.tolerance_m and (
                angle_rad <= settings.tolerance_rad or not settings.track_orientation)
            # Gains that small mean the pose the arm can take is reached (an orientation it cannot take only
            # trades position for turn from here on).
            crawling = best is not None and best[0] - distance_m < _CRAWL_M and best[1] - angle_rad < _CRAWL_RAD
            if converged or crawling or iteration == settings.max_iterations:
                break
            jacobian = pin.getFrameJacobian(self.model, self.data, self._ee, pin.LOCAL_WORLD_ALIGNED)
            jacobian = jacobian[:, self._q_index]
            step = self._step(ref_rotation_t @ jacobian[:3], error_p, ref_rotation_t @ jacobian[3:], error_r,
                              q_arm, settings)
            if not np.any(np.abs(step) > 1e-9):
                break       # nothing moves any more: the nearest reachable pose, or a limit
            best = (distance_m, angle_rad, q_arm, step)
            q_arm = np.clip(q_arm + step, self.lower_rad, self.upper_rad)
        converged = distance_m <= settings.tolerance_m and (
            angle_rad <= settings.tolerance_rad or not settings.track_orientation)
        return IkResult(q_arm, distance_m, angle_rad, iteration, converged)

    @staticmethod
    def _better(distance_m: float, angle_rad: float, best: tuple, settings: IkSettings) -> bool:
        """Whether a step gained on the last accepted point: the position first; once the position is within
        its tolerance (and stays there), the orientation (when tracked)."""
        if distance_m < best[0] - 1e-9:
            return True
        gained_rad = best[1] - angle_rad
        return (settings.track_orientation and gained_rad > 1e-9
                and distance_m <= max(best[0], settings.tolerance_m) + _POSITION_PER_TURN_M * gained_rad)

    def _step(self, j_pos: np.ndarray, e_pos: np.ndarray, j_rot: np.ndarray, e_rot: np.ndarray, q: np.ndarray,
              settings: IkSettings) -> np.ndarray:
        """One task-priority DLS step; joints at a limit that the step would push further are frozen. The
        position's part is shortened to max_step_rad first; the orientation's part gets what is left of it,
        so a hard orientation never slows the position down."""
        free = np.ones(len(q), dtype=bool)
        for _ in range(len(q)):
            first, second = _prioritized_step(j_pos * free, e_pos, j_rot * free if settings.track_orientation else None,
                                              e_rot, settings.damping, settings.orientation_damping)
            step = first + second
            at_lower, at_upper = q <= self.lower_rad + 1e-12, q >= self.upper_rad - 1e-12
            blocked = free & ((at_lower & (step < 0)) | (at_upper & (step > 0)))
            if not blocked.any():
                break
            free &= ~blocked
        largest = float(np.max(np.abs(first), initial=0.0))
        if largest > settings.max_step_rad:
            return first * (settings.max_step_rad / largest)
        if float(np.max(np.abs(step), initial=0.0)) <= settings.max_step_rad:
            return step
        # The largest share of the orientation's part that keeps every joint's change within max_step_rad.
        share = min((settings.max_step_rad - f * np.sign(s)) / abs(s) for f, s in zip(first, second) if abs(s) > 1e-12)
        return first + max(0.0, min(1.0, share)) * second


def _damped_pinv(jacobian: np.ndarray, damping: float) -> np.ndarray:
    rows = jacobian.shape[0]
    return jacobian.T @ np.linalg.inv(jacobian @ jacobian.T + damping ** 2 * np.eye(rows))


def _prioritized_step(j1: np.ndarray, e1: np.ndarray, j2: np.ndarray | None, e2: np.ndarray,
                      damping: float, damping2: float) -> tuple[np.ndarray, np.ndarray]:
    """dq = J1+ e1 + N1 (J2 N1)+ (e2 - J2 J1+ e1), as its two parts: the second task only uses what the first
    leaves free. J2 N1 is rank-deficient wherever the arm cannot turn the hand some way, so its inverse
    takes the larger damping2: near that, small singular values would otherwise ask for huge joint steps."""
    j1_pinv = _damped_pinv(j1, damping)
    first = j1_pinv @ e1
    if j2 is None:
        return first, np.zeros_like(first)
    null = np.eye(j1.shape[1]) - j1_pinv @ j1
    j2_null = j2 @ null
    return first, null @ (_damped_pinv(j2_null, damping2) @ (e2 - j2 @ first))


# -- the "ik" action mapper ------------------------------------------------------------------------

@register_mapper("ik")
@dataclass
class IkConfig(MapperConfig):
    """End-effector deltas -> arm joint targets through the description's kinematics (see the module docstring).

    An action's delta is [dx, dy, dz] * translation_scale (m) and [droll, dpitch, dyaw] *
    rotation_scale (rad) in `frame`, each part shortened to max_translation_m / max_rotation_rad.
    Over one action the end effector moves along the delta linearly (fraction of it at each
    control tick). The gripper maps as in joint_delta: linear from gripper_action_range to
    gripper_range_rad, clipped.
    """

    # The arm's URDF or MJCF; "" = the packaged robot description. A relative path is beside the config file.
    description: str = ""
    joints: list[str] = field(default_factory=lambda: list(ARM_JOINTS))
    ee_frame: str = "ee"
    frame: str = BASE_FRAME                 # "base" or a frame fixed to the base, e.g. "camera_optical"
    translation_scale: float = 1.0          # metres per action unit
    rotation_scale: float = 1.0             # radians per action unit
    max_translation_m: float = 0.05         # per action, after scaling
    max_rotation_rad: float = 0.5
    track_orientation: bool = True          # False: follow the position deltas only
    # Narrower joint limits than the description's (rad): give the SafetyGuard's, so IK never plans past them.
    joint_limits_rad: dict[str, list[float]] = field(default_factory=dict)
    gripper_joint: str | None = "gripper"
    gripper_action_range: list[float] = field(default_factory=lambda: [-1.0, 1.0])
    gripper_range_rad: list[float] = field(default_factory=lambda: [0.0, 1.0])

    def __post_init__(self) -> None:
        if not self.joints or len(set(self.joints)) != len(self.joints):
            raise ConfigError(f"joints: name the arm's joints once each, got {self.joints}")
        for name in ("translation_scale", "rotation_scale", "max_translation_m", "max_rotation_rad"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ConfigError(f"{name}: must be a positive number, got {value}")
        if self.gripper_joint in self.joints:
            raise ConfigError(f"gripper_joint: {self.gripper_joint!r} is also an arm joint; name it once")
        for joint, pair in self.joint_limits_rad.items():
            if joint not in self.joints:
                raise ConfigError(f"joint_limits_rad: {joint!r} is not one of joints {self.joints}")
            if len(pair) != 2 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in pair) \
                    or not pair[0] < pair[1]:
                raise ConfigError(f"joint_limits_rad.{joint}: must be [low, high] with low < high, got {pair}")
        for name in ("gripper_action_range", "gripper_range_rad"):
            pair = getattr(self, name)
            if len(pair) != 2 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in pair):
                raise ConfigError(f"{name}: must be two finite numbers [a, b], got {pair}")
        if not self.gripper_action_range[0] < self.gripper_action_range[1]:
            raise ConfigError(f"gripper_action_range: must be [low, high] with low < high, got "
                              f"{self.gripper_action_range}")

    def beside(self, config_dir: Path | None) -> "IkConfig":
        if not self.description:
            return self
        path = Path(self.description).expanduser()
        if not path.is_absolute() and config_dir is not None:
            path = config_dir / path
        return self if str(path) == self.description else replace(self, description=str(path))

    def make_mapper(self, joint_names: list[str]) -> "IkMapper":
        wanted = self.joints + ([self.gripper_joint] if self.gripper_joint else [])
        missing = [j for j in wanted if j not in joint_names]
        if missing:
            raise ConfigError(f"actions: joints {missing} are not motors of the robot; its motors are "
                              f"{', '.join(joint_names)}")
        kinematics = ArmKinematics(self.description or None, self.joints, self.ee_frame, self.frame,
                                   self.joint_limits_rad)
        return IkMapper(self, kinematics)


IK_JUMP_RAD = 0.2          # a joint moved more than this by one solve: follow the hand's path instead (IkMapper._along)
IK_PATH_STEPS = 10         # the path's points: the action's tenths (a control tick at 100 Hz, actions at 10 Hz)
IK_PATH_SLACK_M = 1e-4     # the path's end may miss the target by this much more than the direct solve


class IkMapper(ActionMapper):
    def __init__(self, config: IkConfig, kinematics: ArmKinematics):
        self.config, self.kinematics = config, kinematics
        self.joints = tuple(config.joints) + ((config.gripper_joint,) if config.gripper_joint else ())
        self.settings = IkSettings(track_orientation=config.track_orientation)
        self.last_result: IkResult | None = None     # the newest solve (telemetry, tests)

    def _along(self, start_pose: Pose, delta: np.ndarray, fraction: float, q_start: np.ndarray,
               direct: IkResult) -> IkResult:
        """The solve again, following the hand's path from the start's joints through the action's tenths up to
        `fraction`: a direct solve that moved a joint this far for a step of a few millimetres may have left for
        another branch of the arm's solutions (measured: a 1.5 rad shoulder jump, the elbow at its limit, for 9 mm)
        while one near the start reaches the target as well. The path's points are the same for every tick of the
        action (its tenths), so consecutive ticks follow one path; a pure function of its inputs, so the control
        thread's ticks and the expert's rollout agree. The path's end is taken unless it misses the target more."""
        q = q_start
        stops = [k / IK_PATH_STEPS for k in range(1, IK_PATH_STEPS + 1) if k / IK_PATH_STEPS < fraction] + [fraction]
        for stop in stops:
            stepped = self.kinematics.solve(start_pose.moved(delta * stop), q, self.settings)
            q = np.asarray(stepped.q_rad, dtype=np.float64)
        if stepped.position_error_m <= direct.position_error_m + IK_PATH_SLACK_M:
            return stepped
        return direct

    def delta(self, action: np.ndarray) -> np.ndarray:
        """The action's end-effector delta after scaling and the per-action caps."""
        c = self.config
        action = np.asarray(action, dtype=np.float64)
        translation, rotation = action[:3] * c.translation_scale, action[3:6] * c.rotation_scale
        for part, cap in ((translation, c.max_translation_m), (rotation, c.max_rotation_rad)):
            norm = float(np.linalg.norm(part))
            if norm > cap:
                part *= cap / norm
        return np.concatenate([translation, rotation])

    def gripper_goal_rad(self, gripper_value: float) -> float:
        (a_lo, a_hi), (r_lo, r_hi) = self.config.gripper_action_range, self.config.gripper_range_rad
        t = min(max((gripper_value - a_lo) / (a_hi - a_lo), 0.0), 1.0)
        return r_lo + t * (r_hi - r_lo)

    def apply(self, start_rad: dict[str, float], action: np.ndarray, fraction: float,
              span: float = 1.0) -> dict[str, float]:
        q_start = self.kinematics.q_from(start_rad)
        start_pose, delta = self.kinematics.forward(q_start), self.delta(action)
        result = self.kinematics.solve(start_pose.moved(fraction * delta), q_start, self.settings)
        if np.max(np.abs(np.asarray(result.q_rad) - q_start)) > IK_JUMP_RAD:
            result = self._along(start_pose, delta, fraction, q_start, result)
        self.last_result = result
        out = {j: float(q) for j, q in zip(self.config.joints, result.q_rad)}
        if self.config.gripper_joint:
            g = self.config.gripper_joint
            out[g] = gripper_toward(start_rad[g], self.gripper_goal_rad(float(action[GRIPPER_DIM])), fraction, span)
        return out
