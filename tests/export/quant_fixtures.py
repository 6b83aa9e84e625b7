"""One tiny checkpoint, its fp32 bundle and a small calibration set, built once per test session for the quantization tests."""
from __future__ import annotations

import hashlib
from pathlib import Path

_BUILT: dict[str, Path] = {}
CALIBRATION_SAMPLES = 2


def tiny_sources(tmp_path_factory) -> dict[str, Path]:
    """{'checkpoint', 'bundle', 'portable', 'calibration'}: -D variant, tiny size, seed 5; built on first use.

    'bundle' has the fused decoder (the CPU default), 'portable' the portable one TensorRT targets take."""
    if not _BUILT:
        from edgeact.calibration.calibration_set import build_calibration_set
        from edgeact.export.bundle_export import ExportOptions, export_bundle
        from edgeact.export.synthetic import make_checkpoint

        root = tmp_path_factory.mktemp("quant_sources")
        checkpoint = make_checkpoint("D", "tiny", seed=5, out_dir=root / "checkpoint")
        bundle = export_bundle(checkpoint, root / "fp32", ExportOptions(max_seq=1024))
        portable = export_bundle(checkpoint, root / "fp32-portable", ExportOptions(max_seq=1024, attention="portable"))
        calibration = root / "calibration"
        build_calibration_set(bundle, calibration, CALIBRATION_SAMPLES, seed=0, threads=1)
        _BUILT.update(checkpoint=checkpoint, bundle=bundle, portable=portable, calibration=calibration)
    return dict(_BUILT)


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under root, by relative path: proves a directory was not touched."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def with_depth_tokenizer(bundle_dir: Path, root: Path) -> Path:
    """`bundle_dir` plus a depth_tokenizer stage (a random encoder, checked on two random depth images), in root."""
    import numpy as np
    import torch

    from edgeact.export.depth_tokenizer import DepthTokenizerConfig, DepthVQVAE, save_depth_tokenizer
    from edgeact.export.depth_tokenizer_export import add_depth_tokenizer

    torch.manual_seed(0)
    tokenizer = save_depth_tokenizer(DepthVQVAE(DepthTokenizerConfig()), root / "depth_tokenizer", {"options": {}})
    images = np.random.default_rng(0).uniform(0.3, 1.8, (2, 60, 80)).astype(np.float32)
    return add_depth_tokenizer(bundle_dir, tokenizer, root / "with_depth", check_images=images)
