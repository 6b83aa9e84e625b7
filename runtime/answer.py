"""One parsed MolmoAct answer (depth codes, visual trace, action token ids) and trace <-> pixel conversion."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgeact.runtime.action_bins import ACTION_DIMS
from edgeact.runtime.errors import GrammarError

N_DEPTH_TOKENS = 100     # a 10x10 grid of depth VQ-VAE codes
N_DEPTH_CODES = 128      # codebook size
MAX_TRACE_POINTS = 5
TRACE_RANGE = 256        # trace coordinates are integers in [0, 256)


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
