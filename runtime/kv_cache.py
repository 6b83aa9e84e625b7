"""The decoder's KV cache: one block per layer and kind, sized from the manifest and allocated once at load.

Two layouts, one per form of the decoder stage (runtime/stage_io.py):

Fused form: (n_layers, 2, 1, K, max_seq, h), head-major as onnxruntime's GroupQueryAttention keeps
it. Each (layer, kind) block is bound whole as both `past_key.L` and `present_key.L`, once, and the
node writes a chunk's entries into it in place: a step binds only the chunk's tensors, and two
length inputs (`chunk_feeds`) say where the chunk goes.

Portable form: (n_layers, 2 [key, value], 1, max_seq, K, h), sequence-major as the decoder stage's
`past_key.L` / `new_key.L` tensors are. With batch 1 the filled part of one (layer, kind) block
is a contiguous prefix, bound as the past without a copy, and a chunk's new entries land
right after it: the backends bind `new_key.L` straight into `pointer(L, KEY, length)`, so the
cache is never copied or grown. Capacity is the stage's `dim_ranges["seq"].max` (the exporter's
max_seq), never a literal. The storage is host memory (numpy) unless a backend passes an
allocator for device memory (CUDA), in which case only pointers are handed out. A host cache
also serves the plain onnxruntime runner (runtime/ort_stages.py), which feeds the prefixes by name
and copies each call's new keys/values in (`past_feeds`, `append`); with the fused form it feeds the
whole blocks, which the run updates in place. `keys` / `values` / `prefix` are sequence-major views
in either layout.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from edgeact.runtime import stage_io as io
from edgeact.runtime.errors import BundleError, EdgeactError, SequenceTooLongError
from edgeact.runtime.stage_spec import StageSpec

KEY, VALUE = 0, 1
_NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16}

# allocate(nbytes) -> (owner kept alive by the cache, base address of the block)
DeviceAllocator = Callable[[int], tuple[Any, int]]


@dataclass(frozen=True)
class CacheLayout:
    """Sizes of the decoder's cache and I/O, read off the decoder stage's manifest entry."""
    n_layers: int
    max_seq: int
    kv_heads: int
    head_dim: int
    hidden_size: int
    dtype: str                 # element type of past_key / new_key ("float32" or "float16")
    fused: bool = False        # the decoder's fused form: head-major blocks bound whole as past and present

    def __post_init__(self) -> None:
        if min(self.n_layers, self.max_seq, self.kv_heads, self.head_dim, self.hidden_size) < 1:
            raise BundleError(f"decoder cache layout {self} has an empty dimension; re-export the bundle")
        if self.dtype not in _NUMPY_DTYPES:
            raise BundleError(f"decoder cache dtype {self.dtype!r} unsupported; the runtime keeps float32 or float16 caches")

    @property
    def numpy_dtype(self):
        return _NUMPY_DTYPES[self.dtype]

    @property
    def row_bytes(self) -> int:
        """Bytes of one position of one layer's keys (K*h elements)."""
        return self.kv_heads * self.head_dim * np.dtype(self.numpy_dtype).itemsize

    @property
    def nbytes(self) -> int:
        return 2 * self.n_layers * self.max_seq * self.row_bytes

    @property
    def block_shape(self) -> tuple[int, int, int, int]:
        """Shape of one (layer, kind) block as stored: (1, K, max_seq, h) fused, (1, max_seq, K, h) portable."""
        if self.fused:
            return (1, self.kv_heads, self.max_seq, self.head_dim)
        return (1, self.max_seq, self.kv_heads, self.head_dim)

    def chunk_feeds(self, past: int, n: int) -> dict[str, np.ndarray]:
        """The fused form's seqlens_k / total_sequence_length for n positions after `past`; {} for the portable form."""
        if not self.fused:
            return {}
        return {io.SEQLENS_K: np.array([past + n - 1], np.int32), io.TOTAL_SEQUENCE_LENGTH: np.array(past + n, np.int32)}

    def past_from(self, keys: np.ndarray, values: np.ndarray, past: int) -> dict[str, np.ndarray]:
        """Decoder past feeds from sequence-major (n_layers, 1, T, K, h) keys / values, the first `past` positions:
        contiguous prefixes (portable), or whole zero-padded blocks (fused)."""
        feeds = {}
        for layer in range(self.n_layers):
            for name, array in ((io.past_key(layer), keys[layer]), (io.past_value(layer), values[layer])):
                if self.fused:
                    block = np.zeros(self.block_shape, self.numpy_dtype)
                    block[:, :, :past] = array[:, :past].transpose(0, 2, 1, 3)
                    feeds[name] = block
                else:
                    feeds[name] = np.ascontiguousarray(array[:, :past], self.numpy_dtype)
        return feeds

    @classmethod
    def from_stage(cls, spec: StageSpec) -> "CacheLayout":
        """Layers are counted from the past_key.L inputs; K, h and D are the fixed dims of the tensors."""
        inputs = {t.name: t for t in spec.inputs}
        n_layers = 0
        while io.past_key(n_layers) in inputs:
            n_layers += 1
        where = f"stage {spec.name!r}"
        if n_layers == 0 or io.INPUTS_EMBEDS not in inputs:
            raise BundleError(f"{where}: no {io.INPUTS_EMBEDS} / {io.past_key(0)} inputs; this is not a decoder stage "
                              "of the edgeact contract (runtime/stage_io.py); re-export the bundle")
        if io.SEQ not in spec.dim_ranges:
            raise BundleError(f"{where}: dim_ranges has no {io.SEQ!r}; the cache size is its max: re-export the bundle")
        past = inputs[io.past_key(0)]
        embeds = inputs[io.INPUTS_EMBEDS]
        max_seq = spec.dim_ranges[io.SEQ].max
        fused = is_fused(spec)
        if fused:
            fixed = (past.dims[1], past.dims[3], embeds.dims[2], past.dims[2])
            expected = "(batch, K, max_seq, h) / (batch, seq, D) with fixed K, max_seq, h, D"
        else:
            fixed = (past.dims[2], past.dims[3], embeds.dims[2])
            expected = "(batch, past_seq, K, h) / (batch, seq, D) with fixed K, h, D"
        if len(past.dims) != 4 or len(embeds.dims) != 3 or not all(isinstance(d, int) for d in fixed):
            raise BundleError(f"{where}: past keys {list(past.dims)} / embeddings {list(embeds.dims)} must be "
                              f"{expected}; re-export the bundle")
        if fused and fixed[3] != max_seq:
            raise BundleError(f"{where}: cache buffers of {fixed[3]} positions but dim_ranges.seq.max is {max_seq}; "
                              "re-export the bundle")
        return cls(n_layers=n_layers, max_seq=max_seq, kv_heads=fixed[0], head_dim=fixed[1],
                   hidden_size=fixed[2], dtype=past.dtype, fused=fused)


def is_fused(spec: StageSpec) -> bool:
    """Whether a decoder stage is the fused form (onnxruntime's GroupQueryAttention; runtime/stage_io.py)."""
    return any(t.name == io.SEQLENS_K for t in spec.inputs)


def require_portable(spec: StageSpec, runner: str) -> None:
    """Refuse a fused decoder where only the portable form runs (TensorRT, onnxruntime's GPU providers)."""
    if is_fused(spec):
        raise BundleError(f"stage {spec.name!r} is the fused decoder (onnxruntime's CPU GroupQueryAttention), which "
                          f"{runner} cannot run; export the bundle with `edgeact export --attention "
                          f"{io.PORTABLE_ATTENTION}` for it")


class KVCache:
    """Every layer's keys and values for up to max_seq positions; `length` of them are filled.

    Positions are reserved before a decoder call (`start = reserve(n)`) and committed after it
    succeeded (`commit(n)`), so a failed call leaves the cache as it was.
    """

    def __init__(self, layout: CacheLayout, allocate: DeviceAllocator | None = None, device: str = "cpu"):
        self.layout = layout
        self.device = device
        self.length = 0
        self._host: np.ndarray | None = None
        if allocate is None:
            if device != "cpu":
                raise BundleError(f"a {device} KV cache needs the backend's device allocator")
            self._host = np.zeros((layout.n_layers, 2, *layout.block_shape), layout.numpy_dtype)
            self._owner: Any = self._host
            self._base = self._host.ctypes.data
        else:
            self._owner, self._base = allocate(layout.nbytes)
        # Block start addresses as plain ints, computed once: the per-token path does integer arithmetic only.
        self._row_bytes = layout.row_bytes
        block = layout.max_seq * layout.row_bytes
        self._blocks = [[self._base + (2 * layer + kind) * block for kind in (KEY, VALUE)] for layer in range(layout.n_layers)]

    @property
    def max_seq(self) -> int:
        return self.layout.max_seq

    @property
    def is_host(self) -> bool:
        return self._host is not None

    def reset(self) -> None:
        """Forget every position (the memory is reused, not cleared: positions past `length` are never read)."""
        self.length = 0

    def reserve(self, n: int) -> int:
        """Check there is room for n more positions; returns where they start."""
        end = self.length + n
        if n < 1 or end > self.layout.max_seq:
            if n < 1:
                raise ValueError(f"reserve({n}): a decoder call feeds at least one position")
            raise SequenceTooLongError(
                f"{end} positions exceed the bundle's max_seq {self.layout.max_seq}; re-export with a larger "
                "--max-seq or shorten the prompt (fewer cameras or crops)")
        return self.length

    def commit(self, n: int) -> None:
        self.length += n

    def rewind(self, length: int) -> None:
        """Forget every position from `length` on (e.g. to decode another continuation of the same prompt)."""
        if not 0 <= length <= self.length:
            raise EdgeactError(f"cannot rewind a cache of {self.length} positions to {length}")
        self.length = length

    def pointer(self, layer: int, kind: int, position: int = 0) -> int:
        """Address of (layer, kind)'s entry at `position`; entries from there on are contiguous (portable layout).
        The fused layout's blocks are bound whole: only position 0, the block's start, has a meaning there."""
        if position and self.layout.fused:
            raise EdgeactError("the fused cache is head-major: positions are not contiguous; bind the whole block")
        return self._blocks[layer][kind] + position * self._row_bytes

    def _host_blocks(self) -> np.ndarray:
        if self._host is None:
            raise BundleError(f"the KV cache lives on {self.device}; only its pointers are available on the host")
        return self._host

    def block(self, layer: int, kind: int) -> np.ndarray:
        """Host view of one layer's keys (KEY) or values (VALUE) as stored (`CacheLayout.block_shape`)."""
        return self._host_blocks()[layer, kind]

    def _seq_major(self, blocks: np.ndarray) -> np.ndarray:
        # (..., 1, K, max_seq, h) -> (..., 1, max_seq, K, h): a view, no copy.
        return blocks.swapaxes(-3, -2) if self.layout.fused else blocks

    @property
    def keys(self) -> np.ndarray:
        """Host view (n_layers, 1, max_seq, K, h) of every layer's keys (sequence-major in either layout)."""
        return self._seq_major(self._host_blocks()[:, KEY])

    @property
    def values(self) -> np.ndarray:
        """Host view (n_layers, 1, max_seq, K, h) of every layer's values (sequence-major in either layout)."""
        return self._seq_major(self._host_blocks()[:, VALUE])

    def prefix(self, layer: int, kind: int) -> np.ndarray:
        """The filled part (1, length, K, h) as a view (what a portable decoder is fed as its past)."""
        return self._seq_major(self.block(layer, kind))[:, :self.length]

    # ------------------------------------------------------- the plain runner's copying path
    def past_feeds(self) -> dict[str, np.ndarray]:
        """Every layer's past by decoder input name (past_key.L / past_value.L), as views: no copy. Portable:
        the filled prefixes; fused: the whole blocks (add `layout.chunk_feeds` for the chunk's lengths)."""
        feeds = {}
        for layer in range(self.layout.n_layers):
            if self.layout.fused:
                feeds[io.past_key(layer)], feeds[io.past_value(layer)] = self.block(layer, KEY), self.block(layer, VALUE)
            else:
                feeds[io.past_key(layer)], feeds[io.past_value(layer)] = self.prefix(layer, KEY), self.prefix(layer, VALUE)
        return feeds

    def append(self, outputs: Mapping[str, np.ndarray], n: int) -> None:
        """Copy a portable decoder call's n new_key.L / new_value.L entries in right after the filled part."""
        if self.layout.fused:
            raise EdgeactError("the fused decoder writes its chunk into the cache blocks fed as its past: "
                               "commit(n) after the run instead of appending")
        start = self.reserve(n)
        for layer in range(self.layout.n_layers):
            self.block(layer, KEY)[:, start:start + n] = outputs[io.new_key(layer)]
            self.block(layer, VALUE)[:, start:start + n] = outputs[io.new_value(layer)]
        self.commit(n)
