"""Dynamixel Bus Watchdog (register 98): a silent host stops the motors by themselves; the driver re-arms it."""
import logging
import math
import time

import pytest

from edgeact.drivers.motors.bus import Motor, MotorBusError
from edgeact.drivers.motors.dynamixel import DynamixelBusConfig
from edgeact.drivers.motors.feetech import FeetechBusConfig
from edgeact.drivers.motors.serial_types import MotorConfigError, make_serial_bus

pytestmark = pytest.mark.timeout(20)
WHEEL = {"wheel": Motor(1, "xl430-w250", "velocity")}
SPEED_RAD_S = 2.0


def ticks_s(servo, rad_s: float) -> float:
    return rad_s / servo.spec.rad_per_tick


def spin(sim, bus):
    """Torque on, the wheel at SPEED_RAD_S, every packet answered; returns (servo, its position now)."""
    bus.enable_torque()
    bus.send_velocity({"wheel": SPEED_RAD_S})
    sim.wait_idle()
    with sim.lock:
        servo = sim.servo(1)
        return servo, servo.position_ticks


def test_watchdog_stops_a_wheel_when_the_host_goes_silent(start_sim, bus_for):
    sim = start_sim("dynamixel", ids=[1])
    with bus_for(sim, WHEEL, bus_watchdog_s=0.1) as bus:
        servo, start = spin(sim, bus)
        with sim.lock:
            assert servo.get("bus_watchdog") == 5 and servo.get("goal_velocity") != 0
        time.sleep(0.35)              # the host sends nothing; the simulated motor keeps running
        with sim.lock:
            travelled = servo.position_ticks - start
            assert servo.memory[98] == 0xFF and servo.get("bus_watchdog") == -1
            assert servo.get("goal_velocity") == 0 and servo.get("present_velocity") == 0
        # It stopped no later than 0.1 s after the last packet (which came before `start`).
        assert 0 <= travelled <= ticks_s(servo, SPEED_RAD_S) * 0.1 + 2
        # Goals are read-only until 98 is written 0: a unicast goal write is answered with a data range error.
        with pytest.raises(MotorBusError, match="data range error"):
            bus.write("goal_velocity", "wheel", 50)
        bus.write("bus_watchdog", "wheel", 0)
        bus.write("goal_velocity", "wheel", 50)
        assert sim.register(1, "goal_velocity") == 50


def test_instructions_of_any_kind_keep_the_watchdog_fed(start_sim, bus_for):
    sim = start_sim("dynamixel", ids=[1, 2])
    motors = {"wheel": Motor(1, "xl430-w250", "velocity"), "other": Motor(2, "xl430-w250", "velocity")}
    # 0.25 s: reads every ~20 ms keep motor 1 fed with a wide margin for a loaded test machine.
    with bus_for(sim, motors, bus_watchdog_s=0.25) as bus:
        bus.enable_torque()
        bus.send_velocity({"wheel": SPEED_RAD_S, "other": SPEED_RAD_S})
        end = time.monotonic() + 0.5
        while time.monotonic() < end:   # only sync reads of motor 1: motor 2 hears nothing addressed to it
            bus.sync_read("present_position", ["wheel"])
            time.sleep(0.02)
        sim.wait_idle()
        assert sim.register(1, "bus_watchdog") == 12 and sim.register(1, "goal_velocity") != 0
        assert sim.register(2, "bus_watchdog") == -1 and sim.register(2, "goal_velocity") == 0


def test_after_a_trip_the_next_send_velocity_clears_rearms_and_drives(start_sim, bus_for, caplog):
    sim = start_sim("dynamixel", ids=[1])
    with bus_for(sim, WHEEL, bus_watchdog_s=0.1) as bus:
        servo, _ = spin(sim, bus)
        time.sleep(0.3)
        assert sim.register(1, "bus_watchdog") == -1           # tripped: the host was silent too long
        with caplog.at_level(logging.WARNING):
            sent = bus.send_velocity({"wheel": SPEED_RAD_S})
        assert sent["wheel"] == pytest.approx(SPEED_RAD_S, rel=0.02)
        assert any("bus watchdog stopped wheel" in r.getMessage() for r in caplog.records)
        sim.wait_idle()
        with sim.lock:
            assert servo.get("bus_watchdog") == 5 and servo.get("goal_velocity") != 0
            start = servo.position_ticks
        time.sleep(0.05)
        state = bus.read_state()                               # also feeds the watchdog
        assert state.velocity_rad_s["wheel"] == pytest.approx(SPEED_RAD_S, rel=0.05)
        with sim.lock:
            assert servo.position_ticks - start > ticks_s(servo, SPEED_RAD_S) * 0.03   # it turns again


def test_without_the_option_nothing_changes(start_sim, bus_for):
    sim = start_sim("dynamixel", ids=[1])
    with bus_for(sim, WHEEL) as bus:
        assert bus.config.bus_watchdog_s is None and bus.config.bus_watchdog_units == 0
        servo, start = spin(sim, bus)
        time.sleep(0.3)
        with sim.lock:
            assert servo.get("bus_watchdog") == 0 and servo.get("goal_velocity") != 0
            assert servo.position_ticks - start > ticks_s(servo, SPEED_RAD_S) * 0.25    # still driving
        assert not any(ins.params[:2] == (98).to_bytes(2, "little") for ins in sim.received if ins.code in (3, 0x83))


@pytest.mark.parametrize("value,units", [(None, 0), (0, 0), (0.0, 0), (0.02, 1), (0.1, 5), (0.15, 8), (2.54, 127)])
def test_watchdog_values_round_to_20_ms(value, units):
    assert DynamixelBusConfig(port="/dev/null", bus_watchdog_s=value).bus_watchdog_units == units


@pytest.mark.parametrize("value", [0.01, 2.6, -0.1, math.nan, math.inf, True, "0.1"])
def test_bad_watchdog_values_name_the_field_and_the_fix(value):
    with pytest.raises(MotorConfigError, match=r"bus_watchdog_s .* out of range; use None or 0 \(off\), or 0.02 to 2.54"):
        DynamixelBusConfig(port="/dev/null", bus_watchdog_s=value)


def test_feetech_refuses_a_bus_watchdog():
    assert FeetechBusConfig(port="/dev/null").bus_watchdog_units == 0
    with pytest.raises(MotorConfigError, match="bus_watchdog_s 0.1: feetech motors have no bus watchdog register"):
        FeetechBusConfig(port="/dev/null", bus_watchdog_s=0.1)
    with pytest.raises(MotorConfigError, match="bus_watchdog_s 5.0: feetech motors have no bus watchdog register"):
        FeetechBusConfig(port="/dev/null", bus_watchdog_s=5.0)      # not sent to a range no value of it meets
    with pytest.raises(MotorConfigError, match="remove bus_watchdog_s"):
        make_serial_bus("feetech", "/dev/null", bus_watchdog_s=0.2)


def test_a_watchdog_an_earlier_run_left_tripped_is_cleared_at_torque_on_without_the_option(start_sim, bus_for, caplog):
    """A tripped motor refuses every goal, the holding one too: torque-on failed, blaming the position limits."""
    sim = start_sim("dynamixel", ids=[1])
    with sim.lock:
        sim.servo(1).set("goal_position", 3000)      # the earlier run's last goal
        sim.servo(1)._trip_watchdog()                # ... and its watchdog stopped it when that run fell silent
    joint = {"elbow": Motor(1, "xl430-w250", "position")}
    with bus_for(sim, joint) as bus, caplog.at_level(logging.WARNING):
        assert bus.config.bus_watchdog_units == 0
        bus.enable_torque()
        sim.wait_idle()
        with sim.lock:
            servo = sim.servo(1)
            assert servo.get("bus_watchdog") == 0 and servo.get("torque_enable") == 1
            assert servo.get("goal_position") == round(servo.position_ticks)     # holds where it is, no jump
    assert "the bus watchdog of elbow had stopped it" in caplog.text
