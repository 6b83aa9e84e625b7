"""A stage's I/O contract in the bundle manifest: tensors, symbolic dims, their ranges, engine profiles.

Also the field-validation helpers the whole manifest schema shares. Dims are ints or symbols
('seq', 'past_seq') or sums of them ('past_seq+seq'); every symbol has a {min, opt, max}
range. Every shape derives from these alone, here and nowhere else: concrete shapes for the
symbol values of a call, buffer sizes at the ranges' max, and the engine optimization profiles
(min / opt / max shape per input) that the runtime's engines and the exporter's engine builder
(runtime/trt_targets.py) both use.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence, TypeVar

import numpy as np

from edgeact.runtime.errors import BundleError, EdgeactError

# Element types a stage I/O or a weight array may have (ONNX names, lower case; numpy where one exists).
DTYPES = frozenset({
    "float64", "float32", "float16", "bfloat16", "float8e4m3fn", "float8e5m2",
    "int64", "int32", "int16", "int8", "uint8", "int4", "uint4", "bool",
})
# The element types a stage's inputs and outputs can have in host memory (numpy has no bf16, fp8, int4:
# those stay inside the graphs), for every runner that feeds or binds them.
NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32,
                "int8": np.int8, "uint8": np.uint8, "bool": np.bool_}
# Compute precision of a stage graph: what the exporter / quantizer baked into it.
PRECISIONS = ("fp32", "fp16", "bf16", "int8", "fp8", "int4")

_SYMBOL = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
T = TypeVar("T")
Shape = tuple[int, ...]


def field_error(where: str, problem: str) -> BundleError:
    # The loader prefixes the manifest's path and the fix; the writer's caller sees the field and the problem.
    return BundleError(f"{where}: {problem}")


def get_field(data: Any, key: str, kind: type | tuple[type, ...], where: str, default: Any = ...) -> Any:
    if not isinstance(data, dict):
        raise field_error(where, f"expected an object, found {type(data).__name__}")
    if key not in data:
        if default is ...:
            raise field_error(f"{where}.{key}" if where else key, "missing")
        return default
    value = data[key]
    # bool is an int in Python; a dim or a size must not be True.
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise field_error(f"{where}.{key}" if where else key, f"expected {getattr(kind, '__name__', kind)}, found {value!r}")
    return value


def map_fields(data: dict, where: str, build: Callable[[str, Any, str], T]) -> dict[str, T]:
    if not isinstance(data, dict):
        raise field_error(where, "expected an object")
    return {name: build(name, value, f"{where}.{name}") for name, value in data.items()}


def check_relpath(path: str, where: str) -> str:
    """A bundle path is relative, POSIX, and stays inside the bundle (no '..', no absolute path)."""
    if not isinstance(path, str):
        raise field_error(where, f"file path must be a string, found {path!r}")
    parts = path.split("/")
    if not path or path.startswith("/") or "\\" in path or any(p in ("", ".", "..") for p in parts):
        raise field_error(where, f"file path {path!r} must be relative and inside the bundle")
    return path


def numpy_dtype(name: str, where: str):
    """The numpy type of a stage I/O element type, or a BundleError naming the tensor (`where`)."""
    try:
        return NUMPY_DTYPES[name]
    except KeyError:
        raise BundleError(f"{where} is {name}; the runtime feeds and binds {sorted(NUMPY_DTYPES)} only: "
                          "re-export the stage with one of those at its inputs and outputs") from None


# ---------------------------------------------------------------------------------------- dims
def dim_terms(dim: int | str) -> list[int | str]:
    """'past_seq+seq' -> ['past_seq', 'seq']; 'seq' -> ['seq']; 4 -> [4]."""
    if isinstance(dim, int):
        return [dim]
    return [int(t) if t.isdigit() else t for t in dim.replace(" ", "").split("+")]


def _check_dim(dim: Any, where: str) -> int | str:
    if isinstance(dim, bool) or not isinstance(dim, (int, str)):
        raise field_error(where, f"a dim is an int or a symbol such as 'seq', found {dim!r}")
    if isinstance(dim, int):
        if dim < 0:
            raise field_error(where, f"dim {dim} is negative")
        return dim
    for term in dim_terms(dim):
        if isinstance(term, str) and not _SYMBOL.match(term):
            raise field_error(where, f"dim {dim!r} is not a symbol or a sum of symbols such as 'past_seq+seq'")
    return dim.replace(" ", "")


def dim_symbols(dim: int | str) -> list[str]:
    return [t for t in dim_terms(dim) if isinstance(t, str)]


@dataclass(frozen=True)
class DimRange:
    """The sizes a symbolic dim takes: engines are optimized for `opt` and accept min..max."""
    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not (isinstance(self.min, int) and isinstance(self.opt, int) and isinstance(self.max, int)):
            raise BundleError(f"dim range {self} needs integers")
        if not 0 <= self.min <= self.opt <= self.max:
            raise BundleError(f"dim range min={self.min} opt={self.opt} max={self.max} must satisfy 0 <= min <= opt <= max")

    @classmethod
    def coerce(cls, value: Any, where: str) -> "DimRange":
        """From {min, opt, max}, a (min, opt, max) triple, or a DimRange."""
        if isinstance(value, DimRange):
            return value
        try:
            if isinstance(value, dict):
                return cls(int(value["min"]), int(value["opt"]), int(value["max"]))
            lo, opt, hi = value
            return cls(int(lo), int(opt), int(hi))
        except (KeyError, TypeError, ValueError) as exc:
            raise field_error(where, f"a dim range is {{min, opt, max}}, found {value!r} ({exc})") from None
        except BundleError as exc:
            raise field_error(where, str(exc)) from None

    def to_dict(self) -> dict[str, int]:
        return {"min": self.min, "opt": self.opt, "max": self.max}


# -------------------------------------------------------------------------------------- stages
@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    dims: tuple[int | str, ...]
    doc: str = ""

    def __post_init__(self) -> None:
        where = f"tensor {self.name!r}"
        if not self.name:
            raise field_error(where, "empty name")
        if self.dtype not in DTYPES:
            raise field_error(where, f"dtype {self.dtype!r} unknown; use one of {sorted(DTYPES)}")
        object.__setattr__(self, "dims", tuple(_check_dim(d, f"{where} dims") for d in self.dims))

    def symbols(self) -> list[str]:
        return [s for d in self.dims for s in dim_symbols(d)]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "dims": list(self.dims), "doc": self.doc}

    @classmethod
    def from_dict(cls, data: Any, where: str) -> "TensorSpec":
        return cls(name=get_field(data, "name", str, where), dtype=get_field(data, "dtype", str, where),
                   dims=tuple(get_field(data, "dims", list, where)), doc=get_field(data, "doc", str, where, ""))


@dataclass(frozen=True)
class StageProfile:
    """One engine optimization profile: the stage's dim_ranges with these symbols overridden."""
    name: str
    dim_ranges: dict[str, DimRange] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "dim_ranges", {k: DimRange.coerce(v, f"profiles.{self.name}.dim_ranges.{k}")
                                                for k, v in self.dim_ranges.items()})

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dim_ranges": {k: r.to_dict() for k, r in self.dim_ranges.items()}}

    @classmethod
    def from_dict(cls, data: Any, where: str) -> "StageProfile":
        ranges = get_field(data, "dim_ranges", dict, where, {})
        return cls(name=get_field(data, "name", str, where),
                   dim_ranges={k: DimRange.coerce(v, f"{where}.dim_ranges.{k}") for k, v in ranges.items()})


@dataclass(frozen=True)
class StageSpec:
    """One ONNX graph of the model (vision, prefill/decode, ...) and the contract of its I/O."""
    name: str
    file: str
    precision: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dim_ranges: dict[str, DimRange] = field(default_factory=dict)
    profiles: tuple[StageProfile, ...] = ()
    external_data: tuple[str, ...] = ()   # ONNX external-data files beside `file`
    doc: str = ""

    def __post_init__(self) -> None:
        where = f"stages.{self.name}"
        check_relpath(self.file, f"{where}.file")
        for ext in self.external_data:
            check_relpath(ext, f"{where}.external_data")
        # Exporters may pass lists, tuples and (min, opt, max) triples: hold one canonical form.
        for kind in ("inputs", "outputs"):
            object.__setattr__(self, kind, tuple(
                t if isinstance(t, TensorSpec) else TensorSpec.from_dict(t, f"{where}.{kind}") for t in getattr(self, kind)))
        object.__setattr__(self, "external_data", tuple(self.external_data))
        object.__setattr__(self, "dim_ranges", {k: DimRange.coerce(v, f"{where}.dim_ranges.{k}")
                                                for k, v in self.dim_ranges.items()})
        object.__setattr__(self, "profiles", tuple(
            p if isinstance(p, StageProfile) else StageProfile.from_dict(p, f"{where}.profiles") for p in self.profiles))
        if self.precision not in PRECISIONS:
            raise field_error(where, f"precision {self.precision!r} unknown; use one of {', '.join(PRECISIONS)}")
        if not self.inputs or not self.outputs:
            raise field_error(where, "a stage needs at least one input and one output")
        names = [t.name for t in (*self.inputs, *self.outputs)]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise field_error(where, f"tensor names {dupes} appear more than once")
        used = {s for t in self.inputs + self.outputs for s in t.symbols()}
        missing = sorted(used - set(self.dim_ranges))
        if missing:
            raise field_error(where, f"symbolic dims {missing} have no dim_ranges entry; every symbol needs {{min, opt, max}}")
        seen_profiles = set()
        for profile in self.profiles:
            unknown = sorted(set(profile.dim_ranges) - set(self.dim_ranges))
            if unknown:
                raise field_error(f"{where}.profiles.{profile.name}", f"overrides unknown symbols {unknown}")
            if profile.name in seen_profiles:
                raise field_error(f"{where}.profiles", f"profile {profile.name!r} appears twice")
            seen_profiles.add(profile.name)

    def files(self) -> tuple[str, ...]:
        return (self.file, *self.external_data)

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file, "precision": self.precision,
            "inputs": [t.to_dict() for t in self.inputs], "outputs": [t.to_dict() for t in self.outputs],
            "dim_ranges": {k: r.to_dict() for k, r in self.dim_ranges.items()},
            "profiles": [p.to_dict() for p in self.profiles],
            "external_data": list(self.external_data), "doc": self.doc,
        }

    @classmethod
    def from_dict(cls, name: str, data: Any, where: str) -> "StageSpec":
        return cls(
            name=name, file=get_field(data, "file", str, where), precision=get_field(data, "precision", str, where),
            inputs=tuple(TensorSpec.from_dict(t, f"{where}.inputs") for t in get_field(data, "inputs", list, where)),
            outputs=tuple(TensorSpec.from_dict(t, f"{where}.outputs") for t in get_field(data, "outputs", list, where)),
            dim_ranges={k: DimRange.coerce(v, f"{where}.dim_ranges.{k}")
                        for k, v in get_field(data, "dim_ranges", dict, where, {}).items()},
            profiles=tuple(StageProfile.from_dict(p, f"{where}.profiles") for p in get_field(data, "profiles", list, where, [])),
            external_data=tuple(get_field(data, "external_data", list, where, [])),
            doc=get_field(data, "doc", str, where, ""),
        )


# ------------------------------------------------------------------------ shapes and profiles
def resolve_dim(dim: int | str, ranges: Mapping[str, DimRange]) -> DimRange:
    """Range of one dim: an int is fixed; a symbol reads its range; 'past_seq+seq' adds the ranges."""
    lo = opt = hi = 0
    for term in dim_terms(dim):
        if isinstance(term, int):
            r = DimRange(term, term, term)
        elif term in ranges:
            r = ranges[term]
        else:
            raise BundleError(f"dim {dim!r}: symbol {term!r} has no range; add it to the stage's dim_ranges")
        lo, opt, hi = lo + r.min, opt + r.opt, hi + r.max
    return DimRange(lo, opt, hi)


def resolve_shape(dims: Sequence[int | str], values: Mapping[str, int], where: str) -> Shape:
    """Concrete shape of dims like (batch, 'past_seq+seq', 4) for symbol values."""
    shape = []
    for dim in dims:
        total = 0
        for term in dim_terms(dim):
            if isinstance(term, int):
                total += term
            elif term in values:
                total += values[term]
            else:
                raise BundleError(f"{where}: dim {dim!r} depends on {term!r}, which no input fixes")
        shape.append(total)
    return tuple(shape)


def max_shape(dims: Sequence[int | str], spec: StageSpec) -> Shape:
    """Largest shape a tensor takes within the stage's dim_ranges (what buffers are sized for)."""
    return resolve_shape(dims, {k: r.max for k, r in spec.dim_ranges.items()}, f"stage {spec.name!r}")


def bind_symbols(specs: Sequence[TensorSpec], shapes: Mapping[str, Sequence[int]], where: str) -> dict[str, int]:
    """Values of the symbolic dims, read off concrete input shapes; refuses inconsistent or wrong-rank inputs."""
    values: dict[str, int] = {}
    for spec in specs:
        shape = tuple(shapes[spec.name])
        if len(shape) != len(spec.dims):
            raise EdgeactError(f"{where}: input {spec.name!r} has shape {list(shape)}, expected {list(spec.dims)}")
        for axis, (dim, size) in enumerate(zip(spec.dims, shape)):
            if isinstance(dim, int):
                if dim != size:
                    raise EdgeactError(f"{where}: input {spec.name!r} axis {axis} is {size}, the stage takes {dim}")
            elif dim_terms(dim) == [dim]:      # a plain symbol fixes its value; sums are checked below
                if values.setdefault(dim, size) != size:
                    raise EdgeactError(f"{where}: dim {dim!r} is {values[dim]} in one input and {size} in "
                                       f"{spec.name!r}; inputs must agree")
    return values


def select_profile(ranges: Sequence[Mapping[str, DimRange]], values: Mapping[str, int], where: str = "") -> int:
    """Index of the narrowest profile whose ranges hold every symbol value (ties: the lower index); an EdgeactError
    naming the sizes and the limits when none does: the engines' buffers are sized for the limits' maxima."""
    best, best_span = -1, None
    for index, profile in enumerate(ranges):
        if all(name not in profile or profile[name].min <= v <= profile[name].max for name, v in values.items()):
            span = sum(profile[name].max - profile[name].min for name in values if name in profile)
            if best_span is None or span < best_span:
                best, best_span = index, span
    if best < 0:
        raise EdgeactError(f"{where + ': ' if where else ''}no engine profile holds {dict(values)}; profiles: "
                           + "; ".join(str({k: (r.min, r.max) for k, r in p.items()}) for p in ranges)
                           + ". Feed smaller inputs (fewer crops, smaller chunks), or export the bundle (rebuild "
                             "the engines) with wider dim_ranges")
    return best


def stage_inputs(specs: Sequence[TensorSpec], dtypes: Mapping[str, Any], feeds: Mapping[str, Any], where: str,
                 ranges: Sequence[Mapping[str, DimRange]]) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """The feeds as contiguous arrays of the stage's input types, and the symbolic dims' values they bind.

    Refused with the input named: a missing input; a value of another kind than the stage's (integer pixels for
    float ones, float indices for integer ones: converting would run and give garbage; float64 for float32 is
    fine); a shape the stage does not take; sizes no profile of `ranges` holds (beyond the buffers)."""
    missing = sorted(set(dtypes) - set(feeds))
    if missing:
        raise EdgeactError(f"{where}: inputs {missing} not given; it takes {list(dtypes)}")
    arrays = {}
    for name, dtype in dtypes.items():
        given = np.asarray(feeds[name])
        kind, want = given.dtype.kind, np.dtype(dtype).kind
        if not (kind == want or (kind in "iu" and want in "iu")):
            raise EdgeactError(f"{where}: input {name!r} is {given.dtype} and the stage takes {np.dtype(dtype)}; "
                               f"give {np.dtype(dtype)} values (the runtime's preprocessing makes them)")
        arrays[name] = np.ascontiguousarray(given, dtype=dtype)
    values = bind_symbols(specs, {k: a.shape for k, a in arrays.items()}, where)
    select_profile(ranges, values, where)
    return arrays, values


def profile_dim_ranges(spec: StageSpec) -> list[tuple[str, dict[str, DimRange]]]:
    """(profile name, symbol ranges) per engine profile in manifest order; one 'default' when none are declared."""
    if not spec.profiles:
        return [("default", dict(spec.dim_ranges))]
    return [(p.name, {**spec.dim_ranges, **p.dim_ranges}) for p in spec.profiles]


def largest_in_profiles(ranges: Sequence[Mapping[str, DimRange]], symbol: str) -> int | None:
    """The largest value of `symbol` that any of these profiles' ranges holds; None where none names it."""
    values = [r[symbol].max for r in ranges if symbol in r]
    return max(values) if values else None


def optimization_profiles(spec: StageSpec) -> list[dict[str, tuple[Shape, Shape, Shape]]]:
    """Per engine profile (profile_dim_ranges order), {input name: (min shape, opt shape, max shape)}."""
    profiles = []
    for _, ranges in profile_dim_ranges(spec):
        shapes = {}
        for tensor in spec.inputs:
            dims = [resolve_dim(d, ranges) for d in tensor.dims]
            shapes[tensor.name] = (tuple(r.min for r in dims), tuple(r.opt for r in dims), tuple(r.max for r in dims))
        profiles.append(shapes)
    return profiles
