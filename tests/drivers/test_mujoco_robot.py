"""The MuJoCo robot behind the simulated servo bus: the real Feetech driver on the pty moves MuJoCo's joints and base."""
import math
import threading
import time

import numpy as np
import pytest

from edgeact.drivers.motors.base import BaseVelocity, OmniBase, OmniBaseConfig
from edgeact.drivers.motors.bus import Motor, MotorCalibration
from edgeact.drivers.motors.serial_bus import make_serial_bus

pytest.importorskip("mujoco", reason="the MuJoCo simulator needs mujoco (pip install mujoco==4.0.0)")

from edgeact.drivers.sim.mujoco_robot import (WHEELS, MujocoWorld, MujocoWorldConfig,  # noqa: E402
                                              MujocoWorldError, running_world)
from edgeact.drivers.sim.mujoco_servo_bus import MujocoServoBus, ServoJoint  # noqa: E402

pytestmark = pytest.mark.timeout(30)

ARM = ("shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper")
THREADS = ("sim-mujoco-physics", "sim-feetech-bus", "base-watchdog")
TICK_RAD = 2 * math.pi / 4096


def wait_for(condition, timeout_s: float = 5.0, poll_s: float = 0.02) -> bool:
    """Poll until `condition()` holds (the physics runs in real time on a loaded machine)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(poll_s)
    return condition()


@pytest.fixture
def no_leaked_threads():
    yield
    leaked = [t.name for t in threading.enumerate() if t.name in THREADS]
    assert not leaked, f"threads outlived their test: {leaked}"


@pytest.fixture
def robot(no_leaked_threads):
    """A started world, a bus whose ids 1-6 are the arm and 7-9 the wheels, and the Feetech driver on it."""
    joints = {name: ServoJoint(i + 1) for i, name in enumerate(ARM)}
    joints |= {name: ServoJoint(7 + i) for i, name in enumerate(WHEELS)}
    motors = {name: Motor(j.id, "sts3215", "velocity" if name in WHEELS else "position") for name, j in joints.items()}
    calibration = {name: MotorCalibration(homing_offset=2048) for name in ARM}
    with MujocoWorld() as world, MujocoServoBus(world, joints) as sim:
        with make_serial_bus("feetech", sim.port, motors, calibration, timeout_s=0.2) as bus:
            yield world, sim, bus


def test_joint_goals_through_the_feetech_driver_move_the_mujoco_joints(robot):
    world, _, bus = robot
    bus.enable_torque(list(ARM))
    goals = {"shoulder_pan": -0.3, "shoulder_lift": 0.4, "elbow_flex": -0.5, "wrist_flex": 0.3, "wrist_roll": 0.6,
             "gripper": 0.5}
    sent = bus.send(goals)
    assert sent == pytest.approx(goals, abs=TICK_RAD)

    def arrived() -> bool:
        q = world.joint_positions(ARM)
        return all(abs(q[j] - goals[j]) < 0.02 for j in ARM)

    assert wait_for(arrived), f"joints at {world.joint_positions(ARM)}, goals {goals}"
    # The driver reads MuJoCo's joint angles through the calibration (a tick is 1.5 mrad).
    q = world.joint_positions(ARM)
    state = bus.read_state(list(ARM))
    for joint in ARM:
        assert state.position_rad[joint] == pytest.approx(q[joint], abs=2 * TICK_RAD + 0.005)


def test_a_servo_moves_at_its_top_speed_toward_a_far_goal():
    world = MujocoWorld(MujocoWorldConfig(servo_speed_rad_s=2.0))
    world.drive("shoulder_pan", torque_on=True, mode="position", goal=1.0)
    world.step(round(0.2 / world.timestep_s))
    q, velocity = world.joint_state("shoulder_pan")
    assert 0.3 < q <= 0.2 * 2.0 and velocity == pytest.approx(2.0, rel=0.05)    # walking, not jumping
    world.step(round(0.5 / world.timestep_s))
    assert world.joint_state("shoulder_pan")[0] == pytest.approx(1.0, abs=0.01)


def test_with_torque_off_joints_ignore_goals_and_gravity_takes_them(robot):
    world, sim, bus = robot
    bus.enable_torque(list(ARM))
    bus.disable_torque(["shoulder_pan", "elbow_flex"])      # the rest hold the ready pose: forearm forward
    # Goals written with torque off are stored by the servo and not followed.
    bus.write("goal_position", "shoulder_pan", 2048 + 400)
    bus.write("goal_position", "elbow_flex", 2048 - 400)      # would lift the forearm
    assert sim.register(1, "goal_position") == 2048 + 400
    # Gravity is not a goal: the unpowered elbow lets the forearm drop until the hand rests on the table
    # (near 0.47 rad). A light hand alone would not drop: the gear friction (frictionloss) holds it.
    assert wait_for(lambda: world.joint_state("elbow_flex")[0] > 0.3, timeout_s=3.0), \
        f"elbow_flex at {world.joint_state('elbow_flex')[0]:.3f} rad: an unpowered elbow should drop the forearm"
    # The pan axis is vertical: gravity does not turn it, and without torque nothing else does.
    assert abs(world.joint_state("shoulder_pan")[0]) < 0.01
    assert abs(bus.read_state(["shoulder_pan"]).position_rad["shoulder_pan"]) < 0.01


def test_wheels_in_velocity_mode_drive_the_base_as_the_omni_kinematics_say(robot):
    world, _, bus = robot
    with OmniBase(bus, OmniBaseConfig(watchdog_s=5.0, max_wheel_accel_rad_s2=1e6)) as base:    # no watchdog stop, no ramp
        sent = base.send(vx_m_s=0.1)
        assert wait_for(lambda: abs(world.data.qvel[0] - 0.1) < 0.005, timeout_s=2.0)
        (x0, y0, yaw0), t0 = world.base_pose(), world.time_s
        assert wait_for(lambda: world.time_s - t0 > 0.5, timeout_s=5.0)
        (x1, y1, yaw1), t1 = world.base_pose(), world.time_s
        assert (x1 - x0) / (t1 - t0) == pytest.approx(sent.vx_m_s, rel=0.03)
        assert abs(y1 - y0) < 1e-3 and abs(yaw1 - yaw0) < 1e-3
        measured = base.read()                              # wheel speeds read back through the driver
        assert measured.vx_m_s == pytest.approx(0.1, rel=0.05) and abs(measured.wz_rad_s) < 0.02

        base.send(wz_rad_s=0.5)
        assert wait_for(lambda: world.base_pose()[2] - yaw1 > 0.1, timeout_s=3.0)
        base.stop()
        assert wait_for(lambda: np.abs(world.data.qvel[:3]).max() < 1e-3, timeout_s=2.0)


def test_a_base_left_without_torque_stops_instead_of_coasting_on(robot):
    """OmniBase.close() sends 0 rad/s and turns torque off a transaction later, often within one physics step: the
    unpowered wheels must stop by their gearbox's friction, as a real base does, not spin on and drive it away."""
    world, _, bus = robot
    base = OmniBase(bus, OmniBaseConfig(watchdog_s=5.0, max_wheel_accel_rad_s2=1e6))
    base.start()
    base.send(vx_m_s=0.1)
    assert wait_for(lambda: abs(world.data.qvel[0] - 0.1) < 0.005, timeout_s=2.0)
    base.close()
    bus.disable_torque(list(WHEELS))                          # and a torque off at speed, straight from the bus
    t0 = world.time_s
    assert wait_for(lambda: world.time_s - t0 > 0.5, timeout_s=5.0)
    x0 = world.base_pose()[0]
    assert wait_for(lambda: world.time_s - t0 > 1.5, timeout_s=5.0)
    assert abs(world.base_pose()[0] - x0) < 0.002 and np.abs(world.data.qvel[:3]).max() < 1e-3


def test_a_non_finite_goal_is_refused_and_leaves_the_robot_driven():
    world = MujocoWorld()
    with pytest.raises(MujocoWorldError, match="goal nan for joint 'elbow_flex' is not a finite number"):
        world.drive("elbow_flex", torque_on=True, mode="position", goal=float("nan"))
    world.drive("shoulder_pan", torque_on=True, mode="position", goal=0.5)
    world.step(round(1.0 / world.timestep_s))
    assert world.joint_state("shoulder_pan")[0] == pytest.approx(0.5, abs=0.01)


def test_the_simulated_wheels_share_omnibase_geometry():
    world = MujocoWorld()
    from edgeact.drivers.motors.feetech import FeetechBusConfig, FeetechMotorsBus

    motors = {name: Motor(7 + i, "sts3215", "velocity") for i, name in enumerate(WHEELS)}
    base = OmniBase(FeetechMotorsBus(FeetechBusConfig(port="/dev/null"), motors))
    for velocity in ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)):
        expected = base.wheel_speeds(BaseVelocity(*velocity))
        np.testing.assert_allclose(world.wheel_matrix @ velocity, [expected[w] for w in WHEELS], atol=1e-4)


def test_a_calibrated_driver_reads_the_joint_angle_whatever_the_horn_offset(no_leaked_threads):
    joint = ServoJoint(id=3, homing_offset=1500, drive_mode=1)
    calibration = {"elbow_flex": MotorCalibration(homing_offset=1500, range_min=0, range_max=4095, drive_mode=1)}
    world = MujocoWorld()
    world.set_joint_positions({"elbow_flex": 0.7})
    with MujocoServoBus(world, {"elbow_flex": joint}) as sim:
        with make_serial_bus("feetech", sim.port, {"elbow_flex": Motor(3, "sts3215")}, calibration) as bus:
            assert sim.register(3, "present_position") == round(1500 - 0.7 / TICK_RAD)
            assert bus.read_state().position_rad["elbow_flex"] == pytest.approx(0.7, abs=TICK_RAD)
            bus.enable_torque()
            bus.send({"elbow_flex": 0.2})
            sim.wait_idle()                                   # a sync write gets no reply: let the bus take it
            world.step(round(0.5 / world.timestep_s))        # no real-time thread: step by hand
            assert world.joint_state("elbow_flex")[0] == pytest.approx(0.2, abs=0.01)


def test_the_world_runs_in_real_time_and_cameras_find_it_by_name(no_leaked_threads):
    world = MujocoWorld(MujocoWorldConfig(name="paced"))
    with pytest.raises(MujocoWorldError, match="no MuJoCo world 'paced' is running"):
        running_world("paced")
    wall_start = time.monotonic()
    with world:
        assert running_world("paced") is world
        with pytest.raises(MujocoWorldError, match="another MuJoCo world named 'paced' is running"):
            MujocoWorld(MujocoWorldConfig(name="paced")).start()
        time.sleep(0.3)
        simulated, wall = world.time_s, time.monotonic() - wall_start
    assert 0.5 * wall < simulated <= wall + 0.01        # never ahead of the clock; behind only under heavy load
    with pytest.raises(MujocoWorldError, match="no MuJoCo world 'paced' is running"):
        running_world("paced")


def test_mistakes_are_named():
    world = MujocoWorld()
    with pytest.raises(MujocoWorldError, match="joints \\['elbow'\\] have no servo in .*scene.xml"):
        MujocoServoBus(world, {"elbow": ServoJoint(1)})
    with pytest.raises(MujocoWorldError, match="mode 'pwm' for joint 'gripper'"):
        world.drive("gripper", torque_on=True, mode="pwm", goal=0.0)
    with pytest.raises(MujocoWorldError, match="body 'table_leg' .*|no body 'table_leg'"):
        world.set_body_pose("table_leg", [0, 0, 0])
    with pytest.raises(MujocoWorldError, match="body 'base' has no free joint"):
        world.set_body_pose("base", [0, 0, 0])
    world.set_body_pose("red_block", [0.4, 0.0, 0.215])
    assert world.body_pose("red_block")[0] == pytest.approx([0.4, 0.0, 0.215])


def test_the_loop_drives_the_mujoco_robot_from_its_sample_config(no_leaked_threads):
    import edgeact.drivers.cameras.mujoco_camera  # noqa: F401  registers the "mujoco" camera type
    from edgeact.runtime.kinematics import ArmKinematics
    from edgeact.runtime.loop import run_robot
    from edgeact.runtime.loop_events import Subscriber
    from edgeact.runtime.robot_config import robot_config_from_dict
    from edgeact.runtime.sim_robot import mujoco_robot_config_dict

    class Record(Subscriber):
        def __init__(self):
            self.commands, self.frames = [], 0

        def on_command(self, event):
            self.commands.append(event)

        def on_frame(self, event):
            self.frames += 1

    # Every action: 5 mm back toward the base (dx = -0.5 x 0.01 m), gripper open; nothing else.
    policy = {"type": "scripted", "chunk_size": 8, "latency_s": 0.05, "amplitude": 0.0,
              "offset": [-0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]}
    config = robot_config_from_dict(mujoco_robot_config_dict(policy=policy))
    record = Record()
    result = run_robot(config, duration_s=1.5, subscribers=[record])
    assert result.clean and result.plans >= 3 and record.frames >= 5, result
    arm = ArmKinematics()
    first, last = (arm.forward(arm.q_from(e.measured_rad)).position_m for e in (record.commands[0],
                                                                                  record.commands[-1]))
    # Back at 5 cm/s or a little more (each new plan starts from where the last one had got to).
    assert 0.03 < first[0] - last[0] < 0.15
    assert abs(last[1] - first[1]) < 0.01 and abs(last[2] - first[2]) < 0.01
    assert record.commands[-1].measured_rad["gripper"] > 0.5
