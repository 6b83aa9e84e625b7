"""TensorRT targets, the precisions each can run, and engine optimization profiles derived from a manifest.

In the runtime: `edgeact build-engines` (export) builds with it, and the TensorRT runner picks an
engine with the same table of the SM numbers each chip reports.

Pure logic (no tensorrt import) so it is tested everywhere. Shapes come only from a stage's
manifest (`dims` + `dim_ranges` + `profiles`), never from literals repeated in scripts: change
the exporter's ranges and the engines follow. The derivation itself lives in
runtime/stage_spec.py, so engines built here and the runtime that runs them read the same
profiles; this module adds only manifest-dict input and the engine records.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping

from edgeact.runtime import stage_spec
from edgeact.runtime.bundle import EngineRecord, StageSpec
from edgeact.runtime.errors import ConfigError
from edgeact.runtime.stage_spec import DimRange, Shape


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    compute_capability: tuple[int, int]
    memory_bandwidth_gb_s: float          # what bounds decode speed: every token reads every weight once
    embedded: bool
    also_reports: tuple[tuple[int, int], ...] = ()   # other SM numbers the same chip reports
    # Words of the Jetson module's device-tree model ("NVIDIA Jetson AGX Orin Developer Kit"): modules of one SM differ
    # in GPU size and memory, and TensorRT engines are specific to the device model they were built on.
    module_words: str = ""

    @property
    def sm(self) -> str:
        return f"{self.compute_capability[0]}.{self.compute_capability[1]}"

    def on_module(self, jetson_model: str) -> bool:
        """Whether this target is the Jetson module of that device-tree model (True for a target of no module)."""
        return not self.module_words or self.module_words.lower() in jetson_model.lower()

    def reports(self, compute_capability: tuple[int, int] | str) -> bool:
        """Whether this chip reports that SM number ((8, 7) or "8.7"): its own, or another it also reports."""
        cc = (tuple(int(x) for x in compute_capability.split(".")) if isinstance(compute_capability, str)
              else tuple(compute_capability))
        return cc == self.compute_capability or cc in self.also_reports


def _t(name, description, cc, bw, embedded, also=(), module="") -> tuple[str, Target]:
    return name, Target(name, description, cc, bw, embedded, also, module)


TARGETS: Mapping[str, Target] = MappingProxyType(dict([
    # Jetson modules (developer.nvidia.com/cuda-gpus lists Orin AGX / NX / Nano at 8.7).
    _t("orin", "Jetson AGX Orin 64GB (Ampere)", (8, 7), 204.8, True, module="AGX Orin"),
    _t("orin-nx", "Jetson Orin NX 16GB (Ampere)", (8, 7), 102.4, True, module="Orin NX"),
    _t("orin-nano", "Jetson Orin Nano 8GB (Ampere)", (8, 7), 68.0, True, module="Orin Nano"),
    # Jetson AGX Thor (T5000, Blackwell): CUDA 13.0 renumbered its SM101 as SM110 ("SM101 has been
    # renumbered as SM110", CUDA 13.0 release notes; see also openxla/xla#30514 and
    # developer.nvidia.com/cuda-gpus, which lists Jetson T5000/T4000 at 11.0). Toolkits before 13
    # report 10.1. Memory: 128 GB LPDDR5X, 256-bit, 273 GB/s (T5000 module data sheet).
    _t("thor", "Jetson AGX Thor T5000 (Blackwell)", (11, 0), 273.0, True, ((10, 1),), module="Thor"),
    # Desktop / data-centre GPUs a lent machine may have; bandwidth of the named card.
    _t("h100", "NVIDIA H100 SXM (Hopper)", (9, 0), 3350.0, False),
    _t("h200", "NVIDIA H200 (Hopper)", (9, 0), 4800.0, False),
    _t("ada", "Ada, SM 8.9 (L40S; RTX 40xx alike)", (8, 9), 864.0, False),
    _t("ampere", "Ampere, SM 8.6 (A10; A40, RTX 30xx alike)", (8, 6), 600.0, False),
    _t("a100", "NVIDIA A100 80GB (Ampere, SM 8.0)", (8, 0), 2039.0, False),
]))

# Lowest SM each stage precision runs at in TensorRT. FP8 needs Ada / Hopper / Blackwell tensor
# cores; INT4 is weight-only (W4A16: DQ into an fp16/bf16 GEMM) and, like BF16, needs Ampere.
# (NVIDIA Model Optimizer support matrix: FP8 "Ada and later"; INT8 and W4A16 "Ampere and later".)
PRECISION_MIN_SM: Mapping[str, tuple[int, int]] = MappingProxyType({
    "fp32": (7, 5), "fp16": (7, 5), "bf16": (8, 0), "int8": (7, 5), "fp8": (8, 9), "int4": (8, 0),
})
_PRECISION_NOTES = {"int8": "int8 (SmoothQuant W8A8 or W8A16)", "int4": "int4 (weight-only)", "fp8": "fp8",
                    "fp16": "fp16", "bf16": "bf16"}
# Architecture by SM (major, minor): the major alone is ambiguous (8.9 is Ada, 8.0-8.7 Ampere).
_ARCHS = {(7, 5): "Turing", (8, 0): "Ampere", (8, 6): "Ampere", (8, 7): "Ampere", (8, 9): "Ada", (9, 0): "Hopper"}
_BLACKWELL_MAJORS = (10, 11, 12)      # 10.x data centre and Thor (11.0, once 10.1), 12.x desktop


def _arch_name(compute_capability: tuple[int, int]) -> str:
    """The GPU architecture of an SM number ("Ada" for 8.9); "" for one not in the table."""
    cc = tuple(compute_capability)
    return "Blackwell" if cc[0] in _BLACKWELL_MAJORS else _ARCHS.get(cc, "")


def get_target(name: str | Target) -> Target:
    if isinstance(name, Target):
        return name
    try:
        return TARGETS[name]
    except KeyError:
        raise ConfigError(f"unknown TensorRT target {name!r}; use one of {', '.join(TARGETS)}") from None


def targets_for_device(compute_capability: tuple[int, int]) -> list[Target]:
    cc = tuple(compute_capability)
    return [t for t in TARGETS.values() if t.compute_capability == cc or cc in t.also_reports]


def supported_precisions(target: str | Target) -> tuple[str, ...]:
    target = get_target(target)
    return tuple(p for p, sm in PRECISION_MIN_SM.items() if target.compute_capability >= sm)


def check_precision(target: str | Target, precision: str) -> None:
    """Refuse a precision the target cannot run, naming the ones it can."""
    target = get_target(target)
    if precision not in PRECISION_MIN_SM:
        raise ConfigError(f"precision {precision!r} unknown; use one of {', '.join(PRECISION_MIN_SM)}")
    need = PRECISION_MIN_SM[precision]
    if target.compute_capability >= need:
        return
    instead = [_PRECISION_NOTES[p] for p in ("int8", "int4", "fp16", "bf16")
               if p in supported_precisions(target) and p != precision]
    arch = _arch_name(need)
    raise ConfigError(
        f"{precision} needs SM >= {need[0]}.{need[1]}{f' ({arch} or newer)' if arch else ''}; {target.name} "
        f"({target.description}) is SM {target.sm}: use {' or '.join(instead[:2])} instead")


def check_device(target: str | Target, compute_capability: tuple[int, int], jetson_model: str | None = None) -> None:
    """TensorRT engines run only on the SM they were built on: refuse to build for another target. On a Jetson
    (`jetson_model`: its device-tree model) also for another module of the same SM (an Orin Nano is no AGX Orin)."""
    target = get_target(target)
    cc = tuple(compute_capability)
    if target.reports(cc) and jetson_model and not target.on_module(jetson_model):
        here = [t.name for t in TARGETS.values() if t.module_words and t.on_module(jetson_model)]
        raise ConfigError(f"this is a {jetson_model}, not a {target.description}: engines are specific to the module "
                          "they are built on; "
                          + (f"build with --target {here[0]}" if here else "build for this module's target"))
    if target.reports(cc):
        return
    here = ", ".join(t.name for t in targets_for_device(cc)) or "no known target"
    raise ConfigError(
        f"this GPU is SM {cc[0]}.{cc[1]} ({here}) but target {target.name} is SM {target.sm}; engines built here "
        f"would not run there: run build-engines on the {target.name} itself")


# ---------------------------------------------------------------------------------- profiles
def _as_stage(stage: StageSpec | Mapping[str, Any]) -> StageSpec:
    if isinstance(stage, StageSpec):
        return stage
    return StageSpec.from_dict(str(stage.get("name", "stage")), dict(stage), "stage")


def profile_dim_ranges(stage: StageSpec | Mapping[str, Any]) -> list[tuple[str, dict[str, DimRange]]]:
    """(profile name, symbol ranges) per engine profile; one 'default' profile when none are declared."""
    return stage_spec.profile_dim_ranges(_as_stage(stage))


def profile_names(stage: StageSpec | Mapping[str, Any]) -> list[str]:
    return [name for name, _ in profile_dim_ranges(stage)]


def optimization_profiles(stage: StageSpec | Mapping[str, Any]) -> list[dict[str, tuple[Shape, Shape, Shape]]]:
    """Per profile, {input name: (min shape, opt shape, max shape)}, in profile_names() order."""
    return stage_spec.optimization_profiles(_as_stage(stage))


# ----------------------------------------------------------------------------- engine records
def engine_file(target: str | Target, stage: str) -> str:
    return f"engines/{get_target(target).name}/{stage}.plan"


def engine_record(stage: StageSpec, target: str | Target, *, trt_version: str, compute_capability: tuple[int, int],
                  sha256: str, built_utc: str = "", tf32: bool = False) -> EngineRecord:
    target = get_target(target)
    return EngineRecord(
        stage=stage.name, file=engine_file(target, stage.name), target=target.name, trt_version=trt_version,
        compute_capability=f"{compute_capability[0]}.{compute_capability[1]}", precision=stage.precision,
        sha256=sha256, profiles=tuple(profile_names(stage)), built_utc=built_utc, tf32=tf32,
    )
