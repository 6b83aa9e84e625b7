"""Demonstrations -> training sequences for the reference ARM: prompt ids, image inputs and the full answer's ids.

One sample becomes `prompt_ids + answer_ids`: the prompt is exactly what the runtime builds
(`build_prompt_ids` over the preprocessed front-camera image), the answer is the MolmoAct
answer grammar's encoding of (depth codes, trace, 8-action chunk), ending in end-of-text.
The loss is taken on the answer tokens only.

Depth codes: `depth_codes_fn(depth_m) -> (100,)` codes in [0, 128). The default,
`pooled_depth_codes`, is a STAND-IN for the depth VQ-VAE: the 10x10 average-pooled depth
quantized into 128 even bins over DEPTH_RANGE_M. It is deterministic and carries the scene's
layout, so the model learns a real depth-prediction sub-task; switching to the VQ-VAE is
`depth_codes_fn=vqvae_depth_codes_fn(tokenizer_dir)` (CLI: `--depth-tokenizer DIR`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from edgeact.runtime.action_bins import ActionStats, normalize_actions, values_to_action_ids
from edgeact.runtime.answer import N_DEPTH_CODES, N_DEPTH_TOKENS, Answer, trace_to_pixels
from edgeact.runtime.errors import ConfigError
from edgeact.runtime.grammar import AnswerGrammar
from edgeact.runtime.preprocess import ImageInputs, ImagePreprocessor
from edgeact.runtime.prompt import build_prompt_ids
from edgeact.runtime.token_layout import TokenLayout

DepthCodesFn = Callable[[np.ndarray], np.ndarray]
DEPTH_RANGE_M = (0.2, 2.0)      # the simulated table scene lies within 0.25..1.8 m of the front camera
DEPTH_GRID = 10                 # 10 x 10 = MolmoAct's 100 depth tokens
IGNORE = -100                   # label of a position without loss (prompt, padding)
KINDS = ("depth", "trace", "action", "text")   # what each answer token is, for per-kind accuracy


def pooled_depth_codes(depth_m: np.ndarray) -> np.ndarray:
    """STAND-IN depth tokenizer: the mean valid depth of each cell of a 10x10 grid, in 128 bins over DEPTH_RANGE_M.

    Pixels reading 0 (no data) are left out of a cell's mean; a cell without data gets code 0.
    """
    depth = np.asarray(depth_m, dtype=np.float64)
    if depth.ndim != 2 or min(depth.shape) < DEPTH_GRID:
        raise ConfigError(f"depth_m must be an (H, W) image of at least {DEPTH_GRID}x{DEPTH_GRID} px, got {depth.shape}")
    rows = np.array_split(np.arange(depth.shape[0]), DEPTH_GRID)
    cols = np.array_split(np.arange(depth.shape[1]), DEPTH_GRID)
    low, high = DEPTH_RANGE_M
    codes = np.zeros(N_DEPTH_TOKENS, dtype=np.int64)
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            cell = depth[r[0]:r[-1] + 1, c[0]:c[-1] + 1]
            valid = cell[cell > 0]
            if valid.size:
                scaled = (valid.mean() - low) / (high - low) * N_DEPTH_CODES
                codes[i * DEPTH_GRID + j] = int(np.clip(np.floor(scaled), 0, N_DEPTH_CODES - 1))
    return codes


pooled_depth_codes.identity = "pooled"      # depth_tokenizer.POOLED_CODES: what a model trained on it records


def vqvae_depth_codes_fn(tokenizer_dir: str | Path) -> DepthCodesFn:
    """The trained depth VQ-VAE (edgeact train-depth-tokenizer) as a depth_codes_fn."""
    import torch

    from edgeact.export.depth_tokenizer import depth_codes_identity, load_depth_tokenizer

    model = load_depth_tokenizer(tokenizer_dir)

    def codes(depth_m: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model.codes(torch.as_tensor(np.asarray(depth_m, dtype=np.float32))).numpy().astype(np.int64)

    codes.identity = depth_codes_identity(tokenizer_dir)
    return codes


POINT_TEMPLATE = "point to the {colour} block"
TRACE_TEMPLATE = "trajectory to {instruction}"     # MolmoAct's trace-only question, in this task's words


def task_instructions(pointing: bool = False, trace: bool = False) -> list[str]:
    """Every instruction of the reference task (templates x colours), with pointing's and the trace-only questions'
    too if asked: extra tokenizer training text. Without them the tokenizer is the one the committed reference ARM
    was trained with."""
    from edgeact.drivers.sim.task import COLOURS, TEMPLATES, instruction_for

    instructions = [instruction_for(t, c) for t in TEMPLATES for c in COLOURS]
    return instructions + ([POINT_TEMPLATE.format(colour=c) for c in COLOURS] if pointing else []) + \
        ([TRACE_TEMPLATE.format(instruction=i) for i in instructions] if trace else [])


@dataclass(frozen=True)
class TrainingSequence:
    """One training sequence: ids (T,), labels (T,) (IGNORE where no loss), kinds (T,) index into KINDS or -1."""
    ids: np.ndarray
    labels: np.ndarray
    kinds: np.ndarray
    image_inputs: ImageInputs
    n_prompt: int


class ReferenceEncoder:
    """Turns demonstration samples into the model's inputs and targets (one tokenizer, one preprocessing)."""

    def __init__(self, tokenizer, cfg, preprocess_config, norm_stats: dict, unnorm_key: str,
                 depth_codes_fn: DepthCodesFn = pooled_depth_codes, n_actions: int = 8):
        self.tokenizer = tokenizer
        self.layout = TokenLayout.from_tokenizer(tokenizer)
        self.grammar = AnswerGrammar(tokenizer, self.layout, n_actions=n_actions)
        self.preprocessor = ImagePreprocessor(cfg, preprocess_config)
        self.stats = ActionStats.from_norm_stats(norm_stats, unnorm_key)
        self.depth_codes_fn = depth_codes_fn
        self.n_actions = n_actions
        self._prompts: dict[tuple, np.ndarray] = {}
        depth_ids = np.asarray(self.layout.depth_code_ids)
        self._kind_of = {**{int(i): 0 for i in depth_ids}, **{int(i): 1 for i in self.layout.digit_ids},
                         **{int(i): 2 for i in self.layout.action_ids}}

    def answer(self, arrays: dict[str, np.ndarray], i: int) -> Answer:
        """The target answer of sample i of `load_demos(...).arrays()`."""
        actions = np.asarray(arrays["actions"][i], dtype=np.float64)
        if actions.shape[0] != self.n_actions:
            raise ConfigError(f"demo sample {i} holds {actions.shape[0]} actions per chunk; the model is trained "
                              f"for {self.n_actions}: record demos with that chunk size")
        action_ids = values_to_action_ids(normalize_actions(actions, self.stats), self.layout.base_vocab_size)
        codes = np.asarray(self.depth_codes_fn(arrays["depth_m"][i]), dtype=np.int64).reshape(-1)
        trace = arrays["trace"][i][:int(arrays["trace_len"][i])]
        return Answer(codes, trace, action_ids)

    def prompt(self, instruction: str, image_inputs: ImageInputs) -> np.ndarray:
        key = (instruction, image_inputs.grids)    # the prompt depends on the image only through its grids
        if key not in self._prompts:
            self._prompts[key] = build_prompt_ids(self.tokenizer, self.layout, instruction, image_inputs)
        return self._prompts[key]

    def image_inputs(self, rgb: np.ndarray) -> ImageInputs:
        inputs = self.preprocessor(np.ascontiguousarray(rgb))
        # The preprocessor's plan arrays are shared and read-only; a batch owns copies.
        return ImageInputs(inputs.images, inputs.image_masks.copy(), inputs.pooled_patches_idx.copy(), inputs.grids)

    def encode(self, arrays: dict[str, np.ndarray], i: int, colour_swap: int = -1) -> TrainingSequence:
        """Sample i; with colour_swap >= 0, its blocks' colours exchanged by recolour.PERMUTATIONS[colour_swap] in
        the frame and the instruction alike (the answer stays: no block moved)."""
        rgb, instruction = arrays["rgb"][i], str(arrays["instruction"][i])
        if colour_swap >= 0:
            from edgeact.drivers.sim.recolour import PERMUTATIONS, recolour_frame, recolour_instruction

            permutation = PERMUTATIONS[colour_swap]
            rgb, instruction = recolour_frame(rgb, permutation), recolour_instruction(instruction, permutation)
        image_inputs = self.image_inputs(rgb)
        prompt = self.prompt(instruction, image_inputs)
        return self._sequence(prompt, self.grammar.to_ids(self.answer(arrays, i)), image_inputs)

    def encode_pointing(self, arrays: dict[str, np.ndarray], i: int, colour: int) -> TrainingSequence:
        """A pointing sample, Molmo's grounding pre-task: the prompt of sample i's frame with the instruction
        "point to the {colour} block", the answer that block's place in trace form, ` [[x, y]]` + end-of-text.
        Its digits are of kind "trace", so it teaches the trace's coordinates to find a named block."""
        from edgeact.drivers.sim.task import COLOURS

        x, y = (int(v) for v in arrays["blocks"][i][colour])
        if x < 0:
            raise ConfigError(f"demo sample {i}: the {COLOURS[colour]} block is hidden there; point only to "
                              "visible blocks (pointing_targets)")
        return self._points_sequence(arrays["rgb"][i], POINT_TEMPLATE.format(colour=COLOURS[colour]), [(x, y)])

    def encode_trace(self, arrays: dict[str, np.ndarray], i: int) -> TrainingSequence:
        """A trace-only sample, as in MolmoAct's training mix: sample i's frame with "trajectory to {instruction}",
        the answer its trace alone, ` [[x, y], [x, y], ...]` + end-of-text: the full answer's trace without the 100
        depth codes before it, so its whole loss is where the task goes."""
        trace = arrays["trace"][i][:int(arrays["trace_len"][i])]
        question = TRACE_TEMPLATE.format(instruction=str(arrays["instruction"][i]))
        return self._points_sequence(arrays["rgb"][i], question, [(int(x), int(y)) for x, y in trace])

    def _points_sequence(self, rgb: np.ndarray, question: str, points: list[tuple[int, int]]) -> TrainingSequence:
        """The frame, the question, and the answer ` [[x, y], ...]` + end-of-text (digits of kind "trace")."""
        image_inputs = self.image_inputs(rgb)
        prompt = self.prompt(question, image_inputs)
        pieces = [self._text(" [[")]
        for n, (x, y) in enumerate(points):
            pieces += ([self._text("], [")] if n else []) + [self._digits(x), self._text(", "), self._digits(y)]
        answer = np.concatenate(pieces + [self._text("]]"), np.array([self.layout.bos_id], dtype=np.int64)])
        return self._sequence(prompt, answer, image_inputs)

    def _sequence(self, prompt: np.ndarray, answer: np.ndarray, image_inputs: ImageInputs) -> TrainingSequence:
        # Inputs drop the last answer token (nothing follows it); position t predicts token t + 1.
        ids = np.concatenate([prompt, answer[:-1]])
        labels = np.full(len(ids), IGNORE, dtype=np.int64)
        labels[len(prompt) - 1:] = answer
        kinds = np.full(len(ids), -1, dtype=np.int64)
        kinds[len(prompt) - 1:] = [self._kind_of.get(int(t), 3) for t in answer]
        return TrainingSequence(ids, labels, kinds, image_inputs, len(prompt))

    def _text(self, text: str) -> np.ndarray:
        return np.asarray(self.tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def _digits(self, value: int) -> np.ndarray:
        return np.asarray([self.layout.digit_ids[int(d)] for d in str(value)], dtype=np.int64)


def token_centres(preprocessor: ImagePreprocessor, height: int, width: int) -> tuple[np.ndarray, tuple]:
    """(n_image_tokens, 2) [u, v] pixel where each pooled image token of an (height, width) frame looks, NaN for
    tokens of padding only; and the grids. Found by preprocessing a frame whose red and green channels encode
    each pixel's column and row (blue 255 marks the image, padding is darker), so it holds for any resize,
    crop and pooling the preprocessor does."""
    v, u = np.mgrid[0:height, 0:width]
    coded = np.stack([np.rint(u * 255 / max(width - 1, 1)), np.rint(v * 255 / max(height - 1, 1)),
                      np.full(u.shape, 255)], axis=-1).astype(np.uint8)
    inputs = preprocessor(coded)
    pixels = (inputs.images.reshape(inputs.images.shape[0], inputs.images.shape[1], -1, 3) + 1.0) / 2.0 * 255.0
    real = pixels[..., 2] > 200
    per_patch = np.full((pixels.shape[0] * pixels.shape[1], 2), np.nan)
    counts = real.sum(axis=2).reshape(-1)
    sums = np.stack([(pixels[..., 0] * real).sum(axis=2), (pixels[..., 1] * real).sum(axis=2)], axis=-1).reshape(-1, 2)
    seen = counts > 0
    per_patch[seen] = sums[seen] / counts[seen, None] / 255.0 * [width - 1, height - 1]
    idx = inputs.pooled_patches_idx
    slots = np.where((idx >= 0)[..., None], per_patch[idx.clip(0)], np.nan)
    valid = ~np.isnan(slots[..., 0])
    n = valid.sum(axis=1)
    centres = np.full((len(idx), 2), np.nan)
    centres[n > 0] = np.nansum(slots, axis=1)[n > 0] / n[n > 0, None]
    return centres, inputs.grids


def grounding_labels(blocks: np.ndarray, centres: np.ndarray, grids: tuple, width: int, height: int) -> np.ndarray:
    """Per image token: 1 + the colour index of the visible block nearest its centre in each image view (the
    token that shows it), 0 for the others, IGNORE for padding-only tokens. `blocks` (n_colours, 2) in trace units."""
    labels = np.zeros(len(centres), dtype=np.int64)
    padding = np.isnan(centres[:, 0])
    labels[padding] = IGNORE
    view = np.repeat(np.arange(len(grids)), [rows * cols for rows, cols in grids])
    for colour, (x, y) in enumerate(np.asarray(blocks)):
        if x < 0:
            continue
        at = trace_to_pixels(np.array([[x, y]]), width, height)[0]
        distance = np.where(padding, np.inf, np.abs(centres - at).sum(axis=1))
        for v in range(len(grids)):
            labels[np.argmin(np.where(view == v, distance, np.inf))] = colour + 1
    return labels


def pointing_targets(arrays: dict[str, np.ndarray], indices: np.ndarray) -> np.ndarray:
    """(n, 2) [sample, colour] pairs among `indices` whose block is visible: the pointing samples to draw from."""
    visible = arrays["blocks"][indices][:, :, 0] >= 0
    rows, colours = np.nonzero(visible)
    return np.stack([np.asarray(indices)[rows], colours], axis=1).astype(np.int64)


def split_by_episode(episodes: np.ndarray, held_out_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sample indices (train, held out): whole episodes are held out, so no held-out frame has a near twin in training."""
    if not 0 <= held_out_fraction < 1:
        raise ConfigError(f"held_out_fraction must be in [0, 1), got {held_out_fraction}")
    unique = np.unique(episodes)
    n_held = int(round(len(unique) * held_out_fraction))
    if held_out_fraction > 0 and len(unique) > 1:
        n_held = min(max(n_held, 1), len(unique) - 1)
    held = set(np.random.default_rng(seed).permutation(unique)[:n_held].tolist())
    is_held = np.array([e in held for e in episodes.tolist()], dtype=bool)
    return np.nonzero(~is_held)[0], np.nonzero(is_held)[0]
