"""The robot's one config file (JSON or TOML): bus and motors, camera, policy, rates, limits, watchdog, e-stop.

Every section is a dataclass validated at construction; a bad file is refused with the field's
dotted path and the fix ("rates.control_hz: must be in (0, 1000], got 0"; an unknown key gets a
"did you mean"). Camera, policy and action-mapper sections pick their type from the registries
by `"type"`, so a new camera or policy needs no change here.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeact.drivers.cameras.base import CameraConfig, camera_types
from edgeact.drivers.motors.bus import Motor, MotorCalibration, MotorsBus
from edgeact.drivers.motors.safety import SafetyConfig, safe_state_problem
from edgeact.runtime.control import MapperConfig, mapper_type
from edgeact.runtime.errors import ConfigError
from edgeact.runtime.policy import PolicyConfig, policy_type

BUS_TYPES = ("sim", "feetech", "dynamixel", "damiao-can")
SIM_PHYSICS = ("simple", "mujoco")     # the "sim" bus's motors: speed-limited servos alone, or MuJoCo joints
ESTOP_KEYS = {"space": " ", "enter": "\n", "esc": "\x1b", "tab": "\t"}
MAX_CONTROL_HZ = 1000.0
# limits.max_step_rad may be at most what limits.max_velocity_rad_s allows in this long (or one control period, if
# longer): 10 periods at 100 Hz. The step limit caps the jump of the first command after a pause; a larger one lets
# a hiccup of the loop become a full-speed lunge. The sample (0.1 rad at 2 rad/s) and the defaults (0.2, 3) fit.
MAX_STEP_SPAN_S = 0.1
# limits.watchdog_timeout_s at most: the SafetyGuard's watchdog is the last line when commands stop (a wheel keeps
# its last velocity until then). 2 s is 200 periods at 100 Hz, far above any jitter the three-period floor allows for.
MAX_WATCHDOG_TIMEOUT_S = 2.0


# -- sections ------------------------------------------------------------------------------------

@dataclass
class MotorEntry:
    id: int
    model: str
    mode: str = "position"                  # "position" (joints) or "velocity" (wheels)

    def __post_init__(self) -> None:
        if not 0 <= self.id <= 252:
            raise ConfigError(f"id: must be in 0..252, got {self.id}")
        if self.mode not in ("position", "velocity"):
            raise ConfigError(f"mode: must be 'position' or 'velocity', got {self.mode!r}")


@dataclass
class SimTaskSection:
    """An episode of the simulated task (drivers/sim/task.py) for the MuJoCo robot to start in and be judged on."""

    seed: int                               # the episode's random draw (block layout, colour, arm start)
    template: str | None = None             # "move_to", "push_left", "push_right"; null: drawn from the seed

    def __post_init__(self) -> None:
        from edgeact.drivers.sim.task import TEMPLATES

        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"seed: must be a non-negative integer, got {self.seed}")
        if self.template is not None and self.template not in TEMPLATES:
            raise ConfigError(f"template: must be one of {', '.join(TEMPLATES)} or null, got {self.template!r}"
                              f"{_suggest(self.template, TEMPLATES)}")


@dataclass
class RobotSection:
    """The motor bus. "sim" starts the built-in simulated Feetech bus on a pty (no port needed).

    `physics` says what the "sim" bus's motors move: "simple" servos that walk to their goals, or
    the joints of the MuJoCo robot (drivers/sim/mujoco_robot.py), whose world a "mujoco" camera renders.
    `sim_process` serves the simulated motors from their own process, as real motors answer from
    their own microcontrollers (the simulator's Python then costs the control process nothing);
    unset, yes. With "mujoco" that process holds the world and renders the "mujoco" camera too
    (its frames reach this process in shared memory). `task` (MuJoCo only) starts the world as an
    episode of the simulated task, which that process then judges (the run's result says how it went).
    """

    bus: str
    motors: dict[str, MotorEntry]
    port: str = ""                          # serial device; unused by "sim" and "damiao-can"
    baud_rate: int = 1_000_000              # serial buses
    calibration: dict[str, MotorCalibration] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)   # more fields of the bus's own config
    physics: str = "simple"                 # "sim" bus only: "simple" or "mujoco"
    sim_process: bool | None = None         # "sim" bus only: serve the simulator from a child process
    task: SimTaskSection | None = None      # physics "mujoco" only: {"seed": 7, "template": "move_to"}
    # After the run, the bus disconnect turns every motor's torque off (true), or leaves the motors in the run's
    # safe state (false: with limits.safe_state "hold" an arm under gravity keeps holding; cut power to release it).
    disable_torque_on_exit: bool = True

    def __post_init__(self) -> None:
        if self.bus not in BUS_TYPES:
            raise ConfigError(f"bus: must be one of {', '.join(BUS_TYPES)}, got {self.bus!r}"
                              f"{_suggest(self.bus, BUS_TYPES)}")
        if self.physics not in SIM_PHYSICS:
            raise ConfigError(f"physics: must be one of {', '.join(SIM_PHYSICS)}, got {self.physics!r}")
        if self.physics != "simple" and self.bus != "sim":
            raise ConfigError(f"physics: {self.physics!r} is for the simulated bus (bus \"sim\"); a {self.bus} bus "
                              "drives real motors")
        if self.sim_process is not None and self.bus != "sim":
            raise ConfigError(f"sim_process: is for the simulated bus (bus \"sim\"); remove it for a {self.bus} bus")
        if self.task is not None and self.physics != "mujoco":
            raise ConfigError(f"task: episodes are of the MuJoCo simulated robot (bus \"sim\", physics \"mujoco\"), "
                              f"not of physics {self.physics!r} on a {self.bus} bus; remove the task")
        if not self.motors:
            raise ConfigError('motors: name at least one motor, e.g. {"shoulder_pan": {"id": 1, "model": "sts3215"}}')
        if self.bus in ("feetech", "dynamixel") and not self.port:
            raise ConfigError(f"port: a {self.bus} bus needs its serial device, e.g. /dev/ttyACM0")
        if self.bus == "sim" and self.port:
            raise ConfigError("port: the simulated bus opens its own pty; remove the port (or use bus \"feetech\")")
        unknown = sorted(set(self.calibration) - set(self.motors))
        if unknown:
            raise ConfigError(f"calibration: names motors {unknown} that are not in motors ({', '.join(self.motors)})")
        self._check_models()
        uncalibrated = [n for n, m in self.motors.items() if m.mode == "position" and n not in self.calibration]
        if uncalibrated and self.bus in ("feetech", "dynamixel"):
            # A serial servo without an entry reads raw tick 0 as the joint's zero and its whole turn as its range:
            # a joint resting mid-travel (raw ~2048) reads ~pi rad, far outside any joint limit.
            raise ConfigError(
                f"calibration: no entry for the {self.bus} joint{'s' * (len(uncalibrated) > 1)} "
                f"{', '.join(map(repr, uncalibrated))}; without one raw tick 0 would be the joint's zero and a joint "
                "resting mid-travel would read ~3.1 rad. Give each "
                "homing_offset, range_min and range_max in raw ticks (0..4095 on 12-bit servos) and drive_mode: "
                "with torque off, read present_position at the joint's zero (homing_offset) and at both ends of its "
                "travel (range_min < range_max); drive_mode 1 where the reading falls as the joint angle grows "
                "(`edgeact motors calibrate CONFIG` measures them). "
                'E.g. {"homing_offset": 2048, "range_min": 1024, "range_max": 3072, "drive_mode": 0}')

    @property
    def sim_in_own_process(self) -> bool:
        return True if self.sim_process is None else self.sim_process

    @property
    def protocol(self) -> str:
        return "feetech" if self.bus == "sim" else self.bus

    def _check_models(self) -> None:
        """Every model is one the bus's vendor makes; `options` are fields of the bus's own config."""
        if self.bus == "damiao-can":
            from edgeact.drivers.motors import damiao_table
            from edgeact.drivers.motors.damiao import DamiaoBusConfig

            for name, m in self.motors.items():
                try:
                    damiao_table.model(m.model)
                except ConfigError as exc:
                    raise ConfigError(f"motors.{name}.model: {exc}") from None
            _check_keys(self.options, {f.name for f in dataclasses.fields(DamiaoBusConfig)}, "options")
            _check_option_types(self.options, DamiaoBusConfig)
            for key in ("gains", "feedback_ids"):        # per-motor options: a typo found here, not at connect
                unknown = sorted(set(self.options.get(key) or {}) - set(self.motors))
                if unknown:
                    raise ConfigError(f"options.{key}: {unknown} are not motors ({', '.join(self.motors)})"
                                      f"{_suggest(unknown[0], list(self.motors))}")
            try:
                DamiaoBusConfig(**self.options)
            except ConfigError as exc:
                raise ConfigError(f"options: {exc}") from None
            return
        from edgeact.drivers.motors.serial_bus import serial_bus_class

        bus_type = serial_bus_class(self.protocol)
        for name, m in self.motors.items():
            if m.model not in bus_type.MODELS:
                raise ConfigError(f"motors.{name}.model: {m.model!r} is not a {self.protocol} model; use one of "
                                  f"{', '.join(bus_type.MODELS)}{_suggest(m.model, bus_type.MODELS)}")
        config_fields = {f.name for f in dataclasses.fields(bus_type.CONFIG_TYPE)} - {"port", "baud_rate"}
        _check_keys(self.options, config_fields, "options")
        _check_option_types(self.options, bus_type.CONFIG_TYPE)
        try:
            bus_type.CONFIG_TYPE(port=self.port or "(the simulator's pty)", baud_rate=self.baud_rate, **self.options)
        except ConfigError as exc:
            raise ConfigError(f"options or baud_rate: {exc}") from None
        from edgeact.drivers.motors.serial_motion import check_calibration

        for name, cal in self.calibration.items():
            try:
                check_calibration(bus_type.MODELS[self.motors[name].model], cal, name)
            except ConfigError as exc:
                raise ConfigError(f"calibration: {exc}") from None

    def fastest_motor(self) -> tuple[str, float]:
        """(model, top speed in rad/s) of the fastest motor on the bus, from the vendor's model table: the serial
        servos' no-load speed (their goal velocity clamp), the Damiao models' VMAX (their velocity field's range)."""
        if self.bus == "damiao-can":
            from edgeact.drivers.motors import damiao_table

            speeds = {m.model: damiao_table.model(m.model).v_max_rad_s for m in self.motors.values()}
        else:
            from edgeact.drivers.motors.serial_bus import serial_bus_class

            models = serial_bus_class(self.protocol).MODELS
            speeds = {m.model: models[m.model].max_velocity_raw * models[m.model].velocity_unit_rad_s
                      for m in self.motors.values()}
        return max(speeds.items(), key=lambda item: item[1])

    def motor_objects(self) -> dict[str, Motor]:
        return {name: Motor(m.id, m.model, m.mode) for name, m in self.motors.items()}

    def make_bus(self, port: str | None = None) -> MotorsBus:
        """The driver bus (not connected); `port` overrides the configured one (the simulator's pty)."""
        if self.bus == "damiao-can":
            from edgeact.drivers.motors.damiao import DamiaoBus, DamiaoBusConfig

            return DamiaoBus(self.motor_objects(), self.calibration, self.disable_torque_on_exit,
                             config=DamiaoBusConfig(**self.options))
        from edgeact.drivers.motors.serial_bus import make_serial_bus

        return make_serial_bus(self.protocol, port or self.port, self.motor_objects(), self.calibration,
                               self.disable_torque_on_exit, baud_rate=self.baud_rate, **self.options)


@dataclass
class RatesSection:
    control_hz: float = 100.0               # control ticks per second
    action_rate_hz: float = 10.0            # an action of a chunk lasts 1 / action_rate_hz (the training data's rate)
    # SCHED_FIFO priority asked for the control thread, so its wake-ups beat every normal thread on the machine;
    # best effort (needs root, CAP_SYS_NICE or an rtprio limit: `ulimit -r`); null: normal scheduling.
    control_priority: int | None = 50

    def __post_init__(self) -> None:
        if self.control_priority is not None and not 1 <= self.control_priority <= 99:
            raise ConfigError(f"control_priority: must be in 1..99 (SCHED_FIFO) or null, got {self.control_priority}")
        if not 0 < self.control_hz <= MAX_CONTROL_HZ:
            raise ConfigError(f"control_hz: must be in (0, {MAX_CONTROL_HZ:g}], got {self.control_hz}")
        if not 0 < self.action_rate_hz <= self.control_hz:
            raise ConfigError(f"action_rate_hz: must be in (0, control_hz = {self.control_hz:g}] so each action "
                              f"spans at least one control tick, got {self.action_rate_hz}")


@dataclass
class PlanSection:
    max_age_s: float = 1.5                  # hold when the plan's observation is older than this
    max_frame_age_s: float = 0.25           # the planner waits for a newer frame than this
    ensemble: bool = False                  # follow each action slot's mean over the plans (runtime/ensemble.py)
    # Move each plan's translations onto its trace lifted through the camera (runtime/trace_follow.py; needs the "ik"
    # actions): "never", "steered" (a trace given by steering only), "always" (the model's own trace too).
    follow_trace: str = "never"
    trace_camera_frame: str = "camera_optical"  # the colour camera's optical frame in the robot description
    trace_horizon_actions: int = 8          # the actions the trace's points span (evenly), as the model was trained
    # A calibrated camera fixed to the base, replacing trace_camera_frame: {"position_m": [x, y, z],
    # "quaternion_xyzw": [x, y, z, w]}, its optical frame in the actions' reference frame (a hand-eye calibration's).
    trace_camera_pose: dict | None = None

    def __post_init__(self) -> None:
        from edgeact.runtime.trace_follow import FOLLOW_TRACE, camera_pose_from_dict, check_trace_horizon

        for name in ("max_age_s", "max_frame_age_s"):
            value = getattr(self, name)
            if not (0 < value <= 600):
                raise ConfigError(f"{name}: must be in (0, 600] seconds, got {value}")
        if not isinstance(self.ensemble, bool):
            raise ConfigError(f"ensemble: must be true or false, got {self.ensemble!r}")
        if self.follow_trace not in FOLLOW_TRACE:
            raise ConfigError(f"follow_trace: {self.follow_trace!r} unknown; use one of {', '.join(FOLLOW_TRACE)}")
        if not (isinstance(self.trace_camera_frame, str) and self.trace_camera_frame):
            raise ConfigError(f"trace_camera_frame: name the camera's optical frame in the robot description "
                              f"(e.g. \"camera_optical\"), got {self.trace_camera_frame!r}")
        check_trace_horizon(self.trace_horizon_actions)
        if self.trace_camera_pose is not None:      # checked whether or not a trace is followed: a bad pose is named
            camera_pose_from_dict(self.trace_camera_pose)


@dataclass
class WatchdogSection:
    control_stall_s: float = 0.5            # the control thread silent this long: e-stop and end the run

    def __post_init__(self) -> None:
        if not (0 < self.control_stall_s <= 60):
            raise ConfigError(f"control_stall_s: must be in (0, 60] seconds, got {self.control_stall_s}")


@dataclass
class EstopSection:
    file: str | None = None                 # the e-stop latches when this file exists (`touch` it); a relative
                                            # path is beside the config file (RobotConfig.estop_path)
    key: str | None = None                  # ... or when this key is pressed: one character, or space/enter/esc/tab

    def __post_init__(self) -> None:
        if self.key is not None and len(self.key) != 1 and self.key not in ESTOP_KEYS:
            raise ConfigError(f"key: one character or one of {', '.join(ESTOP_KEYS)}, got {self.key!r}")
        if self.file == "":
            raise ConfigError("file: give a path (e.g. /tmp/edgeact.estop) or leave it out")

    @property
    def key_char(self) -> str | None:
        return None if self.key is None else ESTOP_KEYS.get(self.key, self.key)


@dataclass
class RobotConfig:
    robot: RobotSection
    camera: CameraConfig
    policy: PolicyConfig
    actions: MapperConfig
    instruction: str = ""
    rates: RatesSection = field(default_factory=RatesSection)
    limits: SafetyConfig = field(default_factory=SafetyConfig)
    plan: PlanSection = field(default_factory=PlanSection)
    watchdog: WatchdogSection = field(default_factory=WatchdogSection)
    estop: EstopSection = field(default_factory=EstopSection)
    source: str = "<dict>"                  # where it was read from (messages, relative paths)

    def __post_init__(self) -> None:
        if self.policy.type_name == "bundle" and not self.instruction.strip():
            # Found here, not by the first plan after torque is on: the model answers nothing without the task.
            raise ConfigError("instruction: empty, and the bundle policy answers an instruction; say what the robot "
                              "should do, e.g. \"instruction\": \"pick up the red block\"")
        motors = list(self.robot.motors)
        unknown = sorted(set(self.limits.joint_limits_rad) - set(motors))
        if unknown:
            raise ConfigError(f"limits.joint_limits_rad: joints {unknown} are not motors ({', '.join(motors)})")
        mapper = self.actions.make_mapper(motors)    # its joints must exist; raises with the fix
        wheels = [name for name, motor in self.robot.motors.items() if motor.mode == "velocity"]
        driven = sorted(set(mapper.joints) & set(wheels))
        if driven:
            # Found here, not by the control thread's first goal (a wheel takes velocities, not positions).
            raise ConfigError(f"actions: joints {driven} are wheels (mode 'velocity' in robot.motors); the action "
                              "mapper drives position joints: name position-mode motors in actions (its joints, "
                              "gripper_joint)")
        limited = sorted(set(self.limits.joint_limits_rad) & set(wheels))
        if limited:
            raise ConfigError(f"limits.joint_limits_rad: {limited} are wheels (mode 'velocity'): joint limits apply "
                              "to position joints; drop them (limits.max_velocity_rad_s bounds the wheels)")
        problem = safe_state_problem(self.limits.safe_state, bool(wheels), "robot")
        if problem:
            raise ConfigError(f"limits.safe_state: {problem}")
        ids: dict[int, str] = {}
        for name, motor in self.robot.motors.items():
            if ids.setdefault(motor.id, name) != name:
                scan = {"feetech": "`edgeact motors scan` lists the bus's", "dynamixel": "`edgeact motors scan` lists "
                        "the bus's", "damiao-can": "each motor's CAN id is its ESC_ID, set with Damiao's tool",
                        "sim": "the simulated bus answers on the ids robot.motors gives"}[self.robot.bus]
                raise ConfigError(f"robot.motors: '{ids[motor.id]}' and '{name}' both have id {motor.id}; give each "
                                  f"motor its own id ({scan})")
        self._ik_within_safety_limits()
        if self.plan.follow_trace != "never":
            from edgeact.runtime.trace_follow import check_follow_trace

            check_follow_trace(mapper, self.plan.trace_camera_frame, self.plan.trace_camera_pose)
        period_s = 1.0 / self.rates.control_hz
        checked = [("limits.watchdog_timeout_s", self.limits.watchdog_timeout_s),
                   ("watchdog.control_stall_s", self.watchdog.control_stall_s)]
        if self.robot.options.get("bus_watchdog_s"):    # the motors' own: set, it is a number (the bus checked)
            checked.append(("robot.options.bus_watchdog_s", self.robot.options["bus_watchdog_s"]))
        for where, value in checked:
            if value < 3 * period_s:
                raise ConfigError(f"{where}: {value} s is under three control periods ({3 * period_s:.3f} s at "
                                  f"{self.rates.control_hz:g} Hz); raise it or the watchdog trips on jitter")
        from edgeact.runtime.loop import LoopSettings, check_plan_max_age     # here: the loop's rules, one place

        supervise_s = LoopSettings.supervise_s
        if self.watchdog.control_stall_s <= supervise_s:
            raise ConfigError(f"watchdog.control_stall_s: {self.watchdog.control_stall_s:g} s is not over the run's "
                              f"supervisor period ({supervise_s:g} s, how often it looks for a stalled control "
                              f"thread): raise it above {supervise_s:g} s (e.g. {max(0.05, 3 * period_s):g})")
        self._check_limits_act()

        check_plan_max_age(self.plan.max_age_s, self.rates.action_rate_hz, "plan.max_age_s", "rates.action_rate_hz")

    def _ik_within_safety_limits(self) -> None:
        """The IK's joint limits (actions.joint_limits_rad) kept inside the safety layer's: IK planning a pose past them
        would be cut short by the guard every tick without a word (a session that narrows limits.joint_limits_rad
        narrows what IK plans). Limits that do not overlap are refused."""
        ik_limits = getattr(self.actions, "joint_limits_rad", None)
        if not ik_limits:
            return
        kept = {}
        for joint, (low, high) in ik_limits.items():
            safe_low, safe_high = self.limits.joint_limits_rad.get(joint, (-math.inf, math.inf))
            if max(low, safe_low) >= min(high, safe_high):
                raise ConfigError(f"actions.joint_limits_rad.{joint}: [{low:g}, {high:g}] does not overlap the safety "
                                  f"limits [{safe_low:g}, {safe_high:g}] (limits.joint_limits_rad.{joint}): IK could "
                                  "plan no pose the safety layer allows; make them overlap")
            kept[joint] = [max(low, safe_low), min(high, safe_high)]
        if kept != {j: list(v) for j, v in ik_limits.items()}:
            self.actions = dataclasses.replace(self.actions, joint_limits_rad=kept)

    def _check_limits_act(self) -> None:
        """Refuse limits that validate one by one but would never act: a velocity limit above what the motors can
        do, a step limit beyond what that velocity allows in a moment, a watchdog that waits for ever."""
        limits = self.limits
        model, top_speed = self.robot.fastest_motor()
        if limits.max_velocity_rad_s > top_speed:
            raise ConfigError(f"limits.max_velocity_rad_s: {limits.max_velocity_rad_s:g} rad/s is above the fastest "
                              f"motor of this robot ({model}: {top_speed:.2f} rad/s), so it would never limit anything; "
                              f"use at most {top_speed:.2f} (default 3)")
        span_s = max(MAX_STEP_SPAN_S, 1.0 / self.rates.control_hz)
        if limits.max_step_rad > limits.max_velocity_rad_s * span_s:
            raise ConfigError(f"limits.max_step_rad: {limits.max_step_rad:g} rad is more than "
                              f"limits.max_velocity_rad_s allows in {span_s:g} s "
                              f"({limits.max_velocity_rad_s * span_s:.3g} rad): after a pause the joints would jump "
                              f"that far in one command; use at most {limits.max_velocity_rad_s * span_s:.3g}")
        if limits.watchdog_timeout_s > MAX_WATCHDOG_TIMEOUT_S:
            raise ConfigError(f"limits.watchdog_timeout_s: {limits.watchdog_timeout_s:g} s is over "
                              f"{MAX_WATCHDOG_TIMEOUT_S:g} s: a stuck control loop would leave the robot (wheels "
                              "driving, joints at their last goal) that long before the safe state; use 0.1-0.5 s "
                              "(default 0.5)")

    @property
    def config_dir(self) -> Path | None:
        return config_dir_of(self.source)

    @property
    def input_files(self) -> dict[str, Path | None]:
        """The files a run reads (what -> path; None where there is none): no output may write over them."""
        return {"the robot config": None if self.source.startswith("<") else Path(self.source),
                "the e-stop file": self.estop_path}

    @property
    def estop_path(self) -> Path | None:
        """The e-stop file: a relative `estop.file` is beside the config file, like every relative path in it
        (the bundle's), whatever the working directory; a config not read from a file has only that to go by."""
        if self.estop.file is None:
            return None
        path = Path(self.estop.file).expanduser()
        if path.is_absolute():
            return path
        return (self.config_dir / path) if self.config_dir is not None else path.absolute()

    @property
    def camera_config(self) -> CameraConfig:
        """The camera to make: a recording's `path` with `~` expanded, and a relative one beside the config file, as
        estop.file is (a config not read from a file keeps the working directory's)."""
        from edgeact.drivers.cameras.playback import RecordingConfig

        camera = self.camera
        if not isinstance(camera, RecordingConfig):
            return camera
        path = Path(camera.path).expanduser()
        if not path.is_absolute() and self.config_dir is not None:
            path = self.config_dir / path
        return camera if str(path) == camera.path else dataclasses.replace(camera, path=str(path))

    def to_dict(self) -> dict[str, Any]:
        out = {name: _plain(getattr(self, name)) for name in ("robot", "camera", "policy", "actions", "instruction",
                                                              "rates", "limits", "plan", "watchdog", "estop")}
        out["camera"] = {"type": self.camera.type_name, **out["camera"]}
        out["policy"] = {"type": self.policy.type_name, **out["policy"]}
        out["actions"] = {"type": self.actions.type_name, **out["actions"]}
        return out


# -- loading ---------------------------------------------------------------------------------------

SECTIONS = {"robot": RobotSection, "rates": RatesSection, "limits": SafetyConfig, "plan": PlanSection,
            "watchdog": WatchdogSection, "estop": EstopSection}
TOP_LEVEL = ("robot", "camera", "policy", "actions", "instruction", "rates", "limits", "plan", "watchdog", "estop")


def load_robot_config(path: str | Path) -> RobotConfig:
    """Read and validate a .json or .toml robot config."""
    return robot_config_from_dict(read_config_dict(path), source=str(path))


def read_config_dict(path: str | Path) -> dict[str, Any]:
    """The plain sections of a .json or .toml robot config file, not yet validated (callers may edit them)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config {path} is a folder; give the robot config file (e.g. {path / 'robot.json'})")
    if not path.is_file():
        sample = path.with_suffix(".json") if path.name else Path("robot.json")    # --write-config writes JSON only
        raise ConfigError(f"config {path} not found; write a sample with `edgeact demo --write-config {sample}`")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config {path} is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as "
                          "UTF-8") from None
    suffix = path.suffix.lower()
    if suffix not in (".json", ".toml"):
        raise ConfigError(f"config {path}: use a .json or .toml file")
    try:
        import tomllib      # Python 3.11+; JetPack 6's Python 3.10 reads the JSON form
    except ImportError:
        if suffix == ".toml":
            raise ConfigError(f"config {path}: reading TOML needs Python 3.11 or newer; use a .json config") from None
    try:
        data = tomllib.loads(text) if suffix == ".toml" else json.loads(text)
    except ValueError as exc:       # JSONDecodeError and TOMLDecodeError are ValueErrors
        raise ConfigError(f"config {path} is not valid {suffix[1:].upper()}: {exc}") from None
    return data


def config_dir_of(source: str) -> Path | None:
    """The folder of the config file `source` (relative paths in it are beside it); None for "<dict>" and the like."""
    return None if source.startswith("<") else Path(source).resolve().parent


def robot_config_from_dict(data: Any, source: str = "<dict>") -> RobotConfig:
    try:
        if not isinstance(data, dict):
            raise ConfigError(f"the top level must be a table of sections ({', '.join(TOP_LEVEL)})")
        _check_keys(data, TOP_LEVEL, "")
        for name in ("robot", "camera", "policy", "actions"):
            if name not in data:
                raise ConfigError(f"{name}: missing section; see `edgeact demo --write-config sample.json`")
        kwargs: dict[str, Any] = {name: _build(cls, data[name], name) for name, cls in SECTIONS.items() if name in data}
        kwargs["camera"] = _build_typed(data["camera"], "camera", lambda t: _lookup(camera_types(), t, "camera"))
        kwargs["policy"] = _build_typed(data["policy"], "policy", policy_type)
        kwargs["actions"] = _build_typed(data["actions"], "actions", mapper_type).beside(config_dir_of(source))
        if "instruction" in data:
            kwargs["instruction"] = _typed(data["instruction"], str, "instruction")
        return RobotConfig(source=source, **kwargs)
    except ConfigError as exc:
        raise ConfigError(f"config {source}: {exc}") from None


def robot_section_from_dict(data: Any, where: str = "robot") -> RobotSection:
    """A config's robot section alone, validated as the whole config's loader does (e.g. to check a calibration
    before the rest of the config is written)."""
    return _build(RobotSection, data, where)


def _lookup(registry: dict[str, type], type_name: Any, where: str) -> type:
    if type_name not in registry:
        raise ConfigError(f"{where} type {type_name!r} unknown; use one of {', '.join(sorted(registry))}")
    return registry[type_name]


def _build_typed(data: Any, where: str, lookup) -> Any:
    if not isinstance(data, dict) or "type" not in data:
        raise ConfigError(f"{where}: must be a table with a \"type\" key")
    rest = dict(data)
    type_name = rest.pop("type")
    try:
        cls = lookup(type_name)
    except ConfigError as exc:
        raise ConfigError(f"{where}.type: {exc}") from None
    if where == "policy":
        _policy_keys_of_another_type(rest, cls, type_name)
    return _build(cls, rest, where)


def _policy_keys_of_another_type(data: dict, cls: type, type_name: str) -> None:
    """Keys of another policy type (a scripted policy given a bundle's `path`, or a policy switched to "bundle"
    with the scripted one's keys left in): say which type has them, and both ways out, not only that they are
    unknown."""
    from edgeact.runtime.policy import policy_types

    own = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - own)
    if not unknown:
        return
    for other, other_cls in sorted(policy_types().items()):
        theirs = {f.name for f in dataclasses.fields(other_cls) if f.init}
        if other != type_name and set(unknown) <= theirs:
            drop = sorted(set(data) - theirs)
            names = ', '.join(map(repr, unknown))
            raise ConfigError(f"policy: {names} {'is a field' if len(unknown) == 1 else 'are fields'} of policy type "
                              f"{other!r}, not of {type_name!r}: for a {type_name!r} policy drop {names}; for a "
                              f"{other!r} one set \"type\": \"{other}\""
                              + (f" and drop {', '.join(map(repr, drop))} (of type {type_name!r})" if drop else ""))


def _build(cls: type, data: Any, where: str) -> Any:
    """A dataclass from a dict: keys checked (with a suggestion), simple types checked, then constructed."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: must be a table of fields, got {type(data).__name__}")
    fields_ = {f.name: f for f in dataclasses.fields(cls) if f.init}
    _check_keys(data, fields_, where)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(value, hints[name], f"{where}.{name}")
    missing = [n for n, f in fields_.items() if n not in data and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{where}: missing field(s) {', '.join(missing)}")
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{where}.{exc}" if _names_field(str(exc), fields_) else f"{where}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _check_option_types(options: dict[str, Any], config_type: type) -> None:
    """Each bus option against its field's type ("no" is not false, "0.05" not a number, a pair not a triple),
    named as options.<field>; the bus config's own checks (ranges) follow when it is built."""
    hints = typing.get_type_hints(config_type)
    for name, value in options.items():
        if name in hints:
            _convert(value, hints[name], f"options.{name}")


def _names_field(message: str, fields_: dict) -> bool:
    """Does the message start with one of the fields ("control_hz: ...", "motors.x.model: ...")?"""
    head = message.split(":", 1)[0].split(" ", 1)[0]
    return head.split("[", 1)[0].split(".", 1)[0] in fields_


def _convert(value: Any, hint: Any, where: str) -> Any:
    """Check a value against a field's type; nested dataclasses (motors, calibration) are built here."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _convert(value, next(a for a in args if a is not type(None)), where)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: must be a table, got {type(value).__name__}")
        value_hint = args[1] if args else Any
        return {k: _convert(v, value_hint, f"{where}.{k}") for k, v in value.items()}
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: must be a list, got {type(value).__name__}")
        if origin is tuple and args and args[-1] is not Ellipsis:     # fixed length, e.g. (low, high)
            if len(value) != len(args):
                raise ConfigError(f"{where}: must be a list of {len(args)} values, got {value!r}")
            return tuple(_convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if hint in (int, float, str, bool):
        return _typed(value, hint, where)
    return value


def _typed(value: Any, kind: type, where: str) -> Any:
    # An int is a fine float (kept as written, so messages echo the user's value); a bool is no number.
    accepted = (int, float) if kind is float else kind
    ok = isinstance(value, accepted) and not (kind in (int, float) and isinstance(value, bool))
    if not ok:
        raise ConfigError(f"{where}: must be {_KIND_NAMES[kind]}, got {value!r}")
    if kind is float and not math.isfinite(value):
        raise ConfigError(f"{where}: must be a finite number, got {value}")
    return value


_KIND_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _check_keys(data: dict, known, where: str) -> None:
    for key in data:
        if key not in known:
            place = f"{where}: " if where else ""
            raise ConfigError(f"{place}unknown key {key!r}{_suggest(key, known)}; "
                              f"known keys: {', '.join(sorted(known))}")


def _suggest(word: Any, options) -> str:
    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _plain(value: Any) -> Any:
    """Dataclasses -> dicts, tuples -> lists, class-level fields dropped: what to_dict writes."""
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
