"""Reference greedy generation: cached decoding equals uncached greedy, masking, stopping."""
import pytest
import torch

from edgeact.export.generate import forward_logits, generate_greedy, masked_argmax
from edgeact.export.model_inputs import ModelInputError
from tests.export.conftest import tiny_images, tiny_model, tiny_prompt


def _setup(variant):
    model = tiny_model(variant)
    img = tiny_images(model.cfg)
    return model, img, tiny_prompt(img.n_tokens)


def _uncached_greedy(model, img, ids, n, allowed=None):
    """Greedy decoding by recomputing the whole sequence each step: slow, obviously right."""
    seq = ids.tolist()
    for step in range(n):
        row = forward_logits(model, seq, img.images, img.image_masks, img.pooled_patches_idx)[-1]
        seq.append(masked_argmax(row, None if allowed is None else allowed(step, seq[len(ids):])))
    return seq[len(ids):]


def test_cached_generation_equals_uncached_greedy(variant):
    model, img, ids = _setup(variant)
    result = generate_greedy(model, ids, img.images, img.image_masks, img.pooled_patches_idx, max_new_tokens=12)
    assert result.token_ids == _uncached_greedy(model, img, ids, 12)
    assert result.n_decode_steps == 11
    assert result.seconds_prefill > 0 and result.seconds_decode > 0


def test_forward_logits_scores_every_position_in_float32(variant):
    model, img, ids = _setup(variant)
    logits = forward_logits(model, ids, img.images, img.image_masks, img.pooled_patches_idx)
    assert logits.shape == (len(ids), 512) and logits.dtype == torch.float32


def test_masked_greedy_picks_only_allowed_tokens_and_matches_masked_full_model():
    model, img, ids = _setup("D")
    free = generate_greedy(model, ids, img.images, img.image_masks, img.pooled_patches_idx, max_new_tokens=6)
    banned = set(free.token_ids)
    # Alternate between two closed sets that exclude every token the free run chose.
    sets = [[t for t in range(0, 256) if t not in banned], [t for t in range(300, 400, 3) if t not in banned]]
    allowed = lambda step, generated: sets[step % 2]  # noqa: E731
    result = generate_greedy(model, ids, img.images, img.image_masks, img.pooled_patches_idx,
                             max_new_tokens=6, allowed_token_fn=allowed)
    assert all(t in sets[i % 2] for i, t in enumerate(result.token_ids))
    assert result.token_ids == _uncached_greedy(model, img, ids, 6, allowed)


def test_allowed_token_fn_sees_the_step_and_the_tokens_so_far():
    model, img, ids = _setup("O")
    calls = []
    result = generate_greedy(model, ids, img.images, img.image_masks, img.pooled_patches_idx, max_new_tokens=4,
                             allowed_token_fn=lambda step, generated: calls.append((step, generated)))
    assert calls == [(i, result.token_ids[:i]) for i in range(4)]


def test_masked_argmax_breaks_ties_towards_the_lowest_id_in_any_order():
    logits = torch.tensor([0.0, 3.0, 1.0, 3.0, 2.0])
    assert masked_argmax(logits, [3, 1]) == 1
    assert masked_argmax(logits, [4, 2, 0]) == 4
    with pytest.raises(ModelInputError, match="empty"):
        masked_argmax(logits, [])
    with pytest.raises(ModelInputError, match="outside"):
        masked_argmax(logits, [5])


def test_generation_stops_at_eos_and_keeps_it(variant):
    model, img, ids = _setup(variant)
    free = generate_greedy(model, ids, img.images, img.image_masks, img.pooled_patches_idx, max_new_tokens=16).token_ids
    # The first token that was not generated before it: stopping there proves the stop is at eos.
    stop_at = next((i for i, t in enumerate(free) if i >= 1 and t not in free[:i]), None)
    assert stop_at is not None, f"tiny model repeats one token {free}; pick another seed"
    result = generate_greedy(model, ids, img.images, img.image_masks, img.pooled_patches_idx,
                             max_new_tokens=16, eos_token_id=free[stop_at])
    assert result.token_ids == free[:stop_at + 1]
    assert result.n_decode_steps == stop_at


def test_text_only_generation_and_max_new_tokens_limit():
    model = tiny_model("D")
    result = generate_greedy(model, [500, 3, 4, 5], None, None, None, max_new_tokens=3)
    assert len(result.token_ids) == 3 and result.n_decode_steps == 2
    with pytest.raises(ModelInputError, match="at least 1"):
        generate_greedy(model, [500, 3], None, None, None, max_new_tokens=0)
