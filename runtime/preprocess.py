"""Camera frame -> MolmoAct image inputs (global view + overlapping crops, patchified, pooling indices); numpy + Pillow.

What the model receives for one RGB frame (MOLMOACT_FORMAT.md, "Model inputs"):

- crop 0 is the global view: the whole frame resized to the ViT input size S x S (aspect kept
  and centred on padding in resize mode "pad", plain resize in "stretch");
- crops 1.. are Molmo's overlap-and-resize crops: the frame is resized to
  (rows*window + margins) x (cols*window + margins) and cut into S x S crops every `window`
  pixels, so neighbours overlap by the margins; the tiling is the one of at most `max_crops`
  crops that needs the least upscaling (or, if every tiling downscales, the least downscaling);
- `images[k, n]` is patch n of crop k, patches row-major over the crop, each flattened in
  (py, px, channel) order -- the order of the ViT's patch-embedding weight columns;
- `image_masks[k, n]` is the share of real (non-padding) pixels in that patch;
- `pooled_patches_idx[t]` lists the patches (indices into the flattened crops x patches) that
  image token t pools, -1 for padding where a grid side is not a multiple of the pooling size;
  the global view's tokens come first, then ONE stitched grid over all crops in which each crop
  contributes only its patches outside the overlap margins (Molmo-style), so every region of
  the frame is pooled exactly once;
- `grids` holds (rows, cols) of pooled tokens of each of those two grids; the prompt lays out
  `<im_start>` + rows x (`<im_patch>` x cols + `<im_col>`) + `<im_end>` for each.

Padding pixels are 0 before normalization (black), as in Molmo. Resizing is Pillow bilinear
in float32, which antialiases when shrinking (torch `interpolate(..., antialias=True)` agrees
to about 1e-4); published MolmoAct "siglip" resizing does not antialias, so a frame larger
than the crops differs slightly from the published processor in "stretch" mode.

Everything that depends only on the frame size (tiling, masks, indices, scratch canvases) is
computed once per size and reused, so a frame costs two resizes, one normalization and the
patch copies; the caller may pass a preallocated `out` for `images`. Not thread-safe: use one
ImagePreprocessor per thread.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image

from edgeact.runtime.arm_config import ArmConfig
from edgeact.runtime.errors import EdgeactError
from edgeact.runtime.preprocess_config import PreprocessConfig

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
GRIDS_PER_IMAGE = 2   # the global view's token grid, then the stitched high-resolution grid


class ImageFormatError(EdgeactError, ValueError):
    """A frame is not an RGB uint8 array of shape (H, W, 3)."""


@dataclass(frozen=True)
class ImageInputs:
    images: np.ndarray              # (n_crops, n_patches, 3*p*p) float32
    image_masks: np.ndarray         # (n_crops, n_patches) float32, share of real pixels
    pooled_patches_idx: np.ndarray  # (n_image_tokens, pool_h*pool_w) int64, -1 = padding
    grids: tuple[tuple[int, int], ...]  # (rows, cols) of image tokens, GRIDS_PER_IMAGE per image

    @property
    def n_image_tokens(self) -> int:
        return int(self.pooled_patches_idx.shape[0])

    @property
    def n_images(self) -> int:
        return len(self.grids) // GRIDS_PER_IMAGE


def concat_image_inputs(parts: Sequence[ImageInputs]) -> ImageInputs:
    """Join several cameras' inputs into one (indices shifted onto the joined crops)."""
    if not parts:
        raise ValueError("concat_image_inputs needs at least one ImageInputs")
    idx, offset = [], 0
    for part in parts:
        idx.append(np.where(part.pooled_patches_idx >= 0, part.pooled_patches_idx + offset, -1))
        offset += part.images.shape[0] * part.images.shape[1]
    return ImageInputs(
        images=np.concatenate([p.images for p in parts]),
        image_masks=np.concatenate([p.image_masks for p in parts]),
        pooled_patches_idx=np.concatenate(idx),
        grids=tuple(g for p in parts for g in p.grids),
    )


def select_tiling(height: float, width: float, window_px: int, max_crops: int) -> tuple[int, int]:
    """(rows, cols) of crop windows for a frame of height x width (margins already taken off)."""
    tilings = sorted(((i, j) for i in range(1, max_crops + 1) for j in range(1, max_crops + 1) if i * j <= max_crops),
                     key=lambda t: (t[0] * t[1], t[0]))   # ties go to fewer crops, then fewer rows
    sizes = np.array(tilings, dtype=np.float32) * np.float32(window_px)
    # A frame smaller than the margins has no size left: let that side never limit the scale.
    frame = np.array([height, width], dtype=np.float32)
    with np.errstate(divide="ignore"):
        scale = np.where(frame > 0, sizes / np.maximum(frame, 1e-30), np.inf).min(axis=1)
    if np.all(scale < 1):
        best = int(np.argmax(scale))      # forced to shrink: shrink the least
    else:
        best = int(np.argmin(np.where(scale < 1, np.inf, scale)))  # enlarge the least
    return tilings[best]


def pool_index(patch_idx: np.ndarray, pool_h: int, pool_w: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Group a (rows, cols) grid of patch indices into pool_h x pool_w tokens, padding with -1."""
    rows, cols = patch_idx.shape
    pad_h, pad_w = -rows % pool_h, -cols % pool_w
    padded = np.pad(patch_idx, [(pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2)], constant_values=-1)
    th, tw = padded.shape[0] // pool_h, padded.shape[1] // pool_w
    tokens = padded.reshape(th, pool_h, tw, pool_w).transpose(0, 2, 1, 3).reshape(th * tw, pool_h * pool_w)
    return tokens.astype(np.int64), (th, tw)


def patchify_into(src: np.ndarray, dst: np.ndarray, patch: int) -> None:
    """Copy an (H, W, C) image into dst (n_patches, patch*patch*C): row-major patches, (py, px, c) inside."""
    h, w, c = src.shape
    hp, wp = h // patch, w // patch
    np.copyto(dst.reshape(hp, wp, patch, patch, c), src.reshape(hp, patch, wp, patch, c).transpose(0, 2, 1, 3, 4))


@dataclass(frozen=True)
class _Resize:
    """Where a frame lands on a canvas: resized to (height, width) at (top, left)."""
    height: int
    width: int
    top: int
    left: int


@dataclass(frozen=True)
class _Plan:
    """Everything about a frame size that does not depend on the pixels."""
    global_view: _Resize
    hires: _Resize
    tiling: tuple[int, int]
    global_canvas: np.ndarray   # (S, S, 3) float32 scratch; padding pre-normalized
    hires_canvas: np.ndarray    # (Hs, Ws, 3) float32 scratch; padding pre-normalized
    image_masks: np.ndarray     # read-only
    pooled_patches_idx: np.ndarray  # read-only
    grids: tuple[tuple[int, int], ...]


class ImagePreprocessor:
    """Turns RGB uint8 frames into ImageInputs for one model; plans are cached per frame size."""

    def __init__(self, cfg: ArmConfig, config: PreprocessConfig | None = None):
        self.config = config or PreprocessConfig.for_model(cfg)
        self.config.check(cfg)
        v = cfg.vit_config
        self.crop_px = int(v.image_default_input_size[0])
        self.patch_px = int(v.image_patch_size)
        self.crop_patches = self.crop_px // self.patch_px
        self.n_patches = self.crop_patches ** 2
        self.patch_dim = 3 * self.patch_px ** 2
        left, right = self.config.overlap_margins
        self.window_px = (self.crop_patches - left - right) * self.patch_px
        self.margin_px = (left + right) * self.patch_px
        if self.config.normalize_mode == "siglip":
            self._scale = np.full(3, 2.0 / 255.0, dtype=np.float32)
            self._shift = np.full(3, -1.0, dtype=np.float32)
        else:  # (x/255 - mean)/std, folded into one multiply-add
            std = np.array(OPENAI_CLIP_STD, dtype=np.float32)
            self._scale = (1.0 / (255.0 * std)).astype(np.float32)
            self._shift = (-np.array(OPENAI_CLIP_MEAN, dtype=np.float32) / std).astype(np.float32)
        self._plans: dict[tuple[int, int], _Plan] = {}

    def n_crops(self, height: int, width: int) -> int:
        rows, cols = self.plan(height, width).tiling
        return 1 + rows * cols

    def allocate(self, height: int, width: int) -> np.ndarray:
        """An `images` buffer for frames of this size, to pass as `out` on every frame."""
        return np.empty((self.n_crops(height, width), self.n_patches, self.patch_dim), dtype=np.float32)

    def __call__(self, rgb: np.ndarray, out: np.ndarray | None = None) -> ImageInputs:
        if not (isinstance(rgb, np.ndarray) and rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3):
            got = f"{rgb.dtype} {rgb.shape}" if isinstance(rgb, np.ndarray) else type(rgb).__name__
            raise ImageFormatError(f"expected an RGB uint8 frame of shape (H, W, 3), got {got}; convert BGR/RGBA/float frames first")
        plan = self.plan(rgb.shape[0], rgb.shape[1])
        n_crops = plan.image_masks.shape[0]
        if out is None:
            out = np.empty((n_crops, self.n_patches, self.patch_dim), dtype=np.float32)
        elif out.shape != (n_crops, self.n_patches, self.patch_dim) or out.dtype != np.float32 or not out.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous float32 array of shape {(n_crops, self.n_patches, self.patch_dim)}; "
                             f"got {out.dtype} {out.shape}; use allocate({rgb.shape[0]}, {rgb.shape[1]})")

        # Where the time goes (640x480 frame, 378 px crops, 2x2 tiling: ~10 ms on one x86 core):
        # two thirds in Pillow's resizes, the rest in normalization and the patch copies.
        # Mode "F" keeps the interpolation in float32, like the training pipeline's torch resize;
        # the three channel images are made once and resized twice.
        channels = [Image.fromarray(np.ascontiguousarray(rgb[:, :, c], dtype=np.float32)) for c in range(3)]
        self._render(rgb, channels, plan.global_view, plan.global_canvas)
        patchify_into(plan.global_canvas, out[0], self.patch_px)
        self._render(rgb, channels, plan.hires, plan.hires_canvas)
        rows, cols = plan.tiling
        s, win = self.crop_px, self.window_px
        for i in range(rows):
            for j in range(cols):
                crop = plan.hires_canvas[i * win:i * win + s, j * win:j * win + s]
                patchify_into(crop, out[1 + i * cols + j], self.patch_px)
        return ImageInputs(out, plan.image_masks, plan.pooled_patches_idx, plan.grids)

    def plan(self, height: int, width: int) -> _Plan:
        key = (int(height), int(width))
        if key not in self._plans:
            self._plans[key] = self._make_plan(*key)
        return self._plans[key]

    # --- per frame -------------------------------------------------------------------------

    def _render(self, rgb: np.ndarray, channels: list[Image.Image], where: _Resize, canvas: np.ndarray) -> None:
        """Resize the frame into its place on the canvas and normalize that region (padding stays as planned)."""
        region = canvas[where.top:where.top + where.height, where.left:where.left + where.width]
        if (where.height, where.width) == rgb.shape[:2]:
            np.copyto(region, rgb, casting="unsafe")
        else:
            for c, channel in enumerate(channels):
                region[:, :, c] = np.asarray(channel.resize((where.width, where.height), Image.Resampling.BILINEAR))
        region *= self._scale
        region += self._shift

    # --- per frame size --------------------------------------------------------------------

    def _fit(self, height: int, width: int, out_h: int, out_w: int) -> _Resize:
        if self.config.resize_mode == "stretch":
            return _Resize(out_h, out_w, 0, 0)
        # float32 like Molmo's processor, so the scaled size rounds the same way.
        scale = min(np.float32(out_h) / np.float32(height), np.float32(out_w) / np.float32(width))
        h = max(1, int(np.float32(height) * scale))
        w = max(1, int(np.float32(width) * scale))
        return _Resize(h, w, (out_h - h) // 2, (out_w - w) // 2)

    def _canvas(self, out_h: int, out_w: int) -> np.ndarray:
        canvas = np.zeros((out_h, out_w, 3), dtype=np.float32)
        canvas += self._shift   # black padding, already normalized
        return canvas

    def _masks(self, where: _Resize, out_h: int, out_w: int) -> np.ndarray:
        real = np.zeros((out_h, out_w, 1), dtype=np.float32)
        real[where.top:where.top + where.height, where.left:where.left + where.width] = 1.0
        return real

    def _make_plan(self, height: int, width: int) -> _Plan:
        if height < 1 or width < 1:
            raise ImageFormatError(f"frame of {height}x{width} px has no pixels")
        s, p, cp = self.crop_px, self.patch_px, self.crop_patches
        pool_h, pool_w = self.config.pooling
        left, right = self.config.overlap_margins
        rows, cols = select_tiling(height - self.margin_px, width - self.margin_px, self.window_px, self.config.max_crops)
        hires_h, hires_w = rows * self.window_px + self.margin_px, cols * self.window_px + self.margin_px
        global_view = self._fit(height, width, s, s)
        hires = self._fit(height, width, hires_h, hires_w)
        n_crops = 1 + rows * cols

        # Share of real pixels per patch, computed from a 0/1 pixel mask cut exactly like the image.
        masks = np.empty((n_crops, self.n_patches, p * p), dtype=np.float32)
        patchify_into(self._masks(global_view, s, s), masks[0], p)
        hires_real = self._masks(hires, hires_h, hires_w)
        win = self.window_px
        for i in range(rows):
            for j in range(cols):
                patchify_into(hires_real[i * win:i * win + s, j * win:j * win + s], masks[1 + i * cols + j], p)
        image_masks = masks.mean(axis=-1)

        # Stitched grid: each crop keeps its patches outside the margins shared with a neighbour.
        def kept(k: int, n: int) -> slice:
            return slice(0 if k == 0 else left, cp if k == n - 1 else cp - right)

        crop_idx = np.arange(rows * cols * self.n_patches, dtype=np.int64).reshape(rows, cols, cp, cp) + self.n_patches
        stitched = np.block([[crop_idx[i, j][kept(i, rows), kept(j, cols)] for j in range(cols)] for i in range(rows)])
        assert stitched.shape == (hires_h // p, hires_w // p)
        global_tokens, global_grid = pool_index(np.arange(self.n_patches, dtype=np.int64).reshape(cp, cp), pool_h, pool_w)
        hires_tokens, hires_grid = pool_index(stitched, pool_h, pool_w)
        pooled = np.concatenate([global_tokens, hires_tokens])

        image_masks.flags.writeable = False
        pooled.flags.writeable = False
        return _Plan(
            global_view=global_view, hires=hires, tiling=(rows, cols),
            global_canvas=self._canvas(s, s), hires_canvas=self._canvas(hires_h, hires_w),
            image_masks=image_masks, pooled_patches_idx=pooled, grids=(global_grid, hires_grid),
        )
