"""Driver sub-commands (`edgeact motors ...`); pyserial / python-can are imported inside handlers."""
from __future__ import annotations

import argparse

from edgeact.runtime.cli_args import positive_float

PROTOCOLS = ("feetech", "dynamixel")


def parse_ids(text: str) -> list[int]:
    """'1,2,5' or '1-6' or '1-3,7' -> sorted ids."""
    ids: set[int] = set()
    try:
        for part in filter(None, (p.strip() for p in text.split(","))):
            low, _, high = part.partition("-")
            first, last = int(low), int(high or low)
            if last < first:
                raise argparse.ArgumentTypeError(f"ids {text!r}: the range {part} is reversed; write it low to high, "
                                                 f"{last}-{first}")
            ids.update(range(first, last + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"ids {text!r} unreadable; write them like 1,2,5 or 1-6") from None
    if not ids or min(ids) < 0 or max(ids) > 252:
        raise argparse.ArgumentTypeError(f"ids {text!r} must lie in 0-252")
    return sorted(ids)


def parse_names(text: str) -> list[str]:
    """'shoulder_pan,elbow_flex' -> ['shoulder_pan', 'elbow_flex']."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"motors {text!r}: name at least one, e.g. shoulder_pan,elbow_flex")
    return names


def register(subparsers) -> None:
    motors = subparsers.add_parser("motors", help="scan, set up, calibrate and simulate motor buses (Feetech, Dynamixel; "
                                                  "calibrate also Damiao)")
    actions = motors.add_subparsers(dest="motors_action", metavar="ACTION")
    actions.required = True

    scan = actions.add_parser("scan", help="list the motors that answer on a port, at every baud rate")
    scan.add_argument("--port", required=True, help="serial device, e.g. /dev/ttyACM0 (or a simulator's /dev/pts/N)")
    scan.add_argument("--protocol", choices=PROTOCOLS, help="only this protocol (default: both)")
    scan.add_argument("--baud", type=int, nargs="+", help="baud rates to try (default: all the protocol supports)")
    scan.add_argument("--ids", type=parse_ids, help="ids to search, e.g. 1-10 (default: 0-252)")
    scan.add_argument("--timeout", type=float, default=0.02, help="seconds to wait for each reply (default 0.02)")
    scan.set_defaults(handler=_scan)

    setup = actions.add_parser("setup", help="give ONE connected motor a new id and baud rate, plus safe defaults")
    setup.add_argument("--port", required=True)
    setup.add_argument("--protocol", choices=PROTOCOLS, required=True)
    setup.add_argument("--id", type=int, required=True, help="the id to give the motor")
    setup.add_argument("--baud", type=int, required=True, help="the baud rate to give the motor")
    setup.add_argument("--search-baud", type=int, nargs="+", help="baud rates to look for it at (default: all)")
    setup.add_argument("--search-ids", type=parse_ids, help="ids it may have now (default 0-252; bounds the search)")
    setup.add_argument("--timeout", type=float, default=0.05, help="seconds to wait for each reply (default 0.05)")
    setup.add_argument("--yes", action="store_true", help="do not ask before writing to the motor")
    setup.set_defaults(handler=_setup)

    calibrate = actions.add_parser(
        "calibrate", help="record a robot config's joints (zero pose, range) into its robot.calibration; torque stays off")
    calibrate.add_argument("config", metavar="CONFIG", help="the robot config (.json; a .toml one needs --out)")
    calibrate.add_argument("--motors", type=parse_names, help="only these motors, e.g. shoulder_pan,elbow_flex "
                                                             "(default: every joint; wheels need none)")
    calibrate.add_argument("--out", help="write the entries to this .json file instead of into CONFIG (to copy under "
                                         "robot.calibration)")
    calibrate.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    calibrate.add_argument("--yes", action="store_true", help="write into CONFIG without asking")
    calibrate.set_defaults(handler=_calibrate)

    sim = actions.add_parser("sim", help="run a simulated servo bus on a pty and print its port (no hardware)")
    sim.add_argument("--protocol", choices=PROTOCOLS, default="feetech")
    sim.add_argument("--ids", type=parse_ids, default=[1, 2, 3, 4, 5, 6], help="motor ids (default 1-6)")
    sim.add_argument("--model", help="motor model (default: sts3215 / xl430-w250)")
    sim.add_argument("--baud", type=int, default=1_000_000)
    sim.add_argument("--duration", type=positive_float, help="stop after this many seconds (default: run until Ctrl-C)")
    sim.set_defaults(handler=_sim)


def _scan(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from edgeact.drivers.motors.bus import MotorBusError
    from edgeact.drivers.motors.setup import scan_port

    protocols = [args.protocol] if args.protocol else list(PROTOCOLS)
    report = scan_port(args.port, protocols, args.baud, args.ids, args.timeout)
    console = Console()
    if report.found:
        table = Table(title=f"motors on {args.port}")
        for column in ("protocol", "baud rate", "id", "model", "model number"):
            table.add_column(column)
        for m in report.found:
            table.add_row(m.protocol, str(m.baud_rate), str(m.motor_id), m.model or "unknown", str(m.model_number))
        console.print(table)
    for protocol, baud, motor_id in report.collisions:
        console.print(f"[yellow]id {motor_id} at {baud} baud ({protocol}): replies collide; two motors probably share "
                      "this id. Connect them one at a time and give each its own id with `edgeact motors setup`.")
    if not report.found and not report.collisions:
        tried = "; ".join(f"{p} at {', '.join(map(str, b))} baud" for p, b in report.baud_rates_tried.items())
        raise MotorBusError(f"no motor answered on {args.port} ({tried}); check the power supply, the cable, "
                            "and the protocol")
    return 1 if report.collisions else 0


def _setup(args) -> int:
    from edgeact.drivers.motors.setup import check_new_settings, find_single_motor, flash_motor

    check_new_settings(args.protocol, args.id, args.baud)
    if not args.yes:
        _ask(f"Connect ONLY the motor to set up to {args.port} and power it, then press Enter (Ctrl-C aborts) ")
    found = find_single_motor(args.port, args.protocol, args.search_baud, args.search_ids, args.timeout)
    print(f"found {found.model} (model {found.model_number}) with id {found.motor_id} at {found.baud_rate} baud")
    if not args.yes:
        answer = _ask(f"Write id {args.id} and baud rate {args.baud} (plus safe defaults) to it? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("aborted; nothing was written")
            return 1
    done = flash_motor(args.port, found, args.id, args.baud, args.timeout)
    print(f"done: the {done.model} now answers as id {done.motor_id} at {done.baud_rate} baud")
    return 0


def _ask(prompt: str) -> str:
    try:
        return input(prompt)
    except EOFError:        # stdin is no terminal (a pipe, /dev/null, a service)
        from edgeact.runtime.errors import ConfigError

        raise ConfigError("motors setup asks for confirmation on a terminal and stdin has none; run it in a terminal, "
                          "or pass --yes once only the motor to set up is connected") from None


def _calibrate(args) -> int:
    import sys

    from edgeact.drivers.calibrate_session import calibrate_config
    from edgeact.runtime.cli_args import console

    return calibrate_config(args.config, args.motors, args.out, args.overwrite, args.yes, sys.stdin, console())


def _sim(args) -> int:
    import threading

    from edgeact.drivers.sim.servo_bus import SimServoBus
    from edgeact.runtime.cli import CommandError

    try:
        sim = SimServoBus(args.protocol, ids=args.ids, model=args.model, baud_rate=args.baud)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    with sim:
        print(f"simulated {args.protocol} bus: motors {', '.join(map(str, args.ids))} ({sim.default_model}) "
              f"at {args.baud} baud on {sim.port}", flush=True)
        print(f"try: edgeact motors scan --port {sim.port} --protocol {args.protocol}", flush=True)
        try:
            threading.Event().wait(args.duration)   # Ctrl-C interrupts the wait
        except KeyboardInterrupt:
            print("stopped")
    return 0
