"""`edgeact make-checkpoint`: in-process and as a new user runs it, with its summary and overwrite guard."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edgeact.export.checkpoint import load_checkpoint
from edgeact.export.synthetic import count_parameters, make_checkpoint, synthetic_config, synthetic_tensors
from edgeact.runtime.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_sharded_o_checkpoint_in_process(tmp_path, capsys):
    out = tmp_path / "o-tiny"
    assert main(["make-checkpoint", "--variant", "O", "--size", "tiny", "--seed", "3", "--out", str(out), "--shards", "2"]) == 0
    printed = capsys.readouterr().out
    cfg = synthetic_config("O", "tiny")
    assert f"{count_parameters(cfg):,}" in printed and "tiny" in printed and "MolmoAct-O" in printed
    assert f"{sum(p.stat().st_size for p in out.iterdir()):,}" in printed
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
        "model.safetensors.index.json", "preprocessor_config.json", "tokenizer.json"]
    ckpt = load_checkpoint(out)
    assert ckpt.config.variant == "O"
    expected = synthetic_tensors(cfg, 3)
    assert all(torch.equal(ckpt.tensors[k], expected[k]) for k in expected)


def test_bf16_weights(tmp_path):
    out = tmp_path / "d-bf16"
    assert main(["make-checkpoint", "--variant", "D", "--out", str(out), "--dtype", "bfloat16"]) == 0
    assert load_checkpoint(out).tensors["lm_head.weight"].dtype == torch.bfloat16


def test_refuses_to_overwrite_a_non_empty_directory_unless_forced(tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(["make-checkpoint", "--out", str(out)]) == 2
    assert f"{out} already exists and is not empty; pass --force" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert main(["make-checkpoint", "--out", str(out), "--force"]) == 0
    assert not (out / "notes.txt").exists() and load_checkpoint(out).config.variant == "D"


def test_an_empty_directory_is_filled(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    assert main(["make-checkpoint", "--out", str(out)]) == 0
    assert (out / "model.safetensors").is_file()


@pytest.mark.parametrize("argv, complaint", [
    (["--shards", "0"], "0 is not a positive integer"),
    (["--variant", "X"], "invalid choice: 'X'"),
    (["--size", "huge"], "invalid choice: 'huge'"),
])
def test_bad_options_are_rejected_by_the_parser(tmp_path, capsys, argv, complaint):
    with pytest.raises(SystemExit) as exit_:
        main(["make-checkpoint", "--out", str(tmp_path / "x"), *argv])
    assert exit_.value.code == 2 and complaint in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_new_user_runs_the_installed_command(tmp_path):
    exe = ROOT / ".venv" / "bin" / "edgeact"
    if not exe.exists():
        exe = Path(sys.executable).with_name("edgeact")
    out = tmp_path / "first"
    run = subprocess.run([str(exe), "make-checkpoint", "--size", "tiny", "--out", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "parameters" in run.stdout and "model.safetensors" in run.stdout
    assert load_checkpoint(out).config.variant == "D"
    # Another process (its own tokenizer training, its own generator) writes the same bytes.
    here = make_checkpoint("D", "tiny", 0, tmp_path / "here")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {p.name: p.read_bytes() for p in here.iterdir()}
