"""`edgeact eval`: seeded episodes per system, success detection, the report, the sheets, and bad input."""
from __future__ import annotations

import json
import math
import signal
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("mujoco", reason="the evaluation runs the MuJoCo robot (pip install mujoco==4.0.0)")

from edgeact.runtime.device_info import read_device_info  # noqa: E402
from edgeact.runtime.errors import ConfigError  # noqa: E402
from edgeact.runtime.decode_program import DEFAULT_DRAFT_TOKENS  # noqa: E402
from edgeact.runtime.sim_eval import (EVAL_CAMERA_PX, EpisodeResult, EvalOptions, EvalReport,  # noqa: E402
                                      LockstepRunner, episode_plan, eval_systems, evaluate, system_config_dict)
from edgeact.runtime.answer import trace_to_pixels  # noqa: E402
from edgeact.runtime.sim_robot import mujoco_robot_config_dict  # noqa: E402
from tests.export.test_depth_tokenizer import trained_tokenizer  # noqa: E402
from tests.runtime.test_decode_program import exported_bundle  # noqa: E402

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return exported_bundle(tmp_path_factory, "D")


@pytest.fixture(scope="module")
def with_depth(exported, tmp_path_factory):
    from edgeact.export.depth_tokenizer_export import add_depth_tokenizer
    from edgeact.export.train_depth_tokenizer import sim_depth_images

    return add_depth_tokenizer(exported.bundle_dir, trained_tokenizer(tmp_path_factory).dir,
                               tmp_path_factory.mktemp("eval_sensor") / "bundle",
                               check_images=sim_depth_images(2, 4242, size_px=EVAL_CAMERA_PX))


def test_episodes_are_seeded_and_cycle_through_the_templates():
    assert episode_plan(4, 10) == [(10, "move_to"), (11, "push_left"), (12, "push_right"), (13, "move_to")]


def test_forced_depth_needs_the_depth_tokenizer_stage(exported):
    with pytest.raises(ConfigError, match="add-depth-tokenizer"):
        eval_systems({"fp32": exported.bundle_dir}, ["forced"])
    with pytest.raises(ConfigError, match="generated and/or forced"):
        eval_systems({"fp32": exported.bundle_dir}, ["sensor"])
    with pytest.raises(ConfigError, match="--bundle"):
        eval_systems({}, ["generated"])


def test_the_system_config_takes_the_bundle_the_depth_source_and_the_trained_camera_size(with_depth):
    system = eval_systems({"fp32": with_depth}, ["forced"])[0]
    assert (system.name, system.precision, system.depth) == ("fp32 / forced depth", "fp32", "forced")
    data = system_config_dict(mujoco_robot_config_dict(), system)
    assert data["policy"]["path"] == str(with_depth.resolve()) and data["policy"]["forced_depth"] == "sensor"
    assert system.action_decoding == data["policy"]["action_decoding"] == "median"     # the eval's default
    greedy = eval_systems({"fp32": with_depth}, ["forced"], action_decoding="greedy")[0]
    assert system_config_dict(mujoco_robot_config_dict(), greedy)["policy"]["action_decoding"] == "greedy"
    with pytest.raises(ConfigError, match="--action-decoding 'mean' unknown; use one of greedy, median"):
        eval_systems({"fp32": with_depth}, ["forced"], action_decoding="mean")
    assert (data["camera"]["width"], data["camera"]["height"]) == EVAL_CAMERA_PX
    simple = mujoco_robot_config_dict(camera={"type": "synthetic", "name": "front", "width": 64, "height": 48})
    with pytest.raises(ConfigError, match="camera.type"):
        system_config_dict(simple, system)
    # A base config without an instruction (a scripted robot's): each episode answers its own, so it still loads.
    bare = {**mujoco_robot_config_dict(), "instruction": ""}
    from edgeact.runtime.robot_config import robot_config_from_dict

    assert robot_config_from_dict(system_config_dict(bare, system)).policy.path == str(with_depth.resolve())


def test_the_eval_command_offers_the_decodings_with_the_reference_tasks_as_default():
    import argparse

    from edgeact.runtime import commands_eval
    from edgeact.runtime.decode_program import ACTION_DECODINGS
    from edgeact.runtime.sim_eval import REFERENCE_ACTION_DECODING

    parser = argparse.ArgumentParser()
    commands_eval.register(parser.add_subparsers())
    assert parser.parse_args(["eval"]).action_decoding == REFERENCE_ACTION_DECODING
    for decoding in ACTION_DECODINGS:
        assert parser.parse_args(["eval", "--action-decoding", decoding]).action_decoding == decoding


class _ReplayExpert:
    """A stand-in policy that plays the scripted expert's actions of one episode, ignoring the frames."""

    def __init__(self, actions: np.ndarray):
        self.actions, self.done = actions, 0

    def infer(self, rgb, instruction, depth_m=None):
        chunk = self.actions[self.done:self.done + 8]
        if len(chunk) < 8:      # past the expert's end: hold
            hold = np.zeros((8 - len(chunk), 7))
            hold[:, -1] = -1.0
            chunk = np.concatenate([chunk, hold])
        self.done += 2          # replan_every below
        return SimpleNamespace(actions=chunk, actions_normalized=chunk, trace_px=None, decode_steps=0)

    def close(self) -> None:
        pass


def test_lockstep_execution_is_the_experts_so_its_actions_succeed(exported, tmp_path):
    # The evaluation executes actions exactly as the demonstrations were recorded: the expert's own actions,
    # replayed through it, solve the episode, and the success is seen when it happens.
    from edgeact.drivers.sim.expert import run_expert, runtime_action_mapper
    from edgeact.drivers.sim.mujoco_robot import MujocoWorld
    from edgeact.drivers.sim.task import sample_episode

    seed, template = 1_000_001, "push_left"
    mapper, rates = runtime_action_mapper()
    rollout = run_expert(MujocoWorld(), sample_episode(seed, template), mapper)
    assert rollout.outcome.success
    system = eval_systems({"expert": exported.bundle_dir}, ["generated"])[0]
    runner = LockstepRunner(mujoco_robot_config_dict(), system, 2, "<test>", policy=_ReplayExpert(rollout.actions))
    try:
        result = runner.episode(0, seed, template, tmp_path / "sheet.png")
    finally:
        runner.close()
    assert result.success and result.episode_s <= rollout.n_actions / rates["action_rate_hz"] + 1e-9
    assert result.plans >= result.episode_s * rates["action_rate_hz"] / 2 - 1
    assert (tmp_path / "sheet.png").stat().st_size > 10_000


def test_an_arm_that_holds_still_fails_for_not_reaching_the_block(exported, tmp_path):
    system = eval_systems({"still": exported.bundle_dir}, ["generated"])[0]
    runner = LockstepRunner(mujoco_robot_config_dict(), system, 8, "<test>", policy=_Still())
    try:
        result = runner.episode(0, 1_000_000, "move_to", tmp_path / "sheet.png")
    finally:
        runner.close()
    assert not result.success and result.failure == "block not reached"
    assert np.linalg.norm(result.outcome["ee_to_target_m"][:2]) > 0.025        # the task's reach radius
    assert result.outcome["target_displacement_m"] == pytest.approx([0, 0, 0], abs=1e-3)


def test_more_actions_per_plan_than_a_plan_holds_execute_the_whole_plan_then_replan(exported, tmp_path):
    """--replan-every 10 with 8-action plans: each plan's 8, then the next plan (as sim-demos --policy does)."""
    system = eval_systems({"still": exported.bundle_dir}, ["generated"])[0]
    runner = LockstepRunner(mujoco_robot_config_dict(), system, 10, "<test>", policy=_Still())
    try:
        result = runner.episode(0, 1_000_000, "move_to", None)
    finally:
        runner.close()
    assert result.plans == math.ceil(result.time_limit_s * 10 / 8)          # 50 actions at 10 Hz: 7 plans


def test_a_realtime_episode_says_why_from_the_simulators_report():
    from edgeact.runtime.sim_eval import LATE, STALL, realtime_result
    from edgeact.runtime.telemetry import TimingStats

    episode = {"seed": 1, "template": "push_left", "instruction": "push the red block to the left", "time_limit_s": 9.0}
    end = {"target_displacement_m": [0.0, 0.02, 0.0], "ee_to_target_m": [0.0, 0.03, 0.05],
           "max_other_displacement_m": 0.0, "failure": "pushed short"}

    def result(success, first_success_s, **changes):
        task = {"episode": episode, "success": success, "first_success_s": first_success_s,
                "outcome": {**end, **changes}}
        return realtime_result("s", 0, task, TimingStats(100.0), "duration")

    assert result(False, None).failure == "pushed short"
    # A success on the way counts, whatever the end state; one seen only after the limit does not.
    assert result(False, 3.0).success and result(False, 3.0).failure is None
    late = result(True, 9.4, target_displacement_m=[0.0, 0.06, 0.0], failure=None)
    assert not late.success and late.failure == LATE
    # A loop that stalled (the watchdog put the robot safe) is said to have, not counted as the policy's miss.
    task = {"episode": episode, "success": False, "first_success_s": None, "outcome": end}
    stalled = realtime_result("s", 0, task, TimingStats(100.0), "stall")
    assert not stalled.success and stalled.failure == STALL and stalled.stop == "stall"
    task["first_success_s"] = 2.0      # a success before the stall still counts
    assert realtime_result("s", 0, task, TimingStats(100.0), "stall").success


class _Still:
    """Every action zero: the arm holds its start."""

    def infer(self, rgb, instruction, depth_m=None):
        chunk = np.zeros((8, 7))
        return SimpleNamespace(actions=chunk, actions_normalized=chunk, trace_px=None, decode_steps=0)

    def close(self) -> None:
        pass


class _StillForgetting(_Still):
    """_Still that counts the evaluation's forget_draft calls and the plans between them."""

    def __init__(self):
        self.log: list[str] = []

    def infer(self, rgb, instruction, depth_m=None):
        self.log.append("plan")
        return super().infer(rgb, instruction, depth_m)

    def forget_draft(self) -> None:
        self.log.append("forget")


def test_lockstep_policies_draft_as_the_config_says_and_forget_each_episode(exported, tmp_path):
    system = eval_systems({"tiny": exported.bundle_dir}, ["generated"])[0]
    for policy_section, expected in (({}, DEFAULT_DRAFT_TOKENS), ({"type": "bundle", "draft_tokens": 5}, 5)):
        runner = LockstepRunner({**mujoco_robot_config_dict(), **({"policy": policy_section} if policy_section else {})},
                                system, 8, "<test>")
        try:
            assert runner.policy.program.draft_tokens == expected
        finally:
            runner.close()
    still = _StillForgetting()
    runner = LockstepRunner(mujoco_robot_config_dict(), system, 8, "<test>", policy=still)
    try:
        for index in range(2):
            runner.episode(index, 1_000_000 + index, "move_to", None)
    finally:
        runner.close()
    # Each episode starts with a forget, before its first plan: an earlier episode's answers are another scene's.
    starts = [i for i, entry in enumerate(still.log) if entry == "forget"]
    assert len(starts) == 2 and starts[0] == 0 and still.log[starts[1] - 1] == "plan" and still.log[-1] == "plan"


class _CountingPlans:
    """Plan k (from 0) predicts k in every dimension of its 8 actions."""

    def __init__(self):
        self.plans = 0

    def infer(self, rgb, instruction, depth_m=None):
        chunk = np.full((8, 7), float(self.plans))
        self.plans += 1
        return SimpleNamespace(actions=chunk, actions_normalized=chunk / 10, trace_px=None, decode_steps=0)

    def close(self) -> None:
        pass


class _Recording:
    """Stands in for the simulator's ActionExecutor: keeps the actions it is given, moves nothing."""

    executed: list = []

    def __init__(self, world, mapper, config):
        self.commanded_rad = world.joint_positions(mapper.joints)
        _Recording.executed = []

    def execute(self, action):
        _Recording.executed.append(np.asarray(action, dtype=float).copy())


@pytest.mark.parametrize("ensemble", [True, False])
def test_lockstep_executes_each_slots_mean_over_the_plans_with_ensembling(exported, ensemble):
    # Plans every 2 actions, 8 per chunk: slot t was predicted by plans t//2 - 3 .. t//2 (those that exist), so
    # with ensembling (the built-in robot's default) it gets their mean; without, the newest plan's action.
    system = eval_systems({"tiny": exported.bundle_dir}, ["generated"])[0]
    base = mujoco_robot_config_dict()
    assert base["plan"]["ensemble"] is True
    base["plan"]["ensemble"] = ensemble
    runner = LockstepRunner(base, system, 2, "<test>", policy=_CountingPlans())
    runner._executor_type = _Recording
    try:
        result = runner.episode(0, 1_000_000, "move_to", None)
    finally:
        runner.close()
    executed = np.array(_Recording.executed)
    assert not result.success and len(executed) == result.time_limit_s * 10 == 2 * result.plans
    t = np.arange(len(executed))
    expected = np.array([np.mean(np.arange(max(0, s // 2 - 3), s // 2 + 1)) for s in t]) if ensemble else t // 2
    np.testing.assert_allclose(executed, np.repeat(expected[:, None], 7, axis=1))


def test_the_eval_options_ensemble_overrides_the_configs(exported, tmp_path, monkeypatch):
    from edgeact.runtime import sim_eval

    seen = []

    def runner(base, system, replan_every, source, **options):
        seen.append(base["plan"]["ensemble"])
        raise KeyboardInterrupt         # the setting is all this test needs

    monkeypatch.setattr(sim_eval, "LockstepRunner", runner)
    systems = eval_systems({"tiny": exported.bundle_dir}, ["generated"])
    for ensemble in (False, True, None):
        with pytest.raises(KeyboardInterrupt):
            evaluate(mujoco_robot_config_dict(), systems,
                     EvalOptions(episodes=1, out_dir=tmp_path, timing="lockstep", sheets=0, ensemble=ensemble))
    assert seen == [False, True, True]      # None: the config's, which is on for the built-in robot
    with pytest.raises(ConfigError, match="ensemble: true, false or null"):
        EvalOptions(episodes=1, out_dir=tmp_path, ensemble="on")


@pytest.mark.parametrize("policy, draft_tokens, expected", [
    ({"type": "scripted", "chunk_size": 8}, None, 16),     # the built-in robot's: the bundle policy's default
    ({"type": "scripted", "chunk_size": 8}, 0, 0),
    ({"type": "bundle", "path": "set-by-eval", "draft_tokens": 4}, None, 4),
    ({"type": "bundle", "path": "set-by-eval", "draft_tokens": 4}, 0, 0),
    (None, 7, 7),
], ids=["scripted, the config's", "scripted, off", "bundle, the config's", "bundle, off", "no policy, 7"])
def test_the_eval_options_draft_tokens_override_the_configs_for_every_system(exported, tmp_path, monkeypatch,
                                                                           policy, draft_tokens, expected):
    from edgeact.runtime import sim_eval
    from edgeact.runtime.robot_config import robot_config_from_dict

    seen = []

    class Seeing(_Instant):     # the policy config the runner builds its policy from
        def __init__(self, base, system, replan_every, source, **options):
            super().__init__(base, system, replan_every, source, **options)
            seen.append(robot_config_from_dict(system_config_dict(base, system), source=source).policy.draft_tokens)

    monkeypatch.setattr(sim_eval, "LockstepRunner", Seeing)
    systems = eval_systems({"tiny": exported.bundle_dir}, ["generated"])
    base = {**mujoco_robot_config_dict(), "policy": policy}
    report = evaluate(base, systems, EvalOptions(episodes=1, out_dir=tmp_path, timing="lockstep", sheets=0,
                                                 draft_tokens=draft_tokens))
    assert seen == [expected]
    assert [row["draft_tokens"] for row in report.rows()] == [expected]     # what ran, in the report
    data = json.loads((tmp_path / "eval.json").read_text())
    assert [row["draft_tokens"] for row in data["systems"]] == [expected]
    assert data["options"]["draft_tokens"] == draft_tokens


@pytest.mark.parametrize("bad", [-1, True, 1.5])
def test_the_draft_tokens_option_is_an_integer_from_0(tmp_path, bad):
    with pytest.raises(ConfigError, match=r"--draft-tokens: an integer >= 0 \(0 turns drafting off"):
        EvalOptions(episodes=1, out_dir=tmp_path, draft_tokens=bad)


class _SteeredReplay(_ReplayExpert):
    """The replaying stand-in, keeping the trace each plan was steered with."""

    def __init__(self, actions: np.ndarray):
        super().__init__(actions)
        self.traces = []

    def infer(self, rgb, instruction, depth_m=None, trace=None):
        self.traces.append(trace)
        return super().infer(rgb, instruction, depth_m)


def test_the_expert_trace_is_the_experts_plan_from_the_arms_pose(exported, tmp_path):
    # --trace expert: at the start, the steered trace is the one the demonstrations record for the expert's
    # own rollout (within a few trace units of 256: it is the plan from the commanded pose, which the executed
    # motion follows with a small lag), and every plan of the episode gets one.
    from edgeact.drivers.cameras.mujoco_camera import MujocoRgbdRenderer
    from edgeact.drivers.sim.demos import CAMERA, OPTICAL_SITE, DemoConfig, future_trace
    from edgeact.drivers.sim.expert import run_expert, runtime_action_mapper
    from edgeact.drivers.sim.mujoco_robot import MujocoWorld
    from edgeact.drivers.sim.task import sample_episode

    seed, template = 1_000_002, "push_right"
    mapper, _ = runtime_action_mapper()
    world = MujocoWorld()
    rollout = run_expert(world, sample_episode(seed, template), mapper)
    renderer = MujocoRgbdRenderer(world, CAMERA, *EVAL_CAMERA_PX)
    try:
        recorded = future_trace(rollout.ee_positions_m, 0, DemoConfig().trace_horizon_actions,
                                world.site_pose(OPTICAL_SITE), renderer.intrinsics)
    finally:
        renderer.close()
    system = eval_systems({"expert": exported.bundle_dir}, ["generated"])[0]
    policy = _SteeredReplay(rollout.actions)
    runner = LockstepRunner(mujoco_robot_config_dict(), system, 2, "<test>", policy=policy, trace="expert")
    try:
        result = runner.episode(0, seed, template, None)
    finally:
        runner.close()
    assert result.success and len(policy.traces) == result.plans
    first = np.asarray(policy.traces[0])
    assert first.shape == recorded.shape and np.abs(first - recorded).max() <= 4
    assert all(t is not None and len(t) >= 1 for t in policy.traces)
    # Along the way too: each plan's trace ends where the expert's own path is 8 actions later.
    renderer = MujocoRgbdRenderer(world, CAMERA, *EVAL_CAMERA_PX)
    try:
        for plan, trace in enumerate(policy.traces):
            ahead = future_trace(rollout.ee_positions_m, 2 * plan, DemoConfig().trace_horizon_actions,
                                 world.site_pose(OPTICAL_SITE), renderer.intrinsics)
            assert np.abs(np.asarray(trace)[-1] - ahead[-1]).max() <= 8, (plan, trace, ahead.tolist())
    finally:
        renderer.close()


class _StrayingSteered(_ReplayExpert):
    """The expert's actions going the other way sideways (dy negated), answering with the trace it is steered with
    (in pixels of the evaluation's camera, marked as given: a steered plan)."""

    def infer(self, rgb, instruction, depth_m=None, trace=None):
        chunk = super().infer(rgb, instruction, depth_m).actions.copy()
        chunk[:, 1] *= -1.0
        return SimpleNamespace(actions=chunk, actions_normalized=np.clip(chunk, -1, 1), decode_steps=0,
                               trace_forced=trace is not None,
                               trace_px=None if trace is None else trace_to_pixels(np.asarray(trace), *EVAL_CAMERA_PX))


@pytest.mark.parametrize("seed, template", [(1_000_001, "push_left"), (1_000_000, "move_to")])
def test_a_steered_trace_is_followed_where_the_actions_stray(exported, seed, template):
    # plan.follow_trace "steered" (the built-in robot's): actions that go the wrong way sideways, steered by the
    # expert's trace, still do the task, their translations moved onto the trace's rays; without it they fail.
    from edgeact.drivers.sim.expert import run_expert, runtime_action_mapper
    from edgeact.drivers.sim.mujoco_robot import MujocoWorld
    from edgeact.drivers.sim.task import sample_episode

    mapper, _ = runtime_action_mapper()
    rollout = run_expert(MujocoWorld(), sample_episode(seed, template), mapper)
    system = eval_systems({"expert": exported.bundle_dir}, ["generated"])[0]
    outcomes = {}
    for follow in ("never", "steered"):
        base = mujoco_robot_config_dict()
        base["plan"]["follow_trace"] = follow
        runner = LockstepRunner(base, system, 2, "<test>", policy=_StrayingSteered(rollout.actions), trace="expert")
        try:
            result = runner.episode(0, seed, template, None)
        finally:
            runner.close()
        outcomes[follow] = (result.success, runner.follower.followed if runner.follower else 0, result.plans)
    assert outcomes["never"][:2] == (False, 0)
    success, followed, plans = outcomes["steered"]
    assert success and followed >= plans - 1     # every plan but a last one-point trace (the hand there) followed


def test_lockstep_evaluation_of_two_systems_on_the_same_episodes(with_depth, tmp_path):
    systems = eval_systems({"tiny": with_depth}, ["generated", "forced"])
    # Without drafting (which the policy config turns on by default): one decoder call per choice.
    options = EvalOptions(episodes=2, out_dir=tmp_path, timing="lockstep", replan_every=8, sheets=1, draft_tokens=0)
    seen = []
    report = evaluate(mujoco_robot_config_dict(), systems, options, lambda name, i, r: seen.append((name, i)))
    assert seen == [(s.name, i) for s in systems for i in range(2)]
    by_system = {s.name: [e for e in report.episodes if e.system == s.name] for s in systems}
    generated, forced = by_system.values()
    assert [(e.seed, e.template) for e in generated] == [(e.seed, e.template) for e in forced]
    # Forced depth: the 100 depth codes come from the sensor, not from 100 decoder steps.
    assert np.mean([e.decode_steps_mean for e in forced]) < np.mean([e.decode_steps_mean for e in generated]) - 90
    rows = report.rows()
    assert [r["episodes"] for r in rows] == [2, 2] and all(0 <= r["success_rate"] <= 1 for r in rows)
    assert [r["action_decoding"] for r in rows] == ["median", "median"]
    assert [r["draft_tokens"] for r in rows] == [0, 0]
    assert [r["follow_trace"] for r in rows] == ["steered", "steered"]    # the built-in robot's
    # Each failed episode says why, from its end state; the rows count the reasons.
    for e in report.episodes:
        assert (e.failure is None) == e.success and set(e.outcome) >= {"target_displacement_m", "ee_to_target_m"}
    assert [sum(r["failures"].values()) for r in rows] == [sum(not e.success for e in by_system[s.name])
                                                           for s in systems]
    data = json.loads((tmp_path / "eval.json").read_text())      # written as the episodes finish
    assert data["schema"] == "edgeact.eval/1" and len(data["episodes"]) == 4
    assert data["device"]["summary"] == read_device_info().summary()        # the machine the timings are from
    assert [r["draft_tokens"] for r in data["systems"]] == [0, 0]
    assert [e["outcome"] for e in data["episodes"]] == [e.outcome for e in report.episodes]
    sheets = sorted(p.name for p in (tmp_path / "sheets").iterdir())
    assert sheets == ["tiny-forced-depth_000.png", "tiny-generated-depth_000.png"]


def test_the_eval_command_offers_the_trace_sources():
    import argparse

    from edgeact.runtime import commands_eval
    from edgeact.runtime.sim_eval import TRACE_SOURCES

    parser = argparse.ArgumentParser()
    commands_eval.register(parser.add_subparsers())
    assert parser.parse_args(["eval"]).trace == "model"
    for source in TRACE_SOURCES:       # the CLI's literal choices are the module's
        assert parser.parse_args(["eval", "--trace", source]).trace == source


def test_the_eval_command_takes_the_draft_tokens_for_every_system(tmp_path, monkeypatch, capsys):
    import argparse

    from edgeact.runtime import commands_eval, sim_eval
    from edgeact.runtime.cli import main
    from tests.runtime.test_bundle import write_tiny_bundle

    parser = argparse.ArgumentParser()
    commands_eval.register(parser.add_subparsers())
    assert parser.parse_args(["eval"]).draft_tokens is None       # the config's
    assert parser.parse_args(["eval", "--draft-tokens", "0"]).draft_tokens == 0
    monkeypatch.setattr(sim_eval, "LockstepRunner", _Instant)
    bundle, out = write_tiny_bundle(tmp_path / "b"), tmp_path / "eval"
    args = ["eval", "--bundle", f"tiny={bundle}", "--depth", "generated", "--timing", "lockstep", "--episodes", "1",
            "--sheets", "0", "--out", str(out)]
    assert main([*args, "--draft-tokens", "0"]) == 0
    said = capsys.readouterr().out
    assert "decode calls/plan" in said
    assert "results: " in said and "sheets:" not in said        # --sheets 0: no sheets folder to point at
    data = json.loads((out / "eval.json").read_text())
    assert data["options"]["draft_tokens"] == 0 and [r["draft_tokens"] for r in data["systems"]] == [0]
    assert main([*args, "--draft-tokens", "-1"]) == 2
    assert "--draft-tokens: an integer >= 0 (0 turns drafting off" in " ".join(capsys.readouterr().err.split())


def test_the_eval_command_sets_how_every_system_follows_its_trace(tmp_path, monkeypatch, capsys):
    import argparse

    from edgeact.runtime import commands_eval, sim_eval
    from edgeact.runtime.cli import main
    from edgeact.runtime.trace_follow import FOLLOW_TRACE
    from tests.runtime.test_bundle import write_tiny_bundle

    parser = argparse.ArgumentParser()
    commands_eval.register(parser.add_subparsers())
    assert parser.parse_args(["eval"]).follow_trace is None       # the config's
    for when in FOLLOW_TRACE:           # the CLI's literal choices are the module's
        assert parser.parse_args(["eval", "--follow-trace", when]).follow_trace == when
    monkeypatch.setattr(sim_eval, "LockstepRunner", _Instant)
    bundle, out = write_tiny_bundle(tmp_path / "b"), tmp_path / "eval"
    args = ["eval", "--bundle", f"tiny={bundle}", "--depth", "generated", "--timing", "lockstep", "--episodes", "1",
            "--sheets", "0", "--out", str(out)]
    assert main([*args, "--follow-trace", "always"]) == 0
    assert "trace followed" in capsys.readouterr().out
    data = json.loads((out / "eval.json").read_text())
    assert data["options"]["follow_trace"] == "always" and [r["follow_trace"] for r in data["systems"]] == ["always"]
    assert main(args) == 0 and "trace followed" not in capsys.readouterr().out    # steered, the model's own trace
    with pytest.raises(ConfigError, match="--follow-trace 'sometimes' unknown; use one of never, steered, always"):
        EvalOptions(episodes=1, out_dir=tmp_path, follow_trace="sometimes")


def test_options_are_checked():
    with pytest.raises(ConfigError, match="--timing"):
        EvalOptions(episodes=1, out_dir=".", timing="fast")
    with pytest.raises(ConfigError, match="--episodes"):
        EvalOptions(episodes=0, out_dir=".")
    with pytest.raises(ConfigError, match="--trace expert .* add --timing lockstep"):
        EvalOptions(episodes=1, out_dir=".", trace="expert")
    with pytest.raises(ConfigError, match="--trace 'oracle' unknown; use one of model, expert"):
        EvalOptions(episodes=1, out_dir=".", timing="lockstep", trace="oracle")


def test_a_realtime_episode_runs_the_loop_and_reads_the_simulators_verdict(exported, tmp_path):
    systems = eval_systems({"tiny": exported.bundle_dir}, ["generated"])
    options = EvalOptions(episodes=1, out_dir=tmp_path, timing="realtime", sheets=1)
    report = evaluate(mujoco_robot_config_dict(), systems, options)
    (episode,) = report.episodes
    assert (episode.seed, episode.template, episode.time_limit_s) == (options.seed, "move_to", 5.0)
    assert episode.stop == "duration" and episode.plans >= 1
    # The depth codes are generated: 100 choices, which the robot's policy (drafting from its last answer by
    # default) settles in far fewer decoder calls from its second plan on.
    assert 0 < episode.decode_steps_mean < 100
    assert 50 < episode.control_hz <= 101 and episode.period_error_p99_ms is not None
    assert episode.success == (episode.episode_s < episode.time_limit_s)
    assert episode.outcome is not None and (episode.failure is None) == episode.success
    assert (tmp_path / "sheets" / "tiny-generated-depth_000.png").read_bytes()[:4] == b"\x89PNG"


def test_a_bundle_that_failed_verification_is_evaluated_only_when_asked(tmp_path):
    from edgeact.runtime.errors import EdgeactError
    from tests.runtime.test_bundle import write_tiny_bundle

    path = write_tiny_bundle(tmp_path / "bad", verification="failed")
    with pytest.raises(EdgeactError, match="verification failed"):
        eval_systems({"int4": path}, ["generated"])
    (system,) = eval_systems({"int4": path}, ["generated"], allow_unverified=True)
    assert system.allow_unverified
    assert system_config_dict(mujoco_robot_config_dict(), system)["policy"]["allow_unverified"] is True


def test_an_interrupted_evaluation_keeps_the_episodes_it_finished(exported, tmp_path, monkeypatch):
    from edgeact.runtime import sim_eval

    class Interrupting(_ReplayExpert):
        first = None

        def infer(self, rgb, instruction, depth_m=None):
            self.first = self.first or instruction
            if instruction != self.first:       # the second episode (another template): Ctrl-C
                raise KeyboardInterrupt
            return super().infer(rgb, instruction, depth_m)

    monkeypatch.setattr(sim_eval, "LockstepRunner",
                        lambda base, system, replan_every, source, **options: LockstepRunner(
                            base, system, 8, source, policy=Interrupting(np.zeros((1, 7)))))
    systems = eval_systems({"tiny": exported.bundle_dir}, ["generated"])
    options = EvalOptions(episodes=3, out_dir=tmp_path, timing="lockstep", sheets=0)
    with pytest.raises(KeyboardInterrupt):
        evaluate(mujoco_robot_config_dict(), systems, options)
    data = json.loads((tmp_path / "eval.json").read_text())
    assert [e["index"] for e in data["episodes"]] == [0]
    assert data["interrupted"] and not data["complete"]


class _Instant:
    """A stand-in runner whose episodes end at once (a failure), for what evaluate does around them."""

    interrupt_at: int | None = None     # the episode index at which Ctrl-C is pressed

    def __init__(self, base, system, replan_every, source, **options):
        self.system = system.name

    def episode(self, index, seed, template, sheet):
        if index == self.interrupt_at:
            raise KeyboardInterrupt
        return EpisodeResult(self.system, index, seed, template, template, False, 5.0, 5.0, 1, None, None, None, None)

    def close(self) -> None:
        pass


def test_repeated_depth_sources_bundle_names_and_system_names_are_refused(tmp_path, capsys):
    from edgeact.runtime.cli import main
    from tests.runtime.test_bundle import write_tiny_bundle

    path = write_tiny_bundle(tmp_path / "b")
    with pytest.raises(ConfigError, match=r"--depth generated is given twice \(generated forced generated\); name "
                                          r"each depth source once, e.g. --depth generated forced$"):
        eval_systems({"fp32": path}, ["generated", "forced", "generated"])
    other = tmp_path / "other"
    assert main(["eval", "--bundle", f"int8={path}", "--bundle", f"int8={other}", "--depth", "generated",
                 "--out", str(tmp_path / "eval")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"--bundle int8= is given twice ({path} and {other}); give each bundle its own NAME, " \
           f"e.g. --bundle int8-2={other}" in err
    assert not (tmp_path / "eval").exists()
    (system,) = eval_systems({"fp32": path}, ["generated"])
    with pytest.raises(ConfigError, match="system 'fp32 / generated depth' appears twice in the evaluation"):
        EvalReport([system, system], EvalOptions(episodes=1, out_dir=tmp_path))
    # Names alike but for punctuation would write their episode sheets to the same files.
    a, b = (eval_systems({name: path}, ["generated"])[0] for name in ("int8-a", "int8_a"))
    with pytest.raises(ConfigError, match=r"systems 'int8-a / generated depth' and 'int8_a / generated depth' differ "
                                          r"only in punctuation, and their episode sheets would share file names "
                                          r"\(int8-a-generated-depth_NNN.png\)"):
        EvalReport([a, b], EvalOptions(episodes=1, out_dir=tmp_path))


def test_the_report_replaces_an_older_one_at_once_and_says_when_it_is_complete(tmp_path, monkeypatch):
    from edgeact.runtime import sim_eval
    from tests.runtime.test_bundle import write_tiny_bundle

    report_path = tmp_path / "eval" / "eval.json"
    report_path.parent.mkdir()
    report_path.write_text(json.dumps({"schema": "edgeact.eval/1", "episodes": [{"system": "old / generated depth"}]}))
    seen = []

    class Reading(_Instant):
        def episode(self, index, seed, template, sheet):
            seen.append(json.loads(report_path.read_text()))      # what eval.json says while the episode runs
            return super().episode(index, seed, template, sheet)

    monkeypatch.setattr(sim_eval, "LockstepRunner", Reading)
    systems = eval_systems({"new": write_tiny_bundle(tmp_path / "b")}, ["generated"])
    report = evaluate(mujoco_robot_config_dict(), systems,
                      EvalOptions(episodes=2, out_dir=report_path.parent, timing="lockstep", sheets=0))
    assert [(d["complete"], d["interrupted"], len(d["episodes"])) for d in seen] == [(False, False, 0),
                                                                                     (False, False, 1)]
    data = json.loads(report_path.read_text())
    assert report.complete and data["complete"] and not data["interrupted"] and len(data["episodes"]) == 2
    assert [p.name for p in report_path.parent.iterdir()] == ["eval.json"]       # no temporary left


@pytest.mark.parametrize("interrupt_at, says", [
    (0, "interrupted: no episode finished; {} says so (\"interrupted\": true, no episodes)"),
    (1, "interrupted: 1 episode finished; they are in {} (marked \"interrupted\": true)"),
    (3, "interrupted: 3 episodes finished; they are in {} (marked \"interrupted\": true)"),
], ids=["before the first", "after one", "after three"])
def test_an_interrupted_eval_marks_its_report_and_says_how_many_episodes_finished(tmp_path, monkeypatch, capsys,
                                                                                  interrupt_at, says):
    from edgeact.runtime import sim_eval
    from edgeact.runtime.cli import main
    from tests.runtime.test_bundle import write_tiny_bundle

    out = tmp_path / "eval"
    out.mkdir()
    (out / "eval.json").write_text(json.dumps({"schema": "edgeact.eval/1", "episodes": [{"system": "old"}] * 5}))
    monkeypatch.setattr(sim_eval, "LockstepRunner", type("Stopping", (_Instant,), {"interrupt_at": interrupt_at}))
    bundle = write_tiny_bundle(tmp_path / "b")
    assert main(["eval", "--bundle", f"new={bundle}", "--depth", "generated", "--timing", "lockstep",
                 "--episodes", "20", "--sheets", "0", "--out", str(out)]) == 130
    assert says.format(out / "eval.json") in " ".join(capsys.readouterr().out.split())
    data = json.loads((out / "eval.json").read_text())
    assert data["interrupted"] and not data["complete"] and data["options"]["episodes"] == 20
    assert [(e["system"], e["index"]) for e in data["episodes"]] == [("new / generated depth", i)
                                                                     for i in range(interrupt_at)]


def test_sim_demos_with_a_bundle_records_its_states_labelled_by_the_expert(with_depth, tmp_path, capsys):
    # DAgger's recording with a real bundle policy: it drives (forced depth from the camera), the expert labels.
    from edgeact.drivers.sim.demos import load_demos
    from edgeact.runtime.cli import main

    out = tmp_path / "dagger"
    assert main(["sim-demos", "--policy", str(with_depth), "--episodes", "1", "--seed", "7", "--stride", "4",
                 "--replan-every", "4", "--threads", "1", "--out", str(out)]) == 0
    assert "episodes of the policy, labelled by the expert" in capsys.readouterr().out
    data = load_demos(out)
    episode = data.manifest["episodes"][0]
    assert data.manifest["labels"]["policy"] == str(with_depth) and data.manifest["labels"]["replan_every"] == 4
    a = data.arrays()
    assert len(a["rgb"]) == -(-episode["n_actions"] // 4) and a["rgb"].shape[1:] == (120, 160, 3)
    assert np.array_equal(a["step"], np.arange(0, episode["n_actions"], 4))
    assert set(a["instruction"]) == {episode["instruction"]}


def test_an_evaluation_that_fails_marks_its_report_with_the_error_and_says_where_the_episodes_are(
        tmp_path, monkeypatch, capsys):
    # A policy process that dies, a failed teardown, a simulator error: eval.json must not read like a run still
    # going ("complete": false, "interrupted": false); the error propagates after it is written.
    from edgeact.runtime import sim_eval
    from edgeact.runtime.cli import main
    from tests.runtime.test_bundle import write_tiny_bundle

    class Failing(_Instant):
        def episode(self, index, seed, template, sheet):
            if index == 1:
                raise RuntimeError("the policy's process died (exit -9)")
            return super().episode(index, seed, template, sheet)

    monkeypatch.setattr(sim_eval, "LockstepRunner", Failing)
    systems = eval_systems({"new": write_tiny_bundle(tmp_path / "b")}, ["generated"])
    with pytest.raises(RuntimeError, match="process died"):
        evaluate(mujoco_robot_config_dict(), systems,
                 EvalOptions(episodes=3, out_dir=tmp_path / "api", timing="lockstep", sheets=0))
    data = json.loads((tmp_path / "api" / "eval.json").read_text())
    assert data["interrupted"] and not data["complete"] and [e["index"] for e in data["episodes"]] == [0]
    seed = episode_plan(3, EvalOptions(episodes=3, out_dir=tmp_path).seed)[1][0]
    where = f"system 'new / generated depth' (bundle {systems[0].bundle}), episode 1 (seed {seed})"
    assert data["error"] == f"{where}: RuntimeError: the policy's process died (exit -9)"
    out = tmp_path / "cli"
    with pytest.raises(RuntimeError, match="process died"):
        main(["eval", "--bundle", f"new={tmp_path / 'b'}", "--depth", "generated", "--timing", "lockstep",
              "--episodes", "3", "--sheets", "0", "--out", str(out)])
    said = " ".join(capsys.readouterr().out.split())
    assert f"1 episode finished; they are in {out / 'eval.json'} (marked \"interrupted\": true, with the error)" in said
    # A complete run says it had no error.
    monkeypatch.setattr(sim_eval, "LockstepRunner", _Instant)
    evaluate(mujoco_robot_config_dict(), systems,
             EvalOptions(episodes=1, out_dir=tmp_path / "ok", timing="lockstep", sheets=0))
    assert json.loads((tmp_path / "ok" / "eval.json").read_text())["error"] is None


def test_an_error_names_the_system_and_episode_and_a_corrupt_bundle_is_refused_before_any_runs(tmp_path,
                                                                                                 monkeypatch):
    from edgeact.runtime import sim_eval
    from edgeact.runtime.errors import BundleError
    from edgeact.runtime.process_policy import PolicyProcessError
    from tests.runtime.test_bundle import write_tiny_bundle

    class Dying(_Instant):
        def episode(self, index, seed, template, sheet):
            raise PolicyProcessError("policy process (bundle) failed: it exited during a step")

    monkeypatch.setattr(sim_eval, "LockstepRunner", Dying)
    good = write_tiny_bundle(tmp_path / "good")
    systems = eval_systems({"good": good}, ["generated"])
    with pytest.raises(PolicyProcessError, match=r"^system 'good / generated depth' \(bundle .*good\), episode 0 "
                                                 r"\(seed \d+\): policy process \(bundle\) failed"):
        evaluate(mujoco_robot_config_dict(), systems,
                 EvalOptions(episodes=2, out_dir=tmp_path / "eval", timing="lockstep", sheets=0))
    # A file changed in place (its size kept): refused by its checksum up front, named by its --bundle.
    bad = write_tiny_bundle(tmp_path / "bad")
    stage = sorted(bad.rglob("*.onnx"))[0]
    data = bytearray(stage.read_bytes())
    data[-1] ^= 0xFF
    stage.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=rf"^--bundle bad={bad}: .*sha256"):
        eval_systems({"good": good, "bad": bad}, ["generated"])


def test_a_ctrl_c_while_a_sheet_is_drawn_keeps_the_finished_episode(tmp_path):
    from edgeact.runtime.sim_eval import InterruptedAfterEpisode, _draw_sheet

    finished = EpisodeResult("s", 4, 1, "push_left", "push the red block to the left", True, 3.0, 9.0, 10, 1.0,
                             20.0, 100.0, 0.2)

    def draw():
        raise KeyboardInterrupt
    with pytest.raises(InterruptedAfterEpisode, match="episode 4 finished; Ctrl-C while its sheet was drawn") as late:
        _draw_sheet(finished, draw)
    assert late.value.result is finished and finished.sheet is None
    _draw_sheet(finished, lambda: tmp_path / "s_004.png")
    assert finished.sheet == str(tmp_path / "s_004.png")


def test_realtime_evaluation_refuses_a_simulator_in_the_loops_process(tmp_path):
    from edgeact.runtime.sim_eval import RealtimeRunner
    from tests.runtime.test_bundle import write_tiny_bundle

    config = mujoco_robot_config_dict()
    config["robot"]["sim_process"] = False
    (system,) = eval_systems({"tiny": write_tiny_bundle(tmp_path / "b")}, ["generated"])
    with pytest.raises(ConfigError, match="robot.sim_process is false: real-time evaluation reads each episode's task "
                                          "from the simulator's own process; remove robot.sim_process, or evaluate "
                                          "with --timing lockstep"):
        RealtimeRunner(config, system, "<test>")


def test_lockstep_builds_the_policy_from_the_configs_whole_policy_section(exported):
    # Realtime builds the policy with BundlePolicyConfig.make_policy: lockstep must run the same policy, every
    # option of the config's policy section included (here: actions per answer, a shorter prefill chunk).
    from edgeact.runtime.bundle_policy import BundlePolicy

    system = eval_systems({"tiny": exported.bundle_dir}, ["generated"])[0]
    assert exported.bundle.manifest.grammar.get("n_actions", 1) != 2      # the bundle's own would not do
    section = {"type": "bundle", "path": "set-by-eval", "n_actions": 2, "prefill_chunk": 7, "threads": 1}
    runner = LockstepRunner({**mujoco_robot_config_dict(), "policy": section}, system, 2, "<test>")
    try:
        assert isinstance(runner.policy, BundlePolicy)      # in this process: the world waits for it
        assert runner.policy.grammar.n_actions == 2 and runner.policy.decoder.max_chunk == 7
    finally:
        runner.close()


def test_a_negative_seed_is_refused_before_anything_runs(tmp_path, capsys):
    from edgeact.runtime.cli import main
    from tests.runtime.test_bundle import write_tiny_bundle

    with pytest.raises(ConfigError, match=r"^--seed must be an integer >= 0, got -5"):
        EvalOptions(episodes=1, out_dir=tmp_path, seed=-5)
    out = tmp_path / "eval"
    assert main(["eval", "--bundle", f"tiny={write_tiny_bundle(tmp_path / 'b')}", "--depth", "generated",
                 "--timing", "lockstep", "--seed", "-5", "--out", str(out)]) == 2
    assert "edgeact eval: error: --seed must be an integer >= 0, got -5" in " ".join(capsys.readouterr().err.split())
    assert not out.exists()


class _HoldThenExpert:
    """Holds still for `hold` plans, then follows the scripted expert from the arm's pose (`runner`'s world)."""

    runner = None

    def __init__(self, seed: int, hold: int):
        self.seed, self.hold, self.plans = seed, hold, 0

    def infer(self, rgb, instruction, depth_m=None):
        from edgeact.drivers.sim.expert import ExpertSteering, hold_action
        from edgeact.drivers.sim.task import sample_episode

        runner = self.runner
        self.plans += 1
        if self.plans == 1:
            self.steer = ExpertSteering(sample_episode(self.seed, "move_to"), runner.expert)
        if self.plans <= self.hold:
            chunk = np.tile(hold_action(), (8, 1))
        else:
            chunk = self.steer.chunk(runner.mapper, runner.world.joint_positions(runner.mapper.joints), 8)[1]
        return SimpleNamespace(actions=chunk, actions_normalized=chunk, trace_px=None, decode_steps=1)

    def close(self) -> None:
        pass


def test_a_move_to_over_the_block_at_the_end_but_not_for_the_dwell_fails_and_says_so(tmp_path):
    # The arm arrives over the block about 0.3 s before the limit: the predicate holds at the end, but not for
    # TaskConfig.move_dwell_s (0.5 s). A failure, and the failure table must count it.
    from edgeact.runtime.sim_eval import EvalSystem

    seed, policy = 1_000_000, _HoldThenExpert(1_000_000, hold=21)      # 21 plans of 2 actions: 4.2 s held
    system = EvalSystem("hold-then-expert", tmp_path / "unused", "fp32", "generated")
    base = mujoco_robot_config_dict()
    base["plan"]["ensemble"] = False
    runner = policy.runner = LockstepRunner(base, system, 2, "<test>", policy=policy)
    try:
        result = runner.episode(0, seed, "move_to", None)
    finally:
        runner.close()
    assert not result.success and result.episode_s == result.time_limit_s
    assert result.failure == result.outcome["failure"] == "over the block, not for 0.5 s"
    report = EvalReport([system], EvalOptions(episodes=1, out_dir=tmp_path), [result])
    assert report.rows()[0]["failures"] == {"over the block, not for 0.5 s": 1}


def test_a_realtime_move_to_over_the_block_not_long_enough_is_no_late_success():
    # The simulator's tracker never judged it a success (first_success_s None), yet the end state's predicate
    # holds: "succeeded after the time limit" would be false.
    from edgeact.runtime.sim_eval import LATE, realtime_result
    from edgeact.runtime.telemetry import TimingStats

    def result(template, first_success_s, failure):
        episode = {"seed": 1, "template": template, "instruction": "x", "time_limit_s": 5.0}
        task = {"episode": episode, "success": failure is None, "first_success_s": first_success_s,
                "outcome": {"target_displacement_m": [0.0, 0.0, 0.0], "ee_to_target_m": [0.0, 0.0, 0.05],
                            "max_other_displacement_m": 0.0, "failure": failure}}
        return realtime_result("s", 0, task, TimingStats(100.0), "duration")

    assert result("move_to", None, None).failure == "over the block, not for 0.5 s"
    assert result("move_to", 5.3, None).failure == LATE             # held long enough, after the limit
    assert result("push_left", 5.3, None).failure == LATE
    assert result("move_to", None, "block not reached").failure == "block not reached"


def test_a_ctrl_c_during_a_finished_episodes_teardown_keeps_that_episode(tmp_path, monkeypatch):
    # The task was read before the teardown: the episode is complete. It counts, then the evaluation stops.
    from edgeact.drivers.sim.task import sample_episode
    from edgeact.runtime import loop
    from edgeact.runtime.sim_eval import EvalInterrupted
    from tests.runtime.test_bundle import write_tiny_bundle

    def run_robot(config, duration_s, subscribers):
        episode = sample_episode(config.robot.task.seed, config.robot.task.template)
        report = {"episode": episode.to_dict(), "success": False, "first_success_s": None, "sim_time_s": duration_s,
                  "outcome": {"target_displacement_m": [0.0, 0.0, 0.0], "ee_to_target_m": [0.1, 0.0, 0.05],
                              "max_other_displacement_m": 0.0, "failure": "block not reached"}}
        return SimpleNamespace(reason="duration", detail="", error=None, teardown_error=None, task=report,
                               interrupted_late=True, late_signal=signal.SIGINT)

    monkeypatch.setattr(loop, "run_robot", run_robot)
    systems = eval_systems({"tiny": write_tiny_bundle(tmp_path / "b")}, ["generated"])
    with pytest.raises(EvalInterrupted) as stopped:
        evaluate(mujoco_robot_config_dict(), systems, EvalOptions(episodes=3, out_dir=tmp_path / "eval", sheets=0))
    assert [e.index for e in stopped.value.report.episodes] == [0]
    data = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert data["interrupted"] and not data["complete"] and [e["index"] for e in data["episodes"]] == [0]
    assert data["episodes"][0]["outcome"]["failure"] == "block not reached"


@pytest.mark.parametrize("reason, detail, late", [("interrupt", "SIGTERM", None), ("duration", "", signal.SIGTERM),
                                                  ("interrupt", "Ctrl-C", None)],
                         ids=["during the episode", "during its teardown", "Ctrl-C"])
def test_a_sigterm_in_a_realtime_episode_exits_143(tmp_path, monkeypatch, capsys, reason, detail, late):
    """The loop caught SIGTERM and the episode raised a plain KeyboardInterrupt: the eval exited 130 as for Ctrl-C."""
    from edgeact.drivers.sim.task import sample_episode
    from edgeact.runtime import loop
    from edgeact.runtime.cli import main
    from edgeact.runtime.loop import RunResult
    from tests.runtime.test_bundle import write_tiny_bundle

    def run_robot(config, duration_s, subscribers):
        episode = sample_episode(config.robot.task.seed, config.robot.task.template)
        report = {"episode": episode.to_dict(), "success": False, "first_success_s": None, "sim_time_s": 1.0,
                  "outcome": {"target_displacement_m": [0.0, 0.0, 0.0], "ee_to_target_m": [0.1, 0.0, 0.05],
                              "max_other_displacement_m": 0.0, "failure": "block not reached"}}
        return RunResult(reason, detail, 1.0, 100, 3, 0, 0, None, "", task=report, interrupted_late=late is not None,
                         late_signal=late)

    monkeypatch.setattr(loop, "run_robot", run_robot)
    bundle = write_tiny_bundle(tmp_path / "b")
    status = main(["eval", "--bundle", f"new={bundle}", "--depth", "generated", "--timing", "realtime",
                   "--episodes", "3", "--sheets", "0", "--out", str(tmp_path / "eval")])
    assert status == (130 if detail == "Ctrl-C" else 143), capsys.readouterr().out


def test_the_decode_calls_are_a_mean_per_plan_over_the_systems_episodes(tmp_path):
    from edgeact.runtime.sim_eval import EvalSystem

    system = EvalSystem("s", tmp_path, "fp32", "generated")

    def episode(index, plans, decode_steps_mean):
        return EpisodeResult("s", index, index, "move_to", "x", False, 5.0, 5.0, plans, None, decode_steps_mean,
                             None, None)

    report = EvalReport([system], EvalOptions(episodes=3, out_dir=tmp_path),
                        [episode(0, 1, 10.0), episode(1, 3, 2.0), episode(2, 0, None)])
    assert report.rows()[0]["decode_steps_mean"] == pytest.approx((10.0 + 3 * 2.0) / 4)    # not (10 + 2) / 2
    report.episodes = [episode(0, 0, None)]
    assert report.rows()[0]["decode_steps_mean"] is None


def test_a_sigterm_marks_the_eval_interrupted_as_ctrl_c_does(tmp_path, monkeypatch, capsys):
    """`kill` (a scheduler's timeout): eval.json must not read as a run still going."""
    import os
    import signal

    from edgeact.runtime import sim_eval
    from edgeact.runtime.cli import main
    from tests.runtime.test_bundle import write_tiny_bundle

    class Killed(_Instant):
        def episode(self, index, seed, template, sheet):
            if index == 1:
                os.kill(os.getpid(), signal.SIGTERM)
            return super().episode(index, seed, template, sheet)

    monkeypatch.setattr(sim_eval, "LockstepRunner", Killed)
    out = tmp_path / "eval"
    bundle = write_tiny_bundle(tmp_path / "b")
    assert main(["eval", "--bundle", f"new={bundle}", "--depth", "generated", "--timing", "lockstep",
                 "--episodes", "5", "--sheets", "0", "--out", str(out)]) == 143       # 128 + SIGTERM
    data = json.loads((out / "eval.json").read_text())
    assert data["interrupted"] and not data["complete"] and len(data["episodes"]) == 1


def test_an_older_evals_sheets_are_cleared_from_the_same_out(tmp_path, monkeypatch):
    from edgeact.runtime import sim_eval
    from tests.runtime.test_bundle import write_tiny_bundle

    sheets = tmp_path / "eval" / "sheets"
    sheets.mkdir(parents=True)
    (sheets / "old-generated-depth_004.png").write_bytes(b"png")       # an earlier run's episode 4
    (sheets / "notes.png").write_bytes(b"mine")                         # not an episode sheet: kept
    monkeypatch.setattr(sim_eval, "LockstepRunner", _Instant)
    systems = eval_systems({"new": write_tiny_bundle(tmp_path / "b")}, ["generated"])
    evaluate(mujoco_robot_config_dict(), systems, EvalOptions(episodes=1, out_dir=tmp_path / "eval",
                                                              timing="lockstep", sheets=0))
    assert sorted(p.name for p in sheets.iterdir()) == ["notes.png"]
