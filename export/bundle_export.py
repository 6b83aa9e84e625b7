"""Checkpoint -> bundle: the vision, connector and decoder ONNX stages, embedding and LM-head arrays, tokenizer, grammar, statistics.

Shape ranges and engine profiles are derived here, once, from the model and its preprocessor
(a typical 640x480 camera frame and the MolmoAct prompt give the `opt` sizes); the TensorRT
engine builder and the runtime read them from the manifest and never repeat them.

External data: a stage's weights go into `stages/NAME.onnx.data` beside the graph when they
exceed EXTERNAL_DATA_BYTES (protobuf caps a single file at 2 GB; a 7B decoder is 15-30 GB).
Smaller stages are one self-contained .onnx file. Consumers must accept both, as the manifest's
`external_data` lists say (`onnx.load(path)` and onnxruntime resolve them beside the file).
"""
from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgeact.runtime import stage_io as io
from edgeact.runtime.answer import grammar_record
from edgeact.runtime.errors import ConfigError

EXTERNAL_DATA_BYTES = 1 << 30
TYPICAL_FRAME_HW = (480, 640)            # a RealSense D435 colour stream: the `opt` of the vision shapes
TYPICAL_INSTRUCTION = "pick up the red block and put it in the bowl"
TYPICAL_ANSWER_TOKENS = 256              # depth 102 + trace ~50 + sentences ~40 + actions ~20, rounded up
EXPORT_STEPS = ("load checkpoint", "export vision", "export decoder", "write weights and tokenizer", "publish bundle")


# The fused decoder is traced on a 5-token chunk written after 3 filled positions (_fused_decoder_example), so its
# cache buffers must hold at least 8.
FUSED_EXAMPLE_CHUNK, FUSED_EXAMPLE_POSITIONS = 5, 8


@dataclass(frozen=True)
class ExportOptions:
    max_seq: int | None = None      # decoder positions (prompt + answer); default the config's max_position_embeddings
    max_images: int = 2             # camera images per observation the vision ranges allow
    n_actions: int = 1              # actions per answer in the recorded grammar (fine-tuned checkpoints: 8)
    opset: int | None = None        # default onnx_export.DEFAULT_OPSET
    external_data: bool | None = None   # None: only stages whose weights exceed EXTERNAL_DATA_BYTES
    name: str = ""                  # free-form model name for the manifest (default: the checkpoint's directory name)
    # The attention's form (runtime/stage_io.py): "fused", onnxruntime's GroupQueryAttention over an in-place
    # cache in the decoder and its MultiHeadAttention in the ViT (the CPU runtime's fast form); "portable",
    # standard ONNX ops (TensorRT, onnxruntime's GPU EPs).
    attention: str = io.FUSED_ATTENTION

    def __post_init__(self) -> None:
        if self.max_seq is not None and self.max_seq < 2:
            raise ConfigError(f"max_seq is {self.max_seq}; a decoder needs room for a prompt and an answer (e.g. 2048)")
        if self.max_seq is not None and self.attention == io.FUSED_ATTENTION and self.max_seq < FUSED_EXAMPLE_POSITIONS:
            raise ConfigError(f"max_seq is {self.max_seq}; the fused attention's export traces {FUSED_EXAMPLE_POSITIONS} "
                              f"positions, so it needs max_seq >= {FUSED_EXAMPLE_POSITIONS} (a prompt and an answer "
                              f"need hundreds: e.g. 2048), or --attention {io.PORTABLE_ATTENTION}")
        if self.max_images < 1:
            raise ConfigError(f"max_images is {self.max_images}; allow at least one camera image")
        if self.n_actions < 1:
            raise ConfigError(f"n_actions is {self.n_actions}; use 1 or the checkpoint's chunk size (8)")
        if self.attention not in io.DECODER_ATTENTIONS:
            raise ConfigError(f"attention {self.attention!r} unknown; use {io.FUSED_ATTENTION} (onnxruntime on a CPU) "
                              f"or {io.PORTABLE_ATTENTION} (TensorRT, onnxruntime's CUDA / TensorRT EPs)")
        if self.opset is not None and self.opset < 17:
            raise ConfigError(f"opset {self.opset} is too old: LayerNormalization needs 17; use 19 (default) or newer")
        if self.opset is not None and self.opset > (newest := _newest_opset()):
            raise ConfigError(f"opset {self.opset}: torch's ONNX exporter writes opsets up to {newest}, and edgeact "
                              f"needs 17 or newer; use 19 (default) or another from 17 to {newest}")


def _newest_opset() -> int:
    """The newest opset torch's TorchScript exporter (onnx_export.py) writes: torch.onnx's ONNX_MAX_OPSET."""
    try:
        from torch.onnx._constants import ONNX_MAX_OPSET
    except ImportError:         # a torch that moved it: its exporter refuses what it cannot write, with a traceback
        return 23               # torch 2.13's value
    return ONNX_MAX_OPSET


def export_bundle(checkpoint_dir: str | Path, out_dir: str | Path, options: ExportOptions = ExportOptions(), *,
                  overwrite: bool = False, on_step: Callable[[str], None] | None = None,
                  before_publish: Callable[[Path], Any] | None = None) -> Path:
    """Export a MolmoAct checkpoint into a bundle at `out_dir` (written atomically); verification is 'not_run'.

    before_publish(staged_dir): runs on the finished bundle before it is published (or replaces one at
    `out_dir`), e.g. `lambda staged: verify_bundle(staged)`: the verdict is then in the bundle that appears
    at `out_dir`, and an earlier bundle there stays until it is recorded. The model is freed before it runs.
    """
    import gc

    from edgeact.export.bundle_writer import BundleWriter

    step = on_step or (lambda name: None)
    checkpoint_dir, out_dir = Path(checkpoint_dir).absolute(), Path(out_dir).absolute()
    # Refuses an existing bundle before the long work.
    writer = BundleWriter(out_dir, overwrite=overwrite, before_publish=before_publish)
    with writer:
        _write_bundle(writer, checkpoint_dir, out_dir, options, step)
        gc.collect()        # the model goes before before_publish (verification) loads its own reference copy
    step(EXPORT_STEPS[4])
    return out_dir


def _write_bundle(writer, checkpoint_dir: Path, out_dir: Path, options: ExportOptions,
                  step: Callable[[str], None]) -> None:
    """Everything export_bundle writes into the open `writer`; the model lives only in this frame."""
    import torch

    from edgeact.calibration.calibration_set import weights_sha256
    from edgeact.export.checkpoint import load_model
    from edgeact.export.onnx_export import DEFAULT_OPSET, DecoderStage, FusedDecoderStage, decoder_io, export_stage
    from edgeact.runtime.bundle import sha256_file
    from edgeact.runtime.grammar import AnswerGrammar
    from edgeact.runtime.preprocess import ImagePreprocessor
    from edgeact.runtime.preprocess_config import PreprocessConfig
    from edgeact.runtime.token_layout import TokenLayout, load_tokenizer

    opset = options.opset or DEFAULT_OPSET
    model, ckpt = load_model(checkpoint_dir, dtype=torch.float32)
    cfg = model.cfg
    max_seq = _max_seq(options, cfg.llm_config.max_position_embeddings)
    tokenizer = load_tokenizer(ckpt.tokenizer_path)
    layout = TokenLayout.from_tokenizer(tokenizer, str(ckpt.tokenizer_path))
    AnswerGrammar(tokenizer, layout, n_actions=options.n_actions)   # the tokenizer must support the answer grammar
    preprocess = ckpt.preprocess_config or PreprocessConfig.for_model(cfg)
    preprocessor = ImagePreprocessor(cfg, preprocess)
    typical = _typical_sizes(preprocessor, tokenizer, layout)
    step(EXPORT_STEPS[0])

    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.trace-") as scratch:
        _export_vision(writer, model, preprocessor, options, typical, Path(scratch), opset)
        step(EXPORT_STEPS[1])

        if options.attention == io.FUSED_ATTENTION:
            din, dout = decoder_io(model, fused_max_seq=max_seq)
            stage, example = FusedDecoderStage(model, max_seq), _fused_decoder_example(model, max_seq)
            doc = ("the LLM trunk for prefill chunks and single decode steps alike, fused form: each layer's "
                   "attention is onnxruntime's GroupQueryAttention writing the chunk into the (1, K, max_seq, h) "
                   "cache buffers bound as both past and present; max_seq = dim_ranges.seq.max")
        else:
            din, dout = decoder_io(model)
            stage, example = DecoderStage(model), _decoder_example(model)
            doc = ("the LLM trunk for prefill chunks and single decode steps alike; returns only the new "
                   "cache entries, which the runtime writes into its (1, max_seq, K, h) buffers; "
                   "max_seq = dim_ranges.seq.max")
        proto = export_stage(stage.eval(), example, din, dout, Path(scratch) / "decoder.onnx", opset)
        ranges, profiles = _decoder_ranges(max_seq, typical["prompt_tokens"], options.attention)
        writer.add_onnx(io.DECODER_STAGE, proto, precision="fp32", inputs=din, outputs=dout, dim_ranges=ranges,
                        profiles=profiles, external_data=_external(options, proto), doc=doc)
        del proto
        step(EXPORT_STEPS[2])

        with torch.no_grad():
            wte = model.decoder.wte
            writer.add_array(io.EMBEDDING_WEIGHT, torch.cat([wte.embedding, wte.new_embedding]).numpy())
            head = wte.embedding if cfg.llm_config.tie_word_embeddings else model.lm_head.weight
            writer.add_array(io.LM_HEAD_WEIGHT, head.numpy())
        writer.add_tokenizer(ckpt.tokenizer_path, preprocess.to_dict(), base_vocab_size=layout.base_vocab_size,
                             bos_id=layout.bos_id, image_patch_id=layout.im_patch_id)
        writer.set_model(cfg, checkpoint=checkpoint_dir, config_sha256=sha256_file(checkpoint_dir / "config.json"),
                         weights_sha256=weights_sha256("checkpoint", checkpoint_dir),
                         name=options.name or checkpoint_dir.name, depth_codes=trained_depth_codes(checkpoint_dir))
        writer.set_grammar(grammar_record(options.n_actions))
        writer.set_norm_stats(ckpt.norm_stats)
        step(EXPORT_STEPS[3])


def trained_depth_codes(checkpoint_dir: Path) -> str:
    """The depth codes the checkpoint was trained on, as `edgeact train-reference` logged them ("" if not logged)."""
    import json

    from edgeact.export.train_reference import LOG_FILE

    log = checkpoint_dir / LOG_FILE
    try:
        value = json.loads(log.read_text()).get("depth_codes", "") if log.is_file() else ""
    except (OSError, ValueError, AttributeError):
        return ""
    return value if isinstance(value, str) else ""


def _max_seq(options: ExportOptions, config_max: int) -> int:
    if options.max_seq is None:
        return config_max
    if options.max_seq > config_max:
        raise ConfigError(f"max_seq {options.max_seq} exceeds the model's max_position_embeddings {config_max}; "
                          f"use --max-seq {config_max} or less")
    return options.max_seq


def _external(options: ExportOptions, proto) -> bool:
    if options.external_data is not None:
        return options.external_data
    from onnx.helper import tensor_dtype_to_np_dtype

    weight_bytes = sum(math.prod(t.dims) * tensor_dtype_to_np_dtype(t.data_type).itemsize for t in proto.graph.initializer)
    return weight_bytes > EXTERNAL_DATA_BYTES


def _typical_sizes(preprocessor, tokenizer, layout) -> dict[str, int]:
    from edgeact.runtime.prompt import build_prompt_ids

    inputs = preprocessor(np.zeros((*TYPICAL_FRAME_HW, 3), np.uint8))
    prompt = build_prompt_ids(tokenizer, layout, TYPICAL_INSTRUCTION, inputs)
    return {"crops": int(inputs.images.shape[0]), "tokens": inputs.n_image_tokens, "prompt_tokens": len(prompt)}


def _export_vision(writer, model, preprocessor, options: ExportOptions, typical: dict[str, int], scratch: Path,
                   opset: int) -> None:
    """The ViT (`vision`, run crop by crop) and the pooling + projector (`connector`, all crops at once)."""
    import torch

    from edgeact.export.onnx_export import ConnectorStage, VisionStage, connector_io, export_stage, vision_io

    images, masks, idx = _vision_example(preprocessor)
    pool_h, pool_w = preprocessor.config.pooling
    vision_ranges, connector_ranges = _vision_ranges(preprocessor, options.max_images, typical)
    vin, vout = vision_io(model)
    vit = VisionStage(model, fused=options.attention == io.FUSED_ATTENTION).eval()
    proto = export_stage(vit, (images, masks), vin, vout, scratch / "vision.onnx", opset)
    # The graph takes a batch of crops (dim_ranges), but engines are built for what the runtime runs: one
    # crop per call. A batch profile would size TensorRT's activation memory for every crop at once.
    writer.add_onnx(io.VISION_STAGE, proto, precision="fp32", inputs=vin, outputs=vout, dim_ranges=vision_ranges,
                    profiles=[{"name": "crop", "dim_ranges": {io.N_CROPS: (1, 1, 1)}}],
                    external_data=_external(options, proto),
                    doc="the ViT, one crop per call: per patch, the concatenated outputs of adapter_config.vit_layers")
    del proto
    with torch.no_grad():      # the connector is traced on the ViT's real output for the example crops
        features = VisionStage(model).eval()(images, masks)
    cin, cout = connector_io(model, pool_h * pool_w)
    proto = export_stage(ConnectorStage(model).eval(), (features, idx), cin, cout, scratch / "connector.onnx", opset)
    writer.add_onnx(io.CONNECTOR_STAGE, proto, precision="fp32", inputs=cin, outputs=cout, dim_ranges=connector_ranges,
                    external_data=_external(options, proto),
                    doc="2x2 attention pooling over every crop's patch features + projector: one LLM-width feature "
                        "per pooled image token")


def _vision_ranges(preprocessor, max_images: int, typical: dict[str, int]) -> tuple[dict, dict]:
    """(vision ranges, connector ranges)."""
    pool_h, pool_w = preprocessor.config.pooling
    max_crops = (preprocessor.config.max_crops + 1) * max_images
    # Every patch is pooled at most once, and a stitched grid never exceeds its crops' patches, so a
    # crop contributes at most ceil(side / pool) ** 2 tokens.
    side = preprocessor.crop_patches
    max_tokens = max_crops * math.ceil(side / pool_h) * math.ceil(side / pool_w)
    crops = (1, min(typical["crops"], max_crops), max_crops)
    return ({io.N_CROPS: (1, 1, max_crops)},
            {io.N_CROPS: crops, io.N_TOKENS: (1, min(typical["tokens"], max_tokens), max_tokens)})


def _decoder_ranges(max_seq: int, prompt_tokens: int, attention: str = io.PORTABLE_ATTENTION) -> tuple[dict, list[dict]]:
    prompt = min(prompt_tokens, max_seq)
    if attention == io.FUSED_ATTENTION:
        # onnxruntime only (no engine profiles); the cache buffers are fixed at max_seq positions.
        return {io.BATCH: (1, 1, 1), io.SEQ: (1, prompt, max_seq)}, []
    from edgeact.runtime.bundle_policy import DEVICE_PREFILL_CHUNK

    past_max = max_seq - 1      # the runtime keeps past_seq + seq <= max_seq (its cache size)
    ranges = {io.BATCH: (1, 1, 1), io.SEQ: (1, prompt, max_seq), io.PAST_SEQ: (0, min(prompt, past_max), past_max)}
    # A GPU runtime feeds at most DEVICE_PREFILL_CHUNK positions per run (its TensorRT decoder caps larger chunks at
    # the profile's seq max); a box cannot bound past_seq + seq itself, so the widest shape an engine plans for is
    # chunk + max_seq - 1 positions of attention, not 2 * max_seq - 1.
    chunk = min(DEVICE_PREFILL_CHUNK, max_seq)
    profiles = [
        # Prompt prefill (past 0) and the answer's fixed sentences fed as chunks after a past.
        {"name": "prefill", "dim_ranges": {io.SEQ: (1, min(prompt, chunk), chunk), io.PAST_SEQ: (0, 0, past_max)}},
        {"name": "decode", "dim_ranges": {io.SEQ: (1, 1, 1),
                                          io.PAST_SEQ: (0, min(prompt + TYPICAL_ANSWER_TOKENS, past_max), past_max)}},
    ]
    return ranges, profiles


def _vision_example(preprocessor):
    """Real preprocessor output for a small synthetic frame: indices with padding rows, as at run time."""
    import torch

    from edgeact.drivers.cameras.synthetic import SyntheticCamera, SyntheticConfig

    frame = SyntheticCamera(SyntheticConfig(width=160, height=120)).render(0).color
    inputs = preprocessor(frame)
    return tuple(torch.from_numpy(np.array(a)) for a in (inputs.images, inputs.image_masks, inputs.pooled_patches_idx))


def _fused_decoder_example(model, max_seq: int):
    """The fused form's example: a 5-token chunk written after 3 filled positions of max_seq-long buffers."""
    import torch

    l = model.cfg.llm_config
    gen = torch.Generator().manual_seed(0)
    n_new, n_past = FUSED_EXAMPLE_CHUNK, FUSED_EXAMPLE_POSITIONS - FUSED_EXAMPLE_CHUNK
    cache = [torch.zeros(1, l.num_key_value_heads, max_seq, l.head_dim) for _ in range(2 * l.num_hidden_layers)]
    for block in cache:
        block[:, :, :n_past] = torch.randn(1, l.num_key_value_heads, n_past, l.head_dim, generator=gen)
    total = n_past + n_new
    return (torch.randn(1, n_new, l.hidden_size, generator=gen), torch.arange(n_past, total)[None],
            torch.tensor([total - 1], dtype=torch.int32), torch.tensor(total, dtype=torch.int32), *cache)


def _decoder_example(model):
    """A 5-token chunk after 3 past positions: neither size is 0 or 1, which a tracer could treat as special."""
    import torch

    l = model.cfg.llm_config
    gen = torch.Generator().manual_seed(0)
    n_new, n_past = FUSED_EXAMPLE_CHUNK, FUSED_EXAMPLE_POSITIONS - FUSED_EXAMPLE_CHUNK
    past = [torch.randn(1, n_past, l.num_key_value_heads, l.head_dim, generator=gen)
            for _ in range(2 * l.num_hidden_layers)]
    return (torch.randn(1, n_new, l.hidden_size, generator=gen), torch.arange(n_past, n_past + n_new)[None], *past)
