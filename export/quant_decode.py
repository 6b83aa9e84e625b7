"""A bundle's stages in onnxruntime for the quantizer: its own grammar-masked answers, decoder feeds, decode speed.

The quantizer needs the fp32 bundle's answers (realistic calibration activations) and the
quantized bundle's answers (agreement, action error), both from the ONNX graphs as exported.
Decoding is runtime/ort_stages.py's reference runner (one decoder call per token, the walk of
MaskedGreedyConstraint); this module only adds what quantization asks of it: which grammar
step chose each token, decoder inputs with an explicit past, and a step-rate measurement.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeact.runtime import stage_io
from edgeact.runtime.bundle import Bundle, load_bundle
from edgeact.runtime.grammar import AnswerGrammar
from edgeact.runtime.grammar_walk import MaskedGreedyConstraint, longest_answer
from edgeact.runtime.preprocess import ImageInputs, ImagePreprocessor
from edgeact.runtime.preprocess_config import PreprocessConfig
from edgeact.runtime.token_layout import TokenLayout, load_tokenizer

Feeds = dict[str, np.ndarray]


@dataclass(frozen=True)
class DecodedAnswer:
    """One answer: its ids (end-of-text included) and, per id, the kind of grammar choice that made it."""
    token_ids: np.ndarray          # (n,) int64
    kinds: tuple[str | None, ...]  # "depth", "trace", "action" where chosen; None where the grammar forced it
    seconds: float

    def chosen_ids(self, kind: str) -> np.ndarray:
        return self.token_ids[np.array([k == kind for k in self.kinds], dtype=bool)]


@dataclass(frozen=True)
class TextIO:
    """What turns a camera frame and an instruction into stage inputs."""
    tokenizer: object
    layout: TokenLayout
    preprocessor: ImagePreprocessor
    grammar: AnswerGrammar


def bundle_text_io(bundle: Bundle) -> TextIO:
    tokenizer = load_tokenizer(bundle.path(bundle.manifest.tokenizer.file))
    layout = TokenLayout.from_tokenizer(tokenizer, str(bundle.path(bundle.manifest.tokenizer.file)))
    preprocess = PreprocessConfig.load(bundle.path(bundle.manifest.tokenizer.preprocessor_file), bundle.config)
    n_actions = int(bundle.manifest.grammar.get("n_actions", 1))
    return TextIO(tokenizer, layout, ImagePreprocessor(bundle.config, preprocess),
                  AnswerGrammar(tokenizer, layout, n_actions=n_actions))


def make_session(path: str | Path, threads: int | None = None):
    """A CPU session for a graph outside a bundle (calibration probes, quantized graphs before publishing)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3       # Q/DQ graphs log a warning per unfused pair
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OrtBundle:
    """OrtStages over a loaded bundle, plus its tokenizer, preprocessor and answer grammar."""

    def __init__(self, bundle: Bundle | str | Path, threads: int | None = None) -> None:
        from edgeact.runtime.ort_stages import OrtStages

        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle, allow_failed_verification=True)
        self.stages = OrtStages(self.bundle, threads=threads)
        self.io = bundle_text_io(self.bundle)
        self.max_answer_tokens = longest_answer(self.io.grammar)

    # ------------------------------------------------------------------ feeds
    def vision_feeds(self, inputs: ImageInputs) -> Feeds:
        return {stage_io.IMAGES: np.asarray(inputs.images, np.float32),
                stage_io.IMAGE_MASKS: np.asarray(inputs.image_masks, np.float32)}

    def connector_feeds(self, inputs: ImageInputs) -> Feeds:
        """This bundle's ViT features of every crop (computed crop by crop), with the pooling indices."""
        features = self.stages.vision.patch_features(inputs.images, inputs.image_masks)
        return {stage_io.PATCH_FEATURES: features.copy(),       # the buffer is overwritten by the next sample
                stage_io.POOLED_PATCHES_IDX: np.asarray(inputs.pooled_patches_idx, np.int64)}

    def sequence_embeddings(self, prompt_ids: np.ndarray, inputs: ImageInputs, answer_ids: np.ndarray) -> np.ndarray:
        """(1, T, D): prompt (with the image features) followed by answer tokens, as the decoder reads them."""
        features = self.stages.image_features(inputs.images, inputs.image_masks, inputs.pooled_patches_idx)
        ids = np.concatenate([np.asarray(prompt_ids, np.int64), np.asarray(answer_ids, np.int64)])
        return self.stages.embed(ids, features, inputs.pooled_patches_idx)[None]

    def decoder_feeds(self, embeds: np.ndarray, start: int, past: Feeds) -> Feeds:
        return {stage_io.INPUTS_EMBEDS: np.ascontiguousarray(embeds, np.float32),
                stage_io.POSITION_IDS: np.arange(start, start + embeds.shape[1], dtype=np.int64)[None], **past,
                **self.stages.cache.layout.chunk_feeds(start, embeds.shape[1])}

    def empty_past(self) -> Feeds:
        self.stages.cache.reset()
        return {k: np.array(v) for k, v in self.stages.cache.past_feeds().items()}

    def cache_after(self, embeds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Run embeds (1, T, D) from an empty cache: copies of the filled (keys, values), (layers, 1, T, K, h)."""
        self.stages.cache.reset()
        self.stages.decode(embeds[0])
        n = self.stages.cache.length
        return self.stages.cache.keys[:, :, :n].copy(), self.stages.cache.values[:, :, :n].copy()

    # ------------------------------------------------------------------ decoding
    def decode(self, prompt_ids: np.ndarray, inputs: ImageInputs) -> DecodedAnswer:
        """Grammar-masked greedy answer, one decoder call per token (the reference's way)."""
        start = time.perf_counter()
        ids = self.stages.generate(prompt_ids, inputs.images, inputs.image_masks, inputs.pooled_patches_idx,
                                   max_new_tokens=self.max_answer_tokens, eos_token_id=self.io.layout.bos_id,
                                   allowed_token_fn=MaskedGreedyConstraint(self.io.grammar))
        from edgeact.export.verify_compare import grammar_positions

        kinds = tuple(kind for _, kind in grammar_positions(self.io.grammar, ids))
        kinds += (None,) * (len(ids) - len(kinds))      # ids past a grammar violation (never, with the mask)
        return DecodedAnswer(np.asarray(ids, np.int64), kinds, time.perf_counter() - start)

    def forced_choices(self, prompt_ids: np.ndarray, inputs: ImageInputs, reference: DecodedAnswer) -> np.ndarray:
        """Teacher-forced: fed `reference`'s answer, this bundle's masked argmax at each of its choices (in order).

        One decoder pass over prompt + answer; position n_prompt - 1 + k predicts answer token k. Unlike a
        free-running answer, one flipped choice does not change what later choices are conditioned on.
        """
        from edgeact.export.verify_compare import grammar_positions

        ids = reference.token_ids
        self.stages.cache.reset()
        hidden = self.stages.decode(self.sequence_embeddings(prompt_ids, inputs, ids[:-1])[0])
        first = len(prompt_ids) - 1
        return np.array([self.stages.pick(hidden[first + k], allowed)
                         for k, (allowed, _) in enumerate(grammar_positions(self.io.grammar, ids)) if allowed is not None],
                        dtype=np.int64)

    def decode_steps_per_s(self, past_len: int, n_steps: int = 32, warmup: int = 4) -> float:
        """Single-token decoder steps per second at a cache of `past_len` positions, after a warm-up."""
        rng = np.random.default_rng(0)
        cache = self.stages.cache
        past_len = min(past_len, cache.max_seq - 1)
        cache.reset()
        cache.keys[:, :, :past_len] = rng.standard_normal(cache.keys[:, :, :past_len].shape)
        cache.values[:, :, :past_len] = rng.standard_normal(cache.values[:, :, :past_len].shape)
        cache.length = past_len
        feeds = self.decoder_feeds(self.stages.embedding[[self.io.layout.bos_id]][None].astype(np.float32),
                                   past_len, cache.past_feeds())
        for _ in range(warmup):
            self.stages.decoder.run(feeds)
        begin = time.perf_counter()
        for _ in range(n_steps):
            self.stages.decoder.run(feeds)
        rate = n_steps / (time.perf_counter() - begin)
        cache.reset()
        return rate
