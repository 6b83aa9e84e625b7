"""The RealSense camera, run through pyrealsense2 itself: recordings written with a software device
and played back by the same pipeline code that drives a real camera; the device test needs hardware."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from edgeact.drivers.cameras.base import CameraError, CameraNotFoundError, CameraTimeoutError, Intrinsics
from edgeact.drivers.cameras.playback import RecordingConfig
from edgeact.drivers.cameras import recording
from edgeact.drivers.cameras.realsense import (NO_DEVICE_MESSAGE, RealSenseCamera, RealSenseConfig,
                                               frame_capture_monotonic_s)
from edgeact.drivers.cameras.recording import convert_bag_to_db3, write_recording
from edgeact.runtime.errors import ConfigError

rs = pytest.importorskip("pyrealsense2")

pytestmark = pytest.mark.timeout(60)

W, H, FPS = 64, 48, 30
COLOR_INTRINSICS = Intrinsics(fx=52.0, fy=51.0, cx=31.5, cy=23.25, width=W, height=H,
                              distortion_model="brown_conrady", distortion_coeffs=(0.1, -0.05, 0.001, 0.002, 0.01))


def _random_frames(count: int, seed: int = 0, max_depth_m: float = 5.0) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(count):
        color = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
        depth_m = rng.uniform(0.1, max_depth_m, (H, W)).astype(np.float32)
        depth_m[:3, :5] = 0.0            # no data stays no data
        depth_m[5, 7] = np.nan
        frames.append((color, depth_m))
    return frames


def _numbered_frames(count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Frame i is color i everywhere and depth 1 m + i mm: any frame names itself."""
    return [(np.full((H, W, 3), i, np.uint8), np.full((H, W), 1.0 + i / 1000, np.float32)) for i in range(count)]


def _play_to_end(camera: RealSenseCamera) -> list:
    """Every frame of a non-real-time, non-repeating playback, in the order it arrived."""
    frames = []
    camera.add_listener(frames.append)
    with camera:
        with pytest.raises(CameraError, match="ended after"):
            for _ in range(1000):
                camera.next_frame(timeout_s=10)
    return frames


def _camera_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("camera-")]


@pytest.fixture(autouse=True)
def no_leaked_capture_threads():
    before = _camera_threads()
    yield
    assert _camera_threads() == before


@pytest.fixture(scope="module")
def numbered_recording(tmp_path_factory):
    path = tmp_path_factory.mktemp("rec") / "numbered.db3"
    write_recording(path, _numbered_frames(10), COLOR_INTRINSICS, fps=FPS)
    return path


# -- recording and playback: the pixels, the depth, the intrinsics -----------------------------

@pytest.mark.parametrize(("depth_scale", "color_format"), [(0.001, "rgb8"), (0.0001, "bgr8")])  # D400, D405
def test_playback_returns_the_recorded_pixels_depth_and_intrinsics(tmp_path, depth_scale, color_format):
    source = _random_frames(6, max_depth_m=6.0)
    path = tmp_path / "random.db3"
    assert write_recording(path, source, COLOR_INTRINSICS, fps=FPS, depth_scale=depth_scale,
                           color_format=color_format, serial_number="123456789012") == 6
    camera = RecordingConfig(name="wrist", path=str(path), real_time=False, repeat=False).make_camera()
    frames = _play_to_end(camera)

    assert [f.frame_number for f in frames] == list(range(6))
    assert camera.frames_received == 6 and camera.frames_dropped == 0
    assert camera.depth_scale_m == pytest.approx(depth_scale, rel=1e-6)
    assert (camera.device_name, camera.serial_number) == ("edgeact software RealSense", "123456789012")
    intr = camera.intrinsics
    assert (intr.width, intr.height, intr.fx, intr.fy, intr.cx, intr.cy) == (W, H, 52.0, 51.0, 31.5, 23.25)
    assert intr.distortion_model == "brown_conrady"
    assert intr.distortion_coeffs == pytest.approx(COLOR_INTRINSICS.distortion_coeffs, rel=1e-6)
    for frame in frames:
        color, depth_m = source[frame.frame_number]
        np.testing.assert_array_equal(frame.color, color)
        assert frame.depth_m.shape == frame.color.shape[:2] and frame.depth_m.dtype == np.float32
        valid = np.isfinite(depth_m) & (depth_m > 0)
        assert np.all(frame.depth_m[~valid] == 0)
        # Within half a depth unit, plus the float32 rounding of the stored depth scale.
        assert np.abs(frame.depth_m[valid] - depth_m[valid]).max() <= depth_scale / 2 + 1e-6
        assert frame.timestamp_s == pytest.approx(frame.frame_number / FPS, abs=1e-6)


def test_depth_on_its_own_grid_is_aligned_to_color_by_rs_align(tmp_path):
    # Depth at half the color resolution, left half 1 m and right half 2 m: aligned to the color
    # grid, each depth pixel covers exactly 2x2 color pixels.
    depth_intrinsics = Intrinsics(fx=26.0, fy=25.5, cx=15.5, cy=11.5, width=W // 2, height=H // 2)
    color_intrinsics = Intrinsics(fx=52.0, fy=51.0, cx=31.5, cy=23.5, width=W, height=H)
    depth_m = np.full((H // 2, W // 2), 1.0, np.float32)
    depth_m[:, W // 4:] = 2.0
    path = tmp_path / "two_grids.db3"
    write_recording(path, [(np.zeros((H, W, 3), np.uint8), depth_m)] * 3, color_intrinsics, fps=FPS,
                    depth_intrinsics=depth_intrinsics)
    frames = _play_to_end(RecordingConfig(path=str(path), real_time=False, repeat=False).make_camera())
    assert len(frames) == 3
    aligned = frames[-1].depth_m
    assert aligned.shape == (H, W)
    expected = np.kron(depth_m, np.ones((2, 2), np.float32))
    # rs.align rounds a depth pixel's far edge up, so the 1 m pixel left of the step also covers
    # the first 2 m column, and where two depth pixels land on one color pixel the nearer wins.
    expected[:, W // 2] = 1.0
    np.testing.assert_allclose(aligned, expected, atol=1e-6)


# -- frame numbers, timestamps, drops ----------------------------------------------------------

def test_a_gap_in_frame_numbers_counts_as_drops(tmp_path):
    path = tmp_path / "gap.db3"
    numbers = [0, 1, 2, 3, 4, 8, 9, 10, 11, 12]
    write_recording(path, _numbered_frames(10), COLOR_INTRINSICS, fps=FPS, frame_numbers=numbers)
    camera = RecordingConfig(path=str(path), real_time=False, repeat=False).make_camera()
    frames = _play_to_end(camera)
    assert [f.frame_number for f in frames] == numbers
    assert camera.frames_received == 10 and camera.frames_dropped == 3
    stamps = [f.timestamp_s for f in frames]
    assert all(b > a for a, b in zip(stamps, stamps[1:]))
    assert stamps[5] - stamps[4] == pytest.approx(4 / FPS, abs=1e-6)
    for index, frame in enumerate(frames):      # frame k of the file is the k-th numpy frame
        assert frame.color[0, 0, 0] == index
        assert frame.depth_m[0, 0] == pytest.approx(1.0 + index / 1000, abs=6e-4)


def test_latest_is_the_newest_frame_and_the_end_of_a_recording_is_reported(numbered_recording):
    camera = RecordingConfig(name="wrist", path=str(numbered_recording), real_time=False,
                             repeat=False).make_camera()
    _play_to_end(camera)
    assert not camera.is_connected
    camera.connect()
    try:
        with pytest.raises(CameraError, match="ended after 10 frames"):
            for _ in range(1000):
                camera.next_frame(timeout_s=10)
        newest = camera.latest(timeout_s=60)        # the last frame, while it is younger than the timeout
        assert newest.frame_number == 9 and newest.color[0, 0, 0] == 9
        assert 0 <= newest.age_s() <= 60
        with pytest.raises(CameraError, match=f"recording {numbered_recording} of camera 'wrist' ended after "
                                              f"10 frames; set repeat=True to loop it"):
            camera.latest(timeout_s=0.0)
    finally:
        camera.disconnect()


def _play_repeating(path, frame_count: int) -> tuple[RealSenseCamera, list]:
    """The first `frame_count` frames of a looping, non-real-time playback, in the order they arrived."""
    camera = RecordingConfig(path=str(path), real_time=False, repeat=True).make_camera()
    frames = []
    camera.add_listener(frames.append)
    with camera:
        for _ in range(1000):
            if len(frames) >= frame_count:
                break
            camera.next_frame(timeout_s=10)
    return camera, frames[:frame_count]


def test_a_repeating_recording_loops_without_counting_drops(numbered_recording):
    camera, frames = _play_repeating(numbered_recording, 25)
    # Every pass plays every frame: the loop loses none of either stream.
    assert [f.frame_number for f in frames] == (list(range(10)) * 3)[:25]
    assert camera.restarts >= 2 and camera.frames_dropped == 0
    for frame in frames:
        assert frame.color[0, 0, 0] == frame.frame_number
        assert frame.depth_m[0, 0] == pytest.approx(1.0 + frame.frame_number / 1000, abs=6e-4)


def test_a_one_frame_recording_repeats_its_frame(tmp_path):
    # Each pass repeats frame number 0: a new pass, not the pipeline re-sending its last frame.
    path = tmp_path / "still.db3"
    write_recording(path, _numbered_frames(1), COLOR_INTRINSICS, fps=FPS)
    camera, frames = _play_repeating(path, 6)
    assert len(frames) == 6 and camera.restarts >= 5 and camera.frames_dropped == 0
    assert all(f.frame_number == 0 and f.color[0, 0, 0] == 0 for f in frames)


def test_real_time_playback_keeps_the_recorded_pace(tmp_path):
    # Written at 30 fps (the recorder stamps the host clock), so played in real time it lasts as long.
    path = tmp_path / "paced.db3"
    write_recording(path, _numbered_frames(8), COLOR_INTRINSICS, fps=FPS, real_time=True)
    camera = RecordingConfig(path=str(path), real_time=True, repeat=False).make_camera()
    frames = _play_to_end(camera)
    assert len(frames) >= 2
    numbers = [f.frame_number for f in frames]
    assert numbers == sorted(numbers) and numbers[-1] == 7
    span_s = frames[-1].capture_monotonic_s - frames[0].capture_monotonic_s
    # A lower bound only: frames never come earlier than recorded (a late first one shortens the span).
    assert span_s >= 0.5 * (numbers[-1] - numbers[0]) / FPS


def test_real_time_playback_paces_by_the_frames_own_timestamps_not_by_when_the_file_was_written(tmp_path):
    # Written as fast as it could be (the recorder's host stamps span a few ms), recorded at 30 fps all the same.
    path = tmp_path / "fast_written.db3"
    count = 15
    write_recording(path, _numbered_frames(count), COLOR_INTRINSICS, fps=FPS)
    camera = RecordingConfig(path=str(path), real_time=True, repeat=False).make_camera()
    seen = []
    camera.add_listener(lambda frame: seen.append(time.monotonic()))
    frames = _play_to_end(camera)
    assert [f.frame_number for f in frames] == list(range(count))     # paced here, so librealsense drops none
    span_s = frames[-1].capture_monotonic_s - frames[0].capture_monotonic_s
    # A lower bound only (a loaded machine may stretch it): written at once, played at 30 fps.
    assert span_s >= 0.7 * (count - 1) / FPS
    # A frame is stamped when it comes due, never after it reached a reader.
    assert all(f.capture_monotonic_s <= reached_s for f, reached_s in zip(frames, seen))


def test_a_looping_real_time_recording_is_not_called_lost_at_its_loop_point(tmp_path):
    # timeout_s 0.1 is three frame periods at 30 fps, which check_timeout_for_fps accepts: the restart of
    # the recording at each loop must not leave latest() a gap that long.
    path = tmp_path / "short_loop.db3"
    write_recording(path, _numbered_frames(6), COLOR_INTRINSICS, fps=FPS)
    camera = RecordingConfig(name="front", path=str(path), real_time=True, repeat=True, timeout_s=0.1).make_camera()
    timeouts = []
    with camera:
        camera.latest(timeout_s=10)
        deadline_s = time.monotonic() + 20
        while camera.restarts < 4 and time.monotonic() < deadline_s:
            try:
                camera.latest()
            except CameraTimeoutError as exc:
                timeouts.append(str(exc))
            time.sleep(0.003)
    assert camera.restarts >= 4 and timeouts == []


def test_disconnect_while_frames_flow_stops_the_thread_and_reconnect_works(numbered_recording):
    camera = RecordingConfig(name="busy", path=str(numbered_recording), real_time=False).make_camera()
    for _ in range(2):
        camera.connect()
        assert "camera-busy" in _camera_threads()
        assert camera.next_frame(timeout_s=10).color.shape == (H, W, 3)
        camera.disconnect()
        assert "camera-busy" not in _camera_threads()


# -- capture times: the frame's own timestamp on the host clock, not when it reached us ----------

def _write_host_clock_recording(path, monkeypatch, domain: str, start_wall_ms: float, count: int = 6):
    """A recording whose frames carry `domain` timestamps: frame i at start_wall_ms + i / FPS (host wall clock)."""
    software_frame = recording._software_frame

    def stamped(rs_, pixels, bpp, profile, number, timestamp_ms, depth_units=None):
        frame = software_frame(rs_, pixels, bpp, profile, number, start_wall_ms + timestamp_ms, depth_units)
        frame.domain = getattr(rs.timestamp_domain, domain)
        return frame

    with monkeypatch.context() as patch:
        patch.setattr(recording, "_software_frame", stamped)
        write_recording(path, _numbered_frames(count), COLOR_INTRINSICS, fps=FPS)


def _raw_color_frames(path, count: int):
    """(color frame, time.monotonic() when it arrived) for the first `count` frames, from librealsense's pipeline."""
    pipeline, config = rs.pipeline(), rs.config()
    config.enable_device_from_file(str(path), repeat_playback=False)
    playback = config.resolve(rs.pipeline_wrapper(pipeline)).get_device().as_playback()
    playback.set_real_time(False)
    playback.pause()            # as RealSenseCamera does: no frame lost while the sensors start one by one
    pipeline.start(config)
    playback.resume()
    out = []
    try:
        while len(out) < count:
            ok, frames = pipeline.try_wait_for_frames(5000)
            assert ok, "the recording gave no frame"
            received_s = time.monotonic()
            color = frames.get_color_frame()
            color.keep()
            out.append((color, received_s))
    finally:
        pipeline.stop()
    return out


@pytest.mark.parametrize("domain", ["global_time", "system_time"])
def test_a_host_clock_timestamp_becomes_the_capture_time_not_the_read_time(tmp_path, monkeypatch, domain):
    taken_ago_s = 2.0           # the frames were taken 2 s (and then every 1/FPS) before we read them
    path = tmp_path / f"{domain}.db3"
    _write_host_clock_recording(path, monkeypatch, domain, time.time() * 1000 - taken_ago_s * 1000)
    frames = _raw_color_frames(path, 6)
    stamps = []
    for color, received_s in frames:
        assert str(color.get_frame_timestamp_domain()).endswith(domain)
        wall_s, monotonic_s = time.time(), time.monotonic()
        capture_s, clock = frame_capture_monotonic_s(color, received_s, wall_s, monotonic_s)
        assert clock == domain
        # The frame's own time, moved to the monotonic clock; the read time would be received_s.
        assert capture_s == pytest.approx(monotonic_s - (wall_s - color.get_timestamp() / 1000), abs=1e-6)
        assert received_s - capture_s > taken_ago_s - 0.5
        stamps.append(capture_s)
    # Consecutive frames are 1 / FPS apart, as stamped, however they were read.
    assert np.diff(stamps) == pytest.approx(np.full(len(stamps) - 1, 1 / FPS), abs=2e-3)


def test_a_host_clock_timestamp_is_never_later_than_the_arrival(tmp_path, monkeypatch):
    path = tmp_path / "future.db3"     # a wall clock stepped back between the capture and now
    # An hour ahead: still ahead when the frames are read however long writing and reading take (5 s was not, once,
    # on a loaded machine, and the test then checked a past timestamp).
    _write_host_clock_recording(path, monkeypatch, "global_time", time.time() * 1000 + 3_600_000, count=2)
    for color, received_s in _raw_color_frames(path, 2):
        assert frame_capture_monotonic_s(color, received_s) == (received_s, "global_time")


def test_a_hardware_clock_timestamp_keeps_the_arrival_time_and_says_so(numbered_recording):
    for color, received_s in _raw_color_frames(numbered_recording, 2):      # write_recording: the device clock
        assert frame_capture_monotonic_s(color, received_s) == (received_s, "arrival")


def test_a_recording_times_its_frames_on_arrival_whatever_their_domain(tmp_path, monkeypatch):
    # A recording's host-clock stamps are of the day it was recorded: as capture times they would make
    # every frame look hours old, so playback times frames on arrival, and says so.
    path = tmp_path / "old.db3"
    _write_host_clock_recording(path, monkeypatch, "global_time", time.time() * 1000 - 3600e3, count=3)
    camera = RecordingConfig(path=str(path), real_time=False, repeat=False).make_camera()
    before_s = time.monotonic()
    frames = _play_to_end(camera)
    assert len(frames) == 3 and camera.capture_clock == "arrival"
    assert all(before_s <= f.capture_monotonic_s <= time.monotonic() for f in frames)


# -- errors ------------------------------------------------------------------------------------

def test_missing_and_corrupt_recordings_are_named(tmp_path):
    missing = tmp_path / "foo.bag"
    with pytest.raises(CameraNotFoundError, match=f"recording {missing} not found"):
        RecordingConfig(path=str(missing)).make_camera().connect()
    corrupt = tmp_path / "corrupt.db3"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(CameraError, match="corrupt.db3 could not be read .*file is not a database.*"
                                          "is it a RealSense recording"):
        RecordingConfig(path=str(corrupt)).make_camera().connect()
    old = tmp_path / "old.bag"
    old.write_bytes(b"#ROSBAG V2.0\nthis is not a bag")
    camera = RecordingConfig(path=str(old)).make_camera()
    with pytest.raises(CameraError, match="old.bag could not be read"):
        camera.connect()
    assert not camera.is_connected
    with pytest.raises(CameraError, match="could not convert .*old.bag"):
        convert_bag_to_db3(old, tmp_path / "old.db3")


def test_a_timeout_under_three_periods_of_the_recordings_rate_is_refused_at_connect(numbered_recording):
    # A recording's rate is known once it is opened; latest() would call its healthy stream lost between frames.
    camera = RecordingConfig(name="wrist", path=str(numbered_recording), timeout_s=0.05).make_camera()
    with pytest.raises(ConfigError, match=r"'wrist': timeout_s=0.05 is under three frame periods at 30 fps \(the rate "
                                          r"of recording .*numbered.db3\).*set timeout_s to at least 0.1$"):
        camera.connect()
    assert not camera.is_connected
    with RecordingConfig(path=str(numbered_recording), timeout_s=0.1).make_camera() as camera:
        assert camera.latest(timeout_s=5).frame_number >= 0


def test_write_recording_rejects_what_it_cannot_store(tmp_path):
    frames = _numbered_frames(1)
    with pytest.raises(CameraError, match="must end in .db3: pyrealsense2 2.59 writes rosbag2"):
        write_recording(tmp_path / "x.bag", frames, COLOR_INTRINSICS, fps=FPS)
    far = [(frames[0][0], np.full((H, W), 70.0, np.float32))]
    with pytest.raises(CameraError, match="depth 70.000 m exceeds the z16 range 65.535 m"):
        write_recording(tmp_path / "far.db3", far, COLOR_INTRINSICS, fps=FPS)
    small = [(np.zeros((H, W - 1, 3), np.uint8), frames[0][1])]
    with pytest.raises(CameraError, match="frame 0: color must be uint8 RGB of shape \\(48, 64, 3\\)"):
        write_recording(tmp_path / "small.db3", small, COLOR_INTRINSICS, fps=FPS)
    with pytest.raises(CameraError, match="frame 2: frame_numbers must give one increasing number per frame"):
        write_recording(tmp_path / "back.db3", _numbered_frames(3), COLOR_INTRINSICS, fps=FPS, frame_numbers=[0, 5, 5])
    assert sorted(p.name for p in tmp_path.iterdir()) == []     # nothing half-written is left behind


@pytest.mark.parametrize("fps", [0.4, 29.97, 0, -30, float("nan"), True])
def test_write_recording_refuses_a_rate_that_is_not_a_whole_number_of_frames(tmp_path, fps):
    # A stream's rate is stored as an integer: 0.4 would be stored as 0 (unplayable), 29.97 as 30.
    with pytest.raises(CameraError, match=rf"fps={fps} must be a whole number of frames per second, at least 1 "
                                          rf"\(RealSense rates: 6, 15, 30, 60, 90\)"):
        write_recording(tmp_path / "rate.db3", _numbered_frames(1), COLOR_INTRINSICS, fps=fps)
    assert list(tmp_path.iterdir()) == []
    assert write_recording(tmp_path / "rate.db3", _numbered_frames(1), COLOR_INTRINSICS, fps=15.0) == 1


def test_a_failed_rewrite_keeps_the_recording_it_would_have_replaced(tmp_path):
    path = tmp_path / "scene.db3"
    write_recording(path, _numbered_frames(4), COLOR_INTRINSICS, fps=FPS)
    good = path.read_bytes()
    far = [(np.zeros((H, W, 3), np.uint8), np.full((H, W), 100.0, np.float32))]   # beyond z16 at 1 mm
    with pytest.raises(CameraError, match="exceeds the z16 range"):
        write_recording(path, _numbered_frames(2) + far, COLOR_INTRINSICS, fps=FPS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scene.db3"]    # no temporary file left either
    assert path.read_bytes() == good
    # A good rewrite replaces it, and leaves nothing beside it.
    assert write_recording(path, _numbered_frames(2), COLOR_INTRINSICS, fps=FPS) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scene.db3"]
    frames = _play_to_end(RecordingConfig(path=str(path), real_time=False, repeat=False).make_camera())
    assert [f.frame_number for f in frames] == [0, 1]


def test_ctrl_c_while_writing_keeps_the_old_recording_and_the_frames_written_so_far_apart(tmp_path):
    path = tmp_path / "scene.db3"
    write_recording(path, _numbered_frames(4), COLOR_INTRINSICS, fps=FPS)
    good = path.read_bytes()

    def interrupted(after: int):
        yield from _numbered_frames(after)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_recording(path, interrupted(3), COLOR_INTRINSICS, fps=FPS)
    assert path.read_bytes() == good
    kept = tmp_path / "scene.interrupted.db3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scene.db3", "scene.interrupted.db3"]
    frames = _play_to_end(RecordingConfig(path=str(kept), real_time=False, repeat=False).make_camera())
    assert [f.frame_number for f in frames] == [0, 1, 2]
    # Interrupted before any frame: nothing worth keeping.
    kept.unlink()
    with pytest.raises(KeyboardInterrupt):
        write_recording(path, interrupted(0), COLOR_INTRINSICS, fps=FPS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scene.db3"] and path.read_bytes() == good


def test_a_recording_whose_device_has_no_name_or_serial_plays(tmp_path, monkeypatch):
    # Not every recorder writes the device's name and serial number; they are for messages only.
    class Nameless(rs.software_device):
        def register_info(self, info, value):
            pass

    path = tmp_path / "nameless.db3"
    with monkeypatch.context() as patch:
        patch.setattr(rs, "software_device", Nameless)
        write_recording(path, _numbered_frames(2), COLOR_INTRINSICS, fps=FPS)
    camera = RecordingConfig(path=str(path), real_time=False, repeat=False).make_camera()
    assert len(_play_to_end(camera)) == 2
    assert (camera.device_name, camera.serial_number) == ("", "")


def test_a_recording_path_under_the_home_directory_is_found(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    write_recording(tmp_path / "scene.db3", _numbered_frames(2), COLOR_INTRINSICS, fps=FPS)
    frames = _play_to_end(RecordingConfig(path="~/scene.db3", real_time=False, repeat=False).make_camera())
    assert len(frames) == 2


# -- a real device -----------------------------------------------------------------------------

def _attached_devices() -> list:
    return list(rs.context().query_devices())


def test_without_a_device_connect_says_how_to_find_one():
    if _attached_devices():
        pytest.skip("a RealSense is attached; this checks the message when none is")
    with pytest.raises(CameraNotFoundError) as err:
        RealSenseConfig(name="wrist").make_camera().connect()
    assert str(err.value) == NO_DEVICE_MESSAGE


@pytest.mark.hardware
def test_a_real_realsense_streams_aligned_rgbd():
    if not _attached_devices():
        pytest.skip("no RealSense attached (rs.context().query_devices() is empty)")
    config = RealSenseConfig(name="hardware", width=640, height=480, fps=30)
    with config.make_camera() as camera:
        frame = camera.next_frame(timeout_s=5)
        assert frame.color.shape == (480, 640, 3) and frame.depth_m.shape == (480, 640)
        assert (camera.intrinsics.width, camera.intrinsics.height) == (640, 480)
        assert 0 < camera.depth_scale_m < 0.01
        assert np.count_nonzero(frame.depth_m) > 0
        later = camera.next_frame(timeout_s=5)
        assert later.frame_number > frame.frame_number and later.timestamp_s > frame.timestamp_s
        # A D400 stamps global time unless turned off: frames are timed at capture, before they arrived.
        assert camera.capture_clock in ("global_time", "system_time", "arrival")
        assert later.capture_monotonic_s <= time.monotonic()
