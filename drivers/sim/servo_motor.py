"""One simulated serial servo: control-table memory from the vendor table, simple dynamics, injectable errors."""
from __future__ import annotations

import abc
import time
from dataclasses import dataclass

from edgeact.drivers.motors.serial_types import WATCHDOG_UNIT_S, ModelSpec, Register


@dataclass(frozen=True)
class ServoCommand:
    """What the control table asks of the shaft, in raw units."""

    torque_on: bool
    mode: str                       # "position", "velocity" (wheel mode), or "other" (a mode nobody models)
    # Feetech: clamped to the min/max position limit registers. Dynamixel: as written, since the wire refuses a
    # goal outside them in position mode (Data Limit Error).
    goal_position_ticks: float
    goal_velocity_ticks_s: float


class ServoPlant(abc.ABC):
    """Moves a servo's shaft instead of the built-in dynamics (a physics engine's joint, say)."""

    @abc.abstractmethod
    def command(self, command: ServoCommand) -> None:
        """The control table changed: follow this from now on."""

    @abc.abstractmethod
    def state_ticks(self) -> tuple[float, float]:
        """(position in ticks, velocity in ticks/s) of the shaft now."""


class SimServo:
    """A servo's control table as bytes, updated lazily: motion is integrated whenever it is touched.

    Position mode: with torque on the position walks to the goal at `max_speed_ticks_s`.
    Velocity (wheel) mode: with torque on the position integrates the goal velocity.
    Torque off: nothing moves. EEPROM registers survive `power_cycle()` when they were
    persisted (Feetech: only while the lock register is 0; Dynamixel: always). With a plant
    attached (`attach_plant`) the plant moves the shaft instead, and hears every write.
    `factory`: control-table values of this model that differ from the generic defaults.

    Feetech (`wrap_ticks` set): Present Position reads a single turn; a goal outside the position
    limit registers is clamped to them.
    Dynamixel X-series (`wrap_ticks` None), as ROBOTIS' e-Manual says:
    - Present Position counts whole turns, and is reset to within one turn (0..resolution-1) when
      torque comes on in position mode, when the operating mode becomes position mode, and at
      power-up (`power_cycle()`); the wire (DynamixelWire) refuses goals beyond the limit registers.
    - Shutdown(63): a hardware error whose bit is set there clears Torque Enable (the motor goes
      limp) and torque stays off until a reboot (`power_cycle()`; `inject_error(id, 0)` clears too).
    - Bus Watchdog (register 98, 1..127 in 20 ms): with torque on and no instruction heard
      (`heard()`) for that long, the servo stops and the register reads 0xFF until 0 is written.
    """

    def __init__(self, spec: ModelSpec, motor_id: int, baud_rate: int, *, position_ticks: int = 2048,
                 max_speed_ticks_s: float = 3000.0, wrap_ticks: int | None = None,
                 factory: dict[str, int] | None = None):
        self.spec = spec
        self.max_speed_ticks_s = max_speed_ticks_s
        self.wrap_ticks = wrap_ticks            # Feetech reports a single turn; Dynamixel counts turns
        self.counts_turns = wrap_ticks is None
        self.factory = dict(factory or {})
        self.hardware_error = 0                 # injected vendor error bits (0: healthy)
        self.powered = True                     # False: silent, as with a loose cable
        self.staged: tuple[int, bytes] | None = None   # a REG_WRITE waiting for ACTION
        self.plant: ServoPlant | None = None    # None: the built-in speed-limited dynamics
        self.memory = bytearray(256)            # the control table, filled by _factory_reset
        self._position = float(position_ticks)
        self._last_update_s = time.monotonic()
        self._last_instruction_s = self._last_update_s   # the Bus Watchdog's clock (Dynamixel)
        self._factory_reset(motor_id, baud_rate)
        self._saved = bytes(self.memory)        # what the EEPROM holds across a power cycle

    def _factory_reset(self, motor_id: int, baud_rate: int) -> None:
        self.memory = bytearray(256)
        self.staged = None
        defaults = {
            "model_number": self.spec.model_number, "firmware_version": 45, "firmware_major": 3, "id": motor_id,
            "baud_rate": self.spec.baud_rates[baud_rate], "return_delay_time": 250, "response_status_level": 1,
            "status_return_level": 2, "max_position_limit": 4095, "max_torque_limit": 1000, "torque_limit": 1000,
            "pwm_limit": 885, "velocity_limit": self.spec.max_velocity_raw, "max_voltage_limit": 140,
            "operating_mode": self.spec.operating_modes["position"], "lock": 1, "present_voltage": 120,
            "present_input_voltage": 120, "present_temperature": 30, **self.factory,
        }
        for name, value in defaults.items():
            if name in self.spec.registers:
                self.set(name, value)
        self._store_motion(0.0)
        self.set("goal_position", round(self._position))

    # -- registers ---------------------------------------------------------------------------
    def _reg(self, name: str) -> Register:
        return self.spec.register(name)

    def get(self, name: str) -> int:
        self.update()
        reg = self._reg(name)
        return reg.decode(self.memory[reg.address:reg.address + reg.size])

    def set(self, name: str, value: int) -> None:
        """Set a register directly (tests, defaults): no access rules, nothing persisted."""
        reg = self._reg(name)
        self.memory[reg.address:reg.address + reg.size] = reg.encode(value)

    def set_saved(self, name: str, value: int) -> None:
        """Set an EEPROM register as a set-up tool once did: it holds across power cycles."""
        self.set(name, value)
        reg = self._reg(name)
        saved = bytearray(self._saved)
        saved[reg.address:reg.address + reg.size] = self.memory[reg.address:reg.address + reg.size]
        self._saved = bytes(saved)

    @property
    def id(self) -> int:
        return self.memory[self._reg("id").address]

    @property
    def baud_rate(self) -> int:
        return self.spec.baud_for_code(self.memory[self._reg("baud_rate").address])

    @property
    def position_ticks(self) -> float:
        self.update()
        return self._position

    @position_ticks.setter
    def position_ticks(self, ticks: float) -> None:
        """Turn the shaft by hand (tests, demos)."""
        self.update()
        self._position = float(ticks)
        self._store_motion(0.0)

    def touches(self, address: int, size: int, eeprom: bool | None = None, read_only: bool | None = None) -> list[Register]:
        return [reg for reg in self.spec.registers.values()
                if reg.address < address + size and address < reg.address + reg.size
                and (eeprom is None or reg.eeprom == eeprom) and (read_only is None or reg.read_only == read_only)]

    def read_bytes(self, address: int, size: int) -> bytes:
        self.update()
        return bytes(self.memory[address:address + size])

    def write_bytes(self, address: int, data: bytes) -> None:
        self.update()  # motion so far happened under the old goal
        torque_was, mode_was = self._raw("torque_enable"), self._raw("operating_mode")
        self.memory[address:address + len(data)] = data
        position = self.spec.operating_modes["position"]
        if self._raw("operating_mode") == position and (
                (self._raw("torque_enable") and not torque_was) or mode_was != position):
            self._one_turn()
        persist = "lock" not in self.spec.registers or self.get("lock") == 0
        if persist and self.touches(address, len(data), eeprom=True):
            saved = bytearray(self._saved)
            saved[address:address + len(data)] = data
            self._saved = bytes(saved)
        if self.plant is not None:
            self.plant.command(self.command())

    def attach_plant(self, plant: ServoPlant) -> None:
        """Let `plant` move the shaft from now on; it gets the current command at once."""
        self.plant = plant
        plant.command(self.command())

    def power_cycle(self) -> None:
        """RAM back to defaults, EEPROM back to what was persisted, errors cleared; the shaft stays put
        (a Dynamixel's Present Position comes back within one turn)."""
        saved = self._saved
        self.update()
        self.hardware_error = 0
        self._one_turn()
        self._factory_reset(saved[self._reg("id").address], self.spec.baud_for_code(saved[self._reg("baud_rate").address]))
        for reg in self.spec.registers.values():
            if reg.eeprom:
                self.memory[reg.address:reg.address + reg.size] = saved[reg.address:reg.address + reg.size]
        if self.plant is not None:
            self.plant.command(self.command())

    # -- dynamics ----------------------------------------------------------------------------
    def command(self) -> ServoCommand:
        """The control table's command, read straight from memory (no update)."""
        torque = self.memory[self._reg("torque_enable").address]
        mode = self.memory[self._reg("operating_mode").address]
        goal = self._reg("goal_velocity")
        raw = goal.decode(self.memory[goal.address:goal.address + goal.size])
        velocity_ticks_s = raw * self.spec.velocity_unit_rad_s / self.spec.rad_per_tick
        goal = self._reg("goal_position")
        target = goal.decode(self.memory[goal.address:goal.address + goal.size])
        low, high = self._raw("min_position_limit"), self._raw("max_position_limit")
        if not self.counts_turns and low < high:   # Feetech clamps; a Dynamixel refused the write (DynamixelWire)
            target = min(max(target, low), high)
        names = {value: name for name, value in self.spec.operating_modes.items()}
        return ServoCommand(bool(torque), names.get(mode, "other"), float(target), velocity_ticks_s)

    # -- bus watchdog (Dynamixel) ----------------------------------------------------------------
    def heard(self) -> None:
        """An instruction packet addressed to this servo arrived: the watchdog's interval restarts."""
        self.update()  # a silence that already ran out trips before this packet counts
        self._last_instruction_s = time.monotonic()

    @property
    def watchdog_tripped(self) -> bool:
        return "bus_watchdog" in self.spec.registers and self.memory[self._reg("bus_watchdog").address] == 0xFF

    def _watchdog_deadline(self) -> float | None:
        if "bus_watchdog" not in self.spec.registers or not self.memory[self._reg("torque_enable").address]:
            return None
        units = self.memory[self._reg("bus_watchdog").address]
        if not 1 <= units <= 127:
            return None
        return max(self._last_update_s, self._last_instruction_s + units * WATCHDOG_UNIT_S)

    def _trip_watchdog(self) -> None:
        """Stop as the real motor does: wheels to 0, joints hold where they are, 98 reads 0xFF."""
        self.memory[self._reg("bus_watchdog").address] = 0xFF
        self.set("goal_velocity", 0)
        self.set("goal_position", round(self._position))
        if self.plant is not None:
            self.plant.command(self.command())

    # -- hardware errors and Shutdown(63) (Dynamixel) --------------------------------------------------
    def set_hardware_error(self, bits: int) -> None:
        """The motor detects `bits` now (0: healthy again); errors in Shutdown(63) turn its torque off."""
        self.update()                 # motion so far happened before the fault
        self.hardware_error = bits
        self._apply_shutdown()

    @property
    def shut_down(self) -> bool:
        """A hardware error selected by Shutdown(63) is present: torque is off and cannot come on until a reboot."""
        return "shutdown" in self.spec.registers and bool(self.hardware_error & self._raw("shutdown"))

    def _apply_shutdown(self) -> None:
        if self.shut_down and self._raw("torque_enable"):
            self.set("torque_enable", 0)      # output to 0 %: the motor goes limp
            if self.plant is not None:
                self.plant.command(self.command())

    def _one_turn(self) -> None:
        """Present Position back within one turn (Dynamixel); the shaft itself does not move.

        With a plant the reading is the plant's joint, which a scene keeps within one turn: left as it is."""
        if self.counts_turns and self.plant is None:
            self._position %= self.spec.resolution_ticks
            self._store_motion(0.0)

    def update(self) -> None:
        now = time.monotonic()
        self._apply_shutdown()        # an error set directly on `hardware_error` (tests) shuts down from here on
        deadline = self._watchdog_deadline()
        if deadline is not None and deadline <= now:
            self._advance(deadline)   # motion under the old goal until the moment the watchdog ran out
            self._trip_watchdog()
        self._advance(now)

    def _advance(self, now: float) -> None:
        dt, self._last_update_s = max(0.0, now - self._last_update_s), now
        if self.plant is not None:
            self._position, velocity_ticks_s = self.plant.state_ticks()
            if self.wrap_ticks:
                self._position %= self.wrap_ticks
            self._store_motion(velocity_ticks_s)
            return
        command = self.command()
        velocity_ticks_s = 0.0
        if command.torque_on and command.mode == "velocity":
            velocity_ticks_s = command.goal_velocity_ticks_s
            self._position += velocity_ticks_s * dt
        elif command.torque_on and command.mode == "position" and dt > 0:
            step = max(-self.max_speed_ticks_s * dt,
                       min(self.max_speed_ticks_s * dt, command.goal_position_ticks - self._position))
            self._position += step
            velocity_ticks_s = step / dt
        if self.wrap_ticks:
            self._position %= self.wrap_ticks
        self._store_motion(velocity_ticks_s)

    def _raw(self, name: str) -> int:
        """A register as memory holds it now (no update)."""
        reg = self._reg(name)
        return reg.decode(self.memory[reg.address:reg.address + reg.size])

    def _store_motion(self, velocity_ticks_s: float) -> None:
        ticks = round(self._position)
        self.set("present_position", ticks % self.wrap_ticks if self.wrap_ticks else ticks)
        velocity_raw = round(velocity_ticks_s * self.spec.rad_per_tick / self.spec.velocity_unit_rad_s)
        self.set("present_velocity", velocity_raw)
        self.set("moving", int(velocity_raw != 0))
        for name in ("status", "hardware_error_status"):
            if name in self.spec.registers:
                self.set(name, self.hardware_error)
