"""No command replaces what it was not made to write: another tool's output, one of its own inputs, a stranger's
file. An `--overwrite` replaces only an older output of the same kind; paths are checked before the work."""
from __future__ import annotations

import json

import pytest

from edgeact.runtime.atomic_dir import folder_holds, refuse_replacing
from edgeact.runtime.cli import main
from edgeact.runtime.errors import ConfigError
from edgeact.runtime.sim_robot import sim_robot_config_dict
from tests.runtime.test_bundle import write_tiny_bundle


@pytest.fixture
def bundle(tmp_path):
    return write_tiny_bundle(tmp_path / "bundle")


def err(capsys) -> str:
    return " ".join(capsys.readouterr().err.split())


def test_folders_are_told_apart_by_their_marker_files(tmp_path, bundle):
    from tests.calibration.test_calibration_set import _sample
    from edgeact.calibration.calibration_set import CalibrationSet

    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({"model_type": "molmoact"}))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("my notes")
    (tmp_path / "empty").mkdir()
    (tmp_path / "f").write_text("x")
    calibration = CalibrationSet((_sample(),), 0, {}, {}).save(tmp_path / "cal")
    assert [folder_holds(p) for p in (bundle, tmp_path / "ckpt", calibration, tmp_path / "empty", tmp_path / "none",
                                      tmp_path / "f", tmp_path / "mine")] == \
        ["a bundle", "a checkpoint", "a calibration set", "nothing", "nothing", "a file", None]
    refuse_replacing(tmp_path / "ckpt", "a checkpoint", "--out")          # its own kind: replaced
    with pytest.raises(ConfigError, match=r"--out .*mine holds a folder that is not a checkpoint: --overwrite "
                                          r"replaces only a checkpoint"):
        refuse_replacing(tmp_path / "mine", "a checkpoint", "--out")


def test_calibrate_never_replaces_a_bundle_even_with_overwrite(tmp_path, bundle):
    from tests.calibration.test_calibration_set import _sample
    from edgeact.calibration.calibration_set import CalibrationSet

    before = sorted(p.name for p in bundle.iterdir())
    with pytest.raises(ConfigError, match=r"holds a bundle: --overwrite replaces only a calibration set"):
        CalibrationSet((_sample(),), 0, {}, {}).save(bundle, overwrite=True)
    assert sorted(p.name for p in bundle.iterdir()) == before
    again = CalibrationSet((_sample(),), 0, {}, {}).save(tmp_path / "cal")
    assert CalibrationSet((_sample(1),), 0, {}, {}).save(again, overwrite=True) == again     # an older set: replaced


def test_check_json_never_writes_over_the_config_or_another_file(tmp_path, capsys):
    config = tmp_path / "robot.json"
    config.write_text(json.dumps(sim_robot_config_dict()))
    before = config.read_text()
    assert main(["check", str(config), "--no-policy", "--json", str(config)]) == 2
    assert f"--json {config} is the robot config: the run would write over it" in err(capsys)
    other = tmp_path / "other.json"
    other.write_text(before)
    assert main(["check", str(config), "--no-policy", "--json", str(other)]) == 2
    assert f"--json {other} holds a file that is not an edgeact check report" in err(capsys)
    assert config.read_text() == before and other.read_text() == before
    report = tmp_path / "check.json"
    assert main(["check", str(config), "--no-policy", "--json", str(report)]) == 0
    assert main(["check", str(config), "--no-policy", "--json", str(report)]) == 0       # its own older report


def test_run_outputs_replace_only_an_older_output_of_their_kind(tmp_path, capsys):
    config = tmp_path / "robot.json"
    config.write_text(json.dumps(sim_robot_config_dict()))
    victim = tmp_path / "another-robot.json"
    victim.write_text(config.read_text())
    for option in ("--record", "--json"):
        assert main(["run", str(config), "--seconds", "0.3", option, str(victim)]) == 2
        said = err(capsys)
        assert f"{option} {victim} holds a file that is not an edgeact" in said and "remove that file yourself" in said
    assert victim.read_text() == config.read_text()
    record, timing = tmp_path / "run.jsonl", tmp_path / "run.json"
    for _ in range(2):      # the second run replaces the first one's recording and summary
        assert main(["run", str(config), "--seconds", "0.3", "--record", str(record), "--json", str(timing)]) == 0
    assert json.loads(record.read_text().splitlines()[0])["event"] in ("command", "plan", "trip", "stop")


def test_train_reference_never_writes_over_its_demos_or_another_output(tmp_path, capsys, bundle):
    from edgeact.export.train_reference import TrainOptions

    demos = tmp_path / "demos"
    demos.mkdir()
    (demos / "manifest.json").write_text(json.dumps({"format": "edgeact-sim-demos/2"}))
    base = ["train-reference", "--demos", str(demos), "--steps", "1", "--overwrite"]
    assert main([*base, "--out", str(demos)]) == 2
    assert f"--out {demos} is a --demos set this training reads" in err(capsys)
    assert main([*base, "--out", str(bundle)]) == 2
    assert "holds a bundle: --overwrite replaces only a checkpoint" in err(capsys)
    init = tmp_path / "init"
    init.mkdir()
    (init / "config.json").write_text(json.dumps({"model_type": "molmoact"}))
    assert main([*base, "--init", str(init), "--out", str(init)]) == 2
    assert f"--out {init} is the --init checkpoint this training starts from" in err(capsys)
    with pytest.raises(ConfigError, match="finite lr > 0"):
        TrainOptions(lr=float("inf"))


def test_train_depth_tokenizer_and_flash_leave_other_outputs_alone(tmp_path, capsys, bundle):
    assert main(["train-depth-tokenizer", "--out", str(bundle), "--overwrite", "--images", "2", "--steps", "1"]) == 2
    assert "holds a bundle: --overwrite replaces only a depth tokenizer" in err(capsys)
    assert main(["flash", str(bundle), "--store", str(bundle)]) == 2
    assert f"--store {bundle} holds a bundle, not a bundle store" in err(capsys)
    assert main(["flash", str(bundle), "--store", str(bundle / "store")]) == 2
    assert f"--store {bundle / 'store'} lies inside {bundle}, which holds a bundle" in err(capsys)
    assert not (bundle / "current").exists() and not (bundle / "history.jsonl").exists()
    assert not (bundle / "store").exists()


def test_hand_eye_out_is_never_the_config(tmp_path, capsys):
    config = tmp_path / "robot.json"
    config.write_text(json.dumps(sim_robot_config_dict()))
    before = config.read_text()
    assert main(["calibrate-hand-eye", str(config), "--out", str(config), "--overwrite"]) == 2
    assert f"--out {config} is the robot config: the result would replace it; give --write" in err(capsys)
    assert config.read_text() == before


@pytest.mark.parametrize("argv", [["quantize", "b", "--precision", "int8", "--out", "o"], ["calibrate", "b"],
                                  ["bench-quant", "c"], ["bench-compare", "b"], ["make-checkpoint", "o"],
                                  ["train-depth-tokenizer", "--out", "o"]])
@pytest.mark.parametrize("seed", ["-1", str(2 ** 63)])
def test_a_seed_out_of_range_is_refused_by_its_option(argv, seed, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)         # nothing is written; were it, not into the checkout
    with pytest.raises(SystemExit) as stop:
        main([*argv, "--seed", seed])
    assert stop.value.code == 2
    assert f"argument --seed: {seed}: a seed is a whole number from 0 to 2**63 - 1" in err(capsys)


def test_benchmark_outputs_are_checked_before_the_work(tmp_path, capsys, bundle):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert main(["bench-compare", str(bundle), "--out", str(blocker)]) == 2
    assert f"--out {blocker}: a file, not a directory" in err(capsys)
    assert main(["bench-quant", str(tmp_path / "no-checkpoint"), "--json", str(blocker / "x.json")]) == 2
    assert f"--json {blocker / 'x.json'}: its folder {blocker}: a file, not a directory" in err(capsys)


def test_a_store_below_a_folder_that_cannot_be_listed_is_still_used(tmp_path, monkeypatch):
    """A parent the user may pass through but not list (mode 0711) holds no edgeact output that could matter."""
    import edgeact.runtime.atomic_dir as atomic_dir
    from edgeact.runtime.bundle_store import BundleStore

    locked = tmp_path / "locked"
    real = atomic_dir.folder_holds

    def holds(path):
        if path == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)
    monkeypatch.setattr(atomic_dir, "folder_holds", holds)
    assert BundleStore(locked / "store").root == locked / "store"
