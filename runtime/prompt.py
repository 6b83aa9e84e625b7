"""The MolmoAct prompt as token ids: BOS, the image token grids, then `User: {prompt} Assistant:`."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from edgeact.runtime.errors import EdgeactError
from edgeact.runtime.preprocess import GRIDS_PER_IMAGE, ImageInputs
from edgeact.runtime.token_layout import TokenLayout

# The exact reasoning prompt MolmoAct was trained with (DESIGN.md); {instr} appears twice.
PROMPT_TEMPLATE = (
    "The task is {instr}. What is the action that the robot should take. To figure out the action "
    "that the robot should take to {instr}, let's think through it step by step. First, what is the "
    "depth map for the first image? Second, what is the trajectory of the end effector in the first "
    "image? Based on the depth map of the first image and the trajectory of the end effector in the "
    "first image, along with other images from different camera views as additional information, "
    "what is the action that the robot should take?"
)


def molmoact_prompt(instruction: str) -> str:
    """The reasoning prompt for one instruction (surrounding space and a final period dropped:
    the template supplies its own)."""
    instr = instruction.strip().rstrip(".").strip()
    if not instr:
        raise EdgeactError("the instruction is empty; say what the robot should do, e.g. 'pick up the red block'")
    return PROMPT_TEMPLATE.format(instr=instr)


def chat_text(instruction: str) -> str:
    return f"User: {molmoact_prompt(instruction)} Assistant:"


def image_token_ids(layout: TokenLayout, grids: Sequence[tuple[int, int]]) -> np.ndarray:
    """`<im_start>` + rows x (`<im_patch>` x cols + `<im_col>`) + `<im_end>` for each (rows, cols) grid."""
    parts = []
    for rows, cols in grids:
        row = np.full(cols + 1, layout.im_patch_id, dtype=np.int64)
        row[-1] = layout.im_col_id
        parts += [np.array([layout.im_start_id], dtype=np.int64), np.tile(row, rows), np.array([layout.im_end_id], dtype=np.int64)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def build_prompt_ids(tokenizer, layout: TokenLayout, instruction: str, image_inputs: ImageInputs) -> np.ndarray:
    """input_ids for one observation; `image_inputs` may hold several cameras (concat_image_inputs).

    With more than one image each image's grids are preceded by the text `Image k`, as the
    published MolmoAct processor does; a single image has no label.
    """
    def text(s: str) -> np.ndarray:
        return np.asarray(tokenizer.encode(s, add_special_tokens=False).ids, dtype=np.int64)

    parts = [np.array([layout.bos_id], dtype=np.int64)]
    n_images = image_inputs.n_images
    for k in range(n_images):
        if n_images > 1:
            parts.append(text(f"Image {k + 1}"))
        parts.append(image_token_ids(layout, image_inputs.grids[k * GRIDS_PER_IMAGE:(k + 1) * GRIDS_PER_IMAGE]))
    parts.append(text(chat_text(instruction)))
    ids = np.concatenate(parts)
    n_patch_tokens = int(np.count_nonzero(ids == layout.im_patch_id))
    # The i-th pooled feature is added to the i-th <im_patch> embedding: the counts must agree
    # (an explicit check, not `assert`, so it also holds under python -O).
    if n_patch_tokens != image_inputs.n_image_tokens:
        raise AssertionError(f"{n_patch_tokens} <im_patch> tokens for {image_inputs.n_image_tokens} pooled image "
                             f"features; grids {image_inputs.grids} do not describe pooled_patches_idx")
    return ids
