"""Read and write MolmoAct checkpoints in the published Hugging Face layout, with checks that name the bad file and key.

A checkpoint directory holds `config.json`, the weights as `model.safetensors` or as shards
`model-0000i-of-0000N.safetensors` plus `model.safetensors.index.json`, `tokenizer.json` and
`preprocessor_config.json` (see MOLMOACT_FORMAT.md). Writes go to a hidden temporary directory
beside the target and are renamed into place at the end, so an interrupted write never leaves
a directory that looks like a complete checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from edgeact.runtime.atomic_dir import fsync_tree, occupied, partial_dir, publish
from edgeact.export.tensor_names import expected_tensor_shapes
from edgeact.runtime.action_bins import ACTION_DIMS
from edgeact.runtime.arm_config import ArmConfig
from edgeact.runtime.errors import CheckpointError

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
SINGLE_WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SAFETENSORS_METADATA = {"format": "pt"}  # what transformers writes and checks for
NORM_STATS_REQUIRED = ("q01", "q99")
_SHOWN_KEYS = 3  # how many offending tensor names an error lists before the count


@dataclass
class Checkpoint:
    config: ArmConfig
    tensors: dict[str, torch.Tensor]
    tokenizer_path: Path
    preprocess_config: Any  # runtime.preprocess_config.PreprocessConfig, or None when the file is absent
    norm_stats: dict[str, Any]
    path: Path | None = None

    @property
    def n_parameters(self) -> int:
        return sum(t.numel() for t in self.tensors.values())


def shard_file_name(index: int, count: int) -> str:
    """Hugging Face's shard naming: 1-based index, both numbers zero-padded to five digits."""
    return f"model-{index:05d}-of-{count:05d}.safetensors"


# --------------------------------------------------------------------------- validation


def check_tensor_shapes(cfg: ArmConfig, shapes: dict[str, tuple[int, ...]],
                        where: dict[str, str], default_where: str) -> None:
    """Raise CheckpointError on missing, unexpected or mis-shaped tensors.

    `where[name]` is the file holding `name` (shown in the message); missing tensors are in no
    file, so they are reported against `default_where` (the weights file or the index).
    """
    expected = expected_tensor_shapes(cfg)
    known = expected_tensor_shapes(cfg, unused_vit_blocks=True)     # may be present, never run
    missing = [k for k in expected if k not in shapes]
    if missing:
        raise CheckpointError(
            f"{default_where}: {len(missing)} tensor(s) missing that config.json expects, "
            f"e.g. {_few(missing)}; was the checkpoint written for another config or variant ({cfg.variant})?"
        )
    unexpected = [k for k in shapes if k not in known]
    if unexpected:
        first = unexpected[0]
        raise CheckpointError(
            f"{where.get(first, default_where)}: {len(unexpected)} unexpected tensor(s) that config.json does not "
            f"describe, e.g. {_few(unexpected)}; was the checkpoint written for another config or variant ({cfg.variant})?"
        )
    for name, want in known.items():
        if name not in shapes:
            continue
        got = tuple(shapes[name])
        if got != tuple(want):
            raise CheckpointError(
                f"{where.get(name, default_where)}: {name} has shape {got}, config expects {tuple(want)}; "
                "config.json and the weights disagree, re-export the checkpoint"
            )


def validate_norm_stats(norm_stats: Any, source: str = CONFIG_FILE) -> None:
    """Each unnorm key needs `action` with q01 and q99 (and optional mask, mean, ...) of one length."""
    if not isinstance(norm_stats, dict):
        raise CheckpointError(f"{source}: norm_stats must map an unnorm key to statistics, got {type(norm_stats).__name__}")
    for key, stats in norm_stats.items():
        action = stats.get("action") if isinstance(stats, dict) else None
        if not isinstance(action, dict):
            raise CheckpointError(f"{source}: norm_stats[{key!r}] has no 'action' statistics; expected {{'action': {{'q01': [...], 'q99': [...], 'mask': [...]}}}}")
        absent = [s for s in NORM_STATS_REQUIRED if s not in action]
        if absent:
            raise CheckpointError(f"{source}: norm_stats[{key!r}]['action'] lacks {absent}; un-normalizing actions needs q01 and q99")
        lengths = {stat: len(values) for stat, values in action.items() if isinstance(values, list)}
        if "q01" not in lengths or "q99" not in lengths or len(set(lengths.values())) != 1 or not lengths["q01"]:
            raise CheckpointError(
                f"{source}: norm_stats[{key!r}]['action'] statistics have different lengths {lengths}; "
                "q01, q99, mask (and mean/std/min/max if present) need one value per action dimension"
            )
        bounds = [x for s in NORM_STATS_REQUIRED for x in action[s]]
        if not all(isinstance(x, (int, float)) and math.isfinite(x) for x in bounds):
            raise CheckpointError(f"{source}: norm_stats[{key!r}]['action'] q01/q99 hold a non-number or non-finite value")
        if lengths["q01"] != ACTION_DIMS:
            raise CheckpointError(f"{source}: norm_stats[{key!r}]['action'] has {lengths['q01']} dimensions; MolmoAct's "
                                  f"actions have {ACTION_DIMS} (dx, dy, dz, droll, dpitch, dyaw, gripper): one q01 / q99 "
                                  "value each")
        crossed = [i for i, (low, high) in enumerate(zip(action["q01"], action["q99"])) if low > high]
        if crossed:
            raise CheckpointError(f"{source}: norm_stats[{key!r}]['action'] has q01 > q99 in dimensions {crossed}: "
                                  "swapped statistics would flip those actions' signs; q01 is the 1st percentile")
        mask = action.get("mask")
        if mask is not None and not all(isinstance(x, bool) for x in mask):
            raise CheckpointError(f"{source}: norm_stats[{key!r}]['action']['mask'] must be true / false values (which "
                                  f"dimensions are un-normalized), got {mask!r}")


def _few(names: list[str]) -> str:
    shown = ", ".join(names[:_SHOWN_KEYS])
    return shown + (f" and {len(names) - _SHOWN_KEYS} more" if len(names) > _SHOWN_KEYS else "")


# --------------------------------------------------------------------------- writing


def save_checkpoint(out_dir: str | Path, cfg: ArmConfig, tensors: dict[str, torch.Tensor],
                    tokenizer: Any, preprocessor_config: Any, max_shard_bytes: int | None = None, *,
                    n_shards: int | None = None, overwrite: bool = False,
                    on_file: Callable[[str], None] | None = None) -> Path:
    """Write a complete checkpoint directory atomically and return its path.

    `tokenizer` is a path to a tokenizer.json or a `tokenizers.Tokenizer`; `preprocessor_config`
    a PreprocessConfig (anything with `to_dict()`), a dataclass, or a dict. Weights go to one
    `model.safetensors` unless `max_shard_bytes` (Hugging Face style: a new shard starts when
    the next tensor would overflow it) or `n_shards` (exactly that many shards of about equal
    size) asks for shards. `on_file(name)` is called after each file is written (progress bars).
    """
    out = Path(out_dir)
    notify = on_file or (lambda name: None)
    cfg.validate(str(out / CONFIG_FILE))
    validate_norm_stats(cfg.norm_stats, str(out / CONFIG_FILE))
    check_tensor_shapes(cfg, {k: tuple(t.shape) for k, t in tensors.items()}, {}, "tensors to save")
    if occupied(out) and not overwrite:
        raise CheckpointError(f"{out}: already exists and is not empty; choose another directory or overwrite it (CLI: make-checkpoint --force, train-reference --overwrite)")
    # Hugging Face orders tensors as the model's state_dict does; the expected table has that order.
    names = list(expected_tensor_shapes(cfg))
    groups = _plan_shards(names, {k: _nbytes(tensors[k]) for k in names}, max_shard_bytes, n_shards)

    tmp = partial_dir(out)
    try:
        _write_weights(tmp, tensors, groups, notify)
        (tmp / CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        _write_tokenizer(tmp / TOKENIZER_FILE, tokenizer)
        (tmp / PREPROCESSOR_FILE).write_text(json.dumps(_as_dict(preprocessor_config), indent=2) + "\n")
        for name in (CONFIG_FILE, TOKENIZER_FILE, PREPROCESSOR_FILE):
            notify(name)
        fsync_tree(tmp)
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # also on Ctrl-C: leave nothing half-written behind
        raise
    return out


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _plan_shards(names: list[str], nbytes: dict[str, int], max_shard_bytes: int | None,
                 n_shards: int | None) -> list[list[str]]:
    if max_shard_bytes is not None and n_shards is not None:
        raise CheckpointError("give either max_shard_bytes or n_shards, not both")
    if n_shards is not None:
        if not 1 <= n_shards <= len(names):
            raise CheckpointError(f"n_shards={n_shards}: need between 1 and {len(names)} (one tensor at least per shard)")
        return _split_even(names, nbytes, n_shards)
    if max_shard_bytes is None:
        return [names]
    if max_shard_bytes <= 0:
        raise CheckpointError(f"max_shard_bytes={max_shard_bytes}: must be positive")
    groups: list[list[str]] = [[]]
    size = 0
    for name in names:
        if groups[-1] and size + nbytes[name] > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes[name]
    return groups


def _split_even(names: list[str], nbytes: dict[str, int], count: int) -> list[list[str]]:
    """Cut the ordered names into `count` non-empty runs whose byte sizes are about equal."""
    cumulative = [0]
    for name in names:
        cumulative.append(cumulative[-1] + nbytes[name])
    bounds = [0]
    for k in range(1, count):
        target = cumulative[-1] * k / count
        # Each run keeps at least one tensor, and leaves one for each run after it.
        candidates = range(bounds[-1] + 1, len(names) - (count - k) + 1)
        bounds.append(min(candidates, key=lambda j: abs(cumulative[j] - target)))
    bounds.append(len(names))
    return [names[a:b] for a, b in zip(bounds, bounds[1:])]


def _write_weights(tmp: Path, tensors: dict[str, torch.Tensor], groups: list[list[str]],
                   on_file: Callable[[str], None]) -> None:
    if len(groups) == 1:
        _write_safetensors(tmp / SINGLE_WEIGHTS_FILE, {k: tensors[k] for k in groups[0]})
        on_file(SINGLE_WEIGHTS_FILE)
        return
    weight_map: dict[str, str] = {}
    for i, group in enumerate(groups, start=1):
        fname = shard_file_name(i, len(groups))
        _write_safetensors(tmp / fname, {k: tensors[k] for k in group})
        weight_map.update({k: fname for k in group})
        on_file(fname)
    index = {
        "metadata": {"total_size": sum(_nbytes(tensors[k]) for k in weight_map)},
        "weight_map": dict(sorted(weight_map.items())),  # transformers writes the map sorted by name
    }
    (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    on_file(INDEX_FILE)


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    # safetensors refuses non-contiguous tensors and tensors sharing storage; a fresh
    # contiguous copy of each is what the file holds anyway.
    save_file({k: t.detach().contiguous() for k, t in tensors.items()}, str(path), metadata=SAFETENSORS_METADATA)


def _write_tokenizer(path: Path, tokenizer: Any) -> None:
    if isinstance(tokenizer, (str, Path)):
        src = Path(tokenizer)
        if src.is_dir():
            src = src / TOKENIZER_FILE
        if not src.is_file():
            raise CheckpointError(f"{src}: tokenizer.json not found; pass a tokenizers.Tokenizer or the path to its tokenizer.json")
        shutil.copyfile(src, path)
    else:
        tokenizer.save(str(path))


def _as_dict(obj: Any) -> dict[str, Any]:
    if isinstance(obj, dict):
        return obj
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    raise CheckpointError(f"preprocessor config of type {type(obj).__name__} cannot be written; pass a PreprocessConfig or a dict")


# --------------------------------------------------------------------------- reading


def load_checkpoint(ckpt_dir: str | Path, dtype: torch.dtype | None = None) -> Checkpoint:
    """Read and verify a checkpoint; tensors are cast to `dtype` when given (e.g. bf16 weights to fp32)."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        raise CheckpointError(f"{root}: checkpoint directory not found; export one with `edgeact make-checkpoint` or point at a MolmoAct download")
    cfg = ArmConfig.load(root / CONFIG_FILE)  # raises on a missing file, bad JSON or an unknown variant
    validate_norm_stats(cfg.norm_stats, str(root / CONFIG_FILE))
    tokenizer_path = root / TOKENIZER_FILE
    if not tokenizer_path.is_file():
        raise CheckpointError(f"{tokenizer_path}: not found; a checkpoint needs its tokenizer.json")
    from edgeact.runtime.token_layout import TokenLayout

    # Before the weights are read: a tokenizer of another checkpoint fails only at verification, or on the robot.
    TokenLayout.from_file(tokenizer_path).check_config(cfg, str(tokenizer_path), str(root / CONFIG_FILE))
    files = _weight_files(root)
    shapes, where = _read_headers(files)
    default_where = str(root / INDEX_FILE) if (root / INDEX_FILE).exists() else str(root / SINGLE_WEIGHTS_FILE)
    check_tensor_shapes(cfg, shapes, where, default_where)
    order = expected_tensor_shapes(cfg)
    tensors = _read_tensors(files, dtype, set(order))
    return Checkpoint(
        config=cfg,
        tensors={k: tensors[k] for k in order},
        tokenizer_path=tokenizer_path,
        preprocess_config=_load_preprocess_config(root / PREPROCESSOR_FILE, cfg),
        norm_stats=cfg.norm_stats,
        path=root,
    )


def load_model(ckpt_dir: str | Path, dtype: torch.dtype = torch.float32):
    """Load a checkpoint into the PyTorch reference model, in eval mode; returns (model, checkpoint)."""
    from edgeact.export.model import MolmoActModel

    ckpt = load_checkpoint(ckpt_dir, dtype=dtype)
    model = MolmoActModel(ckpt.config).to(dtype)
    model.load_state_dict(ckpt.tensors, strict=True)
    return model.eval(), ckpt


def _weight_files(root: Path) -> dict[Path, list[str] | None]:
    """Map each weights file to the tensor names the index assigns it (None: single file, no index)."""
    index_path = root / INDEX_FILE
    if not index_path.exists():
        single = root / SINGLE_WEIGHTS_FILE
        if not single.is_file():
            raise CheckpointError(f"{root}: no {SINGLE_WEIGHTS_FILE} and no {INDEX_FILE}; the weights are missing, re-download or re-export the checkpoint")
        return {single: None}
    try:
        index = json.loads(index_path.read_text())
        weight_map = index["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index_path}: not a valid index ({exc!r}); it needs a 'weight_map' of tensor name to shard file") from None
    bad = (f"a {type(weight_map).__name__}" if not isinstance(weight_map, dict) else
           next((f"{name!r}: {fname!r}" for name, fname in weight_map.items()
                 if not (isinstance(name, str) and isinstance(fname, str) and fname and Path(fname).name == fname)), None))
    if bad is not None:
        raise CheckpointError(f"{index_path}: not a valid index (weight_map has {bad}); it needs a 'weight_map' of "
                              "tensor name to shard file name in this directory; re-download or re-export it")
    files: dict[Path, list[str] | None] = {}
    for name, fname in weight_map.items():
        files.setdefault(root / fname, []).append(name)
    files = dict(sorted(files.items()))  # check and report shards in file order
    for path, names in files.items():
        if not path.is_file():
            raise CheckpointError(f"{index_path}: references shard {path.name} (for {names[0]}, ...), which is missing; re-download or re-export it")
    return files


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except SafetensorError as exc:
        raise CheckpointError(f"{path}: truncated or corrupt safetensors file ({exc}); re-download or re-export it") from None


def _read_headers(files: dict[Path, list[str] | None]) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Shapes from the safetensors headers only (no tensor data read), and the file of each name."""
    shapes: dict[str, tuple[int, ...]] = {}
    where: dict[str, str] = {}
    for path, indexed in files.items():
        with _open(path) as f:
            keys = list(f.keys())
            for name in keys:
                if name in where:
                    raise CheckpointError(f"{path}: {name} is also in {where[name]}; a tensor belongs in one shard only")
                shapes[name] = tuple(f.get_slice(name).get_shape())
                where[name] = str(path)
        if indexed is not None:
            absent = [n for n in indexed if n not in keys]
            if absent:
                raise CheckpointError(f"{path}: the index maps {_few(absent)} to this shard, which lacks them; re-download or re-export it")
            extra = set(keys) - set(indexed)
            if extra:
                raise CheckpointError(f"{path}: holds {_few(sorted(extra))}, which the index does not map to it; the index and the shards disagree")
    return shapes, where


def _read_tensors(files: dict[Path, list[str] | None], dtype: torch.dtype | None,
                  wanted: set[str]) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        with _open(path) as f:
            for name in f.keys():
                if name not in wanted:
                    continue
                try:
                    t = f.get_tensor(name)
                except SafetensorError as exc:
                    raise CheckpointError(f"{path}: {name} cannot be read ({exc}); re-download or re-export it") from None
                tensors[name] = t.to(dtype) if dtype is not None else t
    return tensors


def _load_preprocess_config(path: Path, cfg: ArmConfig):
    if not path.is_file():
        return None  # older exports carry none; the runtime then derives defaults from the config
    from edgeact.runtime.preprocess_config import PreprocessConfig

    config = PreprocessConfig.load(path, cfg)     # a key it leaves out: the model's default
    config.check(cfg, str(path))
    return config
