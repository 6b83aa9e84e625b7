"""One parsed MolmoAct answer (depth codes, visual trace, action token ids) and trace <-> pixel conversion."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgeact.runtime.action_bins import ACTION_DIMS, N_ACTION_BINS
from edgeact.runtime.errors import BundleError, GrammarError

N_DEPTH_TOKENS = 100     # a 10x10 grid of depth VQ-VAE codes
N_DEPTH_CODES = 128      # codebook size
MAX_TRACE_POINTS = 5
TRACE_RANGE = 256        # trace coordinates are integers in [0, 256)
GRAMMAR_KIND, GRAMMAR_VERSION = "molmoact-answer", 1   # the answer a bundle's manifest says its model gives


def grammar_record(n_actions: int) -> dict:
    """What a bundle's manifest says about the answer; the runtime builds AnswerGrammar(tokenizer, layout, n_actions)
    from it, and refuses a record it does not decode (check_grammar_record)."""
    return {"kind": GRAMMAR_KIND, "version": GRAMMAR_VERSION, "n_actions": n_actions,
            "max_trace_points": MAX_TRACE_POINTS, "n_depth_tokens": N_DEPTH_TOKENS, "action_dims": ACTION_DIMS,
            "n_action_bins": N_ACTION_BINS,
            "decoding": "greedy, every step masked to the answer grammar (edgeact.runtime.grammar_walk)"}


def check_grammar_record(record: dict, where: str) -> None:
    """Refuse an answer another edgeact wrote that this one would decode wrongly: another kind or version, or other
    sizes than its own (the runtime decodes with its constants and reads only n_actions from the record)."""
    kind, version = record.get("kind", GRAMMAR_KIND), record.get("version", GRAMMAR_VERSION)
    if kind != GRAMMAR_KIND or version != GRAMMAR_VERSION:
        newer = kind == GRAMMAR_KIND and isinstance(version, int) and version > GRAMMAR_VERSION
        raise BundleError(f"{where}: its answer grammar is {kind!r} version {version!r}, and this edgeact decodes "
                          f"{GRAMMAR_KIND!r} version {GRAMMAR_VERSION}; " + (
                              "upgrade edgeact here to the version that wrote the bundle, or re-export it with this "
                              "one" if newer else "re-export the bundle with edgeact"))
    ours = {"max_trace_points": MAX_TRACE_POINTS, "n_depth_tokens": N_DEPTH_TOKENS, "action_dims": ACTION_DIMS,
            "n_action_bins": N_ACTION_BINS}
    differ = {key: record[key] for key in ours if key in record and record[key] != ours[key]}
    if differ:
        raise BundleError(f"{where}: its answer grammar has {differ}, and this edgeact decodes "
                          f"{ {key: ours[key] for key in differ} }; re-export the bundle with this edgeact")
    n_actions = record.get("n_actions", 1)
    if isinstance(n_actions, bool) or not isinstance(n_actions, int) or n_actions < 1:
        raise BundleError(f"{where}: its answer grammar's n_actions is {n_actions!r}; a count of actions per answer "
                          "(1, or the checkpoint's chunk, e.g. 8) is needed: re-export the bundle")


@dataclass(frozen=True, eq=False)   # arrays: equality below compares values
class Answer:
    depth_codes: np.ndarray   # (100,) int64, codes in [0, 128)
    trace: np.ndarray         # (n_points, 2) int64 [x, y] in [0, 256), 1 <= n_points <= 5
    action_ids: np.ndarray    # (n_actions, 7) int64 token ids of the action tokens

    def __post_init__(self) -> None:
        depth = np.asarray(self.depth_codes, dtype=np.int64)
        trace = np.asarray(self.trace, dtype=np.int64)
        actions = np.asarray(self.action_ids, dtype=np.int64)
        if depth.shape != (N_DEPTH_TOKENS,) or depth.min() < 0 or depth.max() >= N_DEPTH_CODES:
            raise GrammarError(f"depth_codes must be {N_DEPTH_TOKENS} codes in [0, {N_DEPTH_CODES}), got shape {depth.shape}")
        if trace.ndim != 2 or trace.shape[1] != 2 or not 1 <= trace.shape[0] <= MAX_TRACE_POINTS:
            raise GrammarError(f"trace must be 1..{MAX_TRACE_POINTS} [x, y] points, got shape {trace.shape}")
        if trace.min() < 0 or trace.max() >= TRACE_RANGE:
            raise GrammarError(f"trace coordinates must lie in [0, {TRACE_RANGE}), got {trace.tolist()}")
        if actions.ndim != 2 or actions.shape[1] != ACTION_DIMS or actions.shape[0] < 1:
            raise GrammarError(f"action_ids must be (n_actions, {ACTION_DIMS}), got shape {actions.shape}")
        object.__setattr__(self, "depth_codes", depth)
        object.__setattr__(self, "trace", trace)
        object.__setattr__(self, "action_ids", actions)

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Answer) and np.array_equal(self.depth_codes, other.depth_codes)
                and np.array_equal(self.trace, other.trace) and np.array_equal(self.action_ids, other.action_ids))


def trace_to_pixels(trace: np.ndarray, width_px: int, height_px: int) -> np.ndarray:
    """Trace points in [0, 256) -> (n, 2) float pixel coordinates [u, v] of a width x height image."""
    trace = np.asarray(trace, dtype=np.float64)
    scale = np.array([width_px - 1, height_px - 1], dtype=np.float64) / (TRACE_RANGE - 1)
    return trace * scale


def pixels_to_trace(pixels: np.ndarray, width_px: int, height_px: int) -> np.ndarray:
    """Inverse of trace_to_pixels (rounded, clipped), e.g. for a trace a user drew on the image."""
    pixels = np.asarray(pixels, dtype=np.float64)
    scale = (TRACE_RANGE - 1) / np.array([max(width_px - 1, 1), max(height_px - 1, 1)], dtype=np.float64)
    return np.clip(np.rint(pixels * scale), 0, TRACE_RANGE - 1).astype(np.int64)
