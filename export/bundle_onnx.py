"""Place a stage's ONNX graph (and its external-data files) in a bundle, and hold its I/O to the manifest.

The manifest's I/O specs are what the runtime binds and what engine profiles derive from,
so they must be the graph's own: same names, element types, ranks and fixed sizes.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Sequence

from edgeact.runtime.errors import BundleError
from edgeact.runtime.stage_spec import TensorSpec, check_relpath

# (name, dtype, dims) with None for a dim the graph leaves unnamed and unsized.
GraphTensor = tuple[str, str, tuple[int | str | None, ...]]
_ONNX_DTYPE_RENAMES = {"float": "float32", "double": "float64"}


def place_model(model: Any, tmp_dir: Path, stage_name: str, external_data: bool
                ) -> tuple[str, list[str], tuple[list[GraphTensor], list[GraphTensor]]]:
    """Put `model` (ModelProto or path) into the bundle; returns (file, external files, (inputs, outputs))."""
    import onnx

    tmp_dir = tmp_dir.absolute()
    if isinstance(model, (str, Path)):
        src = Path(model).absolute()
        if not src.is_file():
            raise BundleError(f"{src}: ONNX file for stage {stage_name!r} not found")
        if src.is_relative_to(tmp_dir):
            dest = src                                    # the exporter wrote it in place
        else:
            dest = tmp_dir / "stages" / f"{stage_name}.onnx"
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dest)
            for loc in external_locations(src):
                data = src.parent / loc
                if not data.is_file():
                    raise BundleError(f"{data}: external data of {src.name} (stage {stage_name!r}) not found; "
                                      "copy it beside the .onnx file")
                (dest.parent / loc).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(data, dest.parent / loc)
    elif isinstance(model, onnx.ModelProto):
        dest = tmp_dir / "stages" / f"{stage_name}.onnx"
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            onnx.save_model(model, str(dest), save_as_external_data=external_data, all_tensors_to_one_file=True,
                            location=f"{stage_name}.onnx.data")
        except ValueError as exc:   # protobuf refuses messages over 2 GB
            raise BundleError(f"stage {stage_name!r}: cannot save the graph ({exc}); pass external_data=True") from None
    else:
        raise BundleError(f"stage {stage_name!r}: expected an onnx.ModelProto or a path, got {type(model).__name__}")

    proto = onnx.load(str(dest), load_external_data=False)
    rel = dest.relative_to(tmp_dir).as_posix()
    ext_files = []
    for loc in external_locations(dest):
        ext_rel = check_relpath((dest.parent / loc).relative_to(tmp_dir).as_posix(), f"stages.{stage_name}.external_data")
        if not (tmp_dir / ext_rel).is_file():
            raise BundleError(f"{ext_rel}: external data of stage {stage_name!r} is missing; write it beside {rel}")
        ext_files.append(ext_rel)
    return rel, sorted(set(ext_files)), graph_io(proto)


def external_locations(onnx_path: Path) -> list[str]:
    """Relative paths of the external-data files a graph refers to (initializers, constants, subgraphs), as the
    runtime's loader reads them (runtime/onnx_refs.py)."""
    from edgeact.runtime.onnx_refs import external_files

    found = external_files(onnx_path)
    for loc, tensors in found.items():
        if not loc or loc.startswith("/") or ".." in Path(loc).parts:
            raise BundleError(f"tensor {tensors[0]!r}: external data location {loc!r} must be a relative "
                              "path beside the .onnx file")
    return sorted(found)


def graph_io(proto) -> tuple[list[GraphTensor], list[GraphTensor]]:
    import onnx

    initializers = {t.name for t in proto.graph.initializer}

    def describe(value_info) -> GraphTensor:
        ttype = value_info.type.tensor_type
        name = onnx.TensorProto.DataType.Name(ttype.elem_type).lower()
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param.replace(" ", "") or None)
                     if d.HasField("dim_param") else None for d in ttype.shape.dim)
        return value_info.name, _ONNX_DTYPE_RENAMES.get(name, name), dims

    inputs = [describe(v) for v in proto.graph.input if v.name not in initializers]
    return inputs, [describe(v) for v in proto.graph.output]


def reconcile_io(stage: str, kind: str, declared: Sequence[TensorSpec | dict] | None,
                 graph: list[GraphTensor]) -> tuple[TensorSpec, ...]:
    """The declared specs, checked against the graph; or, when none are declared, the graph's own."""
    where = f"stage {stage!r}"
    if declared is None:
        specs = []
        for name, dtype, dims in graph:
            if None in dims:
                raise BundleError(f"{where}: {kind} {name!r} has a dim with neither size nor name in the graph "
                                  f"(dims {list(dims)}); pass {kind}s=[...] with a symbol for it, or name the dynamic axis at export")
            specs.append(TensorSpec(name=name, dtype=dtype, dims=tuple(dims)))
        return tuple(specs)
    specs = [d if isinstance(d, TensorSpec) else TensorSpec.from_dict(d, f"stages.{stage}.{kind}s") for d in declared]
    by_name = {name: (dtype, dims) for name, dtype, dims in graph}
    missing = [s.name for s in specs if s.name not in by_name]
    extra = sorted(set(by_name) - {s.name for s in specs})
    if missing or extra:
        raise BundleError(f"{where}: declared {kind}s do not match the graph: not in the graph {missing}, "
                          f"undeclared {extra}; declare exactly the graph's {kind}s {list(by_name)}")
    for spec in specs:
        dtype, dims = by_name[spec.name]
        if dtype != spec.dtype:
            raise BundleError(f"{where}: {kind} {spec.name!r} is {dtype} in the graph but declared {spec.dtype}")
        if len(dims) != len(spec.dims):
            raise BundleError(f"{where}: {kind} {spec.name!r} has rank {len(dims)} in the graph {list(dims)} "
                              f"but {len(spec.dims)} declared {list(spec.dims)}")
        for axis, (have, want) in enumerate(zip(dims, spec.dims)):
            if isinstance(have, int) and have != want:
                raise BundleError(f"{where}: {kind} {spec.name!r} axis {axis} is fixed to {have} in the graph but "
                                  f"declared {want!r}; export it with a dynamic axis or declare {have}")
    return tuple(specs)
