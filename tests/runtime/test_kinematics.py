"""The arm's kinematics from the robot description: FK against MuJoCo, IK within limits, deltas, the "ik" mapper."""
import subprocess
import sys

import numpy as np
import pytest

from edgeact.runtime.control import mapper_type
from edgeact.runtime.errors import ConfigError
from edgeact.runtime.kinematics import ARM_JOINTS, ArmKinematics, IkConfig, IkSettings, Pose, rpy_matrix

pytest.importorskip("pinocchio", reason="the kinematics need Pinocchio (pip install pin==4.1.0)")
pytestmark = pytest.mark.timeout(60)

ROT_TOL = 1e-3      # rad
POS_TOL = 1e-4      # m


@pytest.fixture(scope="module")
def arm() -> ArmKinematics:
    return ArmKinematics()


@pytest.fixture(scope="module")
def camera_arm() -> ArmKinematics:
    return ArmKinematics(reference_frame="camera_optical")


def inner_configs(arm: ArmKinematics, count: int, seed: int, margin_rad: float = 0.3) -> np.ndarray:
    """Random joint positions at least `margin_rad` inside every limit."""
    rng = np.random.default_rng(seed)
    return rng.uniform(arm.lower_rad + margin_rad, arm.upper_rad - margin_rad, size=(count, len(arm.joints)))


def rotation_angle(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.arccos(np.clip((np.trace(a.T @ b) - 1) / 2, -1.0, 1.0)))


# A working pose: hand forward and pitched down a little, above the table.
WORK_Q = np.array([0.1, 0.4, -0.2, 0.5, 0.1])


# -- forward kinematics ----------------------------------------------------------------------------

def test_forward_kinematics_matches_mujoco_for_random_configurations(arm):
    mujoco_robot = pytest.importorskip("edgeact.drivers.sim.mujoco_robot")
    world = mujoco_robot.MujocoWorld()
    for q in inner_configs(arm, 25, seed=1, margin_rad=0.0):
        world.set_joint_positions(dict(zip(ARM_JOINTS, q)))
        for frame in ("ee", "camera_optical"):
            position, rotation = world.site_pose(frame)
            pose = arm.frame_pose(frame, q)
            np.testing.assert_allclose(pose.position_m, position, atol=1e-6)
            np.testing.assert_allclose(pose.rotation, rotation, atol=1e-6)


def test_joint_limits_and_frames_come_from_the_description(arm):
    assert arm.joints == ARM_JOINTS
    np.testing.assert_allclose(arm.lower_rad, [-1.92, -1.75, -1.69, -1.66, -2.74])
    np.testing.assert_allclose(arm.upper_rad, [1.92, 1.75, 1.69, 1.66, 2.84])
    ready = arm.forward(np.zeros(5))        # the description's zero: upper arm up, forearm and hand forward
    np.testing.assert_allclose(ready.position_m, [0.29, 0.0, 0.331], atol=1e-9)
    np.testing.assert_allclose(ready.rotation, np.eye(3), atol=1e-12)


def test_a_camera_reference_frame_expresses_poses_in_the_optical_frame(arm, camera_arm):
    camera = arm.frame_pose("camera_optical", np.zeros(5))
    for q in inner_configs(arm, 5, seed=2):
        in_base, in_camera = arm.forward(q), camera_arm.forward(q)
        np.testing.assert_allclose(camera.rotation @ in_camera.position_m + camera.position_m, in_base.position_m,
                                   atol=1e-12)
        np.testing.assert_allclose(camera.rotation @ in_camera.rotation, in_base.rotation, atol=1e-12)
    # The optical axis (+z) looks down at the table, image right (+x) is the robot's right-hand side.
    assert camera.rotation[2, 2] < -0.5 and camera.rotation[1, 0] < -0.5


# -- inverse kinematics ----------------------------------------------------------------------------

def test_ik_reaches_reachable_targets_within_the_limits(arm):
    rng = np.random.default_rng(3)
    for q_true in inner_configs(arm, 20, seed=4):
        target = arm.forward(q_true)
        q_start = q_true + rng.uniform(-0.25, 0.25, size=5)
        result = arm.solve(target, q_start)
        assert result.converged, result
        reached = arm.forward(result.q_rad)
        assert np.linalg.norm(reached.position_m - target.position_m) < POS_TOL
        assert rotation_angle(reached.rotation, target.rotation) < ROT_TOL
        assert np.all(result.q_rad >= arm.lower_rad) and np.all(result.q_rad <= arm.upper_rad)


def test_ik_keeps_joints_within_limits_when_a_target_needs_more(arm):
    # The same pose as a configuration with the elbow 0.3 rad past its limit: position is kept first,
    # with the elbow parked at its limit and the other joints making up for it.
    q_beyond = np.array([0.2, 1.2, -1.99, 0.6, 0.0])
    target = Pose(arm.forward(np.clip(q_beyond, arm.lower_rad, arm.upper_rad)).position_m + [0.0, 0.0, -0.01],
                  np.eye(3))
    result = arm.solve(target, np.zeros(5))
    assert np.all(result.q_rad >= arm.lower_rad) and np.all(result.q_rad <= arm.upper_rad)
    for q in inner_configs(arm, 5, seed=5, margin_rad=0.0):
        wild = Pose(arm.forward(q).position_m, rpy_matrix(2.5, -2.0, 1.0))
        result = arm.solve(wild, np.zeros(5))
        assert np.all(result.q_rad >= arm.lower_rad) and np.all(result.q_rad <= arm.upper_rad)


def test_narrower_limits_than_the_descriptions_bind_the_solution(arm):
    narrow = ArmKinematics(limits_rad={"elbow_flex": [-1.0, 1.0], "shoulder_lift": [-5.0, 0.9]})
    np.testing.assert_allclose(narrow.lower_rad, [-1.92, -1.75, -1.0, -1.66, -2.74])
    np.testing.assert_allclose(narrow.upper_rad, [1.92, 0.9, 1.0, 1.66, 2.84])
    q_outside = np.array([0.0, 1.2, -1.4, 0.8, 0.0])          # reachable with the description's limits only
    result = narrow.solve(arm.forward(q_outside), np.zeros(5))
    assert np.all(result.q_rad >= narrow.lower_rad) and np.all(result.q_rad <= narrow.upper_rad)
    assert result.position_error_m > 1e-3                      # so it cannot get there
    with pytest.raises(ConfigError, match="joint limits for 'elbow_flex': \\[2.0, 3.0\\] leave nothing"):
        ArmKinematics(limits_rad={"elbow_flex": [2.0, 3.0]})


def test_unreachable_targets_end_at_the_nearest_reach_without_an_error(arm):
    start = arm.forward(np.zeros(5))
    far = Pose(start.position_m + [0.6, 0.0, 0.0], start.rotation)
    result = arm.solve(far, np.zeros(5))
    assert not result.converged
    assert np.all(result.q_rad >= arm.lower_rad) and np.all(result.q_rad <= arm.upper_rad)
    reached = arm.forward(result.q_rad).position_m
    # Stretched out toward the target (damped least squares slows down near the stretched singularity,
    # so "out" means within a centimetre of the full reach), and nearer to it than the start.
    shoulder = arm.frame_pose("upper_arm", np.zeros(5)).position_m
    reach_m = 0.116 + 0.135 + 0.035 + 0.06
    assert reach_m - 0.01 < np.linalg.norm(reached - shoulder) <= reach_m + 1e-9
    assert result.position_error_m < 0.6 - 0.08
    assert result.iterations <= 40 + 10     # at most 40 iterations, then at most 10 of the position alone


def test_reachable_translations_are_reached_whatever_the_orientation_allows(arm):
    """A 5-joint arm often cannot keep its hand's orientation along a translation; the position comes first:
    every translation that is reachable at all is reached, from anywhere in the joint ranges."""
    rng = np.random.default_rng(3)
    reachable = 0
    for _ in range(60):
        q0 = rng.uniform(arm.lower_rad + 0.3, arm.upper_rad - 0.3)
        start = arm.forward(q0)
        target = start.moved([*rng.uniform(-0.02, 0.02, 3), 0.0, 0.0, 0.0])
        if arm.solve(target, q0, IkSettings(track_orientation=False)).position_error_m > 1e-4:
            continue        # out of reach from here
        reachable += 1
        result = arm.solve(target, q0)
        assert result.position_error_m < 1e-4, (q0, target.position_m, result)
    assert reachable >= 50


@pytest.mark.parametrize("delta", [[0.02, 0, 0], [0, 0.02, 0], [0, 0, -0.02], [-0.015, 0.01, 0.01]])
def test_a_translation_delta_moves_the_end_effector_by_that_delta_in_the_base_frame(arm, delta):
    start = arm.forward(WORK_Q)
    result = arm.solve(start.moved([*delta, 0, 0, 0]), WORK_Q)
    moved = arm.forward(result.q_rad)
    np.testing.assert_allclose(moved.position_m - start.position_m, delta, atol=POS_TOL)


@pytest.mark.parametrize(("axis", "angle"), [(3, 0.2), (4, -0.25)])     # roll about x, pitch about y
def test_rotation_deltas_the_arm_can_make_turn_the_hand_about_its_tip(arm, axis, angle):
    start = arm.forward(np.zeros(5))        # hand along +x: roll is the wrist roll, pitch the wrist plane
    delta = np.zeros(6)
    delta[axis] = angle
    result = arm.solve(start.moved(delta), np.zeros(5))
    assert result.converged
    moved = arm.forward(result.q_rad)
    np.testing.assert_allclose(moved.position_m, start.position_m, atol=POS_TOL)
    assert rotation_angle(moved.rotation, rpy_matrix(*delta[3:]) @ start.rotation) < ROT_TOL


def test_a_yaw_the_five_joint_arm_cannot_make_keeps_the_position_first(arm):
    start = arm.forward(np.zeros(5))
    result = arm.solve(start.moved([0, 0, 0, 0, 0, 0.3]), np.zeros(5))
    assert not result.converged
    np.testing.assert_allclose(arm.forward(result.q_rad).position_m, start.position_m, atol=POS_TOL)
    assert result.rotation_error_rad == pytest.approx(0.3, abs=0.02)


def test_a_delta_in_the_camera_frame_moves_along_the_camera_axes(arm, camera_arm):
    start = camera_arm.forward(WORK_Q)
    result = camera_arm.solve(start.moved([0.0, 0.0, 0.02, 0, 0, 0]), WORK_Q)   # 2 cm along the optical axis
    optical_axis = arm.frame_pose("camera_optical", WORK_Q).rotation[:, 2]
    moved_in_base = arm.forward(result.q_rad).position_m - arm.forward(WORK_Q).position_m
    np.testing.assert_allclose(moved_in_base, 0.02 * optical_axis, atol=POS_TOL)


# -- the "ik" action mapper -------------------------------------------------------------------------

MOTORS = list(ARM_JOINTS) + ["gripper", "base_left_wheel"]


def test_the_ik_mapper_is_in_the_registry_and_follows_a_delta_over_an_action(arm):
    assert mapper_type("ik") is IkConfig
    mapper = IkConfig(gripper_range_rad=[0.0, 1.2]).make_mapper(MOTORS)
    assert mapper.joints == ARM_JOINTS + ("gripper",)
    start_rad = {**dict(zip(ARM_JOINTS, WORK_Q)), "gripper": 0.2}
    action = np.array([0.02, -0.01, 0.01, 0.0, 0.0, 0.0, 1.0])
    assert mapper.apply(start_rad, action, 0.0) == pytest.approx(start_rad, abs=1e-9)
    p0 = arm.forward(WORK_Q).position_m
    for fraction in (0.5, 1.0):
        out = mapper.apply(start_rad, action, fraction)
        reached = arm.forward(arm.q_from(out)).position_m
        np.testing.assert_allclose(reached - p0, fraction * action[:3], atol=POS_TOL)
        assert out["gripper"] == pytest.approx(0.2 + fraction * (1.2 - 0.2))


def test_the_ik_mapper_scales_and_caps_each_action():
    mapper = IkConfig(translation_scale=0.1, max_translation_m=0.03, max_rotation_rad=0.1).make_mapper(MOTORS)
    np.testing.assert_allclose(mapper.delta(np.array([0.1, 0.2, 0, 0, 0, 0, 0])), [0.01, 0.02, 0, 0, 0, 0])
    capped = mapper.delta(np.array([3.0, 4.0, 0, 0.0, 0.3, 0.4, 0]))     # 0.5 m and 0.5 rad asked
    np.testing.assert_allclose(capped, [0.018, 0.024, 0, 0, 0.06, 0.08])


def test_ik_config_errors_name_the_fix():
    with pytest.raises(ConfigError, match="gripper_joint: 'wrist_roll' is also an arm joint"):
        IkConfig(gripper_joint="wrist_roll")
    with pytest.raises(ConfigError, match="max_translation_m: must be a positive number"):
        IkConfig(max_translation_m=0)
    with pytest.raises(ConfigError, match=r"joints \['elbow'\] are not motors of the robot"):
        IkConfig(joints=["elbow"]).make_mapper(["elbow_flex", "gripper"])
    with pytest.raises(ConfigError, match=r"the actions' reference \(actions.frame\): no frame 'nose' in robot.xml"):
        IkConfig(frame="nose").make_mapper(MOTORS)
    with pytest.raises(ConfigError, match=r"the end effector \(actions.ee_frame\): no frame 'nose' in robot.xml"):
        IkConfig(ee_frame="nose").make_mapper(MOTORS)
    with pytest.raises(ConfigError, match="reference frame 'hand' moves with joint 'wrist_roll'"):
        IkConfig(frame="hand").make_mapper(MOTORS)
    with pytest.raises(ConfigError, match="joint_limits_rad: 'elbow' is not one of joints"):
        IkConfig(joint_limits_rad={"elbow": [-1.0, 1.0]})
    with pytest.raises(ConfigError, match=r"robot description /nowhere.xml \(actions.description\) not found"):
        IkConfig(description="/nowhere.xml").make_mapper(MOTORS)


def test_a_robot_config_with_the_ik_mapper_loads():
    from edgeact.runtime.robot_config import robot_config_from_dict
    from edgeact.runtime.sim_robot import sim_robot_config_dict

    actions = {"type": "ik", "joints": list(ARM_JOINTS), "frame": "camera_optical", "gripper_joint": "gripper"}
    config = robot_config_from_dict(sim_robot_config_dict(actions=actions))
    assert isinstance(config.actions, IkConfig) and config.actions.frame == "camera_optical"
    assert config.to_dict()["actions"]["type"] == "ik"


def test_the_kinematics_never_import_mujoco():
    code = ("import sys\n"
            "import edgeact.runtime.kinematics as k\n"
            "assert 'pinocchio' not in sys.modules, 'pinocchio imported with the module'\n"
            "k.ArmKinematics().solve(k.ArmKinematics().forward([0, 0, 0, 0, 0]), [0, 0, 0, 0, 0])\n"
            "assert 'mujoco' not in sys.modules, 'mujoco imported by the kinematics'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_the_ticks_of_one_action_stay_on_one_branch_of_the_arms_solutions():
    """The control thread asks for 1/10 more of an action each tick: each solve searches from the tick before, so the
    goals move as the hand does (searched from the action's start each time, the 9th tick of this 1.5 cm action
    landed on another branch: the shoulder 1.47 rad away, the elbow at its limit)."""
    from edgeact.runtime.kinematics import ARM_JOINTS, IkConfig

    mapper = IkConfig().make_mapper(list(ARM_JOINTS) + ["gripper"])
    q0 = np.array([0.722, 0.567, 1.396, 0.676, -2.515])
    action = np.array([-0.0086, -0.0089, -0.0079, -0.039, -0.0243, -0.0182, 0.0])
    start = {**dict(zip(ARM_JOINTS, q0)), "gripper": 0.0}
    previous = q0
    for fraction in np.arange(1, 11) / 10:
        q = mapper.kinematics.q_from(mapper.apply(start, action, fraction))
        assert np.max(np.abs(q - previous)) < 0.1, (fraction, q, previous)
        previous = q
