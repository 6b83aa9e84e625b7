"""A simulated RGB-D camera: a camera of the MuJoCo world rendered offscreen, colour and metric depth from one render.

The depth image comes from the same render as the colour, so it is aligned to it pixel for pixel,
as a RealSense's aligned depth is; it is the camera-frame z in metres (what a depth camera
reports), 0 where nothing is in range. Intrinsics follow from the MuJoCo camera's vertical field
of view and the image size (square pixels, principal point at the centre).

Rendering uses MuJoCo's offscreen OpenGL context: EGL by default (the GPU where there is one,
Mesa's llvmpipe on a CPU-only machine), or whatever MUJOCO_GL names before mujoco is imported.
A frame at 320x240 costs about 1 ms of CPU with llvmpipe when the scene turns shadows and
multisampling off (scene.xml does). mujoco is imported only when a camera connects.
"""
from __future__ import annotations

import math
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeact.drivers.cameras.base import CameraConfig, CameraError, Intrinsics, RGBDFrame, register_camera
from edgeact.drivers.cameras.rendered import RenderedCamera
from edgeact.runtime.errors import ConfigError

GL_PACKAGES_HINT = ("offscreen OpenGL needs EGL (Debian: libegl1 libopengl0 libgl1-mesa-dri) or, with "
                    "MUJOCO_GL=osmesa, OSMesa (Debian: libosmesa6)")


@register_camera("mujoco")
@dataclass
class MujocoCameraConfig(CameraConfig):
    camera: str = "front"           # the camera's name in the scene
    world: str = "default"          # the started MujocoWorld to render (the simulated robot's)
    width: int = 320
    height: int = 240
    fps: float = 15.0
    max_depth_m: float = 10.0       # farther than this: no data (0), as a depth sensor's range ends

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (16 <= self.width <= 1920 and 16 <= self.height <= 1080):
            raise ConfigError(f"mujoco camera {self.name!r}: size {self.width}x{self.height} out of range; "
                              "use 16..1920 x 16..1080 (the scene's offscreen buffer must be at least as large)")
        if not (0 < self.fps <= 120):
            raise ConfigError(f"mujoco camera {self.name!r}: fps={self.fps} must be in (0, 120]")
        self.check_timeout_for_fps(self.fps)
        if not (0 < self.max_depth_m <= 100):
            raise ConfigError(f"mujoco camera {self.name!r}: max_depth_m={self.max_depth_m} must be in (0, 100]")

    def make_camera(self) -> "MujocoCamera":
        return MujocoCamera(self)


class MujocoRgbdRenderer:
    """Renders one camera of a world into (colour, depth); callable from any thread, one call at a time.

    The GL context is made current only around each render, so the thread that creates the
    renderer, the capture thread and the one that closes it may all differ.
    """

    def __init__(self, world: Any, camera: str, width: int, height: int, max_depth_m: float = 10.0):
        from edgeact.drivers.sim.mujoco_robot import import_mujoco

        mj = self._mj = import_mujoco()
        model = world.model
        self.world, self.width, self.height, self.max_depth_m = world, width, height, max_depth_m
        self.camera_id = mj.mj_name2id(model, mj.mjtObj.mjOBJ_CAMERA, camera)
        if self.camera_id < 0:
            names = [model.camera(i).name for i in range(model.ncam)]
            raise CameraError(f"no camera {camera!r} in the MuJoCo scene; its cameras: {', '.join(names) or 'none'}")
        if width > model.vis.global_.offwidth or height > model.vis.global_.offheight:
            raise CameraError(f"{width}x{height} exceeds the scene's offscreen buffer "
                              f"({model.vis.global_.offwidth}x{model.vis.global_.offheight}); raise "
                              "<visual><global offwidth=... offheight=...> or render smaller")
        fovy_rad = math.radians(float(model.cam_fovy[self.camera_id]))
        focal_px = (height / 2) / math.tan(fovy_rad / 2)
        self.intrinsics = Intrinsics(fx=focal_px, fy=focal_px, cx=(width - 1) / 2, cy=(height - 1) / 2,
                                     width=width, height=height)
        # OpenGL clip planes: depth is recovered from the (reversed-Z) depth buffer with them.
        self._near_m = float(model.vis.map.znear * model.stat.extent)
        self._far_m = float(model.vis.map.zfar * model.stat.extent)
        self._lock = threading.Lock()
        self._scene = mj.MjvScene(model, maxgeom=2000)
        self._option = mj.MjvOption()
        self._view = mj.MjvCamera()
        self._view.type = mj.mjtCamera.mjCAMERA_FIXED
        self._view.fixedcamid = self.camera_id
        self._rect = mj.MjrRect(0, 0, width, height)
        self._rgb = np.empty((height, width, 3), np.uint8)
        self._depth = np.empty((height, width), np.float32)
        self._gl = None
        try:
            self._gl = _gl_context_class()(width, height)
            with self._gl.as_current():
                self._context = mj.MjrContext(model, mj.mjtFontScale.mjFONTSCALE_100)
                mj.mjr_setBuffer(mj.mjtFramebuffer.mjFB_OFFSCREEN, self._context)
                self._context.readDepthMap = mj.mjtDepthMap.mjDEPTH_ZEROFAR
        except (ImportError, RuntimeError, AttributeError, OSError, mj.FatalError) as exc:
            if self._gl is not None:
                self._gl.free()
                self._gl = None
            raise CameraError(f"cannot open an offscreen OpenGL context for MuJoCo (MUJOCO_GL="
                              f"{os.environ.get('MUJOCO_GL')}): {exc}; {GL_PACKAGES_HINT}") from None

    def render(self) -> tuple[np.ndarray, np.ndarray, float]:
        """(colour RGB uint8 (H,W,3), depth metres float32 (H,W), simulated time s) of the world now."""
        mj = self._mj
        with self._lock:
            if self._gl is None:
                raise CameraError("the MuJoCo renderer is closed")
            with self.world.lock:       # the scene copy is cheap; the physics waits only for it
                mj.mjv_updateScene(self.world.model, self.world.data, self._option, None, self._view,
                                   mj.mjtCatBit.mjCAT_ALL, self._scene)
                sim_time_s = float(self.world.data.time)
            with self._gl.as_current():
                mj.mjr_render(self._rect, self._scene, self._context)
                mj.mjr_readPixels(self._rgb, self._depth, self._rect, self._context)
            color = np.flipud(self._rgb).copy()     # OpenGL's rows run bottom-up
            depth_m = self._metric_depth(np.flipud(self._depth))
        return color, depth_m, sim_time_s

    def _metric_depth(self, buffer: np.ndarray) -> np.ndarray:
        # Reversed Z: 1 at the near plane, 0 at the far one; z_eye = n f / (b (f - n) + n), in float64.
        near, far = self._near_m, self._far_m
        depth = (near * far) / (buffer.astype(np.float64) * (far - near) + near)
        depth[(buffer <= 0) | (depth > self.max_depth_m)] = 0.0     # the background and beyond range: no data
        return depth.astype(np.float32)

    def close(self) -> None:
        """Free the GL resources; safe to call twice."""
        with self._lock:
            gl, self._gl = self._gl, None
            if gl is not None:
                with gl.as_current():
                    self._context.free()
                gl.free()


def _gl_context_class() -> Any:
    """The GL context class MUJOCO_GL names (EGL when unset), chosen now: MuJoCo chose its own when it was
    first imported, and a plain `import mujoco` before MUJOCO_GL was set would have chosen GLFW (a display)."""
    backend = os.environ.get("MUJOCO_GL", "").strip().lower() or "egl"
    if backend == "egl":
        from mujoco.egl import GLContext
    elif backend == "osmesa":
        from mujoco.osmesa import GLContext
    else:
        from mujoco.gl_context import GLContext
    return GLContext


class MujocoCamera(RenderedCamera):
    """Frame k is rendered at connect time + k/fps, from the world as it is then; like a real sensor
    it keeps its own clock, so a capture thread that falls behind skips frames (counted as dropped).

    `world`: the MujocoWorld to render; None finds the started world named in the config.
    """

    timeout_hint = "is this machine overloaded, or the simulator stopped?"

    def __init__(self, config: MujocoCameraConfig, world: Any = None):
        super().__init__(config)
        self.config: MujocoCameraConfig = config
        self._world = world
        self._renderer: MujocoRgbdRenderer | None = None

    def _renderer_now(self) -> MujocoRgbdRenderer:
        if self._renderer is None:
            from edgeact.drivers.sim.mujoco_robot import MujocoWorldError, running_world

            try:
                world = self._world if self._world is not None else running_world(self.config.world)
            except MujocoWorldError as exc:
                raise CameraError(f"camera {self.name!r}: {exc}") from None
            c = self.config
            self._renderer = MujocoRgbdRenderer(world, c.camera, c.width, c.height, c.max_depth_m)
        return self._renderer

    def _open(self) -> Intrinsics:
        intrinsics = self._renderer_now().intrinsics
        self._start_clock()
        return intrinsics

    def render(self, frame_number: int = 0) -> RGBDFrame:
        """A frame of the world as it is now (connected or not: tests, data generation)."""
        renderer = self._renderer_now()
        captured_s = time.monotonic()
        color, depth_m, sim_time_s = renderer.render()
        return RGBDFrame(color=color, depth_m=depth_m, timestamp_s=sim_time_s, capture_monotonic_s=captured_s,
                         frame_number=frame_number)


    def _close(self) -> None:
        renderer, self._renderer = self._renderer, None
        if renderer is not None:
            renderer.close()

    def close(self) -> None:
        """Free the renderer after `render()` without `connect()` (a connected camera frees it on disconnect)."""
        if not self.is_connected:
            self._close()
