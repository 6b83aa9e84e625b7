"""Write a bundle atomically: build it in a hidden sibling directory, checksum it, then rename it into place.

The target directory never exists half-written: files go into `.NAME.partial-XXXX` beside it,
manifest.json is written last (after every file is hashed and fsynced), and one rename
publishes the whole bundle. An exception (or Ctrl-C) inside the `with` block removes the
temporary directory; a killed process leaves only the `.partial` directory, which the loader
recognizes. Later steps (verify, build-engines) change a bundle only through
`update_manifest`, which replaces manifest.json atomically. A `before_publish` step (verification)
runs on the finished bundle in the temporary directory, so nothing at the target is replaced
until its verdict is recorded. `--overwrite` replaces only an edgeact bundle. No torch here: onnx
is imported only by `add_onnx` / stage helpers.
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from edgeact.runtime.atomic_dir import fsync_path, fsync_tree, partial_dir, publish
from edgeact.runtime.arm_config import ArmConfig
from edgeact.runtime.bundle import (
    MANIFEST_NAME, FileEntry, Manifest, ModelInfo, QuantizationInfo, StageProfile,
    StageSpec, TensorSpec, TokenizerInfo, ToolInfo, VerificationInfo, WeightSpec, load_bundle, read_manifest,
    check_relpath, sha256_file, tool_version,
)
from edgeact.runtime.bundle_manifest import in_ort_trt_cache
from edgeact.runtime.errors import BundleError

_CHUNK_BYTES = 1 << 20


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class BundleWriter:
    """Context manager that assembles a bundle in `tmp_dir` and publishes it at `out_dir` on success.

        with BundleWriter("out/tiny") as w:
            w.set_model(cfg, checkpoint=ckpt_dir, config_sha256=sha)
            w.add_tokenizer(ckpt_dir / "tokenizer.json", ckpt_dir / "preprocessor_config.json")
            onnx_path = w.stage_path("decoder")          # exporters may write here directly
            torch.onnx.export(..., onnx_path)
            w.add_onnx("decoder", onnx_path, precision="fp16", dim_ranges={...}, profiles=[...])
            w.add_array("embed_tokens", table)
    """

    def __init__(self, out_dir: str | Path, *, overwrite: bool = False,
                 before_publish: Callable[[Path], Any] | None = None) -> None:
        """`before_publish(staged_dir)` runs once the bundle is complete (manifest written) in its temporary
        directory, before it replaces anything at `out_dir`: e.g. verification, which records its verdict
        there with update_manifest. If it raises (or the process dies), nothing is published."""
        self.out_dir = Path(out_dir).absolute()
        self.overwrite = overwrite
        self.before_publish = before_publish
        _check_replaceable(self.out_dir, overwrite)   # fail before a long export, not after
        self.tmp_dir: Path | None = None
        self.model: ModelInfo | None = None
        self.tokenizer: TokenizerInfo | None = None
        self.stages: dict[str, StageSpec] = {}
        self.weights: dict[str, WeightSpec] = {}
        self.grammar: dict[str, Any] = {}
        self.norm_stats: dict[str, Any] = {}
        self.quantization: QuantizationInfo | None = None
        self.verification = VerificationInfo()
        self.manifest: Manifest | None = None          # set once committed

    # -------------------------------------------------------------------- life cycle
    def __enter__(self) -> "BundleWriter":
        self.tmp_dir = partial_dir(self.out_dir)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            self.abort()
            return False
        try:
            self.commit()
        except BaseException:
            self.abort()
            raise
        return False

    def abort(self) -> None:
        if self.tmp_dir is not None and self.tmp_dir.exists():
            shutil.rmtree(self.tmp_dir)
        self.tmp_dir = None

    def _open_dir(self) -> Path:
        if self.tmp_dir is None:
            raise BundleError(f"{self.out_dir}: BundleWriter is not open; use it as `with BundleWriter(...) as w:`")
        return self.tmp_dir

    # -------------------------------------------------------------------- files
    def path_for(self, rel: str) -> Path:
        """Absolute path of `rel` inside the bundle being written (parent directories created)."""
        path = self._open_dir() / check_relpath(rel, "file")
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def stage_path(self, stage_name: str) -> Path:
        return self.path_for(f"stages/{stage_name}.onnx")

    def add_file(self, src: str | Path, rel: str | None = None) -> str:
        src = Path(src)
        rel = rel or src.name
        dest = self.path_for(rel)
        if src.absolute() != dest:          # already written in place by the caller: nothing to copy
            shutil.copyfile(src, dest)
        return rel

    def add_bytes(self, rel: str, data: bytes) -> str:
        self.path_for(rel).write_bytes(data)
        return rel

    def add_json(self, rel: str, obj: Any) -> str:
        self.path_for(rel).write_text(json.dumps(obj, indent=2) + "\n")
        return rel

    def add_array(self, name: str, array: np.ndarray, rel: str | None = None) -> WeightSpec:
        array = np.ascontiguousarray(array)
        if array.dtype.hasobject:
            raise BundleError(f"weight {name!r}: object arrays cannot go into a bundle; pass a numeric array")
        rel = rel or f"weights/{name}.npy"
        np.save(self.path_for(rel), array, allow_pickle=False)
        spec = WeightSpec(name=name, file=rel, dtype=str(array.dtype), shape=tuple(array.shape))
        self.weights[name] = spec
        return spec

    def add_onnx(self, stage_name: str, model: Any, *, precision: str,
                 dim_ranges: dict[str, Any], profiles: Sequence[StageProfile | dict] = (),
                 inputs: Sequence[TensorSpec | dict] | None = None, outputs: Sequence[TensorSpec | dict] | None = None,
                 external_data: bool = False, doc: str = "") -> StageSpec:
        """Add one stage graph: an onnx.ModelProto, or the path of an ONNX file (with its external data).

        A path inside `tmp_dir` (see `stage_path`) is registered where it is; another path is copied
        to stages/ together with its external-data files. `inputs` / `outputs` default to the graph's
        own I/O (names, dtypes, dim_param symbols); when given, they are checked against the graph.
        `dim_ranges` maps each symbol to (min, opt, max); `profiles` override some symbols per
        engine optimization profile, e.g. [{"name": "decode", "dim_ranges": {"seq": (1, 1, 1)}}].
        """
        from edgeact.export import bundle_onnx

        tmp = self._open_dir()
        rel, ext_files, graph_io = bundle_onnx.place_model(model, tmp, stage_name, external_data)
        spec = StageSpec(
            name=stage_name, file=rel, precision=precision,
            inputs=bundle_onnx.reconcile_io(stage_name, "input", inputs, graph_io[0]),
            outputs=bundle_onnx.reconcile_io(stage_name, "output", outputs, graph_io[1]),
            dim_ranges=dict(dim_ranges),
            profiles=tuple(profiles),
            external_data=tuple(ext_files), doc=doc,
        )
        self.stages[stage_name] = spec
        return spec

    def add_tokenizer(self, tokenizer_json: str | Path, preprocessor_config: str | Path | dict,
                      **extra: Any) -> TokenizerInfo:
        info = TokenizerInfo(extra=extra)
        self.add_file(tokenizer_json, info.file)
        if isinstance(preprocessor_config, dict):
            self.add_json(info.preprocessor_file, preprocessor_config)
        else:
            self.add_file(preprocessor_config, info.preprocessor_file)
        self.tokenizer = info
        return info

    # -------------------------------------------------------------------- descriptive fields
    def set_model(self, config: ArmConfig | dict, *, checkpoint: str | Path = "", config_sha256: str = "",
                  weights_sha256: str = "", name: str = "", depth_codes: str = "") -> ModelInfo:
        cfg = config if isinstance(config, ArmConfig) else ArmConfig.from_dict(config, source="set_model(config)")
        self.model = ModelInfo(config=cfg.to_dict(), variant=cfg.variant, source_checkpoint=str(checkpoint),
                               source_config_sha256=config_sha256, source_weights_sha256=weights_sha256, name=name,
                               depth_codes=depth_codes)
        return self.model

    def set_grammar(self, grammar: dict[str, Any]) -> None:
        self.grammar = grammar

    def set_norm_stats(self, norm_stats: dict[str, Any]) -> None:
        self.norm_stats = norm_stats

    def set_quantization(self, recipe: str, options: dict[str, Any] | None = None, report: Any = None) -> None:
        self.quantization = QuantizationInfo(recipe=recipe, options=options or {}, report=report)

    def set_verification(self, status: str, gates: dict[str, Any] | None = None,
                         results: Iterable[dict[str, Any]] = ()) -> None:
        self.verification = VerificationInfo(status=status, gates=gates or {}, results=tuple(results))

    # -------------------------------------------------------------------- commit
    def commit(self) -> Path:
        tmp = self._open_dir()
        if self.model is None:
            raise BundleError(f"{self.out_dir}: no model recorded; call writer.set_model(config, ...) before the bundle is closed")
        if self.tokenizer is None:
            raise BundleError(f"{self.out_dir}: no tokenizer; call writer.add_tokenizer(tokenizer.json, preprocessor_config) first")
        files = {rel: entry for rel, entry in _hash_tree(tmp, fsync=True)}
        manifest = Manifest(
            tool=ToolInfo("edgeact", tool_version()), created_utc=utc_now(), model=self.model,
            stages=dict(self.stages), tokenizer=self.tokenizer, weights=dict(self.weights), files=files,
            grammar=self.grammar, norm_stats=self.norm_stats, quantization=self.quantization,
            verification=self.verification, engines=[],
        )
        # Round-trip through JSON and the loader's own parser: what is published is what loads.
        manifest = Manifest.from_dict(json.loads(json.dumps(manifest.to_dict())))
        _write_json_durably(tmp / MANIFEST_NAME, manifest.to_dict())
        fsync_tree(tmp)
        if self.before_publish is not None:
            self.before_publish(tmp)            # the target still holds what it held (or nothing)
            manifest = read_manifest(tmp)       # with what the step recorded (update_manifest: durable)
        _check_replaceable(self.out_dir, self.overwrite)
        publish(tmp, self.out_dir)
        self.tmp_dir = None
        self.manifest = manifest
        return self.out_dir


# ------------------------------------------------------------------------------ helpers
def _check_replaceable(out_dir: Path, overwrite: bool) -> None:
    if not out_dir.exists():
        return
    if not overwrite:
        raise BundleError(f"{out_dir}: already exists; pass overwrite=True (--overwrite) or choose another directory")
    # Never delete a directory that is not a bundle: a typo must not wipe someone's home, and other tools
    # (calibration sets, demo recordings, web projects) write a manifest.json of their own.
    why = "not a directory" if not out_dir.is_dir() else _not_a_bundle(out_dir) if any(out_dir.iterdir()) else ""
    if why:
        raise BundleError(f"{out_dir}: exists and is not a bundle ({why}); refusing to replace it: choose another "
                          "output directory, or remove that one yourself if you really mean to replace it")


# A bundle manifest's identifying fields (any schema version: an old bundle may be replaced by a re-export).
_BUNDLE_FIELDS = {"schema_version": int, "tool": dict, "model": dict, "stages": dict, "files": dict}


def _not_a_bundle(directory: Path) -> str:
    """Why `directory` is not an edgeact bundle ('' if it is one): its manifest must be a bundle manifest."""
    path = directory / MANIFEST_NAME
    if not path.is_file():
        return f"no {MANIFEST_NAME}"
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return f"its {MANIFEST_NAME} is not valid JSON"
    if not isinstance(data, dict):
        return f"its {MANIFEST_NAME} is not a bundle manifest"
    missing = [k for k, kind in _BUNDLE_FIELDS.items() if not isinstance(data.get(k), kind)
               or (kind is int and isinstance(data.get(k), bool))]
    if missing:
        return f"its {MANIFEST_NAME} is not a bundle manifest: no {', '.join(missing)}"
    if data["tool"].get("name") != "edgeact":
        return f"its {MANIFEST_NAME} was written by {data['tool'].get('name')!r}, not edgeact"
    return ""


def _hash_tree(root: Path, fsync: bool) -> Iterator[tuple[str, FileEntry]]:
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            # A link would point outside the bundle once it is copied onto the robot.
            raise BundleError(f"{rel}: not a regular file (symlink or device); a bundle holds plain files only")
        if rel != MANIFEST_NAME and path.is_file():
            yield rel, _hash_entry(path, fsync)


def _hash_entry(path: Path, fsync: bool) -> FileEntry:
    if fsync:
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    return FileEntry(sha256=sha256_file(path), bytes=path.stat().st_size)


def _write_json_durably(path: Path, obj: Any) -> None:
    with open(path, "w") as f:
        f.write(json.dumps(obj, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def _locked(bundle_dir: Path) -> Iterator[None]:
    """Serialize manifest updates (two build-engines runs at once must not lose a record)."""
    fd = os.open(bundle_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)   # closing releases the lock


def update_manifest(bundle_dir: str | Path, fn: Callable[[Manifest], Manifest | None], *,
                    rehash: Iterable[str] = ()) -> Manifest:
    """Change a published bundle's manifest: `fn` edits (or returns) the Manifest; then manifest.json is
    replaced atomically.

    Files added to the bundle since (e.g. engines/orin/decoder.plan) are hashed and listed; files
    replaced in place must be named in `rehash`. A listed file that is missing, or whose size changed
    without being named in `rehash`, is refused: the bundle would no longer be what was verified.
    Hidden files (a leading '.') are in-progress temporaries and are ignored, and so is onnxruntime's TensorRT
    engine cache (ORT_TRT_CACHE_DIR): it is rebuilt at will, and a checksum of it would make the bundle "corrupt".
    """
    root = Path(bundle_dir)
    rehash = {check_relpath(r, "rehash") for r in rehash}
    with _locked(root):
        manifest = read_manifest(root)
        result = fn(manifest)
        manifest = result if result is not None else manifest
        on_disk = {p.relative_to(root).as_posix(): p for p in root.rglob("*")
                   if p.is_file() and p.name != MANIFEST_NAME
                   and not any(part.startswith(".") for part in p.relative_to(root).parts)
                   and not in_ort_trt_cache(p.relative_to(root).as_posix())}
        files = dict(manifest.files)
        for rel, entry in files.items():
            if rel not in on_disk:
                raise BundleError(f"{rel}: missing from {root} but listed in {MANIFEST_NAME}; re-copy or re-export the bundle")
            if rel not in rehash and on_disk[rel].stat().st_size != entry.bytes:
                raise BundleError(f"{rel}: size changed since export (file modified); re-copy or re-export the bundle")
        for rel, path in on_disk.items():
            if rel not in files or rel in rehash:
                files[rel] = _hash_entry(path, fsync=True)
        manifest.files = files
        manifest.validate()         # as written (reading may soften an old verdict, writing may not)
        checked = Manifest.from_dict(manifest.to_dict())   # full validation before anything is replaced
        tmp = root / f".{MANIFEST_NAME}.tmp"
        _write_json_durably(tmp, checked.to_dict())
        os.replace(tmp, root / MANIFEST_NAME)
        fsync_path(root)
        return checked


def refuse_out_in_source(src: str | Path, out: str | Path) -> None:
    """Refuse an output directory that is the source bundle or lies inside it, compared where the paths lead (symlinks
    and `..` resolved): a bundle derived from another (quantize, add-depth-tokenizer) never modifies it."""
    source, target = Path(src).resolve(), Path(out).resolve()
    if target == source or source in target.parents:
        where = "is the source bundle" if target == source else "lies inside the source bundle"
        raise BundleError(f"{out}: {where} {src} ({source}); write the new bundle to another directory: the source "
                          "bundle is never modified")


def copy_bundle(src: str | Path, writer: BundleWriter, *, skip_stages: Iterable[str] = (),
                skip_weights: Iterable[str] = ()) -> Manifest:
    """Start `writer` as a copy of bundle `src` (which is only read): every file is copied and its sha256
    checked while copying; stages and weights are registered unless skipped (the caller re-adds them,
    e.g. quantized). Quantization, verification and engines are not carried over: they describe the
    old content. Returns the source manifest.
    """
    skip_stages, skip_weights = set(skip_stages), set(skip_weights)
    source = load_bundle(src, verify_checksums=False, allow_failed_verification=True)
    m = source.manifest
    unknown = sorted(skip_stages - set(m.stages)) + sorted(skip_weights - set(m.weights))
    if unknown:
        raise BundleError(f"{src}: cannot skip {unknown}: not in the bundle (stages {sorted(m.stages)}, weights {sorted(m.weights)})")
    dropped = {f for s in skip_stages for f in m.stages[s].files()}
    dropped |= {m.weights[w].file for w in skip_weights} | {r.file for r in m.engines}
    for rel, entry in sorted(m.files.items()):
        if rel not in dropped:
            _copy_checked(source.root, rel, writer.path_for(rel), entry)
    writer.model, writer.tokenizer = m.model, m.tokenizer
    writer.grammar, writer.norm_stats = dict(m.grammar), dict(m.norm_stats)
    writer.stages.update({n: s for n, s in m.stages.items() if n not in skip_stages})
    writer.weights.update({n: w for n, w in m.weights.items() if n not in skip_weights})
    return m


def _copy_checked(src_root: Path, rel: str, dst: Path, entry: FileEntry) -> None:
    digest = hashlib.sha256()
    with open(src_root / rel, "rb") as fin, open(dst, "wb") as fout:
        while chunk := fin.read(_CHUNK_BYTES):
            digest.update(chunk)
            fout.write(chunk)
    if digest.hexdigest() != entry.sha256:
        raise BundleError(f"{rel}: sha256 mismatch in the source bundle {src_root} (file corrupt or modified); "
                          "re-copy or re-export the source bundle before deriving a new one")
