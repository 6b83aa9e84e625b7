"""Damiao driver under faults: error states, a motor that stops answering, garbage frames, Ctrl-C."""
import time

import can
import pytest

from edgeact.drivers.motors import damiao_table as dt
from edgeact.drivers.motors.bus import MotorBusError, MotorHardwareError, MotorTimeoutError
from edgeact.drivers.motors.damiao import DamiaoBus
from tests.drivers.damiao_helpers import arm_motors, cfg, channel, sim  # noqa: F401 (fixtures)

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("code, words", [
    (0x8, "overvoltage"), (0x9, "undervoltage"), (0xA, "overcurrent"), (0xB, "MOS overtemperature"),
    (0xC, "coil overtemperature"), (0xD, "communication lost"), (0xE, "overload"),
])
def test_error_state_feedback_raises_a_clear_hardware_error(sim, channel, code, words):
    with DamiaoBus(arm_motors(), config=cfg(channel)) as bus:
        bus.enable_torque()
        with sim.lock:
            sim.motor(2).inject_error(code)
        with pytest.raises(MotorHardwareError, match=rf"motor 'elbow' \(CAN id 0x02\) reports {words}: .*power-cycle "
                                                     r"the motor to clear the fault \(from Python: "
                                                     r"clear_error\(\['elbow'\]\) and enable_torque\(\['elbow'\]\)\)"):
            bus.read_state()
        with pytest.raises(MotorHardwareError, match=words):
            bus.send({"shoulder": 0.0, "elbow": 0.0})
        if code == dt.STATUS_COMMUNICATION_LOST:    # the last host's silence: a new enable clears it
            bus.enable_torque(["elbow"])
            assert sim.motor(2).enabled and sim.motor(2).error is None
        else:
            with pytest.raises(MotorHardwareError, match=words):
                bus.enable_torque(["elbow"])
        bus.clear_error(["elbow"])
        bus.enable_torque(["elbow"])
        assert bus.send({"elbow": 0.1})["elbow"] == pytest.approx(0.1, abs=1e-3)
        assert sim.motor(2).enabled and sim.motor(2).error is None


def test_motor_own_timeout_reports_communication_lost(sim, channel):
    with DamiaoBus(arm_motors(), config=cfg(channel)) as bus:
        bus.write("TIMEOUT", "shoulder", 1000)      # 1000 x 50 µs = 50 ms without commands
        bus.enable_torque(["shoulder"])
        deadline = time.monotonic() + 10.0
        while sim.motor(1).error is None and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(MotorHardwareError, match="communication lost: no command reached it for longer than its TIMEOUT"):
            bus.read_state()


def test_motor_that_stops_answering_times_out_and_the_others_end_disabled(sim, channel):
    timeout_s, retries = 0.05, 2
    with pytest.raises(MotorTimeoutError) as err:
        with DamiaoBus(arm_motors(), config=cfg(channel, timeout_s=timeout_s, retries=retries)) as bus:
            bus.enable_torque()
            bus.send({"shoulder": 0.2, "elbow": 0.2})
            sim.motor(1).stop_answering()
            t0 = time.monotonic()
            try:
                bus.read_state()
            finally:
                elapsed = time.monotonic() - t0
    message = str(err.value)
    assert "motor 'shoulder' (CAN id 0x01) stopped answering" in message
    assert "check the CAN cable/termination, the motor's power, and that its ESC_ID (CAN id) is the one configured" in message and "elbow" not in message
    assert (retries + 1) * timeout_s <= elapsed < 5.0       # bounded: three tries, not forever
    assert sim.motor(1).frames_handled > 0
    assert not sim.motor(2).enabled                         # leaving the block disabled the motor still there
    assert sim.motor(1).enabled                             # (the silent one never heard it)


def test_disconnect_says_when_a_motor_may_still_hold_torque(sim, channel):
    bus = DamiaoBus(arm_motors(), config=cfg(channel, timeout_s=0.05, retries=0))
    bus.connect()
    bus.enable_torque()
    sim.motor(1).stop_answering()
    with pytest.raises(MotorBusError, match=r"disconnected from CAN channel .*motor 'shoulder' \(CAN id 0x01\) stopped "
                                            r"answering.* the motors may still hold torque: cut their power"):
        bus.disconnect()
    assert not bus.is_connected and not sim.motor(2).enabled
    assert sim.motor(1).enabled             # the silent motor never heard the disable: the caller had to learn it


def test_garbage_frames_are_ignored_and_counted(sim, channel):
    with DamiaoBus(arm_motors(), config=cfg(channel)) as bus:
        bus.enable_torque()
        noise = can.Bus(interface="virtual", channel=channel)
        try:
            junk = [
                can.Message(arbitration_id=0x11, data=b"\x11\x80", is_extended_id=False),       # short feedback
                can.Message(arbitration_id=0x11, data=bytes(8), is_extended_id=True),           # extended id
                can.Message(arbitration_id=0x11, is_remote_frame=True, dlc=8, is_extended_id=False),
                can.Message(arbitration_id=0x123, data=bytes(8), is_extended_id=False),         # nobody's id
                can.Message(arbitration_id=0x7FF, data=b"\x09\x00\x33\x07\x00\x00\x00\x00", is_extended_id=False),
                can.Message(arbitration_id=0x01, data=b"\xff\xfc", is_extended_id=False),       # short enable
                can.Message(arbitration_id=0x12, data=b"\x13" + bytes(7), is_extended_id=False),  # wrong id nibble
            ]
            for msg in junk:
                noise.send(msg)
            state = bus.read_state()
        finally:
            noise.shutdown()
        assert set(state.position_rad) == {"shoulder", "elbow"}
        assert bus.ignored_frames >= len(junk)
        assert sim.garbage_frames >= 3          # short, extended and remote frames
        assert bus.send({"shoulder": 0.1})["shoulder"] == pytest.approx(0.1, abs=1e-3)


def test_late_replies_do_not_answer_the_next_exchange(sim, channel):
    with DamiaoBus(arm_motors(), config=cfg(channel)) as bus:
        bus.enable_torque()
        noise = can.Bus(interface="virtual", channel=channel)
        try:   # a stale parameter reply for shoulder's TIMEOUT lands before the driver asks
            noise.send(can.Message(arbitration_id=0x11, data=b"\x01\x00\x33\x09\x39\x05\x00\x00", is_extended_id=False))
            time.sleep(0.05)
            assert bus.read("TIMEOUT", "shoulder") == 0
            assert bus.ignored_frames == 1          # dropped, not mistaken for shoulder's state frame
            assert bus.last_feedback["shoulder"].position_rad == pytest.approx(0.0, abs=1e-3)
        finally:
            noise.shutdown()


def test_non_finite_command_is_refused(sim, channel):
    with DamiaoBus(arm_motors(), config=cfg(channel)) as bus:
        bus.enable_torque()
        with pytest.raises(MotorBusError, match=r"non-finite \['position_rad'\]"):
            bus.send({"shoulder": float("nan")})
        assert sim.motor(1).command.kp == 0.0      # nothing went out


def test_keyboard_interrupt_in_the_block_turns_torque_off(sim, channel):
    with pytest.raises(KeyboardInterrupt):
        with DamiaoBus(arm_motors(), config=cfg(channel)) as bus:
            bus.enable_torque()
            bus.send({"shoulder": 0.3, "elbow": -0.3})
            assert sim.motor(1).enabled and sim.motor(2).enabled
            raise KeyboardInterrupt
    assert not sim.motor(1).enabled and not sim.motor(2).enabled
    assert not bus.is_connected


def test_commands_on_a_closed_bus_say_connect(channel):
    bus = DamiaoBus(arm_motors(), config=cfg(channel))
    with pytest.raises(MotorBusError, match=r"call connect\(\) first"):
        bus.read_state()


def test_a_motor_left_in_communication_lost_reads_for_what_never_turns_torque_on(sim, channel):
    """Torque-free after its own TIMEOUT ran out: a shadow run and calibration read it (they never turn torque on);
    any other fault still refuses."""
    from edgeact.drivers.motors.calibrate import RawReader
    from edgeact.drivers.motors.shadow import ShadowBus

    with DamiaoBus(arm_motors(), config=cfg(channel)) as bus:
        with sim.lock:
            sim.motor(2).inject_error(dt.STATUS_COMMUNICATION_LOST)
        with pytest.raises(MotorHardwareError, match="communication lost"):
            bus.read_state()
        assert set(bus.read_state_torque_free().position_rad) == {"shoulder", "elbow"}
        assert set(ShadowBus(bus).read_state().position_rad) == {"shoulder", "elbow"}
        assert set(RawReader(bus, ["shoulder", "elbow"]).read()) == {"shoulder", "elbow"}
        with sim.lock:
            sim.motor(2).inject_error(0xA)
        with pytest.raises(MotorHardwareError, match="overcurrent"):
            bus.read_state_torque_free()


def test_a_timeout_left_in_a_motor_is_said_at_connect(sim, channel, caplog):
    """An earlier run's bus_watchdog_s stays in the motor's RAM: a config without one is told the motor will still
    turn torque off by itself."""
    with DamiaoBus(arm_motors(), config=cfg(channel)) as bus:
        bus.write("TIMEOUT", "elbow", 2000)
    with caplog.at_level("WARNING", logger="edgeact.drivers.motors.damiao"):
        with DamiaoBus(arm_motors(), config=cfg(channel)):
            pass
    assert "motor 'elbow' (CAN id 0x02) has its own command timeout set (TIMEOUT 2000 = 0.100 s" in caplog.text
    assert "shoulder" not in caplog.text
