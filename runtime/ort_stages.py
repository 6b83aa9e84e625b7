"""Run a bundle's stages with plain onnxruntime sessions: the simple, obviously-right runner (batch 1, no torch).

Verification and tests compare it with the PyTorch reference; the robot's fast decode program
(I/O binding, sliced LM head, forced chunks) is checked against it in turn. It follows the
reference's `generate_greedy` step for step: one prefill of the prompt, then one decoder call
per token, logits from the bundle's `lm_head` array (only the allowed rows when a constraint
gives them), ties to the lowest id. Its KV cache is the runtime's (runtime/kv_cache.py) in host
memory: the past is fed as the cache's prefix views, and each call's new keys/values are copied in
(the fused form: its whole blocks, which the run updates in place).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from edgeact.runtime import stage_io as io
from edgeact.runtime.bundle import Bundle
from edgeact.runtime.errors import BundleError, EdgeactError
from edgeact.runtime.kv_cache import CacheLayout, KVCache, is_fused
from edgeact.runtime.ort_engine import apply_cpu_emulation, import_onnxruntime
from edgeact.runtime.stage_spec import numpy_dtype
from edgeact.runtime.vision_stages import VisionStages

AllowedTokenFn = Callable[[int, list[int]], "Sequence[int] | None"]


class OrtStage:
    """One stage of a bundle as an onnxruntime InferenceSession, fed and read by the manifest's tensor names."""

    def __init__(self, bundle: Bundle, name: str, *, threads: int | None = None,
                 providers: Sequence[str] = ("CPUExecutionProvider",)):
        ort = import_onnxruntime()

        self.spec = bundle.stage(name)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        if providers[0] == "CPUExecutionProvider":
            apply_cpu_emulation(options, self.spec)
        path = bundle.stage_path(name)
        try:
            self.session = ort.InferenceSession(str(path), options, providers=list(providers))
        except Exception as exc:  # onnxruntime raises its own Fail / InvalidGraph / NoSuchFile types
            raise BundleError(f"{path}: onnxruntime cannot load stage {name!r} ({exc}); re-export the bundle") from None
        self.output_names = [t.name for t in self.spec.outputs]
        self.input_dtypes = {t.name: numpy_dtype(t.dtype, f"stage {name!r} input {t.name!r}") for t in self.spec.inputs}
        # The fused decoder writes each present_key.L / present_value.L into the past array fed for it.
        self._in_place = {}
        if is_fused(self.spec):
            layers = range(CacheLayout.from_stage(self.spec).n_layers)
            self._in_place = {io.present_key(l): io.past_key(l) for l in layers} | \
                             {io.present_value(l): io.past_value(l) for l in layers}
        self._pasts = set(self._in_place.values())

    def run(self, feeds: dict[str, np.ndarray], *, release: bool = True) -> dict[str, np.ndarray]:
        """Outputs by name (new arrays; a fused decoder's presents are its past feeds, updated in place);
        `release` is the StageEngine interface's, with no effect here."""
        missing = sorted(set(self.input_dtypes) - set(feeds))
        if missing:
            raise EdgeactError(f"stage {self.spec.name!r}: inputs {missing} not given; it takes {list(self.input_dtypes)}")
        typed = {name: np.asarray(feeds[name], dtype=dtype) for name, dtype in self.input_dtypes.items()}
        if not self._in_place:
            return dict(zip(self.output_names, self.session.run(self.output_names, typed)))
        binding = self.session.io_binding()
        for name, array in typed.items():
            if name in self._pasts:
                if not (array.flags.c_contiguous and np.shares_memory(array, feeds[name])):
                    raise EdgeactError(f"stage {self.spec.name!r}: {name} must be a C-contiguous "
                                       f"{array.dtype} array: the fused decoder writes the chunk into it")
                binding.bind_input(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
            else:
                binding.bind_cpu_input(name, array)
        others = [name for name in self.output_names if name not in self._in_place]
        for name in others:             # first: get_outputs lists outputs in binding order
            binding.bind_output(name)
        for present, past in self._in_place.items():
            array = typed[past]
            binding.bind_output(present, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
        self.session.run_with_iobinding(binding)
        # Only the other outputs are fetched: copy_outputs_to_cpu would also copy every whole cache buffer.
        values = binding.get_outputs()
        return {**{name: values[i].numpy() for i, name in enumerate(others)},
                **{present: typed[past] for present, past in self._in_place.items()}}


class OrtStages:
    """A bundle's vision, connector and decoder stages, embedding table and LM head, run with onnxruntime (batch 1)."""

    def __init__(self, bundle: Bundle, *, threads: int | None = None,
                 providers: Sequence[str] = ("CPUExecutionProvider",)):
        # The ViT runs crop by crop, as on the robot (runtime/vision_stages.py).
        self.vision = VisionStages(OrtStage(bundle, io.VISION_STAGE, threads=threads, providers=providers),
                                   OrtStage(bundle, io.CONNECTOR_STAGE, threads=threads, providers=providers))
        self.decoder = OrtStage(bundle, io.DECODER_STAGE, threads=threads, providers=providers)
        self.embedding = bundle.weight(io.EMBEDDING_WEIGHT)
        self.lm_head = bundle.weight(io.LM_HEAD_WEIGHT)
        self.image_patch_id = bundle.config.image_patch_id
        self.cache = KVCache(CacheLayout.from_stage(self.decoder.spec))

    def image_features(self, images: np.ndarray, image_masks: np.ndarray, pooled_patches_idx: np.ndarray) -> np.ndarray:
        """(n_tokens, D): one feature per row of pooled_patches_idx, all-padding rows included."""
        return self.vision.run(images, image_masks, pooled_patches_idx)

    def embed(self, ids: Sequence[int] | np.ndarray, image_features: np.ndarray | None = None,
              pooled_patches_idx: np.ndarray | None = None) -> np.ndarray:
        """(T, D) float32: table rows, plus the i-th real pooled feature at the i-th <im_patch> (as MolmoAct adds them)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        embeds = self.embedding[ids].astype(np.float32)
        positions = np.flatnonzero(ids == self.image_patch_id)
        features = np.zeros((0, embeds.shape[1]), np.float32)
        if image_features is not None:
            features = image_features[(np.asarray(pooled_patches_idx) >= 0).any(-1)]
        if len(positions) != len(features):
            raise EdgeactError(f"{len(positions)} <im_patch> tokens for {len(features)} image features; build the "
                               "prompt and pooled_patches_idx from the same preprocessing")
        embeds[positions] += features.astype(np.float32)
        return embeds

    def decode(self, embeds: np.ndarray) -> np.ndarray:
        """Run a chunk (T, D) after the cached past; appends its keys/values; returns hidden states (T, D)."""
        n = embeds.shape[0]
        past = self.cache.reserve(n)    # before the call: a too-long chunk must not run at all
        feeds = {io.INPUTS_EMBEDS: embeds[None], io.POSITION_IDS: np.arange(past, past + n, dtype=np.int64)[None],
                 **self.cache.past_feeds(), **self.cache.layout.chunk_feeds(past, n)}
        out = self.decoder.run(feeds)
        if self.cache.layout.fused:
            self.cache.commit(n)        # written into the cache's blocks by the run
        else:
            self.cache.append(out, n)
        return out[io.HIDDEN_STATES][0].astype(np.float32)

    def logits(self, hidden: np.ndarray, ids: np.ndarray | None = None) -> np.ndarray:
        """Logits of hidden (..., D) for every vocabulary row, or only for `ids`."""
        head = self.lm_head if ids is None else self.lm_head[ids]
        return hidden.astype(np.float32) @ head.astype(np.float32).T

    def pick(self, hidden: np.ndarray, allowed: Sequence[int] | None) -> int:
        """Greedy choice for one (D,) hidden state, restricted to `allowed`; ties go to the lowest id."""
        if allowed is None:
            return int(np.argmax(self.logits(hidden)))
        ids = np.unique(np.asarray(allowed, dtype=np.int64))    # sorted: argmax's first maximum is the lowest id
        if ids.size == 0 or ids[0] < 0 or ids[-1] >= self.lm_head.shape[0]:
            raise EdgeactError(f"allowed ids {ids[:4].tolist()}... are empty or outside the LM head's "
                               f"{self.lm_head.shape[0]} rows")
        return int(ids[np.argmax(self.logits(hidden, ids))])

    def generate(self, prompt_ids: Sequence[int] | np.ndarray, images: np.ndarray | None, image_masks: np.ndarray | None,
                 pooled_patches_idx: np.ndarray | None, *, max_new_tokens: int,
                 eos_token_id: int | Sequence[int] | None = None, allowed_token_fn: AllowedTokenFn | None = None,
                 image_features: np.ndarray | None = None) -> list[int]:
        """Greedy decoding of one prompt, as the reference's generate_greedy (eos included when it ends)."""
        if max_new_tokens < 1:
            raise EdgeactError(f"max_new_tokens is {max_new_tokens}; ask for at least 1 token")
        stop = set() if eos_token_id is None else {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
        if image_features is None and images is not None:
            image_features = self.image_features(images, image_masks, pooled_patches_idx)
        self.cache.reset()
        hidden = self.decode(self.embed(prompt_ids, image_features, pooled_patches_idx))[-1]
        generated: list[int] = []
        while True:
            allowed = None if allowed_token_fn is None else allowed_token_fn(len(generated), list(generated))
            token = self.pick(hidden, allowed)
            generated.append(token)
            if token in stop or len(generated) >= max_new_tokens:
                return generated
            hidden = self.decode(self.embed([token]))[-1]
