"""Frames the planner cannot use, said as such: frames older than plan.max_frame_age_s (the robot holds and the
run says why, not that the policy is stuck), and a far scene's depth from a camera (metres, however far)."""
import json
import logging
from dataclasses import replace

import numpy as np
import pytest

from edgeact.drivers.cameras.synthetic import SyntheticCamera
from edgeact.drivers.sim.servo_bus import SimServoBus
from edgeact.runtime import cli, sim_robot
from edgeact.runtime.loop import run_robot
from edgeact.runtime.policy import Observation
from edgeact.runtime.robot_config import load_robot_config, robot_config_from_dict
from tests.runtime.test_loop import IDS, config_data

pytestmark = pytest.mark.timeout(60)


class LateCamera(SyntheticCamera):
    """Each frame reaches the host 0.35 s after it was taken (a slow link, a loaded capture)."""

    def _render_due(self, frame_number, due_s):
        return super()._render_due(frame_number, due_s - 0.35)


class FarCamera(SyntheticCamera):
    """A far scene: the depth of every pixel 30 m (a hall, outdoors), in metres as a driver gives it."""

    def render(self, frame_number, capture_monotonic_s=None):
        frame = super().render(frame_number, capture_monotonic_s)
        return replace(frame, depth_m=np.where(frame.depth_m > 0, 30.0, 0.0).astype(np.float32))


class SteppedClockCamera(SyntheticCamera):
    """Every third frame is stamped 0.1 s early: the host clock stepped between its capture and its stamp's
    conversion (host-clock stamps, drivers/cameras/realsense.py), so it reads as taken before the frame before it."""

    def _render_due(self, frame_number, due_s):
        return super()._render_due(frame_number, due_s - (0.1 if frame_number % 3 == 2 else 0.0))


@pytest.fixture
def sim():
    with SimServoBus("feetech", ids=IDS) as bus:
        yield bus


def test_frames_too_old_to_plan_on_are_said_with_the_fix(sim, tmp_path, monkeypatch, capsys, caplog):
    monkeypatch.setattr(sim_robot, "make_robot_camera", lambda config: LateCamera(config.camera_config))
    path = tmp_path / "robot.json"
    path.write_text(json.dumps(config_data(sim)))
    summary = tmp_path / "run.json"
    with caplog.at_level(logging.WARNING):
        assert cli.main(["run", str(path), "--seconds", "2", "--json", str(summary)]) == 0
    out = capsys.readouterr().out
    data = json.loads(summary.read_text())
    assert data["policy"]["plans"] == 0 and data["frames_too_old"] > 5
    assert "frames too old to plan on (plan.max_frame_age_s)" in out
    assert f"no plan was made: all {data['frames_too_old']} frames taken were older than plan.max_frame_age_s" in out
    said = [r.getMessage() for r in caplog.records if "frames arrive" in r.getMessage()]
    assert said and "ms old, over plan.max_frame_age_s (250 ms)" in said[0] and "lower the camera's resolution" in said[0]
    assert len(said) == 1                           # said once, then every 5 s while it lasts (a 2 s run: once)


def test_a_frame_stamped_before_the_last_planned_one_is_not_planned_on(sim, monkeypatch, caplog):
    """Its plan would replace a newer one: the robot, following the newer plan, would step back to an older view."""
    from edgeact.runtime.loop_events import Subscriber

    class Plans(Subscriber):
        def __init__(self):
            self.stamps = []

        def on_plan(self, event):
            self.stamps.append((event.frame_number, event.plan.observation_time_s))

    monkeypatch.setattr(sim_robot, "make_robot_camera", lambda config: SteppedClockCamera(config.camera_config))
    plans = Plans()
    with caplog.at_level(logging.WARNING):
        result = run_robot(robot_config_from_dict(config_data(sim)), 1.5, subscribers=[plans])
    assert result.reason == "duration" and result.error is None and len(plans.stamps) > 5
    times = [t for _, t in plans.stamps]
    assert all(b > a for a, b in zip(times, times[1:])), plans.stamps
    said = [r.getMessage() for r in caplog.records if "before the frame last planned on" in r.getMessage()]
    assert said and "did the host clock step?" in said[0]


@pytest.mark.parametrize("own_process", [False, True])
def test_a_far_scene_from_the_camera_is_planned_on(sim, monkeypatch, own_process):
    """30 m is legitimate depth from a driver (it applied the depth scale); only a caller's own array whose median
    looks like millimetres is refused. The same in the policy's own process (the frame crosses in shared memory)."""
    monkeypatch.setattr(sim_robot, "make_robot_camera", lambda config: FarCamera(config.camera_config))
    data = config_data(sim)
    data["policy"]["process"] = own_process
    result = run_robot(robot_config_from_dict(data), 1.5)
    assert result.reason == "duration" and result.error is None and result.plans > 3

    rgb, far = np.zeros((4, 4, 3), np.uint8), np.full((4, 4), 30.0, np.float32)
    Observation(rgb, far, 0.0, None, "go", depth_from_camera=True)
    with pytest.raises(ValueError, match="implausible in metres"):
        Observation(rgb, far, 0.0, None, "go")
    with pytest.raises(ValueError, match="an integer image is in raw sensor units"):
        Observation(rgb, np.full((4, 4), 900, np.uint16), 0.0, None, "go", depth_from_camera=True)


def test_check_warns_of_frames_the_run_would_not_plan_on(sim, tmp_path, monkeypatch):
    from edgeact.runtime.preflight import WARN, preflight

    monkeypatch.setattr(sim_robot, "make_robot_camera", lambda config: LateCamera(config.camera_config))
    data = config_data(sim)
    data["estop"] = {"file": "STOP"}
    (tmp_path / "robot.json").write_text(json.dumps(data))
    row = next(c for c in preflight(load_robot_config(tmp_path / "robot.json"), frames=3, with_policy=False)
               if c.name == "camera")
    assert row.status == WARN and "older than plan.max_frame_age_s (250 ms) when it arrives" in row.detail
