"""Pacing a recording's playback by its frames' own timestamps, on an injected clock (no librealsense, no sleeping)."""
from __future__ import annotations

import pytest

from edgeact.drivers.cameras.playback import PlaybackPacer

PERIOD_S = 1 / 30


class _Clock:
    def __init__(self, now_s: float = 100.0):
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s


def test_frames_are_due_at_their_timestamps_offset_from_the_first():
    clock = _Clock()
    pacer = PlaybackPacer(PERIOD_S, clock=clock)
    # The device timestamps count from wherever the device's clock stood; a frame is due at its offset.
    assert pacer.due_s(5.0) == 100.0
    assert pacer.due_s(5.0 + PERIOD_S) == pytest.approx(100.0 + PERIOD_S)
    assert pacer.due_s(5.0 + 4 * PERIOD_S) == pytest.approx(100.0 + 4 * PERIOD_S)     # a dropped frame's gap stays
    clock.now_s += 4 * PERIOD_S + 0.01                 # a little late (under the stall limit): the schedule holds
    assert pacer.due_s(5.0 + 5 * PERIOD_S) == pytest.approx(100.0 + 5 * PERIOD_S)


def test_after_a_stall_the_frames_keep_their_pace_from_now_instead_of_catching_up_in_a_burst():
    clock = _Clock()
    pacer = PlaybackPacer(PERIOD_S, clock=clock)
    pacer.due_s(0.0)
    clock.now_s += 1.0                                 # the reader paused for a second
    assert pacer.due_s(PERIOD_S) == 101.0              # due now: re-anchored
    assert pacer.due_s(2 * PERIOD_S) == pytest.approx(101.0 + PERIOD_S)


def test_a_new_pass_of_a_looping_recording_follows_the_last_frame_by_one_period():
    clock = _Clock()
    pacer = PlaybackPacer(PERIOD_S, clock=clock)
    for i in range(3):
        last_due_s = pacer.due_s(2.0 + i * PERIOD_S)
    clock.now_s = last_due_s + 0.005                   # the restart took 5 ms
    pacer.restart()
    assert pacer.due_s(2.0) == pytest.approx(last_due_s + PERIOD_S)
    assert pacer.due_s(2.0 + PERIOD_S) == pytest.approx(last_due_s + 2 * PERIOD_S)
    # A slow restart: the new pass starts when it is ready.
    clock.now_s += 0.5
    pacer.restart()
    assert pacer.due_s(2.0) == clock.now_s
    # Timestamps that go backwards start a new pass too (a one-frame pass repeats its timestamp: restart() says so).
    clock.now_s += 0.001
    assert pacer.due_s(1.0) == pytest.approx(clock.now_s - 0.001 + PERIOD_S)


def test_the_stall_limit_is_two_periods_unless_given():
    assert PlaybackPacer(PERIOD_S).stall_s == pytest.approx(2 * PERIOD_S)
    assert PlaybackPacer(PERIOD_S, stall_s=0.5).stall_s == 0.5
