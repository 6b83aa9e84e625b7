"""Hand-eye calibration on the simulated robot: the marker on MuJoCo's gripper, rendered and found; `edgeact
calibrate-hand-eye` through the simulated servo bus finds the description's camera; bad input refused."""
import copy
import json

import numpy as np
import pytest

pytest.importorskip("cv2", reason="hand-eye calibration needs OpenCV (pip install opencv-python-headless==4.14.0.94)")
pytest.importorskip("mujoco", reason="the simulated robot needs mujoco (pip install mujoco==4.0.0)")
pytest.importorskip("pinocchio", reason="the arm's kinematics need Pinocchio (pip install pin==4.1.0)")

from edgeact.calibration.hand_eye import (HandEyeSample, MarkerSpec, calibration_poses, detect_marker,  # noqa: E402
                                          rotation_angle_deg, solve_fixed_camera, transform)
from edgeact.calibration.hand_eye_session import sim_hand_marker  # noqa: E402
from edgeact.runtime.errors import ConfigError  # noqa: E402
from edgeact.runtime.kinematics import ARM_JOINTS, ArmKinematics  # noqa: E402

pytestmark = pytest.mark.timeout(120)


def marker_world(marker=MarkerSpec()):
    from edgeact.drivers.sim.mujoco_robot import MujocoWorld, MujocoWorldConfig

    return MujocoWorld(MujocoWorldConfig(hand_marker=sim_hand_marker(marker)))


def renderer(world, width, height):
    from edgeact.drivers.cameras.mujoco_camera import MujocoRgbdRenderer

    return MujocoRgbdRenderer(world, "front", width, height)


def rendered_samples(world, cam, kinematics, marker, poses=16, spread_rad=0.4):
    """Samples as the session takes them, the joints set in the world instead of driven there: each seeded pose's
    frame rendered, the marker searched, the hand's pose by forward kinematics."""
    samples = []
    for q in calibration_poses(np.zeros(5), kinematics.lower_rad, kinematics.upper_rad, poses, spread_rad, seed=0):
        world.set_joint_positions(dict(zip(ARM_JOINTS, q)))
        view = detect_marker(cam.render()[0], cam.intrinsics, marker)
        if view is not None:
            hand = kinematics.forward(q)
            samples.append(HandEyeSample(dict(zip(ARM_JOINTS, q)), transform(hand.rotation, hand.position_m), view))
    return samples


def test_the_simulated_marker_is_found_where_the_gripper_holds_it():
    """The rendered marker's corners, found by OpenCV, keep their place on the hand as the arm moves: its pose in the
    camera, carried to the base through the description's camera frame, is the same in the hand's frame at every
    pose (to a few mm and a degree), and it turns with the hand."""
    marker = MarkerSpec()
    world = marker_world(marker)
    cam = renderer(world, 640, 480)
    kinematics = ArmKinematics()
    try:
        mounts, seen = [], 0
        for q in calibration_poses(np.zeros(5), kinematics.lower_rad, kinematics.upper_rad, 8, 0.3, seed=3):
            world.set_joint_positions(dict(zip(ARM_JOINTS, q)))
            view = detect_marker(cam.render()[0], cam.intrinsics, marker)
            if view is None:
                continue
            seen += 1
            camera = kinematics.frame_pose("camera_optical", q)
            hand = kinematics.forward(q)
            mounts.append(np.linalg.inv(transform(hand.rotation, hand.position_m))
                          @ transform(camera.rotation, camera.position_m) @ view.cam_T_marker)
        assert seen >= 5
        positions = np.array([m[:3, 3] for m in mounts])
        assert np.max(np.linalg.norm(positions - positions.mean(axis=0), axis=1)) < 0.006
        assert max(rotation_angle_deg(m[:3, :3].T @ mounts[0][:3, :3]) for m in mounts) < 2.0
        # the sheet lies on top of the hand, about where HandMarker puts it (2 cm ahead of the wrist roll's origin)
        ee_to_hand = 0.06       # the description's ee site is 6 cm ahead of the hand body's origin
        assert np.linalg.norm(positions.mean(axis=0) - [0.02 - ee_to_hand, 0.0, 0.0195]) < 0.01
    finally:
        cam.close()


def test_solving_on_rendered_frames_finds_the_descriptions_camera():
    """Joints set in the world, frames rendered, the marker found, the chain solved: the camera's optical frame of the
    description to within 2 mm and 0.2 degree, corners reprojected within a pixel."""
    marker = MarkerSpec()
    world = marker_world(marker)
    cam = renderer(world, 640, 480)
    kinematics = ArmKinematics()
    try:
        result = solve_fixed_camera(rendered_samples(world, cam, kinematics, marker), cam.intrinsics, marker)
    finally:
        cam.close()
    truth = kinematics.frame_pose("camera_optical", np.zeros(5))
    assert np.linalg.norm(result.ref_T_cam[:3, 3] - truth.position_m) < 0.002
    assert rotation_angle_deg(result.ref_T_cam[:3, :3].T @ truth.rotation) < 0.2
    assert result.median_reprojection_px < 1.0


def test_a_camera_off_its_described_place_is_found_where_it_is():
    """The real use: the mast bent, the camera 2 cm and 3 degrees off the description. The world's camera is moved;
    the calibration finds it where it is (to 2 mm and 0.2 degree), not where the description says (that is
    ~2 cm off)."""
    import mujoco

    marker = MarkerSpec()
    world = marker_world(marker)
    body = mujoco.mj_name2id(world.model, mujoco.mjtObj.mjOBJ_BODY, "camera_link")
    world.model.body_pos[body] += [0.012, -0.01, 0.013]
    turn = np.zeros(4)
    mujoco.mju_axisAngle2Quat(turn, np.array([0.3, 1.0, 0.2]) / np.linalg.norm([0.3, 1.0, 0.2]), np.radians(3.0))
    moved = np.zeros(4)
    mujoco.mju_mulQuat(moved, turn, world.model.body_quat[body].copy())
    world.model.body_quat[body] = moved
    cam = renderer(world, 640, 480)
    kinematics = ArmKinematics()
    try:
        result = solve_fixed_camera(rendered_samples(world, cam, kinematics, marker), cam.intrinsics, marker)
        camera = mujoco.mj_name2id(world.model, mujoco.mjtObj.mjOBJ_CAMERA, "front")
        where = world.data.cam_xpos[camera].copy()
        optical = world.data.cam_xmat[camera].reshape(3, 3) @ np.diag([1.0, -1.0, -1.0])   # y down, z forward
    finally:
        cam.close()
    described = kinematics.frame_pose("camera_optical", np.zeros(5))
    assert np.linalg.norm(described.position_m - where) > 0.015          # the description is off ...
    assert np.linalg.norm(result.ref_T_cam[:3, 3] - where) < 0.002       # ... the calibration is not
    assert rotation_angle_deg(result.ref_T_cam[:3, :3].T @ optical) < 0.2
    assert rotation_angle_deg(described.rotation.T @ optical) > 2.5


@pytest.fixture
def robot_config(tmp_path):
    from edgeact.runtime.sim_robot import mujoco_robot_config_dict

    path = tmp_path / "robot.json"
    path.write_text(json.dumps(mujoco_robot_config_dict()), encoding="utf-8")
    return path


@pytest.mark.slow
def test_the_command_calibrates_the_simulated_robot_through_its_bus_and_writes_the_config(robot_config, tmp_path,
                                                                                          capsys):
    """`edgeact calibrate-hand-eye CONFIG --write`: the arm moved through the simulated servo bus and the safety
    guard, the config's camera (resized) photographing the simulated gripper's marker; the pose written into the
    config is the description's camera to within 3 mm and 0.3 degree, and the config still loads, its other
    sections unchanged; the JSON report says what happened at every pose."""
    from edgeact.runtime.cli import main
    from edgeact.runtime.robot_config import load_robot_config
    from edgeact.runtime.trace_follow import camera_pose_from_dict

    before = json.loads(robot_config.read_text())
    out = tmp_path / "hand_eye.json"
    code = main(["calibrate-hand-eye", str(robot_config), "--camera-size", "640x480", "--poses", "12",
                 "--out", str(out), "--write"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    after = json.loads(robot_config.read_text())
    pose = camera_pose_from_dict(after["plan"]["trace_camera_pose"])
    truth = ArmKinematics().frame_pose("camera_optical", np.zeros(5))
    assert np.linalg.norm(pose.position_m - truth.position_m) < 0.003
    assert rotation_angle_deg(pose.rotation.T @ truth.rotation) < 0.3
    expected = copy.deepcopy(before)
    expected["plan"]["trace_camera_pose"] = after["plan"]["trace_camera_pose"]
    assert after == expected            # the camera's size was the session's, not written
    load_robot_config(robot_config)
    report = json.loads(out.read_text())
    assert len(report["poses"]) == 12 and report["samples"] == sum(p["seen"] for p in report["poses"]) >= 6
    assert report["trace_camera_pose"] == after["plan"]["trace_camera_pose"]
    assert report["nominal_offset_m"] < 0.003 and report["camera_frame"] == "camera_optical"
    assert "vs the description's 'camera_optical'" in printed


def test_a_mapper_without_kinematics_is_refused_before_anything_moves(robot_config):
    """The hand's pose comes from the "ik" mapper's kinematics: a joint_delta config is refused with the fix."""
    from edgeact.runtime.cli import main

    data = json.loads(robot_config.read_text())
    data["actions"] = {"type": "joint_delta", "joints": list(ARM_JOINTS), "dims": [0, 1, 2, 4, 3],
                       "gains": [1.0] * 5, "gripper_joint": "gripper", "gripper_action_range": [-1.0, 1.0],
                       "gripper_range_rad": [0.0, 1.0]}
    data["plan"]["follow_trace"] = "never"
    robot_config.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match='"ik" actions section'):
        main(["-v", "calibrate-hand-eye", str(robot_config), "--poses", "6"])


@pytest.mark.parametrize("args, message", [
    (["--camera-size", "640"], "WIDTHxHEIGHT"),
    (["--poses", "3"], "at least 6"),
    (["--marker-id", "99"], "ids 0..49"),
    (["--marker-dictionary", "DICT_9X9_1"], "unknown"),
    (["--method", "guess"], "unknown"),
])
def test_bad_options_name_the_problem(robot_config, args, message):
    from edgeact.runtime.cli import main

    with pytest.raises(ConfigError, match=message):
        main(["-v", "calibrate-hand-eye", str(robot_config), *args])


def test_write_refuses_a_toml_config(tmp_path):
    from edgeact.runtime.cli import main

    path = tmp_path / "robot.toml"
    path.write_text('[robot]\nbus = "sim"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="no TOML writer"):
        main(["-v", "calibrate-hand-eye", str(path), "--write"])


def test_a_marker_on_the_simple_simulated_arm_is_refused():
    from edgeact.runtime.robot_config import robot_config_from_dict
    from edgeact.runtime.sim_robot import sim_robot_config_dict, start_sim_bus

    config = robot_config_from_dict(sim_robot_config_dict())
    with pytest.raises(ConfigError, match="MuJoCo robot"):
        with start_sim_bus(config.robot, hand_marker=sim_hand_marker(MarkerSpec())):
            pass


# -- the session's motion and its ways out ---------------------------------------------------------

class FakeArm:
    """A guard's face for move_to: each send walks every joint toward its goal at `speed` rad/s of wall time,
    except that a joint cannot pass `stop_at` (an obstacle)."""

    def __init__(self, position, speed=4.0, stop_at=None):
        import time

        self.position, self.speed, self.stop_at = dict(position), speed, dict(stop_at or {})
        self.sent, self._time, self._last = [], time.monotonic, time.monotonic()

    def send(self, goal):
        now = self._time()
        step = self.speed * (now - self._last)
        self._last = now
        for name, target in goal.items():
            here = self.position[name]
            moved = here + max(-step, min(step, target - here))
            if name in self.stop_at:
                moved = min(moved, self.stop_at[name]) if target > here else max(moved, self.stop_at[name])
            self.position[name] = moved
        self.sent.append(dict(goal))
        return dict(goal)

    def read_state(self, names=None):
        from edgeact.drivers.motors.bus import MotorState

        return MotorState({n: self.position[n] for n in (names or self.position)})


def test_move_to_waits_until_the_arm_stands_at_its_goal():
    import time

    from edgeact.calibration.hand_eye_session import STILL_S, move_to

    arm = FakeArm({"a": 0.0, "b": 0.0})
    start = time.monotonic()
    assert move_to(arm, {"a": 0.6, "b": -0.4})
    took = time.monotonic() - start
    assert arm.position == pytest.approx({"a": 0.6, "b": -0.4}, abs=1e-9)
    assert STILL_S <= took < STILL_S + 0.6          # 0.15 s of motion, then STILL_S standing
    assert all(goal == {"a": 0.6, "b": -0.4} for goal in arm.sent)


def test_move_to_gives_up_on_an_obstacle_at_once_and_holds_where_the_arm_stopped():
    """A joint blocked short of its goal: given up within a second (not the 20 s timeout), and the last command is
    where the arm stands, so the servo does not go on pushing."""
    import time

    from edgeact.calibration.hand_eye_session import MOVE_TIMEOUT_S, STALL_S, move_to

    arm = FakeArm({"a": 0.0, "b": 0.0}, stop_at={"a": 0.25})
    start = time.monotonic()
    assert not move_to(arm, {"a": 0.6, "b": -0.4})
    took = time.monotonic() - start
    assert STALL_S <= took < STALL_S + 0.6 < MOVE_TIMEOUT_S
    assert arm.sent[-1] == pytest.approx({"a": 0.25, "b": -0.4}, abs=1e-9)


def test_poses_below_the_start_are_not_visited():
    """The seeded offsets would put the hand into the table: every pose kept is at or above the start's height (in
    the base frame, also with the actions in the camera's frame), the start first; some were dropped."""
    from edgeact.calibration.hand_eye_session import above_start

    for frame in ("base", "camera_optical"):
        kinematics = ArmKinematics(reference_frame=frame)
        base = ArmKinematics()
        candidates = calibration_poses(np.zeros(5), kinematics.lower_rad, kinematics.upper_rad, 60, 0.35, seed=0)
        kept = above_start(kinematics, candidates, 0.0)
        heights = [base.forward(q).position_m[2] for q in kept]
        assert np.array_equal(kept[0], candidates[0]) and 5 < len(kept) < len(candidates)
        assert min(heights) >= heights[0] - 1e-9
        assert len(above_start(kinematics, candidates, 0.05)) > len(kept)


def mujoco_config(tmp_path, **sections):
    from edgeact.runtime.robot_config import robot_config_from_dict
    from edgeact.runtime.sim_robot import mujoco_robot_config_dict

    data = mujoco_robot_config_dict()
    data["camera"].update(width=320, height=240)
    for name, value in sections.items():
        data[name] = {**data.get(name, {}), **value}
    path = tmp_path / "robot.json"
    path.write_text(json.dumps(data))
    return robot_config_from_dict(data, source=str(path)), path


@pytest.mark.parametrize("how", ["file", "event"])
def test_the_estop_mid_session_stops_it_in_the_safe_state(tmp_path, how):
    """The e-stop pressed after the second pose (the config's file appears, or the key's event is set): the session
    ends at once with the guard's EStopLatchedError, nothing solved."""
    import threading

    from edgeact.calibration.hand_eye_session import SessionOptions, calibrate
    from edgeact.drivers.motors.safety import EStopLatchedError

    config, _ = mujoco_config(tmp_path, estop={"file": str(tmp_path / "STOP")})
    event = threading.Event()
    seen = []

    def press(record, total):
        seen.append(record.index)
        if record.index == 1:
            (tmp_path / "STOP").touch() if how == "file" else event.set()

    with pytest.raises(EStopLatchedError):
        calibrate(config, MarkerSpec(), SessionOptions(poses=8), press, event)
    assert seen == [0, 1]


def test_an_active_estop_refuses_the_start(tmp_path):
    from edgeact.calibration.hand_eye_session import calibrate

    config, _ = mujoco_config(tmp_path, estop={"file": str(tmp_path / "STOP")})
    (tmp_path / "STOP").touch()
    with pytest.raises(ConfigError, match="e-stop is active before the start"):
        calibrate(config, MarkerSpec())


def test_a_refused_start_turns_torque_off(tmp_path, monkeypatch):
    """A joint outside its limits at the start: refused, and torque turned off at once (the message says to move
    the joint by hand), even with robot.disable_torque_on_exit false."""
    from edgeact.calibration.hand_eye_session import calibrate
    from edgeact.drivers.motors.safety import SafetyGuard, StartRefusedError

    limits = {"joint_limits_rad": {**{j: [-1.5, 1.5] for j in ARM_JOINTS}, "shoulder_pan": [0.3, 1.5],
                                   "gripper": [-0.15, 1.6]}}
    config, _ = mujoco_config(tmp_path, robot={"disable_torque_on_exit": False}, limits=limits)
    calls = []
    original = SafetyGuard.disable_torque
    monkeypatch.setattr(SafetyGuard, "disable_torque", lambda self, motors=None: (calls.append(motors),
                                                                                  original(self, motors)))
    with pytest.raises(StartRefusedError, match="shoulder_pan"):
        calibrate(config, MarkerSpec())
    assert calls == [None]


@pytest.mark.parametrize("args, message", [
    (["--max-drop-m", "-0.1"], "0..0.5 m"),
    (["--poses", "5"], "at least 6"),
    (["--method", "guess"], "unknown"),
    (["--marker-side-m", "2"], "0.005..1"),
])
def test_options_are_refused_before_the_robot_starts(robot_config, monkeypatch, args, message):
    import edgeact.calibration.hand_eye_session as session
    from edgeact.runtime.cli import main

    def must_not_run(*a, **k):
        raise AssertionError("the session started before its options were checked")

    monkeypatch.setattr(session, "calibrate", must_not_run)
    with pytest.raises(ConfigError, match=message):
        main(["-v", "calibrate-hand-eye", str(robot_config), *args])


def test_a_negative_seed_is_refused_by_its_option(robot_config, monkeypatch, capsys):
    import edgeact.calibration.hand_eye_session as session
    from edgeact.runtime.cli import main

    monkeypatch.setattr(session, "calibrate", lambda *a, **k: pytest.fail("the session started"))
    with pytest.raises(SystemExit) as stop:
        main(["calibrate-hand-eye", str(robot_config), "--seed", "-1"])
    assert stop.value.code == 2 and "a seed is a whole number from 0" in capsys.readouterr().err


@pytest.mark.slow
def test_kill_stops_the_session_like_ctrl_c(robot_config):
    """`kill PID` (SIGTERM) mid-session ends as Ctrl-C does: through the guard's exit, "interrupted", status 143
    (128 + SIGTERM; not killed mid-command with no safe state)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    env = {**os.environ, "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}
    process = subprocess.Popen([sys.executable, "-m", "edgeact.runtime.cli", "calibrate-hand-eye", str(robot_config),
                                "--poses", "30"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 60
        line = ""
        while "pose 2/" not in line and time.monotonic() < deadline:
            line = process.stdout.readline()
            assert line or process.poll() is None, process.stderr.read()
        assert "pose 2/" in line
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 143, err
    assert "interrupted" in err and "Traceback" not in err


def test_the_command_says_the_estop_stopped_it(tmp_path, capsys, monkeypatch):
    """The e-stop file touched while the command moves the arm (as the second pose's frame is searched): status 1,
    the operator told the robot is in its safe state and what to do, nothing written into the config."""
    import edgeact.calibration.hand_eye_session as session
    from edgeact.runtime.cli import main

    _, path = mujoco_config(tmp_path, estop={"file": "STOP"})
    before = path.read_text()
    searched = []

    def detect_and_press(*args, **kwargs):
        searched.append(1)
        if len(searched) == 2:
            (tmp_path / "STOP").touch()
        return detect_marker(*args, **kwargs)

    monkeypatch.setattr(session, "detect_marker", detect_and_press)
    code = main(["calibrate-hand-eye", str(path), "--poses", "30", "--write"])
    text = " ".join(capsys.readouterr().out.split())
    assert code == 1 and "stopped by the e-stop (e-stop input set)" in text and "safe state 'hold'" in text
    assert len(searched) == 2 and "pose 3/" not in text and path.read_text() == before
