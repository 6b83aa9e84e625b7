"""bench-policy on a tiny checkpoint: every system's row with its ratios, agreement with the reference, JSON, tables, CLI wiring."""
from __future__ import annotations

import argparse
import json
import math
import shutil
from dataclasses import replace
from types import SimpleNamespace

import pytest

from edgeact.export import commands_bench
from edgeact.export.bench_bundles import default_recipe, ensure_checkpoint, exported_from, prepare_bundles, quantized_from
from edgeact.export.bundle_export import ExportOptions, export_bundle
from edgeact.export.bench_policy import JSON_NAME, REFERENCE, PolicyBenchOptions, bench_policy, check_cuda
from edgeact.runtime import stage_io as io
from edgeact.runtime.bundle import load_bundle
from edgeact.runtime.device_info import read_device_info
from edgeact.runtime.errors import ConfigError


def _no_work(monkeypatch):
    """Every expensive step of bench-suite / bench-policy recorded instead of run."""
    work = []
    monkeypatch.setattr("edgeact.export.bench_bundles.ensure_checkpoint", lambda *a: work.append("checkpoint"))
    monkeypatch.setattr("edgeact.export.quant_bench.bench_quantization", lambda *a, **k: work.append("bench-quant"))
    monkeypatch.setattr(commands_bench, "run_policy_bench", lambda *a: work.append("bench-policy"))
    return work


@pytest.mark.parametrize("argv, said", [
    (["bench-suite", "--quant-precisions", "int9"], "argument --quant-precisions: int9 unknown; use some of int8, fp8, int4"),
    (["bench-suite", "--quant-precisions", "int8,int8"], "argument --quant-precisions: int8 given twice"),
    (["bench-suite", "--precisions", "int8,fp8"], "argument --precisions: fp8 unknown; use some of int8, int4"),
    (["bench-suite", "--size-checkpoint", "huge"], "argument --size-checkpoint: invalid choice: 'huge'"),
    (["bench-policy", "--precisions", "int9"], "argument --precisions: int9 unknown; use some of int8, int4"),
])
def test_a_typo_in_the_bench_options_is_refused_while_parsing(argv, said, monkeypatch, tmp_path, capsys):
    from edgeact.runtime.cli import main

    work = _no_work(monkeypatch)
    with pytest.raises(SystemExit) as exited:
        main([*argv, "--out", str(tmp_path / "out")])
    assert exited.value.code == 2 and said in capsys.readouterr().err
    assert work == [] and not (tmp_path / "out").exists()


def test_suite_checks_every_option_before_the_checkpoint_is_made(monkeypatch, tmp_path, capsys):
    from edgeact.runtime.cli import main

    work = _no_work(monkeypatch)
    # An empty list parses; bench-quant's own options refuse it, and now before the 790 MB checkpoint is written.
    assert main(["bench-suite", "--quant-precisions", "", "--out", str(tmp_path / "out"),
                 "--checkpoint", str(tmp_path / "ck")]) == 2
    assert "precisions (none): bench some of int8, fp8, int4" in capsys.readouterr().err
    assert work == [] and not (tmp_path / "out").exists()


def test_a_results_folder_that_cannot_be_one_is_refused_before_any_work(monkeypatch, tmp_path, capsys):
    """bench-policy wrote its JSON after minutes of work: an --out that is a file lost every figure then."""
    from edgeact.export.bench_bundles import ensure_checkpoint
    from edgeact.runtime.cli import main
    from edgeact.runtime.errors import ConfigError

    work = _no_work(monkeypatch)
    occupied = tmp_path / "results"
    occupied.write_text("a file")
    for command in ("bench-policy", "bench-suite"):
        argv = [command, "--out", str(occupied)]
        argv += [str(tmp_path / "ck")] if command == "bench-policy" else ["--checkpoint", str(tmp_path / "ck")]
        assert main(argv) == 2
        assert f"--out {occupied}: a file, not a directory" in capsys.readouterr().err
    assert work == [] and not (tmp_path / "ck").exists()
    with pytest.raises(ConfigError, match="a file, not a checkpoint directory"):
        ensure_checkpoint(occupied)
    assert "OUT/bundles" in commands_bench_help("bench-suite") and "out/bench/bundles: bench-suite's" in \
        commands_bench_help("bench-policy")


def commands_bench_help(command: str) -> str:
    import argparse

    parser = argparse.ArgumentParser()
    commands_bench.register(parser.add_subparsers())
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    return " ".join(sub.format_help().split())


def test_size_checkpoint_of_another_size_than_the_checkpoint_there_is_refused(monkeypatch, tmp_path, capsys):
    from edgeact.export.synthetic import synthetic_config
    from edgeact.runtime.cli import main

    work = _no_work(monkeypatch)
    ck = tmp_path / "ck"
    ck.mkdir()
    synthetic_config("D", "tiny").save(ck / "config.json")
    out = str(tmp_path / "out")
    assert main(["bench-policy", str(ck), "--size-checkpoint", "small", "--out", out]) == 2
    assert (f"{ck} holds a checkpoint other than the synthetic small one, and --size-checkpoint only sizes a "
            "checkpoint being created") in capsys.readouterr().err
    assert main(["bench-suite", "--checkpoint", str(ck), "--size-checkpoint", "bench", "--out", out]) == 2
    assert "other than the synthetic bench one" in capsys.readouterr().err
    assert work == []
    # The size it holds, or no --size-checkpoint (a checkpoint of any size), is benched: re-running a command works.
    assert main(["bench-policy", str(ck), "--size-checkpoint", "tiny", "--out", out]) == 0
    assert main(["bench-policy", str(ck), "--out", out]) == 0
    assert work == ["bench-policy", "bench-policy"]


def test_literal_choices_match_the_tables_they_copy():
    from edgeact.export import bench_bundles, commands, quant_bench, synthetic

    assert commands_bench.QUANTIZED == bench_bundles.QUANTIZED
    assert commands_bench.QUANT_RECIPES == quant_bench.BENCH_RECIPES
    assert commands.SIZE_CHOICES == tuple(synthetic.SIZES)


def _cuda_ready() -> bool:
    import onnxruntime
    import torch

    return torch.cuda.is_available() and "CUDAExecutionProvider" in onnxruntime.get_available_providers()

SYSTEMS = [REFERENCE, "fp32", "fp32+depth", "int8", "int8+depth", "int4", "int4+depth"]
OPTIONS = PolicyBenchOptions(frames=1, threads=1, size="tiny", calibration_samples=1, decode_rate_steps=4,
                             rss_steps=1, probe_bytes=4 << 20)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_policy")
    report = bench_policy(root / "ckpt", root / "out", OPTIONS, command="edgeact bench-policy (test)")
    return root, report


def test_every_system_has_a_row_with_ratios_to_the_reference(bench):
    _, report = bench
    rows = {s["system"]: s for s in report["systems"]}
    assert list(rows) == SYSTEMS
    ref = rows[REFERENCE]
    assert ref["latency_ratio"] == 1.0 and ref["steps_ratio"] == 1.0
    for row in rows.values():
        assert row["latency_ratio"] == pytest.approx(row["latency_s_median"] / ref["latency_s_median"], abs=1e-3)
        assert row["steps_ratio"] == pytest.approx(row["decode_steps_median"] / ref["decode_steps_median"], abs=1e-3)
        assert set(row["stage_s_median"]) == {"preprocess", "vision+prefill", "decode", "parse"}
    # One decoder call per token after the first for the reference; the decode program needs far fewer.
    assert ref["decode_steps"] == [n - 1 for n in ref["answer_tokens"]]
    for precision in ("fp32", "int8", "int4"):
        assert rows[f"{precision}+depth"]["decode_steps_median"] + 90 < rows[precision]["decode_steps_median"]
    assert rows["fp32"]["decode_steps_median"] < ref["decode_steps_median"]


def test_fp32_bundle_reports_the_reference_tokens(bench):
    _, report = bench
    rows = {s["system"]: s for s in report["systems"]}
    for key in ("fp32", "fp32+depth"):      # forced depth = the reference's own codes: the same answer
        assert rows[key]["identical_to_reference"] == [True] and rows[key]["token_agreement"] == 1.0
    for key in SYSTEMS:
        assert 0.0 <= rows[key]["token_agreement"] <= 1.0


def test_frames_machine_and_json(bench):
    root, report = bench
    frames = report["frames"]
    assert (frames["n"], frames["width"], frames["height"]) == (1, 640, 480)
    assert frames["prompt_tokens"][0] > 100 and 1 <= frames["crops"] <= frames["max_crops"] + 1
    assert report["machine"]["threads"] == 1
    assert (report["machine"]["prefill_chunk"], report["machine"]["crops_per_run"]) == (128, 1)   # CPU defaults
    assert report["machine"]["host"]["summary"] == read_device_info().summary()      # power mode and clocks
    assert json.loads((root / "out" / JSON_NAME).read_text()) == json.loads(json.dumps(report))


def test_decode_against_bandwidth_and_memory_rows(bench):
    _, report = bench
    assert [d["precision"] for d in report["decode"]] == ["fp32", "int8", "int4"]
    fp32, int8, int4 = report["decode"]
    assert int8["bytes_per_token"]["decoder_bytes"] < fp32["bytes_per_token"]["decoder_bytes"]
    assert "int4-packed" in int4["bytes_per_token"]["decoder_by_kind"]
    for d in report["decode"]:
        assert d["decode_tokens_s"] > 0 and math.isfinite(d["limit_tokens_s"])
        assert d["fraction_of_limit"] == pytest.approx(d["decode_tokens_s"] / d["limit_tokens_s"], rel=0.01)
        # The KV cache the measured steps also read: the limit with it is lower by exactly its share of the bytes.
        total = d["bytes_per_token"]["total"]
        assert d["limit_with_kv_tokens_s"] == pytest.approx(
            d["limit_tokens_s"] * total / (total + d["kv_bytes_at_context"]), rel=0.01)
        assert d["fraction_of_limit_with_kv"] > d["fraction_of_limit"]
    assert report["bandwidth"]["read_gb_s"] > 0 and report["bandwidth"]["threads"] == 1
    # Probed before and after the decode rates; the limit is the better probe of the two.
    probes = report["bandwidth_probes"]
    assert len(probes) == 2 and report["bandwidth"]["read_gb_s"] == max(p["read_gb_s"] for p in probes)
    for m in report["memory"]:
        assert 0 < m["rss_after_load_bytes"] <= m["peak_rss_bytes"]
        assert m["budget_ratio"] == pytest.approx(m["peak_rss_bytes"] / m["budget_bytes"])


def test_tables_carry_the_ratios_and_footnotes(bench):
    from rich.console import Console

    _, report = bench
    console = Console(record=True, width=250)
    for table in commands_bench.policy_tables(report):
        console.print(table)
    text = console.export_text()
    for needle in ("(a) PyTorch reference (generate_greedy)", "edgeact int4, forced depth", "MaskedGreedyConstraint",
                   "add-depth-tokenizer", "of limit", "peak / budget", "1.00x", "fused decoder",
                   f"Device: {report['machine']['host']['summary']}"):
        assert needle in text
    assert len(commands_bench.policy_tables({**report, "memory": []})) == 2    # --device cuda: no host-memory table


def test_valid_bundles_are_reused(bench):
    root, _ = bench
    names = ["fp32", default_recipe("int8")[0], default_recipe("int4")[0]]
    manifests = [root / "out" / "bundles" / name / "manifest.json" for name in names]
    before = {p: p.stat().st_mtime_ns for p in manifests}
    prepare_bundles(root / "ckpt", root / "out" / "bundles", ("int8", "int4"), seed=0, threads=1)
    assert {p: p.stat().st_mtime_ns for p in manifests} == before
    # Another checkpoint (same config, another path) does not own these bundles.
    other = ensure_checkpoint(root / "other", "tiny", seed=1)
    assert exported_from(root / "out" / "bundles" / "fp32", (root / "ckpt").absolute())
    assert not exported_from(root / "out" / "bundles" / "fp32", other.absolute())
    # A CPU bench runs the fused decoder; the portable form (onnxruntime's CUDA EP) is another bundle, and a
    # quantized bundle of one form is never reused over an fp32 bundle of the other.
    assert load_bundle(manifests[0].parent).stage(io.DECODER_STAGE).inputs[2].name == io.SEQLENS_K
    assert not exported_from(root / "out" / "bundles" / "fp32", (root / "ckpt").absolute(), io.PORTABLE_ATTENTION)
    portable = root / "portable"
    export_bundle(root / "ckpt", portable / "fp32", ExportOptions(attention=io.PORTABLE_ATTENTION))
    name, recipe = default_recipe("int4")
    shutil.copytree(root / "out" / "bundles" / name, portable / name)
    assert quantized_from(root / "out" / "bundles" / name, root / "out" / "bundles" / "fp32", recipe)
    assert not quantized_from(portable / name, portable / "fp32", recipe)


def test_default_recipes_name_bench_quant_directories_and_the_gpu_run_asks_for_w8a16():
    """int8 on a CPU is its default mode (w8a8-dynamic); --device cuda asks for w8a16, which the CUDA EP was measured with."""
    name, quant = default_recipe("int8")
    assert name == "int8-w8a8-dynamic" and quant.int8_mode == "w8a8-dynamic" and quant.needs_calibration
    assert quant.down_projections == "smoothquant"             # its channel ranges come from a calibration set
    name, quant = default_recipe("int8", "w8a16")
    assert name == "int8-w8a16" and quant.int8_mode == "w8a16" and quant.weight_only
    assert default_recipe("int4")[0] == "int4"


def test_options_are_checked():
    with pytest.raises(ConfigError, match="compares fp32 with some of int8, int4"):
        PolicyBenchOptions(precisions=("fp8",))
    with pytest.raises(ConfigError, match="threads"):
        PolicyBenchOptions(threads=0)
    with pytest.raises(ConfigError, match="device 'tpu' unknown; use one of cpu, cuda"):
        PolicyBenchOptions(device="tpu")
    with pytest.raises(ConfigError, match="prefill_chunk and crops_per_run must be >= 1"):
        PolicyBenchOptions(crops_per_run=0)


def test_prefill_chunk_and_crops_per_run_reach_the_policies_with_the_same_answer(bench, tmp_path):
    root, report = bench
    options = replace(OPTIONS, precisions=("int8",), prefill_chunk=512, crops_per_run=9)
    wide = bench_policy(root / "ckpt", tmp_path, options, bundles_dir=root / "out" / "bundles")
    assert (wide["machine"]["prefill_chunk"], wide["machine"]["crops_per_run"]) == (512, 9)
    rows = {s["system"]: s for s in wide["systems"]}
    assert rows["fp32"]["identical_to_reference"] == [True] and rows["fp32+depth"]["identical_to_reference"] == [True]


def _fake_runtimes(gpu: bool, providers: list[str]):
    torch = SimpleNamespace(__version__="9.9", cuda=SimpleNamespace(is_available=lambda: gpu))
    ort = SimpleNamespace(__version__="8.8", get_available_providers=lambda: providers)
    return torch, ort


def test_cuda_needs_both_torch_and_onnxruntime_on_the_gpu():
    with pytest.raises(ConfigError, match="torch 9.9 here sees no CUDA device.*--device cpu"):
        check_cuda(*_fake_runtimes(False, ["CUDAExecutionProvider", "CPUExecutionProvider"]))
    with pytest.raises(ConfigError, match="onnxruntime 8.8 here has no CUDAExecutionProvider \\(it has "
                                          "CPUExecutionProvider\\); install onnxruntime-gpu"):
        check_cuda(*_fake_runtimes(True, ["CPUExecutionProvider"]))
    check_cuda(*_fake_runtimes(True, ["CUDAExecutionProvider", "CPUExecutionProvider"]))


@pytest.mark.skipif(_cuda_ready(), reason="this machine has a GPU: the refusal is for machines without one")
def test_cuda_bench_without_a_gpu_is_refused_before_any_export(tmp_path):
    with pytest.raises(ConfigError, match="--device cuda"):
        bench_policy(tmp_path / "ckpt", tmp_path / "out", replace(OPTIONS, device="cuda"))
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "out").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_ready(), reason="needs an NVIDIA GPU, a CUDA build of torch and onnxruntime-gpu")
def test_cuda_bench_on_a_real_gpu(tmp_path):
    report = bench_policy(tmp_path / "ckpt", tmp_path / "out", replace(OPTIONS, device="cuda"))
    rows = {s["system"]: s for s in report["systems"]}
    assert list(rows) == SYSTEMS
    assert rows["fp32+depth"]["token_agreement"] > 0.9      # GPU float arithmetic: near ties may flip a token
    assert report["machine"]["device"] == "cuda" and report["machine"]["gpu"]
    assert report["bandwidth"]["read_gb_s"] > 100 and report["memory"] == []
    assert len(commands_bench.policy_tables(report)) == 2


def test_cli_passes_its_options_and_prints_the_tables(bench, monkeypatch, tmp_path, capsys):
    _, report = bench
    seen = {}

    def fake_bench(checkpoint, out, options, bundles, command, on_step):
        seen.update(checkpoint=checkpoint, out=out, options=options, bundles=bundles, command=command)
        return report

    monkeypatch.setattr("edgeact.export.bench_policy.bench_policy", fake_bench)
    parser = argparse.ArgumentParser()
    commands_bench.register(parser.add_subparsers())
    args = parser.parse_args(["bench-policy", str(tmp_path / "ck"), "--frames", "3", "--threads", "2",
                              "--precisions", "int4", "--out", str(tmp_path / "o")])
    assert args.handler(args) == 0
    options = seen["options"]
    assert (options.frames, options.threads, options.precisions, options.size) == (3, 2, ("int4",), "bench")
    assert options.device == "cpu"
    args = parser.parse_args(["bench-policy", "--device", "cuda", "--prefill-chunk", "1024", "--crops-per-run", "9"])
    options = commands_bench._options(args)
    assert (options.device, options.prefill_chunk, options.crops_per_run) == ("cuda", 1024, 9)
    assert seen["bundles"] == commands_bench.Path(commands_bench.DEFAULT_BUNDLES)
    assert "edgeact int8, forced depth" in capsys.readouterr().out


def test_suite_runs_quant_then_policy_then_the_loop_on_the_int8_bundle(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr("edgeact.export.bench_bundles.ensure_checkpoint", lambda path, size, seed: path)
    monkeypatch.setattr("edgeact.export.quant_bench.bench_quantization",
                        lambda source, work, options, on_step: calls.append(("quant", work, options.precisions)) or [])
    monkeypatch.setattr("edgeact.export.quant_report.print_report", lambda rows, console, title: None)
    monkeypatch.setattr(commands_bench, "run_policy_bench",
                        lambda checkpoint, out, options, bundles, console: calls.append(("policy", out, bundles)))

    class Done:
        returncode = 0

    monkeypatch.setattr(commands_bench.subprocess, "run", lambda command, check: calls.append(("loop", command)) or Done)
    parser = argparse.ArgumentParser()
    commands_bench.register(parser.add_subparsers())
    out = tmp_path / "bench"
    args = parser.parse_args(["bench-suite", "--out", str(out), "--loop-seconds", "3"])
    assert args.handler(args) == 0
    assert [c[0] for c in calls] == ["quant", "policy", "loop"]
    assert calls[0][1] == out / "bundles" and calls[0][2] == ("int8", "fp8", "int4")
    assert calls[1][1:] == (out / "policy", out / "bundles")
    assert calls[2][1][-6:] == ["bench", str(out / "loop-config.json"), "--seconds", "3", "--out", str(out / "loop")]
    config = json.loads((out / "loop-config.json").read_text())
    assert config["policy"]["type"] == "bundle" and config["policy"]["path"] == str((out / "bundles" / default_recipe("int8")[0]).absolute())
    assert set(json.loads((out / "suite.json").read_text())["wall_s"]) >= {"bench-quant", "bench-policy", "total"}
