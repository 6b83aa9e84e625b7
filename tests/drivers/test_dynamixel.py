"""Dynamixel Protocol 2.0: packets checked byte for byte against ROBOTIS' dynamixel_sdk, then the driver on the simulator."""
import os
import time

import dynamixel_sdk
import pytest

from edgeact.drivers.motors.bus import Motor, MotorBusError, MotorHardwareError, MotorTimeoutError
from edgeact.drivers.motors.dynamixel import FAST_SYNC_READ, DynamixelCodec, crc16, stuff, unstuff
from edgeact.drivers.motors.dynamixel_table import MODELS, X_SERIES_REGISTERS
from edgeact.drivers.motors.serial_types import MotorConfigError, make_serial_bus

from .conftest import arm_motors

pytestmark = pytest.mark.timeout(20)
CODEC = DynamixelCodec()
SDK = dynamixel_sdk.PacketHandler(2.0)


class CapturePort:
    """Stands in for dynamixel_sdk's PortHandler: keeps what the SDK transmits, replays `replies` when it reads."""

    def __init__(self, replies: bytes = b""):
        self.written: list[bytes] = []
        self.replies = bytearray(replies)
        self.is_using = False

    def clearPort(self):
        pass

    def writePort(self, packet):
        self.written.append(bytes(packet))
        return len(packet)

    def readPort(self, length):
        chunk, self.replies[:] = bytes(self.replies[:length]), self.replies[length:]
        return chunk

    def setPacketTimeout(self, length):
        pass

    def setPacketTimeoutMillis(self, ms):
        pass

    def isPacketTimeout(self):
        return True

    def getBaudRate(self):
        return 1_000_000


def sdk_bytes(action) -> bytes:
    port = CapturePort()
    action(port)
    assert len(port.written) == 1
    return port.written[0]


def test_ping_golden_vector():
    assert CODEC.ping(1) == bytes.fromhex("FF FF FD 00 01 03 00 01 19 4E")


def test_crc_matches_the_sdk():
    for size in (0, 1, 7, 64, 300):
        data = os.urandom(size)
        assert crc16(data) == SDK.updateCRC(0, list(data), size)


def test_stuffing_round_trip():
    raw = bytes.fromhex("FF FF FD 01 FF FF FD FD 00 FF FF")
    assert stuff(raw) == bytes.fromhex("FF FF FD FD 01 FF FF FD FD FD 00 FF FF")
    assert unstuff(stuff(raw)) == raw


def test_instruction_packets_match_the_sdk_byte_for_byte():
    goal = X_SERIES_REGISTERS["goal_position"]
    assert CODEC.ping(7) == sdk_bytes(lambda p: SDK.ping(p, 7))
    assert CODEC.read(3, 132, 4) == sdk_bytes(lambda p: SDK.readTxRx(p, 3, 132, 4))
    assert CODEC.write(2, 116, goal.encode(2048)) == sdk_bytes(lambda p: SDK.write4ByteTxRx(p, 2, 116, 2048))


def test_stuffed_packet_matches_the_sdk_stuffing_and_crc():
    # A value whose bytes are FF FF FD must be stuffed. The SDK's txPacket drops addStuffing's result
    # when the packet grows (it then transmits unstuffed), so compare with addStuffing + updateCRC directly.
    data = X_SERIES_REGISTERS["goal_position"].encode(0x00FDFFFF)
    unstuffed = [0xFF, 0xFF, 0xFD, 0x00, 2, 9, 0, 0x03, 116, 0, *data, 0, 0]
    reference = SDK.addStuffing(unstuffed)
    crc = SDK.updateCRC(0, reference, len(reference) - 2)
    reference[-2:] = [crc & 0xFF, crc >> 8]
    assert CODEC.write(2, 116, data) == bytes(reference)
    assert b"\xff\xff\xfd\xfd" in bytes(reference)


def test_group_packets_match_the_sdk_byte_for_byte():
    def sync_write(port):
        group = dynamixel_sdk.GroupSyncWrite(port, SDK, 116, 4)
        for motor_id, value in ((1, 1000), (2, -5), (5, 4095)):
            group.addParam(motor_id, list(X_SERIES_REGISTERS["goal_position"].encode(value)))
        group.txPacket()

    def sync_read(port, fast=False):
        group = dynamixel_sdk.GroupSyncRead(port, SDK, 128, 8)
        for motor_id in (1, 2, 5):
            group.addParam(motor_id)
        group.fastSyncReadTxPacket() if fast else group.txPacket()

    goals = {i: X_SERIES_REGISTERS["goal_position"].encode(v) for i, v in ((1, 1000), (2, -5), (5, 4095))}
    assert CODEC.sync_write(116, 4, goals) == sdk_bytes(sync_write)
    assert CODEC.sync_read(128, 8, [1, 2, 5]) == sdk_bytes(sync_read)
    assert CODEC.sync_read(128, 8, [1, 2, 5], FAST_SYNC_READ) == sdk_bytes(lambda p: sync_read(p, fast=True))


def test_simulator_status_packets_parse_in_the_sdk_and_in_the_driver(start_sim, bus_for):
    """The simulator's replies (stuffed) satisfy ROBOTIS' own parser, and ours reads the same value back."""
    sim = start_sim("dynamixel", ids=[1])
    # A value whose bytes are FF FF FD lies far outside the position limits, which a motor in position mode refuses
    # (Data Limit Error); in velocity mode Goal Position is not checked against them.
    sim.set_register(1, "operating_mode", 1)
    goal = X_SERIES_REGISTERS["goal_position"]
    with bus_for(sim) as bus:
        bus.write_register(1, "goal_position", 0x00FDFFFF, "xl430-w250")
        assert bus.read_register(1, "goal_position", "xl430-w250") == 0x00FDFFFF
        reply = sim.wire.status(1, 0, goal.encode(0x00FDFFFF))
    assert b"\xff\xff\xfd\xfd" in reply
    data, result, error = SDK.readRx(CapturePort(reply), 1, 4)
    assert result == dynamixel_sdk.COMM_SUCCESS and error == 0 and bytes(data) == goal.encode(0x00FDFFFF)


@pytest.mark.parametrize("fast", [False, True])
def test_read_state_in_one_transaction(start_sim, bus_for, fast):
    sim = start_sim("dynamixel", ids=[1, 2, 3])
    sim.servo(2).position_ticks = 1000                   # turned by hand
    with bus_for(sim, arm_motors("dynamixel"), fast_sync_read=fast) as bus:
        before = len(sim.received)
        state = bus.read_state()
        assert [hex(i.code) for i in list(sim.received)[before:]] == [hex(FAST_SYNC_READ if fast else 0x82)]
        assert state.position_rad["elbow"] == pytest.approx(1000 * 2 * 3.141592653589793 / 4096)
        assert set(state.velocity_rad_s) == {"shoulder", "elbow", "wrist"}


def test_fast_sync_read_falls_back_when_the_firmware_lacks_it(start_sim, bus_for):
    sim = start_sim("dynamixel", ids=[1, 2], fast_sync_read=False)
    with bus_for(sim, arm_motors("dynamixel", ids=(1, 2)), fast_sync_read=True, timeout_s=0.05, retries=0) as bus:
        assert bus.sync_read("present_position") == {"shoulder": 2048, "elbow": 2048}


def test_motor_refusal_is_translated(start_sim, bus_for):
    sim = start_sim("dynamixel", ids=[1])
    with bus_for(sim, arm_motors("dynamixel", ids=(1,))) as bus:
        bus.enable_torque()
        with pytest.raises(MotorBusError, match="has torque on; EEPROM register 'id' can only be written"):
            bus.write("id", "shoulder", 9)
        # Past the driver's own guard, the motor itself refuses with an access error.
        reg = X_SERIES_REGISTERS["operating_mode"]
        with pytest.raises(MotorBusError, match="motor 'shoulder' \\(id 1\\) refused the instruction: access error "
                                                "\\(EEPROM written with torque on"):
            bus._exchange(bus.codec.write(1, reg.address, reg.encode(1)), [1], 0)
        assert sim.register(1, "operating_mode") == 3


def test_hardware_alert_names_the_error_from_the_status_register(start_sim, bus_for):
    sim = start_sim("dynamixel", ids=[1, 2])
    with bus_for(sim, arm_motors("dynamixel", ids=(1, 2))) as bus:
        sim.inject_error(2, 0x20 | 0x04)
        with pytest.raises(MotorHardwareError, match="motor 'elbow' \\(id 2\\) reports overheating, overload: let it "
                                                     "cool down.*remove the load"):
            bus.read_state()


def test_eeprom_id_and_baud_change_keep_the_motor_reachable(start_sim, bus_for):
    sim = start_sim("dynamixel", ids=[1])
    with bus_for(sim) as bus:
        bus.write_register(1, "id", 12, "xl430-w250")
        bus.write_register(12, "baud_rate", 4, "xl430-w250")     # 2 Mbaud: the bus follows
        assert bus.baud_rate == 2_000_000 and bus.ping(12) == 1060 and bus.ping(1) is None
    with sim.lock:
        sim.servos[0].power_cycle()
        assert (sim.servos[0].id, sim.servos[0].baud_rate) == (12, 2_000_000)


# -- the simulated X-series motor is as strict as the e-Manual's -------------------------------------------------
def test_goals_beyond_their_limit_registers_are_refused_not_clamped(start_sim, bus_for):
    """Goal Position outside [Min, Max Position Limit] in position mode, or Goal Velocity beyond Velocity Limit(44):
    Data Limit Error, and the value is not applied; a sync write (no status) is just not applied for that motor."""
    sim = start_sim("dynamixel", ids=[1, 2])
    for motor_id in (1, 2):
        sim.servo(motor_id).set_saved("min_position_limit", 1000)
        sim.servo(motor_id).set_saved("max_position_limit", 3000)
    with bus_for(sim, arm_motors("dynamixel", ids=(1, 2))) as bus:
        with pytest.raises(MotorBusError, match=r"motor 'shoulder' \(id 1\) refused the instruction: data limit error"):
            bus.write("goal_position", "shoulder", 3001)
        with pytest.raises(MotorBusError, match="data limit error"):
            bus.write("goal_position", "shoulder", 999)
        bus.write("goal_position", "shoulder", 3000)
        assert sim.register(1, "goal_position") == 3000
        bus.sync_write("goal_position", {"shoulder": 2500, "elbow": 500})
        sim.wait_idle()
        assert (sim.register(1, "goal_position"), sim.register(2, "goal_position")) == (2500, 2048)
        with pytest.raises(MotorBusError, match="data limit error"):
            bus.reg_write("goal_position", "shoulder", 3500)      # refused as it is staged: ACTION finds nothing
        bus.action()
        sim.wait_idle()
        assert sim.register(1, "goal_position") == 2500
        limit = sim.register(1, "velocity_limit")
        with pytest.raises(MotorBusError, match="data limit error"):
            bus.write("goal_velocity", "shoulder", -(limit + 1))
        bus.write("goal_velocity", "shoulder", -limit)
        assert sim.register(1, "goal_velocity") == -limit


def test_feetech_still_clamps_a_goal_to_its_limits(start_sim, bus_for):
    sim = start_sim("feetech", ids=[1], max_speed_ticks_s=20_000)
    sim.servo(1).set_saved("max_position_limit", 2500)
    with bus_for(sim, arm_motors("feetech", ids=(1,))) as bus:
        bus.enable_torque()
        bus.write("goal_position", "shoulder", 3500)      # taken (no error), the shaft stops at the limit
        time.sleep(0.2)
        assert sim.register(1, "goal_position") == 3500 and sim.register(1, "present_position") == 2500


def test_present_position_counts_turns_with_torque_off_and_comes_back_within_one(start_sim, bus_for):
    """e-Manual: reset to within one turn when torque comes on in position mode, when the operating mode becomes
    position mode, and at power-up or reboot."""
    sim = start_sim("dynamixel", ids=[1])
    servo = sim.servo(1)
    with bus_for(sim) as bus:
        servo.position_ticks = 5000                       # turned by hand past the seam, torque off
        assert sim.register(1, "present_position") == 5000
        bus.write_register(1, "goal_position", 904, "xl430-w250")
        bus.write_register(1, "torque_enable", 1, "xl430-w250")
        assert sim.register(1, "present_position") == 904
        bus.write_register(1, "torque_enable", 0, "xl430-w250")
        bus.write_register(1, "operating_mode", 1, "xl430-w250")
        servo.position_ticks = -300
        bus.write_register(1, "torque_enable", 1, "xl430-w250")   # velocity mode: no reset
        assert sim.register(1, "present_position") == -300
        bus.write_register(1, "torque_enable", 0, "xl430-w250")
        bus.write_register(1, "operating_mode", 3, "xl430-w250")  # now position mode: reset
        assert sim.register(1, "present_position") == 4096 - 300
        servo.position_ticks = 4096 * 3 + 7
    with sim.lock:
        servo.power_cycle()
        assert servo.get("present_position") == 7 and servo.get("goal_position") == 7


def test_status_return_level_decides_which_instructions_are_answered(start_sim, bus_for):
    sim = start_sim("dynamixel", ids=[1, 2])
    with bus_for(sim, arm_motors("dynamixel", ids=(1, 2)), timeout_s=0.05, retries=0) as bus:
        sim.set_register(1, "status_return_level", 1)
        with pytest.raises(MotorTimeoutError, match=r"motor 'shoulder' \(id 1\) did not answer"):
            bus.write("led", "shoulder", 1)                  # level 1: writes are carried out but not answered
        assert sim.register(1, "led") == 1
        assert bus.read("led", "shoulder") == 1 and bus.sync_read("led") == {"shoulder": 1, "elbow": 0}
        sim.set_register(1, "status_return_level", 0)
        assert bus.ping(1) == 1060                           # PING is always answered
        with pytest.raises(MotorTimeoutError, match=r"'shoulder' \(id 1\) did not answer"):
            bus.read("led", "shoulder")
        with pytest.raises(MotorTimeoutError, match=r"'shoulder' \(id 1\) did not answer"):
            bus.sync_read("led")
        sim.set_register(1, "status_return_level", 2)
        bus.write("led", "shoulder", 0)
        assert bus.read("led", "shoulder") == 0


@pytest.mark.parametrize("model, factory", [("xl430-w250", 52), ("xc430-w150", 52), ("xm430-w350", 52),
                                            ("xm430-w210", 52), ("xl330-m288", 53), ("xl330-m077", 53)])
def test_shutdown_factory_value_per_model(start_sim, model, factory):
    sim = start_sim("dynamixel", ids=(), baud_rate=57_600)
    sim.add_motor(1, model)
    assert sim.register(1, "shutdown") == factory


def test_a_shutdown_error_turns_torque_off_until_a_reboot(start_sim, bus_for):
    sim = start_sim("dynamixel", ids=[1, 2])
    with bus_for(sim, arm_motors("dynamixel", ids=(1, 2))) as bus:
        bus.enable_torque()
        sim.inject_error(2, 0x08)               # encoder fault: not in the XL430's Shutdown (0x34), torque stays on
        assert sim.register(2, "torque_enable") == 1
        sim.inject_error(2, 0x20)               # overload: in Shutdown, the motor goes limp
        assert sim.register(2, "torque_enable") == 0 and sim.register(1, "torque_enable") == 1
        sim.set_register(2, "goal_position", 3000)
        time.sleep(0.2)
        assert sim.register(2, "present_position") == 2048        # no torque, no motion
        with pytest.raises(MotorHardwareError, match=r"motor 'elbow' \(id 2\) reports overload"):
            bus.write("torque_enable", "elbow", 1)
        assert sim.register(2, "torque_enable") == 0
        bus.sync_write("torque_enable", {"elbow": 1})              # no status to hear, and not applied
        sim.wait_idle()
        assert sim.register(2, "torque_enable") == 0
    with sim.lock:
        sim.servo(2).power_cycle()                                  # the reboot clears it
    with bus_for(sim, arm_motors("dynamixel", ids=(1, 2))) as bus:
        bus.enable_torque()
        assert sim.register(2, "torque_enable") == 1


def test_xl330_takes_no_4_5_mbps(start_sim, bus_for):
    with pytest.raises(MotorConfigError, match=r"motor 'hand' \(xl330-m077\) does not run at 4500000 baud; use one "
                                               r"of 9600, .*, 4000000"):
        make_serial_bus("dynamixel", "/dev/ttyACM0", {"hand": Motor(1, "xl330-m077")}, baud_rate=4_500_000)
    make_serial_bus("dynamixel", "/dev/ttyACM0", {"arm": Motor(1, "xl430-w250")}, baud_rate=4_500_000)
    sim = start_sim("dynamixel", ids=(), model="xl330-m077")
    sim.add_motor(1)
    with bus_for(sim) as bus:
        with pytest.raises(MotorBusError, match="data range error"):
            bus.write_register(1, "baud_rate", 7, "xl330-m077")    # past the driver's own guard: the motor refuses
        assert bus.baud_rate == 1_000_000 and bus.ping(1) == 1190
    assert sim.servo(1).baud_rate == 1_000_000


# -- what the strict motor asks of the driver ------------------------------------------------------------------
def test_enable_torque_after_a_shaft_turned_past_the_seam_holds_without_a_jump(start_sim, bus_for):
    """Turned by hand a turn on with torque off, the motor reads 5000: that goal would be refused; the driver holds at
    the same angle within one turn, where Present Position comes back as torque comes on."""
    sim = start_sim("dynamixel", ids=[1, 2])
    sim.servo(1).position_ticks = 5000
    sim.servo(1).set("goal_position", 100)               # an older run's goal
    with bus_for(sim, arm_motors("dynamixel", ids=(1, 2))) as bus:
        bus.enable_torque()
        assert [sim.register(i, "torque_enable") for i in (1, 2)] == [1, 1]
        assert sim.register(1, "goal_position") == 904 and sim.register(1, "present_position") == 904
        time.sleep(0.2)
        assert bus.sync_read("present_position") == {"shoulder": 904, "elbow": 2048}    # nothing moved
        bus.enable_torque()                               # again, torque on: holds as it reads
        assert bus.sync_read("goal_position") == {"shoulder": 904, "elbow": 2048}


def test_torque_stays_off_where_the_motor_refuses_the_holding_goal(start_sim, bus_for):
    """The faithful motor, no monkeypatch: a joint resting outside the motor's own position limits reads a goal
    the motor refuses in silence (sync write); torque on would take it to its older goal, so it stays off."""
    sim = start_sim("dynamixel", ids=[1, 2])
    sim.servo(2).set_saved("min_position_limit", 1000)
    sim.servo(2).position_ticks = 500
    sim.servo(2).set("goal_position", 2048)
    with bus_for(sim, arm_motors("dynamixel", ids=(1, 2))) as bus:
        with pytest.raises(MotorBusError, match=r"motor 'elbow' \(id 2\) did not take the goal of holding where it "
                                                r"is \('elbow' reads 500, goal stays 2048\); torque stays off.*"
                                                r"position limit registers"):
            bus.enable_torque()
        assert [sim.register(i, "torque_enable") for i in (1, 2)] == [0, 0]
        time.sleep(0.1)
        assert sim.register(2, "present_position") == 500


def test_send_velocity_clamps_to_the_motors_velocity_limit_register(start_sim, bus_for):
    """Goal Velocity beyond Velocity Limit(44) is refused, silently in a sync write: the driver clamps to the
    register (read while torque is on), not to the model's factory value."""
    sim = start_sim("dynamixel", ids=[1, 2])
    sim.servo(1).set_saved("velocity_limit", 100)        # lowered below the factory 265
    sim.servo(2).set_saved("velocity_limit", 400)        # raised above it
    motors = {"left": Motor(1, "xl430-w250", "velocity"), "right": Motor(2, "xl430-w250", "velocity")}
    unit = MODELS["xl430-w250"].velocity_unit_rad_s
    with bus_for(sim, motors) as bus:
        bus.enable_torque()
        sent = bus.send_velocity({"left": 100.0, "right": -100.0})
        assert sent == {"left": pytest.approx(100 * unit), "right": pytest.approx(-400 * unit)}
        sim.wait_idle()
        assert (sim.register(1, "goal_velocity"), sim.register(2, "goal_velocity")) == (100, -400)
        bus.disable_torque()
        bus.write("velocity_limit", "left", 50)            # EEPROM, torque off
        bus.enable_torque()
        assert bus.send_velocity({"left": 100.0})["left"] == pytest.approx(50 * unit)
        sim.wait_idle()
        assert sim.register(1, "goal_velocity") == 50
