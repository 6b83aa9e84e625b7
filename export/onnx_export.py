"""Trace the reference model's deployable stages, vision (ViT), connector and decoder, into ONNX graphs with named dynamic dims.

The wrappers below only adapt I/O to the runtime's contract; the arithmetic is the reference
model's own (`MolmoActModel.vision.patch_features`, `.vision.connect`, `.decoder`), so an
exported stage computes what the reference computes. The decoder has two forms
(runtime/stage_io.py): portable (`DecoderStage`, standard ops) and fused (`FusedDecoderStage`),
where each layer's cache update and attention is exported as one onnxruntime
GroupQueryAttention node through the decoder's `attend` hook; the rest is the same arithmetic. Exporter: torch's TorchScript-based `torch.onnx.export(dynamo=False)`.
It keeps the `dynamic_axes` names as the graph's dim_params, traces shape arithmetic (causal
mask, cache slicing) symbolically, and folds each Linear's transposed weight into an (in, out)
initializer feeding a plain MatMul (never a Gemm), which the int4 weight-only quantizer needs.
The dynamo exporter specializes sizes 0 and 1 (an empty past, a one-token step), which this
one graph must accept.

After tracing, `finish_graph` renames each MatMul weight after its checkpoint tensor
(`<checkpoint name>.T`: stored transposed, (in, out)) so quantization reports and layer
exclusions speak the checkpoint's language, and restores graph inputs the tracer dropped
because the variant does not read them (-D ignores `image_masks`).
"""
from __future__ import annotations

import hashlib
import math
import warnings
from pathlib import Path

import torch
from torch import nn

from edgeact.export.decoder import apply_rope, causal_mask, rope_cos_sin
from edgeact.export.model import MolmoActModel
from edgeact.export.model_layers import grouped_attention, merge_heads, split_heads
from edgeact.runtime import stage_io as io
from edgeact.runtime.errors import BundleError
from edgeact.runtime.stage_spec import TensorSpec

# Opset 19: QuantizeLinear/DequantizeLinear with float8 types (the fp8 recipe) exist from 19,
# TensorRT 10's parser and onnxruntime 1.32 both take it. The int4 recipe needs 21 for int4
# Q/DQ and raises the opset itself when it writes them.
DEFAULT_OPSET = 19
TRANSPOSED_SUFFIX = ".T"


# ----------------------------------------------------------------------------------- wrappers
class _MultiHeadAttention(torch.autograd.Function):
    """onnxruntime's MultiHeadAttention on the ViT's q/k/v projections (N, T, H h): one node from wq/wk/wv to wo.

    It splits the heads, takes both products and the softmax and merges the heads: the ~12 nodes per
    block of the standard form (reshapes, transposes, two MatMuls, a scale, a softmax). On the `bench`
    ViT's shapes (5 crops of 729 patches, 6 heads of 64) onnxruntime's CPU kernel takes 0.6x their
    time. The torch forward is the reference's own head split and grouped_attention.
    """

    @staticmethod
    def forward(ctx, q, k, v, n_heads: int, head_dim: int):
        n, t, _ = q.shape
        heads = [x.reshape(n, x.shape[1], n_heads, head_dim).transpose(1, 2) for x in (q, k, v)]
        out = grouped_attention(*heads, None, True)
        return out.transpose(1, 2).reshape(n, t, n_heads * head_dim)

    @staticmethod
    def symbolic(g, q, k, v, n_heads: int, head_dim: int):
        out = g.op("com.microsoft::MultiHeadAttention", q, k, v, num_heads_i=n_heads, scale_f=1.0 / math.sqrt(head_dim))
        out.setType(q.type())
        return out


def _vit_attend(q, k, v, n_heads: int, head_dim: int):
    return _MultiHeadAttention.apply(q, k, v, n_heads, head_dim)


class VisionStage(nn.Module):
    """images, image_masks -> patch_features: the ViT, each crop on its own (the runtime feeds one crop per call).

    fused: each block's self-attention is onnxruntime's MultiHeadAttention (`_MultiHeadAttention`), the
    vision half of the fused form (stage_io.FUSED_ATTENTION); otherwise standard ops (TensorRT).
    """

    def __init__(self, model: MolmoActModel, fused: bool = False):
        super().__init__()
        # Held under the checkpoint's own prefix, so the graph's initializers carry checkpoint names.
        self.model = nn.ModuleDict({"vision_backbone": model.vision})
        self.uses_contrib_ops = fused

    def forward(self, images: torch.Tensor, image_masks: torch.Tensor) -> torch.Tensor:
        attend = _vit_attend if self.uses_contrib_ops else None
        return self.model["vision_backbone"].patch_features(images, image_masks, attend)


class ConnectorStage(nn.Module):
    """patch_features of every crop, pooled_patches_idx -> image_features for EVERY row of pooled_patches_idx."""

    def __init__(self, model: MolmoActModel):
        super().__init__()
        self.model = nn.ModuleDict({"vision_backbone": model.vision})

    def forward(self, patch_features: torch.Tensor, pooled_patches_idx: torch.Tensor) -> torch.Tensor:
        return self.model["vision_backbone"].connect(patch_features, pooled_patches_idx)


class DecoderStage(nn.Module):
    """inputs_embeds, position_ids, past keys/values (seq-major) -> hidden_states and the chunk's new keys/values.

    The runtime keeps one (1, max_seq, K, h) buffer per layer and kind; with the sequence axis
    before the heads, the filled part of a batch-1 buffer is a contiguous prefix it can feed
    without a copy, and the new entries are written right after it.
    """

    def __init__(self, model: MolmoActModel):
        super().__init__()
        self.model = nn.ModuleDict({"transformer": model.decoder})
        self.n_layers = model.cfg.llm_config.num_hidden_layers

    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # The reference cache is head-major (B, K, T, h).
        cache = [(past[2 * i].transpose(1, 2), past[2 * i + 1].transpose(1, 2)) for i in range(self.n_layers)]
        mask = causal_mask(inputs_embeds.shape[1], past[0].shape[1], inputs_embeds.device)

        def attend(q, k, v, past_k, past_v):
            # The reference's own cache update and attention (Decoder's default), returning the chunk's keys and
            # values themselves: slicing them back out of past + chunk cost a Shape/Gather/Sub/Slice chain per
            # layer and step.
            out = grouped_attention(q, torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2), mask, False)
            return out, k, v

        hidden, new = self.model["transformer"](inputs_embeds, position_ids, cache, attend=attend)
        return (hidden, *[t.transpose(1, 2) for pair in new for t in pair])


class _GroupQueryAttention(torch.autograd.Function):
    """onnxruntime's com.microsoft GroupQueryAttention, past and present sharing one cache buffer.

    q (B, S, H*h), k / v (B, S, K*h) with RoPE applied; past_k / past_v (B, K, max_seq, h), the whole
    buffer; seqlens_k (B,) int32 = past + S - 1; total (scalar int32) = past + S. It writes the chunk at
    [past, past + S) and attends causally over [0, past + S). Traced, the forward below computes
    the same in torch (the reference's own grouped_attention) so the tracer sees true values and
    shapes; exported, `symbolic` emits the one onnxruntime node, which runs it in place: onnxruntime
    shares the buffer when past and present are bound to the same memory (runtime/ort_engine.py).
    """

    @staticmethod
    def forward(ctx, q, k, v, past_k, past_v, seqlens_k, total, n_heads: int, n_kv: int, scale: float):
        b, s, _ = q.shape
        h = past_k.shape[-1]
        end = int(total)
        start = end - s
        present_k, present_v = past_k.clone(), past_v.clone()
        present_k[:, :, start:end] = k.reshape(b, s, n_kv, h).transpose(1, 2)
        present_v[:, :, start:end] = v.reshape(b, s, n_kv, h).transpose(1, 2)
        heads = q.reshape(b, s, n_heads, h).transpose(1, 2)
        out = grouped_attention(heads, present_k[:, :, :end], present_v[:, :, :end], causal_mask(s, start, q.device), False)
        return out.transpose(1, 2).reshape(b, s, n_heads * h), present_k, present_v

    @staticmethod
    def symbolic(g, q, k, v, past_k, past_v, seqlens_k, total, n_heads: int, n_kv: int, scale: float):
        out, present_k, present_v = g.op("com.microsoft::GroupQueryAttention", q, k, v, past_k, past_v, seqlens_k,
                                         total, num_heads_i=n_heads, kv_num_heads_i=n_kv, scale_f=scale, outputs=3)
        for value, like in ((out, q), (present_k, past_k), (present_v, past_v)):
            value.setType(like.type())
        return out, present_k, present_v


class _RotaryGroupQueryAttention(torch.autograd.Function):
    """GroupQueryAttention on the packed projection, RoPE inside: one node from att_proj's output to attn_out's input.

    qkv (B, S, (H + 2K) h) as the projection gives it; the node splits it, rotates q and k at positions
    past .. past + S - 1 (half-split layout, `cos_cache` / `sin_cache` (max_seq, h / 2)), writes the chunk
    into the cache and attends, as `_GroupQueryAttention` does. Those positions are the runtime's
    (it feeds position_ids = past + arange(S), runtime/ort_engine.py). The torch forward computes the
    same with the reference's own `apply_rope` and `grouped_attention`.
    """

    @staticmethod
    def forward(ctx, qkv, past_k, past_v, seqlens_k, total, cos_cache, sin_cache, n_heads: int, n_kv: int,
                scale: float):
        b, s, _ = qkv.shape
        h = past_k.shape[-1]
        end = int(total)
        q, k, v = qkv.split((n_heads * h, n_kv * h, n_kv * h), dim=-1)
        cos = torch.cat([cos_cache[end - s:end]] * 2, dim=-1)[None, None]
        sin = torch.cat([sin_cache[end - s:end]] * 2, dim=-1)[None, None]
        # Plain reshapes here: this runs inside apply(), where another Function (split_heads') cannot.
        q = apply_rope(q.reshape(b, s, n_heads, h).transpose(1, 2), cos, sin, h).transpose(1, 2).reshape(b, s, -1)
        k = apply_rope(k.reshape(b, s, n_kv, h).transpose(1, 2), cos, sin, h).transpose(1, 2).reshape(b, s, -1)
        return _GroupQueryAttention.forward(ctx, q, k, v, past_k, past_v, seqlens_k, total, n_heads, n_kv, scale)

    @staticmethod
    def symbolic(g, qkv, past_k, past_v, seqlens_k, total, cos_cache, sin_cache, n_heads: int, n_kv: int,
                 scale: float):
        absent = []
        for _ in range(2):      # key and value: absent, so the node reads them from the packed query
            value = g.op("prim::Constant")
            value.setType(torch._C.OptionalType.ofTensor())
            absent.append(value)
        out, present_k, present_v = g.op("com.microsoft::GroupQueryAttention", qkv, *absent, past_k, past_v,
                                         seqlens_k, total, cos_cache, sin_cache, num_heads_i=n_heads,
                                         kv_num_heads_i=n_kv, scale_f=scale, do_rotary_i=1, rotary_interleaved_i=0,
                                         outputs=3)
        out.setType(qkv.type().with_sizes([None, None, None]))
        for value, like in ((present_k, past_k), (present_v, past_v)):
            value.setType(like.type())
        return out, present_k, present_v


class FusedDecoderStage(nn.Module):
    """inputs_embeds, position_ids, seqlens_k, total_sequence_length, the whole cache buffers -> hidden_states, presents.

    The fused form of the decoder (stage_io.FUSED_ATTENTION): each block's cache update and attention
    is one GroupQueryAttention node over a head-major (1, K, max_seq, h) buffer that the runtime
    binds as past and present at once, so a step never copies or transposes the cache and binds
    only the chunk's tensors. Where a block has no q/k norms, the node also takes the packed
    projection and applies RoPE itself (`_RotaryGroupQueryAttention`): per layer, the head splits,
    rotations and merges (~20 nodes) are gone. Everything else is the reference's own arithmetic.
    """

    uses_contrib_ops = True

    def __init__(self, model: MolmoActModel, max_seq: int):
        super().__init__()
        self.model = nn.ModuleDict({"transformer": model.decoder})
        llm = model.cfg.llm_config
        self.n_layers = llm.num_hidden_layers
        # Python ints from the config, not traced sizes: they become the node's attributes.
        self.heads = (llm.num_attention_heads, llm.num_key_value_heads, llm.head_dim)
        # The rotary tables of positions 0 .. max_seq - 1, the reference's own angles (rope_cos_sin), half-width.
        cos, sin = rope_cos_sin(torch.arange(max_seq)[None], llm.head_dim, llm.rope_theta)
        self.register_buffer("rope_cos", cos[0, 0, :, :llm.head_dim // 2].contiguous(), persistent=False)
        self.register_buffer("rope_sin", sin[0, 0, :, :llm.head_dim // 2].contiguous(), persistent=False)

    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, seqlens_k: torch.Tensor,
                total_sequence_length: torch.Tensor, *cache: torch.Tensor) -> tuple[torch.Tensor, ...]:
        n_heads, n_kv, h = self.heads

        def attend(q, k, v, past_k, past_v):
            flat = [merge_heads(t.transpose(1, 2), n * h) for t, n in ((q, n_heads), (k, n_kv), (v, n_kv))]
            out, present_k, present_v = _GroupQueryAttention.apply(
                *flat, past_k, past_v, seqlens_k, total_sequence_length, n_heads, n_kv, 1.0 / math.sqrt(h))
            return split_heads(out, n_heads, h).transpose(1, 2), present_k, present_v

        def packed(qkv, past_k, past_v):
            return _RotaryGroupQueryAttention.apply(qkv, past_k, past_v, seqlens_k, total_sequence_length,
                                                    self.rope_cos, self.rope_sin, n_heads, n_kv, 1.0 / math.sqrt(h))

        attend.packed = packed
        past = [(cache[2 * i], cache[2 * i + 1]) for i in range(self.n_layers)]
        hidden, present = self.model["transformer"](inputs_embeds, position_ids, past, attend=attend)
        return (hidden, *[t for pair in present for t in pair])


# ------------------------------------------------------------------------------ I/O contracts
def patch_feature_width(model: MolmoActModel) -> int:
    """F: the ViT width times the number of adapter_config.vit_layers concatenated per patch."""
    return model.cfg.vit_config.hidden_size * len(model.vision.vit_layers)


def vision_io(model: MolmoActModel) -> tuple[list[TensorSpec], list[TensorSpec]]:
    v = model.cfg.vit_config
    n_patches = v.image_num_pos - (1 if v.use_cls_token else 0)
    inputs = [
        TensorSpec(io.IMAGES, "float32", (io.N_CROPS, n_patches, v.patch_dim),
                   "crops, patchified and normalized by the preprocessor; patch pixels in (py, px, channel) order. "
                   "The runtime feeds one crop per call (n_crops = 1); crops never attend to each other"),
        TensorSpec(io.IMAGE_MASKS, "float32", (io.N_CROPS, n_patches),
                   "share of real (non-padding) pixels per patch; read by -O's padding embeddings, ignored by -D"),
    ]
    outputs = [TensorSpec(io.PATCH_FEATURES, "float32", (io.N_CROPS, n_patches, patch_feature_width(model)),
                          "per patch, the outputs of the ViT layers adapter_config.vit_layers concatenated in that "
                          "order (CLS dropped; -O: padding embeddings added): the connector's input")]
    return inputs, outputs


def connector_io(model: MolmoActModel, patches_per_token: int) -> tuple[list[TensorSpec], list[TensorSpec]]:
    cfg = model.cfg
    v = cfg.vit_config
    n_patches = v.image_num_pos - (1 if v.use_cls_token else 0)
    inputs = [
        TensorSpec(io.PATCH_FEATURES, "float32", (io.N_CROPS, n_patches, patch_feature_width(model)),
                   "the vision stage's patch_features of every crop of the observation (global view first), in order"),
        TensorSpec(io.POOLED_PATCHES_IDX, "int64", (io.N_TOKENS, patches_per_token),
                   "per pooled image token, the patches (flat index over crops x patches) it pools; -1 = padding"),
    ]
    outputs = [TensorSpec(io.IMAGE_FEATURES, "float32", (io.N_TOKENS, cfg.llm_config.hidden_size),
                          "one LLM-width feature per row of pooled_patches_idx, ALL rows: the runtime drops rows whose "
                          "indices are all -1 (as MolmoAct does) and adds the i-th remaining row to the embedding of "
                          "the i-th <im_patch> token")]
    return inputs, outputs


def decoder_io(model: MolmoActModel, fused_max_seq: int | None = None) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The portable decoder's contract; with fused_max_seq, the fused form's: the cache buffers are then
    whole, head-major and fixed at that many positions, and the chunk's lengths are inputs."""
    l = model.cfg.llm_config
    K, h, D = l.num_key_value_heads, l.head_dim, l.hidden_size
    b, s, p = io.BATCH, io.SEQ, io.PAST_SEQ
    fused = fused_max_seq is not None
    inputs = [
        TensorSpec(io.INPUTS_EMBEDS, "float32", (b, s, D),
                   "embeddings of the chunk's tokens (the `embedding` table row; plus the image feature at <im_patch>)"),
        TensorSpec(io.POSITION_IDS, "int64", (b, s),
                   "RoPE positions: past + 0 .. seq-1" if fused else
                   "RoPE positions: past_seq + 0 .. seq-1. Attention is causal from the shapes alone (no mask "
                   "input): every row of a batch has the same past, no padding (batch 1 on the robot)"),
    ]
    if fused:
        inputs += [
            TensorSpec(io.SEQLENS_K, "int32", (b,), "past + seq - 1 per row: where the chunk's last entry is written"),
            TensorSpec(io.TOTAL_SEQUENCE_LENGTH, "int32", (), "past + seq: positions attended to (causal within the chunk)"),
        ]
    outputs = [TensorSpec(io.HIDDEN_STATES, "float32", (b, s, D),
                          "hidden states after the final norm; logits = hidden_states @ lm_head.T")]
    for n in range(l.num_hidden_layers):
        if fused:
            block = (b, K, fused_max_seq, h)
            inputs += [TensorSpec(io.past_key(n), "float32", block, f"layer {n} key cache, head-major, the whole buffer "
                                                                     "(RoPE applied); positions >= past unread"),
                       TensorSpec(io.past_value(n), "float32", block, f"layer {n} value cache, the whole buffer")]
            outputs += [TensorSpec(io.present_key(n), "float32", block,
                                   f"layer {n} key cache with the chunk written at [past, past + seq): bind it to "
                                   f"past_key.{n}'s memory and onnxruntime updates the cache in place"),
                        TensorSpec(io.present_value(n), "float32", block, f"layer {n} value cache, as present_key")]
            continue
        inputs += [
            TensorSpec(io.past_key(n), "float32", (b, p, K, h),
                       f"layer {n} keys of the past positions, RoPE applied, seq-major; past_seq may be 0"),
            TensorSpec(io.past_value(n), "float32", (b, p, K, h), f"layer {n} values of the past positions, seq-major"),
        ]
        outputs += [
            TensorSpec(io.new_key(n), "float32", (b, s, K, h),
                       f"layer {n} keys of this chunk only (RoPE applied): write at cache[past_seq:past_seq+seq]"),
            TensorSpec(io.new_value(n), "float32", (b, s, K, h), f"layer {n} values of this chunk only"),
        ]
    return inputs, outputs


# ---------------------------------------------------------------------------------- exporting
def export_stage(module: nn.Module, example: tuple[torch.Tensor, ...], inputs: list[TensorSpec],
                 outputs: list[TensorSpec], path: Path, opset: int = DEFAULT_OPSET):
    """Trace `module` on `example` to an ONNX file at `path`, then return the finished ModelProto."""
    import onnx

    dynamic_axes = {t.name: {axis: d for axis, d in enumerate(t.dims) if isinstance(d, str)} for t in (*inputs, *outputs)}
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns about every Python int it records from a shape and about its own deprecation;
        # dynamic_axes make those shape reads symbolic, and the tests run each graph at other sizes.
        warnings.simplefilter("ignore")
        torch.onnx.export(module, example, str(path), input_names=[t.name for t in inputs],
                          output_names=[t.name for t in outputs], dynamic_axes=dynamic_axes,
                          opset_version=opset, dynamo=False, do_constant_folding=True,
                          custom_opsets={"com.microsoft": 1} if getattr(module, "uses_contrib_ops", False) else None)
    proto = onnx.load(str(path))
    finish_graph(proto, module, inputs)
    return proto


def finish_graph(proto, module: nn.Module, inputs: list[TensorSpec]) -> None:
    """Name MatMul weights after checkpoint tensors, restore dropped inputs, refuse Gemm (see module doc)."""
    gemms = [n.name for n in proto.graph.node if n.op_type == "Gemm"]
    if gemms:
        raise BundleError(f"the exporter produced Gemm nodes {gemms[:3]}; stages must use MatMul with (in, out) "
                          "weights for the int4 quantizer: feed Linear layers 3-D inputs")
    _name_matmul_weights(proto, module)
    _restore_inputs(proto, inputs)


def _name_matmul_weights(proto, module: nn.Module) -> None:
    """Match each MatMul weight to the parameter whose transpose it is, by content (the tracer dropped the name)."""
    def key(shape, data: bytes) -> tuple:
        return tuple(shape), hashlib.sha1(data).hexdigest()

    transposed = {}
    for name, param in module.named_parameters():
        if param.dim() == 2 and param.dtype == torch.float32:
            transposed[key(param.shape[::-1], param.detach().t().contiguous().numpy().tobytes())] = name + TRANSPOSED_SUFFIX
    inits = {t.name: t for t in proto.graph.initializer}
    taken = set(inits)
    renames: dict[str, str] = {}
    for node in proto.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits or node.input[1] in renames:
            continue
        old = node.input[1]
        new = transposed.get(key(inits[old].dims, inits[old].raw_data))
        if new is not None and new not in taken:
            renames[old] = new
            taken.add(new)
    for tensor in proto.graph.initializer:
        tensor.name = renames.get(tensor.name, tensor.name)
    for node in proto.graph.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]


def _restore_inputs(proto, inputs: list[TensorSpec]) -> None:
    """Add declared inputs the graph does not read (legal ONNX), so both variants share one contract."""
    from onnx import TensorProto, helper

    present = [v.name for v in proto.graph.input]
    elem = {"float32": TensorProto.FLOAT, "int64": TensorProto.INT64}
    for position, spec in enumerate(inputs):
        if spec.name not in present:
            info = helper.make_tensor_value_info(spec.name, elem[spec.dtype], list(spec.dims))
            proto.graph.input.insert(position, info)
            present.insert(position, spec.name)
