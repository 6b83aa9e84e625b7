"""A simulated servo bus whose motors are MuJoCo joints: the real driver on the pty moves the physics.

    with MujocoWorld() as world, MujocoServoBus(world, {"elbow_flex": ServoJoint(id=3)}) as sim:
        bus = FeetechMotorsBus(FeetechBusConfig(port=sim.port), {"elbow_flex": Motor(3, "sts3215")})

Everything on the wire is SimServoBus's (packets, checksums, faults, baud rates); only the shaft
differs: each motor's plant turns every write of its control table (torque, mode, goal position,
goal velocity) into a `world.drive(...)` and reads its present position and velocity from the
joint. Ticks and radians relate as the driver's calibration says, so a calibrated driver reads the
joint's own angle: joint rad = sign * (ticks - homing_offset) * rad_per_tick, sign -1 for drive_mode 1.

Modelled choice: with `hold_at_start` (the default) the servos come up with torque on, holding the
pose they stand in, so the arm stays in its ready pose until a driver takes over; a driver that
turns torque off lets gravity have the arm, as on the real robot.
"""
from __future__ import annotations

from dataclasses import dataclass

from edgeact.drivers.sim.mujoco_robot import MujocoWorld, MujocoWorldError
from edgeact.drivers.sim.servo_bus import SimServoBus
from edgeact.drivers.sim.servo_motor import ServoCommand, ServoPlant

CENTRE_TICKS = 2048


@dataclass(frozen=True)
class ServoJoint:
    """The motor behind one joint: its id and model on the bus, and how its ticks sit on the joint."""

    id: int
    model: str | None = None                # None: the bus family's default (sts3215 for Feetech)
    homing_offset: int = CENTRE_TICKS       # the raw reading at joint zero
    drive_mode: int = 0                     # 1: ticks grow as the joint angle shrinks
    mode: str = "position"                  # its operating mode, set up once as a robot's ("velocity": a wheel)


class MujocoJointPlant(ServoPlant):
    """One servo's shaft is a MuJoCo joint."""

    def __init__(self, world: MujocoWorld, joint: str, rad_per_tick: float, homing_offset: int, sign: float):
        self.world, self.joint = world, joint
        self.rad_per_tick, self.homing_offset, self.sign = rad_per_tick, homing_offset, sign

    def command(self, command: ServoCommand) -> None:
        if command.mode == "velocity":
            self.world.drive(self.joint, torque_on=command.torque_on, mode="velocity",
                             goal=self.sign * command.goal_velocity_ticks_s * self.rad_per_tick)
        else:
            # A mode the simulator does not model (PWM, step) holds no torque rather than guessing.
            torque_on = command.torque_on and command.mode == "position"
            goal_rad = self.sign * (command.goal_position_ticks - self.homing_offset) * self.rad_per_tick
            self.world.drive(self.joint, torque_on=torque_on, mode="position", goal=goal_rad)

    def state_ticks(self) -> tuple[float, float]:
        position_rad, velocity_rad_s = self.world.joint_state(self.joint)
        return (self.homing_offset + self.sign * position_rad / self.rad_per_tick,
                self.sign * velocity_rad_s / self.rad_per_tick)


class MujocoServoBus(SimServoBus):
    """SimServoBus with one motor per named servo joint of `world` (start/stop as SimServoBus)."""

    def __init__(self, world: MujocoWorld, joints: dict[str, ServoJoint], protocol: str = "feetech",
                 baud_rate: int = 1_000_000, hold_at_start: bool = True):
        super().__init__(protocol, ids=(), baud_rate=baud_rate)
        self.world = world
        unknown = sorted(set(joints) - set(world.servo_joints))
        if unknown:
            raise MujocoWorldError(f"joints {unknown} have no servo in {world.config.scene_path}; its servo joints "
                                   f"are {', '.join(world.servo_joints)}")
        for name, joint in joints.items():
            if joint.drive_mode not in (0, 1):
                raise MujocoWorldError(f"joint {name!r}: drive_mode must be 0 or 1, got {joint.drive_mode}")
            sign = -1.0 if joint.drive_mode else 1.0
            try:
                servo = self.add_motor(joint.id, joint.model)
            except ValueError as exc:
                raise MujocoWorldError(f"joint {name!r}: {exc}") from None
            plant = MujocoJointPlant(world, name, servo.spec.rad_per_tick, joint.homing_offset, sign)
            if joint.mode not in servo.spec.operating_modes:
                raise MujocoWorldError(f"joint {name!r}: mode {joint.mode!r} unknown; use one of "
                                       f"{', '.join(servo.spec.operating_modes)}")
            with self.lock:
                servo.set_saved("operating_mode", servo.spec.operating_modes[joint.mode])
                if hold_at_start:
                    servo.set("goal_position", round(plant.state_ticks()[0]))
                    servo.set("torque_enable", 1)
                servo.attach_plant(plant)
