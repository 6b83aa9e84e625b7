"""Build a quantization calibration set: frames from the synthetic camera or a RealSense recording, answered by the fp32 model.

Frames are preprocessed exactly as on the robot (runtime/preprocess.py), prompted with one of a
few instructions, and answered by the fp32 model with grammar-masked greedy decoding: by the
bundle's own ONNX stages in onnxruntime (the graphs the quantizer will change), or, given a
checkpoint, by the PyTorch reference. Held-out frames for the quantization report come from
the same generator under another seed stream and show the scene's odd frames, calibration its even
ones, so they never repeat a calibration picture; verification's poses are never drawn.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from edgeact.calibration.calibration_set import (CalibrationError, CalibrationSample, CalibrationSet,
                                                 config_meaning_sha256)

SYNTHETIC = "synthetic"
DEFAULT_INSTRUCTIONS = (
    "pick up the red block",
    "push the green block to the left",
    "move the blue box forward",
    "put the red block next to the green block",
    "touch the blue box",
    "move the gripper to the red block",
)
# The synthetic scene repeats every 4 s at 30 fps; vary the camera pose too, so frames differ.
_SCENE_FRAMES = 120
_PITCH_DEG = (25.0, 45.0)
_HEIGHT_M = (0.40, 0.60)
HELD_OUT_STREAM = 0x5EED      # seed-stream salt of report frames: disjoint from calibration frames' stream
# The camera pitches `edgeact verify` renders its held-out frames at (export/verify.py held_out_observations): the
# scene repeats every _SCENE_FRAMES frames, so only the pose keeps calibration's pictures from verification's.
VERIFY_PITCHES = (30.0, 35.0, 40.0)


def synthetic_frames(n: int, seed: int, width: int = 320, height: int = 240, *, held_out: bool = False
                     ) -> Iterator[tuple[int, np.ndarray, dict[str, Any]]]:
    """(frame number, RGB uint8, camera settings) of n seeded synthetic-camera views."""
    from edgeact.drivers.cameras.synthetic import SyntheticCamera, SyntheticConfig

    rng = np.random.default_rng([seed, HELD_OUT_STREAM] if held_out else [seed])
    for _ in range(n):
        pitch = round(float(rng.uniform(*_PITCH_DEG)), 2)
        if pitch in VERIFY_PITCHES:        # verification's poses are never drawn (its frames cover every scene)
            pitch += 0.01
        camera = {"width": width, "height": height, "pitch_deg": pitch,
                  "camera_height_m": round(float(rng.uniform(*_HEIGHT_M)), 3)}
        # calibration draws the scene's even frames, held-out report frames its odd ones: never the same picture
        frame = 2 * int(rng.integers(_SCENE_FRAMES // 2)) + (1 if held_out else 0)
        yield frame, SyntheticCamera(SyntheticConfig(**camera)).render(frame).color, {"type": SYNTHETIC, **camera}


def recording_frames(path: str | Path, n: int, seed: int, timeout_s: float = 10.0
                     ) -> Iterator[tuple[int, np.ndarray, dict[str, Any]]]:
    """n frames of a RealSense recording, drawn uniformly (reservoir sampling) and returned in recording order."""
    from edgeact.drivers.cameras.base import CameraError, CameraTimeoutError
    from edgeact.drivers.cameras.playback import RecordingConfig

    rng = np.random.default_rng(seed)
    kept: list[tuple[int, int, np.ndarray]] = []
    seen = [0]

    def keep(frame) -> None:          # on the capture thread, every frame in order
        i = seen[0]
        seen[0] += 1
        item = (i, frame.frame_number, np.array(frame.color))
        if i < n:
            kept.append(item)
        else:
            slot = int(rng.integers(i + 1))     # keeps each frame seen so far with probability n / (i + 1)
            if slot < n:
                kept[slot] = item

    camera = RecordingConfig(path=str(path), real_time=False, repeat=False).make_camera()
    camera.add_listener(keep)
    with camera:
        while True:
            try:
                camera.next_frame(timeout_s)
            except CameraTimeoutError:
                raise
            except CameraError as exc:
                if exc.__cause__ is not None:       # the capture failed; a clean end has no cause
                    raise
                break
    if not kept:
        raise CalibrationError(
            f"{path}: no color frame of the recording was paired with a depth frame (librealsense pairs frames "
            f"less than half a frame period apart); is it a RealSense recording of both streams, taken together? "
            f"Record one with a RealSense (`rs-record`, the RealSense Viewer) or write one from color and depth "
            f"images with edgeact.drivers.cameras.recording.write_recording")
    if seen[0] < n:
        raise CalibrationError(f"{path}: the recording holds {seen[0]} frames, fewer than the {n} samples asked for; "
                               f"ask for at most {seen[0]} (--samples {seen[0]}) or record a longer one")
    for _, number, color in sorted(kept, key=lambda item: item[0]):
        yield number, color, {"type": "recording", "path": str(path)}


def frames_from(source: str | Path, n: int, seed: int, width: int = 320, height: int = 240):
    if str(source) == SYNTHETIC:
        return synthetic_frames(n, seed, width, height)
    path = Path(source)
    if not path.is_file():
        raise CalibrationError(f"frames source {source}: no such recording; give a .db3/.bag file or 'synthetic'")
    return recording_frames(path, n, seed)


# ------------------------------------------------------------------------------------ answerers
class _BundleAnswerer:
    """The fp32 bundle's ONNX stages in onnxruntime."""

    def __init__(self, path: Path, threads: int | None) -> None:
        from edgeact.export.quant_decode import OrtBundle

        self.ort = OrtBundle(path, threads=threads)
        m = self.ort.bundle.manifest
        self.io = self.ort.io
        # model_weights_sha256: the whole model's weights (its checkpoint's digest, recorded at export), not only the
        # bundle's arrays; n_actions: how many actions each answer holds (the decoder positions the set covers)
        self.model = {"kind": "bundle", "source": str(path), "name": m.model.name,
                      "config_sha256": m.model.source_config_sha256,
                      "config_meaning_sha256": config_meaning_sha256(self.ort.bundle.config),
                      "model_weights_sha256": m.model.source_weights_sha256, "n_actions": self.io.grammar.n_actions}

    def answer(self, prompt_ids: np.ndarray, inputs) -> np.ndarray:
        return self.ort.decode(prompt_ids, inputs).token_ids


class _CheckpointAnswerer:
    """The PyTorch reference: full-model greedy decoding, every step masked to the grammar."""

    def __init__(self, path: Path, threads: int | None, n_actions: int = 1) -> None:
        import torch

        from edgeact.calibration.calibration_set import weights_sha256
        from edgeact.export.checkpoint import load_model
        from edgeact.runtime.grammar import AnswerGrammar
        from edgeact.runtime.preprocess import ImagePreprocessor
        from edgeact.runtime.token_layout import TokenLayout, load_tokenizer
        from edgeact.export.quant_decode import TextIO

        if threads:
            torch.set_num_threads(threads)
        self.model_, ckpt = load_model(path)
        tokenizer = load_tokenizer(ckpt.tokenizer_path)
        layout = TokenLayout.from_tokenizer(tokenizer, str(ckpt.tokenizer_path))
        self.io = TextIO(tokenizer, layout, ImagePreprocessor(ckpt.config, ckpt.preprocess_config),
                         AnswerGrammar(tokenizer, layout, n_actions=n_actions))
        digest = hashlib.sha256((path / "config.json").read_bytes()).hexdigest()
        self.model = {"kind": "checkpoint", "source": str(path), "name": path.name, "config_sha256": digest,
                      "config_meaning_sha256": config_meaning_sha256(ckpt.config),
                      "model_weights_sha256": weights_sha256("checkpoint", path), "n_actions": n_actions}

    def answer(self, prompt_ids: np.ndarray, inputs) -> np.ndarray:
        import torch

        from edgeact.export.generate import generate_greedy
        from edgeact.runtime.grammar_walk import MaskedGreedyConstraint, longest_answer

        t = lambda a: torch.from_numpy(np.array(a))  # noqa: E731 -- copies: preprocess buffers are reused
        result = generate_greedy(self.model_, t(prompt_ids)[None], t(inputs.images), t(inputs.image_masks),
                                 t(inputs.pooled_patches_idx), max_new_tokens=longest_answer(self.io.grammar),
                                 eos_token_id=self.io.layout.bos_id,
                                 allowed_token_fn=MaskedGreedyConstraint(self.io.grammar))
        return np.asarray(result.token_ids, np.int64)


def _answerer(source: Path, threads: int | None, n_actions: int | None = None):
    from edgeact.runtime.bundle import MANIFEST_NAME

    if (source / MANIFEST_NAME).is_file():
        answerer = _BundleAnswerer(source, threads)
        if n_actions is not None and n_actions != answerer.io.grammar.n_actions:
            raise CalibrationError(f"--chunk {n_actions}: {source} answers with {answerer.io.grammar.n_actions} "
                                   "actions per answer (its export's --chunk); drop --chunk for a bundle")
        return answerer
    if (source / "config.json").is_file():
        return _CheckpointAnswerer(source, threads, 1 if n_actions is None else n_actions)
    raise CalibrationError(f"{source}: neither a bundle ({MANIFEST_NAME}) nor a checkpoint (config.json); "
                           "export a bundle with `edgeact export` first")


def build_calibration_set(source: str | Path, out: str | Path | None, n_samples: int = 16, seed: int = 0,
                          frames_source: str | Path = SYNTHETIC, *, instructions: tuple[str, ...] = DEFAULT_INSTRUCTIONS,
                          width: int = 320, height: int = 240, threads: int | None = None, overwrite: bool = False,
                          on_sample: Callable[[int], None] | None = None, n_actions: int | None = None
                          ) -> CalibrationSet:
    """Frames -> preprocessed inputs + prompt -> fp32 answer, for n_samples; saved at `out` (None: not saved).

    n_actions: actions per answer of a checkpoint's answers (the bundle to quantize's chunk; default 1); a bundle
    answers with its own."""
    import datetime

    from edgeact.runtime.prompt import build_prompt_ids

    if n_samples < 1:
        raise CalibrationError(f"n_samples is {n_samples}; a calibration set needs at least 1 sample (16-64 usual)")
    if not instructions:
        raise CalibrationError("no instructions given; pass at least one")
    if str(frames_source) != SYNTHETIC and (width, height) != (320, 240):
        raise CalibrationError(f"width/height {width}x{height} size the synthetic camera's frames; a recording's "
                               f"frames ({frames_source}) keep their own size: leave out --width/--height")
    answerer = _answerer(Path(source), threads, n_actions)
    io = answerer.io
    rng = np.random.default_rng([seed, 1])
    samples = []
    for i, (frame, rgb, camera) in enumerate(frames_from(frames_source, n_samples, seed, width, height)):
        instruction = instructions[int(rng.integers(len(instructions)))]
        inputs = io.preprocessor(rgb)
        inputs = type(inputs)(*(np.array(a) for a in (inputs.images, inputs.image_masks, inputs.pooled_patches_idx)),
                              inputs.grids)   # own copies: the preprocessor reuses its buffers
        prompt = build_prompt_ids(io.tokenizer, io.layout, instruction, inputs)
        samples.append(CalibrationSample(
            instruction=instruction, frame=frame, grids=inputs.grids, images=inputs.images,
            image_masks=inputs.image_masks, pooled_patches_idx=inputs.pooled_patches_idx,
            prompt_ids=prompt, answer_ids=answerer.answer(prompt, inputs), camera=camera))
        if on_sample is not None:
            on_sample(i)
    source_info = ({"type": SYNTHETIC, "width": width, "height": height} if str(frames_source) == SYNTHETIC
                   else {"type": "recording", "path": str(frames_source)})
    calib = CalibrationSet(samples=tuple(samples), seed=seed, frames_source=source_info, model=answerer.model,
                           created_utc=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
    if out is not None:
        calib.save(out, overwrite=overwrite)
    return calib
