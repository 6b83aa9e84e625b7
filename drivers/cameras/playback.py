"""Playing a RealSense recording back as a camera: the config; the RealSense camera class plays it.

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

from dataclasses import dataclass
from pathlib import Path

from edgeact.drivers.cameras.base import CameraConfig, register_camera
from edgeact.runtime.errors import ConfigError

RECORDING_SUFFIXES = (".db3", ".bag")


@register_camera("recording")
@dataclass
class RecordingConfig(CameraConfig):
    path: str = ""                  # relative, in a robot config file: beside that file (RobotConfig.camera_config)
    # True: frames come at the pace they were recorded and a slow reader misses some, as with a
    # live camera. False: every frame, as fast as the capture thread takes them (tests, offline runs).
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
