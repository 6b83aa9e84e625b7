"""Calibration sets: the on-disk format round-trips, the builder answers frames with the fp32 model, bad sets are named."""
from __future__ import annotations

import json

import numpy as np
import pytest

from edgeact.calibration.calibration_build import recording_frames, synthetic_frames
from edgeact.calibration.calibration_set import (
    ARRAYS_FILE, MANIFEST_FILE, CalibrationError, CalibrationSample, CalibrationSet, build_calibration_set,
    config_meaning_sha256, weights_sha256,
)
from edgeact.export.quant_decode import OrtBundle
from edgeact.runtime.bundle import load_bundle
from edgeact.runtime.cli import main
from tests.export.quant_fixtures import CALIBRATION_SAMPLES, tiny_sources


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return tiny_sources(tmp_path_factory)


def _sample(frame: int = 0, n_tokens: int = 4) -> CalibrationSample:
    rng = np.random.default_rng(frame)
    return CalibrationSample(
        instruction="pick up the red block", frame=frame, grids=((1, 2), (1, n_tokens - 2)),
        images=rng.standard_normal((2, 9, 588)).astype(np.float32), image_masks=np.ones((2, 9), np.float32),
        pooled_patches_idx=np.arange(n_tokens * 4).reshape(n_tokens, 4), prompt_ids=np.arange(20),
        answer_ids=np.array([5, 6, 7]), camera={"type": "synthetic", "pitch_deg": 30.0})


def test_save_and_load_round_trip_every_array_and_field(tmp_path):
    calib = CalibrationSet((_sample(0), _sample(1, 6)), seed=3, frames_source={"type": "synthetic"},
                           model={"name": "m", "config_sha256": "ab" * 32}, created_utc="2026-01-01T00:00:00Z")
    loaded = CalibrationSet.load(calib.save(tmp_path / "calib"))
    assert (loaded.seed, loaded.frames_source, loaded.model, loaded.created_utc) == \
           (3, {"type": "synthetic"}, calib.model, calib.created_utc)
    for a, b in zip(calib.samples, loaded.samples, strict=True):
        assert (a.instruction, a.frame, a.grids, a.camera) == (b.instruction, b.frame, b.grids, b.camera)
        for name in ("images", "image_masks", "pooled_patches_idx", "prompt_ids", "answer_ids"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
            assert getattr(a, name).dtype == getattr(b, name).dtype
    np.testing.assert_array_equal(loaded.samples[0].sequence_ids, np.r_[np.arange(20), 5, 6, 7])
    with pytest.raises(CalibrationError, match="already exists"):
        calib.save(tmp_path / "calib")
    calib.save(tmp_path / "calib", overwrite=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_malformed_sets_are_named_with_the_fix(tmp_path):
    with pytest.raises(CalibrationError, match="edgeact calibrate"):
        CalibrationSet.load(tmp_path / "nothing")
    path = CalibrationSet((_sample(),), 0, {}, {}).save(tmp_path / "c")
    meta = json.loads((path / MANIFEST_FILE).read_text())
    (path / MANIFEST_FILE).write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(CalibrationError, match="version 99"):
        CalibrationSet.load(path)
    (path / MANIFEST_FILE).write_text(json.dumps(meta))
    (path / ARRAYS_FILE).unlink()
    with pytest.raises(CalibrationError, match="incomplete"):
        CalibrationSet.load(path)
    with pytest.raises(CalibrationError, match="grids"):
        CalibrationSample("x", 0, ((1, 1),), np.zeros((1, 2, 3)), np.zeros((1, 2)), np.zeros((4, 4)), np.ones(3), np.ones(0))
    with pytest.raises(CalibrationError, match="at least one sample"):
        CalibrationSet((), 0, {}, {})


def test_check_model_refuses_another_model_or_patch_size():
    calib = CalibrationSet((_sample(),), 0, {}, {"config_sha256": "ab" * 32})
    calib.check_model("ab" * 32, 588, 100)
    with pytest.raises(CalibrationError, match="another model"):
        calib.check_model("cd" * 32, 588, 100)
    with pytest.raises(CalibrationError, match="patches of 588"):
        calib.check_model("ab" * 32, 768, 100)
    with pytest.raises(CalibrationError, match="outside the model's 10 embedding rows"):
        calib.check_model("", 588, 10)


def test_check_model_compares_the_whole_models_weights_and_the_actions_per_answer():
    """The arrays digest covers only the embedding and the LM head: the whole model's (its checkpoint's, recorded at
    export) tells two models of one config apart; and answers of another chunk feed other decoder positions."""
    model = {"config_sha256": "ab" * 32, "kind": "bundle", "source": "b", "weights_sha256": "",
             "model_weights_sha256": "11" * 32, "n_actions": 1}
    calib = CalibrationSet((_sample(),), 0, {}, model)
    calib.check_model("ab" * 32, 588, 100, model_weights_sha256="11" * 32, n_actions=1)
    with pytest.raises(CalibrationError, match=r"decoded by another model: the weights of the bundle 'b' that "
                                               r"answered \(sha256 111111111111…\) are not this bundle's model's"):
        calib.check_model("ab" * 32, 588, 100, model_weights_sha256="22" * 32, n_actions=1)
    with pytest.raises(CalibrationError, match=r"answers hold 1 action\(s\) each and this bundle's hold 8 \(its "
                                               r"export's --chunk\): rebuild the set from this bundle"):
        calib.check_model("ab" * 32, 588, 100, model_weights_sha256="11" * 32, n_actions=8)
    # the config's bytes differ and the set recorded no meaning to compare: refused even with the same weights (a
    # config edited after export answers otherwise from them)
    with pytest.raises(CalibrationError, match=r"decoded by another model \(config sha256 abababababab…, this one "
                                               r"cdcdcdcdcdcd…\); rebuild the set from this bundle"):
        calib.check_model("cd" * 32, 588, 100, model_weights_sha256="11" * 32, n_actions=1, config_meaning="ee" * 32)
    # ... another formatting of one config (the same meaning): accepted; another meaning: refused
    meant = CalibrationSet((_sample(),), 0, {}, {**model, "config_meaning_sha256": "ee" * 32})
    meant.check_model("cd" * 32, 588, 100, model_weights_sha256="11" * 32, n_actions=1, config_meaning="ee" * 32)
    with pytest.raises(CalibrationError, match=r"decoded by another model \(config sha256"):
        meant.check_model("cd" * 32, 588, 100, model_weights_sha256="11" * 32, n_actions=1, config_meaning="ff" * 32)
    older = CalibrationSet((_sample(),), 0, {}, {"config_sha256": "ab" * 32, "weights_sha256": ""})
    older.check_model("ab" * 32, 588, 100, model_weights_sha256="22" * 32, n_actions=8)    # recorded neither


def test_a_set_records_the_answering_models_weights_and_chunk(sources, tmp_path):
    from edgeact.runtime.bundle import read_manifest

    calib = build_calibration_set(sources["bundle"], None, n_samples=1, seed=0, threads=1)
    manifest = read_manifest(sources["bundle"])
    assert calib.model["model_weights_sha256"] == manifest.model.source_weights_sha256 != ""
    assert calib.model["n_actions"] == int(manifest.grammar.get("n_actions", 1))
    with pytest.raises(CalibrationError, match=r"--chunk 8: .* answers with 1 actions per answer"):
        build_calibration_set(sources["bundle"], None, n_samples=1, seed=0, threads=1, n_actions=8)


def test_builder_answers_with_the_bundle_and_agrees_with_the_checkpoint(sources):
    calib = CalibrationSet.load(sources["calibration"])       # built by the fixture from the fp32 bundle
    assert len(calib) == CALIBRATION_SAMPLES and calib.model["kind"] == "bundle"
    bundle = load_bundle(sources["bundle"])
    assert calib.model["config_sha256"] == bundle.manifest.model.source_config_sha256
    grammar = OrtBundle(bundle, threads=1).io.grammar
    for sample in calib.samples:
        answer = grammar.parse_ids(sample.answer_ids.tolist())     # complete, grammatical answers
        assert len(answer.depth_codes) == 100
    from_torch = build_calibration_set(sources["checkpoint"], None, CALIBRATION_SAMPLES, seed=0, threads=1)
    assert from_torch.model["kind"] == "checkpoint" and from_torch.model["config_sha256"] == calib.model["config_sha256"]
    # what the config says, read from the checkpoint's file and from the bundle's manifest, is one digest
    assert (from_torch.model["config_meaning_sha256"] == calib.model["config_meaning_sha256"] ==
            config_meaning_sha256(bundle.config) != config_meaning_sha256(
                {**(config := bundle.config.to_dict()), "llm_config": {**config["llm_config"], "rope_theta": 1e4}}))
    assert from_torch.model["weights_sha256"] == weights_sha256("checkpoint", sources["checkpoint"]) != ""
    for a, b in zip(calib.samples, from_torch.samples, strict=True):
        np.testing.assert_array_equal(a.prompt_ids, b.prompt_ids)
        np.testing.assert_array_equal(a.answer_ids, b.answer_ids)     # ONNX stages and reference decode alike


def test_a_set_records_the_weights_that_answered_it_and_quantize_computes_them_alike(sources):
    from edgeact.export.quantize import _weights_sha256

    digest = CalibrationSet.load(sources["calibration"]).model["weights_sha256"]
    # The bundle's arrays: the same for another export of the checkpoint (its graphs differ: portable attention).
    assert digest == weights_sha256("bundle", sources["bundle"]) == weights_sha256("bundle", sources["portable"]) != ""
    assert _weights_sha256(load_bundle(sources["portable"]), "bundle") == digest
    # A set answered by the checkpoint is compared with the checkpoint the bundle was exported from.
    assert _weights_sha256(load_bundle(sources["bundle"]), "checkpoint") == weights_sha256("checkpoint",
                                                                                          sources["checkpoint"])
    assert weights_sha256("bundle", "/nonexistent") == "" and CalibrationSet((_sample(),), 0, {}, {}).model == {
        "weights_sha256": ""}


def test_synthetic_frames_are_seeded_and_held_out_frames_differ():
    first = [(f, c["pitch_deg"]) for f, _, c in synthetic_frames(6, seed=1)]
    assert first == [(f, c["pitch_deg"]) for f, _, c in synthetic_frames(6, seed=1)]
    assert first != [(f, c["pitch_deg"]) for f, _, c in synthetic_frames(6, seed=1, held_out=True)]
    assert first != [(f, c["pitch_deg"]) for f, _, c in synthetic_frames(6, seed=2)]


def test_frames_from_a_realsense_recording(tmp_path):
    pytest.importorskip("pyrealsense2")
    from edgeact.drivers.cameras.base import Intrinsics
    from edgeact.drivers.cameras.recording import write_recording

    w, h = 64, 48
    path = tmp_path / "rec.db3"
    frames = [(np.full((h, w, 3), 10 * i, np.uint8), np.full((h, w), 1.0, np.float32)) for i in range(6)]
    write_recording(path, frames, Intrinsics(fx=50.0, fy=50.0, cx=31.5, cy=23.5, width=w, height=h), fps=30)
    got = list(recording_frames(path, 3, seed=0))
    values = [int(color[0, 0, 0]) for _, color, _ in got]
    assert len(got) == 3 and values == sorted(values) and set(values) <= {10 * i for i in range(6)}
    assert all(meta == {"type": "recording", "path": str(path)} for _, _, meta in got)


def test_a_recording_shorter_than_the_samples_asked_for_is_refused(tmp_path):
    pytest.importorskip("pyrealsense2")
    from edgeact.drivers.cameras.base import Intrinsics
    from edgeact.drivers.cameras.recording import write_recording

    w, h = 64, 48
    path = tmp_path / "short.db3"
    frames = [(np.full((h, w, 3), i, np.uint8), np.full((h, w), 1.0, np.float32)) for i in range(3)]
    write_recording(path, frames, Intrinsics(fx=50.0, fy=50.0, cx=31.5, cy=23.5, width=w, height=h), fps=30)
    with pytest.raises(CalibrationError, match=r"short.db3: the recording holds 3 frames, fewer than the 16 samples "
                                               r"asked for; ask for at most 3 \(--samples 3\) or record a longer one"):
        list(recording_frames(path, 16, seed=0))
    assert len(list(recording_frames(path, 3, seed=0))) == 3


def test_a_recording_without_a_color_frame_paired_with_depth_says_so(tmp_path, monkeypatch):
    pytest.importorskip("pyrealsense2")
    from edgeact.drivers.cameras import recording
    from edgeact.drivers.cameras.base import Intrinsics

    software_frame = recording._software_frame

    def depth_half_a_second_late(rs, pixels, bpp, profile, number, timestamp_ms, depth_units=None):
        late_ms = 500.0 if depth_units is not None else 0.0
        return software_frame(rs, pixels, bpp, profile, number, timestamp_ms + late_ms, depth_units)

    w, h = 64, 48
    path = tmp_path / "unpaired.db3"
    frames = [(np.zeros((h, w, 3), np.uint8), np.ones((h, w), np.float32))] * 20
    monkeypatch.setattr(recording, "_software_frame", depth_half_a_second_late)
    recording.write_recording(path, frames, Intrinsics(fx=50.0, fy=50.0, cx=31.5, cy=23.5, width=w, height=h), fps=30)
    with pytest.raises(CalibrationError, match=r"unpaired.db3: no color frame of the recording was paired with a "
                                               r"depth frame .*is it a RealSense recording of both streams.*"
                                               r"write_recording") as err:
        list(recording_frames(path, 4, seed=0))
    assert "edgeact record" not in str(err.value)


def test_a_synthetic_frame_size_is_refused_with_a_recording(tmp_path):
    # --width/--height size the synthetic camera; a recording's frames would silently keep their own size.
    with pytest.raises(CalibrationError, match=r"width/height 640x480 size the synthetic camera's frames; a "
                                               r"recording's frames \(.*run.db3\) keep their own size: leave out"):
        build_calibration_set(tmp_path, None, 1, frames_source=tmp_path / "run.db3", width=640, height=480)


def test_cli_calibrate_writes_a_set(sources, tmp_path, capsys):
    out = tmp_path / "calib"
    assert main(["calibrate", str(sources["bundle"]), "--out", str(out), "--samples", "1", "--seed", "4",
                 "--instruction", "touch the blue box", "--threads", "1"]) == 0
    calib = CalibrationSet.load(out)
    assert len(calib) == 1 and calib.seed == 4 and calib.samples[0].instruction == "touch the blue box"
    assert "answered by" in capsys.readouterr().out
    assert main(["calibrate", str(tmp_path), "--out", str(tmp_path / "x"), "--samples", "1"]) == 2


@pytest.mark.parametrize("seed", [929096, 356561, 0])
def test_calibration_pictures_are_never_verifications_or_the_reports(seed):
    """The synthetic scene repeats every 120 frames: calibration draws its even frames at poses verification never
    renders, the report its odd frames (seeds that once drew verification's and the report's very pictures)."""
    from edgeact.calibration.calibration_build import VERIFY_PITCHES
    from edgeact.export.verify import DEFAULT_FRAMES, held_out_observations

    calibration = [(f, c["pitch_deg"]) for f, _, c in synthetic_frames(64, seed)]
    report = [f for f, _, _ in synthetic_frames(64, seed, held_out=True)]
    assert all(f % 2 == 0 and pitch not in VERIFY_PITCHES for f, pitch in calibration)
    assert all(f % 2 == 1 for f in report)
    verify_pictures = [rgb for rgb, _ in held_out_observations(DEFAULT_FRAMES)]
    for _, rgb, _ in synthetic_frames(16, seed):
        assert not any(np.array_equal(rgb, v) for v in verify_pictures)


def test_a_checkpoints_long_chunk_answers_are_whole(sources):
    """A checkpoint answering 50 actions per answer (~1250 tokens): each answer runs to its end-of-text."""
    from edgeact.runtime.grammar import AnswerGrammar
    from edgeact.runtime.token_layout import TokenLayout, load_tokenizer

    calib = build_calibration_set(sources["checkpoint"], None, n_samples=1, seed=0, threads=1, n_actions=50)
    tokenizer = load_tokenizer(sources["checkpoint"] / "tokenizer.json")
    grammar = AnswerGrammar(tokenizer, TokenLayout.from_tokenizer(tokenizer), n_actions=50)
    answer = grammar.parse_ids(calib.samples[0].answer_ids)
    assert answer.action_ids.shape[0] == 50 and calib.model["n_actions"] == 50
