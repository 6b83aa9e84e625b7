"""The simulated robot's MuJoCo world: the model, real-time stepping, servo-like joint drives, the omni base, objects.

    with MujocoWorld() as world:            # loads robot_description/scene.xml, steps in real time
        world.drive("elbow_flex", torque_on=True, mode="position", goal=0.3)

Every actuator named after its joint is a servo (the arm, the gripper, the wheels): `drive()` sets
its torque, mode and goal, as the servo's control table would. A position-mode servo moves its
internal target toward the goal at most `servo_speed_rad_s` (the firmware's speed profile) and a PD
loop with the description's gains and torque limit pulls the joint after it; a velocity-mode servo
tracks the goal speed; torque off leaves the joint to gravity, damping and friction. The base is
moved by three ideal omni-wheels: each physics step, the body velocity that the wheels' measured
spin implies (their geometry is read from the description) drives the base's planar joints.

Physics runs on its own thread at the model's timestep, paced by the wall clock (`start()`), or is
stepped by hand (`step(n)`) for deterministic tests and data generation. One lock guards the state:
the stepping thread holds it for one step (tens of microseconds) at a time, so a bus read or a
camera's scene update waits at most that long.
"""
from __future__ import annotations

import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeact.runtime.errors import ConfigError, EdgeactError

log = logging.getLogger(__name__)

DESCRIPTION_DIR = Path(__file__).resolve().with_name("robot_description")
SCENE_XML = DESCRIPTION_DIR / "scene.xml"
ROBOT_XML = DESCRIPTION_DIR / "robot.xml"
BASE_JOINTS = ("base_x", "base_y", "base_yaw")
BASE_ACTUATORS = ("base_vx", "base_vy", "base_wz")
WHEELS = ("base_left_wheel", "base_back_wheel", "base_right_wheel")
MODES = ("position", "velocity")
THREAD_NAME = "sim-mujoco-physics"

_running: dict[str, "MujocoWorld"] = {}     # started worlds by name: how a "mujoco" camera finds its world
_running_lock = threading.Lock()


class MujocoWorldError(EdgeactError):
    """The MuJoCo world cannot be built or is misused; the message names the fix."""


def import_mujoco() -> Any:
    """The mujoco module, with an offscreen GL backend picked before its first import.

    MuJoCo reads MUJOCO_GL once, when it is first imported: EGL unless the environment says
    otherwise (EGL uses the GPU where there is one, Mesa's llvmpipe on a CPU-only machine).
    """
    os.environ.setdefault("MUJOCO_GL", "egl")
    try:
        import mujoco
    except ImportError as exc:
        raise MujocoWorldError(f"the MuJoCo simulator needs the mujoco package ({exc}); "
                               "install it with `pip install mujoco==4.0.0` (the edgeact[sim] extra)") from None
    return mujoco


def running_world(name: str = "default") -> "MujocoWorld":
    """The started world called `name` (the simulated robot's), for cameras that render it."""
    with _running_lock:
        world = _running.get(name)
        names = sorted(_running)
    if world is None:
        raise MujocoWorldError(f"no MuJoCo world {name!r} is running (running: {', '.join(names) or 'none'}); start "
                               "the simulated robot first (robot.bus \"sim\" with physics \"mujoco\")")
    return world


@dataclass(frozen=True)
class HandMarker:
    """A printed marker stuck flat on a body of the robot (a hand-eye calibration's target, as one is taped onto a
    real gripper for the calibration and taken off after): a thin square sheet textured with `image`."""

    image: np.ndarray                       # (n, n) uint8 greyscale: the marker with its white quiet zone
    sheet_side_m: float                     # the printed sheet's side, quiet zone included
    body: str = "hand"
    position_m: tuple[float, float, float] = (0.02, 0.0, 0.019)    # the sheet's centre: on top of the hand

    def __post_init__(self) -> None:
        image = np.asarray(self.image)
        if image.dtype != np.uint8 or image.ndim != 2 or image.shape[0] != image.shape[1]:
            raise ConfigError(f"hand marker image: a square (n, n) uint8 greyscale array, got {image.shape} {image.dtype}")
        if not (math.isfinite(self.sheet_side_m) and 0 < self.sheet_side_m <= 0.5):
            raise ConfigError(f"hand marker sheet side {self.sheet_side_m} m: give (0, 0.5] metres")


@dataclass
class MujocoWorldConfig:
    scene_path: str = str(SCENE_XML)
    name: str = "default"                   # cameras find a started world by this name
    hand_marker: HandMarker | None = None   # a calibration marker on the gripper (not part of the task's robot)
    servo_speed_rad_s: float = 4.6          # position-mode speed profile: an STS3215 at 12 V (~3000 steps/s)
    tick_s: float = 0.005                   # the real-time thread wakes this often and catches up
    max_lag_s: float = 0.1                  # further behind the wall clock than this: skip ahead, count it

    def __post_init__(self) -> None:
        if not Path(self.scene_path).is_file():
            raise ConfigError(f"scene_path: {self.scene_path} not found; give an MJCF file (default: {SCENE_XML})")
        for name in ("servo_speed_rad_s", "tick_s", "max_lag_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{name}: must be a positive number, got {value}")
        if self.max_lag_s < self.tick_s:
            raise ConfigError(f"max_lag_s ({self.max_lag_s}) must be at least tick_s ({self.tick_s})")


@dataclass
class _Drive:
    """One servo joint: where its state lives in MjData and the gains of its actuator."""

    joint: str
    qpos_adr: int
    dof_adr: int
    actuator: int
    native_mode: str        # what the description's actuator is: "position" or "velocity"
    kp: float               # position gain (N m / rad)
    kv: float               # velocity gain (N m s / rad)


class MujocoWorld:
    """A MuJoCo model and its state, driven like servos; see the module docstring."""

    def __init__(self, config: MujocoWorldConfig | None = None):
        self.config = config or MujocoWorldConfig()
        self._mj = mujoco = import_mujoco()
        try:
            self.model = (mujoco.MjModel.from_xml_path(self.config.scene_path) if self.config.hand_marker is None
                          else _model_with_marker(mujoco, self.config.scene_path, self.config.hand_marker))
        except ValueError as exc:
            raise MujocoWorldError(f"MuJoCo cannot compile {self.config.scene_path}: {exc}") from None
        self.data = mujoco.MjData(self.model)
        self.lock = threading.RLock()           # hold it to read or edit the state while the world runs
        self.lag_skips = 0                      # times the real-time thread fell behind and skipped ahead
        self._drives = self._find_drives()
        n = len(self._drives)
        self._acts = np.array([d.actuator for d in self._drives.values()], dtype=np.int64)
        self._torque = np.zeros(n, dtype=bool)
        self._velocity_mode = np.array([d.native_mode == "velocity" for d in self._drives.values()])
        self._goal = np.zeros(n)                # rad (position mode) or rad/s (velocity mode)
        self._target = np.zeros(n)              # the position profile's current set point
        self._index = {name: i for i, name in enumerate(self._drives)}
        self._base = _OmniBase.from_model(mujoco, self.model)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.reset()

    # -- what is in the world -----------------------------------------------------------------
    @property
    def servo_joints(self) -> tuple[str, ...]:
        """Joints a servo drives (an actuator named after the joint), in the description's order."""
        return tuple(self._drives)

    @property
    def timestep_s(self) -> float:
        return float(self.model.opt.timestep)

    @property
    def time_s(self) -> float:
        """Simulated time since the last reset."""
        with self.lock:
            return float(self.data.time)

    def _find_drives(self) -> dict[str, _Drive]:
        mj, model = self._mj, self.model
        drives = {}
        for a in range(model.nu):
            name = mj.mj_id2name(model, mj.mjtObj.mjOBJ_ACTUATOR, a)
            joint = int(model.actuator_trnid[a, 0])
            if model.actuator_trntype[a] != mj.mjtTrn.mjTRN_JOINT or name != model.joint(joint).name:
                continue        # not a servo: e.g. the base's planar drives, moved by the wheels
            gain, bias = model.actuator_gainprm[a], model.actuator_biasprm[a]
            if bias[1] != 0:    # position actuator: force = kp * ctrl - kp * q - kv * qdot
                drives[name] = _Drive(name, int(model.jnt_qposadr[joint]), int(model.jnt_dofadr[joint]), a,
                                      "position", float(gain[0]), float(-bias[2]))
            else:               # velocity actuator: force = kv * ctrl - kv * qdot
                drives[name] = _Drive(name, int(model.jnt_qposadr[joint]), int(model.jnt_dofadr[joint]), a,
                                      "velocity", 0.0, float(gain[0]))
        return drives

    def _drive(self, joint: str) -> tuple[int, _Drive]:
        if joint not in self._index:
            raise MujocoWorldError(f"no servo joint {joint!r} in {self.config.scene_path}; its servo joints are "
                                   f"{', '.join(self._drives)}")
        return self._index[joint], self._drives[joint]

    # -- the servo side ---------------------------------------------------------------------------
    def drive(self, joint: str, *, torque_on: bool, mode: str, goal: float) -> None:
        """Command a servo joint as its control table would: torque, mode, goal (rad or rad/s)."""
        if mode not in MODES:
            raise MujocoWorldError(f"mode {mode!r} for joint {joint!r}: the simulator models {', '.join(MODES)}")
        if not math.isfinite(goal):
            # A NaN set point would stay (later goals move it by steps from where it is) and MuJoCo then zeroes
            # every actuator's control: one bad goal would leave the whole robot limp.
            raise MujocoWorldError(f"goal {goal!r} for joint {joint!r} is not a finite number (rad or rad/s); the "
                                   "caller computed it from something non-finite (an IK or policy output?)")
        i, drive = self._drive(joint)
        with self.lock:
            if torque_on and (not self._torque[i] or self._velocity_mode[i] != (mode == "velocity")):
                # Torque coming on, or a new mode: the profile starts where the shaft is, not at an old set point.
                self._target[i] = self.data.qpos[drive.qpos_adr]
            self._torque[i], self._velocity_mode[i] = torque_on, mode == "velocity"
            self._goal[i] = float(goal)
            self._apply_gains(i, drive)

    def _apply_gains(self, i: int, drive: _Drive) -> None:
        """Switch the joint's actuator between off, position and velocity by its gain and bias terms."""
        gain, bias = self.model.actuator_gainprm[drive.actuator], self.model.actuator_biasprm[drive.actuator]
        if not self._torque[i]:
            kp = kv = g = 0.0
        elif self._velocity_mode[i]:
            # A position servo in wheel mode damps towards the speed with its own kv; a wheel uses its own.
            kp, kv = 0.0, drive.kv
            g = kv
        else:
            # A wheel told to hold a position: stiffness assumed at 20x its speed gain (it is never used so).
            kp, kv = (drive.kp, drive.kv) if drive.native_mode == "position" else (20.0 * drive.kv, drive.kv)
            g = kp
        gain[0], bias[1], bias[2] = g, -kp, -kv

    def joint_state(self, joint: str) -> tuple[float, float]:
        """(position rad, velocity rad/s) of a servo joint now."""
        _, drive = self._drive(joint)
        with self.lock:
            return float(self.data.qpos[drive.qpos_adr]), float(self.data.qvel[drive.dof_adr])

    def joint_positions(self, joints: list[str] | tuple[str, ...] | None = None) -> dict[str, float]:
        """Positions (rad) of servo joints, all read at one instant."""
        names = self.servo_joints if joints is None else tuple(joints)
        adrs = [self._drive(j)[1].qpos_adr for j in names]
        with self.lock:
            return {j: float(self.data.qpos[a]) for j, a in zip(names, adrs)}

    # -- stepping ---------------------------------------------------------------------------------
    def step(self, n: int = 1) -> None:
        """Advance n timesteps now (tests, data generation); the real-time thread calls this too."""
        for _ in range(n):
            with self.lock:
                self._step_once()

    def _step_once(self) -> None:
        data = self.data
        # The position profile: each set point walks toward its goal at the servo's top speed.
        max_step = self.config.servo_speed_rad_s * self.model.opt.timestep
        self._target += np.clip(self._goal - self._target, -max_step, max_step)
        data.ctrl[self._acts] = np.where(self._velocity_mode, self._goal, self._target)
        if self._base is not None:
            self._base.follow_wheels(data)
        self._mj.mj_step(self.model, data)

    def start(self) -> "MujocoWorld":
        """Step in real time on a thread, and let cameras find this world by its name."""
        if self._thread is not None:
            raise MujocoWorldError(f"MuJoCo world {self.config.name!r} is already running")
        with _running_lock:
            if self.config.name in _running:
                raise MujocoWorldError(f"another MuJoCo world named {self.config.name!r} is running; stop it or "
                                       "give this one another name")
            _running[self.config.name] = self
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the real-time thread; safe to call twice."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stop.set()
            thread.join(timeout=5.0)
        with _running_lock:
            if _running.get(self.config.name) is self:
                del _running[self.config.name]

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> "MujocoWorld":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _run(self) -> None:
        dt = self.timestep_s
        max_lag_steps = max(1, int(self.config.max_lag_s / dt))
        start_s, done = time.monotonic(), 0
        while not self._stop.is_set():
            due = int((time.monotonic() - start_s) / dt)
            if due - done > max_lag_steps:
                # Too far behind (a loaded machine, a debugger): drop the backlog rather than spiral.
                self.lag_skips += 1
                log.warning("MuJoCo world %r fell %.0f ms behind real time; skipping ahead",
                            self.config.name, (due - done) * dt * 1e3)
                done = due - max_lag_steps
            while done < due and not self._stop.is_set():
                self.step()
                done += 1
            self._stop.wait(self.config.tick_s)

    # -- state: reset, poses, objects ---------------------------------------------------------
    def reset(self) -> None:
        """Back to the description's initial state: joints at zero, torque off, base at the origin.

        A servo bus attached to this world is not told: its control tables keep what they held."""
        with self.lock:
            self._mj.mj_resetData(self.model, self.data)
            self._torque[:] = False
            self._goal[:] = 0.0
            self._target[:] = 0.0
            for i, drive in enumerate(self._drives.values()):
                self._velocity_mode[i] = drive.native_mode == "velocity"
                self._apply_gains(i, drive)
            self._mj.mj_forward(self.model, self.data)

    def set_joint_positions(self, positions_rad: dict[str, float]) -> None:
        """Put servo joints at these positions at rest (a reset, a test); their set points follow."""
        with self.lock:
            for joint, q in positions_rad.items():
                i, drive = self._drive(joint)
                self.data.qpos[drive.qpos_adr] = q
                self.data.qvel[drive.dof_adr] = 0.0
                self._target[i] = q
                if not self._velocity_mode[i]:
                    self._goal[i] = q
            self._mj.mj_forward(self.model, self.data)

    def set_body_pose(self, body: str, position_m, quat_wxyz=(1.0, 0.0, 0.0, 0.0)) -> None:
        """Place a free body (an object) at rest at a pose in the world frame."""
        with self.lock:
            b = self._body(body)
            joint = int(self.model.body_jntadr[b])
            if joint < 0 or self.model.jnt_type[joint] != self._mj.mjtJoint.mjJNT_FREE:
                raise MujocoWorldError(f"body {body!r} has no free joint; only free objects can be placed")
            adr, dof = int(self.model.jnt_qposadr[joint]), int(self.model.jnt_dofadr[joint])
            self.data.qpos[adr:adr + 3] = position_m
            self.data.qpos[adr + 3:adr + 7] = np.asarray(quat_wxyz) / np.linalg.norm(quat_wxyz)
            self.data.qvel[dof:dof + 6] = 0.0
            self._mj.mj_forward(self.model, self.data)

    def body_pose(self, body: str) -> tuple[np.ndarray, np.ndarray]:
        """(position m, 3x3 rotation) of a body in the world frame."""
        with self.lock:
            b = self._body(body)
            return self.data.xpos[b].copy(), self.data.xmat[b].reshape(3, 3).copy()

    def site_pose(self, site: str) -> tuple[np.ndarray, np.ndarray]:
        """(position m, 3x3 rotation) of a site (e.g. "ee", "camera_optical") in the world frame."""
        with self.lock:
            s = self._mj.mj_name2id(self.model, self._mj.mjtObj.mjOBJ_SITE, site)
            if s < 0:
                raise MujocoWorldError(f"no site {site!r} in {self.config.scene_path}")
            return self.data.site_xpos[s].copy(), self.data.site_xmat[s].reshape(3, 3).copy()

    @property
    def wheel_matrix(self) -> np.ndarray:
        """Rows map the base's body velocity (vx, vy, wz) to one wheel's rad/s, in WHEELS order."""
        if self._base is None:
            raise MujocoWorldError(f"{self.config.scene_path} has no omni base (joints {', '.join(BASE_JOINTS)})")
        return self._base.wheel_matrix.copy()

    def base_pose(self) -> tuple[float, float, float]:
        """(x m, y m, yaw rad) of the base on the floor."""
        if self._base is None:
            raise MujocoWorldError(f"{self.config.scene_path} has no omni base (joints {', '.join(BASE_JOINTS)})")
        with self.lock:
            return tuple(float(self.data.qpos[a]) for a in self._base.qpos_adr)

    def _body(self, body: str) -> int:
        b = self._mj.mj_name2id(self.model, self._mj.mjtObj.mjOBJ_BODY, body)
        if b < 0:
            raise MujocoWorldError(f"no body {body!r} in {self.config.scene_path}")
        return b


def _model_with_marker(mujoco: Any, scene_path: str, marker: HandMarker) -> Any:
    """The scene compiled with `marker` as a textured sheet on its body (no collisions, no mass to speak of)."""
    import tempfile

    from PIL import Image

    spec = mujoco.MjSpec.from_file(scene_path)
    body = spec.body(marker.body)
    if body is None:
        raise ConfigError(f"hand marker body {marker.body!r}: no such body in {scene_path}")
    with tempfile.TemporaryDirectory(prefix="edgeact-marker-") as tmp:
        png = Path(tmp) / "marker.png"
        Image.fromarray(np.asarray(marker.image)).convert("RGB").save(png)
        spec.add_texture(name="calibration_marker", type=mujoco.mjtTexture.mjTEXTURE_2D, file=str(png))
        material = spec.add_material(name="calibration_marker")
        material.textures[mujoco.mjtTextureRole.mjTEXROLE_RGB] = "calibration_marker"
        half = marker.sheet_side_m / 2
        body.add_geom(name="calibration_marker", type=mujoco.mjtGeom.mjGEOM_BOX, size=[half, half, 0.0005],
                      pos=list(marker.position_m), material="calibration_marker", contype=0, conaffinity=0,
                      mass=1e-4)
        return spec.compile()


class _OmniBase:
    """Ideal omni-wheels: the base's planar joints follow the body velocity the wheels' spin implies."""

    def __init__(self, wheel_matrix: np.ndarray, wheel_dofs: list[int], qpos_adr: list[int], actuators: list[int]):
        self.wheel_matrix = wheel_matrix                # rows: (vx, vy, wz) -> one wheel's rad/s
        self.to_body = np.linalg.inv(wheel_matrix)
        self.wheel_dofs = np.asarray(wheel_dofs)
        self.qpos_adr = qpos_adr                        # base_x, base_y, base_yaw
        self.actuators = np.asarray(actuators)

    @classmethod
    def from_model(cls, mj: Any, model: Any) -> "_OmniBase | None":
        names = WHEELS + BASE_JOINTS
        ids = {n: mj.mj_name2id(model, mj.mjtObj.mjOBJ_JOINT, n) for n in names}
        acts = [mj.mj_name2id(model, mj.mjtObj.mjOBJ_ACTUATOR, n) for n in BASE_ACTUATORS]
        if any(i < 0 for i in ids.values()) or any(a < 0 for a in acts):
            return None                                 # a scene without the mobile base
        rows = []
        for wheel in WHEELS:
            j = ids[wheel]
            body = int(model.jnt_bodyid[j])
            position = model.body_pos[body][:2]         # wheel bodies sit unrotated on the base body
            axis = model.jnt_axis[j]
            radius = float(model.geom_size[int(model.body_geomadr[body])][0])
            drive = np.array([axis[1], -axis[0]])      # axis x z: the way the wheel pushes the base
            lever = np.array([-position[1], position[0]]) @ drive    # (z x p) . drive: how spin turns the base
            rows.append([drive[0] / radius, drive[1] / radius, lever / radius])
        wheel_matrix = np.asarray(rows)
        if abs(np.linalg.det(wheel_matrix)) < 1e-9:
            raise MujocoWorldError("the description's wheels cannot steer the base in every direction; check "
                                   "their axles")
        return cls(wheel_matrix, [int(model.jnt_dofadr[ids[w]]) for w in WHEELS],
                   [int(model.jnt_qposadr[ids[b]]) for b in BASE_JOINTS], acts)

    def follow_wheels(self, data: Any) -> None:
        vx, vy, wz = self.to_body @ data.qvel[self.wheel_dofs]
        yaw = data.qpos[self.qpos_adr[2]]
        c, s = math.cos(yaw), math.sin(yaw)
        data.ctrl[self.actuators] = (c * vx - s * vy, s * vx + c * vy, wz)
