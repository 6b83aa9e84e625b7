"""`edgeact bench-policy` (policy-step latency, side by side) and `edgeact bench-suite` (what `make bench` runs); torch inside handlers."""
from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from edgeact.export.commands import SIZE_CHOICES
from edgeact.export.commands_quantize import PRECISIONS as QUANT_RECIPES     # what bench-quant can make (light)
from edgeact.runtime.cli_args import (console as _console, positive_float as _positive_float,
                                      positive_int as _positive_int, results_dir, seed_value)

# Literal copies of bench_policy's defaults: importing it here would cost `edgeact --help` time.
DEFAULT_CHECKPOINT = "out/bench/ckpt"
DEFAULT_BUNDLES = "out/bench/bundles"
DEFAULT_SIZE = "bench"
QUANTIZED = ("int8", "int4")
SUITE_QUANT = QUANT_RECIPES
SUITE_QUANT_FRAMES = 2
LOOP_PRECISION = "int8"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench-policy", help="policy-step latency: PyTorch reference vs edgeact fp32 / int8 / int4, side by side",
        description="Export (or reuse) the fp32 bundle of CHECKPOINT and its int8 / int4 quantizations, then on the "
                    "same held-out 640x480 synthetic-camera frames, in one run and with one thread count, measure "
                    "frame-to-action latency and decoder steps of the PyTorch reference (grammar-masked greedy, one "
                    "token per step) and of each bundle policy with and without forced depth; also each bundle's "
                    "decode rate against the memory-bandwidth limit and a policy process's peak resident memory.")
    p.add_argument("checkpoint", type=Path, nargs="?", default=Path(DEFAULT_CHECKPOINT), metavar="CHECKPOINT",
                   help=f"checkpoint directory; created (synthetic) when it does not exist (default {DEFAULT_CHECKPOINT})")
    p.add_argument("--size-checkpoint", choices=SIZE_CHOICES, metavar="SIZE",
                   help=f"synthetic size to create at CHECKPOINT when missing: {', '.join(SIZE_CHOICES)} "
                        f"(default {DEFAULT_SIZE}: ~210M parameters)")
    _add_policy_options(p, default_out="out/bench-policy",
                        bundles_default=f"{DEFAULT_BUNDLES}: bench-suite's, so each reuses the other's")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu (default), or cuda: the reference on torch's GPU, edgeact on onnxruntime's CUDA EP (no "
                        "memory table: the weights are in the GPU's memory)")
    p.add_argument("--prefill-chunk", type=_positive_int,
                   help="prompt positions per decoder run (default: 128 on a CPU, for host memory; 1024 on a GPU)")
    p.add_argument("--crops-per-run", type=_positive_int,
                   help="ViT crops per run (default: 1 on a CPU, for host memory; on a GPU as many as the engine takes)")
    p.set_defaults(handler=_bench_policy)

    p = subparsers.add_parser(
        "bench-suite", help="what `make bench` runs: bench-quant, bench-policy and the control-loop bench, all under OUT",
        description="On the `bench` synthetic checkpoint: the quantization table (bench-quant), the policy-step "
                    "table (bench-policy), then the control loop on the simulated robot with the int8 bundle policy "
                    "(`edgeact bench --seconds N`): the loop keeps its rate however long a policy step takes.")
    p.add_argument("--checkpoint", type=Path, default=Path(DEFAULT_CHECKPOINT),
                   help=f"checkpoint (created when missing; default {DEFAULT_CHECKPOINT})")
    p.add_argument("--size-checkpoint", choices=SIZE_CHOICES, metavar="SIZE",
                   help=f"{', '.join(SIZE_CHOICES)} (default {DEFAULT_SIZE})")
    p.add_argument("--loop-seconds", type=_positive_float, default=20.0, help="control-loop bench length (default 20)")
    p.add_argument("--quant-precisions", type=_names(QUANT_RECIPES), default=SUITE_QUANT,
                   help="bench-quant's (default int8,fp8,int4)")
    p.add_argument("--quant-frames", type=_positive_int, default=SUITE_QUANT_FRAMES,
                   help=f"bench-quant's held-out frames (default {SUITE_QUANT_FRAMES}: its fp8 rows decode slowly on a CPU)")
    _add_policy_options(p, default_out="out/bench",
                        bundles_default=f"OUT/bundles; with the default --out, {DEFAULT_BUNDLES}, which bench-policy "
                                        "reuses")
    p.set_defaults(handler=_bench_suite)


def _add_policy_options(p, default_out: str, bundles_default: str) -> None:
    p.add_argument("--out", type=Path, default=Path(default_out), help=f"results directory (default {default_out})")
    p.add_argument("--bundles", type=Path, help=f"where the fp32 / int8 / int4 bundles are kept and reused (default "
                                                f"{bundles_default})")
    p.add_argument("--frames", type=_positive_int, default=2, help="timed frames (default 2; one more warms up)")
    p.add_argument("--threads", type=_positive_int, help="torch and onnxruntime threads (default: every core)")
    p.add_argument("--precisions", type=_names(QUANTIZED), default=QUANTIZED,
                   help="quantized bundles to compare (default int8,int4)")
    p.add_argument("--decode-steps", type=_positive_int, default=32, help="timed single-token steps per bundle")
    p.add_argument("--rss-steps", type=_positive_int, default=2, help="policy steps of each memory probe (default 2)")
    p.add_argument("--probe-mb", type=_positive_int, default=512, help="bandwidth probe array in MiB (default 512)")
    p.add_argument("--seed", type=seed_value, default=0)
    p.add_argument("--fresh", action="store_true", help="re-export and re-quantize even when valid bundles exist")


def _names(allowed: tuple[str, ...]):
    """argparse type: comma-separated names, each one of `allowed`, each once: a typo is refused before any work."""
    def names(text: str) -> tuple[str, ...]:
        given = tuple(t.strip() for t in text.split(",") if t.strip())
        unknown = [n for n in given if n not in allowed]
        if unknown:
            raise argparse.ArgumentTypeError(f"{', '.join(unknown)} unknown; use some of {', '.join(allowed)}")
        twice = sorted({n for n in given if given.count(n) > 1})
        if twice:
            raise argparse.ArgumentTypeError(f"{', '.join(twice)} given twice; name each once")
        return given

    return names


def _check_size(checkpoint: Path, size: str | None) -> None:
    """--size-checkpoint sizes a checkpoint being created: another one at CHECKPOINT is refused, not benched."""
    if size is None or not (checkpoint / "config.json").is_file():
        return
    from edgeact.export.synthetic import synthetic_config
    from edgeact.runtime.arm_config import ArmConfig
    from edgeact.runtime.errors import ConfigError

    if ArmConfig.load(checkpoint / "config.json") != synthetic_config("D", size):
        raise ConfigError(f"{checkpoint} holds a checkpoint other than the synthetic {size} one, and --size-checkpoint "
                          "only sizes a checkpoint being created; drop --size-checkpoint to bench this one, or point "
                          "at a new directory")


def _progress(console):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=True)


def _advance(progress, task, what: str):
    """on_step callback: one step done, and the bar names it."""
    return lambda name: progress.update(task, advance=1, description=f"{what}: {name}")


def _options(args):
    from edgeact.export.bench_policy import PolicyBenchOptions

    return PolicyBenchOptions(frames=args.frames, threads=args.threads, seed=args.seed, precisions=args.precisions,
                              size=args.size_checkpoint or DEFAULT_SIZE, decode_rate_steps=args.decode_steps,
                              rss_steps=args.rss_steps, probe_bytes=args.probe_mb << 20, fresh=args.fresh,
                              device=getattr(args, "device", "cpu"),
                              prefill_chunk=getattr(args, "prefill_chunk", None),
                              crops_per_run=getattr(args, "crops_per_run", None))


def _command_line() -> str:
    return "edgeact " + " ".join(shlex.quote(a) for a in sys.argv[1:])


# ---------------------------------------------------------------------------------- bench-policy
def _bench_policy(args: argparse.Namespace) -> int:
    options = _options(args)
    _check_size(args.checkpoint, args.size_checkpoint)
    results_dir(args.out)       # before minutes of work: a bad --out would lose every figure at the end
    console = _console()
    run_policy_bench(args.checkpoint, args.out, options, args.bundles or Path(DEFAULT_BUNDLES), console)
    console.print(f"JSON: {args.out / 'bench-policy.json'}")
    return 0


def run_policy_bench(checkpoint: Path, out: Path, options, bundles: Path, console) -> dict:
    """bench_policy behind a progress bar, then its tables."""
    from edgeact.export.bench_policy import bench_policy

    with _progress(console) as progress:
        task = progress.add_task("bench-policy", total=3 + len(options.precisions) + options.frames + 3)
        report = bench_policy(checkpoint, out, options, bundles, command=_command_line(),
                              on_step=_advance(progress, task, "bench-policy"))
    for table in policy_tables(report):
        console.print(table)
    return report


def _host_caption(host: dict | None) -> str:
    """The device line and what keeps its figures from being steady (reports from before it have none)."""
    from rich.markup import escape

    if not host:
        return ""
    return escape("\nDevice: " + host["summary"] + "".join(f"\nNote: {note}" for note in host["notes"]))


def policy_tables(report: dict) -> list:
    """The latency table (ratios to the reference), the bandwidth table and the memory table."""
    from rich.table import Table

    f, m = report["frames"], report["machine"]
    prompt = sorted(set(f["prompt_tokens"]))
    latency = Table(title=f"policy step, frame -> actions ({f['n']} frames {f['width']}x{f['height']}, "
                          f"{m['threads']} threads, medians)",
                    caption="(a) = generate_greedy on the PyTorch model with the grammar mask (MaskedGreedyConstraint): "
                            "KV-cached, one decoder call per answer token, the full model's logits each step -- the fair "
                            "cached implementation. edgeact = BundlePolicy.infer (onnxruntime, decode program, "
                            f"{report.get('decoder_attention', 'portable')} decoder).\n"
                            "Forced depth: the 100 depth codes are given -- here the codes (a) produced for that frame. On "
                            "the robot the depth sensor's image gives them through the depth tokenizer stage (`edgeact "
                            "add-depth-tokenizer`), which these bundles do not have: its cost is not included.\n"
                            f"Prompt {'/'.join(map(str, prompt))} tokens: {f['crops']} crops (max_crops "
                            f"{f['max_crops']}, global view included); {m['processor']}, torch {m['torch']}, "
                            f"onnxruntime {m['onnxruntime']}." + _host_caption(m.get("host")),
                    caption_justify="left")
    for name, justify in (("system", "left"), ("latency ms", "right"), ("vs (a)", "right"), ("speed-up", "right"),
                          ("decode steps", "right"), ("vs (a)", "right"), ("ms / step", "right"),
                          ("vision+prefill ms", "right"), ("decode ms", "right"), ("tokens = (a)", "right")):
        latency.add_column(name, justify=justify)
    for i, s in enumerate(report["systems"]):
        stages = s["stage_s_median"]
        same = s["identical_to_reference"]
        latency.add_row(
            ("(a) " if i == 0 else "") + s["label"], f"{1000 * s['latency_s_median']:.0f}", f"{s['latency_ratio']:.2f}x",
            f"{s['speedup']:.2f}x", f"{s['decode_steps_median']:g}",
            "-" if s["steps_ratio"] is None else f"{s['steps_ratio']:.2f}x",
            "-" if s["decode_step_ms_median"] is None else f"{s['decode_step_ms_median']:.1f}",
            f"{1000 * stages['vision+prefill']:.0f}", f"{1000 * stages['decode']:.0f}",
            f"{sum(same)}/{len(same)} ({s['token_agreement']:.0%})")
    bw = report["bandwidth"]
    around = " / ".join(f"{p['read_gb_s']:.1f}" for p in report.get("bandwidth_probes", []))
    around = f"; read {around} GB/s before / after the decode rates" if around else ""
    decode = Table(title=f"decode vs memory bandwidth: read {bw['read_gb_s']:.1f} GB/s, copy {bw['copy_gb_s']:.1f} GB/s "
                         f"({bw['array_bytes'] >> 20} MiB, {bw['threads']} threads, best of {bw['repeats']}{around})",
                   caption=f"A decode step reads the decoder's weights, the LM-head rows of the widest choice (256 action "
                           f"bins, float32) and one embedding row; limit = read bandwidth / those bytes. Measured: "
                           f"single-token steps of the decode program at {report['decode_context_tokens']} positions of "
                           "context, after a warm-up. The goal's limit counts the weights; each measured step also "
                           "reads the KV cache (KV MB): 'with KV' counts it too.", caption_justify="left")
    for name in ("bundle", "weights MB / token", "by kind (MB)", "KV MB", "decode tok/s", "limit tok/s", "of limit",
                 "of limit with KV"):
        decode.add_column(name, justify="left" if name in ("bundle", "by kind (MB)") else "right")
    for d in report["decode"]:
        b = d["bytes_per_token"]
        kinds = ", ".join(f"{k} {v / 1e6:.1f}" for k, v in b["decoder_by_kind"].items())
        decode.add_row(d["precision"], f"{b['total'] / 1e6:.1f}", kinds, f"{d['kv_bytes_at_context'] / 1e6:.1f}",
                       f"{d['decode_tokens_s']:.1f}", f"{d['limit_tokens_s']:.1f}", f"{d['fraction_of_limit']:.0%}",
                       f"{d['fraction_of_limit_with_kv']:.0%}" if "fraction_of_limit_with_kv" in d else "-")
    if not report["memory"]:
        return [latency, decode]       # --device cuda: the weights live in the GPU's memory, not the host's
    memory = Table(title="peak resident memory of a bundle-policy process",
                   caption="Each bundle's BundlePolicy in a fresh process, after loading and "
                           f"{report['memory'][0]['steps']} policy steps (VmHWM); budget = 1.3 x bundle bytes + 300 MB.",
                   caption_justify="left")
    for name in ("bundle", "bundle MB", "RSS after load MB", "peak RSS MB", "budget MB", "peak / budget"):
        memory.add_column(name, justify="left" if name == "bundle" else "right")
    for r in report["memory"]:
        memory.add_row(r["precision"], f"{r['bundle_bytes'] / 1e6:.0f}", f"{r['rss_after_load_bytes'] / 1e6:.0f}",
                       f"{r['peak_rss_bytes'] / 1e6:.0f}", f"{r['budget_bytes'] / 1e6:.0f}", f"{r['budget_ratio']:.2f}")
    return [latency, decode, memory]


# ----------------------------------------------------------------------------------- bench-suite
def _bench_suite(args: argparse.Namespace) -> int:
    from edgeact.export.bench_bundles import default_recipe, ensure_checkpoint
    from edgeact.export.quant_bench import BenchOptions, bench_quantization
    from edgeact.export.quant_report import print_report

    if LOOP_PRECISION not in args.precisions:
        from edgeact.runtime.errors import ConfigError

        raise ConfigError(f"the control-loop bench runs the {LOOP_PRECISION} bundle: keep {LOOP_PRECISION} in --precisions")
    # Every option is checked here, before minutes of checkpoint, export and quantization.
    quant_options = BenchOptions(precisions=args.quant_precisions, report_frames=args.quant_frames, seed=args.seed,
                                 threads=args.threads, fresh=args.fresh)
    # bench-quant will have just written every bundle: --fresh must not make bench-policy redo them.
    policy_options = dataclasses.replace(_options(args), fresh=False)
    _check_size(args.checkpoint, args.size_checkpoint)
    console = _console()
    out: Path = args.out
    bundles = args.bundles or out / "bundles"
    results_dir(out)
    began, walls = time.perf_counter(), {}

    start = time.perf_counter()
    checkpoint = ensure_checkpoint(args.checkpoint, policy_options.size, args.seed).absolute()
    walls["checkpoint"] = time.perf_counter() - start

    start = time.perf_counter()
    console.rule("bench-quant")
    with _progress(console) as progress:
        task = progress.add_task("bench-quant", total=3 + len(quant_options.recipes()))
        rows = bench_quantization(checkpoint, bundles, quant_options, on_step=_advance(progress, task, "bench-quant"))
    print_report(rows, console, title=f"quantization of {checkpoint.name} (CPU, onnxruntime)")
    (out / "quant.json").write_text(json.dumps(rows, indent=2) + "\n")
    walls["bench-quant"] = time.perf_counter() - start

    start = time.perf_counter()
    console.rule("bench-policy")
    run_policy_bench(checkpoint, out / "policy", policy_options, bundles, console)
    walls["bench-policy"] = time.perf_counter() - start

    start = time.perf_counter()
    console.rule(f"control loop with the {LOOP_PRECISION} bundle policy")
    rc = _loop_bench(bundles / default_recipe(LOOP_PRECISION)[0], out, args.loop_seconds)
    walls["control-loop bench"] = time.perf_counter() - start
    walls["total"] = time.perf_counter() - began

    from rich.table import Table

    table = Table(title=f"bench-suite wall time ({out})")
    table.add_column("part")
    table.add_column("s", justify="right")
    for part, seconds in walls.items():
        table.add_row(part, f"{seconds:.0f}")
    console.print(table)
    (out / "suite.json").write_text(json.dumps({"command": _command_line(), "wall_s": walls, "loop_exit_status": rc,
                                                "checkpoint": str(checkpoint), "bundles": str(bundles)}, indent=2) + "\n")
    return rc


def _loop_bench(bundle: Path, out: Path, seconds: float) -> int:
    """`edgeact bench CONFIG` in a fresh process (nothing of this one's torch or models in its memory or threads)."""
    from edgeact.runtime.demo import demo_config_dict

    config = out / "loop-config.json"
    config.write_text(json.dumps(demo_config_dict("bundle", str(bundle.absolute())), indent=2) + "\n")
    command = [sys.executable, "-m", "edgeact.runtime.cli", "bench", str(config), "--seconds", f"{seconds:g}",
               "--out", str(out / "loop")]
    return subprocess.run(command, check=False).returncode
