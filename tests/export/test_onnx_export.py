"""Exported vision, connector and decoder stages compute what the PyTorch reference computes; greedy decoding with them is identical."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from edgeact.drivers.cameras.synthetic import SyntheticCamera, SyntheticConfig
from edgeact.export.bundle_export import ExportOptions, export_bundle
from edgeact.export.checkpoint import load_model
from edgeact.export.generate import generate_greedy
from edgeact.export.onnx_export import DEFAULT_OPSET, TRANSPOSED_SUFFIX
from edgeact.export.synthetic import make_checkpoint
from edgeact.export.verify_compare import closeness
from edgeact.runtime import stage_io as io
from edgeact.runtime.bundle import load_bundle
from edgeact.runtime.errors import ConfigError, EdgeactError, SequenceTooLongError
from edgeact.runtime.grammar import AnswerGrammar
from edgeact.runtime.grammar_walk import MaskedGreedyConstraint
from edgeact.runtime.ort_stages import OrtStage, OrtStages
from edgeact.runtime.preprocess import ImagePreprocessor
from edgeact.runtime.prompt import build_prompt_ids
from edgeact.runtime.token_layout import TokenLayout, load_tokenizer
from edgeact.runtime.vision_stages import VisionStages

COSINE = 0.99999


class Exported:
    """A tiny checkpoint, its reference model and its exported bundle."""

    def __init__(self, root, variant: str, attention: str = io.FUSED_ATTENTION):
        self.attention = attention
        self.checkpoint = make_checkpoint(variant, "tiny", seed=3, out_dir=root / f"ck{variant}")
        self.bundle_dir = export_bundle(self.checkpoint, root / f"bundle{variant}", ExportOptions(attention=attention))
        self.model, self.ckpt = load_model(self.checkpoint)
        self.bundle = load_bundle(self.bundle_dir)
        self.tokenizer = load_tokenizer(self.ckpt.tokenizer_path)
        self.layout = TokenLayout.from_tokenizer(self.tokenizer)
        self.preprocessor = ImagePreprocessor(self.ckpt.config, self.ckpt.preprocess_config)

    def observation(self, width: int, height: int, frame: int, instruction: str = "pick up the red block"):
        inputs = self.preprocessor(SyntheticCamera(SyntheticConfig(width=width, height=height)).render(frame).color)
        return inputs, build_prompt_ids(self.tokenizer, self.layout, instruction, inputs)


@pytest.fixture(scope="module", params=[("D", io.FUSED_ATTENTION), ("O", io.FUSED_ATTENTION),
                                        ("D", io.PORTABLE_ATTENTION), ("O", io.PORTABLE_ATTENTION)],
                ids=lambda p: "-".join(p))
def exported(request, tmp_path_factory):
    variant, attention = request.param
    return Exported(tmp_path_factory.mktemp(f"export{variant}{attention}"), variant, attention)


def _tensors(*arrays):
    return tuple(torch.from_numpy(np.array(a)) for a in arrays)


def test_stages_declare_named_dynamic_io_and_ranges_from_the_config(exported):
    m = exported.bundle.manifest
    llm = exported.model.cfg.llm_config
    assert tuple(m.stages) == io.MODEL_STAGES
    vision, connector, decoder = (m.stages[name] for name in io.MODEL_STAGES)
    vit, adapter = exported.model.cfg.vit_config, exported.model.cfg.adapter_config
    n_patches = vit.image_num_pos - vit.use_cls_token
    width = vit.hidden_size * len(adapter.vit_layers)
    assert [t.name for t in vision.inputs] == [io.IMAGES, io.IMAGE_MASKS]
    assert [(t.name, t.dims) for t in vision.outputs] == [(io.PATCH_FEATURES, (io.N_CROPS, n_patches, width))]
    # The graph takes a batch of crops; engines are built for one crop per call, as the runtime runs it.
    assert vision.dim_ranges[io.N_CROPS].max == connector.dim_ranges[io.N_CROPS].max > 1
    assert [(p.name, p.dim_ranges[io.N_CROPS].max) for p in vision.profiles] == [("crop", 1)]
    assert [t.name for t in connector.inputs] == [io.PATCH_FEATURES, io.POOLED_PATCHES_IDX]
    assert connector.inputs[0].dims == vision.outputs[0].dims
    assert connector.outputs[0].dims == (io.N_TOKENS, llm.hidden_size)
    names = [t.name for t in decoder.inputs]
    pasts = [n for layer in range(llm.num_hidden_layers) for n in (io.past_key(layer), io.past_value(layer))]
    K, h, max_seq = llm.num_key_value_heads, llm.head_dim, llm.max_position_embeddings
    assert decoder.dim_ranges[io.SEQ].max == max_seq
    if exported.attention == io.FUSED_ATTENTION:
        assert names == [io.INPUTS_EMBEDS, io.POSITION_IDS, io.SEQLENS_K, io.TOTAL_SEQUENCE_LENGTH, *pasts]
        assert decoder.inputs[4].dims == decoder.outputs[1].dims == (io.BATCH, K, max_seq, h)     # whole, head-major
        assert decoder.outputs[1].name == io.present_key(0) and decoder.profiles == ()
    else:
        assert names == [io.INPUTS_EMBEDS, io.POSITION_IDS, *pasts]
        assert decoder.inputs[2].dims == (io.BATCH, io.PAST_SEQ, K, h)      # seq-major
        assert decoder.outputs[1].dims == (io.BATCH, io.SEQ, K, h)
        assert decoder.dim_ranges[io.PAST_SEQ].min == 0
        # Engines take the chunks a GPU runtime feeds (DEVICE_PREFILL_CHUNK), not the whole cache in one run.
        from edgeact.runtime.bundle_policy import DEVICE_PREFILL_CHUNK

        assert {p.name: p.dim_ranges[io.SEQ].max for p in decoder.profiles} == {
            "prefill": min(DEVICE_PREFILL_CHUNK, max_seq), "decode": 1}
    assert all(t.doc for stage in (vision, connector, decoder) for t in (*stage.inputs, *stage.outputs))
    assert m.weights[io.EMBEDDING_WEIGHT].shape == (llm.vocab_size + llm.additional_vocab_size, llm.hidden_size)
    assert m.grammar["n_actions"] == 1 and m.verification.status == "not_run"


def test_the_prefill_profile_takes_the_chunks_a_gpu_runtime_feeds_not_the_whole_cache():
    from edgeact.export.bundle_export import _decoder_ranges
    from edgeact.runtime.bundle_policy import DEVICE_PREFILL_CHUNK

    max_seq = 4 * DEVICE_PREFILL_CHUNK
    ranges, profiles = _decoder_ranges(max_seq, 1500)
    prefill, decode = (p["dim_ranges"] for p in profiles)
    assert [p["name"] for p in profiles] == ["prefill", "decode"]
    assert prefill[io.SEQ] == (1, DEVICE_PREFILL_CHUNK, DEVICE_PREFILL_CHUNK)       # not max_seq positions at once
    assert prefill[io.PAST_SEQ] == (0, 0, max_seq - 1)     # a chunk after any past the cache holds
    assert decode[io.SEQ] == (1, 1, 1) and ranges[io.SEQ] == (1, 1500, max_seq)     # the graph takes any chunk
    # A cache shorter than the chunk: the whole cache, the typical prompt as opt.
    assert _decoder_ranges(512, 165)[1][0]["dim_ranges"][io.SEQ] == (1, 165, 512)
    assert _decoder_ranges(max_seq, 1500, io.FUSED_ATTENTION) == ({io.BATCH: (1, 1, 1), io.SEQ: (1, 1500, max_seq)}, [])


def test_linears_are_matmuls_with_in_out_weights_named_after_the_checkpoint(exported):
    tensors = exported.ckpt.tensors
    for stage in io.MODEL_STAGES:
        proto = onnx.load(str(exported.bundle.stage_path(stage)))
        onnx.checker.check_model(proto, full_check=True)
        contrib = {n.op_type for n in proto.graph.node if n.domain == "com.microsoft"}
        fused = {io.DECODER_STAGE: {"GroupQueryAttention"}, io.VISION_STAGE: {"MultiHeadAttention"}}
        want = fused.get(stage, set()) if exported.attention == io.FUSED_ATTENTION else set()
        assert contrib == want       # portable graphs: standard ops only
        assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= DEFAULT_OPSET
        assert not [n for n in proto.graph.node if n.op_type == "Gemm"]
        inits = {t.name: t for t in proto.graph.initializer}
        weights = [n.input[1] for n in proto.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
        assert weights and all(w.endswith(TRANSPOSED_SUFFIX) for w in weights)
        for w in weights:
            original = tensors[w[:-len(TRANSPOSED_SUFFIX)]]
            np.testing.assert_array_equal(numpy_helper.to_array(inits[w]), original.numpy().T)


def test_weight_arrays_are_the_embedding_table_and_lm_head(exported):
    t = exported.ckpt.tensors
    embedding = exported.bundle.weight(io.EMBEDDING_WEIGHT)
    np.testing.assert_array_equal(embedding, torch.cat([t["model.transformer.wte.embedding"],
                                                        t["model.transformer.wte.new_embedding"]]).numpy())
    np.testing.assert_array_equal(exported.bundle.weight(io.LM_HEAD_WEIGHT), t["lm_head.weight"].numpy())


@pytest.mark.parametrize("size", [(160, 120), (64, 200)])
def test_vision_crop_by_crop_then_connector_matches_the_reference_for_every_pooled_row(exported, size):
    inputs, _ = exported.observation(*size, frame=11)
    assert len(inputs.images) > 1 and _straddles_crops(inputs.pooled_patches_idx, inputs.images.shape[1])
    # An all-padding row too: the stage returns a feature for it, the runtime drops it.
    idx = np.concatenate([inputs.pooled_patches_idx, np.full((1, 4), -1, np.int64)])
    vision = VisionStages(OrtStage(exported.bundle, io.VISION_STAGE, threads=1),
                          OrtStage(exported.bundle, io.CONNECTOR_STAGE, threads=1))
    got = vision.run(inputs.images, inputs.image_masks, idx)
    images, masks, idx_t = _tensors(inputs.images, inputs.image_masks, idx)
    with torch.inference_mode():
        want = exported.model.image_features(images, masks, idx_t).numpy()
        patches = exported.model.vision.patch_features(images, masks).numpy()
    assert got.shape == (len(idx), want.shape[1]) and np.isfinite(got).all()
    assert closeness(got, want).cosine >= COSINE
    assert closeness(vision.features[:len(images)], patches).cosine >= COSINE
    # One ViT call over the batch of crops gives what the crop-by-crop calls gave.
    batch = vision.vit.run({io.IMAGES: inputs.images, io.IMAGE_MASKS: inputs.image_masks})[io.PATCH_FEATURES]
    np.testing.assert_allclose(batch, vision.features[:len(images)], rtol=1e-5, atol=1e-5)


def _straddles_crops(idx: np.ndarray, n_patches: int) -> bool:
    """Some pooled token takes patches from two crops (so the connector must see every crop at once)."""
    crops = np.where(idx >= 0, idx // n_patches, -1)
    return any(len(set(row[row >= 0].tolist())) > 1 for row in crops)


def test_decoder_matches_the_reference_for_prefill_chunks_and_single_steps(exported):
    llm = exported.model.cfg.llm_config
    stage = OrtStage(exported.bundle, io.DECODER_STAGE, threads=1)
    gen = torch.Generator().manual_seed(0)
    embeds = torch.randn(1, 12, llm.hidden_size, generator=gen)
    decoder = exported.model.decoder
    K, h, fused = llm.num_key_value_heads, llm.head_dim, exported.attention == io.FUSED_ATTENTION
    # Portable: the filled prefix, seq-major, grown by each call's new entries. Fused: whole head-major
    # buffers that each call writes its chunk into, in place.
    shape = (1, K, llm.max_position_embeddings, h) if fused else (1, 0, K, h)
    past_np = [np.zeros(shape, np.float32) for _ in range(2 * llm.num_hidden_layers)]
    cache = None
    # Prefill 7 tokens on an empty past, then a 3-token chunk, then two single-token steps.
    for start, stop in ((0, 7), (7, 10), (10, 11), (11, 12)):
        chunk, positions = embeds[:, start:stop], torch.arange(start, stop)[None]
        with torch.inference_mode():
            hidden, cache = decoder(chunk, positions, cache)
        feeds = {io.INPUTS_EMBEDS: chunk.numpy(), io.POSITION_IDS: positions.numpy()}
        if fused:
            feeds |= {io.SEQLENS_K: np.array([stop - 1], np.int32), io.TOTAL_SEQUENCE_LENGTH: np.array(stop, np.int32)}
        for layer in range(llm.num_hidden_layers):
            feeds[io.past_key(layer)], feeds[io.past_value(layer)] = past_np[2 * layer], past_np[2 * layer + 1]
        out = stage.run(feeds)
        assert closeness(out[io.HIDDEN_STATES], hidden.numpy()).cosine >= COSINE
        for layer, (key, value) in enumerate(cache):
            if fused:
                # Written in place into the fed buffers; nothing past the chunk is touched.
                assert out[io.present_key(layer)] is past_np[2 * layer]
                got_key, got_value = past_np[2 * layer][:, :, :stop], past_np[2 * layer + 1][:, :, :stop]
                assert not past_np[2 * layer][:, :, stop:].any()
                assert closeness(got_key, key.numpy()).cosine >= COSINE
                assert closeness(got_value, value.numpy()).cosine >= COSINE
                continue
            new_key, new_value = out[io.new_key(layer)], out[io.new_value(layer)]
            assert new_key.shape == (1, stop - start, K, h)
            assert closeness(new_key, key[:, :, start:stop].transpose(1, 2).numpy()).cosine >= COSINE
            assert closeness(new_value, value[:, :, start:stop].transpose(1, 2).numpy()).cosine >= COSINE
            past_np[2 * layer] = np.concatenate([past_np[2 * layer], new_key], axis=1)
            past_np[2 * layer + 1] = np.concatenate([past_np[2 * layer + 1], new_value], axis=1)


def test_the_plain_runner_refuses_a_fused_past_it_cannot_write_in_place(tmp_path_factory):
    exported = Exported(tmp_path_factory.mktemp("fused"), "D")
    llm = exported.model.cfg.llm_config
    stage = OrtStage(exported.bundle, io.DECODER_STAGE, threads=1)
    block = np.zeros((1, llm.num_key_value_heads, llm.max_position_embeddings, llm.head_dim), np.float32)
    feeds = {io.INPUTS_EMBEDS: np.zeros((1, 1, llm.hidden_size), np.float32), io.POSITION_IDS: np.zeros((1, 1), np.int64),
             io.SEQLENS_K: np.zeros(1, np.int32), io.TOTAL_SEQUENCE_LENGTH: np.array(1, np.int32)}
    for layer in range(llm.num_hidden_layers):
        feeds[io.past_key(layer)], feeds[io.past_value(layer)] = block.copy(), block.copy()
    feeds[io.past_value(0)] = block.astype(np.float64)     # would be converted: a copy the run would write into
    with pytest.raises(EdgeactError, match="past_value.0 must be a C-contiguous float32 array"):
        stage.run(feeds)


@pytest.mark.parametrize("n_actions", [1, 2])
def test_greedy_decoding_with_the_stages_gives_identical_tokens(exported, n_actions):
    grammar = AnswerGrammar(exported.tokenizer, exported.layout, n_actions=n_actions)
    stages = OrtStages(exported.bundle, threads=1)
    for frame, instruction in ((21, "push the green box"), (35, "pick up the red block")):
        inputs, prompt = exported.observation(160, 120, frame, instruction)
        images, masks, idx = _tensors(inputs.images, inputs.image_masks, inputs.pooled_patches_idx)
        reference = generate_greedy(exported.model, torch.from_numpy(prompt)[None], images, masks, idx,
                                    max_new_tokens=400, eos_token_id=exported.layout.bos_id,
                                    allowed_token_fn=MaskedGreedyConstraint(grammar)).token_ids
        got = stages.generate(prompt, inputs.images, inputs.image_masks, inputs.pooled_patches_idx,
                              max_new_tokens=400, eos_token_id=exported.layout.bos_id,
                              allowed_token_fn=MaskedGreedyConstraint(grammar))
        assert got == reference
        assert grammar.parse_ids(got).action_ids.shape == (n_actions, 7)


def test_max_seq_and_external_data_options(tmp_path, exported):
    out = export_bundle(exported.checkpoint, tmp_path / "short", ExportOptions(max_seq=200, external_data=True,
                                                                                   attention=exported.attention))
    bundle = load_bundle(out)
    decoder = bundle.stage(io.DECODER_STAGE)
    assert decoder.dim_ranges[io.SEQ].max == 200
    if exported.attention == io.PORTABLE_ATTENTION:
        assert decoder.dim_ranges[io.PAST_SEQ].max == 199
    else:
        assert decoder.inputs[4].dims[2] == 200
    assert decoder.external_data == ("stages/decoder.onnx.data",)
    assert bundle.stage(io.VISION_STAGE).external_data == ("stages/vision.onnx.data",)
    assert bundle.stage(io.CONNECTOR_STAGE).external_data == ("stages/connector.onnx.data",)
    stages = OrtStages(bundle, threads=1)
    inputs, prompt = exported.observation(160, 120, frame=5)
    assert stages.cache.keys.shape[2] == 200 and len(prompt) < 200
    hidden = stages.decode(stages.embed(prompt, stages.image_features(inputs.images, inputs.image_masks,
                                                                      inputs.pooled_patches_idx), inputs.pooled_patches_idx))
    assert hidden.shape == (len(prompt), exported.model.cfg.llm_config.hidden_size)
    with pytest.raises(SequenceTooLongError, match=r"exceed the bundle's max_seq 200; re-export with a larger --max-seq"):
        stages.decode(stages.embed(np.full(200 - len(prompt) + 1, exported.layout.bos_id)))
    with pytest.raises(ConfigError, match=r"max_seq 5000 exceeds the model's max_position_embeddings 4096"):
        export_bundle(exported.checkpoint, tmp_path / "long", ExportOptions(max_seq=5000))


def test_an_opset_outside_what_the_exporter_writes_is_refused_with_the_range():
    from torch.onnx._constants import ONNX_MAX_OPSET

    ExportOptions(opset=ONNX_MAX_OPSET)
    with pytest.raises(ConfigError, match=rf"opset 99: torch's ONNX exporter writes opsets up to {ONNX_MAX_OPSET}.*"
                                          rf"use 19 \(default\) or another from 17 to {ONNX_MAX_OPSET}"):
        ExportOptions(opset=99)
    with pytest.raises(ConfigError, match=r"opset 16 is too old"):
        ExportOptions(opset=16)


def test_a_fused_export_too_short_for_its_traced_example_is_refused_with_the_way_out(tmp_path):
    """The fused decoder is traced on 8 positions: a shorter cache crashed inside torch with a shape error."""
    with pytest.raises(ConfigError, match=r"max_seq is 7; the fused attention's export traces 8 positions, so it "
                                          r"needs max_seq >= 8 .* or --attention portable"):
        ExportOptions(max_seq=7)
    ExportOptions(max_seq=8)
    ExportOptions(max_seq=7, attention=io.PORTABLE_ATTENTION)


def test_decoder_attention_never_transposes_the_cache_in_five_dimensions(exported):
    """Grouped attention stays 4-D: a 5-D group axis made every decode step copy each layer's whole
    cache through onnxruntime's element-by-element 5-D Transpose (half of an int8 step's time)."""
    graph = onnx.load(str(exported.bundle.stage_path(io.DECODER_STAGE)), load_external_data=False).graph
    perms = [list(a.ints) for n in graph.node if n.op_type == "Transpose" for a in n.attribute if a.name == "perm"]
    assert all(len(p) <= 4 for p in perms), perms
    llm = exported.model.cfg.llm_config
    if exported.attention == io.FUSED_ATTENTION and not llm.use_qk_norm:
        # The attention node takes the packed projection and rotates it itself: nothing is transposed at all.
        assert not perms, perms
        nodes = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
        assert len(nodes) == llm.num_hidden_layers
        for node in nodes:
            assert list(node.input[1:3]) == ["", ""]        # key and value come packed in the query input
            assert {a.name: a.i for a in node.attribute if a.name in ("do_rotary", "rotary_interleaved")} == {
                "do_rotary": 1, "rotary_interleaved": 0}
    else:       # head splits for RoPE (portable form; q/k norms): transposed, but never in five dimensions
        assert perms


def test_the_fused_vit_attends_in_one_node_per_block(exported):
    """Fused form: each ViT block's attention is one MultiHeadAttention from wq/wk/wv to wo -- no head
    transposes, products or softmax of its own (the crop-by-crop test above checks its values)."""
    graph = onnx.load(str(exported.bundle.stage_path(io.VISION_STAGE))).graph
    ops = [n.op_type for n in graph.node]
    if exported.attention == io.FUSED_ATTENTION:
        assert ops.count("MultiHeadAttention") == exported.model.vision.n_layers_run
        assert "Softmax" not in ops and "Transpose" not in ops
        heads = exported.model.cfg.vit_config.num_attention_heads
        assert all({a.name: a.i for a in n.attribute}["num_heads"] == heads
                   for n in graph.node if n.op_type == "MultiHeadAttention")
    else:
        assert ops.count("Softmax") == exported.model.vision.n_layers_run and "MultiHeadAttention" not in ops


def test_queries_and_keys_are_rotated_together_once_per_layer(exported):
    """RoPE's rotate-half (its one Neg) runs once per layer on q and k as one tensor of H + K heads, not once each;
    the fused form of a model without q/k norms rotates inside GroupQueryAttention instead."""
    graph = onnx.load(str(exported.bundle.stage_path(io.DECODER_STAGE)), load_external_data=False).graph
    llm = exported.model.cfg.llm_config
    in_graph = exported.attention != io.FUSED_ATTENTION or llm.use_qk_norm
    assert [n.op_type for n in graph.node].count("Neg") == (llm.num_hidden_layers if in_graph else 0)


def test_the_decoder_has_no_shape_arithmetic_per_layer(exported):
    """Every reshape and split of the decoder's layers has a constant shape (heads, the attention's group merges,
    RoPE halves, the MLP's halves), so a decode step runs no Shape/Gather/Concat chains per layer: the fused graph
    has no Shape node at all, the portable one two, for the causal mask's lengths (chunk and past), and it
    returns the chunk's keys and values without slicing them out of past + chunk."""
    graph = onnx.load(str(exported.bundle.stage_path(io.DECODER_STAGE)), load_external_data=False).graph
    shapes = [n.name for n in graph.node if n.op_type == "Shape"]
    if exported.attention == io.FUSED_ATTENTION:
        assert not shapes, shapes
    else:
        assert len(shapes) <= 2, shapes
        assert not [n.name for n in graph.node if n.op_type == "Slice"]
