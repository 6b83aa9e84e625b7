"""The quantization report: size, agreement with the fp32 bundle (depth, trace, action tokens), action error, decode speed.

Both bundles decode the same held-out frames (synthetic-camera views never used for
calibration) with grammar-masked greedy decoding in onnxruntime on the CPU. Agreement of a
kind is the share of chosen tokens of that kind equal at the same position in both answers
(a trace of another length counts its missing points as disagreeing); action error is the
mean |bin difference| of the action tokens, in bins of 2/255 normalized units. A free-running
answer that flips one early choice continues from another context, so its agreement mixes
accuracy with luck; `agreement_forced` is the teacher-forced share instead: fed the fp32
answer, how many of its choices the bundle makes the same (what verification gates). Decode speed
is single-token decoder steps per second at a cache as long as a prompt plus half an answer,
after a warm-up; it is a CPU figure, comparable only between rows of one run on one machine.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from edgeact.runtime import stage_io
from edgeact.runtime.kv_cache import is_fused

KINDS = ("depth", "trace", "action")
ROW_FIELDS = ("bundle", "precision", "recipe", "stage_bytes", "size_ratio", "agreement_depth", "agreement_trace",
              "agreement_action", "action_error_bins", "agreement_forced", "decode_tokens_s", "decode_ratio", "frames")
_HALF_ANSWER_TOKENS = 100


def held_out_observations(io, n_frames: int, seed: int) -> list[tuple[np.ndarray, Any]]:
    """(prompt ids, image inputs) of n held-out synthetic frames (another seed stream than calibration)."""
    from edgeact.calibration.calibration_build import DEFAULT_INSTRUCTIONS, synthetic_frames
    from edgeact.runtime.prompt import build_prompt_ids

    observations = []
    for i, (_, rgb, _) in enumerate(synthetic_frames(n_frames, seed, held_out=True)):
        inputs = io.preprocessor(rgb)
        inputs = type(inputs)(*(np.array(a) for a in (inputs.images, inputs.image_masks, inputs.pooled_patches_idx)),
                              inputs.grids)
        instruction = DEFAULT_INSTRUCTIONS[i % len(DEFAULT_INSTRUCTIONS)]
        observations.append((build_prompt_ids(io.tokenizer, io.layout, instruction, inputs), inputs))
    return observations


def agreement(reference: Sequence, answers: Sequence, base_vocab_size: int) -> dict[str, float]:
    """Per kind, matching chosen tokens / compared positions over all frames; mean action bin error."""
    matched = dict.fromkeys(KINDS, 0)
    total = dict.fromkeys(KINDS, 0)
    bin_errors: list[np.ndarray] = []
    for ref, ans in zip(reference, answers, strict=True):
        for kind in KINDS:
            a, b = ref.chosen_ids(kind), ans.chosen_ids(kind)
            n = min(len(a), len(b))
            matched[kind] += int(np.count_nonzero(a[:n] == b[:n]))
            total[kind] += max(len(a), len(b))
        a, b = ref.chosen_ids("action"), ans.chosen_ids("action")
        n = min(len(a), len(b))
        # id = Vb - 1 - bin, so a bin difference is an id difference.
        bin_errors.append(np.abs(a[:n] - b[:n]).astype(np.float64))
    result = {f"agreement_{k}": (matched[k] / total[k] if total[k] else 1.0) for k in KINDS}
    errors = np.concatenate(bin_errors) if bin_errors else np.zeros(0)
    result["action_error_bins"] = float(errors.mean()) if errors.size else 0.0
    return result


def forced_agreement(bundle, observations: Sequence, reference: Sequence) -> float:
    """Share of the reference answers' choices the bundle makes the same when fed those answers."""
    same = total = 0
    for (prompt, inputs), ref in zip(observations, reference, strict=True):
        chosen = ref.token_ids[np.array([k is not None for k in ref.kinds], dtype=bool)]
        picked = bundle.forced_choices(prompt, inputs, ref)
        same += int(np.count_nonzero(picked == chosen))
        total += len(chosen)
    return same / total if total else 1.0


def stage_bytes(bundle) -> dict[str, int]:
    files = bundle.manifest.files
    return {name: sum(files[f].bytes for f in spec.files()) for name, spec in bundle.manifest.stages.items()}


def compare_bundles(reference: str | Path, others: Sequence[str | Path], n_frames: int = 4, seed: int = 0,
                    threads: int | None = None, decode_steps: int = 32, rate_rounds: int = 3) -> list[dict[str, Any]]:
    """One row for the reference (fp32) bundle, then one per other bundle, with the ROW_FIELDS."""
    from edgeact.export.quant_decode import OrtBundle
    from edgeact.runtime.bundle import load_bundle

    runners = [OrtBundle(load_bundle(path, allow_failed_verification=True), threads=threads)
               for path in (reference, *others)]
    ref = runners[0]
    observations = held_out_observations(ref.io, n_frames, seed)
    ref_answers = [ref.decode(p, inputs) for p, inputs in observations]
    scores = [{f"agreement_{k}": 1.0 for k in KINDS} | {"action_error_bins": 0.0, "agreement_forced": 1.0}]
    for other in runners[1:]:
        answers = [other.decode(p, inputs) for p, inputs in observations]
        scores.append(agreement(ref_answers, answers, ref.io.layout.base_vocab_size)
                      | {"agreement_forced": forced_agreement(other, observations, ref_answers)})
    past = int(np.mean([len(p) for p, _ in observations])) + _HALF_ANSWER_TOKENS if observations else 256
    rates = decode_rates(runners, past, decode_steps, rate_rounds)
    ref_total = sum(stage_bytes(ref.bundle).values())
    return [_row(r, stage_bytes(r.bundle), ref_total, rate, rates[0], n_frames, score)
            for r, rate, score in zip(runners, rates, scores)]


def decode_rates(runners: Sequence, past: int, steps: int, rounds: int) -> list[float]:
    """Steps/s of each runner, measured round-robin and the best round kept: on a shared CPU a
    neighbour's burst slows one measurement, never speeds one up, so the best is the least disturbed."""
    best = [0.0] * len(runners)
    for _ in range(max(rounds, 1)):
        for i, runner in enumerate(runners):
            best[i] = max(best[i], runner.decode_steps_per_s(past, steps))
    return best


def _row(bundle, sizes: dict[str, int], ref_total: int, rate: float, ref_rate: float, n_frames: int,
         scores: dict[str, float]) -> dict[str, Any]:
    m = bundle.bundle.manifest
    precisions = sorted({s.precision for s in m.stages.values()} - {"fp32"}) or ["fp32"]
    total = sum(sizes.values())
    fused = is_fused(m.stages[stage_io.DECODER_STAGE])
    return {"bundle": str(bundle.bundle.root), "precision": "+".join(precisions),
            "recipe": m.quantization.recipe if m.quantization else "none", "stage_bytes": sizes,
            "decoder": stage_io.FUSED_ATTENTION if fused else stage_io.PORTABLE_ATTENTION,
            "size_ratio": round(total / ref_total, 4) if ref_total else 1.0,
            **{k: round(v, 4) for k, v in scores.items()},
            "decode_tokens_s": round(rate, 1), "decode_ratio": round(rate / ref_rate, 3) if ref_rate else 1.0,
            "frames": n_frames}


def report_table(rows: Sequence[dict[str, Any]], title: str = "quantization report"):
    """A rich Table of report rows, side by side; ratios are against the first (fp32) row."""
    from rich.table import Table

    table = Table(title=title)
    for name, justify in (("precision", "left"), ("recipe", "left"), ("stages MB", "right"), ("size", "right"),
                          ("depth agree", "right"), ("trace agree", "right"), ("action agree", "right"),
                          ("action err (bins)", "right"), ("forced agree", "right"), ("decode tok/s", "right"),
                          ("speed", "right")):
        table.add_column(name, justify=justify)
    for row in rows:
        # A recipe quantized from the other form of the decoder (fp8 for TensorRT: the portable one) says so.
        recipe = row["recipe"] if row["decoder"] == rows[0]["decoder"] else f"{row['recipe']} ({row['decoder']})"
        table.add_row(row["precision"], recipe, f"{sum(row['stage_bytes'].values()) / 1e6:.2f}",
                      f"{row['size_ratio']:.2f}x", f"{row['agreement_depth']:.1%}", f"{row['agreement_trace']:.1%}",
                      f"{row['agreement_action']:.1%}", f"{row['action_error_bins']:.2f}", f"{row['agreement_forced']:.1%}",
                      f"{row['decode_tokens_s']:.1f}", f"{row['decode_ratio']:.2f}x")
    return table


def print_report(rows: Sequence[dict[str, Any]], console=None, title: str = "quantization report") -> None:
    from rich.console import Console

    (console or Console()).print(report_table(rows, title))
