"""The vision runner: ViT crop by crop into one buffer, then the connector over every crop; refusals name the fix."""
from __future__ import annotations

import numpy as np
import pytest

from edgeact.runtime import stage_io as io
from edgeact.runtime.errors import BundleError, ConfigError, EdgeactError
from edgeact.runtime.stage_spec import StageSpec, TensorSpec
from edgeact.runtime.vision_stages import VisionStages

N_PATCHES, PATCH_DIM, WIDTH, MAX_CROPS = 4, 6, 3, 5


class FakeVit:
    """Patch features = the first WIDTH pixel values of each patch, scaled by its mask; records each call's crops."""

    def __init__(self, width: int = WIDTH):
        self.spec = StageSpec(io.VISION_STAGE, "stages/vision.onnx", "fp32",
                              [TensorSpec(io.IMAGES, "float32", (io.N_CROPS, N_PATCHES, PATCH_DIM)),
                               TensorSpec(io.IMAGE_MASKS, "float32", (io.N_CROPS, N_PATCHES))],
                              [TensorSpec(io.PATCH_FEATURES, "float32", (io.N_CROPS, N_PATCHES, width))],
                              dim_ranges={io.N_CROPS: (1, 1, MAX_CROPS)})
        self.crops_per_call: list[int] = []
        self.released: list[bool] = []

    def run(self, feeds, *, release=True):
        images, masks = feeds[io.IMAGES], feeds[io.IMAGE_MASKS]
        self.crops_per_call.append(len(images))
        self.released.append(release)
        return {io.PATCH_FEATURES: images[..., :WIDTH] * masks[..., None]}


class FakeConnector:
    """image_features = the sum of the pooled patches' features (flat index over crops x patches)."""

    def __init__(self):
        self.spec = StageSpec(io.CONNECTOR_STAGE, "stages/connector.onnx", "fp32",
                              [TensorSpec(io.PATCH_FEATURES, "float32", (io.N_CROPS, N_PATCHES, WIDTH)),
                               TensorSpec(io.POOLED_PATCHES_IDX, "int64", (io.N_TOKENS, 2))],
                              [TensorSpec(io.IMAGE_FEATURES, "float32", (io.N_TOKENS, WIDTH))],
                              dim_ranges={io.N_CROPS: (1, 2, MAX_CROPS), io.N_TOKENS: (1, 4, 16)})

    def run(self, feeds, *, release=True):
        flat = feeds[io.PATCH_FEATURES].reshape(-1, WIDTH)
        idx = feeds[io.POOLED_PATCHES_IDX]
        return {io.IMAGE_FEATURES: (flat[idx.clip(0)] * (idx >= 0)[..., None]).sum(1)}


def test_each_crop_is_one_vit_call_and_tokens_may_pool_across_crops():
    rng = np.random.default_rng(0)
    images = rng.standard_normal((3, N_PATCHES, PATCH_DIM)).astype(np.float32)
    masks = rng.uniform(size=(3, N_PATCHES)).astype(np.float32)
    idx = np.array([[0, 1], [3, 4], [7, 8], [11, -1]])        # tokens 1 and 2 straddle crop seams
    vision = VisionStages(FakeVit(), FakeConnector())
    got = vision.run(images, masks, idx)
    assert vision.vit.crops_per_call == [1, 1, 1]
    assert vision.vit.released == [False, False, True]       # crops reuse one crop's memory; the last gives it back
    features = (images[..., :WIDTH] * masks[..., None]).reshape(-1, WIDTH)
    want = np.stack([features[0] + features[1], features[3] + features[4], features[7] + features[8], features[11]])
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # The buffer is allocated once, for the connector's most crops, and reused by the next observation.
    buffer = vision.features
    assert buffer.shape == (MAX_CROPS, N_PATCHES, WIDTH)
    vision.run(images[:1], masks[:1], idx[:1])
    assert vision.features is buffer and vision.vit.crops_per_call == [1, 1, 1, 1]


@pytest.mark.parametrize("per_run, calls", [(2, [2, 2, 1]), (5, [5]), (9, [5])])
def test_crops_per_run_batches_the_vit_with_the_same_features(per_run, calls):
    rng = np.random.default_rng(1)
    images = rng.standard_normal((5, N_PATCHES, PATCH_DIM)).astype(np.float32)
    masks = rng.uniform(size=(5, N_PATCHES)).astype(np.float32)
    idx = np.array([[0, 5], [9, 13], [19, -1]])
    one = VisionStages(FakeVit(), FakeConnector()).run(images, masks, idx).copy()
    vision = VisionStages(FakeVit(), FakeConnector(), crops_per_run=per_run)
    np.testing.assert_array_equal(vision.run(images, masks, idx), one)
    assert vision.vit.crops_per_call == calls and vision.vit.released == [False] * (len(calls) - 1) + [True]


def test_unset_crops_per_run_takes_what_the_vit_engine_takes():
    class OneCropEngine(FakeVit):
        def largest(self, symbol):
            return {io.N_CROPS: 2}.get(symbol)

    assert VisionStages(FakeVit(), FakeConnector(), crops_per_run=None).crops_per_run == MAX_CROPS
    vision = VisionStages(OneCropEngine(), FakeConnector(), crops_per_run=None)
    images = np.ones((3, N_PATCHES, PATCH_DIM), np.float32)
    vision.patch_features(images, np.ones((3, N_PATCHES), np.float32))
    assert vision.crops_per_run == 2 and vision.vit.crops_per_call == [2, 1]


def test_more_crops_per_run_than_the_vit_engine_takes_is_refused_at_load():
    """A TensorRT engine is built for its profile's crop counts: more per run would fail at the first frame."""
    class TwoCropEngine(FakeVit):
        def largest(self, symbol):
            return {io.N_CROPS: 2}.get(symbol)

    with pytest.raises(ConfigError, match=r"crops_per_run: 3, but stage .* takes at most 2 crops per run \(its "
                                          r"engine's profile\); set crops_per_run to 2 or less"):
        VisionStages(TwoCropEngine(), FakeConnector(), crops_per_run=3)
    assert VisionStages(TwoCropEngine(), FakeConnector(), crops_per_run=2).crops_per_run == 2


def test_crops_per_run_below_one_is_refused():
    with pytest.raises(ConfigError, match="crops_per_run: 0 must be >= 1"):
        VisionStages(FakeVit(), FakeConnector(), crops_per_run=0)


def test_too_many_crops_or_a_missing_mask_is_refused_before_any_run():
    vision = VisionStages(FakeVit(), FakeConnector())
    images = np.zeros((MAX_CROPS + 1, N_PATCHES, PATCH_DIM), np.float32)
    with pytest.raises(EdgeactError, match=rf"6 crops with 6 masks; this bundle's connector takes 1..{MAX_CROPS} "
                                           r"crops.*re-export with a larger --max-images"):
        vision.run(images, np.ones(images.shape[:2], np.float32), np.zeros((1, 2), np.int64))
    with pytest.raises(EdgeactError, match="2 crops with 1 masks"):
        vision.patch_features(images[:2], np.ones((1, N_PATCHES), np.float32))
    assert vision.vit.crops_per_call == []


def test_stages_that_do_not_fit_together_are_refused_with_the_fix():
    with pytest.raises(BundleError, match=r"writes patch_features .* but stage 'connector' reads .*re-export"):
        VisionStages(FakeVit(width=WIDTH + 1), FakeConnector())
    with pytest.raises(BundleError, match=r"stage 'vision' has no input 'patch_features'.*predates the vision/connector"):
        VisionStages(FakeVit(), FakeVit())
