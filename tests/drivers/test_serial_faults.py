"""Faults on a serial servo bus, on both protocols: each gives a clear error, nothing hangs, torque ends up off."""
import pytest

from edgeact.drivers.motors.bus import (Motor, MotorBusError, MotorHardwareError, MotorProtocolError,
                                        MotorTimeoutError)
from edgeact.drivers.motors.serial_bus import MotorConfigError, MotorPortError, make_serial_bus

from .conftest import MODEL, arm_motors

pytestmark = pytest.mark.timeout(20)

# Bytes that are no packet of either protocol (no FF FF header) but look like line noise.
NOISE = bytes.fromhex("00 13 7E 55 AA FF 01 FE 80")


def assert_safe(sim, ids=(1, 2, 3)):
    """Torque off and no stale goal: goal == present, so the next torque-on cannot jump."""
    sim.wait_idle()
    for motor_id in ids:
        assert sim.register(motor_id, "torque_enable") == 0, f"id {motor_id} still holds torque"
        assert sim.register(motor_id, "goal_position") == sim.register(motor_id, "present_position")


def move_arm(bus):
    bus.enable_torque()
    bus.send({"shoulder": 2.0, "elbow": 4.0, "wrist": 3.5})


def test_port_disappearing_mid_run_names_the_port(serial_protocol, start_sim, bus_for):
    sim = start_sim(serial_protocol)
    bus = bus_for(sim, arm_motors(serial_protocol))
    with pytest.raises(MotorPortError, match=rf"port {sim.port} busy or gone; is it plugged in / used by another process\?"):
        with bus:
            move_arm(bus)
            sim.unplug()
            bus.read_state()
    assert not bus.is_connected
    with pytest.raises(MotorBusError, match="not connected; call connect\\(\\) or use a with block"):
        bus.read_state()


def test_garbage_before_replies_is_skipped(serial_protocol, start_sim, bus_for):
    sim = start_sim(serial_protocol)
    with bus_for(sim, arm_motors(serial_protocol), retries=0) as bus:
        sim.send_garbage(NOISE)                      # stale noise in the input buffer: flushed before asking
        sim.faults.prefix, sim.faults.prefix_count = NOISE + b"\xff\xff", 3
        assert bus.sync_read("torque_enable") == {"shoulder": 0, "elbow": 0, "wrist": 0}
        assert bus.read("present_position", "elbow") == 2048


def test_garbled_replies_give_a_protocol_error_after_bounded_retries(serial_protocol, start_sim, bus_for):
    sim = start_sim(serial_protocol)
    with bus_for(sim, arm_motors(serial_protocol), timeout_s=0.1, retries=2) as bus:
        before = len(sim.received)
        sim.faults.garble = 3
        with pytest.raises(MotorProtocolError, match=r"motor 'elbow' \(id 2\): garbled reply at 1000000 baud .*two "
                                                     r"motors may share one id"):
            bus.read("present_position", "elbow")
        assert len(sim.received) - before == 3       # one try and two retries, no more
        assert bus.read("present_position", "elbow") == 2048   # the bus is usable again


def test_one_bad_checksum_is_retried_and_many_are_an_error(serial_protocol, start_sim, bus_for):
    sim = start_sim(serial_protocol)
    with bus_for(sim, arm_motors(serial_protocol), timeout_s=0.1, retries=1) as bus:
        sim.faults.corrupt = 1
        assert bus.read_state().position_rad["wrist"] == pytest.approx(3.1416, abs=1e-3)
        sim.faults.corrupt = 2
        with pytest.raises(MotorProtocolError, match=r"garbled reply .*wrong header or checksum"):
            bus.read("present_position", "wrist")


def test_dropped_replies_time_out_with_the_motor_and_the_fix(serial_protocol, start_sim, bus_for):
    sim = start_sim(serial_protocol)
    with bus_for(sim, arm_motors(serial_protocol), timeout_s=0.05, retries=2) as bus:
        sim.faults.drop = 2
        assert bus.read("present_position", "shoulder") == 2048       # third attempt answers
        sim.faults.drop = 3
        with pytest.raises(MotorTimeoutError, match=r"^motor 'shoulder' \(id 1\) did not answer at 1000000 baud; "
                                                    r"check power and the ID"):
            bus.read("present_position", "shoulder")


def test_a_silent_motor_in_a_sync_read_is_named(serial_protocol, start_sim, bus_for):
    sim = start_sim(serial_protocol)
    with bus_for(sim, arm_motors(serial_protocol), timeout_s=0.05, retries=1) as bus:
        sim.servo(3).powered = False
        with pytest.raises(MotorTimeoutError, match=r"^motor 'wrist' \(id 3\) did not answer"):
            bus.read_state()
        with pytest.raises(MotorBusError, match=r"could not confirm torque off \(motor 'wrist' \(id 3\) did not "
                                                r"answer.*the motors may still hold torque: cut their power"):
            bus.disconnect()
    assert_safe(sim, ids=(1, 2))     # the motors that answer still settle


def test_a_motor_that_comes_back_is_usable_again(serial_protocol, start_sim, bus_for):
    sim = start_sim(serial_protocol)
    with bus_for(sim, arm_motors(serial_protocol), timeout_s=0.05, retries=0) as bus:
        move_arm(bus)
        sim.servo(3).powered = False
        with pytest.raises(MotorTimeoutError):
            bus.read_state()
        sim.servo(3).powered = True
        assert set(bus.read_state().position_rad) == {"shoulder", "elbow", "wrist"}
    assert_safe(sim)


def test_missing_motor_or_wrong_baud_fails_connect_with_names(serial_protocol, start_sim, bus_for):
    sim = start_sim(serial_protocol, ids=[1, 2])
    bus = bus_for(sim, arm_motors(serial_protocol), timeout_s=0.05, retries=0)
    with pytest.raises(MotorTimeoutError, match=r"motor 'wrist' \(id 3\) did not answer at 1000000 baud; check power "
                                                r"and the ID \(`edgeact motors scan --port "):
        bus.connect()
    assert not bus.is_connected
    other_baud = 500_000 if serial_protocol == "feetech" else 57_600
    bus = bus_for(sim, arm_motors(serial_protocol, ids=(1, 2)), baud_rate=other_baud, timeout_s=0.05, retries=0)
    with pytest.raises(MotorTimeoutError,
                       match=rf"motors 'shoulder' \(id 1\), 'elbow' \(id 2\) did not answer at {other_baud} baud"):
        bus.connect()


def test_motor_error_bits_raise_and_the_exit_still_turns_torque_off(serial_protocol, start_sim, bus_for):
    sim = start_sim(serial_protocol)
    overload = 0x20
    bus = bus_for(sim, arm_motors(serial_protocol))
    with pytest.raises(MotorHardwareError, match=r"motor 'elbow' \(id 2\) reports overload: remove the load"):
        with bus:
            move_arm(bus)
            sim.inject_error(2, overload)
            bus.read_state()
    assert_safe(sim)


def test_duplicate_ids_are_refused_everywhere(serial_protocol, start_sim, bus_for):
    sim = start_sim(serial_protocol, ids=[1, 2, 2])
    bus = bus_for(sim, arm_motors(serial_protocol, ids=(1, 2)), timeout_s=0.05, retries=1)
    with pytest.raises(MotorProtocolError, match=r"motor 'elbow' \(id 2\): garbled reply .*two motors may share one id "
                                                 r"\(connect them one at a time"):
        bus.connect()
    with bus_for(sim, timeout_s=0.05) as bare:
        with pytest.raises(MotorProtocolError, match=r"id 2 answer garbled at 1000000 baud: two motors probably share "
                                                     r"the id.*clean answers from: \[1\]"):
            bare.scan(range(0, 4))


def test_ctrl_c_turns_torque_off_and_leaves_no_stale_goal(serial_protocol, start_sim, bus_for):
    sim = start_sim(serial_protocol)
    bus = bus_for(sim, arm_motors(serial_protocol))
    with pytest.raises(KeyboardInterrupt):
        with bus:
            move_arm(bus)
            raise KeyboardInterrupt
    assert_safe(sim)


def test_torque_off_reaches_the_motors_even_when_their_replies_vanish(serial_protocol, start_sim, bus_for):
    sim = start_sim(serial_protocol)
    bus = bus_for(sim, arm_motors(serial_protocol), timeout_s=0.05, retries=0)
    bus.connect()
    move_arm(bus)
    sim.faults.drop = 1000
    with pytest.raises(MotorBusError, match=r"disconnected from .*could not confirm torque off \(motor 'shoulder' "
                                            r"\(id 1\) did not answer.*the motors may still hold torque: cut their power"):
        bus.disconnect()
    sim.wait_idle()
    assert all(sim.register(i, "torque_enable") == 0 for i in (1, 2, 3))   # the broadcast itself went out


def test_port_busy_missing_and_bad_settings_name_the_fix(serial_protocol, start_sim, bus_for):
    sim = start_sim(serial_protocol, ids=[1])
    with bus_for(sim, arm_motors(serial_protocol, ids=(1,))):
        second = bus_for(sim, arm_motors(serial_protocol, ids=(1,)))
        with pytest.raises(MotorPortError, match=rf"port {sim.port} busy; is another process using it"):
            second.connect()
    with pytest.raises(MotorPortError, match="port /dev/ttyNOPE0 not found; is the adapter plugged in"):
        make_serial_bus(serial_protocol, "/dev/ttyNOPE0").connect()
    with pytest.raises(MotorConfigError, match=rf"baud rate 12345 not supported by {serial_protocol} motors; use one of "):
        make_serial_bus(serial_protocol, sim.port, baud_rate=12345)
    wrong_model = "sts3250" if serial_protocol == "feetech" else "xm430-w350"
    with pytest.raises(MotorConfigError, match=rf"motor 'arm' \(id 1\) is model \d+ \({MODEL[serial_protocol]}\), the "
                                               rf"config says {wrong_model}"):
        bus_for(sim, {"arm": Motor(1, wrong_model)}).connect()
