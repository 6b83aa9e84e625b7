"""Action token ids <-> normalized actions (256 uniform bins over [-1, 1]) <-> robot units via norm_stats."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeact.runtime.errors import CheckpointError, GrammarError

N_ACTION_BINS = 256
ACTION_DIMS = 7   # dx, dy, dz, droll, dpitch, dyaw, gripper


def bin_edges(n_bins: int = N_ACTION_BINS) -> np.ndarray:
    return np.linspace(-1.0, 1.0, n_bins)


def bin_centers(n_bins: int = N_ACTION_BINS) -> np.ndarray:
    """The n_bins-1 centres between consecutive edges; what a decoded token stands for."""
    edges = bin_edges(n_bins)
    return (edges[:-1] + edges[1:]) / 2.0


def values_to_action_ids(values: np.ndarray, base_vocab_size: int, n_bins: int = N_ACTION_BINS) -> np.ndarray:
    """Normalized actions -> token ids: id = Vb - digitize(value, edges) (values clipped to [-1, 1] first,
    so every value maps onto one of the n_bins action tokens Vb-n_bins .. Vb-1)."""
    clipped = np.clip(np.asarray(values, dtype=np.float64), -1.0, 1.0)
    return (base_vocab_size - np.digitize(clipped, bin_edges(n_bins))).astype(np.int64)


def action_ids_to_values(ids: np.ndarray, base_vocab_size: int, n_bins: int = N_ACTION_BINS) -> np.ndarray:
    """Token ids -> normalized actions: bin = clip(Vb - id - 1, 0, n_bins-2), value = centre of that bin."""
    ids = np.asarray(ids, dtype=np.int64)
    outside = (ids < base_vocab_size - n_bins) | (ids >= base_vocab_size)
    if outside.any():
        bad = int(ids[outside].flat[0])
        raise GrammarError(f"token id {bad} is not an action token (those are {base_vocab_size - n_bins} .. {base_vocab_size - 1})")
    bins = np.clip(base_vocab_size - ids - 1, 0, n_bins - 2)
    return bin_centers(n_bins)[bins]


@dataclass(frozen=True)
class ActionStats:
    """The per-dimension statistics an `unnorm_key` selects from config.json's `norm_stats`."""
    q01: np.ndarray
    q99: np.ndarray
    mask: np.ndarray   # True: dimension was normalized in training and is un-normalized here

    def __post_init__(self) -> None:
        if not (self.q01.shape == self.q99.shape == self.mask.shape) or self.q01.ndim != 1:
            raise CheckpointError(f"norm_stats: q01 {self.q01.shape}, q99 {self.q99.shape} and mask {self.mask.shape} must be equal-length lists")

    @classmethod
    def from_norm_stats(cls, norm_stats: dict[str, Any], unnorm_key: str | None = None) -> "ActionStats":
        """Pick the statistics of `unnorm_key`; None is allowed when norm_stats holds exactly one key."""
        keys = sorted(norm_stats)
        if not keys:
            raise CheckpointError("norm_stats is empty: the checkpoint's config.json (or the bundle's manifest) has "
                                  "no action statistics (per dataset, the q01 / q99 of the training actions, which "
                                  "training writes, e.g. edgeact train-reference from its demos), so actions cannot "
                                  "be turned into robot units; use a checkpoint whose config.json has norm_stats, or "
                                  "a bundle exported from one")
        if unnorm_key is None:
            if len(keys) != 1:
                raise CheckpointError(f"norm_stats holds {len(keys)} datasets; choose an unnorm_key from: {', '.join(keys) or '(none)'}")
            unnorm_key = keys[0]
        if unnorm_key not in norm_stats:
            raise CheckpointError(f"unnorm_key {unnorm_key!r} not in norm_stats; available keys: {', '.join(keys) or '(none)'}")
        action = norm_stats[unnorm_key].get("action") if isinstance(norm_stats[unnorm_key], dict) else None
        if not isinstance(action, dict) or "q01" not in action or "q99" not in action:
            raise CheckpointError(f"norm_stats[{unnorm_key!r}] needs an 'action' entry with 'q01' and 'q99' lists")
        q01 = np.asarray(action["q01"], dtype=np.float64)
        q99 = np.asarray(action["q99"], dtype=np.float64)
        where = f"norm_stats[{unnorm_key!r}]['action']"
        if q01.shape != (ACTION_DIMS,) or q99.shape != (ACTION_DIMS,):
            raise CheckpointError(f"{where}: q01 and q99 need {ACTION_DIMS} values (dx, dy, dz, droll, dpitch, dyaw, "
                                  f"gripper), got {q01.size} and {q99.size}; the checkpoint's config.json is wrong")
        if np.any(q01 > q99):
            raise CheckpointError(f"{where}: q01 > q99 in dimensions {np.flatnonzero(q01 > q99).tolist()}: swapped "
                                  "statistics would flip those actions' signs; the checkpoint's config.json is wrong")
        # Published statistics always carry a mask; without one every dimension was normalized.
        raw_mask = action.get("mask", [True] * len(q01))
        if len(raw_mask) != ACTION_DIMS or not all(isinstance(x, (bool, np.bool_)) for x in raw_mask):
            raise CheckpointError(f"{where}: mask must be {ACTION_DIMS} true / false values, got {raw_mask!r}")
        return cls(q01, q99, np.asarray(raw_mask, dtype=bool))

    def scaled_dims(self, n_dims: int) -> np.ndarray:
        if n_dims != self.q01.shape[0]:
            raise CheckpointError(f"actions have {n_dims} dimensions but norm_stats have {self.q01.shape[0]}")
        scaled = self.mask.copy()
        scaled[-1] = False   # the gripper stays normalized, whatever the mask says
        return scaled


def unnormalize_actions(values: np.ndarray, stats: ActionStats) -> np.ndarray:
    """Normalized (..., D) -> robot units: 0.5*(v+1)*(q99-q01)+q01 where scaled; the gripper (last) untouched."""
    values = np.asarray(values, dtype=np.float64)
    scaled = stats.scaled_dims(values.shape[-1])
    return np.where(scaled, 0.5 * (values + 1.0) * (stats.q99 - stats.q01) + stats.q01, values)


def normalize_actions(actions: np.ndarray, stats: ActionStats) -> np.ndarray:
    """Inverse of unnormalize_actions (for training data), clipped to [-1, 1]."""
    actions = np.asarray(actions, dtype=np.float64)
    scaled = stats.scaled_dims(actions.shape[-1])
    span = np.where(stats.q99 > stats.q01, stats.q99 - stats.q01, 1.0)   # constant dims map to -1
    return np.clip(np.where(scaled, 2.0 * (actions - stats.q01) / span - 1.0, actions), -1.0, 1.0)
