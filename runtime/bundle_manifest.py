"""The bundle's manifest.json schema as validated dataclasses (no torch, no onnx: json-able only).

A bundle is the one artifact that goes onto a robot. Its manifest says what every file is
(stages, weights, tokenizer), what every tensor looks like (runtime/stage_spec.py), what was
done to it (quantization, verification, engines built on a target), and the sha256 of every
file. `from_dict` refuses anything malformed with a message that names the field.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any, Iterator

from edgeact.runtime.arm_config import ArmConfig
from edgeact.runtime.errors import BundleError, CheckpointError
from edgeact.runtime.stage_spec import DTYPES, StageSpec, check_relpath, field_error, get_field, map_fields

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
# What each older schema lacks, for the error that refuses it (runtime/bundle.py).
SCHEMA_CHANGES = {
    1: "schema 1 ran the ViT, pooling and projector as one `vision` stage over all crops at once; schema 2 splits "
       "them into `vision` (the ViT, run one crop at a time) and `connector`, which keeps the runtime's memory lower",
}
MANIFEST_NAME = "manifest.json"
VERIFICATION_STATUSES = ("passed", "failed", "not_run")
# onnxruntime's TensorRT provider keeps its engine cache here inside the bundle (runtime/ort_engine.py). The cache is
# onnxruntime's, rebuilt whenever TensorRT or the GPU changes: never part of the bundle's content, never checksummed.
ORT_TRT_CACHE_DIR = "engines/ort-tensorrt"


def in_ort_trt_cache(rel: str) -> bool:
    """Whether bundle-relative path `rel` lies in onnxruntime's TensorRT engine cache (ORT_TRT_CACHE_DIR)."""
    return rel == ORT_TRT_CACHE_DIR or rel.startswith(f"{ORT_TRT_CACHE_DIR}/")


_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# Other edgeact directories with a manifest.json, by its "format" (before any "/version"): named when one is given
# where a bundle is expected, or a bundle where one of them is.
OTHER_MANIFESTS = {"edgeact-calibration": "a quantization calibration set (edgeact calibrate)",
                   "edgeact-sim-demos": "a demonstration set (edgeact sim-demos)"}
_BUNDLE_KEYS = ("schema_version", "stages", "model", "files")


def manifest_kind(data: Any) -> str | None:
    """What the content of a manifest.json is, when it is not a bundle's: "a demonstration set (edgeact sim-demos)",
    "a JSON list" ...; None when it looks like a bundle's (an object with any of a bundle's top-level keys)."""
    if not isinstance(data, dict):
        return f"a JSON {'list' if isinstance(data, list) else type(data).__name__}"
    fmt = data.get("format")
    if isinstance(fmt, str) and fmt.split("/")[0] in OTHER_MANIFESTS:
        return OTHER_MANIFESTS[fmt.split("/")[0]]
    if any(key in data for key in _BUNDLE_KEYS):
        return None
    return f"a JSON object with keys {', '.join(sorted(map(str, data))[:6]) or '(none)'}"


# ----------------------------------------------------------------------------- weights, files
@dataclass(frozen=True)
class WeightSpec:
    """An array the runtime uses directly (embedding table incl. additional rows, LM head): a .npy file."""
    name: str
    file: str
    dtype: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        check_relpath(self.file, f"weights.{self.name}.file")
        if self.dtype not in DTYPES:
            raise field_error(f"weights.{self.name}", f"dtype {self.dtype!r} unknown")
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in self.shape):
            raise field_error(f"weights.{self.name}", f"shape {list(self.shape)} must be non-negative integers")
        object.__setattr__(self, "shape", tuple(self.shape))

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, name: str, data: Any, where: str) -> "WeightSpec":
        return cls(name=name, file=get_field(data, "file", str, where), dtype=get_field(data, "dtype", str, where),
                   shape=tuple(get_field(data, "shape", list, where)))


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "bytes": self.bytes}

    @classmethod
    def from_dict(cls, rel: str, data: Any, where: str) -> "FileEntry":
        check_relpath(rel, where)
        sha = get_field(data, "sha256", str, where)
        if not _SHA256.match(sha):
            raise field_error(where, f"sha256 {sha!r} is not 64 lower-case hex digits")
        return cls(sha256=sha, bytes=get_field(data, "bytes", int, where))


# ------------------------------------------------------------------------- descriptive records
@dataclass(frozen=True)
class ToolInfo:
    name: str
    version: str

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "version": self.version}


@dataclass(frozen=True)
class ModelInfo:
    """The model the stages were exported from; `config` is the full ArmConfig dict."""
    config: dict[str, Any]
    variant: str                       # 'D' or 'O', as ArmConfig.variant reads it off the config
    source_checkpoint: str = ""
    source_config_sha256: str = ""
    # calibration_set.weights_sha256 of the checkpoint: a config names an architecture, this the model ('' in bundles
    # written before it was recorded)
    source_weights_sha256: str = ""
    name: str = ""                     # free-form, e.g. 'molmoact-7b-d' or 'tiny-sim'
    # The depth codes the model was trained to answer, from its checkpoint's training log: "pooled" (the stand-in),
    # "vqvae:<sha256 of the depth tokenizer's weights>", or "" (not recorded: a checkpoint edgeact did not train, or
    # trained before this was recorded)
    depth_codes: str = ""

    def arm_config(self) -> ArmConfig:
        try:
            return ArmConfig.from_dict(self.config, source="model.config")
        except CheckpointError as exc:
            raise BundleError(str(exc)) from None

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config, "variant": self.variant, "name": self.name,
                "source": {"checkpoint": self.source_checkpoint, "config_sha256": self.source_config_sha256,
                           "weights_sha256": self.source_weights_sha256, "depth_codes": self.depth_codes}}

    @classmethod
    def from_dict(cls, data: Any, where: str = "model") -> "ModelInfo":
        source = get_field(data, "source", dict, where, {})
        info = cls(config=get_field(data, "config", dict, where), variant=get_field(data, "variant", str, where),
                   source_checkpoint=get_field(source, "checkpoint", str, f"{where}.source", ""),
                   source_config_sha256=get_field(source, "config_sha256", str, f"{where}.source", ""),
                   source_weights_sha256=get_field(source, "weights_sha256", str, f"{where}.source", ""),
                   depth_codes=get_field(source, "depth_codes", str, f"{where}.source", ""),
                   name=get_field(data, "name", str, where, ""))
        cfg = info.arm_config()
        if cfg.variant != info.variant:
            raise field_error(f"{where}.variant", f"says {info.variant!r} but the config is variant {cfg.variant!r}")
        return info


@dataclass(frozen=True)
class TokenizerInfo:
    file: str = "tokenizer.json"
    preprocessor_file: str = "preprocessor_config.json"
    extra: dict[str, Any] = field(default_factory=dict)   # e.g. the token layout the exporter checked

    def files(self) -> tuple[str, ...]:
        return (self.file, self.preprocessor_file)

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "preprocessor_file": self.preprocessor_file, **self.extra}

    @classmethod
    def from_dict(cls, data: Any, where: str = "tokenizer") -> "TokenizerInfo":
        info = cls(file=check_relpath(get_field(data, "file", str, where), f"{where}.file"),
                   preprocessor_file=check_relpath(get_field(data, "preprocessor_file", str, where), f"{where}.preprocessor_file"),
                   extra={k: v for k, v in data.items() if k not in ("file", "preprocessor_file")})
        return info


@dataclass(frozen=True)
class QuantizationInfo:
    """What the quantizer did. `report` is best a list of row dicts (one per stage or layer)."""
    recipe: str
    options: dict[str, Any] = field(default_factory=dict)
    report: Any = None

    def to_dict(self) -> dict[str, Any]:
        return {"recipe": self.recipe, "options": self.options, "report": self.report}

    @classmethod
    def from_dict(cls, data: Any, where: str = "quantization") -> "QuantizationInfo":
        return cls(recipe=get_field(data, "recipe", str, where), options=get_field(data, "options", dict, where, {}),
                   report=data.get("report"))


@dataclass(frozen=True)
class VerificationInfo:
    """Result of comparing every stage with the reference. Each result row has 'gate' and 'passed', and 'stage' (the
    stage it gates, or 'all'); a 'passed' manifest has a row for every stage (Manifest.validate)."""
    status: str = "not_run"
    gates: dict[str, Any] = field(default_factory=dict)
    results: tuple[dict[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if self.status not in VERIFICATION_STATUSES:
            raise field_error("verification.status", f"{self.status!r} unknown; use one of {', '.join(VERIFICATION_STATUSES)}")
        object.__setattr__(self, "results", tuple(self.results))
        for i, row in enumerate(self.results):
            if not isinstance(row, dict) or not isinstance(row.get("gate"), str) or not isinstance(row.get("passed"), bool):
                raise field_error(f"verification.results[{i}]", "each result needs 'gate' (str) and 'passed' (bool)")
        if self.status == "passed" and self.failing():
            raise field_error("verification", f"status is 'passed' but gates {[r['gate'] for r in self.failing()]} failed")
        if self.status == "failed" and not self.failing():
            raise field_error("verification", "status is 'failed' but no result row failed; record the failing gate")

    def failing(self) -> list[dict[str, Any]]:
        return [r for r in self.results if not r["passed"]]

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "gates": self.gates, "results": list(self.results)}

    @classmethod
    def from_dict(cls, data: Any, where: str = "verification") -> "VerificationInfo":
        return cls(status=get_field(data, "status", str, where), gates=get_field(data, "gates", dict, where, {}),
                   results=tuple(get_field(data, "results", list, where, [])))


def _ungated_failed(verification: VerificationInfo, stages: list[str]) -> VerificationInfo:
    """A read verdict of 'passed' that no row backs for some stage (written by an `edgeact verify` or `quantize` that
    dropped the depth tokenizer's row) becomes 'failed' at that stage: such a bundle loads as any failed one does
    (`--allow-unverified`), and writers refuse to record a verdict like it (Manifest.validate)."""
    gated = {r.get("stage") for r in verification.results}
    ungated = [name for name in stages if name not in gated]
    if verification.status != "passed" or not ungated:
        return verification
    rows = [{"gate": f"{name}.unverified", "stage": name, "passed": False,
             "detail": f"no verification row covers stage {name!r} (an older `edgeact verify` or `quantize` dropped "
                       "it): build the bundle again (`edgeact add-depth-tokenizer` on the fp32 export, then "
                       "`edgeact quantize` from that), or run it as it is with --allow-unverified"} for name in ungated]
    log.warning("the bundle's verification was recorded 'passed' without checking stage(s) %s: taken as failed",
                ", ".join(ungated))
    return VerificationInfo("failed", verification.gates, (*verification.results, *rows))


@dataclass(frozen=True)
class EngineRecord:
    """A TensorRT engine built on (and only valid for) one target, TensorRT version and SM."""
    stage: str
    file: str
    target: str
    trt_version: str
    compute_capability: str          # "8.7"
    precision: str
    sha256: str
    profiles: tuple[str, ...] = ()   # optimization profile names, in engine profile-index order
    built_utc: str = ""
    # Built with TensorRT's TF32 flag on (fp32 layers in TF32). A record without the key is from before build-engines
    # turned TF32 off, i.e. built with TensorRT's default: on.
    tf32: bool = False

    def __post_init__(self) -> None:
        check_relpath(self.file, f"engines[{self.stage}].file")
        object.__setattr__(self, "profiles", tuple(self.profiles))

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "file": self.file, "target": self.target, "trt_version": self.trt_version,
                "compute_capability": self.compute_capability, "precision": self.precision,
                "sha256": self.sha256, "profiles": list(self.profiles), "built_utc": self.built_utc,
                "tf32": self.tf32}

    @classmethod
    def from_dict(cls, data: Any, where: str = "engines") -> "EngineRecord":
        keys = ("stage", "file", "target", "trt_version", "compute_capability", "precision", "sha256")
        return cls(**{k: get_field(data, k, str, where) for k in keys},
                   profiles=tuple(get_field(data, "profiles", list, where, [])),
                   built_utc=get_field(data, "built_utc", str, where, ""),
                   tf32=get_field(data, "tf32", bool, where, True))


# ------------------------------------------------------------------------------------ manifest
@dataclass
class Manifest:
    """The whole manifest. Mutable so that update_manifest callbacks can set fields; validated on (de)serialization."""
    tool: ToolInfo
    created_utc: str
    model: ModelInfo
    stages: dict[str, StageSpec]
    tokenizer: TokenizerInfo
    weights: dict[str, WeightSpec] = field(default_factory=dict)
    files: dict[str, FileEntry] = field(default_factory=dict)
    grammar: dict[str, Any] = field(default_factory=dict)       # opaque: written by the grammar module
    norm_stats: dict[str, Any] = field(default_factory=dict)
    quantization: QuantizationInfo | None = None
    verification: VerificationInfo = field(default_factory=VerificationInfo)
    engines: list[EngineRecord] = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        self.validate()

    def referenced_files(self) -> Iterator[tuple[str, str]]:
        """(where, path) of every file the manifest points at."""
        for stage in self.stages.values():
            for rel in stage.files():
                yield f"stages.{stage.name}", rel
        for weight in self.weights.values():
            yield f"weights.{weight.name}", weight.file
        for rel in self.tokenizer.files():
            yield "tokenizer", rel
        for rec in self.engines:
            yield f"engines[{rec.target}/{rec.stage}]", rec.file

    def validate(self) -> None:
        if not self.stages:
            raise field_error("stages", "empty; a bundle needs at least one stage")
        for name, stage in self.stages.items():
            if stage.name != name:
                raise field_error(f"stages.{name}", f"holds a stage named {stage.name!r}")
        for where, rel in self.referenced_files():
            if rel not in self.files:
                raise field_error(where, f"file {rel!r} is not listed in 'files' (every file needs a checksum)")
        for rec in self.engines:
            if rec.stage not in self.stages:
                raise field_error("engines", f"engine {rec.file!r} is for unknown stage {rec.stage!r}")
        if MANIFEST_NAME in self.files:
            raise field_error("files", f"{MANIFEST_NAME} cannot checksum itself")
        gated = {r.get("stage") for r in self.verification.results}
        ungated = [name for name in self.stages if name not in gated] if self.verification.status == "passed" else []
        if ungated:
            # A verdict that no row of a stage backs says nothing about it (an `edgeact verify` that measured the
            # model stages only used to drop the depth tokenizer's row and pass the bundle).
            raise field_error("verification", f"status is 'passed' but no result row gates stage {ungated[0]!r}, so "
                              "the verdict does not cover it (an older `edgeact verify` or `quantize` dropped the row); "
                              "write the bundle again: `edgeact add-depth-tokenizer` on the fp32 bundle, then "
                              "`edgeact quantize` from that for a quantized one")

    def engines_for(self, target: str) -> dict[str, EngineRecord]:
        return {r.stage: r for r in self.engines if r.target == target}

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "tool": self.tool.to_dict(),
            "created_utc": self.created_utc,
            "model": self.model.to_dict(),
            "stages": {n: s.to_dict() for n, s in self.stages.items()},
            "weights": {n: w.to_dict() for n, w in self.weights.items()},
            "files": {rel: f.to_dict() for rel, f in sorted(self.files.items())},
            "tokenizer": self.tokenizer.to_dict(),
            "grammar": self.grammar,
            "norm_stats": self.norm_stats,
            "quantization": self.quantization.to_dict() if self.quantization else None,
            "verification": self.verification.to_dict(),
            "engines": [r.to_dict() for r in self.engines],
        }

    @classmethod
    def from_dict(cls, data: Any) -> "Manifest":
        version = get_field(data, "schema_version", int, "")
        if version != SCHEMA_VERSION:
            raise field_error("schema_version", f"{version}, expected {SCHEMA_VERSION}")
        tool = get_field(data, "tool", dict, "")
        quant = data.get("quantization")
        return cls(
            schema_version=version,
            tool=ToolInfo(name=get_field(tool, "name", str, "tool"), version=get_field(tool, "version", str, "tool")),
            created_utc=get_field(data, "created_utc", str, ""),
            model=ModelInfo.from_dict(get_field(data, "model", dict, "")),
            stages=map_fields(get_field(data, "stages", dict, ""), "stages", StageSpec.from_dict),
            weights=map_fields(get_field(data, "weights", dict, "", {}), "weights", WeightSpec.from_dict),
            # Entries in the TensorRT cache were swept in by an update_manifest that did not exclude it: dropped.
            files={rel: entry for rel, entry in map_fields(get_field(data, "files", dict, ""), "files",
                                                           FileEntry.from_dict).items() if not in_ort_trt_cache(rel)},
            tokenizer=TokenizerInfo.from_dict(get_field(data, "tokenizer", dict, "")),
            grammar=get_field(data, "grammar", dict, "", {}),
            norm_stats=get_field(data, "norm_stats", dict, "", {}),
            quantization=None if quant is None else QuantizationInfo.from_dict(quant),
            verification=_ungated_failed(
                VerificationInfo.from_dict(get_field(data, "verification", dict, "", {"status": "not_run"})),
                list(get_field(data, "stages", dict, ""))),
            engines=[EngineRecord.from_dict(r) for r in get_field(data, "engines", list, "", [])],
        )
