"""Hand-eye calibration of a camera fixed to the robot's base ("eye-to-hand"): where the colour camera's optical frame
is in the arm's reference frame, from a marker on the gripper seen at several arm poses.

What it is for: following a trace (runtime/trace_follow.py) turns image points into camera rays, so it needs the
camera's pose in the frame the actions are in (`plan.trace_camera_pose`). A robot description gives a nominal pose;
a mast bent by a few millimetres or a camera remounted moves the real one.

The method is the standard one. An ArUco marker is fixed anywhere on the gripper (where on it need not be known).
At each arm pose i, forward kinematics of the joints read back from the motors gives the hand's pose in the
reference frame (ref_T_hand_i) and the marker's four corners in the image give the marker's pose in the camera
(cam_T_marker_i, OpenCV's `solvePnP` with the square's own solver). The unknowns are ref_T_cam and hand_T_marker,
with ref_T_hand_i . hand_T_marker = ref_T_cam . cam_T_marker_i at every pose: OpenCV's `calibrateHandEye` solves
that (for a fixed camera, fed the hand's inverse poses: hand_T_ref_i). The result is checked by reprojecting every
corner through the solved chain (ref_T_cam^-1 . ref_T_hand_i . hand_T_marker) onto the image: the error in pixels
says how well the whole chain (kinematics, joint readings, intrinsics, detection) agrees.

The poses must turn the hand about at least two different axes (a rotation about one axis leaves the translation
along it undetermined); `check_diversity` refuses samples that do not.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from edgeact.runtime.errors import ConfigError, EdgeactError

MIN_SAMPLES = 6                 # OpenCV needs 3; more poses average the detection's noise
MIN_AXIS_SPREAD_DEG = 15.0      # the relative rotations' axes must span at least this angle
MIN_TURN_DEG = 5.0              # a relative rotation smaller than this says nothing about the axes
# At least this share of the poses must turn the hand MIN_TURN_DEG from the first: six poses nearly the same and two
# turned 7 degrees passed the axes' spread, and the solve put the camera 0.4-0.9 m off, upside down, at 1-1.5 px.
MIN_TURNED_SHARE = 0.5
MAX_REPROJECTION_PX = 2.0       # median corner error above this: the chain disagrees (a wrong frame, units, ...)
METHODS = {"park": "CALIB_HAND_EYE_PARK", "tsai": "CALIB_HAND_EYE_TSAI", "horaud": "CALIB_HAND_EYE_HORAUD",
           "andreff": "CALIB_HAND_EYE_ANDREFF", "daniilidis": "CALIB_HAND_EYE_DANIILIDIS"}


class HandEyeError(EdgeactError):
    """The samples cannot give a trustworthy camera pose; the message says why and what to change."""


def import_cv2():
    try:
        import cv2
    except ImportError as exc:
        raise ConfigError(f"hand-eye calibration needs OpenCV ({exc}); install it with "
                          "`pip install opencv-python-headless==4.14.0.94` (the edgeact[calibration] extra)") from None
    return cv2


@dataclass(frozen=True)
class MarkerSpec:
    """The ArUco marker on the gripper: its dictionary, its id and the side of its black square in metres (the
    outer edge of the black border, as printed: measure it, the pose's scale comes from it)."""

    dictionary: str = "DICT_4X4_50"
    marker_id: int = 7
    side_m: float = 0.04

    def __post_init__(self) -> None:
        cv2 = import_cv2()
        if not self.dictionary.startswith("DICT_") or not hasattr(cv2.aruco, self.dictionary):
            known = [n for n in dir(cv2.aruco) if n.startswith("DICT_") and n.upper() == n]
            raise ConfigError(f"marker dictionary {self.dictionary!r} unknown; use one of OpenCV's: {', '.join(known)}")
        size = self.aruco_dictionary().bytesList.shape[0]
        if isinstance(self.marker_id, bool) or not isinstance(self.marker_id, int) or not 0 <= self.marker_id < size:
            raise ConfigError(f"marker id {self.marker_id!r}: {self.dictionary} has ids 0..{size - 1}")
        if not (math.isfinite(self.side_m) and 0.005 <= self.side_m <= 1.0):
            raise ConfigError(f"marker side {self.side_m} m: give the printed black square's side in metres "
                              "(0.005..1), e.g. 0.04 for 4 cm")

    def aruco_dictionary(self):
        cv2 = import_cv2()
        return cv2.aruco.getPredefinedDictionary(getattr(cv2.aruco, self.dictionary))

    def corners_m(self) -> np.ndarray:
        """(4, 3) the corners in the marker's frame, in ArUco's order (top-left, top-right, bottom-right,
        bottom-left; z out of the printed face), the order `solvePnP`'s square solver takes."""
        h = self.side_m / 2
        return np.array([[-h, h, 0.0], [h, h, 0.0], [h, -h, 0.0], [-h, -h, 0.0]])

    def image(self, pixels: int, quiet_zone: int | None = None) -> np.ndarray:
        """The marker to print (or to texture a simulated gripper with): (n, n) uint8, the black square `pixels`
        wide inside a white quiet zone (a quarter of it on each side unless given), which detection needs."""
        cv2 = import_cv2()
        square = cv2.aruco.generateImageMarker(self.aruco_dictionary(), self.marker_id, pixels, borderBits=1)
        pad = pixels // 4 if quiet_zone is None else quiet_zone
        return cv2.copyMakeBorder(square, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=255)


@dataclass(frozen=True)
class MarkerView:
    """The marker in one image: its corners (4, 2) in pixels, its pose in the camera's optical frame, and how far
    the pose's corners reproject from the detected ones (pixels, the largest of the four)."""

    corners_px: np.ndarray
    cam_T_marker: np.ndarray        # (4, 4)
    reprojection_px: float

    @property
    def side_px(self) -> float:
        """The marker's mean side in the image: below ~40 px its corners, and so the pose, are coarse."""
        return float(np.mean(np.linalg.norm(self.corners_px - np.roll(self.corners_px, 1, axis=0), axis=1)))


def camera_matrix(intrinsics: Any) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV's camera matrix and distortion coefficients of a camera's Intrinsics (drivers/cameras/base.py).
    Brown-Conrady's coefficients are OpenCV's own (k1 k2 p1 p2 k3); any other model is refused unless its
    coefficients are all zero (then it is the pinhole)."""
    coeffs = np.asarray(intrinsics.distortion_coeffs, dtype=np.float64)
    if intrinsics.distortion_model not in ("none", "brown_conrady") and np.any(coeffs != 0):
        raise ConfigError(f"camera distortion model {intrinsics.distortion_model!r} with coefficients {coeffs.tolist()}: "
                          "the marker's pose needs OpenCV's Brown-Conrady model; stream the colour camera "
                          "rectified (RealSense colour streams of D400 cameras report brown_conrady or zeros)")
    matrix = np.array([[intrinsics.fx, 0.0, intrinsics.cx], [0.0, intrinsics.fy, intrinsics.cy], [0.0, 0.0, 1.0]])
    return matrix, (coeffs if intrinsics.distortion_model == "brown_conrady" else np.zeros(5))


def detect_marker(rgb: np.ndarray, intrinsics: Any, marker: MarkerSpec) -> MarkerView | None:
    """The marker's view in an (H, W, 3) uint8 RGB image, or None where it is not seen (or seen twice: a second
    marker of the same id would make the pose ambiguous)."""
    cv2 = import_cv2()
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"detect_marker: an (H, W, 3) uint8 RGB image, got {rgb.shape} {rgb.dtype}")
    if (rgb.shape[1], rgb.shape[0]) != (intrinsics.width, intrinsics.height):
        raise ValueError(f"detect_marker: a {rgb.shape[1]}x{rgb.shape[0]} image with intrinsics of "
                         f"{intrinsics.width}x{intrinsics.height}: take both from the same stream")
    parameters = cv2.aruco.DetectorParameters()
    parameters.cornerRefinementMethod = cv2.aruco.CORNER_REFINE_SUBPIX
    detector = cv2.aruco.ArucoDetector(marker.aruco_dictionary(), parameters)
    corners, ids, _ = detector.detectMarkers(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))
    if ids is None:
        return None
    found = [c for c, i in zip(corners, ids.reshape(-1)) if int(i) == marker.marker_id]
    if len(found) != 1:
        return None
    corners_px = found[0].reshape(4, 2).astype(np.float64)
    matrix, dist = camera_matrix(intrinsics)
    ok, rvec, tvec = cv2.solvePnP(marker.corners_m(), corners_px, matrix, dist, flags=cv2.SOLVEPNP_IPPE_SQUARE)
    if not ok:
        return None
    projected, _ = cv2.projectPoints(marker.corners_m(), rvec, tvec, matrix, dist)
    error = float(np.max(np.linalg.norm(projected.reshape(4, 2) - corners_px, axis=1)))
    return MarkerView(corners_px, transform(cv2.Rodrigues(rvec)[0], tvec.reshape(3)), error)


@dataclass(frozen=True)
class HandEyeSample:
    """One arm pose: the joints read back from the motors, the hand's pose in the reference frame (forward
    kinematics of those joints) and the marker's view."""

    joints_rad: dict[str, float]
    ref_T_hand: np.ndarray          # (4, 4)
    view: MarkerView


@dataclass
class HandEyeResult:
    ref_T_cam: np.ndarray                       # the camera's optical frame in the reference frame
    hand_T_marker: np.ndarray                   # where the marker sits on the hand (solved, not given)
    reprojection_px: list[float]                # per sample: the largest corner error through the solved chain
    method: str
    reference_frame: str = "base"
    camera_frame: str = ""                      # the description's camera frame compared against, if any
    nominal_offset_m: float | None = None       # distance from the description's pose
    nominal_offset_deg: float | None = None     # rotation from it
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def median_reprojection_px(self) -> float:
        return float(np.median(self.reprojection_px))

    def config_entry(self) -> dict[str, list[float]]:
        """`plan.trace_camera_pose` (runtime/trace_follow.py: camera_pose_from_dict reads it)."""
        return {"position_m": [round(float(v), 6) for v in self.ref_T_cam[:3, 3]],
                "quaternion_xyzw": [round(float(v), 8) for v in quaternion_xyzw(self.ref_T_cam[:3, :3])]}

    def to_dict(self) -> dict[str, Any]:
        return {"trace_camera_pose": self.config_entry(), "reference_frame": self.reference_frame,
                "method": self.method, "samples": len(self.reprojection_px),
                "reprojection_px": {"median": self.median_reprojection_px, "max": float(np.max(self.reprojection_px)),
                                    "per_sample": [float(v) for v in self.reprojection_px]},
                "marker_in_hand": {"position_m": self.hand_T_marker[:3, 3].tolist(),
                                   "quaternion_xyzw": quaternion_xyzw(self.hand_T_marker[:3, :3])},
                "camera_frame": self.camera_frame or None, "nominal_offset_m": self.nominal_offset_m,
                "nominal_offset_deg": self.nominal_offset_deg, **self.extra}


def transform(rotation: np.ndarray, translation: Sequence[float]) -> np.ndarray:
    out = np.eye(4)
    out[:3, :3], out[:3, 3] = rotation, translation
    return out


def invert(t: np.ndarray) -> np.ndarray:
    r = t[:3, :3]
    return transform(r.T, -r.T @ t[:3, 3])


def rotation_angle_deg(rotation: np.ndarray) -> float:
    return math.degrees(math.acos(max(-1.0, min(1.0, (float(np.trace(rotation)) - 1.0) / 2.0))))


def quaternion_xyzw(rotation: np.ndarray) -> list[float]:
    """A rotation matrix's unit quaternion, (x, y, z, w) with w >= 0 (ROS's order; `plan.trace_camera_pose`'s)."""
    cv2 = import_cv2()
    rvec = cv2.Rodrigues(np.asarray(rotation, dtype=np.float64))[0].reshape(3)
    angle = float(np.linalg.norm(rvec))
    if angle < 1e-12:
        return [0.0, 0.0, 0.0, 1.0]
    axis = rvec / angle
    xyz, w = axis * math.sin(angle / 2), math.cos(angle / 2)
    return [float(v) for v in xyz] + [w] if w >= 0 else [float(-v) for v in xyz] + [-w]


def check_diversity(samples: Sequence[HandEyeSample]) -> None:
    """HandEyeError unless there are MIN_SAMPLES samples whose hand rotations turn about axes at least
    MIN_AXIS_SPREAD_DEG apart (relative to the first sample)."""
    if len(samples) < MIN_SAMPLES:
        raise HandEyeError(f"{len(samples)} poses with the marker seen; hand-eye calibration needs at least "
                           f"{MIN_SAMPLES}: add poses (--poses), or move the marker where the camera sees it in more")
    cv2 = import_cv2()
    axes = []
    first = samples[0].ref_T_hand[:3, :3]
    for s in samples[1:]:
        rvec = cv2.Rodrigues(first.T @ s.ref_T_hand[:3, :3])[0].reshape(3)
        if math.degrees(float(np.linalg.norm(rvec))) >= MIN_TURN_DEG:
            axes.append(rvec / np.linalg.norm(rvec))
    needed = max(2, math.ceil(MIN_TURNED_SHARE * (len(samples) - 1)))
    if len(axes) < needed:
        raise HandEyeError(f"only {len(axes)} of the {len(samples) - 1} poses after the first turn the hand "
                           f"{MIN_TURN_DEG:g} degrees or more from it (at least {needed} needed): nearly the same "
                           "views leave the camera's pose undetermined, however small the reprojection error; spread "
                           "the poses more (--spread-rad)")
    spread = max((math.degrees(math.acos(min(1.0, abs(float(a @ b))))) for i, a in enumerate(axes)
                  for b in axes[i + 1:]), default=0.0)
    if spread < MIN_AXIS_SPREAD_DEG:
        raise HandEyeError(f"the poses turn the hand about nearly one axis (axes at most {spread:.1f} degrees apart, "
                           f"{len(axes)} turns over {MIN_TURN_DEG} degrees); the camera's position along it stays "
                           f"undetermined: spread the poses more (--spread-rad) so that the wrist and shoulder turn too")


def solve_fixed_camera(samples: Sequence[HandEyeSample], intrinsics: Any, marker: MarkerSpec,
                       method: str = "park") -> HandEyeResult:
    """The camera's pose in the reference frame from samples of one fixed camera (see the module docstring)."""
    cv2 = import_cv2()
    if method not in METHODS:
        raise ConfigError(f"hand-eye method {method!r} unknown; use one of {', '.join(METHODS)}")
    check_diversity(samples)
    hand_T_ref = [invert(s.ref_T_hand) for s in samples]
    r_cam, t_cam = cv2.calibrateHandEye([t[:3, :3] for t in hand_T_ref], [t[:3, 3] for t in hand_T_ref],
                                        [s.view.cam_T_marker[:3, :3] for s in samples],
                                        [s.view.cam_T_marker[:3, 3] for s in samples],
                                        method=getattr(cv2, METHODS[method]))
    ref_T_cam = transform(np.asarray(r_cam), np.asarray(t_cam).reshape(3))
    if not np.all(np.isfinite(ref_T_cam)):
        raise HandEyeError("OpenCV's hand-eye solver returned no finite pose; the poses are degenerate: spread them")
    hand_T_marker = _marker_in_hand(samples, ref_T_cam)
    linear = reprojection_errors(samples, ref_T_cam, hand_T_marker, intrinsics, marker)
    ref_T_cam, hand_T_marker = refine(samples, ref_T_cam, hand_T_marker, intrinsics, marker)
    behind = [i for i, s in enumerate(samples) if _marker_depths(s, ref_T_cam, hand_T_marker, marker).min() <= 0]
    if behind:      # a projection does not tell in front from behind: such a pose fits the pixels and is wrong
        raise HandEyeError(f"the solution puts the marker behind the camera in {len(behind)} of {len(samples)} "
                           "views: the poses do not determine the camera's pose; spread them more (--spread-rad) "
                           "so that the wrist and the shoulder turn")
    errors = reprojection_errors(samples, ref_T_cam, hand_T_marker, intrinsics, marker)
    return HandEyeResult(ref_T_cam, hand_T_marker, errors, method,
                         extra={"linear_solution_median_reprojection_px": float(np.median(linear))})


def refine(samples: Sequence[HandEyeSample], ref_T_cam: np.ndarray, hand_T_marker: np.ndarray, intrinsics: Any,
           marker: MarkerSpec) -> tuple[np.ndarray, np.ndarray]:
    """Both unknowns adjusted together so that every detected corner lies where the chain puts it (least squares in
    pixels, SciPy's `least_squares` with a soft-L1 loss of 1 px: one poor detection does not pull the rest).

    The closed-form solver above works on each view's marker pose, whose distance is the least certain part of it
    (a 4 cm marker at 0.4 m, corners to half a pixel: ~5 mm); the corners themselves, over all poses at once, fix
    the camera to about a millimetre."""
    cv2 = import_cv2()
    from scipy.optimize import least_squares

    matrix, dist = camera_matrix(intrinsics)
    corners = np.c_[marker.corners_m(), np.ones(4)].T
    ref_T_hand = np.stack([s.ref_T_hand for s in samples])
    detected = np.concatenate([s.view.corners_px for s in samples])

    def unpack(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return (transform(cv2.Rodrigues(x[0:3])[0], x[3:6]), transform(cv2.Rodrigues(x[6:9])[0], x[9:12]))

    def residuals(x: np.ndarray) -> np.ndarray:
        cam_T_ref, mount = unpack(x)
        in_cam = np.einsum("ij,njk,kl,lm->nmi", cam_T_ref, ref_T_hand, mount, corners)[..., :3].reshape(-1, 3)
        projected, _ = cv2.projectPoints(np.ascontiguousarray(in_cam), np.zeros(3), np.zeros(3), matrix, dist)
        return (projected.reshape(-1, 2) - detected).reshape(-1)

    cam_T_ref = invert(ref_T_cam)
    x0 = np.concatenate([cv2.Rodrigues(cam_T_ref[:3, :3])[0].reshape(3), cam_T_ref[:3, 3],
                         cv2.Rodrigues(hand_T_marker[:3, :3])[0].reshape(3), hand_T_marker[:3, 3]])
    solution = least_squares(residuals, x0, loss="soft_l1", f_scale=1.0, x_scale="jac")
    cam_T_ref, mount = unpack(solution.x)
    return invert(cam_T_ref), mount


def _marker_in_hand(samples: Sequence[HandEyeSample], ref_T_cam: np.ndarray) -> np.ndarray:
    """hand_T_marker = ref_T_hand^-1 . ref_T_cam . cam_T_marker, averaged over the samples (rotations by the
    projection of their mean onto the rotations)."""
    each = [invert(s.ref_T_hand) @ ref_T_cam @ s.view.cam_T_marker for s in samples]
    u, _, vt = np.linalg.svd(sum(t[:3, :3] for t in each))
    rotation = u @ np.diag([1.0, 1.0, np.linalg.det(u @ vt)]) @ vt
    return transform(rotation, np.mean([t[:3, 3] for t in each], axis=0))


def _marker_depths(sample: HandEyeSample, ref_T_cam: np.ndarray, hand_T_marker: np.ndarray,
                   marker: MarkerSpec) -> np.ndarray:
    """The marker's corners' depths (m, along the camera's optical axis) in one view, through the solved chain."""
    corners = np.c_[marker.corners_m(), np.ones(4)]
    return (invert(ref_T_cam) @ sample.ref_T_hand @ hand_T_marker @ corners.T)[2]


def reprojection_errors(samples: Sequence[HandEyeSample], ref_T_cam: np.ndarray, hand_T_marker: np.ndarray,
                        intrinsics: Any, marker: MarkerSpec) -> list[float]:
    """Per sample, the largest distance (px) between a detected corner and the corner carried through the arm:
    forward kinematics, the solved marker mount and the solved camera pose."""
    cv2 = import_cv2()
    matrix, dist = camera_matrix(intrinsics)
    cam_T_ref = invert(ref_T_cam)
    corners = np.c_[marker.corners_m(), np.ones(4)]
    out = []
    for s in samples:
        in_cam = (cam_T_ref @ s.ref_T_hand @ hand_T_marker @ corners.T).T[:, :3]
        projected, _ = cv2.projectPoints(in_cam, np.zeros(3), np.zeros(3), matrix, dist)
        out.append(float(np.max(np.linalg.norm(projected.reshape(4, 2) - s.view.corners_px, axis=1))))
    return out


def calibration_poses(start_rad: Sequence[float], lower_rad: Sequence[float], upper_rad: Sequence[float],
                      count: int, spread_rad: float, seed: int = 0) -> list[np.ndarray]:
    """`count` joint configurations around `start_rad`: each joint moved by up to +-`spread_rad` (uniform, seeded),
    within [lower, upper]; the first is the start itself. Poses from which the marker is not seen are skipped by the
    caller, so ask for more than MIN_SAMPLES."""
    if count < 1 or not (math.isfinite(spread_rad) and spread_rad > 0):
        raise ConfigError(f"calibration poses: count {count} >= 1 and spread {spread_rad} rad > 0")
    start = np.asarray(start_rad, dtype=np.float64)
    low, high = np.asarray(lower_rad, dtype=np.float64), np.asarray(upper_rad, dtype=np.float64)
    rng = np.random.default_rng(seed)
    poses = [np.clip(start, low, high)]
    while len(poses) < count:
        poses.append(np.clip(start + rng.uniform(-spread_rad, spread_rad, size=start.shape), low, high))
    return poses
