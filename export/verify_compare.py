"""One held-out observation through a bundle's onnxruntime stages and through the PyTorch reference, stage by stage.

Each stage is fed the reference's own inputs, so an error is charged to the stage that makes
it: vision (the ViT, crop by crop as the runtime runs it) on the preprocessed frame; the
connector on the reference's patch features; the decoder on the reference's prompt embeddings (prefill
with an empty past), on single-token steps after that past, and on the whole reference answer
as one multi-token chunk after it. Logits come from the bundle's `lm_head` array. Token
agreement is measured twice: teacher-forced (the bundle's masked argmax at every choice of the
reference answer) and free-running (grammar-masked greedy decoding end to end, ORT vision and
numpy embedding included, against the reference's `generate_greedy`), per choice kind.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from edgeact.export.generate import generate_greedy
from edgeact.export.model import MolmoActModel
from edgeact.runtime import stage_io
from edgeact.runtime.grammar import AnswerGrammar
from edgeact.runtime.grammar_walk import Choice, MaskedGreedyConstraint, answer_steps, longest_answer
from edgeact.runtime.ort_stages import OrtStages
from edgeact.runtime.prompt import build_prompt_ids

CHOICE_KINDS = ("depth", "trace", "action")
DECODE_STEPS = 8     # single-token decoder calls compared per observation
LOGIT_ROWS = 16      # positions whose full-vocabulary logits are compared (a 152k-row head is costly)


@dataclass(frozen=True)
class Closeness:
    """How close two tensors are: the worst cosine over rows (last axis), the largest absolute error, and the
    relative error of the tensor's length (|len(got) / len(want) - 1|): a cosine is blind to scale, and a stage whose
    output is 3x too long has cosine 1 while the softmax that median action decoding reads is sharper."""
    cosine: float
    max_abs_err: float
    norm_err: float = 0.0

    def worst(self, other: "Closeness") -> "Closeness":
        # min/max that let a NaN through: a NaN must fail its gate, not vanish.
        cos = self.cosine if math.isnan(self.cosine) or self.cosine <= other.cosine else other.cosine
        return Closeness(cos, _larger(self.max_abs_err, other.max_abs_err), _larger(self.norm_err, other.norm_err))


def _larger(a: float, b: float) -> float:
    return a if math.isnan(a) or a >= b else b


@dataclass(frozen=True)
class Agreement:
    """Positions where the bundle chose the reference's token, out of the positions compared."""
    matches: int
    total: int

    def __add__(self, other: "Agreement") -> "Agreement":
        return Agreement(self.matches + other.matches, self.total + other.total)

    @property
    def fraction(self) -> float:
        return self.matches / self.total if self.total else 1.0


Measurement = Closeness | Agreement


def closeness(got: np.ndarray, want: np.ndarray) -> Closeness:
    a = np.asarray(got, dtype=np.float64).reshape(-1, np.shape(want)[-1])
    b = np.asarray(want, dtype=np.float64).reshape(-1, np.shape(want)[-1])
    norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    both_zero = (norms == 0) & np.all(a == b, axis=-1)
    cos = np.where(both_zero, 1.0, np.sum(a * b, axis=-1) / np.where(norms == 0, 1.0, norms))
    if cos.size == 0:
        return Closeness(1.0, 0.0)
    # The whole tensor's length, not a row's: quantization noise moves a short row's length by tens of percent
    # (measured: 39 % on one int8 connector row) while leaving the whole within a few percent.
    length_a, length_b = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    norm_err = abs(length_a / length_b - 1.0) if length_b > 0 else (0.0 if length_a == 0 else math.inf)
    return Closeness(float(np.min(cos)) if not np.isnan(cos).any() else math.nan, float(np.max(np.abs(a - b))),
                     norm_err)


def grammar_positions(grammar: AnswerGrammar, ids: Sequence[int]) -> list[tuple[np.ndarray | None, str | None]]:
    """For each answer token, (allowed ids, choice kind) where the grammar chose, (None, None) where it forced.

    Stops early where `ids` leave the grammar (a forced token differs, or a choice is not allowed).
    """
    steps = answer_steps(grammar)
    step = next(steps, None)
    out: list[tuple[np.ndarray | None, str | None]] = []
    pos = 0
    for token in ids:
        if step is None:
            break
        if isinstance(step, Choice):
            if token not in set(step.ids.tolist()):
                break
            out.append((step.ids, step.kind))
            try:
                step = steps.send(int(token))
            except StopIteration:
                step = None
            continue
        if token != step.ids[pos]:
            break
        out.append((None, None))
        pos += 1
        if pos == len(step.ids):
            step, pos = next(steps, None), 0
    return out


def compare_observation(model: MolmoActModel, stages: OrtStages, grammar: AnswerGrammar, tokenizer, layout,
                        preprocessor, rgb: np.ndarray, instruction: str) -> dict[str, Measurement]:
    """All measurements for one camera frame and instruction, keyed by what they measure."""
    inputs = preprocessor(rgb)
    prompt = build_prompt_ids(tokenizer, layout, instruction, inputs)
    images, masks, idx = (torch.from_numpy(np.array(a)) for a in (inputs.images, inputs.image_masks, inputs.pooled_patches_idx))
    out: dict[str, Measurement] = {}

    with torch.inference_mode():
        ref_patches = model.vision.patch_features(images, masks)
        ref_features = model.vision.connect(ref_patches, idx)
    ort_patches = stages.vision.patch_features(inputs.images, inputs.image_masks)
    out["vision"] = closeness(ort_patches, ref_patches.numpy())
    connector = stages.vision.connector
    out["connector"] = closeness(connector.run({stage_io.PATCH_FEATURES: ref_patches.numpy(),
                                                stage_io.POOLED_PATCHES_IDX: idx.numpy()})[stage_io.IMAGE_FEATURES],
                                 ref_features.numpy())
    # End to end (the bundle's ViT features into its connector) for the free-running answer.
    ort_features = connector.run({stage_io.PATCH_FEATURES: ort_patches,
                                  stage_io.POOLED_PATCHES_IDX: idx.numpy()})[stage_io.IMAGE_FEATURES]
    reference = generate_greedy(model, torch.from_numpy(prompt)[None], images, masks, idx,
                                max_new_tokens=longest_answer(grammar), eos_token_id=layout.bos_id,
                                allowed_token_fn=MaskedGreedyConstraint(grammar)).token_ids
    out.update(_decoder_measurements(model, stages, prompt, images, masks, idx, reference, grammar))

    greedy = stages.generate(prompt, None, None, inputs.pooled_patches_idx, image_features=ort_features,
                             max_new_tokens=longest_answer(grammar), eos_token_id=layout.bos_id,
                             allowed_token_fn=MaskedGreedyConstraint(grammar))
    out.update(_greedy_agreement(grammar, reference, greedy))
    return out


def _decoder_measurements(model, stages, prompt, images, masks, idx, reference: list[int],
                          grammar: AnswerGrammar) -> dict[str, Measurement]:
    n_prompt = len(prompt)
    # The last token is never fed back; the grammar makes every answer over 100 tokens long.
    answer = torch.tensor(reference[:-1], dtype=torch.long)[None]
    n_steps = min(DECODE_STEPS, answer.shape[1])
    with torch.inference_mode():
        embeds = model.embed_multimodal(torch.from_numpy(prompt)[None], images, masks, idx)
        hidden, cache = model.decoder(embeds, torch.arange(n_prompt)[None])
        answer_embeds = model.embed(answer)
        positions = torch.arange(n_prompt, n_prompt + answer.shape[1])[None]
        chunk_hidden, _ = model.decoder(answer_embeds, positions, cache)
        step_hidden, step_cache = [], cache
        for i in range(n_steps):
            h, step_cache = model.decoder(answer_embeds[:, i:i + 1], positions[:, i:i + 1], step_cache)
            step_hidden.append(h[0])
    answer_np = answer_embeds[0].numpy()

    stages.cache.reset()
    ort_hidden = stages.decode(embeds[0].numpy())
    out: dict[str, Measurement] = {"decoder.prefill": closeness(ort_hidden, hidden[0].numpy())}
    kv = Closeness(1.0, 0.0)
    for layer, (key, value) in enumerate(cache):
        kv = kv.worst(closeness(stages.cache.keys[layer, 0, :n_prompt], key[0].transpose(0, 1).numpy()))
        kv = kv.worst(closeness(stages.cache.values[layer, 0, :n_prompt], value[0].transpose(0, 1).numpy()))
    out["decoder.cache"] = kv
    ort_steps = [stages.decode(answer_np[i:i + 1])[0] for i in range(n_steps)]
    out["decoder.step"] = closeness(np.stack(ort_steps), torch.cat(step_hidden).numpy())
    stages.cache.rewind(n_prompt)           # the chunk goes right after the prompt
    ort_chunk = stages.decode(answer_np)
    out["decoder.chunk"] = closeness(ort_chunk, chunk_hidden[0].numpy())

    # Position i of the answer is predicted from the prompt's last state (i = 0) or chunk row i - 1.
    ort_states = np.concatenate([ort_hidden[-1:], ort_chunk])
    ref_states = torch.cat([hidden[0, -1:], chunk_hidden[0]])
    rows = np.unique(np.linspace(0, len(ort_states) - 1, min(LOGIT_ROWS, len(ort_states))).astype(np.int64))
    with torch.inference_mode():
        ref_logits = model.logits(ref_states[torch.from_numpy(rows)]).float().numpy()
    out["logits"] = closeness(stages.logits(ort_states[rows]), ref_logits)

    forced = Agreement(0, 0)
    for i, (allowed, kind) in enumerate(grammar_positions(grammar, reference)):
        if kind is not None:
            forced += Agreement(int(stages.pick(ort_states[i], allowed) == reference[i]), 1)
    out["tokens.forced"] = forced
    return out


def _greedy_agreement(grammar: AnswerGrammar, reference: list[int], greedy: list[int]) -> dict[str, Agreement]:
    def by_kind(ids: list[int]) -> dict[str, list[int]]:
        chosen: dict[str, list[int]] = {k: [] for k in CHOICE_KINDS}
        for token, (_, kind) in zip(ids, grammar_positions(grammar, ids)):
            if kind is not None:
                chosen[kind].append(token)
        return chosen

    ref, got = by_kind(reference), by_kind(greedy)
    # Position by position within each kind; a missing or extra token counts as a disagreement.
    return {f"tokens.greedy.{k}": Agreement(sum(a == b for a, b in zip(ref[k], got[k])), max(len(ref[k]), len(got[k])))
            for k in CHOICE_KINDS}
