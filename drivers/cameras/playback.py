"""Playing a RealSense recording back as a camera: the config, and the pacing by the frames' own timestamps;
the RealSense camera class plays it.

Formats, as pyrealsense2 2.59.1 behaves here:
- `.db3` (rosbag2 on SQLite) is what current librealsense writes (`rs.recorder`, `rs-record`, the
  Viewer) and the only format 2.59 writes: `rs.recorder` refuses any other suffix. Written with a
  software device and played back through `rs.pipeline` in tests/drivers/test_realsense.py.
- `.bag` (ROS1) is what older librealsense wrote. 2.59 still hands a .bag to its ROS1 reader
  for playback (its errors for a broken .bag come from that reader) and can convert one
  (`convert_bag_to_db3` in recording.py, or `rs-convert -D`), but cannot write one, so no real
  .bag has been played back here.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from edgeact.drivers.cameras.base import CameraConfig, register_camera
from edgeact.runtime.errors import ConfigError

RECORDING_SUFFIXES = (".db3", ".bag")


@register_camera("recording")
@dataclass
class RecordingConfig(CameraConfig):
    path: str = ""                  # relative, in a robot config file: beside that file (RobotConfig.camera_config)
    # True: frames come at the pace of their own timestamps (the rate they were recorded at, however fast the
    # file was written), as from a live camera. False: every frame, as fast as the capture thread takes them
    # (tests, offline runs).
    real_time: bool = True
    repeat: bool = True             # loop at the end; False: latest() reports the end

    def __post_init__(self) -> None:
        super().__post_init__()
        self.path = str(self.path)
        if not self.path:
            raise ConfigError(f"recording camera {self.name!r} needs a path to a .db3 or .bag file")
        if Path(self.path).suffix.lower() not in RECORDING_SUFFIXES:
            raise ConfigError(f"recording {self.path} must end in .db3 (current librealsense) "
                              f"or .bag (older librealsense)")

    def make_camera(self):
        from edgeact.drivers.cameras.realsense import RealSenseCamera

        return RealSenseCamera(self)


class PlaybackPacer:
    """When each frame of a recording is due on the host clock: its device timestamp's offset from an anchor frame.

    librealsense's own real-time playback paces by the host times its recorder stamped each message with, which
    are when the file was written: a recording written faster than its frame rate (`write_recording` without
    real_time) would play that fast. The device timestamps are the frames' own times. The anchor moves to the
    frame at hand (due now) at the first frame, when a frame is due more than `stall_s` ago (the capture thread
    paused or stalled: the frames after it keep their pace instead of coming in a burst to catch up), and at a
    new pass of a looping recording (restart(), or timestamps that go back), whose first frame is due one
    period after the last frame of the pass before, so a loop keeps the rate.
    """

    def __init__(self, period_s: float, stall_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.period_s = period_s
        self.stall_s = 2 * period_s if stall_s is None else stall_s
        self._clock = clock
        self._anchor_due_s: float | None = None     # None: the next frame starts a pass
        self._anchor_stamp_s = 0.0
        self._last_due_s: float | None = None

    def restart(self) -> None:
        """The recording starts over: its next frame begins a new pass."""
        self._anchor_due_s = None

    def due_s(self, stamp_s: float) -> float:
        """The host time (on the clock) when the frame with device timestamp `stamp_s` (seconds) is due."""
        now_s = self._clock()
        if self._anchor_due_s is None or stamp_s < self._anchor_stamp_s:
            due_s = now_s if self._last_due_s is None else max(now_s, self._last_due_s + self.period_s)
            self._anchor_due_s, self._anchor_stamp_s = due_s, stamp_s
        else:
            due_s = self._anchor_due_s + (stamp_s - self._anchor_stamp_s)
            if due_s < now_s - self.stall_s:
                due_s = now_s
                self._anchor_due_s, self._anchor_stamp_s = due_s, stamp_s
        self._last_due_s = due_s
        return due_s
