"""The reference task's scripted expert: waypoints from the true block poses, end-effector deltas, 8-action chunks.

    mapper, rates = runtime_action_mapper()
    rollout = run_expert(world, episode, mapper)        # steps the world deterministically, no wall clock
    rollout.actions, rollout.chunk(k), rollout.ee_positions_m, rollout.outcome

The expert speaks the runtime's action language: an action is [dx, dy, dz, droll, dpitch, dyaw,
gripper] in the "ik" mapper's frame and units (the simulated robot's config: base frame, metres,
radians, gripper in [-1, 1]), and it is executed exactly as the runtime executes a plan: at the
control rate, each action's targets come from `mapper.apply(start, action, fraction)`, and the
next action starts from where the last one was commanded to end (ChunkFollower's chaining). So a
model that learns these actions and plays them back through `edgeact run` does what the expert did.

The plan is a list of end-effector waypoints (base frame; the base stays at the world's origin),
fixed at the episode's start: it is scripted, not reactive. Each action walks the commanded end
effector toward the current waypoint at most `speed_m_s / action_rate_hz` and moves on when within
`waypoint_tolerance_m` (or when the arm got no closer: a waypoint just out of reach). The rotation
deltas turn the hand, at most `max_rotation_step_rad` per action, toward pointing `pitch_rad` down
in the vertical plane through the shoulder and the end effector, an orientation a 5-joint arm can
take (no roll): pitched, the jaws reach the table while the forearm stays clear of it. The gripper
stays closed. Because the actions depend only on the commanded joint state and the fixed
waypoints, the chunk from step k (actions k..k+7) is exactly what the expert will do next.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from edgeact.drivers.sim.task import (BLOCK_HALF_M, PUSH_SIGN, SHOULDER_XY_M, TABLE_TOP_Z_M, Episode, Outcome,
                                      TaskConfig, evaluate, reset_world)
from edgeact.runtime.action_bins import ACTION_DIMS
from edgeact.runtime.errors import ConfigError
from edgeact.runtime.kinematics import rpy_matrix

GRIPPER_CLOSED = -1.0                   # the gripper's action value: fully closed (gripper_range_rad[0])


@dataclass(frozen=True)
class ExpertConfig:
    action_rate_hz: float = 10.0        # the simulated robot's rates.action_rate_hz
    control_hz: float = 100.0           # ... and rates.control_hz
    chunk_size: int = 8                 # actions per chunk, as fine-tuned MolmoAct emits
    speed_m_s: float = 0.15             # end-effector speed along the plan
    hover_m: float = 0.05               # move_to: the end effector above the block's top face
    travel_m: float = 0.07              # pushes: clearance above the block while getting into place
    push_ee_z_m: float = 0.24           # pushes: end-effector height (the pitched jaws' tips ~1 cm above the table)
    push_ee_back_m: float = 0.015       # pushes: end effector this far behind the block (the jaws reach ahead)
    pitch_rad: float = 0.7              # the hand points down this much (keeps the forearm above the table)
    max_rotation_step_rad: float = 0.15 # per action
    contact_gap_m: float = 0.03         # pushes: start this far beside the block's side
    jaw_half_width_m: float = 0.01      # the jaws' half thickness about the end effector, along y
    waypoint_tolerance_m: float = 0.003
    settle_actions: int = 3             # actions after the last waypoint (no translation): the arm comes to rest
    max_actions: int = 200              # a plan longer than this is a bug, not a slow arm
    # Executed translation = the expert's + Gaussian noise of this std per axis, relative to the step asked
    # (seeded by the episode): the recorded actions stay the expert's own, taken from states a little off its
    # path, so a model trained on them learns to come back to it (DART, Laskey et al. 2017). 0: none.
    execution_noise: float = 0.0
    # The same for the hand's rotation: Gaussian noise of this std (rad, per axis) on each executed action's
    # rotation, from a stream of its own (0: none, and the translation's noise is unchanged either way). A learned
    # policy's rotation actions are never exact, so its hand drifts some degrees off the expert's orientation;
    # without this the demonstrations hold that orientation within 1 degree after the first few actions.
    rotation_noise_rad: float = 0.0

    def __post_init__(self) -> None:
        for name in ("action_rate_hz", "control_hz", "speed_m_s", "hover_m", "travel_m", "push_ee_z_m",
                     "contact_gap_m", "jaw_half_width_m", "waypoint_tolerance_m", "max_rotation_step_rad"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"ExpertConfig.{name}: must be a positive number, got {value}")
        ticks = self.control_hz / self.action_rate_hz
        if abs(ticks - round(ticks)) > 1e-9 or ticks < 1:
            raise ConfigError(f"ExpertConfig: control_hz ({self.control_hz}) must be a whole multiple of "
                              f"action_rate_hz ({self.action_rate_hz})")
        if not (math.isfinite(self.execution_noise) and 0 <= self.execution_noise <= 1):
            raise ConfigError(f"ExpertConfig.execution_noise: must be in [0, 1], got {self.execution_noise}")
        if not (math.isfinite(self.rotation_noise_rad) and 0 <= self.rotation_noise_rad <= self.max_rotation_step_rad):
            raise ConfigError(f"ExpertConfig.rotation_noise_rad: must be in [0, max_rotation_step_rad = "
                              f"{self.max_rotation_step_rad}], got {self.rotation_noise_rad}")
        if not (1 <= self.chunk_size <= 64 and 0 <= self.settle_actions and self.max_actions >= 1):
            raise ConfigError(f"ExpertConfig: chunk_size in [1, 64], settle_actions >= 0, max_actions >= 1; got "
                              f"{self.chunk_size}, {self.settle_actions}, {self.max_actions}")

    @property
    def ticks_per_action(self) -> int:
        return int(round(self.control_hz / self.action_rate_hz))

    @property
    def step_m(self) -> float:
        return self.speed_m_s / self.action_rate_hz


def runtime_action_mapper() -> tuple[Any, dict[str, float]]:
    """The simulated robot's "ik" action mapper and its rates, built from the runtime's own config."""
    from edgeact.runtime.robot_config import robot_config_from_dict
    from edgeact.runtime.sim_robot import mujoco_robot_config_dict

    config = robot_config_from_dict(mujoco_robot_config_dict(), source="<the MuJoCo simulated robot>")
    mapper = config.actions.make_mapper(list(config.robot.motors))
    return mapper, {"action_rate_hz": config.rates.action_rate_hz, "control_hz": config.rates.control_hz}


def expert_waypoints(episode: Episode, config: ExpertConfig = ExpertConfig(),
                     task_config: TaskConfig | None = None) -> list[np.ndarray]:
    """End-effector waypoints (base frame, m) of the episode's plan, from its true initial block poses."""
    push_distance_m = (task_config or TaskConfig()).push_distance_m
    block = episode.block_positions_m[episode.target_block]
    top_z = block[2] + BLOCK_HALF_M
    if episode.template == "move_to":
        above = np.array([block[0], block[1], top_z + config.hover_m])
        return [above + np.array([0.0, 0.0, 0.03]), above]
    sign = PUSH_SIGN[episode.template]
    side = BLOCK_HALF_M + config.jaw_half_width_m       # end effector to block centre when the jaw touches it
    high = top_z + config.travel_m
    start_y = block[1] - sign * (side + config.contact_gap_m)
    end_y = block[1] + sign * (push_distance_m - side)
    z = max(config.push_ee_z_m, TABLE_TOP_Z_M + 0.015)
    x = block[0] - config.push_ee_back_m
    return [np.array([x, start_y, high]), np.array([x, start_y, z]), np.array([x, end_y, z]),
            np.array([x, end_y, high])]


def step_toward(position_m: np.ndarray, target_m: np.ndarray, step_m: float) -> np.ndarray:
    """The expert's translation for one action: straight at the target, at most step_m long."""
    to_go = target_m - position_m
    return to_go * min(1.0, step_m / float(np.linalg.norm(to_go)))


# Steering from a learned policy's states: a waypoint counts as reached this close. The expert's own
# 3 mm (waypoint_tolerance_m) is rarely hit by a policy's arm, which would then be steered back to a
# waypoint it has in effect passed.
STEER_REACHED_M = 0.025


class ExpertSteering:
    """The expert's plan continued from wherever the arm is: the actions it would take next, and where they lead.

    For `edgeact eval --trace expert` (each plan's trace is the expert's, from the current pose, so only the
    actions are the policy's) and for DAgger's labels (`record_policy_demos`). A waypoint is passed once the arm
    came within `reached_m` of it (`observe` each executed action's commanded position), or when a step toward
    it would get nowhere (beyond the arm's reach: the expert's own stall rule, foreseen through the mapper's IK).
    Positions are in the reference frame of `ActionExecutor.commanded_pose()`.
    """

    def __init__(self, episode: Episode, config: ExpertConfig, task_config: TaskConfig | None = None,
                 reached_m: float = STEER_REACHED_M):
        self.waypoints, self.config, self.index = expert_waypoints(episode, config, task_config), config, 0
        self.reached_m = reached_m

    def observe(self, position_m: np.ndarray) -> None:
        """Pass the waypoints the commanded end effector came within reached_m of. Call it after every executed
        action: an arm that passes a waypoint between two plans is not sent back to it."""
        while self.index < len(self.waypoints) and \
                np.linalg.norm(self.waypoints[self.index] - position_m) <= self.reached_m:
            self.index += 1

    def chunk(self, mapper: Any, commanded_rad: dict[str, float], n_actions: int) -> tuple[np.ndarray, np.ndarray]:
        """The expert's next n_actions from the commanded joint state, played through the action mapper's inverse
        kinematics as `ActionExecutor` would (no world is stepped): the positions (n_actions + 1, 3) of the
        commanded end effector, now and after each action, and the actions (n_actions, 7) as `run_expert` makes
        them."""
        kin, q = mapper.kinematics, dict(commanded_rad)
        pose = kin.forward(kin.q_from(q))

        def after(action: np.ndarray) -> tuple[dict[str, float], Any]:
            q_next = mapper.apply(q, action, 1.0)
            return q_next, kin.forward(kin.q_from(q_next))

        def stalls(target: np.ndarray) -> bool:
            action = expert_action(pose, target, self.config)
            return stalled(float(np.linalg.norm(after(action)[1].position_m - pose.position_m)),
                           float(np.linalg.norm(action[:3])))

        self.observe(pose.position_m)
        while self.index < len(self.waypoints) and stalls(self.waypoints[self.index]):
            self.index += 1
            self.observe(pose.position_m)
        index, positions, actions, asked_m = self.index, [pose.position_m], [], 0.0
        for _ in range(n_actions):
            moved_m = float(np.linalg.norm(positions[-1] - positions[-2])) if len(positions) > 1 else 0.0
            index = next_waypoint(self.waypoints, index, pose.position_m, moved_m, asked_m, self.config)
            action = expert_action(pose, self.waypoints[index] if index < len(self.waypoints) else None, self.config)
            asked_m = float(np.linalg.norm(action[:3]))
            q, pose = after(action)
            positions.append(pose.position_m)
            actions.append(action)
        return np.asarray(positions), np.asarray(actions)


class ActionExecutor:
    """Plays actions into a MujocoWorld as the runtime's control step would (see the module docstring)."""

    def __init__(self, world: Any, mapper: Any, config: ExpertConfig):
        self.world, self.mapper, self.config = world, mapper, config
        self.commanded_rad = world.joint_positions(mapper.joints)
        self._steps_per_tick = max(1, int(round(1.0 / (config.control_hz * world.timestep_s))))

    def commanded_pose(self) -> Any:
        """The end effector's pose (reference frame) where the last action was commanded to end."""
        kin = self.mapper.kinematics
        return kin.forward(kin.q_from(self.commanded_rad))

    def execute(self, action: np.ndarray) -> None:
        n = self.config.ticks_per_action
        start = self.commanded_rad
        for tick in range(1, n + 1):
            targets = self.mapper.apply(start, action, tick / n)
            for joint, q in targets.items():
                self.world.drive(joint, torque_on=True, mode="position", goal=q)
            self.world.step(self._steps_per_tick)
        self.commanded_rad = targets


@dataclass(frozen=True, eq=False)
class ExpertRollout:
    episode: Episode
    actions: np.ndarray             # (T, 7) raw units, the expert's (executed with the config's noise added)
    ee_positions_m: np.ndarray      # (T + 1, 3) the end-effector site (world frame) at each action boundary
    outcome: Outcome
    chunk_size: int

    @property
    def n_actions(self) -> int:
        return int(self.actions.shape[0])

    def chunk(self, k: int) -> np.ndarray:
        """Actions k .. k+chunk_size-1; past the end, holds (zero motion, gripper unchanged)."""
        out = np.zeros((self.chunk_size, ACTION_DIMS))
        out[:, -1] = self.actions[-1, -1]
        take = self.actions[k:k + self.chunk_size]
        out[:len(take)] = take
        return out


def target_rotation(ee_position_m: np.ndarray, config: ExpertConfig) -> np.ndarray:
    """The hand pitched down by config.pitch_rad in the vertical plane through the shoulder and the end effector:
    an orientation the 5-joint arm can take there (no roll needed)."""
    yaw = math.atan2(ee_position_m[1] - SHOULDER_XY_M[1], ee_position_m[0] - SHOULDER_XY_M[0])
    return rpy_matrix(0.0, config.pitch_rad, yaw)


def _rotation_step(rotation_now: np.ndarray, next_position_m: np.ndarray, config: ExpertConfig) -> np.ndarray:
    """[droll, dpitch, dyaw] (fixed axes, R = Rz Ry Rx) turning the hand toward its target, capped per action."""
    relative = target_rotation(next_position_m, config) @ rotation_now.T
    rpy = np.array(matrix_rpy(relative))
    largest = float(np.max(np.abs(rpy)))
    return rpy * (config.max_rotation_step_rad / largest) if largest > config.max_rotation_step_rad else rpy


def matrix_rpy(rotation: np.ndarray) -> tuple[float, float, float]:
    """Inverse of kinematics.rpy_matrix (roll, pitch, yaw with |pitch| <= pi/2)."""
    pitch = math.asin(max(-1.0, min(1.0, -float(rotation[2, 0]))))
    roll = math.atan2(float(rotation[2, 1]), float(rotation[2, 2]))
    yaw = math.atan2(float(rotation[1, 0]), float(rotation[0, 0]))
    return roll, pitch, yaw


def stalled(moved_m: float, asked_m: float) -> bool:
    """The expert's stall rule: an action that asked for asked_m of motion got the commanded end effector less than a
    fifth of it (the waypoint is beyond the arm's reach)."""
    return asked_m > 0 and moved_m < 0.2 * asked_m


def next_waypoint(waypoints: list[np.ndarray], index: int, position_m: np.ndarray, moved_m: float, asked_m: float,
                  config: ExpertConfig) -> int:
    """The waypoint the expert heads for from `position_m`: one is done when reached, or when the last action toward
    it (asked_m long; 0: none yet) moved the commanded end effector by only moved_m (`stalled`)."""
    stuck = stalled(moved_m, asked_m)
    while index < len(waypoints) and (stuck or np.linalg.norm(waypoints[index] - position_m) <=
                                      config.waypoint_tolerance_m):
        index, stuck = index + 1, False
    return index


def expert_action(pose: Any, target_m: np.ndarray | None, config: ExpertConfig) -> np.ndarray:
    """One expert action from the commanded pose: a step straight at the target waypoint (none: stay), the hand
    turned toward its pitched-down orientation there, the gripper closed."""
    action = hold_action()
    if target_m is not None:
        action[:3] = step_toward(pose.position_m, target_m, config.step_m)
    action[3:6] = _rotation_step(pose.rotation, pose.position_m + action[:3], config)
    return action


def hold_action(gripper: float = GRIPPER_CLOSED) -> np.ndarray:
    action = np.zeros(ACTION_DIMS)
    action[-1] = gripper
    return action


def run_expert(world: Any, episode: Episode, mapper: Any, config: ExpertConfig = ExpertConfig(),
               on_action: Callable[[int, Any], None] | None = None,
               task_config: TaskConfig | None = None) -> ExpertRollout:
    """Reset the world to the episode, then plan and execute the expert's actions until its plan is done.

    `on_action(k, world)` runs before action k is executed (a recorder renders the camera there);
    it runs once more after the last action (k = T)."""
    reset_world(world, episode)
    executor = ActionExecutor(world, mapper, config)
    waypoints = expert_waypoints(episode, config, task_config)
    limit = min(config.max_actions, int(episode.time_limit_s * config.action_rate_hz))
    actions, ee = [], [world.site_pose("ee")[0]]
    noise_rng = np.random.default_rng([episode.seed, 0x5EED])
    rotation_rng = np.random.default_rng([episode.seed, 0x5EED, 1])
    index, settle = 0, 0
    last_position_m, last_asked_m = np.zeros(3), 0.0
    while len(actions) < limit and settle < config.settle_actions:
        if on_action is not None:
            on_action(len(actions), world)
        pose = executor.commanded_pose()
        index = next_waypoint(waypoints, index, pose.position_m,
                              float(np.linalg.norm(pose.position_m - last_position_m)), last_asked_m, config)
        settle += index >= len(waypoints)
        action = expert_action(pose, waypoints[index] if index < len(waypoints) else None, config)
        last_position_m, last_asked_m = pose.position_m, float(np.linalg.norm(action[:3]))
        executed = action.copy()
        executed[:3] += noise_rng.normal(0.0, config.execution_noise * last_asked_m, 3)
        if config.rotation_noise_rad:
            executed[3:6] += rotation_rng.normal(0.0, config.rotation_noise_rad, 3)
        executor.execute(executed)
        actions.append(action)
        ee.append(world.site_pose("ee")[0])
    if on_action is not None:
        on_action(len(actions), world)
    outcome = evaluate(world, episode, task_config)
    return ExpertRollout(episode, np.asarray(actions), np.asarray(ee), outcome, config.chunk_size)
