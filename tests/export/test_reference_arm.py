"""The committed reference ARM (drivers/sim/reference_arm): a loadable MolmoAct checkpoint, small, with what runs it."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mujoco", reason="its check frames come from the MuJoCo robot (pip install mujoco==4.0.0)")

REFERENCE = Path(__file__).resolve().parents[2] / "drivers" / "sim" / "reference_arm"


def test_the_reference_checkpoint_loads_and_is_small():
    from edgeact.export.checkpoint import load_checkpoint
    from edgeact.export.train_reference import NORM_KEY

    ckpt = load_checkpoint(REFERENCE / "checkpoint")
    assert NORM_KEY in ckpt.norm_stats
    assert sum(p.stat().st_size for p in (REFERENCE / "checkpoint").iterdir()) < 20e6
    log = json.loads((REFERENCE / "checkpoint" / "training_log.json").read_text())
    assert log["options"]["size"] == "reference" and len(log["losses"]) == log["options"]["steps"]


def test_its_bundle_plans_on_a_frame_of_the_simulated_camera(tmp_path):
    # The whole path `make demo` takes, minus the loop: export, the depth tokenizer stage, a policy step
    # with the depth forced from the camera, on an evaluation episode's first frame.
    from edgeact.drivers.cameras.mujoco_camera import MujocoRgbdRenderer
    from edgeact.drivers.sim.mujoco_robot import MujocoWorld
    from edgeact.drivers.sim.task import reset_world, sample_episode
    from edgeact.export.bundle_export import ExportOptions, export_bundle
    from edgeact.export.depth_tokenizer_export import add_depth_tokenizer
    from edgeact.runtime.bundle_policy import BundlePolicy

    world = MujocoWorld()
    episode = sample_episode(1_000_000, "push_left")
    reset_world(world, episode)
    renderer = MujocoRgbdRenderer(world, "front", 160, 120)
    try:
        rgb, depth_m, _ = renderer.render()
    finally:
        renderer.close()
    exported = export_bundle(REFERENCE / "checkpoint", tmp_path / "export", ExportOptions(n_actions=8))
    # The committed model was trained on the committed tokenizer's codes (its log says so): the stage is accepted.
    from edgeact.export.depth_tokenizer import depth_codes_identity
    from edgeact.runtime.bundle import read_manifest

    assert read_manifest(exported).model.depth_codes == depth_codes_identity(REFERENCE / "depth_tokenizer")
    bundle = add_depth_tokenizer(exported, REFERENCE / "depth_tokenizer", tmp_path / "bundle",
                                 check_images=depth_m[None])
    policy = BundlePolicy(bundle, forced_depth="sensor", threads=1)
    result = policy.infer(rgb, episode.instruction, depth_m=depth_m)
    assert result.actions.shape == (8, 7) and np.all(np.isfinite(result.actions))
    assert result.depth_forced and result.decode_steps < 100      # no decoder step spent on the 100 depth codes
    assert result.trace_px is not None and len(result.trace_px) >= 1


def test_the_recipe_builds_the_committed_tokenizer():
    # `make train-reference` (no pointing samples) must rebuild exactly the committed model's vocabulary; pointing's
    # instructions would add words to it.
    from edgeact.export.tokenizer_build import build_tokenizer
    from edgeact.export.train_reference_data import task_instructions

    committed = json.loads((REFERENCE / "checkpoint" / "tokenizer.json").read_text())["model"]["vocab"]
    assert json.loads(build_tokenizer(extra_texts=task_instructions()).to_str())["model"]["vocab"] == committed
    assert json.loads(build_tokenizer(extra_texts=task_instructions(pointing=True)).to_str())["model"]["vocab"] != committed
