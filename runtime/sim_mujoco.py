"""The MuJoCo simulated robot's world, servo bus and camera: in a child process of their own, or in this one.

    parent (the robot's process)                   child "edgeact-sim-mujoco" (spawned)
    Feetech driver on the pty  <---- bytes ---->   MujocoServoBus (the real protocol) -> MujocoWorld joints
    MujocoProcessCamera        <--- FrameRing ---  MujocoCamera rendering the world (sim_camera.py)
    MujocoSimProcess           <--- requests --->  task tracking, joint reads, "stop"

Physics stepping in real time, packet parsing and offscreen rendering are milliseconds of Python
and GL every few milliseconds; in the control process they hold the GIL the 100 Hz control thread
needs, and load the measurement with work no real robot does. In a child they cannot.

With a task (robot.task: seed and template) the world starts as that episode of drivers/sim/task.py,
before the bus answers, and the child judges it ~10 times per simulated second, remembering the
first simulated time it succeeded (`task_report`).
"""
from __future__ import annotations

import contextlib
import math
import multiprocessing
import threading
from typing import Any, Iterator

from edgeact.drivers.cameras.base import CameraConfig, CameraError, Intrinsics
from edgeact.drivers.motors.bus import MotorBusError
from edgeact.runtime.errors import ConfigError
from edgeact.runtime.process_policy import ChildProcess, ignore_interrupts, portable_error, send_quietly
from edgeact.runtime.sim_camera import CAMERA_START_TIMEOUT_S, FrameRing, SlabCamera, SlabFrames
from edgeact.runtime.sim_robot import CENTRE_TICKS, SimChild, ask_realtime

TASK_EVAL_PERIOD_S = 0.1            # simulated seconds between judgements of the episode
SIM_START_TIMEOUT_S = 60.0          # spawn, import mujoco, compile the scene

_running: dict[str, "MujocoSimProcess"] = {}    # by world name: how a "mujoco" camera finds its simulator process
_running_lock = threading.Lock()


@contextlib.contextmanager
def start_mujoco_sim(section, priority: int | None = None, hand_marker: Any = None) -> Iterator[Any]:
    """The MuJoCo robot of a "sim" robot section with physics "mujoco": a MujocoSimProcess when
    `section.sim_in_own_process`, else the world started here under the name "default" (a "mujoco"
    camera renders it) and its MujocoServoBus; either way each motor's calibration says how its ticks
    sit on its joint, and the world starts as `section.task`'s episode when there is one (the task is
    tracked by the process only). `hand_marker` sticks a calibration marker on the world's gripper."""
    joints = servo_joints(section)
    task = (section.task.seed, section.task.template) if section.task is not None else None
    if section.sim_in_own_process:
        sim = MujocoSimProcess(joints, section.baud_rate, priority, task, hand_marker=hand_marker)
        try:
            yield sim
        finally:
            sim.stop()
        return
    world, bus, _ = build_world(joints, section.baud_rate, task, hand_marker=hand_marker)
    with world:
        bus.start()
        try:
            yield bus
        finally:
            bus.stop()


def servo_joints(section) -> dict[str, Any]:
    """{motor name: ServoJoint} of a robot section: id, model and calibration of the motor behind each joint."""
    from edgeact.drivers.sim.mujoco_servo_bus import ServoJoint

    joints = {}
    for name, motor in section.motors.items():
        cal = section.calibration.get(name)
        joints[name] = ServoJoint(motor.id, motor.model, cal.homing_offset if cal else CENTRE_TICKS,
                                  cal.drive_mode if cal else 0, motor.mode)
    return joints


def build_world(joints: dict[str, Any], baud_rate: int, task: tuple[int, str | None] | None,
                world_name: str = "default", hand_marker: Any = None) -> tuple[Any, Any, Any]:
    """(world, servo bus, episode or None), neither started; the world is reset to the episode before the
    bus is built, so its servos come up holding the episode's arm start."""
    from edgeact.drivers.sim.mujoco_robot import MujocoWorld, MujocoWorldConfig, MujocoWorldError
    from edgeact.drivers.sim.mujoco_servo_bus import MujocoServoBus
    from edgeact.drivers.sim.task import reset_world, sample_episode

    try:
        world = MujocoWorld(MujocoWorldConfig(name=world_name, hand_marker=hand_marker))
    except MujocoWorldError as exc:
        raise ConfigError(f"robot: the MuJoCo simulator cannot build it: {exc}") from None
    episode = None
    if task is not None:
        try:
            episode = sample_episode(*task)
        except ConfigError as exc:
            raise ConfigError(f"robot.task: {exc}") from None
        reset_world(world, episode)
    try:
        bus = MujocoServoBus(world, joints, baud_rate=baud_rate)
    except MujocoWorldError as exc:
        raise ConfigError(f"robot: the MuJoCo simulator cannot build it: {exc}") from None
    return world, bus, episode


class TaskTracker:
    """An episode judged every TASK_EVAL_PERIOD_S of simulated time by the task's SuccessJudge (move_to: the end
    effector held over the block for a while); the success kept.

    Times count from `mark_start()` (the loop's start: the robot stack loads after the reset, while the
    arm holds still), or from the reset when it is never called.
    """

    def __init__(self, world: Any, episode: Any, period_s: float = TASK_EVAL_PERIOD_S):
        from edgeact.drivers.sim.task import SuccessJudge, evaluate

        self.world, self.episode, self.period_s, self._evaluate = world, episode, period_s, evaluate
        self._new_judge = lambda: SuccessJudge.for_episode(episode)
        self.judge = self._new_judge()
        self.start_s = 0.0
        self._next_s = 0.0
        self._lag_skips_at_start = world.lag_skips

    @property
    def first_success_s(self) -> float | None:
        return self.judge.success_s

    def mark_start(self) -> None:
        """The episode's clock starts now; what was judged before (the arm held still) is forgotten."""
        with self.world.lock:
            self.start_s = float(self.world.data.time)
            self._lag_skips_at_start = self.world.lag_skips
        self.judge = self._new_judge()

    def due_in_s(self) -> float:
        """Seconds (simulated, about wall seconds) until the next judgement, at most one period."""
        return min(max(self._next_s - self.world.time_s, 0.0), self.period_s)

    def poll(self) -> None:
        """Judge the episode when its time has come (until it succeeds; the schedule goes on, so that the caller
        waiting for the next judgement does not spin)."""
        with self.world.lock:       # the time and the poses of one instant; the physics waits microseconds
            now_s = float(self.world.data.time)
            if now_s < self._next_s:
                return
            success = self._evaluate(self.world, self.episode).success if self.judge.success_s is None else True
        self._next_s = (math.floor(now_s / self.period_s) + 1) * self.period_s
        self.judge.update(now_s - self.start_s, success)

    def report(self) -> dict[str, Any]:
        """The episode, its outcome now, and when it first succeeded (None: not yet)."""
        with self.world.lock:
            now_s = float(self.world.data.time)
            outcome = self._evaluate(self.world, self.episode)
        self.judge.update(now_s - self.start_s, outcome.success)     # a last judgement, now
        return {"episode": self.episode.to_dict(), "success": outcome.success,
                "first_success_s": self.first_success_s, "sim_time_s": now_s - self.start_s,
                "outcome": outcome.to_dict(self.episode.template),
                # Times the physics fell so far behind the wall clock that it skipped ahead (a loaded machine): the
                # episode, judged on the simulated clock, then ran slower than it would on a robot.
                "sim_lag_skips": self.world.lag_skips - self._lag_skips_at_start}


# -- the parent's side ---------------------------------------------------------------------------

class MujocoSimProcess(SimChild):
    """The MuJoCo world, its servo bus on a pty and its camera's renderer, served from one child process.

    Same face as SimBusProcess for the loop (`port`, `pid`, `stop()`); `task_report()` for the episode;
    a MujocoProcessCamera of the same world name gets its frames. A dead child surfaces as a
    MotorBusError (requests) or CameraError (frames) that names how it ended.
    """

    label = "MuJoCo simulator"

    def __init__(self, joints: dict[str, Any], baud_rate: int, priority: int | None = None,
                 task: tuple[int, str | None] | None = None, world_name: str = "default",
                 start_timeout_s: float = SIM_START_TIMEOUT_S, hand_marker: Any = None):
        with _running_lock:
            if world_name in _running:
                raise ConfigError(f"a MuJoCo simulator process for world {world_name!r} is already running; stop it "
                                  "first (one simulated robot per world name)")
        self.world_name, self.task = world_name, task
        self._lock = threading.Lock()           # one request and its answer at a time on the pipe
        self._camera_lock = threading.Lock()
        self._camera_open = False               # the child renders one camera (the robot has one)
        self._frames, child_frames = multiprocessing.get_context("spawn").Pipe()
        self._child = ChildProcess(_serve_mujoco,
                                   (child_frames, joints, baud_rate, priority, task, world_name, hand_marker),
                                   "edgeact-sim-mujoco")
        child_frames.close()        # the child holds its end; its death reads as EOF here
        try:
            self.port: str = self._answer(start_timeout_s, "starting")
        except BaseException:
            self.stop()
            raise
        with _running_lock:
            _running[world_name] = self

    def task_report(self, timeout_s: float = 5.0) -> dict[str, Any] | None:
        """The episode's report (see TaskTracker.report); None when the config set no task."""
        if self.task is None:
            return None
        return self._request(("task_report",), timeout_s, "reporting the task")

    def mark_episode_start(self, timeout_s: float = 5.0) -> None:
        """The loop starts now: the task's times count from here (no-op without a task)."""
        if self.task is not None:
            self._request(("mark_start",), timeout_s, "starting the episode's clock")

    def joint_positions(self, timeout_s: float = 5.0) -> dict[str, float]:
        """Every servo joint's position (rad) in the child's world now."""
        return self._request(("joint_positions",), timeout_s, "reading the joint positions")

    def _request(self, message: tuple, timeout_s: float, doing: str) -> Any:
        with self._lock:
            if not self._child.send(message):
                raise MotorBusError(f"the MuJoCo simulator process is gone ({self._child.exit_status()}) before "
                                    f"{doing}; its error output says why")
            return self._answer(timeout_s, doing)

    def open_camera(self, config: CameraConfig, timeout_s: float = CAMERA_START_TIMEOUT_S
                    ) -> tuple[Intrinsics, SlabFrames]:
        """Start rendering `config`'s camera in the child: its intrinsics, and the frames' end of the ring."""
        with self._camera_lock:
            if self._camera_open:
                raise CameraError(f"camera {config.name!r}: the MuJoCo simulator process already renders a connected "
                                  "camera; disconnect it first (one camera per simulated robot)")
            if not send_quietly(self._frames, ("start", config)):
                raise CameraError(f"camera {config.name!r}: the MuJoCo simulator process is gone "
                                  f"({self._child.exit_status()})")
            while True:
                try:
                    if not self._frames.poll(timeout_s):
                        raise CameraError(f"camera {config.name!r}: the MuJoCo simulator process did not start it "
                                          f"within {timeout_s:g} s ({self._child.exit_status()})")
                    message = self._frames.recv()
                except (EOFError, OSError):
                    raise CameraError(f"camera {config.name!r}: the MuJoCo simulator process exited "
                                      f"({self._child.exit_status()}); its error output says why") from None
                if message[0] == "frame":       # announced by an earlier connection before it stopped: stale
                    continue
                if message[0] == "error":
                    raise message[1]
                _, intrinsics, names, shape_hw = message
                self._camera_open = True
                return intrinsics, SlabFrames(self._frames, names, shape_hw, "the MuJoCo simulator process",
                                              self._child.exit_status)

    def close_camera(self) -> None:
        """Stop rendering (the child unlinks the ring); nothing to do when the child is gone."""
        with self._camera_lock:
            self._camera_open = False
            send_quietly(self._frames, ("stop",))

    def stop(self) -> None:
        """Close the pty, stop the world and the renderer, end the process; safe to call twice."""
        with _running_lock:
            if _running.get(self.world_name) is self:
                del _running[self.world_name]
        self._child.stop()
        self._frames.close()


class MujocoProcessCamera(SlabCamera):
    """A "mujoco" camera whose world runs in a MujocoSimProcess: rendered there, its frames read here.

    The simulator process must run (under the config's world name) when the camera connects.
    """

    timeout_hint = "is the MuJoCo simulator process alive? (its errors go to stderr)"

    def __init__(self, config: CameraConfig):
        super().__init__(config)
        self._sim: MujocoSimProcess | None = None
        self._frames: SlabFrames | None = None

    def _open(self) -> Intrinsics:
        world = self.config.world
        with _running_lock:
            sim = _running.get(world)
            names = sorted(_running)
        if sim is None:
            raise CameraError(f"camera {self.name!r}: no MuJoCo simulator process for world {world!r} is running "
                              f"(running: {', '.join(names) or 'none'}); start the simulated robot first (robot.bus "
                              "\"sim\", physics \"mujoco\")")
        intrinsics, self._frames = sim.open_camera(self.config)
        self._sim = sim
        return intrinsics

    def _release(self) -> None:
        if self._sim is not None:
            self._sim.close_camera()
            self._sim = None


# -- the child -----------------------------------------------------------------------------------

def _serve_mujoco(conn, frames_conn, joints: dict[str, Any], baud_rate: int, priority: int | None,
                  task: tuple[int, str | None] | None, world_name: str, hand_marker: Any = None) -> None:
    """The simulator's process: world, bus and camera; answer requests until "stop" or the parent is gone."""
    ignore_interrupts()     # like real motors, Ctrl-C does not stop it: the safe state needs it
    ask_realtime(priority)      # before the physics and bus threads start: threads inherit their creator's scheduling
    try:
        world, bus, episode = build_world(joints, baud_rate, task, world_name, hand_marker)
    except Exception as exc:        # the process boundary: the parent raises it from its constructor
        send_quietly(conn, ("error", portable_error(exc)))
        return
    camera = _CameraServer(frames_conn, world)
    try:
        world.start()
        bus.start()
        threading.Thread(target=camera.serve, name="sim-camera-server", daemon=True).start()
        tracker = TaskTracker(world, episode) if episode is not None else None
        if send_quietly(conn, ("ready", bus.port)):
            _serve_requests(conn, world, tracker)
    finally:
        camera.close()
        bus.stop()
        world.stop()


def _serve_requests(conn, world: Any, tracker: TaskTracker | None) -> None:
    while True:
        try:
            if not conn.poll(tracker.due_in_s() if tracker is not None else None):
                tracker.poll()      # (a timeout happens only with a tracker)
                continue
            message = conn.recv()
        except (EOFError, OSError):     # the parent is gone
            return
        kind = message[0]
        if kind == "stop":
            return
        if kind == "task_report":
            reply = ("value", tracker.report() if tracker is not None else None)
        elif kind == "joint_positions":
            reply = ("value", world.joint_positions())
        elif kind == "mark_start":
            reply = ("value", tracker.mark_start() if tracker is not None else None)
        else:
            reply = ("error", MotorBusError(f"the MuJoCo simulator process has no request {kind!r}"))
        if not send_quietly(conn, reply):
            return
        if tracker is not None:
            tracker.poll()


class _CameraServer:
    """The child's camera: renders the world when the parent's camera connects, frames through a FrameRing."""

    def __init__(self, conn, world: Any):
        self._conn, self._world = conn, world
        self._lock = threading.Lock()
        self._camera = None
        self._ring: FrameRing | None = None

    def serve(self) -> None:
        """The camera thread: "start" (a camera config), "free" (a slab), "stop"; ends with the parent's pipe."""
        # Rendering is milliseconds of CPU per frame (llvmpipe on a robot without a GL driver); at the bus's
        # real-time priority it would delay the control thread's wake-ups. Late frames are the loop's to judge.
        ask_realtime(None)
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):     # the parent is gone
                return
            kind = message[0]
            if kind == "start":
                self._start(message[1])
            elif kind == "free":
                with self._lock:
                    if self._ring is not None:
                        self._ring.free(message[1])
            elif kind == "stop":
                self.close()

    def _start(self, config: CameraConfig) -> None:
        from edgeact.drivers.cameras.mujoco_camera import MujocoCamera

        self.close()
        with self._lock:
            ring = FrameRing(self._conn)
            camera = None
            try:
                camera = MujocoCamera(config, world=self._world)
                camera.add_listener(ring.on_frame)
                camera.add_stop_listener(ring.on_stop)
                camera.connect()
            except Exception as exc:    # the process boundary: the parent raises it from connect()
                if camera is not None:
                    camera.close()
                send_quietly(self._conn, ("error", portable_error(exc)))
                return
            self._camera, self._ring = camera, ring
            ring.open(camera.intrinsics)

    def close(self) -> None:
        """Stop rendering and unlink the ring; safe to call twice."""
        with self._lock:
            camera, ring, self._camera, self._ring = self._camera, self._ring, None, None
            if camera is not None:
                camera.disconnect()
            if ring is not None:
                ring.close()
