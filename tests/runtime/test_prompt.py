"""Prompt token layout: BOS, image token grids, then the exact MolmoAct chat text."""
import numpy as np
import pytest

from edgeact.runtime.arm_config import AdapterConfig, ArmConfig, LlmConfig, VitConfig
from edgeact.runtime.errors import EdgeactError
from edgeact.runtime.preprocess import ImageInputs, ImagePreprocessor, concat_image_inputs
from edgeact.runtime.prompt import build_prompt_ids, chat_text, image_token_ids, molmoact_prompt

EXPECTED_PROMPT = (
    "The task is pick up the red block. What is the action that the robot should take. To figure out the "
    "action that the robot should take to pick up the red block, let's think through it step by step. First, "
    "what is the depth map for the first image? Second, what is the trajectory of the end effector in the first "
    "image? Based on the depth map of the first image and the trajectory of the end effector in the first image, "
    "along with other images from different camera views as additional information, what is the action that the "
    "robot should take?"
)


@pytest.fixture(scope="module")
def preprocessor():
    return ImagePreprocessor(ArmConfig(VitConfig(), AdapterConfig(), LlmConfig(), image_patch_id=1026))


def test_prompt_text_is_the_published_one():
    assert molmoact_prompt("pick up the red block") == EXPECTED_PROMPT
    assert molmoact_prompt("  pick up the red block. ") == EXPECTED_PROMPT
    assert chat_text("pick up the red block") == f"User: {EXPECTED_PROMPT} Assistant:"
    with pytest.raises(EdgeactError, match="instruction is empty"):
        molmoact_prompt(" . ")


def test_one_camera_image_gives_424_image_tokens(tok, layout, preprocessor):
    inputs = preprocessor(np.zeros((240, 320, 3), dtype=np.uint8))
    ids = build_prompt_ids(tok, layout, "pick up the red block", inputs)
    assert ids.dtype == np.int64 and ids[0] == layout.bos_id
    image = ids[1:1 + 424]
    assert np.count_nonzero(image == layout.im_patch_id) == inputs.n_image_tokens == 392
    # Two grids of 14 rows: <im_start>, 14 x (14 patches + <im_col>), <im_end>.
    grid = np.concatenate([[layout.im_start_id], np.tile([layout.im_patch_id] * 14 + [layout.im_col_id], 14), [layout.im_end_id]])
    assert np.array_equal(image, np.concatenate([grid, grid]))
    assert tok.decode(ids[1 + 424:].tolist()) == chat_text("pick up the red block")
    assert not np.isin(ids[1 + 424:], image).any()


def test_image_token_layout_of_a_rectangular_grid(layout):
    ids = image_token_ids(layout, [(2, 3)])
    p, c = layout.im_patch_id, layout.im_col_id
    assert ids.tolist() == [layout.im_start_id, p, p, p, c, p, p, p, c, layout.im_end_id]


def test_two_cameras_are_labelled(tok, layout, preprocessor):
    both = concat_image_inputs([preprocessor(np.zeros((100, 100, 3), dtype=np.uint8)),
                                preprocessor(np.zeros((480, 640, 3), dtype=np.uint8))])
    ids = build_prompt_ids(tok, layout, "open the drawer", both)
    assert np.count_nonzero(ids == layout.im_patch_id) == both.n_image_tokens == 392 + 196 + 529
    assert np.count_nonzero(ids == layout.im_start_id) == 4
    text = tok.decode(ids.tolist())    # image tokens are special: a plain decode drops them
    assert text == "Image 1Image 2" + chat_text("open the drawer")


def test_patch_count_mismatch_is_caught(tok, layout, preprocessor):
    good = preprocessor(np.zeros((100, 100, 3), dtype=np.uint8))
    bad = ImageInputs(good.images, good.image_masks, good.pooled_patches_idx, ((14, 14), (13, 14)))
    with pytest.raises(AssertionError):
        build_prompt_ids(tok, layout, "open the drawer", bad)
