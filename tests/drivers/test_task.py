"""The reference task: templates, seeded scene randomization and its constraints, world reset, success predicates."""
import dataclasses

import numpy as np
import pytest

from edgeact.runtime.errors import ConfigError

pytest.importorskip("mujoco", reason="the reference task runs in MuJoCo (pip install mujoco==4.0.0)")

from edgeact.drivers.sim.mujoco_robot import MujocoWorld  # noqa: E402
from edgeact.drivers.sim.task import (BLOCKS, COLOURS, FAILURES, PUSH_SIGN, READY_EE_XY_M,  # noqa: E402
                                      SHOULDER_XY_M, TEMPLATES, TaskConfig, evaluate, instruction_for,
                                      reset_world, retarget, sample_episode)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def world():
    return MujocoWorld()


def test_each_template_reads_as_an_instruction():
    assert instruction_for("move_to", "red") == "move to the red block"
    assert instruction_for("push_left", "blue") == "push the blue block to the left"
    assert instruction_for("push_right", "green") == "push the green block to the right"
    with pytest.raises(ConfigError, match="push_up.*move_to"):
        instruction_for("push_up", "red")
    with pytest.raises(ConfigError, match="purple"):
        instruction_for("move_to", "purple")


def test_an_episode_is_a_function_of_its_seed():
    a, b = sample_episode(11), sample_episode(11)
    assert a.to_dict() == b.to_dict()
    others = [sample_episode(s).to_dict() for s in range(12, 16)]
    assert all(o["block_positions_m"] != a.to_dict()["block_positions_m"] for o in others)
    # Drawing the template does not change what a given template would get with the same seed.
    forced = sample_episode(11, a.template)
    assert forced.to_dict() == a.to_dict()
    templates = {sample_episode(s).template for s in range(30)}
    assert templates == set(TEMPLATES)
    # A numpy integer is taken as a seed (a loop over np.arange) and the episode still goes to JSON.
    import json

    from_numpy = sample_episode(np.int64(11))
    assert json.loads(json.dumps(from_numpy.to_dict())) == json.loads(json.dumps(a.to_dict()))


def doable(e, config: TaskConfig) -> bool:
    """The layout constraints of the task, restated: the named block reachable inside its ranges, the blocks apart,
    a push's lane clear and its end within reach, a move_to not already done, the arm near ready."""
    xy = {b: p[:2] for b, p in e.block_positions_m.items()}
    target = xy[e.target_block]
    ok = (np.linalg.norm(target - SHOULDER_XY_M) <= config.max_reach_m
          and config.x_range_m[0] <= target[0] <= config.x_range_m[1]
          and config.y_range_m[0] <= target[1] <= config.y_range_m[1])
    names = list(xy)
    ok &= all(np.linalg.norm(xy[a] - xy[b]) >= config.min_separation_m
              for i, a in enumerate(names) for b in names[i + 1:])
    if e.template in PUSH_SIGN:
        ok &= abs(target[1] + PUSH_SIGN[e.template] * config.push_distance_m) <= config.push_reach_y_m
        ok &= all(body == e.target_block or abs(p[0] - target[0]) >= config.lane_half_width_m
                  or abs(p[1] - target[1]) >= config.lane_length_m for body, p in xy.items())
    else:
        ok &= np.linalg.norm(target - READY_EE_XY_M) >= config.move_start_clearance_m
    return bool(ok and all(abs(q) <= config.arm_start_noise_rad for q in e.arm_start_rad.values()))


@pytest.mark.parametrize("template", list(TEMPLATES))
def test_layouts_keep_the_task_doable(template):
    config = TaskConfig()
    assert all(doable(sample_episode(seed, template), config) for seed in range(40))


def test_a_scene_is_retargeted_only_where_that_task_could_have_been_drawn():
    config = TaskConfig()
    accepted = refused = 0
    for seed in range(40):
        scene = sample_episode(seed)
        for template in TEMPLATES:
            for colour in COLOURS:
                e = retarget(scene, template, colour, config)
                asked = dataclasses.replace(scene, template=template, colour=colour)
                assert (e is not None) == doable(asked, config), (seed, template, colour)
                if e is None:
                    refused += 1
                    continue
                accepted += 1
                assert e.instruction == instruction_for(template, colour)
                assert e.time_limit_s == config.time_limit_s[template]
                assert (e.seed, e.block_positions_m, e.block_yaws_rad, e.arm_start_rad) == \
                    (scene.seed, scene.block_positions_m, scene.block_yaws_rad, scene.arm_start_rad)
    # Both answers occur: the check is not vacuous either way.
    assert accepted > 40 and refused > 40
    with pytest.raises(ConfigError, match="purple"):
        retarget(sample_episode(0), "move_to", "purple")


def test_task_config_is_validated():
    with pytest.raises(ConfigError, match="success_push_m"):
        TaskConfig(success_push_m=0.2)
    with pytest.raises(ConfigError, match="x_range_m"):
        TaskConfig(x_range_m=(0.4, 0.3))
    with pytest.raises(ConfigError, match="time_limit_s"):
        TaskConfig(time_limit_s={"move_to": 3.0})


def test_reset_places_the_blocks_and_the_arm(world):
    e = sample_episode(3, "push_left")
    reset_world(world, e)
    for body, position in e.block_positions_m.items():
        got, rotation = world.body_pose(body)
        assert got == pytest.approx(position, abs=1e-9)
        assert np.arctan2(rotation[1, 0], rotation[0, 0]) == pytest.approx(e.block_yaws_rad[body], abs=1e-9)
    assert world.joint_positions(list(e.arm_start_rad)) == pytest.approx(e.arm_start_rad, abs=1e-12)
    # Servos hold the start: a second of physics leaves the arm and the blocks where they were.
    world.step(round(1.0 / world.timestep_s))
    assert world.joint_positions(list(e.arm_start_rad)) == pytest.approx(e.arm_start_rad, abs=0.02)
    assert not evaluate(world, e).success


def test_push_success_needs_the_named_block_moved_the_asked_way(world):
    e = sample_episode(5, "push_left")
    reset_world(world, e)
    start = e.block_positions_m[e.target_block]
    world.set_body_pose(e.target_block, start + [0.0, 0.06, 0.0])
    assert evaluate(world, e).success
    right = sample_episode(5, "push_right")
    reset_world(world, right)
    world.set_body_pose(right.target_block, right.block_positions_m[right.target_block] + [0.0, 0.06, 0.0])
    assert not evaluate(world, right).success           # moved, but the wrong way
    world.set_body_pose(right.target_block, right.block_positions_m[right.target_block] - [0.0, 0.06, 0.0])
    assert evaluate(world, right).success
    other = next(b for b in BLOCKS.values() if b != right.target_block)
    world.set_body_pose(other, right.block_positions_m[other] + [0.05, 0.0, 0.0])
    outcome = evaluate(world, right)
    assert not outcome.success and outcome.max_other_displacement_m == pytest.approx(0.05, abs=1e-6)


def test_move_to_success_needs_the_end_effector_just_above_the_block(world):
    e = sample_episode(8, "move_to")
    reset_world(world, e)
    ee = world.site_pose("ee")[0]

    def block_at(position_m):
        """The episode as if the named block had started at position_m (under the end effector), and the world so."""
        world.set_body_pose(e.target_block, position_m)
        return dataclasses.replace(e, block_positions_m={**e.block_positions_m, e.target_block: np.array(position_m)})

    far_below = evaluate(world, block_at([ee[0], ee[1], ee[2] - 0.12]))
    assert far_below.ee_to_target_m == pytest.approx([0.0, 0.0, 0.105], abs=1e-9)
    assert not far_below.success                        # 10.5 cm above the top face: too high to count
    assert evaluate(world, block_at([ee[0], ee[1], ee[2] - 0.06])).success
    assert not evaluate(world, block_at([ee[0] + 0.04, ee[1], ee[2] - 0.06])).success


def test_a_failed_push_says_why(world):
    e = sample_episode(5, "push_left")
    target, other = e.target_block, next(b for b in BLOCKS.values() if b != e.target_block)
    start = e.block_positions_m[target]

    def why(offset_m, other_offset_m=(0.0, 0.0, 0.0)):
        reset_world(world, e)
        world.set_body_pose(target, start + offset_m)
        world.set_body_pose(other, e.block_positions_m[other] + other_offset_m)
        return evaluate(world, e).failure(e.template)

    assert why([0.0, 0.06, 0.0]) is None                                # pushed 6 cm the asked way: a success
    assert why([0.0, 0.0, 0.0]) == "block not pushed"
    assert why([0.0, 0.03, 0.0]) == "pushed short"
    assert why([0.0, -0.03, 0.0]) == "pushed the wrong way"
    assert why([0.0, 0.06, -0.05]) == "block knocked off the table"     # far enough, but below the table top
    assert why([0.0, 0.06, 0.0], [0.05, 0.0, 0.0]) == "disturbed another block"


def test_a_failed_move_to_says_why(world):
    e = sample_episode(8, "move_to")
    reset_world(world, e)
    ee = world.site_pose("ee")[0]

    def why(block_m, start_m=None):
        world.set_body_pose(e.target_block, block_m)
        moved = dataclasses.replace(e, block_positions_m={**e.block_positions_m,
                                                          e.target_block: np.array(start_m or block_m)})
        outcome = evaluate(world, moved)
        return outcome.failure(e.template), outcome

    assert why([ee[0], ee[1], ee[2] - 0.06])[0] is None
    assert why([ee[0] + 0.04, ee[1], ee[2] - 0.06])[0] == "block not reached"
    assert why([ee[0], ee[1], ee[2] - 0.12])[0] == "wrong height over the block"
    assert why([ee[0], ee[1], ee[2] - 0.06], [ee[0] + 0.04, ee[1], ee[2] - 0.06])[0] == "block moved"
    failure, outcome = why([ee[0] + 0.04, ee[1], ee[2] - 0.06])
    assert outcome.to_dict(e.template)["failure"] == failure in FAILURES


def test_no_move_to_episode_starts_as_a_success(world):
    # Blocks under the ready end effector would count as reached before the policy moves; they are not drawn.
    starts_done = []
    for seed in range(40):
        episode = sample_episode(seed, "move_to")
        reset_world(world, episode)
        world.step(5)
        if evaluate(world, episode).success:
            starts_done.append(seed)
    assert starts_done == []


def test_move_to_succeeds_only_once_the_end_effector_stays_over_the_block():
    # A sweep at hover height passes over every block on its way: that is no "move to". Pushes count at once.
    from edgeact.drivers.sim.task import SuccessJudge, TaskConfig

    move = SuccessJudge.for_episode(sample_episode(8, "move_to"))
    assert move.dwell_s == TaskConfig().move_dwell_s == 0.5
    for t, holds in [(0.0, False), (0.1, True), (0.2, True), (0.3, False), (0.4, True), (0.5, True), (0.8, True)]:
        assert move.update(t, holds) is None            # passing over (0.1-0.2), then 0.4 s of 0.5 so far
    assert move.update(0.9, True) == 0.9 and move.update(1.0, False) == 0.9     # held from 0.4 to 0.9: kept
    push = SuccessJudge.for_episode(sample_episode(8, "push_left"))
    assert push.update(0.0, False) is None and push.update(0.1, True) == 0.1
    with pytest.raises(ConfigError, match="move_dwell_s"):
        TaskConfig(move_dwell_s=-1.0)


def test_a_move_to_over_the_block_that_was_never_judged_a_success_says_so(world):
    # The predicate holds at the end, but the episode's SuccessJudge saw it hold less than move_dwell_s: no success,
    # and the reason must say so (not None, which reads as a success, nor "block not reached").
    e = sample_episode(8, "move_to")
    reset_world(world, e)
    ee = world.site_pose("ee")[0]
    world.set_body_pose(e.target_block, [ee[0], ee[1], ee[2] - 0.06])
    over = evaluate(world, dataclasses.replace(
        e, block_positions_m={**e.block_positions_m, e.target_block: np.array([ee[0], ee[1], ee[2] - 0.06])}))
    assert over.success                                         # the predicate, at this instant
    assert over.failure(e.template, succeeded=False) == "over the block, not for 0.5 s"
    assert over.failure(e.template, TaskConfig(move_dwell_s=0.8), succeeded=False) == "over the block, not for 0.8 s"
    assert over.to_dict(e.template, succeeded=False)["failure"] == "over the block, not for 0.5 s"
    assert over.failure(e.template, succeeded=True) is None and over.failure(e.template) is None


def test_a_negative_seed_is_refused_with_the_fix(tmp_path, capsys):
    from edgeact.runtime.cli import main

    with pytest.raises(ConfigError, match=r"episode seed must be an integer >= 0, got -5"):
        sample_episode(-5)
    out = tmp_path / "demos"
    assert main(["sim-demos", "--seed", "-5", "--episodes", "1", "--out", str(out)]) == 2
    assert "edgeact sim-demos: error: --seed must be an integer >= 0, got -5" in " ".join(
        capsys.readouterr().err.split())
    assert not out.exists()
