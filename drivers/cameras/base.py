"""The camera interface: RGB-D frames, intrinsics, a config registry, and one latest-frame capture thread."""
from __future__ import annotations

import abc
import importlib
import math
import threading
import time
from dataclasses import dataclass, field, fields
from typing import Any, Callable, ClassVar

import numpy as np

from edgeact.runtime.errors import ConfigError, EdgeactError

# Modules whose configs register themselves on import; imported on the first registry lookup
# (none of them imports pyrealsense2 at module level).
BUILTIN_CAMERA_MODULES = (
    "edgeact.drivers.cameras.realsense",
    "edgeact.drivers.cameras.playback",
    "edgeact.drivers.cameras.synthetic",
    "edgeact.drivers.cameras.mujoco_camera",   # imports mujoco lazily, only when a world is built
)

DISTORTION_MODELS = ("none", "brown_conrady", "modified_brown_conrady", "inverse_brown_conrady",
                     "kannala_brandt4", "ftheta")
# librealsense's intrinsics hold exactly this many coefficients, whatever the model (unused ones are 0).
DISTORTION_COEFF_COUNT = 5


class CameraError(EdgeactError):
    """A camera failed or is misused; the message names the fix."""


class CameraNotFoundError(CameraError):
    """No device with the requested serial number, or the recording file does not exist."""


class CameraTimeoutError(CameraError):
    """No frame arrived within the bounded timeout."""


class EndOfStream(Exception):
    """Raised by a frame source whose recording has played to its end (internal signal)."""


@dataclass(frozen=True)
class Intrinsics:
    """Pinhole intrinsics of the color stream in pixels; pixel centres sit at integer coordinates."""

    fx: float
    fy: float
    cx: float
    cy: float
    width: int
    height: int
    distortion_model: str = "none"
    distortion_coeffs: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0, 0.0)

    def __post_init__(self) -> None:
        if self.width <= 0 or self.height <= 0:
            raise ConfigError(f"intrinsics size {self.width}x{self.height} must be positive")
        if not (self.fx > 0 and self.fy > 0):
            raise ConfigError(f"focal lengths fx={self.fx}, fy={self.fy} must be positive")
        if self.distortion_model not in DISTORTION_MODELS:
            raise ConfigError(f"distortion model {self.distortion_model!r} unknown; use one of "
                              f"{', '.join(DISTORTION_MODELS)}")
        object.__setattr__(self, "distortion_coeffs", tuple(float(c) for c in self.distortion_coeffs))
        if len(self.distortion_coeffs) != DISTORTION_COEFF_COUNT:
            raise ConfigError(f"{len(self.distortion_coeffs)} distortion coefficients given; RealSense intrinsics "
                              f"hold exactly {DISTORTION_COEFF_COUNT} whatever the model (brown_conrady and its "
                              f"variants: k1 k2 p1 p2 k3; kannala_brandt4: k1 k2 k3 k4 0; ftheta: w 0 0 0 0; "
                              f"none: 0 0 0 0 0): pad with zeros the ones a model does not use")

    def matrix(self) -> np.ndarray:
        """The 3x3 camera matrix K."""
        return np.array([[self.fx, 0.0, self.cx], [0.0, self.fy, self.cy], [0.0, 0.0, 1.0]])


@dataclass(frozen=True, eq=False)
class RGBDFrame:
    """One color image and its depth image aligned to it (same size, same pixel grid).

    The arrays are read-only: a frame is shared between the capture thread and every reader.
    """

    color: np.ndarray               # (H, W, 3) uint8 RGB
    depth_m: np.ndarray             # (H, W) float32 metres, aligned to color; 0 = no data
    timestamp_s: float              # the device's (sensor's) timestamp of the color frame
    capture_monotonic_s: float      # host time.monotonic() when the frame was taken, where the camera's clock says
                                    # (RealSense: host-clock domains); else when it was received
    frame_number: int               # the device's color frame counter

    def __post_init__(self) -> None:
        if self.color.dtype != np.uint8 or self.color.ndim != 3 or self.color.shape[2] != 3:
            raise ValueError(f"color must be (H, W, 3) uint8, got {self.color.shape} {self.color.dtype}")
        if self.depth_m.dtype != np.float32 or self.depth_m.shape != self.color.shape[:2]:
            raise ValueError(f"depth_m must be float32 of shape {self.color.shape[:2]}, "
                             f"got {self.depth_m.shape} {self.depth_m.dtype}")
        self.color.flags.writeable = False
        self.depth_m.flags.writeable = False

    def age_s(self, now_monotonic_s: float | None = None) -> float:
        """Seconds since the host received this frame."""
        now = time.monotonic() if now_monotonic_s is None else now_monotonic_s
        return now - self.capture_monotonic_s


# -- configs and their registry ----------------------------------------------------------------

_CONFIG_TYPES: dict[str, type["CameraConfig"]] = {}


def register_camera(type_name: str) -> Callable[[type["CameraConfig"]], type["CameraConfig"]]:
    """Class decorator: make a config class reachable by its short type name ("realsense" ...)."""

    def decorate(cls: type[CameraConfig]) -> type[CameraConfig]:
        if type_name in _CONFIG_TYPES and _CONFIG_TYPES[type_name] is not cls:
            raise ConfigError(f"camera type {type_name!r} registered twice "
                              f"({_CONFIG_TYPES[type_name].__name__} and {cls.__name__})")
        cls.type_name = type_name
        _CONFIG_TYPES[type_name] = cls
        return cls

    return decorate


def camera_types() -> dict[str, type["CameraConfig"]]:
    """{type name: config class} of every registered camera type."""
    for module in BUILTIN_CAMERA_MODULES:
        importlib.import_module(module)
    return dict(_CONFIG_TYPES)


def camera_config_from_dict(data: dict[str, Any]) -> "CameraConfig":
    """Build a config from {"type": "realsense", ...fields}; unknown types or fields are named."""
    data = dict(data)
    type_name = data.pop("type", None)
    types = camera_types()
    if type_name not in types:
        raise ConfigError(f"camera type {type_name!r} unknown; use one of {', '.join(sorted(types))}")
    cls = types[type_name]
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"camera type {type_name!r} has no field(s) {', '.join(unknown)}; "
                          f"its fields are {', '.join(sorted(known))}")
    return cls(**data)


def make_camera(config: "CameraConfig | dict[str, Any]") -> "Camera":
    """A camera (not yet connected) for a config object or a {"type": ...} dict."""
    if isinstance(config, dict):
        config = camera_config_from_dict(config)
    return config.make_camera()


@dataclass
class CameraConfig:
    """Fields every camera has; subclasses add their own and register a type name."""

    type_name: ClassVar[str] = ""
    name: str = "camera"            # used in messages: "no frame ... from camera 'wrist'"
    timeout_s: float = 2.0          # latest() raises when no frame arrived for this long

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("camera name must not be empty; name it after its place, e.g. 'wrist'")
        if not (self.timeout_s > 0 and math.isfinite(self.timeout_s)):
            raise ConfigError(f"camera {self.name!r}: timeout_s={self.timeout_s} must be a positive number")

    def check_timeout_for_fps(self, fps: float, source: str = "") -> None:
        """Refuse a timeout_s under three frame periods at `fps`: latest() returns no frame older than
        timeout_s, so a shorter one reports a healthy stream as lost between its frames."""
        if self.timeout_s < 3.0 / fps - 1e-9:
            smallest_s = math.ceil(3000.0 / fps) / 1000.0      # rounded up to a millisecond: it passes
            raise ConfigError(f"camera {self.name!r}: timeout_s={self.timeout_s} is under three frame periods at "
                              f"{fps:g} fps{source}, so latest() would call a healthy stream lost between frames; "
                              f"set timeout_s to at least {smallest_s:g}")

    def make_camera(self) -> "Camera":
        raise NotImplementedError(f"{type(self).__name__} does not name its camera class")

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type_name, **{f.name: getattr(self, f.name) for f in fields(self)}}


# -- the camera --------------------------------------------------------------------------------

@dataclass
class _CaptureState:
    latest: RGBDFrame | None = None
    sequence: int = 0               # frames published since connect (never restarts)
    frames_received: int = 0
    frames_dropped: int = 0
    restarts: int = 0               # frame counter went backwards: a looping recording or a device reset
    last_frame_number: int | None = None
    error: BaseException | None = None
    ended: bool = False
    restarting: bool = False        # the source is starting over (a recording looping), until its next frame
    listeners: list[Callable[[RGBDFrame], None]] = field(default_factory=list)


class Camera(abc.ABC):
    """An RGB-D camera captured on its own thread, of which a reader only ever sees the newest frame.

    Life: `connect()` ... `disconnect()` or a `with` block. Subclasses provide `_open()`,
    `_read(timeout_s)` and `_close()`; this class owns the thread, the latest-frame slot,
    frame and drop counting, and the bounded waits.
    """

    poll_s: float = 0.1             # longest a single _read may block, so disconnect() is prompt
    timeout_hint: str = "cable or bandwidth?"

    def __init__(self, config: CameraConfig):
        self.config = config
        self._cond = threading.Condition()
        self._state = _CaptureState()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._intrinsics: Intrinsics | None = None
        self._stop_listeners: list[Callable[[BaseException], None]] = []

    # -- what subclasses implement -----------------------------------------------------------
    @abc.abstractmethod
    def _open(self) -> Intrinsics:
        """Open the source; return the color stream's intrinsics."""

    @abc.abstractmethod
    def _read(self, timeout_s: float) -> RGBDFrame | None:
        """The next frame, or None when none came within timeout_s; raise EndOfStream at the end."""

    @abc.abstractmethod
    def _close(self) -> None:
        """Release the source (called after the capture thread has stopped)."""

    def _capture_started(self) -> None:
        """Called by connect() once the capture thread runs (a source that needs a reader to start)."""

    def _restart_begun(self) -> None:
        """Called by a source on the capture thread as it starts over (a recording looping): until its next frame,
        latest() waits for that frame (at most its timeout) rather than call the stream lost meanwhile."""
        with self._cond:
            self._state.restarting = True

    def _ended_message(self, frames: int) -> str:
        return f"camera {self.name!r} stopped delivering after {frames} frames"

    # -- life ----------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.config.name

    @property
    def is_connected(self) -> bool:
        return self._thread is not None

    def connect(self) -> None:
        if self._thread is not None:
            raise CameraError(f"camera {self.name!r} is already connected")
        intrinsics = self._open()
        listeners = self._state.listeners
        self._intrinsics = intrinsics
        self._state = _CaptureState(listeners=listeners)
        self._stop.clear()
        self._thread = threading.Thread(target=self._capture_loop, name=f"camera-{self.name}", daemon=True)
        self._thread.start()
        try:
            self._capture_started()
        except BaseException:
            self.disconnect()
            raise

    def disconnect(self) -> None:
        """Stop the capture thread and release the device; a no-op when not connected."""
        thread = self._thread
        if thread is None:
            return
        self._stop.set()
        thread.join(timeout=self.poll_s + 5.0)
        try:
            if thread.is_alive():
                raise CameraError(f"capture thread of camera {self.name!r} did not stop within "
                                  f"{self.poll_s + 5.0:.1f} s; the driver is stuck in a read")
        finally:
            self._thread = None
            self._close()

    def __enter__(self) -> "Camera":
        self.connect()
        return self

    def __exit__(self, *exc) -> None:
        self.disconnect()

    # -- reading -------------------------------------------------------------------------------
    @property
    def intrinsics(self) -> Intrinsics:
        """Intrinsics of the color stream (the depth image is aligned to it)."""
        if self._intrinsics is None:
            raise CameraError(f"camera {self.name!r}: intrinsics are known after connect()")
        return self._intrinsics

    @property
    def frames_received(self) -> int:
        with self._cond:
            return self._state.frames_received

    @property
    def frames_dropped(self) -> int:
        """Frames the device numbered but this camera never received (gaps in frame numbers)."""
        with self._cond:
            return self._state.frames_dropped

    @property
    def restarts(self) -> int:
        """How often the frame counter went backwards (a looping recording, a device reset)."""
        with self._cond:
            return self._state.restarts

    def add_listener(self, callback: Callable[[RGBDFrame], None]) -> None:
        """Call `callback(frame)` on the capture thread for every frame, in order; an exception
        raised by it stops capture and is re-raised by the next latest()."""
        with self._cond:
            self._state.listeners.append(callback)

    def add_stop_listener(self, callback: Callable[[BaseException], None]) -> None:
        """Call `callback(error)` on the capture thread when capture stops by itself: `error` is what stopped
        it, or a CameraError saying the stream ended. Not called for disconnect()."""
        with self._cond:
            self._stop_listeners.append(callback)

    def latest(self, timeout_s: float | None = None) -> RGBDFrame:
        """The newest frame (check `frame.age_s()`); waits at most timeout_s for the first one, and for the
        next one while the source restarts (a recording looping) with none younger than timeout_s.

        Raises CameraTimeoutError when no frame arrived within timeout_s (default: the config's),
        and re-raises an error that stopped the capture thread.
        """
        timeout = self.config.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout
        with self._cond:
            self._check_running()
            while not self._done() and (self._state.latest is None or (
                    self._state.restarting and self._state.latest.age_s() > timeout)):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            return self._fresh_or_raise(timeout)

    def next_frame(self, timeout_s: float | None = None) -> RGBDFrame:
        """The first frame that arrives after this call; waits at most timeout_s."""
        timeout = self.config.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout
        with self._cond:
            self._check_running()
            seen = self._state.sequence
            while self._state.sequence == seen and not self._done():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            if self._state.sequence == seen:
                self._raise_if_stopped()
                raise self._timeout_error(timeout)
            return self._state.latest

    # -- internals (the lock is held where noted) ---------------------------------------------
    def _check_running(self) -> None:
        if self._thread is None:
            raise CameraError(f"camera {self.name!r} is not connected; call connect() or use a with block")

    def _done(self) -> bool:
        return self._state.error is not None or self._state.ended

    def _fresh_or_raise(self, timeout_s: float) -> RGBDFrame:
        """Under the lock: the newest frame if it is at most timeout_s old, else the right error."""
        if self._state.error is None:
            frame = self._state.latest
            if frame is not None and frame.age_s() <= timeout_s:
                return frame
        self._raise_if_stopped()
        raise self._timeout_error(timeout_s)

    def _raise_if_stopped(self) -> None:
        state = self._state
        if state.error is not None:
            raise CameraError(f"camera {self.name!r} stopped: {state.error}") from state.error
        if state.ended:
            raise CameraError(self._ended_message(state.frames_received))

    def _timeout_error(self, timeout_s: float) -> CameraTimeoutError:
        return CameraTimeoutError(f"no frame for {timeout_s:.1f} s from camera {self.name!r}; {self.timeout_hint}")

    def _capture_loop(self) -> None:
        try:
            while not self._stop.is_set():
                frame = self._read(self.poll_s)
                if frame is not None:
                    self._publish(frame)
            return
        except EndOfStream:
            with self._cond:
                self._state.ended = True
                self._cond.notify_all()
                stopped_by: BaseException = CameraError(self._ended_message(self._state.frames_received))
        except Exception as exc:  # the thread's boundary: hand any failure to the readers
            with self._cond:
                self._state.error = stopped_by = exc
                self._cond.notify_all()
        with self._cond:
            stop_listeners = list(self._stop_listeners)
        for callback in stop_listeners:
            callback(stopped_by)

    def _publish(self, frame: RGBDFrame) -> None:
        with self._cond:
            state = self._state
            last = state.last_frame_number
            if last is not None:
                if frame.frame_number > last:
                    state.frames_dropped += frame.frame_number - last - 1
                else:
                    state.restarts += 1
            state.last_frame_number = frame.frame_number
            state.latest = frame
            state.restarting = False
            state.sequence += 1
            state.frames_received += 1
            listeners = list(state.listeners)
            self._cond.notify_all()
        for callback in listeners:
            callback(frame)
