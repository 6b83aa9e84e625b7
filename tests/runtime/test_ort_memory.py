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
