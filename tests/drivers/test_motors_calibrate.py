"""`edgeact motors calibrate` against the simulated buses: an operator script moves the simulated joints between the
prompts, and the written config is loaded back and read through the real driver."""
import json
import math
import time
import uuid

import pytest

from edgeact.drivers.motors import damiao_table as dt
from edgeact.drivers.motors.calibrate import (MIN_TRAVEL_RAD, SERIAL_SEAM_FIX, CalibrationError, JointSweep, RawField,
                                              calibrations, sample_sweeps)
from edgeact.drivers.sim.servo_bus import SYNC_WRITE, WRITE
from edgeact.runtime.cli import main
from edgeact.runtime.robot_config import load_robot_config
from edgeact.runtime.sim_robot import sim_robot_config_dict

pytestmark = pytest.mark.timeout(60)

MODEL = {"feetech": "sts3215", "dynamixel": "xl430-w250"}
NAMES = ("shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper")
IDS = dict(zip(NAMES, range(1, 7)))
ZERO_TICKS = {"shoulder_pan": 1900, "shoulder_lift": 2300, "elbow_flex": 2048, "wrist_flex": 1500,
              "wrist_roll": 2600, "gripper": 2000}
SWEEP_TICKS = {"shoulder_pan": (1000, 3000), "shoulder_lift": (1400, 3100), "elbow_flex": (900, 3200),
               "wrist_flex": (700, 2500), "wrist_roll": (1600, 3500), "gripper": (1950, 2900)}
OLD_CALIBRATION = {n: {"homing_offset": 2048, "range_min": 1024, "range_max": 3072, "drive_mode": 0} for n in NAMES}
OLD_CALIBRATION["wrist_roll"]["drive_mode"] = 1      # kept: calibrate records zero and range, not the direction


class Operator:
    """stdin for the command: each readline first runs the next scripted action (moving the simulated joints,
    as a person would by hand) and then answers its line; at the end of the script, end of input."""

    def __init__(self, *actions):
        self.actions = list(actions)
        self.lines_read = 0

    def readline(self) -> str:
        if not self.actions:
            return ""
        self.lines_read += 1
        action = self.actions.pop(0)
        return action() if callable(action) else action


def serial_config(tmp_path, port, protocol="feetech", calibration=OLD_CALIBRATION):
    data = sim_robot_config_dict()
    data["robot"] = {"bus": protocol, "port": port, "motors": {n: {"id": IDS[n], "model": MODEL[protocol]}
                                                               for n in NAMES},
                     "calibration": json.loads(json.dumps(calibration)), "options": {"timeout_s": 0.2}}
    path = tmp_path / "robot.json"
    path.write_text(json.dumps(data, indent=2))
    return path


def set_ticks(sim, ticks: dict[str, float]) -> None:
    with sim.lock:
        for name, value in ticks.items():
            sim.servo(IDS[name]).position_ticks = value


def torque_on_writes(sim) -> list:
    """Every instruction the simulator heard that writes a non-zero torque_enable."""
    address = sim.servos[0].spec.register("torque_enable").address
    found = []
    for ins in list(sim.received):
        if ins.code == WRITE:
            at, data = sim.wire.address_data(ins.params)
            values = [data[address - at]] if at <= address < at + len(data) else []
        elif ins.code == SYNC_WRITE:
            at, size, rest = sim.wire.address_size(ins.params)
            values = [rest[i + 1 + address - at] for i in range(0, len(rest) - size, size + 1)] \
                if at <= address < at + size else []
        else:
            continue
        if any(values):
            found.append(ins)
    return found


def sweep(move, zero: dict, ends: dict, steps: int = 80, step_s: float = 0.005, hold_s: float = 0.2):
    """An operator action: every joint from its zero to its low end, to its high end and back, all at once;
    holding each end long enough for several samples. `move(dict)` turns the simulated shafts."""
    def act() -> str:
        path = [zero, {n: lo for n, (lo, _) in ends.items()}, {n: hi for n, (_, hi) in ends.items()}, zero]
        for start, end in zip(path, path[1:]):
            for i in range(1, steps + 1):
                move({n: start[n] + (end[n] - start[n]) * i / steps for n in ends})
                time.sleep(step_s)
            time.sleep(hold_s)
        return "\n"
    return act


def serial_session(sim, zero=ZERO_TICKS, ends=SWEEP_TICKS, confirm="y\n", torque_seen=None):
    def to_zero() -> str:
        set_ticks(sim, zero)
        return "\n"

    def swept() -> str:
        answer = sweep(lambda t: set_ticks(sim, t), zero, ends)()
        if torque_seen is not None:
            torque_seen.extend(sim.register(i, "torque_enable") for i in IDS.values())
        return answer
    return Operator(to_zero, swept, confirm)


# -- the whole command on the simulated serial buses -------------------------------------------------------------

def test_calibrate_writes_a_config_whose_zero_pose_reads_zero(serial_protocol, start_sim, tmp_path, monkeypatch,
                                                              capsys):
    sim = start_sim(serial_protocol, ids=IDS.values())
    path = serial_config(tmp_path, sim.port, serial_protocol)
    before_bytes = path.read_bytes()
    before = json.loads(before_bytes)
    torque_seen = []
    monkeypatch.setattr("sys.stdin", serial_session(sim, torque_seen=torque_seen))
    assert main(["motors", "calibrate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "Step 1: move the arm to its zero pose" in out and "Step 2: move every joint through its full range" in out
    flat = " ".join(out.split())
    assert f"the file as it was saved as {path}.bak. [y/N]" in flat         # the answers offered, the default No
    assert f"the config as it was: {path}.bak" in flat
    assert (tmp_path / "robot.json.bak").read_bytes() == before_bytes      # the old calibration can be put back
    assert torque_seen == [0] * 6 and torque_on_writes(sim) == []      # torque never came on

    written = json.loads(path.read_text())
    cal = written["robot"]["calibration"]
    for name in NAMES:                                                 # (b) the range covers the sweep, exactly
        assert cal[name] == {"homing_offset": ZERO_TICKS[name], "range_min": SWEEP_TICKS[name][0],
                             "range_max": SWEEP_TICKS[name][1], "drive_mode": OLD_CALIBRATION[name]["drive_mode"]}
    assert {k: v for k, v in written.items() if k != "robot"} == {k: v for k, v in before.items() if k != "robot"}
    assert list(written["robot"]) == list(before["robot"])             # its other content kept, in order

    config = load_robot_config(path)                                   # (a) through the real driver
    set_ticks(sim, ZERO_TICKS)
    with config.robot.make_bus() as bus:
        assert bus.read_state().position_rad == pytest.approx(dict.fromkeys(NAMES, 0.0), abs=1e-9)
        set_ticks(sim, {"elbow_flex": ZERO_TICKS["elbow_flex"] + 512, "wrist_roll": ZERO_TICKS["wrist_roll"] + 512})
        state = bus.read_state(["elbow_flex", "wrist_roll"]).position_rad
        assert state["elbow_flex"] == pytest.approx(math.pi / 4) and state["wrist_roll"] == pytest.approx(-math.pi / 4)
        low, high = bus.position_limits_rad("elbow_flex")
        tick = 2 * math.pi / 4096
        assert (low, high) == pytest.approx(((900 - 2048) * tick, (3200 - 2048) * tick))


def test_a_joint_that_did_not_move_is_refused_and_nothing_is_written(start_sim, tmp_path, monkeypatch, capsys):
    sim = start_sim("feetech", ids=IDS.values())
    path = serial_config(tmp_path, sim.port)
    before = path.read_bytes()
    still = ZERO_TICKS["elbow_flex"]
    monkeypatch.setattr("sys.stdin", serial_session(sim, ends={**SWEEP_TICKS, "elbow_flex": (still, still + 3)}))
    assert main(["motors", "calibrate", str(path)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "motor 'elbow_flex' did not move (travel 3 ticks, 0.3 degrees); move it through its range" in err
    assert "nothing was written" in err and "shoulder_pan" not in err
    assert path.read_bytes() == before


def test_a_sweep_across_the_encoder_seam_is_refused_with_the_fix(serial_protocol, start_sim, tmp_path, monkeypatch,
                                                                 capsys):
    # Feetech reports one turn (4200 reads 104: a jump); the Dynamixel simulator counts turns (4200 reads 4200).
    sim = start_sim(serial_protocol, ids=IDS.values())
    path = serial_config(tmp_path, sim.port, serial_protocol)
    before = path.read_bytes()
    zero = {**ZERO_TICKS, "wrist_roll": 3900}
    monkeypatch.setattr("sys.stdin", serial_session(sim, zero, {**SWEEP_TICKS, "wrist_roll": (3700, 4200)}))
    assert main(["motors", "calibrate", str(path)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "motor 'wrist_roll' crossed the encoder's seam (" in err
    assert ("jumped from raw" if serial_protocol == "feetech" else "outside one turn (0..4095)") in err
    assert f"Fix: {SERIAL_SEAM_FIX}, so that the whole travel reads inside 0..4095 (the middle of this travel " \
           "reads raw 3950 now; about 2048 is best), then calibrate again" in err
    assert path.read_bytes() == before


def test_motors_subset_keeps_the_other_entries(start_sim, tmp_path, monkeypatch):
    sim = start_sim("feetech", ids=IDS.values())
    path = serial_config(tmp_path, sim.port)
    monkeypatch.setattr("sys.stdin", serial_session(sim, ends={"elbow_flex": SWEEP_TICKS["elbow_flex"]}))
    assert main(["motors", "calibrate", str(path), "--motors", "elbow_flex"]) == 0
    cal = json.loads(path.read_text())["robot"]["calibration"]
    assert cal["elbow_flex"] == {"homing_offset": 2048, "range_min": 900, "range_max": 3200, "drive_mode": 0}
    assert {n: cal[n] for n in NAMES if n != "elbow_flex"} == {n: OLD_CALIBRATION[n] for n in NAMES
                                                              if n != "elbow_flex"}


def test_calibrates_a_config_with_no_calibration_yet(start_sim, tmp_path, monkeypatch):
    # The loader refuses a serial joint without an entry: calibrate is how it gets one, so it must not.
    sim = start_sim("feetech", ids=IDS.values())
    path = serial_config(tmp_path, sim.port, calibration={})
    monkeypatch.setattr("sys.stdin", serial_session(sim))
    assert main(["motors", "calibrate", str(path), "--yes"]) == 0
    assert set(load_robot_config(path).robot.calibration) == set(NAMES)


@pytest.mark.parametrize("subset", [[], ["--motors", "elbow_flex"]], ids=["all", "one limp joint of a holding arm"])
def test_an_arm_left_holding_is_warned_of_before_torque_goes_off(start_sim, tmp_path, monkeypatch, capsys, subset):
    """A run left the motors holding (robot.disable_torque_on_exit false): the arm drops the moment torque goes off,
    so the session says so and waits for Enter first; input that ends there leaves torque on. Torque goes off on
    every motor of the bus, so a --motors subset is warned of when any other motor holds."""
    sim = start_sim("feetech", ids=IDS.values())
    for name, i in IDS.items():
        sim.servo(i).set("torque_enable", int(name not in subset))
    path = serial_config(tmp_path, sim.port)
    before = path.read_text()
    monkeypatch.setattr("sys.stdin", Operator())        # no line at all: the operator is not there
    assert main(["motors", "calibrate", str(path), *subset]) == 2
    out = capsys.readouterr().out
    assert "Torque is ON on motors of the feetech bus" in out and "Hold the arm, then press Enter" in out
    assert ([sim.register(i, "torque_enable") for i in IDS.values()] ==
            [int(name not in subset) for name in IDS] and path.read_text() == before)


def test_a_subset_into_a_config_without_the_others_says_which_still_need_one(start_sim, tmp_path, monkeypatch,
                                                                              capsys):
    sim = start_sim("feetech", ids=IDS.values())
    path = serial_config(tmp_path, sim.port, calibration={})
    monkeypatch.setattr("sys.stdin", serial_session(sim, ends={"elbow_flex": SWEEP_TICKS["elbow_flex"]}))
    assert main(["motors", "calibrate", str(path), "--motors", "elbow_flex", "--yes"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    others = [n for n in NAMES if n != "elbow_flex"]
    assert f"{', '.join(others)} still need a calibration: `edgeact motors calibrate {path} --motors " \
           f"{','.join(others)}`; until then the config does not load" in out


def test_a_symlinked_config_is_written_through_its_link(start_sim, tmp_path, monkeypatch):
    sim = start_sim("feetech", ids=IDS.values())
    real = serial_config(tmp_path, sim.port).rename(tmp_path / "so100.json")
    link = tmp_path / "robot.json"
    link.symlink_to(real.name)
    monkeypatch.setattr("sys.stdin", serial_session(sim))
    assert main(["motors", "calibrate", str(link), "--yes"]) == 0
    assert link.is_symlink() and json.loads(real.read_text())["robot"]["calibration"]["elbow_flex"]["range_min"] == 900


def test_declining_the_confirmation_leaves_the_config_unchanged(start_sim, tmp_path, monkeypatch, capsys):
    sim = start_sim("feetech", ids=IDS.values())
    path = serial_config(tmp_path, sim.port)
    before = path.read_bytes()
    monkeypatch.setattr("sys.stdin", serial_session(sim, confirm="n\n"))
    assert main(["motors", "calibrate", str(path)]) == 1
    assert f"not written; {path} is unchanged" in capsys.readouterr().out
    assert path.read_bytes() == before


def test_out_writes_only_the_calibration_and_never_replaces_a_file_unasked(start_sim, tmp_path, monkeypatch, capsys):
    sim = start_sim("feetech", ids=IDS.values())
    path = serial_config(tmp_path, sim.port)
    before = path.read_bytes()
    out = tmp_path / "cal.json"
    monkeypatch.setattr("sys.stdin", serial_session(sim, confirm=None))
    assert main(["motors", "calibrate", str(path), "--out", str(out)]) == 0
    assert path.read_bytes() == before
    entries = json.loads(out.read_text())
    assert list(entries) == list(NAMES) and entries["gripper"]["range_max"] == 2900

    operator = Operator()
    monkeypatch.setattr("sys.stdin", operator)
    capsys.readouterr()
    assert main(["motors", "calibrate", str(path), "--out", str(out)]) == 2
    assert "already exists; pass --overwrite to replace it" in capsys.readouterr().err
    assert operator.lines_read == 0                     # refused before asking anyone to move anything


@pytest.mark.parametrize("edit, args, message", [
    (lambda d: d["robot"].update(bus="sim", port=""), [], 'robot.bus is "sim", the built-in simulator'),
    (None, ["--motors", "elbow,gripper"], "--motors: elbow not in robot.motors of"),
    (None, ["--out", "cal.toml"], "the calibration is written as JSON; give a .json path"),
])
def test_refusals_before_the_bus_opens(tmp_path, monkeypatch, capsys, edit, args, message):
    path = serial_config(tmp_path, "/dev/does-not-exist")
    if edit is not None:
        data = json.loads(path.read_text())
        edit(data)
        path.write_text(json.dumps(data))
    monkeypatch.setattr("sys.stdin", Operator())
    monkeypatch.chdir(tmp_path)
    assert main(["motors", "calibrate", str(path), *args]) == 2
    assert message in " ".join(capsys.readouterr().err.split())


@pytest.mark.parametrize("content, message", [
    ([{"robot": {}}], "the top level is a JSON list, not a table of sections (robot, camera"),
    ({"robot": [1, 2]}, "robot: must be a table, got list"),
])
def test_a_config_that_is_not_a_table_of_sections_is_refused(tmp_path, monkeypatch, capsys, content, message):
    path = tmp_path / "robot.json"
    path.write_text(json.dumps(content))
    monkeypatch.setattr("sys.stdin", Operator())
    assert main(["motors", "calibrate", str(path), "--yes"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"config {path}: {message}" in err and "Traceback" not in err


def test_a_toml_config_needs_out(tmp_path, monkeypatch, capsys):
    path = tmp_path / "robot.toml"
    path.write_text('[robot]\nbus = "feetech"\nport = "/dev/ttyACM0"\n')
    monkeypatch.setattr("sys.stdin", Operator())
    assert main(["motors", "calibrate", str(path)]) == 2
    assert "edgeact writes only JSON; pass --out calibration.json" in capsys.readouterr().err


# -- Damiao over (virtual) CAN: the 16-bit MIT position field ----------------------------------------------------

def damiao_arm(tmp_path):
    """(robot.json for six dm4310 on a fresh virtual CAN channel, the simulated motors to enter)."""
    from edgeact.drivers.sim.damiao_motor import DamiaoSim, SimDamiaoMotor

    channel = f"cal-{uuid.uuid4().hex[:8]}"
    data = sim_robot_config_dict()
    data["robot"] = {"bus": "damiao-can", "motors": {n: {"id": IDS[n], "model": "dm4310"} for n in NAMES},
                     "options": {"interface": "virtual", "channel": channel, "timeout_s": 0.2}}
    path = tmp_path / "robot.json"
    path.write_text(json.dumps(data))
    return path, DamiaoSim(channel, [SimDamiaoMotor(IDS[n], "dm4310") for n in NAMES])


def test_calibrate_damiao_zero_pose_reads_zero(tmp_path, monkeypatch):
    zero_rad = {n: 0.3 * i - 0.8 for i, n in enumerate(NAMES)}
    ends_rad = {n: (z - 0.9, z + 1.1) for n, z in zero_rad.items()}
    path, damiao = damiao_arm(tmp_path)
    with damiao as sim:
        def move(rad: dict) -> None:
            with sim.lock:
                for name, value in rad.items():
                    sim.motor(IDS[name]).position_rad, sim.motor(IDS[name]).velocity_rad_s = value, 0.0

        def to_zero() -> str:
            move(zero_rad)
            return "\n"
        monkeypatch.setattr("sys.stdin", Operator(to_zero, sweep(move, zero_rad, ends_rad)))
        assert main(["motors", "calibrate", str(path), "--yes"]) == 0
        assert not any(m.enabled for m in sim.motors.values())

        config = load_robot_config(path)
        m = dt.MODELS["dm4310"]
        field = lambda rad: dt.float_to_uint(rad, -m.p_max_rad, m.p_max_rad, 16)   # noqa: E731  (what the motor sends)
        for name in NAMES:
            cal = config.robot.calibration[name]
            assert (cal.homing_offset, cal.range_min, cal.range_max) == \
                (field(zero_rad[name]), field(ends_rad[name][0]), field(ends_rad[name][1]))
        move(zero_rad)
        with config.robot.make_bus() as bus:
            assert bus.read_state().position_rad == pytest.approx(dict.fromkeys(NAMES, 0.0), abs=1e-3)
            assert bus.position_limits_rad("elbow_flex") == pytest.approx((-0.9, 1.1), abs=1e-3)
    assert sim.handler_errors == []


def test_a_damiao_arm_left_holding_is_warned_of_before_torque_goes_off(tmp_path, monkeypatch, capsys):
    """Damiao motors have no torque register: whether they hold is read from their feedback frames, and an arm
    left enabled gets the same warning (and keeps holding when the operator is not there) as a serial one."""
    path, damiao = damiao_arm(tmp_path)
    with damiao as sim:
        with sim.lock:
            sim.motor(IDS["elbow_flex"]).enabled = True         # one motor a run left holding
        monkeypatch.setattr("sys.stdin", Operator())
        assert main(["motors", "calibrate", str(path), "--yes"]) == 2
        assert [m.enabled for m in sim.motors.values()] == [n == "elbow_flex" for n in NAMES]
    out = capsys.readouterr().out
    assert "Torque is ON on motors of the damiao-can bus" in out and "Torque is OFF" not in out
    assert sim.handler_errors == []


# -- the recorder alone -------------------------------------------------------------------------------------------

TURN = RawField(4096, 2 * math.pi / 4096, SERIAL_SEAM_FIX)


class ListReader:
    """A RawReader stand-in that replays readings of one motor 'j'."""

    def __init__(self, readings):
        self.readings = list(readings)

    def read(self):
        return {"j": self.readings.pop(0)}


def test_sampling_stops_when_told_and_keeps_the_extremes():
    sweeps = {"j": JointSweep(TURN, 2000)}
    reader = ListReader([2000, 1500, 1200, 1900, 2600, 2400, 9999])
    assert sample_sweeps(reader, sweeps, stop=lambda: not reader.readings[1:], period_s=0.001) == 6
    s = sweeps["j"]
    assert (s.low, s.current, s.high, s.travel_ticks) == (1200, 2400, 2600, 1400)
    assert calibrations(sweeps, {"j": 1})["j"].to_dict() == \
        {"homing_offset": 2000, "range_min": 1200, "range_max": 2600, "drive_mode": 1}


def test_recorder_names_every_refused_joint_at_once():
    moved_little = JointSweep(TURN, 2000)
    for raw in (2001, 2000 + round(MIN_TRAVEL_RAD / TURN.rad_per_tick) - 1):
        moved_little.add(raw)
    seam = JointSweep(TURN, 40)
    for raw in (10, 4090, 4000):
        seam.add(raw)
    with pytest.raises(CalibrationError) as err:
        calibrations({"a": moved_little, "b": seam, "c": JointSweep(TURN, 7)})
    text = str(err.value)
    assert "motor 'a' did not move" in text and "motor 'c' did not move (travel 0 ticks" in text
    assert "motor 'b' crossed the encoder's seam (jumped from raw 10 to 4090" in text
    assert "the middle of this travel reads raw 4068 now" in text       # the travel: 4000 .. 40 across the seam
