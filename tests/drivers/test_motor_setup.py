"""Motor setup against the simulator: scanning baud rates and ids, refusing unsafe setups, flashing id and baud rate."""
import pytest

from edgeact.drivers.motors.bus import MotorBusError, MotorProtocolError, MotorTimeoutError
from edgeact.drivers.motors.serial_bus import MotorConfigError
from edgeact.drivers.motors.setup import FoundMotor, find_single_motor, flash_motor, scan_port

from .conftest import MODEL

pytestmark = pytest.mark.timeout(20)
FEW_IDS = range(0, 8)           # bounds the search (and Protocol 2.0's broadcast window) to keep tests quick
BAUDS = {"feetech": [1_000_000, 500_000, 57_600], "dynamixel": [1_000_000, 57_600, 2_000_000]}


def test_scan_finds_motors_at_every_baud_rate(serial_protocol, start_sim):
    sim = start_sim(serial_protocol, ids=[1, 2, 3])
    sim.add_motor(7, baud_rate=57_600)
    report = scan_port(sim.port, [serial_protocol], BAUDS[serial_protocol], FEW_IDS, timeout_s=0.08)
    found = sorted((m.baud_rate, m.motor_id, m.model) for m in report.found)
    model = MODEL[serial_protocol]
    assert found == [(57_600, 7, model), (1_000_000, 1, model), (1_000_000, 2, model), (1_000_000, 3, model)]
    assert report.collisions == [] and report.baud_rates_tried == {serial_protocol: BAUDS[serial_protocol]}


def test_scan_of_protocol_2_uses_the_ordered_broadcast_ping(start_sim):
    sim = start_sim("dynamixel", ids=[3, 6])
    report = scan_port(sim.port, ["dynamixel"], [1_000_000], FEW_IDS, timeout_s=0.08)
    assert [(m.motor_id, m.model_number) for m in report.found] == [(3, 1060), (6, 1060)]
    assert [i.motor_id for i in sim.received] == [0xFE]     # one broadcast, no id-by-id search


def test_scan_reports_colliding_ids_and_the_clean_ones(serial_protocol, start_sim):
    sim = start_sim(serial_protocol, ids=[1, 4, 4])
    report = scan_port(sim.port, [serial_protocol], [1_000_000], FEW_IDS, timeout_s=0.08)
    assert [m.motor_id for m in report.found] == [1]
    assert report.collisions == [(serial_protocol, 1_000_000, 4)]


def test_scan_rejects_a_baud_rate_no_protocol_supports(start_sim):
    sim = start_sim("feetech", ids=[1])
    with pytest.raises(MotorConfigError, match="baud rate 12 not supported by feetech or dynamixel motors; use one of"):
        scan_port(sim.port, ["feetech", "dynamixel"], [12])


def test_find_single_motor_refuses_none_several_and_colliding(serial_protocol, start_sim):
    bauds = BAUDS[serial_protocol]
    empty = start_sim(serial_protocol, ids=[])
    with pytest.raises(MotorTimeoutError, match=rf"no motor answers on {empty.port} at any of 1000000, .* baud "
                                                rf"\({serial_protocol}\); check the power supply and the cable"):
        find_single_motor(empty.port, serial_protocol, bauds, FEW_IDS, timeout_s=0.05)
    duplicate = start_sim(serial_protocol, ids=[1, 1])
    with pytest.raises(MotorProtocolError, match=r"replies collide at 1000000 baud .*connect only the motor you want "
                                                 r"to set up"):
        find_single_motor(duplicate.port, serial_protocol, bauds, FEW_IDS, timeout_s=0.05)
    two = start_sim(serial_protocol, ids=[1])
    two.add_motor(2, baud_rate=57_600)
    with pytest.raises(MotorBusError, match=r"2 motors answer on .* \(id 1 at 1000000 baud, id 2 at 57600 baud\); "
                                            r"connect only the motor you want to set up"):
        find_single_motor(two.port, serial_protocol, bauds, FEW_IDS, timeout_s=0.05)


def test_flash_sets_id_baud_and_defaults_that_survive_a_power_cycle(serial_protocol, start_sim, bus_for):
    sim = start_sim(serial_protocol, ids=[])
    sim.add_motor(1, baud_rate=57_600)
    found = find_single_motor(sim.port, serial_protocol, BAUDS[serial_protocol], FEW_IDS, timeout_s=0.05)
    assert (found.motor_id, found.baud_rate, found.model) == (1, 57_600, MODEL[serial_protocol])
    done = flash_motor(sim.port, found, new_id=6, new_baud_rate=1_000_000, timeout_s=0.05)
    assert done == FoundMotor(serial_protocol, 6, 1_000_000, found.model_number)
    with sim.lock:
        servo = sim.servos[0]
        servo.set("return_delay_time", 99)       # RAM-only changes are lost at power-off; EEPROM is not
        servo.power_cycle()
        assert (servo.id, servo.baud_rate, servo.get("return_delay_time"), servo.get("max_position_limit")) == (
            6, 1_000_000, 0, 4095)
    with bus_for(sim) as bus:
        assert bus.ping(6) == found.model_number


def test_flash_refuses_when_another_motor_appeared(start_sim):
    sim = start_sim("feetech", ids=[1])
    found = find_single_motor(sim.port, "feetech", [1_000_000], FEW_IDS, timeout_s=0.05)
    sim.add_motor(2)
    with pytest.raises(MotorBusError, match=r"expected only id 1 .* but replies collide; connect only the motor"):
        flash_motor(sim.port, found, 5, 1_000_000, timeout_s=0.05)
    assert sim.register(1, "id") == 1       # nothing was written


def test_flash_checks_the_new_settings_before_touching_the_motor(start_sim):
    sim = start_sim("dynamixel", ids=[1])
    found = FoundMotor("dynamixel", 1, 1_000_000, 1060)
    with pytest.raises(MotorConfigError, match="baud rate 128000 not supported by dynamixel motors; use one of 9600, "):
        flash_motor(sim.port, found, 2, 128_000)
    with pytest.raises(MotorConfigError, match=r"id 300 outside \[0, 252\]"):
        flash_motor(sim.port, found, 300, 1_000_000)
    assert len(sim.received) == 0


def test_flash_refuses_a_baud_rate_the_protocol_takes_and_the_model_does_not(start_sim):
    """4.5 Mbps is a Protocol 2.0 rate, but not an XL330's: the baud-rate write crashed with a KeyError."""
    sim = start_sim("dynamixel", ids=[])
    sim.add_motor(1, model="xl330-m288")
    found = find_single_motor(sim.port, "dynamixel", [1_000_000], FEW_IDS, timeout_s=0.05)
    with pytest.raises(MotorConfigError, match=r"xl330-m288 does not run at 4500000 baud; use one of 9600, .*4000000$"):
        flash_motor(sim.port, found, 2, 4_500_000, timeout_s=0.05)
    assert sim.register(1, "id") == 1       # nothing was written
