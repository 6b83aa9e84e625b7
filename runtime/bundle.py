"""Load a bundle from disk and prove it is whole: manifest, schema version, files, sha256, verification.

`load_bundle` is the one door into a bundle on the robot. It refuses, with a message that
names the file and the fix, anything that is not exactly what the exporter wrote: a missing
or interrupted export, a manifest of another schema version, a missing, truncated or
modified file, or a bundle whose verification failed (unless explicitly overridden).
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from edgeact.runtime.answer import check_grammar_record
from edgeact.runtime.arm_config import ArmConfig
# The schema is part of this module's API: `from edgeact.runtime.bundle import StageSpec, ...`.
from edgeact.runtime.bundle_manifest import (  # noqa: F401
    MANIFEST_NAME, SCHEMA_CHANGES, SCHEMA_VERSION, VERIFICATION_STATUSES, EngineRecord, FileEntry, Manifest, ModelInfo,
    QuantizationInfo, TokenizerInfo, ToolInfo, VerificationInfo, WeightSpec,
)
from edgeact.runtime.bundle_manifest import OTHER_MANIFESTS, manifest_kind
from edgeact.runtime.errors import BundleError
from edgeact.runtime.stage_spec import (  # noqa: F401
    DTYPES, PRECISIONS, DimRange, StageProfile, StageSpec, TensorSpec, check_relpath, dim_symbols, dim_terms,
)

PARTIAL_INFIX = ".partial-"      # the writer builds `.NAME.partial-XXXX` beside the final directory
# An overwrite moves the old bundle to `.NAME.old-XXXX/previous` and removes it once the new one is in place.
OLD_INFIX = ".old-"
PREVIOUS_NAME = "previous"
ALLOW_UNVERIFIED_FLAG = "--allow-unverified"
# How each caller loads a bundle whose verification failed; callers pass the one that applies to them.
UNVERIFIED_FIX_CONFIG = "set `allow_unverified: true` in the robot config's policy section"
UNVERIFIED_FIX_DEFAULT = (f"to load it anyway: {UNVERIFIED_FIX_CONFIG} (edgeact run, edgeact bench), pass "
                          f"{ALLOW_UNVERIFIED_FLAG} (edgeact flash, edgeact build-engines, edgeact eval), or "
                          "allow_unverified=True (BundlePolicy in Python)")
_CHUNK_BYTES = 1 << 20            # stream hashes: a 7B stage is gigabytes, never read it whole
FIX_COPY = "re-copy or re-export the bundle"


def tool_version() -> str:
    try:
        return importlib.metadata.version("edgeact")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def manifest_sha256(bundle_dir: str | Path) -> str:
    """The sha256 of a bundle's manifest.json: it lists every file's sha256, so it names the whole bundle (engines
    built into it since included)."""
    return hashlib.sha256((Path(bundle_dir) / MANIFEST_NAME).read_bytes()).hexdigest()


def partial_exports(bundle_dir: str | Path) -> list[Path]:
    """Temporary directories an interrupted BundleWriter left beside `bundle_dir`."""
    bundle_dir = Path(bundle_dir)
    parent = bundle_dir.parent
    if not parent.is_dir():
        return []
    return sorted(parent.glob(f".{bundle_dir.name}{PARTIAL_INFIX}*"))


def previous_bundles(bundle_dir: str | Path) -> list[Path]:
    """Bundles an interrupted overwrite moved aside (`.NAME.old-XXXX/previous`) and did not get to remove."""
    bundle_dir = Path(bundle_dir)
    parent = bundle_dir.parent
    if not parent.is_dir():
        return []
    return sorted(p / PREVIOUS_NAME for p in parent.glob(f".{bundle_dir.name}{OLD_INFIX}*")
                  if (p / PREVIOUS_NAME / MANIFEST_NAME).is_file())


def _interrupted_hint(bundle_dir: Path) -> str:
    """What an interrupted export or overwrite left beside `bundle_dir`, and what to do with it ('' if nothing)."""
    partial, previous = partial_exports(bundle_dir), previous_bundles(bundle_dir)
    leftovers = ", ".join(p.name for p in partial)
    cleanup = (f"; {leftovers} {'is' if len(partial) == 1 else 'are'} left by interrupted runs: remove "
               f"{'it' if len(partial) == 1 else 'them'} (rm -r) once no export or quantize into {bundle_dir.name} "
               "is running" if partial else "")
    if previous and not bundle_dir.exists():
        prev = previous[-1]
        return (f"; an overwrite was interrupted after moving the previous bundle aside: it survives in {prev}; "
                f"restore it with `mv {prev} {bundle_dir}` (then remove the empty {prev.parent.name}), or re-run the "
                f"export{cleanup}")
    if partial:
        return f"; found {partial[0].name} beside it: the export was interrupted; re-run it{cleanup}"
    return ""


def read_manifest(bundle_dir: str | Path) -> Manifest:
    """Parse and validate manifest.json (schema, fields, config); does not look at the other files."""
    bundle_dir = Path(bundle_dir)
    path = bundle_dir / MANIFEST_NAME
    if not path.is_file():
        hint = _interrupted_hint(bundle_dir)
        if not bundle_dir.exists() and bundle_dir.is_symlink():
            target = bundle_dir.parent / os.readlink(bundle_dir)
            raise BundleError(f"{bundle_dir}: a link to {target}, which is missing; in a bundle store (edgeact "
                              f"flash), `edgeact flash --list --store {bundle_dir.parent}` shows what is installed "
                              "(and puts back an entry an interrupted install moved aside), and --rollback or --use "
                              "ID makes one current; otherwise point the link at a bundle")
        if not bundle_dir.exists() and bundle_dir.name == "current" and not hint:
            raise BundleError(f"{bundle_dir}: no bundle here; if {bundle_dir.parent} is a bundle store, nothing is "
                              f"installed in it yet: `edgeact flash BUNDLE --store {bundle_dir.parent}`")
        if not bundle_dir.exists():
            raise BundleError(f"{bundle_dir}: no bundle here{hint or '; check the path or run the export first'}")
        raise BundleError(f"{path}: missing; {bundle_dir} is not a bundle or an incomplete copy"
                          f"{hint or '; ' + FIX_COPY}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path}: not valid JSON ({exc}); the file is corrupt: {FIX_COPY}") from None
    _check_schema_version(data, path)
    try:
        manifest = Manifest.from_dict(data)
    except BundleError as exc:
        raise BundleError(f"{path}: {exc}; the manifest is malformed or was edited by hand: re-export the bundle") from None
    check_grammar_record(manifest.grammar, str(path))
    return manifest


def _check_schema_version(data: Any, path: Path) -> None:
    found = data.get("schema_version") if isinstance(data, dict) else None
    if found == SCHEMA_VERSION:
        return
    if (kind := manifest_kind(data)) is not None:
        fix = "give a bundle directory (the --out of edgeact export or quantize)"
        if kind in OTHER_MANIFESTS.values():
            raise BundleError(f"{path}: the manifest of {kind}, not of a bundle; {fix}")
        raise BundleError(f"{path}: not a bundle's manifest: it holds {kind}, where a bundle's is an object with "
                          f"schema_version, model, stages and files; {fix}")
    ours = tool_version()
    fix = f"re-export with edgeact {ours}"
    if isinstance(found, int) and found > SCHEMA_VERSION:
        writer = (data.get("tool") or {}).get("version", "a newer version")
        fix += f", or upgrade edgeact here to the version that wrote it ({writer})"
    why = f" ({SCHEMA_CHANGES[found]})" if isinstance(found, int) and found in SCHEMA_CHANGES else ""
    raise BundleError(f"{path}: schema_version {found!r}, but edgeact {ours} reads schema_version "
                      f"{SCHEMA_VERSION}{why}; {fix}")


def verify_files(bundle_dir: str | Path, manifest: Manifest, checksums: bool = True, graphs: bool = True,
                 links: bool = False) -> None:
    """Every listed file exists, a plain file inside the bundle (`links`: or behind a symbolic link: `edgeact flash`
    reads its source so, hashing what it copies into plain files), with its recorded size and (if `checksums`) its
    sha256; and (if `graphs`) every stage's graph reads no file but its listed external data (runtime/onnx_refs.py;
    `edgeact flash` checks the graphs of the copy it hashed, not the source's: `check_graphs`)."""
    root = Path(bundle_dir)
    for rel, entry in sorted(manifest.files.items()):
        path = root / rel
        linked = None if links else next(
            (part for part in (root.joinpath(*rel.split("/")[:i + 1]) for i in range(rel.count("/") + 1))
             if part.is_symlink()), None)
        if linked is not None:      # its bytes would live outside the bundle, and change after they were checked
            raise BundleError(f"{rel}: {linked.relative_to(root).as_posix()} is a symbolic link; a bundle holds plain "
                              f"files only (the exporter writes no links): {FIX_COPY} without links (cp -rL)")
        if not path.is_file():
            raise BundleError(f"{rel}: missing from {root} (listed in {MANIFEST_NAME}); the copy is incomplete: {FIX_COPY}")
        size = path.stat().st_size
        if size != entry.bytes:
            raise BundleError(f"{rel}: {size} bytes but the manifest says {entry.bytes} (file truncated or modified); {FIX_COPY}")
    if checksums:
        for rel, entry in sorted(manifest.files.items()):
            if sha256_file(root / rel) != entry.sha256:
                raise BundleError(f"{rel}: sha256 mismatch (file corrupt or modified); {FIX_COPY}")
    if graphs:
        check_graphs(root, manifest)


def check_graphs(bundle_dir: str | Path, manifest: Manifest, where: str | Path | None = None) -> None:
    """Every stage's graph reads no file but its listed external data; errors name the stage's file under `where`
    (default: the bundle folder itself)."""
    from edgeact.runtime.onnx_refs import check_external_files

    root = Path(bundle_dir)
    for name, spec in sorted(manifest.stages.items()):
        check_external_files(root / spec.file, spec.file.rpartition("/")[0], spec.external_data,
                             f"stage {name!r} ({Path(where) / spec.file if where else spec.file})")


def check_verification(manifest: Manifest, where: str | Path, allow_failed: bool = False,
                       fix: str = UNVERIFIED_FIX_DEFAULT) -> None:
    """Refuse a bundle whose verification failed; `fix` is what the caller's user can do about it."""
    v = manifest.verification
    if v.status != "failed" or allow_failed:
        return
    first = v.failing()[0]
    details = ", ".join(f"{k}={first[k]}" for k in first if k not in ("gate", "passed"))
    more = len(v.failing()) - 1
    raise BundleError(
        f"{where}: verification failed at gate {first['gate']!r}" + (f" ({details})" if details else "")
        + (f" and {more} more" if more else "")
        + "; its outputs differ from the reference beyond the gate. Re-export or quantize with another recipe; "
        + fix)


class Bundle:
    """A loaded, checked bundle: the manifest, paths of its files, and its weight arrays (memory-mapped)."""

    def __init__(self, root: str | Path, manifest: Manifest) -> None:
        self.root = Path(root)
        self.manifest = manifest
        self._weights: dict[str, np.ndarray] = {}

    def __repr__(self) -> str:
        return f"Bundle({str(self.root)!r}, stages={list(self.manifest.stages)})"

    @property
    def config(self) -> ArmConfig:
        return self.manifest.model.arm_config()

    def path(self, rel: str) -> Path:
        return self.root / rel

    def stage(self, name: str) -> StageSpec:
        try:
            return self.manifest.stages[name]
        except KeyError:
            raise BundleError(f"{self.root}: no stage {name!r}; it has {sorted(self.manifest.stages)}") from None

    def stage_path(self, name: str) -> Path:
        return self.path(self.stage(name).file)

    def engine(self, stage: str, target: str) -> EngineRecord | None:
        return self.manifest.engines_for(target).get(stage)

    def weight(self, name: str) -> np.ndarray:
        """The array, memory-mapped read-only on first use (the embedding table need not fit twice in RAM)."""
        if name not in self._weights:
            try:
                spec = self.manifest.weights[name]
            except KeyError:
                raise BundleError(f"{self.root}: no weight {name!r}; it has {sorted(self.manifest.weights)}") from None
            try:
                array = np.load(self.path(spec.file), mmap_mode="r", allow_pickle=False)
            except (ValueError, OSError) as exc:    # what a damaged header gives (checksums off: unseen before)
                raise BundleError(f"{spec.file}: not a readable .npy array ({exc}); the file is corrupt: "
                                  f"{FIX_COPY} (loading with checksums on finds such damage at load)") from None
            if str(array.dtype) != spec.dtype or tuple(array.shape) != spec.shape:
                raise BundleError(f"{spec.file}: holds {array.dtype}{list(array.shape)} but the manifest says "
                                  f"{spec.dtype}{list(spec.shape)}; {FIX_COPY}")
            self._weights[name] = array
        return self._weights[name]

    def total_bytes(self) -> int:
        return sum(f.bytes for f in self.manifest.files.values())


def load_bundle(path: str | Path, verify_checksums: bool = True, allow_failed_verification: bool = False,
                unverified_fix: str = UNVERIFIED_FIX_DEFAULT) -> Bundle:
    """Open a bundle directory; raises BundleError naming the file and the fix on anything wrong.

    Sizes are always checked; `verify_checksums` also hashes every file (seconds per GB). `unverified_fix`:
    how the caller's user loads a bundle whose verification failed (the end of that error).
    """
    root = Path(path)
    manifest = read_manifest(root)
    check_verification(manifest, root, allow_failed_verification, unverified_fix)   # cheap: before hashing gigabytes
    verify_files(root, manifest, checksums=verify_checksums)
    return Bundle(root, manifest)
