"""Fixtures for the serial servo simulator: buses on a pty that the real drivers talk to, cleaned up after each test."""
from __future__ import annotations

import contextlib
import os
import threading

import pytest

from edgeact.drivers.motors.bus import Motor, MotorBusError
from edgeact.drivers.motors.serial_bus import SerialMotorsBus, make_serial_bus
from edgeact.drivers.sim.servo_bus import SimServoBus

MODEL = {"feetech": "sts3215", "dynamixel": "xl430-w250"}
SIM_THREADS = ("sim-feetech-bus", "sim-dynamixel-bus", "base-watchdog")


def arm_motors(protocol: str, ids=(1, 2, 3)) -> dict[str, Motor]:
    """Position-mode joints named after an arm: 'shoulder' (id 1), 'elbow' (id 2), 'wrist' (id 3) ..."""
    names = ("shoulder", "elbow", "wrist", "wrist_roll", "gripper", "base")
    return {names[i]: Motor(motor_id, MODEL[protocol]) for i, motor_id in enumerate(ids)}


@pytest.fixture
def start_sim():
    """start_sim(protocol, ids, **options) -> a running SimServoBus, stopped after the test (no leaked threads/fds)."""
    started: list[SimServoBus] = []
    fds_before = len(os.listdir("/proc/self/fd"))

    def start(protocol: str = "feetech", ids=(1, 2, 3), **options) -> SimServoBus:
        sim = SimServoBus(protocol, ids=ids, **options).start()
        started.append(sim)
        return sim

    yield start
    for sim in started:
        sim.stop()
    leaked = [t.name for t in threading.enumerate() if t.name in SIM_THREADS]
    assert not leaked, f"threads outlived their test: {leaked}"
    if started:
        assert len(os.listdir("/proc/self/fd")) <= fds_before, "a simulator or driver leaked file descriptors"


@pytest.fixture
def bus_for(start_sim):  # after start_sim, so buses close before the simulators' leak check
    """bus_for(sim, motors, **config) -> an unconnected driver bus on the simulator's port, closed after the test."""
    made: list[SerialMotorsBus] = []

    def make(sim: SimServoBus, motors: dict[str, Motor] | None = None, calibration=None, **config) -> SerialMotorsBus:
        config.setdefault("timeout_s", 0.2)   # generous: the test machine is shared and loaded
        config.setdefault("baud_rate", sim.default_baud_rate)
        bus = make_serial_bus(sim.protocol, sim.port, motors, calibration, **config)
        made.append(bus)
        return bus

    yield make
    for bus in made:
        with contextlib.suppress(MotorBusError):  # a test that broke the port on purpose
            bus.disconnect(disable_torque=False)


@pytest.fixture(params=["feetech", "dynamixel"])
def serial_protocol(request) -> str:
    return request.param
