"""The operator's side of `edgeact motors calibrate`: the two prompts, the live sweep table, writing robot.calibration.

Everything the operator types is read from `answers` (sys.stdin from the CLI, a scripted stream in tests);
the bus is connected with torque off on every motor and never turns it on.
"""
from __future__ import annotations

import copy
import shutil
import threading
from pathlib import Path
from typing import Any, TextIO

from rich.markup import escape

from edgeact.drivers.motors.calibrate import (SAMPLE_PERIOD_S, CalibrationError, JointSweep, RawReader,
                                              calibrations, read_zero_pose, sample_sweeps)
from edgeact.runtime.cli_args import json_output_path, write_json_file
from edgeact.runtime.errors import ConfigError

CALIBRATION_FIELDS = ("homing_offset", "range_min", "range_max", "drive_mode")


def calibrate_config(config: str | Path, motors: list[str] | None, out: str | Path | None, overwrite: bool,
                     yes: bool, answers: TextIO, console, period_s: float = SAMPLE_PERIOD_S) -> int:
    """Calibrate the config's joints (or `motors`) and write the entries into it (or to `out`); the exit status."""
    from edgeact.runtime.robot_config import TOP_LEVEL, read_config_dict

    config = Path(config)
    data = read_config_dict(config)
    if not isinstance(data, dict):
        raise ConfigError(f"config {config}: the top level is a JSON {type(data).__name__}, not a table of sections "
                          f"({', '.join(TOP_LEVEL)}); see `edgeact demo --write-config sample.json`")
    out = _check_target(config, None if out is None else Path(out), overwrite)
    stand_in = _whole_turn_entries(data.get("robot"))
    section = _robot_section(data, config, calibration=stand_in)
    names = _joints_to_calibrate(section, motors, config)
    old = data["robot"].get("calibration") if isinstance(data["robot"].get("calibration"), dict) else {}
    drive_modes = {n: old[n]["drive_mode"] if isinstance(old.get(n), dict) and old[n].get("drive_mode") in (0, 1)
                   else 0 for n in names}

    sweeps = _record(section, names, answers, console, period_s)
    entries = {name: cal.to_dict() for name, cal in calibrations(sweeps, drive_modes).items()}
    # the loader's and the bus's own checks of the new entries, before anything is written
    _robot_section(data, config, calibration={**stand_in, **entries}).make_bus()
    console.print(_summary_table(sweeps, entries))
    for name, sweep in sweeps.items():
        if sweep.near_seam():
            console.print(f"[yellow]motor '{name}': its range ends within a few degrees of the encoder's seam (raw "
                          f"{sweep.low}..{sweep.high} of 0..{sweep.raw_field.size - 1}); a joint that sags past it "
                          f"reads as the far end. Consider moving the seam: {sweep.raw_field.seam_fix}.")
    console.print("drive_mode is kept from the config (0 where it had none); set 1 for a joint that turns against "
                  "your kinematics' positive direction.")

    if out is not None:
        write_json_file(out, entries)
        console.print(escape(f"wrote the calibration of {len(entries)} motors to {out}; copy its entries under "
                             f"robot.calibration in {config}"))
        return 0
    if not yes:
        console.print(escape(f"Write the calibration of {', '.join(entries)} into {config}? Its other content is "
                             f"kept, the file as it was saved as {_backup_path(config)}. [y/N] "), end="")
        if answers.readline().strip().lower() not in ("y", "yes"):
            console.print(escape(f"not written; {config} is unchanged"))
            return 1
    written = copy.deepcopy(data)
    written["robot"]["calibration"] = {**old, **entries}
    backup = _back_up(config)
    write_json_file(config, written)
    console.print(escape(f"wrote the calibration of {len(entries)} motors into {config}; the config as it was: "
                         f"{backup}"))
    still = [n for n in stand_in if n not in written["robot"]["calibration"]]
    if still:       # the config loads only once every position joint has its entry
        console.print(escape(f"{', '.join(still)} still need{'s' if len(still) == 1 else ''} a calibration: "
                             f"`edgeact motors calibrate {config} --motors {','.join(still)}`; until then the config "
                             "does not load"), style="yellow")
    return 0


# -- the config ------------------------------------------------------------------------------------

def _backup_path(config: Path) -> Path:
    return config.with_name(config.name + ".bak")


def _back_up(config: Path) -> Path:
    """Keep the config as it was (byte for byte) beside it, replacing an older backup, before its calibration is
    rewritten: a sweep made from the wrong zero pose is undone by copying it back."""
    backup = _backup_path(config)
    try:
        shutil.copyfile(config, backup)
    except OSError as exc:
        raise ConfigError(f"{config}: its backup {backup} cannot be written ({exc.strerror or exc}); nothing was "
                          f"written; free that path, or pass --out calibration.json and copy the entries by hand") \
            from None
    return backup


def _check_target(config: Path, out: Path | None, overwrite: bool) -> Path | None:
    """Refuse a destination it cannot write before the operator moves anything."""
    if out is None:
        if config.suffix.lower() != ".json":
            raise ConfigError(f"{config} is TOML and edgeact writes only JSON; pass --out calibration.json and copy "
                              "its entries under [robot.calibration]")
        return None
    if out.resolve() == config.resolve():
        raise ConfigError(f"--out {out} is the config itself; leave --out out to write into the config (its other "
                          "content is kept)")
    json_output_path(out, overwrite, "--out", "calibration", "calibration.json")
    return out


def _whole_turn_entries(robot: Any) -> dict[str, dict]:
    """Stand-in entries for the serial joints (zero at raw 0, the whole turn), so the robot section validates while
    its own calibration is missing or wrong: the reason to calibrate. Never written; the raw reads ignore them."""
    if not isinstance(robot, dict) or robot.get("bus") not in ("feetech", "dynamixel") \
            or not isinstance(robot.get("motors"), dict):
        return {}
    from edgeact.drivers.motors.serial_types import serial_bus_class

    models = serial_bus_class(robot["bus"]).MODELS
    return {name: {"homing_offset": 0, "range_min": 0, "range_max": models[m["model"]].resolution_ticks - 1,
                   "drive_mode": 0}
            for name, m in robot["motors"].items()
            if isinstance(m, dict) and m.get("mode", "position") == "position" and m.get("model") in models}


def _robot_section(data: dict, config: Path, calibration: dict[str, Any]):
    """The config's robot section, validated by the loader's own builder with `calibration` in place of its own."""
    from edgeact.runtime.robot_config import robot_section_from_dict

    robot = data.get("robot")
    if not isinstance(robot, dict):
        problem = "missing section" if robot is None else f"must be a table, got {type(robot).__name__}"
        raise ConfigError(f"config {config}: robot: {problem}; see `edgeact demo --write-config sample.json`")
    try:
        return robot_section_from_dict({**robot, "calibration": calibration})
    except ConfigError as exc:
        raise ConfigError(f"config {config}: {exc}") from None


def _joints_to_calibrate(section, motors: list[str] | None, config: Path) -> list[str]:
    if section.bus == "sim":
        raise ConfigError(f"config {config}: robot.bus is \"sim\", the built-in simulator, whose motors start "
                          "calibrated; set robot.bus to your motors' bus (feetech, dynamixel, damiao-can). To try "
                          "calibrate without hardware, run `edgeact motors sim` and use bus \"feetech\" with the pty "
                          "it prints as robot.port")
    wheels = [n for n, m in section.motors.items() if m.mode == "velocity"]
    if motors is None:
        names = [n for n in section.motors if n not in wheels]
        if not names:
            raise ConfigError(f"config {config}: every motor is a wheel (mode velocity); wheels turn freely and need "
                              "no calibration")
        return names
    unknown = [n for n in motors if n not in section.motors]
    if unknown:
        raise ConfigError(f"--motors: {', '.join(unknown)} not in robot.motors of {config}; its motors are "
                          f"{', '.join(section.motors)}")
    named_wheels = [n for n in motors if n in wheels]
    if named_wheels:
        raise ConfigError(f"--motors: {', '.join(named_wheels)} turn freely (mode velocity, wheels) and need no "
                          "calibration; leave them out")
    return list(dict.fromkeys(motors))


# -- the operator -------------------------------------------------------------------------------

def _ask(answers: TextIO, console, prompt: str) -> None:
    console.print(prompt, end="")
    if answers.readline() == "":
        raise CalibrationError("input ended before the joints were recorded (no terminal on stdin?); run "
                               "`edgeact motors calibrate` in a terminal, it waits for Enter")


def _record(section, names: list[str], answers: TextIO, console, period_s: float) -> dict[str, JointSweep]:
    """Connect with torque off, take the zero pose at the first Enter and sample the sweep until the second."""
    from rich.live import Live

    bus = section.make_bus()    # its calibration is the stand-in (or none): the raw reads do not use it
    with bus:   # leaving it turns torque off again (it never came on)
        # An arm a run left holding falls the moment torque goes off, and it goes off on every motor of the bus
        # (not only the --motors being calibrated): each is asked.
        if _torque_on(bus, list(bus.motors)):
            console.print(f"Torque is ON on motors of the {section.bus} bus (a run left them holding): the next step "
                          "turns it off and the arm may drop.")
            try:
                _ask(answers, console, "Hold the arm, then press Enter to turn torque off (Ctrl-C leaves it on) ")
            except BaseException:
                bus.disconnect(False)       # not confirmed: the arm keeps holding (leaving the block then does nothing)
                raise
        bus.disable_torque()
        reader = RawReader(bus, names)
        console.print(f"Torque is OFF on every motor of {section.bus} bus: the joints move freely by hand; hold the "
                      "arm, it may drop.")
        _ask(answers, console, "Step 1: move the arm to its zero pose (the pose where every joint reads 0 rad in "
                               "your kinematics) and press Enter ")
        zero = read_zero_pose(reader)
        sweeps = {name: JointSweep(reader.fields[name], zero[name]) for name in names}
        console.print("Step 2: move every joint through its full range, end to end, then press Enter")
        entered = threading.Event()
        ended = []

        def wait_for_enter() -> None:
            ended.append(answers.readline() == "")
            entered.set()

        threading.Thread(target=wait_for_enter, name="calibrate-enter", daemon=True).start()
        with Live(_sweep_table(sweeps), console=console, refresh_per_second=10) as live:
            sample_sweeps(reader, sweeps, entered.is_set, period_s, lambda s: live.update(_sweep_table(s)))
        if ended and ended[0]:
            raise CalibrationError("input ended during step 2 (no terminal on stdin?); run `edgeact motors "
                                   "calibrate` in a terminal, it waits for Enter")
    return sweeps


def _torque_on(bus, names: list[str]) -> bool:
    """Whether any of the motors reports torque on (a serial motor's register, a Damiao motor's feedback); a read
    that fails counts as on: the operator is warned rather than the arm dropped unannounced."""
    from edgeact.drivers.motors.bus import MotorBusError

    try:
        return any(bus.torque_enabled(names).values())
    except MotorBusError:
        return True


def _sweep_table(sweeps: dict[str, JointSweep]):
    from rich.table import Table

    table = Table(title="raw positions (press Enter when every joint went end to end)")
    for column in ("motor", "min", "current", "max", "travel (deg)", ""):
        table.add_column(column, justify="left" if column in ("motor", "") else "right")
    for name, s in sweeps.items():
        flag = "seam crossed" if s.seam_jump or s.off_field is not None or s.at_end is not None else ""
        table.add_row(name, str(s.low), str(s.current), str(s.high), f"{s.raw_field.degrees(s.travel_ticks):.0f}", flag)
    return table


def _summary_table(sweeps: dict[str, JointSweep], entries: dict[str, dict]):
    from rich.table import Table

    table = Table(title="robot.calibration")
    for column in ("motor", *CALIBRATION_FIELDS, "range (rad from the zero pose)"):
        table.add_column(column, justify="left" if column == "motor" else "right")
    for name, e in entries.items():
        tick = sweeps[name].raw_field.rad_per_tick
        sign = -1 if e["drive_mode"] else 1
        ends = sorted(sign * (r - e["homing_offset"]) * tick for r in (e["range_min"], e["range_max"]))
        table.add_row(name, *(str(e[f]) for f in CALIBRATION_FIELDS), f"{ends[0]:+.2f} .. {ends[1]:+.2f}")
    return table
