"""A synthetic RGB-D camera: a deterministic ray-cast scene (floor, wall, coloured boxes) at a fixed rate."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from edgeact.drivers.cameras.base import CameraConfig, Intrinsics, RGBDFrame, register_camera
from edgeact.drivers.cameras.rendered import RenderedCamera
from edgeact.runtime.errors import ConfigError

# Boxes standing on the floor: (x_min, x_max, z_min, z_max, height) in metres, and an RGB colour.
# The first one slides sideways so consecutive frames differ.
_BOXES = (
    ((-0.25, -0.05, 0.85, 1.05, 0.20), (200, 40, 40)),
    ((0.08, 0.22, 0.70, 0.84, 0.12), (40, 170, 60)),
    ((0.15, 0.45, 1.30, 1.55, 0.30), (50, 80, 210)),
)
_SLIDE_AMPLITUDE_M = 0.15
_SLIDE_PERIOD_S = 4.0
_WALL_Z_M = 2.5
_FLOOR_TILE_M = 0.1


@register_camera("synthetic")
@dataclass
class SyntheticConfig(CameraConfig):
    width: int = 128
    height: int = 96
    fps: float = 30.0
    hfov_deg: float = 69.0          # a RealSense D435 color sensor's horizontal field of view
    camera_height_m: float = 0.5    # above the floor
    pitch_deg: float = 35.0         # looking down

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (16 <= self.width <= 1920 and 16 <= self.height <= 1080):
            raise ConfigError(f"synthetic camera {self.name!r}: size {self.width}x{self.height} out of range; "
                              f"use 16..1920 x 16..1080")
        if not (0 < self.fps <= 240):
            raise ConfigError(f"synthetic camera {self.name!r}: fps={self.fps} must be in (0, 240]")
        self.check_timeout_for_fps(self.fps)
        if not (10 <= self.hfov_deg <= 150):
            raise ConfigError(f"synthetic camera {self.name!r}: hfov_deg={self.hfov_deg} must be in [10, 150]")
        if not (0.05 <= self.camera_height_m <= 2.0 and 5 <= self.pitch_deg <= 80):
            raise ConfigError(f"synthetic camera {self.name!r}: camera_height_m in [0.05, 2] and pitch_deg "
                              f"in [5, 80] keep the floor in view")

    def make_camera(self) -> "SyntheticCamera":
        return SyntheticCamera(self)

    def intrinsics(self) -> Intrinsics:
        fx = (self.width / 2) / math.tan(math.radians(self.hfov_deg) / 2)
        return Intrinsics(fx=fx, fy=fx, cx=(self.width - 1) / 2, cy=(self.height - 1) / 2,
                          width=self.width, height=self.height)


class SyntheticCamera(RenderedCamera):
    """Frame k shows the scene at time k/fps; like a real sensor it keeps its own clock, so a
    capture thread that falls behind skips frames (and counts them as dropped)."""

    timeout_hint = "is this machine overloaded?"

    def __init__(self, config: SyntheticConfig):
        super().__init__(config)
        self.config: SyntheticConfig = config
        self._rays = _camera_rays(config)          # computed once; each frame reuses them

    def render(self, frame_number: int, capture_monotonic_s: float | None = None) -> RGBDFrame:
        """Frame `frame_number` of the scene; the same number always gives the same pixels.

        Stamped `capture_monotonic_s`, else when rendering began: the ray casting (150 ms at 640x480) counts
        in the frame's age, as a real sensor's transfer does."""
        captured_s = time.monotonic() if capture_monotonic_s is None else capture_monotonic_s
        time_s = frame_number / self.config.fps
        color, depth_m = _render(self._rays, self.config.camera_height_m, time_s)
        return RGBDFrame(color=color, depth_m=depth_m, timestamp_s=time_s, capture_monotonic_s=captured_s,
                         frame_number=frame_number)

    def _render_due(self, frame_number: int, due_s: float) -> RGBDFrame:
        # The frame shows the scene at its due time: the sensor took it then, however late it is rendered.
        return self.render(frame_number, capture_monotonic_s=due_s)

    def _open(self) -> Intrinsics:
        self._start_clock()
        return self.config.intrinsics()


    def _close(self) -> None:
        pass


def _camera_rays(config: SyntheticConfig) -> np.ndarray:
    """(H, W, 3) ray directions in the floor frame (x right, y down, z forward), camera-z = 1."""
    intr = config.intrinsics()
    u = (np.arange(config.width) - intr.cx) / intr.fx
    v = (np.arange(config.height) - intr.cy) / intr.fy
    rays_cam = np.stack(np.broadcast_arrays(u[None, :], v[:, None], np.ones((1, 1))), axis=-1)
    p = math.radians(config.pitch_deg)
    # Rotation about x that tips the optical axis down by the pitch.
    tilt = np.array([[1.0, 0.0, 0.0], [0.0, math.cos(p), math.sin(p)], [0.0, -math.sin(p), math.cos(p)]])
    return rays_cam @ tilt.T


def _render(rays: np.ndarray, camera_height_m: float, time_s: float) -> tuple[np.ndarray, np.ndarray]:
    """Ray-cast the scene; depth is the camera-frame z (as a depth camera reports), and the
    rays have camera-z = 1, so the hit distance t along a ray is that depth."""
    dx, dy, dz = rays[..., 0], rays[..., 1], rays[..., 2]
    h, w = dx.shape
    with np.errstate(divide="ignore", invalid="ignore"):
        # Floor (y = camera height, y points down) with a checkerboard; wall at z = _WALL_Z_M.
        t_floor = np.where(dy > 0, camera_height_m / dy, np.inf)
        t_wall = np.where(dz > 0, _WALL_Z_M / dz, np.inf)
        depth = np.minimum(t_floor, t_wall)
        color = np.empty((h, w, 3), np.float32)
        hit_floor = t_floor <= t_wall
        tile = (np.floor(dx * t_floor / _FLOOR_TILE_M) + np.floor(dz * t_floor / _FLOOR_TILE_M)) % 2
        color[...] = np.array([170, 180, 195], np.float32)
        color[hit_floor] = np.where(tile[hit_floor, None] > 0, 150.0, 100.0)
        slide = _SLIDE_AMPLITUDE_M * math.sin(2 * math.pi * time_s / _SLIDE_PERIOD_S)
        for index, ((x0, x1, z0, z1, height), rgb) in enumerate(_BOXES):
            offset = slide if index == 0 else 0.0
            lo = np.array([x0 + offset, camera_height_m - height, z0], np.float32)
            hi = np.array([x1 + offset, camera_height_m, z1], np.float32)
            t_a, t_b = lo / rays, hi / rays
            t_near_axes = np.minimum(t_a, t_b)
            t_near = t_near_axes.max(axis=-1)
            t_far = np.maximum(t_a, t_b).min(axis=-1)
            hit = (t_near <= t_far) & (t_near > 0) & (t_near < depth)
            # Shade by the face the ray entered through: top brightest, sides darker.
            shade = np.array([0.7, 1.0, 0.85], np.float32)[t_near_axes.argmax(axis=-1)]
            depth = np.where(hit, t_near, depth)
            color[hit] = shade[hit, None] * np.array(rgb, np.float32)
    depth_m = np.where(np.isfinite(depth), depth, 0.0).astype(np.float32)
    return color.astype(np.uint8), depth_m
