"""Targets, precision rules and optimization profiles come from one table and from the manifest alone."""
from __future__ import annotations

import dataclasses

import pytest

from edgeact.runtime.trt_targets import (
    TARGETS, check_device, check_precision, engine_record, get_target, optimization_profiles, profile_names,
    supported_precisions, targets_for_device,
)
from edgeact.runtime.bundle import DimRange, EngineRecord, Manifest, StageProfile, StageSpec, TensorSpec
from edgeact.runtime.errors import ConfigError
from edgeact.runtime.stage_spec import resolve_dim


def decoder_stage(seq_max: int = 64, past_max: int = 256, precision: str = "int8") -> StageSpec:
    return StageSpec(
        name="decoder", file="stages/decoder.onnx", precision=precision,
        inputs=(TensorSpec("inputs_embeds", "float16", ("batch", "seq", 64)),
                TensorSpec("past_key", "float16", ("batch", 2, "past_seq", 16)),
                TensorSpec("attention_mask", "int64", ("batch", "past_seq+seq"))),
        outputs=(TensorSpec("logits", "float16", ("batch", "seq", 640)),),
        dim_ranges={"batch": DimRange(1, 1, 1), "seq": DimRange(1, 16, seq_max), "past_seq": DimRange(0, 128, past_max)},
        profiles=(StageProfile("prefill", {"seq": DimRange(1, 16, seq_max)}),
                  StageProfile("decode", {"seq": DimRange(1, 1, 1)})),
    )


def test_the_target_table():
    orin, thor = get_target("orin"), get_target("thor")
    assert (orin.compute_capability, orin.memory_bandwidth_gb_s, orin.embedded) == ((8, 7), 204.8, True)
    assert [get_target(n).memory_bandwidth_gb_s for n in ("orin-nx", "orin-nano")] == [102.4, 68.0]
    assert thor.compute_capability == (11, 0) and thor.sm == "11.0"
    assert get_target("h100").compute_capability == get_target("h200").compute_capability == (9, 0)
    assert (get_target("ada").sm, get_target("ampere").sm, get_target("a100").sm) == ("8.9", "8.6", "8.0")
    with pytest.raises(TypeError):
        TARGETS["mine"] = orin   # frozen
    with pytest.raises(dataclasses.FrozenInstanceError):
        orin.compute_capability = (9, 0)
    with pytest.raises(ConfigError, match="unknown TensorRT target 'xavier'; use one of orin, orin-nx"):
        get_target("xavier")


def test_fp8_for_orin_is_refused_naming_int8_and_int4():
    for name in ("orin", "orin-nx", "orin-nano"):
        with pytest.raises(ConfigError) as err:
            check_precision(name, "fp8")
        msg = str(err.value)
        assert "fp8 needs SM >= 8.9" in msg and f"{name} " in msg and "SM 8.7" in msg
        assert "use int8 (SmoothQuant W8A8 or W8A16) or int4 (weight-only) instead" in msg


def test_refusals_name_the_architecture_of_the_sm_they_need():
    from edgeact.runtime.trt_targets import _arch_name

    with pytest.raises(ConfigError, match=r"fp8 needs SM >= 8\.9 \(Ada or newer\); orin "):
        check_precision("orin", "fp8")
    for target in TARGETS.values():      # each target's description names its chip's architecture
        for sm in (target.compute_capability, *target.also_reports):
            assert _arch_name(sm) in target.description, (target.name, sm)
    assert (_arch_name((8, 0)), _arch_name((8, 9)), _arch_name((9, 0)), _arch_name((12, 0))) == (
        "Ampere", "Ada", "Hopper", "Blackwell")
    assert _arch_name((7, 0)) == ""


@pytest.mark.parametrize("target", ["thor", "h100", "h200", "ada"])
def test_fp8_allowed_from_sm_89(target):
    check_precision(target, "fp8")
    assert "fp8" in supported_precisions(target)


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_int8_and_int4_allowed_everywhere(target):
    for precision in ("int8", "int4", "fp16", "bf16"):
        check_precision(target, precision)
    assert ("fp8" in supported_precisions(target)) == (get_target(target).compute_capability >= (8, 9))


def test_profiles_derive_from_dims_and_ranges():
    stage = decoder_stage()
    assert profile_names(stage) == ["prefill", "decode"]
    prefill, decode = optimization_profiles(stage)
    assert prefill["inputs_embeds"] == ((1, 1, 64), (1, 16, 64), (1, 64, 64))
    assert decode["inputs_embeds"] == ((1, 1, 64), (1, 1, 64), (1, 1, 64))
    assert prefill["past_key"] == decode["past_key"] == ((1, 2, 0, 16), (1, 2, 128, 16), (1, 2, 256, 16))
    # a sum of symbols adds the ranges: the mask covers past and current tokens
    assert prefill["attention_mask"] == ((1, 1), (1, 144), (1, 320))
    assert decode["attention_mask"] == ((1, 1), (1, 129), (1, 257))
    assert set(prefill) == {"inputs_embeds", "past_key", "attention_mask"}   # outputs get no profile

    wider = optimization_profiles(decoder_stage(seq_max=512, past_max=2048))
    assert wider[0]["inputs_embeds"][2] == (1, 512, 64) and wider[1]["past_key"][2] == (1, 2, 2048, 16)


def test_profiles_from_a_manifest_dict_and_the_default_profile():
    as_dict = {"name": "vision", **decoder_stage().to_dict(), "profiles": []}
    assert profile_names(as_dict) == ["default"]
    (only,) = optimization_profiles(as_dict)
    assert only["inputs_embeds"] == ((1, 1, 64), (1, 16, 64), (1, 64, 64))
    assert resolve_dim("past_seq+seq+1", {"past_seq": DimRange(0, 2, 4), "seq": DimRange(1, 1, 8)}) == DimRange(2, 4, 13)


def test_engine_record_round_trip():
    record = engine_record(decoder_stage(), "orin", trt_version="10.3.0", compute_capability=(8, 7),
                           sha256="ab" * 32, built_utc="2025-01-01T00:00:00Z")
    assert (record.file, record.target, record.compute_capability, record.precision, record.profiles) == (
        "engines/orin/decoder.plan", "orin", "8.7", "int8", ("prefill", "decode"))
    assert EngineRecord.from_dict(record.to_dict()) == record


def test_engine_records_round_trip_through_the_manifest(tmp_path):
    from tests.runtime.test_bundle import write_tiny_bundle
    from edgeact.runtime.bundle import read_manifest

    manifest = read_manifest(write_tiny_bundle(tmp_path / "b"))
    stage = manifest.stages["decoder"]
    record = engine_record(stage, "thor", trt_version="10.13", compute_capability=(11, 0), sha256="cd" * 32)
    manifest.engines.append(record)
    manifest.files[record.file] = manifest.files["tokenizer.json"]
    assert Manifest.from_dict(manifest.to_dict()).engines_for("thor") == {"decoder": record}


def test_engines_are_built_on_the_target_itself():
    check_device("orin-nano", (8, 7))
    check_device("thor", (10, 1))          # Thor under a CUDA 12 toolkit
    with pytest.raises(ConfigError, match=r"this GPU is SM 9.0 \(h100, h200\) but target orin is SM 8.7.*run build-engines on the orin itself"):
        check_device("orin", (9, 0))
    assert [t.name for t in targets_for_device((8, 7))] == ["orin", "orin-nx", "orin-nano"]


def test_on_a_jetson_the_module_must_be_the_targets_not_only_its_sm():
    """Orin AGX, NX and Nano all report SM 8.7, but engines are specific to the module they are built on."""
    agx = "NVIDIA Jetson AGX Orin Developer Kit"
    check_device("orin", (8, 7), agx)
    check_device("orin-nano", (8, 7), None)                     # not a Jetson (or not known): the SM alone
    with pytest.raises(ConfigError, match=r"this is a NVIDIA Jetson AGX Orin Developer Kit, not a Jetson Orin Nano "
                                          r"8GB \(Ampere\): engines are specific to the module .* --target orin$"):
        check_device("orin-nano", (8, 7), agx)
    with pytest.raises(ConfigError, match=r"--target orin-nano$"):
        check_device("orin", (8, 7), "NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super")
