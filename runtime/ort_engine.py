"""The onnxruntime backend: stages as InferenceSessions driven through I/O binding into buffers allocated at load.

Execution provider by name: "cpu", "cuda", or "tensorrt" (the TensorRT EP, CUDA and CPU as
fallbacks for nodes it does not take), with one optimization profile derived from the manifest's
(`trt_profile_options`). A session whose requested provider did not initialise is refused
(`check_provider`): onnxruntime would otherwise run it on its fallback and only print so. The
graph optimization level is the one the manifest records for a stage
(`quantization.options.stages.NAME.ort_graph_optimization`, written by `edgeact quantize`:
some fp8 / int4 graphs only run at "basic"), unless the options override it.

Where the decoder's time goes, per step: the session run itself (the model's arithmetic and
one read of the cache), then the bind calls (a few microseconds each). Nothing is copied. The
fused decoder (runtime/stage_io.py) has its cache blocks bound once, as past and present at the
same address, and onnxruntime's GroupQueryAttention writes each chunk into them in place: a step
binds 3 tensors (its embeddings, positions and hidden states) and writes its two lengths. The portable decoder binds 4*n_layers+3 (the past grows, so its shapes change
every step): the past as the cache's contiguous prefix, new keys/values written by onnxruntime
straight into the cache at offset `length`. The hidden states land in a buffer sized for the
largest chunk.

Host memory (OrtOptions cpu_arena / mem_pattern / arena_shrink). Left alone, a policy's
resident memory grows over its first steps to up to 5x the bundle's bytes: each session's arena keeps the
regions of its largest run (a 512-token prefill chunk; before the vision split, the ViT over every
crop) for good, and the memory pattern's pre-planned block for a new shape is one more region
beside them. Here, after each stateless stage run (the ViT on one crop, the connector, the depth
tokenizer) and each prefill chunk, the arena gives its free regions back
("memory.enable_memory_arena_shrinkage") and the C heap is trimmed (glibc keeps freed blocks
under its mmap threshold otherwise), so only one large run's activations are resident at a
time. The ViT runs once per crop (runtime/vision_stages.py), so its largest run is one crop's.
Decode steps and the answer's short forced runs (under SHRINK_MIN_TOKENS) take the unchanged path
(arena and pattern kept: no malloc per step), so decode speed does not move; once the answer is
complete, `release()` gives those regions back too (one uncommitted 1-token run with the shrink),
so they are not held beside the next observation's vision and prefill. Loading a session frees the
parsed model's copy of the weights, which a heap trim gives back. With 128-token prefill chunks
(bundle_policy.DEFAULT_PREFILL_CHUNK) these put every bench bundle within 1.3 x bundle + 300 MB
(`python -m edgeact.runtime.membw BUNDLE --steps 2 --threads 2`). Measured on the bench bundles, not adopted:
"session.use_device_allocator_for_initializers" (+-20 MB either way), an arena shared by the
sessions ("session.use_env_allocators": onnxruntime 1.32 aborts in BFCArena::RegionFor), no arena
(glibc then keeps the freed activations: peak 1.3-1.4 GB), "session.disable_prepacking" (int8 MatMulNBits
6x slower for a few MB), mem_pattern off (within the noise).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from edgeact.runtime import stage_io as io
from edgeact.runtime.bundle import Bundle
from edgeact.runtime.bundle_manifest import ORT_TRT_CACHE_DIR   # TensorRT-EP engine cache inside the bundle, per device
from edgeact.runtime.engines import Backend, DecoderEngine, StageEngine, check_max_chunk, register_backend
from edgeact.runtime.errors import BundleError, ConfigError, EdgeactError
from edgeact.runtime.kv_cache import KEY, VALUE, CacheLayout, KVCache, require_portable
from edgeact.runtime.stage_spec import (
    StageSpec, largest_in_profiles, max_shape, numpy_dtype, optimization_profiles, profile_dim_ranges,
    resolve_shape, stage_inputs,
)

PROVIDERS = {
    "cpu": ("CPUExecutionProvider",),
    "cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
    "tensorrt": ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
}
GRAPH_LEVELS = ("disabled", "basic", "extended", "all")
CPU_ARENAS = ("session", "off")
# A decoder run of at least this many tokens (a prompt's prefill chunk) hands its arena regions back after it;
# shorter runs (one token, or the few tokens of a forced sentence piece in the answer) keep theirs: they are
# small and the next run reuses them without a malloc.
SHRINK_MIN_TOKENS = 64
# onnxruntime's CPU provider has no float8 kernels, and its QDQ rules keep every DequantizeLinear of an fp8 weight
# in the graph for a fusion float8 does not have: each run dequantized every weight again (the reference ARM's
# fp8 decoder stepped at 0.1x fp32's speed). With the QDQ rules off, constant folding turns those weights into
# float once, at load; the activations' Q/DQ pairs still round every value as E4M3 does. On the CPU an fp8 stage
# is an emulation of fp8's arithmetic, for checking accuracy (verify, the quantize report, lockstep eval).
CPU_FP8_SESSION_CONFIG = {"session.disable_quant_qdq": "1"}
# The manifest's decoder profile of single-token steps (export/bundle_export.py): the TensorRT EP's one profile
# is tuned for its shapes (trt_profile_options).
DECODE_PROFILE = "decode"


@dataclass(frozen=True)
class OrtOptions:
    threads: int | None = None             # intra-op threads (None: onnxruntime's default, all cores)
    provider: str = "cpu"                  # cpu, cuda, tensorrt
    device_id: int = 0
    graph_optimization: str | None = None  # None: the level the manifest records per stage, else "all"
    trt_fp16: bool = False                 # TensorRT EP: let fp32 layers run in fp16
    # CUDA EP: let fp32 matrix products run in TF32 (Ampere and later: Orin, Thor, H100). onnxruntime's own default
    # is on; here it is off, so an fp32 bundle computes in fp32 (with TF32 an H100 answered 98 % of the reference's
    # tokens, measured with bench-policy --device cuda).
    cuda_tf32: bool = False
    trt_cache_dir: str | None = None       # TensorRT EP engine cache (default: BUNDLE/engines/ort-tensorrt);
                                           # a writable directory where the bundle's is read-only
    # Host memory: why these defaults (they keep a policy near 1.3 x bundle + 300 MB) is in the module docstring.
    cpu_arena: str = "session"             # session: an arena per session; off: every tensor from malloc
    mem_pattern: bool = True               # onnxruntime's pre-planned block per input shape (freed by the shrink)
    arena_shrink: bool = True              # after a stage run (one ViT crop, the connector) or a prefill chunk,
                                           # give the arena's free regions back

    def __post_init__(self) -> None:
        if self.provider not in PROVIDERS:
            raise ConfigError(f"onnxruntime provider {self.provider!r} unknown; use one of {', '.join(PROVIDERS)}")
        if self.graph_optimization is not None and self.graph_optimization not in GRAPH_LEVELS:
            raise ConfigError(f"graph_optimization {self.graph_optimization!r} unknown; use one of {', '.join(GRAPH_LEVELS)}")
        if self.cpu_arena not in CPU_ARENAS:
            raise ConfigError(f"cpu_arena {self.cpu_arena!r} unknown; use one of {', '.join(CPU_ARENAS)}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads is {self.threads}; use a positive number or leave it unset")

    @property
    def on_device(self) -> bool:
        return self.provider != "cpu"


def recorded_graph_level(bundle: Bundle, stage: str) -> str:
    """The optimization level `edgeact quantize` checked the stage at; "all" for stages it did not touch."""
    q = bundle.manifest.quantization
    notes = ((q.options.get("stages") or {}).get(stage) or {}) if q else {}
    level = notes.get("ort_graph_optimization") or "all"
    if level not in GRAPH_LEVELS:
        raise BundleError(f"{bundle.root}: stage {stage!r} records graph optimization {level!r}; expected one of "
                          f"{', '.join(GRAPH_LEVELS)}: re-quantize the bundle")
    return level


def trt_profile_options(spec: StageSpec) -> dict[str, str]:
    """The TensorRT EP's explicit profile (trt_profile_{min,opt,max}_shapes): ONE covering every manifest profile.

    onnxruntime's TensorRT EP builds an engine with every profile it is given but runs its execution
    context on profile 0 only (onnxruntime PR #31624, open): a second profile costs build time and memory,
    never serves a step, and a shape only it holds fails. So the one profile spans them all (each dim from
    the smallest min to the largest max), with the decode profile's opt: the step that runs most often
    (DECODE_PROFILE; a stage without one takes its first profile's).
    Format "name:1x7x64,other:...", one entry per input.
    """
    named = profile_dim_ranges(spec)
    profiles = optimization_profiles(spec)
    tuned = next((i for i, (name, _) in enumerate(named) if name == DECODE_PROFILE), 0)
    entries: dict[str, list[str]] = {"min": [], "opt": [], "max": []}
    for tensor in spec.inputs:
        name = tensor.name
        lows = [min(dims) for dims in zip(*(p[name][0] for p in profiles))]
        highs = [max(dims) for dims in zip(*(p[name][2] for p in profiles))]
        for key, shape in (("min", lows), ("opt", profiles[tuned][name][1]), ("max", highs)):
            entries[key].append(f"{name}:{'x'.join(str(s) for s in shape)}")
    return {f"trt_profile_{key}_shapes": ",".join(values) for key, values in entries.items()}


def import_onnxruntime():
    """onnxruntime, or a ConfigError saying which build to install. It is an extra, not a fixed dependency: the
    build is the machine's (PyPI's CPU one, onnxruntime-gpu, or NVIDIA's Jetson wheel), and a dependency on PyPI's
    "onnxruntime" would install the CPU build over a GPU one (both write the same package)."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise ConfigError(f"onnxruntime is not installed ({exc}); install the build for this machine: "
                          "pip install 'edgeact[cpu]' (the CPU build), onnxruntime-gpu with an NVIDIA GPU, or on a "
                          "Jetson NVIDIA's onnxruntime-gpu wheel for its JetPack") from None
    return onnxruntime

def make_session(bundle: Bundle, stage: str, options: OrtOptions):
    ort = import_onnxruntime()

    spec = bundle.stage(stage)
    so = ort.SessionOptions()
    so.log_severity_level = 3          # Q/DQ graphs warn once per unfused pair
    if options.threads:
        so.intra_op_num_threads = options.threads
        so.inter_op_num_threads = 1
    so.enable_cpu_mem_arena = options.cpu_arena != "off"
    so.enable_mem_pattern = options.mem_pattern
    if options.provider == "cpu":
        apply_cpu_emulation(so, spec)
    level = options.graph_optimization or recorded_graph_level(bundle, stage)
    so.graph_optimization_level = {
        "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    providers = _providers(bundle, spec, options, ort.get_available_providers())
    path = bundle.stage_path(stage)
    try:
        session = ort.InferenceSession(str(path), so, providers=providers)
    except Exception as exc:  # onnxruntime raises its own Fail / InvalidGraph / NoSuchFile types
        raise BundleError(f"{path}: onnxruntime cannot load stage {stage!r} with {options.provider} at graph "
                          f"optimization {level!r} ({str(exc).splitlines()[0]}); re-export the bundle, or try "
                          "graph_optimization='basic'") from None
    check_provider(session, stage, options)
    # Loading frees the parsed model's copies of the weights (prepacked kernels keep their own); without a trim
    # glibc keeps those pages: 80 MB of the int8 bench bundle's 394 MB after load (measured, /proc VmRSS).
    release_heap()
    return session


def check_provider(session, stage: str, options: OrtOptions) -> None:
    """Refuse a session whose requested provider is not the one it runs on.

    When a provider fails to initialise (a CPU-only or CUDA-only onnxruntime build, TensorRT or cuDNN libraries
    not found), onnxruntime prints "EP Error ... Falling back to [...]" and makes the session again with the
    fallback providers, without their options: a benchmark or a verification would report the wrong backend.
    """
    wanted, running = PROVIDERS[options.provider][0], session.get_providers()
    if not running or running[0] != wanted:
        actual = running[0] if running else "no provider"
        raise ConfigError(f"stage {stage!r}: onnxruntime runs on {actual}, not the requested {wanted} "
                          f"(provider={options.provider!r}), which failed to initialise (onnxruntime's 'EP Error' "
                          "output says why); install the onnxruntime-gpu build with TensorRT/CUDA (Jetson: "
                          "the JetPack wheel) and put the TensorRT, CUDA and cuDNN libraries on the library path "
                          "(LD_LIBRARY_PATH), or use provider='cpu'")


def trt_cache_path(bundle: Bundle, options: OrtOptions) -> Path:
    """The TensorRT EP's engine cache directory, created here: onnxruntime creates only its last level and fails
    ("Failed to create directory") when its parent is missing, and an exported bundle has no BUNDLE/engines."""
    cache = Path(options.trt_cache_dir) if options.trt_cache_dir else bundle.path(ORT_TRT_CACHE_DIR)
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the TensorRT EP engine cache {cache} ({exc.strerror or exc}); set the "
                          "onnxruntime backend option trt_cache_dir to a writable directory (a bundle on a robot "
                          "may be read-only)") from None
    return cache


def apply_cpu_emulation(session_options, spec: StageSpec) -> None:
    """Session settings for a stage whose precision the CPU provider only emulates (fp8: CPU_FP8_SESSION_CONFIG)."""
    if spec.precision == "fp8":
        for key, value in CPU_FP8_SESSION_CONFIG.items():
            session_options.add_session_config_entry(key, value)


def release_heap() -> None:
    """Return the C heap's free pages to the system (glibc's malloc_trim); a no-op where there is none.

    Freed arena regions smaller than glibc's mmap threshold (which rises to 32 MB after the
    first large free) go back to the heap, not the system: without a trim every large run
    leaves its activations resident. A trim walks the heap once (~0.05 ms measured after 200 MB
    of frees), and runs only after stateless stage runs (each ViT crop) and prefill chunks.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    import ctypes

    try:
        return ctypes.CDLL(None).malloc_trim     # the process's own symbols: glibc's, where it is the C library
    except (OSError, AttributeError):            # musl, macOS: no malloc_trim; their allocators return memory themselves
        return None


def _providers(bundle: Bundle, spec: StageSpec, options: OrtOptions, available: list[str]) -> list:
    wanted = PROVIDERS[options.provider]
    if wanted[0] not in available:
        raise ConfigError(f"onnxruntime here has no {wanted[0]} (it has {', '.join(available)}); install "
                          "onnxruntime-gpu (Jetson: the JetPack wheel) or use provider='cpu'")
    out: list[Any] = []
    for name in wanted:
        if name == "TensorrtExecutionProvider":
            cache = trt_cache_path(bundle, options)
            # An int8 stage's Q/DQ nodes run as int8 only with TensorRT's INT8 flag where the network is weakly
            # typed, as the EP builds it ("to enable any quantized operations, the INT8 flag must be set": TensorRT
            # 8's guide, JetPack 5); with no calibration table named, the graph's own scales are used.
            out.append((name, {"device_id": options.device_id, "trt_fp16_enable": options.trt_fp16,
                               "trt_int8_enable": spec.precision == "int8",
                               "trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache),
                               **trt_profile_options(spec)}))
        elif name == "CUDAExecutionProvider":
            out.append((name, {"device_id": options.device_id, "use_tf32": int(options.cuda_tf32)}))
        else:
            out.append(name)
    return out


class OrtStageEngine(StageEngine):
    """A stateless stage; outputs land in host buffers sized for the stage's largest shapes, allocated once."""

    def __init__(self, bundle: Bundle, name: str, options: OrtOptions):
        self.spec = bundle.stage(name)
        self._profiled = options.provider == "tensorrt"    # the TensorRT EP builds engines for the manifest's profiles
        self.session = make_session(bundle, name, options)
        self._binding = self.session.io_binding()
        self._release = options.arena_shrink
        self._run_options = _run_options(shrink=options.arena_shrink and options.cpu_arena != "off")
        self._keep_run_options = _run_options()      # run(release=False): the next run reuses the arena's regions
        self._where = f"stage {name!r}"
        self._ranges = [r for _, r in profile_dim_ranges(self.spec)] if self._profiled else [self.spec.dim_ranges]
        self._in_dtypes = {t.name: numpy_dtype(t.dtype, f"{self._where} input {t.name!r}") for t in self.spec.inputs}
        input_symbols = {s for t in self.spec.inputs for s in t.symbols()}
        # An output whose dims the inputs fix gets a buffer now; any other is left for onnxruntime to allocate.
        self._outputs = {}
        for t in self.spec.outputs:
            dtype = numpy_dtype(t.dtype, f"{self._where} output {t.name!r}")
            buffer = np.empty(max_shape(t.dims, self.spec), dtype) if set(t.symbols()) <= input_symbols else None
            self._outputs[t.name] = (t, buffer)

    def largest(self, symbol: str) -> int | None:
        if self._profiled:
            return largest_in_profiles([r for _, r in profile_dim_ranges(self.spec)], symbol)
        return super().largest(symbol)

    def run(self, feeds: Mapping[str, np.ndarray], *, release: bool = True) -> dict[str, np.ndarray]:
        # The bound arrays must stay alive until run_with_iobinding returns: keep them in `arrays`. Sizes beyond the
        # limits are refused before they overrun the output buffers (sized for the limits' maxima).
        arrays, values = stage_inputs(self.spec.inputs, self._in_dtypes, feeds, self._where, self._ranges)
        b = self._binding
        for name, array in arrays.items():
            b.bind_cpu_input(name, array)
        out: dict[str, np.ndarray] = {}
        for name, (t, buffer) in self._outputs.items():
            if buffer is None:
                b.bind_output(name, "cpu")
                continue
            shape = resolve_shape(t.dims, values, self._where)
            view = buffer.reshape(-1)[:int(np.prod(shape))].reshape(shape)   # a contiguous prefix of the buffer
            b.bind_output(name, "cpu", 0, buffer.dtype, list(shape), view.ctypes.data)
            out[name] = view
        self.session.run_with_iobinding(b, self._run_options if release else self._keep_run_options)
        if self._release and release:
            release_heap()
        if len(out) < len(self._outputs):
            for name, value in zip(self.session.get_outputs(), b.copy_outputs_to_cpu()):
                out.setdefault(name.name, value)
        return out


class OrtDecoderEngine(DecoderEngine):
    """The decoder through one I/O binding over buffers allocated once: cache, embeddings, positions, hidden states."""

    all_hidden_states = True

    def __init__(self, bundle: Bundle, options: OrtOptions, max_chunk: int):
        self.spec = bundle.stage(io.DECODER_STAGE)
        self.layout = layout = CacheLayout.from_stage(self.spec)
        # The TensorRT provider builds for the manifest's profiles: no chunk longer than they take.
        self.max_chunk = check_max_chunk(max_chunk, layout, [r for _, r in profile_dim_ranges(self.spec)]
                                         if options.provider == "tensorrt" else None)
        if options.on_device:
            require_portable(self.spec, f"onnxruntime's {options.provider} provider")
        self.session = make_session(bundle, io.DECODER_STAGE, options)
        self._binding = self.session.io_binding()
        # One RunOptions for every step: with None, onnxruntime 1.32 keeps ~100 B per call (a leak).
        self._run_options = _run_options()
        # Prefill chunks need activations ~max_chunk times a token's: hand those regions back after
        # the chunk (SHRINK_MIN_TOKENS and more); shorter runs keep theirs.
        self._release = options.arena_shrink
        self._chunk_run_options = _run_options(shrink=options.arena_shrink and options.cpu_arena != "off")
        D, n = layout.hidden_size, self.max_chunk
        self.embeds = np.zeros((n, D), np.float32)
        self._positions = np.zeros(n, np.int64)
        self._ramp = np.arange(n, dtype=np.int64)
        self._hidden = np.zeros((n, D), np.float32)
        if options.on_device:
            self._device = ("cuda", options.device_id)
            self.cache = KVCache(layout, allocate=_ort_device_allocator(options.device_id), device="cuda")
        else:
            self._device = ("cpu", 0)
            self.cache = KVCache(layout)
        # Names, element types and base addresses resolved once; the step does integer arithmetic only.
        self._cache_dtype = layout.numpy_dtype
        self._layers = [(io.past_key(l), io.past_value(l), io.new_key(l), io.new_value(l)) for l in range(layout.n_layers)]
        self._embeds_ptr = self.embeds.ctypes.data
        self._positions_ptr = self._positions.ctypes.data
        self._hidden_ptr = self._hidden.ctypes.data
        self._row = [layout.kv_heads, layout.head_dim]
        if layout.fused:
            # Bound once: seqlens_k (1,) and total_sequence_length () live in _lengths, which each step rewrites;
            # the cache blocks, as past and as present at the same address, which onnxruntime's
            # GroupQueryAttention takes as "update in place".
            self._lengths = np.zeros(2, np.int32)
            address = self._lengths.ctypes.data
            self._binding.bind_input(io.SEQLENS_K, "cpu", 0, np.int32, [1], address)
            self._binding.bind_input(io.TOTAL_SEQUENCE_LENGTH, "cpu", 0, np.int32, [], address + 4)
            block = list(layout.block_shape)
            for layer, (pk, pv, _, _) in enumerate(self._layers):
                for kind, past_name, present_name in ((KEY, pk, io.present_key(layer)), (VALUE, pv, io.present_value(layer))):
                    address = self.cache.pointer(layer, kind)
                    self._binding.bind_input(past_name, "cpu", 0, self._cache_dtype, block, address)
                    self._binding.bind_output(present_name, "cpu", 0, self._cache_dtype, block, address)

    def step(self, n: int) -> np.ndarray:
        if not 1 <= n <= self.max_chunk:
            raise EdgeactError(f"decoder step of {n} positions; this engine takes 1..{self.max_chunk} (max_chunk)")
        self._run(n, self.cache.reserve(n), release=n >= SHRINK_MIN_TOKENS)
        self.cache.commit(n)
        return self._hidden[n - 1]

    def release(self) -> None:
        """One more 1-token run, not committed to the cache, that shrinks the arena: the regions the decode steps
        keep (~60 MB of the int8 bench bundle's, growing with the past) are then not held while the next
        observation's vision and prefill run, which is where the policy's peak is. Costs one decode step."""
        if self._release and self._device[0] == "cpu" and self.cache.length < self.layout.max_seq:
            self._run(1, self.cache.length, release=True)

    def _run(self, n: int, past: int, release: bool) -> None:
        """embeds[:n] at positions past .. past+n-1; new keys/values land in the cache after `past`."""
        np.add(self._ramp[:n], past, out=self._positions[:n])
        b, (device, device_id), dtype = self._binding, self._device, self._cache_dtype
        b.bind_input(io.INPUTS_EMBEDS, "cpu", 0, np.float32, [1, n, self.layout.hidden_size], self._embeds_ptr)
        b.bind_input(io.POSITION_IDS, "cpu", 0, np.int64, [1, n], self._positions_ptr)
        if self.layout.fused:
            self._lengths[0], self._lengths[1] = past + n - 1, past + n
        else:
            past_shape, new_shape = [1, past, *self._row], [1, n, *self._row]
            cache = self.cache
            for layer, (pk, pv, nk, nv) in enumerate(self._layers):
                b.bind_input(pk, device, device_id, dtype, past_shape, cache.pointer(layer, KEY))
                b.bind_input(pv, device, device_id, dtype, past_shape, cache.pointer(layer, VALUE))
                b.bind_output(nk, device, device_id, dtype, new_shape, cache.pointer(layer, KEY, past))
                b.bind_output(nv, device, device_id, dtype, new_shape, cache.pointer(layer, VALUE, past))
        b.bind_output(io.HIDDEN_STATES, "cpu", 0, np.float32, [1, n, self.layout.hidden_size], self._hidden_ptr)
        if not release:                 # decode steps and the answer's short forced runs: the arena's fast path
            self.session.run_with_iobinding(b, self._run_options)
        else:
            self.session.run_with_iobinding(b, self._chunk_run_options)
            if self._release:
                release_heap()

    def hidden_states(self, n: int) -> np.ndarray:
        """(n, D) view of the last step's hidden states (the decode program reads more than the last row only when
        it drafts)."""
        return self._hidden[:n]


def _run_options(shrink: bool = False):
    ort = import_onnxruntime()

    options = ort.RunOptions()
    if shrink:
        options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    # run_with_iobinding looks this key up on every run; absent, the lookup raises and catches an
    # exception (~25 us a step). -1 is "no graph capture", which is what these runs are anyway:
    # the past grows every step, so a captured CUDA/WebGPU graph could never be replayed.
    options.add_run_config_entry("gpu_graph_id", "-1")
    return options


def _ort_device_allocator(device_id: int):
    def allocate(nbytes: int):
        ort = import_onnxruntime()

        value = ort.OrtValue.ortvalue_from_shape_and_type([nbytes], np.uint8, "cuda", device_id)
        return value, value.data_ptr()
    return allocate


@register_backend("onnxruntime")
class OrtBackend(Backend):
    """Opens stages as onnxruntime sessions; options as OrtOptions (threads, provider, graph_optimization ...)."""

    name = "onnxruntime"

    def __init__(self, **options: Any):
        self.options = OrtOptions(**options)
        self.on_device = self.options.on_device

    def stage(self, bundle: Bundle, name: str) -> OrtStageEngine:
        return OrtStageEngine(bundle, name, self.options)

    def decoder(self, bundle: Bundle, max_chunk: int) -> OrtDecoderEngine:
        return OrtDecoderEngine(bundle, self.options, max_chunk)
