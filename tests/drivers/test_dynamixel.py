"""Dynamixel Protocol 2.0: packets checked byte for byte against ROBOTIS' dynamixel_sdk, then the driver on the simulator."""
import os

import dynamixel_sdk
import pytest

from edgeact.drivers.motors.bus import MotorBusError, MotorHardwareError
from edgeact.drivers.motors.dynamixel import FAST_SYNC_READ, DynamixelCodec, crc16, stuff, unstuff
from edgeact.drivers.motors.dynamixel_table import X_SERIES_REGISTERS

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
