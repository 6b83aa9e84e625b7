"""`edgeact calibrate-hand-eye CONFIG`: where the robot's camera is, for following traces (plan.trace_camera_pose)."""
from __future__ import annotations

import copy
from pathlib import Path

from edgeact.runtime.cli_args import positive_float, seed_value

SMALL_MARKER_PX = 40        # a marker narrower than this in the image: warn (its corners are coarse)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "calibrate-hand-eye",
        help="find the camera's pose from a marker on the gripper (plan.trace_camera_pose; a camera fixed to the base)",
        description="Move the arm through seeded poses around where it stands (through the config's safety limits), "
                    "find an ArUco marker fixed on the gripper in the config's camera at each, and solve where the "
                    "camera's optical frame is in the actions' reference frame. On the built-in MuJoCo robot the "
                    "simulated gripper carries the marker. Prints the pose and its reprojection error; --write puts "
                    "it into CONFIG as plan.trace_camera_pose.")
    p.add_argument("config", metavar="CONFIG", help="the robot config (.json to --write into it)")
    p.add_argument("--poses", type=int, default=15, help="arm poses to visit (default 15; at least 6 must see the marker)")
    p.add_argument("--spread-rad", type=positive_float, default=0.35,
                   help="how far each joint moves from its start, at most (default 0.35 rad)")
    p.add_argument("--seed", type=seed_value, default=0, help="the poses' seed (default 0)")
    p.add_argument("--max-drop-m", type=float, default=0.0,
                   help="how far below its start height the hand may go (default 0: never lower; start the arm "
                        "clear of the table)")
    p.add_argument("--method", default="park", help="OpenCV's closed-form solver before the joint refinement: park "
                                                    "(default), tsai, horaud, andreff, daniilidis")
    p.add_argument("--marker-dictionary", default="DICT_4X4_50", help="the marker's ArUco dictionary (default DICT_4X4_50)")
    p.add_argument("--marker-id", type=int, default=7, help="the marker's id (default 7)")
    p.add_argument("--marker-side-m", type=positive_float, default=0.04,
                   help="the printed black square's side in metres, measured (default 0.04)")
    p.add_argument("--camera-size", metavar="WxH", help="stream the camera at this size for the calibration (e.g. "
                                                         "640x480): a larger marker image, a steadier pose")
    p.add_argument("--out", help="write the result (pose, errors, every pose's outcome) to this .json file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--write", action="store_true", help="write the pose into CONFIG as plan.trace_camera_pose (its "
                                                        "other content is kept)")
    p.set_defaults(handler=_calibrate_hand_eye)

    m = subparsers.add_parser(
        "hand-eye-marker", help="write the ArUco marker to print for calibrate-hand-eye (a PNG that prints to size)",
        description="Write the marker as a PNG whose resolution is stored in it, so that printed at 100 % (no "
                    "fit-to-page) its black square is --marker-side-m wide; measure the print and pass what you "
                    "measure to calibrate-hand-eye. The white border around the square is part of the marker.")
    m.add_argument("--out", required=True, help="the .png to write")
    m.add_argument("--marker-dictionary", default="DICT_4X4_50", help="ArUco dictionary (default DICT_4X4_50)")
    m.add_argument("--marker-id", type=int, default=7, help="the marker's id (default 7)")
    m.add_argument("--marker-side-m", type=positive_float, default=0.04, help="the black square's side (default 0.04)")
    m.add_argument("--overwrite", action="store_true", help="replace an existing file")
    m.set_defaults(handler=_write_marker)


def _calibrate_hand_eye(args) -> int:
    import threading

    import numpy as np

    from edgeact.calibration.hand_eye import MAX_REPROJECTION_PX, MarkerSpec
    from edgeact.calibration.hand_eye_session import SessionOptions, calibrate
    from edgeact.drivers.motors.safety import EStopLatchedError
    from edgeact.runtime.cli_args import console, json_output_path, write_json_file
    from edgeact.runtime.commands_loop import KeyEstop, estop_key_required, sigterm_as_interrupt, warn_without_estop
    from edgeact.runtime.errors import ConfigError
    from edgeact.runtime.robot_config import read_config_dict, robot_config_from_dict

    config_path = Path(args.config)
    data = read_config_dict(config_path)
    if args.write and config_path.suffix.lower() != ".json":
        raise ConfigError(f"--write: {config_path} is not JSON (there is no TOML writer here); use --out and copy "
                          "the entry under plan.trace_camera_pose")
    out = None if args.out is None else json_output_path(args.out, args.overwrite, "--out", "result",
                                                          "hand_eye.json")
    if out is not None and out.resolve() == config_path.resolve():
        raise ConfigError(f"--out {out} is the robot config: the result would replace it; give --write to add the "
                          "pose to the config (its other content kept), or another --out")
    options = SessionOptions(poses=args.poses, spread_rad=args.spread_rad, seed=args.seed, method=args.method,
                             max_drop_m=args.max_drop_m)
    marker = MarkerSpec(args.marker_dictionary, args.marker_id, args.marker_side_m)
    run_data = copy.deepcopy(data)
    if args.camera_size:
        width, height = _size(args.camera_size)
        if not isinstance(run_data.get("camera"), dict):
            raise ConfigError(f"{config_path}: no camera section to resize")
        run_data["camera"].update(width=width, height=height)
    config = robot_config_from_dict(run_data, source=str(config_path))
    out_console = console()

    def on_pose(record, total: int) -> None:
        state = ("marker seen" if record.seen else "marker not seen") if record.reached else "not reached (skipped)"
        out_console.print(f"pose {record.index + 1}/{total}: {state}")

    estop = threading.Event()
    warn_without_estop(config)
    try:
        # As `edgeact run`: `kill` stops the arm like Ctrl-C (through the guard's exit), the config's e-stop key works.
        with sigterm_as_interrupt(), KeyEstop(config.estop.key_char, estop, required=estop_key_required(config)):
            result, records = calibrate(config, marker, options, on_pose, estop)
    except EStopLatchedError as exc:
        detail = exc.trip.detail if exc.trip is not None else "e-stop"
        out_console.print(f"[red]stopped by the e-stop ({detail}): the robot is in its safe state "
                          f"'{config.limits.safe_state}' and the session ended; nothing was written. Release the "
                          "e-stop and run the command again.[/red]")
        return 1
    report = {**result.to_dict(), "poses": [{"target_rad": r.target_rad, "reached": r.reached, "seen": r.seen,
                                            "marker_reprojection_px": r.reprojection_px, "marker_side_px": r.side_px}
                                           for r in records]}
    out_console.print(_table(result, records))
    sides = [r.side_px for r in records if r.side_px is not None]
    if sides and float(np.median(sides)) < SMALL_MARKER_PX:
        out_console.print(f"[yellow]the marker is {float(np.median(sides)):.0f} px wide in the image (median): its "
                          "corners, and so the camera's pose, are coarse at that size; stream the camera larger "
                          "(--camera-size 640x480) or print a larger marker[/yellow]")
    if out is not None:
        write_json_file(out, report)
        out_console.print(f"wrote {out}")
    if result.median_reprojection_px > MAX_REPROJECTION_PX:
        out_console.print(f"[red]the corners reproject {result.median_reprojection_px:.2f} px off (median; at most "
                          f"{MAX_REPROJECTION_PX} px is expected): the kinematics, the joint readings, the camera's "
                          "intrinsics or the marker's side disagree. Check --marker-side-m (measure the printed "
                          "square), robot.calibration, and that the camera is fixed to the base. Not written.[/red]")
        return 1
    if args.write:
        written = copy.deepcopy(data)
        written.setdefault("plan", {})["trace_camera_pose"] = result.config_entry()
        write_json_file(config_path, written)
        out_console.print(f"wrote plan.trace_camera_pose into {config_path}")
    return 0


PRINT_PIXELS = 600          # the black square's pixels in the PNG: sharp edges at any print size up to ~25 cm


def _write_marker(args) -> int:
    from PIL import Image

    from edgeact.calibration.hand_eye import MarkerSpec
    from edgeact.runtime.cli_args import console
    from edgeact.runtime.errors import ConfigError

    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise ConfigError(f"--out {out}: the marker is written as PNG; give a .png path")
    if out.exists() and not args.overwrite:
        raise ConfigError(f"--out {out}: already exists; pass --overwrite to replace it")
    marker = MarkerSpec(args.marker_dictionary, args.marker_id, args.marker_side_m)
    image = marker.image(PRINT_PIXELS)
    dpi = PRINT_PIXELS / (marker.side_m / 0.0254)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(out, dpi=(dpi, dpi))
    console().print(f"wrote {out}: {marker.dictionary} id {marker.marker_id}, the black square {marker.side_m * 1000:g} mm "
                    f"when printed at 100 % ({dpi:.0f} dpi stored); measure it after printing")
    return 0


def _size(text: str) -> tuple[int, int]:
    from edgeact.runtime.errors import ConfigError

    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"--camera-size {text!r}: give WIDTHxHEIGHT, e.g. 640x480") from None
    if width <= 0 or height <= 0:
        raise ConfigError(f"--camera-size {text!r}: both sides must be positive")
    return width, height


def _table(result, records):
    from rich.table import Table

    table = Table(title="hand-eye calibration (camera fixed to the base)", show_header=False)
    seen = sum(r.seen for r in records)
    reached = sum(r.reached for r in records)
    entry = result.config_entry()
    rows = [
        ("poses", f"{len(records)} visited, {reached} reached, marker seen in {seen}"),
        ("corner reprojection", f"median {result.median_reprojection_px:.2f} px, max {max(result.reprojection_px):.2f} px "
                                f"(closed form alone: {result.extra['linear_solution_median_reprojection_px']:.2f} px)"),
        ("camera position", f"{[round(v * 1000, 1) for v in entry['position_m']]} mm in {result.reference_frame!r}"),
        ("camera quaternion", f"{entry['quaternion_xyzw']} (x, y, z, w)"),
    ]
    if result.nominal_offset_m is not None:
        rows.append((f"vs the description's {result.camera_frame!r}",
                     f"{result.nominal_offset_m * 1000:.1f} mm, {result.nominal_offset_deg:.2f} deg"))
    for name, value in rows:
        table.add_row(name, value)
    return table
