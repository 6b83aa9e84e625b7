"""Synthetic MolmoAct checkpoints: the real architecture and file format at named small sizes, with seeded weights.

The published 7B weights cannot be downloaded here, so tests, benchmarks and demos run on
checkpoints made by `make_checkpoint`: the same config schema, tensor names, tokenizer layout
and norm statistics as MolmoAct-7B-D / -O, only narrower and shallower. The same seed gives
bit-identical files.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch

from edgeact.export.checkpoint import save_checkpoint
from edgeact.export.tensor_names import expected_tensor_shapes
from edgeact.runtime.arm_config import VARIANTS, AdapterConfig, ArmConfig, LlmConfig, VitConfig
from edgeact.runtime.errors import ConfigError

NORM_STATS_KEY = "edgeact_sim"
ADDITIONAL_VOCAB = 128  # MolmoAct's extra embedding rows; the 6 image tokens live there


@dataclass(frozen=True)
class SyntheticSize:
    """Widths and depths of one named size; the per-variant flags come from `synthetic_config`."""
    image_px_d: int          # crop side for -D (SigLIP2-like); real: 378
    image_px_o: int          # crop side for -O (CLIP-like); real: 336
    vit_width: int
    vit_depth: int
    vit_heads: int
    vit_mlp: int
    vit_layers_d: tuple[int, int]   # real -D: (-3, -9)
    vit_layers_o: tuple[int, int]   # real -O: (-2, -9)
    projector_mlp: int
    llm_width: int
    llm_depth: int
    llm_heads: int
    llm_kv_heads_d: int      # -D is GQA (Qwen2); -O is full MHA (OLMo2)
    llm_mlp: int

    def __post_init__(self) -> None:
        for name, width, heads in (("vit", self.vit_width, self.vit_heads), ("llm", self.llm_width, self.llm_heads)):
            if width % heads:
                raise ConfigError(f"{name}_width {width} is not a multiple of {name}_heads {heads}")
        if self.llm_heads % self.llm_kv_heads_d:
            raise ConfigError(f"llm_heads {self.llm_heads} is not a multiple of llm_kv_heads_d {self.llm_kv_heads_d}")
        for layers in (self.vit_layers_d, self.vit_layers_o):
            if any(not -self.vit_depth <= k < 0 for k in layers):
                raise ConfigError(f"vit_layers {layers} must index from the end of the {self.vit_depth} ViT layers")


# Odd patch counts per side (5, 9, 27 / 24) keep the 2x2 pooling's padding path exercised, as
# MolmoAct-7B-D's 27x27 patches do. Each size skips the last ViT layer(s) like the real models.
SIZES: dict[str, SyntheticSize] = {
    # Milliseconds per forward pass: unit tests.
    "tiny": SyntheticSize(
        image_px_d=70, image_px_o=70, vit_width=32, vit_depth=3, vit_heads=2, vit_mlp=64,
        vit_layers_d=(-2, -3), vit_layers_o=(-1, -3), projector_mlp=128,
        llm_width=64, llm_depth=2, llm_heads=4, llm_kv_heads_d=2, llm_mlp=128,
    ),
    # A few million parameters: integration tests and the demo.
    "small": SyntheticSize(
        image_px_d=126, image_px_o=126, vit_width=64, vit_depth=4, vit_heads=4, vit_mlp=256,
        vit_layers_d=(-2, -4), vit_layers_o=(-1, -4), projector_mlp=512,
        llm_width=256, llm_depth=4, llm_heads=8, llm_kv_heads_d=2, llm_mlp=704,
    ),
    # 100-300 M parameters, larger than CPU caches, at the real image sizes: benchmarks.
    "bench": SyntheticSize(
        image_px_d=378, image_px_o=336, vit_width=384, vit_depth=12, vit_heads=6, vit_mlp=1536,
        vit_layers_d=(-3, -9), vit_layers_o=(-2, -9), projector_mlp=2816,
        llm_width=1024, llm_depth=16, llm_heads=16, llm_kv_heads_d=4, llm_mlp=2816,
    ),
    # About 3 M parameters for the reference ARM trained on the CPU (export.train_reference): the LLM
    # narrower than "small" since the training step's time goes into the decoder over ~550 tokens.
    "reference": SyntheticSize(
        image_px_d=126, image_px_o=126, vit_width=64, vit_depth=4, vit_heads=4, vit_mlp=256,
        vit_layers_d=(-2, -4), vit_layers_o=(-1, -4), projector_mlp=512,
        llm_width=192, llm_depth=4, llm_heads=6, llm_kv_heads_d=2, llm_mlp=640,
    ),
}


@lru_cache(maxsize=1)
def synthetic_tokenizer():
    """The project's MolmoAct-layout tokenizer (built once per process; treat as read-only)."""
    from edgeact.export.tokenizer_build import build_tokenizer

    return build_tokenizer()


def synthetic_config(variant: str, size: str, tokenizer=None) -> ArmConfig:
    """An ArmConfig of MolmoAct-7B-`variant`'s architecture at a named size; vocab ids from the tokenizer."""
    if variant not in VARIANTS:
        raise ConfigError(f"variant {variant!r} unknown; use one of {', '.join(VARIANTS)}")
    if size not in SIZES:
        raise ConfigError(f"size {size!r} unknown; use one of {', '.join(SIZES)}")
    s = SIZES[size]
    tok = tokenizer if tokenizer is not None else synthetic_tokenizer()
    # The image tokens follow the padded vocab: <im_start> sits at vocab_size, <im_patch> two after.
    vocab_size, image_patch_id = tok.token_to_id("<im_start>"), tok.token_to_id("<im_patch>")
    if vocab_size is None or image_patch_id is None:
        raise ConfigError("the tokenizer lacks <im_start> / <im_patch>; build it with edgeact.export.tokenizer_build")
    is_o = variant == "O"
    px = s.image_px_o if is_o else s.image_px_d
    patches = (px // 14) ** 2
    vit = VitConfig(
        hidden_size=s.vit_width, intermediate_size=s.vit_mlp, num_hidden_layers=s.vit_depth,
        num_attention_heads=s.vit_heads, num_key_value_heads=s.vit_heads, head_dim=s.vit_width // s.vit_heads,
        hidden_act="quick_gelu" if is_o else "gelu_pytorch_tanh",
        layer_norm_eps=1e-5 if is_o else 1e-6,
        image_default_input_size=[px, px], image_patch_size=14,
        image_num_pos=patches + (1 if is_o else 0),  # CLIP keeps a position for its CLS token
        float32_attention=True, use_cls_token=is_o, patch_bias=not is_o, pre_layernorm=is_o,
    )
    adapter = AdapterConfig(
        vit_layers=list(s.vit_layers_o if is_o else s.vit_layers_d), hidden_size=s.vit_width,
        num_attention_heads=s.vit_heads, num_key_value_heads=s.vit_heads, head_dim=s.vit_width // s.vit_heads,
        float32_attention=True, hidden_act="silu", intermediate_size=s.projector_mlp,
        text_hidden_size=s.llm_width, image_padding_embed="pad_and_partial_pad" if is_o else None,
    )
    llm = LlmConfig(
        hidden_size=s.llm_width, num_attention_heads=s.llm_heads,
        num_key_value_heads=s.llm_heads if is_o else s.llm_kv_heads_d, head_dim=s.llm_width // s.llm_heads,
        vocab_size=vocab_size, additional_vocab_size=ADDITIONAL_VOCAB, qkv_bias=not is_o,
        num_hidden_layers=s.llm_depth, intermediate_size=s.llm_mlp, hidden_act="silu",
        max_position_embeddings=4096, rope_theta=500000.0 if is_o else 1000000.0, rope_scaling=None,
        use_qk_norm=is_o, qk_norm_type="olmo", layer_norm_eps=1e-6, norm_after=is_o, tie_word_embeddings=False,
    )
    cfg = ArmConfig(vit_config=vit, adapter_config=adapter, llm_config=llm, image_patch_id=image_patch_id,
                    n_action_bins=256, norm_stats=synthetic_norm_stats())
    cfg.validate(f"synthetic {variant}/{size} config")
    return cfg


def count_parameters(cfg: ArmConfig) -> int:
    return sum(math.prod(shape) for shape in expected_tensor_shapes(cfg).values())


def synthetic_norm_stats() -> dict:
    """Statistics of a plausible 7-dim end-effector delta action [dx dy dz (m), droll dpitch dyaw (rad), gripper].

    Same shape as MolmoAct's per-dataset entries; the gripper's mask is false, so it stays normalized.
    """
    q99 = [0.02, 0.025, 0.03, 0.08, 0.08, 0.12, 1.0]
    q01 = [-x for x in q99[:6]] + [0.0]
    return {
        NORM_STATS_KEY: {
            "action": {
                "mean": [0.001, -0.0005, 0.002, 0.0, 0.001, -0.002, 0.55],
                "std": [0.008, 0.009, 0.011, 0.03, 0.03, 0.045, 0.49],
                "max": [x * 1.5 for x in q99[:6]] + [1.0],
                "min": [x * 1.5 for x in q01[:6]] + [0.0],
                "q01": q01,
                "q99": q99,
                "mask": [True] * 6 + [False],
            },
            "num_transitions": 100000,
            "num_trajectories": 1000,
        }
    }


def synthetic_tensors(cfg: ArmConfig, seed: int, dtype: torch.dtype = torch.float32,
                      on_tensor: Callable[[str], None] | None = None) -> dict[str, torch.Tensor]:
    """Seeded weights for every tensor of `cfg`, drawn in table order from one generator.

    Matrices get std 1/sqrt(fan_in) rather than a flat 0.02 so that signals keep unit scale
    through the layers: attention is not uniform and every sublayer moves the logits, which
    lets tests notice a wrong RoPE, mask or layer choice; activations stay far below fp16's range.
    Norm weights are 1 plus noise and biases are small but non-zero, so a model that forgets
    one of them gives different logits.
    """
    from edgeact.runtime.cli_args import SEED_LIMIT

    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise ConfigError(f"seed {seed!r}: a seed is a whole number from 0 to 2**63 - 1 (what numpy's and torch's "
                          "generators take); pick one in that range")
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    kept = expected_tensor_shapes(cfg)
    # Drawn for the never-run ViT blocks too (then dropped): the other tensors keep their values.
    for name, shape in expected_tensor_shapes(cfg, unused_vit_blocks=True).items():
        noise = torch.randn(shape, generator=gen, dtype=torch.float32)
        if _is_norm(name):
            t = 1.0 + 0.05 * noise if name.endswith("weight") else 0.05 * noise
        elif name.endswith("bias"):
            t = 0.1 * noise
        elif len(shape) == 2 and name.endswith(".weight"):
            t = noise / math.sqrt(shape[1])
        else:  # token, position, class and padding embeddings
            t = 0.5 * noise
        if name not in kept:
            continue
        out[name] = t.to(dtype)
        if on_tensor is not None:
            on_tensor(name)
    return out


def _is_norm(name: str) -> bool:
    module = name.rsplit(".", 1)[0].rsplit(".", 1)[-1]
    return module.endswith("norm") or module in ("ln_f", "pre_ln")


def synthetic_preprocess_config(cfg: ArmConfig):
    """The preprocessor settings that go with `cfg` (crop size and patch size come from the ViT)."""
    from edgeact.runtime.preprocess_config import PreprocessConfig

    return PreprocessConfig.for_model(cfg)


def make_checkpoint(variant: str, size: str, seed: int, out_dir: str | Path, shards: int | None = None, *,
                    dtype: torch.dtype = torch.float32, overwrite: bool = False,
                    on_tensor: Callable[[str], None] | None = None,
                    on_file: Callable[[str], None] | None = None) -> Path:
    """Write a synthetic MolmoAct-`variant` checkpoint of a named size to `out_dir`; returns the directory."""
    tokenizer = synthetic_tokenizer()
    cfg = synthetic_config(variant, size, tokenizer)
    tensors = synthetic_tensors(cfg, seed, dtype, on_tensor)
    return save_checkpoint(out_dir, cfg, tensors, tokenizer, synthetic_preprocess_config(cfg),
                           n_shards=shards if shards and shards > 1 else None, overwrite=overwrite, on_file=on_file)
