"""The device a measurement ran on: model, L4T release, power mode and clocks, read from a Jetson's files.

No Jetson here: its files are laid out in a temporary root as JetPack writes them (device tree, nv_tegra_release,
cpufreq, the GPU's devfreq, nvpmodel's status and conf); `nvpmodel -q`'s output is given as the tool prints it.
The same reader runs on this machine's own files at the end.
"""
import json
import os
from pathlib import Path

import pytest

from edgeact.runtime.device_info import read_device_info

NVPMODEL_MAXN = "NVPM WARN: fan mode is not set!\nNV Power Mode: MAXN\n0\n"
RELEASE = ("# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, "
           "DATE: Wed Jan  8 01:49:37 UTC 2025\n")


def write(root: Path, relative: str, text: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def orin(root: Path, *, cpus: int = 12, governor: str = "schedutil", cpu_min_khz: int = 115200,
         cpu_max_khz: int = 2201600, gpu_min_hz: int = 306000000, gpu_max_hz: int = 1300500000,
         pmode: int = 0) -> Path:
    """An AGX Orin's files: every CPU at `governor` between the given min and max, the ga10b GPU's devfreq."""
    write(root, "proc/device-tree/model", "NVIDIA Jetson AGX Orin Developer Kit\x00")
    write(root, "etc/nv_tegra_release", RELEASE)
    write(root, "sys/devices/system/cpu/online", f"0-{cpus - 1}\n")
    for cpu in range(cpus):
        folder = f"sys/devices/system/cpu/cpu{cpu}/cpufreq"
        write(root, f"{folder}/scaling_governor", governor + "\n")
        write(root, f"{folder}/scaling_min_freq", f"{cpu_min_khz}\n")
        write(root, f"{folder}/scaling_max_freq", f"{cpu_max_khz}\n")
        write(root, f"{folder}/cpuinfo_max_freq", "2201600\n")
    gpu = "sys/class/devfreq/17000000.gpu"
    write(root, f"{gpu}/device/of_node/name", "ga10b\x00")
    write(root, f"{gpu}/min_freq", f"{gpu_min_hz}\n")
    write(root, f"{gpu}/max_freq", f"{gpu_max_hz}\n")
    write(root, f"{gpu}/available_frequencies", "306000000 624750000 930750000 1236750000 1300500000\n")
    write(root, f"{gpu}/governor", "nvhost_podgov\n")
    write(root, "sys/class/devfreq/15340000.vic/device/of_node/name", "vic\x00")      # another engine: not the GPU
    write(root, "var/lib/nvpmodel/status", f"pmode:{pmode:04d} fmode:quiet\n")
    write(root, "etc/nvpmodel.conf", "< POWER_MODEL ID=0 NAME=MAXN >\nCPU_ONLINE CORE_0 1\n"
                                     "< POWER_MODEL ID=3 NAME=50W >\nCPU_ONLINE CORE_0 1\n< PM_CONFIG DEFAULT=0 >\n")
    return root


def test_a_jetson_with_clocks_left_to_scale_says_so_and_how_to_pin_them(tmp_path):
    info = read_device_info(orin(tmp_path), nvpmodel=lambda: NVPMODEL_MAXN)
    assert info.model == "NVIDIA Jetson AGX Orin Developer Kit" and info.jetson
    assert (info.l4t, info.power_mode, info.cpus_online) == ("R36.4.3", "MAXN (0)", 12)
    assert info.cpu_governors == {"schedutil": 12}
    assert (info.cpu.min_mhz, info.cpu.max_mhz, info.cpu.hw_max_mhz) == (115.2, 2201.6, 2201.6)
    assert info.gpu_name == "ga10b" and (info.gpu.min_mhz, info.gpu.max_mhz, info.gpu.hw_max_mhz) == (306, 1300.5, 1300.5)
    assert info.cpu.pinned is False and info.gpu.pinned is False and not info.cpu.capped
    notes = info.notes()
    assert len(notes) == 1 and "CPU and GPU clocks not pinned" in notes[0] and "schedutil on 12" in notes[0]
    assert "sudo jetson_clocks" in notes[0]
    assert info.summary() == ("NVIDIA Jetson AGX Orin Developer Kit, L4T R36.4.3, power mode MAXN (0), "
                              "CPU max 2202 MHz (scaling), GPU ga10b max 1300 MHz (scaling), 12 cores online")


def test_pinned_clocks_leave_nothing_to_note(tmp_path):
    """`jetson_clocks` sets each minimum to the maximum."""
    info = read_device_info(orin(tmp_path, cpu_min_khz=2201600, gpu_min_hz=1300500000), nvpmodel=lambda: NVPMODEL_MAXN)
    assert info.cpu.pinned and info.gpu.pinned and info.notes() == []
    assert "(pinned)" in info.summary() and "(scaling)" not in info.summary()


def test_a_power_mode_that_caps_the_clocks_is_named_with_the_caps(tmp_path):
    """Without `nvpmodel` (not on the PATH, or refused) the mode comes from its status file and conf."""
    root = orin(tmp_path, cpus=8, cpu_min_khz=1497600, cpu_max_khz=1497600, gpu_min_hz=828750000,
                gpu_max_hz=828750000, pmode=3)
    info = read_device_info(root, nvpmodel=lambda: None)
    assert info.power_mode == "50W (3)" and info.cpus_online == 8
    notes = info.notes()
    assert notes == ["CPU clock capped by power mode 50W (3) at 1498 of 2202 MHz: choose the mode to measure with "
                     "`sudo nvpmodel -m ID`",
                     "GPU clock capped by power mode 50W (3) at 829 of 1300 MHz: choose the mode to measure with "
                     "`sudo nvpmodel -m ID`"]


def test_a_jetson_whose_power_mode_cannot_be_read_says_to_record_it(tmp_path):
    root = orin(tmp_path, cpu_min_khz=2201600, gpu_min_hz=1300500000)
    (root / "var/lib/nvpmodel/status").unlink()
    info = read_device_info(root, nvpmodel=lambda: "NVPM ERROR: failed to read PARAM\n")
    assert info.power_mode is None
    assert info.notes() == ["power mode unknown (`nvpmodel -q` did not answer): record it with the figures"]


def test_mixed_governors_are_counted_and_the_performance_governor_counts_as_pinned(tmp_path):
    root = orin(tmp_path, cpus=4, governor="performance", gpu_min_hz=1300500000)
    info = read_device_info(root, nvpmodel=lambda: NVPMODEL_MAXN)
    assert info.cpu.pinned and info.notes() == []
    write(root, "sys/devices/system/cpu/cpu3/cpufreq/scaling_governor", "ondemand\n")
    info = read_device_info(root, nvpmodel=lambda: NVPMODEL_MAXN)
    assert info.cpu_governors == {"performance": 3, "ondemand": 1} and info.cpu.pinned is False
    assert "ondemand on 1, performance on 3" in info.notes()[0]


def test_a_machine_without_jetson_files_reports_its_cpu(tmp_path):
    """A desktop or a container: the model from /proc/cpuinfo, no clock fields, nothing noted."""
    write(tmp_path, "proc/cpuinfo", "processor\t: 0\nmodel name\t: AMD EPYC 9R14\n")
    write(tmp_path, "sys/devices/system/cpu/online", "0-1\n")
    info = read_device_info(tmp_path, nvpmodel=lambda: None)
    assert (info.model, info.cpus_online, info.l4t, info.power_mode, info.cpu, info.gpu) == \
        ("AMD EPYC 9R14", 2, None, None, None, None)
    assert not info.jetson and info.notes() == []
    assert json.loads(json.dumps(info.to_dict()))["summary"] == "AMD EPYC 9R14, 2 cores online"


def test_this_machine_is_read_without_error():
    info = read_device_info()
    assert info.model and info.cpus_online >= 1 and info.cpus_online <= (os.cpu_count() or 1)
    as_dict = info.to_dict()
    assert as_dict["summary"] == info.summary() and as_dict["notes"] == info.notes()
    json.dumps(as_dict)


def test_the_loop_bench_records_the_device(tmp_path):
    """`edgeact bench`'s JSON and table carry it (the built-in simulated robot, scripted policy)."""
    from edgeact.runtime.cli import main

    code = main(["bench", "--seconds", "1", "--out", str(tmp_path)])
    assert code == 0
    summary = json.loads((tmp_path / "bench.json").read_text())
    assert summary["device"]["summary"] == read_device_info().summary()
    assert set(summary["device"]) >= {"model", "power_mode", "cpu", "gpu", "notes"}


@pytest.mark.parametrize("text", ["", "NV Power Mode: 15W\n", "NV Power Mode: MODE_30W\n2\n"])
def test_nvpmodel_outputs(tmp_path, text):
    info = read_device_info(orin(tmp_path), nvpmodel=lambda: text)
    expected = {"": "MAXN (0)", "NV Power Mode: 15W\n": "15W", "NV Power Mode: MODE_30W\n2\n": "MODE_30W (2)"}[text]
    assert info.power_mode == expected          # "" -> the status file's mode 0, named from the conf


def test_another_boards_gpu_named_gpu_is_not_taken_for_a_jetson(tmp_path):
    """An RK3588's Mali devfreq node is also "gpu": without L4T it is not a Jetson's GPU (and no nvpmodel note);
    with L4T (newer Jetson device trees name theirs "gpu") it is."""
    write(tmp_path, "proc/device-tree/model", "Radxa ROCK 5B\x00")
    write(tmp_path, "sys/class/devfreq/fb000000.gpu/device/of_node/name", "gpu\x00")
    write(tmp_path, "sys/class/devfreq/fb000000.gpu/max_freq", "1000000000\n")
    asked = []
    info = read_device_info(tmp_path, nvpmodel=lambda: asked.append(1))
    assert (info.jetson, info.gpu, info.power_mode, info.notes(), asked) == (False, None, None, [], [])
    write(tmp_path, "etc/nv_tegra_release", RELEASE)
    info = read_device_info(tmp_path, nvpmodel=lambda: NVPMODEL_MAXN)
    assert info.jetson and info.gpu_name == "gpu" and info.gpu.max_mhz == 1000 and info.power_mode == "MAXN (0)"
