"""Checks on what is fed to the reference model, kept out of the traced modules so they stay exportable."""
from __future__ import annotations

from typing import Sequence

import torch

from edgeact.runtime.arm_config import ArmConfig
from edgeact.runtime.errors import EdgeactError


class ModelInputError(EdgeactError, ValueError):
    """Token ids or image arrays do not fit the model (shape, range, or image-token count)."""


def as_token_batch(input_ids: torch.Tensor | Sequence[int], device: torch.device) -> torch.Tensor:
    """Token ids as an int64 (B, T) tensor on `device`; a 1-D sequence becomes a batch of one."""
    ids = torch.as_tensor(input_ids, dtype=torch.long, device=device)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise ModelInputError(f"input_ids has shape {tuple(ids.shape)}; pass a non-empty (T,) or (B, T) array of token ids")
    return ids


def check_token_ids(cfg: ArmConfig, input_ids: torch.Tensor) -> None:
    if torch.compiler.is_compiling():
        return      # a data-dependent check would split the compiled graph; its batches come from the tokenizer
    n_rows = cfg.llm_config.vocab_size + cfg.llm_config.additional_vocab_size
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= n_rows:
        raise ModelInputError(
            f"input_ids hold ids in [{lo}, {hi}] but the embedding table has {n_rows} rows "
            f"(vocab_size {cfg.llm_config.vocab_size} + additional {cfg.llm_config.additional_vocab_size}); "
            "was the prompt encoded with this checkpoint's tokenizer (and padding ids removed)?"
        )


def check_image_inputs(
    cfg: ArmConfig,
    images: torch.Tensor,
    image_masks: torch.Tensor | None,
    pooled_patches_idx: torch.Tensor,
) -> None:
    v = cfg.vit_config
    n_pos = v.image_num_pos - (1 if v.use_cls_token else 0)
    if images.dim() != 3 or images.shape[1:] != (n_pos, v.patch_dim):
        raise ModelInputError(
            f"images has shape {tuple(images.shape)}; expected (n_crops, {n_pos}, {v.patch_dim}): crops of "
            f"{v.image_default_input_size} px cut into {v.image_patch_size}-px patches, as the preprocessor writes them"
        )
    if cfg.adapter_config.image_padding_embed == "pad_and_partial_pad" and image_masks is None:
        raise ModelInputError("this checkpoint adds padding embeddings (image_padding_embed='pad_and_partial_pad'); pass image_masks")
    if image_masks is not None and tuple(image_masks.shape) != tuple(images.shape[:2]):
        raise ModelInputError(f"image_masks has shape {tuple(image_masks.shape)}; expected {tuple(images.shape[:2])} (one value per patch)")
    if pooled_patches_idx.dim() != 2 or pooled_patches_idx.dtype not in (torch.int32, torch.int64):
        raise ModelInputError(
            f"pooled_patches_idx is {pooled_patches_idx.dtype} of shape {tuple(pooled_patches_idx.shape)}; "
            "expected integers of shape (n_image_tokens, patches_per_token)"
        )
    n_patches = images.shape[0] * images.shape[1]
    if torch.compiler.is_compiling():
        return      # the data-dependent range check below would split the compiled graph
    if pooled_patches_idx.numel() and (int(pooled_patches_idx.min()) < -1 or int(pooled_patches_idx.max()) >= n_patches):
        raise ModelInputError(
            f"pooled_patches_idx holds values in [{int(pooled_patches_idx.min())}, {int(pooled_patches_idx.max())}]; "
            f"they index the {n_patches} patches of all crops, with -1 for padding"
        )


def check_image_token_count(cfg: ArmConfig, input_ids: torch.Tensor, n_features: int) -> None:
    if torch.compiler.is_compiling():
        return      # counting tokens is data-dependent; the batches of a compiled model come from the preprocessor
    n_tokens = int((input_ids == cfg.image_patch_id).sum())
    if n_tokens != n_features:
        raise ModelInputError(
            f"input_ids hold {n_tokens} <im_patch> tokens (id {cfg.image_patch_id}) but the images give "
            f"{n_features} pooled features; build input_ids and pooled_patches_idx from the same preprocessing "
            "(one <im_patch> per pooled token that has at least one real patch)"
        )
