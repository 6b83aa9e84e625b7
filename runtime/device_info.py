"""What a measurement ran on: the device, its power mode and whether its clocks were pinned.

On a Jetson the same bundle plans at very different rates in another nvpmodel power mode, and with the
clocks left to scale with load (the default) a figure moves between runs: `sudo jetson_clocks` pins the
CPU, GPU and memory clocks at the power mode's maximum. A control-frequency or latency figure without
these cannot be repeated or compared, so `edgeact bench` and `edgeact bench-policy` record them.

Everything is read, never written: the device tree's model, /etc/nv_tegra_release (the L4T release),
`nvpmodel -q` (JetPack's own query; /var/lib/nvpmodel/status and /etc/nvpmodel.conf where it cannot
run), cpufreq (governor, min / max / hardware max per online core) and the integrated GPU's devfreq
(found, as NVIDIA's tools find it, by its device-tree node name). A file that is not there leaves its
field unset: on a desktop or in a container most of it is. `root` re-roots every path, for tests.
"""
from __future__ import annotations

import os
import platform
import re
import subprocess
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

TEGRA_GPU_NODES = ("ga10b", "gv11b", "gp10b")     # Orin, Xavier, TX2 / Nano
GENERIC_GPU_NODE = "gpu"        # newer Jetson device trees, but also other boards' GPUs (a Mali's): Jetson only with L4T
NVPMODEL_TIMEOUT_S = 5.0
PIN_HINT = "`sudo jetson_clocks` pins them at the power mode's maximum (on another Linux: the performance governor)"


@dataclass(frozen=True)
class Clock:
    """A clock domain's setting in MHz: it runs between min and max; hw_max is the highest the hardware offers."""
    min_mhz: float | None
    max_mhz: float | None
    hw_max_mhz: float | None
    governor: str | None

    @property
    def pinned(self) -> bool | None:
        if self.governor == "performance":
            return True
        if self.min_mhz is None or self.max_mhz is None:
            return None
        return self.min_mhz >= self.max_mhz

    @property
    def capped(self) -> bool:
        return None not in (self.max_mhz, self.hw_max_mhz) and self.max_mhz < self.hw_max_mhz


@dataclass(frozen=True)
class DeviceInfo:
    model: str
    cpus_online: int
    kernel: str
    l4t: str | None = None                      # e.g. "R36.4.3"
    power_mode: str | None = None               # e.g. "MAXN (0)"
    cpu_governors: dict[str, int] = field(default_factory=dict)    # governor -> online cores running it
    cpu: Clock | None = None                    # the online cores together (lowest min, highest max)
    gpu: Clock | None = None                    # the integrated GPU (a Jetson's devfreq)
    gpu_name: str | None = None

    @property
    def jetson(self) -> bool:
        return self.l4t is not None or self.gpu is not None

    def notes(self) -> list[str]:
        """What keeps a figure taken here from being a steady one, each with the fix."""
        out = []
        unpinned = [name for name, clock in (("CPU", self.cpu), ("GPU", self.gpu))
                    if clock is not None and clock.pinned is False]
        if unpinned:
            governors = ", ".join(f"{g} on {n}" for g, n in sorted(self.cpu_governors.items()))
            out.append(f"{' and '.join(unpinned)} clocks not pinned (they scale with load"
                       f"{'; CPU governor ' + governors if governors else ''}): figures move between runs; {PIN_HINT}")
        for name, clock in (("CPU", self.cpu), ("GPU", self.gpu)):
            if clock is not None and clock.capped:
                mode = f" by power mode {self.power_mode}" if self.power_mode else ""
                out.append(f"{name} clock capped{mode} at {clock.max_mhz:.0f} of {clock.hw_max_mhz:.0f} MHz: "
                           "choose the mode to measure with `sudo nvpmodel -m ID`")
        if self.jetson and self.power_mode is None:
            out.append("power mode unknown (`nvpmodel -q` did not answer): record it with the figures")
        return out

    def summary(self) -> str:
        """One line: model, release, power mode, clocks."""
        parts = [self.model]
        if self.l4t:
            parts.append(f"L4T {self.l4t}")
        if self.power_mode:
            parts.append(f"power mode {self.power_mode}")
        for name, clock in (("CPU", self.cpu), (f"GPU {self.gpu_name or ''}".strip(), self.gpu)):
            if clock is not None and clock.max_mhz is not None:
                state = {True: "pinned", False: "scaling", None: "?"}[clock.pinned]
                parts.append(f"{name} max {clock.max_mhz:.0f} MHz ({state})")
        parts.append(f"{self.cpus_online} cores online")
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for name in ("cpu", "gpu"):
            clock = getattr(self, name)
            if clock is not None:
                out[name].update(pinned=clock.pinned, capped=clock.capped)
        out["summary"], out["notes"] = self.summary(), self.notes()
        return out


def jetson_model() -> str | None:
    """This Jetson's device-tree model ("NVIDIA Jetson AGX Orin Developer Kit"); None elsewhere (engines are then
    matched to the GPU by its SM alone)."""
    info = read_device_info()
    return info.model if info.jetson else None


def read_device_info(root: str | Path = "/", nvpmodel: Callable[[], str | None] | None = None) -> DeviceInfo:
    """The device as far as its files say. `nvpmodel` returns `nvpmodel -q`'s output (None: it did not run)."""
    root = Path(root)
    cpus = _online_cpus(root)
    governors, cpu = _cpu_clocks(root, cpus)
    l4t = _l4t(root)
    gpu_name, gpu = _gpu_clock(root, TEGRA_GPU_NODES + ((GENERIC_GPU_NODE,) if l4t else ()))
    info = DeviceInfo(model=_model(root), cpus_online=len(cpus) or (os.cpu_count() or 0), kernel=platform.release(),
                      l4t=l4t, cpu_governors=governors, cpu=cpu, gpu=gpu, gpu_name=gpu_name)
    if not info.jetson:         # nvpmodel is a Jetson's: not run elsewhere
        return info
    return replace(info, power_mode=_power_mode(root, nvpmodel or _query_nvpmodel))


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace").replace("\x00", "").strip()
    except OSError:
        return None


def _mhz(path: Path, per_mhz: float) -> float | None:
    text = _read(path)
    try:
        return int(text) / per_mhz if text else None
    except ValueError:
        return None


def _model(root: Path) -> str:
    model = _read(root / "proc/device-tree/model")
    if model:
        return model
    for line in (_read(root / "proc/cpuinfo") or "").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def _l4t(root: Path) -> str | None:
    match = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", _read(root / "etc/nv_tegra_release") or "")
    return f"R{match.group(1)}.{match.group(2)}" if match else None


def _query_nvpmodel() -> str | None:
    try:
        done = subprocess.run(["nvpmodel", "-q"], capture_output=True, text=True, timeout=NVPMODEL_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def _power_mode(root: Path, query: Callable[[], str | None]) -> str | None:
    """"NAME (ID)" from `nvpmodel -q` ("NV Power Mode: MAXN" and the id on the next line), else from the
    status file's pmode and the conf file's POWER_MODEL names."""
    lines = [line.strip() for line in (query() or "").splitlines()]
    for i, line in enumerate(lines):
        match = re.match(r"NV Power Mode:\s*(.+)", line)
        if match:
            number = lines[i + 1] if i + 1 < len(lines) and lines[i + 1].isdigit() else None
            return f"{match.group(1)} ({number})" if number else match.group(1)
    match = re.search(r"pmode:(\d+)", _read(root / "var/lib/nvpmodel/status") or "")
    if not match:
        return None
    number = int(match.group(1))
    names = dict(re.findall(r"<\s*POWER_MODEL\s+ID=(\d+)\s+NAME=(\S+)\s*>", _read(root / "etc/nvpmodel.conf") or ""))
    return f"{names[str(number)]} ({number})" if str(number) in names else f"mode {number}"


def _online_cpus(root: Path) -> list[int]:
    spec = _read(root / "sys/devices/system/cpu/online") or ""
    cpus: list[int] = []
    for part in filter(None, spec.split(",")):
        low, _, high = part.partition("-")
        if low.isdigit() and (not high or high.isdigit()):
            cpus.extend(range(int(low), int(high or low) + 1))
    return cpus


def _cpu_clocks(root: Path, cpus: list[int]) -> tuple[dict[str, int], Clock | None]:
    governors: Counter[str] = Counter()
    lows, highs, hw = [], [], []
    for cpu in cpus:
        folder = root / f"sys/devices/system/cpu/cpu{cpu}/cpufreq"
        governor = _read(folder / "scaling_governor")
        if governor:
            governors[governor] += 1
        for values, name in ((lows, "scaling_min_freq"), (highs, "scaling_max_freq"), (hw, "cpuinfo_max_freq")):
            value = _mhz(folder / name, 1e3)            # kHz
            if value is not None:
                values.append(value)
    if not (governors or highs):
        return {}, None
    single = next(iter(governors)) if len(governors) == 1 else None
    return dict(governors), Clock(min(lows) if lows else None, max(highs) if highs else None,
                                  max(hw) if hw else None, single)


def _gpu_clock(root: Path, nodes: tuple[str, ...]) -> tuple[str | None, Clock | None]:
    devfreq = root / "sys/class/devfreq"
    try:
        entries = sorted(devfreq.iterdir())
    except OSError:
        return None, None
    for entry in entries:
        node = _read(entry / "device/of_node/name")
        if node not in nodes:
            continue
        available = [int(v) for v in (_read(entry / "available_frequencies") or "").split() if v.isdigit()]
        return node, Clock(_mhz(entry / "min_freq", 1e6), _mhz(entry / "max_freq", 1e6),   # Hz
                           max(available) / 1e6 if available else None, _read(entry / "governor"))
    return None, None
