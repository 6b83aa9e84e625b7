"""The control step on a fake clock: chunk interpolation, latency skipping, stale-plan hold, the joint_delta mapper."""
import numpy as np
import pytest

from edgeact.runtime.control import ChunkFollower, JointDeltaConfig, mapper_type
from edgeact.runtime.errors import ConfigError
from edgeact.runtime.policy import Plan

pytestmark = pytest.mark.timeout(30)

RATE_HZ = 10.0      # one action lasts 0.1 s
T0 = 100.0          # the plans' observation time


def mapper(**overrides):
    fields = dict(joints=["a", "b"], gains=[2.0, -1.0], gripper_joint="g", gripper_action_range=[-1.0, 1.0],
                  gripper_range_rad=[0.0, 1.0])
    fields.update(overrides)
    return JointDeltaConfig(**fields).make_mapper(["a", "b", "g", "other"])


def plan(dx_values, observation_time_s=T0, gripper=1.0):
    """A chunk whose action i has dx = dx_values[i], dy = 0.5, the given gripper value."""
    actions = np.zeros((len(dx_values), 7))
    actions[:, 0] = dx_values
    actions[:, 1] = 0.5
    actions[:, 6] = gripper
    return Plan(actions=actions, actions_normalized=np.clip(actions, -1, 1), trace_px=None, depth_codes=None,
                observation_time_s=observation_time_s, created_time_s=observation_time_s)


def follower(initial=None, max_age_s=1.0):
    return ChunkFollower(mapper(), RATE_HZ, max_age_s, initial or {"a": 0.0, "b": 0.0, "g": 0.0, "other": 5.0})


def test_joint_delta_mapper_scales_dims_and_maps_the_gripper_range():
    m = mapper(dims=[3, 0])     # a <- droll, b <- dx
    action = np.array([0.1, 0, 0, 0.3, 0, 0, 0.0])
    out = m.apply({"a": 1.0, "b": 1.0, "g": 0.2}, action, 1.0)
    assert out["a"] == pytest.approx(1.0 + 2.0 * 0.3)
    assert out["b"] == pytest.approx(1.0 - 1.0 * 0.1)
    assert out["g"] == pytest.approx(0.5)               # gripper 0 is the middle of [-1, 1] -> middle of [0, 1]
    half = m.apply({"a": 1.0, "b": 1.0, "g": 0.2}, action, 0.5)
    assert half["a"] == pytest.approx(1.0 + 0.3) and half["g"] == pytest.approx(0.35)
    assert m.gripper_goal_rad(5.0) == 1.0 and m.gripper_goal_rad(-5.0) == 0.0    # clipped
    assert set(out) == {"a", "b", "g"}                  # a motor the mapper does not drive is left alone


def test_chunk_is_interpolated_action_by_action():
    f = follower()
    p = plan([0.1, 0.2, 0.3])
    first = f.decide(T0, p)
    assert first.mode == "follow" and first.new_plan and first.action_index == 0 and first.skipped_actions == 0
    assert first.targets_rad["a"] == pytest.approx(0.0)
    mid = f.decide(T0 + 0.05, p)                        # half of action 0
    assert (mid.action_index, mid.fraction) == (0, pytest.approx(0.5))
    assert mid.targets_rad["a"] == pytest.approx(2.0 * 0.1 * 0.5)
    assert mid.targets_rad["b"] == pytest.approx(-0.5 * 0.5)
    assert mid.targets_rad["g"] == pytest.approx(0.5)  # halfway from 0 to the open position 1.0
    later = f.decide(T0 + 0.25, p)                      # actions 0 and 1 complete, half of action 2
    assert later.action_index == 2 and not later.new_plan
    assert later.targets_rad["a"] == pytest.approx(2.0 * (0.1 + 0.2 + 0.15))
    assert later.targets_rad["b"] == pytest.approx(-0.5 * 2.5)


def test_chunk_end_holds_the_last_target():
    f = follower()
    p = plan([0.1, 0.2])
    f.decide(T0, p)
    end = f.decide(T0 + 0.35, p)
    again = f.decide(T0 + 0.6, p)
    assert end.mode == again.mode == "done"
    assert end.targets_rad == again.targets_rad
    assert end.targets_rad["a"] == pytest.approx(2.0 * 0.3)     # both actions fully applied, no more


def test_latency_skips_the_actions_already_in_the_past():
    f = follower()
    f.record_sent({"a": 1.0, "b": 1.0, "g": 0.0})
    p = plan([10.0, 20.0, 30.0, 0.4, 0.5])
    first = f.decide(T0 + 0.33, p)                      # the plan arrives 330 ms after its frame
    assert first.new_plan and first.skipped_actions == 3
    assert first.action_index == 3 and first.fraction == pytest.approx(0.3)
    # Starts from where the robot was told to be (first tick: no motion yet); the skipped actions 10, 20, 30 are
    # never applied.
    assert first.targets_rad["a"] == pytest.approx(1.0)
    nxt = f.decide(T0 + 0.45, p)
    assert nxt.action_index == 4 and nxt.skipped_actions == 0
    # Action 3 ran for the 70 % of its slot left when the plan took over, action 4 for half of its slot.
    assert nxt.targets_rad["a"] == pytest.approx(1.0 + 2.0 * (0.4 * 0.7 + 0.5 * 0.5))


def test_a_plan_late_for_all_its_actions_does_not_move_the_robot():
    f = follower()
    f.record_sent({"a": 0.7, "b": 0.0, "g": 0.0})
    d = f.decide(T0 + 0.5, plan([0.1, 0.2]))
    assert d.mode == "done" and d.skipped_actions == 2 and d.targets_rad["a"] == pytest.approx(0.7)


def test_stale_plan_holds_where_the_robot_was_last_sent():
    f = follower(max_age_s=0.3)
    p = plan([0.1] * 8)
    d = f.decide(T0 + 0.15, p)
    f.record_sent(d.targets_rad)
    f.record_sent({"a": 0.123})         # the safety layer clamped: this is what really went out
    stale = f.decide(T0 + 0.31, p)
    assert stale.mode == "stale" and stale.plan_age_s == pytest.approx(0.31)
    assert stale.targets_rad["a"] == pytest.approx(0.123)
    assert f.decide(T0 + 0.5, p).targets_rad == stale.targets_rad          # frozen, not drifting
    fresh = f.decide(T0 + 0.52, plan([0.1] * 8, observation_time_s=T0 + 0.5))
    assert fresh.mode == "follow" and fresh.new_plan
    assert fresh.targets_rad["a"] == pytest.approx(0.123 + 2.0 * 0.1 * 0.2)      # 20 ms of it since the last tick


def test_a_new_plan_starts_from_what_was_really_sent():
    f = follower()
    f.decide(T0, plan([0.5] * 4))
    f.record_sent({"a": 0.05, "b": -0.02, "g": 0.1})   # limits held the robot back
    d = f.decide(T0 + 0.1, plan([0.0] * 4, observation_time_s=T0 + 0.1))
    assert d.targets_rad["a"] == pytest.approx(0.05) and d.targets_rad["b"] == pytest.approx(-0.02)


def test_plans_handing_over_mid_action_keep_the_planned_speed_without_jumps():
    # Every plan asks for the same motion, 0.1 rad per 0.1 s action (1 rad/s); a new plan is ready every 0.1 s,
    # 50 ms after its frame, so each takes over half-way through an action's slot. Followed at 100 Hz for 2 s.
    f = ChunkFollower(JointDeltaConfig(joints=["j"], gains=[1.0]).make_mapper(["j"]), RATE_HZ, 1.0, {"j": 0.0})
    current, targets = None, [0.0]
    for tick in range(201):
        now = T0 + tick / 100
        k = int(round((now - T0 - 0.05) * 1000)) // 100      # the newest plan ready by now
        if k >= 0 and (current is None or current.observation_time_s != T0 + 0.1 * k):
            current = plan([0.1] * 8, observation_time_s=T0 + 0.1 * k)
        d = f.decide(now, current)
        f.record_sent(d.targets_rad)
        targets.append(d.targets_rad["j"])
    steps = np.diff(targets)
    assert steps.max() == pytest.approx(0.01, abs=1e-9)      # 1 rad/s at 100 Hz on every tick, plan switches too
    # The distance the plans asked for: 0.01 rad on each tick from the first plan's (tick 5, at 50 ms) to the last.
    assert targets[-1] == pytest.approx(0.01 * (200 - 5 + 1), abs=1e-9)


def test_the_gripper_reaches_its_goal_when_a_plan_takes_over_mid_slot():
    """The gripper's value is an absolute goal: a plan that arrives with its slot under way still reaches it by the
    slot's end (the arm's deltas apply only the slot's remaining share; the gripper's goal is not a delta)."""
    mapper = JointDeltaConfig(joints=["a"], gains=[1.0], gripper_joint="g", gripper_action_range=[-1.0, 1.0],
                              gripper_range_rad=[0.0, 1.0]).make_mapper(["a", "g"])
    follower = ChunkFollower(mapper, 10.0, 2.0, {"a": 0.0, "g": 0.0})
    follower.decide(0.74, None)
    actions = np.zeros((8, 7))
    actions[:, 6] = 1.0                             # "closed": 1.0 rad
    chunk = Plan(actions, actions, None, None, 0.0, 0.0)
    goals = []
    for t in (0.75, 0.78, 0.80, 0.85, 1.2):         # the last slot [0.7, 0.8) was under way when it arrived
        decision = follower.decide(t, chunk)
        follower.record_sent(decision.targets_rad)
        goals.append(decision.targets_rad["g"])
    assert goals[0] < goals[1] < goals[2] == pytest.approx(1.0) and goals[3:] == [pytest.approx(1.0)] * 2


def test_no_plan_waits_at_the_initial_position():
    f = follower(initial={"a": 0.3, "b": -0.1, "g": 0.2, "other": 0.0})
    d = f.decide(T0, None)
    assert d.mode == "wait" and d.targets_rad == {"a": 0.3, "b": -0.1, "g": 0.2}


@pytest.mark.parametrize("fields, message", [
    (dict(joints=["a"], gains=[1.0, 2.0]), "gains: give one finite gain"),
    (dict(joints=[], gains=[]), "joints: name 1 to 6"),
    (dict(joints=["a", "b"], gains=[1.0, 1.0], dims=[0, 6]), "dims: one action dimension in 0..5"),
    (dict(joints=["a"], gains=[1.0], gripper_joint="a"), "gripper_joint: 'a' is also an arm joint"),
    (dict(joints=["a"], gains=[1.0], gripper_action_range=[1.0, -1.0]), "gripper_action_range"),
])
def test_joint_delta_config_names_the_bad_field(fields, message):
    with pytest.raises(ConfigError, match=message):
        JointDeltaConfig(**fields)


def test_mapper_registry_and_unknown_joints():
    assert mapper_type("joint_delta") is JointDeltaConfig
    with pytest.raises(ConfigError, match="'cartesian' unknown; use one of ik, joint_delta"):
        mapper_type("cartesian")
    with pytest.raises(ConfigError, match=r"joints \['elbow'\] are not motors of the robot"):
        JointDeltaConfig(joints=["elbow"], gains=[1.0]).make_mapper(["shoulder"])
