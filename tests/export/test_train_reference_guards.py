"""train-reference's guards: held-out scenes across --demos sets, warm starts on other depth codes, a checkpoint never
published without its log, checks made before any recording, and a log that says what the steps really ran."""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("mujoco")

from edgeact.drivers.sim.demos import MANIFEST, DemoDatasetError, load_demos  # noqa: E402
from edgeact.export import commands_train  # noqa: E402
from edgeact.export import train_reference as tr  # noqa: E402
from edgeact.export.train_reference import LOG_FILE, TrainOptions, prepare, train_reference, train_steps  # noqa: E402
from edgeact.runtime.errors import ConfigError  # noqa: E402

TINY = dict(size="tiny", batch_size=2, lr=3e-3, warmup_steps=2, held_out_fraction=0.34, eval_samples=0)


@pytest.fixture(scope="module")
def pooled_ckpt(demos, tmp_path_factory):
    """A checkpoint trained on the pooled stand-in's depth codes (its training_log.json says "pooled")."""
    out = tmp_path_factory.mktemp("ckpt") / "pooled"
    train_reference(demos, out, TrainOptions(steps=1, **TINY))
    return out


@pytest.fixture(scope="module")
def vqvae_dir(tmp_path_factory):
    from edgeact.export.depth_tokenizer import DepthVQVAE, save_depth_tokenizer

    out = tmp_path_factory.mktemp("vqvae")
    torch.manual_seed(0)
    save_depth_tokenizer(DepthVQVAE(), out)
    return out


def scene_seeds(demos_dir: Path) -> np.ndarray:
    """Each sample's scene seed, read here from the manifest and the shards (not by the code under test)."""
    data = load_demos(demos_dir)
    seed_of = {e["index"]: e["seed"] for e in data.manifest["episodes"]}
    return np.array([seed_of[int(e)] for e in data.arrays()["episode"]])


def command(*argv: str):
    parser = argparse.ArgumentParser()
    commands_train.register(parser.add_subparsers())
    args = parser.parse_args(["train-reference", *argv])
    return args.handler(args)


def test_a_later_set_never_trains_on_a_held_out_scene(demos, tmp_path):
    # sim-demos, --first-chunk and --policy all default to --seed 0: a second set shows the first set's scenes.
    again = shutil.copytree(demos, tmp_path / "again")
    one, both = prepare(demos, TrainOptions(steps=1, **TINY)), prepare([demos, again], TrainOptions(steps=1, **TINY))
    n = len(one.arrays["rgb"])
    seeds = np.concatenate([scene_seeds(demos), scene_seeds(again)])
    assert len(one.held_idx) and np.array_equal(both.held_idx, one.held_idx)     # the held-out episodes stay
    assert not set(seeds[both.train_idx].tolist()) & set(seeds[both.held_idx].tolist())
    # The later set's samples of other scenes all train, in order; those of held-out scenes are counted.
    assert np.array_equal(both.train_idx, np.concatenate([one.train_idx, n + one.train_idx]))
    assert both.held_out_scene_samples_dropped == len(one.held_idx)
    report = train_reference([demos, again], None, TrainOptions(steps=1, **TINY))
    assert report.held_out_scene_samples_dropped == len(one.held_idx)
    assert report.train_samples == 2 * n - 2 * len(one.held_idx)


def test_one_set_given_twice_is_refused(demos, tmp_path):
    for twice in ([demos, demos], [demos, demos.parent / ".." / demos.parent.name / demos.name]):
        with pytest.raises(ConfigError, match=r"--demos .* is given 2 times .*give each demonstration set once"):
            prepare(twice, TrainOptions(steps=1, **TINY))
    with pytest.raises(ConfigError, match="given 2 times"):        # the command: before recording the scenes
        command("--demos", str(demos), str(demos), "--out", str(tmp_path / "c"), "--generate-scenes", "2")
    assert not (tmp_path / "c").exists()


def test_a_damaged_demos_manifest_is_named_by_prepare_not_a_traceback(demos, tmp_path):
    damaged = shutil.copytree(demos, tmp_path / "damaged")
    manifest = json.loads((damaged / MANIFEST).read_text())
    del manifest["norm_stats"]
    (damaged / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DemoDatasetError, match=rf"{damaged / MANIFEST}: no norm_stats\['edgeact_sim_reference'\].*"
                                               "record it again with `edgeact sim-demos`"):
        prepare(damaged, TrainOptions(steps=1, **TINY))


def test_a_warm_start_on_other_depth_codes_is_refused(demos, pooled_ckpt, vqvae_dir, tmp_path):
    from edgeact.export.train_reference_data import vqvae_depth_codes_fn

    vqvae = vqvae_depth_codes_fn(vqvae_dir)
    with pytest.raises(ConfigError, match=r"--init .*pooled: trained on the pooled-depth stand-in's codes .*but this "
                                          r"run trains on a depth VQ-VAE's codes .*give the --depth-tokenizer it was "
                                          r"trained with .*or train without --init"):
        prepare(demos, TrainOptions(steps=1, init=str(pooled_ckpt), **TINY), vqvae)
    # The reverse: a checkpoint of VQ-VAE codes, warm-starting a run on the pooled stand-in.
    vq_ckpt = shutil.copytree(pooled_ckpt, tmp_path / "vq")
    log = json.loads((vq_ckpt / LOG_FILE).read_text())
    (vq_ckpt / LOG_FILE).write_text(json.dumps({**log, "depth_codes": vqvae.identity}))
    with pytest.raises(ConfigError, match=r"trained on a depth VQ-VAE's codes .*this run trains on the pooled-depth "
                                          r"stand-in's codes \(no --depth-tokenizer\)"):
        prepare(demos, TrainOptions(steps=1, init=str(vq_ckpt), **TINY))
    prepare(demos, TrainOptions(steps=1, init=str(vq_ckpt), **TINY), vqvae)           # the same codes: taken
    # Without its log nothing says which codes it learned: warned, not refused.
    (vq_ckpt / LOG_FILE).unlink()
    with pytest.warns(UserWarning, match=r"--init .*vq: whether it was trained on this run's depth codes .*cannot be "
                                         f"checked: it has no readable {LOG_FILE}"):
        prepare(demos, TrainOptions(steps=1, init=str(vq_ckpt), **TINY))


def test_the_command_checks_the_depth_tokenizer_and_the_warm_start_before_recording(pooled_ckpt, vqvae_dir,
                                                                                   tmp_path):
    base = ["--demos", str(tmp_path / "demos"), "--out", str(tmp_path / "c"), "--generate-demos", "3"]
    with pytest.raises(ConfigError, match="depth_tokenizer.json"):
        command(*base, "--depth-tokenizer", str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="trained on the pooled-depth stand-in's codes"):
        command(*base, "--depth-tokenizer", str(vqvae_dir), "--init", str(pooled_ckpt))
    assert not (tmp_path / "demos").exists() and not (tmp_path / "c").exists()


def test_the_command_checks_the_first_set_before_recording_scenes(tmp_path):
    with pytest.raises(DemoDatasetError, match=r"demos has no manifest\.json"):
        command("--demos", str(tmp_path / "demos"), str(tmp_path / "scenes"), "--out", str(tmp_path / "c"),
                "--generate-scenes", "2")
    assert not (tmp_path / "scenes").exists()


def test_the_variance_connector_init_is_refused_with_a_warm_start():
    with pytest.raises(ConfigError, match=r"connector_init 'variance' .*init 'ckpt' then replaces every weight.*"
                                          "drop --connector-init variance"):
        TrainOptions(connector_init="variance", init="ckpt")
    TrainOptions(connector_init="variance")
    TrainOptions(init="ckpt")


def test_a_cut_before_the_log_is_written_publishes_no_checkpoint(demos, pooled_ckpt, tmp_path, monkeypatch):
    out = shutil.copytree(pooled_ckpt, tmp_path / "ckpt")     # the checkpoint an --overwrite would replace
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    write_text = Path.write_text

    def cut(self, *args, **kwargs):
        if self.name == LOG_FILE:
            raise KeyboardInterrupt("Ctrl-C as the log is written")
        return write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", cut)
    for target, overwrite in ((tmp_path / "new", False), (out, True)):
        with pytest.raises(KeyboardInterrupt):
            train_reference(demos, target, TrainOptions(steps=1, **TINY), overwrite=overwrite)
    assert not (tmp_path / "new").exists()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before        # the previous one, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]           # no partial folder left
    monkeypatch.undo()

    # What extra_files writes (the command's loss plot) is in the folder with the log before it is published.
    seen = []

    def extra(folder: Path, report) -> None:
        seen.append((folder != tmp_path / "new", (folder / LOG_FILE).is_file(), (tmp_path / "new").exists()))
        (folder / "extra.txt").write_text(str(len(report.losses)))

    train_reference(demos, tmp_path / "new", TrainOptions(steps=1, **TINY), extra_files=extra)
    assert seen == [(True, True, False)] and (tmp_path / "new" / "extra.txt").read_text() == "1"
    assert json.loads((tmp_path / "new" / LOG_FILE).read_text())["out_dir"] == str(tmp_path / "new")


def test_the_first_pointing_steps_take_no_trace_samples(demos):
    options = TrainOptions(**dict(TINY, steps=3, pointing_batch=1, pointing_first_steps=2, trace_batch=1))
    trainer = prepare(demos, options)
    calls = []
    for name in ("encode", "encode_pointing", "encode_trace"):
        original = getattr(trainer.encoder, name)

        def wrapped(*args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        setattr(trainer.encoder, name, wrapped)
    step_calls = []
    train_steps(trainer, on_step=lambda step, loss: (step_calls.append(list(calls)), calls.clear()))
    # Steps 0 and 1: pointing alone; step 2: the answer batch, a pointing and a trace sample.
    assert step_calls[:2] == [["encode_pointing"], ["encode_pointing"]]
    assert sorted(step_calls[2]) == ["encode", "encode", "encode_pointing", "encode_trace"]


@pytest.mark.parametrize("native", [False, True])
def test_the_log_records_whether_bf16_ran_and_the_threads(demos, tmp_path, monkeypatch, native):
    monkeypatch.setattr(tr, "bf16_supported", lambda: native)
    seen = []
    autocast = torch.autocast.__init__

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("enabled", True))
        return autocast(self, *args, **kwargs)

    monkeypatch.setattr(torch.autocast, "__init__", spy)
    report = train_reference(demos, tmp_path / "ckpt", TrainOptions(steps=1, **TINY))
    log = json.loads((tmp_path / "ckpt" / LOG_FILE).read_text())
    assert set(seen) == {native}                            # what the steps ran
    assert log["options"]["bf16"] is True                   # what was asked
    assert log["bf16_autocast"] is native and report.bf16_autocast is native
    assert log["torch_threads"] == torch.get_num_threads() >= 1
