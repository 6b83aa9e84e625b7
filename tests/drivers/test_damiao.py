"""Damiao MIT-mode driver: the frame codec by known vectors, and the real driver against the simulated motors."""
import math
import random
import struct
import threading
import time

import pytest

from edgeact.drivers.motors import damiao_table as dt
from edgeact.drivers.motors.bus import Motor, MotorBusError, MotorCalibration
from edgeact.drivers.motors.can_bus import CanConfig, CanLink
from edgeact.drivers.motors.damiao import DamiaoBus, DamiaoBusConfig
from edgeact.drivers.sim.damiao_motor import DamiaoSim, SimDamiaoMotor
from edgeact.runtime.errors import ConfigError
from tests.drivers.damiao_helpers import arm_motors, cfg, channel, sim  # noqa: F401 (fixtures)

pytestmark = pytest.mark.timeout(60)

DM4310 = dt.MODELS["dm4310"]


def wait_until(predicate, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return False


# -- codec: hand-computed vectors -----------------------------------------------------------

def test_float_to_uint_known_values():
    # u = int((x - min) / (max - min) * (2^bits - 1))
    assert dt.float_to_uint(0.0, -12.5, 12.5, 16) == 32767          # 0.5 * 65535 = 32767.5
    assert dt.float_to_uint(12.5, -12.5, 12.5, 16) == 65535
    assert dt.float_to_uint(-12.5, -12.5, 12.5, 16) == 0
    assert dt.float_to_uint(99.0, -12.5, 12.5, 16) == 65535          # clamped
    assert dt.float_to_uint(1.0, -12.5, 12.5, 16) == 35388           # 13.5 / 25 * 65535 = 35388.9
    assert dt.float_to_uint(250.0, 0.0, 500.0, 12) == 2047           # kp: 0.5 * 4095
    assert dt.float_to_uint(5.0, 0.0, 5.0, 12) == 4095               # kd at its top
    assert dt.uint_to_float(4095, -30.0, 30.0, 12) == 30.0


def test_pack_mit_known_frame():
    # p=1.0 -> 35388 = 0x8A3C; v=0 -> 2047 = 0x7FF; kp=10 -> 81 = 0x051; kd=1 -> 819 = 0x333; t=0 -> 0x7FF
    frame = dt.pack_mit(dt.MitCommand(1.0, 0.0, 10.0, 1.0, 0.0), DM4310)
    assert frame == bytes([0x8A, 0x3C, 0x7F, 0xF0, 0x51, 0x33, 0x37, 0xFF])


def test_unpack_feedback_known_frame():
    # status 1 (enabled), id 1; p=0x8000, v=0x800, t=0x7FF, T_mos 40 °C, T_rotor 35 °C
    fb = dt.unpack_feedback(bytes([0x11, 0x80, 0x00, 0x80, 0x07, 0xFF, 40, 35]), DM4310)
    assert (fb.motor_id_low, fb.status, fb.enabled, fb.error) == (1, 1, True, None)
    assert fb.position_rad == pytest.approx(-12.5 + 32768 / 65535 * 25.0, abs=1e-12)    # 0.000191 rad
    assert fb.velocity_rad_s == pytest.approx(-30.0 + 2048 / 4095 * 60.0, abs=1e-12)    # 0.00733 rad/s
    assert fb.torque_nm == pytest.approx(-10.0 + 2047 / 4095 * 20.0, abs=1e-12)         # -0.00244 Nm
    assert (fb.mos_temp_c, fb.rotor_temp_c) == (40, 35)
    assert dt.unpack_feedback(bytes([0xA3, 0, 0, 0, 0, 0, 0, 0]), DM4310).error == 0xA


def test_pack_unpack_round_trips_within_one_quantum():
    rng = random.Random(7)
    for name in ("dm4310", "dm8009", "dmh3510"):
        m = dt.MODELS[name]
        for _ in range(200):
            cmd = dt.MitCommand(rng.uniform(-m.p_max_rad, m.p_max_rad), rng.uniform(-m.v_max_rad_s, m.v_max_rad_s),
                                rng.uniform(0, 500), rng.uniform(0, 5), rng.uniform(-m.t_max_nm, m.t_max_nm))
            back = dt.unpack_mit(dt.pack_mit(cmd, m), m)
            assert back.position_rad == pytest.approx(cmd.position_rad, abs=2 * m.p_max_rad / 65535)
            assert back.velocity_rad_s == pytest.approx(cmd.velocity_rad_s, abs=2 * m.v_max_rad_s / 4095)
            assert back.kp == pytest.approx(cmd.kp, abs=500 / 4095)
            assert back.kd == pytest.approx(cmd.kd, abs=5 / 4095)
            assert back.torque_nm == pytest.approx(cmd.torque_nm, abs=2 * m.t_max_nm / 4095)
            fb = dt.DamiaoFeedback(0x5, 1, cmd.position_rad, cmd.velocity_rad_s, cmd.torque_nm, 50, 45)
            fb2 = dt.unpack_feedback(dt.pack_feedback(fb, m), m)
            assert (fb2.motor_id_low, fb2.status, fb2.mos_temp_c) == (5, 1, 50)
            assert fb2.position_rad == pytest.approx(fb.position_rad, abs=2 * m.p_max_rad / 65535)


def test_system_and_parameter_frames():
    assert dt.system_frame(dt.CMD_ENABLE) == bytes([0xFF] * 7 + [0xFC])
    assert dt.system_frame(dt.CMD_CLEAR_ERROR)[-1] == 0xFB
    assert dt.param_frame(0x102, dt.PARAM_READ, 7) == bytes([0x02, 0x01, 0x33, 0x07, 0, 0, 0, 0])
    kp_apr = dt.register("KP_APR")
    assert dt.encode_value(kp_apr, 30.0) == struct.pack("<f", 30.0)
    assert dt.encode_value(dt.register("TIMEOUT"), 1000) == bytes([0xE8, 0x03, 0, 0])
    assert dt.is_param_reply(dt.param_frame(1, dt.PARAM_WRITE, 9), 1)
    assert not dt.is_param_reply(bytes([0x11, 0x80, 0, 0, 0, 0, 0, 0]), 1)


def test_tables_name_models_registers_and_faults():
    assert (DM4310.p_max_rad, DM4310.v_max_rad_s, DM4310.t_max_nm) == (12.5, 30.0, 10.0)
    assert dt.MODELS["dm8009"].t_max_nm == 54.0
    assert dt.model_number_for_ranges(12.5, 45.0, 54.0) == 8009
    assert dt.model_number_for_ranges(1.0, 2.0, 3.0) == 0
    with pytest.raises(ConfigError, match="unknown Damiao model 'dm9999'; use one of dm3507"):
        dt.model("dm9999")
    with pytest.raises(ConfigError, match="unknown Damiao register 'PMAXX'"):
        dt.register("PMAXX")
    texts = [dt.status_text(c) for c in range(0x8, 0xF)]
    assert texts == ["overvoltage", "undervoltage", "overcurrent", "MOS overtemperature",
                     "coil overtemperature", "communication lost", "overload"]


# -- configuration ------------------------------------------------------------------------

@pytest.mark.parametrize("motors, kw, message", [
    ({"a": Motor(1, "dm4310")}, {"kp": 600.0}, "kp in 0..500"),
    ({"a": Motor(1, "dm4310")}, {"gains": {"b": (1.0, 0.1)}}, "gains names unknown motors"),
    ({"a": Motor(1, "dm9999")}, {}, "unknown Damiao model"),
    ({"a": Motor(1, "dm4310"), "b": Motor(0x11, "dm4310")}, {}, "must differ from every command id"),
    ({"a": Motor(1, "dm4310"), "b": Motor(0x21, "dm4310")}, {"feedback_ids": {"a": 0x30, "b": 0x30}},
     "cannot be told apart"),
    ({"a": Motor(1, "dm4310"), "b": Motor(1, "dm4340")}, {}, "share CAN id 0x01"),
])
def test_bad_config_is_refused_with_the_fix(motors, kw, message):
    with pytest.raises(ConfigError, match=message):
        DamiaoBus(motors, config=cfg("unused", **kw))


def test_model_table_follows_damiao_limit_param_and_names():
    # DM_CAN.py Limit_Param: DM4340 = [12.5, 8, 28], DM4340_48V = [12.5, 10, 28]
    assert [(dt.MODELS[n].p_max_rad, dt.MODELS[n].v_max_rad_s, dt.MODELS[n].t_max_nm) for n in ("dm4340", "dm4340p")] \
        == [(12.5, 8.0, 28.0), (12.5, 10.0, 28.0)]
    assert dt.model_number_for_ranges(12.5, 8.0, 28.0) == 4340 == dt.model_number_for_ranges(12.5, 10.0, 28.0)
    assert SimDamiaoMotor(0x02, "dm4340").registers["VMAX"] == 8.0     # the simulated factory motor follows the table
    # DM_CAN's names, as on the motors' labels: DM-H6215 and DM-G6220.
    assert {"dmh6215", "dmg6220"} <= set(dt.MODELS) and not {"dmg6215", "dmh6220"} & set(dt.MODELS)


@pytest.mark.parametrize("given, missing", [
    ({"drive_mode": 1}, "homing_offset, range_min, range_max"),
    ({"homing_offset": 32767}, "range_min, range_max"),
    ({"homing_offset": 32767, "range_max": 40000}, "range_min"),
])
def test_partial_calibration_is_refused_with_the_missing_fields(given, missing):
    with pytest.raises(ConfigError, match=rf"calibration of 'a' lacks {missing}: a Damiao calibration needs "
                                          r"homing_offset, range_min and range_max .* homing_offset: 32767 .*"
                                          "range_min: 0, range_max: 65535"):
        DamiaoBus({"a": Motor(1, "dm4310")}, {"a": MotorCalibration(**given)}, config=cfg("unused"))
    full = MotorCalibration(homing_offset=32767, range_min=0, range_max=65535)     # drive_mode may be left out
    bus = DamiaoBus({"a": Motor(1, "dm4310")}, {"a": full}, config=cfg("unused"))
    assert bus.position_limits_rad("a") == pytest.approx((-12.5, 12.5), abs=1e-3)


def test_bad_calibration_and_can_settings_are_refused():
    with pytest.raises(ConfigError, match="16-bit MIT field"):
        DamiaoBus({"a": Motor(1, "dm4310")}, {"a": MotorCalibration(0, 0, 70000)}, config=cfg("unused"))
    with pytest.raises(ConfigError, match="use 1000000"):
        DamiaoBusConfig(bitrate=115200)


def test_unavailable_can_interface_names_ip_link():
    link = CanLink(CanConfig(interface="socketcan", channel="nocan9"))
    with pytest.raises(MotorBusError, match=r"cannot open CAN channel 'nocan9'.*ip link set nocan9 up type can bitrate 1000000"):
        link.open()


# -- the driver against the simulated motors ---------------------------------------------------

def test_enable_command_feedback_moves_the_motor_to_the_goal(sim, channel):
    with DamiaoBus(arm_motors(), config=cfg(channel)) as bus:
        bus.enable_torque()
        assert sim.motor(1).enabled and sim.motor(2).enabled

        def reached():
            bus.send({"shoulder": 1.0, "elbow": -0.5})
            pos = bus.read_state().position_rad
            return abs(pos["shoulder"] - 1.0) < 0.01 and abs(pos["elbow"] + 0.5) < 0.01

        assert wait_until(reached)
        assert sim.motor(1).position_rad == pytest.approx(1.0, abs=0.01)
        state = bus.read_state(["elbow"])
        assert set(state.position_rad) == {"elbow"} and abs(state.velocity_rad_s["elbow"]) < 0.5
        fb = bus.last_feedback["shoulder"]
        assert fb.enabled and (fb.mos_temp_c, fb.rotor_temp_c) == (32, 30)
    assert not sim.motor(1).enabled and not sim.motor(2).enabled   # disconnect turned torque off


def test_send_clamps_to_model_and_calibrated_ranges_and_returns_what_was_sent(sim, channel):
    m = dt.MODELS["dm4340"]
    cal = {"elbow": MotorCalibration(homing_offset=32768, range_min=30000, range_max=36000)}
    with DamiaoBus(arm_motors(), cal, config=cfg(channel)) as bus:
        bus.enable_torque()
        sent = bus.send({"shoulder": 100.0, "elbow": 5.0})
        assert sent["shoulder"] == pytest.approx(12.5)                         # model's PMAX
        assert sent["elbow"] == pytest.approx((36000 - 32768) * m.rad_per_tick, abs=1e-3)   # calibrated max
        assert bus.position_limits_rad("elbow") == pytest.approx(((30000 - 32768) * m.rad_per_tick,
                                                                  (36000 - 32768) * m.rad_per_tick))
        assert sim.motor(2).command.position_rad == pytest.approx(sent["elbow"], abs=1e-3)
        sent = bus.send({"shoulder": 0.3})
        assert sent == {"shoulder": pytest.approx(0.3, abs=2 * 12.5 / 65535)}
        assert sim.motor(1).command.kp == pytest.approx(20.0, abs=0.2)       # the configured gains went out


def test_calibration_inverts_and_offsets_joint_angles(sim, channel):
    m = dt.MODELS["dm4310"]
    homing = dt.float_to_uint(0.5, -m.p_max_rad, m.p_max_rad, 16)
    cal = {"shoulder": MotorCalibration(homing_offset=homing, range_min=0, range_max=65535, drive_mode=1)}
    with sim.lock:
        sim.motor(1).position_rad = 0.8
    with DamiaoBus(arm_motors(), cal, config=cfg(channel)) as bus:
        joint = bus.read_state(["shoulder"]).position_rad["shoulder"]
        assert joint == pytest.approx(-(0.8 - 0.5), abs=1e-3)
        bus.enable_torque(["shoulder"])
        bus.send({"shoulder": 0.1})       # joint +0.1 = motor 0.5 - 0.1
        assert sim.motor(1).command.position_rad == pytest.approx(0.4, abs=1e-3)


def test_send_to_a_disabled_motor_says_enable_torque(sim, channel):
    with DamiaoBus(arm_motors(), config=cfg(channel)) as bus:
        with pytest.raises(MotorBusError, match=r"'elbow' \(CAN id 0x02\) is disabled .* enable_torque\(\['elbow'\]\)"):
            bus.send({"elbow": 0.2})


def test_velocity_motor_follows_send_velocity(channel):
    with DamiaoSim(channel, [SimDamiaoMotor(0x03, "dm4310", damping_nm_s_rad=0.0)]) as sim:   # v settles on v_des
        wheel = {"wheel": Motor(0x03, "dm4310", mode="velocity")}
        with DamiaoBus(wheel, config=cfg(channel, velocity_kd=0.5)) as bus:
            with pytest.raises(ConfigError, match="send_velocity"):
                bus.send({"wheel": 1.0})
            bus.enable_torque()
            assert bus.send_velocity({"wheel": 99.0}) == {"wheel": pytest.approx(30.0)}   # VMAX of the dm4310

            def spinning():
                bus.send_velocity({"wheel": 2.0})
                return abs(bus.read_state().velocity_rad_s["wheel"] - 2.0) < 0.1
            assert wait_until(spinning)
        assert sim.handler_errors == []


def test_parameters_read_write_save(sim, channel):
    with DamiaoBus(arm_motors(), config=cfg(channel)) as bus:
        assert bus.read("CTRL_MODE", "shoulder") == 1
        assert bus.sync_read("TMAX") == {"shoulder": 10.0, "elbow": 28.0}
        bus.write("TIMEOUT", "shoulder", 4000)
        bus.write("KP_APR", "elbow", 12.5)
        assert bus.read("TIMEOUT", "shoulder") == 4000 and isinstance(bus.read("TIMEOUT", "shoulder"), int)
        assert bus.read("KP_APR", "elbow") == 12.5
        bus.sync_write("MAX_SPD", {"shoulder": 7.0, "elbow": 8.0})
        assert bus.sync_read("MAX_SPD") == {"shoulder": 7.0, "elbow": 8.0}
        with pytest.raises(ConfigError, match="read-only"):
            bus.write("sw_ver", "shoulder", 1)
        with pytest.raises(ConfigError, match="unknown motors"):
            bus.read("TIMEOUT", "wrist")
        bus.enable_torque(["shoulder"])
        bus.save_params(["shoulder"])
        assert not sim.motor(1).enabled          # saved with torque off, as the vendor requires
        assert sim.motor(1).flash["TIMEOUT"] == 4000 and sim.motor(2).flash["KP_APR"] == 30.0


def test_scan_and_ping_report_model_numbers(sim, channel):
    with DamiaoBus(arm_motors(), config=cfg(channel, timeout_s=0.05, retries=1)) as bus:
        assert bus.scan(range(1, 4)) == {1: 4310, 2: 4340}
        assert bus.ping(2) == 4340
        assert bus.ping(9) is None


def test_set_zero_position_makes_the_present_angle_zero(sim, channel):
    with sim.lock:
        sim.motor(1).position_rad = 2.0
    with DamiaoBus(arm_motors(), config=cfg(channel)) as bus:
        assert bus.read_state(["shoulder"]).position_rad["shoulder"] == pytest.approx(2.0, abs=1e-3)
        bus.set_zero_position(["shoulder"])
        assert bus.read_state(["shoulder"]).position_rad["shoulder"] == pytest.approx(0.0, abs=1e-3)


@pytest.mark.parametrize("sim_motor, message", [
    (SimDamiaoMotor(0x01, "dm8009"), r"maps ±12.5 rad, ±45 rad/s, ±54 Nm but is configured as dm4310.*looks like a 8009"),
    (SimDamiaoMotor(0x01, "dm4310", feedback_id=0x00), r"answers on feedback id 0x0 but the bus expects 0x11"),
])
def test_connect_checks_ids_and_ranges(channel, sim_motor, message):
    with DamiaoSim(channel, [sim_motor]):
        bus = DamiaoBus({"shoulder": Motor(0x01, "dm4310")}, config=cfg(channel))
        with pytest.raises(ConfigError, match=message):
            bus.connect()
        assert not bus.is_connected


def test_connect_refuses_a_motor_outside_mit_mode(channel):
    motor = SimDamiaoMotor(0x01, "dm4310")
    motor.flash["CTRL_MODE"] = 2
    motor.power_cycle()
    with DamiaoSim(channel, [motor]):
        bus = DamiaoBus({"shoulder": Motor(0x01, "dm4310")}, config=cfg(channel))
        with pytest.raises(ConfigError, match=r"control mode 2.*write\('CTRL_MODE', 'shoulder', 1\)"):
            bus.connect()
        # the fix the message names works
        fixing = DamiaoBus({"shoulder": Motor(0x01, "dm4310")}, config=cfg(channel, check_on_connect=False))
        with fixing:
            fixing.write("CTRL_MODE", "shoulder", 1)
            fixing.save_params(["shoulder"])
        motor.power_cycle()
        with bus:
            assert bus.read("CTRL_MODE", "shoulder") == 1


def test_sim_leaves_no_thread_behind(channel):
    before = set(threading.enumerate())
    with DamiaoSim(channel, [SimDamiaoMotor(0x01)]) as sim:
        assert any(t.name == f"damiao-sim-{channel}" for t in threading.enumerate())
    assert set(threading.enumerate()) <= before
    assert not math.isnan(sim.motor(1).position_rad)


def test_send_velocity_refuses_position_joints(sim, channel):
    with DamiaoBus(arm_motors(), config=cfg(channel)) as bus:
        bus.enable_torque()
        with pytest.raises(ConfigError, match=r"motors \['shoulder'\] are joints \(position mode\); send_velocity would "
                                              "spin them past their range limits: command them with send"):
            bus.send_velocity({"shoulder": 3.0})
        with sim.lock:
            assert sim.motor(1).command.velocity_rad_s == 0.0      # nothing went out
