"""Names of the exported stages, their tensors and the bundle's weight arrays: the exporter's contract with the runtime.

Stage `vision`:    images, image_masks -> patch_features. The ViT, crop by crop: the runtime calls it
                   once per crop (n_crops = 1) into one (n_crops, n_patches, F) buffer, so only one
                   crop's activations are ever live; the shape allows a batch of crops.
Stage `connector`: patch_features (all crops), pooled_patches_idx -> image_features (one row per
                   pooled token). Pooling sees every crop at once: a pooled token may take patches
                   from two crops.
Stage `decoder`:   inputs_embeds, position_ids, past_key.L / past_value.L -> hidden_states, new_key.L / new_value.L
                   (the portable form: standard ONNX ops, a sequence-major cache whose filled prefix is fed).
                   Its fused form adds seqlens_k, total_sequence_length and returns present_key.L /
                   present_value.L: onnxruntime's GroupQueryAttention, which writes the chunk into the
                   whole head-major (1, K, max_seq, h) cache buffer bound as both past and present.
Weights: `embedding` (vocab_size + additional rows, D) and `lm_head` (vocab_size, D).
Dims, dtypes and documentation of every tensor are in the bundle's manifest (written by
edgeact.export.onnx_export); this module holds only the names, so torch-free code can use them.
"""
from __future__ import annotations

VISION_STAGE = "vision"
CONNECTOR_STAGE = "connector"
DECODER_STAGE = "decoder"
MODEL_STAGES = (VISION_STAGE, CONNECTOR_STAGE, DECODER_STAGE)    # what `edgeact export` writes, in run order

IMAGES = "images"
IMAGE_MASKS = "image_masks"
POOLED_PATCHES_IDX = "pooled_patches_idx"
PATCH_FEATURES = "patch_features"
IMAGE_FEATURES = "image_features"

INPUTS_EMBEDS = "inputs_embeds"
POSITION_IDS = "position_ids"
HIDDEN_STATES = "hidden_states"

EMBEDDING_WEIGHT = "embedding"
LM_HEAD_WEIGHT = "lm_head"

SEQLENS_K = "seqlens_k"                          # fused decoder: (batch,) int32, past + chunk - 1
TOTAL_SEQUENCE_LENGTH = "total_sequence_length"  # fused decoder: () int32, past + chunk

# The decoder's two forms (`edgeact export --attention`): "fused" runs on onnxruntime's CPU EP only;
# "portable" everywhere (TensorRT, onnxruntime's CUDA and TensorRT EPs, the CPU).
FUSED_ATTENTION, PORTABLE_ATTENTION = "fused", "portable"
DECODER_ATTENTIONS = (FUSED_ATTENTION, PORTABLE_ATTENTION)

# Symbolic dims of the decoder; the cache the runtime allocates holds dim_ranges["seq"].max positions.
BATCH, SEQ, PAST_SEQ = "batch", "seq", "past_seq"
N_CROPS, N_TOKENS = "n_crops", "n_tokens"


def past_key(layer: int) -> str:
    return f"past_key.{layer}"


def past_value(layer: int) -> str:
    return f"past_value.{layer}"


def new_key(layer: int) -> str:
    return f"new_key.{layer}"


def new_value(layer: int) -> str:
    return f"new_value.{layer}"


def present_key(layer: int) -> str:
    return f"present_key.{layer}"


def present_value(layer: int) -> str:
    return f"present_value.{layer}"
