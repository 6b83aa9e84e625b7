"""The simulator's cameras out of the control process: frames handed over through a ring of shared-memory slabs.

    child (renders)                                          parent (the robot's process)
    FrameRing: frame -> a free slab, ("frame", i, ...) --->  SlabFrames.read: the newest announced frame copied
                                                     <---  ("free", i): older announced ones and the copied one

The ring has CAMERA_SLABS slabs, created and unlinked by the child; a frame the child finds no free
slab for is dropped (a gap in the frame numbers, as on a real sensor whose host lags). Two children
feed it: a synthetic camera's own process (ProcessCamera, here) and the MuJoCo simulator's process,
which renders its world beside the physics (sim_mujoco.py).
"""
from __future__ import annotations

import threading
from typing import Callable

import numpy as np

from edgeact.drivers.cameras.base import Camera, CameraConfig, CameraError, Intrinsics, RGBDFrame, make_camera
from edgeact.runtime.process_policy import (
    ChildProcess, FrameSlab, ignore_interrupts, portable_error, send_quietly, serve_until_stop,
)

CAMERA_SLABS = 3                    # frames in flight: one being read here, one being written there, one spare
CAMERA_START_TIMEOUT_S = 60.0


class FrameRing:
    """The child's end of the ring: `on_frame` is a camera listener; `open` creates the slabs and tells the parent.

    Frames are announced only after `open` has sent "ready": the parent must know the slabs first.
    `on_stop` is a camera stop listener: the parent hears why the camera stopped (after "ready").
    """

    def __init__(self, conn):
        self._conn = conn
        self._slabs: list[FrameSlab] = []
        self._free: set[int] = set()
        self._lock = threading.Lock()
        self._opened = False
        self._stopped_by: BaseException | None = None      # the camera stopped before "ready" was sent

    def open(self, intrinsics: Intrinsics) -> bool:
        """Create the slabs, send ("ready", intrinsics, slab names, (h, w)); False when the parent is gone."""
        shape_hw = (intrinsics.height, intrinsics.width)
        slabs = [FrameSlab(*shape_hw) for _ in range(CAMERA_SLABS)]
        ready = send_quietly(self._conn, ("ready", intrinsics, [slab.name for slab in slabs], shape_hw))
        with self._lock:
            self._slabs, self._free, self._opened = slabs, set(range(CAMERA_SLABS)), True
            stopped_by = self._stopped_by
        if stopped_by is not None:
            send_quietly(self._conn, ("error", portable_error(stopped_by)))
        return ready

    def on_stop(self, error: BaseException) -> None:
        """On the camera's capture thread when it stopped by itself (an error, the end of a recording): the
        parent's next read raises `error` instead of waiting out its timeout."""
        with self._lock:
            if not self._opened:
                self._stopped_by = error        # sent by open(), after "ready"
                return
        send_quietly(self._conn, ("error", portable_error(error)))

    def on_frame(self, frame: RGBDFrame) -> None:
        """On the camera's capture thread: into a free slab, then announced; dropped when none is free."""
        with self._lock:
            if not self._free:          # not open yet, closed, or every slab is with the parent
                return
            index = min(self._free)
            self._free.discard(index)
            slab = self._slabs[index]
        np.copyto(slab.rgb, frame.color)
        np.copyto(slab.depth_m, frame.depth_m)
        send_quietly(self._conn, ("frame", index, frame.timestamp_s, frame.capture_monotonic_s, frame.frame_number))

    def free(self, index: int) -> None:
        """The parent is done with slab `index`."""
        with self._lock:
            if index < len(self._slabs):
                self._free.add(index)

    def close(self) -> None:
        """Unlink the slabs (call after the camera stopped); safe to call twice."""
        with self._lock:
            slabs, self._slabs, self._free = self._slabs, [], set()
        for slab in slabs:
            slab.close(unlink=True)


class SlabFrames:
    """The parent's end of a FrameRing whose "ready" said `names` and `shape_hw`; `read` is a Camera's `_read`.

    `source` names the child in messages; `exit_status` says how it ended (ChildProcess.exit_status).
    """

    def __init__(self, conn, names: list[str], shape_hw: tuple[int, int], source: str,
                 exit_status: Callable[[], str]):
        self._conn, self._source, self._exit_status = conn, source, exit_status
        self._slabs = [FrameSlab(*shape_hw, name=name) for name in names]

    def read(self, timeout_s: float) -> RGBDFrame | None:
        """The newest frame announced within timeout_s (older announced ones are handed back unread), or None."""
        try:
            if not self._conn.poll(timeout_s):
                return None
            newest = None
            while newest is None or self._conn.poll(0):
                message = self._conn.recv()
                if message[0] == "error":
                    raise message[1]
                if newest is not None:
                    send_quietly(self._conn, ("free", newest[1]))
                newest = message
        except (EOFError, OSError):     # the child is gone (or the pipe was closed under this read)
            raise CameraError(f"{self._source} exited ({self._exit_status()}); its error output says why") from None
        _, index, timestamp_s, capture_monotonic_s, frame_number = newest
        slab = self._slabs[index]
        color, depth_m = slab.rgb.copy(), slab.depth_m.copy()     # the frame outlives the slab's next use
        send_quietly(self._conn, ("free", index))
        return RGBDFrame(color=color, depth_m=depth_m, timestamp_s=timestamp_s,
                         capture_monotonic_s=capture_monotonic_s, frame_number=frame_number)

    def close(self) -> None:
        """Detach from the slabs (the child unlinks them)."""
        for slab in self._slabs:
            slab.close()
        self._slabs = []


class SlabCamera(Camera):
    """A camera whose frames another process renders into a ring of slabs (SlabFrames); subclasses open the ring
    in `_open` (into `self._frames`) and say in `_release` how the producer lets go of it."""

    _frames: SlabFrames | None = None

    def _read(self, timeout_s: float) -> RGBDFrame | None:
        return self._frames.read(timeout_s)

    def _close(self) -> None:
        if self._frames is not None:
            self._frames.close()
            self._frames = None
        self._release()

    def _release(self) -> None:
        raise NotImplementedError


class ProcessCamera(SlabCamera):
    """A camera run in a child process of its own, its frames handed over through a FrameRing.

    A synthetic camera ray-casts every frame in numpy (milliseconds of held GIL, 30 times a second);
    in the robot's process that work delays the control thread's wake-ups whenever the machine is
    busy. Here the capture thread only copies the newest frame out of its slab and hands the slab back.
    """

    timeout_hint = "is the camera process alive? (its errors go to stderr)"

    def __init__(self, config: CameraConfig):
        super().__init__(config)
        self._child: ChildProcess | None = None
        self._frames: SlabFrames | None = None

    @property
    def pid(self) -> int | None:
        return self._child.pid if self._child is not None else None

    def _open(self) -> Intrinsics:
        self._child = ChildProcess(_serve_camera, (self.config,), f"edgeact-camera-{self.name}")
        try:
            message = self._child.receive(CAMERA_START_TIMEOUT_S)
            if message is None:
                raise CameraError(f"the process of camera {self.name!r} did not start within "
                                  f"{CAMERA_START_TIMEOUT_S:g} s ({self._child.exit_status()})")
            kind, *payload = message
            if kind == "error":
                raise payload[0]
            intrinsics, names, shape_hw = payload
            self._frames = SlabFrames(self._child.conn, names, shape_hw, f"the process of camera {self.name!r}",
                                      self._child.exit_status)
        except BaseException:
            self._close()
            raise
        return intrinsics

    def _release(self) -> None:
        if self._child is not None:
            self._child.stop()


def _serve_camera(conn, config: CameraConfig) -> None:
    """The camera's process: capture into the ring, take slabs back; stop on "stop" or when the parent is gone."""
    ignore_interrupts()     # the parent stops us, after the robot is safe
    ring = FrameRing(conn)
    try:
        camera = make_camera(config)
        camera.add_listener(ring.on_frame)
        camera.add_stop_listener(ring.on_stop)
        camera.connect()
    except Exception as exc:        # the process boundary: the parent raises it from connect()
        send_quietly(conn, ("error", portable_error(exc)))
        return
    try:
        if ring.open(camera.intrinsics):
            serve_until_stop(conn, lambda message: ring.free(message[1]))     # ("free", slab index): no reply
    finally:
        camera.disconnect()
        ring.close()
