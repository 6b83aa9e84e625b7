"""The bundle's depth tokenizer stage on the robot: the camera's aligned depth image (metres) -> the 100 depth codes (no torch).

The stage (exported by edgeact.export.depth_tokenizer_export) does all of its preprocessing in
the graph: clipping to its range, scaling, the resize to its square. Here the sensor's array is
only checked (float metres: an integer image, or one whose median is implausible in metres, is refused),
its non-finite pixels set to 0 ("no data", as a depth camera reports them), and fed
through whichever backend runs the bundle's other stages. Forcing these codes replaces the 100
sequential depth decode steps of the answer with one small convolutional pass.
"""
from __future__ import annotations

import numpy as np

from edgeact.runtime.answer import N_DEPTH_CODES, N_DEPTH_TOKENS
from edgeact.runtime.bundle import Bundle
from edgeact.runtime.engines import Backend, StageEngine
from edgeact.runtime.errors import BundleError, EdgeactError
from edgeact.runtime.policy import depth_units_problem, negative_depth_problem

STAGE = "depth_tokenizer"
INPUT, OUTPUT = "depth_m", "codes"


class StageDepthTokenizer:
    """A callable depth_m (H, W) -> (100,) int64 codes over a `depth_tokenizer` stage engine."""

    def __init__(self, engine: StageEngine, where: str = STAGE):
        spec = engine.spec
        inputs, outputs = [t.name for t in spec.inputs], {t.name: t for t in spec.outputs}
        if inputs != [INPUT] or OUTPUT not in outputs or tuple(outputs[OUTPUT].dims) != (N_DEPTH_TOKENS,):
            raise BundleError(f"{where}: stage {STAGE!r} takes {inputs} and gives "
                              f"{ {k: list(t.dims) for k, t in outputs.items()} }; the runtime needs {INPUT!r} "
                              f"(height, width) -> {OUTPUT!r} ({N_DEPTH_TOKENS},): re-run edgeact add-depth-tokenizer")
        self.engine = engine
        self._where = where

    def __call__(self, depth_m: np.ndarray, units_known: bool = False) -> np.ndarray:
        """The 100 codes of a depth image in metres. units_known: from a camera driver that applied the sensor's
        depth scale (only the dtype is checked: a far scene's large median is real, not millimetres)."""
        depth = np.asarray(depth_m)
        if depth.ndim != 2:
            raise EdgeactError(f"{self._where}: depth image of shape {depth.shape}; give the aligned depth as "
                               "(height, width) metres (a uint16 sensor image must be scaled by its depth unit first)")
        problem = (None if units_known and depth.dtype.kind == "f" else depth_units_problem(depth)) or \
            negative_depth_problem(depth)
        if problem:
            raise EdgeactError(f"{self._where}: the depth image {problem}")
        depth = depth.astype(np.float32, copy=False)
        if not np.isfinite(depth).all():
            depth = np.where(np.isfinite(depth), depth, np.float32(0.0))
        codes = self.engine.run({INPUT: depth})[OUTPUT]
        # The engine's output buffer is reused by its next run: the caller gets its own copy.
        codes = np.array(codes, dtype=np.int64).reshape(-1)
        if codes.min() < 0 or codes.max() >= N_DEPTH_CODES:
            raise EdgeactError(f"{self._where}: codes outside [0, {N_DEPTH_CODES}) ({codes.min()}..{codes.max()}); "
                               "the stage is not a 128-code depth tokenizer: re-export it")
        return codes


def open_depth_tokenizer(bundle: Bundle, backend: Backend) -> StageDepthTokenizer:
    """The bundle's depth tokenizer stage run by `backend` (BundleError naming the fix when it has none)."""
    if STAGE not in bundle.manifest.stages:
        raise BundleError(f"{bundle.root}: forced_depth='sensor' needs a {STAGE!r} stage (the depth VQ-VAE encoder) "
                          "and this bundle has none; add one with `edgeact add-depth-tokenizer BUNDLE --tokenizer DIR "
                          "--out NEW_BUNDLE`, or pass a depth tokenizer callable, fixed codes, or forced_depth=None")
    return StageDepthTokenizer(backend.stage(bundle, STAGE), f"{bundle.root}: stage {STAGE!r}")
