"""The depth tokenizer: 100 codes of 128 per depth image, training beats a constant, the ONNX stage gives the PyTorch codes.

Also the home of `trained_tokenizer`: one short seeded training run on simulated depth, saved
once per test session, that the runtime stage tests share.
"""
from __future__ import annotations

import hashlib

import numpy as np
import pytest

pytest.importorskip("mujoco", reason="the simulated depth images need mujoco (pip install mujoco==4.0.0)")

import torch  # noqa: E402

from edgeact.export.depth_tokenizer import (  # noqa: E402
    CONFIG_FILE, WEIGHTS_FILE, DepthTokenizerConfig, DepthVQVAE, load_depth_tokenizer, read_tokenizer_meta,
    save_depth_tokenizer,
)
from edgeact.export.train_depth_tokenizer import TrainOptions, sim_depth_images, train_depth_tokenizer  # noqa: E402
from edgeact.runtime.errors import BundleError, ConfigError  # noqa: E402

pytestmark = pytest.mark.timeout(120)

# A tiny run: enough to beat a constant clearly, a few seconds on a shared 2-core machine.
TINY = TrainOptions(images=96, held_out=16, steps=60, batch=16, seed=3, restart_every=10, threads=1)
HELD_OUT_SEED = 777
_TRAINED: dict[str, object] = {}


class Trained:
    """The tiny run's model, report, and the directory it is saved in."""

    def __init__(self, root):
        self.model, self.report = train_depth_tokenizer(TINY)
        self.dir = save_depth_tokenizer(self.model, root / "tokenizer",
                                        {**self.report.to_dict(), "options": {"seed": TINY.seed}})


def trained_tokenizer(tmp_path_factory) -> Trained:
    if "tiny" not in _TRAINED:
        _TRAINED["tiny"] = Trained(tmp_path_factory.mktemp("depth_tokenizer"))
    return _TRAINED["tiny"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return trained_tokenizer(tmp_path_factory)


@pytest.fixture(scope="module")
def held_out():
    return sim_depth_images(12, HELD_OUT_SEED)


def test_sim_depth_is_seeded_and_metric():
    a, b, c = sim_depth_images(3, 1), sim_depth_images(3, 1), sim_depth_images(3, 2)
    assert a.shape == (3, 120, 160) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # The table and floor seen from the mast (within two metres), the arm sometimes close to the lens.
    assert a.min() > 0.05 and np.percentile(a, 99) < 2.0
    assert not np.array_equal(a[0], a[1])      # the scene changes between images


def test_any_depth_image_gives_exactly_100_codes_of_128():
    torch.manual_seed(0)
    model = DepthVQVAE().eval()
    model.init_codebook(torch.randn(500, model.config.code_dim), torch.Generator().manual_seed(0))
    for shape in ((120, 160), (480, 640), (16, 16), (1080, 1920)):
        depth = torch.rand(shape) * 3.0
        codes = model.codes(depth)
        assert codes.shape == (100,) and codes.dtype == torch.int64
        assert 0 <= int(codes.min()) and int(codes.max()) < 128
    batch = model.codes(torch.rand(4, 60, 80))
    assert batch.shape == (4, 100)
    np.testing.assert_array_equal(model.codes(torch.rand(60, 80) + 5.0), model.codes(torch.full((60, 80), 9.0)))


def test_the_config_refuses_a_grid_the_encoder_cannot_make():
    with pytest.raises(ConfigError, match="power of two"):
        DepthTokenizerConfig(input_px=60, grid=10)
    with pytest.raises(ConfigError, match="one per stride-2 layer"):
        DepthTokenizerConfig(input_px=160, grid=10, channels=(16, 32, 32))
    with pytest.raises(ConfigError, match="max_depth_m"):
        DepthTokenizerConfig(max_depth_m=0.0)
    with pytest.raises(ConfigError, match="seed: -1 must be an integer >= 0"):
        TrainOptions(seed=-1)       # refused before any rendering, not numpy's ValueError mid-run


def test_training_beats_a_constant_image_and_uses_the_codebook(trained):
    r = trained.report
    assert r.recon_mae_m < 0.7 * r.constant_mae_m, r
    assert r.codebook_used >= 16 and r.perplexity > 8, r
    assert r.images == TINY.images and r.steps == TINY.steps


def test_training_is_reproducible_with_a_seed():
    images, held = sim_depth_images(16, 5), sim_depth_images(4, 6)
    options = TrainOptions(images=16, held_out=4, steps=4, batch=8, seed=11, threads=1)
    a, _ = train_depth_tokenizer(options, images=images, held_out=held)
    b, _ = train_depth_tokenizer(options, images=images, held_out=held)
    c, _ = train_depth_tokenizer(TrainOptions(images=16, held_out=4, steps=4, batch=8, seed=12, threads=1),
                                 images=images, held_out=held)
    for name, tensor in a.state_dict().items():
        assert torch.equal(tensor, b.state_dict()[name]), name
    assert not torch.equal(a.codebook, c.codebook)


def test_saved_tokenizer_loads_with_the_same_codes(trained, held_out):
    loaded = load_depth_tokenizer(trained.dir)
    meta = read_tokenizer_meta(trained.dir)
    assert meta["config"]["codebook_size"] == 128 and meta["training"]["recon_mae_m"] == trained.report.recon_mae_m
    with torch.no_grad():
        depth = torch.from_numpy(held_out)
        np.testing.assert_array_equal(loaded.codes(depth), trained.model.codes(depth))


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / CONFIG_FILE).write_text(""), rf"{CONFIG_FILE}: not valid JSON \(Expecting value"),
    (lambda d: (d / CONFIG_FILE).write_bytes(b"\x89PNG\r\n\x1a\n"), rf"{CONFIG_FILE}: not valid JSON \('utf-8'"),
    (lambda d: (d / CONFIG_FILE).write_text("[1]"), rf"{CONFIG_FILE}: the top level is a JSON list, not the object"),
    (lambda d: (d / WEIGHTS_FILE).write_bytes((d / WEIGHTS_FILE).read_bytes()[:-100]),
     rf"{WEIGHTS_FILE}: truncated or corrupt safetensors file"),
    (lambda d: (d / WEIGHTS_FILE).write_bytes(b"\x01"), rf"{WEIGHTS_FILE}: truncated or corrupt safetensors file"),
])
def test_a_damaged_tokenizer_directory_is_named(tmp_path, damage, message):
    """What add-depth-tokenizer --tokenizer and train-reference --depth-tokenizer read: refused with the file named."""
    saved = save_depth_tokenizer(DepthVQVAE(), tmp_path / "tokenizer")
    damage(saved)
    with pytest.raises(ConfigError, match=message):
        load_depth_tokenizer(saved)


def test_onnx_encoder_gives_the_pytorch_codes_on_held_out_sim_depth(trained, held_out, tmp_path):
    import onnxruntime as ort

    from edgeact.export.depth_tokenizer_export import code_agreement, export_encoder_onnx

    export_encoder_onnx(trained.model, tmp_path / "enc.onnx")
    session = ort.InferenceSession(str(tmp_path / "enc.onnx"), providers=["CPUExecutionProvider"])
    assert code_agreement(trained.model, session, held_out) >= 0.99
    # Another camera size through the same graph: the resize is inside it.
    big = sim_depth_images(3, HELD_OUT_SEED + 1, size_px=(320, 240))
    assert code_agreement(trained.model, session, big) >= 0.99
    out = session.run(None, {"depth_m": big[0]})[0]
    assert out.shape == (100,) and out.dtype == np.int64


def tree_digest(root) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def source_bundle(tmp_path_factory):
    from tests.runtime.test_decode_program import exported_bundle

    return exported_bundle(tmp_path_factory, "D").bundle_dir


def test_add_depth_tokenizer_writes_a_new_checked_bundle_and_leaves_the_source(trained, held_out, source_bundle,
                                                                               tmp_path):
    from edgeact.export.depth_tokenizer_export import CONFIG_REL, add_depth_tokenizer
    from edgeact.runtime.bundle import load_bundle

    before = tree_digest(source_bundle)
    out = add_depth_tokenizer(source_bundle, trained.dir, tmp_path / "with_depth", check_images=held_out[:4])
    assert tree_digest(source_bundle) == before
    bundle = load_bundle(out, verify_checksums=True)
    source = load_bundle(source_bundle)
    spec = bundle.stage("depth_tokenizer")
    assert [(t.name, t.dtype, t.dims) for t in spec.inputs] == [("depth_m", "float32", ("height", "width"))]
    assert [(t.name, t.dtype, t.dims) for t in spec.outputs] == [("codes", "int64", (100,))]
    assert set(bundle.manifest.stages) == set(source.manifest.stages) | {"depth_tokenizer"}
    for rel, entry in source.manifest.files.items():       # everything else is carried over byte for byte
        assert bundle.manifest.files[rel] == entry
    assert CONFIG_REL in bundle.manifest.files
    row = bundle.manifest.verification.results[-1]
    assert row["gate"] == "depth_tokenizer_codes" and row["passed"] and row["images"] == 4
    # Adding again on top of the new bundle replaces the stage rather than refusing or duplicating it.
    again = add_depth_tokenizer(out, trained.dir, tmp_path / "again", check_images=held_out[:2])
    rows = load_bundle(again).manifest.verification.results
    assert [r["gate"] for r in rows].count("depth_tokenizer_codes") == 1


def test_add_depth_tokenizer_refuses_to_write_over_its_source(trained, held_out, source_bundle):
    from edgeact.export.depth_tokenizer_export import add_depth_tokenizer

    with pytest.raises(BundleError, match="source bundle"):
        add_depth_tokenizer(source_bundle, trained.dir, source_bundle, check_images=held_out[:1], overwrite=True)


def test_add_depth_tokenizer_refuses_its_source_through_a_symlink(trained, held_out, source_bundle, tmp_path):
    import shutil

    from edgeact.export.depth_tokenizer_export import add_depth_tokenizer

    src = shutil.copytree(source_bundle, tmp_path / "src")
    (tmp_path / "link").symlink_to(src)
    before = tree_digest(src)
    with pytest.raises(BundleError, match="is the source bundle .*never modified"):
        add_depth_tokenizer(tmp_path / "link", trained.dir, src, check_images=held_out[:1], overwrite=True)
    assert tree_digest(src) == before


def test_replacing_the_only_failing_depth_tokenizer_row_recomputes_the_status(trained, held_out, source_bundle,
                                                                              tmp_path):
    """A source that failed only at the old depth-tokenizer gate: the new stage's row decides, not the old status."""
    import shutil

    from edgeact.export.bundle_writer import update_manifest
    from edgeact.export.depth_tokenizer_export import add_depth_tokenizer
    from edgeact.runtime.bundle import VerificationInfo, load_bundle

    verified_rows = tuple({"gate": f"{stage}.cosine", "stage": stage, "passed": True, "value": 1.0, "limit": 1.0}
                          for stage in ("vision", "connector", "decoder"))
    old_depth_row = {"gate": "depth_tokenizer_codes", "passed": False, "agreement": 0.5, "min": 0.99}
    cases = {"passed": verified_rows, "not_run": ()}      # the verdict of the source's own stages
    for expected, rows in cases.items():
        src = shutil.copytree(source_bundle, tmp_path / f"src-{expected}")
        update_manifest(src, lambda m: setattr(m, "verification", VerificationInfo(
            "failed", {}, (*rows, old_depth_row))))
        out = add_depth_tokenizer(src, trained.dir, tmp_path / f"out-{expected}", check_images=held_out[:1])
        v = load_bundle(out).manifest.verification
        assert v.results[-1]["gate"] == "depth_tokenizer_codes" and v.results[-1]["passed"]
        assert v.status == expected and [r["gate"] for r in v.results] == [r["gate"] for r in rows] + [
            "depth_tokenizer_codes"]


def test_the_command_refuses_an_occupied_out_first_and_writes_a_new_one_whole(tmp_path):
    from edgeact.runtime.cli import main

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "config.json").write_text("{}")
    assert main(["train-depth-tokenizer", "--out", str(taken), "--images", "8", "--steps", "1"]) == 2
    assert sorted(p.name for p in taken.iterdir()) == ["config.json"]     # refused before any rendering
    # --overwrite replaces an older depth tokenizer only, never a folder of something else
    assert main(["train-depth-tokenizer", "--out", str(taken), "--images", "8", "--steps", "1", "--overwrite"]) == 2
    assert sorted(p.name for p in taken.iterdir()) == ["config.json"]
    fresh = tmp_path / "fresh"
    for extra in ([], ["--overwrite"]):
        assert main(["train-depth-tokenizer", "--out", str(fresh), "--images", "8", "--steps", "1", *extra]) == 0
        assert sorted(p.name for p in fresh.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh", "taken"]     # no partial sibling left behind
