"""Host-memory options of the onnxruntime engines: validated, applied to every session, results unchanged, within budget."""
from __future__ import annotations

import numpy as np
import pytest

from edgeact.runtime import stage_io as io
from edgeact.runtime.engines import open_backend
from edgeact.runtime.errors import ConfigError
from edgeact.runtime.membw import policy_peak_rss
from edgeact.runtime.ort_engine import OrtOptions, make_session
from tests.runtime.test_decode_program import exported_bundle

SHRINK = "memory.enable_memory_arena_shrinkage"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return exported_bundle(tmp_path_factory, "D")


def test_defaults_keep_onnxruntimes_arena_and_memory_pattern_and_shrink_the_arena():
    options = OrtOptions()
    assert (options.cpu_arena, options.mem_pattern, options.arena_shrink) == ("session", True, True)


def test_an_unknown_arena_mode_is_refused_by_name():
    with pytest.raises(ConfigError, match="cpu_arena 'shared' unknown; use one of session, off"):
        OrtOptions(cpu_arena="shared")
    with pytest.raises(ConfigError, match="cpu_arena"):
        open_backend("onnxruntime", cpu_arena="pooled")


@pytest.mark.parametrize("cpu_arena,mem_pattern", [("session", True), ("session", False), ("off", True)])
def test_sessions_are_created_with_the_memory_options(exported, cpu_arena, mem_pattern):
    options = OrtOptions(threads=1, cpu_arena=cpu_arena, mem_pattern=mem_pattern)
    for stage in io.MODEL_STAGES:
        made = make_session(exported.bundle, stage, options).get_session_options()
        assert made.enable_cpu_mem_arena is (cpu_arena != "off")
        assert made.enable_mem_pattern is mem_pattern


def test_only_vision_and_connector_runs_and_prefill_chunks_shrink_the_arena(exported):
    backend = open_backend("onnxruntime", threads=1)
    decoder = backend.decoder(exported.bundle, max_chunk=8)
    for name in (io.VISION_STAGE, io.CONNECTOR_STAGE):
        stage = backend.stage(exported.bundle, name)
        assert stage._run_options.get_run_config_entry(SHRINK) == "cpu:0"
        with pytest.raises(RuntimeError):     # run(release=False), the ViT's crops but the last: the next reuses them
            stage._keep_run_options.get_run_config_entry(SHRINK)
    assert decoder._chunk_run_options.get_run_config_entry(SHRINK) == "cpu:0"
    with pytest.raises(RuntimeError):     # onnxruntime raises for an absent key: single steps keep their blocks
        decoder._run_options.get_run_config_entry(SHRINK)
    kept = open_backend("onnxruntime", threads=1, arena_shrink=False).decoder(exported.bundle, max_chunk=8)
    with pytest.raises(RuntimeError):
        kept._chunk_run_options.get_run_config_entry(SHRINK)


def test_memory_options_do_not_change_the_decoder_outputs(exported, monkeypatch):
    """onnxruntime's defaults (no shrink), ours, and no arena give the same hidden states, chunk by chunk."""
    from edgeact.runtime import ort_engine

    monkeypatch.setattr(ort_engine, "SHRINK_MIN_TOKENS", 4)     # this bundle's chunks are short: shrink them too
    engines = [open_backend("onnxruntime", threads=1, **options).decoder(exported.bundle, max_chunk=8)
               for options in ({}, {"arena_shrink": False}, {"cpu_arena": "off", "mem_pattern": False})]
    rng = np.random.default_rng(1)
    embeds = rng.standard_normal((13, engines[0].layout.hidden_size)).astype(np.float32)
    # A chunk, a step, a chunk; then, after a reset, a step whose arena blocks came back from a shrink.
    for start, stop, reset in ((0, 8, False), (8, 9, False), (9, 13, False), (0, 1, True)):
        hidden = []
        for engine in engines:
            if reset:
                engine.reset()
            engine.embeds[:stop - start] = embeds[start:stop]
            hidden.append(engine.step(stop - start).copy())
        np.testing.assert_allclose(hidden[1], hidden[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(hidden[2], hidden[0], rtol=1e-5, atol=1e-5)


def test_a_small_bundle_policy_peaks_within_the_memory_budget(exported):
    memory = policy_peak_rss(exported.bundle_dir, steps=2, threads=1, frame_px=(160, 120))
    assert memory.peak_rss_bytes <= memory.budget_bytes, (
        f"peak RSS {memory.peak_rss_bytes >> 20} MB over the budget {memory.budget_bytes >> 20} MB")


def test_release_after_an_answer_shrinks_the_arena_without_touching_the_cache(exported, monkeypatch):
    engines = [open_backend("onnxruntime", threads=1).decoder(exported.bundle, max_chunk=8) for _ in range(2)]
    runs = []
    real = engines[1].session.run_with_iobinding
    monkeypatch.setattr(engines[1].session, "run_with_iobinding",
                        lambda binding, options: runs.append(options) or real(binding, options))
    embeds = np.random.default_rng(2).standard_normal((10, engines[0].layout.hidden_size)).astype(np.float32)
    for engine in engines:
        engine.embeds[:8] = embeds[:8]
        engine.step(8)
        engine.embeds[:1] = embeds[8:9]
        engine.step(1)
    runs.clear()
    engines[1].release()
    # One 1-token run whose options shrink the arena; nothing is committed to the cache.
    assert len(runs) == 1 and runs[0].get_run_config_entry(SHRINK) == "cpu:0"
    assert engines[1].length == engines[0].length == 9
    for engine in engines:
        engine.embeds[:1] = embeds[9:10]
    np.testing.assert_array_equal(engines[1].step(1), engines[0].step(1))
    # Without arena shrink, or with a full cache, there is nothing to do and no run.
    kept = open_backend("onnxruntime", threads=1, arena_shrink=False).decoder(exported.bundle, max_chunk=8)
    monkeypatch.setattr(kept.session, "run_with_iobinding", lambda *a: pytest.fail("ran"))
    kept.release()
    engines[1].cache.length = engines[1].layout.max_seq
    runs.clear()
    engines[1].release()
    assert runs == []


def test_every_answer_ends_with_a_release_and_loading_trims_the_heap(exported, monkeypatch):
    from edgeact.runtime import ort_engine
    from edgeact.runtime.bundle_policy import BundlePolicy

    trims = []
    monkeypatch.setattr(ort_engine, "release_heap", lambda: trims.append(1))
    policy = BundlePolicy(exported.bundle_dir, threads=1, prefill_chunk=96)
    assert len(trims) >= len(io.MODEL_STAGES)            # one per session made
    released = []
    real = policy.decoder.release
    monkeypatch.setattr(policy.decoder, "release", lambda: released.append(policy.decoder.length) or real())
    rgb = np.random.default_rng(3).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    for k in range(2):
        result = policy.infer(rgb, "pick up the red block")
        assert len(released) == k + 1 and released[-1] == policy.decoder.length >= len(result.token_ids)
