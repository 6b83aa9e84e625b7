"""The control step: follow a plan's action chunk in time, skip what latency made stale, hold old plans, map to joints.

Timing model. Action i of a plan is meant to run during [t_obs + i/r, t_obs + (i+1)/r), where
t_obs is the plan's observation (frame capture) time and r the action rate. A plan arrives
`plan.latency_s` after t_obs, so its first floor(latency * r) actions are already in the past:
they are skipped, and the robot starts on the action whose slot is now (latency compensation).
Within an action the joint targets move linearly from where the action started (interpolation
at the control rate). A new plan takes over from where the robot was last sent, at the time it was
sent: of the action whose slot is now, it applies only the share after the previous tick (the slot's
earlier part ran under the previous plan; an action is a motion per slot, so applying it from the
slot's start would add that part again at once, a jump that carries every later target too far).
After the last action, and whenever the plan is older than `plan_max_age_s`, the targets hold.

Action -> joints goes through an `ActionMapper` chosen by name. MolmoAct's actions are
end-effector deltas; until inverse kinematics arrives with the simulated arm, the only mapper
is "joint_delta", an INTERIM mapping that drives each arm joint by a gain times one action
dimension and sets the gripper joint from the gripper value. It makes the loop move a real bus
with the right timing; it is not a kinematic model of any arm.
"""
from __future__ import annotations

import abc
import importlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

import numpy as np

from edgeact.runtime.action_bins import ACTION_DIMS
from edgeact.runtime.errors import ConfigError
from edgeact.runtime.policy import Plan

GRIPPER_DIM = ACTION_DIMS - 1


# -- action mappers ----------------------------------------------------------------------------

class ActionMapper(abc.ABC):
    """Turns one action of a chunk into joint targets."""

    joints: tuple[str, ...]                 # every joint this mapper commands

    @abc.abstractmethod
    def apply(self, start_rad: dict[str, float], action: np.ndarray, fraction: float,
              span: float = 1.0) -> dict[str, float]:
        """Targets after `fraction` (0..1) of `action`, begun with the joints at `start_rad`; `span`: the share of
        the action's slot that was left at `start_rad` (an absolute goal, the gripper's, is reached at `span`)."""


@dataclass
class MapperConfig:
    type_name: ClassVar[str] = ""

    def make_mapper(self, joint_names: list[str]) -> ActionMapper:
        raise NotImplementedError(f"{type(self).__name__} does not say how to build its mapper")

    def beside(self, config_dir: Path | None) -> "MapperConfig":
        """This config with the files it names found from `config_dir` (the config file's folder) where they are
        relative; None: a config not read from a file, whose paths stay the working directory's."""
        return self


_MAPPER_TYPES: dict[str, type[MapperConfig]] = {}


def register_mapper(type_name: str) -> Callable[[type[MapperConfig]], type[MapperConfig]]:
    """Class decorator: make an action mapper's config reachable by name ("joint_delta", later "ik")."""

    def decorate(cls: type[MapperConfig]) -> type[MapperConfig]:
        cls.type_name = type_name
        _MAPPER_TYPES[type_name] = cls
        return cls

    return decorate


# Mappers defined outside this module register on import; looked up lazily so that importing the
# control step never pulls in a kinematics library a robot does not use.
BUILTIN_MAPPER_MODULES = ("edgeact.runtime.kinematics",)


def mapper_type(type_name: str) -> type[MapperConfig]:
    if type_name not in _MAPPER_TYPES:
        for module in BUILTIN_MAPPER_MODULES:
            importlib.import_module(module)
    if type_name not in _MAPPER_TYPES:
        raise ConfigError(f"action mapper type {type_name!r} unknown; use one of {', '.join(sorted(_MAPPER_TYPES))}")
    return _MAPPER_TYPES[type_name]


@register_mapper("joint_delta")
@dataclass
class JointDeltaConfig(MapperConfig):
    """Interim mapping (no kinematics): joint j moves by gains[j] * action[dims[j]] rad per action.

    The gripper joint goes linearly from gripper_range_rad[0] at gripper_action_range[0] to
    gripper_range_rad[1] at gripper_action_range[1] (clipped); over one action it moves there
    linearly from where it was.
    """

    joints: list[str] = field(default_factory=list)         # arm joints, 1..6
    gains: list[float] = field(default_factory=list)        # rad per action unit, one per joint
    dims: list[int] | None = None                           # action dim of each joint (default 0, 1, ...)
    gripper_joint: str | None = None
    gripper_action_range: list[float] = field(default_factory=lambda: [-1.0, 1.0])
    gripper_range_rad: list[float] = field(default_factory=lambda: [0.0, 1.0])

    def __post_init__(self) -> None:
        if not 1 <= len(self.joints) <= GRIPPER_DIM or len(set(self.joints)) != len(self.joints):
            raise ConfigError(f"joints: name 1 to {GRIPPER_DIM} distinct arm joints, got {self.joints}")
        if len(self.gains) != len(self.joints) or not all(math.isfinite(g) for g in self.gains):
            raise ConfigError(f"gains: give one finite gain (rad per action unit) per joint: "
                              f"{len(self.joints)} joints, got {self.gains}")
        if self.dims is None:
            self.dims = list(range(len(self.joints)))
        if len(self.dims) != len(self.joints) or not all(0 <= d < GRIPPER_DIM for d in self.dims):
            raise ConfigError(f"dims: one action dimension in 0..{GRIPPER_DIM - 1} per joint, got {self.dims}")
        if self.gripper_joint in self.joints:
            raise ConfigError(f"gripper_joint: {self.gripper_joint!r} is also an arm joint; name it once")
        lo, hi = _pair(self.gripper_action_range, "gripper_action_range")
        if not lo < hi:
            raise ConfigError(f"gripper_action_range: must be [low, high] with low < high, got {[lo, hi]}")
        _pair(self.gripper_range_rad, "gripper_range_rad")

    def make_mapper(self, joint_names: list[str]) -> "JointDeltaMapper":
        wanted = self.joints + ([self.gripper_joint] if self.gripper_joint else [])
        missing = [j for j in wanted if j not in joint_names]
        if missing:
            raise ConfigError(f"actions: joints {missing} are not motors of the robot; its motors are "
                              f"{', '.join(joint_names)}")
        return JointDeltaMapper(self)


def _pair(values: list[float], name: str) -> tuple[float, float]:
    if len(values) != 2 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
        raise ConfigError(f"{name}: must be two finite numbers [a, b], got {values}")
    return float(values[0]), float(values[1])


class JointDeltaMapper(ActionMapper):
    def __init__(self, config: JointDeltaConfig):
        self.config = config
        self.joints = tuple(config.joints) + ((config.gripper_joint,) if config.gripper_joint else ())
        self._dims = np.asarray(config.dims, dtype=np.int64)
        self._gains = np.asarray(config.gains, dtype=np.float64)

    def gripper_goal_rad(self, gripper_value: float) -> float:
        (a_lo, a_hi), (r_lo, r_hi) = self.config.gripper_action_range, self.config.gripper_range_rad
        t = min(max((gripper_value - a_lo) / (a_hi - a_lo), 0.0), 1.0)
        return r_lo + t * (r_hi - r_lo)

    def apply(self, start_rad: dict[str, float], action: np.ndarray, fraction: float,
              span: float = 1.0) -> dict[str, float]:
        deltas = self._gains * np.asarray(action, dtype=np.float64)[self._dims] * fraction
        out = {j: start_rad[j] + float(d) for j, d in zip(self.config.joints, deltas)}
        if self.config.gripper_joint:
            g = self.config.gripper_joint
            out[g] = gripper_toward(start_rad[g], self.gripper_goal_rad(float(action[GRIPPER_DIM])), fraction, span)
        return out


def gripper_toward(start_rad: float, goal_rad: float, fraction: float, span: float) -> float:
    """The gripper's goal is absolute (not a delta like the arm's): it is reached when `fraction` reaches `span`, the
    share of the action's slot that `start_rad` had left (less than 1 when a plan took over mid-slot)."""
    return start_rad + min(fraction / span, 1.0) * (goal_rad - start_rad) if span > 0 else goal_rad


# -- following a chunk -----------------------------------------------------------------------------

MODES = ("wait", "follow", "done", "stale")     # no plan yet / on an action / chunk used up / plan too old


@dataclass(frozen=True)
class ControlDecision:
    targets_rad: dict[str, float]
    mode: str
    action_index: int | None = None         # the action being followed
    fraction: float = 0.0                   # how far into it
    new_plan: bool = False                  # this is the first tick on the current plan
    skipped_actions: int = 0                # on a new plan: actions its latency made stale
    plan_age_s: float = math.nan            # now - the plan's observation time


class ChunkFollower:
    """Keeps the state between control ticks; `decide(now, plan)` is the pure-ish core of a tick.

    Call `record_sent(sent)` with what the safety layer really sent: a new plan starts from
    there (what the robot was told, after every limit), and a hold freezes there.
    """

    def __init__(self, mapper: ActionMapper, action_rate_hz: float, plan_max_age_s: float,
                 initial_rad: dict[str, float]):
        if not action_rate_hz > 0 or not plan_max_age_s > 0:
            raise ConfigError(f"action_rate_hz ({action_rate_hz}) and plan_max_age_s ({plan_max_age_s}) must be > 0")
        missing = [j for j in mapper.joints if j not in initial_rad]
        if missing:
            raise ConfigError(f"no initial position for joints {missing}")
        self.mapper, self.action_rate_hz, self.plan_max_age_s = mapper, action_rate_hz, plan_max_age_s
        self._last_sent = {j: float(initial_rad[j]) for j in mapper.joints}
        self._plan: Plan | None = None
        self._index: int | None = None      # the action whose start is self._start
        self._start: dict[str, float] = {}
        self._begun = 0.0                   # the fraction of that action's slot gone when self._start was taken
        self._last_tick_s: float | None = None
        self._hold: dict[str, float] | None = dict(self._last_sent)

    def record_sent(self, sent_rad: dict[str, float]) -> None:
        self._last_sent.update((j, v) for j, v in sent_rad.items() if j in self._last_sent)

    def decide(self, now_s: float, plan: Plan | None) -> ControlDecision:
        previous_s, self._last_tick_s = self._last_tick_s, now_s
        if plan is None:
            return ControlDecision(self._holding(), "wait")
        new_plan = plan is not self._plan
        if new_plan:
            self._plan, self._index, self._start = plan, None, dict(self._last_sent)
        age_s = max(now_s - plan.observation_time_s, 0.0)
        if age_s > self.plan_max_age_s:
            return ControlDecision(self._holding(), "stale", new_plan=new_plan, plan_age_s=age_s)
        position = age_s * self.action_rate_hz
        index = int(position)
        skipped = 0
        if self._index is None:             # first tick on this plan: the past actions are skipped
            skipped = min(index, plan.n_actions)
            self._index = skipped
            # The robot is where the last tick sent it: this action's slot had run to there (to now on a first tick).
            sent_at = position if previous_s is None else (previous_s - plan.observation_time_s) * self.action_rate_hz
            self._begun = min(max(sent_at - index, 0.0), position - index) if index < plan.n_actions else 0.0
        last = min(index, plan.n_actions)
        while self._index < last:           # actions whose slot ended since the last tick: completed
            self._start = self.mapper.apply(self._start, plan.actions[self._index], 1.0 - self._begun,
                                            span=1.0 - self._begun)
            self._index, self._begun = self._index + 1, 0.0
        self._hold = None
        if index >= plan.n_actions:
            return ControlDecision(dict(self._start), "done", new_plan=new_plan, skipped_actions=skipped,
                                   plan_age_s=age_s)
        fraction = position - index
        targets = self.mapper.apply(self._start, plan.actions[index], fraction - self._begun, span=1.0 - self._begun)
        return ControlDecision(targets, "follow", index, fraction, new_plan, skipped, age_s)

    def _holding(self) -> dict[str, float]:
        if self._hold is None:              # entering a hold: freeze where the robot was last told to be
            self._hold = dict(self._last_sent)
        return dict(self._hold)
