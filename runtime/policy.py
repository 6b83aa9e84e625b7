"""The loop's policy interface: Observation in, Plan out; a registry of policy types; wrappers; a scripted policy.

A policy type is a config dataclass registered under a short name, whose `make_policy(context)`
builds the policy. The loop only ever looks types up by name, so a new kind of policy (the
bundle policy, a remote policy) is one module that registers itself:

    @register_policy("bundle")
    @dataclass
    class BundlePolicyConfig(PolicyConfig):
        path: str = ""
        def make_policy(self, context: PolicyContext) -> Policy: ...

Wrappers (`TimedPolicy`; `ProcessPolicy` in process_policy.py, chosen by the `process` option) have
the same interface as what they wrap.
"""
from __future__ import annotations

import importlib
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, Protocol, runtime_checkable

import numpy as np

from edgeact.runtime.action_bins import ACTION_DIMS, ActionStats, unnormalize_actions
from edgeact.runtime.errors import ConfigError

# Modules whose policy types register themselves on import. A listed module that does not exist
# yet is skipped, so shipping `bundle_policy.py` is all it takes to add the "bundle" type.
BUILTIN_POLICY_MODULES = (
    "edgeact.runtime.bundle_policy",
)


# A frame stamped this far after time.monotonic() comes from another clock (time.time(): decades ahead).
MAX_TIMESTAMP_AHEAD_S = 1.0
# Depth whose valid pixels' median exceeds this is not metres from a depth camera: millimetres or raw sensor units.
MAX_MEDIAN_DEPTH_M = 20.0


def depth_units_problem(depth: np.ndarray) -> str | None:
    """Why the array `depth` is not depth in metres (an integer dtype; an implausible median), or None."""
    if depth.dtype.kind != "f":
        return (f"is {depth.dtype}: an integer image is in raw sensor units (e.g. millimetres), not metres; "
                "multiply it by the sensor's depth scale (RealSense: depth_scale, often 0.001) and pass float32 metres")
    step = max(1, int((depth.size / 4096) ** 0.5))      # ~4k pixels: the median moves little, the cost stays small
    sample = depth[::step, ::step]
    valid = sample[np.isfinite(sample) & (sample > 0)]
    median = float(np.median(valid)) if valid.size else 0.0
    if median > MAX_MEDIAN_DEPTH_M:
        return (f"has a median of {median:.4g} over its valid pixels, implausible in metres "
                f"(> {MAX_MEDIAN_DEPTH_M:g}): it looks like millimetres or raw sensor units; multiply it by the "
                "sensor's depth scale (0.001 for millimetres) and pass metres")
    return None


def negative_depth_problem(depth: np.ndarray) -> str | None:
    """Why a float depth image is not distances (values below 0), or None. 0 is "no data"; a negative value would
    be taken for it silently (a sign-flipped or disparity image would read as an empty scene)."""
    if depth.dtype.kind != "f" or not depth.size:
        return None
    lowest = float(np.fmin.reduce(depth, axis=None))     # NaN (no data) skipped; NaN only if every pixel is
    if lowest < 0:
        return (f"has negative values (min {lowest:.4g}): depth in metres is >= 0, with 0 for no data; pass the "
                "sensor's depth, not a sign-flipped or disparity image")
    return None


@dataclass(frozen=True, eq=False)
class Observation:
    """What the policy sees: the newest camera frame plus the joint state of the last control read."""

    rgb: np.ndarray                         # (H, W, 3) uint8
    depth_m: np.ndarray | None              # (H, W) float32 metres aligned to rgb; 0 = no data
    timestamp_s: float                      # time.monotonic() when the frame was captured
    proprio: dict[str, float] | None        # joint -> rad, from the control thread's last read
    instruction: str
    frame_number: int = -1                  # the camera's frame counter (telemetry)
    # The depth comes from a camera driver, which applied the sensor's depth scale (RealSenseCamera, recordings,
    # the simulator): its units are known, so a far scene (a hall, outdoors) is not taken for millimetres. Left
    # False (a caller's own arrays) the units heuristic below refuses integer images and implausible medians.
    depth_from_camera: bool = False

    def __post_init__(self) -> None:
        rgb = self.rgb
        if not (isinstance(rgb, np.ndarray) and rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3):
            raise ValueError(f"Observation.rgb must be (H, W, 3) uint8, got "
                             f"{getattr(rgb, 'shape', None)} {getattr(rgb, 'dtype', type(rgb).__name__)}")
        depth = self.depth_m
        if depth is not None:
            if not isinstance(depth, np.ndarray):
                raise ValueError(f"Observation.depth_m must be a numpy array (H, W) of float32 metres or None, got "
                                 f"{type(depth).__name__}; pass np.asarray(depth, np.float32)")
            if depth.shape != rgb.shape[:2]:
                raise ValueError(f"Observation.depth_m must be {rgb.shape[:2]} like rgb, got {depth.shape}")
            problem = None if self.depth_from_camera and depth.dtype.kind == "f" else depth_units_problem(depth)
            if problem:
                raise ValueError(f"Observation.depth_m {problem}")
            problem = negative_depth_problem(depth)
            if problem:
                raise ValueError(f"Observation.depth_m {problem}")
        if self.proprio is not None and not isinstance(self.proprio, Mapping):
            raise ValueError(f"Observation.proprio must be a dict joint -> angle in rad (the control thread's last "
                             f"read), or None; got {type(self.proprio).__name__}")
        bad = {j: v for j, v in (self.proprio or {}).items()
               if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not math.isfinite(v)}
        if bad:
            raise ValueError(f"Observation.proprio must map each joint to a finite angle in rad, got {bad}; a joint "
                             "whose read failed must not be passed as NaN (leave proprio None or read again)")
        if not isinstance(self.instruction, str):
            raise ValueError(f"Observation.instruction must be a str, got {type(self.instruction).__name__} "
                             f"{self.instruction!r}; say what the robot should do, e.g. 'pick up the red block'")
        t = self.timestamp_s
        if isinstance(t, bool) or not isinstance(t, (int, float, np.integer, np.floating)) or not math.isfinite(t):
            raise ValueError(f"Observation.timestamp_s must be a finite number, time.monotonic() when the frame was "
                             f"captured; got {t!r}")
        now = time.monotonic()
        if t < 0:
            raise ValueError(f"Observation.timestamp_s {t!r} is negative: time.monotonic() never is; stamp frames with "
                             "time.monotonic() when they are captured")
        if t > now + MAX_TIMESTAMP_AHEAD_S:
            raise ValueError(f"Observation.timestamp_s {t!r} is {t - now:.4g} s ahead of time.monotonic() ({now:.3f}): "
                             "it comes from another clock (time.time()?); stamp frames with time.monotonic()")


@dataclass(frozen=True, eq=False)
class Plan:
    """One policy step's result: an action chunk in robot units, planned from one observation."""

    actions: np.ndarray                     # (n, 7) un-normalized [dx, dy, dz, droll, dpitch, dyaw, gripper]
    actions_normalized: np.ndarray          # (n, 7) the same in [-1, 1] (bin centres)
    trace_px: np.ndarray | None             # (k, 2) [u, v] pixels of the first image, or None
    depth_codes: np.ndarray | None          # (100,) depth VQ codes, or None
    observation_time_s: float               # the observation's timestamp_s: action 0 starts then
    created_time_s: float                   # time.monotonic() when the plan was ready
    stage_seconds: dict[str, float] = field(default_factory=dict)   # stage -> wall seconds of this step
    decode_steps: int = 0                   # sequential decoder steps this plan took
    choices: int = 0                        # closed choices the answer had; decode_steps / choices shows what
                                            # drafting saved (without it, decode_steps is choices - 1
                                            # where no forced run exceeds the decoder's chunk)
    trace_forced: bool = False              # the trace was given (steering), not the model's: plan.follow_trace
                                            # "steered" follows such a trace (runtime/trace_follow.py)
    trace_kept: bool = False                # the given trace is the one steer() keeps for every plan (a path drawn
                                            # once), not one given with this observation alone
    trace_followed: bool = False            # its translations were moved onto its trace (runtime/trace_follow.py)

    def __post_init__(self) -> None:
        for name in ("actions", "actions_normalized"):
            value = np.asarray(getattr(self, name), dtype=np.float64)
            if value.ndim != 2 or value.shape[1] != ACTION_DIMS or value.shape[0] < 1:
                raise ValueError(f"Plan.{name} must be (n >= 1, {ACTION_DIMS}), got {value.shape}")
            if not np.isfinite(value).all():
                raise ValueError(f"Plan.{name} holds non-finite values; the policy's output is broken")
            object.__setattr__(self, name, value)
        for name in ("observation_time_s", "created_time_s"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"Plan.{name} is {getattr(self, name)!r}; it must be a finite time.monotonic() value")
        if self.actions.shape != self.actions_normalized.shape:
            raise ValueError(f"Plan.actions {self.actions.shape} and actions_normalized "
                             f"{self.actions_normalized.shape} differ in shape")

    @property
    def n_actions(self) -> int:
        return int(self.actions.shape[0])

    @property
    def latency_s(self) -> float:
        """Observation (frame capture) to plan ready: how stale the plan's first action already is."""
        return self.created_time_s - self.observation_time_s


@runtime_checkable
class Policy(Protocol):
    def step(self, obs: Observation) -> Plan: ...

    def close(self) -> None: ...


# -- the registry ------------------------------------------------------------------------------

@dataclass(frozen=True)
class PolicyContext:
    """What the robot tells a policy when it is built (policies take what they need)."""

    action_rate_hz: float                   # how long one action of a chunk lasts: 1 / action_rate_hz
    joint_names: tuple[str, ...] = ()
    config_dir: Path | None = None          # resolve relative paths in the config against this
    intrinsics: Any = None                  # the camera's Intrinsics (color stream), when known


@dataclass
class PolicyConfig:
    """Base of every policy type's config; subclasses add fields and register a type name.

    Every type takes `process`: run the policy in a child process (process_policy.py), so its
    Python work never holds the GIL the control thread needs. Unset, the type's `process_default`
    decides: a type whose step is seconds of Python between engine calls (a model) sets it True.
    """

    type_name: ClassVar[str] = ""
    process_default: ClassVar[bool] = False
    process: bool | None = field(default=None, kw_only=True)

    def make_policy(self, context: PolicyContext) -> Policy:
        raise NotImplementedError(f"{type(self).__name__} does not say how to build its policy")

    @property
    def in_own_process(self) -> bool:
        return self.process_default if self.process is None else self.process

    @property
    def cpu_threads_apply(self) -> bool:
        """Whether the type's `threads` field (CPU threads, when it has one) is used as configured; a type whose
        work can run elsewhere (a bundle on TensorRT) says False there, and no default is filled in for it."""
        return True

    def make_robot_policy(self, context: PolicyContext) -> Policy:
        """The policy as the robot runs it: in its own process when `in_own_process`, else `make_policy`'s."""
        if not self.in_own_process:
            return self.make_policy(context)
        from edgeact.runtime.process_policy import ProcessPolicy   # multiprocessing only for robots that use it

        return ProcessPolicy(self, context)


_POLICY_TYPES: dict[str, type[PolicyConfig]] = {}


def register_policy(type_name: str) -> Callable[[type[PolicyConfig]], type[PolicyConfig]]:
    """Class decorator: make a PolicyConfig subclass reachable by its short type name."""

    def decorate(cls: type[PolicyConfig]) -> type[PolicyConfig]:
        if type_name in _POLICY_TYPES and _POLICY_TYPES[type_name].__qualname__ != cls.__qualname__:
            raise ConfigError(f"policy type {type_name!r} registered twice "
                              f"({_POLICY_TYPES[type_name].__name__} and {cls.__name__})")
        cls.type_name = type_name
        _POLICY_TYPES[type_name] = cls
        return cls

    return decorate


def policy_types() -> dict[str, type[PolicyConfig]]:
    """{type name: config class} of every registered policy type."""
    for module in BUILTIN_POLICY_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:      # the module exists but something it imports is missing: say so
                raise
    return dict(_POLICY_TYPES)


def policy_type(type_name: str) -> type[PolicyConfig]:
    types = policy_types()
    if type_name not in types:
        raise ConfigError(f"policy type {type_name!r} unknown; use one of {', '.join(sorted(types))}")
    return types[type_name]


# -- wrappers ----------------------------------------------------------------------------------

class TimedPolicy:
    """Adds the step's wall time ("policy_total") and what the stages did not account for ("policy_other")."""

    def __init__(self, inner: Policy, clock: Callable[[], float] = time.monotonic):
        self.inner, self.clock = inner, clock

    def step(self, obs: Observation) -> Plan:
        start = self.clock()
        plan = self.inner.step(obs)
        total = self.clock() - start
        stages = dict(plan.stage_seconds)
        other = max(total - sum(stages.values()), 0.0)
        stages.update(policy_total=total, policy_other=other)
        return replace(plan, stage_seconds=stages)

    def close(self) -> None:
        self.inner.close()


# -- the scripted policy -------------------------------------------------------------------------

@register_policy("scripted")
@dataclass
class ScriptedPolicyConfig(PolicyConfig):
    """Deterministic chunks without a model: a baseline for the loop, and the policy of the tests.

    Normalized action d of chunk entry i is offset[d] + amplitude * sin(2 pi t_i / period_s + d),
    t_i = (obs time - first obs time) + i / action_rate_hz, so plans made at different times
    agree where they overlap, as a real policy's should. Robot units: value * action_scale[d]
    (the gripper, last, stays normalized as in MolmoAct).
    """

    chunk_size: int = 8
    latency_s: float = 0.05                 # how long each step takes (sleeps): a stand-in for inference
    amplitude: float = 0.5
    period_s: float = 4.0
    offset: list[float] = field(default_factory=lambda: [0.0] * ACTION_DIMS)
    action_scale: list[float] = field(default_factory=lambda: [0.01, 0.01, 0.01, 0.05, 0.05, 0.05])

    def __post_init__(self) -> None:
        if not (isinstance(self.chunk_size, int) and 1 <= self.chunk_size <= 256):
            raise ConfigError(f"chunk_size: must be an integer in [1, 256], got {self.chunk_size}")
        if not (0.0 <= self.latency_s <= 60.0):
            raise ConfigError(f"latency_s: must be in [0, 60] seconds, got {self.latency_s}")
        if not (0.0 <= self.amplitude <= 1.0):
            raise ConfigError(f"amplitude: must be in [0, 1] (normalized actions), got {self.amplitude}")
        if not (self.period_s > 0 and math.isfinite(self.period_s)):
            raise ConfigError(f"period_s: must be > 0, got {self.period_s}")
        if len(self.offset) != ACTION_DIMS or any(abs(v) > 1.0 for v in self.offset):
            raise ConfigError(f"offset: must be {ACTION_DIMS} values in [-1, 1], got {self.offset}")
        if len(self.action_scale) != ACTION_DIMS - 1 or any(not v >= 0 for v in self.action_scale):
            raise ConfigError(f"action_scale: must be {ACTION_DIMS - 1} values >= 0 (robot units per normalized "
                              f"unit of dx..dyaw), got {self.action_scale}")

    def make_policy(self, context: PolicyContext) -> "ScriptedPolicy":
        return ScriptedPolicy(self, context.action_rate_hz)


class ScriptedPolicy:
    def __init__(self, config: ScriptedPolicyConfig, action_rate_hz: float,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic):
        if not action_rate_hz > 0:
            raise ConfigError(f"action_rate_hz must be > 0, got {action_rate_hz}")
        self.config, self.action_rate_hz, self.sleep, self.clock = config, action_rate_hz, sleep, clock
        scale = np.asarray(config.action_scale + [1.0], dtype=np.float64)
        # Symmetric statistics make un-normalizing a plain scale: 0.5 (v + 1)(2 s) - s = v s.
        self.stats = ActionStats(q01=-scale, q99=scale, mask=np.ones(ACTION_DIMS, dtype=bool))
        self._t0: float | None = None
        self.steps = 0

    def normalized_chunk(self, obs_time_s: float) -> np.ndarray:
        if self._t0 is None:
            self._t0 = obs_time_s
        c = self.config
        t = (obs_time_s - self._t0) + np.arange(c.chunk_size)[:, None] / self.action_rate_hz
        phase = 2 * np.pi * t / c.period_s + np.arange(ACTION_DIMS)[None, :]
        return np.clip(np.asarray(c.offset)[None, :] + c.amplitude * np.sin(phase), -1.0, 1.0)

    def step(self, obs: Observation) -> Plan:
        start = self.clock()
        normalized = self.normalized_chunk(obs.timestamp_s)
        if self.config.latency_s > 0:
            self.sleep(max(self.config.latency_s - (self.clock() - start), 0.0))
        self.steps += 1
        return Plan(actions=unnormalize_actions(normalized, self.stats), actions_normalized=normalized,
                    trace_px=None, depth_codes=None, observation_time_s=obs.timestamp_s,
                    created_time_s=self.clock(), stage_seconds={"scripted": self.clock() - start}, decode_steps=0)

    def close(self) -> None:
        pass
