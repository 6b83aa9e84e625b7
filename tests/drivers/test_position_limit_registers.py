"""A motor's own Min/Max Position Limit registers narrower than its calibrated range: goals are clamped to both, on
the simulated Dynamixel (which refuses a goal beyond them, silently in a sync write) and Feetech (which clamps)."""
import logging
import math
import time

import pytest

from edgeact.drivers.motors.bus import MotorBusError, MotorCalibration
from edgeact.drivers.motors.serial_types import PacketCodec

from .conftest import arm_motors

pytestmark = pytest.mark.timeout(20)
TICK = 2 * math.pi / 4096
CALIBRATION = MotorCalibration(homing_offset=2048, range_min=1000, range_max=3500, drive_mode=0)


def rad(raw: int) -> float:
    return (raw - 2048) * TICK


def calibrated(*names: str) -> dict[str, MotorCalibration]:
    return dict.fromkeys(names, CALIBRATION)


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


@pytest.mark.parametrize("protocol", ["dynamixel", "feetech"])
def test_a_goal_beyond_the_max_position_limit_register_is_clamped_to_it_and_reaches_the_motor(
        protocol, start_sim, bus_for, caplog):
    """Dynamixel: before, the sync write's goal was refused in silence and the joint stayed where it was.
    Feetech: before, the motor clamped and `send` said it had sent the goal beyond. Now both hold the register's
    value, `send` says so, and a joint whose registers cover the range is sent exactly as before, one sync write
    per send."""
    sim = start_sim(protocol, ids=[1, 2], max_speed_ticks_s=20_000)
    sim.servo(1).set_saved("max_position_limit", 3000)       # below the calibrated range_max 3500
    bus = bus_for(sim, arm_motors(protocol, ids=(1, 2)), calibrated("shoulder", "elbow"))
    with caplog.at_level(logging.WARNING, logger="edgeact.drivers.motors"):
        bus.connect()
    said = [w for w in warnings_of(caplog) if "position limit registers" in w]
    assert len(said) == 1 and "'shoulder' (id 1)" in said[0] and "[0, 3000]" in said[0] and "[1000, 3500]" in said[0]
    assert "torque off" in said[0] and "robot.calibration" in said[0] and "elbow" not in said[0]
    bus.enable_torque()
    before = len(sim.received)
    sent = bus.send({"shoulder": rad(3400), "elbow": rad(3400)})
    sim.wait_idle()
    assert [i.code for i in list(sim.received)[before:]] == [PacketCodec.SYNC_WRITE]   # one transaction, as before
    assert sent == {"shoulder": pytest.approx(rad(3000)), "elbow": pytest.approx(rad(3400))}
    assert (sim.register(1, "goal_position"), sim.register(2, "goal_position")) == (3000, 3400)
    time.sleep(0.2)
    assert (sim.register(1, "present_position"), sim.register(2, "present_position")) == (3000, 3400)
    assert bus.send({"shoulder": rad(1200)}) == {"shoulder": pytest.approx(rad(1200))}   # within both: as asked
    sim.wait_idle()
    assert sim.register(1, "goal_position") == 1200


@pytest.mark.parametrize("protocol", ["dynamixel", "feetech"])
def test_connect_read_only_names_registers_narrower_than_the_calibrated_range(protocol, start_sim, bus_for):
    sim = start_sim(protocol, ids=[1, 2, 3])
    sim.servo(2).set_saved("min_position_limit", 1500)       # above the calibrated range_min 1000
    sim.servo(3).set_saved("min_position_limit", 500)        # wider than the range on both sides: fine
    bus = bus_for(sim, arm_motors(protocol), calibrated("shoulder", "elbow", "wrist"))
    said = bus.connect_read_only()
    assert len(said) == 1
    assert said[0].startswith("motor 'elbow' (id 2): its own position limit registers allow raw [1500, 4095], "
                              "narrower than its calibrated range [1000, 3500]")
    assert "widen them" in said[0] and "torque off" in said[0] and "robot.calibration" in said[0]
    assert not [i for i in sim.received if i.code in (PacketCodec.WRITE, PacketCodec.SYNC_WRITE)]
    assert bus.send({"elbow": rad(1100)}) == {"elbow": pytest.approx(rad(1500))}


def test_dynamixel_limits_are_read_again_where_they_may_have_changed(start_sim, bus_for):
    """EEPROM changes only with torque off: written through the driver (write) or by another tool before
    enable_torque. Each time the driver's clamp follows, so no goal is refused in silence."""
    sim = start_sim("dynamixel", ids=[1])
    bus = bus_for(sim, arm_motors("dynamixel", ids=(1,)), calibrated("shoulder"))
    bus.connect()
    bus.write("max_position_limit", "shoulder", 3000)
    assert bus.send({"shoulder": rad(3400)}) == {"shoulder": pytest.approx(rad(3000))}
    sim.wait_idle()
    assert sim.register(1, "goal_position") == 3000
    sim.servo(1).set_saved("max_position_limit", 2800)       # as a vendor tool would, torque off
    bus.enable_torque()
    assert bus.send({"shoulder": rad(3400)}) == {"shoulder": pytest.approx(rad(2800))}
    sim.wait_idle()
    assert sim.register(1, "goal_position") == 2800


def test_feetech_limits_written_through_the_driver_and_a_pair_meaning_no_limit(start_sim, bus_for):
    """min >= max (0/0) sets no limit on a Feetech: the goal goes out as asked."""
    sim = start_sim("feetech", ids=[1])
    bus = bus_for(sim, arm_motors("feetech", ids=(1,)), calibrated("shoulder"))
    bus.connect()
    bus.write("max_position_limit", "shoulder", 3000)
    assert bus.send({"shoulder": rad(3400)}) == {"shoulder": pytest.approx(rad(3000))}
    sim.wait_idle()
    assert sim.register(1, "goal_position") == 3000
    bus.write("max_position_limit", "shoulder", 0)           # min 0, max 0: no limit
    assert bus.send({"shoulder": rad(3400)}) == {"shoulder": pytest.approx(rad(3400))}
    sim.wait_idle()
    assert sim.register(1, "goal_position") == 3400


def test_feetech_torque_stays_off_where_the_joint_rests_beyond_its_limit_registers(start_sim, bus_for):
    """A Feetech takes the holding goal and clamps it: at torque on the joint would drive to the limit at full
    speed. As the Dynamixel (which refuses the goal), torque stays off and the words name the fix."""
    sim = start_sim("feetech", ids=[1, 2])
    sim.servo(2).set_saved("max_position_limit", 3000)
    sim.servo(2).position_ticks = 3300
    with bus_for(sim, arm_motors("feetech", ids=(1, 2)), calibrated("shoulder", "elbow")) as bus:
        with pytest.raises(MotorBusError, match=r"motor 'elbow' \(id 2\).*'elbow' reads 3300, beyond its position "
                                                r"limit registers \[0, 3000\].*torque stays off"):
            bus.enable_torque()
        assert [sim.register(i, "torque_enable") for i in (1, 2)] == [0, 0]
        time.sleep(0.1)
        assert sim.register(2, "present_position") == 3300


def test_edgeact_check_shows_registers_narrower_than_the_range_as_a_warning_row(tmp_path, start_sim):
    """`edgeact check` connects read-only: the words come back as a WARN row of their own (no "goes limp" note, which
    belongs to a mode switch), and nothing is written."""
    import json

    from edgeact.runtime.preflight import WARN, preflight
    from edgeact.runtime.robot_config import load_robot_config
    from edgeact.runtime.sim_robot import sim_robot_config_dict

    sim = start_sim("feetech", ids=range(1, 7))
    sim.servo(3).set_saved("max_position_limit", 2900)       # the sample arm's range is [1024, 3072]
    data = sim_robot_config_dict()
    data["robot"] = {**data["robot"], "bus": "feetech", "port": sim.port, "options": {"timeout_s": 0.2}}
    data["policy"] = {"type": "scripted", "chunk_size": 8, "latency_s": 0.0}
    data["estop"] = {"file": "STOP"}
    path = tmp_path / "robot.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    checks = preflight(load_robot_config(path), with_policy=False)
    rows = [c.detail for c in checks if c.name == "motors" and c.status == WARN]
    assert len(rows) == 1 and rows[0].startswith(
        "motor 'elbow_flex' (id 3): its own position limit registers allow raw [0, 2900], narrower than its "
        "calibrated range [1024, 3072]") and "goals are clamped to [1024, 2900]" in rows[0]
    assert "goes limp" not in rows[0]
    assert not [i for i in sim.received if i.code in (PacketCodec.WRITE, PacketCodec.SYNC_WRITE)]


def test_a_feetech_joint_a_tick_past_registers_equal_to_its_range_still_turns_torque_on(start_sim, bus_for):
    """Registers set to the calibrated range (as a calibration tool may write them), the joint resting on its end stop
    a tick past it: it started before (the motor walks it back in), as the safety layer's start tolerance allows."""
    sim = start_sim("feetech", ids=[1, 2])
    for limit, value in (("min_position_limit", 1000), ("max_position_limit", 3500)):
        sim.servo(2).set_saved(limit, value)
    sim.servo(2).position_ticks = 999
    with bus_for(sim, arm_motors("feetech", ids=(1, 2)), calibrated("shoulder", "elbow")) as bus:
        bus.enable_torque()
        assert [sim.register(i, "torque_enable") for i in (1, 2)] == [1, 1]
    sim.servo(2).position_ticks = 900           # far past both: refused, and the fix is not to widen them
    with bus_for(sim, arm_motors("feetech", ids=(1, 2)), calibrated("shoulder", "elbow")) as bus:
        with pytest.raises(MotorBusError) as refused:
            bus.enable_torque()
    said = str(refused.value)
    assert "'elbow' reads 900, beyond its position limit registers [1000, 3500] and its calibrated range" in said
    assert said.endswith("Turn the joint back within them by hand") and "widen" not in said


def test_dynamixel_limit_registers_that_allow_no_goal_are_said(start_sim, bus_for, caplog):
    """min >= max sets no limit on a Feetech; a Dynamixel refuses every goal then (silently, in a sync write)."""
    sim = start_sim("dynamixel", ids=[1, 2])
    sim.servo(2).set_saved("min_position_limit", 3000)
    sim.servo(2).set_saved("max_position_limit", 1000)
    bus = bus_for(sim, arm_motors("dynamixel", ids=(1, 2)), calibrated("shoulder", "elbow"))
    said = bus.connect_read_only()
    bus.disconnect(False)
    assert len(said) == 1 and "motor 'elbow' (id 2): its position limit registers are min 3000 >= max 1000, so it " \
                              "refuses every goal" in said[0]
    feetech = start_sim("feetech", ids=[1, 2])
    feetech.servo(2).set_saved("min_position_limit", 0)
    feetech.servo(2).set_saved("max_position_limit", 0)
    bus = bus_for(feetech, arm_motors("feetech", ids=(1, 2)), calibrated("shoulder", "elbow"))
    assert bus.connect_read_only() == []        # a Feetech's 0/0: no limit
    bus.disconnect(False)
