"""What an Observation refuses at construction (and the depth tokenizer stage on its own): depth not in metres, a
timestamp from another clock or not a number, an instruction that is not text; Plans with non-finite times."""
from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import pytest

from edgeact.runtime.depth_tokenizer import INPUT, OUTPUT, StageDepthTokenizer
from edgeact.runtime.errors import EdgeactError
from edgeact.runtime.policy import Observation, Plan

RGB = np.zeros((48, 64, 3), np.uint8)
DEPTH_M = np.linspace(0.25, 1.7, 48 * 64, dtype=np.float32).reshape(48, 64)    # a tabletop scene's range


def observation(**changes) -> Observation:
    fields = dict(rgb=RGB, depth_m=DEPTH_M, timestamp_s=time.monotonic(), proprio=None, instruction="pick it up")
    return Observation(**{**fields, **changes})


def test_depth_in_metres_with_holes_is_taken():
    depth = DEPTH_M.copy()
    depth[:10] = 0.0                    # no data
    depth[10:20] = np.nan               # no data, as some drivers report it
    for d in (DEPTH_M, depth, DEPTH_M.astype(np.float64), np.zeros_like(DEPTH_M), np.full_like(DEPTH_M, 19.0)):
        assert observation(depth_m=d).depth_m is d
    assert observation(depth_m=None).depth_m is None


@pytest.mark.parametrize("depth, message", [
    (np.rint(DEPTH_M * 1000).astype(np.uint16), r"is uint16: an integer image is in raw sensor units \(e\.g\. "
                                               r"millimetres\), not metres; multiply it by the sensor's depth scale"),
    (np.ones((48, 64), np.int32), r"is int32: an integer image"),
    (DEPTH_M * 1000, r"has a median of 9\d\d\.?\d* over its valid pixels, implausible in metres \(> 20\): it looks "
                     r"like millimetres or raw sensor units; multiply it by the sensor's depth scale \(0\.001"),
])
def test_depth_not_in_metres_is_refused_naming_the_fix(depth, message):
    with pytest.raises(ValueError, match=r"^Observation\.depth_m " + message):
        observation(depth_m=depth)
    stage = StageDepthTokenizer(StandInEngine(), "bundle: stage 'depth_tokenizer'")
    with pytest.raises(EdgeactError, match=r"^bundle: stage 'depth_tokenizer': the depth image " + message):
        stage(depth)        # infer(depth_m=...) does not pass through an Observation
    assert stage.engine.runs == 0
    assert stage(DEPTH_M).shape == (100,) and stage.engine.runs == 1


class StandInEngine:
    """A depth_tokenizer stage engine's interface: depth_m (H, W) -> 100 codes."""

    spec = SimpleNamespace(inputs=[SimpleNamespace(name=INPUT)], outputs=[SimpleNamespace(name=OUTPUT, dims=(100,))])

    def __init__(self):
        self.runs = 0

    def run(self, feeds):
        self.runs += 1
        return {OUTPUT: np.zeros(100, np.int64)}


def test_depth_that_is_not_an_array_is_refused():
    with pytest.raises(ValueError, match=r"depth_m must be a numpy array \(H, W\) of float32 metres or None, got list; "
                                         r"pass np\.asarray\(depth, np\.float32\)"):
        observation(depth_m=[[0.5] * 64] * 48)


@pytest.mark.parametrize("timestamp", [float("nan"), float("inf"), None, "12.5", True])
def test_a_timestamp_that_is_not_a_finite_number_is_refused(timestamp):
    with pytest.raises(ValueError, match=r"timestamp_s must be a finite number, time\.monotonic\(\) when the frame "
                                         r"was captured; got"):
        observation(timestamp_s=timestamp)


def test_a_timestamp_from_the_wall_clock_is_refused_naming_time_monotonic():
    with pytest.raises(ValueError, match=r"timestamp_s 1\d{9}\.\d+ is 1\.\d+e\+09 s ahead of time\.monotonic\(\) "
                                         r"\(\d+\.\d+\): it comes from another clock \(time\.time\(\)\?\); stamp "
                                         r"frames with time\.monotonic\(\)"):
        observation(timestamp_s=time.time())


def test_past_and_just_taken_monotonic_timestamps_are_taken():
    for t in (time.monotonic(), time.monotonic() + 0.5, 0.0, 1, np.float64(time.monotonic()), np.float32(2.0)):
        assert observation(timestamp_s=t).timestamp_s == t


@pytest.mark.parametrize("instruction", [None, 3, b"pick it up"])
def test_an_instruction_that_is_not_text_is_refused(instruction):
    with pytest.raises(ValueError, match=r"instruction must be a str, got \w+ .*; say what the robot should do"):
        observation(instruction=instruction)


@pytest.mark.parametrize("field", [4, 5])
def test_a_plan_with_a_non_finite_time_is_refused(field):
    times = [0.0, 0.0]
    times[field - 4] = float("nan")
    with pytest.raises(ValueError, match=r"Plan\.(observation|created)_time_s is nan; it must be a finite"):
        Plan(np.zeros((1, 7)), np.zeros((1, 7)), None, None, *times)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), "0.1", None])
def test_a_joint_state_that_is_not_a_finite_angle_is_refused(value):
    with pytest.raises(ValueError, match=r"proprio must map each joint to a finite angle in rad, got \{'elbow': "):
        observation(proprio={"shoulder": 0.1, "elbow": value})
    assert observation(proprio={"shoulder": 0.1, "elbow": np.float32(-0.2)}).proprio["elbow"] == np.float32(-0.2)


def test_a_far_scene_from_a_camera_reaches_the_depth_tokenizer_and_negative_depth_is_refused():
    """A hall or outdoors (median over 20 m) from a camera driver passes the Observation and the stage alike (the loop
    marks every frame depth_from_camera); a caller's own array of that median is still taken for millimetres."""
    far = np.full((48, 64), 25.0, np.float32)
    obs = observation(depth_m=far, depth_from_camera=True)
    stage = StageDepthTokenizer(StandInEngine(), "bundle: stage 'depth_tokenizer'")
    assert stage(obs.depth_m, units_known=True).shape == (100,)
    with pytest.raises(EdgeactError, match="median of 25 over its valid pixels, implausible in metres"):
        stage(far)
    flipped = -DEPTH_M
    with pytest.raises(ValueError, match=r"depth_m has negative values \(min -1\.7\): depth in metres is >= 0"):
        observation(depth_m=flipped, depth_from_camera=True)
    with pytest.raises(EdgeactError, match="has negative values"):
        stage(flipped, units_known=True)        # not taken for "no data" (code of 0) silently


def test_proprioception_that_is_not_a_dict_and_a_negative_timestamp_are_refused():
    with pytest.raises(ValueError, match=r"proprio must be a dict joint -> angle in rad .*, or None; got list"):
        observation(proprio=[0.1, 0.2])
    with pytest.raises(ValueError, match=r"timestamp_s -5\.0 is negative: time\.monotonic\(\) never is"):
        observation(timestamp_s=-5.0)
