"""Motor buses: the interface, vendor protocols (Feetech, Dynamixel, Damiao), setup and safety."""
