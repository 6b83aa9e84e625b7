"""The decoder: block semantics of both variants, GQA, RoPE, and the KV cache against full passes."""
import math

import torch
import torch.nn.functional as F

from edgeact.export.decoder import causal_mask
from edgeact.export.model import MolmoActModel
from tests.export.conftest import tiny_config, tiny_model


def _rms(x, w, eps=1e-6):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _block_by_hand(block, x, cfg):
    """One decoder block written out from the MolmoAct description, for an uncached sequence."""
    H, K, h = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    T = x.shape[1]
    attn = block.self_attn

    def attention(inp):
        qkv = inp @ attn.att_proj.weight.T + (attn.att_proj.bias if cfg.qkv_bias else 0)
        q, k, v = qkv.split([H * h, K * h, K * h], -1)
        if cfg.use_qk_norm:
            q, k = _rms(q, attn.q_norm.weight), _rms(k, attn.k_norm.weight)
        q, k, v = (t.view(1, T, -1, h).transpose(1, 2) for t in (q, k, v))
        inv = 1.0 / cfg.rope_theta ** (torch.arange(0, h, 2).float() / h)
        ang = torch.arange(T).float()[:, None] * inv
        cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
        rot = lambda t: t * cos + torch.cat([-t[..., h // 2:], t[..., : h // 2]], -1) * sin  # noqa: E731
        q, k = rot(q), rot(k)
        k, v = k.repeat_interleave(H // K, 1), v.repeat_interleave(H // K, 1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(h) + torch.triu(torch.full((T, T), float("-inf")), 1)
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(1, T, H * h)
        return out @ attn.attn_out.weight.T

    def mlp(inp):
        up, gate = (inp @ block.mlp.ff_proj.weight.T).chunk(2, -1)
        return (F.silu(gate) * up) @ block.mlp.ff_out.weight.T

    if cfg.norm_after:
        x = x + _rms(attention(x), block.attn_norm.weight)
        return x + _rms(mlp(x), block.ff_norm.weight)
    x = x + attention(_rms(x, block.attn_norm.weight))
    return x + mlp(_rms(x, block.ff_norm.weight))


def test_decoder_matches_the_block_written_out_by_hand(variant):
    model = tiny_model(variant)
    cfg = model.cfg.llm_config
    x = torch.randn(1, 7, 64)
    with torch.no_grad():
        hidden, _ = model.decoder(x, torch.arange(7)[None])
        y = x
        for block in model.decoder.blocks:
            y = _block_by_hand(block, y, cfg)
        expected = _rms(y, model.decoder.ln_f.weight)
    assert torch.allclose(hidden, expected, atol=1e-5)


def test_grouped_kv_heads_equal_repeated_kv_heads():
    gqa = tiny_model("D")  # 4 query heads share 2 KV heads
    cfg = tiny_config("D")
    cfg.llm_config.num_key_value_heads = 4
    mha = MolmoActModel(cfg).eval()
    h, H, K = 16, 4, 2
    state = gqa.state_dict()
    for n in range(2):
        for suffix in ("weight", "bias"):
            name = f"model.transformer.blocks.{n}.self_attn.att_proj.{suffix}"
            q, k, v = state[name].split([H * h, K * h, K * h])
            rep = lambda t: t.reshape(K, h, *t.shape[1:]).repeat_interleave(H // K, 0).reshape(H * h, *t.shape[1:])  # noqa: E731
            state[name] = torch.cat([q, rep(k), rep(v)])
    mha.load_state_dict(state, strict=True)
    ids = torch.tensor([[5, 9, 300, 2, 77, 520]])
    with torch.no_grad():
        assert torch.allclose(gqa(ids), mha(ids), atol=1e-5)


def test_a_causal_mask_applies_as_the_same_mask_broadcast_over_the_query_groups():
    """grouped_attention repeats a (Tq, Tk) mask along its merged (group x query) axis; that must mask exactly
    what the same mask broadcast to (B, K, G, Tq, Tk) masks (the 5-D path other callers take)."""
    from edgeact.export.decoder import causal_mask
    from edgeact.export.model_layers import grouped_attention

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 6, 3, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)   # 3 groups of 2 KV heads
    mask = causal_mask(3, 4, q.device)
    out = grouped_attention(q, k, v, mask, False)
    assert torch.equal(out, grouped_attention(q, k, v, mask[None, None, None].expand(2, 2, 3, 3, 7), False))
    assert not torch.equal(out, grouped_attention(q, k, v, None, False))


def test_rope_makes_attention_depend_on_relative_positions_only(variant):
    model = tiny_model(variant)
    x = torch.randn(1, 6, 64)
    with torch.no_grad():
        at_zero, _ = model.decoder(x, torch.arange(6)[None])
        shifted, _ = model.decoder(x, torch.arange(6)[None] + 37)
        scrambled, _ = model.decoder(x, torch.tensor([[0, 2, 1, 3, 4, 5]]))
    assert torch.allclose(at_zero, shifted, atol=1e-4)
    assert not torch.allclose(at_zero[:, 2:], scrambled[:, 2:], atol=1e-3)


def test_causal_mask_lets_each_chunk_token_see_the_past_and_earlier_chunk_tokens():
    assert causal_mask(2, 3, torch.device("cpu")).tolist() == [
        [True, True, True, True, False],
        [True, True, True, True, True],
    ]


def test_cached_steps_reproduce_the_full_pass(variant):
    model = tiny_model(variant)
    ids = torch.tensor([[500, 3, 88, 520, 41, 7, 300, 12, 9, 260]])
    prefix = 4
    with torch.no_grad():
        full = model(ids)[0]
        hidden, cache = model.decoder(model.embed(ids[:, :prefix]), torch.arange(prefix)[None])
        assert torch.allclose(model.logits(hidden)[0], full[:prefix], atol=1e-5)
        for t in range(prefix, ids.shape[1]):
            hidden, cache = model.decoder(model.embed(ids[:, t:t + 1]), torch.tensor([[t]]), cache)
            assert torch.allclose(model.logits(hidden)[0, 0], full[t], atol=1e-5), t
    assert cache[0][0].shape == (1, model.cfg.llm_config.num_key_value_heads, ids.shape[1], 16)


def test_two_prefill_chunks_equal_one(variant):
    model = tiny_model(variant)
    x = torch.randn(1, 9, 64)
    pos = torch.arange(9)[None]
    with torch.no_grad():
        whole, whole_cache = model.decoder(x, pos)
        first, cache = model.decoder(x[:, :5], pos[:, :5])
        second, cache = model.decoder(x[:, 5:], pos[:, 5:], cache)
    assert torch.allclose(torch.cat([first, second], 1), whole, atol=1e-5)
    for (k, v), (k_ref, v_ref) in zip(cache, whole_cache):
        assert torch.allclose(k, k_ref, atol=1e-5) and torch.allclose(v, v_ref, atol=1e-5)


def test_training_mode_attention_equals_the_eval_path_in_values_and_gradients(variant):
    """Training runs torch's fused causal kernel (no past), eval the reference's grouped_attention: same numbers."""
    model = tiny_model(variant)
    x = torch.randn(2, 9, 64)
    positions = torch.arange(9)[None].expand(2, 9)
    results = []
    for training in (True, False):
        model.decoder.train(training)
        inputs = x.clone().requires_grad_(True)
        hidden, present = model.decoder(inputs, positions)
        hidden.square().sum().backward()
        grad_w = model.decoder.blocks[0].self_attn.att_proj.weight.grad.clone()
        model.zero_grad()
        results.append((hidden.detach(), inputs.grad, grad_w, present[-1][0].detach()))
    (h_train, gx_train, gw_train, k_train), (h_eval, gx_eval, gw_eval, k_eval) = results
    assert torch.allclose(h_train, h_eval, atol=1e-5)
    assert torch.allclose(gx_train, gx_eval, atol=1e-4)
    assert torch.allclose(gw_train, gw_eval, atol=1e-4)
    assert k_train.shape == k_eval.shape and torch.allclose(k_train, k_eval, atol=1e-5)  # the chunk's keys either way
    # The fused path really ran: in training mode grouped_attention is never called for a fresh sequence.
    import edgeact.export.decoder as decoder_module
    called = []
    original = decoder_module.grouped_attention
    decoder_module.grouped_attention = lambda *a, **k: called.append(1) or original(*a, **k)
    try:
        model.decoder.train(True)
        model.decoder(x, positions)
        assert not called
        model.decoder.train(False)
        model.decoder(x, positions)
        assert called
    finally:
        decoder_module.grouped_attention = original
