"""The scripted expert solves its task through the runtime's IK mapping; its demonstrations: trace, dataset, CLI."""
import json

import numpy as np
import pytest

pytest.importorskip("mujoco", reason="the reference task runs in MuJoCo (pip install mujoco==4.0.0)")
pytest.importorskip("pinocchio", reason="the expert acts through the 'ik' mapper (pip install pin==4.1.0)")

from edgeact.drivers.sim.expert import ExpertConfig, run_expert, runtime_action_mapper  # noqa: E402
from edgeact.drivers.sim.mujoco_robot import MujocoWorld  # noqa: E402
from edgeact.drivers.sim.task import TEMPLATES, reset_world, sample_episode  # noqa: E402
from edgeact.runtime.action_bins import ActionStats, normalize_actions, unnormalize_actions  # noqa: E402
from edgeact.runtime.control import ChunkFollower  # noqa: E402
from edgeact.runtime.errors import ConfigError  # noqa: E402
from edgeact.runtime.policy import Plan  # noqa: E402

pytestmark = pytest.mark.timeout(120)

SEEDS_PER_TEMPLATE = 10


@pytest.fixture(scope="module")
def world():
    return MujocoWorld()


@pytest.fixture(scope="module")
def mapper():
    return runtime_action_mapper()[0]


@pytest.fixture(scope="module")
def rollouts(world, mapper):
    """SEEDS_PER_TEMPLATE expert episodes of each template, seeds 100.. (stepped by hand, not in real time)."""
    return {t: [run_expert(world, sample_episode(100 + s, t), mapper) for s in range(SEEDS_PER_TEMPLATE)]
            for t in TEMPLATES}


@pytest.mark.parametrize("template", list(TEMPLATES))
def test_the_expert_solves_each_template(rollouts, template):
    outcomes = [r.outcome for r in rollouts[template]]
    rate = sum(o.success for o in outcomes) / len(outcomes)
    assert rate >= 0.9, [(o.target_displacement_m.round(3).tolist(), o.ee_to_target_m.round(3).tolist())
                         for o in outcomes if not o.success]
    for r in rollouts[template]:
        assert r.n_actions <= r.episode.time_limit_s * ExpertConfig().action_rate_hz


def test_actions_stay_inside_what_the_mapper_passes_unchanged(rollouts, mapper):
    config = ExpertConfig()
    actions = np.concatenate([r.actions for rs in rollouts.values() for r in rs])
    assert np.linalg.norm(actions[:, :3], axis=1).max() <= config.step_m + 1e-12
    assert np.abs(actions[:, 3:6]).max() <= config.max_rotation_step_rad + 1e-12
    assert np.all(actions[:, 6] == -1.0)                 # the gripper stays closed in these templates
    for a in actions[::17]:
        assert mapper.delta(a) == pytest.approx(a[:6], abs=1e-15)      # no per-action cap cuts them
    assert np.abs(actions[:, 4]).max() > 0.1             # the hand really pitches down on the way


def test_chunks_are_the_next_actions_then_holds(rollouts):
    r = rollouts["push_left"][0]
    assert r.chunk(0) == pytest.approx(r.actions[:8])
    tail = r.chunk(r.n_actions - 3)
    assert tail[:3] == pytest.approx(r.actions[-3:])
    assert tail[3:, :6] == pytest.approx(np.zeros((5, 6))) and np.all(tail[3:, 6] == r.actions[-1, 6])


def test_the_same_seed_gives_the_same_demonstration(world, mapper, rollouts):
    again = run_expert(world, sample_episode(100, "push_right"), mapper)
    first = rollouts["push_right"][0]
    assert np.array_equal(again.actions, first.actions)
    assert np.array_equal(again.ee_positions_m, first.ee_positions_m)


def test_execution_noise_moves_the_arm_off_the_path_and_the_expert_steers_back(world, mapper, rollouts):
    # DART: the executed steps are perturbed (seeded by the episode); the recorded actions are the expert's
    # answers from the perturbed states, and it still solves the task.
    clean = rollouts["push_left"][0]
    noisy_config = ExpertConfig(execution_noise=0.25)
    noisy = run_expert(world, sample_episode(100, "push_left"), mapper, noisy_config)
    again = run_expert(world, sample_episode(100, "push_left"), mapper, noisy_config)
    assert np.array_equal(noisy.actions, again.actions)                  # seeded: reproducible
    assert np.array_equal(noisy.actions[0], clean.actions[0])           # the first answer is from the same state
    n = min(len(noisy.ee_positions_m), len(clean.ee_positions_m))
    assert np.abs(noisy.ee_positions_m[:n] - clean.ee_positions_m[:n]).max() > 2e-3
    assert noisy.outcome.success
    assert np.linalg.norm(noisy.actions[:, :3], axis=1).max() <= noisy_config.step_m + 1e-12
    with pytest.raises(Exception, match="execution_noise"):
        ExpertConfig(execution_noise=-0.1)


def test_rotation_noise_turns_the_hand_off_and_the_expert_turns_it_back(world, mapper, rollouts):
    # The executed rotation is perturbed (its own seeded stream: the translation noise stays as it was), the
    # recorded rotation steps are the expert's corrections, and the expert still solves the task.
    from edgeact.drivers.sim.expert import target_rotation

    config = ExpertConfig(execution_noise=0.25, rotation_noise_rad=0.06)

    def orientation_errors(errors):
        def record(k, at):
            site = at.site_pose("ee")
            relative = target_rotation(site[0], config) @ site[1].T
            errors.append(float(np.degrees(np.arccos(np.clip((np.trace(relative) - 1) / 2, -1, 1)))))
        return record

    noisy, clean = [], []
    for seed, template in enumerate(TEMPLATES):
        episode = sample_episode(100 + seed, template)
        translated = run_expert(world, episode, mapper, ExpertConfig(execution_noise=0.25),
                                on_action=orientation_errors(clean))
        turned = run_expert(world, episode, mapper, config, on_action=orientation_errors(noisy))
        assert turned.outcome.success
        assert np.array_equal(turned.actions[0], translated.actions[0])     # the same first state and answer
        n = min(turned.n_actions, translated.n_actions)
        assert np.abs(turned.actions[1:n, 3:6] - translated.actions[1:n, 3:6]).max() > 0.02     # it turns back
        assert np.abs(turned.actions[:, 3:6]).max() <= config.max_rotation_step_rad + 1e-12
    # Past the first turn the hand is some degrees off the expert's orientation; without the noise, about none.
    assert np.median(clean[8:]) < 1.5 < np.median(noisy[8:])
    for bad in (-0.01, 0.2):
        with pytest.raises(Exception, match="rotation_noise_rad"):
            ExpertConfig(rotation_noise_rad=bad)


def test_the_runtime_control_step_replays_the_expert(world, mapper, rollouts):
    """The expert's actions, followed as one plan by the runtime's ChunkFollower at the control rate, end where the
    expert ended: demonstrations mean the same thing to the runtime."""
    expert = rollouts["push_left"][1]
    reset_world(world, expert.episode)
    follower = ChunkFollower(mapper, 10.0, 100.0, world.joint_positions(mapper.joints))
    plan = Plan(actions=expert.actions, actions_normalized=np.zeros_like(expert.actions), trace_px=None,
                depth_codes=None, observation_time_s=0.0, created_time_s=0.0)
    steps_per_tick = round(0.01 / world.timestep_s)
    for tick in range(1, expert.n_actions * 10 + 1):
        decision = follower.decide(tick / 100.0, plan)
        for joint, q in decision.targets_rad.items():
            world.drive(joint, torque_on=True, mode="position", goal=q)
        follower.record_sent(decision.targets_rad)
        world.step(steps_per_tick)
    assert world.site_pose("ee")[0] == pytest.approx(expert.ee_positions_m[-1], abs=2e-3)
    block = expert.episode.target_block
    moved = world.body_pose(block)[0] - expert.episode.block_positions_m[block]
    assert moved == pytest.approx(expert.outcome.target_displacement_m, abs=5e-3)


# -- demonstrations ---------------------------------------------------------------------------------

def test_a_projected_point_lands_on_its_pixel_in_the_render(world):
    from edgeact.drivers.cameras.mujoco_camera import MujocoRgbdRenderer
    from edgeact.drivers.sim.demos import project_points

    renderer = MujocoRgbdRenderer(world, "front", 160, 120)
    try:
        reset_world(world, sample_episode(0, "move_to"))
        for body, xy in (("red_block", (0.40, -0.12)), ("green_block", (0.44, 0.15)), ("blue_block", (0.30, 0.12))):
            world.set_body_pose(body, [xy[0], xy[1], 0.215])
        color, depth_m, _ = renderer.render()
        camera_position, camera_rotation = world.site_pose("camera_optical")
        for body, channel in (("red_block", 0), ("green_block", 1), ("blue_block", 2)):
            top = world.body_pose(body)[0] + [0.0, 0.0, 0.015]
            u, v = project_points(top[None], camera_position, camera_rotation, renderer.intrinsics)[0]
            pixel = color[int(round(v)), int(round(u))].astype(int)
            assert pixel[channel] > 100 and pixel[channel] > 1.5 * np.delete(pixel, channel).max(), (body, pixel)
            # The depth sensor sees the top face at the camera-frame z of the projected point.
            z_m = (top - camera_position) @ camera_rotation[:, 2]
            assert depth_m[int(round(v)), int(round(u))] == pytest.approx(z_m, abs=3e-3)
            # And the block's blob is centred where its centre projects.
            others = np.delete(color, channel, axis=2).max(axis=2)
            mask = (color[..., channel] > 100) & (color[..., channel] > 1.5 * others)
            rows, cols = np.nonzero(mask)
            centre = project_points(world.body_pose(body)[0][None], camera_position, camera_rotation,
                                    renderer.intrinsics)[0]
            assert [cols.mean(), rows.mean()] == pytest.approx(centre, abs=1.5)
    finally:
        renderer.close()


def test_the_trace_is_the_end_effector_path_in_the_image(world, rollouts):
    from edgeact.drivers.cameras.base import Intrinsics
    from edgeact.drivers.sim.demos import future_trace, project_points
    from edgeact.runtime.answer import pixels_to_trace

    intrinsics = Intrinsics(fx=150.0, fy=150.0, cx=79.5, cy=59.5, width=160, height=120)
    camera = world.site_pose("camera_optical")
    r = rollouts["push_right"][2]
    expected = pixels_to_trace(project_points(r.ee_positions_m, *camera, intrinsics), 160, 120)
    # Bounded to the next 8 actions: the boundaries 0, 2, 4, 6, 8 from now.
    trace = future_trace(r.ee_positions_m, 8, 8, camera, intrinsics)
    assert len(trace) == 5 and np.array_equal(trace, expected[[8, 10, 12, 14, 16]])
    # Unbounded (the default): evenly spaced to the end of the episode, so it ends where the push ended.
    last = r.n_actions
    assert last > 24
    full = future_trace(r.ee_positions_m, 8, 0, camera, intrinsics)
    assert len(full) == 5 and np.array_equal(full, expected[[8 + round(i * (last - 8) / 4) for i in range(5)]])
    # At the end the arm is still: points past the last action collapse into one.
    for horizon in (8, 0):
        assert np.array_equal(future_trace(r.ee_positions_m, r.n_actions, horizon, camera, intrinsics), expected[[-1]])


def test_each_sample_is_labelled_from_the_camera_pose_its_frame_was_rendered_from(tmp_path):
    """The camera rides on the base, which a push moves a little: every sample's trace is projected from the pose
    its frame was rendered from (episode 2, a push with execution noise, moves it ~2.5 mm and 0.5 deg)."""
    from edgeact.drivers.cameras.base import Intrinsics
    from edgeact.drivers.sim.demos import OPTICAL_SITE, DemoConfig, future_trace, load_demos, record_demos

    config, episode = DemoConfig(stride_actions=4), 2
    mapper, rates = runtime_action_mapper()
    expert = ExpertConfig(**rates, execution_noise=0.25)
    record_demos(tmp_path / "d", episodes=episode + 1, seed=0, config=config, expert=expert)
    a = load_demos(tmp_path / "d").arrays()
    world = MujocoWorld()
    poses, start = {}, world.site_pose(OPTICAL_SITE)
    scene = sample_episode(episode, list(TEMPLATES)[episode % len(TEMPLATES)])
    r = run_expert(world, scene, mapper, expert,
                   on_action=lambda k, at: poses.setdefault(k, at.site_pose(OPTICAL_SITE)))
    image = json.loads((tmp_path / "d" / "manifest.json").read_text())["image"]
    intrinsics = Intrinsics(**image["intrinsics"], width=image["width"], height=image["height"])
    samples = np.nonzero(a["episode"] == episode)[0]
    assert len(samples) >= 5
    moved = 0
    for i in samples:
        k = int(a["step"][i])
        want = future_trace(r.ee_positions_m, k, config.trace_horizon_actions, poses[k], intrinsics)
        assert np.array_equal(a["trace"][i][:a["trace_len"][i]], want), k
        moved += not np.array_equal(want, future_trace(r.ee_positions_m, k, config.trace_horizon_actions, start,
                                                       intrinsics))
    assert moved >= 1          # the start pose would have labelled some of them elsewhere


def test_siblings_show_one_scene_under_other_instructions(tmp_path):
    from edgeact.drivers.sim.demos import DemoConfig, load_demos, record_demos, sibling_episodes

    seed = next(s for s in range(100) if len(sibling_episodes(sample_episode(s, "move_to"), 2)) == 2)
    scene = sample_episode(seed, "move_to")
    siblings = sibling_episodes(scene, 2)
    # Seeded by the scene: the same siblings each time, and the first of two is the one of one.
    assert [e.to_dict() for e in sibling_episodes(scene, 1)] == [siblings[0].to_dict()]
    assert sibling_episodes(scene, 0) == []
    assert all(e.colour != scene.colour and e.block_positions_m is scene.block_positions_m for e in siblings)
    summary = record_demos(tmp_path / "d", episodes=1, seed=seed, config=DemoConfig(width=64, height=48, siblings=2))
    manifest = load_demos(tmp_path / "d").manifest
    assert [(e["index"], e["sibling"]) for e in manifest["episodes"]] == [(0, 0), (0, 1), (0, 2)]
    assert [e["instruction"] for e in manifest["episodes"]] == [e.instruction for e in [scene] + siblings]
    assert summary.episodes == 3 and sum(n for _, n in summary.successes.values()) == 3
    a = load_demos(tmp_path / "d").arrays()
    # One scene for the held-out split; each rollout's first frame is the same image with another instruction.
    assert set(a["episode"].tolist()) == {0}
    first = np.nonzero(a["step"] == 0)[0]
    assert len(first) == 3 and len(set(a["instruction"][first])) == 3
    assert all(np.array_equal(a["rgb"][first[0]], a["rgb"][i]) for i in first[1:])
    assert not np.array_equal(a["trace"][first[0]], a["trace"][first[1]])
    with pytest.raises(ConfigError, match="siblings"):
        DemoConfig(siblings=-1)


def test_a_first_chunk_is_the_sample_a_whole_episode_starts_with(tmp_path, capsys):
    """sim-demos --first-chunk: the expert runs one chunk per episode and every episode's first sample is kept, the
    same sample (frame, depth, trace, chunk, blocks) as the whole episode's recording starts with."""
    import argparse

    from edgeact.drivers import commands_sim
    from edgeact.drivers.sim.demos import DemoConfig, load_demos, record_demos

    config = DemoConfig(width=64, height=48, stride_actions=4, execution_noise=0.25)
    record_demos(tmp_path / "whole", episodes=3, seed=21, config=config)
    parser = argparse.ArgumentParser()
    commands_sim.register(parser.add_subparsers())
    argv = ["sim-demos", "--first-chunk", "--episodes", "3", "--seed", "21", "--out", str(tmp_path / "first"),
            "--width", "64", "--height", "48", "--stride", "4", "--execution-noise", "0.25"]
    args = parser.parse_args(argv)
    assert args.handler(args) == 0
    assert "3 samples from 3 episodes' first chunks" in capsys.readouterr().out
    whole, first = load_demos(tmp_path / "whole"), load_demos(tmp_path / "first")
    assert first.manifest["demo_config"]["first_chunk_only"] and first.manifest["expert_config"]["max_actions"] == 8
    a, b = whole.arrays(), first.arrays()
    assert b["episode"].tolist() == [0, 1, 2] and not b["step"].any()
    done = [e["index"] for e in whole.manifest["episodes"]]
    assert done                                     # the expert finishes most episodes: some to compare with
    for episode in done:
        i, j = np.nonzero((a["episode"] == episode) & (a["step"] == 0))[0][0], episode
        for name in a:
            assert np.array_equal(a[name][i], b[name][j]), (episode, name)
    with pytest.raises(ConfigError, match="to the episode's end"):
        DemoConfig(first_chunk_only=True, trace_horizon_actions=0)
    with pytest.raises(ConfigError, match="trace_horizon_actions <= 8"):
        record_demos(tmp_path / "long", episodes=1, seed=0, config=DemoConfig(first_chunk_only=True,
                                                                              trace_horizon_actions=12))
    assert not (tmp_path / "long").exists()


def test_two_recording_processes_write_the_same_set_as_one(tmp_path):
    """record_demos(workers=2) splits the episodes by shard over two simulator processes: same files, same manifest."""
    from edgeact.drivers.sim.demos import DemoConfig, load_demos, record_demos

    config = DemoConfig(width=64, height=48, stride_actions=8, episodes_per_shard=2)
    seen = []
    one = record_demos(tmp_path / "one", episodes=5, seed=11, config=config)
    two = record_demos(tmp_path / "two", episodes=5, seed=11, config=config, workers=2,
                       progress=lambda done, total: seen.append((done, total)))
    assert seen == [(2, 5), (4, 5), (5, 5)]        # progress as each shard lands, in order
    assert (one.episodes, one.samples, one.successes) == (two.episodes, two.samples, two.successes)
    manifests = [json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("one", "two")]
    assert manifests[0] == manifests[1] and len(manifests[0]["shards"]) == 3
    a, b = (load_demos(tmp_path / d).arrays() for d in ("one", "two"))
    assert a.keys() == b.keys()
    for name in a:
        assert np.array_equal(a[name], b[name]), name
    with pytest.raises(ConfigError, match="workers"):
        record_demos(tmp_path / "none", episodes=1, seed=0, config=config, workers=0)


def test_demonstrations_round_trip(tmp_path):
    from edgeact.drivers.sim.demos import DemoConfig, load_demos, record_demos
    from edgeact.runtime.answer import Answer, trace_to_pixels

    summary = record_demos(tmp_path / "demos", episodes=4, seed=7, config=DemoConfig(width=64, height=48,
                                                                                      episodes_per_shard=2))
    assert summary.episodes == 4 and sum(n for _, n in summary.successes.values()) == 4
    data = load_demos(tmp_path / "demos")
    manifest = json.loads((tmp_path / "demos" / "manifest.json").read_text())
    assert manifest["image"]["width"] == 64 and manifest["image"]["height"] == 48 and len(manifest["shards"]) == 2
    a = data.arrays()
    n = summary.samples
    assert a["rgb"].shape == (n, 48, 64, 3) and a["rgb"].dtype == np.uint8
    assert a["depth_m"].shape == (n, 48, 64) and 0.2 < np.median(a["depth_m"]) < 1.0
    assert a["actions"].shape == (n, 8, 7) and a["trace"].shape == (n, 5, 2)
    assert set(a["instruction"]) <= {e["instruction"] for e in manifest["episodes"]}
    # Every sample is a valid MolmoAct answer once depth codes exist; its trace starts at the end effector.
    for i in range(n):
        trace = a["trace"][i][:a["trace_len"][i]]
        Answer(np.zeros(100, np.int64), trace, np.zeros((8, 7), np.int64))
        assert np.all(a["trace"][i][a["trace_len"][i]:] == -1)
    # The statistics cover the actions, and normalizing with them round-trips within a bin.
    stats = ActionStats.from_norm_stats(data.norm_stats)
    action = data.norm_stats["edgeact_sim_reference"]["action"]
    assert action["mask"] == [True] * 6 + [False]
    flat = a["actions"].reshape(-1, 7).astype(np.float64)
    # min/max are of the actions the expert took; a chunk past its episode's end holds (zeros), which they need not
    # cover.
    n_actions = {e["index"]: e["n_actions"] for e in manifest["episodes"]}
    executed = np.concatenate([a["actions"][i][:n_actions[int(a["episode"][i])] - int(a["step"][i])] for i in range(n)])
    assert len(executed) > n
    assert np.all(executed >= np.asarray(action["min"]) - 1e-6) and np.all(executed <= np.asarray(action["max"]) + 1e-6)
    assert ((executed >= stats.q01) & (executed <= stats.q99))[:, :6].mean() > 0.95
    inside = (flat >= stats.q01) & (flat <= stats.q99)
    back = unnormalize_actions(normalize_actions(flat, stats), stats)
    span = stats.q99 - stats.q01
    assert np.all(np.abs(back - flat)[inside] <= np.broadcast_to(span / 255 + 1e-9, flat.shape)[inside])
    first = a["trace"][0][:a["trace_len"][0]]
    assert trace_to_pixels(first, 64, 48).shape == (len(first), 2)


def test_an_existing_set_is_not_overwritten(tmp_path):
    from edgeact.drivers.sim.demos import DemoDatasetError, load_demos, record_demos
    from edgeact.runtime.errors import ConfigError

    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(ConfigError, match="already holds"):
        record_demos(tmp_path, episodes=1, seed=0)
    with pytest.raises(DemoDatasetError, match="format"):
        load_demos(tmp_path)
    with pytest.raises(DemoDatasetError, match="no manifest.json"):
        load_demos(tmp_path / "nothing")


def test_the_sim_demos_command_records_a_set(tmp_path, capsys):
    import argparse

    from edgeact.drivers import commands_sim
    from edgeact.drivers.sim.demos import load_demos

    parser = argparse.ArgumentParser()
    commands_sim.register(parser.add_subparsers())
    args = parser.parse_args(["sim-demos", "--episodes", "3", "--seed", "4", "--out", str(tmp_path / "d"),
                              "--width", "48", "--height", "32", "--stride", "8", "--siblings", "1",
                              "--trace-horizon", "0"])
    assert args.handler(args) == 0
    manifest = load_demos(tmp_path / "d").manifest
    assert f"{len(manifest['episodes'])} successful episodes" in capsys.readouterr().out
    assert manifest["demo_config"]["stride_actions"] == 8 and manifest["image"]["width"] == 48
    assert manifest["demo_config"]["siblings"] == 1 and manifest["demo_config"]["trace_horizon_actions"] == 0
    assert [e["template"] for e in manifest["episodes"] if e["sibling"] == 0] == list(TEMPLATES)


def test_the_demos_record_where_each_block_is_and_whether_it_is_seen(tmp_path):
    from edgeact.drivers.sim.demos import DemoConfig, load_demos, record_demos
    from edgeact.drivers.sim.task import COLOURS
    from edgeact.runtime.answer import trace_to_pixels

    record_demos(tmp_path / "d", episodes=3, seed=0, config=DemoConfig(stride_actions=2))
    a = load_demos(tmp_path / "d").arrays()
    assert a["blocks"].shape == (len(a["rgb"]), len(COLOURS), 2) and a["blocks"].dtype == np.int64
    seen = a["blocks"][:, :, 0] >= 0
    assert seen.mean() > 0.7 and not seen.all()     # the arm hides a block now and then (move_to ends above it)
    assert np.all(a["blocks"][~seen] == -1) and np.all(a["blocks"][seen] < 256)
    channel = {"red": 0, "green": 1, "blue": 2}
    for i, c in zip(*np.nonzero(seen)):
        # A seen block's pixel shows that block's colour: its own channel dominates the other two.
        u, v = np.rint(trace_to_pixels(a["blocks"][i, c][None], 160, 120)[0]).astype(int)
        patch = a["rgb"][i, max(v - 1, 0):v + 2, max(u - 1, 0):u + 2].reshape(-1, 3).astype(int).mean(axis=0)
        own = channel[COLOURS[c]]
        assert patch[own] > 1.5 * max(patch[k] for k in range(3) if k != own), (i, COLOURS[c], patch)
    # A hidden block is not in its colour where it would be: something (the arm) stands in front of it.
    i, c = next(zip(*np.nonzero(~seen)))
    first = np.nonzero((a["episode"] == a["episode"][i]) & seen[:, c])[0][0]
    u, v = np.rint(trace_to_pixels(a["blocks"][first, c][None], 160, 120)[0]).astype(int)
    assert a["depth_m"][i, v, u] < a["depth_m"][first, v, u] - 0.01
