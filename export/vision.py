"""MolmoAct's vision side: the ViT (SigLIP2 for -D, CLIP for -O), 2x2 attention pooling and the SwiGLU projector.

Parameter names follow the checkpoint (`image_vit.transformer.resblocks.N.attention.wq`, ...),
so the module tree loads a MolmoAct state dict without renaming. `VisionBackbone.patch_features`
(the ViT, crop by crop) and `.connect` (pooling and projector over all crops) have no branches
on tensor values, so the exporter traces them as the `vision` and `connector` stages.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from edgeact.export.model_layers import LayerNormFp32, activation, grouped_attention
from edgeact.runtime.arm_config import AdapterConfig, VitConfig

# The exporter's hook for the ViT's self-attention (export/onnx_export.py, fused form):
# attend(q, k, v (N, T, H h) as the projections give them, n_heads, head_dim) -> (N, T, H h), the heads merged.
# None: the reference's own head split, grouped_attention and merge.
VitAttend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, int], torch.Tensor]


class MultiHeadAttention(nn.Module):
    """Attention with separate biased wq/wk/wv/wo, used by the ViT blocks and the 2x2 pooling."""

    def __init__(self, input_dim: int, output_dim: int, n_heads: int, n_kv_heads: int, head_dim: int, float32_attention: bool):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.float32_attention = float32_attention
        self.wq = nn.Linear(input_dim, n_heads * head_dim)
        self.wk = nn.Linear(input_dim, n_kv_heads * head_dim)
        self.wv = nn.Linear(input_dim, n_kv_heads * head_dim)
        self.wo = nn.Linear(n_heads * head_dim, output_dim)

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        return x.reshape(x.shape[0], x.shape[1], n, self.head_dim).transpose(1, 2)

    def forward(self, inputs_q: torch.Tensor, inputs_kv: torch.Tensor, mask: torch.Tensor | None = None,
                attend: VitAttend | None = None) -> torch.Tensor:
        """inputs_q (N, Tq, C), inputs_kv (N, Tk, C); mask bool (N, Tk), True = attend. Returns (N, Tq, out).

        `attend` replaces the attention where there is no mask and every query head has its own KV head.
        """
        if attend is not None and mask is None and self.n_kv_heads == self.n_heads:
            out = attend(self.wq(inputs_q), self.wk(inputs_kv), self.wv(inputs_kv), self.n_heads, self.head_dim)
            return self.wo(out)
        q = self._heads(self.wq(inputs_q), self.n_heads)
        k = self._heads(self.wk(inputs_kv), self.n_kv_heads)
        v = self._heads(self.wv(inputs_kv), self.n_kv_heads)
        if mask is not None:
            mask = mask[:, None, None, None, :]
        out = grouped_attention(q, k, v, mask, self.float32_attention)
        out = out.transpose(1, 2).reshape(inputs_q.shape[0], inputs_q.shape[1], self.n_heads * self.head_dim)
        return self.wo(out)


class VitMlp(nn.Module):
    def __init__(self, cfg: VitConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = activation(cfg.hidden_act, "vit_config.hidden_act")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.act(self.w1(x)))


class VitBlock(nn.Module):
    """Pre-norm transformer block (the same for SigLIP2 and CLIP)."""

    def __init__(self, cfg: VitConfig):
        super().__init__()
        self.attention = MultiHeadAttention(
            cfg.hidden_size, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.float32_attention
        )
        self.feed_forward = VitMlp(cfg)
        self.attention_norm = LayerNormFp32(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.ffn_norm = LayerNormFp32(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, attend: VitAttend | None = None) -> torch.Tensor:
        h = self.attention_norm(x)
        x = x + self.attention(h, h, attend=attend)
        return x + self.feed_forward(self.ffn_norm(x))


class VitBlocks(nn.Module):
    """Holds the blocks under the checkpoint's name `transformer.resblocks`."""

    def __init__(self, cfg: VitConfig):
        super().__init__()
        self.resblocks = nn.ModuleList(VitBlock(cfg) for _ in range(cfg.num_hidden_layers))


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VitConfig):
        super().__init__()
        self.cfg = cfg
        width = cfg.hidden_size
        self.patch_embedding = nn.Linear(cfg.patch_dim, width, bias=cfg.patch_bias)
        self.positional_embedding = nn.Parameter(torch.randn(cfg.image_num_pos, width) * 0.02)
        if cfg.use_cls_token:
            self.class_embedding = nn.Parameter(torch.randn(width) * 0.02)
        if cfg.pre_layernorm:
            self.pre_ln = LayerNormFp32(width, eps=cfg.layer_norm_eps)
        self.transformer = VitBlocks(cfg)

    @property
    def n_prefix_tokens(self) -> int:
        return 1 if self.cfg.use_cls_token else 0

    def forward(self, patches: torch.Tensor, n_layers: int, attend: VitAttend | None = None) -> list[torch.Tensor]:
        """patches (n_crops, n_patches, patch_dim) -> outputs of blocks 0 .. n_layers-1, CLS first for CLIP.

        The positional table is added as is: crops arrive at image_default_input_size, so no
        resampling of the position grid is ever needed.
        """
        x = self.patch_embedding(patches.to(self.patch_embedding.weight.dtype))
        if self.cfg.use_cls_token:
            cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
            x = torch.cat([cls, x], dim=1)
        x = x + self.positional_embedding.to(x.dtype)[None]
        if self.cfg.pre_layernorm:
            x = self.pre_ln(x)
        hidden_states = []
        for block in self.transformer.resblocks[:n_layers]:
            x = block(x, attend)
            hidden_states.append(x)
        return hidden_states


class ImageProjector(nn.Module):
    """SwiGLU from the pooled width to the LLM width: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: AdapterConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.text_hidden_size, bias=False)
        self.w3 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.act = activation(cfg.hidden_act, "adapter_config.hidden_act")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.act(self.w1(x)) * self.w3(x))


class VisionBackbone(nn.Module):
    """images + masks + pooling indices -> one LLM-width feature per pooled image token."""

    def __init__(self, vit_cfg: VitConfig, adapter_cfg: AdapterConfig):
        super().__init__()
        self.adapter_cfg = adapter_cfg
        n = vit_cfg.num_hidden_layers
        # Negative layer numbers count from the ViT's end (-1 = last block's output).
        self.vit_layers = [lay + n if lay < 0 else lay for lay in adapter_cfg.vit_layers]
        self.n_layers_run = max(self.vit_layers) + 1
        self.image_vit = VisionTransformer(vit_cfg)
        # Deeper blocks never run; MolmoAct's code does not build them, so its checkpoints lack them. They are
        # built and then dropped so that everything created after them starts from the same random state.
        del self.image_vit.transformer.resblocks[self.n_layers_run:]
        pooled_in = vit_cfg.hidden_size * len(self.vit_layers)
        self.image_pooling_2d = MultiHeadAttention(
            pooled_in,
            adapter_cfg.hidden_size,
            adapter_cfg.num_attention_heads,
            adapter_cfg.num_key_value_heads,
            adapter_cfg.head_dim,
            adapter_cfg.float32_attention,
        )
        self.image_projector = ImageProjector(adapter_cfg)
        self.use_pad_embed = adapter_cfg.image_padding_embed == "pad_and_partial_pad"
        if self.use_pad_embed:
            self.pad_embed = nn.Parameter(torch.zeros(2, pooled_in))

    def patch_features(self, images: torch.Tensor, image_masks: torch.Tensor | None,
                       attend: VitAttend | None = None) -> torch.Tensor:
        """(n_crops, n_patches, patch_dim) -> (n_crops, n_patches, V * len(vit_layers)) before pooling."""
        hidden = self.image_vit(images, self.n_layers_run, attend)
        features = torch.cat([hidden[lay] for lay in self.vit_layers], dim=-1)
        features = features[:, self.image_vit.n_prefix_tokens:]
        if self.use_pad_embed:
            # Molmo's rule: mask == 0 is all padding, anything else below 1 is partial padding.
            all_pad = (image_masks == 0).to(features.dtype)[..., None]
            partial = ((image_masks < 1) & (image_masks != 0)).to(features.dtype)[..., None]
            pad = self.pad_embed.to(features.dtype)
            features = features + pad[0] * all_pad + pad[1] * partial
        return features

    def pool(self, features: torch.Tensor, pooled_patches_idx: torch.Tensor) -> torch.Tensor:
        """Attention-pool patch features: (n_patches_total, C) and (N, k) indices -> (N, A).

        Padding slots (-1) are zeroed. As published MolmoAct does, the query is the mean over all
        k slots and every slot is a key; with adapter_config.pooling_attention_mask (Molmo2) the
        query averages the valid slots only and padding keys are masked out. A token whose slots
        are all padding then attends to its zeroed slots, so its output stays finite.
        """
        valid = pooled_patches_idx >= 0
        to_pool = features[pooled_patches_idx.clamp(min=0)] * valid[..., None].to(features.dtype)
        if not self.adapter_cfg.pooling_attention_mask:
            query = to_pool.mean(1, keepdim=True)
            return self.image_pooling_2d(query, to_pool, None)[:, 0]
        n_valid = valid.sum(-1, keepdim=True).clamp(min=1).to(features.dtype)
        query = to_pool.sum(1, keepdim=True) / n_valid[..., None]
        attend = valid | ~valid.any(-1, keepdim=True)
        return self.image_pooling_2d(query, to_pool, attend)[:, 0]

    def connect(self, features: torch.Tensor, pooled_patches_idx: torch.Tensor) -> torch.Tensor:
        """The connector: patch features (n_crops, n_patches, C) of every crop -> (n_image_tokens, D).

        It sees all crops at once because a pooled token may take patches from two crops
        (pooled_patches_idx indexes the flattened crops x patches).
        """
        pooled = self.pool(features.reshape(-1, features.shape[-1]), pooled_patches_idx.long())
        return self.image_projector(pooled)

    def forward(self, images: torch.Tensor, image_masks: torch.Tensor | None, pooled_patches_idx: torch.Tensor) -> torch.Tensor:
        """-> (n_image_tokens, D): projected features for every row of pooled_patches_idx, in order."""
        return self.connect(self.patch_features(images, image_masks), pooled_patches_idx)
