"""`edgeact generate`: the reference run a new user makes from the README, on a tiny checkpoint."""
import numpy as np
import pytest
from PIL import Image

from edgeact.export.synthetic import make_checkpoint
from edgeact.runtime.cli import main


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint("O", "tiny", seed=5, out_dir=tmp_path_factory.mktemp("gen") / "ck")


def test_grammar_masked_generation_prints_a_parsed_answer(checkpoint, capsys):
    assert main(["generate", str(checkpoint), "--instruction", "move to the red block", "--chunk", "2"]) == 0
    out = capsys.readouterr().out
    assert "<DEPTH_START>" in out and "<DEPTH_END>" in out
    assert "actions (un-normalized)" in out and "trace (px of 320x240)" in out


def test_image_file_is_used_and_a_missing_one_is_a_clear_error(checkpoint, tmp_path, capsys):
    img = tmp_path / "frame.png"
    Image.fromarray(np.full((60, 80, 3), 128, np.uint8)).save(img)
    assert main(["generate", str(checkpoint), "--image", str(img)]) == 0
    assert "px of 80x60" in capsys.readouterr().out
    assert main(["generate", str(checkpoint), "--image", str(tmp_path / "nope.png")]) == 2
    assert "cannot read the image" in capsys.readouterr().err


def test_a_long_chunk_is_generated_whole_and_a_cut_answer_names_the_limit(checkpoint, capsys):
    """The default limit is the longest answer the grammar allows (24 actions: ~700 tokens, past the old 512)."""
    assert main(["generate", str(checkpoint), "--chunk", "24", "--threads", "1"]) == 0
    assert "actions (un-normalized)" in capsys.readouterr().out
    assert main(["generate", str(checkpoint), "--chunk", "2", "--max-new-tokens", "50"]) == 1
    said = " ".join(w for w in capsys.readouterr().out.split() if w != "│")     # the table wraps the cell
    assert "generation stopped at --max-new-tokens 50 before the end-of-text; raise it" in said


def test_free_decoding_of_random_weights_reports_the_unparseable_answer(checkpoint, capsys):
    assert main(["generate", str(checkpoint), "--free", "--max-new-tokens", "8"]) == 1
    assert "not a valid answer" in capsys.readouterr().out


def test_a_wrong_unnorm_key_is_refused_before_generating(checkpoint, monkeypatch, capsys):
    def generate_greedy(*args, **kwargs):
        raise AssertionError("generated before --unnorm-key was checked")

    monkeypatch.setattr("edgeact.export.generate.generate_greedy", generate_greedy)
    assert main(["generate", str(checkpoint), "--unnorm-key", "nope"]) == 2
    assert "unnorm_key 'nope' not in norm_stats; available keys: edgeact_sim" in capsys.readouterr().err
