"""The MuJoCo RGB-D camera: intrinsics from fovy, depth against ray casts and a known plane, determinism, capture, recording."""
import math
import threading

import numpy as np
import pytest

from edgeact.drivers.cameras.base import CameraError, camera_config_from_dict

pytest.importorskip("mujoco", reason="the MuJoCo camera needs mujoco (pip install mujoco==4.0.0)")

from edgeact.drivers.sim.mujoco_robot import MujocoWorld, MujocoWorldConfig  # noqa: E402

pytestmark = pytest.mark.timeout(60)

W, H = 160, 120
TABLE_TOP_Z_M = 0.2
FOVY_DEG = 42.0


@pytest.fixture(autouse=True)
def no_leaked_threads():
    yield
    leaked = [t.name for t in threading.enumerate() if t.name.startswith("camera-") or t.name == "sim-mujoco-physics"]
    assert not leaked, f"threads outlived their test: {leaked}"


def camera_module():
    """Imported when a test runs, not when pytest collects: importing registers the "mujoco" camera type, and
    test_cameras.py checks the list of built-in types (drivers/cameras/base.py's BUILTIN_CAMERA_MODULES)."""
    from edgeact.drivers.cameras import mujoco_camera

    return mujoco_camera


def make_renderer(world, camera="front", width=W, height=H, **options):
    return camera_module().MujocoRgbdRenderer(world, camera, width, height, **options)


@pytest.fixture(scope="module")
def world() -> MujocoWorld:
    return MujocoWorld()        # not started: it stays exactly as set, so renders are repeatable


@pytest.fixture
def renderer(world):
    made = make_renderer(world)
    yield made
    made.close()


def optical_rays(renderer, us: np.ndarray, vs: np.ndarray) -> np.ndarray:
    """Rays through pixel centres in the optical frame, scaled to z = 1 (so the hit distance is the depth)."""
    intr = renderer.intrinsics
    return np.stack([(us - intr.cx) / intr.fx, (vs - intr.cy) / intr.fy, np.ones_like(us, dtype=float)], axis=-1)


def ray_cast(world: MujocoWorld, renderer, step: int = 4):
    """MuJoCo's own ray caster through every `step`-th pixel: (us, vs, depth along the optical axis, geom ids)."""
    import mujoco

    vs, us = np.mgrid[step // 2:H:step, step // 2:W:step]
    us, vs = us.ravel(), vs.ravel()
    rays = optical_rays(renderer, us, vs)
    origin, rotation = world.site_pose("camera_optical")
    directions = rays @ rotation.T
    lengths = np.linalg.norm(directions, axis=1)
    unit = np.ascontiguousarray((directions / lengths[:, None]).ravel())
    geom_ids = np.zeros(len(us), np.int32)
    distances = np.zeros(len(us))
    mujoco.mj_multiRay(world.model, world.data, origin, unit, None, 1, -1, geom_ids, distances, None, len(us), 100.0)
    depth = np.where(geom_ids >= 0, distances / lengths, 0.0)    # unit-ray distance -> optical-axis depth
    return us, vs, depth, geom_ids


def test_intrinsics_follow_the_cameras_fovy_and_the_image_size(renderer):
    intr = renderer.intrinsics
    focal = (H / 2) / math.tan(math.radians(FOVY_DEG) / 2)
    assert (intr.width, intr.height) == (W, H)
    assert (intr.fx, intr.fy) == pytest.approx((focal, focal))
    assert (intr.cx, intr.cy) == ((W - 1) / 2, (H - 1) / 2)
    assert intr.distortion_model == "none"


def test_depth_matches_mujocos_ray_casts_and_the_table_plane(world, renderer):
    _, depth_m, _ = renderer.render()
    us, vs, expected, geom_ids = ray_cast(world, renderer)
    rendered = depth_m[vs, us]
    # Boxes and planes are drawn exactly (curved geoms are tessellated, so they are left out).
    flat = np.isin(world.model.geom_type[np.maximum(geom_ids, 0)], (0, 6)) & (geom_ids >= 0)   # mjGEOM_PLANE, BOX
    assert flat.sum() > 500
    close = np.abs(rendered[flat] - expected[flat]) < 1e-4
    assert close.mean() > 0.995, f"only {close.mean():.1%} of box/plane pixels within 0.1 mm"  # silhouette edges differ
    # The table top is a known plane z = 0.2 m: intersect its pixels' rays with it directly (the pixels
    # whose ray cast hits the table geom at that height; its front face is a box side).
    origin, rotation = world.site_pose("camera_optical")
    directions = optical_rays(renderer, us, vs) @ rotation.T            # optical z = 1: distance = depth
    hit_z = origin[2] + expected * directions[:, 2]
    top = (geom_ids == world.model.geom("table").id) & (np.abs(hit_z - TABLE_TOP_Z_M) < 1e-6)
    plane_depth = (TABLE_TOP_Z_M - origin[2]) / directions[top, 2]
    assert top.sum() > 200
    np.testing.assert_allclose(rendered[top], plane_depth, atol=1e-4)
    assert 0.4 < plane_depth.min() and plane_depth.max() < 1.2         # the table lies 0.4 - 1.2 m away


def test_a_block_projects_where_the_intrinsics_say_with_its_depth(world, renderer):
    color, depth_m, _ = renderer.render()
    position, _ = world.body_pose("red_block")
    top_centre = position + [0.0, 0.0, 0.015]
    origin, rotation = world.site_pose("camera_optical")
    x, y, z = rotation.T @ (top_centre - origin)            # in the optical frame
    intr = renderer.intrinsics
    u, v = round(intr.fx * x / z + intr.cx), round(intr.fy * y / z + intr.cy)
    r, g, b = (int(c) for c in color[v, u])
    assert r > 120 and g < 60 and b < 60, f"pixel ({u}, {v}) is {(r, g, b)}, not the red block"
    assert depth_m[v, u] == pytest.approx(z, abs=2e-3)


def test_frames_are_deterministic_for_a_fixed_state(world, renderer):
    first = renderer.render()
    again = renderer.render()
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    world.set_joint_positions({"shoulder_pan": 0.4, "elbow_flex": -0.3})
    try:
        moved = renderer.render()
        assert (moved[0] != first[0]).any(axis=-1).mean() > 0.01     # the arm swung: pixels changed
    finally:
        world.set_joint_positions({"shoulder_pan": 0.0, "elbow_flex": 0.0})
    back = renderer.render()
    np.testing.assert_array_equal(back[0], first[0])
    np.testing.assert_array_equal(back[1], first[1])


def test_nothing_and_beyond_range_read_as_no_depth(world):
    near = make_renderer(world, max_depth_m=0.6)
    try:
        _, depth_m, _ = near.render()
        us, vs, expected, geom_ids = ray_cast(world, near)
    finally:
        near.close()
    rendered = depth_m[vs, us]
    assert (expected > 0.62).sum() > 100
    assert np.all(rendered[expected > 0.62] == 0)
    assert np.all(rendered[geom_ids < 0] == 0)
    assert rendered[(expected > 0) & (expected < 0.58)].min() > 0


def test_the_camera_captures_the_running_world_at_its_rate_and_stops_cleanly():
    config = camera_module().MujocoCameraConfig(name="front", world="captured", width=W, height=H, fps=20.0)
    with MujocoWorld(MujocoWorldConfig(name="captured")) as world:
        camera = config.make_camera()
        with camera:
            assert camera.intrinsics.width == W
            frames = [camera.next_frame(timeout_s=5.0) for _ in range(3)]
            world.set_joint_positions({"shoulder_pan": 0.5})
            later = camera.next_frame(timeout_s=5.0)
        assert [f.frame_number for f in frames] == sorted({f.frame_number for f in frames})
        times = [f.timestamp_s for f in frames + [later]]
        assert times == sorted(times) and times[-1] > times[0]        # device time is the simulated time
        assert frames[0].color.shape == (H, W, 3) and frames[0].depth_m.dtype == np.float32
        assert (later.color != frames[-1].color).any()


def test_a_recording_of_the_camera_plays_back_through_the_realsense_class(tmp_path, world, renderer):
    pytest.importorskip("pyrealsense2", reason="recording needs pyrealsense2")
    from edgeact.drivers.cameras.playback import RecordingConfig
    from edgeact.drivers.cameras.recording import write_recording

    source = []
    for pan in (0.0, 0.2, 0.4):
        world.set_joint_positions({"shoulder_pan": pan})
        color, depth_m, _ = renderer.render()
        source.append((color, depth_m))
    world.set_joint_positions({"shoulder_pan": 0.0})
    path = tmp_path / "mujoco.db3"
    assert write_recording(path, source, renderer.intrinsics, fps=15.0) == 3

    camera = RecordingConfig(path=str(path), real_time=False, repeat=False).make_camera()
    played = []
    camera.add_listener(played.append)
    with camera:
        with pytest.raises(CameraError, match="ended after"):
            for _ in range(100):
                camera.next_frame(timeout_s=10)
        assert camera.intrinsics.fx == pytest.approx(renderer.intrinsics.fx, rel=1e-6)
        assert (camera.intrinsics.cx, camera.intrinsics.cy) == pytest.approx((renderer.intrinsics.cx,
                                                                              renderer.intrinsics.cy))
    assert [f.frame_number for f in played] == [0, 1, 2]
    for frame, (color, depth_m) in zip(played, source):
        np.testing.assert_array_equal(frame.color, color)
        assert np.abs(frame.depth_m - depth_m).max() <= 0.0005 + 1e-6     # z16 at 1 mm per unit


def test_config_and_setup_mistakes_are_named(world):
    camera_module()
    config = camera_config_from_dict({"type": "mujoco", "camera": "front", "width": W, "height": H})
    assert isinstance(config, camera_module().MujocoCameraConfig)
    with pytest.raises(CameraError, match="no MuJoCo world 'default' is running"):
        config.make_camera().connect()
    with pytest.raises(CameraError, match="no camera 'wrist' in the MuJoCo scene; its cameras: front"):
        make_renderer(world, "wrist")
    with pytest.raises(CameraError, match="exceeds the scene's offscreen buffer"):
        make_renderer(world, width=1280, height=720)
    with pytest.raises(Exception, match="fps=0 must be in"):
        camera_module().MujocoCameraConfig(fps=0)
