"""The camera interface: configs and their registry, frames, the capture thread, the synthetic camera."""
from __future__ import annotations

import math
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from edgeact.drivers.cameras.base import (Camera, CameraConfig, CameraError, CameraTimeoutError, EndOfStream,
                                          Intrinsics, RGBDFrame, camera_config_from_dict, camera_types, make_camera)
from edgeact.drivers.cameras.playback import RecordingConfig
from edgeact.drivers.cameras.realsense import RealSenseConfig
from edgeact.drivers.cameras.synthetic import SyntheticCamera, SyntheticConfig
from edgeact.runtime.errors import ConfigError

pytestmark = pytest.mark.timeout(30)


def _camera_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("camera-")]


# -- configs and registry ----------------------------------------------------------------------

def test_registry_knows_every_builtin_type():
    types = camera_types()
    assert types["realsense"] is RealSenseConfig
    assert types["recording"] is RecordingConfig
    assert types["synthetic"] is SyntheticConfig


def test_config_from_dict_round_trips_and_builds_the_right_camera():
    config = camera_config_from_dict({"type": "synthetic", "name": "wrist", "width": 64, "height": 48})
    assert isinstance(config, SyntheticConfig) and config.width == 64 and config.name == "wrist"
    assert camera_config_from_dict(config.to_dict()) == config
    assert isinstance(make_camera({"type": "synthetic"}), SyntheticCamera)


def test_config_from_dict_names_unknown_types_and_fields():
    with pytest.raises(ConfigError, match="'kinect' unknown; use one of mujoco, realsense, recording, synthetic"):
        camera_config_from_dict({"type": "kinect"})
    with pytest.raises(ConfigError, match="no field\\(s\\) exposure"):
        camera_config_from_dict({"type": "realsense", "exposure": 100})


def test_realsense_config_rejects_unsupported_modes_and_lists_the_supported():
    with pytest.raises(ConfigError) as err:
        RealSenseConfig(width=1000, height=500)
    assert "1000x500 at 30 fps is not a RealSense D400 mode" in str(err.value)
    assert "640x480@6/15/30/60" in str(err.value) and "check_mode=False" in str(err.value)
    with pytest.raises(ConfigError, match="color 1920x1080 at 60 fps"):
        RealSenseConfig(width=1920, height=1080, fps=60)
    with pytest.raises(ConfigError, match="depth 1280x720 at 60 fps"):
        RealSenseConfig(width=640, height=480, fps=60, depth_width=1280, depth_height=720)
    with pytest.raises(ConfigError, match="both depth_width and depth_height"):
        RealSenseConfig(depth_width=640)


def test_realsense_config_picks_a_depth_mode_the_sensor_has():
    assert (RealSenseConfig().depth_width, RealSenseConfig().depth_height) == (640, 480)
    big = RealSenseConfig(width=1920, height=1080, fps=30)   # depth has no 1080p: its largest mode
    assert (big.depth_width, big.depth_height) == (1280, 720)
    other = RealSenseConfig(width=1000, height=500, fps=25, check_mode=False)
    assert (other.depth_width, other.depth_height) == (1000, 500)


def test_common_and_recording_config_validation():
    with pytest.raises(ConfigError, match="name must not be empty"):
        SyntheticConfig(name="")
    with pytest.raises(ConfigError, match="timeout_s=0"):
        SyntheticConfig(timeout_s=0)
    with pytest.raises(ConfigError, match="must end in .db3 .* or .bag"):
        RecordingConfig(path="run.mp4")
    with pytest.raises(ConfigError, match="needs a path"):
        RecordingConfig()
    with pytest.raises(ConfigError, match="fps=0"):
        SyntheticConfig(fps=0)


def test_a_timeout_under_three_frame_periods_is_refused_where_the_fps_is_known():
    from edgeact.drivers.cameras.mujoco_camera import MujocoCameraConfig

    # latest() returns no frame older than timeout_s: under three periods it calls a healthy stream lost.
    with pytest.raises(ConfigError, match=r"'wrist': timeout_s=0.1 is under three frame periods at 6 fps.*"
                                          r"set timeout_s to at least 0.5$"):
        RealSenseConfig(name="wrist", fps=6, timeout_s=0.1)
    with pytest.raises(ConfigError, match="timeout_s=0.1 is under three frame periods at 25 fps.*at least 0.12$"):
        RealSenseConfig(width=1000, height=500, fps=25, check_mode=False, timeout_s=0.1)
    with pytest.raises(ConfigError, match="timeout_s=0.05 is under three frame periods at 30 fps.*at least 0.1$"):
        SyntheticConfig(timeout_s=0.05)
    with pytest.raises(ConfigError, match="timeout_s=0.1 is under three frame periods at 15 fps.*at least 0.2$"):
        MujocoCameraConfig(timeout_s=0.1)
    with pytest.raises(ConfigError, match="at 7 fps.*at least 0.429$"):
        SyntheticConfig(fps=7, timeout_s=0.4)
    # The smallest value named works, and so do the defaults.
    for config in (RealSenseConfig(fps=6, timeout_s=0.5), SyntheticConfig(timeout_s=0.1),
                   MujocoCameraConfig(timeout_s=0.2), SyntheticConfig(fps=7, timeout_s=0.429),
                   RealSenseConfig(), SyntheticConfig(), MujocoCameraConfig()):
        assert config.timeout_s * config.fps >= 3 - 1e-9


@pytest.mark.parametrize("check_mode", [True, False])
@pytest.mark.parametrize(("field", "value"), [("width", 0), ("height", -480), ("fps", 0), ("fps", -5), ("fps", 30.0),
                                              ("depth_width", 0), ("depth_height", -1)])
def test_realsense_sizes_and_fps_are_positive_integers_with_or_without_the_mode_check(check_mode, field, value):
    # librealsense reads 0 as "any" (fps=0: each stream picks its own rate) and fails late on a negative size.
    given = {"depth_width": 640, "depth_height": 480} if field.startswith("depth") else {}
    with pytest.raises(ConfigError, match=f"{field}={value!r} must be a positive integer; give the mode's own"):
        RealSenseConfig(check_mode=check_mode, **{**given, field: value})
    assert RealSenseConfig(width=1000, height=500, fps=25, check_mode=False).fps == 25


def test_intrinsics_and_frame_validate():
    with pytest.raises(ConfigError, match="distortion model 'fisheye' unknown"):
        Intrinsics(fx=1, fy=1, cx=0, cy=0, width=4, height=4, distortion_model="fisheye")
    k = Intrinsics(fx=2, fy=3, cx=4, cy=5, width=8, height=10).matrix()
    np.testing.assert_array_equal(k, [[2, 0, 4], [0, 3, 5], [0, 0, 1]])
    with pytest.raises(ValueError, match="depth_m must be float32 of shape \\(4, 6\\)"):
        RGBDFrame(np.zeros((4, 6, 3), np.uint8), np.zeros((4, 5), np.float32), 0.0, 0.0, 0)
    frame = RGBDFrame(np.zeros((4, 6, 3), np.uint8), np.zeros((4, 6), np.float32), 0.0, 10.0, 0)
    assert frame.age_s(now_monotonic_s=12.5) == 2.5
    with pytest.raises(ValueError, match="read-only"):
        frame.depth_m[0, 0] = 1.0     # shared between threads: nobody may write into it


@pytest.mark.parametrize("coeffs", [(0.1, -0.02, 0.003, 0.001), (0.1, -0.02, 0.0, 0.0, 0.01, 0.0, 0.0, 0.0), ()])
def test_intrinsics_refuse_a_distortion_other_than_realsenses_five_coefficients(coeffs):
    # librealsense's intrinsics hold exactly five; another count would fail later, deep in pyrealsense2.
    with pytest.raises(ConfigError, match=rf"{len(coeffs)} distortion coefficients given; RealSense intrinsics hold "
                                          rf"exactly 5 .*kannala_brandt4: k1 k2 k3 k4 0"):
        Intrinsics(fx=1, fy=1, cx=0, cy=0, width=4, height=4, distortion_model="kannala_brandt4",
                   distortion_coeffs=coeffs)
    assert len(Intrinsics(fx=1, fy=1, cx=0, cy=0, width=4, height=4).distortion_coeffs) == 5


def test_cameras_import_without_pyrealsense2():
    # A robot without pyrealsense2 must still import the camera package and run the synthetic one.
    code = (
        "import sys; sys.modules['pyrealsense2'] = None\n"
        "import edgeact.drivers.cameras.base as base, edgeact.drivers.cameras.recording\n"
        "from edgeact.drivers.cameras.base import make_camera, CameraError\n"
        "assert sorted(base.camera_types()) == ['mujoco', 'realsense', 'recording', 'synthetic']\n"
        "cam = make_camera({'type': 'realsense'})\n"
        "try:\n    cam.connect()\nexcept CameraError as exc:\n    print(exc)\n"
        "with make_camera({'type': 'synthetic', 'width': 32, 'height': 24}) as syn:\n"
        "    assert syn.latest().color.shape == (24, 32, 3)\n"
        "assert 'torch' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "pyrealsense2 is not installed; `pip install 'edgeact[realsense]'`" in result.stdout


# -- the synthetic scene -----------------------------------------------------------------------

def test_synthetic_render_is_deterministic_and_moves():
    config = SyntheticConfig(width=64, height=48, fps=10)
    a, b = SyntheticCamera(config), SyntheticCamera(config)
    first, again = a.render(7), b.render(7)
    np.testing.assert_array_equal(first.color, again.color)
    np.testing.assert_array_equal(first.depth_m, again.depth_m)
    assert first.timestamp_s == pytest.approx(0.7) and first.frame_number == 7
    later = a.render(12)            # the red box slides: some pixels change, the floor does not
    changed = np.any(first.color != later.color, axis=-1)
    assert 0 < changed.mean() < 0.2
    assert first.depth_m.dtype == np.float32 and np.all(first.depth_m > 0)


def test_synthetic_depth_is_camera_z_of_the_floor():
    # An odd size puts a pixel centre on the optical axis; that ray meets the floor at h / sin(pitch).
    config = SyntheticConfig(width=65, height=49, camera_height_m=0.5, pitch_deg=35)
    frame = SyntheticCamera(config).render(0)
    intr = config.intrinsics()
    assert (intr.cx, intr.cy) == (32, 24)
    assert frame.depth_m[24, 32] == pytest.approx(0.5 / math.sin(math.radians(35)), rel=1e-5)
    # Nearer rows look at nearer floor: depth grows from the bottom row upwards along the centre column.
    column = frame.depth_m[24:, 32]
    assert np.all(np.diff(column) < 0)


# -- the capture thread ------------------------------------------------------------------------

def test_synthetic_capture_thread_serves_latest_frames_and_stops_cleanly():
    before = _camera_threads()
    camera = SyntheticCamera(SyntheticConfig(name="wrist", width=32, height=24, fps=60))
    seen = []
    camera.add_listener(seen.append)
    with pytest.raises(CameraError, match="intrinsics are known after connect"):
        camera.intrinsics
    with camera:
        assert camera.intrinsics == camera.config.intrinsics()
        assert [t.name for t in _camera_threads()] == [t.name for t in before] + ["camera-wrist"]
        first = camera.latest()
        newer = camera.next_frame()
        assert newer.frame_number > first.frame_number
        assert camera.latest().frame_number >= newer.frame_number      # never an older one
        expected = camera.render(newer.frame_number)
        np.testing.assert_array_equal(newer.color, expected.color)
        np.testing.assert_array_equal(newer.depth_m, expected.depth_m)
        assert newer.age_s() >= 0 and newer.timestamp_s == pytest.approx(newer.frame_number / 60)
    assert _camera_threads() == before
    # Every number up to the last was either received or counted as dropped.
    assert camera.frames_received == len(seen) >= 2
    assert camera.frames_received + camera.frames_dropped == seen[-1].frame_number + 1
    assert not camera.is_connected
    with pytest.raises(CameraError, match="'wrist' is not connected; call connect"):
        camera.latest()
    camera.disconnect()             # a second disconnect is harmless


def test_latest_raises_when_no_frame_arrived_within_the_timeout():
    # At 0.5 fps frame 0 comes at once and frame 1 only after 2 s.
    with SyntheticCamera(SyntheticConfig(name="wrist", width=32, height=24, fps=0.5, timeout_s=6.0)) as camera:
        assert camera.latest().frame_number == 0
        with pytest.raises(CameraTimeoutError, match="no frame for 0.1 s from camera 'wrist'"):
            camera.next_frame(timeout_s=0.1)
        with pytest.raises(CameraTimeoutError, match="no frame for 0.0 s"):
            camera.latest(timeout_s=0.0)


def test_a_synthetic_frame_is_stamped_when_its_capture_began_not_after_rendering(monkeypatch):
    from edgeact.drivers.cameras import synthetic

    render_s = 0.2
    slow_render = synthetic._render

    def render(*args):
        time.sleep(render_s)        # as a large frame's ray casting takes (150 ms at 640x480)
        return slow_render(*args)

    monkeypatch.setattr(synthetic, "_render", render)
    reached = []
    camera = SyntheticCamera(SyntheticConfig(width=32, height=24, fps=2, timeout_s=5))
    camera.add_listener(lambda frame: reached.append((frame, time.monotonic())))
    with camera:
        camera.next_frame()
    # The render time counts in the frame's age, as a real sensor's transfer does: frame k was taken k/fps
    # after connect, however late it is rendered.
    assert reached and all(reached_s - frame.capture_monotonic_s >= render_s for frame, reached_s in reached)
    assert all(frame.capture_monotonic_s == pytest.approx(camera._start_s + frame.frame_number / 2, abs=1e-9)
               for frame, _ in reached)
    frame = camera.render(3)
    assert time.monotonic() - frame.capture_monotonic_s >= render_s


def test_a_failing_listener_stops_capture_and_the_reader_hears_why():
    def broken(frame):
        raise RuntimeError("disk full")

    camera = SyntheticCamera(SyntheticConfig(width=32, height=24, fps=60))
    camera.add_listener(broken)
    with camera:
        with pytest.raises(CameraError, match="stopped: disk full"):
            for _ in range(2):      # the first frame may reach a reader before its listener fails
                camera.next_frame()
        with pytest.raises(CameraError, match="stopped: disk full"):
            camera.latest()
    assert _camera_threads() == []


def test_connect_twice_is_an_error():
    with SyntheticCamera(SyntheticConfig(name="head", width=32, height=24)) as camera:
        with pytest.raises(CameraError, match="'head' is already connected"):
            camera.connect()


class _SilentCamera(Camera):
    """A source that never yields a frame, to test the waits without any device."""

    def _open(self) -> Intrinsics:
        return Intrinsics(fx=1, fy=1, cx=0, cy=0, width=2, height=2)

    def _read(self, timeout_s: float):
        self._stop.wait(timeout_s)
        return None

    def _close(self) -> None:
        pass


def test_latest_waits_a_bounded_time_when_nothing_ever_arrives():
    with _SilentCamera(CameraConfig(name="dead", timeout_s=0.2)) as camera:
        with pytest.raises(CameraTimeoutError, match="no frame for 0.2 s from camera 'dead'; cable or bandwidth?"):
            camera.latest()
        assert camera.frames_received == 0


class _ScriptedCamera(_SilentCamera):
    """Two frames, then what `then` says: raise an error, end the stream, or go quiet."""

    def __init__(self, config: CameraConfig, then: str):
        super().__init__(config)
        self.then, self.sent = then, 0

    def _read(self, timeout_s: float):
        if self.sent < 2:
            self.sent += 1
            return RGBDFrame(np.zeros((2, 2, 3), np.uint8), np.zeros((2, 2), np.float32), 0.0, time.monotonic(),
                             self.sent)
        if self.then == "error":
            raise RuntimeError("GL context lost")
        if self.then == "end":
            raise EndOfStream
        return super()._read(timeout_s)


@pytest.mark.parametrize(("then", "heard"), [("error", "GL context lost"),
                                             ("end", "stopped delivering after 2 frames")])
def test_a_stop_listener_hears_why_capture_stopped_by_itself(then, heard):
    stopped = []
    camera = _ScriptedCamera(CameraConfig(name="front"), then)
    camera.add_stop_listener(stopped.append)
    with camera:
        with pytest.raises(CameraError, match=heard):
            for _ in range(3):
                camera.next_frame(timeout_s=5)
    assert [str(e) for e in stopped] == [f"camera 'front' {heard}" if then == "end" else heard]


def test_a_stop_listener_is_not_called_for_disconnect():
    stopped = []
    camera = _ScriptedCamera(CameraConfig(name="front"), "quiet")
    camera.add_stop_listener(stopped.append)
    with camera:
        camera.latest(timeout_s=5)
    assert stopped == [] and _camera_threads() == []


class _RestartingCamera(_SilentCamera):
    """One frame, then a restart of the source (a recording looping) that takes `restart_s`, then frames again."""

    def __init__(self, config: CameraConfig, restart_s: float):
        super().__init__(config)
        self.restart_s, self.sent = restart_s, 0

    def _frame(self) -> RGBDFrame:
        self.sent += 1
        return RGBDFrame(np.zeros((2, 2, 3), np.uint8), np.zeros((2, 2), np.float32), 0.0, time.monotonic(), 0)

    def _read(self, timeout_s: float):
        if self.sent == 0:
            return self._frame()
        if self.sent == 1:
            self._restart_begun()
            self._stop.wait(self.restart_s)
            return self._frame()
        return super()._read(timeout_s)


def test_latest_waits_out_a_restart_of_the_source_instead_of_calling_the_stream_lost():
    # The restart outlasts timeout_s, but not timeout_s more: latest() gives the frame after it.
    with _RestartingCamera(CameraConfig(name="front", timeout_s=0.5), restart_s=0.8) as camera:
        first = camera.latest(timeout_s=5)
        time.sleep(0.6)                     # the first frame is older than timeout_s now
        newer = camera.latest()
        assert newer is not first and newer.age_s() <= 0.5
        time.sleep(0.6)                     # no restart now: an old frame is a lost stream
        with pytest.raises(CameraTimeoutError, match="no frame for 0.5 s from camera 'front'"):
            camera.latest()
