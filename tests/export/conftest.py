"""Tiny MolmoAct-shaped configs, models and inputs for the reference-model tests (fast on a shared CPU)."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from edgeact.runtime.arm_config import AdapterConfig, ArmConfig, LlmConfig, VitConfig

# Tiny token layout: base vocabulary 512 (image tokens inside it, as in Qwen2), 128 extra rows.
BOS, IM_START, IM_END, IM_PATCH, IM_COL = 500, 501, 502, 503, 504
EXTRA_TOKEN = 520  # an id in the additional vocabulary (like <DEPTH_k>)

# Tensors here are tiny: intra-op threads only add spin-wait contention on a shared CPU
# (measured: 0.5 s single-threaded against 9 s with two threads under load).
torch.set_num_threads(1)


def tiny_config(variant: str) -> ArmConfig:
    """-D: SigLIP2-style ViT + Qwen2-style decoder with GQA; -O: CLIP-style ViT + OLMo2-style decoder."""
    o = variant == "O"
    vit = VitConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=2,
        head_dim=16, hidden_act="quick_gelu" if o else "gelu_pytorch_tanh", layer_norm_eps=1e-5 if o else 1e-6,
        image_default_input_size=[56, 56], image_patch_size=14, image_num_pos=17 if o else 16,
        float32_attention=True, use_cls_token=o, patch_bias=not o, pre_layernorm=o,
    )
    adapter = AdapterConfig(
        # -D leaves the last ViT block unused, as MolmoAct-7B-D leaves two of 27.
        vit_layers=[-1, -3] if o else [-2, -4], hidden_size=32, num_attention_heads=2, num_key_value_heads=2,
        head_dim=16, float32_attention=True, hidden_act="silu", intermediate_size=48, text_hidden_size=64,
        image_padding_embed="pad_and_partial_pad" if o else None,
    )
    llm = LlmConfig(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=4 if o else 2, head_dim=16, vocab_size=512,
        additional_vocab_size=128, qkv_bias=not o, num_hidden_layers=2, intermediate_size=96,
        rope_theta=500000.0 if o else 1000000.0, use_qk_norm=o, qk_norm_type="olmo",
        layer_norm_eps=1e-6, norm_after=o,
    )
    cfg = ArmConfig(vit_config=vit, adapter_config=adapter, llm_config=llm, image_patch_id=IM_PATCH)
    cfg.validate("tiny_config")
    return cfg


def tiny_model(variant: str, seed: int = 0):
    """A tiny model with every parameter random (norm gains and pad embeddings too), in eval mode."""
    from edgeact.export.model import MolmoActModel

    torch.manual_seed(seed)
    model = MolmoActModel(tiny_config(variant)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "pre_ln.weight", "ln_f.weight")):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith(("norm.bias", "pre_ln.bias")):
                p.copy_(0.1 * torch.randn_like(p))
            elif name.endswith("pad_embed"):
                p.copy_(0.5 * torch.randn_like(p))
    return model


@dataclass
class ImageInputs:
    images: torch.Tensor             # (n_crops, 16, 588)
    image_masks: torch.Tensor        # (n_crops, 16)
    pooled_patches_idx: torch.Tensor  # (n_crops * 4, 4), one row with padding
    tokens_per_row: int = 2

    @property
    def n_tokens(self) -> int:
        return self.pooled_patches_idx.shape[0]


def tiny_images(cfg: ArmConfig, n_crops: int = 2, seed: int = 1) -> ImageInputs:
    """Crops of 4x4 patches pooled 2x2 (4 tokens per crop); token 1 pools only 2 real patches."""
    gen = torch.Generator().manual_seed(seed)
    n_pos = cfg.vit_config.image_num_pos - (1 if cfg.vit_config.use_cls_token else 0)
    images = torch.randn(n_crops, n_pos, cfg.vit_config.patch_dim, generator=gen)
    masks = torch.ones(n_crops, n_pos)
    masks[0, 3], masks[0, 7], masks[-1, -1] = 0.0, 0.5, 0.25
    rows = []
    for crop in range(n_crops):
        for py in range(2):
            for px in range(2):
                rows.append([crop * 16 + (2 * py + dy) * 4 + 2 * px + dx for dy in range(2) for dx in range(2)])
    idx = torch.tensor(rows, dtype=torch.long)
    idx[1, 1], idx[1, 3] = -1, -1
    return ImageInputs(images, masks, idx)


def tiny_prompt(n_image_tokens: int, tokens_per_row: int = 2, n_text: int = 6, seed: int = 2) -> torch.Tensor:
    """BOS, <im_start>, rows of <im_patch> each closed by <im_col>, <im_end>, then text (one extra-vocab id)."""
    gen = torch.Generator().manual_seed(seed)
    ids = [BOS, IM_START]
    for i in range(n_image_tokens):
        ids.append(IM_PATCH)
        if (i + 1) % tokens_per_row == 0:
            ids.append(IM_COL)
    ids.append(IM_END)
    ids += torch.randint(0, 400, (n_text,), generator=gen).tolist()
    ids[-2] = EXTRA_TOKEN
    return torch.tensor(ids, dtype=torch.long)


@pytest.fixture(params=["D", "O"])
def variant(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    """Three scripted-expert episodes at 64x48 (the training tests' demonstration set, recorded once per module)."""
    from edgeact.drivers.sim.demos import DemoConfig, record_demos

    out = tmp_path_factory.mktemp("demos") / "set"
    record_demos(out, episodes=3, seed=0, config=DemoConfig(width=64, height=48, stride_actions=8))
    return out
