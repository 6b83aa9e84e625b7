"""`edgeact demo`, `bench` and `run` refuse a bad input before an output is touched; `demo` and `eval --write-config`'s file."""
import argparse
import json

import pytest

from edgeact.runtime.demo import demo_config_dict
from edgeact.runtime.errors import BundleError, ConfigError
from edgeact.runtime.robot_config import load_robot_config, robot_config_from_dict
from edgeact.runtime.sim_robot import mujoco_robot_config_dict, sim_robot_config_dict


def edgeact(*argv: str) -> int:
    """The loop's and eval's sub-commands through argparse, as `edgeact` runs them."""
    from edgeact.runtime import commands_eval, commands_loop

    parser = argparse.ArgumentParser(prog="edgeact")
    subparsers = parser.add_subparsers(dest="command", required=True)
    commands_loop.register(subparsers)
    commands_eval.register(subparsers)
    args = parser.parse_args(list(argv))
    return args.handler(args)


pytestmark = pytest.mark.timeout(60)

OLDER_RUN = json.dumps({"control": {"achieved_hz": 99.9}})     # a good run's numbers, to be kept


LATE = "the policy's process found no bundle"


@pytest.fixture
def late_failure(monkeypatch):
    """The run finds the bundle missing only when its policy loads, as the real one does: too late for the outputs."""
    def fails(*args, **kwargs):
        raise BundleError(LATE)

    monkeypatch.setattr("edgeact.runtime.demo.run_robot", fails)
    monkeypatch.setattr("edgeact.runtime.loop.run_robot", fails)


def bundle_config(tmp_path, bundle_path: str):
    path = tmp_path / "robot.json"
    path.write_text(json.dumps(sim_robot_config_dict(policy={"type": "bundle", "path": bundle_path})))
    return path


def test_demo_refuses_a_missing_bundle_and_keeps_the_older_demo_json(tmp_path, late_failure):
    older = tmp_path / "out" / "demo.json"
    older.parent.mkdir()
    older.write_text(OLDER_RUN)
    missing = tmp_path / "no-such-bundle"
    with pytest.raises(BundleError) as refused:
        edgeact("demo", "--policy", "bundle", "--bundle", str(missing), "--seconds", "1", "--out", str(older.parent))
    assert older.read_text() == OLDER_RUN and not (older.parent / "demo.png").exists()
    assert str(refused.value) == f"{missing}: no bundle here; check the path or run the export first"


def test_demo_refuses_a_folder_that_is_not_a_bundle_and_keeps_the_older_demo_json(tmp_path, late_failure):
    older = tmp_path / "demo.json"
    older.write_text(OLDER_RUN)
    (tmp_path / "not-a-bundle").mkdir()
    with pytest.raises(BundleError) as refused:
        edgeact("demo", "--policy", "bundle", "--bundle", str(tmp_path / "not-a-bundle"), "--out", str(tmp_path))
    assert older.read_text() == OLDER_RUN
    assert f"manifest.json: missing; {tmp_path / 'not-a-bundle'} is not a bundle" in str(refused.value)


def test_bench_refuses_a_config_whose_bundle_is_missing_and_keeps_the_older_bench_json(tmp_path, late_failure):
    config = bundle_config(tmp_path, "no-such-bundle")      # relative: beside the config
    older = tmp_path / "bench" / "bench.json"
    older.parent.mkdir()
    older.write_text(OLDER_RUN)
    with pytest.raises(BundleError) as refused:
        edgeact("bench", str(config), "--seconds", "1", "--out", str(older.parent))
    assert older.read_text() == OLDER_RUN
    assert str(refused.value).startswith(f"{tmp_path / 'no-such-bundle'}: no bundle here")


def test_run_refuses_a_config_whose_bundle_is_missing_and_keeps_the_older_json(tmp_path, late_failure):
    config = bundle_config(tmp_path, str(tmp_path / "no-such-bundle"))
    older, record = tmp_path / "run.json", tmp_path / "sub" / "record.jsonl"
    older.write_text(OLDER_RUN)
    with pytest.raises(BundleError) as refused:
        edgeact("run", str(config), "--seconds", "1", "--json", str(older), "--record", str(record))
    assert older.read_text() == OLDER_RUN and not record.parent.exists()
    assert str(refused.value).startswith(f"{tmp_path / 'no-such-bundle'}: no bundle here")


WRITERS = {"demo": sim_robot_config_dict, "eval": mujoco_robot_config_dict}     # command -> the config it writes


@pytest.mark.parametrize("command", WRITERS)
def test_write_config_refuses_an_existing_file_unless_overwrite(tmp_path, command):
    path = tmp_path / "robot.json"
    path.write_text('{"edited": "by hand"}')
    with pytest.raises(ConfigError, match=f"--write-config {path}: already exists; pass --overwrite to replace it"):
        edgeact(command, "--write-config", str(path))
    assert path.read_text() == '{"edited": "by hand"}'
    assert edgeact(command, "--write-config", str(path), "--overwrite") == 0
    assert load_robot_config(path).to_dict() == robot_config_from_dict(WRITERS[command]()).to_dict()


@pytest.mark.parametrize("command", WRITERS)
@pytest.mark.parametrize("name", ["robot.toml", "robot.yaml", "robot"])
def test_write_config_refuses_a_name_it_would_not_load_back_as_json(tmp_path, name, command):
    path = tmp_path / name
    with pytest.raises(ConfigError, match=rf"--write-config {path}: the config is written as JSON; give a \.json "
                                          rf"path \(e\.g\. {tmp_path / 'robot.json'}\)"):
        edgeact(command, "--write-config", str(path))
    assert not path.exists()


@pytest.mark.parametrize("command", WRITERS)
def test_write_config_refuses_a_folder(tmp_path, command):
    with pytest.raises(ConfigError, match=f"--write-config {tmp_path} is a folder; give a file path"):
        edgeact(command, "--write-config", str(tmp_path), "--overwrite")


def test_the_written_bundle_config_loads_back_as_it_was_made(tmp_path):
    path = tmp_path / "configs" / "robot.json"
    bundle = str(tmp_path / "bundle")       # may be exported later: the config is written all the same
    assert edgeact("demo", "--policy", "bundle", "--bundle", bundle, "--write-config", str(path)) == 0
    expected = robot_config_from_dict(demo_config_dict("bundle", bundle)).to_dict()
    assert load_robot_config(path).to_dict() == expected and expected["policy"]["path"] == bundle


def test_a_missing_toml_config_suggests_a_sample_that_can_be_written_and_loaded(tmp_path):
    missing = tmp_path / "robot.toml"
    with pytest.raises(ConfigError, match=f"config {missing} not found; write a sample with "
                                          f"`edgeact demo --write-config {tmp_path / 'robot.json'}`"):
        load_robot_config(missing)
    assert edgeact("demo", "--write-config", str(tmp_path / "robot.json")) == 0
    assert load_robot_config(tmp_path / "robot.json").robot.bus == "sim"


def test_a_plugin_policy_whose_path_is_a_file_is_not_taken_for_a_bundle(tmp_path, monkeypatch):
    """Only the bundle policy's path is checked for a manifest: a registered plugin's `path` is its own business."""
    from dataclasses import dataclass

    from edgeact.runtime import policy as policy_module
    from edgeact.runtime.demo import check_policy_bundle, policy_bundle

    policy_module.policy_types()                    # the built-in types registered, then the registry restored after
    monkeypatch.setattr(policy_module, "_POLICY_TYPES", dict(policy_module._POLICY_TYPES))

    @policy_module.register_policy("remote-test")
    @dataclass
    class RemoteConfig(policy_module.PolicyConfig):
        path: str = ""

        def make_policy(self, context):
            raise NotImplementedError

    (tmp_path / "model.pt").write_bytes(b"weights")
    data = sim_robot_config_dict(policy={"type": "remote-test", "path": "model.pt"})
    config = robot_config_from_dict(data, source=str(tmp_path / "robot.json"))
    check_policy_bundle(config)
    assert policy_bundle(config) is None
    bundle = robot_config_from_dict(sim_robot_config_dict(policy={"type": "bundle", "path": "model.pt"}),
                                    source=str(tmp_path / "robot.json"))
    with pytest.raises(BundleError, match="manifest.json: missing"):
        check_policy_bundle(bundle)                 # the same path as a bundle's is still refused
