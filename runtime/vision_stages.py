"""The vision side at run time: the ViT stage once per crop into one buffer, then the connector once over all crops.

Why crop by crop: the ViT's activations grow with the crops it sees at once (a global view and
up to max_crops crops per image), and over all crops they were the largest allocation of a
policy step. One crop per call (crops_per_run=1, the default) keeps one crop's activations live
in host memory. On a GPU the activations live in the device's arena and each run is bound by
kernel launches, not arithmetic: there as many crops go in one run as the ViT engine takes
(crops_per_run=None, BundlePolicy's default on a GPU backend: every crop on onnxruntime's CUDA EP). Crops never attend to each
other, so the result is the same as one batched call. The connector cannot be split that way:
a pooled token may take patches from two neighbouring crops, so it runs once over the buffer.

Where the time goes: n_crops ViT runs (the ViT's arithmetic is the same as one batched run;
each run adds its binds, and one-crop GEMMs use the threads a little less well) plus one
connector run; the copy of each crop's features into the buffer is a few MB at most. The
crops' runs keep onnxruntime's arena regions for the next crop (an arena shrink and re-fault
after every crop cost ~6% of the vision time on the `bench` checkpoint); the last gives them back.
"""
from __future__ import annotations

from typing import Mapping, Protocol

import numpy as np

from edgeact.runtime import stage_io as io
from edgeact.runtime.errors import BundleError, ConfigError, EdgeactError
from edgeact.runtime.stage_spec import StageSpec, max_shape


class RunsStage(Protocol):
    """What both a backend's StageEngine and the plain runner's OrtStage provide."""

    spec: StageSpec

    def run(self, feeds: Mapping[str, np.ndarray], *, release: bool = True) -> dict[str, np.ndarray]:
        ...


class VisionStages:
    """images, image_masks, pooled_patches_idx -> image_features through the `vision` and `connector` stages."""

    def __init__(self, vit: RunsStage, connector: RunsStage, crops_per_run: int | None = 1):
        """crops_per_run: ViT crops per run; None: as many as the connector and the ViT engine take."""
        if crops_per_run is not None and crops_per_run < 1:
            raise ConfigError(f"crops_per_run: {crops_per_run} must be >= 1 (1 on a CPU; on a GPU, the most crops)")
        self.vit, self.connector = vit, connector
        features = _tensor(connector.spec, io.PATCH_FEATURES, inputs=True)
        produced = _tensor(vit.spec, io.PATCH_FEATURES, inputs=False)
        if tuple(produced.dims[1:]) != tuple(features.dims[1:]):
            raise BundleError(f"stage {vit.spec.name!r} writes patch_features {list(produced.dims)} but stage "
                              f"{connector.spec.name!r} reads {list(features.dims)}; re-export the bundle")
        # Sized once for the connector's most crops. np.empty maps pages lazily: only the rows an
        # observation fills become resident.
        self.features = np.empty(max_shape(features.dims, connector.spec), np.float32)
        self.max_crops = self.features.shape[0]
        # None: as many crops per run as both the connector and the ViT engine take (a TensorRT engine is built
        # for the manifest's one-crop profile; onnxruntime's CUDA EP takes the whole range).
        largest = getattr(vit, "largest", None)
        engine_limit = largest and largest(io.N_CROPS)      # None: the stage takes any count (the connector's bound)
        engine_most = engine_limit or self.max_crops
        if crops_per_run is not None and engine_limit and crops_per_run > engine_limit:
            # Found at load, not at the first frame: a TensorRT engine (native, or onnxruntime's TensorRT provider) is
            # built for its profile's crop counts and refuses more.
            raise ConfigError(f"crops_per_run: {crops_per_run}, but stage {vit.spec.name!r} takes at most "
                              f"{engine_most} crop{'s' if engine_most != 1 else ''} per run (its engine's profile); "
                              f"set crops_per_run to {engine_most} or less, or leave it unset")
        self.crops_per_run = crops_per_run or min(self.max_crops, engine_most)

    def run(self, images: np.ndarray, image_masks: np.ndarray, pooled_patches_idx: np.ndarray) -> np.ndarray:
        """(n_tokens, D): one feature per row of pooled_patches_idx, all-padding rows included.

        The result may be a view of the connector's output buffer, valid until the next run.
        """
        features = self.patch_features(images, image_masks)
        out = self.connector.run({io.PATCH_FEATURES: features, io.POOLED_PATCHES_IDX: pooled_patches_idx})
        return out[io.IMAGE_FEATURES]

    def patch_features(self, images: np.ndarray, image_masks: np.ndarray) -> np.ndarray:
        """(n_crops, n_patches, F): the ViT on crops_per_run crops at a time; a view of the buffer, valid until the next call."""
        n_crops = len(images)
        if not 1 <= n_crops <= self.max_crops or len(image_masks) != n_crops:
            raise EdgeactError(f"{n_crops} crops with {len(image_masks)} masks; this bundle's connector takes 1.."
                               f"{self.max_crops} crops, each with its mask: re-export with a larger --max-images "
                               "or preprocess fewer images per observation")
        step = self.crops_per_run
        for first in range(0, n_crops, step):
            # A slice along the first axis of a C-ordered array is contiguous: fed without a copy. Every run
            # reuses the previous run's activation memory; the last run gives it back.
            last = min(first + step, n_crops)
            out = self.vit.run({io.IMAGES: images[first:last], io.IMAGE_MASKS: image_masks[first:last]},
                               release=last == n_crops)
            self.features[first:last] = out[io.PATCH_FEATURES][:last - first]
        return self.features[:n_crops]


def _tensor(spec: StageSpec, name: str, inputs: bool):
    tensors = spec.inputs if inputs else spec.outputs
    for tensor in tensors:
        if tensor.name == name:
            return tensor
    kind = "input" if inputs else "output"
    raise BundleError(f"stage {spec.name!r} has no {kind} {name!r} (it has {[t.name for t in tensors]}); the bundle "
                      "predates the vision/connector split or was edited: re-export it")
