"""Feetech STS/SMS protocol 0: packets byte for byte, sign-magnitude registers, and the real driver against the simulator."""
import math
import time

import pytest

from edgeact.drivers.motors.bus import Motor, MotorBusError, MotorCalibration
from edgeact.drivers.motors.feetech import FeetechBusConfig, FeetechCodec, FeetechMotorsBus, checksum
from edgeact.drivers.motors.feetech_table import MODELS, STS_SMS_REGISTERS
from edgeact.drivers.motors.serial_bus import MotorConfigError

from .conftest import arm_motors

pytestmark = pytest.mark.timeout(20)
CODEC = FeetechCodec()
TICK_RAD = 2 * math.pi / 4096


# -- packets --------------------------------------------------------------------------------
def test_instruction_packets_match_hand_computed_bytes():
    assert CODEC.ping(1) == bytes.fromhex("FF FF 01 02 01 FB")
    # read present position (56 = 0x38, 2 bytes) of id 1: CHK = ~(01+04+02+38+02) = ~0x41
    assert CODEC.read(1, 56, 2) == bytes.fromhex("FF FF 01 04 02 38 02 BE")
    # write torque enable (40 = 0x28) := 1 on id 1
    assert CODEC.write(1, 40, b"\x01") == bytes.fromhex("FF FF 01 04 03 28 01 CE")
    # sync write goal position (42) of ids 1 and 2, 2 bytes each: one broadcast packet, no reply
    packet = CODEC.sync_write(42, 2, {1: b"\x00\x08", 2: b"\xff\x07"})
    assert packet[:5] == bytes.fromhex("FF FF FE 0A 83") and packet[5:-1] == bytes.fromhex("2A 02 01 00 08 02 FF 07")
    assert packet[-1] == checksum(packet[2:-1]) == (~sum(packet[2:-1])) & 0xFF
    assert CODEC.sync_read(56, 4, [1, 2, 3]) == bytes.fromhex("FF FF FE 07 82 38 04 01 02 03") + bytes(
        [~(0xFE + 0x07 + 0x82 + 0x38 + 0x04 + 1 + 2 + 3) & 0xFF])


def test_status_parser_skips_noise_false_headers_and_bad_checksums():
    good = bytes.fromhex("FF FF 03 04 00 00 08") + bytes([~(3 + 4 + 0 + 0 + 8) & 0xFF])
    bad_checksum = good[:-1] + bytes([good[-1] ^ 1])
    buf = bytearray(b"\x00\x13" + b"\xff\xff\x07\xc8" + bad_checksum + good)  # noise, a header with an absurd LEN
    status, dropped = CODEC.take_status(buf, max_params=2)
    assert (status.motor_id, status.error, status.params) == (3, 0, b"\x00\x08")
    assert dropped == 2 + 4 + len(bad_checksum) and buf == bytearray()
    half = bytearray(good[:5])
    assert CODEC.take_status(half, 2) == (None, 0) and half == bytearray(good[:5])  # waits for the rest


def test_sign_magnitude_registers():
    homing, speed = STS_SMS_REGISTERS["homing_offset"], STS_SMS_REGISTERS["present_velocity"]
    assert homing.encode(-5) == bytes([0x05, 0x08]) and homing.decode(bytes([0x05, 0x08])) == -5   # bit 11
    assert speed.encode(-100) == bytes([0x64, 0x80]) and speed.decode(bytes([0x64, 0x80])) == -100  # bit 15
    assert speed.decode(bytes([0x64, 0x00])) == 100
    current = STS_SMS_REGISTERS["present_current"]          # Feetech's ReadCurrent: bit 15 is the sign
    assert current.decode(bytes([0x10, 0x80])) == -16 and current.decode(bytes([0x10, 0x00])) == 16
    with pytest.raises(MotorBusError, match="does not fit register 'homing_offset'"):
        homing.encode(2048)


def test_config_names_the_supported_baud_rates_and_models():
    with pytest.raises(MotorConfigError, match="baud rate 57601 not supported by feetech motors; use one of 1000000, 500000"):
        FeetechBusConfig(port="/dev/ttyACM0", baud_rate=57601)
    with pytest.raises(MotorConfigError, match="model 'xl430-w250' is not a feetech model; known: sts3215"):
        FeetechMotorsBus(FeetechBusConfig(port="/dev/ttyACM0"), {"a": Motor(1, "xl430-w250")})
    with pytest.raises(MotorConfigError, match="motors 'a' and 'b' both have id 1"):
        FeetechMotorsBus(FeetechBusConfig(port="/dev/ttyACM0"), {"a": Motor(1, "sts3215"), "b": Motor(1, "sts3215")})


@pytest.mark.parametrize("protocol, model", [("feetech", "sts3215"), ("dynamixel", "xl430-w250")])
@pytest.mark.parametrize("calibration, expected", [
    (MotorCalibration(homing_offset=0, range_min=-1000, range_max=1000), r"calibration range \[-1000, 1000\] must lie "
                                                                         r"within 0\.\.4095"),
    (MotorCalibration(homing_offset=2048, range_min=1000, range_max=4096), r"calibration range \[1000, 4096\]"),
    (MotorCalibration(homing_offset=-5, range_min=0, range_max=4095), "calibration homing_offset -5"),
    (MotorCalibration(homing_offset=2048, range_min=1024, range_max=3072, drive_mode=2), "calibration drive_mode 2 invalid"),
])
def test_a_calibration_the_single_turn_encoder_cannot_read_is_refused_by_the_bus(protocol, model, calibration,
                                                                                 expected):
    # Raw readings are never unwrapped: a range across the encoder's 4095 -> 0 seam reads a joint a turn away.
    from edgeact.drivers.motors.serial_bus import make_serial_bus, serial_bus_class
    from edgeact.drivers.motors.serial_motion import check_calibration

    with pytest.raises(MotorConfigError, match=rf"motor 'elbow' \({model}, raw positions 0\.\.4095\): {expected}"):
        make_serial_bus(protocol, "/dev/ttyACM0", {"elbow": Motor(2, model)}, {"elbow": calibration})
    with pytest.raises(MotorConfigError, match=expected):       # the one rule, for whoever writes a calibration
        check_calibration(serial_bus_class(protocol).MODELS[model], calibration, "elbow")
    whole_turn = MotorCalibration(homing_offset=4095, range_min=0, range_max=4095, drive_mode=1)
    make_serial_bus(protocol, "/dev/ttyACM0", {"elbow": Motor(2, model)}, {"elbow": whole_turn})


# -- the driver against the simulator ----------------------------------------------------------------
def test_connect_scan_and_registers_by_name(start_sim, bus_for):
    sim = start_sim("feetech", ids=[1, 2, 3])
    with bus_for(sim, arm_motors("feetech")) as bus:
        assert bus.scan(range(0, 6)) == {1: 777, 2: 777, 3: 777}
        assert bus.ping(2) == MODELS["sts3215"].model_number and bus.ping(9) is None
        bus.write("acceleration", "elbow", 77)
        assert bus.read("acceleration", "elbow") == 77 and sim.register(2, "acceleration") == 77
        bus.sync_write("acceleration", {"shoulder": 10, "wrist": 30})
        assert bus.sync_read("acceleration") == {"shoulder": 10, "elbow": 77, "wrist": 30}
        sim.set_register(3, "present_temperature", 41)
        assert bus.read("present_temperature", "wrist") == 41
        with pytest.raises(MotorBusError, match="register 'present_position' of sts3215 is read-only"):
            bus.write("present_position", "wrist", 5)


def test_read_state_and_send_apply_calibration_and_clamp(start_sim, bus_for):
    sim = start_sim("feetech", ids=[1, 2])
    sim.servo(2).position_ticks = 2148                   # turned by hand
    calibration = {"shoulder": MotorCalibration(homing_offset=2048, range_min=1024, range_max=3072),
                   "elbow": MotorCalibration(homing_offset=2048, range_min=1024, range_max=3072, drive_mode=1)}
    with bus_for(sim, arm_motors("feetech", ids=(1, 2)), calibration) as bus:
        state = bus.read_state()
        assert state.position_rad == {"shoulder": 0.0, "elbow": pytest.approx(-100 * TICK_RAD)}   # inverted
        assert state.velocity_rad_s == {"shoulder": 0.0, "elbow": 0.0}
        sent = bus.send({"shoulder": 0.5, "elbow": 3.0})        # elbow asks past its calibrated range
        assert sent["shoulder"] == pytest.approx(0.5, abs=TICK_RAD)
        assert sent["elbow"] == pytest.approx(-(1024 - 2048) * TICK_RAD)   # inverted drive: range_min is +pi/2
        sim.wait_idle()
        assert sim.register(1, "goal_position") == 2048 + round(0.5 / TICK_RAD)
        assert sim.register(2, "goal_position") == 1024
        with pytest.raises(MotorBusError, match="refusing to send a non-finite position"):
            bus.send({"shoulder": float("nan")})


def test_enable_torque_holds_in_place_and_the_joint_follows_its_goal(start_sim, bus_for):
    sim = start_sim("feetech", ids=[1], max_speed_ticks_s=20_000)
    sim.servo(1).set("goal_position", 100)              # a stale goal from an earlier run
    with bus_for(sim, arm_motors("feetech", ids=(1,))) as bus:
        bus.enable_torque()
        assert sim.register(1, "goal_position") == 2048 and sim.register(1, "torque_enable") == 1   # no jump
        bus.send({"shoulder": 2048 * TICK_RAD + 1.0})
        deadline = time.monotonic() + 5.0
        while abs(bus.read_state().position_rad["shoulder"] - (2048 * TICK_RAD + 1.0)) > 2 * TICK_RAD:
            assert time.monotonic() < deadline, "the simulated joint never reached its goal"
            time.sleep(0.01)
    sim.wait_idle()
    assert sim.register(1, "torque_enable") == 0
    assert sim.register(1, "goal_position") == sim.register(1, "present_position")


def test_torque_stays_off_even_where_a_goal_write_would_turn_it_on(start_sim, bus_for, monkeypatch):
    """Some servo firmwares take a goal write as "torque on": disable_torque writes the holding goal before the
    torque off, and the disconnect's safe stop (torque off first, unanswered) turns it off again after its goal."""
    from edgeact.drivers.sim.servo_motor import SimServo

    goal = STS_SMS_REGISTERS["goal_position"].address
    torque_address = STS_SMS_REGISTERS["torque_enable"].address
    plain = SimServo.write_bytes

    def goal_turns_torque_on(self, address, data):
        plain(self, address, data)
        if address == goal:
            plain(self, torque_address, b"\x01")

    monkeypatch.setattr(SimServo, "write_bytes", goal_turns_torque_on)
    sim = start_sim("feetech", ids=[1, 2])
    with bus_for(sim, arm_motors("feetech", ids=(1, 2))) as bus:
        bus.enable_torque()
        bus.disable_torque()
        sim.wait_idle()                         # the last write (unanswered) reached the servos
        assert [sim.register(i, "torque_enable") for i in (1, 2)] == [0, 0]
        bus.enable_torque()
    sim.wait_idle()
    assert [sim.register(i, "torque_enable") for i in (1, 2)] == [0, 0]      # the disconnect's safe stop


def test_torque_is_not_turned_on_where_the_holding_goal_did_not_take(start_sim, bus_for, monkeypatch):
    """A goal the motor refuses goes unheard in a sync write (a Dynamixel that counted turns with torque off refuses
    a reading beyond one turn): torque on would jump the joint to its older goal, so it stays off, and says why."""
    from edgeact.drivers.sim.servo_motor import SimServo

    goal = STS_SMS_REGISTERS["goal_position"].address
    plain = SimServo.write_bytes

    def motor_2_refuses_goals(self, address, data):
        if not (address == goal and self.id == 2):
            plain(self, address, data)

    sim = start_sim("feetech", ids=[1, 2])
    sim.servo(2).set("goal_position", 100)              # an older run's goal, far from where the joint rests
    monkeypatch.setattr(SimServo, "write_bytes", motor_2_refuses_goals)
    with bus_for(sim, arm_motors("feetech", ids=(1, 2))) as bus:
        with pytest.raises(MotorBusError, match=r"motor 'elbow' \(id 2\) did not take the goal of holding where "
                                                r"it is \('elbow' reads 2048, goal stays 100\); torque stays off"):
            bus.enable_torque()
        assert [sim.register(i, "torque_enable") for i in (1, 2)] == [0, 0]
        assert round(sim.servo(2).position_ticks) == 2048


def test_eeprom_write_opens_and_closes_the_lock_so_it_survives_a_power_cycle(start_sim, bus_for):
    sim = start_sim("feetech", ids=[1])
    with bus_for(sim) as bus:
        bus.write_register(1, "max_torque_limit", 600, "sts3215")
        bus.write_register(1, "id", 4, "sts3215")
        bus.write_register(4, "torque_enable", 1, "sts3215")
    lock = STS_SMS_REGISTERS["lock"].address
    lock_writes = [(i.motor_id, i.params[1]) for i in sim.received if i.code == 0x03 and i.params[0] == lock]
    assert lock_writes == [(1, 0), (1, 1), (1, 0), (4, 1)]    # the lock closes under the new id
    with sim.lock:
        servo = sim.servos[0]
        servo.power_cycle()
        assert (servo.id, servo.get("max_torque_limit"), servo.get("lock"), servo.get("torque_enable")) == (4, 600, 1, 0)
    # Without the lock opened, an EEPROM value is lost at power-off: the simulator models that too.
    with sim.lock:
        servo.write_bytes(STS_SMS_REGISTERS["max_torque_limit"].address, (100).to_bytes(2, "little"))
        servo.power_cycle()
        assert servo.get("max_torque_limit") == 600


def test_eeprom_write_with_torque_on_is_refused_with_the_fix(start_sim, bus_for):
    sim = start_sim("feetech", ids=[1])
    with bus_for(sim, arm_motors("feetech", ids=(1,))) as bus:
        bus.enable_torque()
        with pytest.raises(MotorBusError, match="has torque on; EEPROM register 'max_torque_limit' can only be "
                                                r"written with torque off \(disable_torque first\)"):
            bus.write("max_torque_limit", "shoulder", 500)
        assert sim.register(1, "lock") == 1                   # the lock is closed again after the refusal


def test_reg_write_takes_effect_at_action(start_sim, bus_for):
    sim = start_sim("feetech", ids=[1, 2])
    with bus_for(sim, arm_motors("feetech", ids=(1, 2))) as bus:
        bus.reg_write("acceleration", "shoulder", 20)
        bus.reg_write("acceleration", "elbow", 30)
        assert bus.sync_read("acceleration") == {"shoulder": 0, "elbow": 0}
        bus.action()
        assert bus.sync_read("acceleration") == {"shoulder": 20, "elbow": 30}


def test_wheel_motor_is_put_in_velocity_mode_and_integrates(start_sim, bus_for):
    sim = start_sim("feetech", ids=[7])
    with bus_for(sim, {"wheel": Motor(7, "sts3215", mode="velocity")}) as bus:
        assert sim.register(7, "operating_mode") == 1
        bus.enable_torque()
        sent = bus.send_velocity({"wheel": -100.0})           # far past the motor's top speed
        assert sent["wheel"] == pytest.approx(-3400 * TICK_RAD)
        assert bus.read_state().velocity_rad_s["wheel"] == pytest.approx(sent["wheel"])
        with pytest.raises(MotorBusError, match="motor 'wheel' is a wheel \\(velocity mode\\); drive it with send_velocity"):
            bus.send({"wheel": 0.0})
    sim.wait_idle()
    assert sim.register(7, "goal_velocity") == 0 and sim.register(7, "torque_enable") == 0
