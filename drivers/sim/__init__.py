"""Simulated devices that speak the real wire protocols (servo bus on a pty, Damiao motor on virtual CAN)."""
