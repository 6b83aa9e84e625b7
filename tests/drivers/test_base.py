"""The three-omni-wheel base: kinematics both ways, proportional speed and acceleration limits, watchdog, e-stop
(the SafetyGuard's or its own input) and stop on exit, on the simulator."""
import threading
import time

import numpy as np
import pytest

from edgeact.drivers.motors.base import ACCEL_STEP_MAX_S, BaseVelocity, OmniBase, OmniBaseConfig
from edgeact.drivers.motors.bus import Motor
from edgeact.drivers.motors.safety import EStopLatchedError, SafetyConfig, SafetyError, SafetyGuard
from edgeact.drivers.motors.serial_bus import MotorConfigError

pytestmark = pytest.mark.timeout(20)
WHEEL_IDS = {"base_left_wheel": 7, "base_back_wheel": 8, "base_right_wheel": 9}
NO_RAMP = 1e6       # rad/s^2: tests of the kinematics and the watchdog want each command at once


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
    with pytest.raises(MotorConfigError, match="max_wheel_accel_rad_s2 must be positive, got 0"):
        OmniBaseConfig(max_wheel_accel_rad_s2=0)
    with pytest.raises(MotorConfigError, match=r"max_wheel_accel_rad_s2 must be a finite number of rad/s\^2 "
                                               r"\(e.g. 10\), got inf"):
        OmniBaseConfig(max_wheel_accel_rad_s2=float("inf"))


def test_drive_read_back_and_stop_on_exit(lekiwi):
    sim, bus = lekiwi
    with OmniBase(bus, OmniBaseConfig(max_wheel_accel_rad_s2=NO_RAMP)) as base:
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
    with OmniBase(bus, OmniBaseConfig(watchdog_s=0.2, max_wheel_accel_rad_s2=NO_RAMP)) as base:
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


def goals(bus) -> dict[str, int]:
    return bus.sync_read("goal_velocity", list(WHEEL_IDS))


def test_send_before_start_is_refused_naming_start(lekiwi):
    # Without start() no watchdog runs: a command sent then would drive on however long the caller stalls.
    sim, bus = lekiwi
    bus.enable_torque()                                         # e.g. the loop turned every motor on
    base = OmniBase(bus, OmniBaseConfig(watchdog_s=0.2))
    with pytest.raises(SafetyError, match=r"the base is not started.*call base.start\(\) before send\(\)"):
        base.send(vx_m_s=0.2)
    assert goals(bus) == dict.fromkeys(WHEEL_IDS, 0) and not base.moving


def test_a_latched_estop_of_the_safety_guard_stops_the_base_and_refuses_its_commands(lekiwi):
    sim, bus = lekiwi
    with SafetyGuard(bus, SafetyConfig(safe_state="hold")) as guard, \
            OmniBase(guard, OmniBaseConfig(watchdog_s=0.5, max_wheel_accel_rad_s2=NO_RAMP)) as base:
        base.send(vx_m_s=0.1)
        assert any(goals(bus).values())
        guard.trigger_estop("operator pressed e-stop")
        assert goals(bus) == dict.fromkeys(WHEEL_IDS, 0)
        for _ in range(3):                                      # the planner keeps commanding the base
            with pytest.raises(EStopLatchedError, match="release the e-stop"):
                base.send(vx_m_s=0.1)
        assert goals(bus) == dict.fromkeys(WHEEL_IDS, 0) and not base.moving
        guard.reset_estop()
        base.send(vx_m_s=0.1)                                   # reset: it drives again
        assert any(goals(bus).values())


def test_after_the_guard_stopped_the_wheels_the_base_ramps_up_from_standstill(lekiwi):
    sim, bus = lekiwi
    with SafetyGuard(bus, SafetyConfig(watchdog_timeout_s=0.1, max_velocity_rad_s=3.0)) as guard, \
            OmniBase(guard, OmniBaseConfig(watchdog_s=2.0, max_wheel_accel_rad_s2=10.0)) as base:
        deadline = time.monotonic() + 3.0
        while base.send(wz_rad_s=2.0).wz_rad_s < 1.9 and time.monotonic() < deadline:   # up to full speed
            time.sleep(0.01)
        time.sleep(0.4)             # the caller pauses: the guard's watchdog (0.1 s) stops the wheels, the base's not
        assert guard.watchdog_trips >= 1 and goals(bus) == dict.fromkeys(WHEEL_IDS, 0)
        sent = base.send(wz_rad_s=2.0)
        # From 0, not from the full speed the base last sent: at most 10 rad/s^2 x ACCEL_STEP_MAX_S per wheel.
        assert max(abs(s) for s in base.wheel_speeds(sent).values()) <= 10.0 * ACCEL_STEP_MAX_S + 0.02   # raw steps


def test_the_guards_velocity_limit_scales_the_wheels_together(lekiwi):
    sim, bus = lekiwi
    with SafetyGuard(bus, SafetyConfig(max_velocity_rad_s=1.0)) as guard, \
            OmniBase(guard, OmniBaseConfig(max_wheel_accel_rad_s2=NO_RAMP)) as base:
        sent = base.send(vx_m_s=0.2, wz_rad_s=1.0)                # wheels far above 1 rad/s: one factor for all
        asked = base.wheel_speeds(BaseVelocity(0.2, 0.0, 1.0))
        ratio = sent.wz_rad_s / 1.0
        assert sent.vx_m_s == pytest.approx(0.2 * ratio, abs=2e-3) and sent.vy_m_s == pytest.approx(0, abs=2e-3)
        assert max(abs(s) for s in asked.values()) * ratio == pytest.approx(1.0, abs=5e-3)


def test_an_estop_input_stops_a_base_on_a_bare_bus_without_waiting_for_a_command(lekiwi):
    sim, bus = lekiwi
    estop = threading.Event()
    with OmniBase(bus, OmniBaseConfig(watchdog_s=2.0, max_wheel_accel_rad_s2=NO_RAMP), estop=estop.is_set) as base:
        base.send(wz_rad_s=1.0)
        estop.set()
        deadline = time.monotonic() + 5.0
        while base.moving:                                      # the watchdog looks every watchdog_s / 4
            assert time.monotonic() < deadline, "the e-stop input did not stop the wheels"
            time.sleep(0.02)
        assert goals(bus) == dict.fromkeys(WHEEL_IDS, 0) and base.watchdog_stops == 0
        with pytest.raises(EStopLatchedError, match="the e-stop is active: the base does not drive"):
            base.send(wz_rad_s=1.0)
        assert goals(bus) == dict.fromkeys(WHEEL_IDS, 0)


def test_the_ramp_limits_each_change_by_the_elapsed_time_and_keeps_its_direction():
    base = offline_base(OmniBaseConfig(max_wheel_accel_rad_s2=10.0))
    target = base.limit(base.wheel_speeds(BaseVelocity(0.2, 0.1, 0.5)))
    first = base.ramp(target, 0.05)                             # from rest: 10 rad/s^2 x 50 ms
    assert max(abs(s) for s in first.values()) == pytest.approx(0.5)
    assert len({round(first[w] / target[w], 12) for w in target}) == 1     # one factor: the heading is kept
    late = base.ramp(target, 30.0)                              # a long pause counts as ACCEL_STEP_MAX_S
    assert max(abs(s) for s in late.values()) == pytest.approx(10.0 * ACCEL_STEP_MAX_S)
    small = base.wheel_speeds(BaseVelocity(0.001, 0, 0))
    assert base.ramp(small, 0.05) == pytest.approx(small)       # within the step: sent as asked


def test_full_reverse_is_ramped_not_sent_in_one_command(lekiwi):
    sim, bus = lekiwi
    with OmniBase(bus, OmniBaseConfig(max_wheel_accel_rad_s2=10.0)) as base:
        deadline = time.monotonic() + 5.0
        while (sent := base.send(vx_m_s=0.2)).vx_m_s < 0.199:   # 3.5 rad/s wheels: ~0.35 s of ramp
            assert time.monotonic() < deadline, f"the base never reached 0.2 m/s: {sent}"
            time.sleep(0.02)
        before = dict(base._sent_rad_s)
        sent = base.send(vx_m_s=-0.2)
        after = base._sent_rad_s
        step = max(abs(after[w] - before[w]) for w in WHEEL_IDS)
        assert 0 < step <= 10.0 * ACCEL_STEP_MAX_S + 0.01         # not the 7 rad/s of full reverse at once
        assert sent.vx_m_s > 0.1 and sent.vy_m_s == pytest.approx(0, abs=2e-3)
        assert sent.wz_rad_s == pytest.approx(0, abs=2e-2)        # still straight, just slower
        base.stop()                                             # stops are immediate
        assert goals(bus) == dict.fromkeys(WHEEL_IDS, 0)


def test_an_estop_input_that_raises_stops_the_wheels_and_the_watchdog_lives_on(lekiwi):
    """A transient read error of the e-stop input (GPIO, a file) counts as pressed; it must not kill the watchdog
    that stops the wheels when commands stop."""
    sim, bus = lekiwi
    reads = []

    def flaky():
        reads.append(threading.current_thread().name)
        if threading.current_thread().name == "base-watchdog" and reads.count("base-watchdog") == 1:
            raise OSError("gpio read failed")
        return False

    with OmniBase(bus, OmniBaseConfig(watchdog_s=0.4, max_wheel_accel_rad_s2=NO_RAMP), estop=flaky) as base:
        base.send(wz_rad_s=1.0)
        deadline = time.monotonic() + 5.0
        while base.moving:
            assert time.monotonic() < deadline, "the wheels kept driving"
            time.sleep(0.02)
        assert base._watchdog.is_alive() and goals(bus) == dict.fromkeys(WHEEL_IDS, 0)
        base.send(wz_rad_s=1.0)                 # and it still stops them once commands stop
        while base.moving:
            assert time.monotonic() < deadline + 5.0, "the watchdog died"
            time.sleep(0.02)


def test_after_the_motors_own_bus_watchdog_stopped_them_the_base_ramps_from_standstill(start_sim, bus_for):
    """A Dynamixel bus watchdog shorter than the base's stops the wheels unseen; the next command must ramp up from
    standstill, not jump to the old speed."""
    sim = start_sim("dynamixel", ids=WHEEL_IDS.values())
    motors = {name: Motor(i, "xl430-w250", mode="velocity") for name, i in WHEEL_IDS.items()}
    with bus_for(sim, motors, bus_watchdog_s=0.1) as bus:
        with OmniBase(bus, OmniBaseConfig(watchdog_s=2.0, max_wheel_accel_rad_s2=10.0)) as base:
            deadline = time.monotonic() + 5.0
            while base.send(wz_rad_s=1.0).wz_rad_s < 0.99:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            time.sleep(0.3)                     # past the bus watchdog, within the base's
            before = max(abs(v) for v in base._sent_rad_s.values())
            base.send(wz_rad_s=1.0)
            after = max(abs(v) for v in base._sent_rad_s.values())
            assert before > 2.0 and after <= 10.0 * ACCEL_STEP_MAX_S + 0.03     # + one raw unit of velocity
