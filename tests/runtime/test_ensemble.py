"""Temporal ensembling: each action slot is the mean of the plans' predictions for it, matched in time."""
import time

import numpy as np
import pytest

from edgeact.runtime.ensemble import ActionEnsemble
from edgeact.runtime.errors import ConfigError
from edgeact.runtime.loop import run_robot
from edgeact.runtime.loop_events import PlanEvent
from edgeact.runtime.policy import Plan
from edgeact.runtime.robot_config import robot_config_from_dict
from tests.runtime.test_loop import Collect, config_data, sim  # noqa: F401 (the fixture)

pytestmark = pytest.mark.timeout(60)


def plan_of(values, t_obs):
    """A plan whose action i is values[i] in every dimension (normalized: a tenth of it)."""
    actions = np.repeat(np.asarray(values, dtype=float)[:, None], 7, axis=1)
    return Plan(actions, actions / 10, None, None, t_obs, t_obs + 0.05)


def test_a_lone_plan_is_unchanged():
    plan = plan_of(np.arange(8.0), 3.0)
    merged = ActionEnsemble(10.0).merge(plan)
    np.testing.assert_array_equal(merged.actions, plan.actions)
    assert merged.observation_time_s == 3.0 and merged.created_time_s == plan.created_time_s


def test_overlapping_slots_are_averaged_over_the_raw_predictions():
    ensemble = ActionEnsemble(10.0)
    ensemble.merge(plan_of([0.0] * 8, 0.0))
    # 0.2 s later: slots 0-5 of the new plan are slots 2-7 of the first; 6-7 only its own.
    second = ensemble.merge(plan_of([6.0] * 8, 0.2))
    np.testing.assert_allclose(second.actions[:, 0], [3, 3, 3, 3, 3, 3, 6, 6])
    np.testing.assert_allclose(second.actions_normalized, second.actions / 10)
    # A third plan averages what each plan predicted, not the second's means: (0 + 6 + 12) / 3 where all three
    # predicted the slot, (6 + 12) / 2 where the first had ended.
    third = ensemble.merge(plan_of([12.0] * 8, 0.4))
    np.testing.assert_allclose(third.actions[:, 0], [6, 6, 6, 6, 9, 9, 12, 12])


def test_slots_are_matched_in_time_when_plans_do_not_start_on_a_slot_boundary():
    ensemble = ActionEnsemble(10.0)
    ensemble.merge(plan_of(np.arange(8.0), 0.0))
    # 0.23 s later: the new slot k starts at 0.23 + k/10, nearest to the first plan's slot k + 2.
    merged = ensemble.merge(plan_of([100.0] * 8, 0.23))
    np.testing.assert_allclose(merged.actions[:6, 0], (100 + np.arange(2.0, 8.0)) / 2)
    np.testing.assert_allclose(merged.actions[6:, 0], 100)


@pytest.mark.parametrize("t0", [0.0, 100.0, 12345.6])
def test_a_plan_half_a_slot_later_pairs_every_slot_the_same_offset_away(t0):
    """A camera at twice the action rate stamps frames exactly half a slot apart: every slot of the new plan pairs
    with the old plan's slot the same offset away (0 or 1: the clock's float rounding decides an exact half);
    rounding each slot's time alone paired them unevenly (old slots 2, 2, 4, 4, 6, 6 at t0 = 0)."""
    ensemble = ActionEnsemble(10.0)
    ensemble.merge(plan_of(10.0 * np.arange(8.0), t0))
    merged = ensemble.merge(plan_of([0.0] * 8, t0 + 0.05))
    paired = 2 * merged.actions[:, 0] / 10              # (10 * old slot + 0) / 2, read back as the old slot
    offsets = paired[:7] - np.arange(7.0)
    assert np.allclose(offsets, offsets[0]) and offsets[0] in (0.0, 1.0), paired
    if t0 == 0.0:
        assert offsets[0] == 1.0                        # an exact half, rounded up


def test_a_plan_whose_chunk_has_ended_no_longer_counts():
    ensemble = ActionEnsemble(10.0)
    ensemble.merge(plan_of([50.0] * 8, 0.0))
    later = ensemble.merge(plan_of([1.0] * 8, 0.8))     # the first chunk covered [0, 0.8): nothing left
    np.testing.assert_allclose(later.actions, 1.0)
    with pytest.raises(ConfigError, match="action_rate_hz and max_age_s must be > 0"):
        ActionEnsemble(0.0)


def test_an_older_plan_counts_only_for_the_slots_it_was_young_enough_to_follow():
    """plan.max_age_s 0.5 s and 0.8 s chunks: the control thread holds on a plan's slots from 0.5 s on, so they
    never move the robot through a newer plan either."""
    ensemble = ActionEnsemble(10.0, max_age_s=0.5)
    ensemble.merge(plan_of([1.0] * 8, 0.0))
    second = ensemble.merge(plan_of([0.0] * 8, 0.2))     # the first plan's slots 2-4 (0.2-0.5 s) still count
    np.testing.assert_allclose(second.actions[:, 0], [0.5, 0.5, 0.5, 0, 0, 0, 0, 0])
    third = ensemble.merge(plan_of([0.0] * 8, 0.6))      # the first: too old for any slot; the second: its 4
    np.testing.assert_allclose(third.actions[:, 0], 0.0)
    assert len(ensemble._plans) == 2                      # the first one dropped
    unbounded = ActionEnsemble(10.0)                       # without a limit, the whole chunk counts
    unbounded.merge(plan_of([1.0] * 8, 0.0))
    np.testing.assert_allclose(unbounded.merge(plan_of([0.0] * 8, 0.6)).actions[:, 0], [0.5, 0.5, 0, 0, 0, 0, 0, 0])
    with pytest.raises(ConfigError, match="max_age_s must be > 0"):
        ActionEnsemble(10.0, max_age_s=0.0)


class Alternating:
    """Plans that alternate between moving every axis one way and the other."""

    def __init__(self):
        self.sign = 1.0

    def step(self, obs):
        time.sleep(0.05)
        actions = np.full((8, 7), 0.004 * self.sign)
        self.sign = -self.sign
        return Plan(actions, actions * 100, None, None, obs.timestamp_s, time.monotonic())

    def close(self):
        pass


@pytest.mark.parametrize("ensemble", [False, True])
def test_the_loop_follows_the_ensembled_plans_when_the_config_asks(sim, ensemble):  # noqa: F811
    config = robot_config_from_dict(config_data(sim, plan={"ensemble": ensemble}))
    events = Collect()
    result = run_robot(config, 1.0, [events], policy=Alternating())
    assert result.clean
    plans = [e.plan for e in events.of(PlanEvent)]
    assert len(plans) >= 3
    first_actions = np.array([abs(p.actions[0, 0]) for p in plans[1:]])
    if ensemble:    # each later plan's first slot was also predicted, the other way, by the plan before it
        assert (first_actions < 0.004 - 1e-9).all()
    else:
        np.testing.assert_allclose(first_actions, 0.004)


def test_the_loop_ensembles_within_its_plan_age_limit(sim, monkeypatch):  # noqa: F811
    made = []

    class Recorded(ActionEnsemble):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)
    monkeypatch.setattr("edgeact.runtime.loop.ActionEnsemble", Recorded)
    config = robot_config_from_dict(config_data(sim, plan={"ensemble": True, "max_age_s": 0.7}))
    assert run_robot(config, 0.3, [Collect()], policy=Alternating()).clean
    assert [e.max_age_s for e in made] == [0.7]


def test_the_config_refuses_an_ensemble_that_is_not_a_boolean(sim):  # noqa: F811
    with pytest.raises(ConfigError, match=r"plan\.ensemble: must be true or false, got 'yes'"):
        robot_config_from_dict(config_data(sim, plan={"ensemble": "yes"}))
