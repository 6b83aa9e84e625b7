"""The KV cache: sized from the manifest, allocated once, contiguous prefixes, and nothing allocated per decode step."""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from edgeact.runtime import stage_io as io
from edgeact.runtime.engines import open_backend
from edgeact.runtime.errors import BundleError, EdgeactError, SequenceTooLongError
from edgeact.runtime.kv_cache import KEY, VALUE, CacheLayout, KVCache
from edgeact.runtime.stage_spec import StageSpec, TensorSpec
from tests.runtime.test_decode_program import MAX_SEQ, exported_bundle


def decoder_spec(n_layers=3, kv_heads=2, head_dim=8, width=32, max_seq=40) -> StageSpec:
    b, s, p = io.BATCH, io.SEQ, io.PAST_SEQ
    inputs = [TensorSpec(io.INPUTS_EMBEDS, "float32", (b, s, width)), TensorSpec(io.POSITION_IDS, "int64", (b, s))]
    outputs = [TensorSpec(io.HIDDEN_STATES, "float32", (b, s, width))]
    for layer in range(n_layers):
        inputs += [TensorSpec(io.past_key(layer), "float32", (b, p, kv_heads, head_dim)),
                   TensorSpec(io.past_value(layer), "float32", (b, p, kv_heads, head_dim))]
        outputs += [TensorSpec(io.new_key(layer), "float32", (b, s, kv_heads, head_dim)),
                    TensorSpec(io.new_value(layer), "float32", (b, s, kv_heads, head_dim))]
    return StageSpec("decoder", "stages/decoder.onnx", "fp32", inputs, outputs,
                     dim_ranges={b: (1, 1, 1), s: (1, 8, max_seq), p: (0, 8, max_seq - 1)})


def fused_decoder_spec(n_layers=2, kv_heads=2, head_dim=4, width=16, max_seq=12, buffer=None) -> StageSpec:
    b, s = io.BATCH, io.SEQ
    block = (b, kv_heads, buffer or max_seq, head_dim)
    inputs = [TensorSpec(io.INPUTS_EMBEDS, "float32", (b, s, width)), TensorSpec(io.POSITION_IDS, "int64", (b, s)),
              TensorSpec(io.SEQLENS_K, "int32", (b,)), TensorSpec(io.TOTAL_SEQUENCE_LENGTH, "int32", ())]
    outputs = [TensorSpec(io.HIDDEN_STATES, "float32", (b, s, width))]
    for layer in range(n_layers):
        inputs += [TensorSpec(io.past_key(layer), "float32", block), TensorSpec(io.past_value(layer), "float32", block)]
        outputs += [TensorSpec(io.present_key(layer), "float32", block),
                    TensorSpec(io.present_value(layer), "float32", block)]
    return StageSpec("decoder", "stages/decoder.onnx", "fp32", inputs, outputs, dim_ranges={b: (1, 1, 1), s: (1, 8, max_seq)})


def test_the_fused_layout_is_head_major_with_sequence_major_views():
    layout = CacheLayout.from_stage(fused_decoder_spec())
    assert layout.fused and not CacheLayout.from_stage(decoder_spec()).fused
    assert (layout.n_layers, layout.max_seq, layout.kv_heads, layout.head_dim) == (2, 12, 2, 4)
    assert layout.block_shape == (1, 2, 12, 4) and layout.nbytes == 2 * 2 * 12 * 2 * 4 * 4
    lengths = layout.chunk_feeds(past=5, n=3)
    assert lengths[io.SEQLENS_K].tolist() == [7] and lengths[io.SEQLENS_K].dtype == np.int32
    assert lengths[io.TOTAL_SEQUENCE_LENGTH].shape == () and int(lengths[io.TOTAL_SEQUENCE_LENGTH]) == 8
    assert CacheLayout.from_stage(decoder_spec()).chunk_feeds(5, 3) == {}
    cache = KVCache(layout)
    cache.block(1, VALUE)[0, 1, 4] = 7.0          # head 1, position 4, as stored
    assert cache.values.shape == (2, 1, 12, 2, 4) and (cache.values[1, 0, 4, 1] == 7.0).all()
    cache.reserve(5)
    cache.commit(5)
    assert cache.prefix(1, VALUE).shape == (1, 5, 2, 4) and (cache.prefix(1, VALUE)[0, 4, 1] == 7.0).all()
    feeds = cache.past_feeds()                     # the whole blocks, bound in place, never the prefixes
    assert feeds[io.past_value(1)].shape == (1, 2, 12, 4) and np.shares_memory(feeds[io.past_value(1)], cache.values)
    assert cache.pointer(1, VALUE) == cache.block(1, VALUE).ctypes.data
    with pytest.raises(EdgeactError, match="head-major: positions are not contiguous"):
        cache.pointer(1, VALUE, 3)
    with pytest.raises(EdgeactError, match="writes its chunk into the cache blocks .* commit"):
        cache.append({}, 1)
    with pytest.raises(BundleError, match="cache buffers of 10 positions but dim_ranges.seq.max is 12"):
        CacheLayout.from_stage(fused_decoder_spec(buffer=10))


def test_past_feeds_from_sequence_major_arrays_in_either_form():
    rng = np.random.default_rng(0)
    keys, values = rng.standard_normal((2, 2, 1, 6, 2, 4)).astype(np.float32)     # (layers, 1, T, K, h)
    fused = CacheLayout.from_stage(fused_decoder_spec()).past_from(keys, values, past=4)
    block = fused[io.past_key(1)]
    assert block.shape == (1, 2, 12, 4) and not block[:, :, 4:].any()
    np.testing.assert_array_equal(block[:, :, :4], keys[1][:, :4].transpose(0, 2, 1, 3))
    portable = CacheLayout.from_stage(decoder_spec(n_layers=2, kv_heads=2, head_dim=4)).past_from(keys, values, past=4)
    assert portable[io.past_value(0)].flags.c_contiguous
    np.testing.assert_array_equal(portable[io.past_value(0)], values[0][:, :4])


def test_layout_is_read_off_the_decoder_stage():
    layout = CacheLayout.from_stage(decoder_spec())
    assert (layout.n_layers, layout.max_seq, layout.kv_heads, layout.head_dim, layout.hidden_size) == (3, 40, 2, 8, 32)
    assert layout.row_bytes == 2 * 8 * 4 and layout.nbytes == 2 * 3 * 40 * 64
    vision = StageSpec("vision", "stages/vision.onnx", "fp32", [TensorSpec("images", "float32", (1, 4))],
                       [TensorSpec("image_features", "float32", (1, 4))])
    with pytest.raises(BundleError, match="not a decoder stage"):
        CacheLayout.from_stage(vision)


def test_filled_prefixes_are_contiguous_views_at_the_pointers_handed_out():
    cache = KVCache(CacheLayout.from_stage(decoder_spec()))
    base = cache.block(0, KEY).ctypes.data
    for n in (1, 5, 17, 40):
        cache.reset()
        cache.commit(cache.reserve(n) + n)
        for layer in range(3):
            for kind in (KEY, VALUE):
                prefix = cache.prefix(layer, kind)
                assert prefix.shape == (1, n, 2, 8) and prefix.flags.c_contiguous
                assert np.shares_memory(prefix, cache.block(layer, kind))
                assert prefix.ctypes.data == cache.pointer(layer, kind)
                # new entries of the next chunk go right after the prefix
                assert cache.pointer(layer, kind, n) == prefix.ctypes.data + prefix.nbytes
    assert cache.block(0, KEY).ctypes.data == base          # never reallocated


def test_reserve_refuses_overflow_and_leaves_the_length():
    cache = KVCache(CacheLayout.from_stage(decoder_spec(max_seq=10)))
    cache.commit(cache.reserve(8) + 8)
    with pytest.raises(SequenceTooLongError, match="11 positions exceed the bundle's max_seq 10; re-export with a larger"):
        cache.reserve(3)
    assert cache.length == 8 and cache.reserve(2) == 8
    with pytest.raises(BundleError, match="needs the backend's device allocator"):
        KVCache(cache.layout, device="cuda")


def test_the_plain_runner_feeds_filled_prefixes_and_copies_new_entries_in():
    # runtime/ort_stages.py's path: past fed by name as views, a call's new keys/values appended after it.
    cache = KVCache(CacheLayout.from_stage(decoder_spec(n_layers=2, kv_heads=2, head_dim=4, max_seq=9)))
    new = {name: np.full((1, 3, 2, 4), float(layer + 1), np.float32)
           for layer in range(2) for name in (io.new_key(layer), io.new_value(layer))}
    cache.append(new, 3)
    past = cache.past_feeds()[io.past_key(1)]
    assert past.shape == (1, 3, 2, 4) and past.flags.c_contiguous and np.shares_memory(past, cache.keys)
    assert (past == 2.0).all() and (cache.values[0, 0, :3] == 1.0).all() and (cache.keys[:, :, 3:] == 0).all()
    cache.rewind(1)
    assert cache.past_feeds()[io.past_value(0)].shape == (1, 1, 2, 4)
    cache.append(new, 3)
    cache.append(new, 3)
    with pytest.raises(SequenceTooLongError, match="10 positions exceed the bundle's max_seq 9"):
        cache.append(new, 3)
    assert cache.length == 7 and cache.max_seq == 9
    with pytest.raises(EdgeactError, match="cannot rewind a cache of 7 positions to 8"):
        cache.rewind(8)


@pytest.mark.parametrize("attention", io.DECODER_ATTENTIONS)
def test_decode_steps_allocate_nothing_per_token(tmp_path_factory, attention):
    exported = exported_bundle(tmp_path_factory, "D", attention)
    engine = open_backend("onnxruntime", threads=1).decoder(exported.bundle, max_chunk=64)
    assert engine.layout.max_seq == MAX_SEQ
    engine.embeds[:64] = np.random.default_rng(0).standard_normal((64, engine.layout.hidden_size))
    for _ in range(4):                     # a long past first: copying it would be visible
        engine.step(64)
    engine.step(1)
    past_bytes = 2 * engine.layout.n_layers * engine.length * engine.layout.row_bytes
    hidden_buffer = engine.hidden_states(1).base
    tracemalloc.start()
    try:
        start, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        for _ in range(50):
            last = engine.step(1)
        end, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # A per-step copy of the past would show as a peak of past_bytes; a leak as growth with steps.
    assert past_bytes > 60_000
    assert peak - start < 4096, f"{peak - start} bytes allocated at once during decode steps"
    assert end - start < 1024, f"{end - start} bytes kept after 50 decode steps"
    assert np.shares_memory(last, hidden_buffer) and engine.length == 4 * 64 + 51
