"""Policies (and a camera) for the process tests; a module of their own so that a spawned child can import them."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import numpy as np

from edgeact.drivers.cameras.synthetic import SyntheticCamera, SyntheticConfig
from edgeact.runtime.errors import ConfigError
from edgeact.runtime.policy import Observation, Plan, PolicyConfig, PolicyContext


@dataclass
class FrameEchoConfig(PolicyConfig):
    """Plans that say what the policy saw: the frame's size, pixel sums, depth, proprio, instruction length."""

    threads: int | None = None

    def make_policy(self, context: PolicyContext) -> "FrameEcho":
        return FrameEcho(self)


class FrameEcho:
    def __init__(self, config: FrameEchoConfig):
        self.config = config

    def step(self, obs: Observation) -> Plan:
        depth = -1.0 if obs.depth_m is None else float(obs.depth_m.astype(np.float64).sum())
        seen = [obs.rgb.shape[0], obs.rgb.shape[1], float(obs.rgb.astype(np.int64).sum()), depth,
                sum((obs.proprio or {}).values()), len(obs.instruction), float(self.config.threads or 0)]
        values = np.asarray([seen], dtype=np.float64)
        return Plan(values, np.zeros_like(values), None, None, obs.timestamp_s, time.monotonic(),
                    {"echo": 0.0}, decode_steps=obs.frame_number, choices=2 * obs.frame_number + 1)

    def close(self) -> None:
        pass


@dataclass
class FailingConfig(PolicyConfig):
    """Fails as told: at load ("load"; "load-exit": sys.exit(4); "load-interrupt": a KeyboardInterrupt; "load-wait":
    sleeps 3 s first, then loads), or with `error` on step number `fail_at` (from 0), or hangs there ("hang")."""

    mode: str = "step"
    fail_at: int = 1
    message: str = "the model fell over"

    def make_policy(self, context: PolicyContext) -> "Failing":
        if self.mode == "load":
            raise ConfigError(f"path: {self.message}")
        if self.mode == "load-exit":
            sys.exit(4)
        if self.mode == "load-interrupt":
            raise KeyboardInterrupt
        if self.mode == "load-wait":
            time.sleep(3)
        return Failing(self)


class UnpicklableError(Exception):
    def __init__(self, code: int, text: str):     # pickle rebuilds it with one argument: it cannot
        super().__init__(f"{text} (code {code})")


class Failing:
    def __init__(self, config: FailingConfig):
        self.config, self.steps = config, 0

    def step(self, obs: Observation) -> Plan:
        step, self.steps = self.steps, self.steps + 1
        if step == self.config.fail_at:
            if self.config.mode == "hang":
                time.sleep(60)
            if self.config.mode == "segv":          # a crash in native code (a driver, an engine)
                import faulthandler

                faulthandler._sigsegv()
            if self.config.mode == "unpicklable":
                raise UnpicklableError(7, self.config.message)
            raise RuntimeError(self.config.message)
        values = np.zeros((2, 7))
        return Plan(values, values, None, None, obs.timestamp_s, time.monotonic())

    def close(self) -> None:
        pass


@dataclass
class FailingCameraConfig(SyntheticConfig):
    """A synthetic camera whose render fails from frame `fail_after` on (any driver or render error). Not registered:
    the camera tests list the registered types."""

    fail_after: int = 3

    def make_camera(self) -> "FailingCamera":
        return FailingCamera(self)


class FailingCamera(SyntheticCamera):
    def __init__(self, config: FailingCameraConfig, world=None):     # world: stands in for a MujocoCamera too
        super().__init__(config)

    def render(self, frame_number, capture_monotonic_s=None):
        if frame_number >= self.config.fail_after:
            raise RuntimeError("GL context lost")
        return super().render(frame_number, capture_monotonic_s)


@dataclass
class SteerEchoConfig(PolicyConfig):
    """Plans whose trace is the one steer() forced, checked as the bundle policy checks it."""

    def make_policy(self, context: PolicyContext) -> "SteerEcho":
        return SteerEcho()


class SteerEcho:
    def __init__(self):
        self.trace = None

    def steer(self, trace) -> None:
        from edgeact.runtime.grammar_walk import trace_points

        self.trace = None if trace is None else trace_points(trace, what="steer()")

    def step(self, obs: Observation) -> Plan:
        values = np.zeros((1, 7))
        return Plan(values, values, self.trace, None, obs.timestamp_s, time.monotonic())

    def close(self) -> None:
        pass
