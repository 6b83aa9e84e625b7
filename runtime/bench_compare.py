"""`edgeact bench-compare A B ...`: bundles side by side in one process, interleaved round by round.

For comparing exports of one model on the machine that runs them: attention forms, int8 modes, a
change to the graphs. Separate runs cannot show a change of a few percent on a shared host or on a
GPU whose host drives every kernel launch: on one H100, the PyTorch reference of four back-to-back
`bench-policy` runs moved by a third. Here every round measures every bundle, in alternating order,
and each figure is reported with its ratio to the first bundle's.

Per bundle: single-token decode steps per second at a fixed context (`decode_rate`, the decode
program's per-choice step), then whole policy steps (frame -> actions) on held-out synthetic-camera
frames, once decoding depth and once with depth forced to the codes the first bundle decoded for that
frame, so every bundle gets the same codes. Runtime only: no torch, no reference model.
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgeact.runtime.errors import ConfigError

JSON_NAME = "bench-compare.json"
DEVICES = ("cpu", "cuda", "tensorrt")
HALF_ANSWER_TOKENS = 100          # decode rate is measured at prompt + half an answer of context
WARMUP_TRACE = ((128, 128),)      # warm-up steps force depth and trace: a handful of decoder calls


@dataclass(frozen=True)
class CompareOptions:
    device: str = "cpu"              # onnxruntime provider: cpu, cuda, tensorrt
    threads: int | None = None       # onnxruntime intra-op threads (None: every core)
    rounds: int = 6                  # decode-rate rounds; policy steps run policy_rounds
    decode_steps: int = 60           # timed single-token steps per bundle and round
    past: int | None = None          # context of the decode rate; None: the first frame's prompt + 100
    frames: int = 2                  # timed frames per policy round (one more warms up)
    seed: int = 0
    frame_px: tuple[int, int] = (640, 480)

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ConfigError(f"device {self.device!r} unknown; use one of {', '.join(DEVICES)}")
        for name in ("rounds", "decode_steps", "frames"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} is {getattr(self, name)}; use a positive number")
        if self.past is not None and self.past < 0:
            raise ConfigError(f"past is {self.past}; use 0 or more positions of context")

    @property
    def policy_rounds(self) -> int:
        """Rounds of whole policy steps: half the decode rounds (a policy step costs many decode steps), at least 1."""
        return max(1, self.rounds // 2)


def check_past(past: int, max_seq: int, where: str = "") -> None:
    """A decode context the KV cache holds (a clamped one would be reported as the one asked for)."""
    if not 0 <= past < max_seq:
        raise ConfigError(f"--past {past}: the bundle's KV cache holds {max_seq} positions{where}; time the decode "
                          f"at 0..{max_seq - 1} positions of context")


def decode_rate(policy, past: int, steps: int, warmup: int = 4) -> float:
    """Single-token decode steps per second of the policy's decoder at `past` positions of context.

    Each step is the decode program's per-choice step: one position through the decoder engine
    (I/O binding, cache in place) and the LM head sliced to the action bins. The cache is rewound
    to `past` before every step, so the context stays what it is and nothing else is timed.
    """
    from edgeact.runtime.grammar import Actions

    decoder, program = policy.decoder, policy.program
    ids = np.array(sorted(next(s for s in policy.grammar.segments if isinstance(s, Actions)).action_ids))
    head = np.ascontiguousarray(program.lm_head[ids], dtype=np.float32)
    logits = np.empty(len(ids), np.float32)
    check_past(past, decoder.layout.max_seq)
    while decoder.length < past:        # normally the last answer's context is there already; else fill it
        decoder.step(min(decoder.max_chunk, past - decoder.length))
    decoder.cache.rewind(past)
    np.copyto(decoder.embeds[0], program.embedding[policy.layout.bos_id])
    start = 0.0
    for k in range(warmup + steps):
        if k == warmup:
            start = time.perf_counter()
        decoder.cache.rewind(past)
        np.matmul(head, decoder.step(1), out=logits)
        int(np.argmax(logits))
    return steps / (time.perf_counter() - start)


def warm_up(policy, rgb: np.ndarray, instruction: str) -> None:
    """One untimed policy step with depth and trace forced (a handful of decoder calls): the policy's buffers are
    allocated and the frame's shapes met before anything is timed."""
    from edgeact.runtime.grammar import DepthCodes

    n_codes = next(s for s in policy.grammar.segments if isinstance(s, DepthCodes)).n
    policy.infer(rgb, instruction, depth_codes=np.zeros(n_codes, np.int64), trace=WARMUP_TRACE)


def held_out_frames(n: int, seed: int, frame_px: tuple[int, int]) -> list[tuple[np.ndarray, str]]:
    """n (RGB, instruction): seeded synthetic-camera views that no calibration set uses; benches warm up on the first."""
    from edgeact.calibration.calibration_build import DEFAULT_INSTRUCTIONS, synthetic_frames

    views = synthetic_frames(n, seed, *frame_px, held_out=True)
    return [(rgb, DEFAULT_INSTRUCTIONS[i % len(DEFAULT_INSTRUCTIONS)]) for i, (_, rgb, _) in enumerate(views)]


def labels_for(paths: list[Path]) -> list[str]:
    """Each bundle's folder name; where two share it, the parent folder too (`a/fp32`, `b/fp32`), and where
    those are equal as well, the position (`fp32 (2)`)."""
    names = [p.name or str(p) for p in paths]
    names = [str(Path(p.parent.name) / n) if names.count(n) > 1 and p.parent.name else n
             for p, n in zip(paths, names)]
    return [f"{n} ({i + 1})" if names.count(n) > 1 else n for i, n in enumerate(names)]


def orders(labels: list[str], rounds: int) -> list[list[str]]:
    """The bundles' order in each round: as given, then reversed, alternating, so none always runs first."""
    return [list(labels) if r % 2 == 0 else list(reversed(labels)) for r in range(rounds)]


def compare_bundles(paths: list[str | Path], options: CompareOptions = CompareOptions(),
                    on_step: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure every bundle round by round (see the module doc); the report, as written to JSON."""
    from edgeact.runtime.bundle_policy import BundlePolicy

    if not paths:
        raise ConfigError("no bundles to compare; name one or more bundle directories")
    step = on_step or (lambda name: None)
    paths = [Path(p) for p in paths]
    labels = labels_for(paths)
    backend = {"provider": options.device} if options.device != "cpu" else None
    policies = {label: BundlePolicy(path, threads=options.threads, allow_unverified=True, verify_checksums=False,
                                    backend_options=backend) for label, path in zip(labels, paths)}
    step("load")
    if options.past is not None:        # before any round (decode_rate refuses it too, but after the warm-ups)
        for label, policy in policies.items():
            check_past(options.past, policy.decoder.layout.max_seq, f" ({label})")
    frames = held_out_frames(options.frames + 1, options.seed, options.frame_px)
    warm_rgb, warm_instruction = frames.pop(0)
    for policy in policies.values():
        warm_up(policy, warm_rgb, warm_instruction)
    first = policies[labels[0]]
    # The forced codes: what the first bundle decodes for each frame (untimed), the same for every bundle.
    decoded = [first.infer(rgb, instruction) for rgb, instruction in frames]
    codes = [d.depth_codes for d in decoded]
    past = options.past if options.past is not None else decoded[0].prompt_tokens + HALF_ANSWER_TOKENS
    step("warm-up")

    rates: dict[str, list[float]] = {label: [] for label in labels}
    for order in orders(labels, options.rounds):
        for label in order:
            rates[label].append(decode_rate(policies[label], past, options.decode_steps))
        step("decode round")
    steps: dict[str, dict[str, list]] = {label: {"free_s": [], "forced_s": [], "decode_steps": []} for label in labels}
    for order in orders(labels, options.policy_rounds):
        for (rgb, instruction), forced in zip(frames, codes):
            for label in order:
                start = time.perf_counter()
                result = policies[label].infer(rgb, instruction)
                steps[label]["free_s"].append(time.perf_counter() - start)
                steps[label]["decode_steps"].append(result.decode_steps)
                start = time.perf_counter()
                policies[label].infer(rgb, instruction, depth_codes=forced)
                steps[label]["forced_s"].append(time.perf_counter() - start)
        step("policy round")
    return _report(paths, labels, rates, steps, past, options)


def _report(paths: list[Path], labels: list[str], rates: dict, steps: dict, past: int,
            options: CompareOptions) -> dict[str, Any]:
    rows = []
    for label, path in zip(labels, paths):
        s = steps[label]
        rows.append({"bundle": label, "path": str(path), "decode_steps_per_s": statistics.median(rates[label]),
                     "decode_rates": rates[label], "policy_step_s": statistics.median(s["free_s"]),
                     "forced_depth_step_s": statistics.median(s["forced_s"]),
                     "decode_steps": statistics.median(s["decode_steps"]),
                     "policy_steps_s": s["free_s"], "forced_depth_steps_s": s["forced_s"],
                     "decode_steps_per_answer": s["decode_steps"]})
    base = rows[0]
    for row in rows:      # > 1: faster than the first bundle
        row["decode_vs_first"] = row["decode_steps_per_s"] / base["decode_steps_per_s"]
        row["policy_vs_first"] = base["policy_step_s"] / row["policy_step_s"]
        row["forced_vs_first"] = base["forced_depth_step_s"] / row["forced_depth_step_s"]
    return {"options": {**asdict(options), "policy_rounds": options.policy_rounds}, "decode_context_tokens": past,
            "bundles": rows}


def write_report(report: dict[str, Any], out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / JSON_NAME
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path
