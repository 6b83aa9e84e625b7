"""Verify a bundle against its PyTorch reference on held-out inputs, gate the numbers by precision, record the verdict.

`GATES` is the one table of accuracy gates: a row per stage precision, frozen. Each stage's
rows are gated by its own precision (vision by the ViT stage's, connector by the connector's,
decoder and logits by the decoder's); token agreement, which every stage affects, by the loosest
gate of all stages.
`verify_bundle` works on any bundle (exported or quantized) and writes status, gates and rows
into the manifest, where `load_bundle` refuses a failed bundle unless overridden. Stages it does
not measure (the depth tokenizer: its PyTorch encoder is not in the bundle) keep the rows the
step that added them recorded, and count in the status; such a stage without a row fails it.

Held-out inputs: synthetic camera frames numbered from HELD_OUT_FRAME_BASE on, at camera
poses of their own (pitches calibration never draws: the synthetic scene repeats every 120
frames, so the pose is what keeps the pictures apart), so that verification never sees what
calibration fitted.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping

from edgeact.export.depth_tokenizer_export import CODE_AGREEMENT_GATE
from edgeact.runtime.depth_tokenizer import STAGE as DEPTH_STAGE
from edgeact.runtime.errors import BundleError
from edgeact.runtime.stage_spec import PRECISIONS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Gate:
    """Minimum accepted values. Cosines are per row (feature, token, logits row), worst row over all frames."""
    vision_cosine: float        # the ViT's patch features, and the connector's image features
    decoder_cosine: float       # hidden states (prefill, decode step, chunk) and the new cache entries
    logits_cosine: float
    forced_agreement: float     # teacher-forced: masked argmax at every choice of the reference answer
    greedy_agreement: float     # free-running masked greedy, per kind (depth, trace, action)
    # Maximum relative error of each compared tensor's length (|len(bundle) / len(reference) - 1|), beside every
    # cosine gate: a cosine is blind to scale. Measured on the reference ARM's bundles: fp32 ~1e-6, int8 and fp8 at
    # most 1.2 %, int4 2 % (its logits' cosine 0.77); a stage off by 3x reads 2.0.
    norm_err: float = 0.0


# fp32 must reproduce the reference: only kernel summation order differs. Reduced precisions are
# judged mostly on teacher-forced agreement: a free-running answer that flips one early token
# continues differently, so its agreement measures luck as much as accuracy.
GATES: Mapping[str, Gate] = MappingProxyType({
    "fp32": Gate(0.99999, 0.99999, 0.99999, 1.0, 1.0, norm_err=1e-4),
    "fp16": Gate(0.9995, 0.9995, 0.9995, 0.98, 0.9, norm_err=0.005),
    "bf16": Gate(0.995, 0.995, 0.995, 0.95, 0.8, norm_err=0.02),
    "int8": Gate(0.99, 0.99, 0.99, 0.9, 0.7, norm_err=0.05),
    "fp8": Gate(0.99, 0.99, 0.99, 0.9, 0.7, norm_err=0.05),
    "int4": Gate(0.98, 0.98, 0.98, 0.85, 0.6, norm_err=0.08),
})
if set(GATES) != set(PRECISIONS):   # a new precision must get its gates here, not silently none
    raise RuntimeError(f"GATES covers {sorted(GATES)} but stages may be {sorted(PRECISIONS)}")

from edgeact.calibration.calibration_build import VERIFY_PITCHES  # noqa: E402  (the pose calibration never draws)

HELD_OUT_FRAME_BASE = 100_000
HELD_OUT_INSTRUCTIONS = (
    "pick up the red block",
    "push the green box to the left",
    "put the blue box next to the wall",
    "move the gripper above the red block",
)
HELD_OUT_CAMERA_PX = (320, 240)      # width, height
DEFAULT_FRAMES = 3

# measurement key -> (gate row name, stage whose precision gates it, or None for all stages, Gate field)
_ROWS = (
    ("vision", "vision.cosine", "vision", "vision_cosine"),           # the ViT's patch features
    ("connector", "connector.cosine", "connector", "vision_cosine"),  # pooled + projected image features
    ("decoder.prefill", "decoder.prefill.cosine", "decoder", "decoder_cosine"),
    ("decoder.cache", "decoder.cache.cosine", "decoder", "decoder_cosine"),
    ("decoder.step", "decoder.step.cosine", "decoder", "decoder_cosine"),
    ("decoder.chunk", "decoder.chunk.cosine", "decoder", "decoder_cosine"),
    ("logits", "logits.cosine", "decoder", "logits_cosine"),
    ("tokens.forced", "tokens.forced", None, "forced_agreement"),
    ("tokens.greedy.depth", "tokens.greedy.depth", None, "greedy_agreement"),
    ("tokens.greedy.trace", "tokens.greedy.trace", None, "greedy_agreement"),
    ("tokens.greedy.action", "tokens.greedy.action", None, "greedy_agreement"),
)
MEASURED_STAGES = tuple(dict.fromkeys(stage for _, _, stage, _ in _ROWS if stage))
# Stages verify cannot measure get their row from the step that adds them; verify keeps those rows. A stage
# without one fails at that step's gate (its name and limit, so that running the step again replaces the row).
UNMEASURED_GATES = {DEPTH_STAGE: ("depth_tokenizer_codes", CODE_AGREEMENT_GATE, "`edgeact add-depth-tokenizer`")}


@dataclass
class VerificationReport:
    status: str                              # "passed" or "failed"
    stage_precisions: dict[str, str]
    rows: list[dict[str, Any]]               # each: gate, stage, precision, value, limit, passed, and details
    frames: int
    checkpoint: str
    seconds: float
    gates: dict[str, Any] = field(default_factory=dict)
    # The manifest's `files` (sha256 and size of each) of the content compared: the verdict holds for these only.
    files: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def failing(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if not r["passed"]]


def gate_for(precisions: list[str]) -> Gate:
    """The loosest gate of several stage precisions, field by field."""
    gates = [GATES[p] for p in precisions]
    # Loosest: the lowest minimum, and for norm_err (a maximum) the highest.
    return Gate(**{f.name: (max if f.name == "norm_err" else min)(getattr(g, f.name) for g in gates)
                   for f in dataclasses.fields(Gate)})


def held_out_observations(n: int) -> list[tuple[Any, str]]:
    """n (RGB frame, instruction) pairs no calibration set uses; the same n always gives the same pairs."""
    from edgeact.drivers.cameras.synthetic import SyntheticCamera, SyntheticConfig

    width, height = HELD_OUT_CAMERA_PX
    out = []
    for k in range(n):
        pitch = VERIFY_PITCHES[k % len(VERIFY_PITCHES)]     # calibration never draws these (calibration_build)
        camera = SyntheticCamera(SyntheticConfig(width=width, height=height, pitch_deg=pitch))
        out.append((camera.render(HELD_OUT_FRAME_BASE + 7 * k).color, HELD_OUT_INSTRUCTIONS[k % len(HELD_OUT_INSTRUCTIONS)]))
    return out


def verify_bundle(bundle_dir: str | Path, checkpoint_dir: str | Path | None = None, frames: int = DEFAULT_FRAMES, *,
                  record: bool = True, threads: int | None = None,
                  on_frame: Callable[[int, int], None] | None = None) -> VerificationReport:
    """Compare every stage of the bundle with the reference on `frames` held-out observations; record the verdict.

    The reference is the checkpoint the manifest names (model.source.checkpoint) unless
    `checkpoint_dir` is given; it runs in float32 whatever the bundle's precision.
    """
    import torch

    from edgeact.export.checkpoint import load_model
    from edgeact.export.verify_compare import compare_observation
    from edgeact.runtime.bundle import load_bundle
    from edgeact.runtime.grammar import AnswerGrammar
    from edgeact.runtime.ort_stages import OrtStages
    from edgeact.runtime.preprocess import ImagePreprocessor
    from edgeact.runtime.preprocess_config import PreprocessConfig
    from edgeact.runtime.token_layout import TokenLayout, load_tokenizer

    if frames < 1:
        raise BundleError(f"frames is {frames}; verify on at least one held-out frame (default {DEFAULT_FRAMES})")
    start = time.perf_counter()
    bundle = load_bundle(bundle_dir, verify_checksums=True, allow_failed_verification=True)
    ckpt_dir = reference_checkpoint(bundle, checkpoint_dir)
    model, _ = load_model(ckpt_dir, dtype=torch.float32)
    tokenizer = load_tokenizer(bundle.path(bundle.manifest.tokenizer.file))
    layout = TokenLayout.from_tokenizer(tokenizer, str(bundle.path(bundle.manifest.tokenizer.file)))
    grammar = AnswerGrammar(tokenizer, layout, n_actions=int(bundle.manifest.grammar.get("n_actions", 1)))
    preprocessor = ImagePreprocessor(bundle.config, PreprocessConfig.load(
        bundle.path(bundle.manifest.tokenizer.preprocessor_file), bundle.config))
    stages = OrtStages(bundle, threads=threads)

    totals: dict[str, Any] = {}
    observations = held_out_observations(frames)
    for k, (rgb, instruction) in enumerate(observations):
        for key, value in compare_observation(model, stages, grammar, tokenizer, layout, preprocessor, rgb, instruction).items():
            totals[key] = value if key not in totals else _combine(totals[key], value)
        if on_frame is not None:
            on_frame(k + 1, frames)

    precisions = {name: spec.precision for name, spec in bundle.manifest.stages.items()}
    rows = _gate_rows(totals, precisions) + unmeasured_rows(bundle.manifest, missing=True)
    report = VerificationReport(
        status="passed" if all(r["passed"] for r in rows) else "failed", stage_precisions=precisions, rows=rows,
        frames=frames, checkpoint=str(ckpt_dir), seconds=time.perf_counter() - start,
        gates={"table": {p: dataclasses.asdict(GATES[p]) for p in sorted(set(precisions.values()))},
               "stages": precisions, "frames": frames, "checkpoint": str(ckpt_dir),
               "held_out": {"frame_base": HELD_OUT_FRAME_BASE, "instructions": len(HELD_OUT_INSTRUCTIONS)}},
        files=dict(bundle.manifest.files),      # load_bundle checked every sha256 against these
    )
    if record:
        record_verification(bundle_dir, report)
    return report


def unmeasured_rows(manifest, missing: bool = False) -> list[dict[str, Any]]:
    """The manifest's result rows for its stages verify does not measure (the depth tokenizer's, written by the step
    that added it), which a new verdict keeps; `missing`: plus a failed row for each such stage that has none.
    Each in a measured row's columns (gate, stage, precision, value, limit, detail, passed)."""
    rows = []
    for r in manifest.verification.results:
        stage = r.get("stage")
        # A `*.unverified` row is the reader's, for a stage with no row at all (runtime/bundle_manifest.py): none
        # was measured; `missing` adds the stage's own gate instead.
        if stage in manifest.stages and stage not in MEASURED_STAGES and not r["gate"].endswith(".unverified"):
            # add_depth_tokenizer writes agreement, min and images: kept in the columns verify's table prints.
            detail = "checked when the stage was added" + (f", on {r['images']} images" if "images" in r else "")
            rows.append({"gate": r["gate"], "stage": stage, "precision": manifest.stages[stage].precision,
                         "value": r.get("value", r.get("agreement")), "limit": r.get("limit", r.get("min")),
                         "detail": r.get("detail", detail), "passed": r["passed"]})
    if missing:
        for stage in sorted(set(manifest.stages) - set(MEASURED_STAGES) - {r["stage"] for r in rows}):
            gate, limit, step = UNMEASURED_GATES.get(stage, (f"{stage}.unmeasured", 1.0, "the step that added it"))
            rows.append({"gate": gate, "stage": stage, "precision": manifest.stages[stage].precision, "value": None,
                         "limit": limit, "passed": False,
                         "detail": f"no result row, and `edgeact verify` measures {', '.join(MEASURED_STAGES)} only: "
                                   f"add the {stage} stage again with {step}, which checks it"})
    return rows


def reference_checkpoint(bundle, checkpoint_dir: str | Path | None) -> Path:
    """The checkpoint to compare with; refuses one whose config.json or weights are not those the bundle was exported
    from. Another model of the same config would fail every gate of a good bundle, and that verdict would be recorded."""
    from edgeact.calibration.calibration_set import weights_sha256

    source = bundle.manifest.model.source_checkpoint
    if checkpoint_dir is None and not source:
        raise BundleError(f"{bundle.root}: the manifest records no source checkpoint; pass --checkpoint DIR")
    path = Path(checkpoint_dir if checkpoint_dir is not None else source)
    config = path / "config.json"
    if not config.is_file():
        how = "given" if checkpoint_dir is not None else "recorded at export"
        if _is_bundle(path):
            raise BundleError(f"{path}: a bundle, not a checkpoint (reference checkpoint {how}); pass --checkpoint "
                              f"DIR with the checkpoint (config.json, model.safetensors) this bundle was exported "
                              f"from{f', recorded as {source}' if source else ''}")
        raise BundleError(f"{path}: reference checkpoint ({how}) not found; pass --checkpoint DIR with the checkpoint "
                          "this bundle was exported from")
    recorded = bundle.manifest.model.source_config_sha256
    if not config_matches(config, bundle.manifest.model):
        raise BundleError(f"{config}: differs from the config the bundle was exported from (sha256 {recorded[:12]}); "
                          "pass --checkpoint DIR with the checkpoint this bundle came from")
    model = bundle.manifest.model
    if not model.source_weights_sha256:
        log.warning("%s records no weights digest of its checkpoint (exported before edgeact recorded one): cannot "
                    "check that %s holds the model it was exported from, only its config", bundle.root, path)
    elif (digest := weights_sha256("checkpoint", path)) != model.source_weights_sha256:
        raise BundleError(f"{path}: its weights (sha256 {digest[:12] or 'none: no *.safetensors'}) are not those "
                          f"{bundle.root} was exported from ({model.source_checkpoint or 'checkpoint'}, weights sha256 "
                          f"{model.source_weights_sha256[:12]}): same config, another model, whose comparison would "
                          "fail a good bundle; pass --checkpoint DIR with the checkpoint this bundle was exported "
                          f"from, or export this one to a bundle of its own (`edgeact export {path} --out DIR`)")
    return path


def config_matches(config: Path, model) -> bool:
    """Whether `config` (a checkpoint's config.json) is the one a bundle's model (its ModelInfo) was exported from: the
    same bytes, or the same config written otherwise (another formatting; a key an older edgeact wrote with its
    default value, such as adapter_config.pooling_attention_mask)."""
    from edgeact.runtime.arm_config import ArmConfig
    from edgeact.runtime.bundle import sha256_file
    from edgeact.runtime.errors import EdgeactError

    if not model.source_config_sha256 or sha256_file(config) == model.source_config_sha256:
        return True
    try:
        return ArmConfig.load(config).to_dict() == ArmConfig.from_dict(model.config).to_dict()
    except EdgeactError:
        return False


def _is_bundle(path: Path) -> bool:
    from edgeact.runtime.atomic_dir import folder_holds

    return folder_holds(path) == "a bundle"


def record_verification(bundle_dir: str | Path, report: VerificationReport):
    """Write the report into the bundle's manifest (atomically); returns the new Manifest.

    Refuses (BundleError) if the manifest's files are no longer those verified (`report.files`): another
    export, quantize or copy replaced the bundle meanwhile, and the verdict would describe other content.
    """
    from edgeact.export.bundle_writer import update_manifest
    from edgeact.runtime.bundle import VerificationInfo

    def edit(manifest) -> None:
        if manifest.files != report.files:
            changed = sorted(rel for rel in set(manifest.files) | set(report.files)
                             if manifest.files.get(rel) != report.files.get(rel))
            shown = ", ".join(changed[:4]) + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")
            raise BundleError(f"{bundle_dir}: the bundle changed while it was verified ({shown} differ from the "
                              f"files compared); its verdict ({report.status}) is not recorded: re-run "
                              f"`edgeact verify {bundle_dir}` on the bundle as it is now")
        manifest.verification = VerificationInfo(status=report.status, gates=report.gates, results=tuple(report.rows))

    return update_manifest(bundle_dir, edit)


def _combine(a, b):
    return a.worst(b) if hasattr(a, "worst") else a + b


def _gate_rows(totals: dict[str, Any], precisions: dict[str, str]) -> list[dict[str, Any]]:
    from edgeact.export.verify_compare import Agreement

    rows = []
    for key, gate_name, stage, field_name in _ROWS:
        if key not in totals:
            continue
        scope = [precisions[stage]] if stage in precisions else list(precisions.values())
        limit = getattr(gate_for(scope), field_name)
        m = totals[key]
        row: dict[str, Any] = {"gate": gate_name, "stage": stage or "all",
                               "precision": scope[0] if len(set(scope)) == 1 else "+".join(sorted(set(scope)))}
        if isinstance(m, Agreement):
            value = m.fraction
            row.update(value=value, limit=limit, detail=f"{m.matches}/{m.total} tokens")
        else:
            value = m.cosine
            norm_limit = gate_for(scope).norm_err
            row.update(value=_finite(value), limit=limit,
                       detail=f"max abs err {m.max_abs_err:.3g}, length err {m.norm_err:.2g} (<= {norm_limit:g})",
                       max_abs_err=_finite(m.max_abs_err), norm_err=_finite(m.norm_err), norm_limit=norm_limit)
            if not (m.norm_err <= norm_limit):      # a NaN fails too
                row["passed"] = False
                rows.append(row)
                continue
        row["passed"] = bool(not math.isnan(value) and value >= limit)
        rows.append(row)
    return rows


def _finite(x: float) -> float | None:
    """JSON has no NaN: a non-finite number is recorded as null (and its gate has failed)."""
    return x if math.isfinite(x) else None
