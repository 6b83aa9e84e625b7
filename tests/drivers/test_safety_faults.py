"""The safety layer when a motor misbehaves, on the simulated Feetech and Dynamixel servos through the real drivers:
one silent or faulted motor does not keep the others powered, a latched e-stop holds against raw register writes,
and an instruction damaged on the way to a motor is sent again like a damaged reply is asked again."""
import pytest

from edgeact.drivers.motors.bus import Motor, MotorBusError, MotorCalibration
from edgeact.drivers.motors.safety import EStopLatchedError, SafetyConfig, SafetyGuard
from edgeact.drivers.motors.serial_bus import make_serial_bus
from edgeact.drivers.sim.servo_bus import SimServoBus

pytestmark = pytest.mark.timeout(60)
MODELS = {"feetech": "sts3215", "dynamixel": "xl430-w250"}
NAMES = ("shoulder", "elbow", "wrist")


def arm(protocol: str, port: str, retries: int = 1):
    motors = {name: Motor(i, MODELS[protocol]) for i, name in enumerate(NAMES, start=1)}
    calibration = {n: MotorCalibration(homing_offset=2048, range_min=1000, range_max=3000, drive_mode=0)
                   for n in motors}
    return make_serial_bus(protocol, port, motors, calibration, timeout_s=0.05, retries=retries)


def torque(sim) -> list[int]:
    sim.wait_idle()
    return [sim.register(i, "torque_enable") for i in (1, 2, 3)]


@pytest.mark.parametrize("protocol", ["feetech", "dynamixel"])
@pytest.mark.parametrize("fault", ["silent", "overload"])
def test_torque_off_reaches_every_motor_that_can_hear_it(protocol, fault):
    """The e-stop's safe state "torque_off" with the wrist unpowered or reporting overload: the shoulder and the
    elbow go limp all the same, and the trip names the wrist."""
    with SimServoBus(protocol, ids=[1, 2, 3]) as sim:
        bus = arm(protocol, sim.port)
        guard = SafetyGuard(bus, SafetyConfig(safe_state="torque_off"))
        guard.connect()
        try:
            guard.enable_torque()
            guard.send({name: 0.0 for name in NAMES})
            if fault == "silent":
                sim.servo(3).powered = False
            else:
                sim.inject_error(3, 0x20)
            guard.trigger_estop("operator")
            trip = guard.trips[-1]
            assert trip.error is not None and "'wrist' (id 3)" in trip.error
            assert torque(sim)[:2] == [0, 0]
            assert torque(sim)[2] == (1 if fault == "silent" else 0)       # an unpowered motor hears nothing
        finally:
            guard._watchdog.stop()
            bus.disconnect(disable_torque=False)


def test_a_latched_estop_refuses_raw_writes_that_could_move_the_arm():
    with SimServoBus("feetech", ids=[1, 2, 3]) as sim:
        guard = SafetyGuard(arm("feetech", sim.port), SafetyConfig(safe_state="torque_off"))
        with guard:
            guard.enable_torque()
            guard.trigger_estop("operator")
            for write in (lambda: guard.write("torque_enable", "elbow", 1),
                          lambda: guard.write("goal_position", "elbow", 4000),
                          lambda: guard.sync_write("goal_position", {"elbow": 4000, "wrist": 100}),
                          lambda: guard.sync_write("torque_enable", {"elbow": 0, "wrist": 1})):
                with pytest.raises(EStopLatchedError, match="e-stop latched"):
                    write()
            guard.write("torque_enable", "elbow", 0)            # torque off stays allowed: it is safe
            guard.sync_write("torque_enable", {"shoulder": 0, "wrist": 0})
            assert torque(sim) == [0, 0, 0] and sim.register(2, "goal_position") != 4000


def test_an_instruction_damaged_on_the_way_is_sent_again():
    """Protocol 2.0 motors answer a packet whose CRC does not match with error 3 and execute nothing: noise on the
    way out, retried within the bus's retries as noise on the way back is."""
    with SimServoBus("dynamixel", ids=[1, 2, 3]) as sim:
        with arm("dynamixel", sim.port, retries=2) as bus:
            sim.faults.damaged_instruction = 1
            assert set(bus.read_state().position_rad) == set(NAMES)
            before = len(sim.received)
            sim.faults.damaged_instruction = 1
            bus.write("goal_position", "elbow", 2100)
            assert sim.register(2, "goal_position") == 2100 and len(sim.received) - before == 2   # sent twice
        with arm("dynamixel", sim.port, retries=0) as bus:
            sim.faults.damaged_instruction = 1
            with pytest.raises(MotorBusError, match=r"'elbow' \(id 2\) refused the instruction: CRC error"):
                bus.write("goal_position", "elbow", 2200)
