"""Motor buses (serial, CAN), cameras, and simulated devices speaking the real wire protocols."""
