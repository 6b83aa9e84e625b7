"""The simulated robot in processes of its own: its bus with the real driver, its camera through shared memory,
the config that chooses them, and a whole run with every piece out of the control process (memory reported)."""
import json
import logging
import multiprocessing
import os

import numpy as np
import pytest

from edgeact.drivers.cameras.base import CameraError, CameraTimeoutError
from edgeact.drivers.cameras.synthetic import SyntheticCamera, SyntheticConfig
from edgeact.drivers.sim.servo_bus import SimServoBus
from edgeact.runtime import commands_loop
from edgeact.runtime.demo import measure
from edgeact.runtime.errors import ConfigError
from edgeact.runtime.loop import request_realtime
from edgeact.runtime.robot_config import robot_config_from_dict
from edgeact.runtime.sim_camera import FrameRing
from edgeact.runtime.sim_robot import (ProcessCamera, SimBusProcess, make_robot_camera, sim_robot_config_dict,
                                       start_sim_bus)
from edgeact.runtime.telemetry import run_summary
from tests.runtime.process_helpers import FailingCamera, FailingCameraConfig

pytestmark = pytest.mark.timeout(60)


def robot_section(**fields):
    data = sim_robot_config_dict()["robot"]
    return robot_config_from_dict(sim_robot_config_dict(robot={**data, **fields})).robot


def test_the_bus_in_its_own_process_moves_under_the_real_driver_and_ends_with_torque_off():
    section = robot_section()
    with start_sim_bus(section) as sim:
        assert isinstance(sim, SimBusProcess) and sim.running and sim.pid != os.getpid()
        bus = section.make_bus(sim.port)
        bus.connect()
        try:
            start = bus.read_state().position_rad
            assert start == pytest.approx(dict.fromkeys(section.motors, 0.0), abs=0.01)   # each motor at its zero
            bus.enable_torque()
            assert [sim.register(m.id, "torque_enable") for m in section.motors.values()] == [1] * 6
            sent = bus.send({"elbow_flex": 0.3})
            assert sent["elbow_flex"] == pytest.approx(0.3, abs=0.01)
            goal_ticks = bus.read("goal_position", "elbow_flex")   # answered after the write: the sim has applied it
            assert goal_ticks == pytest.approx(2048 + 0.3 / (2 * np.pi / 4096), abs=2)
            assert sim.register(3, "goal_position") == goal_ticks
        finally:
            bus.disconnect()        # the driver's exit turns torque off
        assert [sim.register(m.id, "torque_enable") for m in section.motors.values()] == [0] * 6
        with pytest.raises(KeyError, match="0 simulated motors have id 42"):
            sim.register(42, "torque_enable")
    assert not sim.running


def test_in_process_on_request_and_out_of_it_by_default_for_both_physics():
    with start_sim_bus(robot_section(sim_process=False)) as sim:
        assert isinstance(sim, SimServoBus)
    assert robot_section(physics="mujoco").sim_in_own_process
    assert not robot_section(physics="mujoco", sim_process=False).sim_in_own_process


@pytest.mark.parametrize("fields, message", [
    ({"bus": "feetech", "port": "/dev/ttyACM0", "sim_process": True}, "sim_process: is for the simulated bus"),
    ({"task": {"seed": 1}}, "task: episodes are of the MuJoCo simulated robot"),
])
def test_sim_process_is_refused_where_it_cannot_apply(fields, message):
    with pytest.raises(ConfigError, match=message):
        robot_section(**fields)


def test_control_priority_is_a_fifo_priority_or_null():
    data = sim_robot_config_dict(rates={"control_hz": 100.0, "control_priority": None})
    assert robot_config_from_dict(data).rates.control_priority is None
    data["rates"]["control_priority"] = 0
    with pytest.raises(ConfigError, match=r"rates.control_priority: must be in 1..99"):
        robot_config_from_dict(data)


def test_the_camera_process_hands_over_the_frames_the_camera_renders():
    config = SyntheticConfig(width=64, height=48, fps=30.0)
    reference = SyntheticCamera(config)
    with ProcessCamera(config) as camera:
        assert camera.intrinsics == config.intrinsics()
        frames = [camera.next_frame() for _ in range(3)]
    for frame in frames:
        want = reference.render(frame.frame_number)
        np.testing.assert_array_equal(frame.color, want.color)
        np.testing.assert_array_equal(frame.depth_m, want.depth_m)
    assert [f.frame_number for f in frames] == sorted({f.frame_number for f in frames})


def test_the_camera_process_reports_why_its_camera_stopped():
    # The child's capture thread fails: the parent raises that, not "no frame ... is the camera process alive?".
    with ProcessCamera(FailingCameraConfig(name="front", width=32, height=24, fail_after=3)) as camera:
        with pytest.raises(CameraError, match="camera 'front' stopped: GL context lost") as err:
            for _ in range(20):
                camera.next_frame(timeout_s=2)
        assert not isinstance(err.value, CameraTimeoutError) and isinstance(err.value.__cause__, RuntimeError)


def _messages(conn, until: str) -> list[str]:
    kinds = []
    while not kinds or kinds[-1] != until:
        assert conn.poll(5), f"no {until!r} message after {kinds}"
        kinds.append(conn.recv()[0])
    return kinds


def test_a_ring_tells_why_its_camera_stopped_only_after_ready():
    parent, child = multiprocessing.Pipe()
    ring = FrameRing(child)
    try:
        ring.on_stop(RuntimeError("died while connecting"))     # before "ready": the parent must hear that first
        assert not parent.poll(0)
        ring.open(FailingCameraConfig(width=32, height=24).intrinsics())
        assert parent.recv()[0] == "ready"
        kind, error = parent.recv()
        assert kind == "error" and str(error) == "died while connecting"
        ring.on_stop(CameraError("camera 'front' stopped delivering after 4 frames"))
        assert parent.recv()[1].args == ("camera 'front' stopped delivering after 4 frames",)
    finally:
        ring.close()


def test_the_mujoco_processs_camera_server_reports_why_its_camera_stopped(monkeypatch):
    from edgeact.drivers.cameras import mujoco_camera
    from edgeact.runtime.sim_mujoco import _CameraServer

    monkeypatch.setattr(mujoco_camera, "MujocoCamera", FailingCamera)    # renders without a world; fails at frame 2
    parent, child = multiprocessing.Pipe()
    server = _CameraServer(child, world=None)
    try:
        server._start(FailingCameraConfig(name="front", width=32, height=24, fail_after=2))
        kinds = _messages(parent, until="error")
        assert kinds[0] == "ready" and set(kinds[1:-1]) <= {"frame"}
    finally:
        server.close()


def test_a_simulated_camera_runs_beside_a_simulator_in_its_own_process():
    assert isinstance(make_robot_camera(robot_config_from_dict(sim_robot_config_dict())), ProcessCamera)
    data = sim_robot_config_dict()
    data["robot"]["sim_process"] = False
    assert isinstance(make_robot_camera(robot_config_from_dict(data)), SyntheticCamera)
    data["robot"] = {**data["robot"], "bus": "feetech", "port": "/dev/ttyACM0"}
    del data["robot"]["sim_process"]
    assert isinstance(make_robot_camera(robot_config_from_dict(data)), SyntheticCamera)   # a real arm: no simulator


def test_realtime_is_asked_for_best_effort_and_says_what_it_got(monkeypatch, caplog):
    assert request_realtime(None) == "normal (no real-time priority asked)"
    asked = []
    monkeypatch.setattr(os, "sched_setscheduler", lambda pid, policy, param: asked.append((pid, policy,
                                                                                           param.sched_priority)))
    assert request_realtime(50) == "SCHED_FIFO 50" and asked == [(0, os.SCHED_FIFO, 50)]

    def refuse(pid, policy, param):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "sched_setscheduler", refuse)
    with caplog.at_level(logging.WARNING):
        assert request_realtime(50).startswith("normal (SCHED_FIFO 50 refused: [Errno 1] Operation not permitted")
    assert "ulimit -r 50" in caplog.text


class _Result:
    def __init__(self, rss):
        self.peak_rss_bytes, self.control_scheduling = rss, "SCHED_FIFO 50"


def test_memory_budget_is_1_3_times_the_bundle_plus_300_mb(tmp_path):
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "decoder.onnx").write_bytes(b"\0" * 3 * 2**20)
    (tmp_path / "manifest.json").write_bytes(b"\0" * 2**20)
    mb = 2**20
    summary = run_summary(_Result({"control": 100 * mb, "policy": 205 * mb, "sim": 50 * mb}), tmp_path)
    memory = summary["memory"]
    assert memory["bundle_mb"] == 4.0 and memory["budget_mb"] == pytest.approx(305.2)
    assert memory["runtime_peak_rss_mb"] == 305.0 and memory["within_budget"]      # the simulator is not counted
    assert not run_summary(_Result({"control": 100 * mb, "policy": 206 * mb}), tmp_path)["memory"]["within_budget"]
    assert run_summary(_Result({"control": mb}))["memory"]["within_budget"] is None   # no bundle: no budget
    assert summary["control_thread"] == {"scheduling": "SCHED_FIFO 50"}
    assert commands_loop._memory_row(memory) == ("control 100 + policy 205 = 305 MB (within 305 MB = 1.3 x 4.0 MB "
                                                 "bundle + 300 MB); simulator (not counted): sim 50 MB")


def test_a_run_with_policy_bus_and_camera_out_of_the_control_process(tmp_path):
    data = sim_robot_config_dict(policy={"type": "scripted", "chunk_size": 8, "latency_s": 0.02, "process": True})
    data["limits"]["watchdog_timeout_s"] = 2.0      # generous: a loaded test machine must not trip it by accident
    data["watchdog"]["control_stall_s"] = 1.5
    run = measure(robot_config_from_dict(data), 1.5, tmp_path, "bench")
    assert run.result.reason == "duration" and run.result.plans >= 2 and run.result.ticks > 20
    assert set(run.result.peak_rss_bytes) == {"control", "policy", "sim", "sim_camera"}
    summary = json.loads(run.json_path.read_text())
    assert summary["camera"]["frames"] > 5 and summary["stages_ms"]["scripted"]["n"] >= 2
    memory = summary["memory"]
    assert set(memory["peak_rss_mb"]) == {"control", "policy", "sim", "sim_camera"}
    assert memory["runtime_peak_rss_mb"] == pytest.approx(memory["peak_rss_mb"]["control"]
                                                          + memory["peak_rss_mb"]["policy"], abs=0.11)
    assert summary["control_thread"]["scheduling"].startswith(("SCHED_FIFO 50", "normal (SCHED_FIFO 50 refused"))
    assert multiprocessing.active_children() == []      # policy, bus and camera processes all ended
