"""The bundle loader accepts exactly what the writer wrote and refuses every damaged bundle with a clear error.

`write_tiny_bundle` (also used by the export tests) writes a real bundle: a tiny decoder-shaped
ONNX graph, an embedding table, tokenizer files, a quantization report and verification rows.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgeact.runtime.arm_config import AdapterConfig, ArmConfig, LlmConfig, VitConfig
from edgeact.runtime.bundle import (
    SCHEMA_VERSION, Bundle, DimRange, Manifest, StageSpec, TensorSpec, load_bundle, read_manifest, sha256_file,
    tool_version,
)
from edgeact.runtime.cli import main
from edgeact.runtime.errors import BundleError

DECODER_RANGES = {"batch": (1, 1, 1), "seq": (1, 16, 64), "past_seq": (0, 64, 256)}
DECODER_PROFILES = [{"name": "prefill", "dim_ranges": {"seq": (1, 16, 64)}},
                    {"name": "decode", "dim_ranges": {"seq": (1, 1, 1)}}]
FAILED_RESULTS = [{"gate": "decoder.prefill.cosine", "stage": "decoder", "passed": True, "value": 0.9999,
                   "limit": 0.999},
                  {"gate": "decoder.top1_agreement", "stage": "decoder", "passed": False, "value": 0.91, "limit": 0.99}]


def tiny_config() -> ArmConfig:
    vit = VitConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=2, head_dim=16, image_default_input_size=[28, 28], image_patch_size=14,
                    image_num_pos=4)
    adapter = AdapterConfig(vit_layers=[-1], hidden_size=32, num_attention_heads=2, num_key_value_heads=2,
                            head_dim=16, intermediate_size=48, text_hidden_size=64)
    llm = LlmConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=512,
                    additional_vocab_size=128, num_hidden_layers=2, intermediate_size=96)
    return ArmConfig(vit, adapter, llm, image_patch_id=503)


def tiny_decoder_onnx(with_weight: bool = False):
    """input_ids[batch, seq] -> hidden[batch, seq]; past_key[batch, 2, past_seq, 16] -> present_key."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("Cast", ["input_ids"], ["ids_f"], to=TensorProto.FLOAT)]
    inits = []
    if with_weight:   # 1 KiB: big enough for onnx to move it to an external-data file
        inits.append(numpy_helper.from_array(np.eye(16, dtype=np.float32), "w_key"))
        nodes.append(helper.make_node("MatMul", ["past_key", "w_key"], ["present_key"]))
    else:
        nodes.append(helper.make_node("Identity", ["past_key"], ["present_key"]))
    nodes.append(helper.make_node("Identity", ["ids_f"], ["hidden"]))
    graph = helper.make_graph(
        nodes, "decoder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info("past_key", TensorProto.FLOAT, ["batch", 2, "past_seq", 16])],
        [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", "seq"]),
         helper.make_tensor_value_info("present_key", TensorProto.FLOAT, ["batch", 2, "past_seq", 16])],
        initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def write_tiny_bundle(out_dir: Path, *, verification: str = "passed", precision: str = "fp16",
                      overwrite: bool = False, dim_ranges: dict | None = None, external_data: bool = False) -> Path:
    from edgeact.export.bundle_writer import BundleWriter

    out_dir = Path(out_dir)
    src = out_dir.parent / f"{out_dir.name}-src"
    src.mkdir(parents=True, exist_ok=True)
    (src / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE"}}))
    with BundleWriter(out_dir, overwrite=overwrite) as w:
        w.set_model(tiny_config(), checkpoint="/ckpt/tiny", config_sha256="ab" * 32, name="tiny-sim")
        w.add_tokenizer(src / "tokenizer.json", {"image_size": 28})
        w.add_onnx("decoder", tiny_decoder_onnx(with_weight=external_data), precision=precision,
                   dim_ranges=dim_ranges or DECODER_RANGES, profiles=DECODER_PROFILES, external_data=external_data,
                   doc="prefill and decode steps")
        w.add_array("embed_tokens", np.arange(640 * 64, dtype=np.float16).reshape(640, 64))
        w.set_norm_stats({"sim_pick": {"action": {"q01": [-1.0] * 7, "q99": [1.0] * 7}}})
        w.set_grammar({"kind": "molmoact-answer", "version": 1})
        w.set_quantization("smoothquant-w8a8", {"alpha": 0.5},
                           [{"stage": "decoder", "layers": 2, "max_abs_err": 0.0125}])
        results = FAILED_RESULTS if verification == "failed" else FAILED_RESULTS[:1] if verification == "passed" else []
        w.set_verification(verification, {"decoder.top1_agreement": {"min": 0.99}}, results)
    return out_dir


@pytest.fixture
def bundle_dir(tmp_path) -> Path:
    return write_tiny_bundle(tmp_path / "tiny")


def _edit_manifest(bundle_dir: Path, fn) -> None:
    path = bundle_dir / "manifest.json"
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def test_round_trip_loads_what_was_written(bundle_dir):
    bundle = load_bundle(bundle_dir)
    m = bundle.manifest
    assert m.schema_version == SCHEMA_VERSION and m.tool.version == tool_version()
    assert bundle.config.to_dict() == tiny_config().to_dict() and m.model.variant == "D"
    stage = bundle.stage("decoder")
    assert [t.name for t in stage.inputs] == ["input_ids", "past_key"]
    assert stage.inputs[1].dims == ("batch", 2, "past_seq", 16) and stage.dim_ranges["past_seq"] == DimRange(0, 64, 256)
    assert [p.name for p in stage.profiles] == ["prefill", "decode"]
    embed = bundle.weight("embed_tokens")
    assert isinstance(embed, np.memmap) and not embed.flags.writeable
    np.testing.assert_array_equal(embed, np.arange(640 * 64, dtype=np.float16).reshape(640, 64))
    assert m.verification.status == "passed" and m.quantization.recipe == "smoothquant-w8a8"
    assert Manifest.from_dict(m.to_dict()).to_dict() == m.to_dict()


def test_files_cover_every_file_but_the_manifest(bundle_dir):
    on_disk = {p.relative_to(bundle_dir).as_posix() for p in bundle_dir.rglob("*") if p.is_file()}
    assert set(load_bundle(bundle_dir).manifest.files) == on_disk - {"manifest.json"}
    assert {"stages/decoder.onnx", "weights/embed_tokens.npy", "tokenizer.json", "preprocessor_config.json"} <= on_disk


def test_corrupted_file_is_refused_by_its_sha256(bundle_dir):
    path = bundle_dir / "stages/decoder.onnx"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"stages/decoder.onnx: sha256 mismatch \(file corrupt or modified\); re-copy or re-export"):
        load_bundle(bundle_dir)
    # Without hashing, only sizes are checked: the same-size corruption passes (the documented trade-off).
    load_bundle(bundle_dir, verify_checksums=False)


def test_truncated_and_missing_files_are_named(bundle_dir):
    weights = bundle_dir / "weights/embed_tokens.npy"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(BundleError, match=r"weights/embed_tokens.npy: 100 bytes but the manifest says \d+"):
        load_bundle(bundle_dir, verify_checksums=False)
    weights.unlink()
    with pytest.raises(BundleError, match=r"weights/embed_tokens.npy: missing .*re-copy or re-export"):
        load_bundle(bundle_dir)


def test_a_bundle_from_before_the_vision_split_is_refused_with_the_reason_and_the_fix(bundle_dir):
    _edit_manifest(bundle_dir, lambda d: d.update(schema_version=1))
    with pytest.raises(BundleError, match=rf"schema_version 1, but edgeact .* reads schema_version {SCHEMA_VERSION} "
                                          r"\(schema 1 ran .* one `vision` stage .* `connector`.*\); re-export with edgeact"):
        load_bundle(bundle_dir)


def test_wrong_schema_version_names_both_versions_and_the_fix(bundle_dir):
    _edit_manifest(bundle_dir, lambda d: d.update(schema_version=SCHEMA_VERSION + 1))
    with pytest.raises(BundleError) as err:
        load_bundle(bundle_dir)
    msg = str(err.value)
    assert f"schema_version {SCHEMA_VERSION + 1}" in msg and f"reads schema_version {SCHEMA_VERSION}" in msg
    assert f"re-export with edgeact {tool_version()}" in msg and "upgrade edgeact" in msg


@pytest.mark.parametrize("content, message", [
    ([1, 2], r"manifest\.json: not a bundle's manifest: it holds a JSON list, where a bundle's is an object with "
             r"schema_version, model, stages and files; give a bundle directory"),
    ({"format": "edgeact-calibration", "version": 1, "seed": 0, "samples": []},
     r"manifest\.json: the manifest of a quantization calibration set \(edgeact calibrate\), not of a bundle; give a "
     r"bundle directory"),
    ({"format": "edgeact-sim-demos/2", "shards": []}, r"the manifest of a demonstration set \(edgeact sim-demos\)"),
    ({"hello": 1}, r"it holds a JSON object with keys hello, where a bundle's is"),
])
def test_a_manifest_that_is_not_a_bundles_says_what_it_is(tmp_path, content, message):
    """Not 'schema_version None, but edgeact reads schema_version 2; re-export': nothing there was ever a bundle."""
    (tmp_path / "manifest.json").write_text(json.dumps(content))
    with pytest.raises(BundleError, match=message):
        load_bundle(tmp_path)


def test_invalid_json_and_missing_manifest(bundle_dir, tmp_path):
    (bundle_dir / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="manifest.json: not valid JSON"):
        load_bundle(bundle_dir)
    (bundle_dir / "manifest.json").unlink()
    with pytest.raises(BundleError, match="manifest.json: missing; .* not a bundle or an incomplete copy"):
        load_bundle(bundle_dir)
    with pytest.raises(BundleError, match="no bundle here; check the path"):
        load_bundle(tmp_path / "nowhere")


def test_failed_verification_is_refused_unless_overridden(tmp_path):
    path = write_tiny_bundle(tmp_path / "bad", verification="failed")
    with pytest.raises(BundleError) as err:
        load_bundle(path)
    msg = str(err.value)
    assert "verification failed at gate 'decoder.top1_agreement'" in msg and "value=0.91" in msg
    # Each way to load it anyway, with the commands it applies to: `edgeact run` has no flag, only the config field.
    assert "`allow_unverified: true` in the robot config's policy section (edgeact run, edgeact bench)" in msg
    assert "--allow-unverified (edgeact flash, edgeact build-engines, edgeact eval)" in msg
    with pytest.raises(BundleError) as err:
        load_bundle(path, unverified_fix="the caller's own fix")
    assert str(err.value).endswith("Re-export or quantize with another recipe; the caller's own fix")
    bundle = load_bundle(path, allow_failed_verification=True)
    assert [r["gate"] for r in bundle.manifest.verification.failing()] == ["decoder.top1_agreement"]


def test_interrupted_export_leaves_no_bundle_and_the_loader_says_so(tmp_path):
    # A real kill: the process dies inside the with-block (os._exit skips every cleanup, like SIGKILL).
    code = (
        "import os, sys, numpy as np\n"
        "from edgeact.export.bundle_writer import BundleWriter\n"
        "w = BundleWriter(sys.argv[1]).__enter__()\n"
        "w.add_array('embed_tokens', np.zeros((4, 4), np.float32))\n"
        "os._exit(9)\n"
    )
    target = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    assert not target.exists()
    assert [p.name.startswith(".killed.partial-") for p in tmp_path.iterdir()] == [True]
    with pytest.raises(BundleError, match=r"killed: no bundle here; found \.killed\.partial-\S+ beside it: the export was interrupted; re-run it"):
        load_bundle(target)


# A real kill (os._exit skips every cleanup, like SIGKILL or a power cut) right after atomic_dir.publish moved the
# old folder aside and before it renamed the new one in: the start of a script that then publishes.
KILL_AFTER_MOVING_ASIDE = (
    "import os, sys\n"
    "import edgeact.runtime.atomic_dir as atomic_dir\n"
    "real = os.rename\n"
    "def rename(src, dst):\n"
    "    real(src, dst)\n"
    "    if str(dst).endswith('previous'):\n"
    "        os._exit(9)\n"
    "atomic_dir.os.rename = rename\n"
)
_KILLED_OVERWRITE = (KILL_AFTER_MOVING_ASIDE + "from tests.runtime.test_bundle import write_tiny_bundle\n"
                     "write_tiny_bundle(sys.argv[1], precision='int8', overwrite=True)\n")


def test_an_overwrite_killed_between_its_renames_names_the_surviving_bundle_and_the_move(tmp_path):
    target = write_tiny_bundle(tmp_path / "b", precision="fp16")
    before = {p.relative_to(target).as_posix(): p.read_bytes() for p in target.rglob("*") if p.is_file()}
    killed = tmp_path / ".b.partial-left-by-an-earlier-kill"
    killed.mkdir()
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", _KILLED_OVERWRITE, str(target)], capture_output=True, text=True,
                          cwd=root)
    assert proc.returncode == 9, proc.stderr
    assert not target.exists()
    (previous,) = tmp_path.glob(".b.old-*/previous")
    with pytest.raises(BundleError) as err:
        load_bundle(target)
    msg = str(err.value)
    assert f"it survives in {previous}; restore it with `mv {previous} {target}`" in msg
    assert "the export was interrupted" not in msg
    # Leftovers of killed runs are named, with when they may go; nothing is deleted by the loader.
    assert killed.name in msg and "remove them (rm -r) once no export or quantize into b is running" in msg
    assert killed.is_dir() and previous.is_dir()
    previous.rename(target)                       # the move the message names
    assert load_bundle(target).stage("decoder").precision == "fp16"
    assert {p.relative_to(target).as_posix(): p.read_bytes() for p in target.rglob("*") if p.is_file()} == before


def test_invalid_config_is_refused(bundle_dir):
    _edit_manifest(bundle_dir, lambda d: d["model"]["config"]["llm_config"].update(num_key_value_heads=3))
    with pytest.raises(BundleError, match="model.config.*not a multiple of num_key_value_heads.*re-export"):
        load_bundle(bundle_dir)


def test_manifest_paths_must_stay_inside_the_bundle(bundle_dir):
    def escape(d):
        d["stages"]["decoder"]["file"] = "../outside.onnx"
    _edit_manifest(bundle_dir, escape)
    with pytest.raises(BundleError, match="stages.decoder.file: file path '../outside.onnx' must be relative and inside"):
        load_bundle(bundle_dir)


def _relist(bundle_dir: Path, rel: str) -> None:
    """Record a file's present size and sha256, as a hand edit of the manifest would."""
    path = bundle_dir / rel
    _edit_manifest(bundle_dir, lambda d: d["files"].update({rel: {"sha256": sha256_file(path),
                                                                  "bytes": path.stat().st_size}}))


def _set_location(graph: Path, location: str) -> None:
    """Point every external-data tensor of the graph at `location` (as a hand edit or another tool would)."""
    import onnx

    proto = onnx.load(str(graph), load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save_model(proto, str(graph))


@pytest.mark.parametrize("location, why", [
    ("../../outside.bin", "outside the bundle: onnxruntime 1.23 reads it"),
    ("/etc/hostname", "an absolute path"),
    ("extra.bin", "beside the graph, never listed nor checksummed"),
])
def test_a_graph_that_reads_a_file_the_manifest_does_not_list_is_refused(tmp_path, location, why):
    import onnx
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    from edgeact.runtime.onnx_refs import external_files

    bundle = write_tiny_bundle(tmp_path / "b", external_data=True)
    graph = bundle / "stages" / "decoder.onnx"
    proto = onnx.load(str(graph), load_external_data=False)
    onnx_says = {e.value for t in _get_all_tensors(proto) if uses_external_data(t) for e in t.external_data
                 if e.key == "location"}
    assert sorted(external_files(graph)) == sorted(onnx_says) == ["decoder.onnx.data"]
    load_bundle(bundle)
    (bundle / "stages" / "extra.bin").write_bytes((bundle / "stages" / "decoder.onnx.data").read_bytes())
    _set_location(graph, location)
    _relist(bundle, "stages/decoder.onnx")      # the manifest agrees with the edited graph: only the graph tells
    with pytest.raises(BundleError, match=rf"stage 'decoder' \(stages/decoder.onnx\): its graph reads external data "
                                          rf"from '{location}' \(tensor 'w_key'\), which is not one of the stage's "
                                          r"listed external-data files \(stages/decoder.onnx.data\)"):
        load_bundle(bundle)


def test_a_location_written_otherwise_names_the_same_listed_file(tmp_path):
    """'./decoder.onnx.data' is the file the exporter lists as stages/decoder.onnx.data (and onnxruntime reads)."""
    bundle = write_tiny_bundle(tmp_path / "b", external_data=True)
    _set_location(bundle / "stages" / "decoder.onnx", "./decoder.onnx.data")
    _relist(bundle, "stages/decoder.onnx")
    load_bundle(bundle)


def test_a_listed_file_behind_a_symbolic_link_is_refused(tmp_path):
    """Its bytes live outside the bundle and may change after they were checked."""
    bundle = write_tiny_bundle(tmp_path / "b")
    outside = tmp_path / "elsewhere"
    (bundle / "weights").rename(outside)
    (bundle / "weights").symlink_to(outside)
    with pytest.raises(BundleError, match=r"weights/embed_tokens.npy: weights is a symbolic link; a bundle holds plain "
                                          r"files only .* without links \(cp -rL\)"):
        load_bundle(bundle)
    (bundle / "weights").unlink()
    outside.rename(bundle / "weights")
    linked = tmp_path / "link"
    linked.symlink_to(bundle)           # the bundle folder itself behind a link (a store's `current`): loads
    load_bundle(linked)


@pytest.mark.parametrize("grammar, message", [
    ({"kind": "molmoact-answer", "version": 2}, r"answer grammar is 'molmoact-answer' version 2, and this edgeact "
                                                r"decodes 'molmoact-answer' version 1; upgrade edgeact here"),
    ({"kind": "molmoact-answer-v2", "version": 1}, r"answer grammar is 'molmoact-answer-v2' version 1.*re-export"),
    ({"kind": "molmoact-answer", "version": 1, "action_dims": 8, "n_action_bins": 512},
     r"answer grammar has \{'action_dims': 8, 'n_action_bins': 512\}, and this edgeact decodes "
     r"\{'action_dims': 7, 'n_action_bins': 256\}"),
    ({"kind": "molmoact-answer", "version": 1, "n_actions": 0}, r"answer grammar's n_actions is 0"),
])
def test_an_answer_grammar_this_edgeact_would_decode_wrongly_is_refused(bundle_dir, grammar, message):
    """The runtime decodes with its own constants and reads only n_actions: another grammar was taken silently."""
    _edit_manifest(bundle_dir, lambda d: d.update(grammar=grammar))
    with pytest.raises(BundleError, match=message):
        load_bundle(bundle_dir)


def test_the_exporters_grammar_record_is_the_runtimes():
    from edgeact.runtime.answer import check_grammar_record, grammar_record

    check_grammar_record(grammar_record(8), "here")


def test_referenced_file_without_checksum_is_refused(bundle_dir):
    _edit_manifest(bundle_dir, lambda d: d["files"].pop("weights/embed_tokens.npy"))
    with pytest.raises(BundleError, match="weights.embed_tokens: file 'weights/embed_tokens.npy' is not listed in 'files'"):
        read_manifest(bundle_dir)


def test_a_damaged_array_with_checksums_off_is_named(bundle_dir):
    """robot config `verify_checksums: false`: numpy's own error suggested loading pickled data unsafely."""
    path = bundle_dir / "weights" / "embed_tokens.npy"
    path.write_bytes(b"\0" * 6 + path.read_bytes()[6:])
    bundle = load_bundle(bundle_dir, verify_checksums=False)
    with pytest.raises(BundleError, match=r"weights/embed_tokens.npy: not a readable .npy array .* the file is corrupt"):
        bundle.weight("embed_tokens")


def test_weight_with_other_dtype_than_the_manifest_is_refused(bundle_dir):
    _edit_manifest(bundle_dir, lambda d: d["weights"]["embed_tokens"].update(dtype="float32"))
    bundle = load_bundle(bundle_dir, verify_checksums=False)
    with pytest.raises(BundleError, match=r"weights/embed_tokens.npy: holds float16\[640, 64\] but the manifest says float32"):
        bundle.weight("embed_tokens")


def test_stage_spec_validation_names_the_problem():
    ids = TensorSpec("input_ids", "int64", ("batch", "seq"))
    out = TensorSpec("hidden", "float32", ("batch", "past_seq+seq"))
    with pytest.raises(BundleError, match=r"symbolic dims \['past_seq', 'seq'\] have no dim_ranges entry"):
        StageSpec("decoder", "stages/decoder.onnx", "fp16", (ids,), (out,), {"batch": DimRange(1, 1, 1)})
    with pytest.raises(BundleError, match="precision 'fp12' unknown"):
        StageSpec("decoder", "stages/decoder.onnx", "fp12", (ids,), (out,), {})
    with pytest.raises(BundleError, match="0 <= min <= opt <= max"):
        DimRange(4, 2, 8)
    with pytest.raises(BundleError, match="dtype 'float' unknown"):
        TensorSpec("x", "float", (1,))


def test_inspect_prints_the_key_facts(tmp_path, capsys):
    path = write_tiny_bundle(tmp_path / "tiny", verification="failed")
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    for fact in ("D (tiny-sim)", "2 layers, width 64", "512 + 128 additional rows", "decoder", "fp16",
                 "stages/decoder.onnx", "prefill, decode", "input_ids", "int64", "[batch, 2, past_seq, 16]",
                 "past_seq 0/64/256", "embed_tokens", "[640, 64]", "smoothquant-w8a8", "max_abs_err", "0.0125",
                 "verification: failed (failing: decoder.top1_agreement)", "FAIL", "engines: none"):
        assert fact in out, fact


def test_inspect_json_prints_the_manifest(bundle_dir, capsys):
    assert main(["inspect", str(bundle_dir), "--json", "--verify"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((bundle_dir / "manifest.json").read_text())


def test_inspect_of_a_damaged_bundle_is_one_clear_line(bundle_dir, capsys):
    (bundle_dir / "tokenizer.json").unlink()
    assert main(["inspect", str(bundle_dir)]) == 2
    assert "edgeact inspect: error: tokenizer.json: missing" in capsys.readouterr().err


def test_bundle_object_errors_list_what_exists(bundle_dir):
    bundle = load_bundle(bundle_dir)
    assert isinstance(bundle, Bundle) and bundle.stage_path("decoder") == bundle_dir / "stages/decoder.onnx"
    with pytest.raises(BundleError, match=r"no stage 'vision'; it has \['decoder'\]"):
        bundle.stage("vision")
    with pytest.raises(BundleError, match=r"no weight 'lm_head'; it has \['embed_tokens'\]"):
        bundle.weight("lm_head")
    assert bundle.engine("decoder", "orin") is None
    assert os.path.getsize(bundle_dir / "weights/embed_tokens.npy") <= bundle.total_bytes()


def test_the_graph_reader_finds_external_data_in_constants_and_subgraphs(tmp_path):
    """runtime/onnx_refs.py walks the wire format itself (no onnx on the robot): the same locations as onnx's."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    big = numpy_helper.from_array(np.ones((32, 32), np.float32), "c")
    branch = helper.make_graph([helper.make_node("Constant", [], ["y"], value=numpy_helper.from_array(
        np.full((32, 32), 2.0, np.float32), "inner"))], "then", [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [32, 32])])
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["k"], value=big),
         helper.make_node("If", ["cond"], ["out"], then_branch=branch, else_branch=branch)], "g",
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [32, 32]),
         helper.make_tensor_value_info("k", TensorProto.FLOAT, [32, 32])])
    path = tmp_path / "g.onnx"
    onnx.save_model(helper.make_model(graph), str(path), save_as_external_data=True, all_tensors_to_one_file=False,
                    size_threshold=0, convert_attribute=True)
    from edgeact.runtime.onnx_refs import external_files

    found = external_files(path)
    assert sorted(found) == sorted(p.name for p in tmp_path.iterdir() if p.name != "g.onnx") and len(found) == 2
    path.write_bytes(path.read_bytes()[:-7] + b"\xff" * 7)       # a broken tail: named, not a crash
    with pytest.raises(BundleError, match=r"g.onnx: not a readable ONNX graph"):
        external_files(path)
