"""`preprocessor_config.json`: how a camera image becomes crops (tiling, margins, pooling, normalization)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeact.runtime.arm_config import ArmConfig
from edgeact.runtime.errors import CheckpointError, ConfigError

FILE_NAME = "preprocessor_config.json"
NORMALIZE_MODES = ("siglip", "openai")   # SigLIP2 (-D): x*2-1; OpenAI CLIP (-O): (x-mean)/std
RESIZE_MODES = ("pad", "stretch")        # aspect-preserving with padding, or plain resize
# Published MolmoAct processors name the resize modes after the backbone; map them onto ours.
_RESIZE_ALIASES = {"default": "pad", "siglip": "stretch"}
# Molmo's margin for 27x27-patch crops; small test configs get a proportionally smaller one.
_DEFAULT_MARGIN_PATCHES = 4


@dataclass(frozen=True)
class PreprocessConfig:
    max_crops: int = 8                          # high-resolution crops per image, besides the global view
    overlap_margins: tuple[int, int] = (4, 4)   # (left/top, right/bottom) overlap of neighbouring crops, in patches
    pooling: tuple[int, int] = (2, 2)           # (rows, cols) of patches pooled into one image token
    normalize_mode: str = "siglip"
    resize_mode: str = "pad"

    def __post_init__(self) -> None:
        object.__setattr__(self, "overlap_margins", tuple(int(m) for m in self.overlap_margins))
        object.__setattr__(self, "pooling", tuple(int(p) for p in self.pooling))
        if self.max_crops < 1:
            raise ConfigError(f"max_crops is {self.max_crops}; use at least 1 (8 in published MolmoAct)")
        if len(self.overlap_margins) != 2 or min(self.overlap_margins) < 0:
            raise ConfigError(f"overlap_margins {self.overlap_margins} must be two patch counts >= 0, e.g. [4, 4]")
        if len(self.pooling) != 2 or min(self.pooling) < 1:
            raise ConfigError(f"pooling {self.pooling} must be two sizes >= 1, e.g. [2, 2]")
        if self.normalize_mode not in NORMALIZE_MODES:
            raise ConfigError(f"normalize_mode {self.normalize_mode!r} unknown; use one of {', '.join(NORMALIZE_MODES)}")
        if self.resize_mode not in RESIZE_MODES:
            raise ConfigError(f"resize_mode {self.resize_mode!r} unknown; use one of {', '.join(RESIZE_MODES)}")

    @classmethod
    def for_model(cls, cfg: ArmConfig, **overrides: Any) -> "PreprocessConfig":
        """Defaults that fit `cfg`: normalization of its ViT, margins that fit its crop size."""
        patches = cfg.vit_config.patches_per_side[0]
        margin = min(_DEFAULT_MARGIN_PATCHES, patches // 4)
        fields: dict[str, Any] = dict(
            overlap_margins=(margin, margin),
            normalize_mode="openai" if cfg.variant == "O" else "siglip",
        )
        fields.update(overrides)
        out = cls(**fields)
        out.check(cfg)
        return out

    def check(self, cfg: ArmConfig, source: str = FILE_NAME) -> None:
        """Raise ConfigError where this config cannot tile crops of `cfg`'s ViT."""
        v = cfg.vit_config
        h, w = v.image_default_input_size
        if h != w:
            raise ConfigError(f"{source}: overlapping crops need a square ViT input, got {h}x{w}")
        if h % v.image_patch_size:
            raise ConfigError(f"{source}: ViT input {h} px is not a multiple of the patch size {v.image_patch_size}")
        patches = h // v.image_patch_size
        if sum(self.overlap_margins) >= patches:
            raise ConfigError(
                f"{source}: overlap_margins {list(self.overlap_margins)} leave no crop window in a {patches}x{patches}-patch crop; "
                f"use margins summing to less than {patches}, e.g. {[patches // 4] * 2}"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_crops": self.max_crops,
            "overlap_margins": list(self.overlap_margins),
            "image_pooling_h": self.pooling[0],
            "image_pooling_w": self.pooling[1],
            "normalize_mode": self.normalize_mode,
            "resize_mode": self.resize_mode,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = FILE_NAME,
                  cfg: ArmConfig | None = None) -> "PreprocessConfig":
        """A key the file leaves out takes the model's default (for_model: -O normalizes as OpenAI CLIP) when `cfg`
        is given, else the class default. Keys of published processors that do not change the arithmetic (class
        names, do_pad ...) are ignored."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: the top level is a JSON {type(data).__name__}, not an object of preprocessor "
                              "settings (max_crops, overlap_margins, image_pooling_h ...); re-download or re-export "
                              "the checkpoint")
        base = cls() if cfg is None else cls.for_model(cfg)
        resize = data.get("resize_mode", base.resize_mode)
        try:
            return cls(
                max_crops=int(data.get("max_crops", base.max_crops)),
                overlap_margins=tuple(data.get("overlap_margins", base.overlap_margins)),
                pooling=(int(data.get("image_pooling_h", base.pooling[0])),
                         int(data.get("image_pooling_w", base.pooling[1]))),
                normalize_mode=data.get("normalize_mode", base.normalize_mode),
                resize_mode=_RESIZE_ALIASES.get(resize, resize),
            )
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{source}: malformed value ({exc})") from None

    def save(self, path: str | Path) -> None:
        path = Path(path)
        if path.is_dir():
            path = path / FILE_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path, cfg: ArmConfig | None = None) -> "PreprocessConfig":
        path = Path(path)
        if path.is_dir():
            path = path / FILE_NAME
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{path}: not found; a checkpoint needs {FILE_NAME}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path}: not valid JSON ({exc}); the file is corrupt: re-download or re-export "
                                  "the checkpoint") from None
        return cls.from_dict(data, str(path), cfg)
