"""A watchdog thread: calls back once when it has not been fed for `timeout_s`, and polls a hook meanwhile."""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

log = logging.getLogger(__name__)


class Watchdog:
    """Armed by the first `feed()`; a trip calls `on_timeout(age_s)` once and disarms until the next feed.

    `on_poll` (e.g. reading an e-stop input) runs on the same thread every `poll_s`. Callback
    errors are logged and kept in `last_error`, never allowed to stop the thread.
    """

    def __init__(self, timeout_s: float, on_timeout: Callable[[float], None],
                 on_poll: Callable[[], None] | None = None, poll_s: float | None = None, name: str = "watchdog"):
        if not timeout_s > 0:
            raise ValueError(f"watchdog timeout_s must be > 0, got {timeout_s}")
        self.timeout_s = timeout_s
        self.poll_s = poll_s if poll_s is not None else min(timeout_s / 5.0, 0.02)
        self.on_timeout, self.on_poll, self.name = on_timeout, on_poll, name
        self.last_error: Exception | None = None
        self._lock = threading.Lock()
        self._last_feed_s = time.monotonic()
        self._armed = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def armed(self) -> bool:
        return self._armed

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def feed(self) -> None:
        with self._lock:
            self._last_feed_s = time.monotonic()
            self._armed = True

    def disarm(self) -> None:
        with self._lock:
            self._armed = False

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop and join the thread (do not call it from inside a callback)."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stop.set()
            thread.join(timeout=5.0)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            if self.on_poll is not None:
                self._call(self.on_poll)
            with self._lock:
                age_s = time.monotonic() - self._last_feed_s
                fire = self._armed and age_s >= self.timeout_s
                if fire:
                    self._armed = False
            if fire:
                self._call(self.on_timeout, age_s)

    def _call(self, fn, *args) -> None:
        try:
            fn(*args)
        except Exception as e:      # a failing callback must not silence the watchdog
            self.last_error = e
            log.exception("%s callback failed", self.name)
