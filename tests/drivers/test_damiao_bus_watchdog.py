"""Damiao's own command timeout (register TIMEOUT) as bus_watchdog_s: a silent host cannot leave wheels driving."""
import logging
import time

import pytest

from edgeact.drivers.motors import damiao_table as dt
from edgeact.drivers.motors.bus import Motor, MotorHardwareError
from edgeact.drivers.motors.damiao import DamiaoBus, DamiaoBusConfig
from edgeact.runtime.errors import ConfigError
from edgeact.runtime.robot_config import robot_config_from_dict
from tests.drivers.damiao_helpers import cfg, channel, sim  # noqa: F401  (fixtures)
from tests.runtime.test_robot_config import _damiao, _error

pytestmark = pytest.mark.timeout(30)
MOTORS = {"wheel": Motor(0x01, "dm4310", "velocity"), "arm": Motor(0x02, "dm4340")}
SPEED_RAD_S = 5.0


def wait_until(condition, timeout_s=5.0):
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.005)
    return condition()


def test_setting_in_register_units_and_bad_values_named():
    assert DamiaoBusConfig(bus_watchdog_s=0.1).timeout_units == 2000           # 50 µs units
    assert DamiaoBusConfig(bus_watchdog_s=None).timeout_units == DamiaoBusConfig(bus_watchdog_s=0).timeout_units == 0
    for bad in (0.01, -0.2, True, "0.1", float("nan"), 1e6):
        with pytest.raises(ConfigError, match=r"bus_watchdog_s .* out of range; use None or 0 .* 0.02 to 214748"):
            DamiaoBusConfig(bus_watchdog_s=bad)


def test_enable_torque_arms_the_motor_timeout_and_a_silent_host_turns_the_wheel_off(sim, channel):  # noqa: F811
    with DamiaoBus(MOTORS, config=cfg(channel, bus_watchdog_s=0.1)) as bus:
        bus.enable_torque()
        assert [sim.motor(i).registers["TIMEOUT"] for i in (1, 2)] == [2000, 2000]
        bus.send_velocity({"wheel": SPEED_RAD_S})
        assert wait_until(lambda: sim.motor(1).velocity_rad_s > 0.9 * SPEED_RAD_S)
        last_command_s = sim.motor(1).last_command_s
        # The host sends nothing: the motor turns torque off by itself once 0.1 s passed without a command.
        assert wait_until(lambda: sim.motor(1).error is not None, timeout_s=2.0)
        with sim.lock:
            wheel = sim.motor(1)
            assert wheel.error == dt.STATUS_COMMUNICATION_LOST and not wheel.enabled and wheel.torque_nm == 0.0
        assert time.monotonic() - last_command_s < 2.0
        # The host comes back: its next command is refused with what happened and what to change.
        with pytest.raises(MotorHardwareError, match=r"'wheel' .* reports communication lost: no command reached it "
                                                     r"for longer than its TIMEOUT \(bus_watchdog_s\)"):
            bus.send_velocity({"wheel": SPEED_RAD_S})


def test_without_the_setting_a_silent_host_leaves_the_wheel_driving(sim, channel):  # noqa: F811
    with DamiaoBus(MOTORS, config=cfg(channel)) as bus:
        bus.enable_torque()
        assert sim.motor(1).registers["TIMEOUT"] == 0
        bus.send_velocity({"wheel": SPEED_RAD_S})
        time.sleep(0.4)
        with sim.lock:
            assert sim.motor(1).enabled and sim.motor(1).error is None
            assert sim.motor(1).velocity_rad_s > 0.9 * SPEED_RAD_S


def test_commands_at_the_control_rate_keep_it_armed(sim, channel):  # noqa: F811
    # 0.25 s against commands every ~10 ms: a wide margin for a loaded test machine.
    with DamiaoBus(MOTORS, config=cfg(channel, bus_watchdog_s=0.25)) as bus:
        bus.enable_torque()
        end = time.monotonic() + 0.6
        while time.monotonic() < end:
            bus.send_velocity({"wheel": SPEED_RAD_S})
            bus.send({"arm": 0.1})
            time.sleep(0.01)
        assert sim.motor(1).enabled and sim.motor(2).enabled and sim.motor(1).error is None


def test_enable_torque_clears_communication_lost_but_not_other_faults(sim, channel, caplog):  # noqa: F811
    with DamiaoBus(MOTORS, config=cfg(channel, bus_watchdog_s=0.05)) as bus:
        bus.enable_torque()
        assert wait_until(lambda: sim.motor(1).error is not None and sim.motor(2).error is not None)
        with caplog.at_level(logging.WARNING):
            bus.enable_torque()         # a new run after the last host died: no clear_error needed
        assert "turned torque off after hearing no command for longer than its TIMEOUT" in caplog.text
        assert sim.motor(1).enabled and sim.motor(2).enabled
        bus.send({"arm": 0.0})          # fed at once: it stays enabled
        assert sim.motor(2).enabled
        with sim.lock:
            sim.motor(2).inject_error(0xA)
        with pytest.raises(MotorHardwareError, match="'arm' .* reports overcurrent"):
            bus.enable_torque(["arm"])
        assert sim.motor(2).error == 0xA and not sim.motor(2).enabled


def test_robot_config_takes_it_and_checks_it_against_the_control_rate():
    config = robot_config_from_dict(_damiao(options={"interface": "virtual", "channel": "x", "bus_watchdog_s": 0.1}))
    assert config.robot.make_bus().config.timeout_units == 2000
    assert "robot.options: bus_watchdog_s 0.001 out of range" in _error(_damiao(options={"bus_watchdog_s": 0.001}))
    assert ("robot.options.bus_watchdog_s: 0.02 s is under three control periods (0.030 s at 100 Hz)"
            in _error(_damiao(options={"bus_watchdog_s": 0.02})))


def test_torque_kept_at_exit_holds_until_the_motor_timeout_and_the_next_run_still_starts(sim, channel):  # noqa: F811
    # robot.disable_torque_on_exit false: the disconnect leaves the motors holding, and the motors' own TIMEOUT
    # (bus_watchdog_s) turns their torque off 0.3 s later, as the end of the run says. The next run's enable_torque
    # clears that "communication lost" before its first reading is checked against the limits. (0.3 s, not the
    # 0.1 s a robot would use: on a loaded 2-core test machine the last tick and the exit's hold came 0.1 s apart
    # once, and the hold then found the motors timed out.)
    from edgeact.runtime.loop import run_robot

    data = _damiao(options={"interface": "virtual", "channel": channel, "timeout_s": 0.2, "bus_watchdog_s": 0.3},
                   motors={"shoulder": {"id": 1, "model": "dm4310"}, "elbow": {"id": 2, "model": "dm4340"}},
                   disable_torque_on_exit=False)
    data["limits"] = {"safe_state": "hold", "watchdog_timeout_s": 1.0}
    data["watchdog"] = {"control_stall_s": 1.5}
    config = robot_config_from_dict(data)
    result = run_robot(config, 0.5)
    assert result.reason == "duration" and result.error is None and result.teardown_error is None
    assert result.motors_at_exit.startswith("torque ON, joints holding")
    assert "turns their torque off 0.3 s after the last command" in result.motors_at_exit
    assert wait_until(lambda: sim.motor(2).error == dt.STATUS_COMMUNICATION_LOST)     # it was still enabled
    again = run_robot(config, 0.3)
    assert again.reason == "duration" and again.error is None and again.ticks > 0
    data["robot"]["disable_torque_on_exit"] = True          # the default: torque off at the disconnect, no timeout
    run_robot(robot_config_from_dict(data), 0.3)
    time.sleep(0.5)                                         # past the motors' TIMEOUT
    with sim.lock:
        assert not sim.motor(2).enabled and sim.motor(2).error is None
