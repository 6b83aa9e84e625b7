"""Motor setup: find motors on a port (baud rates x ids) and flash one motor's id, baud rate and safe defaults.

No prompts here: the CLI (`edgeact motors setup`) asks the operator between `find_single_motor`
and `flash_motor`; these functions only talk to the bus and raise errors that say what to do.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from edgeact.drivers.motors.bus import MotorBusError, MotorProtocolError, MotorTimeoutError
from edgeact.drivers.motors.serial_bus import SerialMotorsBus
from edgeact.drivers.motors.serial_types import MotorConfigError, check_baud_rate, make_serial_bus, serial_bus_class

# After a broadcast ping, ROBOTIS' SDK (and LeRobot's Feetech driver after it) waits 3 ms per possible
# id, as motors may answer one after another in id order. Whether they queue or collide, the search
# below copes: several clean answers, or garbled ones, both lead to an id-by-id probe.
BROADCAST_SLOT_S = 0.003


@dataclass(frozen=True)
class FoundMotor:
    protocol: str
    motor_id: int
    baud_rate: int
    model_number: int

    @property
    def model(self) -> str | None:
        return serial_bus_class(self.protocol).model_name(self.model_number)


@dataclass
class ScanReport:
    port: str
    found: list[FoundMotor] = field(default_factory=list)
    collisions: list[tuple[str, int, int]] = field(default_factory=list)   # (protocol, baud rate, id)
    baud_rates_tried: dict[str, list[int]] = field(default_factory=dict)


def _broadcast_window_s(bus: SerialMotorsBus, ids: list[int], timeout_s: float) -> float:
    return timeout_s + BROADCAST_SLOT_S * (max(ids, default=bus.codec.max_id) + 1)


def _baud_rates(protocol: str, wanted: list[int] | None) -> list[int]:
    supported = list(serial_bus_class(protocol).CONFIG_TYPE.BAUD_RATES)
    return supported if wanted is None else [b for b in wanted if b in supported]


def scan_port(port: str, protocols: list[str] | tuple[str, ...] = ("feetech", "dynamixel"),
              baud_rates: list[int] | None = None, ids: list[int] | range | None = None,
              timeout_s: float = 0.02) -> ScanReport:
    """Every motor that answers on `port`, per protocol and baud rate; collisions are reported, not raised.

    A broadcast ping first tells which baud rates have anyone listening; only those are searched
    id by id (Protocol 2.0's ordered broadcast answers need no search unless they collide)."""
    if baud_rates is not None:
        unsupported = [b for b in baud_rates if not any(b in _baud_rates(p, None) for p in protocols)]
        if unsupported:
            raise MotorConfigError(f"baud rate {unsupported[0]} not supported by {' or '.join(protocols)} motors; use one of "
                                   + ", ".join(str(b) for b in sorted({b for p in protocols for b in _baud_rates(p, None)})))
    report = ScanReport(port)
    for protocol in protocols:
        bauds = _baud_rates(protocol, baud_rates)
        report.baud_rates_tried[protocol] = bauds
        if not bauds:
            continue
        with make_serial_bus(protocol, port, baud_rate=bauds[0], timeout_s=timeout_s, retries=0) as bus:
            id_list = list(range(bus.codec.max_id + 1) if ids is None else ids)
            for baud in bauds:
                bus.set_baud_rate(baud)
                answers, bad = bus.broadcast_ping(_broadcast_window_s(bus, id_list, timeout_s))
                if not answers and not bad:
                    continue
                if not bad and all(model is not None for model in answers.values()):
                    report.found += [FoundMotor(protocol, i, baud, m) for i, m in answers.items() if i in id_list]
                    continue
                # One clean answer without a model number (Feetech) names its motor; garbled means search.
                suspects = [i for i in answers if i in id_list] if not bad and len(answers) == 1 else id_list
                for motor_id in suspects:
                    try:
                        model = bus.probe(motor_id)
                    except MotorProtocolError:
                        report.collisions.append((protocol, baud, motor_id))
                        continue
                    if model is not None:
                        report.found.append(FoundMotor(protocol, motor_id, baud, model))
    return report


def find_single_motor(port: str, protocol: str, baud_rates: list[int] | None = None,
                      ids: list[int] | range | None = None, timeout_s: float = 0.05) -> FoundMotor:
    """The one motor connected to `port`; refuses when none, several, or colliding replies answer."""
    bauds = _baud_rates(protocol, baud_rates)
    if not bauds:
        raise MotorConfigError(f"none of the baud rates {baud_rates} is supported by {protocol} motors; use "
                               + ", ".join(map(str, _baud_rates(protocol, None))))
    hits: list[tuple[int, int]] = []
    with make_serial_bus(protocol, port, baud_rate=bauds[0], timeout_s=timeout_s) as bus:
        window_s = _broadcast_window_s(bus, list(range(bus.codec.max_id + 1) if ids is None else ids), timeout_s)
        for baud in bauds:
            bus.set_baud_rate(baud)
            answers, bad = bus.broadcast_ping(window_s)
            if bad:
                raise MotorProtocolError(
                    f"replies collide at {baud} baud on {port}: more than one motor is connected (or two share an "
                    "id); connect only the motor you want to set up")
            hits += [(baud, motor_id) for motor_id in answers]
        if not hits:
            raise MotorTimeoutError(
                f"no motor answers on {port} at any of {', '.join(map(str, bauds))} baud ({protocol}); check the power "
                f"supply and the cable, and that it is a {protocol} motor")
        if len(hits) > 1:
            raise MotorBusError(f"{len(hits)} motors answer on {port} ("
                                + ", ".join(f"id {i} at {b} baud" for b, i in hits)
                                + "); connect only the motor you want to set up")
        baud, motor_id = hits[0]
        bus.set_baud_rate(baud)
        model = bus.ping(motor_id)
        if model is None:
            raise MotorTimeoutError(f"the motor that answered the broadcast (id {motor_id} at {baud} baud) went silent; "
                                    "check its power and cable")
        bus.model_spec(model)   # refuse models whose table we do not know before anything is written
    return FoundMotor(protocol, motor_id, baud, model)


def check_new_settings(protocol: str, new_id: int, new_baud_rate: int) -> None:
    """Refuse an id or baud rate the protocol cannot take, before anyone connects a motor."""
    bus_type = serial_bus_class(protocol)
    check_baud_rate(protocol, new_baud_rate, bus_type.CONFIG_TYPE.BAUD_RATES)
    if not 0 <= new_id <= bus_type.CODEC.max_id:
        raise MotorConfigError(f"id {new_id} outside [0, {bus_type.CODEC.max_id}]; pick a free id in that range")


def flash_motor(port: str, found: FoundMotor, new_id: int, new_baud_rate: int, timeout_s: float = 0.05) -> FoundMotor:
    """Write safe defaults, then the new id and baud rate, to the single motor `found`; verify it answers."""
    check_new_settings(found.protocol, new_id, new_baud_rate)
    with make_serial_bus(found.protocol, port, baud_rate=found.baud_rate, timeout_s=timeout_s) as bus:
        spec = bus.model_spec(found.model_number)
        if new_baud_rate not in spec.baud_rates:      # the protocol's set, but not this model's (an XL330: no 4.5 M)
            raise MotorConfigError(f"{spec.name} does not run at {new_baud_rate} baud; use one of "
                                   f"{', '.join(map(str, spec.baud_rates))}")
        # The operator may have plugged in another motor since the search: check again before writing.
        answers, bad = bus.broadcast_ping(_broadcast_window_s(bus, [found.motor_id], timeout_s))
        if bad or list(answers) != [found.motor_id]:
            raise MotorBusError(f"expected only id {found.motor_id} on {port} at {found.baud_rate} baud, but "
                                f"{'replies collide' if bad else f'ids {sorted(answers)} answer'}; connect only the "
                                "motor you want to set up and run setup again")
        motor_id = found.motor_id
        bus.write_register(motor_id, "torque_enable", 0, spec)
        for register, value in spec.setup_defaults.items():
            bus.write_register(motor_id, register, value, spec)
        if new_id != motor_id:
            bus.write_register(motor_id, "id", new_id, spec)
        if new_baud_rate != found.baud_rate:
            bus.write_register(new_id, "baud_rate", spec.baud_rates[new_baud_rate], spec)  # moves the bus along
        model = bus.ping(new_id)
    if model != spec.model_number:
        raise MotorBusError(f"after flashing, nothing answers as {spec.name} id {new_id} at {new_baud_rate} baud; "
                            f"run `edgeact motors scan --port {port}` to see where the motor went")
    return FoundMotor(found.protocol, new_id, new_baud_rate, model)
