"""Synthetic checkpoints: per-variant architecture flags, sizes, vocabulary, seeded weights and statistics."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from edgeact.export.checkpoint import validate_norm_stats
from edgeact.export.synthetic import (
    NORM_STATS_KEY,
    SIZES,
    SyntheticSize,
    count_parameters,
    synthetic_config,
    synthetic_norm_stats,
    synthetic_preprocess_config,
    synthetic_tensors,
    synthetic_tokenizer,
)
from edgeact.export.tensor_names import expected_tensor_shapes
from edgeact.runtime.errors import ConfigError
from edgeact.runtime.token_layout import TokenLayout


def test_variant_d_is_siglip2_and_qwen2_like():
    cfg = synthetic_config("D", "tiny")
    v, a, l = cfg.vit_config, cfg.adapter_config, cfg.llm_config
    assert cfg.variant == "D"
    assert (v.hidden_act, v.patch_bias, v.use_cls_token, v.pre_layernorm) == ("gelu_pytorch_tanh", True, False, False)
    assert v.image_num_pos == math.prod(v.patches_per_side)
    assert (l.qkv_bias, l.use_qk_norm, l.norm_after, l.rope_theta) == (True, False, False, 1e6)
    assert l.num_key_value_heads < l.num_attention_heads  # grouped-query attention
    assert a.image_padding_embed is None and a.vit_layers == [-2, -3]


def test_variant_o_is_clip_and_olmo2_like():
    cfg = synthetic_config("O", "tiny")
    v, a, l = cfg.vit_config, cfg.adapter_config, cfg.llm_config
    assert cfg.variant == "O"
    assert (v.hidden_act, v.patch_bias, v.use_cls_token, v.pre_layernorm) == ("quick_gelu", False, True, True)
    assert v.image_num_pos == math.prod(v.patches_per_side) + 1  # the CLS position
    assert (l.qkv_bias, l.use_qk_norm, l.norm_after) == (False, True, True)
    assert l.num_key_value_heads == l.num_attention_heads
    assert a.image_padding_embed == "pad_and_partial_pad"
    names = expected_tensor_shapes(cfg)
    assert "model.vision_backbone.pad_embed" in names and "model.vision_backbone.image_vit.class_embedding" in names


@pytest.mark.parametrize("variant", ["D", "O"])
def test_vocabulary_comes_from_the_tokenizer(variant):
    tok = synthetic_tokenizer()
    layout = TokenLayout.from_tokenizer(tok)
    cfg = synthetic_config(variant, "tiny")
    l = cfg.llm_config
    vb = layout.base_vocab_size
    assert l.vocab_size == math.ceil((vb + 131) / 128) * 128
    assert tok.token_to_id("<DEPTH_127>") == vb + 130 < l.vocab_size
    assert cfg.image_patch_id == layout.im_patch_id == l.vocab_size + 2
    assert tok.token_to_id("<im_low>") < l.vocab_size + l.additional_vocab_size


@pytest.mark.parametrize("variant", ["D", "O"])
def test_sizes_grow_and_bench_is_100_to_300_million_parameters(variant):
    params = {size: count_parameters(synthetic_config(variant, size)) for size in SIZES}
    assert params["tiny"] < 1_000_000 < params["small"] < 10_000_000 < params["bench"]
    assert 100_000_000 <= params["bench"] <= 300_000_000
    bench = synthetic_config(variant, "bench")
    assert bench.vit_config.image_default_input_size == ([336, 336] if variant == "O" else [378, 378])
    assert bench.adapter_config.vit_layers == ([-2, -9] if variant == "O" else [-3, -9])


@pytest.mark.parametrize("variant", ["D", "O"])
@pytest.mark.parametrize("size", list(SIZES))
def test_every_size_has_an_odd_patch_grid_and_a_fitting_preprocessor(variant, size):
    # An odd grid (like the real 27x27) keeps the 2x2 pooling's padding path in every test.
    cfg = synthetic_config(variant, size)
    rows, cols = cfg.vit_config.patches_per_side
    assert rows == cols and (rows % 2 == 1 or variant == "O" and size == "bench")
    synthetic_preprocess_config(cfg).check(cfg)


def test_unknown_variant_or_size():
    with pytest.raises(ConfigError, match="variant 'X' unknown; use one of D, O"):
        synthetic_config("X", "tiny")
    with pytest.raises(ConfigError, match="size 'huge' unknown; use one of tiny, small, bench"):
        synthetic_config("D", "huge")
    with pytest.raises(ConfigError, match="vit_layers"):
        SyntheticSize(**{**SIZES["tiny"].__dict__, "vit_layers_d": (-1, -7)})


def test_weights_are_seeded_and_shaped():
    cfg = synthetic_config("D", "tiny")
    a, b, c = synthetic_tensors(cfg, 1), synthetic_tensors(cfg, 1), synthetic_tensors(cfg, 2)
    assert {k: tuple(t.shape) for k, t in a.items()} == expected_tensor_shapes(cfg)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not any(torch.equal(a[k], c[k]) for k in a)
    norm = a["model.transformer.blocks.0.attn_norm.weight"]
    assert 0.8 < float(norm.min()) and float(norm.max()) < 1.2 and not torch.all(norm == 1)
    assert float(a["model.transformer.blocks.0.self_attn.att_proj.bias"].abs().max()) > 0
    assert synthetic_tensors(cfg, 1, torch.bfloat16)["lm_head.weight"].dtype == torch.bfloat16


@pytest.mark.parametrize("variant", ["D", "O"])
@pytest.mark.parametrize("size", ["tiny", "small"])
def test_activations_stay_finite_in_fp16(variant, size):
    from edgeact.export.model import MolmoActModel
    from edgeact.runtime.preprocess import ImagePreprocessor

    cfg = synthetic_config(variant, size)
    model = MolmoActModel(cfg).eval()
    model.load_state_dict(synthetic_tensors(cfg, 0), strict=True)
    rgb = np.random.default_rng(1).integers(0, 256, size=(60, 80, 3), dtype=np.uint8)
    inputs = ImagePreprocessor(cfg, synthetic_preprocess_config(cfg))(rgb)
    n_real = int((inputs.pooled_patches_idx >= 0).any(-1).sum())
    ids = torch.tensor([cfg.image_patch_id] * n_real + list(range(100, 140)))
    args = (torch.tensor(inputs.images), torch.tensor(inputs.image_masks), torch.tensor(inputs.pooled_patches_idx))
    with torch.inference_mode():
        ref = model(ids, *args)[0]
        half = model.half()(ids, args[0].half(), args[1].half(), args[2])[0].float()
    assert torch.isfinite(half).all()
    # Logits spread out (attention is not uniform), and fp16 tracks fp32 closely.
    assert float(ref.std()) > 0.3
    assert float((half - ref).abs().max()) < 0.05 * float(ref.abs().max())


def test_norm_stats_are_valid_with_the_gripper_left_normalized():
    stats = synthetic_norm_stats()
    validate_norm_stats(stats)
    action = stats[NORM_STATS_KEY]["action"]
    assert set(action) >= {"q01", "q99", "mask", "mean", "std", "min", "max"}
    assert all(len(v) == 7 for v in action.values())
    assert action["mask"] == [True] * 6 + [False]
    assert all(lo < hi for lo, hi in zip(action["q01"], action["q99"]))


@pytest.mark.parametrize("seed", [2 ** 64, 2 ** 63, -1])
def test_a_seed_the_generators_do_not_take_is_refused_with_the_range(tmp_path, seed):
    from edgeact.export.synthetic import make_checkpoint

    with pytest.raises(ConfigError, match=rf"seed {seed}: a seed is a whole number from 0 to 2\*\*63 - 1"):
        make_checkpoint("D", "tiny", seed, tmp_path / "ck")
    assert not (tmp_path / "ck").exists()
