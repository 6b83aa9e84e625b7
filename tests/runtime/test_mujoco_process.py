"""The MuJoCo robot in a process of its own: the real driver on its bus, its camera through shared memory, the
episode it starts in and how it is judged, a whole run that reports the task, and a child that dies or stops."""
import dataclasses
import math
import multiprocessing
import os
import signal

import numpy as np
import pytest

from edgeact.drivers.cameras.base import CameraError
from edgeact.drivers.motors.bus import MotorBusError
from edgeact.runtime.errors import ConfigError
from edgeact.runtime.robot_config import robot_config_from_dict
from edgeact.runtime.sim_robot import (CENTRE_TICKS, episode_config_dict, make_robot_camera, mujoco_robot_config_dict,
                                       sim_robot_config_dict, start_sim_bus)

pytest.importorskip("mujoco", reason="the MuJoCo simulator needs mujoco (pip install mujoco==4.0.0)")

from edgeact.drivers.sim.task import reset_world, sample_episode  # noqa: E402
from tests.drivers.test_mujoco_robot import wait_for  # noqa: E402
from edgeact.runtime.sim_mujoco import (MujocoProcessCamera, MujocoSimProcess, TaskTracker,  # noqa: E402
                                        servo_joints)

pytestmark = pytest.mark.timeout(60)

SEED = 7
TICK_RAD = 2 * math.pi / 4096
FIXTURE_WORLD = "tests"         # the shared process's world name: a run_robot beside it starts "default"


def episode_config(template="move_to", policy=None, **robot_fields):
    base = mujoco_robot_config_dict(**({"policy": policy} if policy else {}))
    data = episode_config_dict(base, SEED, template)
    data["robot"].update(robot_fields)
    return robot_config_from_dict(data)


@pytest.fixture(scope="module")
def started():
    """(config, the simulator process) started once for the module, in episode SEED of "move_to"."""
    config = episode_config()
    sim = MujocoSimProcess(servo_joints(config.robot), config.robot.baud_rate, task=(SEED, "move_to"),
                           world_name=FIXTURE_WORLD)
    yield config, sim
    sim.stop()


def test_the_episode_and_its_report_at_the_start(started):
    config, sim = started
    episode = sample_episode(SEED, "move_to")
    assert config.instruction == episode.instruction and config.robot.task.seed == SEED
    report = sim.task_report()
    assert report["episode"] == episode.to_dict()
    assert report["success"] is False and report["first_success_s"] is None
    assert 0.0 <= report["sim_time_s"] < 60.0
    assert report["outcome"]["target_displacement_m"] == pytest.approx([0.0, 0.0, 0.0], abs=2e-3)
    assert report["outcome"]["max_other_displacement_m"] < 2e-3 and len(report["outcome"]["ee_to_target_m"]) == 3
    assert report["outcome"]["failure"] == "block not reached"        # the arm at its start, away from the block


def test_the_driver_reads_the_episode_arm_start(started):
    config, sim = started
    assert sim.running and sim.pid != os.getpid()
    start = sample_episode(SEED, "move_to").arm_start_rad
    with config.robot.make_bus(sim.port) as bus:
        read = bus.read_state().position_rad
        raw = bus.read("present_position", "shoulder_pan")
    assert {j: read[j] for j in start} == pytest.approx(start, abs=2 * TICK_RAD)
    # The calibration: joint zero sits at the centre tick.
    assert raw == pytest.approx(CENTRE_TICKS + start["shoulder_pan"] / TICK_RAD, abs=1.5)


def test_a_goal_through_the_driver_moves_the_joint_in_the_childs_world(started):
    config, sim = started
    with config.robot.make_bus(sim.port) as bus:
        bus.enable_torque()
        goal = bus.read_state().position_rad["elbow_flex"] + 0.3
        sent = bus.send({"elbow_flex": goal})
        assert sent["elbow_flex"] == pytest.approx(goal, abs=2 * TICK_RAD)
        assert wait_for(lambda: abs(sim.joint_positions()["elbow_flex"] - goal) < 0.03), sim.joint_positions()


def test_the_camera_renders_the_childs_world_in_metres(started):
    from edgeact.drivers.cameras.mujoco_camera import MujocoCameraConfig, MujocoRgbdRenderer
    from edgeact.drivers.sim.mujoco_robot import MujocoWorld

    config = MujocoCameraConfig(name="front", camera="front", world=FIXTURE_WORLD, width=160, height=120, fps=15.0)
    with pytest.raises(CameraError, match="no camera 'nowhere' in the MuJoCo scene"):     # raised there, named here
        MujocoProcessCamera(dataclasses.replace(config, camera="nowhere")).connect()
    with MujocoProcessCamera(config) as camera:
        frames = [camera.next_frame() for _ in range(2)]
        assert camera.intrinsics.width == 160 and camera.intrinsics.height == 120
        with pytest.raises(CameraError, match="already renders a connected camera"):
            MujocoProcessCamera(config).connect()
    assert frames[0].frame_number < frames[1].frame_number
    frame = frames[1]
    assert frame.color.shape == (120, 160, 3) and frame.depth_m.shape == (120, 160)
    assert frame.depth_m.dtype == np.float32
    # The same episode rendered here: the table and the blocks at the same depths (the arm has moved since).
    world = MujocoWorld()
    reset_world(world, sample_episode(SEED, "move_to"))
    renderer = MujocoRgbdRenderer(world, "front", 160, 120)
    try:
        _, want_depth_m, _ = renderer.render()
    finally:
        renderer.close()
    assert np.mean(np.abs(frame.depth_m - want_depth_m) < 0.005) > 0.8
    assert 0.2 < float(np.median(frame.depth_m[frame.depth_m > 0])) < 3.0


def test_the_first_success_is_the_first_judgement_that_holds():
    from edgeact.drivers.sim.mujoco_robot import MujocoWorld

    world = MujocoWorld()       # not started: stepped by hand
    episode = sample_episode(5, "push_left")
    reset_world(world, episode)
    tracker = TaskTracker(world, episode)
    tracker.poll()
    assert tracker.first_success_s is None and tracker.due_in_s() == pytest.approx(0.1)
    world.step(round(0.25 / world.timestep_s))
    start = episode.block_positions_m[episode.target_block]
    world.set_body_pose(episode.target_block, start + [0.0, 0.06, 0.0])
    world.step(round(0.02 / world.timestep_s))
    tracker.poll()
    assert tracker.first_success_s == pytest.approx(0.27, abs=world.timestep_s)
    report = tracker.report()
    assert report["success"] and report["first_success_s"] == tracker.first_success_s
    assert report["outcome"]["target_displacement_m"][1] == pytest.approx(0.06, abs=0.01)

    # The loop starts later than the reset (the robot stack loads meanwhile): times count from its start.
    tracker.mark_start()
    assert tracker.first_success_s is None
    world.step(round(0.1 / world.timestep_s))
    tracker.poll()
    assert tracker.first_success_s == pytest.approx(0.1, abs=world.timestep_s)
    assert tracker.report()["sim_time_s"] == pytest.approx(0.1, abs=world.timestep_s)
    # After the success the schedule goes on: the simulator's request loop waits for the next judgement instead
    # of polling without a pause (it spun a core for the rest of every successful episode).
    assert tracker.due_in_s() > 0
    # Physics that fell behind the wall clock (a loaded machine) is said in the report and the run's table,
    # counted from the loop's start.
    from edgeact.runtime.commands_loop import task_rows

    assert tracker.report()["sim_lag_skips"] == 0
    assert not any(name == "simulator" for name, _ in task_rows(tracker.report()))
    world.lag_skips += 3
    assert tracker.report()["sim_lag_skips"] == 3
    assert any(name == "simulator" and "fell behind real time 3 times" in text
               for name, text in task_rows(tracker.report()))


def test_a_move_to_tracked_succeeds_after_the_end_effector_stayed_over_the_block():
    from types import SimpleNamespace

    from edgeact.drivers.sim.mujoco_robot import MujocoWorld

    world = MujocoWorld()       # not started: stepped by hand
    episode = sample_episode(8, "move_to")
    reset_world(world, episode)
    tracker = TaskTracker(world, episode)
    over = [False, True, True, False, True, True, True, True, True, True]   # the predicate at 0.0, 0.1, ... s
    tracker._evaluate = lambda w, e: SimpleNamespace(success=over[round(float(w.data.time) / 0.1)])
    for _ in range(9):
        tracker.poll()
        world.step(round(0.1 / world.timestep_s))
    assert tracker.first_success_s is None                  # over the block 0.1-0.2 s, then from 0.4 s: 0.4 s so far
    tracker.poll()
    assert tracker.first_success_s == pytest.approx(0.9, abs=2 * world.timestep_s)


def test_a_run_reports_the_task_and_the_memory_of_control_and_sim():
    from edgeact.runtime.loop import run_robot

    # Every action: 5 mm back toward the base, gripper open.
    policy = {"type": "scripted", "chunk_size": 8, "latency_s": 0.05, "amplitude": 0.0,
              "offset": [-0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]}
    config = episode_config(policy=policy)
    config.limits.watchdog_timeout_s = 2.0      # generous: a loaded test machine must not trip it by accident
    config.watchdog.control_stall_s = 1.5
    children_before = {p.pid for p in multiprocessing.active_children()}     # the module's shared simulator
    result = run_robot(config, 2.0)
    assert result.reason == "duration" and result.plans >= 3, result
    assert set(result.peak_rss_bytes) == {"control", "sim"}     # the camera renders in the simulator's process
    task = result.task
    assert task["episode"] == sample_episode(SEED, "move_to").to_dict()
    assert task["success"] is False and task["first_success_s"] is None     # it moved away from the block
    assert 1.9 < task["sim_time_s"] < 2.6         # from the loop's start: the 2 s run, not the set-up before it
    assert {p.pid for p in multiprocessing.active_children()} == children_before      # the run's simulator ended


@pytest.mark.parametrize("task, message", [
    ({"seed": -1}, r"robot\.task\.seed: must be a non-negative integer"),
    ({"seed": "7"}, r"robot\.task\.seed: must be an integer"),
    ({"seed": 7, "template": "push_up"}, r"robot\.task\.template: must be one of move_to, push_left, push_right"),
    ({"seed": 7, "colour": "red"}, r"robot\.task: unknown key 'colour'"),
    ({"template": "move_to"}, r"robot\.task: missing field\(s\) seed"),
])
def test_a_bad_task_names_its_field(task, message):
    data = mujoco_robot_config_dict()
    data["robot"]["task"] = task
    with pytest.raises(ConfigError, match=message):
        robot_config_from_dict(data)


def test_a_task_is_for_the_mujoco_robot_and_an_explicit_instruction_stays():
    data = sim_robot_config_dict()
    data["robot"]["task"] = {"seed": 1}
    with pytest.raises(ConfigError, match=r"robot\.task: episodes are of the MuJoCo simulated robot"):
        robot_config_from_dict(data)
    data = episode_config_dict(mujoco_robot_config_dict(), 3, None)
    assert data["instruction"] == sample_episode(3).instruction and data["robot"]["task"]["template"] is None
    data["instruction"] = "wave"
    assert robot_config_from_dict(data).instruction == "wave"


def test_in_process_on_request_starting_in_the_episode():
    from edgeact.drivers.sim.mujoco_robot import running_world
    from edgeact.drivers.sim.mujoco_servo_bus import MujocoServoBus

    from edgeact.drivers.cameras.mujoco_camera import MujocoCamera

    config = episode_config(sim_process=False)
    assert type(make_robot_camera(config)) is MujocoCamera     # renders the world in this process
    with start_sim_bus(config.robot) as sim:
        assert isinstance(sim, MujocoServoBus) and getattr(sim, "task_report", None) is None
        start = sample_episode(SEED, "move_to").arm_start_rad
        assert running_world("default").joint_positions(list(start)) == pytest.approx(start, abs=0.02)


def test_the_child_is_gone_after_stop():
    config = robot_config_from_dict(mujoco_robot_config_dict())
    assert config.robot.sim_in_own_process and config.robot.task is None
    with start_sim_bus(config.robot) as sim:
        assert isinstance(sim, MujocoSimProcess) and sim.task_report() is None
        assert isinstance(make_robot_camera(config), MujocoProcessCamera)
        pid = sim.pid
    assert not sim.running and pid not in [p.pid for p in multiprocessing.active_children()]
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(CameraError, match="no MuJoCo simulator process for world 'default' is running"):
        make_robot_camera(config).connect()


def test_a_simulator_that_cannot_start_says_why():
    from edgeact.drivers.sim.mujoco_servo_bus import ServoJoint

    children_before = {p.pid for p in multiprocessing.active_children()}
    with pytest.raises(ConfigError, match=r"cannot build it: joints \['elbow'\] have no servo"):
        MujocoSimProcess({"elbow": ServoJoint(3)}, 1_000_000, world_name="broken")
    assert {p.pid for p in multiprocessing.active_children()} == children_before


def test_a_killed_child_is_a_clear_error_not_a_hang():
    config = episode_config()
    with start_sim_bus(config.robot) as sim:
        with make_robot_camera(config) as camera:
            camera.next_frame()
            os.kill(sim.pid, signal.SIGKILL)
            with pytest.raises(MotorBusError, match="MuJoCo simulator process .*killed by signal SIGKILL"):
                sim.task_report(timeout_s=10.0)
            with pytest.raises(CameraError, match="MuJoCo simulator process exited .killed by signal SIGKILL"):
                for _ in range(20):     # frames already in the pipe may come first
                    camera.next_frame(timeout_s=5.0)
    assert not sim.running
