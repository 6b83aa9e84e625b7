"""The bundle's depth tokenizer stage on the runtime side: the PyTorch encoder's codes, and forced_depth='sensor' in the policy."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mujoco", reason="the simulated depth images need mujoco (pip install mujoco==4.0.0)")

from edgeact.runtime.bundle import load_bundle  # noqa: E402
from edgeact.runtime.bundle_policy import BundlePolicy, BundlePolicyConfig  # noqa: E402
from edgeact.runtime.depth_tokenizer import StageDepthTokenizer, open_depth_tokenizer  # noqa: E402
from edgeact.runtime.engines import open_backend  # noqa: E402
from edgeact.runtime.errors import EdgeactError  # noqa: E402
from edgeact.runtime.policy import Observation, PolicyContext  # noqa: E402
from tests.export.test_depth_tokenizer import trained_tokenizer  # noqa: E402
from tests.runtime.test_decode_program import FRAME_PX, exported_bundle  # noqa: E402

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return exported_bundle(tmp_path_factory, "D")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return trained_tokenizer(tmp_path_factory)


@pytest.fixture(scope="module")
def depth_images():
    from edgeact.export.train_depth_tokenizer import sim_depth_images

    # The camera's own size for this bundle's frames; a seed neither training nor the export check used.
    return sim_depth_images(4, 4242, size_px=FRAME_PX)


@pytest.fixture(scope="module")
def with_depth(exported, trained, depth_images, tmp_path_factory):
    from edgeact.export.depth_tokenizer_export import add_depth_tokenizer

    return add_depth_tokenizer(exported.bundle_dir, trained.dir, tmp_path_factory.mktemp("sensor") / "bundle",
                               check_images=depth_images[:2])


@pytest.fixture(scope="module")
def stage(with_depth) -> StageDepthTokenizer:
    return open_depth_tokenizer(load_bundle(with_depth), open_backend("onnxruntime", threads=1))


def test_the_stage_gives_the_pytorch_encoders_codes(stage, trained, depth_images):
    import torch

    for depth in depth_images:
        codes = stage(depth)
        assert codes.shape == (100,) and codes.dtype == np.int64
        with torch.no_grad():
            reference = trained.model.codes(torch.from_numpy(depth)).numpy()
        assert (codes == reference).mean() >= 0.99
    first = stage(depth_images[0])
    stage(depth_images[1])
    np.testing.assert_array_equal(first, stage(depth_images[0]))    # a caller's codes survive the next run


def test_the_stage_takes_sensor_arrays_as_they_come(stage, depth_images):
    depth = depth_images[0].copy()
    holes = depth.copy()
    holes[10:20, 30:60] = np.nan           # no data, as some drivers report it
    zeros = depth.copy()
    zeros[10:20, 30:60] = 0.0              # no data, as the cameras here report it
    np.testing.assert_array_equal(stage(holes), stage(zeros))
    np.testing.assert_array_equal(stage(depth.astype(np.float64)), stage(depth))
    with pytest.raises(EdgeactError, match=r"\(height, width\) metres"):
        stage(np.stack([depth, depth, depth], axis=-1))


def observation(exported, depth_m):
    rgb, _, _ = exported.observation(4, "pick up the red block")
    return Observation(rgb=rgb, depth_m=depth_m, timestamp_s=1.0, proprio=None, instruction="pick up the red block")


def test_sensor_forced_depth_encodes_the_observation_depth_instead_of_decoding_it(exported, with_depth, stage,
                                                                                    depth_images):
    decoded = BundlePolicy(with_depth, threads=1).step(observation(exported, depth_images[2]))
    policy = BundlePolicy(with_depth, threads=1, forced_depth="sensor")
    plan = policy.step(observation(exported, depth_images[2]))
    np.testing.assert_array_equal(plan.depth_codes, stage(depth_images[2]))
    assert "depth_tokenizer" in plan.stage_seconds
    # 100 sequential depth choices gone (the last code's step is the one before the forced chunk).
    assert plan.decode_steps <= decoded.decode_steps - 99
    other = policy.step(observation(exported, depth_images[3]))
    np.testing.assert_array_equal(other.depth_codes, stage(depth_images[3]))


def test_the_loop_config_opens_a_sensor_policy(with_depth, depth_images, exported, stage):
    config = BundlePolicyConfig(path=str(with_depth), forced_depth="sensor", threads=1)
    policy = config.make_policy(PolicyContext(action_rate_hz=10.0))
    plan = policy.step(observation(exported, depth_images[1]))
    np.testing.assert_array_equal(plan.depth_codes, stage(depth_images[1]))


def test_the_readmes_python_example_runs_as_written(with_depth, capsys):
    """README "The policy from Python": its code block, on this test's bundle instead of the demo's."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("### The policy from Python, without the loop", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert '"out/demo/bundle-int8"' in code
    namespace: dict = {}
    exec(compile(code.replace('"out/demo/bundle-int8"', repr(str(with_depth))), "README.md", "exec"), namespace)
    plan, steered = namespace["plan"], namespace["steered"]
    assert plan.actions.shape[1] == 7 and plan.depth_codes is not None and plan.trace_px.shape[1] == 2
    assert "depth_tokenizer" in plan.stage_seconds
    assert len(steered.trace_px) == 2 and steered.decode_steps < plan.decode_steps
    assert capsys.readouterr().out.startswith(f"{plan.actions.shape} ")


def test_a_stage_whose_codes_the_model_never_learned_is_refused(exported, trained, depth_images, tmp_path, capsys):
    """The bundle records the depth codes its checkpoint was trained on (train-reference's log); a tokenizer stage
    of other codes would force depth the model cannot read, so it is refused, naming both."""
    import json
    import shutil

    from edgeact.export.bundle_export import ExportOptions, export_bundle
    from edgeact.export.depth_tokenizer import depth_codes_identity
    from edgeact.export.depth_tokenizer_export import add_depth_tokenizer
    from edgeact.export.train_reference import LOG_FILE
    from edgeact.runtime.errors import BundleError

    identity = depth_codes_identity(trained.dir)

    def bundle_trained_on(codes: str | None, name: str) -> Path:
        checkpoint = tmp_path / f"{name}-checkpoint"
        shutil.copytree(exported.checkpoint, checkpoint)
        if codes is not None:
            (checkpoint / LOG_FILE).write_text(json.dumps({"options": {}, "depth_codes": codes}))
        out = export_bundle(checkpoint, tmp_path / f"{name}-bundle", ExportOptions(max_seq=512))
        assert load_bundle(out, allow_failed_verification=True).manifest.model.depth_codes == (codes or "")
        return out

    with pytest.raises(BundleError, match="pooled stand-in depth codes.*--depth-tokenizer"):
        add_depth_tokenizer(bundle_trained_on("pooled", "pooled"), trained.dir, tmp_path / "a", check_images=depth_images[:1])
    other = "vqvae:" + "ab" * 32
    with pytest.raises(BundleError, match="another depth tokenizer's codes .*abababababab"):
        add_depth_tokenizer(bundle_trained_on(other, "other"), trained.dir, tmp_path / "b", check_images=depth_images[:1])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    # Its own tokenizer passes, and the record goes on into the new bundle (and so into quantized ones).
    out = add_depth_tokenizer(bundle_trained_on(identity, "own"), trained.dir, tmp_path / "c",
                              check_images=depth_images[:1])
    assert load_bundle(out, allow_failed_verification=True).manifest.model.depth_codes == identity
    # A checkpoint edgeact did not train records nothing: added, and the command says it could not check.
    from edgeact.runtime.cli import main

    source = bundle_trained_on(None, "unknown")
    assert main(["add-depth-tokenizer", str(source), "--tokenizer", str(trained.dir), "--out", str(tmp_path / "d")]) in (0, 1)
    assert "does not record which depth codes" in " ".join(capsys.readouterr().out.split())
