"""Writing RealSense recordings from numpy frames, through librealsense's own software device and recorder.

The file is written by `rs.recorder` wrapped around an `rs.software_device` with a depth and a
color sensor, so it is exactly what a RealSense writes and plays back through the same
pipeline code as a real camera's recording. pyrealsense2 2.59 writes rosbag2 `.db3` only
(`rs.recorder` refuses any other suffix).
"""
from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from edgeact.drivers.cameras.base import CameraError, Intrinsics
from edgeact.drivers.cameras.realsense import import_pyrealsense2

log = logging.getLogger(__name__)

Z16_MAX = 65535


def write_recording(path: str | Path, frames: Iterable[tuple[np.ndarray, np.ndarray]], intrinsics: Intrinsics,
                    fps: float, depth_scale: float = 0.001, *, depth_intrinsics: Intrinsics | None = None,
                    frame_numbers: Iterable[int] | None = None, real_time: bool = False,
                    color_format: str = "rgb8", serial_number: str = "000000000000") -> int:
    """Write (color RGB uint8 (H,W,3), depth_m float32) pairs as a RealSense recording; return the count.

    Depth is stored as z16 in units of `depth_scale` metres (rounded; 0, NaN and negatives mean
    no data). `depth_intrinsics` (default: the color's) gives depth its own pixel grid, as on a
    real camera; both sensors share one origin. `frame_numbers` (default 0, 1, 2 ...) and the
    device timestamps (frame_number / fps) may skip, to record dropped frames. `fps` is a whole number,
    as a stream's rate is stored. The recorder stamps each message with the host clock: edgeact's
    playback paces by the device timestamps and plays either kind at `fps`, but librealsense's own
    real-time playback (the Viewer, rs.playback) replays the file at the pace it was written:
    `real_time=True` paces writing at `fps` for that; False writes as fast as it can.
    `color_format` "bgr8" stores color as many RealSense recordings do (playback turns it back to RGB).

    The file is written beside `path` under a temporary name and moved onto `path` only once complete, so an
    existing recording there is replaced by a good one or left as it was. On Ctrl-C (KeyboardInterrupt) the
    frames written so far are kept as `<stem>.interrupted.db3` beside `path` (a warning names it), so a long
    real-time recording is not lost; on any other error nothing is left.
    """
    rs = import_pyrealsense2()
    path = Path(path)
    if path.suffix != ".db3":
        raise CameraError(f"recording {path} must end in .db3: pyrealsense2 2.59 writes rosbag2 (.db3) only")
    # The stream's rate is stored as an integer: 0.4 would be stored as 0 (unplayable), 29.97 as 30.
    if isinstance(fps, bool) or not (math.isfinite(fps) and fps >= 1 and fps == int(fps)):
        raise CameraError(f"fps={fps} must be a whole number of frames per second, at least 1 "
                          f"(RealSense rates: 6, 15, 30, 60, 90)")
    fps = int(fps)
    if not (0 < depth_scale < 1):
        raise CameraError(f"depth_scale={depth_scale} m per unit out of range; RealSense uses 0.001 (D400) "
                          f"or 0.0001 (D405)")
    if color_format not in ("rgb8", "bgr8"):
        raise CameraError(f"color_format {color_format!r} not supported; use rgb8 or bgr8")
    depth_intrinsics = depth_intrinsics or intrinsics
    path.parent.mkdir(parents=True, exist_ok=True)
    # Sibling names, so os.replace stays on one file system; the recorder wants the .db3 suffix on them too.
    writing = path.with_name(f".{path.stem}.{os.getpid()}.writing.db3")
    interrupted = path.with_name(f"{path.stem}.interrupted.db3")
    writing.unlink(missing_ok=True)     # a fresh file, whatever the recorder would make of an old one

    device = rs.software_device()
    device.register_info(rs.camera_info.name, "edgeact software RealSense")
    device.register_info(rs.camera_info.serial_number, serial_number)
    depth_sensor = device.add_sensor("Stereo Module")
    color_sensor = device.add_sensor("RGB Camera")
    depth_profile = depth_sensor.add_video_stream(
        _video_stream(rs, rs.stream.depth, 0, depth_intrinsics, fps, rs.format.z16, 2), True)
    color_profile = color_sensor.add_video_stream(
        _video_stream(rs, rs.stream.color, 1, intrinsics, fps, getattr(rs.format, color_format), 3), True)
    # Stored in the file and read back by get_depth_scale() during playback.
    depth_sensor.add_read_only_option(rs.option.depth_units, depth_scale)
    identity = rs.extrinsics()
    identity.rotation = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    identity.translation = [0.0, 0.0, 0.0]
    depth_profile.register_extrinsics_to(color_profile, identity)

    recorder = rs.recorder(str(writing), device)
    depth_profile = depth_profile.as_video_stream_profile()
    color_profile = color_profile.as_video_stream_profile()
    depth_sensor.open(depth_profile)
    color_sensor.open(color_profile)
    # The recorder taps the sensors' frames; our own callback has nothing to do.
    depth_sensor.start(lambda frame: None)
    color_sensor.start(lambda frame: None)
    numbers = iter(frame_numbers) if frame_numbers is not None else None
    written = 0
    first_number = previous_number = None
    start_s = time.monotonic()
    outcome = "failed"
    try:
        for index, (color, depth_m) in enumerate(frames):
            number = next(numbers, None) if numbers is not None else index
            if number is None or (previous_number is not None and number <= previous_number):
                raise CameraError(f"frame {index}: frame_numbers must give one increasing number per frame")
            first_number = number if first_number is None else first_number
            previous_number = number
            color = _check_color(color, intrinsics, index)
            if color_format == "bgr8":
                color = np.ascontiguousarray(color[..., ::-1])
            depth_z = quantize_depth(depth_m, depth_scale, depth_intrinsics, index)
            if real_time:
                time.sleep(max(0.0, start_s + (number - first_number) / fps - time.monotonic()))
            timestamp_ms = number * 1000.0 / fps
            color_sensor.on_video_frame(_software_frame(rs, color, 3, color_profile, number, timestamp_ms))
            depth_sensor.on_video_frame(_software_frame(rs, depth_z, 2, depth_profile, number, timestamp_ms,
                                                        depth_scale))
            written += 1
        if written == 0:
            raise CameraError(f"recording {path}: no frames given")
        outcome = "complete"
    except KeyboardInterrupt:
        outcome = "interrupted" if written else "failed"
        raise
    finally:
        for sensor in (color_sensor, depth_sensor):
            sensor.stop()
            sensor.close()
        # The file is complete once the recorder is destroyed; drop every reference to it now.
        del recorder, device, depth_sensor, color_sensor
        if outcome == "complete":
            os.replace(writing, path)
        elif outcome == "interrupted":
            os.replace(writing, interrupted)
            log.warning("writing %s interrupted: its %d frames so far are kept in %s; %s is left untouched",
                        path, written, interrupted, path)
        else:
            writing.unlink(missing_ok=True)     # no half-written recording left to be mistaken for a good one
    return written


def convert_bag_to_db3(bag_path: str | Path, db3_path: str | Path) -> Path:
    """Convert a ROS1 .bag (older librealsense) into the rosbag2 .db3 that current librealsense writes."""
    rs = import_pyrealsense2()
    bag_path, db3_path = Path(bag_path), Path(db3_path)
    if not bag_path.is_file():
        raise CameraError(f"recording {bag_path} not found")
    if db3_path.suffix != ".db3":
        raise CameraError(f"output {db3_path} must end in .db3")
    try:
        rs.context().convert_bag_to_db3(str(bag_path), str(db3_path))
    except RuntimeError as exc:
        raise CameraError(f"could not convert {bag_path} to {db3_path} ({exc}); is it a RealSense .bag?") from exc
    return db3_path


def quantize_depth(depth_m: np.ndarray, depth_scale: float, intrinsics: Intrinsics, index: int = 0) -> np.ndarray:
    """Metres -> z16 units (round to nearest); non-finite and non-positive mean no data (0)."""
    depth_m = np.asarray(depth_m)
    if depth_m.shape != (intrinsics.height, intrinsics.width) or depth_m.dtype.kind != "f":
        raise CameraError(f"frame {index}: depth must be float metres of shape "
                          f"{(intrinsics.height, intrinsics.width)}, got {depth_m.shape} {depth_m.dtype}")
    valid = np.isfinite(depth_m) & (depth_m > 0)
    units = np.zeros(depth_m.shape, np.float64)
    units[valid] = np.rint(depth_m[valid] / depth_scale)
    if units.max(initial=0) > Z16_MAX:
        raise CameraError(f"frame {index}: depth {depth_m[valid].max():.3f} m exceeds the z16 range "
                          f"{Z16_MAX * depth_scale:.3f} m at depth_scale {depth_scale}; use a larger depth_scale")
    return units.astype(np.uint16)


def _check_color(color: np.ndarray, intrinsics: Intrinsics, index: int) -> np.ndarray:
    color = np.asarray(color)
    if color.shape != (intrinsics.height, intrinsics.width, 3) or color.dtype != np.uint8:
        raise CameraError(f"frame {index}: color must be uint8 RGB of shape "
                          f"{(intrinsics.height, intrinsics.width, 3)}, got {color.shape} {color.dtype}")
    return np.ascontiguousarray(color)


def _video_stream(rs: Any, kind: Any, uid: int, intrinsics: Intrinsics, fps: int, fmt: Any, bpp: int) -> Any:
    intr = rs.intrinsics()
    intr.width, intr.height = intrinsics.width, intrinsics.height
    intr.fx, intr.fy, intr.ppx, intr.ppy = intrinsics.fx, intrinsics.fy, intrinsics.cx, intrinsics.cy
    intr.model = getattr(rs.distortion, intrinsics.distortion_model)
    intr.coeffs = list(intrinsics.distortion_coeffs)
    stream = rs.video_stream()
    stream.type, stream.index, stream.uid = kind, 0, uid
    stream.width, stream.height, stream.fps = intrinsics.width, intrinsics.height, fps
    stream.bpp, stream.fmt, stream.intrinsics = bpp, fmt, intr
    return stream


def _software_frame(rs: Any, pixels: np.ndarray, bpp: int, profile: Any, number: int, timestamp_ms: float,
                    depth_units: float | None = None) -> Any:
    frame = rs.software_video_frame()
    frame.pixels = pixels
    frame.stride = pixels.shape[1] * bpp
    frame.bpp = bpp
    frame.timestamp = timestamp_ms
    frame.domain = rs.timestamp_domain.hardware_clock
    frame.frame_number = number
    frame.profile = profile
    if depth_units is not None:
        frame.depth_units = depth_units
    return frame
