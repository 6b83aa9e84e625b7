"""Shared Damiao test set-up: two simulated motors on a private virtual CAN channel."""
import uuid

import pytest

from edgeact.drivers.motors.bus import Motor
from edgeact.drivers.motors.damiao import DamiaoBusConfig
from edgeact.drivers.sim.damiao_motor import DamiaoSim, SimDamiaoMotor


def arm_motors():
    return {"shoulder": Motor(0x01, "dm4310"), "elbow": Motor(0x02, "dm4340")}


def cfg(channel, **kw):
    # generous per-try timeout: the sim thread shares two loaded cores; a real motor answers in < 1 ms
    return DamiaoBusConfig(interface="virtual", channel=channel, **{"timeout_s": 0.2, **kw})


@pytest.fixture
def channel():
    return f"dm-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def sim(channel):
    with DamiaoSim(channel, [SimDamiaoMotor(0x01, "dm4310"), SimDamiaoMotor(0x02, "dm4340")]) as s:
        yield s
    assert s.handler_errors == []
