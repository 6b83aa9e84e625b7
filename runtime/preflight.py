"""`edgeact check CONFIG`: what `edgeact run CONFIG` needs, checked without moving anything.

After wiring a robot, flashing its computer or copying a new bundle, this says in one table whether a
run would start, and if not, everything that stops it (not only the first): the e-stop input, the
device's power mode and clocks, every configured motor answering as the model the config says, every
joint resting inside its limits (what the run refuses to start with), the hand's pose from the
kinematics, the camera delivering frames (size, rate, depth), and the policy answering one of those
frames, timed. Each problem comes with its fix.

Nothing is written to the motors: torque is neither turned on nor off (the bus is left as it was found; a
run with `robot.disable_torque_on_exit: false` may have left joints holding, and turning torque off would
drop them). Connecting the bus checks the motors' models as the run does; a motor in another operating mode
than the config's is a warning (the run switches it as it connects, with its torque off), not switched. The policy is made as the
run makes it (in its own process where the config says so, with the run's threads) and answers a frame
twice: once to warm up, once timed.
"""
from __future__ import annotations

import math
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from typing import Any, Callable

from edgeact.runtime.errors import EdgeactError

OK, WARN, FAIL, SKIPPED = "ok", "warn", "fail", "skipped"
PLACEHOLDER_INSTRUCTION = "move to the red block"     # when the config has none (the run takes it from the config)


@dataclass(frozen=True)
class Check:
    name: str
    status: str         # OK, WARN, FAIL or SKIPPED
    detail: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def failed(checks: list[Check]) -> bool:
    return any(c.status == FAIL for c in checks)


def preflight(config, frames: int = 5, with_policy: bool = True,
              on_check: Callable[[Check], None] | None = None) -> list[Check]:
    """Every check on `config` (a loaded RobotConfig), in order; `on_check` hears each as it is made. A check that
    raises (whatever the error: a driver's, onnxruntime's) is a failed check, and the others still run."""
    checks: list[Check] = []

    def add(name: str, status: str, detail: str) -> None:
        check = Check(name, status, detail)
        checks.append(check)
        if on_check is not None:
            on_check(check)

    def guarded(name: str, check: Callable[[], Any], default: Any = None) -> Any:
        try:
            return check()
        except Exception as exc:        # noqa: BLE001 - reported as the failed check, with its type where unknown
            add(name, FAIL, str(exc) if isinstance(exc, EdgeactError) else f"{type(exc).__name__}: {exc}")
            return default

    if frames < 1:
        raise ValueError(f"frames: take at least 1 camera frame, got {frames}")
    guarded("e-stop", lambda: _estop(config, add))
    guarded("device", lambda: _device(add))
    guarded("bundle", lambda: _bundle(config, add))
    from edgeact.runtime.sim_robot import make_robot_camera, start_sim_bus

    with ExitStack() as stack:
        port = None
        if config.robot.bus == "sim":
            port = guarded("simulator", lambda: stack.enter_context(start_sim_bus(config.robot, None)).port)
        positions = guarded("motors", lambda: _motors(config, port, add, stack))
        guarded("kinematics", lambda: _kinematics(config, positions, add))
        camera, frame = guarded("camera", lambda: _camera(config, make_robot_camera, frames, add, stack), (None, None))
        guarded("policy", lambda: _policy(config, camera, frame, positions, with_policy, add, stack))
    return checks


def _estop(config, add) -> None:
    from edgeact.runtime.commands_loop import estop_key_required, estop_missing
    from edgeact.runtime.loop import estop_check

    if estop_check(config)():
        add("e-stop", FAIL, f"active: the e-stop file {config.estop_path} exists, so the run would refuse to start; "
                            "remove it once the robot is clear")
    elif config.estop_path is not None and not config.estop_path.parent.is_dir():
        add("e-stop", FAIL, f"the e-stop file's folder {config.estop_path.parent} does not exist here, so the e-stop "
                            "could never be pressed (`touch` fails there); give estop.file in an existing folder, "
                            "e.g. /tmp/edgeact.estop")
    elif estop_key_required(config) and not sys.stdin.isatty():
        add("e-stop", FAIL, f"estop.key {config.estop.key!r} is this real robot's only e-stop and there is no terminal "
                            "here to press it in, so the run would refuse to start; run from a terminal or set "
                            "estop.file")
    elif estop_missing(config):
        add("e-stop", WARN, "none configured for this real robot: only Ctrl-C or `kill` stop a run; set estop.file "
                            "and/or estop.key")
    else:
        where = [f"file {config.estop_path} (absent)" if config.estop.file else "",
                 f"key {config.estop.key!r}" if config.estop.key else ""]
        add("e-stop", OK, ", ".join(w for w in where if w) or "simulated robot, none configured")


def _device(add) -> None:
    from edgeact.runtime.device_info import read_device_info

    device = read_device_info()
    add("device", OK, device.summary())
    for note in device.notes():
        add("device", WARN, note)


def _bundle(config, add) -> None:
    """A bundle policy's manifest: found, every file it lists there at its size (an incomplete copy fails here, also
    with --no-policy; the policy check loads them and checks their sha256), and judged against its reference."""
    if config.policy.type_name != "bundle":
        return
    from edgeact.runtime.bundle import read_manifest, verify_files
    from edgeact.runtime.demo import bundle_path

    path = bundle_path(config)
    manifest = read_manifest(path)
    verify_files(path, manifest, checksums=False)
    precisions = "/".join(sorted({stage.precision for stage in manifest.stages.values()}))
    real = path.resolve()       # a store's `current` (edgeact flash): say which bundle it is now
    shown = f"{path} -> {real.name}" if real != path else f"{path}"
    what = f"{shown}: {manifest.model.name or 'model'}, {len(manifest.stages)} stages ({precisions})"
    status = manifest.verification.status
    if status == "passed":
        add("bundle", OK, f"{what}, verified against its reference (passed)")
    elif status == "failed" and config.policy.allow_unverified:
        add("bundle", WARN, f"{what}: FAILED verification, loaded only because policy.allow_unverified is true")
    elif status == "failed":
        add("bundle", FAIL, f"{what}: failed verification, so it does not load; re-export or re-quantize it, or set "
                            "policy.allow_unverified to run it anyway")
    else:
        checkpoint = manifest.model.source_checkpoint or "CKPT"
        add("bundle", WARN, f"{what}: never verified against its reference; `edgeact verify {path} --checkpoint "
                            f"{checkpoint}`")


def _motors(config, sim_port: str | None, add, stack: ExitStack) -> dict[str, float] | None:
    """Connect as the run does, read every motor, check the joints' start positions; the positions read (rad)."""
    from edgeact.drivers.motors.bus import MotorHardwareError
    from edgeact.drivers.motors.safety import SafetyGuard, StartRefusedError

    if config.robot.bus == "sim" and sim_port is None:
        add("motors", SKIPPED, "the simulator did not start")
        return None
    bus = config.robot.make_bus(sim_port)
    mode_changes = bus.connect_read_only()      # writes nothing: a motor in another mode is told, not switched
    # Left as found: no torque change on the way out (see the module docstring).
    stack.callback(bus.disconnect, False)
    try:
        state, faults = bus.read_state(), {}
    except MotorHardwareError:
        lenient = getattr(bus, "read_state_with_faults", None)      # Damiao: a fault latched in the motor
        if lenient is None:
            raise
        state, faults = lenient()
        from edgeact.drivers.motors.damiao_table import STATUS_COMMUNICATION_LOST

        if any(code != STATUS_COMMUNICATION_LOST for code in faults.values()):
            bus.read_state()        # raises the driver's own message, with its fix
    positions = dict(state.position_rad)
    joints = [n for n, m in bus.motors.items() if m.mode != "velocity"]
    wheels = [n for n in bus.motors if n not in joints]
    add("motors", OK, f"{len(bus.motors)} answer as configured on {config.robot.bus}: "
                      + ", ".join(f"{n} {math.degrees(positions[n]):+.1f} deg" for n in joints)
                      + (f"; wheels {', '.join(wheels)}" if wheels else ""))
    for change in mode_changes:     # a mode the run would switch, or position limit registers narrower than the range
        add("motors", WARN, change)
    if faults:
        add("motors", WARN, f"{', '.join(faults)} latched \"communication lost\" (the last run or host went silent "
                            "while they held, so their own watchdog turned torque off): `edgeact run` clears it when "
                            "it turns torque on")
    try:
        SafetyGuard(bus, config.limits).check_start_positions({n: positions[n] for n in joints})
    except StartRefusedError as exc:
        add("start positions", FAIL, str(exc))
    except EdgeactError as exc:         # limits the guard refuses for this bus (as the run's guard would)
        add("start positions", FAIL, f"the safety limits do not fit this bus: {exc}")
    else:
        add("start positions", OK, "every joint rests inside its limits")
    return positions


def _kinematics(config, positions: dict[str, float] | None, add) -> None:
    mapper = config.actions.make_mapper(list(config.robot.motors))
    kinematics = getattr(mapper, "kinematics", None)
    if kinematics is None:
        add("kinematics", SKIPPED, f"actions {config.actions.type_name!r} map actions to joints without kinematics")
        return
    if positions is None:
        add("kinematics", SKIPPED, "no joint positions read")
        return
    hand = kinematics.forward(kinematics.q_from(positions))
    x, y, z = hand.position_m
    add("kinematics", OK, f"{kinematics.description.name}: {kinematics.ee_frame!r} at ({x:+.3f}, {y:+.3f}, {z:+.3f}) m "
                          f"in {kinematics.reference_frame!r}")


def _camera(config, make_camera, frames: int, add, stack: ExitStack):
    """Open the camera, take `frames` new frames; (camera, newest frame) or (None, None)."""
    camera = stack.enter_context(make_camera(config))
    timeout_s = config.camera.timeout_s
    frame = camera.latest(timeout_s)
    start = time.monotonic()
    for _ in range(frames):
        frame = camera.next_frame(timeout_s)        # the camera's own timeout error when it stops delivering
    span_s = time.monotonic() - start
    height, width = frame.color.shape[:2]
    valid = float((frame.depth_m > 0).mean())
    fps = frames / span_s if span_s > 0 else math.inf
    rate = f"{fps:.1f} frames/s" if span_s > 0 else "frames at once"
    age_s, max_age_s = frame.age_s(), config.plan.max_frame_age_s
    what = (f"{config.camera.type_name}: {width}x{height}, {rate} over {frames} frames, depth on {valid:.0%} of the "
            f"pixels, newest {age_s * 1000:.0f} ms old")
    asked = getattr(config.camera, "fps", None)
    if age_s > max_age_s:
        add("camera", WARN, f"{what}: older than plan.max_frame_age_s ({max_age_s * 1000:.0f} ms) when it arrives, "
                            "so the run would not plan on such frames and the robot would hold; lower the camera's "
                            "resolution or rate, or raise plan.max_frame_age_s")
    elif asked and fps < 0.5 * asked:
        add("camera", WARN, f"{what}: under half the configured {asked:g} frames/s (the camera, its link or this "
                            "computer is slower than asked); lower the resolution or the rate")
    else:
        add("camera", OK, what)
    return camera, frame


def _policy(config, camera, frame, positions, with_policy: bool, add, stack: ExitStack) -> None:
    from edgeact.runtime.policy import Observation, PolicyContext

    if not with_policy:
        add("policy", SKIPPED, "--no-policy")
        return
    if frame is None:
        add("policy", SKIPPED, "no camera frame to answer")
        return
    instruction = config.instruction or PLACEHOLDER_INSTRUCTION     # a bundle policy's config always has one
    context = PolicyContext(config.rates.action_rate_hz, tuple(config.robot.motors), config.config_dir,
                            camera.intrinsics)
    started = time.monotonic()
    policy = config.policy.make_robot_policy(context)       # as the run has it: in its own process, its threads
    stack.callback(policy.close)
    load_s = time.monotonic() - started
    proprio = {n: v for n, v in (positions or {}).items() if n in config.robot.motors}
    seconds = []
    for _ in range(2):          # the first warms up
        observation = Observation(frame.color, frame.depth_m, frame.capture_monotonic_s, proprio or None, instruction,
                                  depth_from_camera=True)
        started = time.monotonic()
        plan = policy.step(observation)
        seconds.append(time.monotonic() - started)
    trace = getattr(plan, "trace_px", None)
    points = (f", a trace of {len(trace)} point{'s' if len(trace) != 1 else ''}" if trace is not None and len(trace)
              else "")
    what = (f"{config.policy.type_name}: loaded in {load_s:.1f} s; answers a frame in {seconds[1]:.3f} s (first "
            f"{seconds[0]:.3f} s): {len(plan.actions)} action{'s' if len(plan.actions) != 1 else ''}{points}"
            + ("" if config.instruction else f" (instruction {instruction!r}: the config has none)"))
    if seconds[1] >= config.plan.max_age_s:     # a plan arrives at least this old: held, never followed
        add("policy", WARN, f"{what}: over plan.max_age_s ({config.plan.max_age_s:g} s), so every plan would arrive "
                            "stale and the robot would hold the whole run; use a faster bundle or precision (forced "
                            "depth decodes fewer tokens), or raise plan.max_age_s")
    else:
        add("policy", OK, what)


def report(checks: list[Check]) -> dict[str, Any]:
    return {"passed": not failed(checks), "checks": [c.to_dict() for c in checks]}
