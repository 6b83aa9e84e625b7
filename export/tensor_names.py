"""Every tensor a MolmoAct checkpoint holds, with its shape, derived from the config alone.

This table is the contract between the PyTorch reference (its `state_dict()` must match it
exactly), the checkpoint writer, and the loader's missing / unexpected / shape checks.

The ViT blocks deeper than the last layer the connector reads never run, and MolmoAct's own code
builds and saves only the blocks up to that layer (25 of SigLIP2's 27 for -D, [-3, -9]), while
config.json keeps the full depth. The table lists those blocks only; `unused_vit_blocks=True`
adds the deeper ones, which a checkpoint may also hold (they are then ignored).
"""
from __future__ import annotations

from edgeact.runtime.arm_config import ArmConfig

VIT = "model.vision_backbone.image_vit."
ADAPTER = "model.vision_backbone."
LLM = "model.transformer."


def vit_blocks_run(cfg: ArmConfig) -> int:
    """ViT blocks up to the deepest layer the connector reads (negative layers count from the end)."""
    n = cfg.vit_config.num_hidden_layers
    return max(lay + n if lay < 0 else lay for lay in cfg.adapter_config.vit_layers) + 1


def expected_tensor_shapes(cfg: ArmConfig, unused_vit_blocks: bool = False) -> dict[str, tuple[int, ...]]:
    v, a, l = cfg.vit_config, cfg.adapter_config, cfg.llm_config
    shapes: dict[str, tuple[int, ...]] = {}

    # Vision transformer.
    V = v.hidden_size
    shapes[VIT + "patch_embedding.weight"] = (V, v.patch_dim)
    if v.patch_bias:
        shapes[VIT + "patch_embedding.bias"] = (V,)
    shapes[VIT + "positional_embedding"] = (v.image_num_pos, V)
    if v.use_cls_token:
        shapes[VIT + "class_embedding"] = (V,)
    if v.pre_layernorm:
        shapes[VIT + "pre_ln.weight"] = (V,)
        shapes[VIT + "pre_ln.bias"] = (V,)
    q_out, kv_out = v.num_attention_heads * v.head_dim, v.num_key_value_heads * v.head_dim
    for n in range(v.num_hidden_layers if unused_vit_blocks else vit_blocks_run(cfg)):
        p = f"{VIT}transformer.resblocks.{n}."
        for name, out_dim in (("wq", q_out), ("wk", kv_out), ("wv", kv_out)):
            shapes[p + f"attention.{name}.weight"] = (out_dim, V)
            shapes[p + f"attention.{name}.bias"] = (out_dim,)
        shapes[p + "attention.wo.weight"] = (V, q_out)
        shapes[p + "attention.wo.bias"] = (V,)
        shapes[p + "feed_forward.w1.weight"] = (v.intermediate_size, V)
        shapes[p + "feed_forward.w1.bias"] = (v.intermediate_size,)
        shapes[p + "feed_forward.w2.weight"] = (V, v.intermediate_size)
        shapes[p + "feed_forward.w2.bias"] = (V,)
        for norm in ("attention_norm", "ffn_norm"):
            shapes[p + f"{norm}.weight"] = (V,)
            shapes[p + f"{norm}.bias"] = (V,)

    # Connector: 2x2 attention pooling over the concatenated ViT layers, then a SwiGLU projector.
    A, VL = a.hidden_size, v.hidden_size * len(a.vit_layers)
    pq, pkv = a.num_attention_heads * a.head_dim, a.num_key_value_heads * a.head_dim
    for name, out_dim in (("wq", pq), ("wk", pkv), ("wv", pkv)):
        shapes[ADAPTER + f"image_pooling_2d.{name}.weight"] = (out_dim, VL)
        shapes[ADAPTER + f"image_pooling_2d.{name}.bias"] = (out_dim,)
    shapes[ADAPTER + "image_pooling_2d.wo.weight"] = (A, pq)
    shapes[ADAPTER + "image_pooling_2d.wo.bias"] = (A,)
    shapes[ADAPTER + "image_projector.w1.weight"] = (a.intermediate_size, A)
    shapes[ADAPTER + "image_projector.w3.weight"] = (a.intermediate_size, A)
    shapes[ADAPTER + "image_projector.w2.weight"] = (a.text_hidden_size, a.intermediate_size)
    if a.image_padding_embed == "pad_and_partial_pad":
        shapes[ADAPTER + "pad_embed"] = (2, VL)

    # Decoder.
    D, H, K, h = l.hidden_size, l.num_attention_heads, l.num_key_value_heads, l.head_dim
    shapes[LLM + "wte.embedding"] = (l.vocab_size, D)
    shapes[LLM + "wte.new_embedding"] = (l.additional_vocab_size, D)
    for n in range(l.num_hidden_layers):
        p = f"{LLM}blocks.{n}."
        shapes[p + "self_attn.att_proj.weight"] = ((H + 2 * K) * h, D)
        if l.qkv_bias:
            shapes[p + "self_attn.att_proj.bias"] = ((H + 2 * K) * h,)
        if l.use_qk_norm:
            shapes[p + "self_attn.q_norm.weight"] = (H * h,)
            shapes[p + "self_attn.k_norm.weight"] = (K * h,)
        shapes[p + "self_attn.attn_out.weight"] = (D, H * h)
        shapes[p + "attn_norm.weight"] = (D,)
        shapes[p + "ff_norm.weight"] = (D,)
        shapes[p + "mlp.ff_proj.weight"] = (2 * l.intermediate_size, D)
        shapes[p + "mlp.ff_out.weight"] = (D, l.intermediate_size)
    shapes[LLM + "ln_f.weight"] = (D,)
    if not l.tie_word_embeddings:
        shapes["lm_head.weight"] = (l.vocab_size, D)
    return shapes
