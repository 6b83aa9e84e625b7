"""Cameras behind one interface: RealSense, recordings, synthetic."""
