"""Building blocks shared by the vision tower and the decoder: float32 norms, activations, grouped attention.

Everything here is traceable by the ONNX exporter: no Python branches on tensor values, only
on shapes and on flags fixed at construction.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from edgeact.runtime.errors import ConfigError


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    # CLIP's sigmoid approximation of GELU; the -O checkpoints were trained with it.
    return x * torch.sigmoid(1.702 * x)


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu_pytorch_tanh": _gelu_tanh,
    "quick_gelu": _quick_gelu,
    "gelu": F.gelu,
    "silu": F.silu,
}


def activation(name: str, where: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation function a config names; `where` says which config field, for the error."""
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ConfigError(f"{where} is {name!r}; the reference model knows {sorted(_ACTIVATIONS)}") from None


class LayerNormFp32(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the weights' dtype, so fp16/bf16 ViTs stay stable."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps)
        return out.to(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm as MolmoAct computes it: normalize in float32, cast back, then scale by the weight."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class _ConstantReshape(torch.autograd.Function):
    """x.reshape to `shape` where 0 keeps x's size at that position (-1: inferred): exported as one Reshape
    to a constant.

    Traced, x.reshape(x.shape[0], x.shape[1], n, h) records a Shape, Gather, Unsqueeze and Concat per
    dynamic dim, nodes a decode step runs for every head split of every layer. ONNX's Reshape takes
    0 as "keep this dim", so the shape can be a constant.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        return x.reshape([x.shape[i] if d == 0 else d for i, d in enumerate(shape)])

    @staticmethod
    def symbolic(g, x, shape: tuple[int, ...]):
        return g.op("Reshape", x, g.op("Constant", value_t=torch.tensor(shape, dtype=torch.int64)))


def constant_reshape(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """x.reshape(shape) where 0 keeps x's size at that position and -1 is inferred; exported as one Reshape
    to a constant (`_ConstantReshape`), in eager mode a plain reshape."""
    if torch.onnx.is_in_onnx_export():
        return _ConstantReshape.apply(x, shape)
    return x.reshape([x.shape[i] if d == 0 else d for i, d in enumerate(shape)])


def split_heads(x: torch.Tensor, n: int, head_dim: int) -> torch.Tensor:
    """(B, T, n * head_dim) -> (B, T, n, head_dim); n and head_dim are Python ints (constants in an export)."""
    return constant_reshape(x, (0, -1, n, head_dim))


def merge_heads(x: torch.Tensor, width: int) -> torch.Tensor:
    """(B, T, n, head_dim) -> (B, T, width = n * head_dim), the inverse of split_heads."""
    return constant_reshape(x, (0, -1, width))


def grouped_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    float32_scores: bool,
) -> torch.Tensor:
    """Scaled dot-product attention with grouped KV heads, softmax in float32.

    q: (B, H, Tq, h); k, v: (B, K, Tk, h) with H a multiple of K; query head i reads KV head
    i // (H // K), as Qwen2's repeat_kv does. mask: bool, True = may attend, broadcastable to
    (B, K, H // K, Tq, Tk); None = attend everywhere. float32_scores also runs both matmuls in
    float32 (the ViT and pooling `float32_attention` flag). Returns (B, H, Tq, h) in q's dtype.
    """
    out_dtype = q.dtype
    b, n_heads, t_q, head_dim = q.shape
    n_kv, t_k = k.shape[1], k.shape[2]
    group = n_heads // n_kv
    # A KV head's query heads are merged into its query axis, (B, K, G*Tq, h), so both matmuls are
    # 4-D against the unrepeated K/V: the cache is read once per step (where decode time goes),
    # and the exported K^T stays a 4-D transpose that onnxruntime fuses into its MatMul. A 5-D
    # broadcast group axis became a 5-D Transpose of the whole cache per layer and step, which
    # onnxruntime's CPU kernel copies element by element (0.6 ms per MB).
    # The merges are reshapes to constant shapes (0 keeps B, -1 infers G*Tq): traced by sizes they
    # recorded ~20 Shape/Gather/Unsqueeze/Concat nodes per layer that every decode step ran.
    # int(): the tracer hands out sizes as traced values; heads and head size are fixed by the config.
    q = constant_reshape(q, (0, int(n_kv), -1, int(head_dim)))
    if float32_scores:
        q, k, v = q.float(), k.float(), v.float()
    scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(head_dim))
    scores = scores.float()
    if mask is not None and mask.dim() == 2:
        # A (Tq, Tk) mask (the decoder's causal mask): row g*Tq + t of the merged axis is query t of the
        # group's g-th head, so the mask repeated G times along its rows applies with no reshape of the scores.
        scores = scores.masked_fill(~mask.repeat(int(group), 1), float("-inf"))
    elif mask is not None:
        scores = scores.reshape(b, n_kv, group, t_q, t_k).masked_fill(~mask, float("-inf"))
        scores = scores.reshape(b, n_kv, group * t_q, t_k)
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    out = torch.matmul(probs, v)
    return constant_reshape(out, (0, int(n_heads), -1, int(head_dim))).to(out_dtype)
