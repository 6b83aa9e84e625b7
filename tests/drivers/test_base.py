"""The three-omni-wheel base: kinematics both ways, proportional speed limits, watchdog and stop on exit, on the simulator."""
import time

import numpy as np
import pytest

from edgeact.drivers.motors.base import BaseVelocity, OmniBase, OmniBaseConfig
from edgeact.drivers.motors.bus import Motor
from edgeact.drivers.motors.serial_bus import MotorConfigError

pytestmark = pytest.mark.timeout(20)
WHEEL_IDS = {"base_left_wheel": 7, "base_back_wheel": 8, "base_right_wheel": 9}


def lekiwi_motors() -> dict[str, Motor]:
    """LeKiwi: a 6-joint SO-101 arm (ids 1-6) and three wheels (ids 7-9) on one Feetech bus."""
    arm = {f"arm_{i}": Motor(i, "sts3215") for i in range(1, 7)}
    return arm | {name: Motor(i, "sts3215", mode="velocity") for name, i in WHEEL_IDS.items()}


@pytest.fixture
def lekiwi(start_sim, bus_for):
    sim = start_sim("feetech", ids=range(1, 10))
    with bus_for(sim, lekiwi_motors()) as bus:
        yield sim, bus


def offline_base(config: OmniBaseConfig | None = None) -> OmniBase:
    from edgeact.drivers.motors.feetech import FeetechBusConfig, FeetechMotorsBus

    return OmniBase(FeetechMotorsBus(FeetechBusConfig(port="/dev/null"), lekiwi_motors()), config)


def test_kinematics_round_trip():
    base = offline_base()
    rng = np.random.default_rng(0)
    for vx, vy, wz in rng.uniform(-0.3, 0.3, size=(20, 3)):
        back = base.body_velocity(base.wheel_speeds(BaseVelocity(vx, vy, wz)))
        assert (back.vx_m_s, back.vy_m_s, back.wz_rad_s) == pytest.approx((vx, vy, wz), abs=1e-12)


def test_lekiwi_geometry():
    base = offline_base()
    spin = base.wheel_speeds(BaseVelocity(wz_rad_s=1.0))          # every wheel rolls at R * wz / r
    assert list(spin.values()) == pytest.approx([0.125 / 0.05] * 3)
    forward = base.wheel_speeds(BaseVelocity(vx_m_s=0.1))         # the back wheel is sideways to +x
    assert forward["base_back_wheel"] == pytest.approx(0.0, abs=1e-12)
    assert forward["base_left_wheel"] == pytest.approx(-forward["base_right_wheel"])
    left = base.wheel_speeds(BaseVelocity(vy_m_s=0.1))
    assert left["base_back_wheel"] == pytest.approx(-0.1 / 0.05)


def test_speed_limit_scales_every_wheel_by_one_factor():
    base = offline_base(OmniBaseConfig(max_wheel_speed_rad_s=2.0))
    asked = base.wheel_speeds(BaseVelocity(1.0, 0.5, 2.0))
    limited = base.limit(asked)
    assert max(abs(s) for s in limited.values()) == pytest.approx(2.0)
    ratios = {name: limited[name] / asked[name] for name in asked}
    assert len({round(r, 12) for r in ratios.values()}) == 1        # same factor: the heading is kept
    slow = base.wheel_speeds(BaseVelocity(0.01, 0, 0))
    assert base.limit(slow) == slow


def test_config_is_validated():
    with pytest.raises(MotorConfigError, match="wheel_radius_m must be positive"):
        OmniBaseConfig(wheel_radius_m=0)
    with pytest.raises(MotorConfigError, match="cannot steer the base in every direction"):
        OmniBaseConfig(wheel_drive_angles_deg=(0.0, 180.0, 0.0))
    with pytest.raises(MotorConfigError, match="exceeds what sts3215 can do"):
        offline_base(OmniBaseConfig(max_wheel_speed_rad_s=50.0))
    from edgeact.drivers.motors.feetech import FeetechBusConfig, FeetechMotorsBus
    joints_only = FeetechMotorsBus(FeetechBusConfig(port="/dev/null"), {"base_left_wheel": Motor(7, "sts3215")})
    with pytest.raises(MotorConfigError, match="wheel 'base_left_wheel' must be a velocity-mode motor"):
        OmniBase(joints_only)


def test_drive_read_back_and_stop_on_exit(lekiwi):
    sim, bus = lekiwi
    with OmniBase(bus) as base:
        sent = base.send(vx_m_s=0.1, wz_rad_s=0.5)
        assert (sent.vx_m_s, sent.vy_m_s, sent.wz_rad_s) == pytest.approx((0.1, 0.0, 0.5), abs=2e-3)
        measured = base.read()                                    # the simulated wheels turn at their goal
        assert (measured.vx_m_s, measured.wz_rad_s) == pytest.approx((sent.vx_m_s, sent.wz_rad_s), abs=1e-9)
        fast = base.send(vx_m_s=5.0)                              # far beyond the wheels: scaled down, straight
        assert fast.vy_m_s == pytest.approx(0.0, abs=2e-3) and fast.wz_rad_s == pytest.approx(0.0, abs=2e-3)
        assert 0.1 < fast.vx_m_s < 5.0
        assert sim.register(1, "torque_enable") == 0              # the arm is not the base's business
    sim.wait_idle()
    for motor_id in WHEEL_IDS.values():
        assert sim.register(motor_id, "goal_velocity") == 0 and sim.register(motor_id, "torque_enable") == 0


def test_watchdog_stops_the_wheels_when_commands_stop(lekiwi):
    sim, bus = lekiwi
    with OmniBase(bus, OmniBaseConfig(watchdog_s=0.2)) as base:
        base.send(vy_m_s=0.1)
        assert any(v != 0 for v in bus.sync_read("goal_velocity", list(WHEEL_IDS)).values())
        deadline = time.monotonic() + 5.0
        while base.watchdog_stops == 0:
            assert time.monotonic() < deadline, "the watchdog never stopped the wheels"
            time.sleep(0.02)
        assert bus.sync_read("goal_velocity", list(WHEEL_IDS)) == dict.fromkeys(WHEEL_IDS, 0)
        assert not base.moving
        base.send(vy_m_s=0.1)                                     # a new command drives again
        assert base.moving


def test_steady_commands_keep_the_base_driving(lekiwi):
    sim, bus = lekiwi
    with OmniBase(bus, OmniBaseConfig(watchdog_s=2.0)) as base:
        for _ in range(10):
            base.send(vx_m_s=0.05)
            time.sleep(0.02)
        assert base.watchdog_stops == 0 and base.moving


def test_an_exception_in_the_loop_stops_the_wheels(lekiwi):
    sim, bus = lekiwi
    with pytest.raises(RuntimeError, match="planner crashed"):
        with OmniBase(bus) as base:
            base.send(wz_rad_s=1.0)
            raise RuntimeError("planner crashed")
    assert bus.sync_read("goal_velocity", list(WHEEL_IDS)) == dict.fromkeys(WHEEL_IDS, 0)
    assert bus.sync_read("torque_enable", list(WHEEL_IDS)) == dict.fromkeys(WHEEL_IDS, 0)
