"""The reference task: language-conditioned block manipulation on the simulated table, randomized by seed.

    episode = sample_episode(seed=7)                    # a template, a colour, block poses, an arm start
    reset_world(world, episode)                         # the MuJoCo world in that state, servos holding
    ...                                                 # a policy or the scripted expert acts
    outcome = evaluate(world, episode)                  # the template's success predicate

Templates (the instruction is what the model is told):
  move_to     "move to the {colour} block"              the end effector hovers just above the block (for
                                                        move_dwell_s: SuccessJudge)
  push_left   "push the {colour} block to the left"     the block slides >= success_push_m along +y
  push_right  "push the {colour} block to the right"    ... along -y
Left and right are the robot's (its base frame: x forward, y left); the camera, on the mast behind the
arm, sees the robot's left toward the image's upper left.

Everything random about an episode comes from one `numpy.random.default_rng(seed)`, so an episode
is a pure function of (seed, template, TaskConfig). The named block is drawn where the arm reaches
it from above (for a push, with a clear lane on both sides: nothing in the way of the approach or
the push); the other blocks anywhere the camera sees on the table, apart from the rest.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from edgeact.runtime.errors import ConfigError

COLOURS = ("red", "green", "blue")
BLOCKS = {colour: f"{colour}_block" for colour in COLOURS}      # the bodies in scene.xml
TEMPLATES = {
    "move_to": "move to the {colour} block",
    "push_left": "push the {colour} block to the left",
    "push_right": "push the {colour} block to the right",
}
PUSH_SIGN = {"push_left": 1.0, "push_right": -1.0}              # along the base frame's y
ARM_JOINTS = ("shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll")
GRIPPER = "gripper"
TABLE_TOP_Z_M = 0.20                    # scene.xml: the table's top face
BLOCK_HALF_M = 0.015                    # scene.xml: the blocks are 3 cm cubes
SHOULDER_XY_M = np.array([0.06, 0.0])   # robot.xml: the shoulder pan axis, base frame
READY_EE_XY_M = np.array([0.29, 0.0])   # robot.xml: the end effector with every joint at 0 ("ready"), base frame
MAX_SAMPLE_TRIES = 200                  # a layout is redrawn at most this often before the config is blamed


@dataclass(frozen=True)
class TaskConfig:
    """Where blocks may be drawn and what counts as success; defaults fit scene.xml's arm, table and camera."""

    x_range_m: tuple[float, float] = (0.27, 0.35)           # the named block's centre, base frame
    y_range_m: tuple[float, float] = (-0.14, 0.14)
    distractor_x_range_m: tuple[float, float] = (0.26, 0.44)   # the other blocks: anywhere the camera sees
    distractor_y_range_m: tuple[float, float] = (-0.2, 0.2)
    max_reach_m: float = 0.29           # block centre to the shoulder axis, horizontally: the arm gets above it
    min_separation_m: float = 0.07      # between block centres
    lane_half_width_m: float = 0.05     # a push's lane (along x about the block): no other block in it
    lane_length_m: float = 0.13         # ... and this far to each side of the block
    push_reach_y_m: float = 0.20        # |y| of a pushed block's end, within the arm's reach
    push_distance_m: float = 0.08       # how far the expert pushes
    success_push_m: float = 0.05        # the least displacement along the asked direction that succeeds
    move_radius_m: float = 0.025        # move_to: end effector within this of the block's vertical axis
    move_height_m: tuple[float, float] = (0.0, 0.09)        # ... and this far above its top face
    move_start_clearance_m: float = 0.07    # move_to: the block this far (horizontally) from the ready end effector,
                                            # so no arm start is already a success
    disturb_m: float = 0.025            # a block the task does not name may move at most this far
    move_dwell_s: float = 0.5           # move_to: the end effector stays over the block this long (SuccessJudge)
    arm_start_noise_rad: float = 0.15   # each arm joint starts uniformly within +- this of zero ("ready")
    time_limit_s: dict[str, float] = field(default_factory=lambda: {"move_to": 5.0, "push_left": 9.0,
                                                                    "push_right": 9.0})

    def __post_init__(self) -> None:
        for name in ("x_range_m", "y_range_m", "distractor_x_range_m", "distractor_y_range_m", "move_height_m"):
            low, high = getattr(self, name)
            if not low < high:
                raise ConfigError(f"TaskConfig.{name}: must be (low, high) with low < high, got {(low, high)}")
        for name in ("max_reach_m", "min_separation_m", "lane_half_width_m", "lane_length_m", "push_reach_y_m",
                     "push_distance_m", "success_push_m", "move_radius_m", "disturb_m", "move_start_clearance_m"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"TaskConfig.{name}: must be a positive number, got {value}")
        if self.success_push_m > self.push_distance_m:
            raise ConfigError(f"TaskConfig.success_push_m ({self.success_push_m}) exceeds push_distance_m "
                              f"({self.push_distance_m}): the expert could never succeed")
        if not (math.isfinite(self.move_dwell_s) and self.move_dwell_s >= 0):
            raise ConfigError(f"TaskConfig.move_dwell_s: must be a number of seconds >= 0, got {self.move_dwell_s}")
        if not 0 <= self.arm_start_noise_rad <= 0.5:
            raise ConfigError(f"TaskConfig.arm_start_noise_rad: must be in [0, 0.5], got {self.arm_start_noise_rad}")
        missing = sorted(set(TEMPLATES) - set(self.time_limit_s))
        if missing or any(not v > 0 for v in self.time_limit_s.values()):
            raise ConfigError(f"TaskConfig.time_limit_s: give a positive limit (s) for every template; missing "
                              f"{missing}, got {self.time_limit_s}")


@dataclass(frozen=True, eq=False)
class Episode:
    """One randomized instance of the task: everything needed to reset the world and judge the outcome."""

    seed: int
    template: str
    colour: str
    instruction: str
    block_positions_m: dict[str, np.ndarray]    # body name -> (3,) centre, base frame (= world: the base is at 0)
    block_yaws_rad: dict[str, float]
    arm_start_rad: dict[str, float]             # arm joints and the gripper
    time_limit_s: float

    @property
    def target_block(self) -> str:
        return BLOCKS[self.colour]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form (a dataset manifest keeps one per episode)."""
        return {"seed": self.seed, "template": self.template, "colour": self.colour, "instruction": self.instruction,
                "block_positions_m": {k: [round(float(v), 6) for v in p] for k, p in self.block_positions_m.items()},
                "block_yaws_rad": {k: round(float(v), 6) for k, v in self.block_yaws_rad.items()},
                "arm_start_rad": {k: round(float(v), 6) for k, v in self.arm_start_rad.items()},
                "time_limit_s": self.time_limit_s}


def instruction_for(template: str, colour: str) -> str:
    if template not in TEMPLATES:
        raise ConfigError(f"task template {template!r} unknown; use one of {', '.join(TEMPLATES)}")
    if colour not in COLOURS:
        raise ConfigError(f"block colour {colour!r} unknown; use one of {', '.join(COLOURS)}")
    return TEMPLATES[template].format(colour=colour)


def sample_episode(seed: int, template: str | None = None, config: TaskConfig | None = None) -> Episode:
    """The episode of `seed`: a template (drawn unless given), a target colour, a block layout, an arm start."""
    config = config or TaskConfig()
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"episode seed must be an integer >= 0, got {seed!r}: numpy's generators take no "
                          "negative seed; give one from 0 up")
    rng = np.random.default_rng(seed)
    template = template if template is not None else str(rng.choice(list(TEMPLATES)))
    colour = str(rng.choice(COLOURS))
    instruction = instruction_for(template, colour)
    positions = _sample_layout(rng, template, BLOCKS[colour], config, seed)
    yaws = {body: float(rng.uniform(-math.pi / 4, math.pi / 4)) for body in positions}
    noise = config.arm_start_noise_rad
    arm = {joint: float(rng.uniform(-noise, noise)) for joint in ARM_JOINTS}
    arm[GRIPPER] = 0.0
    return Episode(int(seed), template, colour, instruction, positions, yaws, arm, config.time_limit_s[template])


def retarget(episode: Episode, template: str, colour: str, config: TaskConfig | None = None) -> Episode | None:
    """The same scene (blocks, arm start, seed) with another instruction, or None where its layout would never have
    been drawn for that task: the named block outside the named block's ranges or reach, too near the ready pose
    (move_to), or another block in the push's lane. Demonstrations of one scene under several instructions show
    the model that the words, not the layout, decide where the arm goes."""
    config = config or TaskConfig()
    instruction = instruction_for(template, colour)
    target = episode.block_positions_m[BLOCKS[colour]][:2]
    (x_low, x_high), (y_low, y_high) = config.x_range_m, config.y_range_m
    if not (x_low <= target[0] <= x_high and y_low <= target[1] <= y_high):
        return None
    if not _placement_ok(target, True, None, [], template, config):
        return None
    others = [p[:2] for body, p in episode.block_positions_m.items() if body != BLOCKS[colour]]
    if not all(_placement_ok(p, False, target, [], template, config) for p in others):
        return None
    return replace(episode, template=template, colour=colour, instruction=instruction,
                               time_limit_s=config.time_limit_s[template])


def _sample_layout(rng: np.random.Generator, template: str, target: str, config: TaskConfig,
                   seed: int) -> dict[str, np.ndarray]:
    """The named block first, where the arm can do the task with it; then the others, one at a time, anywhere on
    the visible table that keeps them apart and out of a push's lane."""
    z = TABLE_TOP_Z_M + BLOCK_HALF_M
    xy: dict[str, np.ndarray] = {}
    for body in [target] + [b for b in BLOCKS.values() if b != target]:
        x_range, y_range = ((config.x_range_m, config.y_range_m) if body == target else
                            (config.distractor_x_range_m, config.distractor_y_range_m))
        for _ in range(MAX_SAMPLE_TRIES):
            p = np.array([rng.uniform(*x_range), rng.uniform(*y_range)])
            if _placement_ok(p, body == target, xy.get(target), list(xy.values()), template, config):
                xy[body] = p
                break
        else:
            raise ConfigError(f"no place for {body} satisfies the task's constraints after {MAX_SAMPLE_TRIES} draws "
                              f"(seed {seed}, {template}); widen TaskConfig's ranges or lower min_separation_m")
    return {body: np.array([xy[body][0], xy[body][1], z]) for body in BLOCKS.values()}


def _placement_ok(p: np.ndarray, is_target: bool, target: np.ndarray | None, placed: list[np.ndarray],
                  template: str, config: TaskConfig) -> bool:
    if is_target:
        if np.linalg.norm(p - SHOULDER_XY_M) > config.max_reach_m:
            return False
        if template == "move_to" and np.linalg.norm(p - READY_EE_XY_M) < config.move_start_clearance_m:
            return False
        return template not in PUSH_SIGN or abs(p[1] + PUSH_SIGN[template] * config.push_distance_m) <= \
            config.push_reach_y_m
    if any(np.linalg.norm(p - q) < config.min_separation_m for q in placed):
        return False
    if template in PUSH_SIGN:
        d = p - target
        return not (abs(d[0]) < config.lane_half_width_m and abs(d[1]) < config.lane_length_m)
    return True


def yaw_quat_wxyz(yaw_rad: float) -> tuple[float, float, float, float]:
    return (math.cos(yaw_rad / 2), 0.0, 0.0, math.sin(yaw_rad / 2))


def reset_world(world: Any, episode: Episode) -> None:
    """Put a MujocoWorld into the episode's initial state: blocks placed, the arm at its start with torque on."""
    world.reset()
    for body, position in episode.block_positions_m.items():
        world.set_body_pose(body, position, yaw_quat_wxyz(episode.block_yaws_rad[body]))
    world.set_joint_positions(episode.arm_start_rad)
    for joint, q in episode.arm_start_rad.items():
        world.drive(joint, torque_on=True, mode="position", goal=q)


# Why an episode failed: the first condition of `evaluate`'s predicate its end state misses (Outcome.failure);
# or, for a move_to whose predicate holds at the end, that it never held for the dwell (dwell_failure).
FAILURES = ("disturbed another block", "block knocked off the table", "pushed the wrong way", "block not pushed",
            "pushed short", "block moved", "block not reached", "wrong height over the block")
BUDGED_M = 0.01                         # a named block moved less than this was not pushed


def dwell_failure(config: TaskConfig | None = None) -> str:
    """Why a move_to failed whose end effector is over the block at the end, but was not for move_dwell_s."""
    return f"over the block, not for {(config or TaskConfig()).move_dwell_s:g} s"


@dataclass(frozen=True)
class Outcome:
    success: bool
    target_displacement_m: np.ndarray       # (3,) of the named block since the start
    max_other_displacement_m: float         # the most any other block moved
    ee_to_target_m: np.ndarray              # (3,) end effector minus the named block's top-face centre

    def failure(self, template: str, config: TaskConfig | None = None, succeeded: bool | None = None) -> str | None:
        """Why this end state is no success, one of FAILURES (None: it is one). Blocks start resting on the table,
        so the named block is off it once it sank more than its half height. `succeeded`: the episode's verdict
        (SuccessJudge) where the caller has one: a move_to whose predicate holds now succeeded only if it held for
        move_dwell_s, and one that did not fails with dwell_failure."""
        config = config or TaskConfig()
        if self.success:
            return dwell_failure(config) if template == "move_to" and succeeded is False else None
        moved = np.asarray(self.target_displacement_m, dtype=float)
        if self.max_other_displacement_m > config.disturb_m:
            return "disturbed another block"
        if template == "move_to":
            if float(np.linalg.norm(moved)) > config.disturb_m:
                return "block moved"
            if float(np.linalg.norm(np.asarray(self.ee_to_target_m, dtype=float)[:2])) > config.move_radius_m:
                return "block not reached"
            return "wrong height over the block"
        if moved[2] < -BLOCK_HALF_M:
            return "block knocked off the table"
        along = PUSH_SIGN[template] * moved[1]
        if along <= -BUDGED_M:
            return "pushed the wrong way"
        if float(np.linalg.norm(moved[:2])) < BUDGED_M:
            return "block not pushed"
        return "pushed short"

    def to_dict(self, template: str, config: TaskConfig | None = None,
                succeeded: bool | None = None) -> dict[str, Any]:
        """The end state's measures (m, rounded to 0.1 mm) and its failure (`failure`'s arguments), as the
        simulator's task report and an evaluation carry them."""
        return {"target_displacement_m": [round(float(v), 4) for v in self.target_displacement_m],
                "ee_to_target_m": [round(float(v), 4) for v in self.ee_to_target_m],
                "max_other_displacement_m": round(float(self.max_other_displacement_m), 4),
                "failure": self.failure(template, config, succeeded)}


@dataclass
class SuccessJudge:
    """When an episode succeeds, from its predicate (`evaluate`) judged at successive times of one clock.

    A push succeeds the first time its predicate holds. move_to ("the end effector hovers just above the
    block") once its predicate has held without a break for TaskConfig.move_dwell_s: sweeping across the
    table at hover height passes over every block on the way, and that is no success (a blind sweep
    "reached" 27 of 30 blocks when any instant counted)."""

    template: str
    dwell_s: float
    since_s: float | None = None        # the predicate has held since (move_to)
    success_s: float | None = None      # when the episode succeeded; None: not yet

    @classmethod
    def for_episode(cls, episode: Episode, config: TaskConfig | None = None) -> "SuccessJudge":
        return cls(episode.template, (config or TaskConfig()).move_dwell_s if episode.template == "move_to" else 0.0)

    def update(self, time_s: float, holds: bool) -> float | None:
        """The predicate's value at `time_s` (not before the last); returns the success time, once there is one."""
        if self.success_s is None:
            if not holds:
                self.since_s = None
            else:
                self.since_s = time_s if self.since_s is None else self.since_s
                if time_s - self.since_s >= self.dwell_s - 1e-9:
                    self.success_s = time_s
        return self.success_s


def evaluate(world: Any, episode: Episode, config: TaskConfig | None = None) -> Outcome:
    """The episode's success predicate on the world as it is now."""
    config = config or TaskConfig()
    moved = {body: world.body_pose(body)[0] - start for body, start in episode.block_positions_m.items()}
    target = episode.target_block
    others = max(float(np.linalg.norm(d)) for body, d in moved.items() if body != target)
    top = world.body_pose(target)[0] + np.array([0.0, 0.0, BLOCK_HALF_M])
    ee = world.site_pose("ee")[0] - top
    undisturbed = others <= config.disturb_m
    if episode.template == "move_to":
        low, high = config.move_height_m
        ok = (float(np.linalg.norm(ee[:2])) <= config.move_radius_m and low <= ee[2] <= high
              and float(np.linalg.norm(moved[target])) <= config.disturb_m)
    else:
        along = PUSH_SIGN[episode.template] * moved[target][1]
        on_table = world.body_pose(target)[0][2] > TABLE_TOP_Z_M
        ok = along >= config.success_push_m and on_table
    return Outcome(bool(ok and undisturbed), moved[target], others, ee)
