"""The reference MolmoAct ARM in plain PyTorch, its module tree named exactly like the checkpoint.

`MolmoActModel(cfg).state_dict()` has the keys and shapes of
`edgeact.export.tensor_names.expected_tensor_shapes(cfg)`, so a MolmoAct checkpoint loads with
`load_state_dict(tensors, strict=True)`. The stages a deployment exports are reachable as
`model.vision` (images -> image features), `model.embed` (token ids -> embeddings),
`model.decoder` (embeddings + positions + KV cache -> hidden states) and `model.logits`.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from edgeact.export.decoder import Decoder
from edgeact.export.model_inputs import (
    ModelInputError,
    as_token_batch,
    check_image_inputs,
    check_image_token_count,
    check_token_ids,
)
from edgeact.export.vision import VisionBackbone
from edgeact.runtime.arm_config import ArmConfig


class MolmoActModel(nn.Module):
    def __init__(self, cfg: ArmConfig):
        super().__init__()
        cfg.validate("MolmoActModel config")
        self.cfg = cfg
        self.model = nn.ModuleDict({
            "vision_backbone": VisionBackbone(cfg.vit_config, cfg.adapter_config),
            "transformer": Decoder(cfg.llm_config),
        })
        llm = cfg.llm_config
        if not llm.tie_word_embeddings:
            self.lm_head = nn.Linear(llm.hidden_size, llm.vocab_size, bias=False)

    @property
    def vision(self) -> VisionBackbone:
        return self.model["vision_backbone"]

    @property
    def decoder(self) -> Decoder:
        return self.model["transformer"]

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.ln_f.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.decoder.ln_f.weight.device

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T, D) embeddings, text only (no image features)."""
        return self.decoder.wte(input_ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., D) hidden states after ln_f -> (..., vocab_size): the extra vocabulary rows are never predicted."""
        weight = self.decoder.wte.embedding if self.cfg.llm_config.tie_word_embeddings else self.lm_head.weight
        return F.linear(hidden, weight)

    def image_features(
        self,
        images: torch.Tensor,
        image_masks: torch.Tensor | None,
        pooled_patches_idx: torch.Tensor,
    ) -> torch.Tensor:
        """(n_image_tokens, D) projected features, one per row of pooled_patches_idx (all-padding rows included)."""
        images = torch.as_tensor(images, device=self.device)
        pooled_patches_idx = torch.as_tensor(pooled_patches_idx, device=self.device)
        if image_masks is not None:
            image_masks = torch.as_tensor(image_masks, device=self.device)
        check_image_inputs(self.cfg, images, image_masks, pooled_patches_idx)
        return self.vision(images, image_masks, pooled_patches_idx)

    def embed_multimodal(
        self,
        input_ids: torch.Tensor | Sequence[int],
        images: torch.Tensor | None = None,
        image_masks: torch.Tensor | None = None,
        pooled_patches_idx: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Prompt embeddings (B, T, D): token embeddings, plus the i-th image feature at the i-th <im_patch>.

        As MolmoAct does, pooled tokens whose indices are all -1 carry no <im_patch> token and are
        dropped before matching; <im_patch> positions are counted over the flattened batch.
        """
        ids = as_token_batch(input_ids, self.device)
        check_token_ids(self.cfg, ids)
        embeds = self.embed(ids)
        if images is None:
            check_image_token_count(self.cfg, ids, 0)
            return embeds
        if pooled_patches_idx is None:
            raise ModelInputError("images given without pooled_patches_idx; pass the preprocessor's pooled_patches_idx too")
        features = self.image_features(images, image_masks, pooled_patches_idx)
        features = features[(torch.as_tensor(pooled_patches_idx, device=self.device) >= 0).any(-1)]
        check_image_token_count(self.cfg, ids, features.shape[0])
        flat = embeds.reshape(-1, embeds.shape[-1])
        positions = (ids.reshape(-1) == self.cfg.image_patch_id).nonzero().squeeze(-1)
        return flat.index_add(0, positions, features.to(flat.dtype)).reshape(embeds.shape)

    def forward(
        self,
        input_ids: torch.Tensor | Sequence[int],
        images: torch.Tensor | None = None,
        image_masks: torch.Tensor | None = None,
        pooled_patches_idx: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One uncached pass over whole sequences: (B, T) ids -> (B, T, vocab_size) logits."""
        return self.logits(self.hidden_states(input_ids, images, image_masks, pooled_patches_idx))

    def hidden_states(
        self,
        input_ids: torch.Tensor | Sequence[int],
        images: torch.Tensor | None = None,
        image_masks: torch.Tensor | None = None,
        pooled_patches_idx: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One uncached pass over whole sequences: (B, T) ids -> (B, T, D) hidden states after ln_f."""
        embeds = self.embed_multimodal(input_ids, images, image_masks, pooled_patches_idx)
        batch, length = embeds.shape[:2]
        position_ids = torch.arange(length, device=self.device).expand(batch, length)
        hidden, _ = self.decoder(embeds, position_ids)
        return hidden
