"""An interrupted or failed demonstration recording leaves nothing a reader could take for a finished set."""
import multiprocessing

import pytest

pytest.importorskip("mujoco", reason="the reference task runs in MuJoCo (pip install mujoco==4.0.0)")
pytest.importorskip("pinocchio", reason="the expert acts through the 'ik' mapper (pip install pin==4.1.0)")

from edgeact.drivers.sim.demos import DemoConfig, DemoDatasetError, load_demos, record_demos  # noqa: E402
from edgeact.runtime.errors import ConfigError  # noqa: E402

pytestmark = pytest.mark.timeout(120)

TINY = DemoConfig(width=48, height=32, stride_actions=8, episodes_per_shard=1)


def interrupt(done: int, total: int) -> None:
    if done == 2:
        raise KeyboardInterrupt     # Ctrl-C once a shard (an episode's) is written, the next ones under way


@pytest.mark.parametrize("workers", [1, 2])
def test_an_interrupted_recording_leaves_nothing_behind(tmp_path, workers):
    """Ctrl-C after a shard was written: no directory, no shard, no hidden partial set, no worker left running;
    the reader refuses the path and a new recording there works."""
    out = tmp_path / "d"
    with pytest.raises(KeyboardInterrupt):
        record_demos(out, episodes=4, seed=0, config=TINY, workers=workers, progress=interrupt)
    assert list(tmp_path.iterdir()) == []
    assert multiprocessing.active_children() == []
    with pytest.raises(DemoDatasetError, match="no manifest.json.*record one with `edgeact sim-demos"):
        load_demos(out)
    record_demos(out, episodes=1, seed=0, config=TINY)
    assert load_demos(out).manifest["episodes_attempted"] == 1


def test_ctrl_c_ends_sim_demos_with_one_line_and_nothing_written(tmp_path, monkeypatch, capsys):
    import edgeact.drivers.sim.demos as demos
    from edgeact.runtime.cli import main

    run_expert = demos.run_expert
    calls = []

    def interrupted_second_episode(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return run_expert(*args, **kwargs)

    monkeypatch.setattr(demos, "run_expert", interrupted_second_episode)
    assert main(["sim-demos", "--episodes", "3", "--width", "48", "--height", "32", "--out",
                 str(tmp_path / "d")]) == 130
    assert capsys.readouterr().err == "interrupted\n"
    assert list(tmp_path.iterdir()) == []


def test_a_directory_without_a_finished_set_is_neither_recorded_into_nor_read(tmp_path):
    """Files without a manifest (an older edgeact's interrupted recording, or anything else) are kept and refused;
    a hidden partial set a killed recording left beside a path is named."""
    old = tmp_path / "old"
    old.mkdir()
    (old / "shard_0000.npz").write_bytes(b"half")
    with pytest.raises(ConfigError, match="holds no finished demonstration set.*delete it"):
        record_demos(old, episodes=1, seed=0, config=TINY)
    assert [p.name for p in tmp_path.iterdir()] == ["old"] and (old / "shard_0000.npz").read_bytes() == b"half"
    with pytest.raises(DemoDatasetError, match="no manifest.json.*delete it and record it again"):
        load_demos(old)
    (tmp_path / ".killed.partial-x1y2").mkdir()
    with pytest.raises(DemoDatasetError, match=r"\.killed\.partial-x1y2 beside it: left by a recording that was "
                                               r"killed, remove it \(rm -r\)"):
        load_demos(tmp_path / "killed")


def test_what_appears_at_out_while_recording_is_never_replaced(tmp_path):
    """Another run or the user put files at --out while this one recorded: theirs stay untouched, and the finished
    set is kept beside it under a name the error gives."""
    out = tmp_path / "d"

    def someone_else(done: int, total: int) -> None:
        if done == 1:
            out.mkdir(exist_ok=True)
            (out / "notes.txt").write_text("keep me")

    with pytest.raises(DemoDatasetError, match=rf"{out} was filled by someone else while this recording ran; "
                                               r"nothing there was touched\. The finished set is at (\S+): move it"
                       ) as refused:
        record_demos(out, episodes=2, seed=0, config=TINY, progress=someone_else)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"
    kept = str(refused.value).split("The finished set is at ")[1].split(": move it")[0]
    assert load_demos(kept).manifest["episodes_attempted"] == 2


def test_a_damaged_set_is_named_not_a_traceback(tmp_path):
    """A manifest that is not JSON or not an object, and a truncated shard: refused naming the file and the fix."""
    import json
    import shutil

    good = record_demos(tmp_path / "good", episodes=1, seed=0, config=TINY).out_dir
    for name, content, message in (("png", b"\x89PNG\r\n\x1a\n", r"manifest\.json: not valid JSON \('utf-8'"),
                                   ("list", b"[1, 2]", r"manifest\.json: the top level is a JSON list, not a "
                                                       r"demonstration set's manifest")):
        damaged = shutil.copytree(good, tmp_path / name)
        (damaged / "manifest.json").write_bytes(content)
        with pytest.raises(DemoDatasetError, match=message):
            load_demos(damaged)
    truncated = shutil.copytree(good, tmp_path / "truncated")
    shard = truncated / json.loads((good / "manifest.json").read_text())["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:200])
    with pytest.raises(DemoDatasetError, match=rf"{shard}: truncated or corrupt shard \(BadZipFile.*record the set "
                                               "again"):
        load_demos(truncated).arrays()


@pytest.mark.parametrize("manifest, held", [
    ({"schema_version": 2, "model": {}, "stages": {}}, "a bundle (edgeact export)"),
    ({"format": "edgeact-calibration", "version": 1, "samples": []}, "a quantization calibration set"),
    ([1, 2], "a manifest.json of another kind (a JSON list)"),
])
def test_out_holding_something_else_names_what_it_holds(tmp_path, manifest, held):
    import json
    import re

    out = tmp_path / "taken"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match=rf"{out} already holds {re.escape(held)}.*give another --out"):
        record_demos(out, episodes=1, seed=0, config=TINY)
