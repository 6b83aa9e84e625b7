"""`edgeact check CONFIG`: what a run needs, checked on the simulated Feetech arm without moving anything.

The simulated servos run in the test process behind a pty and the check connects through the real serial driver,
so "nothing moved" and "torque left as it was" are read from the motors' own registers.
"""
import json
from pathlib import Path

import pytest

from edgeact.drivers.sim.servo_bus import SimServoBus
from edgeact.runtime.cli import main
from edgeact.runtime.preflight import FAIL, OK, SKIPPED, WARN, preflight
from edgeact.runtime.robot_config import load_robot_config
from edgeact.runtime.sim_robot import sim_robot_config_dict

pytestmark = pytest.mark.timeout(60)

IDS = range(1, 7)
REGISTERS = ("torque_enable", "goal_position")


@pytest.fixture
def sim():
    with SimServoBus("feetech", ids=IDS) as bus:
        yield bus


def write_config(folder: Path, sim, **sections) -> Path:
    """The sample robot on the test's simulated bus (bus "feetech" on its pty: a real robot's config)."""
    data = sim_robot_config_dict()
    data["robot"] = {**data["robot"], "bus": "feetech", "port": sim.port, "options": {"timeout_s": 0.2}}
    data["policy"] = {"type": "scripted", "chunk_size": 8, "latency_s": 0.0}
    data["estop"] = {"file": "STOP"}
    data.update(sections)                      # whole sections
    path = folder / "robot.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def registers(sim) -> dict:
    return {(i, r): sim.register(i, r) for i in IDS for r in REGISTERS}


def statuses(checks) -> dict:
    out = {}
    for check in checks:
        out.setdefault(check.name, []).append(check.status)
    return {name: s[0] if len(s) == 1 else s for name, s in out.items()}


@pytest.mark.parametrize("torque_on", [False, True])
def test_a_ready_robot_passes_and_nothing_is_commanded(tmp_path, sim, torque_on):
    """Every check passes; no goal is written and torque stays as it was (on, too: a run that ended holding)."""
    if torque_on:
        for i in IDS:
            sim.servo(i).set("torque_enable", 1)
    before = registers(sim)
    checks = preflight(load_robot_config(write_config(tmp_path, sim)))
    assert registers(sim) == before
    got = statuses(checks)
    assert got["e-stop"] == got["motors"] == got["start positions"] == got["camera"] == got["policy"] == OK
    assert got["kinematics"] == SKIPPED            # joint_delta actions: no kinematics to check
    assert "bundle" not in got                      # a scripted policy has none
    motors = next(c for c in checks if c.name == "motors").detail
    assert motors.startswith("6 answer as configured on feetech") and "shoulder_pan +0.0 deg" in motors
    assert "128x96" in next(c for c in checks if c.name == "camera").detail
    assert "answers a frame in" in next(c for c in checks if c.name == "policy").detail


def test_a_motor_in_another_mode_is_a_warning_and_not_switched(tmp_path, sim):
    """The run's connect switches it with its torque off (a holding joint drops): the check says so and writes
    nothing, the motor is left holding in its mode."""
    from edgeact.drivers.motors.serial_types import PacketCodec

    for i in IDS:
        sim.servo(i).set("torque_enable", 1)
    velocity = sim.servo(2).spec.operating_modes["velocity"]
    sim.servo(2).set("operating_mode", velocity)
    before = registers(sim)
    checks = preflight(load_robot_config(write_config(tmp_path, sim)), with_policy=False)
    assert registers(sim) == before and sim.register(2, "operating_mode") == velocity
    assert not [ins for ins in sim.received if ins.code in {PacketCodec.WRITE, PacketCodec.REG_WRITE,
                                                             PacketCodec.SYNC_WRITE}]
    assert statuses(checks)["motors"] == [OK, WARN]
    assert ("motor 'shoulder_lift' is in velocity mode, the config says position: `edgeact run` switches it as it "
            "connects, with its torque off (a joint holding goes limp meanwhile: support the arm)") in [
        c.detail for c in checks if c.status == WARN]


def test_a_policy_slower_than_the_plan_age_limit_is_a_warning(tmp_path, sim):
    """Every plan would arrive stale and be held: the run starts and the robot never follows a plan."""
    path = write_config(tmp_path, sim, policy={"type": "scripted", "chunk_size": 8, "latency_s": 0.3},
                        plan={"max_age_s": 0.2})
    checks = preflight(load_robot_config(path))
    policy = next(c for c in checks if c.name == "policy")
    assert policy.status == WARN and "over plan.max_age_s (0.2 s), so every plan would arrive stale" in policy.detail
    fast = preflight(load_robot_config(write_config(tmp_path, sim, policy={"type": "scripted", "chunk_size": 8,
                                                                           "latency_s": 0.05}, plan={"max_age_s": 0.2})))
    assert next(c for c in fast if c.name == "policy").status == OK


def test_everything_that_stops_a_run_is_reported_at_once_with_its_fix(tmp_path, sim, capsys):
    """An active e-stop, a joint resting outside its limits and a camera without frames: all three in one run of
    the command, status 1, and the policy check skipped for want of a frame."""
    path = write_config(tmp_path, sim)
    data = json.loads(path.read_text())
    data["camera"] = {"type": "recording", "name": "front", "path": "missing.db3"}
    data["limits"]["joint_limits_rad"]["shoulder_pan"] = [0.5, 1.0]          # the joint rests at 0
    path.write_text(json.dumps(data))
    (tmp_path / "STOP").touch()
    out = tmp_path / "check.json"
    code = main(["check", str(path), "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 1
    report = json.loads(out.read_text())
    assert report["passed"] is False
    got = {c["name"]: c for c in report["checks"]}
    assert got["e-stop"]["status"] == FAIL and "remove it once the robot is clear" in got["e-stop"]["detail"]
    assert got["start positions"]["status"] == FAIL and "'shoulder_pan' reads +0.000 rad" in \
        got["start positions"]["detail"]
    assert got["camera"]["status"] == FAIL and "missing.db3" in got["camera"]["detail"]
    assert got["motors"]["status"] == OK and got["policy"]["status"] == SKIPPED
    assert "would not run as it is: fix e-stop, start positions, camera" in printed


def test_a_silent_motor_is_named_and_the_rest_still_checked(tmp_path):
    """Motor 6 is not on the bus: the motors check names it; the camera and the policy are still checked."""
    with SimServoBus("feetech", ids=range(1, 6)) as five:
        checks = preflight(load_robot_config(write_config(tmp_path, five)))
    got = statuses(checks)
    motors = next(c for c in checks if c.name == "motors").detail
    assert got["motors"] == FAIL and "motor 'gripper' (id 6) did not answer" in motors and "motors scan" in motors
    assert "start positions" not in got and got["kinematics"] == SKIPPED
    assert got["camera"] == got["policy"] == OK


def test_a_corrupt_bundle_fails_the_policy_check(tmp_path, sim):
    from tests.runtime.test_bundle import write_tiny_bundle

    bundle = write_tiny_bundle(tmp_path / "bundle")
    onnx = bundle / "stages" / "decoder.onnx"
    data = bytearray(onnx.read_bytes())
    data[-1] ^= 1
    onnx.write_bytes(bytes(data))
    config = load_robot_config(write_config(tmp_path, sim, policy={"type": "bundle", "path": "bundle"}))
    checks = preflight(config)
    policy = next(c for c in checks if c.name == "policy")
    assert policy.status == FAIL and "sha256 mismatch" in policy.detail and "re-copy or re-export" in policy.detail
    bundle_row = next(c for c in checks if c.name == "bundle")      # every file there at its size: only a sha256 is off
    assert bundle_row.status == OK and "tiny-sim, 1 stages (fp16), verified against its reference" in bundle_row.detail


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_an_incomplete_copy_fails_the_bundle_row_without_the_policy_check(tmp_path, sim, damage):
    """The usual way a bundle breaks on its way to a robot: `check --no-policy` must not call it ready."""
    from tests.runtime.test_bundle import write_tiny_bundle

    bundle = write_tiny_bundle(tmp_path / "bundle")
    onnx = bundle / "stages" / "decoder.onnx"
    if damage == "missing":
        onnx.unlink()
    else:
        onnx.write_bytes(onnx.read_bytes()[:-10])
    config = load_robot_config(write_config(tmp_path, sim, policy={"type": "bundle", "path": "bundle"}))
    checks = preflight(config, frames=1, with_policy=False)
    row = next(c for c in checks if c.name == "bundle")
    assert row.status == FAIL and "stages/decoder.onnx" in row.detail
    assert ("missing from" if damage == "missing" else "bytes but the manifest says") in row.detail


@pytest.mark.parametrize("verification, allow, status, words", [
    ("not_run", False, WARN, "never verified against its reference; `edgeact verify"),
    ("failed", False, FAIL, "failed verification, so it does not load"),
    ("failed", True, WARN, "FAILED verification, loaded only because policy.allow_unverified is true"),
])
def test_the_bundles_verdict_is_a_row(tmp_path, sim, verification, allow, status, words):
    from tests.runtime.test_bundle import write_tiny_bundle

    write_tiny_bundle(tmp_path / "bundle", verification=verification)
    config = load_robot_config(write_config(tmp_path, sim, policy={"type": "bundle", "path": "bundle",
                                                                    "allow_unverified": allow}))
    row = next(c for c in preflight(config, frames=1, with_policy=False) if c.name == "bundle")
    assert row.status == status and words in row.detail and str(tmp_path / "bundle") in row.detail


def test_an_estop_file_in_a_folder_that_does_not_exist_fails_the_check(tmp_path, sim):
    """Touching it would fail: on a robot whose only e-stop is that file, it could never be pressed."""
    path = write_config(tmp_path, sim, estop={"file": str(tmp_path / "no-such-folder" / "edgeact.estop")})
    row = next(c for c in preflight(load_robot_config(path), frames=1, with_policy=False) if c.name == "e-stop")
    assert row.status == FAIL and "no-such-folder does not exist here, so the e-stop could never be pressed" in \
        row.detail


def test_no_policy_skips_it_and_a_real_robot_without_an_estop_is_warned(tmp_path, sim):
    path = write_config(tmp_path, sim)
    data = json.loads(path.read_text())
    data.pop("estop")
    path.write_text(json.dumps(data))
    checks = preflight(load_robot_config(path), frames=2, with_policy=False)
    got = statuses(checks)
    assert got["policy"] == SKIPPED and got["e-stop"] == WARN
    assert "set estop.file" in next(c for c in checks if c.name == "e-stop").detail


def test_the_kinematics_check_gives_the_hand_pose_on_the_mujoco_robot(tmp_path):
    """The built-in MuJoCo robot ("ik" actions): the hand's pose from its description, the rendered camera."""
    pytest.importorskip("mujoco", reason="the MuJoCo robot needs mujoco (the sim extra)")
    from edgeact.runtime.sim_robot import mujoco_robot_config_dict

    path = tmp_path / "mujoco.json"
    path.write_text(json.dumps(mujoco_robot_config_dict()), encoding="utf-8")
    checks = preflight(load_robot_config(path), frames=2, with_policy=False)
    got = statuses(checks)
    kinematics = next(c for c in checks if c.name == "kinematics")
    assert got["motors"] == got["start positions"] == got["kinematics"] == got["camera"] == OK
    assert kinematics.detail.startswith("robot.xml: 'ee' at (+0.2") and "in 'base'" in kinematics.detail


def test_limits_the_guard_refuses_and_an_unexpected_error_are_failed_checks(tmp_path, sim):
    """safe_state 'stop' on an arm without wheels (the run's SafetyGuard refuses it) and a policy that raises a
    RuntimeError (as onnxruntime or CUDA do): both are rows of the table, the other checks still run."""
    from dataclasses import dataclass

    from edgeact.runtime.policy import PolicyConfig, register_policy

    class Broken:
        def step(self, observation):
            raise RuntimeError("out of memory")

        def close(self):
            pass

    @register_policy("preflight-test-broken")
    @dataclass
    class BrokenConfig(PolicyConfig):
        def make_policy(self, context):
            return Broken()

    path = write_config(tmp_path, sim, policy={"type": "preflight-test-broken", "process": False})
    data = json.loads(path.read_text())
    data["limits"]["joint_limits_rad"] = {"shoulder_pan": [2.0, 3.0]}      # past this bus's calibrated range
    path.write_text(json.dumps(data))
    checks = preflight(load_robot_config(path))
    got = {c.name: c for c in checks}
    assert got["start positions"].status == FAIL and "the safety limits do not fit this bus" in \
        got["start positions"].detail and "calibrated range" in got["start positions"].detail
    assert got["policy"].status == FAIL and got["policy"].detail == "RuntimeError: out of memory"
    assert got["camera"].status == OK


def test_a_damiao_motor_left_in_communication_lost_is_a_warning_as_the_run_clears_it(tmp_path):
    """A run that ended holding on Damiao motors with their bus watchdog: once the host went quiet they latched
    "communication lost". The run clears that at torque on, so the check warns, reads where they are and goes on;
    another fault fails with the driver's message."""
    pytest.importorskip("can", reason="Damiao motors are on CAN (python-can, the can extra)")
    import time
    import uuid

    from edgeact.drivers.sim.damiao_motor import DamiaoSim, SimDamiaoMotor
    from edgeact.runtime.robot_config import robot_config_from_dict

    channel = f"preflight-{uuid.uuid4().hex[:8]}"
    data = sim_robot_config_dict()
    data["robot"] = {"bus": "damiao-can", "motors": {"elbow": {"id": 1, "model": "dm4310"}},
                     "options": {"interface": "virtual", "channel": channel, "timeout_s": 0.2, "bus_watchdog_s": 0.1},
                     "disable_torque_on_exit": False}
    data["actions"] = {"type": "joint_delta", "joints": ["elbow"], "gains": [1.0]}
    data["limits"] = {"safe_state": "hold"}
    data["policy"] = {"type": "scripted", "chunk_size": 8, "latency_s": 0.0}
    data["estop"] = {"file": str(tmp_path / "STOP")}
    config = robot_config_from_dict(data)
    with DamiaoSim(channel, [SimDamiaoMotor(0x01, "dm4310")]) as damiao:
        bus = config.robot.make_bus()
        bus.connect()
        bus.enable_torque()
        bus.disconnect(False)            # the run ended holding; then nothing more reached the motor
        deadline = time.monotonic() + 5
        while damiao.motor(1).error is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert damiao.motor(1).error == 0xD
        got = statuses(preflight(config, frames=2, with_policy=False))
        assert got["motors"] == [OK, WARN] and got["start positions"] == OK
        assert damiao.motor(1).error == 0xD and not damiao.motor(1).enabled      # nothing cleared, nothing enabled
        damiao.motor(1).error = 0xA                                              # overcurrent: not the run's to clear
        checks = preflight(config, frames=2, with_policy=False)
        motors = next(c for c in checks if c.name == "motors")
        assert motors.status == FAIL and "overcurrent" in motors.detail


def test_a_run_that_cannot_start_points_to_the_check(tmp_path, sim, capsys):
    """A silent motor stops `edgeact run` before torque is on, and a joint outside its limits refuses its start:
    both say that `edgeact check` lists everything at once."""
    with SimServoBus("feetech", ids=range(1, 6)) as five:
        path = write_config(tmp_path, five)
        assert main(["run", str(path), "--seconds", "1"]) == 2
    assert f"`edgeact check {path}` lists everything that stops a run at once" in capsys.readouterr().err
    path = write_config(tmp_path, sim)
    data = json.loads(path.read_text())
    data["limits"]["joint_limits_rad"]["shoulder_pan"] = [0.5, 1.0]
    path.write_text(json.dumps(data))
    assert main(["run", str(path), "--seconds", "1"]) == 2
    assert f"`edgeact check {path}` lists everything" in capsys.readouterr().err
