"""The writer publishes a bundle atomically or not at all; update_manifest and copy_bundle keep it whole."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from edgeact.export.bundle_writer import BundleWriter, copy_bundle, update_manifest
from edgeact.runtime.bundle import EngineRecord, VerificationInfo, load_bundle, read_manifest, sha256_file
from edgeact.runtime.errors import BundleError
from tests.runtime.test_bundle import DECODER_RANGES, tiny_config, tiny_decoder_onnx, write_tiny_bundle


def _hidden_siblings(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def _snapshot(root):
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


def test_exception_inside_the_block_leaves_nothing(tmp_path):
    target = tmp_path / "b"
    with pytest.raises(RuntimeError, match="exporter crashed"):
        with BundleWriter(target) as w:
            w.add_array("embed_tokens", np.zeros((4, 4), np.float32))
            assert w.tmp_dir.parent == tmp_path and w.tmp_dir.name.startswith(".b.partial-")
            raise RuntimeError("exporter crashed")
    assert not target.exists() and _hidden_siblings(tmp_path) == []


def test_commit_without_a_model_fails_cleanly(tmp_path):
    with pytest.raises(BundleError, match=r"no model recorded; call writer.set_model"):
        with BundleWriter(tmp_path / "b") as w:
            w.add_array("embed_tokens", np.zeros((4, 4), np.float32))
    assert list(tmp_path.iterdir()) == []


def test_existing_bundle_is_kept_unless_overwrite(tmp_path):
    path = write_tiny_bundle(tmp_path / "b", precision="fp16")
    with pytest.raises(BundleError, match=r"already exists; pass overwrite=True \(--overwrite\)"):
        BundleWriter(path)
    write_tiny_bundle(path, precision="int8", overwrite=True)
    assert load_bundle(path).stage("decoder").precision == "int8"
    assert _hidden_siblings(tmp_path) == []      # the old bundle and the temporary are gone


def test_overwrite_refuses_a_directory_that_is_not_a_bundle(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("precious")
    with pytest.raises(BundleError, match="exists and is not a bundle .*refusing to replace it"):
        BundleWriter(home, overwrite=True)
    assert (home / "notes.txt").read_text() == "precious"


NOT_A_BUNDLE_MANIFEST = "its manifest.json is not a bundle manifest: no schema_version, tool"


@pytest.mark.parametrize("manifest, why", [
    ({"format": "edgeact-calibration", "version": 1, "seed": 0}, NOT_A_BUNDLE_MANIFEST),     # a calibration set
    ({"name": "web-app", "short_name": "app", "icons": []}, NOT_A_BUNDLE_MANIFEST),          # a web project
    ("{ not json", "its manifest.json is not valid JSON"),
    ({"schema_version": 2, "tool": {"name": "other"}, "model": {}, "stages": {}, "files": {}},
     "its manifest.json was written by 'other', not edgeact"),
])
def test_overwrite_replaces_only_an_edgeact_bundle_not_any_directory_with_a_manifest(tmp_path, manifest, why):
    other = tmp_path / "calibration"
    other.mkdir()
    (other / "manifest.json").write_text(manifest if isinstance(manifest, str) else json.dumps(manifest))
    (other / "samples.npz").write_bytes(b"precious")
    with pytest.raises(BundleError) as err:
        write_tiny_bundle(other, overwrite=True)
    assert str(err.value).startswith(f"{other}: exists and is not a bundle ({why}")
    assert "refusing to replace it" in str(err.value)
    assert (other / "samples.npz").read_bytes() == b"precious" and _hidden_siblings(tmp_path) == []


def test_overwrite_replaces_a_bundle_of_an_older_schema_and_an_empty_directory(tmp_path):
    old = write_tiny_bundle(tmp_path / "old")
    data = json.loads((old / "manifest.json").read_text())
    data["schema_version"] = 1                   # unreadable now, and exactly what a re-export replaces
    (old / "manifest.json").write_text(json.dumps(data))
    write_tiny_bundle(old, precision="int8", overwrite=True)
    assert load_bundle(old).stage("decoder").precision == "int8"
    (tmp_path / "empty").mkdir()
    write_tiny_bundle(tmp_path / "empty", overwrite=True)
    load_bundle(tmp_path / "empty")


def _writer_with_basics(w):
    w.set_model(tiny_config())
    w.add_json("tokenizer.json", {"model": {"type": "BPE"}})     # written in place, as an exporter may
    w.add_tokenizer(w.path_for("tokenizer.json"), {"image_size": 28})


def test_declared_io_must_match_the_graph(tmp_path):
    with pytest.raises(BundleError, match=r"stage 'decoder': declared inputs do not match the graph: not in the graph \['ids'\]"):
        with BundleWriter(tmp_path / "b") as w:
            w.add_onnx("decoder", tiny_decoder_onnx(), precision="fp16", dim_ranges=DECODER_RANGES,
                       inputs=[{"name": "ids", "dtype": "int64", "dims": ["batch", "seq"]},
                               {"name": "past_key", "dtype": "float32", "dims": ["batch", 2, "past_seq", 16]}])
    with pytest.raises(BundleError, match=r"input 'past_key' axis 1 is fixed to 2 in the graph but declared 'kv'"):
        with BundleWriter(tmp_path / "b") as w:
            w.add_onnx("decoder", tiny_decoder_onnx(), precision="fp16", dim_ranges={**DECODER_RANGES, "kv": (2, 2, 2)},
                       inputs=[{"name": "input_ids", "dtype": "int64", "dims": ["batch", "seq"]},
                               {"name": "past_key", "dtype": "float32", "dims": ["batch", "kv", "past_seq", 16]}])
    assert not (tmp_path / "b").exists()


def test_onnx_from_a_path_brings_its_external_data(tmp_path):
    src = tmp_path / "export"
    src.mkdir()
    onnx.save_model(tiny_decoder_onnx(with_weight=True), str(src / "dec.onnx"), save_as_external_data=True,
                    location="dec.weights")
    with BundleWriter(tmp_path / "b") as w:
        _writer_with_basics(w)
        spec = w.add_onnx("decoder", src / "dec.onnx", precision="fp16", dim_ranges=DECODER_RANGES)
    assert spec.file == "stages/decoder.onnx" and spec.external_data == ("stages/dec.weights",)
    bundle = load_bundle(tmp_path / "b")
    assert "stages/dec.weights" in bundle.manifest.files
    model = onnx.load(str(bundle.stage_path("decoder")))       # resolves the external data beside it
    onnx.checker.check_model(model)
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(model.graph.initializer[0]), np.eye(16, dtype=np.float32))


def test_onnx_written_in_place_and_proto_with_external_data(tmp_path):
    with BundleWriter(tmp_path / "b") as w:
        _writer_with_basics(w)
        onnx.save_model(tiny_decoder_onnx(), str(w.stage_path("decoder")))   # as an exporter would
        in_place = w.add_onnx("decoder", w.stage_path("decoder"), precision="fp16", dim_ranges=DECODER_RANGES)
        proto = w.add_onnx("decoder_int8", tiny_decoder_onnx(with_weight=True), precision="int8",
                           dim_ranges=DECODER_RANGES, external_data=True)
    assert in_place.file == "stages/decoder.onnx" and in_place.external_data == ()
    assert proto.external_data == ("stages/decoder_int8.onnx.data",)
    assert set(load_bundle(tmp_path / "b").manifest.stages) == {"decoder", "decoder_int8"}


def test_onnxruntimes_tensorrt_engine_cache_is_never_checksummed(tmp_path):
    from edgeact.runtime.ort_engine import ORT_TRT_CACHE_DIR

    path = write_tiny_bundle(tmp_path / "b", verification="not_run")
    cache = path / ORT_TRT_CACHE_DIR / "TensorrtExecutionProvider_TRTKernel_graph_main_1_0_0_sm87.engine"
    cache.parent.mkdir(parents=True)
    cache.write_bytes(b"engine v1")                  # what a run with provider='tensorrt' leaves in the bundle
    update_manifest(path, lambda m: None)            # as `edgeact verify` records its verdict
    assert not [rel for rel in read_manifest(path).files if rel.startswith(ORT_TRT_CACHE_DIR)]
    cache.write_bytes(b"engine v2, rebuilt")         # onnxruntime rebuilds its cache (new TensorRT, other profile)
    load_bundle(path)

    # A manifest an older update_manifest froze the cache into: the entry is dropped, the rebuilt cache loads.
    data = json.loads((path / "manifest.json").read_text())
    data["files"][cache.relative_to(path).as_posix()] = {"sha256": "0" * 64, "bytes": 9}
    (path / "manifest.json").write_text(json.dumps(data))
    assert ORT_TRT_CACHE_DIR not in str(list(load_bundle(path).manifest.files))


def test_update_manifest_records_new_files_and_refuses_tampering(tmp_path):
    path = write_tiny_bundle(tmp_path / "b", verification="not_run")
    plan = path / "engines/orin/decoder.plan"
    plan.parent.mkdir(parents=True)
    plan.write_bytes(b"plan-v1")
    record = EngineRecord("decoder", "engines/orin/decoder.plan", "orin", "10.3.0", "8.7", "fp16",
                          sha256_file(plan), ("prefill", "decode"))

    def mark(m):
        m.verification = VerificationInfo("passed", {}, ({"gate": "decoder.top1_agreement", "stage": "decoder",
                                                          "passed": True},))
        m.engines.append(record)
    update_manifest(path, mark)
    bundle = load_bundle(path)
    assert bundle.manifest.verification.status == "passed" and bundle.engine("decoder", "orin") == record
    assert bundle.manifest.files["engines/orin/decoder.plan"].bytes == len(b"plan-v1")

    plan.write_bytes(b"plan-v2, rebuilt")
    with pytest.raises(BundleError, match="engines/orin/decoder.plan: size changed since export"):
        update_manifest(path, lambda m: None)
    update_manifest(path, lambda m: None, rehash=["engines/orin/decoder.plan"])
    load_bundle(path)                             # the new checksum is recorded

    before = (path / "manifest.json").read_text()
    with pytest.raises(BundleError, match="engine .* is for unknown stage 'vision'"):
        update_manifest(path, lambda m: m.engines.append(EngineRecord("vision", "tokenizer.json", "orin", "10", "8.7", "fp16", "0" * 64)))
    assert (path / "manifest.json").read_text() == before      # a refused update changes nothing
    (path / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match="tokenizer.json: missing"):
        update_manifest(path, lambda m: None)


def test_copy_bundle_derives_a_new_bundle_and_never_touches_the_source(tmp_path):
    src = write_tiny_bundle(tmp_path / "src", verification="passed")
    update_manifest(src, lambda m: None)        # (no-op update keeps the source valid)
    before = _snapshot(src)
    with BundleWriter(tmp_path / "q") as w:
        source = copy_bundle(src, w, skip_stages=["decoder"])
        w.add_onnx("decoder", tiny_decoder_onnx(), precision="int8", dim_ranges=source.stages["decoder"].dim_ranges,
                   profiles=source.stages["decoder"].profiles)
        w.set_quantization("smoothquant-w8a8", {"alpha": 0.8}, [{"stage": "decoder", "max_abs_err": 0.02}])
    assert _snapshot(src) == before
    q = load_bundle(tmp_path / "q").manifest
    assert q.stages["decoder"].precision == "int8" and q.verification.status == "not_run" and q.engines == []
    assert q.model == source.model and q.grammar == source.grammar and set(q.weights) == {"embed_tokens"}
    assert json.loads((tmp_path / "q/preprocessor_config.json").read_text()) == {"image_size": 28}


def test_copy_bundle_detects_a_corrupt_source(tmp_path):
    src = write_tiny_bundle(tmp_path / "src")
    data = bytearray((src / "weights/embed_tokens.npy").read_bytes())
    data[-1] ^= 1
    (src / "weights/embed_tokens.npy").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="weights/embed_tokens.npy: sha256 mismatch in the source bundle"):
        with BundleWriter(tmp_path / "q") as w:
            copy_bundle(src, w)
    assert not (tmp_path / "q").exists()
    assert read_manifest(src).files["weights/embed_tokens.npy"]      # source manifest untouched


def test_symlinks_are_refused_and_nothing_is_published(tmp_path):
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"x")
    with pytest.raises(BundleError, match="extra/link.bin: not a regular file"):
        with BundleWriter(tmp_path / "b") as w:
            _writer_with_basics(w)
            w.add_onnx("decoder", tiny_decoder_onnx(), precision="fp16", dim_ranges=DECODER_RANGES)
            w.path_for("extra/link.bin").symlink_to(outside)
    assert not (tmp_path / "b").exists() and _hidden_siblings(tmp_path) == []


def test_published_bundle_is_readable_by_other_users(tmp_path):
    """The temporary directory is owner-only; a bundle flashed to a robot is run by a service user."""
    import os
    import stat

    out = write_tiny_bundle(tmp_path / "b")
    umask = os.umask(0)
    os.umask(umask)
    for path in [out, *out.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o777 if path.is_dir() else 0o666) & ~umask, path


def test_before_publish_runs_on_the_finished_bundle_while_the_old_one_stays_in_place(tmp_path):
    path = write_tiny_bundle(tmp_path / "b", precision="fp16", verification="passed")
    old = _snapshot(path)
    seen = {}

    def judge(staged):
        seen["staged"], seen["target"] = staged, read_manifest(path)      # the old bundle, still loadable
        assert read_manifest(staged).stages["decoder"].precision == "int8"
        update_manifest(staged, lambda m: setattr(m, "verification", VerificationInfo(
            "passed", {}, ({"gate": "decoder.top1_agreement", "stage": "decoder", "passed": True},))))

    with BundleWriter(path, overwrite=True, before_publish=judge) as w:
        _writer_with_basics(w)
        w.add_onnx("decoder", tiny_decoder_onnx(), precision="int8", dim_ranges=DECODER_RANGES)
    assert seen["staged"].parent == tmp_path and seen["staged"].name.startswith(".b.partial-")
    assert seen["target"].stages["decoder"].precision == "fp16"
    m = load_bundle(path).manifest
    assert m.stages["decoder"].precision == "int8" and m.verification.status == "passed" and w.manifest == m
    assert _snapshot(path) != old and _hidden_siblings(tmp_path) == []

    # A step that fails (or is interrupted) publishes nothing: the bundle there is untouched.
    published = _snapshot(path)
    def interrupted(staged):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        with BundleWriter(path, overwrite=True, before_publish=interrupted) as w:
            _writer_with_basics(w)
            w.add_onnx("decoder", tiny_decoder_onnx(), precision="fp16", dim_ranges=DECODER_RANGES)
    assert _snapshot(path) == published and _hidden_siblings(tmp_path) == []


def test_a_kill_during_before_publish_leaves_the_old_bundle_whole(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    path = write_tiny_bundle(tmp_path / "b", precision="fp16", verification="passed")
    old = _snapshot(path)
    code = ("import os, sys\n"
            "from edgeact.export.bundle_writer import BundleWriter\n"
            "from tests.export.test_bundle_writer import _writer_with_basics, tiny_decoder_onnx, DECODER_RANGES\n"
            "with BundleWriter(sys.argv[1], overwrite=True, before_publish=lambda staged: os._exit(9)) as w:\n"
            "    _writer_with_basics(w)\n"
            "    w.add_onnx('decoder', tiny_decoder_onnx(), precision='int8', dim_ranges=DECODER_RANGES)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 9, proc.stderr
    assert _snapshot(path) == old and load_bundle(path).manifest.verification.status == "passed"
    assert [n.startswith(".b.partial-") for n in _hidden_siblings(tmp_path)] == [True]


def test_an_output_is_refused_where_it_leads_into_the_source_bundle(tmp_path):
    # quantize and add-depth-tokenizer write a new bundle and never modify their source: compared where the paths
    # lead, through symlinks and `..`, and with nothing inside the source either.
    from edgeact.export.bundle_writer import refuse_out_in_source

    src = tmp_path / "src"
    src.mkdir()
    (tmp_path / "link").symlink_to(src)
    for source, out, what in ((tmp_path / "link", src, "is the source bundle"),
                              (src, tmp_path / "link", "is the source bundle"),
                              (src, tmp_path / "elsewhere" / ".." / "src", "is the source bundle"),
                              (src, src / "int4", "lies inside the source bundle"),
                              (tmp_path / "link", src / "a" / "b", "lies inside the source bundle")):
        with pytest.raises(BundleError, match=f"{what} .*write the new bundle to another directory: the source "
                                              "bundle is never modified"):
            refuse_out_in_source(source, out)
    refuse_out_in_source(src, tmp_path / "src-int4")            # a sibling whose name starts alike is another place
