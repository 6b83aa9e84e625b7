"""Export toolchain: reference ARM in PyTorch, checkpoints, ONNX export, quantization, engines, bundles."""
