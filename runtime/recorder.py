"""The JSONL command recorder (`--record`): every command, plan and trip, in numbered parts beyond a size, flushed
about once a second; and the readers of such a recording."""
from __future__ import annotations

import errno
import json
import logging
import math
import os
import re
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgeact.runtime.errors import ConfigError
from edgeact.runtime.loop_events import CommandEvent, PlanEvent, StopEvent, Subscriber, TripEvent

log = logging.getLogger(__name__)


def _rounded(values: dict[str, float] | None, digits: int = 5) -> dict[str, float] | None:
    return None if values is None else {k: round(v, digits) for k, v in values.items()}


RECORD_PART_BYTES = 256 * 2**20     # a recording goes on in a new part beyond this (~220 MiB an hour at 100 Hz)
RECORD_PARTS = 8                    # parts kept, the oldest deleted beyond: about 9 h at that rate, 2 GiB
RECORD_FLUSH_S = 1.0                # written to the OS at least this often: a killed run loses about this much


class CommandRecorder(Subscriber):
    """Every command, plan, trip and the stop as JSON lines: handed to the OS about every `flush_every_s` (a killed
    run loses about that much), synced to the disk on close however the run ended.

    Beyond `part_bytes` the recording goes on in a new part, PATH with a number (commands.jsonl, commands.1.jsonl,
    commands.2.jsonl ...), and only the newest `keep_parts` are kept: a day's run fills no disk. `recording_parts`
    lists a recording's parts, `read_recording` reads them in order. Parts of an older recording at PATH are deleted
    at the start, as PATH itself is replaced.
    """

    def __init__(self, path: str | Path, part_bytes: int = RECORD_PART_BYTES, keep_parts: int = RECORD_PARTS,
                 flush_every_s: float = RECORD_FLUSH_S):
        if part_bytes < 1 or keep_parts < 1:
            raise ConfigError(f"recording parts of {part_bytes} bytes, {keep_parts} kept: give at least 1 byte and 1 "
                              f"part (defaults {RECORD_PART_BYTES} bytes, {RECORD_PARTS} parts)")
        self.path, self.part_bytes, self.keep_parts = Path(path), part_bytes, keep_parts
        self.flush_every_s = flush_every_s
        self.path.parent.mkdir(parents=True, exist_ok=True)
        replaced = self.path.is_file() and self.path.stat().st_size > 0
        self._file = self.path.open("w", encoding="utf-8")
        self._rotates = stat.S_ISREG(os.fstat(self._file.fileno()).st_mode)     # not /dev/null or a pipe
        older = recording_parts(self.path)[1:] if self._rotates else []
        for part in older:
            part.unlink()
        if replaced or older:   # said where it is seen: a recording kept for later is gone
            log.warning("--record %s replaced an older recording there%s", self.path,
                        f" and its {len(older)} numbered parts ({', '.join(p.name for p in older)})" if older else "")
        self.part, self._bytes, self._flushed_s = 0, 0, time.monotonic()
        self.lines = 0

    def _write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, allow_nan=False, default=_json_default) + "\n"
        self._file.write(line)
        self.lines += 1
        self._bytes += len(line)            # bytes: json.dumps escapes every non-ASCII character
        now = time.monotonic()
        if self._bytes >= self.part_bytes and self._rotates:
            self._next_part()
        elif now - self._flushed_s >= self.flush_every_s:
            self._file.flush()
            self._flushed_s = now

    def _next_part(self) -> None:
        self._close_file()
        self.part += 1
        deleted = ""
        if self.part >= self.keep_parts:
            oldest = record_part_path(self.path, self.part - self.keep_parts)
            oldest.unlink(missing_ok=True)
            deleted = f"; deleted the oldest part, {oldest.name}"
        path = record_part_path(self.path, self.part)
        self._file, self._bytes, self._flushed_s = path.open("w", encoding="utf-8"), 0, time.monotonic()
        log.info("recording goes on in %s (parts of %.0f MiB, the newest %d kept%s)", path, self.part_bytes / 2**20,
                 self.keep_parts, deleted)

    def _close_file(self) -> None:
        if self._file.closed:           # a new part that could not be opened: the error was the hub's already
            return
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as exc:
            if exc.errno != errno.EINVAL:   # EINVAL: a file that cannot sync (a pipe, /dev/null); else the disk failed
                raise
        finally:
            self._file.close()

    def on_command(self, e: CommandEvent) -> None:
        self._write({"event": "command", "t": round(e.time_s, 6), "tick": e.tick, "mode": e.mode,
                     "action": e.action_index, "targets_rad": _rounded(e.targets_rad),
                     "sent_rad": _rounded(e.sent_rad), "measured_rad": _rounded(e.measured_rad)})

    def on_plan(self, e: PlanEvent) -> None:
        self._write({"event": "plan", "t": round(e.time_s, 6), "index": e.index, "frame": e.frame_number,
                     "latency_s": round(e.plan.latency_s, 6), "actions": e.plan.actions.round(6).tolist(),
                     "stage_s": {k: round(v, 6) for k, v in e.plan.stage_seconds.items()}})

    def on_trip(self, e: TripEvent) -> None:
        t = e.trip
        self._write({"event": "trip", "t": round(t.time_s, 6), "reason": t.reason, "safe_state": t.safe_state,
                     "detail": t.detail, "error": t.error})

    def on_stop(self, e: StopEvent) -> None:
        self._write({"event": "stop", "t": round(e.time_s, 6), "reason": e.reason, "detail": e.detail})

    def close(self) -> None:
        self._close_file()


def record_part_path(path: str | Path, part: int) -> Path:
    """Part `part` of the recording at `path`: `path` itself for 0, else the number before its suffix."""
    path = Path(path)
    return path if part == 0 else path.with_name(f"{path.stem}.{part}{path.suffix}")


def recording_parts(path: str | Path) -> list[Path]:
    """The parts of the recording at `path` (CommandRecorder) that exist, oldest first."""
    path = Path(path)
    numbered = re.compile(re.escape(path.stem) + r"\.([1-9][0-9]*)" + re.escape(path.suffix))
    parts = {0: path} if path.is_file() else {}
    if path.parent.is_dir():
        for other in path.parent.iterdir():
            if match := numbered.fullmatch(other.name):
                parts[int(match[1])] = other
    return [parts[n] for n in sorted(parts)]


def read_recording(path: str | Path) -> Iterator[dict[str, Any]]:
    """The records of a recording, every part in order; a last line cut short (a killed run) is skipped."""
    for part in recording_parts(path):
        with part.open(encoding="utf-8") as lines:
            for line in lines:
                if line.endswith("\n"):
                    yield json.loads(line)


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(f"{type(value).__name__} is not JSON serializable")
