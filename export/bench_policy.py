"""`edgeact bench-policy`: one policy step (camera frame -> actions) of the PyTorch reference and of edgeact fp32 / int8 / int4, side by side.

Everything compared runs in one process, on the same held-out synthetic-camera frames, with the
same thread count, interleaved frame by frame (so a neighbour's load slows every system alike):

- the reference: `generate_greedy` on the PyTorch model with the answer grammar as a mask
  (MaskedGreedyConstraint): KV-cached, one decoder call per answer token -- how MolmoAct runs;
- edgeact: `BundlePolicy.infer` on each bundle (onnxruntime, the decode program), once letting
  the model decode depth and once with the depth codes forced -- the reference's own codes for
  that frame, standing in for the depth tokenizer stage that encodes the sensor's depth on a robot.

Besides latency it measures what bounds decoding: each bundle's single-token decode rate against
the memory-bandwidth limit (runtime/membw.py), and the peak resident memory of a process running
the bundle policy against its budget. The report is a dict, written as JSON; commands_bench.py
prints it.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgeact.export.bench_bundles import DEFAULT_SIZE, QUANTIZED, ensure_checkpoint, prepare_bundles
from edgeact.runtime import bench_compare
from edgeact.runtime.bench_compare import HALF_ANSWER_TOKENS, decode_rate
from edgeact.runtime.device_info import read_device_info
from edgeact.runtime.errors import ConfigError
from edgeact.runtime.stage_io import FUSED_ATTENTION, PORTABLE_ATTENTION

REFERENCE = "reference"
JSON_NAME = "bench-policy.json"
DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class PolicyBenchOptions:
    frames: int = 2                          # timed frames (one more, untimed, warms every system up)
    threads: int | None = None               # torch and onnxruntime alike; None: every core this process may use
    seed: int = 0
    frame_px: tuple[int, int] = (640, 480)   # one RealSense-like colour image
    precisions: tuple[str, ...] = QUANTIZED  # quantized bundles besides fp32
    size: str = DEFAULT_SIZE                 # synthetic size written to CHECKPOINT when it does not exist
    calibration_samples: int = 8             # int8 calibration, when no calibration set is there to reuse
    decode_rate_steps: int = 32
    rss_steps: int = 2
    probe_bytes: int = 512 << 20             # memory-bandwidth probe array
    fresh: bool = False                      # re-export and re-quantize even when valid bundles exist
    device: str = "cpu"                      # cpu, or cuda: the reference on torch's GPU, edgeact on the CUDA EP
    prefill_chunk: int | None = None         # the bundle policies' prompt positions per run (None: the device's default)
    crops_per_run: int | None = None         # the bundle policies' ViT crops per run (None: the device's default)

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ConfigError(f"device {self.device!r} unknown; use one of {', '.join(DEVICES)}")
        unknown = [p for p in self.precisions if p not in QUANTIZED]
        if unknown:
            raise ConfigError(f"precisions {unknown}: bench-policy compares fp32 with some of {', '.join(QUANTIZED)}")
        sizes = [s for s in (self.prefill_chunk, self.crops_per_run) if s is not None]
        if min(self.frames, self.decode_rate_steps, self.rss_steps, self.calibration_samples, *sizes) < 1:
            raise ConfigError("frames, decode_rate_steps, rss_steps, calibration_samples, prefill_chunk and "
                              "crops_per_run must be >= 1")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads is {self.threads}; use a positive number or leave it unset (every core)")
        if min(self.frame_px) < 16:
            raise ConfigError(f"frame size {self.frame_px} too small; use a camera size such as 640x480")

    @property
    def resolved_threads(self) -> int:
        if self.threads:
            return self.threads
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# --------------------------------------------------------------------------------- measurement
@dataclass(frozen=True)
class StepRun:
    """One policy step of one system on one frame."""
    latency_s: float                  # frame in -> actions out
    decode_steps: int                 # decoder calls after the prefill
    token_ids: list[int]
    prompt_tokens: int
    stage_s: dict[str, float]         # preprocess, vision+prefill, decode, parse


class Reference:
    """The PyTorch model decoding the full answer one token per step, grammar-masked (MaskedGreedyConstraint)."""

    def __init__(self, checkpoint: Path, fp32_bundle, device: str = "cpu"):
        import torch

        from edgeact.export.checkpoint import load_model
        from edgeact.runtime.grammar_walk import longest_answer
        from edgeact.runtime.preprocess import ImagePreprocessor
        from edgeact.runtime.preprocess_config import PreprocessConfig

        self.torch = torch
        self.model = load_model(checkpoint, dtype=torch.float32)[0].to(device)
        self.policy = fp32_bundle          # tokenizer, layout, grammar and statistics: the same as the bundle's
        self.preprocessor = ImagePreprocessor(fp32_bundle.bundle.config, PreprocessConfig.load(
            fp32_bundle.bundle.path(fp32_bundle.bundle.manifest.tokenizer.preprocessor_file), fp32_bundle.bundle.config))
        self.max_new_tokens = longest_answer(fp32_bundle.grammar)

    def run(self, rgb: np.ndarray, instruction: str, max_new_tokens: int | None = None) -> StepRun:
        from edgeact.export.generate import generate_greedy
        from edgeact.runtime.action_bins import action_ids_to_values, unnormalize_actions
        from edgeact.runtime.grammar_walk import MaskedGreedyConstraint
        from edgeact.runtime.prompt import build_prompt_ids

        p, torch = self.policy, self.torch
        start = time.perf_counter()
        inputs = self.preprocessor(rgb)
        prompt = build_prompt_ids(p.tokenizer, p.layout, instruction, inputs)
        tensors = [torch.from_numpy(np.array(a)) for a in (inputs.images, inputs.image_masks, inputs.pooled_patches_idx)]
        preprocessed = time.perf_counter()
        out = generate_greedy(self.model, torch.from_numpy(prompt)[None], *tensors,
                              max_new_tokens=max_new_tokens or self.max_new_tokens, eos_token_id=p.layout.bos_id,
                              allowed_token_fn=MaskedGreedyConstraint(p.grammar))
        generated = time.perf_counter()
        if max_new_tokens is None:          # a whole answer: turn it into actions, as the policy does
            answer = p.grammar.parse_ids(np.asarray(out.token_ids, np.int64))
            actions = action_ids_to_values(answer.action_ids, p.layout.base_vocab_size)
            actions = unnormalize_actions(actions, p.stats) if p.stats is not None else actions
        end = time.perf_counter()
        return StepRun(end - start, out.n_decode_steps, list(out.token_ids), len(prompt),
                       {"preprocess": preprocessed - start, "vision+prefill": out.seconds_prefill,
                        "decode": out.seconds_decode, "parse": end - generated})


def run_bundle(policy, rgb: np.ndarray, instruction: str, depth_codes=None, trace=None) -> StepRun:
    start = time.perf_counter()
    result = policy.infer(rgb, instruction, depth_codes=depth_codes, trace=trace)
    latency = time.perf_counter() - start
    s = result.stage_seconds
    return StepRun(latency, result.decode_steps, result.token_ids.tolist(), result.prompt_tokens,
                   {"preprocess": s.get("preprocess", 0.0), "vision+prefill": s.get("vision", 0.0) + s.get("prefill", 0.0),
                    "decode": s.get("decode", 0.0), "parse": s.get("parse", 0.0)})


# ----------------------------------------------------------------------------------- the bench
def bench_policy(checkpoint: str | Path, out_dir: str | Path, options: PolicyBenchOptions = PolicyBenchOptions(),
                 bundles_dir: str | Path | None = None, on_step: Callable[[str], None] | None = None,
                 command: str = "") -> dict[str, Any]:
    """Prepare the bundles, measure every system side by side, write OUT/bench-policy.json; returns the report."""
    import onnxruntime
    import torch

    from edgeact.runtime.bundle_policy import BundlePolicy
    from edgeact.runtime.membw import best_of, measure_bandwidth

    began = time.perf_counter()
    step = on_step or (lambda name: None)
    out_dir = Path(out_dir)
    if options.device == "cuda":
        check_cuda(torch, onnxruntime)       # before minutes of export: a machine without a GPU is told at once
    checkpoint = ensure_checkpoint(checkpoint, options.size, options.seed).absolute()
    step("checkpoint")
    # onnxruntime's CUDA EP runs the portable decoder (the fused one is its CPU EP's) and int8 w8a16: the default
    # int8 mode (w8a8-dynamic) is written and measured for the CPU EP only.
    cuda = options.device == "cuda"
    attention = PORTABLE_ATTENTION if cuda else FUSED_ATTENTION
    bundles = prepare_bundles(checkpoint, bundles_dir or out_dir / "bundles", options.precisions, seed=options.seed,
                              threads=options.threads, calibration_samples=options.calibration_samples,
                              fresh=options.fresh, on_step=step, attention=attention,
                              int8_mode="w8a16" if cuda else None)
    threads = options.resolved_threads
    torch.set_num_threads(threads)
    backend = {"provider": options.device} if options.device != "cpu" else None
    policies = {name: BundlePolicy(path, threads=threads, allow_unverified=True, verify_checksums=False,
                                   prefill_chunk=options.prefill_chunk, crops_per_run=options.crops_per_run,
                                   backend_options=backend)
                for name, path in bundles.items()}
    reference = Reference(checkpoint, policies["fp32"], options.device)
    prefill_chunk, crops_per_run = policies["fp32"].decoder.max_chunk, policies["fp32"].vision.crops_per_run
    frames = held_out_frames(options)
    host = read_device_info()       # the power mode and clocks the timed frames run under
    warm_up(reference, policies, *frames.pop(0))
    step("warm-up")
    runs = time_frames(reference, policies, frames, lambda: step("frame"))
    crops = int(policies["fp32"].preprocessor(frames[0][0]).images.shape[0])
    max_crops = policies["fp32"].preprocessor.config.max_crops
    systems = _summaries(runs)

    past = int(statistics.median(r.prompt_tokens for r in runs[REFERENCE])) + HALF_ANSWER_TOKENS

    def probe():
        if options.device == "cuda":
            return cuda_bandwidth(torch, options.probe_bytes)
        return measure_bandwidth(options.probe_bytes, threads=threads)

    # The bandwidth is probed right before and right after the decode rates, and the better probe is the limit:
    # on a shared host it moves between minutes (35-66 GB/s read here in one afternoon), and a probe taken at
    # another moment than the rates it bounds would make their fraction of it meaningless.
    probes = [probe()]
    rates = {name: decode_rate(policy, past, options.decode_rate_steps) for name, policy in policies.items()}
    step("decode rates")
    probes.append(probe())
    bandwidth = best_of(probes)
    decode = [_decode_row(name, policy.bundle, rates[name], bandwidth.read_gb_s, past) for name, policy in policies.items()]
    step("bandwidth")
    del policies, reference          # the memory probes below run in processes of their own
    # The budget (1.3 x bundle + 300 MB) is about the host's resident memory (VmHWM). With --device cuda the weights
    # and activations are the GPU driver's allocations, which VmHWM does not count, so no row is measured there.
    memory = [_memory_row(name, path, options, threads) for name, path in bundles.items()] if options.device == "cpu" else []
    step("memory")

    machine = {"cpus": os.cpu_count(), "threads": threads, "platform": platform.platform(), "processor": _cpu_name(),
               "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "device": options.device,
               "gpu": torch.cuda.get_device_name() if options.device == "cuda" else None,
               "prefill_chunk": prefill_chunk, "crops_per_run": crops_per_run, "host": host.to_dict()}
    frames_info = {"n": len(frames), "width": options.frame_px[0], "height": options.frame_px[1], "seed": options.seed,
                   "source": "synthetic camera, held-out views", "instructions": [i for _, i in frames],
                   "crops": crops, "max_crops": max_crops, "prompt_tokens": [r.prompt_tokens for r in runs[REFERENCE]]}
    report = {"command": command, "checkpoint": str(checkpoint), "bundles": {k: str(v) for k, v in bundles.items()},
              "decoder_attention": attention,
              "machine": machine, "frames": frames_info, "systems": systems, "bandwidth": asdict(bandwidth),
              "bandwidth_probes": [asdict(p) for p in probes],
              "decode_context_tokens": past, "decode": decode, "memory": memory,
              "wall_s": round(time.perf_counter() - began, 1)}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / JSON_NAME).write_text(json.dumps(report, indent=2) + "\n")
    return report


def check_cuda(torch, onnxruntime) -> None:
    """Both sides of a GPU comparison can reach the GPU: torch for the reference, onnxruntime's CUDA EP for edgeact."""
    if not torch.cuda.is_available():
        raise ConfigError(f"--device cuda: torch {torch.__version__} here sees no CUDA device; run on a machine with "
                          "an NVIDIA GPU and a CUDA build of torch, or use --device cpu")
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        raise ConfigError(f"--device cuda: onnxruntime {onnxruntime.__version__} here has no CUDAExecutionProvider "
                          f"(it has {', '.join(onnxruntime.get_available_providers())}); install onnxruntime-gpu, or "
                          "use --device cpu")


def cuda_bandwidth(torch, array_bytes: int, repeats: int = 5):
    """The GPU's streaming rates, as measure_bandwidth's on the host: a float32 sum (read) and a copy (read + write).

    Both are timed with CUDA events around one kernel each; the best of `repeats` after a warm-up.
    """
    from edgeact.runtime.membw import Bandwidth

    data = torch.ones(array_bytes // 4, dtype=torch.float32, device="cuda")
    half = data[: len(data) // 2]
    target = torch.empty_like(half)

    def best(run) -> float:
        run()
        times = []
        for _ in range(repeats):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            run()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end) / 1000)
        return max(min(times), 1e-9)

    read_s = best(lambda: data.sum())
    copy_s = best(lambda: target.copy_(half))
    return Bandwidth(read_gb_s=data.nbytes / read_s / 1e9, copy_gb_s=2 * target.nbytes / copy_s / 1e9,
                     array_bytes=data.nbytes, threads=1, repeats=repeats)


def held_out_frames(options: PolicyBenchOptions) -> list[tuple[np.ndarray, str]]:
    """frames + 1 (RGB, instruction): synthetic-camera views that no calibration set uses; the first is the warm-up."""
    return bench_compare.held_out_frames(options.frames + 1, options.seed, options.frame_px)


def warm_up(reference: Reference, policies: dict, rgb: np.ndarray, instruction: str) -> None:
    """Every system allocates its buffers and meets the frame's shapes once, untimed (a few decoder calls each)."""
    reference.run(rgb, instruction, max_new_tokens=2)
    for policy in policies.values():
        bench_compare.warm_up(policy, rgb, instruction)


def time_frames(reference: Reference, policies: dict, frames: list, on_frame: Callable[[], None]
                ) -> dict[str, list[StepRun]]:
    """Frame by frame, the reference and then every bundle without and with forced depth (the reference's codes)."""
    runs: dict[str, list[StepRun]] = {REFERENCE: []}
    for rgb, instruction in frames:
        ref = reference.run(rgb, instruction)
        runs[REFERENCE].append(ref)
        codes = reference.policy.grammar.parse_ids(np.asarray(ref.token_ids, np.int64)).depth_codes
        for name, policy in policies.items():
            runs.setdefault(name, []).append(run_bundle(policy, rgb, instruction))
            runs.setdefault(f"{name}+depth", []).append(run_bundle(policy, rgb, instruction, depth_codes=codes))
        on_frame()
    return runs


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def system_label(key: str) -> str:
    if key == REFERENCE:
        return "PyTorch reference (generate_greedy)"
    precision, _, forced = key.partition("+")
    return f"edgeact {precision}" + (", forced depth" if forced else "")


def _summaries(runs: dict[str, list[StepRun]]) -> list[dict[str, Any]]:
    ref = runs[REFERENCE]
    ref_latency = statistics.median(r.latency_s for r in ref)
    ref_steps = statistics.median(r.decode_steps for r in ref)
    rows = []
    for key, items in runs.items():
        latency = statistics.median(r.latency_s for r in items)
        steps = statistics.median(r.decode_steps for r in items)
        same = [r.token_ids == f.token_ids for r, f in zip(items, ref)]
        rows.append({
            "system": key, "label": system_label(key), "depth": "forced" if key.endswith("+depth") else "model",
            "latency_s_median": round(latency, 4), "latency_s": [round(r.latency_s, 4) for r in items],
            "latency_ratio": round(latency / ref_latency, 4), "speedup": round(ref_latency / latency, 3),
            "decode_steps_median": steps, "decode_steps": [r.decode_steps for r in items],
            "steps_ratio": round(steps / ref_steps, 4) if ref_steps else None,
            "answer_tokens": [len(r.token_ids) for r in items],
            "identical_to_reference": same, "token_agreement": round(float(np.mean(
                [_agreement(r.token_ids, f.token_ids) for r, f in zip(items, ref)])), 4),
            "stage_s_median": {k: round(statistics.median(r.stage_s[k] for r in items), 4) for k in items[0].stage_s},
            "decode_step_ms_median": round(1000 * statistics.median(
                r.stage_s["decode"] / r.decode_steps for r in items if r.decode_steps), 2) if any(
                r.decode_steps for r in items) else None,
        })
    return rows


def _agreement(a: list[int], b: list[int]) -> float:
    """Share of positions with the same token (the longer answer's length counts)."""
    n = min(len(a), len(b))
    return sum(x == y for x, y in zip(a[:n], b[:n])) / max(len(a), len(b), 1)


def _decode_row(name: str, bundle, rate: float, read_gb_s: float, past: int) -> dict[str, Any]:
    from edgeact.runtime.membw import bandwidth_limit_tokens_s, decode_bytes_per_token

    per_token = decode_bytes_per_token(bundle)
    kv = per_token.kv_bytes_per_position * past
    limit = bandwidth_limit_tokens_s(read_gb_s, per_token.total)
    # The goal's limit counts the weights a token reads; each measured step also reads the KV cache at `past`
    # positions, so the limit with it is the one those steps could reach.
    limit_kv = bandwidth_limit_tokens_s(read_gb_s, per_token.total + kv)
    return {"precision": name, "bytes_per_token": per_token.to_dict(), "kv_bytes_at_context": kv,
            "decode_tokens_s": round(rate, 2), "limit_tokens_s": round(limit, 2), "fraction_of_limit": rate / limit,
            "limit_with_kv_tokens_s": round(limit_kv, 2), "fraction_of_limit_with_kv": rate / limit_kv}


def _memory_row(name: str, path: Path, options: PolicyBenchOptions, threads: int) -> dict[str, Any]:
    from edgeact.runtime.membw import policy_peak_rss

    return {"precision": name, **policy_peak_rss(path, options.rss_steps, threads, options.frame_px).to_dict()}
