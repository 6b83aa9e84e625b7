"""Camera intrinsics, hand-eye, motor homing and ranges, action statistics, quantization calibration sets."""
