"""Export the depth tokenizer's encoder as the bundle stage "depth_tokenizer" and derive a bundle that carries it.

The stage takes the camera's aligned depth image as it comes, `depth_m` (height, width)
float32 metres of any size in DEPTH_HW_RANGE, and returns `codes` (100,) int64 in [0, 128).
Clipping, scaling and the resize to the tokenizer's square all happen inside the graph
(the same `normalize` the PyTorch model runs), so the runtime feeds the sensor's array and
nothing else has to agree on a preprocessing convention; TensorRT can run the whole stage.

A bundle is never modified: `add_depth_tokenizer` writes a NEW bundle, a checked copy of the
source (copy_bundle) plus the stage and the tokenizer's config. The source's other stages are
byte-identical, so its quantization record (the runtime reads graph optimization levels from
it) and its verification rows are carried over, except the added stage's, which one new row
replaces: the ONNX codes must agree with the PyTorch encoder's on held-out simulated depth images.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from edgeact.runtime.depth_tokenizer import INPUT, OUTPUT, STAGE
from edgeact.runtime.errors import BundleError

HEIGHT, WIDTH = "height", "width"
# Depth streams from 16 px up to 1920x1080; `opt` is a RealSense D435's 640x480.
DEPTH_HW_RANGE = {HEIGHT: (16, 480, 1080), WIDTH: (16, 640, 1920)}
CONFIG_REL = "stages/depth_tokenizer.json"      # the tokenizer's config and training report, inside the bundle
# Near-ties: onnxruntime's and torch's convolutions sum in different orders (~1e-6 apart), which can flip
# the nearest code of a latent that sits almost exactly between two codebook vectors.
CODE_AGREEMENT_GATE = 0.99
DEFAULT_CHECK_IMAGES = 16


def encoder_stage(model):
    """An nn.Module: depth_m (H, W) -> codes (grid*grid,) int64, the encoder half of `model` only."""
    from torch import nn

    class DepthEncoderStage(nn.Module):
        def __init__(self, vqvae):
            super().__init__()
            self.vqvae = vqvae

        def forward(self, depth_m):
            return self.vqvae.codes(depth_m)

    return DepthEncoderStage(model).eval()


def export_encoder_onnx(model, path: str | Path, opset: int = 19):
    """Trace the encoder to `path`; returns the onnx.ModelProto."""
    import onnx
    import torch

    example = torch.full((120, 160), 0.7)       # any size other than the square: height/width must stay symbolic
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")         # the tracer's deprecation and shape-read warnings
        torch.onnx.export(encoder_stage(model), (example,), str(path), input_names=[INPUT], output_names=[OUTPUT],
                          dynamic_axes={INPUT: {0: HEIGHT, 1: WIDTH}}, opset_version=opset, dynamo=False,
                          do_constant_folding=True)
    return onnx.load(str(path))


def stage_io(model) -> tuple[list, list]:
    from edgeact.runtime.stage_spec import TensorSpec

    c = model.config
    inputs = [TensorSpec(INPUT, "float32", (HEIGHT, WIDTH),
                         doc="aligned depth image, metres, 0 = no data; clipped and resized inside the graph")]
    outputs = [TensorSpec(OUTPUT, "int64", (c.n_codes,),
                          doc=f"{c.grid}x{c.grid} VQ codes in [0, {c.codebook_size}), row-major")]
    return inputs, outputs


def code_agreement(model, session, depth_m: np.ndarray) -> float:
    """Share of codes where the ONNX session and the PyTorch encoder agree, over images (N, H, W)."""
    import torch

    agree = total = 0
    with torch.no_grad():
        for image in np.asarray(depth_m, np.float32):
            ref = model.codes(torch.from_numpy(image)).numpy()
            got = session.run([OUTPUT], {INPUT: image})[0]
            agree += int((ref == got).sum())
            total += ref.size
    return agree / total


def add_depth_tokenizer(bundle_dir: str | Path, tokenizer_dir: str | Path, out_dir: str | Path, *,
                        check_images: np.ndarray | None = None, overwrite: bool = False) -> Path:
    """Write a new bundle at `out_dir`: `bundle_dir` (only read) plus the "depth_tokenizer" stage.

    `check_images` (N, H, W) metres: the held-out depth the stage is checked on; default: simulated
    images rendered with a seed the training never used.
    """
    import onnxruntime as ort

    from edgeact.export.bundle_writer import BundleWriter, copy_bundle, refuse_out_in_source
    from edgeact.export.depth_tokenizer import depth_codes_identity, load_depth_tokenizer, read_tokenizer_meta
    from edgeact.runtime.bundle import read_manifest

    refuse_out_in_source(bundle_dir, out_dir)
    check_trained_codes(read_manifest(bundle_dir).model.depth_codes, depth_codes_identity(tokenizer_dir), bundle_dir,
                        tokenizer_dir)
    model = load_depth_tokenizer(tokenizer_dir)
    meta = read_tokenizer_meta(tokenizer_dir)
    if model.config.n_codes != 100 or model.config.codebook_size != 128:
        raise BundleError(f"{tokenizer_dir}: a {model.config.grid}x{model.config.grid} grid of "
                          f"{model.config.codebook_size} codes; MolmoAct's answer needs 10x10 codes of 128")
    if check_images is None:
        check_images = _held_out_images(meta)
    with BundleWriter(out_dir, overwrite=overwrite) as writer:
        source = copy_bundle(bundle_dir, writer, skip_stages=[STAGE] if STAGE in _stages(bundle_dir) else [])
        path = writer.stage_path(STAGE)
        export_encoder_onnx(model, path)
        inputs, outputs = stage_io(model)
        c = model.config
        writer.add_onnx(STAGE, path, precision="fp32", inputs=inputs, outputs=outputs, dim_ranges=DEPTH_HW_RANGE,
                        doc=f"depth VQ-VAE encoder: depth_m clipped to [0, {c.max_depth_m}] m, /max, bilinear "
                            f"resize to {c.input_px}x{c.input_px}, convs to {c.grid}x{c.grid} latents, nearest of "
                            f"{c.codebook_size} codes; config in {CONFIG_REL}")
        writer.add_json(CONFIG_REL, meta)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        agreement = code_agreement(model, session, check_images)
        # The copied stages are byte-identical (copy_bundle checked every sha256): what was recorded about them holds.
        writer.quantization = source.quantization
        row = {"gate": "depth_tokenizer_codes", "passed": agreement >= CODE_AGREEMENT_GATE, "stage": STAGE,
               "agreement": round(agreement, 6), "min": CODE_AGREEMENT_GATE, "images": int(len(check_images))}
        old = source.verification
        # Every row of the stage goes, the reader's too: a source verified before its row was kept reads as failed
        # at `depth_tokenizer.unverified` (runtime/bundle_manifest.py), which the new row answers.
        kept = [r for r in old.results if r.get("gate") != row["gate"] and r.get("stage") != STAGE]
        writer.set_verification(merged_status(old.status, kept, row), dict(old.gates), kept + [row])
    return Path(out_dir)


def merged_status(old_status: str, kept: list[dict], row: dict) -> str:
    """The verdict once the source's rows `kept` (its old depth-tokenizer row dropped) and the new `row` are all
    there is: failed if any row fails; otherwise the source's own verdict, where a source that had failed only
    at the replaced row had passed (its stages verified: rows left) or not run (no rows left) before it."""
    if not row["passed"] or any(not r["passed"] for r in kept):
        return "failed"
    if old_status == "failed":
        return "passed" if kept else "not_run"
    return old_status


def check_trained_codes(trained: str, identity: str, bundle_dir, tokenizer_dir) -> None:
    """Refuse a stage whose codes are not those the bundle's model was trained on (ModelInfo.depth_codes): forced
    depth would feed it codes it never learned. Unrecorded ("", a checkpoint edgeact did not train) passes."""
    from edgeact.export.depth_tokenizer import POOLED_CODES, VQVAE_CODES_PREFIX

    if not trained or trained == identity:
        return
    if trained == POOLED_CODES:
        raise BundleError(f"{bundle_dir}: its model was trained on the pooled stand-in depth codes (train-reference "
                          f"without --depth-tokenizer), not on the codes of {tokenizer_dir}: forced depth from this "
                          f"stage would feed it codes it never learned; train the model with --depth-tokenizer "
                          f"{tokenizer_dir}, or run this bundle without a depth stage (its depth generated)")
    theirs = trained.removeprefix(VQVAE_CODES_PREFIX)[:12]
    raise BundleError(f"{bundle_dir}: its model was trained on another depth tokenizer's codes (weights sha256 "
                      f"{theirs}...), not on {tokenizer_dir}'s ({identity.removeprefix(VQVAE_CODES_PREFIX)[:12]}...): "
                      "forced depth from it would feed the model codes it never learned; give add-depth-tokenizer "
                      "the tokenizer its checkpoint was trained with (`--depth-tokenizer` of train-reference)")


def _stages(bundle_dir) -> set[str]:
    from edgeact.runtime.bundle import read_manifest

    return set(read_manifest(bundle_dir).stages)


def _held_out_images(meta: dict) -> np.ndarray:
    from edgeact.export.train_depth_tokenizer import HELD_OUT_SEED_OFFSET, sim_depth_images

    seed = int(((meta.get("training") or {}).get("options") or {}).get("seed", 0))
    # Another stream than training's and the training report's held-out set.
    return sim_depth_images(DEFAULT_CHECK_IMAGES, seed + 2 * HELD_OUT_SEED_OFFSET)

