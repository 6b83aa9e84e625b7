"""Stage engines: what every inference backend provides, and the registry that opens one by name.

A backend (onnxruntime, native TensorRT, ...) opens two kinds of engine over a bundle:

- a `StageEngine` for a stateless stage (vision): named arrays in, named arrays out;
- a `DecoderEngine` for the decoder: it owns the KV cache and its input/output buffers, all
  allocated once at load; the caller writes a chunk's embeddings into `embeds[:n]` and calls
  `step(n)`, which runs the chunk after the cached past, appends its keys/values to the
  cache in place and returns the hidden state of the chunk's last position.

Backends register themselves with `@register_backend("name")`; `open_backend` imports the
built-in ones on first use, so `import edgeact.runtime.engines` loads neither onnxruntime nor
TensorRT.
"""
from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from typing import Any, Callable, Mapping

import numpy as np

from edgeact.runtime import stage_io as io
from edgeact.runtime.bundle import Bundle
from edgeact.runtime.errors import ConfigError, EdgeactError
from edgeact.runtime.kv_cache import CacheLayout, KVCache
from edgeact.runtime.stage_spec import StageSpec, largest_in_profiles

# Built-in backends: the module that registers each (imported lazily, heavy dependencies inside).
BUILTIN_BACKENDS = {
    "onnxruntime": "edgeact.runtime.ort_engine",
    "tensorrt": "edgeact.runtime.trt_engine",
}
_REGISTRY: dict[str, Callable[..., "Backend"]] = {}


class StageEngine(ABC):
    """One stateless stage run by one backend."""

    spec: StageSpec

    def largest(self, symbol: str) -> int | None:
        """The largest value of a symbolic dim this engine takes (default: the manifest's range; None: not a dim)."""
        r = self.spec.dim_ranges.get(symbol)
        return r.max if r is not None else None

    @abstractmethod
    def run(self, feeds: Mapping[str, np.ndarray], *, release: bool = True) -> dict[str, np.ndarray]:
        """Outputs by name. They may be views of the engine's own buffers, valid until the next run.

        release: the backend may give back the run's transient memory after it (onnxruntime: its
        arena's free regions). False when the next call runs the same shapes at once (the ViT's
        next crop), which then reuses that memory instead of allocating it again.
        """


class DecoderEngine(ABC):
    """The decoder stage with its KV cache and I/O buffers, allocated once (batch 1)."""

    spec: StageSpec
    layout: CacheLayout
    cache: KVCache
    max_chunk: int            # most positions one step() may feed
    embeds: np.ndarray        # (max_chunk, D) float32 host buffer: the caller writes a chunk's embeddings here
    all_hidden_states: bool = False   # hidden_states() gives every row of a chunk (the decode program's drafting)

    @property
    def length(self) -> int:
        """Positions in the cache (the next chunk's first position)."""
        return self.cache.length

    def reset(self) -> None:
        self.cache.reset()

    @abstractmethod
    def step(self, n: int) -> np.ndarray:
        """Run embeds[:n] at positions length .. length+n-1; returns the (D,) hidden state of the last one
        (a view of the engine's buffer, valid until the next step)."""

    def hidden_states(self, n: int) -> np.ndarray:
        """(n, D) hidden states of the last step's n positions, on the host (valid until the next step)."""
        raise EdgeactError(f"{type(self).__name__} returns only a chunk's last hidden state")

    def release(self) -> None:
        """The answer is complete: give back host memory the decode steps keep for reuse (default: none to give)."""


class Backend(ABC):
    """Opens a bundle's stages as engines of one kind."""

    name: str = ""
    on_device: bool = False   # activations live in an accelerator's memory, not the host's (a GPU backend)

    @abstractmethod
    def stage(self, bundle: Bundle, name: str) -> StageEngine:
        ...

    @abstractmethod
    def decoder(self, bundle: Bundle, max_chunk: int) -> DecoderEngine:
        ...

    def close(self) -> None:
        """Release what the backend holds outside Python's memory (device buffers); its engines are unusable after."""


def register_backend(name: str) -> Callable[[Callable[..., Backend]], Callable[..., Backend]]:
    """Class decorator: `@register_backend("onnxruntime")` makes `open_backend("onnxruntime", ...)` build it."""
    def add(factory: Callable[..., Backend]) -> Callable[..., Backend]:
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise ConfigError(f"backend {name!r} is registered twice ({_REGISTRY[name]} and {factory})")
        _REGISTRY[name] = factory
        return factory
    return add


def backend_names() -> list[str]:
    return sorted(set(_REGISTRY) | set(BUILTIN_BACKENDS))


def open_backend(name: str, **options: Any) -> Backend:
    """The backend registered as `name`, built with its options (each backend validates its own)."""
    if name not in _REGISTRY and name in BUILTIN_BACKENDS:
        importlib.import_module(BUILTIN_BACKENDS[name])
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"backend {name!r} unknown; use one of {', '.join(backend_names())}") from None
    try:
        return factory(**options)
    except TypeError as exc:   # an option this backend does not take: name it
        raise ConfigError(f"backend {name!r}: {exc}") from None


# ------------------------------------------------------------------------------- shared checks
def check_max_chunk(max_chunk: int, layout: CacheLayout, profiles: list | None = None) -> int:
    """The decoder's largest chunk: within the cache, and within the engine's optimization profiles when it
    builds for them (TensorRT: the exporter's prefill profile takes DEVICE_PREFILL_CHUNK positions)."""
    if max_chunk < 1:
        raise ConfigError(f"max_chunk is {max_chunk}; a decoder chunk holds at least one position (e.g. 256)")
    if profiles:
        max_chunk = min(max_chunk, largest_in_profiles(profiles, io.SEQ) or max_chunk)
    return min(max_chunk, layout.max_seq)
