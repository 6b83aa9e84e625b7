"""The quantization report: agreement and action error as defined, rows with every field, the side-by-side bench."""
from __future__ import annotations

import numpy as np
import pytest

from edgeact.export.quant_bench import BenchOptions, bench_quantization
from edgeact.export.quant_decode import DecodedAnswer
from edgeact.export.quant_report import ROW_FIELDS, agreement, compare_bundles, report_table
from edgeact.runtime.errors import ConfigError
from tests.export.quant_fixtures import tiny_sources

VB = 1000   # base vocabulary: action ids are 744 .. 999, bin = VB - 1 - id


def _answer(depth, trace, action) -> DecodedAnswer:
    ids = [*depth, *trace, *action, 7]
    kinds = ("depth",) * len(depth) + ("trace",) * len(trace) + ("action",) * len(action) + (None,)
    return DecodedAnswer(np.asarray(ids, np.int64), kinds, 0.0)


def test_agreement_counts_positions_per_kind_and_bin_error():
    ref = [_answer([1, 2, 3, 4], [10, 11, 12], [999, 990, 980]), _answer([5, 6], [10], [900, 900, 900])]
    got = [_answer([1, 2, 0, 0], [10, 11], [999, 992, 970]), _answer([5, 6], [10, 11, 12], [900, 901, 900])]
    scores = agreement(ref, got, VB)
    assert scores["agreement_depth"] == pytest.approx(4 / 6)
    assert scores["agreement_trace"] == pytest.approx(3 / 6)    # a shorter/longer trace: missing points disagree
    assert scores["agreement_action"] == pytest.approx(3 / 6)
    assert scores["action_error_bins"] == pytest.approx((0 + 2 + 10 + 0 + 1 + 0) / 6)


def test_identical_answers_agree_fully():
    a = [_answer([1, 2], [3], [999] * 7)]
    assert agreement(a, a, VB) == {"agreement_depth": 1.0, "agreement_trace": 1.0, "agreement_action": 1.0,
                                   "action_error_bins": 0.0}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return tiny_sources(tmp_path_factory)


def test_bench_reports_every_precision_side_by_side_and_reuses_its_work(sources, tmp_path):
    work = tmp_path / "bench"
    options = BenchOptions(precisions=("int8", "fp8", "int4"), calibration_samples=1, report_frames=1, threads=1,
                           int4_block_size=32)
    rows = bench_quantization(sources["checkpoint"], work, options)
    assert [r["precision"] for r in rows] == ["fp32", "int8", "int8", "int8", "fp8", "int4"]   # a row per int8 mode
    assert [r["recipe"] for r in rows] == ["none", "int8-qdq", "int8-w8a16-nbits", "int8-w8a8-dynamic", "fp8-e4m3-qdq",
                                           "int4-rtn-nbits"]
    for row in rows:
        assert set(ROW_FIELDS) <= set(row)
        assert 0.0 <= row["agreement_depth"] <= 1.0 and 0.0 <= row["agreement_forced"] <= 1.0
        assert row["action_error_bins"] >= 0 and row["decode_tokens_s"] > 0
    assert rows[0]["size_ratio"] == 1.0 and rows[0]["agreement_action"] == 1.0 and rows[0]["decode_ratio"] == 1.0
    assert all(r["size_ratio"] < 1.0 for r in rows[1:])          # every recipe shrinks the stages
    assert sum(rows[5]["stage_bytes"].values()) < sum(rows[0]["stage_bytes"].values())
    table = report_table(rows)
    assert table.row_count == 6 and len(table.columns) == 11
    # fp8 targets TensorRT, so it is quantized from the portable export; the others from the fused one.
    assert [r["decoder"] for r in rows] == ["fused", "fused", "fused", "fused", "portable", "fused"]
    assert list(table.columns[1].cells)[4] == "fp8-e4m3-qdq (portable)" and list(table.columns[1].cells)[5] == "int4-rtn-nbits"

    exported = (work / "fp32" / "manifest.json").stat().st_mtime_ns
    again = bench_quantization(sources["checkpoint"], work, BenchOptions(precisions=("int4",), calibration_samples=1,
                                                                         report_frames=1, threads=1))
    assert (work / "fp32" / "manifest.json").stat().st_mtime_ns == exported     # the fp32 export was reused
    assert [r["precision"] for r in again] == ["fp32", "int4"]


def test_compare_bundles_rows_for_the_reference_alone(sources):
    rows = compare_bundles(sources["bundle"], [], n_frames=1, threads=1, decode_steps=4)
    assert len(rows) == 1 and rows[0]["precision"] == "fp32" and rows[0]["recipe"] == "none"
    assert set(rows[0]["stage_bytes"]) == {"vision", "connector", "decoder"}


def test_bench_refuses_fp8_for_orin():
    with pytest.raises(ConfigError, match="int8"):
        BenchOptions(fp8_target="orin")
    with pytest.raises(ConfigError, match="int8 modes"):
        BenchOptions(int8_modes=("w4a4",))


def test_teacher_forced_choices_of_a_bundle_reproduce_its_own_free_running_answer(sources):
    from edgeact.export.quant_decode import OrtBundle
    from edgeact.export.quant_report import forced_agreement, held_out_observations

    runner = OrtBundle(sources["bundle"], threads=1)
    observations = held_out_observations(runner.io, 2, seed=1)
    answers = [runner.decode(p, inputs) for p, inputs in observations]
    picked = runner.forced_choices(*observations[0], answers[0])
    assert len(picked) == sum(k is not None for k in answers[0].kinds) > 100
    assert forced_agreement(runner, observations, answers) == 1.0


def test_the_fp32_export_is_redone_for_another_model_at_the_checkpoint_path(tmp_path):
    """bench-quant reuses its fp32 export only for the checkpoint it came from: another model of the same config
    put in its place (its files' times kept, as `cp -p` does) is exported again, not benched as the old one."""
    import os

    from edgeact.calibration.calibration_set import weights_sha256
    from edgeact.export.quant_bench import _fp32_bundle
    from edgeact.export.synthetic import make_checkpoint
    from edgeact.runtime.bundle import read_manifest

    checkpoint, work, options = tmp_path / "checkpoint", tmp_path / "fp32", BenchOptions(precisions=("int8",))
    make_checkpoint("D", "tiny", seed=5, out_dir=checkpoint)
    assert _fp32_bundle(checkpoint, work, options) == work
    exported = (work / "manifest.json").stat().st_mtime_ns
    assert _fp32_bundle(checkpoint, work, options) == work                     # the same model: reused
    assert (work / "manifest.json").stat().st_mtime_ns == exported
    old = {p.name: p.stat().st_mtime for p in checkpoint.iterdir()}
    make_checkpoint("D", "tiny", seed=6, out_dir=checkpoint, overwrite=True)
    for p in checkpoint.iterdir():
        os.utime(p, (old[p.name], old[p.name]))
    _fp32_bundle(checkpoint, work, options)
    assert read_manifest(work).model.source_weights_sha256 == weights_sha256("checkpoint", checkpoint)


def _bench_quant_cli(*argv: str, monkeypatch) -> list:
    """`edgeact bench-quant ...` through argparse with the benchmark itself replaced: the options it would run with."""
    import argparse

    from edgeact.export import commands_quantize

    ran = []
    monkeypatch.setattr("edgeact.export.quant_bench.bench_quantization",
                        lambda source, work, options, on_step=None: ran.append(options) or [])
    monkeypatch.setattr("edgeact.export.quant_report.print_report", lambda *a, **k: None)
    parser = argparse.ArgumentParser(prog="edgeact")
    commands_quantize.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench-quant", "ckpt", *argv])
    assert args.handler(args) == 0
    return ran


@pytest.mark.parametrize("argv, unused", [
    (["--precisions", "int8", "--fp8-target", "h100"], "--fp8-target"),
    (["--precisions", "fp8,int4", "--int8-modes", "w8a16"], "--int8-modes"),
    (["--precisions", "int8", "--int8-modes", "w8a16", "--smoothquant", "0.5"], "--smoothquant"),
    (["--precisions", "int8", "--block-size", "64"], "--block-size"),
    (["--precisions", "int4", "--samples", "16"], "--samples"),
])
def test_bench_quant_refuses_an_option_no_benched_bundle_uses(argv, unused, monkeypatch):
    with pytest.raises(ConfigError, match=f"{unused}: no bundle of --precisions .* uses it; drop it"):
        _bench_quant_cli(*argv, monkeypatch=monkeypatch)


def test_bench_quant_smoothquant_reaches_both_modes_that_smooth(monkeypatch):
    (options,) = _bench_quant_cli("--precisions", "int8", "--smoothquant", "0.7", monkeypatch=monkeypatch)
    alphas = {name: quant.smoothquant_alpha for name, quant in options.recipes()}
    assert alphas == {"int8-w8a8": 0.7, "int8-w8a16": None, "int8-w8a8-dynamic": 0.7}
    (default,) = _bench_quant_cli(monkeypatch=monkeypatch)          # no option given: every default, nothing refused
    assert default == BenchOptions()


def test_bench_reuses_its_calibration_set_only_for_the_samples_seed_and_model_asked_for(sources, tmp_path,
                                                                                       monkeypatch):
    import shutil

    from edgeact.calibration.calibration_set import CalibrationSet, weights_sha256
    from edgeact.export.bundle_writer import update_manifest

    quantized = []
    monkeypatch.setattr("edgeact.export.quantize.quantize_bundle",
                        lambda src, out, quant, calibration, **kw: quantized.append((out.name, calibration)))
    monkeypatch.setattr("edgeact.export.quant_report.compare_bundles", lambda *a, **kw: [])
    work = tmp_path / "bench"
    calibration = work / "calibration"

    def bench(source=sources["bundle"], **options) -> CalibrationSet:
        quantized.clear()
        bench_quantization(source, work, BenchOptions(precisions=("int8", "int4"), int8_modes=("w8a8",),
                                                      threads=1, **options))
        return CalibrationSet.load(calibration)

    first = bench(calibration_samples=1)
    assert len(first) == 1 and first.seed == 0
    assert quantized == [("int8-w8a8", calibration), ("int4", None)]     # int4 reads no calibration set
    built = (calibration / "manifest.json").stat().st_mtime_ns
    assert len(bench(calibration_samples=1)) == 1                       # the same request: reused
    assert (calibration / "manifest.json").stat().st_mtime_ns == built
    assert len(bench(calibration_samples=2)) == 2
    assert bench(calibration_samples=2, seed=3).seed == 3

    other = shutil.copytree(sources["bundle"], tmp_path / "other")          # same config, other weights
    np.save(other / "weights" / "embedding.npy", np.load(other / "weights" / "embedding.npy") * 1.5)
    update_manifest(other, lambda m: None, rehash=["weights/embedding.npy"])
    again = bench(other, calibration_samples=2, seed=3)
    assert again.model["source"] == str(other) and again.model["weights_sha256"] == weights_sha256("bundle", other)
