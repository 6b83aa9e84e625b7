"""Reference greedy generation the MolmoAct way: one prefill, then one cached decode step per token.

This is the baseline every faster decoding scheme (the runtime's decode program, sliced LM
heads, forced depth codes) is measured against and must reproduce token for token.
Where the time goes: the prefill runs the ViT and the decoder over the whole prompt once;
each decode step runs the decoder over one token and reads the whole KV cache once.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from edgeact.export.model import MolmoActModel
from edgeact.export.model_inputs import ModelInputError, as_token_batch

# allowed_token_fn(step, generated) -> the ids the next token may take, or None for any.
AllowedTokenFn = Callable[[int, list[int]], "Sequence[int] | None"]


@dataclass(frozen=True)
class GenerationResult:
    token_ids: list[int]        # generated ids, the eos token included when it ended generation
    seconds_prefill: float      # vision + prompt prefill + first token
    seconds_decode: float       # all single-token decode steps
    n_decode_steps: int         # decoder calls after the prefill (= len(token_ids) - 1)


def masked_argmax(logits: torch.Tensor, allowed: Sequence[int] | None) -> int:
    """Greedy pick over a (vocab,) row, restricted to `allowed` when given.

    Ties go to the lowest id, as torch.argmax over the full row with the rest set to -inf
    would pick, whatever order `allowed` lists the ids in.
    """
    if allowed is None:
        return int(torch.argmax(logits))
    ids = torch.as_tensor(list(allowed), dtype=torch.long, device=logits.device)
    if ids.numel() == 0:
        raise ModelInputError("allowed_token_fn returned an empty set; return None to allow every token")
    if int(ids.min()) < 0 or int(ids.max()) >= logits.shape[-1]:
        raise ModelInputError(f"allowed ids span [{int(ids.min())}, {int(ids.max())}], outside the LM head's {logits.shape[-1]} rows")
    masked = torch.full_like(logits, float("-inf"))
    masked[ids] = logits[ids]
    return int(torch.argmax(masked))


def generate_greedy(
    model: MolmoActModel,
    input_ids: torch.Tensor | Sequence[int],
    images: torch.Tensor | None,
    image_masks: torch.Tensor | None,
    pooled_patches_idx: torch.Tensor | None,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int] | None = None,
    allowed_token_fn: AllowedTokenFn | None = None,
) -> GenerationResult:
    """Greedy decoding of one prompt with a KV cache; stops at eos or after max_new_tokens."""
    if max_new_tokens < 1:
        raise ModelInputError(f"max_new_tokens is {max_new_tokens}; ask for at least 1 token")
    stop_ids = set() if eos_token_id is None else ({eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id))
    with torch.inference_mode():
        ids = as_token_batch(input_ids, model.device)
        if ids.shape[0] != 1:
            raise ModelInputError(f"input_ids holds {ids.shape[0]} sequences; generate_greedy decodes one prompt")
        start = time.perf_counter()
        embeds = model.embed_multimodal(ids, images, image_masks, pooled_patches_idx)
        prompt_len = ids.shape[1]
        hidden, cache = model.decoder(embeds, torch.arange(prompt_len, device=model.device)[None])
        generated: list[int] = []
        token = masked_argmax(model.logits(hidden[0, -1]), _allowed(allowed_token_fn, 0, generated))
        generated.append(token)
        seconds_prefill = time.perf_counter() - start

        start = time.perf_counter()
        step_ids = torch.empty((1, 1), dtype=torch.long, device=model.device)
        step_pos = torch.empty((1, 1), dtype=torch.long, device=model.device)
        while token not in stop_ids and len(generated) < max_new_tokens:
            step_ids.fill_(token)
            step_pos.fill_(prompt_len + len(generated) - 1)
            hidden, cache = model.decoder(model.embed(step_ids), step_pos, cache)
            token = masked_argmax(model.logits(hidden[0, -1]), _allowed(allowed_token_fn, len(generated), generated))
            generated.append(token)
        seconds_decode = time.perf_counter() - start
    return GenerationResult(generated, seconds_prefill, seconds_decode, len(generated) - 1)


def _allowed(fn: AllowedTokenFn | None, step: int, generated: list[int]) -> Sequence[int] | None:
    # The callback gets a copy so it cannot change what was generated.
    return None if fn is None else fn(step, list(generated))


def forward_logits(
    model: MolmoActModel,
    input_ids: torch.Tensor | Sequence[int],
    images: torch.Tensor | None = None,
    image_masks: torch.Tensor | None = None,
    pooled_patches_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits of every position of one sequence in one uncached pass: (T, vocab_size) float32."""
    with torch.inference_mode():
        ids = as_token_batch(input_ids, model.device)
        if ids.shape[0] != 1:
            raise ModelInputError(f"input_ids holds {ids.shape[0]} sequences; forward_logits scores one")
        return model(ids, images, image_masks, pooled_patches_idx)[0].float()
