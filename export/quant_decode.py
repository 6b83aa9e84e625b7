"""Grammar-masked greedy decoding of a bundle's stages with onnxruntime on the CPU (calibration and quantization report).

The quantizer needs the fp32 bundle's own answers (realistic calibration activations) and the
quantized bundle's answers (agreement, action error), both from the ONNX graphs as exported,
not from the PyTorch reference. This is the minimal loop for that: vision stage, embedding
lookup plus image features at the `<im_patch>` positions, decoder stage over the prompt, then
the answer grammar walked step by step (runtime/grammar_walk.py): forced runs go in as one
multi-token chunk, choices take the argmax of the LM head's allowed rows only. With greedy
decoding that gives the tokens masked greedy decoding of the full model gives.
Where the time goes: one decoder call per choice (about 150 per answer), each reading every
weight once; the logits cost a (allowed ids x D) product, not (vocab x D).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from edgeact.runtime import stage_io
from edgeact.runtime.bundle import Bundle, StageSpec, dim_symbols, load_bundle
from edgeact.runtime.errors import BundleError
from edgeact.runtime.grammar import AnswerGrammar
from edgeact.runtime.grammar_walk import Choice, answer_steps
from edgeact.runtime.preprocess import ImageInputs, ImagePreprocessor
from edgeact.runtime.preprocess_config import PreprocessConfig
from edgeact.runtime.token_layout import TokenLayout, load_tokenizer

# Manifest `grammar` key the exporter may set for chunked checkpoints; one action otherwise.
N_ACTIONS_KEY = "n_actions"


@dataclass(frozen=True)
class DecodedAnswer:
    """One answer: its ids (end-of-text included) and, per id, the grammar step that produced it."""
    token_ids: np.ndarray          # (n,) int64
    kinds: tuple[str, ...]         # "text", "depth", "trace", "action", "end"
    chosen: np.ndarray             # (n,) bool: chosen from a closed set (True) or forced (False)
    seconds: float

    def chosen_ids(self, kind: str) -> np.ndarray:
        keep = np.array([k == kind for k in self.kinds], dtype=bool) & self.chosen
        return self.token_ids[keep]


@dataclass(frozen=True)
class TextIO:
    """What turns a camera frame and an instruction into stage inputs, read from a bundle."""
    tokenizer: object
    layout: TokenLayout
    preprocessor: ImagePreprocessor
    grammar: AnswerGrammar


def bundle_text_io(bundle: Bundle) -> TextIO:
    tokenizer = load_tokenizer(bundle.path(bundle.manifest.tokenizer.file))
    layout = TokenLayout.from_tokenizer(tokenizer, str(bundle.path(bundle.manifest.tokenizer.file)))
    preprocess = PreprocessConfig.load(bundle.path(bundle.manifest.tokenizer.preprocessor_file))
    n_actions = int(bundle.manifest.grammar.get(N_ACTIONS_KEY, 1))
    return TextIO(tokenizer, layout, ImagePreprocessor(bundle.config, preprocess),
                  AnswerGrammar(tokenizer, layout, n_actions=n_actions))


def session_options(threads: int | None = None, graph_optimization: str | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3           # quantized graphs warn about every unfused Q/DQ pair
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if graph_optimization is not None:
        levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                  "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                  "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                  "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
        options.graph_optimization_level = levels[graph_optimization]
    return options


def make_session(path: str | Path, threads: int | None = None, graph_optimization: str | None = None):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), session_options(threads, graph_optimization),
                                providers=["CPUExecutionProvider"])


def _zero_dims(spec_dims: Sequence[int | str]) -> tuple[int, ...]:
    """Shape of an empty cache tensor: past dims 0, batch 1, fixed dims as declared."""
    shape = []
    for dim in spec_dims:
        if isinstance(dim, int):
            shape.append(dim)
        elif stage_io.PAST_SEQ in dim_symbols(dim):
            shape.append(0)
        else:
            shape.append(1)
    return tuple(shape)


class OrtBundle:
    """onnxruntime sessions over a bundle's vision and decoder stages, with its embedding and LM head arrays."""

    def __init__(self, bundle: Bundle | str | Path, threads: int | None = None,
                 graph_optimization: dict[str, str] | None = None) -> None:
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle, allow_failed_verification=True)
        levels = graph_optimization or {}
        self.vision = make_session(self.bundle.stage_path(stage_io.VISION_STAGE), threads,
                                   levels.get(stage_io.VISION_STAGE))
        self.decoder = make_session(self.bundle.stage_path(stage_io.DECODER_STAGE), threads,
                                    levels.get(stage_io.DECODER_STAGE))
        self.io = bundle_text_io(self.bundle)
        self.embedding = np.asarray(self.bundle.weight(stage_io.EMBEDDING_WEIGHT), dtype=np.float32)
        weights = self.bundle.manifest.weights
        head = (self.bundle.weight(stage_io.LM_HEAD_WEIGHT) if stage_io.LM_HEAD_WEIGHT in weights
                else self.embedding[:self.bundle.config.llm_config.vocab_size])
        self.lm_head = np.asarray(head, dtype=np.float32)
        spec = self.bundle.stage(stage_io.DECODER_STAGE)
        self._vision_inputs = {i.name for i in self.vision.get_inputs()}
        self._past = [t for t in spec.inputs if t.name.startswith("past_")]
        self._empty_past = {t.name: np.zeros(_zero_dims(t.dims), np.float32) for t in self._past}
        self._past_axis = {t.name: _past_axis(spec, t.name) for t in self._past}
        self._outputs = [o.name for o in self.decoder.get_outputs()]

    # ------------------------------------------------------------------ stages
    def image_features(self, inputs: ImageInputs) -> np.ndarray:
        return self.vision.run([stage_io.IMAGE_FEATURES], self.vision_feeds(inputs))[0]

    def vision_feeds(self, inputs: ImageInputs) -> dict[str, np.ndarray]:
        feeds = {stage_io.IMAGES: np.asarray(inputs.images, np.float32),
                 stage_io.IMAGE_MASKS: np.asarray(inputs.image_masks, np.float32),
                 stage_io.POOLED_PATCHES_IDX: np.asarray(inputs.pooled_patches_idx, np.int64)}
        return {k: v for k, v in feeds.items() if k in self._vision_inputs}

    def prompt_embeddings(self, prompt_ids: np.ndarray, inputs: ImageInputs) -> np.ndarray:
        """(1, T, D): token embeddings plus the i-th real image feature at the i-th <im_patch>."""
        embeds = self.embedding[np.asarray(prompt_ids, np.int64)].copy()
        features = self.image_features(inputs)
        features = features[(np.asarray(inputs.pooled_patches_idx) >= 0).any(-1)]
        positions = np.flatnonzero(np.asarray(prompt_ids) == self.io.layout.im_patch_id)
        if len(positions) != len(features):
            raise BundleError(f"{len(positions)} <im_patch> tokens for {len(features)} image features; "
                              "the prompt was not built from these image inputs")
        embeds[positions] += features
        return embeds[None]

    def past_axis(self, name: str) -> int:
        """The sequence axis of cache input `name`."""
        return self._past_axis[name]

    def empty_past(self) -> dict[str, np.ndarray]:
        return dict(self._empty_past)

    def run_decoder(self, embeds: np.ndarray, start: int, past: dict[str, np.ndarray]
                    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """embeds (1, T, D) at positions start..start+T-1 -> (hidden (T, D), the cache including this chunk)."""
        seq = embeds.shape[1]
        feeds = {stage_io.INPUTS_EMBEDS: np.ascontiguousarray(embeds, np.float32),
                 stage_io.POSITION_IDS: np.arange(start, start + seq, dtype=np.int64)[None], **past}
        outs = dict(zip(self._outputs, self.decoder.run(self._outputs, feeds)))
        present = {}
        for t in self._past:
            new = outs[t.name.replace("past_", "new_", 1)]
            axis, old = self._past_axis[t.name], past[t.name]
            # The exporter may return the chunk's keys only (the runtime's preallocated cache) or past + chunk.
            present[t.name] = new if new.shape[axis] == old.shape[axis] + seq else np.concatenate([old, new], axis=axis)
        return outs[stage_io.HIDDEN_STATES][0], present

    def decoder_feeds(self, embeds: np.ndarray, start: int, past: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {stage_io.INPUTS_EMBEDS: np.ascontiguousarray(embeds, np.float32),
                stage_io.POSITION_IDS: np.arange(start, start + embeds.shape[1], dtype=np.int64)[None], **past}

    def embed_ids(self, ids: Sequence[int]) -> np.ndarray:
        return self.embedding[np.asarray(ids, np.int64)][None]

    # ------------------------------------------------------------------ decoding
    def decode(self, prompt_ids: np.ndarray, inputs: ImageInputs) -> DecodedAnswer:
        """Grammar-masked greedy answer for one prompt (forced runs prefilled as chunks)."""
        start_s = time.perf_counter()
        hidden, past = self.run_decoder(self.prompt_embeddings(prompt_ids, inputs), 0, self.empty_past())
        position = len(prompt_ids)
        ids: list[int] = []
        kinds: list[str] = []
        chosen: list[bool] = []
        steps = answer_steps(self.io.grammar)
        step = next(steps)
        while True:
            if isinstance(step, Choice):
                allowed = step.ids
                token = int(allowed[int(np.argmax(self.lm_head[allowed] @ hidden[-1]))])  # ties: lowest id
                new = [token]
                chosen.append(True)
            else:
                new = list(step.ids)
                chosen += [False] * len(new)
            ids += new
            kinds += [step.kind] * len(new)
            try:
                step = steps.send(new[0]) if isinstance(step, Choice) else next(steps)
            except StopIteration:
                break
            hidden, past = self.run_decoder(self.embed_ids(new), position, past)
            position += len(new)
        return DecodedAnswer(np.asarray(ids, np.int64), tuple(kinds), np.asarray(chosen, bool),
                             time.perf_counter() - start_s)

    def decode_steps_per_s(self, past_len: int, n_steps: int = 32, warmup: int = 4) -> float:
        """Single-token decoder steps per second at a cache of `past_len` positions (after a warm-up)."""
        rng = np.random.default_rng(0)
        past = {name: rng.standard_normal(_with_axis(a.shape, self._past_axis[name], past_len)).astype(np.float32)
                for name, a in self._empty_past.items()}
        embeds = self.embedding[[self.io.layout.bos_id]][None]
        feeds = self.decoder_feeds(embeds, past_len, past)
        for _ in range(warmup):
            self.decoder.run(self._outputs, feeds)
        start = time.perf_counter()
        for _ in range(n_steps):
            self.decoder.run(self._outputs, feeds)
        return n_steps / (time.perf_counter() - start)


def _past_axis(spec: StageSpec, name: str) -> int:
    for t in spec.inputs:
        if t.name == name:
            for axis, dim in enumerate(t.dims):
                if stage_io.PAST_SEQ in dim_symbols(dim):
                    return axis
    raise BundleError(f"stage {spec.name}: input {name!r} has no {stage_io.PAST_SEQ!r} dim; re-export the bundle")


def _with_axis(shape: tuple[int, ...], axis: int, size: int) -> tuple[int, ...]:
    return tuple(size if i == axis else s for i, s in enumerate(shape))
