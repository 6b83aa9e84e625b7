"""Quantization calibration sets: camera frames preprocessed into model inputs, their prompts and reference answers.

On disk a calibration set is a directory:

    manifest.json   {"format": "edgeact-calibration", "version": 1, "seed", "frames_source",
                     "model": {name, config_sha256, config_meaning_sha256, source, kind, weights_sha256,
                               model_weights_sha256, n_actions}, "created_utc",
                     "samples": [{"instruction", "frame", "grids", "camera"}, ...]}
    samples.npz     per sample i: images_i (n_crops, n_patches, patch_dim) float32,
                    image_masks_i (n_crops, n_patches) float32, pooled_patches_idx_i (n_tokens, pool) int64,
                    prompt_ids_i (T,) int64, answer_ids_i (A,) int64

`answer_ids` is the fp32 model's own grammar-masked greedy answer to the prompt: a decoder
calibrated on prompt + answer sees the activations it will see on the robot (depth codes,
digits, action bins), which text alone does not give. The answer depends on the model, so the
manifest names the model it was decoded with; the images and prompts do not. A config names an
architecture, not a model: `weights_sha256` (weights_sha256()) tells models of one config apart.
Build one with `build_calibration_set` (the builder lives in calibration/calibration_build.py:
it needs onnxruntime or torch, this module only numpy) or `edgeact calibrate`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgeact.runtime.errors import ConfigError
from edgeact.runtime.preprocess import ImageInputs

FORMAT = "edgeact-calibration"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
ARRAYS_FILE = "samples.npz"
_ARRAYS = ("images", "image_masks", "pooled_patches_idx", "prompt_ids", "answer_ids")
_DTYPES = {"images": np.float32, "image_masks": np.float32, "pooled_patches_idx": np.int64,
           "prompt_ids": np.int64, "answer_ids": np.int64}
_NDIMS = {"images": 3, "image_masks": 2, "pooled_patches_idx": 2, "prompt_ids": 1, "answer_ids": 1}

log = logging.getLogger(__name__)


class CalibrationError(ConfigError):
    """A calibration set is missing, malformed, or does not fit the model being quantized."""


@dataclass(frozen=True)
class CalibrationSample:
    """One observation: the preprocessed frame, the prompt ids, and the fp32 model's answer ids."""
    instruction: str
    frame: int                               # frame number in the source (synthetic scene or recording)
    grids: tuple[tuple[int, int], ...]       # (rows, cols) of image tokens, as ImageInputs.grids
    images: np.ndarray
    image_masks: np.ndarray
    pooled_patches_idx: np.ndarray
    prompt_ids: np.ndarray
    answer_ids: np.ndarray
    camera: dict[str, Any] = field(default_factory=dict)   # the camera settings the frame was taken with

    def __post_init__(self) -> None:
        where = f"calibration sample (frame {self.frame})"
        for name in _ARRAYS:
            array = np.asarray(getattr(self, name))
            if array.ndim != _NDIMS[name]:
                raise CalibrationError(f"{where}: {name} has {array.ndim} dims, expected {_NDIMS[name]}")
            object.__setattr__(self, name, np.ascontiguousarray(array, dtype=_DTYPES[name]))
        object.__setattr__(self, "grids", tuple((int(r), int(c)) for r, c in self.grids))
        if self.images.shape[:2] != self.image_masks.shape:
            raise CalibrationError(f"{where}: images {self.images.shape} and image_masks {self.image_masks.shape} disagree")
        if len(self.prompt_ids) == 0:
            raise CalibrationError(f"{where}: empty prompt_ids")
        if sum(r * c for r, c in self.grids) != len(self.pooled_patches_idx):
            raise CalibrationError(f"{where}: grids {self.grids} describe {sum(r * c for r, c in self.grids)} image "
                                   f"tokens but pooled_patches_idx has {len(self.pooled_patches_idx)} rows")

    def image_inputs(self) -> ImageInputs:
        return ImageInputs(self.images, self.image_masks, self.pooled_patches_idx, self.grids)

    @property
    def sequence_ids(self) -> np.ndarray:
        """Prompt followed by the answer: what the decoder reads, one chunk or token by token."""
        return np.concatenate([self.prompt_ids, self.answer_ids])


@dataclass(frozen=True)
class CalibrationSet:
    samples: tuple[CalibrationSample, ...]
    seed: int
    frames_source: dict[str, Any]            # {"type": "synthetic", ...} or {"type": "recording", "path": ...}
    # {"name", "config_sha256", "config_meaning_sha256", "source", "kind", "weights_sha256", "model_weights_sha256",
    # "n_actions"} of the answering model
    model: dict[str, Any]
    created_utc: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "samples", tuple(self.samples))
        if not self.samples:
            raise CalibrationError("a calibration set needs at least one sample; build it with --samples 1 or more")
        if "weights_sha256" not in self.model:     # built now: a loaded set has what it recorded ('' if nothing)
            digest = weights_sha256(self.model.get("kind", ""), self.model.get("source", ""))
            object.__setattr__(self, "model", {**self.model, "weights_sha256": digest})

    def __len__(self) -> int:
        return len(self.samples)

    def check_model(self, config_sha256: str, patch_dim: int, vocab_rows: int,
                    model_weights: Callable[[str], str] | None = None, *, model_weights_sha256: str = "",
                    n_actions: int | None = None, config_meaning: str = "") -> None:
        """Refuse a set whose frames or ids do not fit the model about to be quantized.

        `model_weights_sha256`: the whole model's weights digest (its checkpoint's, as the bundle recorded it at
        export); a set that recorded one is compared on it. Otherwise `model_weights(kind)`: that model's
        weights_sha256 as a set answered by a `kind` source records it ('' where it cannot be told). A set decoded by
        other weights is refused; one without a digest (built before sets recorded one) is accepted with a warning.
        `n_actions`: the actions per answer of the bundle; a set whose answers hold another number is refused (its
        decoder feeds would miss the positions the runtime feeds). `config_meaning`: the model's
        config_meaning_sha256; where the config's bytes differ, a set that recorded the same meaning (another
        formatting of one config) is accepted, any other refused.
        """
        theirs_actions = self.model.get("n_actions")
        if n_actions is not None and theirs_actions is not None and int(theirs_actions) != n_actions:
            source = "this bundle" if self.model.get("kind") == "bundle" else "the checkpoint with --chunk " \
                f"{n_actions}"
            raise CalibrationError(f"the calibration answers hold {theirs_actions} action(s) each and this bundle's "
                                   f"hold {n_actions} (its export's --chunk): rebuild the set from {source} with "
                                   "`edgeact calibrate`")
        for s in self.samples:
            if s.images.shape[-1] != patch_dim:
                raise CalibrationError(f"calibration images hold patches of {s.images.shape[-1]} values but the model "
                                       f"takes {patch_dim}; rebuild the set for this model with `edgeact calibrate`")
            top = int(max(s.prompt_ids.max(), s.answer_ids.max(initial=0)))
            if top >= vocab_rows:
                raise CalibrationError(f"calibration token id {top} is outside the model's {vocab_rows} embedding rows; "
                                       "rebuild the set with this model's tokenizer (`edgeact calibrate`)")
        theirs = self.model.get("config_sha256", "")
        # The config's bytes, then what they say: another formatting of the same config is the same model
        # (verify.config_matches), a config that differs in any field is not, whatever the weights
        same_meaning = bool(config_meaning and config_meaning == self.model.get("config_meaning_sha256", ""))
        if theirs and config_sha256 and theirs != config_sha256 and not same_meaning:
            raise CalibrationError(f"the calibration answers were decoded by another model (config sha256 "
                                   f"{theirs[:12]}…, this one {config_sha256[:12]}…); rebuild the set from this bundle "
                                   "with `edgeact calibrate`")
        whole = self.model.get("model_weights_sha256", "")
        if whole and model_weights_sha256 and whole != model_weights_sha256:
            raise CalibrationError(f"the calibration answers were decoded by another model: the weights of the "
                                   f"{self.model.get('kind', '')} {self.model.get('source', '')!r} that answered "
                                   f"(sha256 {whole[:12]}…) are not this bundle's model's "
                                   f"({model_weights_sha256[:12]}…); rebuild the set from this bundle with "
                                   "`edgeact calibrate`")
        if model_weights is None:
            return
        theirs, kind = self.model.get("weights_sha256", ""), self.model.get("kind", "")
        ours = model_weights(kind) if theirs else ""
        if not theirs or not ours:
            why = ("records no weights digest (built before calibration sets recorded one)" if not theirs else
                   f"was answered by the {kind} {self.model.get('source', '')!r}, whose weights cannot be compared "
                   "with this model's (its source checkpoint is not here)")
            log.warning("the calibration set %s: its answers are taken to be this model's; rebuild it from this "
                        "bundle with `edgeact calibrate` to have that checked", why)
        elif theirs != ours:
            raise CalibrationError(f"the calibration answers were decoded by another model: same config, but the "
                                   f"weights of the {kind} {self.model.get('source', '')!r} that answered (sha256 "
                                   f"{theirs[:12]}…) are not this model's ({ours[:12]}…); rebuild the set from this "
                                   "bundle with `edgeact calibrate`")

    # ------------------------------------------------------------------ disk
    def save(self, out: str | Path, overwrite: bool = False) -> Path:
        """Write atomically (runtime/atomic_dir.py): a hidden sibling directory renamed into place once complete."""
        from edgeact.runtime.atomic_dir import fsync_tree, partial_dir, publish

        from edgeact.runtime.atomic_dir import refuse_replacing

        out = Path(out).absolute()
        if out.exists():
            if not overwrite:
                raise CalibrationError(f"{out}: already exists; pass --overwrite or choose another --out")
            refuse_replacing(out, "a calibration set", "--out")     # a bundle (its own source) has a manifest too
        tmp = partial_dir(out)
        try:
            arrays = {f"{name}_{i}": getattr(s, name) for i, s in enumerate(self.samples) for name in _ARRAYS}
            np.savez(tmp / ARRAYS_FILE, **arrays)
            (tmp / MANIFEST_FILE).write_text(json.dumps(self._manifest(), indent=2) + "\n")
            fsync_tree(tmp)
            publish(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return out

    def _manifest(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "version": FORMAT_VERSION, "seed": self.seed, "frames_source": self.frames_source,
            "model": self.model, "created_utc": self.created_utc,
            "samples": [{"instruction": s.instruction, "frame": s.frame, "grids": [list(g) for g in s.grids],
                         "camera": s.camera} for s in self.samples],
        }

    @classmethod
    def load(cls, path: str | Path) -> "CalibrationSet":
        root = Path(path)
        manifest_path = root / MANIFEST_FILE
        if not manifest_path.is_file():
            raise CalibrationError(f"{root}: not a calibration set (no {MANIFEST_FILE}); build one with "
                                   "`edgeact calibrate BUNDLE --out DIR`")
        try:
            meta = json.loads(manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CalibrationError(f"{manifest_path}: not valid JSON ({exc}); rebuild the calibration set") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise CalibrationError(f"{manifest_path}: not an {FORMAT} manifest; rebuild the calibration set")
        if meta.get("version") != FORMAT_VERSION:
            raise CalibrationError(f"{manifest_path}: version {meta.get('version')!r}, this edgeact reads "
                                   f"{FORMAT_VERSION}; rebuild the set with `edgeact calibrate`")
        try:
            with np.load(root / ARRAYS_FILE, allow_pickle=False) as npz:
                samples = [CalibrationSample(instruction=str(m["instruction"]), frame=int(m["frame"]),
                                             grids=tuple(tuple(g) for g in m["grids"]), camera=dict(m.get("camera", {})),
                                             **{name: npz[f"{name}_{i}"] for name in _ARRAYS})
                           for i, m in enumerate(meta["samples"])]
        except FileNotFoundError:
            raise CalibrationError(f"{root / ARRAYS_FILE}: missing; the calibration set is incomplete: rebuild it") from None
        except (KeyError, TypeError, ValueError) as exc:
            raise CalibrationError(f"{root}: samples malformed ({exc}); rebuild the calibration set") from None
        return cls(samples=tuple(samples), seed=int(meta.get("seed", 0)), frames_source=dict(meta.get("frames_source", {})),
                   model={"weights_sha256": "", **meta.get("model", {})}, created_utc=str(meta.get("created_utc", "")))


def config_meaning_sha256(config) -> str:
    """One sha256 over what a model's config says (its ArmConfig, or the dict a manifest records, read as one):
    another formatting of the same config.json, or a key written with its default value, gives the same digest
    (verify.config_matches' rule); another value of any field does not."""
    from edgeact.runtime.arm_config import ArmConfig

    cfg = config if isinstance(config, ArmConfig) else ArmConfig.from_dict(config)
    return hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()


def weights_sha256(kind: str, source: str | Path) -> str:
    """One sha256 over the weights of the model that answers, by file: a bundle's arrays (the embedding and lm_head,
    sha256s as its manifest lists them; its stage graphs differ between exports of one checkpoint, fused or portable
    attention, external data or not, and its arrays do not) or a checkpoint's *.safetensors. '' where the source is
    not there."""
    from edgeact.runtime.bundle import sha256_file

    root = Path(source) if source else None
    if kind == "bundle" and root is not None and (root / MANIFEST_FILE).is_file():
        manifest = json.loads((root / MANIFEST_FILE).read_text())
        files = manifest.get("files", {})
        entries = [(w["file"], files.get(w["file"], {}).get("sha256", ""))
                   for w in manifest.get("weights", {}).values()]
    elif kind == "checkpoint" and root is not None and root.is_dir():
        entries = [(p.name, sha256_file(p)) for p in root.glob("*.safetensors")]
    else:
        entries = []
    if not entries:
        return ""
    return hashlib.sha256("".join(f"{rel} {sha}\n" for rel, sha in sorted(entries)).encode()).hexdigest()


def build_calibration_set(source: str | Path, out: str | Path | None, n_samples: int = 16, seed: int = 0,
                          frames_source: str | Path = "synthetic", **options: Any) -> CalibrationSet:
    """Frames from `frames_source` ('synthetic' or a RealSense .db3/.bag), answered by the fp32 bundle or checkpoint
    `source`; see calibration_build.build_calibration_set for the options."""
    from edgeact.calibration import calibration_build

    return calibration_build.build_calibration_set(source, out, n_samples, seed, frames_source, **options)
