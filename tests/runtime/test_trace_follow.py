"""Trace as a plan (runtime/trace_follow.py): a plan's translations moved onto its trace lifted through the camera."""
import re

import numpy as np
import pytest

from edgeact.drivers.cameras.base import Intrinsics
from edgeact.runtime.errors import ConfigError
from edgeact.runtime.loop import run_robot, trace_follower
from edgeact.runtime.loop_events import PlanEvent
from edgeact.runtime.policy import Plan
from edgeact.runtime.robot_config import PlanSection, robot_config_from_dict
from edgeact.runtime.sim_robot import mujoco_robot_config_dict
from edgeact.runtime.trace_follow import TraceFollower, project_points, spread_trace, trace_boundaries
from tests.runtime.test_ensemble import Alternating
from tests.runtime.test_loop import Collect, config_data, sim  # noqa: F401 (the fixture)

pytest.importorskip("pinocchio", reason="the arm's kinematics need Pinocchio (the edgeact[kinematics] extra)")

INTRINSICS = Intrinsics(fx=140.0, fy=140.0, cx=79.5, cy=59.5, width=160, height=120)
# A pose of the simulated arm with the hand in front of the mast camera (checked below).
JOINTS = {"shoulder_pan": 0.2, "shoulder_lift": -0.4, "elbow_flex": 0.6, "wrist_flex": 0.5, "wrist_roll": 0.0,
          "gripper": 0.3}


@pytest.fixture(scope="module")
def mapper():
    config = robot_config_from_dict(mujoco_robot_config_dict())
    return config.actions.make_mapper(list(config.robot.motors))


@pytest.fixture(scope="module")
def scaled_mapper():
    """The same arm with actions in units of 2 cm (translation_scale 0.02), as a normalized policy might give them."""
    data = mujoco_robot_config_dict()
    data["actions"]["translation_scale"] = 0.02
    config = robot_config_from_dict(data)
    return config.actions.make_mapper(list(config.robot.motors))


def chunk(dx, dy, dz) -> np.ndarray:
    """Eight actions each moving the hand by (dx, dy, dz) m, with a small turn and a closing gripper."""
    actions = np.zeros((8, 7))
    actions[:, :3] = dx, dy, dz
    actions[:, 5], actions[:, 6] = 0.01, -0.5
    return actions


def path_of(mapper, actions) -> tuple[np.ndarray, object]:
    """The hand's positions after each of the chunk's actions, the first the hand now (base frame), and the camera's
    pose, from JOINTS."""
    kin = mapper.kinematics
    q = kin.q_from(JOINTS)
    hand = kin.forward(q).position_m
    steps = np.array([mapper.delta(a)[:3] for a in actions])
    return np.vstack([hand, hand + np.cumsum(steps, axis=0)]), kin.frame_pose("camera_optical", q)


def plan_of(actions, trace_px, forced=True, kept=False) -> Plan:
    """A plan with this trace: the model's (forced False), given with its observation, or the one steer() keeps."""
    return Plan(actions, np.clip(actions * 50, -1, 1), None if trace_px is None else np.asarray(trace_px), None,
                0.0, 0.0, trace_forced=forced, trace_kept=forced and kept)


def test_a_chunk_that_strays_sideways_is_moved_onto_the_drawn_path(mapper):
    # The drawn path goes forward and to the left, down a little; the chunk goes forward and to the right. Moved
    # onto the path's rays, each boundary's position projects exactly onto its trace point, keeps its distance
    # along the ray, and lies far nearer the path than the chunk's own; rotations, gripper and bins are kept.
    true_path, camera = path_of(mapper, chunk(0.01, 0.006, -0.003))
    in_camera = (true_path - camera.position_m) @ camera.rotation
    assert (in_camera[:, 2] > 0.1).all()        # the hand is in front of the camera the whole way
    trace_px = project_points(true_path[trace_boundaries(8)], camera.position_m, camera.rotation, INTRINSICS)
    follower = TraceFollower(mapper, INTRINSICS, "camera_optical", 8, "steered")
    wrong = chunk(0.01, -0.006, -0.003)
    plan = plan_of(wrong, trace_px)
    followed = follower.apply(plan, JOINTS)
    assert followed is not plan and follower.followed == 1
    moved, _ = path_of(mapper, followed.actions)
    own, _ = path_of(mapper, wrong)
    drawn = project_points(moved[trace_boundaries(8)], camera.position_m, camera.rotation, INTRINSICS)
    np.testing.assert_allclose(drawn, trace_px, atol=1e-6)
    for b in trace_boundaries(8)[1:]:       # the nearest point of the ray: moved only across it
        assert abs((own[b] - moved[b]) @ (moved[b] - camera.position_m)) < 1e-9
    error_own = np.linalg.norm(own - true_path, axis=1)[1:].max()
    error_moved = np.linalg.norm(moved - true_path, axis=1)[1:].max()
    assert error_own > 0.08 and error_moved < error_own / 4
    np.testing.assert_array_equal(followed.actions[:, 3:], wrong[:, 3:])
    np.testing.assert_array_equal(followed.actions_normalized, plan.actions_normalized)


@pytest.mark.parametrize("horizon, n_actions", [(4, 8), (8, 6), (8, 8)])
def test_other_units_horizons_and_chunk_lengths(scaled_mapper, horizon, n_actions):
    # Actions in 2 cm units; a trace over 4 actions of an 8-action chunk (boundaries 0, 1, 2, 3, 4; the rest of the
    # chunk moves as its last boundary) or over 8 actions of a 6-action chunk (boundaries 0, 2, 4, 6 followed).
    unit = 0.02
    true_path, camera = path_of(scaled_mapper, chunk(0.01 / unit, 0.006 / unit, -0.003 / unit)[:n_actions])
    boundaries = trace_boundaries(horizon)
    reached = [b for b in boundaries if b <= n_actions]
    ends = true_path[[min(b, n_actions) for b in boundaries]]
    trace_px = project_points(ends, camera.position_m, camera.rotation, INTRINSICS)
    wrong = chunk(0.01 / unit, -0.006 / unit, -0.003 / unit)[:n_actions]
    followed = TraceFollower(scaled_mapper, INTRINSICS, "camera_optical", horizon).apply(plan_of(wrong, trace_px),
                                                                                         JOINTS)
    moved, _ = path_of(scaled_mapper, followed.actions)
    np.testing.assert_allclose(project_points(moved[reached], camera.position_m, camera.rotation, INTRINSICS),
                               trace_px[:len(reached)], atol=1e-6)
    # Past the last boundary reached, the chunk's own steps (every position there moved as that boundary).
    np.testing.assert_allclose(followed.actions[reached[-1]:, :3], wrong[reached[-1]:, :3], atol=1e-12)


def test_a_chunk_on_its_own_path_is_left_as_it_is(mapper):
    actions = chunk(0.008, 0.004, -0.002)
    true_path, camera = path_of(mapper, actions)
    trace_px = project_points(true_path[trace_boundaries(8)], camera.position_m, camera.rotation, INTRINSICS)
    followed = TraceFollower(mapper, INTRINSICS, "camera_optical", 8).apply(plan_of(actions, trace_px), JOINTS)
    np.testing.assert_allclose(followed.actions, actions, atol=1e-9)


def test_the_trace_is_read_from_the_hand_as_it_is_now(mapper):
    # A model's first point is where it sees the hand, a few pixels off: the whole trace shifted by a few pixels
    # moves the chunk as the unshifted trace does.
    true_path, camera = path_of(mapper, chunk(0.01, 0.006, -0.003))
    trace_px = project_points(true_path[trace_boundaries(8)], camera.position_m, camera.rotation, INTRINSICS)
    follower = TraceFollower(mapper, INTRINSICS, "camera_optical", 8)
    wrong = chunk(0.01, -0.006, -0.003)
    exact = follower.apply(plan_of(wrong, trace_px), JOINTS)
    shifted = follower.apply(plan_of(wrong, trace_px + [3.0, -2.0]), JOINTS)
    np.testing.assert_allclose(shifted.actions, exact.actions, atol=1e-9)


@pytest.mark.parametrize("step, wrong", [
    ((0.01, 0.006, -0.003), (0.01, -0.006, -0.003)),      # away from the camera, the chunk straying sideways
    ((-0.01, 0.004, 0.0), (-0.01, 0.004, 0.0)),            # toward it (steps growing in the image), on the path
    ((-0.008, -0.004, 0.004), (-0.008, -0.004, 0.004)),
])
def test_a_path_drawn_once_is_followed_on_from_the_hand_and_held_at_its_end(mapper, step, wrong):
    # A user draws a path once and every plan carries it (steer keeps it). Two actions run per plan, through the
    # mapper's IK as the control step runs them: the hand goes along the path, plan after plan, reaches its end and
    # stays there (begun again from the hand at every plan, it would run on past it; spread by the chunk's step
    # lengths, a chunk whose image steps grow would pause at every plan's first boundary and never get on).
    true_path, camera = path_of(mapper, chunk(*step))
    drawn = project_points(true_path[trace_boundaries(8)], camera.position_m, camera.rotation, INTRINSICS)
    follower = TraceFollower(mapper, INTRINSICS, "camera_optical", 8)
    joints, kin = dict(JOINTS), mapper.kinematics

    def hand(q) -> np.ndarray:
        return kin.forward(kin.q_from(q)).position_m

    def hand_px(q) -> np.ndarray:
        return project_points(hand(q)[None], camera.position_m, camera.rotation, INTRINSICS)[0]

    def off_path(pixel) -> float:
        return float(min(np.linalg.norm(pixel - (a + t * (b - a))) for a, b in zip(drawn[:-1], drawn[1:])
                         for t in np.linspace(0.0, 1.0, 201)))

    ends = []
    for plan in range(7):           # 14 actions: 6 more than the path spans
        followed = follower.apply(plan_of(chunk(*wrong), drawn, kept=True), joints)
        for action in followed.actions[:2]:
            joints = mapper.apply(joints, action, 1.0)
        assert off_path(hand_px(joints)) < 0.5, plan
        if plan == 1:               # four actions in: the path's third point
            assert np.linalg.norm(hand_px(joints) - drawn[2]) < 1.0
        ends.append(hand(joints))
    assert np.linalg.norm(hand_px(joints) - drawn[-1]) < 1.0
    assert np.abs(np.array(ends[4:]) - ends[3]).max() < 1e-4      # held there, in space too, from the fourth plan


def test_the_path_ahead_is_searched_on_from_where_the_hand_got():
    from edgeact.runtime.trace_follow import path_ahead

    out_and_back = np.array([[50.0, 50.0], [65.0, 50.0], [80.0, 50.0], [65.0, 50.5], [50.0, 51.0]])
    path, reached = path_ahead(out_and_back, np.array([60.0, 50.0]))
    np.testing.assert_allclose(path, [[60, 50], [65, 50], [80, 50], [65, 50.5], [50, 51]])
    assert reached == (0, pytest.approx(2 / 3))
    path, reached = path_ahead(out_and_back, np.array([80.0, 50.0]), reached)     # at the turn
    np.testing.assert_allclose(path[0], [80, 50])
    path, reached = path_ahead(out_and_back, np.array([70.0, 50.4]), reached)     # on the way back: not out again
    assert reached[0] == 2 and np.allclose(path[1:], [[65, 50.5], [50, 51]])
    path, reached = path_ahead(out_and_back, np.array([49.0, 51.0]), reached)     # past the end: the end alone
    np.testing.assert_allclose(path, [[50, 51]])
    # A loop drawn back to its start: at the start, the whole loop is ahead (the earliest of the near points).
    loop = np.array([[50.0, 50.0], [70.0, 50.0], [70.0, 70.0], [50.0, 70.0], [50.0, 50.5]])
    np.testing.assert_allclose(path_ahead(loop, np.array([50.0, 50.2]))[0], loop)


def test_only_the_path_steer_keeps_is_followed_on_and_forget_starts_afresh(mapper):
    # A trace that repeats is read afresh from the hand each time when it is the model's or one given with each
    # observation (the evaluation's expert's); the one steer() keeps is followed on from where the hand got; after
    # forget() (a new episode) it is read afresh too.
    true_path, camera = path_of(mapper, chunk(0.01, 0.006, -0.003))
    drawn = project_points(true_path[trace_boundaries(8)], camera.position_m, camera.rotation, INTRINSICS)
    moved_joints = mapper.apply(dict(JOINTS), chunk(0.01, 0.006, -0.003)[0], 1.0)
    moved_joints = mapper.apply(moved_joints, chunk(0.01, 0.006, -0.003)[1], 1.0)    # two actions along the path

    def second(forced: bool, kept: bool, forget: bool = False) -> np.ndarray:
        follower = TraceFollower(mapper, INTRINSICS, "camera_optical", 8, "always")
        follower.apply(plan_of(chunk(0.01, 0.006, -0.003), drawn, forced, kept), JOINTS)
        if forget:
            follower.forget()
        return follower.apply(plan_of(chunk(0.01, 0.006, -0.003), drawn, forced, kept), moved_joints).actions

    fresh = TraceFollower(mapper, INTRINSICS, "camera_optical", 8, "always").apply(
        plan_of(chunk(0.01, 0.006, -0.003), drawn, forced=False), moved_joints).actions
    for forced, kept, forget in ((False, False, False), (True, False, False), (True, True, True)):
        np.testing.assert_allclose(second(forced, kept, forget), fresh, atol=1e-12)
    # Followed on: the path's rest (from its third point) in the chunk's first six actions, then held.
    on = second(forced=True, kept=True)
    assert np.linalg.norm(on[:, :3].sum(axis=0) - (true_path[8] - true_path[2])) < 0.002
    assert np.abs(on[6:, :3]).max() < 1e-9
    assert np.linalg.norm(fresh[:, :3].sum(axis=0) - (true_path[8] - true_path[2])) > 0.02


def test_a_trace_with_repeats_written_once_is_spread_over_the_boundaries():
    a, b, c = [10.0, 10.0], [20.0, 12.0], [30.0, 15.0]
    full = np.array([a, a, b, c, c])
    predicted = full + [[0.5, -0.3], [0.2, 0.4], [-0.6, 0.1], [0.3, 0.3], [-0.2, -0.5]]
    np.testing.assert_array_equal(spread_trace(np.array([a, b, c]), predicted), full)
    np.testing.assert_array_equal(spread_trace(np.array([a]), predicted), np.array([a] * 5))
    np.testing.assert_array_equal(spread_trace(full, predicted), full)
    with pytest.raises(ValueError, match="6 trace points for 5 boundaries"):
        spread_trace(np.zeros((6, 2)), predicted)


def test_a_short_trace_from_a_hand_that_pauses_moves_the_chunk_as_the_full_one(mapper):
    # The hand stays put over the chunk's second quarter: the demonstrations write that point once (4 points).
    actions = chunk(0.01, 0.006, -0.003)
    actions[2:4, :3] = 0.0
    true_path, camera = path_of(mapper, actions)
    full = project_points(true_path[trace_boundaries(8)], camera.position_m, camera.rotation, INTRINSICS)
    assert np.allclose(full[1], full[2])
    follower = TraceFollower(mapper, INTRINSICS, "camera_optical", 8)
    wrong = chunk(0.01, -0.006, -0.003)
    wrong[2:4, :3] = 0.0
    short = follower.apply(plan_of(wrong, np.delete(full, 2, axis=0)), JOINTS)
    whole = follower.apply(plan_of(wrong, full), JOINTS)
    np.testing.assert_allclose(short.actions, whole.actions, atol=1e-9)


def test_a_short_chunk_follows_a_trace_with_repeats_at_the_right_boundaries(mapper):
    # Six actions of a plan whose trace spans eight, the hand pausing over actions 2-4 (the trace writes that point
    # once): boundaries 2, 4 and 6 land where the drawn path is then, as with the trace's five points.
    actions = chunk(0.01, 0.006, -0.003)
    actions[2:4, :3] = 0.0
    true_path, camera = path_of(mapper, actions)
    full = project_points(true_path[trace_boundaries(8)], camera.position_m, camera.rotation, INTRINSICS)
    wrong = actions[:6].copy()
    wrong[:, 1] *= -1.0
    follower = TraceFollower(mapper, INTRINSICS, "camera_optical", 8)
    for trace_px in (full, np.delete(full, 2, axis=0)):
        moved, _ = path_of(mapper, follower.apply(plan_of(wrong, trace_px), JOINTS).actions)
        np.testing.assert_allclose(project_points(moved[[2, 4, 6]], camera.position_m, camera.rotation, INTRINSICS),
                                   full[1:4], atol=1e-6)


def test_which_plans_are_followed(mapper):
    true_path, camera = path_of(mapper, chunk(0.01, 0.006, -0.003))
    trace_px = project_points(true_path[trace_boundaries(8)], camera.position_m, camera.rotation, INTRINSICS)
    wrong = chunk(0.01, -0.006, -0.003)

    def moved(when, plan, joints=JOINTS) -> bool:
        return not np.array_equal(TraceFollower(mapper, INTRINSICS, "camera_optical", 8, when).apply(
            plan, joints).actions, wrong)

    steered, own = plan_of(wrong, trace_px, forced=True), plan_of(wrong, trace_px, forced=False)
    assert moved("steered", steered) and not moved("steered", own)
    assert moved("always", steered) and moved("always", own)
    assert not moved("never", steered)
    # Nothing to follow: no trace, a single point, or no joint positions with the observation.
    assert not moved("always", plan_of(wrong, None)) and not moved("always", plan_of(wrong, trace_px[:1]))
    assert not moved("always", steered, joints=None)


def pose_dict(pose) -> dict:
    """A Pose as plan.trace_camera_pose writes it (quaternion in ROS's x, y, z, w order, from Pinocchio)."""
    import pinocchio

    return {"position_m": pose.position_m.tolist(),
            "quaternion_xyzw": pinocchio.Quaternion(pose.rotation).coeffs().tolist()}


def test_a_calibrated_camera_pose_replaces_the_descriptions_frame(mapper):
    # The mast camera's pose written as a calibration gives it: the same moves as the description's frame. The
    # same pose turned 3 degrees about the optical axis moves the chunk's end (~10 cm away) by millimetres: the given
    # pose is the one used.
    from edgeact.runtime.kinematics import rpy_matrix

    true_path, camera = path_of(mapper, chunk(0.01, 0.006, -0.003))
    trace_px = project_points(true_path[trace_boundaries(8)], camera.position_m, camera.rotation, INTRINSICS)
    plan = plan_of(chunk(0.01, -0.006, -0.003), trace_px)
    by_frame = TraceFollower(mapper, INTRINSICS, "camera_optical", 8).apply(plan, JOINTS)
    calibrated = pose_dict(camera)
    by_pose = TraceFollower(mapper, INTRINSICS, "no_such_frame", 8, camera_pose=calibrated).apply(plan, JOINTS)
    np.testing.assert_allclose(by_pose.actions, by_frame.actions, atol=1e-9)
    turned = pose_dict(type(camera)(camera.position_m, camera.rotation @ rpy_matrix(0.0, 0.0, np.radians(3.0))))
    elsewhere = TraceFollower(mapper, INTRINSICS, "camera_optical", 8, camera_pose=turned).apply(plan, JOINTS)
    end_moved_m = np.linalg.norm(elsewhere.actions[:, :3].sum(axis=0) - by_frame.actions[:, :3].sum(axis=0))
    assert 0.002 < end_moved_m < 0.01, end_moved_m


@pytest.mark.parametrize("pose, message", [
    ({"position_m": [0, 0, 0.5]}, r"give \{\"position_m\": \[x, y, z\], \"quaternion_xyzw\""),
    ({"position_m": [0, 0], "quaternion_xyzw": [0, 0, 0, 1]}, r"position_m: 3 finite numbers, got \[0, 0\]"),
    ({"position_m": [0, 0, 0.5], "quaternion_xyzw": [0, 0, 0, 2]}, r"has length 1, this one 2.0000; check its order"),
    ({"position_m": [0, 0, 0.5], "quaternion_xyzw": [0, 0, float("nan"), 1]}, r"quaternion_xyzw: 4 finite numbers"),
])
def test_the_config_refuses_a_camera_pose_that_is_not_one(pose, message):
    data = mujoco_robot_config_dict()
    data["plan"]["trace_camera_pose"] = pose
    with pytest.raises(ConfigError, match=r"plan.trace_camera_pose.*" + message):
        robot_config_from_dict(data)
    data["plan"]["follow_trace"] = "never"          # not followed, a bad pose is still named, not kept silently
    with pytest.raises(ConfigError, match=r"plan.trace_camera_pose.*" + message):
        robot_config_from_dict(data)


def test_the_config_refuses_what_cannot_follow_a_trace_by_name(sim):  # noqa: F811
    with pytest.raises(ConfigError, match="follow_trace: 'sometimes' unknown; use one of never, steered, always"):
        PlanSection(follow_trace="sometimes")
    for bad in (0, 3, 8.0, True):      # under 4, two trace points would stand for one boundary
        with pytest.raises(ConfigError, match=r"trace_horizon_actions: .* an integer >= 4 \(one action at least per "
                                              r"point after the first"):
            PlanSection(trace_horizon_actions=bad)
    # The sample robot maps actions to joint deltas: no kinematics to lift a trace with.
    with pytest.raises(ConfigError, match=r"needs the \"ik\" action mapper.*set actions.type to \"ik\", or "
                                          r"plan.follow_trace to \"never\""):
        robot_config_from_dict(config_data(sim, plan={"follow_trace": "steered"}))
    data = mujoco_robot_config_dict()
    data["plan"]["trace_camera_frame"] = "camera_colour"
    with pytest.raises(ConfigError, match=r"plan.trace_camera_frame: no frame 'camera_colour' in robot.xml; its "
                                          r"frames: .*camera_optical"):
        robot_config_from_dict(data)


def test_the_mujoco_robot_follows_a_steered_trace_through_its_mast_camera():
    config = robot_config_from_dict(mujoco_robot_config_dict())
    assert config.plan.follow_trace == "steered"
    mapper = config.actions.make_mapper(list(config.robot.motors))
    follower = trace_follower(config, mapper, INTRINSICS)
    assert isinstance(follower, TraceFollower) and follower.when == "steered"
    assert follower.boundaries == [0, 2, 4, 6, 8]
    never = robot_config_from_dict({**mujoco_robot_config_dict(), "plan": {"follow_trace": "never"}})
    assert trace_follower(never, mapper, INTRINSICS) is None


class _Recording:
    """A stand-in follower: records the plans and joints the planner hands it and marks the plans it returns."""

    def __init__(self):
        self.calls = []

    def apply(self, plan, joints_rad):
        self.calls.append((plan.actions.copy(), joints_rad))
        actions = plan.actions.copy()
        actions[:, 6] = 0.75
        return Plan(actions, plan.actions_normalized, plan.trace_px, None, plan.observation_time_s,
                    plan.created_time_s)


class _Seeing(Alternating):
    """Alternating plans, keeping the joint positions each observation carried."""

    def __init__(self):
        super().__init__()
        self.proprio = []

    def step(self, obs):
        self.proprio.append(obs.proprio)
        return super().step(obs)


def test_the_loop_follows_each_raw_plan_from_its_observations_joints_before_the_ensemble(sim, monkeypatch):  # noqa: F811
    follower, policy = _Recording(), _Seeing()
    monkeypatch.setattr("edgeact.runtime.loop.trace_follower", lambda config, mapper, intrinsics: follower)
    events = Collect()
    result = run_robot(robot_config_from_dict(config_data(sim, plan={"ensemble": True})), 1.0, [events],
                       policy=policy)
    assert result.clean
    plans = [e.plan for e in events.of(PlanEvent)]
    assert len(plans) >= 3 and len(follower.calls) >= len(plans)
    # The follower gets the policy's own plans (before the ensemble averages them) and each one's observation's
    # joint positions; the control follows what it returns, merged.
    for actions, _ in follower.calls:
        np.testing.assert_allclose(np.abs(actions[:, :6]), 0.004)
    assert [joints for _, joints in follower.calls] == policy.proprio[:len(follower.calls)]
    assert any(joints for joints in policy.proprio)
    assert all((p.actions[:, 6] == 0.75).all() for p in plans)


def test_the_run_summary_counts_the_plans_moved_onto_their_trace(mapper):
    # A followed plan says so; `edgeact run`'s summary counts those plans and its table shows the count.
    import dataclasses

    from tests.runtime.test_telemetry import _filled_stats, plan_event

    true_path, camera = path_of(mapper, chunk(0.01, 0.006, -0.003))
    trace_px = project_points(true_path[trace_boundaries(8)], camera.position_m, camera.rotation, INTRINSICS)
    plan = plan_of(chunk(0.01, -0.006, -0.003), trace_px)
    followed = TraceFollower(mapper, INTRINSICS, "camera_optical", 8).apply(plan, JOINTS)
    assert followed.trace_followed and not plan.trace_followed
    stats = _filled_stats()         # five plans of their own, none followed
    assert stats.summary()["policy"]["trace_followed"] == 0
    event = plan_event(5, 1.2)
    stats.on_plan(dataclasses.replace(event, plan=dataclasses.replace(event.plan, trace_followed=True)))
    summary = stats.summary()
    assert summary["policy"]["trace_followed"] == 1
    assert re.search(r"plans moved onto their trace \(plan\.follow_trace\)\s*│\s*1\s", _printed(summary))
    assert "plans moved onto their trace" not in _printed(_filled_stats().summary())


def _printed(summary) -> str:
    """`edgeact run`'s tables of this summary, as the terminal shows them."""
    import io

    from rich.console import Console

    from edgeact.runtime.commands_loop import _summary_tables

    out = io.StringIO()
    Console(file=out, width=160).print(_summary_tables(summary))
    return out.getvalue()


def test_a_camera_with_lens_distortion_is_warned_about(mapper, caplog):
    import dataclasses
    import logging

    distorted = dataclasses.replace(INTRINSICS, distortion_model="brown_conrady",
                                    distortion_coeffs=(0.1, -0.05, 0.0, 0.0, 0.0))
    with caplog.at_level(logging.WARNING, logger="edgeact.runtime.trace_follow"):
        TraceFollower(mapper, INTRINSICS, "camera_optical", 8)
        assert not caplog.records
        TraceFollower(mapper, distorted, "camera_optical", 8)
    assert "lens distortion (brown_conrady [0.1, -0.05, 0.0, 0.0, 0.0]) is not undone" in caplog.text
