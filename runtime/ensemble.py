"""Temporal ensembling of overlapping action chunks (ACT's, Zhao et al. 2023).

A plan's chunk covers the next n action slots; a new plan arrives before the old one's chunk is
used up, so most slots are predicted by several plans. With ensembling on (`plan.ensemble: true`),
each new plan's action for slot i is the mean of every kept plan's prediction for that slot (its
own included), and the robot follows those means. A small policy whose action bins are uncertain
then averages its noise over the plans instead of following whichever plan came last.

Slots are matched in time: action i of a plan is meant for [t_obs + i/r, t_obs + (i+1)/r) (see
control.py), and an older plan's prediction for the same slot is its action nearest to that start.
The raw predictions are kept, never the means, so a prediction counts once whatever comes after.
With an age limit (the loop's `plan.max_age_s`), an older plan's slot counts only if it starts before
that plan grows too old: the slots the control thread would hold on rather than follow never move
the robot through a newer plan either.
This runs in the planner's thread, once per plan: the control step only follows the merged plan.
"""
from __future__ import annotations

import dataclasses
from collections import deque

import numpy as np

from edgeact.runtime.errors import ConfigError
from edgeact.runtime.policy import Plan


class ActionEnsemble:
    """Merges each new plan with the kept plans' predictions for the same slots (uniform mean)."""

    def __init__(self, action_rate_hz: float, max_plans: int = 16, max_age_s: float | None = None):
        if not action_rate_hz > 0 or max_plans < 1 or (max_age_s is not None and not max_age_s > 0):
            raise ConfigError(f"action ensemble: action_rate_hz and max_age_s must be > 0 and max_plans >= 1, got "
                              f"{action_rate_hz}, {max_age_s}, {max_plans}")
        self.action_rate_hz, self.max_age_s = action_rate_hz, max_age_s
        self._plans: deque[Plan] = deque(maxlen=max_plans)     # raw plans, oldest first

    def merge(self, plan: Plan) -> Plan:
        """The plan with each action replaced by the mean of every kept plan's prediction for its slot."""
        r = self.action_rate_hz
        # A kept plan whose chunk ends before this plan's first slot predicts nothing any more.
        while self._plans and self._end_s(self._plans[0]) <= plan.observation_time_s:
            self._plans.popleft()
        sums, normalized = plan.actions.copy(), plan.actions_normalized.copy()
        counts = np.ones(plan.n_actions)
        slots = np.arange(plan.n_actions)
        for old in self._plans:
            # The plans' offset in slots, rounded once and half up: every slot of this plan pairs with the old one's
            # slot the same offset away (rounding each slot's time alone paired exact halves unevenly).
            offset = int(np.floor((plan.observation_time_s - old.observation_time_s) * r + 0.5))
            index = slots + offset
            covered = (index >= 0) & (index < self._fresh_slots(old))
            sums[covered] += old.actions[index[covered]]
            normalized[covered] += old.actions_normalized[index[covered]]
            counts[covered] += 1
        self._plans.append(plan)
        return dataclasses.replace(plan, actions=sums / counts[:, None],
                                   actions_normalized=normalized / counts[:, None])

    def _fresh_slots(self, plan: Plan) -> int:
        """How many of the plan's slots start while it is young enough to follow (all, without an age limit)."""
        if self.max_age_s is None:
            return plan.n_actions
        return min(plan.n_actions, int(np.ceil(self.max_age_s * self.action_rate_hz - 1e-9)))

    def _end_s(self, plan: Plan) -> float:
        """When the last slot it may count in ends: its chunk's end, or earlier where it grows too old first."""
        return plan.observation_time_s + self._fresh_slots(plan) / self.action_rate_hz
