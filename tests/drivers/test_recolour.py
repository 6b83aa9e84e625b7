"""Blocks' colours exchanged in a recorded frame and its instruction, against MuJoCo's own render of the exchange."""
import numpy as np
import pytest

from edgeact.drivers.sim.recolour import (PERMUTATIONS, block_colours, block_masks, recolour_blocks, recolour_frame,
                                          recolour_instruction)
from edgeact.drivers.sim.task import BLOCKS, COLOURS, TEMPLATES, instruction_for
from edgeact.runtime.errors import ConfigError

W, H = 160, 120     # the demonstrations' frame size (DemoConfig)


def test_the_block_colours_are_the_scenes(tmp_path):
    colours = block_colours()
    assert colours.shape == (3, 3)
    assert np.allclose(colours[COLOURS.index("red")], [0.85, 0.1, 0.1])        # scene.xml's red_block
    scene = tmp_path / "scene.xml"
    scene.write_text('<mujoco><worldbody><body name="red_block"><geom rgba="1 0 0 1"/></body></worldbody></mujoco>')
    with pytest.raises(ConfigError, match="green_block"):
        block_colours(str(scene))


def test_the_instruction_names_the_exchanged_colour():
    assert len(PERMUTATIONS) == 5 and tuple(range(3)) not in PERMUTATIONS
    red, green, blue = (COLOURS.index(c) for c in ("red", "green", "blue"))
    to_green = next(p for p in PERMUTATIONS if p[red] == green)
    assert recolour_instruction("push the red block to the left", to_green) == "push the green block to the left"
    for template in TEMPLATES:
        for colour in COLOURS:
            for permutation in PERMUTATIONS:
                assert recolour_instruction(instruction_for(template, colour), permutation) == \
                    instruction_for(template, COLOURS[permutation[COLOURS.index(colour)]])
    assert recolour_instruction("move to the reddish block", to_green) == "move to the reddish block"
    with pytest.raises(ConfigError, match="each of 0..2 once"):
        recolour_instruction("move to the red block", (0, 0, 1))
    blocks = np.array([[10, 20], [30, 40], [-1, -1]])
    moved = recolour_blocks(blocks, (1, 2, 0))      # red -> green, green -> blue, blue -> red
    assert moved.tolist() == [[-1, -1], [10, 20], [30, 40]]


@pytest.fixture(scope="module")
def scene_renders():
    """Frames of three seeded scenes and, per permutation, MuJoCo's render of the same scene with the blocks' rgba
    exchanged: what recolour_frame must produce from the frame alone."""
    pytest.importorskip("mujoco", reason="the scene is rendered by MuJoCo (pip install mujoco==4.0.0)")
    from edgeact.drivers.cameras.mujoco_camera import MujocoRgbdRenderer
    from edgeact.drivers.sim.mujoco_robot import MujocoWorld
    from edgeact.drivers.sim.task import reset_world, sample_episode

    world = MujocoWorld()
    renderer = MujocoRgbdRenderer(world, "front", W, H)
    geoms = [int(world.model.body(BLOCKS[c]).geomadr[0]) for c in COLOURS]
    rgba = world.model.geom_rgba.copy()
    renders = []
    try:
        for seed in (3, 11, 40):
            reset_world(world, sample_episode(seed))
            world.step(1)
            frame = renderer.render()[0]
            swapped = {}
            for permutation in PERMUTATIONS:
                for k, geom in enumerate(geoms):
                    world.model.geom_rgba[geom] = rgba[geoms[permutation[k]]]
                swapped[permutation] = renderer.render()[0]
                world.model.geom_rgba[:] = rgba
            renders.append((frame, swapped))
    finally:
        renderer.close()
    return renders


def test_the_masks_are_the_blocks_pixels(scene_renders):
    for frame, swapped in scene_renders:
        masks = block_masks(frame)
        cycle = next(p for p in PERMUTATIONS if all(p[k] != k for k in range(3)))
        block_pixels = np.abs(swapped[cycle].astype(int) - frame.astype(int)).max(axis=-1) > 0
        assert block_pixels.sum() > 100                 # three 3 cm blocks seen from the mast
        assert np.array_equal(masks >= 0, block_pixels)     # every block pixel found, nothing else
        in_truth = block_masks(swapped[cycle])      # the exchanged scene's blocks, called by their new colours
        for k in range(3):
            assert (masks == k).any() and np.all(in_truth[masks == k] == cycle[k]), COLOURS[k]


def test_a_recoloured_frame_is_the_render_of_the_exchanged_scene(scene_renders):
    for frame, swapped in scene_renders:
        for permutation, truth in swapped.items():
            out = recolour_frame(frame, permutation)
            error = np.abs(out.astype(int) - truth.astype(int))
            changed = np.abs(truth.astype(int) - frame.astype(int)).max(axis=-1) > 0
            assert error[~changed].max() == 0, "only the blocks' pixels may change"
            assert error[changed].mean() < 3 and error[changed].max() <= 20, permutation
            assert not np.array_equal(out, frame)
    frame = scene_renders[0][0]
    with pytest.raises(ConfigError, match="uint8"):
        recolour_frame(frame.astype(np.float32), PERMUTATIONS[0])
