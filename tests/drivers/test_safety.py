"""Safety layer: limits, step and velocity limits, the latching e-stop, the watchdog's safe states, exit on Ctrl-C."""
import math
import threading
import time
import uuid

import pytest

from edgeact.drivers.motors.bus import Motor, MotorBusError, MotorCalibration, MotorsBus, MotorState
from edgeact.drivers.motors import damiao_table as dt
from edgeact.drivers.motors.damiao import DamiaoBus, DamiaoBusConfig
from edgeact.drivers.motors.safety import EStopLatchedError, SafetyConfig, SafetyError, SafetyGuard
from edgeact.drivers.sim.damiao_motor import DamiaoSim, SimDamiaoMotor
from edgeact.runtime.errors import ConfigError

pytestmark = pytest.mark.timeout(60)


class FakeBus(MotorsBus):
    """Records every call; `send` returns the goal, cut at `bus_limit_rad` like a bus's calibrated range."""

    def __init__(self, motors=None, bus_limit_rad=math.inf, range_rad=None):
        super().__init__(motors or {"shoulder": Motor(1, "fake"), "elbow": Motor(2, "fake")})
        self.measured = {n: 0.0 for n in self.motors}
        self.bus_limit_rad = bus_limit_rad      # a silent cut, like a bus that does not tell its range
        self.range_rad = range_rad or {}        # the calibrated range the bus tells (position_limits_rad)
        self.calls = []
        self.origins = []
        self._connected = False

    def connect(self):
        self._connected = True
        self.calls.append(("connect", None))

    def disconnect(self, disable_torque=None):
        self._connected = False
        self.calls.append(("disconnect", None))

    @property
    def is_connected(self):
        return self._connected

    def ping(self, motor_id):
        return None

    def scan(self, ids=None):
        return {}

    def read(self, register, motor):
        return 0

    def write(self, register, motor, value):
        self.calls.append(("write", (register, motor, value)))

    def sync_read(self, register, motors=None):
        return {}

    def sync_write(self, register, values):
        pass

    def enable_torque(self, motors=None):
        self.calls.append(("enable_torque", motors))

    def disable_torque(self, motors=None):
        self.calls.append(("disable_torque", motors))

    def read_state(self, motors=None):
        names = list(self.motors) if motors is None else motors
        self.calls.append(("read_state", list(names)))
        return MotorState({n: self.measured[n] for n in names}, {n: 0.0 for n in names}, time.monotonic())

    def send(self, goal_position_rad, origin_rad=None):
        sent = {n: min(max(v, -self.bus_limit_rad), self.bus_limit_rad) for n, v in goal_position_rad.items()}
        self.calls.append(("send", sent))
        self.origins.append(origin_rad)
        return sent

    def position_limits_rad(self, name):
        return self.range_rad.get(name, (-math.inf, math.inf))

    def names_called(self):
        return [c[0] for c in self.calls]


class FakeWheelBus(FakeBus):
    def __init__(self):
        super().__init__({"shoulder": Motor(1, "fake"), "wheel": Motor(2, "fake", mode="velocity")})

    def send_velocity(self, goal_velocity_rad_s):
        assert all(self.motors[n].mode == "velocity" for n in goal_velocity_rad_s), "only wheels take velocities"
        self.calls.append(("send_velocity", dict(goal_velocity_rad_s)))
        return dict(goal_velocity_rad_s)


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def wait_for(predicate, timeout_s=5.0):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


# -- config ------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, message", [
    ({"max_step_rad": -1}, "max_step_rad must be > 0, got -1"),
    ({"max_velocity_rad_s": 0}, "max_velocity_rad_s must be > 0, got 0"),
    ({"watchdog_timeout_s": float("nan")}, "watchdog_timeout_s must be > 0, got nan"),
    ({"safe_state": "brake"}, "safe_state must be one of 'hold', 'torque_off', 'stop', got 'brake'"),
    ({"joint_limits_rad": {"elbow": (1.0, -1.0)}}, r"joint_limits_rad\['elbow'\] must be \(low, high\) in rad with low < high"),
])
def test_bad_safety_config_says_what_is_wrong(kw, message):
    with pytest.raises(ConfigError, match=message):
        SafetyConfig(**kw)


def test_guard_refuses_configs_that_do_not_fit_the_bus():
    with pytest.raises(ConfigError, match=r"joint_limits_rad names unknown joints \['wrist'\]"):
        SafetyGuard(FakeBus(), SafetyConfig(joint_limits_rad={"wrist": (-1, 1)}))
    with pytest.raises(ConfigError, match="safe_state 'stop' stops wheels .* this bus has none"):
        SafetyGuard(FakeBus(), SafetyConfig(safe_state="stop"))
    wheel_on_plain_bus = FakeBus({"wheel": Motor(1, "fake", mode="velocity")})
    with pytest.raises(ConfigError, match=r"wheels \['wheel'\] need a bus with send_velocity"):
        SafetyGuard(wheel_on_plain_bus, SafetyConfig())
    with pytest.raises(ConfigError, match=r"joint_limits_rad\['elbow'\] \(2.0, 3.0\) lies outside the bus's calibrated "
                                          r"range \(-1.000, 1.000\) rad; fix the limits or recalibrate the joint"):
        SafetyGuard(FakeBus(range_rad={"elbow": (-1.0, 1.0)}), SafetyConfig(joint_limits_rad={"elbow": (2.0, 3.0)}))


def test_commands_are_refused_until_the_guard_is_connected():
    bus = FakeWheelBus()
    bus.connect()           # the caller connected the bus, then wrapped it
    guard = SafetyGuard(bus, SafetyConfig(watchdog_timeout_s=0.05))
    for command in (lambda: guard.send({"shoulder": 0.1}), lambda: guard.send_velocity({"wheel": 0.1})):
        with pytest.raises(SafetyError, match=r"not connected, so no watchdog .* call robot.connect\(\) before sending"):
            command()
    assert not {"send", "send_velocity"} & set(bus.names_called())
    with guard:             # connect() arms the watchdog (the bus was already connected)
        guard.send({"shoulder": 0.1})
        assert wait_for(lambda: guard.watchdog_trips == 1)
    with pytest.raises(SafetyError, match="not connected"):
        guard.send({"shoulder": 0.1})


def test_send_velocity_refuses_joints():
    bus = FakeWheelBus()
    with SafetyGuard(bus, SafetyConfig(watchdog_timeout_s=60.0)) as guard:
        with pytest.raises(SafetyError, match=r"\['shoulder'\] are joints \(position mode\), not wheels; .* command them "
                                              "with send"):
            guard.send_velocity({"wheel": 1.0, "shoulder": 3.0})
        assert "send_velocity" not in bus.names_called()
        assert guard.send_velocity({"wheel": 1.0}) == {"wheel": 1.0}


# -- limits, in order --------------------------------------------------------------------

def test_position_limit_then_max_step_then_velocity_limit():
    bus, clock = FakeBus(bus_limit_rad=0.45), Clock()
    with SafetyGuard(bus, SafetyConfig(joint_limits_rad={"elbow": (-0.5, 0.5)}, max_step_rad=0.1,
                                       max_velocity_rad_s=1.0, watchdog_timeout_s=60.0), clock=clock) as guard:
        assert guard.send({"elbow": 2.0}) == {"elbow": 0.0}         # the first command holds the measured 0.0
        assert bus.calls[1:3] == [("read_state", ["elbow"]), ("send", {"elbow": 0.0})]
        clock.t += 1.0
        assert guard.send({"elbow": 2.0}) == {"elbow": pytest.approx(0.1)}        # step binds (velocity allows 1.0)
        clock.t += 1.0
        assert guard.send({"elbow": 2.0}) == {"elbow": pytest.approx(0.2)}
        clock.t += 0.02
        assert guard.send({"elbow": 2.0}) == {"elbow": pytest.approx(0.22)}       # velocity binds: 1 rad/s * 20 ms
        clock.t += 1.0
        assert guard.send({"elbow": -2.0}) == {"elbow": pytest.approx(0.12)}      # back down, one step
        for _ in range(10):
            clock.t += 1.0
            sent = guard.send({"elbow": 2.0})
        assert sent == {"elbow": pytest.approx(0.45)}       # what the bus really sent (its own range), not 0.5
        clock.t += 1.0
        guard.bus.bus_limit_rad = math.inf
        assert guard.send({"elbow": 2.0}) == {"elbow": pytest.approx(0.5)}        # the joint limit holds
        assert bus.names_called().count("read_state") == 1     # later steps start from what was sent
        assert bus.origins[-1] == {"elbow": pytest.approx(0.45)}    # the bus is told where each step starts


def test_first_command_after_a_restart_is_velocity_limited():
    bus, clock = FakeBus(), Clock()
    config = SafetyConfig(max_step_rad=0.2, max_velocity_rad_s=1.0, watchdog_timeout_s=60.0)
    with SafetyGuard(bus, config, clock=clock) as guard:
        restarts = {"start": lambda: None, "enable_torque": guard.enable_torque,
                    "watchdog trip": lambda: guard.go_safe("watchdog", "no command"),
                    "reset_estop": lambda: (guard.trigger_estop(), guard.reset_estop())}
        for what, restart in restarts.items():
            restart()
            bus.measured["elbow"] += 0.5        # the joint moved while nothing commanded it
            clock.t += 10.0                     # long after the previous command
            where = bus.measured["elbow"]
            assert guard.send({"elbow": 9.0}) == {"elbow": pytest.approx(where)}, what    # holds, no 0.2 rad jump
            clock.t += 0.01
            assert guard.send({"elbow": 9.0}) == {"elbow": pytest.approx(where + 0.01)}, what   # 1 rad/s * 10 ms


def test_goals_are_checked():
    with SafetyGuard(FakeBus(), SafetyConfig(watchdog_timeout_s=60.0)) as guard:
        with pytest.raises(SafetyError, match=r"non-finite goal for \['elbow'\]"):
            guard.send({"elbow": float("nan")})
        with pytest.raises(ConfigError, match=r"unknown joints \['wrist'\]"):
            guard.send({"wrist": 0.0})
        assert "send" not in guard.bus.names_called()


# -- e-stop ------------------------------------------------------------------------------

def test_estop_latches_until_released_and_reset():
    bus, estop, trips, clock = FakeBus(), threading.Event(), [], Clock()
    guard = SafetyGuard(bus, SafetyConfig(max_step_rad=1.0, watchdog_timeout_s=60.0), estop=estop,
                        on_trip=trips.append, clock=clock)
    guard.connect()
    bus.measured["elbow"] = 0.3
    guard.send({"elbow": 0.4})
    estop.set()
    with pytest.raises(EStopLatchedError, match=r"e-stop latched .* release the e-stop and call reset_estop\(\)"):
        guard.send({"elbow": 0.5})
    assert guard.estopped and [t.reason for t in trips] == ["estop"]
    assert bus.calls[-2:] == [("read_state", ["shoulder", "elbow"]), ("send", {"shoulder": 0.0, "elbow": 0.3})]  # hold
    estop.clear()
    with pytest.raises(EStopLatchedError):       # releasing the button alone does not resume
        guard.send({"elbow": 0.5})
    with pytest.raises(EStopLatchedError):
        guard.enable_torque()
    estop.set()
    with pytest.raises(SafetyError, match="still active"):
        guard.reset_estop()
    estop.clear()
    guard.reset_estop()
    n_reads = bus.names_called().count("read_state")
    assert guard.send({"elbow": 0.5}) == {"elbow": pytest.approx(0.3)}
    assert bus.names_called().count("read_state") == n_reads + 1    # restarts from the measured position
    clock.t += 0.05
    assert guard.send({"elbow": 0.5}) == {"elbow": pytest.approx(0.45)}    # at the velocity limit: 3 rad/s * 50 ms
    guard.disconnect()


def test_estop_input_is_watched_without_commands_and_goes_torque_off():
    bus, pressed = FakeBus(), [False]
    with SafetyGuard(bus, SafetyConfig(safe_state="torque_off", watchdog_timeout_s=10.0),
                     estop=lambda: pressed[0]) as guard:
        pressed[0] = True
        assert wait_for(lambda: guard.estopped)
        assert ("disable_torque", None) in bus.calls
        with pytest.raises(EStopLatchedError):
            guard.send({"shoulder": 0.0})
    assert bus.calls[-1] == ("disconnect", None)


def test_a_failing_trip_callback_does_not_undo_the_estop():
    def broken(trip):
        raise RuntimeError("logger down")
    guard = SafetyGuard(FakeBus(), SafetyConfig(), on_trip=broken)
    guard.trigger_estop("operator")
    assert guard.estopped and guard.trips[-1].detail == "operator"


# -- watchdog ----------------------------------------------------------------------------

@pytest.mark.parametrize("safe_state, expected", [
    ("hold", [("send_velocity", {"wheel": 0.0}), ("read_state", ["shoulder"]), ("send", {"shoulder": 0.25})]),
    ("torque_off", [("disable_torque", None)]),
    ("stop", [("send_velocity", {"wheel": 0.0})]),          # the arm keeps its last command
])
def test_watchdog_trips_to_the_configured_safe_state(safe_state, expected):
    bus, tripped, trips = FakeWheelBus(), threading.Event(), []
    bus.measured["shoulder"] = 0.2

    def on_trip(trip):
        trips.append(trip)
        tripped.set()
    with SafetyGuard(bus, SafetyConfig(watchdog_timeout_s=0.05, safe_state=safe_state), on_trip=on_trip) as guard:
        guard.send({"shoulder": 0.21})
        bus.measured["shoulder"] = 0.25           # where the arm is when the commands stop
        n_calls = len(bus.calls)
        assert tripped.wait(5.0)
        assert bus.calls[n_calls:] == expected      # the report comes after the safe state, nothing else moved
        assert guard.watchdog_trips == 1 and trips[0].reason == "watchdog" and trips[0].safe_state == safe_state
        assert "no command for" in trips[0].detail and trips[0].error is None
        assert not guard.estopped
        if safe_state == "torque_off":      # the limp arm is not commanded until torque is turned on again
            with pytest.raises(SafetyError, match=r"torque is off on \['shoulder'\] \(the watchdog trip's safe state "
                                                  r"'torque_off': no command for .*call enable_torque\(\) first"):
                guard.send({"shoulder": 0.3})
            assert bus.calls[n_calls:] == expected      # nothing was written
            guard.enable_torque()
        guard.send({"shoulder": 0.3})              # a trip is not latched: the next command resumes ...
        assert bus.calls[-2][0] == "read_state"    # ... from the measured position
    assert trips[-1].reason == "exit" and bus.calls[-1] == ("disconnect", None)


def test_watchdog_stays_quiet_while_commands_arrive_and_trips_once_they_stop():
    bus = FakeBus()
    with SafetyGuard(bus, SafetyConfig(watchdog_timeout_s=0.5, max_step_rad=1.0)) as guard:
        end = time.monotonic() + 1.2
        while time.monotonic() < end:
            guard.send({"shoulder": 0.0})
            time.sleep(0.01)
        assert guard.watchdog_trips == 0
        assert wait_for(lambda: guard.watchdog_trips == 1)
        time.sleep(0.6)
        assert guard.watchdog_trips == 1          # one trip per silence, not one per poll


# -- over the real Damiao driver and the simulated motors ----------------------------------------

@pytest.fixture
def channel():
    return f"dms-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def sim(channel):
    with DamiaoSim(channel, [SimDamiaoMotor(0x01, "dm4310"), SimDamiaoMotor(0x02, "dm4340")]) as s:
        yield s
    assert s.handler_errors == []


def damiao(channel):
    return DamiaoBus({"shoulder": Motor(0x01, "dm4310"), "elbow": Motor(0x02, "dm4340")},
                     config=DamiaoBusConfig(interface="virtual", channel=channel, timeout_s=0.2))


def test_guarded_damiao_arm_moves_in_limited_steps(sim, channel):
    config = SafetyConfig(joint_limits_rad={"shoulder": (-0.4, 0.4)}, max_step_rad=0.05, watchdog_timeout_s=5.0)
    with SafetyGuard(damiao(channel), config) as robot:
        robot.enable_torque()
        previous = robot.read_state().position_rad["shoulder"]
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            sent = robot.send({"shoulder": 1.0})["shoulder"]
            assert sent - previous <= 0.05 + 1e-3
            previous = sent
            if abs(robot.read_state().position_rad["shoulder"] - 0.4) < 0.01:
                break
        assert sent == pytest.approx(0.4, abs=1e-3)                    # the joint limit, not the goal
        assert sim.motor(1).position_rad == pytest.approx(0.4, abs=0.01)


@pytest.mark.parametrize("safe_state", ["hold", "torque_off"])
def test_watchdog_on_damiao_holds_or_turns_torque_off(channel, safe_state):
    tripped = threading.Event()
    config = SafetyConfig(watchdog_timeout_s=0.1, safe_state=safe_state, max_step_rad=1.0)
    # a heavy joint is still far from its goal when the commands stop, so holding differs from the last goal
    heavy = [SimDamiaoMotor(0x01, "dm4310", inertia_kg_m2=5.0), SimDamiaoMotor(0x02, "dm4340", inertia_kg_m2=5.0)]
    with DamiaoSim(channel, heavy) as sim:
        with SafetyGuard(damiao(channel), config, on_trip=lambda t: tripped.set()) as robot:
            robot.enable_torque()
            robot.send({"shoulder": 1.0, "elbow": -0.2})
            assert tripped.wait(5.0)
            with sim.lock:
                shoulder = sim.motor(1)
                if safe_state == "hold":
                    assert shoulder.enabled and sim.motor(2).enabled
                    assert shoulder.command.kp > 0 and shoulder.command.position_rad < 0.5
                    assert shoulder.command.position_rad == pytest.approx(shoulder.position_rad, abs=0.1)
                else:
                    assert not shoulder.enabled and not sim.motor(2).enabled
        assert sim.handler_errors == []


def test_a_frame_the_can_interface_refuses_does_not_stop_the_others_torque_off(sim, channel):
    """A full transmit queue (SocketCAN's ENOBUFS) on one motor's disable frame: the others still get theirs, and
    the refused one is sent again with the resends."""
    import can

    bus = damiao(channel)
    with SafetyGuard(bus, SafetyConfig(safe_state="torque_off", watchdog_timeout_s=60.0)) as robot:
        robot.enable_torque()
        robot.send({"shoulder": 0.0, "elbow": 0.0})
        raw, refused = bus._link._bus, []
        real_send = raw.send

        def full_queue_once(msg, timeout=None):
            if msg.arbitration_id == 0x01 and bytes(msg.data) == dt.system_frame(dt.CMD_DISABLE) and not refused:
                refused.append(msg)
                raise can.CanOperationError("Failed to transmit: No buffer space available", 105)
            return real_send(msg, timeout=timeout)
        raw.send = full_queue_once
        robot.trigger_estop("operator")
        raw.send = real_send
        assert refused and robot.trips[-1].error is None
        with sim.lock:
            assert not sim.motor(1).enabled and not sim.motor(2).enabled


def test_a_can_interface_that_refuses_every_send_names_the_motors_and_the_fix(sim, channel):
    import can

    bus = damiao(channel)
    with bus:
        raw = bus._link._bus
        real_send = raw.send

        def full_queue(msg, timeout=None):
            raise can.CanOperationError("Failed to transmit: No buffer space available", 105)
        raw.send = full_queue
        with pytest.raises(MotorBusError, match=r"'shoulder' \(CAN id 0x01\), motor 'elbow' \(CAN id 0x02\): disable not sent: "
                                                r".*transmit queue is full .*txqueuelen 1000"):
            bus.disable_torque()
        raw.send = real_send


def test_hold_holds_the_joints_when_the_wheels_fail_and_each_joint_when_one_is_silent():
    class Failing(FakeWheelBus):
        def __init__(self):
            super().__init__()
            self.motors["elbow"] = Motor(3, "fake")
            self.measured.update(shoulder=0.3, elbow=-0.2)
            self.silent = set()

        def send_velocity(self, goal):
            super().send_velocity(goal)
            raise MotorBusError("motor 'wheel' stopped answering")

        def read_state(self, motors=None):
            state = super().read_state(motors)
            if self.silent & set(motors or self.motors):
                raise MotorBusError(f"{sorted(self.silent)} stopped answering")
            return state

    bus = Failing()
    guard = SafetyGuard(bus, SafetyConfig(safe_state="hold"))
    trip = guard.go_safe("watchdog", "commands stopped")
    assert ("send", {"shoulder": 0.3, "elbow": -0.2}) in bus.calls        # held although the wheel failed
    assert "motor 'wheel' stopped answering" in trip.error
    bus.calls.clear()
    bus.silent = {"elbow"}
    trip = guard.go_safe("watchdog", "commands stopped")
    assert ("send", {"shoulder": 0.3}) in bus.calls                          # the others still hold
    assert "could not hold 1 of 2 joints ('elbow': ['elbow'] stopped answering); the others hold" in trip.error


def test_keyboard_interrupt_in_the_guard_block_ends_with_torque_off(sim, channel):
    with pytest.raises(KeyboardInterrupt):
        with SafetyGuard(damiao(channel), SafetyConfig(watchdog_timeout_s=5.0)) as robot:
            robot.enable_torque()
            robot.send({"shoulder": 0.1, "elbow": 0.1})
            raise KeyboardInterrupt
    assert not sim.motor(1).enabled and not sim.motor(2).enabled
    assert robot.trips[-1].reason == "exit" and "KeyboardInterrupt" in robot.trips[-1].detail
    assert not any(t.name == "safety-watchdog" for t in threading.enumerate())


# -- a joint outside its calibrated range: walked back, never jumped --------------------------------

TICK_RAD = 2 * math.pi / 4096


def test_joint_outside_its_calibrated_range_walks_back_in_limited_steps(start_sim, bus_for):
    sim = start_sim("feetech", ids=[1])
    sim.servo(1).position_ticks = 3600      # sagged past range_max (3072) while torque was off
    cal = {"elbow": MotorCalibration(homing_offset=2048, range_min=1024, range_max=3072)}
    bus, clock = bus_for(sim, {"elbow": Motor(1, "sts3215")}, cal), Clock()
    config = SafetyConfig(max_step_rad=0.05, max_velocity_rad_s=0.5, watchdog_timeout_s=60.0)
    with SafetyGuard(bus, config, clock=clock) as robot:
        robot.enable_torque()
        goals = []
        for _ in range(5):
            robot.send({"elbow": 0.0})          # the middle of the range
            sim.wait_idle()
            goals.append(sim.register(1, "goal_position"))
            clock.t += 0.02
        assert goals[0] == 3600                 # the first command holds the joint where it is
        steps = [a - b for a, b in zip(goals, goals[1:])]
        assert all(0 < s <= 0.5 * 0.02 / TICK_RAD + 1 for s in steps), goals    # back toward the range, ~6.5 ticks a tick

        robot.go_safe("watchdog", "commands stopped")       # "hold": where the joint is, outside the range too
        sim.wait_idle()
        present = sim.register(1, "present_position")
        assert present > 3400 and abs(sim.register(1, "goal_position") - present) <= 2
    assert bus.position_limits_rad("elbow") == pytest.approx((-1024 * TICK_RAD, 1024 * TICK_RAD))   # what the guard used


def test_damiao_hold_keeps_a_joint_outside_its_range_where_it_is(sim, channel):
    m = dt.MODELS["dm4340"]
    cal = {"elbow": MotorCalibration(homing_offset=32768, range_min=30000, range_max=36000)}   # about ±1.06 rad
    with sim.lock:
        sim.motor(2).position_rad = 2.0
    bus = DamiaoBus({"elbow": Motor(0x02, "dm4340")}, cal,
                    config=DamiaoBusConfig(interface="virtual", channel=channel, timeout_s=0.2))
    clock = Clock()
    with SafetyGuard(bus, SafetyConfig(max_step_rad=0.05, watchdog_timeout_s=60.0), clock=clock) as robot:
        robot.enable_torque()
        robot.go_safe("watchdog", "commands stopped")
        assert sim.motor(2).command.position_rad == pytest.approx(2.0, abs=0.02)     # not the range's edge
        assert robot.send({"elbow": 0.0}) == {"elbow": pytest.approx(2.0, abs=0.02)}
        clock.t += 0.01
        sent = robot.send({"elbow": 0.0})["elbow"]
        assert sent == pytest.approx(2.0 - 0.03, abs=0.02) and sent > (36000 - 32768) * m.rad_per_tick
