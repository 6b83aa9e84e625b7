"""Intel RealSense RGB-D through pyrealsense2: a live device by serial number, or a recording played back.

pyrealsense2 is imported inside functions, so this module imports on a machine without it.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeact.drivers.cameras.base import (Camera, CameraConfig, CameraError, CameraNotFoundError, EndOfStream,
                                          Intrinsics, RGBDFrame, register_camera)
from edgeact.drivers.cameras.playback import PlaybackPacer, RecordingConfig
from edgeact.runtime.errors import ConfigError

log = logging.getLogger(__name__)

NO_DEVICE_MESSAGE = ("no RealSense device found; is it plugged into a USB3 port? "
                     "`rs-enumerate-devices` lists what librealsense sees")

# Modes of the D415 / D435 / D455 over USB3 (width, height): frame rates. Color is asked for as
# rgb8, depth as z16; both streams run at one frame rate so librealsense can pair them.
COLOR_MODES: dict[tuple[int, int], tuple[int, ...]] = {
    (1920, 1080): (6, 15, 30), (1280, 720): (6, 15, 30), (960, 540): (6, 15, 30, 60),
    (848, 480): (6, 15, 30, 60), (640, 480): (6, 15, 30, 60), (640, 360): (6, 15, 30, 60),
    (424, 240): (6, 15, 30, 60), (320, 240): (6, 30, 60), (320, 180): (6, 30, 60),
}
DEPTH_MODES: dict[tuple[int, int], tuple[int, ...]] = {
    (1280, 720): (6, 15, 30), (848, 480): (6, 15, 30, 60, 90), (640, 480): (6, 15, 30, 60, 90),
    (640, 360): (6, 15, 30, 60, 90), (480, 270): (6, 15, 30, 60, 90), (424, 240): (6, 15, 30, 60, 90),
}

# Longest a read of a recording waits for frames: the end of a pass shows only as no frame coming, and the
# next pass should follow its last frame within a frame period (so latest() never sees a gap at the loop).
PLAYBACK_WAIT_S = 0.01

# resume() is bounded by librealsense itself (its reader thread's 10 s flush timeout); this is our
# bound on waiting for a background resume when disconnecting.
RESUME_LIMIT_S = 15.0

# Recorded color formats we turn into RGB: the buffer's channels that make R, G, B (None: as is).
_COLOR_FORMATS: dict[str, list[int] | None] = {"rgb8": None, "bgr8": [2, 1, 0], "rgba8": [0, 1, 2], "bgra8": [2, 1, 0]}


def _modes_text(table: dict[tuple[int, int], tuple[int, ...]]) -> str:
    return ", ".join(f"{w}x{h}@{'/'.join(map(str, rates))}" for (w, h), rates in table.items())


@register_camera("realsense")
@dataclass
class RealSenseConfig(CameraConfig):
    serial_number: str | None = None    # None: the only attached device
    width: int = 640
    height: int = 480
    fps: int = 30
    depth_width: int | None = None      # None: the color size if depth has it, else the largest depth mode
    depth_height: int | None = None
    check_mode: bool = True             # False for models outside the D400 table (librealsense then decides)

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.depth_width is None) != (self.depth_height is None):
            raise ConfigError(f"camera {self.name!r}: give both depth_width and depth_height, or neither")
        # Checked with or without check_mode: librealsense reads 0 as "any" and fails late on a negative size.
        for field_name in ("width", "height", "fps", "depth_width", "depth_height"):
            value = getattr(self, field_name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ConfigError(f"camera {self.name!r}: {field_name}={value!r} must be a positive integer; "
                                  f"give the mode's own, e.g. width=640, height=480, fps=30")
        self.check_timeout_for_fps(self.fps)
        if self.depth_width is None:
            size = (self.width, self.height)
            if self.check_mode and self.fps in DEPTH_MODES.get(size, ()):
                self.depth_width, self.depth_height = size
            elif self.check_mode:
                self.depth_width, self.depth_height = max(
                    (s for s, rates in DEPTH_MODES.items() if self.fps in rates), key=lambda s: s[0] * s[1],
                    default=size)
            else:
                self.depth_width, self.depth_height = size
        if not self.check_mode:
            return
        if self.fps not in COLOR_MODES.get((self.width, self.height), ()):
            raise ConfigError(f"camera {self.name!r}: color {self.width}x{self.height} at {self.fps} fps is not a "
                              f"RealSense D400 mode; use one of {_modes_text(COLOR_MODES)} "
                              f"(or check_mode=False for another model)")
        if self.fps not in DEPTH_MODES.get((self.depth_width, self.depth_height), ()):
            raise ConfigError(f"camera {self.name!r}: depth {self.depth_width}x{self.depth_height} at {self.fps} fps "
                              f"is not a RealSense D400 mode; use one of {_modes_text(DEPTH_MODES)} "
                              f"(or check_mode=False for another model)")

    def make_camera(self) -> "RealSenseCamera":
        return RealSenseCamera(self)


def import_pyrealsense2() -> Any:
    try:
        import pyrealsense2 as rs
    except ImportError as exc:
        raise CameraError("pyrealsense2 is not installed; `pip install 'edgeact[realsense]'` "
                          "(on a Jetson, build librealsense with its Python bindings)") from exc
    return rs


def intrinsics_from_rs(intr: Any) -> Intrinsics:
    """Our Intrinsics from an rs.intrinsics (model 'distortion.brown_conrady' -> 'brown_conrady')."""
    return Intrinsics(fx=intr.fx, fy=intr.fy, cx=intr.ppx, cy=intr.ppy, width=intr.width, height=intr.height,
                      distortion_model=str(intr.model).rsplit(".", 1)[-1], distortion_coeffs=tuple(intr.coeffs))


# What a frame's capture_monotonic_s measures (RealSenseCamera.capture_clock): the frame's own timestamp in the
# host's clock (librealsense's global time, or its system time), or its arrival in this process.
ARRIVAL = "arrival"
HOST_CLOCK_DOMAINS = ("global_time", "system_time")


def frame_capture_monotonic_s(frame: Any, received_s: float, wall_now_s: float | None = None,
                              monotonic_now_s: float | None = None) -> tuple[float, str]:
    """When `frame` was taken, on time.monotonic(), and what that time is: (seconds, clock).

    A timestamp in a host-clock domain (global time: the device clock mapped to the host's;
    system time: the host's clock when the driver got the frame) is milliseconds of the host's
    wall clock: it moves to the monotonic clock by the two clocks' present offset, and is never
    later than `received_s` (the frame cannot be taken after it reached us; a wall clock stepped
    back would put it there). A hardware-clock timestamp counts from the device's power-up: the
    frame keeps its arrival time, and the clock says so ("arrival").
    """
    domain = frame.get_frame_timestamp_domain()
    name = str(domain).rsplit(".", 1)[-1]
    if name not in HOST_CLOCK_DOMAINS:
        return received_s, ARRIVAL
    wall_s = time.time() if wall_now_s is None else wall_now_s
    monotonic_s = time.monotonic() if monotonic_now_s is None else monotonic_now_s
    taken_s = monotonic_s - (wall_s - frame.get_timestamp() / 1000.0)
    return min(taken_s, received_s), name


def _reason(exc: Exception) -> str:
    """librealsense's own reason, without its 'Failed to resolve request ...' preamble."""
    text = str(exc)
    return text.split("Reason: ", 1)[-1]


def _is_identity(depth_profile: Any, color_profile: Any) -> bool:
    try:
        extrinsics = depth_profile.get_extrinsics_to(color_profile)
    except RuntimeError:    # no extrinsics recorded: let rs.align decide
        return False
    return (np.allclose(extrinsics.rotation, np.eye(3).ravel(), atol=1e-9)
            and np.allclose(extrinsics.translation, 0.0, atol=1e-9))


class RealSenseCamera(Camera):
    """Color (RGB) and depth (metres) aligned to color, from a device or a recording.

    The capture thread calls `try_wait_for_frames` with a short timeout; librealsense keeps one
    frameset waiting, so a reader that falls behind gets the newest and the gap is counted as drops.

    A recording is always played once by librealsense and looped here (see `_replay`): the
    pipeline's own repeat_playback restarts the recorded sensors one after another while its
    reader already runs, so a pass can lose one stream's frames and, when that pass ends before
    the restart is done, the playback stays stopped for good (no frame ever again).

    librealsense plays a recording without its real-time pacing, which follows the host times the file
    was written at; real-time playback is paced here, by the frames' own timestamps (PlaybackPacer).
    """

    def __init__(self, config: RealSenseConfig | RecordingConfig):
        super().__init__(config)
        self._rs: Any = None
        self._pipeline: Any = None
        self._playback: Any = None
        self._align: Any = None
        self._depth_scale_m = 0.0
        self._color_channels: list[int] | None = None
        self._last_color_number: int | None = None
        self._pair_tolerance_ms = 0.0
        self._rs_config: Any = None
        self._resumer: threading.Thread | None = None
        self._resume_error: BaseException | None = None
        # Set once resume() has returned: until then a stopped playback has not started, not ended.
        self._playing = threading.Event()
        self._pass_frames = 0                   # frames delivered since the recording last (re)started
        self._pacer: PlaybackPacer | None = None   # a real-time playback's
        self.device_name = ""
        self.serial_number = ""
        # What the newest frame's capture_monotonic_s measures: "global_time" or "system_time" (its timestamp,
        # on the host's clock), or "arrival" (when it reached this process: a hardware-clock timestamp, or a
        # recording, whose host-clock timestamps are of the time it was recorded).
        self.capture_clock = ""
        self._told_arrival = False

    @property
    def is_recording(self) -> bool:
        return isinstance(self.config, RecordingConfig)

    @property
    def depth_scale_m(self) -> float:
        """Metres per z16 depth unit, read from the depth sensor."""
        return self._depth_scale_m

    # -- open ------------------------------------------------------------------------------------
    def _open(self) -> Intrinsics:
        rs = self._rs = import_pyrealsense2()
        pipeline = rs.pipeline()
        rs_config = rs.config()
        if self.is_recording:
            self._select_recording(rs, rs_config)
        else:
            self._select_device(rs, rs_config)
        try:
            # Resolving first gives us the playback device before any frame flows.
            profile = rs_config.resolve(rs.pipeline_wrapper(pipeline))
        except RuntimeError as exc:
            raise self._open_error(exc) from exc
        device = profile.get_device()
        # For messages only, and not every recorder writes them.
        self.device_name, self.serial_number = (device.get_info(info) if device.supports(info) else ""
                                                for info in (rs.camera_info.name, rs.camera_info.serial_number))
        self._playback = device.as_playback() if device.is_playback() else None
        if self._playback is not None:
            # Never librealsense's pacing (the host times the file was written at): _read paces by the frames'
            # timestamps. Without it the playback waits for each frame to be taken, so none is lost.
            self._playback.set_real_time(False)
            # Paused until every sensor runs: librealsense starts the recorded sensors one after
            # another, and a sensor not yet started would lose its first frame.
            self._playback.pause()
        try:
            profile = pipeline.start(rs_config)
        except RuntimeError as exc:
            raise self._open_error(exc) from exc
        try:
            intrinsics = self._configure_streams(rs, profile)
        except BaseException:
            pipeline.stop()
            raise
        self._pipeline = pipeline
        self._rs_config = rs_config
        self._last_color_number = None
        self._pass_frames = 0
        self._resume_error = None
        self._playing.clear()
        return intrinsics

    def _select_recording(self, rs: Any, rs_config: Any) -> None:
        path = Path(self.config.path).expanduser()
        if not path.is_file():
            raise CameraNotFoundError(f"recording {path} not found")
        # Never librealsense's repeat: it can stop for good at the loop point; _replay loops instead.
        rs_config.enable_device_from_file(str(path), repeat_playback=False)

    def _select_device(self, rs: Any, rs_config: Any) -> None:
        config: RealSenseConfig = self.config
        devices = [(d.get_info(rs.camera_info.name), d.get_info(rs.camera_info.serial_number))
                   for d in rs.context().query_devices()]
        if not devices:
            raise CameraNotFoundError(NO_DEVICE_MESSAGE)
        if config.serial_number is not None:
            if config.serial_number not in [serial for _, serial in devices]:
                attached = ", ".join(f"{name} (serial {serial})" for name, serial in devices)
                raise CameraNotFoundError(f"no RealSense with serial {config.serial_number}; attached: {attached}")
            rs_config.enable_device(config.serial_number)
        elif len(devices) > 1:
            raise CameraError(f"{len(devices)} RealSense devices attached ("
                              + ", ".join(serial for _, serial in devices)
                              + f"); set serial_number for camera {self.name!r}")
        rs_config.enable_stream(rs.stream.color, config.width, config.height, rs.format.rgb8, config.fps)
        rs_config.enable_stream(rs.stream.depth, config.depth_width, config.depth_height, rs.format.z16, config.fps)

    def _open_error(self, exc: RuntimeError) -> CameraError:
        if self.is_recording:
            return CameraError(f"recording {self.config.path} could not be read ({_reason(exc)}); is it a "
                               f"RealSense recording (.db3, or .bag from an older librealsense)?")
        c = self.config
        return CameraError(f"RealSense for camera {self.name!r} could not start color {c.width}x{c.height} and "
                           f"depth {c.depth_width}x{c.depth_height} at {c.fps} fps ({_reason(exc)}); is another "
                           f"process using it? On a USB2 port only small modes work: use a USB3 port, or "
                           f"424x240 at 15 fps")

    def _configure_streams(self, rs: Any, profile: Any) -> Intrinsics:
        streams = {s.stream_type(): s for s in profile.get_streams()}
        source = f"recording {self.config.path}" if self.is_recording else f"camera {self.name!r}"
        for kind, needed in ((rs.stream.color, "color"), (rs.stream.depth, "depth")):
            if kind not in streams:
                held = ", ".join(f"{s.stream_name()} {s.format()}" for s in streams.values())
                raise CameraError(f"{source} has no {needed} stream (it holds: {held}); record color and depth")
        color = streams[rs.stream.color].as_video_stream_profile()
        depth = streams[rs.stream.depth].as_video_stream_profile()
        color_format = str(color.format()).rsplit(".", 1)[-1]
        if color_format not in _COLOR_FORMATS:
            raise CameraError(f"{source}: color format {color_format} unsupported; use one of "
                              f"{', '.join(_COLOR_FORMATS)}")
        if depth.format() != rs.format.z16:
            raise CameraError(f"{source}: depth format {depth.format()} unsupported; use z16")
        self._color_channels = _COLOR_FORMATS[color_format]
        if self.is_recording and color.fps() > 0:   # a device's fps was checked with its config
            self.config.check_timeout_for_fps(color.fps(), f" (the rate of {source})")
        # librealsense's syncer pairs frames less than half a frame period apart.
        self._pair_tolerance_ms = 500.0 / max(color.fps(), 1)
        self._pacer = (PlaybackPacer(1.0 / max(color.fps(), 1))
                       if self._playback is not None and self.config.real_time else None)
        self._depth_scale_m = profile.get_device().first_depth_sensor().get_depth_scale()
        color_intrinsics = intrinsics_from_rs(color.get_intrinsics())
        # Depth already on the color grid (same intrinsics, same origin) needs no aligning, and
        # rs.align would not leave it alone: its rounding of pixel edges shifts some pixels by one.
        on_color_grid = (intrinsics_from_rs(depth.get_intrinsics()) == color_intrinsics
                         and _is_identity(depth, color))
        self._align = None if on_color_grid else rs.align(rs.stream.color)
        return color_intrinsics

    def _capture_started(self) -> None:
        # Resumed only now: resume() waits for the playback's reader to settle, and without
        # real-time pacing that reader waits for frames to be taken, by the capture thread.
        if self._playback is not None:
            self._playback.resume()
            self._playing.set()

    # -- looping a recording -----------------------------------------------------------------------
    def _recording_ended(self) -> bool:
        """Whether the playback has played the whole file (asked before each read's wait: see _read)."""
        if self._resume_error is not None:
            raise CameraError(f"recording {self.config.path} of camera {self.name!r} could not be resumed "
                              f"({self._resume_error})") from self._resume_error
        return self._playing.is_set() and self._playback.current_status() == self._rs.playback_status.stopped

    def _replay(self) -> None:
        """Start the recording over, on the capture thread, as _open started it: paused until
        both sensors run, then resumed while this thread takes the frames."""
        if self._pass_frames == 0:
            raise CameraError(f"recording {self.config.path} of camera {self.name!r} played through without one "
                              f"color frame paired with depth; is it a RealSense recording of both streams?")
        self._join_resumer()
        self._restart_begun()               # latest() waits for the next pass rather than call the stream lost
        self._pass_frames = 0
        self._last_color_number = None      # the next pass numbers its frames from the start again
        if self._pacer is not None:
            self._pacer.restart()
        self._playing.clear()
        self._pipeline.stop()
        self._playback.pause()
        try:
            self._pipeline.start(self._rs_config)
        except RuntimeError as exc:
            self._pipeline = None           # stopped: nothing for _close to stop
            raise CameraError(f"recording {self.config.path} of camera {self.name!r} could not be started "
                              f"again ({_reason(exc)})") from exc
        # resume() cannot run here: it can wait for frames to be taken, and this thread takes them.
        self._resumer = threading.Thread(target=self._resume_in_background, name=f"camera-{self.name}-resume",
                                         daemon=True)
        self._resumer.start()

    def _resume_in_background(self) -> None:
        try:
            self._playback.resume()
        except RuntimeError as exc:      # handed to the capture thread by _recording_ended
            self._resume_error = exc
        finally:
            self._playing.set()

    def _join_resumer(self) -> None:
        resumer, self._resumer = self._resumer, None
        if resumer is None:
            return
        resumer.join(timeout=RESUME_LIMIT_S)
        if resumer.is_alive():
            raise CameraError(f"recording {self.config.path} of camera {self.name!r}: librealsense did not resume "
                              f"its playback within {RESUME_LIMIT_S:.0f} s")

    # -- capture ---------------------------------------------------------------------------------
    def _read(self, timeout_s: float) -> RGBDFrame | None:
        # A recording's end is asked before the wait: once the playback has stopped, no frame comes after an empty
        # wait (one asked after it could have stopped, and queued its last frame, since the wait ended).
        ended = False
        if self._playback is not None:
            ended = self._recording_ended()
            timeout_s = min(timeout_s, PLAYBACK_WAIT_S)
        try:
            ok, frames = self._pipeline.try_wait_for_frames(max(1, int(timeout_s * 1000)))
        except RuntimeError as exc:
            raise CameraError(f"RealSense {self.serial_number} of camera {self.name!r} failed ({exc}); "
                              f"was it unplugged?") from exc
        if not ok:
            if ended:
                if not self.config.repeat:
                    raise EndOfStream
                self._replay()
            return None
        received_s = time.monotonic()
        if self._align is not None:
            frames = self._align.process(frames)
        color_frame = frames.get_color_frame()
        depth_frame = frames.get_depth_frame()
        if not color_frame or not depth_frame:
            return None
        number = color_frame.get_frame_number()
        if number == self._last_color_number:
            return None     # the pipeline re-sent the last color frame with a newer depth frame
        if (color_frame.get_frame_timestamp_domain() == depth_frame.get_frame_timestamp_domain()
                and abs(color_frame.get_timestamp() - depth_frame.get_timestamp()) > self._pair_tolerance_ms):
            # The pipeline completes a set with the last frame it holds of a stream that had none
            # to match (after a dropped frame): that depth is of another time.
            return None
        self._last_color_number = number
        self._pass_frames += 1
        if self._pacer is not None:         # it comes when it is due: that is its arrival
            received_s = self._pacer.due_s(color_frame.get_timestamp() / 1000.0)
        capture_s = self._capture_time_s(color_frame, received_s)
        pixels = np.asanyarray(color_frame.get_data())
        # Both copy out of librealsense's frame pool: the frames go back to it when we return.
        color = pixels.copy() if self._color_channels is None else pixels[..., self._color_channels]
        depth_m = np.asanyarray(depth_frame.get_data()).astype(np.float32) * np.float32(self._depth_scale_m)
        frame = RGBDFrame(color=color, depth_m=depth_m,
                          timestamp_s=color_frame.get_timestamp() / 1000.0, capture_monotonic_s=capture_s,
                          frame_number=number)
        wait_s = capture_s - time.monotonic()
        if self._pacer is not None and wait_s > 0 and self._stop.wait(wait_s):
            return None                     # disconnecting
        return frame

    def _capture_time_s(self, color_frame: Any, received_s: float) -> float:
        """The color frame's capture time on time.monotonic() (see frame_capture_monotonic_s); sets capture_clock."""
        if self._playback is not None:      # a recording's host-clock stamps are of when it was recorded
            capture_s, self.capture_clock = received_s, ARRIVAL
            return capture_s
        capture_s, self.capture_clock = frame_capture_monotonic_s(color_frame, received_s)
        if self.capture_clock == ARRIVAL and not self._told_arrival:
            self._told_arrival = True
            log.warning("RealSense %s of camera %r stamps its frames with its own clock (%s): frames are timed "
                        "when they reach this process, which is later than their capture by the transfer; turn "
                        "on the device's global time (option global_time_enabled) to time them at capture",
                        self.serial_number, self.name, color_frame.get_frame_timestamp_domain())
        return capture_s

    def _close(self) -> None:
        try:
            self._join_resumer()        # stopping the pipeline under a running resume() is not safe
        finally:
            pipeline, self._pipeline = self._pipeline, None
            self._playback = None
            if pipeline is not None:
                pipeline.stop()

    def _ended_message(self, frames: int) -> str:
        if self.is_recording:
            return (f"recording {self.config.path} of camera {self.name!r} ended after {frames} frames; "
                    f"set repeat=True to loop it")
        return super()._ended_message(frames)
