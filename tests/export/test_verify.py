"""Verification passes a faithful fp32 bundle, fails (and records) a broken one, and gates by each stage's precision."""
from __future__ import annotations

import dataclasses
import json
import re
import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edgeact.calibration.calibration_set import weights_sha256
from edgeact.export.bundle_export import export_bundle
from edgeact.export.bundle_writer import BundleWriter, copy_bundle, update_manifest
from edgeact.export.synthetic import make_checkpoint
from edgeact.export import depth_tokenizer_export
from edgeact.export import verify as verify_module
from edgeact.export.verify import GATES, Gate, gate_for, held_out_observations, record_verification, verify_bundle
from edgeact.runtime.bundle import VerificationInfo, load_bundle, read_manifest
from edgeact.runtime.cli import main
from edgeact.runtime.errors import BundleError
from edgeact.runtime.stage_spec import PRECISIONS
from tests.export.quant_fixtures import with_depth_tokenizer

GATE_NAMES = ["vision.cosine", "connector.cosine", "decoder.prefill.cosine", "decoder.cache.cosine", "decoder.step.cosine",
              "decoder.chunk.cosine", "logits.cosine", "tokens.forced", "tokens.greedy.depth",
              "tokens.greedy.trace", "tokens.greedy.action"]
PERTURBED = "model.transformer.blocks.0.mlp.ff_out.weight.T"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    return {v: make_checkpoint(v, "tiny", seed=7, out_dir=root / f"ck{v}") for v in ("D", "O")}


@pytest.fixture(scope="module")
def bundles(checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("bundles")
    return {v: export_bundle(ck, root / f"b{v}") for v, ck in checkpoints.items()}


def _copy(bundle_dir, tmp_path):
    return shutil.copytree(bundle_dir, tmp_path / "copy")


def _perturb_decoder(bundle_dir, relative_noise: float, stage: str = "decoder", weight: str = PERTURBED) -> None:
    """Add noise to one weight of a stage and re-hash the file, as a corrupted or badly quantized stage would be."""
    path = bundle_dir / "stages" / f"{stage}.onnx"
    proto = onnx.load(str(path))
    init = next(t for t in proto.graph.initializer if t.name == weight)
    w = numpy_helper.to_array(init)
    noise = np.random.default_rng(0).standard_normal(w.shape) * relative_noise * np.abs(w).mean()
    init.CopyFrom(numpy_helper.from_array((w + noise).astype(np.float32), weight))
    onnx.save(proto, str(path))
    update_manifest(bundle_dir, lambda m: None, rehash=[f"stages/{stage}.onnx"])


@pytest.mark.parametrize("variant", ["D", "O"])
def test_fp32_bundle_passes_every_gate_and_the_manifest_says_so(bundles, variant):
    report = verify_bundle(bundles[variant], frames=1, threads=1)
    assert report.passed and [r["gate"] for r in report.rows] == GATE_NAMES
    assert all(r["precision"] == "fp32" and r["limit"] == (1.0 if r["gate"].startswith("tokens") else 0.99999)
               for r in report.rows)
    verification = load_bundle(bundles[variant]).manifest.verification
    assert verification.status == "passed"
    assert [r["gate"] for r in verification.results] == GATE_NAMES
    assert verification.gates["table"] == {"fp32": dataclasses.asdict(GATES["fp32"])}


def test_a_broken_stage_fails_its_gates_is_recorded_and_refused_by_the_loader(bundles, tmp_path):
    bundle_dir = _copy(bundles["D"], tmp_path)
    _perturb_decoder(bundle_dir, relative_noise=1.0)
    report = verify_bundle(bundle_dir, frames=1, threads=1)
    failing = {r["gate"] for r in report.failing()}
    assert not report.passed and {"decoder.prefill.cosine", "logits.cosine", "tokens.forced"} <= failing
    assert not {"vision.cosine", "connector.cosine"} & failing     # the error is charged to the stage that makes it
    assert read_manifest(bundle_dir).verification.status == "failed"
    with pytest.raises(BundleError, match=r"verification failed at gate 'decoder.prefill.cosine'.*--allow-unverified"):
        load_bundle(bundle_dir)
    assert load_bundle(bundle_dir, allow_failed_verification=True).manifest.verification.status == "failed"
    assert main(["verify", str(bundle_dir), "--frames", "1", "--threads", "1"]) == 1


def test_a_broken_connector_fails_its_own_gate_not_the_vits(bundles, tmp_path):
    bundle_dir = _copy(bundles["D"], tmp_path)
    _perturb_decoder(bundle_dir, 1.0, stage="connector", weight="model.vision_backbone.image_projector.w2.weight.T")
    by_gate = {r["gate"]: r for r in verify_bundle(bundle_dir, frames=1, threads=1, record=False).rows}
    assert not by_gate["connector.cosine"]["passed"] and by_gate["vision.cosine"]["passed"]
    assert by_gate["decoder.prefill.cosine"]["passed"]     # fed the reference's embeddings


def test_gates_follow_the_stage_precision_in_the_manifest(bundles, tmp_path):
    bundle_dir = _copy(bundles["D"], tmp_path)
    _perturb_decoder(bundle_dir, relative_noise=0.01)   # small: what a fair quantization error looks like
    assert not verify_bundle(bundle_dir, frames=1, threads=1).passed

    def relabel(m) -> None:
        m.stages["decoder"] = dataclasses.replace(m.stages["decoder"], precision="int8")

    update_manifest(bundle_dir, relabel)
    report = verify_bundle(bundle_dir, frames=1, threads=1)
    by_gate = {r["gate"]: r for r in report.rows}
    assert by_gate["decoder.prefill.cosine"]["precision"] == "int8"
    assert by_gate["decoder.prefill.cosine"]["limit"] == GATES["int8"].decoder_cosine
    assert by_gate["vision.cosine"]["limit"] == GATES["fp32"].vision_cosine
    assert by_gate["tokens.forced"]["precision"] == "fp32+int8"
    assert by_gate["tokens.forced"]["limit"] == GATES["int8"].forced_agreement
    # The cosines and teacher-forced choices pass int8's gates; free-running agreement is left out here:
    # after one flipped token an answer continues differently, which says little about the stage.
    assert all(by_gate[g]["passed"] for g in GATE_NAMES[:8]), report.failing()


def test_the_gate_table_is_frozen_complete_and_fp32_is_strictest():
    assert set(GATES) == set(PRECISIONS)
    with pytest.raises(TypeError):
        GATES["fp32"] = GATES["int4"]           # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        GATES["fp32"].vision_cosine = 0.5       # type: ignore[misc]
    for field in dataclasses.fields(Gate):
        if field.name == "norm_err":            # a maximum: the strictest is the smallest
            assert all(GATES["fp32"].norm_err <= g.norm_err for g in GATES.values())
        else:
            assert all(getattr(GATES["fp32"], field.name) >= getattr(g, field.name) for g in GATES.values())
    assert gate_for(["fp32", "int4", "fp16"]) == GATES["int4"]


def test_a_stage_off_in_scale_fails_although_its_cosine_is_one():
    """A cosine is blind to scale: outputs 3x too long have cosine 1, and the softmax that median action decoding
    reads is sharper. Each compared tensor's length is gated too."""
    from edgeact.export.verify import _gate_rows
    from edgeact.export.verify_compare import closeness

    want = np.random.default_rng(0).normal(size=(6, 32))
    scaled, noisy = closeness(3.0 * want, want), closeness(want + 1e-9, want)
    assert scaled.cosine > 0.999999 and abs(scaled.norm_err - 2.0) < 1e-9 and noisy.norm_err < 1e-6
    for closeness_of_stage, passed in ((scaled, False), (noisy, True)):
        (row,) = _gate_rows({"decoder.step": closeness_of_stage}, {"decoder": "fp32"})
        assert row["passed"] is passed and row["norm_limit"] == GATES["fp32"].norm_err
    (row,) = _gate_rows({"logits": closeness(1.03 * want, want)}, {"decoder": "int8"})
    assert row["passed"] and "length err 0.03 (<= 0.05)" in row["detail"]     # quantization's few percent pass


def test_held_out_observations_are_deterministic_and_distinct():
    first, again = held_out_observations(3), held_out_observations(3)
    assert all(np.array_equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(first, again))
    assert not np.array_equal(first[0][0], first[1][0]) and first[0][1] != first[1][1]


def test_the_reference_must_be_the_exported_checkpoint(bundles, checkpoints, tmp_path):
    with pytest.raises(BundleError, match=r"differs from the config the bundle was exported from"):
        verify_bundle(bundles["D"], checkpoints["O"], frames=1, record=False)
    with pytest.raises(BundleError, match=r"reference checkpoint \(given\) not found; pass --checkpoint DIR"):
        verify_bundle(bundles["D"], tmp_path / "nowhere", frames=1, record=False)
    with pytest.raises(BundleError, match=rf"{re.escape(str(bundles['O']))}: a bundle, not a checkpoint \(reference "
                                          r"checkpoint given\); pass --checkpoint DIR with the checkpoint \(config\.json, "
                                          rf"model\.safetensors\) this bundle was exported from, recorded as "
                                          rf"{re.escape(str(checkpoints['D']))}"):
        verify_bundle(bundles["D"], bundles["O"], frames=1, record=False)


def test_the_same_config_written_otherwise_is_still_the_exported_one(bundles, checkpoints, tmp_path):
    """A config.json re-formatted, or written by an older edgeact with a key at its default value, is the config the
    bundle was exported from; a config that differs in a value is not."""
    import json
    import shutil

    from edgeact.export.verify import config_matches, reference_checkpoint
    from edgeact.runtime.bundle import load_bundle

    bundle = load_bundle(bundles["D"], verify_checksums=False)
    copy = tmp_path / "ckpt"
    shutil.copytree(checkpoints["D"], copy)
    data = json.loads((copy / "config.json").read_text())
    data["adapter_config"]["pooling_attention_mask"] = False      # what an older edgeact wrote
    (copy / "config.json").write_text(json.dumps(data, indent=4, sort_keys=True))
    assert config_matches(copy / "config.json", bundle.manifest.model)
    assert reference_checkpoint(bundle, copy) == copy
    data["llm_config"]["rope_theta"] = 1234.0
    (copy / "config.json").write_text(json.dumps(data))
    assert not config_matches(copy / "config.json", bundle.manifest.model)
    with pytest.raises(BundleError, match="differs from the config the bundle was exported from"):
        reference_checkpoint(bundle, copy)


def test_another_checkpoint_of_the_same_config_is_refused_and_the_verdict_kept(bundles, checkpoints, tmp_path,
                                                                                capsys):
    """A re-trained model of the same architecture would fail every gate of a good bundle: refused before comparing."""
    bundle_dir = _copy(bundles["D"], tmp_path)
    recorded = read_manifest(bundle_dir).model.source_weights_sha256
    assert recorded == weights_sha256("checkpoint", checkpoints["D"]) != ""
    other = make_checkpoint("D", "tiny", seed=8, out_dir=tmp_path / "retrained")
    assert (other / "config.json").read_bytes() == (checkpoints["D"] / "config.json").read_bytes()
    before = (bundle_dir / "manifest.json").read_bytes()
    with pytest.raises(BundleError, match=rf"{re.escape(str(other))}: its weights \(sha256 [0-9a-f]{{12}}\) are not "
                                          rf"those {re.escape(str(bundle_dir))} was exported from "
                                          rf"\({re.escape(str(checkpoints['D']))}, weights sha256 {recorded[:12]}\).*"
                                          r"pass --checkpoint DIR with the checkpoint this bundle was exported from, "
                                          r"or export this one"):
        verify_bundle(bundle_dir, other, frames=1, threads=1)
    assert main(["verify", str(bundle_dir), "--checkpoint", str(other), "--frames", "1", "--threads", "1"]) == 2
    assert "are not those" in capsys.readouterr().err
    assert (bundle_dir / "manifest.json").read_bytes() == before      # no verdict recorded
    # Re-trained in place: the checkpoint the manifest names now holds the other model.
    update_manifest(bundle_dir, lambda m: setattr(m, "model", dataclasses.replace(m.model, source_checkpoint=str(other))))
    before = (bundle_dir / "manifest.json").read_bytes()
    with pytest.raises(BundleError, match=r"are not those"):
        verify_bundle(bundle_dir, frames=1, threads=1)
    assert (bundle_dir / "manifest.json").read_bytes() == before      # no verdict recorded


def test_a_bundle_without_a_weights_digest_is_checked_by_its_config_only_with_a_warning(bundles, checkpoints,
                                                                                       tmp_path, caplog):
    bundle_dir = _copy(bundles["D"], tmp_path)
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    del manifest["model"]["source"]["weights_sha256"]          # as exported before the digest was recorded
    (bundle_dir / "manifest.json").write_text(json.dumps(manifest))
    other = make_checkpoint("D", "tiny", seed=8, out_dir=tmp_path / "retrained")
    bundle = load_bundle(bundle_dir)
    assert bundle.manifest.model.source_weights_sha256 == ""
    with caplog.at_level("WARNING", logger="edgeact.export.verify"):
        assert verify_module.reference_checkpoint(bundle, other) == other
    assert "records no weights digest of its checkpoint" in caplog.text and str(other) in caplog.text
    report = verify_bundle(bundle_dir, frames=1, threads=1)         # against its own checkpoint: as before
    assert report.passed and read_manifest(bundle_dir).verification.status == "passed"


def test_cli_export_verify_and_inspect(checkpoints, tmp_path, capsys):
    out = tmp_path / "cli-bundle"
    assert main(["export", str(checkpoints["O"]), "--out", str(out), "--frames", "1", "--threads", "1",
                 "--max-seq", "1024", "--chunk", "2"]) == 0
    text = capsys.readouterr().out
    assert "stage decoder" in text and "seq 1/" in text and "verification passed" in text
    assert main(["export", str(checkpoints["O"]), "--out", str(out), "--no-verify"]) == 2
    assert "already exists; pass overwrite=True (--overwrite)" in capsys.readouterr().err

    assert main(["verify", str(out), "--frames", "1", "--threads", "1"]) == 0
    text = capsys.readouterr().out
    assert "tokens.greedy.action" in text and "verification passed" in text
    assert main(["inspect", str(out), "--json"]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["verification"]["status"] == "passed" and manifest["grammar"]["n_actions"] == 2
    assert manifest["stages"]["decoder"]["dim_ranges"]["seq"]["max"] == 1024
    assert main(["inspect", str(out)]) == 0
    assert "verification: passed" in capsys.readouterr().out


def _digest(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_export_overwrite_verifies_the_new_bundle_before_it_replaces_the_verified_one(checkpoints, tmp_path,
                                                                                     monkeypatch, capsys):
    out = tmp_path / "bundle"
    args = ["export", str(checkpoints["D"]), "--out", str(out), "--frames", "1", "--threads", "1", "--max-seq", "1024"]
    assert main(args) == 0
    old = _digest(out)
    assert read_manifest(out).verification.status == "passed"
    real, seen = verify_module.verify_bundle, []

    def watched(bundle_dir, *a, **kw):
        # While the new bundle is verified, the target still holds the old, verified bundle, byte for byte.
        seen.append((bundle_dir, _digest(out)))
        return real(bundle_dir, *a, **kw)

    monkeypatch.setattr(verify_module, "verify_bundle", watched)
    assert main(args + ["--overwrite", "--chunk", "2"]) == 0
    (staged, during), = seen
    assert staged != out and staged.parent == tmp_path and during == old
    m = read_manifest(out)                       # published with its verdict
    assert m.verification.status == "passed" and m.grammar["n_actions"] == 2
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

    # Verification interrupted (Ctrl-C; a kill leaves the same plus a .partial directory): the old bundle stays.
    published = _digest(out)

    def interrupted(bundle_dir, *a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(verify_module, "verify_bundle", interrupted)
    capsys.readouterr()
    assert main(args + ["--overwrite", "--chunk", "3"]) == 130
    assert _digest(out) == published and read_manifest(out).verification.status == "passed"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

    # --no-verify still publishes at once, saying it was not verified and how to.
    assert main(args + ["--overwrite", "--no-verify"]) == 0
    assert read_manifest(out).verification.status == "not_run"
    assert f"edgeact verify {out} --checkpoint {checkpoints['D']}" in capsys.readouterr().out


def test_a_verdict_is_not_recorded_onto_other_content(bundles, tmp_path):
    """A bundle replaced (or changed) while it was verified keeps its own verification, not the other's verdict."""
    target = _copy(bundles["D"], tmp_path)
    other = shutil.copytree(bundles["D"], tmp_path / "other")
    _perturb_decoder(other, 1.0)
    replaced = []

    def replace_mid_verification(done, total):
        with BundleWriter(target, overwrite=True) as w:       # e.g. a concurrent `quantize --overwrite`
            copy_bundle(other, w)
        replaced.append(read_manifest(target).files)

    with pytest.raises(BundleError, match=r"the bundle changed while it was verified \(stages/decoder.onnx differ "
                                          r"from the files compared\); its verdict \(passed\) is not recorded: "
                                          r"re-run `edgeact verify"):
        verify_bundle(target, frames=1, threads=1, on_frame=replace_mid_verification)
    assert replaced and read_manifest(target).verification.status == "not_run"
    assert read_manifest(target).files == replaced[0]

    report = verify_bundle(target, frames=1, threads=1, record=False)     # the new content, judged itself
    record_verification(target, report)
    assert read_manifest(target).verification.status == report.status == "failed"


def test_verify_keeps_the_depth_tokenizer_row_it_cannot_measure_and_a_failed_one_fails_the_bundle(
        bundles, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(depth_tokenizer_export, "CODE_AGREEMENT_GATE", 1.01)     # no agreement reaches it: fails
    out = with_depth_tokenizer(bundles["D"], tmp_path)
    assert main(["verify", str(out), "--frames", "1", "--threads", "1"]) == 1      # what `edgeact verify` runs
    assert "verification FAILED at depth_tokenizer_codes" in " ".join(capsys.readouterr().out.split())
    v = read_manifest(out).verification
    assert v.status == "failed" and [r["gate"] for r in v.results] == GATE_NAMES + ["depth_tokenizer_codes"]
    with pytest.raises(BundleError, match="verification failed at gate 'depth_tokenizer_codes'"):
        load_bundle(out)

    # A depth_tokenizer stage without its row (an older verify dropped it): failed, naming the step that checks it.
    update_manifest(out, lambda m: setattr(m, "verification", VerificationInfo()))
    report = verify_bundle(out, frames=1, threads=1)
    (row,) = report.failing()
    assert row["gate"] == "depth_tokenizer_codes" and row["stage"] == "depth_tokenizer"
    assert "`edgeact add-depth-tokenizer`" in row["detail"] and read_manifest(out).verification.status == "failed"


def test_a_passed_verdict_needs_a_row_for_every_stage(bundles, tmp_path):
    target = _copy(bundles["D"], tmp_path)
    rows = tuple({"gate": f"{s}.cosine", "stage": s, "passed": True} for s in ("vision", "decoder"))
    with pytest.raises(BundleError, match=r"status is 'passed' but no result row gates stage 'connector'.*"
                                          r"`edgeact verify`"):
        update_manifest(target, lambda m: setattr(m, "verification", VerificationInfo("passed", {}, rows)))
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["verification"] = {"status": "passed", "gates": {}, "results": list(rows)}
    (target / "manifest.json").write_text(json.dumps(manifest))
    # Read back (an older verify wrote such verdicts): failed at that stage, so it loads only as a failed bundle does.
    with pytest.raises(BundleError, match=r"verification failed at gate 'connector.unverified'.*--allow-unverified"):
        load_bundle(target)
    assert load_bundle(target, allow_failed_verification=True).manifest.verification.status == "failed"


def _as_before_the_depth_row(bundle_dir) -> None:
    """The manifest as an older `edgeact verify` left it: 'passed', with no row for the depth_tokenizer stage."""
    path = bundle_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    rows = [{"gate": f"{s}.cosine", "stage": s, "precision": "fp32", "value": 1.0, "limit": 0.99999, "detail": "",
             "passed": True} for s in ("vision", "connector", "decoder")]
    manifest["verification"] = {"status": "passed", "gates": {}, "results": rows}
    path.write_text(json.dumps(manifest, indent=2))


def test_add_depth_tokenizer_on_a_bundle_from_before_the_depth_row_replaces_the_readers_failing_row(
        bundles, tmp_path, monkeypatch, capsys):
    """The reader marks such a bundle failed at `depth_tokenizer.unverified`; the new stage's row replaces that."""
    old = with_depth_tokenizer(bundles["D"], tmp_path)
    _as_before_the_depth_row(old)
    assert read_manifest(old).verification.status == "failed"              # as the reader takes it
    images = np.random.default_rng(1).uniform(0.3, 1.8, (2, 60, 80)).astype(np.float32)
    monkeypatch.setattr(depth_tokenizer_export, "_held_out_images", lambda meta: images)
    tokenizer = str(tmp_path / "depth_tokenizer")
    assert main(["add-depth-tokenizer", str(old), "--tokenizer", tokenizer, "--out", str(tmp_path / "new")]) == 0
    v = load_bundle(tmp_path / "new").manifest.verification                 # loads without --allow-unverified
    assert v.status == "passed"
    assert [r["gate"] for r in v.results] == ["vision.cosine", "connector.cosine", "decoder.cosine",
                                              "depth_tokenizer_codes"]

    # A source failed at another gate: the new bundle is failed too, and the command says so by its exit status.
    failed = _copy(old, tmp_path)
    update_manifest(failed, lambda m: setattr(m, "verification", VerificationInfo("failed", {}, (
        {"gate": "vision.cosine", "stage": "vision", "passed": False, "value": 0.5, "limit": 0.99999},))))
    capsys.readouterr()
    assert main(["add-depth-tokenizer", str(failed), "--tokenizer", tokenizer, "--out", str(tmp_path / "bad")]) == 1
    assert read_manifest(tmp_path / "bad").verification.status == "failed"
    assert "vision.cosine" in " ".join(capsys.readouterr().out.split())


def test_verify_of_a_bundle_from_before_the_depth_row_fails_at_the_depth_gate_not_the_readers_row(
        bundles, tmp_path, capsys):
    old = with_depth_tokenizer(bundles["D"], tmp_path)
    _as_before_the_depth_row(old)
    assert main(["verify", str(old), "--frames", "1", "--threads", "1"]) == 1
    assert "verification FAILED at depth_tokenizer_codes" in " ".join(capsys.readouterr().out.split())
    v = read_manifest(old).verification
    assert v.status == "failed" and [r["gate"] for r in v.results] == GATE_NAMES + ["depth_tokenizer_codes"]
    assert v.results[-1]["limit"] == depth_tokenizer_export.CODE_AGREEMENT_GATE


def test_the_verify_table_prints_a_row_without_a_limit():
    from rich.console import Console

    from edgeact.export.commands_export import _print_report
    from edgeact.export.verify import VerificationReport

    row = {"gate": "depth_tokenizer_codes", "stage": "depth_tokenizer", "precision": "fp32", "value": None,
           "limit": None, "detail": "checked when the stage was added", "passed": True}
    console = Console(record=True, width=200)
    _print_report(console, VerificationReport("passed", {}, [row], 1, "ckpt", 0.1))
    line = next(t for t in console.export_text().splitlines() if "depth_tokenizer_codes" in t)
    assert [c.strip() for c in line.split("│")][4:6] == ["nan", "-"]
