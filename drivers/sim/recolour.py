"""The same recorded scene with its blocks' colours exchanged: a training augmentation of the reference task.

A frame of the reference task shows three blocks of the colours scene.xml gives them (task.COLOURS order). Under
the scene's white lights a block's pixel is, channel by channel, `s * colour + w` (s: how lit that face is, w:
the white ambient and specular part), so the block painted another colour is the same pixel plus
`s * (new - old)`: the blocks are found by the direction of their pixels' chroma (the pixel minus its grey, which
removes w) and repainted with their own shading. Everything else in the scene (table, floor, arm, gripper) is
grey or far from a block's hue and is left as it was. The instruction's colour word is exchanged the same way,
so "push the red block to the left" over a frame whose red block is now green becomes "push the green block to
the left": the trace, the actions and the depth stay true, since no block moved.

It gives the model every colour assignment of each recorded layout, so the trace can only follow the named
block by its colour in the image. Tested against MuJoCo's own render of the scene with the blocks' colours
exchanged (tests/drivers/test_recolour.py).
"""
from __future__ import annotations

import itertools
import re
import xml.etree.ElementTree as ET
from functools import lru_cache
from pathlib import Path

import numpy as np

from edgeact.runtime.errors import ConfigError

from .task import BLOCKS, COLOURS

MIN_COSINE = 0.95       # a pixel's chroma this near a block colour's direction (the table's is 0.85 from red's)
MIN_CHROMA = 0.06       # ... and at least this far from grey (0..1 units): the floor, the arm and shadows are not
# Every exchange of the colours but the identity, in a fixed order: an augmentation draws an index into this.
PERMUTATIONS = tuple(p for p in itertools.permutations(range(len(COLOURS))) if p != tuple(range(len(COLOURS))))


@lru_cache(maxsize=4)
def block_colours(scene_path: str | None = None) -> np.ndarray:
    """(3, 3) RGB in [0, 1] of the blocks in task.COLOURS order, read from the scene's MJCF (one description)."""
    from .mujoco_robot import SCENE_XML

    path = Path(scene_path or SCENE_XML)
    bodies = {b.get("name"): b for b in ET.parse(path).getroot().iter("body")}
    colours = []
    for colour in COLOURS:
        body = bodies.get(BLOCKS[colour])
        geom = body.find("geom") if body is not None else None
        if geom is None or geom.get("rgba") is None:
            raise ConfigError(f"{path}: no body {BLOCKS[colour]!r} with a geom rgba; the reference task's scene "
                              "names each block's body <colour>_block")
        colours.append([float(v) for v in geom.get("rgba").split()[:3]])
    return np.asarray(colours)


def block_masks(rgb: np.ndarray, colours: np.ndarray | None = None) -> np.ndarray:
    """(H, W) int: which block colour (index into task.COLOURS) each pixel shows, -1 where none."""
    colours = block_colours() if colours is None else np.asarray(colours, dtype=np.float64)
    chroma = _chroma(np.asarray(rgb, dtype=np.float32) * np.float32(1 / 255))
    directions = colours - colours.mean(axis=-1, keepdims=True)
    directions = (directions / np.linalg.norm(directions, axis=-1, keepdims=True)).astype(np.float32)
    norm = np.sqrt(np.einsum("...c,...c->...", chroma, chroma))
    along = chroma @ directions.T                       # (H, W, 3): chroma along each block colour's direction
    best = along.argmax(axis=-1)
    found = (np.take_along_axis(along, best[..., None], -1)[..., 0] >= MIN_COSINE * norm) & (norm >= MIN_CHROMA)
    return np.where(found, best, -1)


def recolour_frame(rgb: np.ndarray, permutation: tuple[int, ...], colours: np.ndarray | None = None) -> np.ndarray:
    """The frame with block colour k painted colour permutation[k] (uint8, a new array)."""
    colours = block_colours() if colours is None else np.asarray(colours, dtype=np.float64)
    _check_permutation(permutation)
    frame = np.asarray(rgb)
    if frame.ndim != 3 or frame.shape[-1] != 3 or frame.dtype != np.uint8:
        raise ConfigError(f"recolour_frame takes an (H, W, 3) uint8 RGB frame, got {frame.shape} {frame.dtype}")
    masks = block_masks(frame, colours)
    out = frame.copy()
    chroma_colours = colours - colours.mean(axis=-1, keepdims=True)
    for k, new in enumerate(permutation):
        hit = masks == k
        if new == k or not hit.any():
            continue
        pixels = frame[hit].astype(np.float64) / 255.0
        shade = _chroma(pixels) @ chroma_colours[k] / (chroma_colours[k] @ chroma_colours[k])
        repainted = (pixels + shade[:, None] * (colours[new] - colours[k])) * 255.0
        out[hit] = np.clip(np.rint(repainted), 0, 255).astype(np.uint8)
    return out


def _chroma(pixels: np.ndarray) -> np.ndarray:
    """Each pixel minus its grey (the mean of its channels): what a white light's share adds is gone."""
    return pixels - pixels.mean(axis=-1, keepdims=True)


def recolour_instruction(instruction: str, permutation: tuple[int, ...]) -> str:
    """The instruction with each colour word COLOURS[k] replaced by COLOURS[permutation[k]] (whole words)."""
    _check_permutation(permutation)
    pattern = re.compile(r"\b(" + "|".join(COLOURS) + r")\b")
    return pattern.sub(lambda m: COLOURS[permutation[COLOURS.index(m.group(1))]], instruction)


def recolour_blocks(blocks: np.ndarray, permutation: tuple[int, ...]) -> np.ndarray:
    """Where each block colour is in the recoloured frame: row permutation[k] takes old row k."""
    _check_permutation(permutation)
    out = np.empty_like(blocks)
    out[list(permutation)] = blocks
    return out


def _check_permutation(permutation) -> None:
    if sorted(permutation) != list(range(len(COLOURS))):
        raise ConfigError(f"a colour permutation lists each of 0..{len(COLOURS) - 1} once (new colour of each of "
                          f"{', '.join(COLOURS)}); got {tuple(permutation)}")
