"""Memory as the decoder sees it: the machine's streaming bandwidth, weight bytes read per decode token, peak RSS of a policy.

Decoding one token reads every weight of the decoder once (plus a few LM-head rows and one
embedding row), so on any machine a decoder step is bounded by `bandwidth / bytes per token`;
how close a backend gets to that bound says how much is left to win. All of this is numpy and
the standard library: the ONNX graph is read with a small protobuf reader (the robot has
onnxruntime, not the onnx package), and a policy's resident memory is measured in a fresh
process (`python -m edgeact.runtime.membw BUNDLE`) so that nothing else the caller loaded counts.
"""
from __future__ import annotations

import argparse
import json
import math
import mmap
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edgeact.runtime import stage_io as io
from edgeact.runtime.errors import BundleError, ConfigError, EdgeactError
from edgeact.runtime.protobuf_wire import fields, varint
# One budget for every report: resident memory <= 1.3 x the bundle's bytes + 300 MB.
from edgeact.runtime.telemetry import MEMORY_BUDGET_EXTRA_BYTES, MEMORY_BUDGET_FACTOR

DEFAULT_PROBE_BYTES = 512 << 20
ACTION_HEAD_ROWS = 256            # the widest closed choice set (action bins): the sliced head's most rows per step
# ONNX TensorProto.DataType -> (name, bits per element)
ONNX_DTYPES = {
    1: ("float32", 32), 2: ("uint8", 8), 3: ("int8", 8), 4: ("uint16", 16), 5: ("int16", 16), 6: ("int32", 32),
    7: ("int64", 64), 9: ("bool", 8), 10: ("float16", 16), 11: ("float64", 64), 12: ("uint32", 32),
    13: ("uint64", 64), 14: ("complex64", 64), 15: ("complex128", 128), 16: ("bfloat16", 16),
    17: ("float8e4m3fn", 8), 18: ("float8e4m3fnuz", 8), 19: ("float8e5m2", 8), 20: ("float8e5m2fnuz", 8),
    21: ("uint4", 4), 22: ("int4", 4), 23: ("float4e2m1", 4), 24: ("float8e8m0", 8),
}


# ------------------------------------------------------------------------------------- bandwidth
@dataclass(frozen=True)
class Bandwidth:
    """Best-of-N streaming rates in GB/s (1e9 bytes/s); copy counts bytes read plus bytes written (STREAM's rule)."""
    read_gb_s: float
    copy_gb_s: float
    array_bytes: int
    threads: int
    repeats: int


def measure_bandwidth(array_bytes: int = DEFAULT_PROBE_BYTES, threads: int = 1, repeats: int = 5) -> Bandwidth:
    """Read a float64 array much larger than the caches (read), and copy half of it into a second buffer (copy).

    `threads` workers each stream their own slice at once (numpy releases the GIL in these reads and
    copies), as the decoder's intra-op threads do: one core alone rarely saturates the memory bus.
    The read rate is the best of three streaming reads: np.sum, a BLAS dot of each slice with itself
    (only with a thread per core: BLAS threads itself), and an OR-reduction of its bits. np.sum alone is not enough: its pairwise summation is bound by
    arithmetic (19 GB/s a core, 37-40 GB/s on 2 cores of the 2-core machine this was measured on),
    where the dot streams 64-68 GB/s and an fp32 decoder's GEMVs 49 GB/s. The best of `repeats` is
    kept: other processes only ever make a run slower.
    """
    if array_bytes < (1 << 20) or threads < 1 or repeats < 1:
        raise ConfigError(f"bandwidth probe of {array_bytes} bytes, {threads} threads, {repeats} repeats: use at "
                          "least 1 MiB (512 MiB or more for a figure that is not the cache's), 1 thread, 1 repeat")
    data = np.ones(array_bytes // 8, np.float64)                    # written once: every page is resident
    half = len(data) // 2
    target = np.zeros(half, np.float64)
    reads = np.array_split(data, threads)
    sources, targets = np.array_split(data[:half], threads), np.array_split(target, threads)
    words = [part.view(np.uint64) for part in reads]
    # The BLAS dot runs on BLAS's own thread pool, sized to every core whatever `threads` says: with fewer
    # threads than cores it would measure more cores than the decoder it bounds may use, so it is left out.
    dot = threads >= _cores()
    with ThreadPoolExecutor(threads) as pool:
        read_s = min(_best(lambda: list(pool.map(np.sum, reads)), repeats),
                     _best(lambda: list(pool.map(lambda part: np.dot(part, part), reads)), repeats) if dot else math.inf,
                     _best(lambda: list(pool.map(np.bitwise_or.reduce, words)), repeats))
        copy_s = _best(lambda: list(pool.map(np.copyto, targets, sources)), repeats)
    return Bandwidth(read_gb_s=data.nbytes / read_s / 1e9, copy_gb_s=2 * target.nbytes / copy_s / 1e9,
                     array_bytes=data.nbytes, threads=threads, repeats=repeats)


def _cores() -> int:
    """The cores this process may run on (its affinity), as BLAS sizes its pool."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:      # not Linux
        return os.cpu_count() or 1


def best_of(probes: list[Bandwidth]) -> Bandwidth:
    """One figure from probes taken at different moments (e.g. before and after a measurement it bounds):
    each rate's best, as within a probe, since other processes only ever make a probe slower."""
    if not probes:
        raise ValueError("best_of: no bandwidth probe given")
    return Bandwidth(read_gb_s=max(p.read_gb_s for p in probes), copy_gb_s=max(p.copy_gb_s for p in probes),
                     array_bytes=probes[0].array_bytes, threads=probes[0].threads,
                     repeats=sum(p.repeats for p in probes))


def _best(run, repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return max(best, 1e-9)


# -------------------------------------------------------------------------- ONNX initializers
@dataclass(frozen=True)
class Initializer:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    consumers: tuple[str, ...]        # op types of the nodes that read it
    packed_bits: int | None = None    # weights of a MatMulNBits node: its `bits` (4 or 8) per packed weight

    @property
    def kind(self) -> str:
        """The dtype, except MatMulNBits' packed weights, which are uint8 only in name: int4-packed, int8-packed."""
        return f"int{self.packed_bits}-packed" if self.packed_bits else self.dtype


def onnx_initializers(path: str | Path) -> list[Initializer]:
    """Every initializer of an ONNX graph file (external data or not), without loading the weights.

    Sizes come from dims x element width, so weights stored in a .onnx.data file count the same
    as inline ones. The file is memory-mapped and length-delimited fields are skipped unread.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            graphs = [value for number, wire, value in fields(buf, 0, len(buf)) if number == 7 and wire == 2]
            if not graphs:
                raise BundleError(f"{path}: no graph in this file; is it an ONNX model? re-export the bundle")
            tensors, consumers, packed = [], {}, {}
            for number, wire, value in fields(buf, *graphs[-1]):
                if number == 5 and wire == 2:                # GraphProto.initializer
                    tensors.append(_tensor(buf, *value))
                elif number == 1 and wire == 2:              # GraphProto.node
                    op, inputs, bits = _node(buf, *value)
                    for name in inputs:
                        consumers.setdefault(name, []).append(op)
                    if op == "MatMulNBits" and len(inputs) > 1:
                        packed[inputs[1]] = bits             # input 1: the packed weight blob
    except (OSError, ValueError, IndexError) as exc:
        raise BundleError(f"{path}: cannot read it as an ONNX graph ({exc}); re-copy or re-export the bundle") from None
    out = []
    for name, dtype, shape in tensors:
        if dtype not in ONNX_DTYPES:
            raise BundleError(f"{path}: initializer {name!r} has ONNX data type {dtype}, which this count does not "
                              "size; update edgeact (runtime/membw.py ONNX_DTYPES)")
        kind, bits = ONNX_DTYPES[dtype]
        out.append(Initializer(name, kind, shape, (math.prod(shape) * bits + 7) // 8,
                               tuple(sorted(set(consumers.get(name, ())))), packed.get(name)))
    return out


def _tensor(buf, start: int, end: int) -> tuple[str, int, tuple[int, ...]]:
    """TensorProto: dims (1, packed or not), data_type (2), name (8)."""
    name, dtype, dims = "", 0, []
    for number, wire, value in fields(buf, start, end):
        if number == 1:
            if wire == 0:
                dims.append(value)
            else:
                pos, stop = value
                while pos < stop:
                    dim, pos = varint(buf, pos, stop)
                    dims.append(dim)
        elif number == 2 and wire == 0:
            dtype = value
        elif number == 8 and wire == 2:
            name = bytes(buf[value[0]:value[1]]).decode()
    return name, dtype, tuple(dims)


def _node(buf, start: int, end: int) -> tuple[str, list[str], int]:
    """NodeProto: inputs (1), op_type (4), and the int attribute `bits` (5: AttributeProto name 1, i 3; default 4)."""
    op, inputs, bits = "", [], 4
    for number, wire, value in fields(buf, start, end):
        if wire != 2:
            continue
        if number in (1, 4):
            text = bytes(buf[value[0]:value[1]]).decode()
            if number == 1:
                inputs.append(text)
            else:
                op = text
        elif number == 5:
            attribute = {n: v for n, w, v in fields(buf, *value) if n in (1, 3)}
            name = attribute.get(1)
            if isinstance(name, tuple) and bytes(buf[name[0]:name[1]]) == b"bits" and isinstance(attribute.get(3), int):
                bits = attribute[3]
    return op, inputs, bits


# ----------------------------------------------------------------------------- bytes per token
@dataclass(frozen=True)
class TokenBytes:
    """Bytes one single-token decode step reads besides the KV cache, and the cache's bytes per position."""
    decoder_by_kind: dict[str, int]   # the decoder stage's initializers by dtype (int4-packed: MatMulNBits blobs)
    head_bytes: int                   # LM-head rows of the widest closed set, as float32 (the decode program's slice)
    embedding_bytes: int              # one row of the embedding table
    kv_bytes_per_position: int        # keys and values of every layer, one position: read once per step per position

    @property
    def decoder_bytes(self) -> int:
        return sum(self.decoder_by_kind.values())

    @property
    def total(self) -> int:
        return self.decoder_bytes + self.head_bytes + self.embedding_bytes

    def to_dict(self) -> dict:
        return {**asdict(self), "decoder_bytes": self.decoder_bytes, "total": self.total}


def decode_bytes_per_token(bundle, head_rows: int = ACTION_HEAD_ROWS) -> TokenBytes:
    """What one decode step of `bundle` (a runtime.bundle.Bundle) reads from memory, KV cache aside."""
    from edgeact.runtime.kv_cache import CacheLayout

    by_kind: dict[str, int] = {}
    for init in onnx_initializers(bundle.stage_path(io.DECODER_STAGE)):
        by_kind[init.kind] = by_kind.get(init.kind, 0) + init.nbytes
    embedding = bundle.manifest.weights[io.EMBEDDING_WEIGHT]
    hidden = bundle.manifest.weights[io.LM_HEAD_WEIGHT].shape[1]
    layout = CacheLayout.from_stage(bundle.stage(io.DECODER_STAGE))
    return TokenBytes(decoder_by_kind=dict(sorted(by_kind.items())), head_bytes=head_rows * hidden * 4,
                      embedding_bytes=embedding.shape[1] * np.dtype(embedding.dtype).itemsize,
                      kv_bytes_per_position=2 * layout.n_layers * layout.row_bytes)


def bandwidth_limit_tokens_s(bandwidth_gb_s: float, bytes_per_token: int) -> float:
    """Decode steps per second if every step only streamed its bytes at `bandwidth_gb_s`."""
    if bytes_per_token <= 0:
        raise EdgeactError(f"{bytes_per_token} bytes per token: a decoder step reads its weights; count them first")
    return bandwidth_gb_s * 1e9 / bytes_per_token


# ------------------------------------------------------------------------------- resident memory
@dataclass(frozen=True)
class PolicyMemory:
    """Peak resident memory of a process that loaded a bundle policy and ran `steps` policy steps."""
    bundle: str
    bundle_bytes: int
    rss_after_load_bytes: int
    peak_rss_bytes: int
    steps: int
    threads: int | None
    budget_bytes: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "budget_bytes", int(MEMORY_BUDGET_FACTOR * self.bundle_bytes + MEMORY_BUDGET_EXTRA_BYTES))

    @property
    def budget_ratio(self) -> float:
        """Peak RSS over 1.3 x bundle bytes + 300 MB: at most 1 is within budget."""
        return self.peak_rss_bytes / self.budget_bytes

    def to_dict(self) -> dict:
        return {**asdict(self), "budget_ratio": self.budget_ratio}


def policy_peak_rss(bundle_dir: str | Path, steps: int = 2, threads: int | None = None,
                    frame_px: tuple[int, int] = (640, 480), timeout_s: float = 900.0) -> PolicyMemory:
    """Run a BundlePolicy for `steps` steps in a fresh Python process and read its peak RSS (VmHWM)."""
    if steps < 1:
        raise ConfigError(f"steps is {steps}; the peak comes with the first step's buffers: run at least 1")
    command = [sys.executable, "-m", "edgeact.runtime.membw", str(bundle_dir), "--steps", str(steps),
               "--frame-px", f"{frame_px[0]}x{frame_px[1]}"] + (["--threads", str(threads)] if threads else [])
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise EdgeactError(f"{bundle_dir}: the memory probe ran over {timeout_s:g} s; pass fewer steps") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise EdgeactError(f"{bundle_dir}: the memory probe process failed ({last})")
    return PolicyMemory(**json.loads(done.stdout.strip().splitlines()[-1]))


def _memory_kb(key: str) -> int:
    """A VmRSS / VmHWM line of /proc/self/status in kB; where there is none, getrusage's maximum."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak      # bytes on macOS, kB on Linux


def _probe_main(argv: list[str] | None = None) -> int:
    """The child of policy_peak_rss: load, step, print one JSON line."""
    parser = argparse.ArgumentParser(prog="python -m edgeact.runtime.membw",
                                     description="peak resident memory of a bundle policy (prints JSON)")
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--frame-px", default="640x480", help="synthetic camera WIDTHxHEIGHT")
    args = parser.parse_args(argv)
    from edgeact.drivers.cameras.synthetic import SyntheticCamera, SyntheticConfig
    from edgeact.runtime.bundle_policy import BundlePolicy
    from edgeact.runtime.ort_engine import release_heap

    width, height = (int(v) for v in args.frame_px.split("x"))
    # The frames come first, as a camera driver's buffers would: the synthetic camera's ray casting takes ~60 MB of
    # float64 scratch per 640x480 frame, which is the test source's memory, not the runtime's.
    camera = SyntheticCamera(SyntheticConfig(width=width, height=height))
    frames = [camera.render(11 * k).color for k in range(args.steps)]
    del camera
    release_heap()
    policy = BundlePolicy(args.bundle, threads=args.threads, allow_unverified=True, verify_checksums=False)
    after_load = _memory_kb("VmRSS")
    for frame in frames:
        policy.infer(frame, "pick up the red block")
    print(json.dumps({"bundle": str(args.bundle), "bundle_bytes": policy.bundle.total_bytes(),
                      "rss_after_load_bytes": after_load * 1024, "peak_rss_bytes": _memory_kb("VmHWM") * 1024,
                      "steps": args.steps, "threads": args.threads}))
    return 0


if __name__ == "__main__":
    sys.exit(_probe_main())
