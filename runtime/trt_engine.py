"""The native TensorRT backend: engines that `edgeact build-engines` built, run with the TensorRT 10 Python API.

Per stage: deserialize the plan, one execution context per optimization profile (the
manifest's profiles, in the engine record's order: switching a context's profile costs a
synchronization), device buffers sized once for the largest shapes its profiles take. The
contexts share one activation buffer (USER_MANAGED, sized for the largest profile): they run
one after another on one stream, and TensorRT's default would give each its own. A call
picks the narrowest profile that holds its shapes, sets input shapes (`set_input_shape`) and
addresses (`set_tensor_address`) and runs `execute_async_v3` on the engine's stream. The
ViT's one profile is one crop (runtime/vision_stages.py calls it per crop), so its
activations are one crop's on the GPU too.

The decoder's KV cache lives in device memory (cudaMalloc once, sized like the host cache);
keys/values of a chunk are written by the engine straight into the cache at offset `length`,
so a cache row must keep TensorRT's 256-byte address alignment (`check_cache_alignment`).
Per step only the chunk's embeddings and positions go host->device and one hidden row
(D floats) comes back. tensorrt and cuda-python are imported when a backend is opened, with
an error that says what to install.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from edgeact.runtime import stage_io as io
from edgeact.runtime.bundle import Bundle, DimRange, EngineRecord, StageSpec
from edgeact.runtime.engines import Backend, DecoderEngine, StageEngine, check_max_chunk, register_backend
from edgeact.runtime.errors import BundleError, ConfigError, EdgeactError
from edgeact.runtime.kv_cache import KEY, VALUE, CacheLayout, KVCache, require_portable
from edgeact.runtime.stage_spec import (
    largest_in_profiles, max_shape, numpy_dtype, profile_dim_ranges, resolve_shape, select_profile, stage_inputs,
)
from edgeact.runtime.device_info import jetson_model
from edgeact.runtime.trt_targets import TARGETS

TENSORRT_MISSING = ("the tensorrt backend needs TensorRT 10 and cuda-python on a machine with an NVIDIA GPU "
                    "(Jetson: JetPack ships TensorRT; pip install cuda-python); or use backend 'onnxruntime'")
_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int8": 1, "uint8": 1, "bool": 1}
TENSOR_ALIGNMENT_BYTES = 256     # IExecutionContext::setTensorAddress: "at least 256-byte alignment"


# ------------------------------------------------------------------------------- pure logic
def profile_ranges(spec: StageSpec, record: EngineRecord) -> list[dict[str, DimRange]]:
    """Symbol ranges of each engine profile, in engine profile-index order (the record's names)."""
    by_name = dict(profile_dim_ranges(spec))
    if not record.profiles:
        return [dict(spec.dim_ranges)]
    missing = [n for n in record.profiles if n not in by_name and n != "default"]
    if missing:
        raise BundleError(f"engine {record.file}: profiles {missing} are not in the manifest's stage {spec.name!r}; "
                          f"rebuild it: edgeact build-engines BUNDLE --target {record.target}")
    return [by_name.get(n, dict(spec.dim_ranges)) for n in record.profiles]


def engine_shape(dims: Sequence[int | str], spec: StageSpec, ranges: Sequence[Mapping[str, DimRange]]) -> tuple[int, ...]:
    """Largest shape of a tensor in any of the engine's profiles (`profile_ranges`).

    An engine takes nothing larger, and a stage's profiles may be narrower than its dim_ranges:
    the ViT's graph takes a batch of crops, its engine one crop (the runtime's call).
    """
    values = {name: max((p[name].max for p in ranges if name in p), default=r.max)
              for name, r in spec.dim_ranges.items()}
    return resolve_shape(dims, values, f"stage {spec.name!r}")


def tensor_bytes(dims: Sequence[int | str], dtype: str, spec: StageSpec,
                 ranges: Sequence[Mapping[str, DimRange]] | None = None) -> int:
    """Bytes of a tensor at its largest shape within the engine's profile `ranges` (default: the stage's
    dim_ranges); device buffers are this big."""
    if dtype not in _ITEMSIZE:
        raise BundleError(f"stage {spec.name!r}: element type {dtype} has no buffer size here")
    shape = max_shape(dims, spec) if ranges is None else engine_shape(dims, spec, ranges)
    return int(np.prod(shape, dtype=np.int64)) * _ITEMSIZE[dtype]


def pick_engine(bundle: Bundle, stage: str, target: str | None, compute_capability: tuple[int, int] | None,
                trt_version: str, jetson_model: str | None = None) -> EngineRecord:
    """The engine record to run: the named target's, or the one built for this GPU's SM (on a Jetson,
    `jetson_model`: for this module, as Orin AGX, NX and Nano share SM 8.7); same SM (a named target's engine too)
    and same TensorRT version."""
    records = built = [r for r in bundle.manifest.engines if r.stage == stage]
    how = f"edgeact build-engines {bundle.root} --target T"
    if target is not None:
        records = [r for r in records if r.target == target]
    elif compute_capability is not None:
        records = [r for r in records if runs_on_sm(r, compute_capability)]
        if jetson_model:        # another module's engines of this SM are not this module's
            records = [r for r in records if r.target not in TARGETS or TARGETS[r.target].on_module(jetson_model)]
    if not records:
        have = sorted({f"{r.target} (SM {r.compute_capability})" for r in built})
        raise BundleError(f"{bundle.root}: no TensorRT engine for stage {stage!r}"
                          + (f" and target {target!r}" if target else "")
                          + (f" on SM {compute_capability[0]}.{compute_capability[1]}" if compute_capability and not target else "")
                          + f"; it has {', '.join(have) or 'none'}. Build them on this device: {how}")
    if len(records) > 1:
        raise ConfigError(f"stage {stage!r} has engines for targets {[r.target for r in records]} on this SM; "
                          "choose one with the target option")
    record = records[0]
    if compute_capability is not None and not runs_on_sm(record, compute_capability):
        here = f"{compute_capability[0]}.{compute_capability[1]}"
        fits = sorted({r.target for r in built if runs_on_sm(r, compute_capability)})
        raise BundleError(f"{record.file}: target {record.target!r} is built for SM {record.compute_capability}, "
                          f"this GPU is SM {here}; engines run only on the SM they were built on: build them on this "
                          f"device with {how}" + (f", or set the target option to {' or '.join(map(repr, fits))} "
                                                  f"(built for SM {here})" if fits else ""))
    if record.trt_version != trt_version:
        raise BundleError(f"{record.file}: built with TensorRT {record.trt_version}, this is TensorRT {trt_version}; "
                          f"engines run only on the version that built them: rebuild with {how}")
    return record


def check_cache_alignment(layout: CacheLayout, where: str) -> None:
    """Refuse a cache whose rows would put a step's addresses off TensorRT's alignment.

    A step binds new keys/values at `base + past * row_bytes` for every past, so rows must be a multiple of
    TENSOR_ALIGNMENT_BYTES (cudaMalloc's blocks start on one).
    """
    if layout.row_bytes % TENSOR_ALIGNMENT_BYTES:
        item = layout.row_bytes // (layout.kv_heads * layout.head_dim)
        raise BundleError(f"{where}: this model size's KV cache rows are {layout.row_bytes} bytes (kv_heads "
                          f"{layout.kv_heads} x head_dim {layout.head_dim} x {item} bytes of {layout.dtype}), not a "
                          f"multiple of the {TENSOR_ALIGNMENT_BYTES} bytes TensorRT requires of tensor addresses: "
                          "the cache after a past would be misaligned. Run this model on the onnxruntime backend, or "
                          f"use a model size whose kv_heads x head_dim x element bytes is a multiple of "
                          f"{TENSOR_ALIGNMENT_BYTES} (e.g. the synthetic 'bench' size)")


def runs_on_sm(record: EngineRecord, compute_capability: tuple[int, int]) -> bool:
    """Whether an engine built for the record's SM runs on a GPU of this SM: the same number, or another number
    the record's target chip also reports (Thor: 11.0, 10.1 before CUDA 13), as build-engines' check_device allows."""
    sm = tuple(compute_capability)
    if record.compute_capability == f"{sm[0]}.{sm[1]}":
        return True
    chip = TARGETS.get(record.target)
    return chip is not None and chip.reports(record.compute_capability) and chip.reports(sm)


# ------------------------------------------------------------------------------- CUDA glue
@dataclass(frozen=True)
class TrtOptions:
    target: str | None = None        # the engine record's target; None: the one built for this GPU's SM
    device_id: int = 0

    def __post_init__(self) -> None:
        if self.device_id < 0:
            raise ConfigError(f"device_id is {self.device_id}; CUDA devices count from 0")


def import_trt() -> tuple[Any, Any]:
    """(tensorrt, cuda runtime bindings), or an EdgeactError saying what to install."""
    try:
        import tensorrt
    except (ImportError, OSError):       # OSError: the wheel is there but libnvinfer is not
        raise EdgeactError(TENSORRT_MISSING) from None
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError:
            raise EdgeactError(TENSORRT_MISSING) from None
    return tensorrt, cudart


class Cuda:
    """The few CUDA runtime calls the engines need, each checked."""

    def __init__(self, cudart, device_id: int):
        self.rt = cudart
        self.check(cudart.cudaSetDevice(device_id), "cudaSetDevice")
        self.stream = self.check(cudart.cudaStreamCreate(), "cudaStreamCreate")
        self.h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        self.d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._blocks: list[int] = []

    def check(self, result, what: str):
        err, *value = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            raise EdgeactError(f"CUDA {what} failed with error {int(err)} ({err}); check the GPU and its free memory")
        return value[0] if len(value) == 1 else tuple(value)

    def malloc(self, nbytes: int) -> int:
        ptr = int(self.check(self.rt.cudaMalloc(max(nbytes, 1)), "cudaMalloc"))
        self._blocks.append(ptr)
        return ptr

    def allocator(self, nbytes: int) -> tuple[Any, int]:
        ptr = self.malloc(nbytes)
        return ptr, ptr

    def to_device(self, dst: int, src: np.ndarray, nbytes: int) -> None:
        self.check(self.rt.cudaMemcpyAsync(dst, src.ctypes.data, nbytes, self.h2d, self.stream), "cudaMemcpyAsync")

    def to_host(self, dst: np.ndarray, src: int, nbytes: int) -> None:
        self.check(self.rt.cudaMemcpyAsync(dst.ctypes.data, src, nbytes, self.d2h, self.stream), "cudaMemcpyAsync")

    def sync(self) -> None:
        self.check(self.rt.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    def close(self) -> None:
        for ptr in self._blocks:
            self.rt.cudaFree(ptr)
        self._blocks.clear()


class _Plan:
    """A deserialized engine and one execution context per optimization profile."""

    def __init__(self, trt, cuda: Cuda, bundle: Bundle, record: EngineRecord):
        logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(logger)
        self.engine = self.runtime.deserialize_cuda_engine(bundle.path(record.file).read_bytes())
        if self.engine is None:
            raise BundleError(f"{record.file}: TensorRT could not deserialize the engine (see its log); rebuild it "
                              f"with edgeact build-engines {bundle.root} --target {record.target}")
        self.spec = bundle.stage(record.stage)
        self.ranges = profile_ranges(self.spec, record)
        if self.engine.num_optimization_profiles != len(self.ranges):
            raise BundleError(f"{record.file}: {self.engine.num_optimization_profiles} profiles in the engine, "
                              f"{len(self.ranges)} in the manifest; rebuild the engine")
        # One activation buffer for all contexts: the default (STATIC) gives each its own, sized for the largest
        # profile (the decoder held it twice). They run one after another on one stream, so sharing is safe; its
        # size, device_memory_size_v2, is the largest any profile needs. TensorRT 10.0 (before the V2 calls) names
        # them device_memory_size and the context's device_memory setter.
        strategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED
        size = getattr(self.engine, "device_memory_size_v2", None)
        scratch_bytes = int(size if size is not None else self.engine.device_memory_size)
        scratch = cuda.malloc(scratch_bytes)
        self.contexts = []
        for index in range(len(self.ranges)):
            context = self.engine.create_execution_context(strategy)
            if context is None:
                raise EdgeactError(f"{record.file}: TensorRT could not create an execution context (see its log); "
                                   "check the GPU's free memory")
            if hasattr(context, "set_device_memory"):
                context.set_device_memory(scratch, scratch_bytes)
            else:
                context.device_memory = scratch
            try:
                selected = context.set_optimization_profile_async(index, int(cuda.stream))
            except RuntimeError:          # the Python binding raises where the C++ call returns false
                selected = False
            if not selected:
                name = record.profiles[index] if record.profiles else "default"
                raise BundleError(f"{record.file}: TensorRT refused optimization profile {index} ({name!r}) of the "
                                  f"engine (see its log); rebuild it: edgeact build-engines {bundle.root} "
                                  f"--target {record.target}")
            self.contexts.append(context)
        cuda.sync()
        self.stream = int(cuda.stream)

    def run(self, values: Mapping[str, int], shapes: Mapping[str, Sequence[int]], addresses: Mapping[str, int]):
        context = self.contexts[select_profile(self.ranges, values)]
        for name, shape in shapes.items():
            if not context.set_input_shape(name, tuple(shape)):
                raise EdgeactError(f"stage {self.spec.name!r}: TensorRT refused shape {list(shape)} for {name!r}")
        for name, address in addresses.items():
            if not context.set_tensor_address(name, address):
                raise EdgeactError(f"stage {self.spec.name!r}: TensorRT refused address {address:#x} for {name!r} "
                                   f"(not a tensor of the engine, or not {TENSOR_ALIGNMENT_BYTES}-byte aligned)")
        if not context.execute_async_v3(self.stream):
            raise EdgeactError(f"stage {self.spec.name!r}: TensorRT execution failed (see its log)")
        return context


class TrtStageEngine(StageEngine):
    """A stateless stage: inputs copied into device buffers sized at load, outputs copied back into host buffers."""

    def __init__(self, trt, cuda: Cuda, bundle: Bundle, record: EngineRecord):
        self.cuda, self.plan = cuda, _Plan(trt, cuda, bundle, record)
        self.spec = self.plan.spec
        ranges = self.plan.ranges
        self._device = {t.name: cuda.malloc(tensor_bytes(t.dims, t.dtype, self.spec, ranges))
                        for t in (*self.spec.inputs, *self.spec.outputs)}
        stage = self.spec.name
        self._host = {t.name: np.empty(engine_shape(t.dims, self.spec, ranges),
                                       numpy_dtype(t.dtype, f"stage {stage!r} output {t.name!r}"))
                      for t in self.spec.outputs}
        self._in_dtypes = {t.name: numpy_dtype(t.dtype, f"stage {stage!r} input {t.name!r}") for t in self.spec.inputs}

    def largest(self, symbol: str) -> int | None:
        """An engine takes what its optimization profiles hold (the ViT's: one crop), not the whole dim range."""
        return largest_in_profiles(self.plan.ranges, symbol)

    def run(self, feeds: Mapping[str, np.ndarray], *, release: bool = True) -> dict[str, np.ndarray]:
        # `release` has nothing to do here: device buffers and activation memory are allocated once at load.
        where = f"stage {self.spec.name!r}"
        # shapes no profile holds are refused before they overrun a buffer
        arrays, values = stage_inputs(self.spec.inputs, self._in_dtypes, feeds, where, self.plan.ranges)
        for name, array in arrays.items():
            self.cuda.to_device(self._device[name], array, array.nbytes)
        self.plan.run(values, {k: a.shape for k, a in arrays.items()}, self._device)
        out = {}
        for t in self.spec.outputs:
            shape = resolve_shape(t.dims, values, where)
            view = self._host[t.name].reshape(-1)[:int(np.prod(shape))].reshape(shape)
            self.cuda.to_host(view, self._device[t.name], view.nbytes)
            out[t.name] = view
        self.cuda.sync()
        return out


class TrtDecoderEngine(DecoderEngine):
    """The decoder engine over a device-resident KV cache; returns the chunk's last hidden row on the host."""

    all_hidden_states = True

    def __init__(self, trt, cuda: Cuda, bundle: Bundle, record: EngineRecord, max_chunk: int):
        spec = bundle.stage(io.DECODER_STAGE)
        require_portable(spec, "TensorRT")
        self.layout = layout = CacheLayout.from_stage(spec)
        check_cache_alignment(layout, f"{bundle.root}: decoder")
        self.cuda, self.plan = cuda, _Plan(trt, cuda, bundle, record)
        self.spec = self.plan.spec
        self.max_chunk = check_max_chunk(max_chunk, layout, self.plan.ranges)
        self.cache = KVCache(layout, allocate=cuda.allocator, device="cuda")
        D, n = layout.hidden_size, self.max_chunk
        self.embeds = np.zeros((n, D), np.float32)
        self._positions = np.zeros(n, np.int64)
        self._ramp = np.arange(n, dtype=np.int64)
        self._last = np.zeros(D, np.float32)
        self._rows = np.zeros((n, D), np.float32)      # hidden_states(): every row of the last step, when asked
        self._last_n = 0
        self._embeds_dev, self._positions_dev = cuda.malloc(n * D * 4), cuda.malloc(n * 8)
        self._hidden_dev = cuda.malloc(n * D * 4)
        self._row_bytes = D * 4
        self._layers = [(io.past_key(l), io.past_value(l), io.new_key(l), io.new_value(l)) for l in range(layout.n_layers)]
        self._addresses: dict[str, int] = {io.INPUTS_EMBEDS: self._embeds_dev, io.POSITION_IDS: self._positions_dev,
                                           io.HIDDEN_STATES: self._hidden_dev}
        self._shapes: dict[str, list[int]] = {}
        self._values = {io.BATCH: 1, io.SEQ: 1, io.PAST_SEQ: 0}

    def step(self, n: int) -> np.ndarray:
        if not 1 <= n <= self.max_chunk:
            raise EdgeactError(f"decoder step of {n} positions; this engine takes 1..{self.max_chunk} (max_chunk)")
        past = self.cache.reserve(n)
        np.add(self._ramp[:n], past, out=self._positions[:n])
        cuda, cache, D = self.cuda, self.cache, self.layout.hidden_size
        cuda.to_device(self._embeds_dev, self.embeds, n * self._row_bytes)
        cuda.to_device(self._positions_dev, self._positions, n * 8)
        shapes, addresses, row = self._shapes, self._addresses, [self.layout.kv_heads, self.layout.head_dim]
        shapes[io.INPUTS_EMBEDS], shapes[io.POSITION_IDS] = [1, n, D], [1, n]
        for layer, (pk, pv, nk, nv) in enumerate(self._layers):
            shapes[pk] = shapes[pv] = [1, past, *row]
            addresses[pk], addresses[pv] = cache.pointer(layer, KEY), cache.pointer(layer, VALUE)
            addresses[nk], addresses[nv] = cache.pointer(layer, KEY, past), cache.pointer(layer, VALUE, past)
        self._values[io.SEQ], self._values[io.PAST_SEQ] = n, past
        self.plan.run(self._values, shapes, addresses)
        cuda.to_host(self._last, self._hidden_dev + (n - 1) * self._row_bytes, self._row_bytes)
        cuda.sync()
        cache.commit(n)
        self._last_n = n
        return self._last

    def hidden_states(self, n: int) -> np.ndarray:
        """(n, D): the last step's rows, copied from the device (the decode program's drafting)."""
        if not 1 <= n <= self._last_n:
            raise EdgeactError(f"hidden_states({n}): the last step fed {self._last_n} positions")
        self.cuda.to_host(self._rows, self._hidden_dev, n * self._row_bytes)
        self.cuda.sync()
        return self._rows[:n]


@register_backend("tensorrt")
class TrtBackend(Backend):
    """Opens the bundle's TensorRT engines (built by `edgeact build-engines`); options as TrtOptions."""

    name = "tensorrt"
    on_device = True

    def __init__(self, **options: Any):
        self.options = TrtOptions(**options)
        self.trt, cudart = import_trt()
        self.cuda = Cuda(cudart, self.options.device_id)
        major = self.cuda.check(cudart.cudaDeviceGetAttribute(
            cudart.cudaDeviceAttr.cudaDevAttrComputeCapabilityMajor, self.options.device_id), "cudaDeviceGetAttribute")
        minor = self.cuda.check(cudart.cudaDeviceGetAttribute(
            cudart.cudaDeviceAttr.cudaDevAttrComputeCapabilityMinor, self.options.device_id), "cudaDeviceGetAttribute")
        self.compute_capability = (int(major), int(minor))
        self.jetson_model = jetson_model()     # read once: which module's engines this GPU takes

    def _record(self, bundle: Bundle, stage: str) -> EngineRecord:
        return pick_engine(bundle, stage, self.options.target, self.compute_capability, str(self.trt.__version__),
                           self.jetson_model)

    def stage(self, bundle: Bundle, name: str) -> TrtStageEngine:
        return TrtStageEngine(self.trt, self.cuda, bundle, self._record(bundle, name))

    def decoder(self, bundle: Bundle, max_chunk: int) -> TrtDecoderEngine:
        return TrtDecoderEngine(self.trt, self.cuda, bundle, self._record(bundle, io.DECODER_STAGE), max_chunk)

    def close(self) -> None:
        self.cuda.close()
