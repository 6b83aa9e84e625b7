"""Cameras that make their own frames (synthetic, simulated): paced at config.fps like a real sensor."""
from __future__ import annotations

import abc
import time

from edgeact.drivers.cameras.base import Camera, RGBDFrame


class RenderedCamera(Camera):
    """Frame k is due at k/fps after connect. Like a real sensor the camera keeps its own clock, so a
    capture thread that falls behind skips frames (counted as dropped) instead of queueing them."""

    def __init__(self, config):
        super().__init__(config)
        self._next_number = 0
        self._start_s = 0.0

    @abc.abstractmethod
    def render(self, frame_number: int) -> RGBDFrame: ...

    def _render_due(self, frame_number: int, due_s: float) -> RGBDFrame:
        """Frame `frame_number`, which came due at `due_s` (time.monotonic()); stamped when rendering began."""
        return self.render(frame_number)

    def _start_clock(self) -> None:
        self._next_number = 0
        self._start_s = time.monotonic()

    def _read(self, timeout_s: float) -> RGBDFrame | None:
        due_s = self._start_s + self._next_number / self.config.fps
        wait_s = due_s - time.monotonic()
        if wait_s > timeout_s:
            self._stop.wait(timeout_s)
            return None
        if wait_s > 0 and self._stop.wait(wait_s):
            return None
        # The newest frame whose time has come; older unrendered ones are lost, as on a real sensor.
        number = max(self._next_number, int((time.monotonic() - self._start_s) * self.config.fps))
        self._next_number = number + 1
        return self._render_due(number, self._start_s + number / self.config.fps)
