"""Hand-eye calibration (calibration/hand_eye.py) on synthetic views: the arm's kinematics move a marker on the hand,
its corners projected into a camera of known pose; the solver gives that pose back, noise is averaged, degenerate
poses, bad markers and unusable intrinsics are refused, and the result loads as `plan.trace_camera_pose`."""
import json
import math

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2", reason="hand-eye calibration needs OpenCV "
                                        "(pip install opencv-python-headless==4.14.0.94)")
pytest.importorskip("scipy", reason="the hand-eye refinement needs SciPy")

from edgeact.calibration.hand_eye import (  # noqa: E402
    MIN_AXIS_SPREAD_DEG, MIN_SAMPLES, MIN_TURN_DEG, HandEyeError, HandEyeResult, HandEyeSample, MarkerSpec,
    MarkerView, calibration_poses, camera_matrix, check_diversity, detect_marker, invert, quaternion_xyzw,
    rotation_angle_deg, solve_fixed_camera, transform,
)
from edgeact.drivers.cameras.base import DISTORTION_MODELS, Intrinsics  # noqa: E402
from edgeact.runtime.errors import ConfigError  # noqa: E402
from edgeact.runtime.trace_follow import camera_pose_from_dict  # noqa: E402

PINHOLE = Intrinsics(fx=600.0, fy=600.0, cx=319.5, cy=239.5, width=640, height=480)
DISTORTED = Intrinsics(fx=600.0, fy=600.0, cx=319.5, cy=239.5, width=640, height=480,
                       distortion_model="brown_conrady", distortion_coeffs=(0.08, -0.15, 0.001, -0.0015, 0.05))
SPREAD_RAD = 0.35


def rotvec(*v: float) -> np.ndarray:
    return cv2.Rodrigues(np.asarray(v, dtype=np.float64))[0]


@pytest.fixture(scope="module")
def kinematics():
    pytest.importorskip("pinocchio", reason="the arm's kinematics need Pinocchio (pip install pin==4.1.0)")
    from edgeact.runtime.kinematics import ArmKinematics

    return ArmKinematics()


@pytest.fixture(scope="module")
def scene(kinematics):
    """The truth: the description's camera_optical frame at q=0 as ref_T_cam, and a marker taped 2-3 cm off the ee
    frame, turned so that at q=0 it faces the camera tilted by ~27 degrees."""
    q0 = np.zeros(len(kinematics.joints))
    camera, hand = kinematics.frame_pose("camera_optical", q0), kinematics.forward(q0)
    facing_camera = camera.rotation @ rotvec(math.pi, 0, 0) @ rotvec(0.2, -0.15, 0.4)
    return transform(camera.rotation, camera.position_m), transform(hand.rotation.T @ facing_camera,
                                                                    [0.02, -0.015, 0.03])


def synthetic_samples(kinematics, scene, intrinsics=PINHOLE, count=12, noise_px=0.0, noise_seed=0,
                      marker=MarkerSpec()):
    """Samples at `calibration_poses` around q=0 (spread 0.35, seed 0): the marker's corners carried through FK and
    the true mount into the camera and projected (plus seeded Gaussian pixel noise), its pose from solvePnP's square
    solver as detect_marker finds it; poses where a corner leaves the image, or the marker faces away, are skipped."""
    ref_T_cam, hand_T_marker = scene
    matrix, dist = intrinsics.matrix(), np.asarray(intrinsics.distortion_coeffs)
    corners = np.c_[marker.corners_m(), np.ones(4)]
    rng = np.random.default_rng(noise_seed)
    samples = []
    for q in calibration_poses(np.zeros(5), kinematics.lower_rad, kinematics.upper_rad, count, SPREAD_RAD, seed=0):
        hand = kinematics.forward(q)
        ref_T_hand = transform(hand.rotation, hand.position_m)
        cam_T_marker = invert(ref_T_cam) @ ref_T_hand @ hand_T_marker
        in_cam = (cam_T_marker @ corners.T).T[:, :3]
        if (in_cam[:, 2] <= 0.05).any() or cam_T_marker[:3, 2] @ cam_T_marker[:3, 3] >= 0:
            continue
        px = cv2.projectPoints(in_cam, np.zeros(3), np.zeros(3), matrix, dist)[0].reshape(4, 2)
        if (px < 0).any() or (px[:, 0] > intrinsics.width - 1).any() or (px[:, 1] > intrinsics.height - 1).any():
            continue
        px = px + rng.normal(0.0, noise_px, px.shape)
        ok, rvec, tvec = cv2.solvePnP(marker.corners_m(), px, matrix, dist, flags=cv2.SOLVEPNP_IPPE_SQUARE)
        assert ok
        view = MarkerView(px, transform(cv2.Rodrigues(rvec)[0], tvec.reshape(3)), 0.0)
        samples.append(HandEyeSample(dict(zip(kinematics.joints, (float(v) for v in q))), ref_T_hand, view))
    return samples


def pose_error(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(metres, degrees) between two 4x4 poses."""
    return float(np.linalg.norm(a[:3, 3] - b[:3, 3])), rotation_angle_deg(a[:3, :3].T @ b[:3, :3])


@pytest.mark.parametrize("method, intrinsics", [("park", PINHOLE), ("tsai", PINHOLE), ("park", DISTORTED)],
                         ids=["park", "tsai", "park-distorted"])
def test_exact_views_give_back_the_camera_and_the_marker_mount(kinematics, scene, method, intrinsics):
    """Noise-free corners (undistorted, or through Brown-Conrady lens distortion): the camera's pose and the marker's
    mount on the hand come back to ~1e-9, every corner reprojects onto its detection, closed form and refined."""
    ref_T_cam, hand_T_marker = scene
    samples = synthetic_samples(kinematics, scene, intrinsics)
    assert len(samples) >= 8                        # most poses seen (the rest leave the image)
    # the views are exact: solvePnP's square solver gives the true marker pose in the camera
    for s in samples:
        np.testing.assert_allclose(s.view.cam_T_marker, invert(ref_T_cam) @ s.ref_T_hand @ hand_T_marker, atol=1e-8)
    result = solve_fixed_camera(samples, intrinsics, MarkerSpec(), method)
    assert result.method == method and result.reference_frame == "base"
    np.testing.assert_allclose(result.ref_T_cam, ref_T_cam, atol=1e-7)
    np.testing.assert_allclose(result.hand_T_marker, hand_T_marker, atol=1e-7)
    metres, degrees = pose_error(result.ref_T_cam, ref_T_cam)
    assert metres < 1e-7 and degrees < 1e-5
    assert len(result.reprojection_px) == len(samples) and max(result.reprojection_px) < 1e-5
    assert result.extra["linear_solution_median_reprojection_px"] < 1e-5
    loaded = camera_pose_from_dict(result.config_entry())          # what plan.trace_camera_pose reads
    np.testing.assert_allclose(loaded.position_m, ref_T_cam[:3, 3], atol=1e-6)
    np.testing.assert_allclose(loaded.rotation, ref_T_cam[:3, :3], atol=1e-7)


def test_pixel_noise_is_averaged_and_the_refinement_beats_the_closed_form(kinematics, scene):
    """Corners with 0.3 px Gaussian noise (seeded) at 16 poses: the camera within 2 mm and 0.2 degree, several times
    nearer the truth than OpenCV's closed form alone (whose per-view marker distances are the noisy part), and its
    corners reproject about as far as the noise puts them, nearer than the closed form's."""
    ref_T_cam, _ = scene
    samples = synthetic_samples(kinematics, scene, count=16, noise_px=0.3, noise_seed=0)
    result = solve_fixed_camera(samples, PINHOLE, MarkerSpec(), "park")
    metres, degrees = pose_error(result.ref_T_cam, ref_T_cam)
    assert metres < 0.002 and degrees < 0.2

    hand_T_ref = [invert(s.ref_T_hand) for s in samples]
    r, t = cv2.calibrateHandEye([h[:3, :3] for h in hand_T_ref], [h[:3, 3] for h in hand_T_ref],
                                [s.view.cam_T_marker[:3, :3] for s in samples],
                                [s.view.cam_T_marker[:3, 3] for s in samples], method=cv2.CALIB_HAND_EYE_PARK)
    linear_metres, linear_degrees = pose_error(transform(r, t.reshape(3)), ref_T_cam)
    assert metres < linear_metres / 3 and degrees < linear_degrees / 3
    assert result.median_reprojection_px < 1.0
    assert result.median_reprojection_px < result.extra["linear_solution_median_reprojection_px"]


def hand_sample(rotation: np.ndarray) -> HandEyeSample:
    """A sample whose hand has this rotation (check_diversity reads only the hand's pose)."""
    return HandEyeSample({}, transform(rotation, [0.3, 0.0, 0.3]), MarkerView(np.zeros((4, 2)), np.eye(4), 0.0))


def turned_about(axes_deg: list[tuple[float, np.ndarray]]) -> list[HandEyeSample]:
    """A first sample at the identity, then one per (angle in degrees, axis)."""
    samples = [hand_sample(np.eye(3))]
    for angle, axis in axes_deg:
        samples.append(hand_sample(rotvec(*(np.radians(angle) * axis / np.linalg.norm(axis)))))
    return samples


def axis_at(degrees: float) -> np.ndarray:
    """A unit axis `degrees` away from x, in the x-y plane."""
    return np.array([math.cos(math.radians(degrees)), math.sin(math.radians(degrees)), 0.0])


def test_too_few_or_one_axis_poses_are_refused(kinematics, scene):
    """Fewer than MIN_SAMPLES samples: refused, naming the count. Poses that turn only the wrist roll: refused as one
    axis, by check_diversity and by the solver before it solves. The synthetic set passes. Turns whose axes are
    closer than MIN_AXIS_SPREAD_DEG (opposite axes count as one) fail, further apart pass, and turns smaller than
    MIN_TURN_DEG do not count."""
    samples = synthetic_samples(kinematics, scene)
    check_diversity(samples)                     # the normal set passes
    with pytest.raises(HandEyeError, match=rf"^{MIN_SAMPLES - 1} poses .* at least {MIN_SAMPLES}"):
        check_diversity(samples[:MIN_SAMPLES - 1])

    roll = kinematics.joints.index("wrist_roll")
    rolled = []
    for angle in np.linspace(-0.6, 0.6, 8):
        q = np.array([0.1, -0.2, 0.3, 0.2, 0.0])
        q[roll] = angle
        hand = kinematics.forward(q)
        rolled.append(HandEyeSample(dict(zip(kinematics.joints, q)), transform(hand.rotation, hand.position_m),
                                    samples[0].view))
    with pytest.raises(HandEyeError, match=r"nearly one axis \(axes at most 0\.\d degrees apart, 7 turns"):
        check_diversity(rolled)
    with pytest.raises(HandEyeError, match="nearly one axis"):
        solve_fixed_camera(rolled, PINHOLE, MarkerSpec())

    x = axis_at(0.0)
    below, above = MIN_AXIS_SPREAD_DEG - 3, MIN_AXIS_SPREAD_DEG + 3
    with pytest.raises(HandEyeError, match="one axis"):
        check_diversity(turned_about([(20, x), (-30, x), (25, axis_at(below)), (40, -x), (10, axis_at(below / 2)),
                                      (30, x)]))
    check_diversity(turned_about([(20, x), (-30, x), (25, axis_at(above)), (40, -x), (10, x), (30, x)]))
    small = MIN_TURN_DEG * 0.8           # far-apart axes, but turns too small to tell an axis
    with pytest.raises(HandEyeError, match="one axis"):
        check_diversity(turned_about([(20, x), (30, x), (small, axis_at(90)), (small, np.array([0, 0, 1.0])),
                                      (25, x), (15, -x)]))


def test_poses_nearly_the_same_are_refused_however_well_they_reproject(kinematics, scene):
    """Six poses within a fraction of a degree and two turned 7 degrees about far-apart axes passed the axes' check,
    and the solve put the camera 0.4-0.9 m off, upside down, at 1-1.5 px: too few poses turn the hand."""
    x = axis_at(0.0)
    near = [(0.3, x), (0.2, axis_at(90)), (0.4, x), (0.1, np.array([0, 0, 1.0])), (0.3, axis_at(45))]
    with pytest.raises(HandEyeError, match=r"only 2 of the 7 poses after the first turn the hand 5 degrees or more "
                                           r"from it \(at least 4 needed\)"):
        check_diversity(turned_about(near + [(7, x), (7, axis_at(90))]))
    check_diversity(turned_about([(0.3, x), (0.2, axis_at(90)), (7, x), (7, axis_at(90)), (9, axis_at(45)),
                                  (8, np.array([0, 0, 1.0])), (6, x)]))


def test_a_solution_with_the_marker_behind_the_camera_is_refused(kinematics, scene, monkeypatch):
    """A projection cannot tell in front from behind: a pose that fits the pixels with the marker behind the camera
    is refused, whatever its reprojection error."""
    from edgeact.calibration import hand_eye

    samples = synthetic_samples(kinematics, scene)
    ref_T_cam, mount = scene
    turned = ref_T_cam @ transform(rotvec(math.pi, 0.0, 0.0), [0.0, 0.0, 0.0])     # facing the other way
    assert all(hand_eye._marker_depths(s, ref_T_cam, mount, MarkerSpec()).min() > 0 for s in samples)
    assert all(hand_eye._marker_depths(s, turned, mount, MarkerSpec()).max() < 0 for s in samples)
    monkeypatch.setattr(hand_eye, "refine", lambda *args: (turned, mount))
    with pytest.raises(HandEyeError, match=rf"puts the marker behind the camera in {len(samples)} of {len(samples)}"):
        solve_fixed_camera(samples, PINHOLE, MarkerSpec())


def test_unknown_methods_are_refused(kinematics, scene):
    """A method OpenCV's solver is not asked by name: refused with the known ones."""
    with pytest.raises(ConfigError, match="'lsq' unknown; use one of park, tsai"):
        solve_fixed_camera(synthetic_samples(kinematics, scene), PINHOLE, MarkerSpec(), "lsq")


def test_quaternion_round_trips_through_the_trace_camera_pose_config():
    """quaternion_xyzw of random rotations loads back through camera_pose_from_dict to the same matrix (1e-9), w >= 0;
    the identity is (0, 0, 0, 1); a result's config_entry loads to its pose (rounded to 1e-6 m) and to_dict is JSON."""
    rng = np.random.default_rng(0)
    for v in rng.normal(0.0, 1.5, size=(100, 3)):
        rotation = rotvec(*v)
        q = quaternion_xyzw(rotation)
        assert len(q) == 4 and q[3] >= 0 and abs(np.linalg.norm(q) - 1.0) < 1e-12
        pose = camera_pose_from_dict({"position_m": [0.1, -0.2, 0.5], "quaternion_xyzw": q})
        np.testing.assert_allclose(pose.rotation, rotation, atol=1e-9)
    assert quaternion_xyzw(np.eye(3)) == [0.0, 0.0, 0.0, 1.0]
    np.testing.assert_allclose(quaternion_xyzw(rotvec(0, 0, math.pi / 2)), [0, 0, math.sqrt(0.5), math.sqrt(0.5)],
                               atol=1e-12)
    # a turn past pi is the shorter turn the other way: w stays >= 0
    np.testing.assert_allclose(quaternion_xyzw(rotvec(0, 1.5 * math.pi, 0)), [0, -math.sqrt(0.5), 0, math.sqrt(0.5)],
                               atol=1e-12)

    ref_T_cam = transform(rotvec(2.0, -0.7, 0.4), [0.1234567891, -0.2, 0.56])
    result = HandEyeResult(ref_T_cam, transform(rotvec(0.1, 0.2, 0.3), [0.02, 0, 0.03]), [0.4, 0.5, 0.3], "park")
    entry = result.config_entry()
    assert set(entry) == {"position_m", "quaternion_xyzw"}
    pose = camera_pose_from_dict(json.loads(json.dumps(entry)))
    np.testing.assert_allclose(pose.position_m, ref_T_cam[:3, 3], atol=1e-6)
    assert pose.position_m[0] == 0.123457
    np.testing.assert_allclose(pose.rotation, ref_T_cam[:3, :3], atol=1e-7)
    data = json.loads(json.dumps(result.to_dict()))
    assert data["trace_camera_pose"] == entry and data["samples"] == 3 and data["reprojection_px"]["median"] == 0.4


@pytest.mark.parametrize("model", [m for m in DISTORTION_MODELS if m not in ("none", "brown_conrady")])
def test_camera_matrix_takes_brown_conrady_and_refuses_other_lens_models(model):
    """OpenCV's matrix from fx fy cx cy; Brown-Conrady coefficients passed through as OpenCV's (k1 k2 p1 p2 k3); any
    other model with non-zero coefficients refused (naming it), with all-zero ones accepted as the pinhole."""
    matrix, dist = camera_matrix(DISTORTED)
    np.testing.assert_array_equal(matrix, [[600, 0, 319.5], [0, 600, 239.5], [0, 0, 1]])
    np.testing.assert_array_equal(dist, DISTORTED.distortion_coeffs)
    matrix, dist = camera_matrix(PINHOLE)
    np.testing.assert_array_equal(dist, np.zeros(5))
    other = Intrinsics(fx=610.0, fy=605.0, cx=320.0, cy=240.0, width=640, height=480, distortion_model=model,
                       distortion_coeffs=(0.1, 0.02, 0.0, 0.0, 0.0))
    with pytest.raises(ConfigError, match=rf"distortion model '{model}'.*Brown-Conrady"):
        camera_matrix(other)
    zeros = Intrinsics(fx=610.0, fy=605.0, cx=320.0, cy=240.0, width=640, height=480, distortion_model=model)
    matrix, dist = camera_matrix(zeros)
    np.testing.assert_array_equal(matrix, zeros.matrix())
    np.testing.assert_array_equal(dist, np.zeros(5))


def test_marker_spec_refuses_unknown_dictionaries_ids_and_sides():
    """An unknown dictionary is named with OpenCV's own listed; an id outside the dictionary, a bool id, a side of 0
    or not finite: refused. The corners are the black square's, in ArUco's order, z out of the face."""
    with pytest.raises(ConfigError, match="'DICT_9X9_50' unknown; use one of OpenCV's: .*DICT_4X4_50.*DICT_APRILTAG"):
        MarkerSpec(dictionary="DICT_9X9_50")
    with pytest.raises(ConfigError, match="unknown"):
        MarkerSpec(dictionary="CORNER_REFINE_SUBPIX")
    with pytest.raises(ConfigError, match=r"marker id 50: DICT_4X4_50 has ids 0\.\.49"):
        MarkerSpec(marker_id=50)
    MarkerSpec(marker_id=49)
    MarkerSpec(dictionary="DICT_6X6_250", marker_id=249)
    for bad in (-1, True, 7.0):
        with pytest.raises(ConfigError, match="marker id"):
            MarkerSpec(marker_id=bad)
    for side in (0.0, -0.04, float("nan"), float("inf"), 2.0):
        with pytest.raises(ConfigError, match="marker side"):
            MarkerSpec(side_m=side)
    np.testing.assert_array_equal(MarkerSpec(side_m=0.05).corners_m(),
                                  [[-0.025, 0.025, 0], [0.025, 0.025, 0], [0.025, -0.025, 0], [-0.025, -0.025, 0]])


def render_marker(marker: MarkerSpec, cam_T_marker: np.ndarray, intrinsics=PINHOLE, background=128,
                  into: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The marker's printable image (240 px black square) warped into a grey camera image at this pose: the black
    square's outer corners (pixel edges at 59.5 and 299.5) mapped onto their projections. (RGB image, corners px)."""
    image = marker.image(240)
    corners_px = cv2.projectPoints(marker.corners_m(), cv2.Rodrigues(cam_T_marker[:3, :3])[0], cam_T_marker[:3, 3],
                                   intrinsics.matrix(), np.asarray(intrinsics.distortion_coeffs))[0].reshape(4, 2)
    edges = np.array([[59.5, 59.5], [299.5, 59.5], [299.5, 299.5], [59.5, 299.5]], np.float32)
    homography = cv2.getPerspectiveTransform(edges, corners_px.astype(np.float32))
    if into is None:
        grey = cv2.warpPerspective(image, homography, (intrinsics.width, intrinsics.height), flags=cv2.INTER_LINEAR,
                                   borderValue=background)
    else:
        grey = cv2.warpPerspective(image, homography, (intrinsics.width, intrinsics.height), dst=into.copy(),
                                   flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_TRANSPARENT)
    return grey, corners_px


def test_the_printable_marker_has_a_quiet_zone_and_is_found_where_it_was_drawn():
    """image(240): the 240 px black square inside a 60 px white quiet zone (or the one given). Warped into a 640x480
    grey image at a known pose (45 cm ahead, tilted ~20 degrees), detect_marker finds its corners within 0.5 px and
    its pose within 3 mm and 1 degree; an empty image, a marker of another id, or two of the same id: None; an image
    of another size than the intrinsics', or not uint8 RGB: ValueError."""
    marker = MarkerSpec(side_m=0.1)
    image = marker.image(240)
    assert image.shape == (360, 360) and image.dtype == np.uint8
    for edge in (image[:60], image[-60:], image[:, :60], image[:, -60:]):
        assert (edge == 255).all()
    assert (image[60, 60:300] == 0).all() and (image[60:300, 60] == 0).all() and (image[299, 60:300] == 0).all()
    assert marker.image(100, quiet_zone=10).shape == (120, 120)

    truth = transform(rotvec(math.pi, 0, 0) @ rotvec(0.3, 0.2, -0.15), [0.03, -0.02, 0.45])
    grey, corners_px = render_marker(marker, truth)
    rgb = cv2.cvtColor(grey, cv2.COLOR_GRAY2RGB)
    view = detect_marker(rgb, PINHOLE, marker)
    assert view is not None
    assert np.max(np.linalg.norm(view.corners_px - corners_px, axis=1)) < 0.5
    metres, degrees = pose_error(view.cam_T_marker, truth)
    assert metres < 0.003 and degrees < 1.0
    assert 0 <= view.reprojection_px < 0.5

    assert detect_marker(np.full((480, 640, 3), 128, np.uint8), PINHOLE, marker) is None
    assert detect_marker(rgb, PINHOLE, MarkerSpec(marker_id=3, side_m=0.1)) is None
    left = transform(truth[:3, :3], [-0.12, -0.02, 0.45])
    right = transform(truth[:3, :3], [0.12, -0.02, 0.45])
    twice, _ = render_marker(marker, right, into=render_marker(marker, left)[0])
    for alone in (left, right):           # each is found alone
        assert detect_marker(cv2.cvtColor(render_marker(marker, alone)[0], cv2.COLOR_GRAY2RGB), PINHOLE, marker)
    assert detect_marker(cv2.cvtColor(twice, cv2.COLOR_GRAY2RGB), PINHOLE, marker) is None

    with pytest.raises(ValueError, match="640x480 image with intrinsics of 320x240"):
        detect_marker(rgb, Intrinsics(fx=300.0, fy=300.0, cx=159.5, cy=119.5, width=320, height=240), marker)
    with pytest.raises(ValueError, match="uint8 RGB"):
        detect_marker(grey, PINHOLE, marker)
    with pytest.raises(ValueError, match="uint8 RGB"):
        detect_marker(rgb.astype(np.float32), PINHOLE, marker)


def test_calibration_poses_start_where_the_arm_is_and_stay_within_bounds():
    """The first pose is the start; `count` poses, each joint within +-spread of the start and within the bounds
    (clipped near a limit); the same seed gives the same poses, another seed others; a non-positive or non-finite
    spread, or no poses, is refused."""
    start = np.array([0.1, -0.2, 1.5, 0.0, -0.3])
    low, high = np.array([-1.0, -1.0, -1.0, -1.0, -1.0]), np.array([1.0, 1.0, 1.6, 1.0, 1.0])
    poses = calibration_poses(start, low, high, 15, 0.4, seed=0)
    assert len(poses) == 15
    np.testing.assert_array_equal(poses[0], start)
    stacked = np.array(poses)
    assert (stacked >= low).all() and (stacked <= high).all()
    assert (np.abs(stacked - start) <= 0.4 + 1e-12).all()
    assert (stacked[:, 2] == 1.6).any()          # near the upper limit some are clipped onto it
    assert len({tuple(p) for p in poses}) == 15
    assert all(np.array_equal(a, b) for a, b in zip(poses, calibration_poses(start, low, high, 15, 0.4, seed=0)))
    other = calibration_poses(start, low, high, 15, 0.4, seed=1)
    np.testing.assert_array_equal(other[0], start)
    assert not np.allclose(np.array(other[1:]), stacked[1:])
    assert len(calibration_poses(start, low, high, 1, 0.4)) == 1
    np.testing.assert_array_equal(calibration_poses([2.0, 0, 0, 0, 0], low, high, 1, 0.4)[0], [1.0, 0, 0, 0, 0])
    for spread in (0.0, -0.1, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="spread"):
            calibration_poses(start, low, high, 5, spread)
    with pytest.raises(ConfigError, match="count 0"):
        calibration_poses(start, low, high, 0, 0.4)


def test_the_printable_marker_prints_to_size_and_is_the_asked_one(tmp_path):
    """`edgeact hand-eye-marker`: a PNG whose stored resolution prints the black square at --marker-side-m, which
    OpenCV reads as the asked dictionary and id; a taken path is kept without --overwrite."""
    from PIL import Image

    from edgeact.runtime.cli import main
    from edgeact.runtime.errors import ConfigError

    out = tmp_path / "marker.png"
    assert main(["hand-eye-marker", "--out", str(out), "--marker-id", "3", "--marker-side-m", "0.05"]) == 0
    image = Image.open(out)
    dpi = image.info["dpi"][0]
    pixels = np.asarray(image.convert("L"))
    dark = np.nonzero(pixels.min(axis=0) < 128)[0]          # the columns the black square spans
    assert (dark[-1] - dark[0] + 1) / dpi * 0.0254 == pytest.approx(0.05, rel=0.005)
    detector = cv2.aruco.ArucoDetector(cv2.aruco.getPredefinedDictionary(cv2.aruco.DICT_4X4_50))
    _, ids, _ = detector.detectMarkers(cv2.resize(pixels, (300, 300), interpolation=cv2.INTER_AREA))
    assert ids is not None and ids.reshape(-1).tolist() == [3]
    with pytest.raises(ConfigError, match="already exists"):
        main(["-v", "hand-eye-marker", "--out", str(out)])
    with pytest.raises(ConfigError, match="PNG"):
        main(["-v", "hand-eye-marker", "--out", str(tmp_path / "marker.jpg")])
