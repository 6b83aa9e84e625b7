"""The robot config file: the sample loads and round-trips, JSON and TOML read, bad fields are named with the fix."""
import json
from pathlib import Path

import pytest

from edgeact.drivers.cameras.synthetic import SyntheticConfig
from edgeact.drivers.motors.safety import SafetyConfig
from edgeact.runtime.control import JointDeltaConfig
from edgeact.runtime.errors import ConfigError
from edgeact.runtime.policy import ScriptedPolicyConfig, policy_type, policy_types
from edgeact.runtime.robot_config import load_robot_config, robot_config_from_dict
from edgeact.runtime.sim_robot import make_robot_camera, sim_robot_config_dict

pytestmark = pytest.mark.timeout(30)


def test_sample_config_loads_with_typed_sections():
    cfg = robot_config_from_dict(sim_robot_config_dict())
    assert cfg.robot.bus == "sim" and len(cfg.robot.motors) == 6
    assert cfg.robot.calibration["gripper"].homing_offset == 2048
    assert isinstance(cfg.camera, SyntheticConfig) and cfg.camera.width == 128
    assert isinstance(cfg.policy, ScriptedPolicyConfig)
    assert isinstance(cfg.actions, JointDeltaConfig) and cfg.actions.dims == [0, 1, 2, 4, 3]
    assert isinstance(cfg.limits, SafetyConfig) and cfg.limits.joint_limits_rad["gripper"] == (-0.1, 1.0)
    assert cfg.rates.control_hz == 100.0 and cfg.estop.file is None


def test_to_dict_round_trips():
    cfg = robot_config_from_dict(sim_robot_config_dict())
    again = robot_config_from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again.to_dict() == cfg.to_dict()


def test_json_and_toml_files(tmp_path):
    path = tmp_path / "robot.json"
    path.write_text(json.dumps(sim_robot_config_dict()))
    cfg = load_robot_config(path)
    assert cfg.source == str(path) and cfg.config_dir == tmp_path.resolve()
    toml = tmp_path / "robot.toml"
    toml.write_text("""
instruction = "wave"
[robot]
bus = "feetech"
port = "/dev/ttyACM0"
[robot.motors.elbow]
id = 2
model = "sts3215"
[robot.calibration.elbow]
homing_offset = 2048
range_min = 1024
range_max = 3072
[camera]
type = "synthetic"
fps = 15
[policy]
type = "scripted"
latency_s = 0
[actions]
type = "joint_delta"
joints = ["elbow"]
gains = [0.5]
[rates]
control_hz = 50
[estop]
file = "/tmp/stop-the-arm"
""")
    cfg = load_robot_config(toml)
    assert cfg.robot.port == "/dev/ttyACM0" and cfg.robot.motors["elbow"].id == 2
    assert cfg.camera.fps == 15.0 and cfg.rates.control_hz == 50.0 and cfg.instruction == "wave"
    assert cfg.estop.file == "/tmp/stop-the-arm"


def _error(data) -> str:
    with pytest.raises(ConfigError) as info:
        robot_config_from_dict(data, source="robot.json")
    return str(info.value)


def _with(section, **fields):
    data = sim_robot_config_dict()
    data[section] = {**data[section], **fields}
    return data


@pytest.mark.parametrize("data, expected", [
    (_with("rates", control_hz=0), "config robot.json: rates.control_hz: must be in (0, 1000], got 0"),
    (_with("rates", contol_hz=50), "rates: unknown key 'contol_hz' (did you mean 'control_hz'?)"),
    (_with("rates", control_hz="fast"), "rates.control_hz: must be a number, got 'fast'"),
    (_with("rates", action_rate_hz=200), "rates.action_rate_hz: must be in (0, control_hz = 100]"),
    ({**sim_robot_config_dict(), "instrucion": "x"}, "unknown key 'instrucion' (did you mean 'instruction'?)"),
    (_with("camera", fsp=30), "camera: unknown key 'fsp' (did you mean 'fps'?)"),
    (_with("camera", fps=0), "camera: synthetic camera 'front': fps=0 must be in (0, 240]"),
    (_with("camera", timeout_s=0.05), "camera: camera 'front': timeout_s=0.05 is under three frame periods at 30 fps, "
                                      "so latest() would call a healthy stream lost between frames; set timeout_s to "
                                      "at least 0.1"),
    (_with("camera", type="webcam"), "camera.type: camera type 'webcam' unknown; use one of"),
    (_with("policy", type="bundel"), "policy.type: policy type 'bundel' unknown; use one of"),
    (_with("policy", chunk_size=0), "policy.chunk_size: must be an integer in [1, 256], got 0"),
    (_with("actions", gains=[1.0]), "actions.gains: give one finite gain"),
    (_with("actions", joints=["shoulder_pan", "elbow", "wrist_flex", "wrist_roll", "shoulder_lift"]),
     "joints ['elbow'] are not motors of the robot"),
    (_with("limits", max_step_rad=0), "limits.max_step_rad must be > 0, got 0"),
    (_with("limits", safe_state="off"), "limits.safe_state must be one of"),
    (_with("limits", joint_limits_rad={"knee": [-1, 1]}), "limits.joint_limits_rad: joints ['knee'] are not motors"),
    (_with("limits", joint_limits_rad={"gripper": [0, 1, 2]}),
     "limits.joint_limits_rad.gripper: must be a list of 2 values, got [0, 1, 2]"),
    (_with("limits", joint_limits_rad={"gripper": [0, "x"]}),
     "limits.joint_limits_rad.gripper[1]: must be a number, got 'x'"),
    (_with("robot", baud_rate=9600), "robot.options or baud_rate: baud rate 9600 not supported by feetech motors"),
    (_with("limits", watchdog_timeout_s=0.01), "limits.watchdog_timeout_s: 0.01 s is under three control periods"),
    (_with("watchdog", control_stall_s=-1), "watchdog.control_stall_s: must be in (0, 60] seconds, got -1"),
    # three control periods at 1000 Hz, but not over the supervisor's look: `edgeact check` passed it, the run refused
    ({**_with("watchdog", control_stall_s=0.01), "rates": {**sim_robot_config_dict()["rates"], "control_hz": 1000,
                                                           "action_rate_hz": 10}},
     "watchdog.control_stall_s: 0.01 s is not over the run's supervisor period (0.01 s, how often it looks for a "
     "stalled control thread): raise it above 0.01 s (e.g. 0.05)"),
    (_with("robot", bus="feetch"), "robot.bus: must be one of sim, feetech, dynamixel, damiao-can, got 'feetch' "
                                   "(did you mean 'feetech'?)"),
    (_with("robot", port="/dev/ttyUSB0"), "robot.port: the simulated bus opens its own pty"),
    (_with("robot", bus="feetech"), "robot.port: a feetech bus needs its serial device"),
    (_with("robot", motors={**sim_robot_config_dict()["robot"]["motors"], "gripper": {"id": 6, "model": "sts3251"}}),
     "robot.motors.gripper.model: 'sts3251' is not a feetech model; use one of sts3215, sts3250, sm8512bl "
     "(did you mean 'sts3250'?)"),
    (_with("robot", motors={"elbow": {"id": 1}}), "robot.motors.elbow: missing field(s) model"),
    (_with("robot", options={"timeout": 0.1}), "robot.options: unknown key 'timeout' (did you mean 'timeout_s'?)"),
    (_with("estop", key="F12"), "estop.key: one character or one of space"),
    (_with("plan", max_age_s=0.05), "plan.max_age_s: 0.05 s is under one action period (0.100 s at "
                                     "rates.action_rate_hz 10): every plan would be stale on arrival"),
    ({k: v for k, v in sim_robot_config_dict().items() if k != "actions"}, "actions: missing section"),
    ({**sim_robot_config_dict(policy={"type": "bundle", "path": "b"}), "instruction": " "},
     "instruction: empty, and the bundle policy answers an instruction; say what the robot should do"),
    ([1, 2], "the top level must be a table of sections"),
])
def test_bad_config_names_the_field_and_the_fix(data, expected):
    message = _error(data)
    assert expected in message
    after = message[message.index(expected) + len(expected):][:1]
    assert not (after.isdigit() or after == "."), f"{expected!r} matched only part of a number in {message!r}"


def test_a_relative_estop_file_is_beside_the_config_not_in_the_working_directory(tmp_path, monkeypatch):
    config_dir, elsewhere = tmp_path / "robot", tmp_path / "elsewhere"
    config_dir.mkdir()
    elsewhere.mkdir()
    path = config_dir / "robot.json"
    path.write_text(json.dumps(_with("estop", file="stops/robot.estop")))
    monkeypatch.chdir(elsewhere)
    cfg = load_robot_config(path)
    assert cfg.estop.file == "stops/robot.estop"            # kept as written (to_dict round-trips it)
    assert cfg.estop_path == config_dir.resolve() / "stops" / "robot.estop"
    path.write_text(json.dumps(_with("estop", file="/tmp/stop-the-arm")))
    assert load_robot_config(path).estop_path == Path("/tmp/stop-the-arm")
    # Not read from a file: only the working directory to go by, fixed when asked.
    assert robot_config_from_dict(_with("estop", file="robot.estop")).estop_path == elsewhere / "robot.estop"
    assert robot_config_from_dict(sim_robot_config_dict()).estop_path is None


def test_a_relative_recording_path_is_beside_the_config_not_in_the_working_directory(tmp_path, monkeypatch):
    config_dir, elsewhere = tmp_path / "robot", tmp_path / "elsewhere"
    config_dir.mkdir()
    elsewhere.mkdir()
    path = config_dir / "robot.json"
    path.write_text(json.dumps({**sim_robot_config_dict(), "camera": {"type": "recording", "path": "runs/scene.db3"}}))
    monkeypatch.chdir(elsewhere)
    cfg = load_robot_config(path)
    assert cfg.camera.path == "runs/scene.db3"              # kept as written (to_dict round-trips it)
    beside = str(config_dir.resolve() / "runs" / "scene.db3")
    assert cfg.camera_config.path == beside and cfg.camera_config.name == cfg.camera.name
    assert make_robot_camera(cfg).config.path == beside     # what `edgeact run` plays
    path.write_text(json.dumps({**sim_robot_config_dict(), "camera": {"type": "recording", "path": "/data/a.db3"}}))
    assert load_robot_config(path).camera_config.path == "/data/a.db3"
    # Not read from a file: only the working directory to go by; other cameras have no path.
    from_dict = robot_config_from_dict({**sim_robot_config_dict(), "camera": {"type": "recording", "path": "a.db3"}})
    assert make_robot_camera(from_dict).config.path == "a.db3"
    path.write_text(json.dumps(sim_robot_config_dict()))
    cfg = load_robot_config(path)
    assert cfg.camera_config is cfg.camera


def test_a_recording_path_under_the_home_directory_is_expanded(tmp_path, monkeypatch):
    home, config_dir = tmp_path / "home", tmp_path / "robot"
    home.mkdir()
    config_dir.mkdir()
    monkeypatch.setenv("HOME", str(home))
    path = config_dir / "robot.json"
    path.write_text(json.dumps({**sim_robot_config_dict(), "camera": {"type": "recording", "path": "~/runs/a.db3"}}))
    cfg = load_robot_config(path)
    assert cfg.camera.path == "~/runs/a.db3"                # kept as written
    assert cfg.camera_config.path == str(home / "runs" / "a.db3")
    assert make_robot_camera(cfg).config.path == str(home / "runs" / "a.db3")


def test_file_errors_say_what_to_do(tmp_path):
    with pytest.raises(ConfigError, match="not found; write a sample with `edgeact demo --write-config"):
        load_robot_config(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{ not json")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        load_robot_config(bad)
    yaml = tmp_path / "robot.yaml"
    yaml.write_text("robot: {}")
    with pytest.raises(ConfigError, match="use a .json or .toml file"):
        load_robot_config(yaml)
    latin = tmp_path / "latin.json"
    latin.write_bytes(b'{"instruction": "\xff\xfe"}')
    with pytest.raises(ConfigError, match=r"latin\.json is not UTF-8 text \(invalid start byte at byte 17\); save it"):
        load_robot_config(latin)
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(ConfigError, match=r"dir\.json is a folder; give the robot config file"):
        load_robot_config(tmp_path / "dir.json")


def _mujoco(section=None, **fields):
    from edgeact.runtime.sim_robot import mujoco_robot_config_dict

    data = mujoco_robot_config_dict()
    if section:
        data[section] = {**data[section], **fields}
    return data


@pytest.mark.parametrize("edit, expected", [
    (lambda d: d["actions"].update(gripper_joint="base_left_wheel"),
     "actions: joints ['base_left_wheel'] are wheels (mode 'velocity' in robot.motors); the action mapper drives "
     "position joints"),
    (lambda d: d["limits"].setdefault("joint_limits_rad", {}).update(base_left_wheel=[-0.1, 0.1]),
     "limits.joint_limits_rad: ['base_left_wheel'] are wheels (mode 'velocity'): joint limits apply to position "
     "joints"),
    (lambda d: d["actions"].setdefault("joint_limits_rad", {}).update(shoulder_pan=[1.6, 2.0]),
     "actions.joint_limits_rad.shoulder_pan: [1.6, 2] does not overlap the safety limits [-1.5, 1.5]"),
    (lambda d: d["robot"]["motors"]["gripper"].update(id=1),
     "robot.motors: 'shoulder_pan' and 'gripper' both have id 1; give each motor its own id (the simulated bus "
     "answers on the ids robot.motors gives)"),
    (lambda d: d.update(policy={"type": "bundle", "path": "b", "threads": -1}, instruction="push it"),
     "policy.threads: -1; use a positive number"),
])
def test_what_the_config_alone_decides_is_refused_at_load_not_by_the_running_loop(edit, expected):
    """Each was accepted and failed once the loop ran (a wheel as the gripper: inside the control thread), or never
    acted (IK limits past the guard's, a wheel's joint limit)."""
    data = _mujoco()
    edit(data)
    assert expected in _error(data)
    simple = _with("limits", safe_state="stop")       # a robot without wheels: nothing for 'stop' to stop
    assert "limits.safe_state: 'stop' stops wheels (velocity-mode motors) and this robot has none" in _error(simple)


def test_policy_registry_finds_types_by_name():
    assert policy_types()["scripted"] is ScriptedPolicyConfig
    assert policy_type("scripted") is ScriptedPolicyConfig
    with pytest.raises(ConfigError, match="policy type 'nope' unknown; use one of .*scripted"):
        policy_type("nope")


def test_policy_registry_skips_a_listed_module_that_is_not_there_yet(monkeypatch, tmp_path):
    from edgeact.runtime import policy

    monkeypatch.setattr(policy, "BUILTIN_POLICY_MODULES", ("edgeact.runtime.no_such_policy",))
    assert "scripted" in policy_types()
    # ... but a module that is there and fails to import is an error, not a silently missing type.
    (tmp_path / "broken_policy_mod.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(policy, "BUILTIN_POLICY_MODULES", ("broken_policy_mod",))
    with pytest.raises(ModuleNotFoundError, match="no_such_dependency_xyz"):
        policy_types()


def _damiao(**robot):
    data = sim_robot_config_dict()
    data["robot"] = {"bus": "damiao-can", "motors": {"elbow": {"id": 1, "model": "dm4310"}}, **robot}
    data["actions"] = {"type": "joint_delta", "joints": ["elbow"], "gains": [1.0]}
    data["limits"] = {}
    return data


def test_damiao_can_bus_section():
    cfg = robot_config_from_dict(_damiao(options={"interface": "virtual", "channel": "arm"}))
    assert cfg.robot.make_bus().config.channel == "arm"
    assert "robot.options: unknown key 'chanel' (did you mean 'channel'?)" in _error(_damiao(options={"chanel": "x"}))
    assert "robot.options: gains of 'default'" in _error(_damiao(options={"kp": -1.0}))
    assert "robot.motors.elbow.model: unknown Damiao model 'dm9999'" in _error(
        _damiao(motors={"elbow": {"id": 1, "model": "dm9999"}}))
    twice = _damiao(motors={"elbow": {"id": 1, "model": "dm4310"}, "wrist": {"id": 1, "model": "dm4310"}})
    twice["actions"] = {"type": "joint_delta", "joints": ["elbow", "wrist"], "gains": [1.0, 1.0]}
    said = _error(twice)       # `edgeact motors scan` is for the serial buses
    assert "both have id 1; give each motor its own id (each motor's CAN id is its ESC_ID" in said
    assert "motors scan" not in said


# -- values that validate one by one but would disable a protection; torque at exit ---------------------------------

def _real(**edits):
    """The sample on a real Feetech bus (its calibration kept), with `edits` (section -> fields) applied."""
    data = _with("robot", bus="feetech", port="/dev/ttyACM0")
    for section, fields in edits.items():
        data[section] = {**data[section], **fields}
    return data


def _calibrated(**elbow):
    data = _real()
    data["robot"]["calibration"]["elbow_flex"] = {**data["robot"]["calibration"]["elbow_flex"], **elbow}
    return data


SEAM_FIX = "re-mount its horn so the whole travel reads inside 0..4095"


@pytest.mark.parametrize("data, expected", [
    (_calibrated(range_min=-1000, range_max=1000),
     "robot.calibration: motor 'elbow_flex' (sts3215, raw positions 0..4095): calibration range [-1000, 1000] must "
     "lie within 0..4095 with range_min < range_max"),
    (_calibrated(range_min=-3000, range_max=9000), "calibration range [-3000, 9000] must lie within 0..4095"),
    (_calibrated(range_min=3000, range_max=1000), "calibration range [3000, 1000] must lie within 0..4095"),
    (_calibrated(homing_offset=70000), "calibration homing_offset 70000 (the raw reading at the joint's zero) must "
                                       "lie within 0..4095"),
    (_real(limits={"max_velocity_rad_s": 1e6, "max_step_rad": 1e3}), "limits.max_velocity_rad_s 1e+06 is above 20 rad/s"),
    (_real(limits={"max_velocity_rad_s": 10.0}),
     "limits.max_velocity_rad_s: 10 rad/s is above the fastest motor of this robot (sts3215: 5.22 rad/s)"),
    (_real(limits={"max_step_rad": 1e3}),
     "limits.max_step_rad: 1000 rad is more than limits.max_velocity_rad_s allows in 0.1 s (0.2 rad)"),
    (_real(limits={"watchdog_timeout_s": 1e9}), "limits.watchdog_timeout_s: 1e+09 s is over 2 s"),
])
def test_values_that_would_disable_a_protection_are_refused_with_the_fix(data, expected):
    message = _error(data)
    assert expected in message
    if "calibration range" in expected or "homing_offset" in expected:
        assert SEAM_FIX in message and "homing offset register" in message


def test_the_samples_and_the_defaults_keep_within_the_new_bounds():
    robot_config_from_dict(_real())
    robot_config_from_dict(_real(limits={"max_step_rad": 0.2, "max_velocity_rad_s": 2.0, "watchdog_timeout_s": 2.0}))
    defaults = _real(rates={"control_hz": 1000.0})
    defaults["limits"] = {"joint_limits_rad": defaults["limits"]["joint_limits_rad"]}     # SafetyConfig's defaults
    config = robot_config_from_dict(defaults)
    assert (config.limits.max_step_rad, config.limits.max_velocity_rad_s) == (0.2, 3.0)
    robot_config_from_dict(_calibrated(homing_offset=0, range_min=0, range_max=4095))     # the encoder's whole turn


def test_a_real_serial_joint_without_calibration_is_refused_the_simulated_one_is_not():
    data = _real()
    del data["robot"]["calibration"]["elbow_flex"], data["robot"]["calibration"]["gripper"]
    message = _error(data)
    assert "robot.calibration: no entry for the feetech joints 'elbow_flex', 'gripper'; without one raw tick 0" in message
    assert "read present_position at the joint's zero (homing_offset) and at both ends of its travel" in message
    data["robot"]["bus"] = "dynamixel"
    data["robot"]["motors"] = {n: {**m, "model": "xl430-w250"} for n, m in data["robot"]["motors"].items()}
    assert "no entry for the dynamixel joints 'elbow_flex', 'gripper'" in _error(data)
    simulated = sim_robot_config_dict()     # the simulator puts an uncalibrated motor at its own zero
    del simulated["robot"]["calibration"]["gripper"]
    robot_config_from_dict(simulated)
    wheels = _real()                        # wheels have no position to calibrate
    wheels["robot"]["motors"]["base"] = {"id": 7, "model": "sts3215", "mode": "velocity"}
    robot_config_from_dict(wheels)


def test_disable_torque_on_exit_reaches_the_serial_and_the_damiao_bus():
    assert robot_config_from_dict(_real()).robot.make_bus().disable_torque_on_exit is True     # the default
    assert robot_config_from_dict(_real(robot={"disable_torque_on_exit": False})).robot.make_bus() \
        .disable_torque_on_exit is False
    damiao = robot_config_from_dict(_damiao(options={"interface": "virtual"}, disable_torque_on_exit=False))
    assert damiao.robot.make_bus().disable_torque_on_exit is False
    assert "robot.disable_torque_on_exit: must be true or false" in _error(_real(robot={"disable_torque_on_exit": 0}))


def test_a_bundle_path_in_a_scripted_policy_names_the_type_that_has_it():
    """A written config's scripted policy with only `path` set, as a first real config often is."""
    data = sim_robot_config_dict()
    data["policy"] = {**data["policy"], "path": "~/edgeact/bundles/current"}
    with pytest.raises(ConfigError, match=r"policy: 'path' is a field of policy type 'bundle', not of 'scripted': for "
                                          r"a 'scripted' policy drop 'path'; for a 'bundle' one set \"type\": \"bundle\" "
                                          r"and drop .*'chunk_size'.* \(of type 'scripted'\)"):
        robot_config_from_dict(data)
    # The other way round: switched to a bundle, the scripted policy's keys left in. Dropping them is offered.
    data["policy"]["type"] = "bundle"
    with pytest.raises(ConfigError, match=r"policy: 'chunk_size', 'latency_s' are fields of policy type 'scripted', "
                                          r"not of 'bundle': for a 'bundle' policy drop 'chunk_size', 'latency_s';"):
        robot_config_from_dict(data)


def test_ik_limits_past_the_safety_limits_are_narrowed_to_them():
    """IK planned poses the guard then cut short every tick without a word; now it plans inside the guard's limits."""
    data = _mujoco()
    data["actions"].setdefault("joint_limits_rad", {})["shoulder_pan"] = [-1.5, 2.0]
    data["limits"]["joint_limits_rad"]["shoulder_pan"] = [0.3, 1.5]
    config = robot_config_from_dict(data)
    assert config.actions.joint_limits_rad["shoulder_pan"] == [0.3, 1.5]
    kinematics = config.actions.make_mapper(list(config.robot.motors)).kinematics
    pan = kinematics.joints.index("shoulder_pan")
    assert (kinematics.lower_rad[pan], kinematics.upper_rad[pan]) == pytest.approx((0.3, 1.5))


def test_a_tiny_step_limit_is_named_as_it_is():
    tiny = _with("limits", max_velocity_rad_s=0.001)
    assert _error(tiny).endswith("use at most 0.0001")        # not "0.000", which max_step_rad > 0 refuses


def test_write_config_never_writes_a_config_that_cannot_load(tmp_path, capsys):
    from edgeact.runtime.cli import main

    out = tmp_path / "s2.json"
    assert main(["demo", "--robot", "mujoco", "--seed", "99999999999999999999", "--write-config", str(out)]) == 2
    assert "robot.task.seed" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("options, expected", [
    ({"timeout_s": "0.05"}, "robot.options.timeout_s: must be a number, got '0.05'"),
    ({"retries": True}, "robot.options.retries: must be an integer, got True"),
])
def test_bus_options_are_checked_by_their_types_and_named(options, expected):
    """A truthy string turned a feature on; a string timeout ended in "'<' not supported" naming no field."""
    assert expected in _error(_with("robot", options=options))


def test_damiao_options_are_typed_too():
    assert "robot.options.check_on_connect: must be true or false, got 'false'" in \
        _error(_damiao(options={"check_on_connect": "false"}))
    assert "robot.options.gains: ['elbw'] are not motors (elbow) (did you mean 'elbow'?)" in \
        _error(_damiao(options={"gains": {"elbw": [5, 1]}}))
    damiao = _damiao(options={"gains": {"gripper": [5, 1, 2]}})
    assert "robot.options.gains.gripper: must be a list of 2 values, got [5, 1, 2]" in _error(damiao)
