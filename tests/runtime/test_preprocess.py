"""Image preprocessing: crop tiling, masks, pooling indices, and pixel values against a torch reference."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edgeact.runtime.arm_config import AdapterConfig, ArmConfig, LlmConfig, VitConfig
from edgeact.runtime.errors import ConfigError, EdgeactError
from edgeact.runtime.preprocess import (
    OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageFormatError, ImagePreprocessor, concat_image_inputs, pool_index, select_tiling,
)
from edgeact.runtime.preprocess_config import PreprocessConfig


def arm_config(size: int = 378, variant: str = "D") -> ArmConfig:
    n = (size // 14) ** 2
    if variant == "D":
        return ArmConfig(VitConfig(image_default_input_size=[size, size], image_num_pos=n), AdapterConfig(), LlmConfig(), image_patch_id=1026)
    vit = VitConfig(image_default_input_size=[size, size], image_num_pos=n + 1, use_cls_token=True,
                    hidden_act="quick_gelu", patch_bias=False, pre_layernorm=True)
    return ArmConfig(vit, AdapterConfig(), LlmConfig(use_qk_norm=True, norm_after=True), image_patch_id=1026)


def frame(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def torch_canvas(rgb, canvas_hw, resized_hw, top):
    """Reference: torch antialiased bilinear resize, centred on black padding, SigLIP-normalized; (3, H, W)."""
    x = torch.from_numpy(rgb).permute(2, 0, 1).float()[None]
    resized = F.interpolate(x, size=resized_hw, mode="bilinear", antialias=True, align_corners=False)[0]
    canvas = torch.zeros(3, *canvas_hw)
    left = (canvas_hw[1] - resized_hw[1]) // 2
    canvas[:, top:top + resized_hw[0], left:left + resized_hw[1]] = resized
    return canvas / 255.0 * 2.0 - 1.0


def torch_patches(canvas, p=14):
    """(3, H, W) -> (n_patches, p*p*3) with each patch in (py, px, c) order, via unfold."""
    cols = F.unfold(canvas[None], kernel_size=p, stride=p)[0]          # (c*p*p, L), rows in (c, py, px) order
    return cols.reshape(3, p, p, -1).permute(3, 1, 2, 0).reshape(cols.shape[1], -1).numpy()


@pytest.fixture(scope="module")
def camera_640x480():
    pp = ImagePreprocessor(arm_config(378))
    rgb = frame(480, 640)
    return pp, rgb, pp(rgb)


def test_small_camera_image_is_one_crop_of_392_pooled_tokens():
    pp = ImagePreprocessor(arm_config(378))
    out = pp(frame(256, 256))
    assert out.images.shape == (2, 729, 588) and out.images.dtype == np.float32
    assert out.image_masks.shape == (2, 729) and np.all(out.image_masks == 1.0)   # square: no padding
    assert out.pooled_patches_idx.shape == (392, 4) and out.pooled_patches_idx.dtype == np.int64
    assert out.grids == ((14, 14), (14, 14))
    assert pp(frame(10, 10)).grids == ((14, 14), (14, 14))       # smaller than the margins: still one crop


def test_640x480_camera_tiles_2x2_and_pads(camera_640x480):
    pp, _, out = camera_640x480
    assert pp.plan(480, 640).tiling == (2, 2)
    assert out.images.shape == (5, 729, 588)
    assert out.grids == ((14, 14), (23, 23))                      # 2*19+8 = 46 patches a side
    assert out.n_image_tokens == 196 + 529
    # Global view: 640x480 -> 378x283 at row 47; patch rows 3 and 23 are partly padding.
    rows = out.image_masks[0].reshape(27, 27)
    assert np.all(rows[:3] == 0) and np.all(rows[24:] == 0) and np.all(rows[4:23] == 1)
    np.testing.assert_allclose(rows[3], 9 / 14, rtol=1e-6)
    np.testing.assert_allclose(rows[23], 8 / 14, rtol=1e-6)
    # High-res canvas 644x644, frame at rows 80..562: crop (0,0) row 5 has 4 real rows, crop (1,0) row 21 has 3.
    top_left, bottom_left = out.image_masks[1].reshape(27, 27), out.image_masks[3].reshape(27, 27)
    assert np.all(top_left[:5] == 0) and np.all(top_left[6:] == 1)
    np.testing.assert_allclose(top_left[5], 4 / 14, rtol=1e-6)
    np.testing.assert_allclose(bottom_left[21], 3 / 14, rtol=1e-6)
    assert np.all(bottom_left[:21] == 1) and np.all(bottom_left[22:] == 0)


def test_global_tokens_pool_each_patch_once_with_minus_one_padding(camera_640x480):
    _, _, out = camera_640x480
    glob = out.pooled_patches_idx[:196]
    assert np.count_nonzero(glob == -1) == 28 * 28 - 729
    assert sorted(glob[glob >= 0].tolist()) == list(range(729))


def test_high_res_tokens_form_one_stitched_grid_over_the_crops(camera_640x480):
    _, _, out = camera_640x480
    hires = out.pooled_patches_idx[196:].reshape(23, 23, 2, 2)
    assert hires.min() >= 729 and len(np.unique(hires)) == hires.size   # no padding, no patch twice
    # Where each patch sits in the frame: crop (i, j) starts 19 patches (the window) after its neighbour.
    crop, within = divmod(hires - 729, 729)
    i, j = divmod(crop, 2)
    pr, pc = divmod(within, 27)
    r, c, dh, dw = np.meshgrid(np.arange(23), np.arange(23), np.arange(2), np.arange(2), indexing="ij")
    assert np.array_equal(i * 19 + pr, 2 * r + dh) and np.array_equal(j * 19 + pc, 2 * c + dw)
    # Crop (0,0) keeps columns 0..22 of its row 0; its right neighbour (0,1) takes over at its column 4.
    stitched = hires.transpose(0, 2, 1, 3).reshape(46, 46)
    assert stitched[0, 22] == 729 + 22 and stitched[0, 23] == 2 * 729 + 4


def test_pixels_match_torch_reference(camera_640x480):
    _, rgb, out = camera_640x480
    glob = torch_canvas(rgb, (378, 378), (283, 378), top=47)
    np.testing.assert_allclose(out.images[0], torch_patches(glob), atol=5e-4)
    hires = torch_canvas(rgb, (644, 644), (483, 644), top=80)
    for k, (i, j) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        crop = hires[:, i * 266:i * 266 + 378, j * 266:j * 266 + 378]
        np.testing.assert_allclose(out.images[1 + k], torch_patches(crop), atol=5e-4)
    # The stitched tokens point at the patches that tile the high-res canvas in order.
    grid = torch_patches(hires).reshape(46, 46, -1)
    idx = out.pooled_patches_idx[196:].reshape(23, 23, 2, 2).transpose(0, 2, 1, 3).reshape(46, 46)
    np.testing.assert_allclose(out.images.reshape(-1, 588)[idx], grid, atol=5e-4)


def test_stretch_mode_resizes_without_padding():
    cfg = arm_config(378)
    pp = ImagePreprocessor(cfg, PreprocessConfig.for_model(cfg, resize_mode="stretch"))
    rgb = frame(120, 200, seed=1)
    out = pp(rgb)
    assert np.all(out.image_masks == 1.0)
    np.testing.assert_allclose(out.images[0], torch_patches(torch_canvas(rgb, (378, 378), (378, 378), top=0)), atol=5e-4)


def test_56px_config_tiling_and_token_grids():
    cfg = arm_config(56)
    pp = ImagePreprocessor(cfg)
    assert pp.config.overlap_margins == (1, 1)     # 4 patches a side: margins shrink to fit
    # 100x60 minus 28 px of margins = 72x32 over 28-px windows: 3x2 is the smallest tiling that covers it.
    assert select_tiling(72, 32, 28, 8) == (3, 2)
    out = pp(frame(100, 60))
    assert out.images.shape == (7, 16, 588)
    assert out.grids == ((2, 2), (4, 3))            # canvas 112x84 = 8x6 patches
    assert out.pooled_patches_idx.shape == (16, 4)


def test_odd_grid_pools_27_patches_into_14_tokens_padding_the_end():
    tokens, grid = pool_index(np.arange(729).reshape(27, 27), 2, 2)
    assert grid == (14, 14) and tokens.shape == (196, 4)
    assert tokens[0].tolist() == [0, 1, 27, 28]
    assert tokens[13].tolist() == [26, -1, 53, -1]
    assert tokens[182].tolist() == [702, 703, -1, -1]
    assert tokens[195].tolist() == [728, -1, -1, -1]


def test_normalization_siglip_and_openai_clip():
    rgb = np.zeros((378, 378, 3), dtype=np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 0, 255, 51
    out = ImagePreprocessor(arm_config(378))(rgb).images[0].reshape(729, 196, 3)
    np.testing.assert_allclose(out[..., 0], -1.0, atol=1e-6)
    np.testing.assert_allclose(out[..., 1], 1.0, atol=1e-6)
    np.testing.assert_allclose(out[..., 2], -0.6, atol=1e-6)
    rgb_o = np.full((336, 336, 3), (10, 200, 255), dtype=np.uint8)
    pp_o = ImagePreprocessor(arm_config(336, "O"))
    assert pp_o.config.normalize_mode == "openai"
    out_o = pp_o(rgb_o)
    assert out_o.images.shape == (2, 576, 588) and out_o.grids == ((12, 12), (12, 12))
    expected = (np.array([10, 200, 255]) / 255 - np.array(OPENAI_CLIP_MEAN)) / np.array(OPENAI_CLIP_STD)
    np.testing.assert_allclose(out_o.images[0].reshape(576, 196, 3), np.broadcast_to(expected, (576, 196, 3)), atol=1e-5)


def test_preallocated_output_is_filled_in_place(camera_640x480):
    pp, rgb, out = camera_640x480
    buf = pp.allocate(480, 640)
    again = pp(rgb, out=buf)
    assert again.images is buf and np.array_equal(buf, out.images)
    with pytest.raises(ValueError, match="allocate"):
        pp(rgb, out=np.empty((2, 729, 588), dtype=np.float32))


def test_bad_frames_are_refused():
    pp = ImagePreprocessor(arm_config(56))
    with pytest.raises(ImageFormatError, match="RGB uint8"):
        pp(np.zeros((60, 80, 3), dtype=np.float32))
    with pytest.raises(ImageFormatError, match="RGB uint8"):
        pp(np.zeros((60, 80, 4), dtype=np.uint8))


def test_two_cameras_concatenate_with_shifted_indices():
    pp = ImagePreprocessor(arm_config(378))
    a, b = pp(frame(256, 256, 1)), pp(frame(200, 300, 2))
    both = concat_image_inputs([a, b])
    assert both.n_images == 2 and both.images.shape[0] == a.images.shape[0] + b.images.shape[0]
    second = both.pooled_patches_idx[a.n_image_tokens:]
    shift = a.images.shape[0] * 729
    assert np.array_equal(second, np.where(b.pooled_patches_idx >= 0, b.pooled_patches_idx + shift, -1))


def test_preprocess_config_file_round_trip_and_checks(tmp_path):
    cfg = PreprocessConfig(max_crops=6, overlap_margins=(2, 3), resize_mode="stretch")
    cfg.save(tmp_path)
    assert PreprocessConfig.load(tmp_path) == cfg
    published = {"crop_mode": "overlap-and-resize-c2", "resize_mode": "siglip", "normalize_mode": "siglip",
                 "max_crops": 8, "overlap_margins": [4, 4], "image_pooling_h": 2, "image_pooling_w": 2}
    assert PreprocessConfig.from_dict(published).resize_mode == "stretch"
    # a file that leaves keys out gets the model's defaults: an -O model normalizes as OpenAI CLIP
    sparse = {"max_crops": 4}
    assert PreprocessConfig.from_dict(sparse, cfg=arm_config(378, "O")) == PreprocessConfig.for_model(
        arm_config(378, "O"), max_crops=4)
    assert PreprocessConfig.from_dict(sparse, cfg=arm_config(378, "O")).normalize_mode == "openai"
    assert PreprocessConfig.from_dict(sparse, cfg=arm_config(378, "D")).normalize_mode == "siglip"
    (tmp_path / "preprocessor_config.json").write_text('{"max_crops": 4}')
    assert PreprocessConfig.load(tmp_path, arm_config(378, "O")).normalize_mode == "openai"
    with pytest.raises(ConfigError, match="normalize_mode"):
        PreprocessConfig(normalize_mode="imagenet")
    with pytest.raises(ConfigError, match="no crop window"):
        ImagePreprocessor(arm_config(56), PreprocessConfig(overlap_margins=(4, 4)))


@pytest.mark.parametrize("content, message", [
    (b"\x89PNG\r\n\x1a\n\x00", r"preprocessor_config\.json: not valid JSON \('utf-8' codec can't decode.*re-download"),
    (b"[2, 2]", r"preprocessor_config\.json: the top level is a JSON list, not an object of preprocessor settings"),
])
def test_a_preprocessor_config_that_is_not_an_object_is_named(tmp_path, content, message):
    (tmp_path / "preprocessor_config.json").write_bytes(content)
    with pytest.raises(EdgeactError, match=message):
        PreprocessConfig.load(tmp_path, arm_config(378))
