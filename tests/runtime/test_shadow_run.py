"""`edgeact run --shadow`: the run goes on and the arm is not written to, checked on the simulated Feetech servos'
own registers and on every packet they received (the real serial driver, on a pty)."""
import json

import pytest

from edgeact.drivers.motors.serial_types import PacketCodec
from edgeact.drivers.motors.shadow import ShadowBus
from edgeact.drivers.sim.servo_bus import SimServoBus
from edgeact.runtime import cli
from edgeact.runtime.loop import SHADOW_MOTORS_AT_EXIT, run_robot
from edgeact.runtime.robot_config import robot_config_from_dict
from tests.runtime.test_loop import IDS, config_data, torque

pytestmark = pytest.mark.timeout(60)
WRITES = {PacketCodec.WRITE, PacketCodec.REG_WRITE, PacketCodec.SYNC_WRITE}


@pytest.fixture
def sim():
    with SimServoBus("feetech", ids=IDS) as bus:
        yield bus


def registers(sim):
    return {(i, r): sim.register(i, r) for i in IDS for r in ("torque_enable", "goal_position", "present_position")}


@pytest.mark.parametrize("torque_on", [False, True])
def test_a_shadow_run_plans_and_ticks_and_writes_nothing(sim, tmp_path, capsys, torque_on):
    """Limp (to be moved by hand), or holding where a previous run left it: either way the arm is left as it was."""
    if torque_on:
        for i in IDS:
            sim.servo(i).set("torque_enable", 1)
    before = registers(sim)
    path = tmp_path / "robot.json"
    path.write_text(json.dumps(config_data(sim)))
    record, summary = tmp_path / "run.jsonl", tmp_path / "run.json"
    assert cli.main(["run", str(path), "--seconds", "2", "--shadow", "--record", str(record),
                     "--json", str(summary)]) == 0
    out = capsys.readouterr().out
    assert registers(sim) == before and torque(sim) == [int(torque_on)] * 6
    assert not [ins for ins in sim.received if ins.code in WRITES]         # only reads went on the wire
    withheld = json.loads(summary.read_text())["shadow"]["writes_withheld"]
    assert withheld > 150 and f"shadow run: {withheld} writes withheld; nothing reached the motors" in out
    assert f"motors now: {SHADOW_MOTORS_AT_EXIT}" in out

    commands = [r for r in map(json.loads, record.read_text().splitlines()) if r["event"] == "command"]
    following = [c for c in commands if c["mode"] == "follow"]
    assert len(following) > 50                                            # the plans were followed, on paper
    for c in commands:
        assert c["sent_rad"] == c["measured_rad"]                                   # what the motors were left at
    moved = max(max(abs(c["targets_rad"][j] - c["measured_rad"][j]) for j in c["targets_rad"]) for c in following)
    assert moved > 0.01                                                     # the plans asked for motion


def test_a_motor_in_another_mode_is_not_switched_by_a_shadow_run(sim, tmp_path, capsys, caplog):
    """The run's connect would switch it with its torque off: the shadow logs that and writes nothing."""
    for i in IDS:
        sim.servo(i).set("torque_enable", 1)
    velocity = sim.servo(2).spec.operating_modes["velocity"]
    sim.servo(2).set("operating_mode", velocity)
    before = registers(sim)
    path = tmp_path / "robot.json"
    path.write_text(json.dumps(config_data(sim)))
    assert cli.main(["run", str(path), "--seconds", "1", "--shadow"]) == 0
    assert registers(sim) == before and sim.register(2, "operating_mode") == velocity
    assert not [ins for ins in sim.received if ins.code in WRITES]
    assert "nothing reached the motors" in capsys.readouterr().out
    assert any("shadow run (it writes nothing to the motors): motor 'shoulder_lift' is in velocity mode, the config "
               "says position" in r.getMessage() for r in caplog.records)


def test_the_shadow_bus_reads_through_and_reports_the_measured_pose_as_sent(sim):
    bus = ShadowBus(robot_config_from_dict(config_data(sim)).robot.make_bus())
    with bus:
        state = bus.read_state()
        goal = {name: value + 0.3 for name, value in state.position_rad.items()}
        assert bus.send(goal) == state.position_rad
        bus.enable_torque()
        bus.sync_write("goal_position", {name: 100 for name in goal})
        assert bus.withheld == 3 and torque(sim) == [0] * 6
        sim.servo(IDS[0]).set("torque_enable", 1)       # a run's disconnect never changes torque either way
    assert torque(sim)[0] == 1
    assert not [ins for ins in sim.received if ins.code in WRITES]


def test_a_joint_outside_its_limits_still_refuses_the_shadow_run(sim):
    """A rehearsal of the run: what the run would refuse, it refuses too (and writes nothing either way)."""
    data = config_data(sim)
    first = next(iter(data["robot"]["motors"]))
    data["limits"]["joint_limits_rad"] = {first: [0.5, 1.0]}          # the simulated joints rest at 0
    result = run_robot(robot_config_from_dict(data), 2.0, shadow=True)
    assert result.reason == "error" and "refusing to start with a joint outside its limits" in result.detail
    assert result.motors_at_exit == SHADOW_MOTORS_AT_EXIT and result.ticks == 0
    assert not [ins for ins in sim.received if ins.code in WRITES]
