"""A demonstration set's manifest is checked where it is loaded: a damaged or empty one is named with its fix, and the
scene seeds it records tell which samples of several sets show one scene."""
import json
import shutil

import numpy as np
import pytest

pytest.importorskip("mujoco", reason="the reference task runs in MuJoCo (pip install mujoco==4.0.0)")
pytest.importorskip("pinocchio", reason="the expert acts through the 'ik' mapper (pip install pin==4.1.0)")

from edgeact.drivers.sim.demos import (MANIFEST, DemoConfig, DemoDatasetError, joined_arrays,  # noqa: E402
                                       load_demos, record_demos)

pytestmark = pytest.mark.timeout(120)

TINY = DemoConfig(width=48, height=32, stride_actions=8, episodes_per_shard=1)
FIX = "record it again with `edgeact sim-demos`"


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return record_demos(tmp_path_factory.mktemp("demos") / "good", episodes=2, seed=3, config=TINY).out_dir


def damaged_copy(good, tmp_path, name, change):
    damaged = shutil.copytree(good, tmp_path / name)
    manifest = json.loads((damaged / MANIFEST).read_text())
    change(manifest)
    (damaged / MANIFEST).write_text(json.dumps(manifest))
    return damaged


@pytest.mark.parametrize("name, change, message", [
    ("no_shards", lambda m: m.pop("shards"), r"'shards' is missing, not a list of \{file, samples >= 1\}"),
    ("bad_shard", lambda m: m["shards"][0].pop("samples"), r"'shards' is \[\{\"file\": .*not a list of"),
    ("empty", lambda m: m.update(shards=[], samples=0), r"no shards, the set holds no samples"),
    ("samples", lambda m: m.update(samples=m["samples"] + 1), r"'samples' is \d+, not the \d+ its shards hold"),
    ("no_image", lambda m: m.pop("image"), r"'image' is missing, not the frames' \{width, height, \.\.\.\}"),
    ("no_norm_stats", lambda m: m.pop("norm_stats"), r"no norm_stats\['edgeact_sim_reference'\] .*got missing"),
    ("other_norm_stats", lambda m: m.update(norm_stats={"other": {}}), r"no norm_stats\['edgeact_sim_reference'\]"),
    ("no_episodes", lambda m: m.pop("episodes"), r"'episodes' is missing, not a list of \{index, seed, \.\.\.\}"),
    ("no_seed", lambda m: m["episodes"][0].pop("seed"), r"'episodes' is \[.*not a list of \{index, seed"),
])
def test_a_damaged_or_empty_manifest_is_named_with_its_fix(good, tmp_path, name, change, message):
    damaged = damaged_copy(good, tmp_path, name, change)
    with pytest.raises(DemoDatasetError, match=rf"{damaged / MANIFEST}: {message}.*{FIX}"):
        load_demos(damaged)


def test_samples_of_an_episode_the_manifest_does_not_hold_are_named(good, tmp_path):
    from edgeact.drivers.sim.demos import joined_sets

    damaged = damaged_copy(good, tmp_path, "lost", lambda m: m.update(episodes=m["episodes"][1:]))
    with pytest.raises(DemoDatasetError, match=rf"{damaged / MANIFEST}: samples of episode \d+ but no such episode "
                                               rf"in its 'episodes'.*{FIX}"):
        joined_sets([load_demos(damaged)])


def test_joined_sets_give_each_samples_scene_seed(good, tmp_path):
    from edgeact.drivers.sim.demos import joined_sets

    first = load_demos(good)
    again = load_demos(shutil.copytree(good, tmp_path / "again"))
    arrays, seeds = joined_sets([first, again])
    joined = joined_arrays([first, again])
    assert all(np.array_equal(arrays[k], joined[k]) for k in joined)           # joined_arrays' samples, as they were
    own = first.arrays()["episode"]
    seed_of = {e["index"]: e["seed"] for e in first.manifest["episodes"]}
    expected = np.array([seed_of[int(e)] for e in own])
    assert np.array_equal(seeds, np.concatenate([expected, expected]))          # the copy: the same scenes
    assert set(expected.tolist()) <= {3, 4}                                      # sim-demos' seeds: --seed + i
    # ... under other episode numbers: only the seeds tell that they are one scene
    assert not set(arrays["episode"][:len(own)].tolist()) & set(arrays["episode"][len(own):].tolist())
