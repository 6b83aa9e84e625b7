"""DAgger's data: a policy drives the simulated arm, the expert labels every state it visits."""
import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("mujoco", reason="the reference task runs in MuJoCo (pip install mujoco==4.0.0)")
pytest.importorskip("pinocchio", reason="the expert acts through the 'ik' mapper (pip install pin==4.1.0)")

from edgeact.drivers.sim.demos import (DemoConfig, DemoDatasetError, joined_arrays, load_demos,  # noqa: E402
                                       record_demos, record_policy_demos)
from edgeact.drivers.sim.expert import (ActionExecutor, ExpertConfig, ExpertSteering, hold_action,  # noqa: E402
                                        run_expert)
from edgeact.drivers.sim.task import TEMPLATES, reset_world, sample_episode  # noqa: E402
from edgeact.runtime.errors import ConfigError  # noqa: E402
from tests.drivers.test_expert import mapper, world  # noqa: E402,F401  (the simulated world and IK mapper)

pytestmark = pytest.mark.timeout(120)

SMALL = DemoConfig(width=64, height=48, stride_actions=2)


class HoldStill:
    """A policy that never moves the arm; counts its calls."""

    def __init__(self):
        self.calls = []

    def infer(self, rgb, instruction, depth_m=None):
        self.calls.append((rgb.shape, instruction, None if depth_m is None else depth_m.shape))
        return SimpleNamespace(actions=np.tile(hold_action(), (8, 1)))


class Refuses:
    def infer(self, *args, **kwargs):
        raise AssertionError("with expert_mix 1 the policy is never asked")


def test_the_chunk_from_the_start_is_the_experts_first_chunk(world, mapper):
    for seed, template in enumerate(TEMPLATES):
        episode = sample_episode(40 + seed, template)
        rollout = run_expert(world, episode, mapper)
        reset_world(world, episode)
        executor = ActionExecutor(world, mapper, ExpertConfig())
        positions, actions = ExpertSteering(episode, ExpertConfig()).chunk(mapper, executor.commanded_rad, 8)
        assert np.array_equal(actions, rollout.chunk(0))
        assert positions.shape == (9, 3)
        # The positions are the commanded end effector's through the mapper's IK: each action's step, within the
        # few millimetres IK leaves on a 15 mm step.
        assert np.allclose(np.diff(positions, axis=0), actions[:, :3], atol=5e-3)
        assert np.allclose(positions[0], executor.commanded_pose().position_m)


def test_a_still_policys_states_are_labelled_with_the_experts_plan_from_there(tmp_path, world, mapper):
    policy = HoldStill()
    summary = record_policy_demos(tmp_path / "d", policy, episodes=2, seed=40, config=SMALL, source="still")
    data = load_demos(tmp_path / "d")
    a = data.arrays()
    manifest = data.manifest
    # Failed episodes are kept, run to their time limit, the successes are the policy's (none).
    limits = [round(sample_episode(40 + i, t).time_limit_s * 10) for i, t in enumerate(list(TEMPLATES)[:2])]
    assert [e["n_actions"] for e in manifest["episodes"]] == limits
    assert [e["success"] for e in manifest["episodes"]] == [False, False]
    assert summary.successes == {"move_to": [0, 1], "push_left": [0, 1], "push_right": [0, 0]}
    assert summary.samples == sum(limits) // 2 == len(a["rgb"])
    assert manifest["labels"] == {"policy": "still", "replan_every": 2, "expert_mix": 0.0, "reached_m": 0.01}
    # A plan every 2 actions, on the camera's frame and depth, with the episode's instruction.
    assert len(policy.calls) == sum(limits) // 2
    assert policy.calls[0] == ((48, 64, 3), sample_episode(40, "move_to").instruction, (48, 64))
    # The arm never moved, so every sample of an episode carries the expert's first chunk and first trace.
    expert = load_demos(record_demos(tmp_path / "e", episodes=2, seed=40, config=SMALL).out_dir).arrays()
    for episode in (0, 1):
        mine = np.nonzero(a["episode"] == episode)[0]
        first = np.nonzero((expert["episode"] == episode) & (expert["step"] == 0))[0][0]
        assert np.array_equal(a["step"][mine], np.arange(0, 2 * len(mine), 2))
        for i in mine:
            assert np.array_equal(a["actions"][i], expert["actions"][first])
            assert np.abs(a["trace"][i][0] - expert["trace"][first][0]).max() <= 1     # the held arm settles
            assert a["trace_len"][i] == expert["trace_len"][first]
        assert np.abs(a["trace"][mine[0]] - expert["trace"][first]).max() <= 16    # IK's path vs the arm's own
    # The labels' statistics are written as the demos' are.
    assert data.norm_stats["edgeact_sim_reference"]["action"]["mask"] == [True] * 6 + [False]


def test_with_expert_mix_1_the_expert_drives_and_each_label_is_its_next_chunk(tmp_path, world, mapper):
    # With the expert's own 3 mm the labels are exactly its chunks, though each plan executes 2 of them: a
    # waypoint reached between two plans counts as passed (observed), and one out of reach is skipped as the
    # expert's stall rule skips it.
    config = ExpertConfig()
    summary = record_policy_demos(tmp_path / "d", Refuses(), episodes=3, seed=40, config=SMALL, expert_mix=1.0,
                                  reached_m=config.waypoint_tolerance_m)
    assert all(ok == n == 1 for ok, n in summary.successes.values())
    a = load_demos(tmp_path / "d").arrays()
    for episode, template in enumerate(TEMPLATES):
        rollout = run_expert(world, sample_episode(40 + episode, template), mapper)
        for i in np.nonzero(a["episode"] == episode)[0]:
            # As far as the expert's own rollout goes (a move_to is judged after a 0.5 s hover, which the policy
            # run may still be holding for when the expert's rollout has ended).
            step = int(a["step"][i])
            n = max(0, min(len(a["actions"][i]), rollout.n_actions - step))
            assert np.allclose(a["actions"][i][:n], rollout.chunk(step)[:n], atol=1e-6), (template, step)


@pytest.mark.parametrize("seed, template", [(16, "push_left"), (26, "push_right")])
def test_a_waypoint_out_of_reach_is_skipped_as_the_expert_skips_it(tmp_path, world, mapper, seed, template):
    # In these scenes a waypoint is beyond the arm's reach: the expert's stall rule moves on after one step that
    # gets nowhere, and the labels foresee it through the IK. Without that the arm is sent at it for seconds.
    rollout = run_expert(world, sample_episode(seed, template), mapper)
    first = list(TEMPLATES).index(template)
    record_policy_demos(tmp_path / "d", Refuses(), episodes=first + 1, seed=seed - first, config=SMALL,
                        expert_mix=1.0, reached_m=ExpertConfig().waypoint_tolerance_m)
    episode = load_demos(tmp_path / "d").manifest["episodes"][-1]
    assert episode["seed"] == seed and episode["success"]
    assert episode["n_actions"] <= rollout.n_actions


def test_bad_options_are_refused_before_any_work(tmp_path):
    for kwargs, words in (({"replan_every": 0}, "replan_every"), ({"expert_mix": 1.5}, "expert_mix"),
                          ({"reached_m": 0.0}, "reached_m")):
        with pytest.raises(ConfigError, match=words):
            record_policy_demos(tmp_path / "x", HoldStill(), episodes=1, seed=0, config=SMALL, **kwargs)
    with pytest.raises(ConfigError, match="first_chunk_only records the expert's own"):
        record_policy_demos(tmp_path / "x", HoldStill(), episodes=1, seed=0,
                            config=dataclasses.replace(SMALL, first_chunk_only=True))
    assert not (tmp_path / "x").exists()
    with pytest.raises(ConfigError, match="at least 1"):
        record_policy_demos(tmp_path / "y", HoldStill(), episodes=0, seed=0, config=SMALL)



def test_more_actions_per_plan_than_a_plan_holds_execute_the_whole_plan_then_replan(tmp_path):
    """replan_every 10 with 8-action plans replanned at 0, 8, 10, 18, 20, ...: now at 0, 8, 16, ... as eval does."""
    policy = HoldStill()
    record_policy_demos(tmp_path / "d", policy, episodes=1, seed=40, config=SMALL, replan_every=10)
    limit = round(sample_episode(40, "move_to").time_limit_s * 10)
    assert len(policy.calls) == -(-limit // 8)


def test_a_bundle_that_failed_verification_drives_only_when_allowed(tmp_path, tmp_path_factory):
    """DAgger with a quantized bundle that fails the free-running gates (as eval runs it with --allow-unverified);
    the refusal names sim-demos' own flag."""
    import json
    import shutil

    from edgeact.drivers.commands_sim import _policy
    from edgeact.runtime.errors import BundleError
    from tests.runtime.test_decode_program import exported_bundle

    bundle = shutil.copytree(exported_bundle(tmp_path_factory, "D").bundle_dir, tmp_path / "bundle")
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["verification"] = {"status": "failed", "gates": {}, "results": [
        {"gate": "tokens.greedy.action", "passed": False, "agreement": 0.4, "min": 1.0}]}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="pass --allow-unverified to sim-demos"):
        _policy(str(bundle), 1)
    policy = _policy(str(bundle), 1, allow_unverified=True)
    policy.close()


def test_sets_are_joined_with_their_episodes_kept_apart(tmp_path):
    a = record_demos(tmp_path / "a", episodes=2, seed=40, config=SMALL)
    b = record_policy_demos(tmp_path / "b", HoldStill(), episodes=1, seed=90, config=SMALL)
    sets = [load_demos(a.out_dir), load_demos(b.out_dir)]
    joined = joined_arrays(sets)
    first, second = sets[0].arrays(), sets[1].arrays()
    assert len(joined["rgb"]) == a.samples + b.samples
    assert np.array_equal(joined["episode"][:a.samples], first["episode"])
    assert set(joined["episode"][a.samples:].tolist()) == {int(first["episode"].max()) + 1}
    assert np.array_equal(joined["actions"][a.samples:], second["actions"])
    other = record_demos(tmp_path / "c", episodes=1, seed=40, config=DemoConfig(width=80, height=60))
    with pytest.raises(DemoDatasetError, match="one --width and --height"):
        joined_arrays([sets[0], load_demos(other.out_dir)])


def test_the_command_refuses_the_experts_options_with_a_policy(tmp_path):
    import argparse

    from edgeact.drivers import commands_sim

    parser = argparse.ArgumentParser()
    commands_sim.register(parser.add_subparsers())
    for extra in (["--execution-noise", "0.25"], ["--rotation-noise", "0.05"], ["--siblings", "1"],
                  ["--first-chunk"]):
        args = parser.parse_args(["sim-demos", "--policy", str(tmp_path / "bundle"), "--episodes", "1",
                                  "--out", str(tmp_path / "o"), *extra])
        with pytest.raises(ConfigError,
                           match="drop --execution-noise, --rotation-noise, --siblings and --first-chunk"):
            args.handler(args)
    assert not (tmp_path / "o").exists()
