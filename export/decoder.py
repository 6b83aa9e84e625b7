"""MolmoAct's decoder: Qwen2-style (-D) or OLMo2-style (-O) blocks with RoPE and an explicit KV cache.

One forward serves a multi-token prefill chunk and a single-token decode step alike:
`forward(inputs_embeds, position_ids, past_key_values) -> (hidden after ln_f, present_key_values)`.
The cache is a list with one (key, value) pair per block, each (B, K, T_past, head_dim), keys
stored with RoPE already applied. The forward branches only on shapes and on flags fixed at
construction, so it traces to one ONNX graph for both uses.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from edgeact.export.model_inputs import ModelInputError
from edgeact.export.model_layers import RMSNorm, activation, grouped_attention, merge_heads, split_heads
from edgeact.runtime.arm_config import LlmConfig
from edgeact.runtime.errors import ConfigError

KVCache = list[tuple[torch.Tensor, torch.Tensor]]
# attend(q (B, H, T, h), k, v (B, K, T, h) of the chunk, RoPE applied; past_k, past_v) -> (out (B, H, T, h),
# present_k, present_v): a block's cache update and attention, causal over past + chunk. The export's
# fused form (export/onnx_export.py) swaps in onnxruntime's GroupQueryAttention through it.
# A hook may also have `attend.packed(qkv (B, T, (H + 2K) h), the projection as it comes, RoPE NOT applied;
# past_k, past_v) -> (out (B, T, H h), present_k, present_v)`: then RoPE at the chunk's positions
# (past .. past + T - 1) is its job too. Blocks with q/k norms (use_qk_norm) call the hook itself: their
# norms come between the projection and RoPE.
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
                  tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


class TokenEmbedding(nn.Module):
    """One logical table split in two Parameters: ids >= vocab_size read `new_embedding`."""

    def __init__(self, vocab_size: int, additional_vocab_size: int, width: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.has_extra_rows = additional_vocab_size > 0
        self.embedding = nn.Parameter(torch.randn(vocab_size, width) * 0.02)
        self.new_embedding = nn.Parameter(torch.randn(additional_vocab_size, width) * 0.02)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # Two gathers and a select instead of concatenating the tables: a cat would copy the
        # whole (vocab x D) table on every decode step.
        base = F.embedding(input_ids.clamp(max=self.vocab_size - 1), self.embedding)
        if not self.has_extra_rows:
            return base
        extra = F.embedding((input_ids - self.vocab_size).clamp(min=0), self.new_embedding)
        return torch.where((input_ids >= self.vocab_size)[..., None], extra, base)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) positions -> cos, sin of shape (B, 1, T, head_dim) in float32 (half-split layout)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=position_ids.device) / head_dim))
    freqs = position_ids.to(torch.float32)[..., None] * inv_freq
    angles = torch.cat([freqs, freqs], dim=-1)[:, None]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rotate (B, heads, T, head_dim) by the given angles; done in float32 so bf16 positions stay exact.

    head_dim is the config's Python int, not x.shape[-1]: an export then splits the halves with one
    constant Split instead of shape arithmetic that every decode step would run."""
    x32 = x.float()
    first, second = x32.split((head_dim // 2, head_dim // 2), dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    return (x32 * cos + rotated * sin).to(x.dtype)


def causal_mask(n_new: int, n_past: int, device: torch.device) -> torch.Tensor:
    """(n_new, n_past + n_new) bool: the chunk's token i sees the whole past and chunk tokens <= i."""
    key_index = torch.arange(n_past + n_new, device=device)
    query_index = torch.arange(n_new, device=device) + n_past
    return key_index[None, :] <= query_index[:, None]


class DecoderAttention(nn.Module):
    def __init__(self, cfg: LlmConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.split = (self.n_heads * self.head_dim, self.n_kv * self.head_dim, self.n_kv * self.head_dim)
        self.att_proj = nn.Linear(cfg.hidden_size, sum(self.split), bias=cfg.qkv_bias)
        self.use_qk_norm = cfg.use_qk_norm
        if cfg.use_qk_norm:
            # OLMo2 ("olmo" type) normalizes the whole q and k vectors before splitting heads.
            self.q_norm = RMSNorm(self.split[0], cfg.layer_norm_eps)
            self.k_norm = RMSNorm(self.split[1], cfg.layer_norm_eps)
        self.attn_out = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        return split_heads(x, n, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, past_k: torch.Tensor,
                past_v: torch.Tensor, mask: torch.Tensor | None,
                attend: Attend | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, D) -> (attention output (B, T, D), keys and values of past + chunk).

        `attend` replaces the cache update and the attention (see `Attend`); None: concatenate and
        attend under `mask`.
        """
        qkv = self.att_proj(x)
        packed = getattr(attend, "packed", None)
        if packed is not None and not self.use_qk_norm:
            out, k, v = packed(qkv, past_k, past_v)
            return self.attn_out(out), k, v
        if self.use_qk_norm:
            q, k, v = qkv.split(self.split, dim=-1)
            qk = torch.cat([self.q_norm(q), self.k_norm(k)], dim=-1)
        else:
            qk, v = qkv.split((self.split[0] + self.split[1], self.split[2]), dim=-1)
        # q and k rotated as one tensor of H + K heads: RoPE is the same arithmetic head by head, and an export
        # runs one set of its nodes per layer instead of two.
        q, k = apply_rope(self._heads(qk, self.n_heads + self.n_kv), cos, sin, self.head_dim).split(
            (self.n_heads, self.n_kv), dim=1)
        v = self._heads(v, self.n_kv)
        if attend is None and self.training and past_k.shape[2] == 0:
            # Training (whole sequences, no past): torch's fused causal kernel, the same arithmetic as
            # causal_mask + grouped_attention without the (B, H, T, T) score and probability tensors.
            # Measured 3.6x faster forward + backward (B 8, 6 heads, T 470, 2 threads). The export and the
            # reference's generation run in eval mode and keep grouped_attention.
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_heads != self.n_kv)
        elif attend is None:
            k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
            out = grouped_attention(q, k, v, mask, float32_scores=False)
        else:
            out, k, v = attend(q, k, v, past_k, past_v)
        out = merge_heads(out.transpose(1, 2), self.n_heads * self.head_dim)
        return self.attn_out(out), k, v


class DecoderMlp(nn.Module):
    """SwiGLU with a fused projection: ff_proj's first half is "up", the second half "gate"."""

    def __init__(self, cfg: LlmConfig):
        super().__init__()
        self.ff_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.halves = (cfg.intermediate_size, cfg.intermediate_size)
        self.ff_out = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.act = activation(cfg.hidden_act, "llm_config.hidden_act")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Split by the config's sizes, not chunk(2): an export gets one constant Split, no shape arithmetic.
        up, gate = self.ff_proj(x).split(self.halves, dim=-1)
        return self.ff_out(self.act(gate) * up)


class DecoderBlock(nn.Module):
    """Pre-norm residual block (Qwen2), or norm-after (OLMo2): x + norm(sublayer(x))."""

    def __init__(self, cfg: LlmConfig):
        super().__init__()
        self.self_attn = DecoderAttention(cfg)
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.layer_norm_eps)
        self.mlp = DecoderMlp(cfg)
        self.ff_norm = RMSNorm(cfg.hidden_size, cfg.layer_norm_eps)
        self.norm_after = cfg.norm_after

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, past_k: torch.Tensor,
                past_v: torch.Tensor, mask: torch.Tensor | None,
                attend: Attend | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.norm_after:
            attn, k, v = self.self_attn(x, cos, sin, past_k, past_v, mask, attend)
            x = x + self.attn_norm(attn)
            return x + self.ff_norm(self.mlp(x)), k, v
        attn, k, v = self.self_attn(self.attn_norm(x), cos, sin, past_k, past_v, mask, attend)
        x = x + attn
        return x + self.mlp(self.ff_norm(x)), k, v


class Decoder(nn.Module):
    """The LLM trunk under the checkpoint's `model.transformer.` prefix (the LM head lives outside it)."""

    def __init__(self, cfg: LlmConfig):
        super().__init__()
        scaling = cfg.rope_scaling or {}
        if scaling.get("rope_type", scaling.get("type", "default")) != "default":
            raise ConfigError(
                f"llm_config.rope_scaling {cfg.rope_scaling} is not supported by the reference model; "
                "MolmoAct checkpoints use null (plain RoPE)"
            )
        if cfg.use_qk_norm and cfg.qk_norm_type != "olmo":
            raise ConfigError(f"llm_config.qk_norm_type {cfg.qk_norm_type!r} unsupported; MolmoAct-O uses 'olmo'")
        self.cfg = cfg
        self.wte = TokenEmbedding(cfg.vocab_size, cfg.additional_vocab_size, cfg.hidden_size)
        self.blocks = nn.ModuleList(DecoderBlock(cfg) for _ in range(cfg.num_hidden_layers))
        self.ln_f = RMSNorm(cfg.hidden_size, cfg.layer_norm_eps)

    def empty_cache(self, batch_size: int = 1, dtype: torch.dtype | None = None, device: torch.device | None = None) -> KVCache:
        """A zero-length cache, the `past_key_values` of a first prefill chunk."""
        ref = self.ln_f.weight
        shape = (batch_size, self.cfg.num_key_value_heads, 0, self.cfg.head_dim)
        return [
            (torch.zeros(shape, dtype=dtype or ref.dtype, device=device or ref.device),
             torch.zeros(shape, dtype=dtype or ref.dtype, device=device or ref.device))
            for _ in self.blocks
        ]

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        past_key_values: KVCache | None = None,
        attend: Attend | None = None,
    ) -> tuple[torch.Tensor, KVCache]:
        """inputs_embeds (B, T, D), position_ids (B, T) -> (hidden (B, T, D) after ln_f, present cache).

        The present cache holds past + this chunk, (B, K, T_past + T, h) per block; with `attend`,
        whatever it returns (the export's in-place cache: runtime/kv_cache.py).
        """
        if past_key_values is None:
            past_key_values = self.empty_cache(inputs_embeds.shape[0], inputs_embeds.dtype, inputs_embeds.device)
        if len(past_key_values) != len(self.blocks):
            raise ModelInputError(
                f"past_key_values has {len(past_key_values)} layers, this decoder {len(self.blocks)}; "
                "pass the present_key_values this decoder returned, or None for a first chunk"
            )
        mask = None
        if attend is None:
            mask = causal_mask(inputs_embeds.shape[1], past_key_values[0][0].shape[2], inputs_embeds.device)
        cos, sin = rope_cos_sin(position_ids, self.cfg.head_dim, self.cfg.rope_theta)
        x = inputs_embeds
        present: KVCache = []
        for block, (past_k, past_v) in zip(self.blocks, past_key_values):
            x, k, v = block(x, cos, sin, past_k, past_v, mask, attend)
            present.append((k, v))
        return self.ln_f(x), present
