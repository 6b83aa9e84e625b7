"""The files an ONNX graph reads besides itself: its tensors' external-data locations, read on the robot.

A bundle lists and checksums every stage file, and a stage's external-data files in `StageSpec.external_data`. What
the inference engine reads, though, is what the graph names: a location the manifest does not list (another file
beside it, `../../x`, an absolute path) would be read unchecked, and onnxruntime 1.23 (JetPack 6's) follows such
paths. `external_files` lists them so that the loader can hold them to the manifest.

The runtime has no `onnx` package (the robot carries onnxruntime only): the few fields on the way to a tensor's
external data are read from the wire format on a memory map (runtime/protobuf_wire.py), skipping weights unread.
The field numbers are onnx.proto's (onnx/onnx.proto, IR version 10).
"""
from __future__ import annotations

import mmap
from pathlib import Path

from edgeact.runtime.errors import BundleError
from edgeact.runtime.protobuf_wire import LEN, VARINT, WireError, fields

# message -> {field number: message it holds}: only the paths that lead to a TensorProto
_MODEL, _GRAPH, _NODE, _ATTRIBUTE, _TENSOR, _SPARSE, _FUNCTION = range(7)
_PATHS = {
    _MODEL: {7: _GRAPH, 25: _FUNCTION},                         # graph, functions
    _FUNCTION: {7: _NODE},                                      # node
    _GRAPH: {1: _NODE, 5: _TENSOR, 15: _SPARSE},                # node, initializer, sparse_initializer
    _NODE: {5: _ATTRIBUTE},                                     # attribute
    _ATTRIBUTE: {5: _TENSOR, 6: _GRAPH, 10: _TENSOR, 11: _GRAPH, 22: _SPARSE, 23: _SPARSE},   # t, g, tensors, ...
    _SPARSE: {1: _TENSOR, 2: _TENSOR},                          # values, indices
}
_TENSOR_NAME, _TENSOR_EXTERNAL, _TENSOR_LOCATION = 8, 13, 14   # name, external_data, data_location
_EXTERNAL = 1                                                   # TensorProto.DataLocation.EXTERNAL


def _tensor_locations(buf, start: int, end: int) -> tuple[str, list[str]]:
    """A TensorProto's (name, the location values of its external data when its data lies outside)."""
    name, locations, external = "", [], False
    for number, wire, value in fields(buf, start, end):
        if number == _TENSOR_NAME and wire == LEN:
            name = bytes(buf[value[0]:value[1]]).decode("utf-8", "replace")
        elif number == _TENSOR_LOCATION and wire == VARINT:
            external = value == _EXTERNAL
        elif number == _TENSOR_EXTERNAL and wire == LEN:
            entry = {n: bytes(buf[v[0]:v[1]]).decode("utf-8", "replace")
                     for n, w, v in fields(buf, *value) if w == LEN and n in (1, 2)}
            if entry.get(1) == "location":
                locations.append(entry.get(2, ""))
    return name, [""] if external and not locations else locations     # "": external, with no location


def external_files(onnx_path: str | Path) -> dict[str, list[str]]:
    """{location as the graph writes it: [tensors whose data it holds]} for every tensor with external data."""
    path = Path(onnx_path)
    found: dict[str, list[str]] = {}
    with open(path, "rb") as f:
        if f.seek(0, 2) == 0:
            return found
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            stack = [(_MODEL, 0, len(buf))]
            try:
                while stack:
                    kind, start, end = stack.pop()
                    if kind == _TENSOR:
                        name, locations = _tensor_locations(buf, start, end)
                        for location in locations:
                            found.setdefault(location, []).append(name)
                        continue
                    paths = _PATHS[kind]
                    for number, wire, value in fields(buf, start, end):
                        if wire == LEN and number in paths:
                            stack.append((paths[number], *value))
            except (WireError, IndexError):
                raise BundleError(f"{path}: not a readable ONNX graph (its protobuf encoding is broken); the file is "
                                  "corrupt: copy the bundle again") from None
    return found


def check_external_files(onnx_path: Path, stage_dir_rel: str, listed: tuple[str, ...], where: str) -> None:
    """Refuse a graph that reads any file other than its stage's listed external data (`listed`, bundle-relative):
    a location outside the bundle, absolute, or not in the manifest (so never checksummed)."""
    for location, tensors in external_files(onnx_path).items():
        parts = location.replace("\\", "/").split("/")
        # './x' and 'a//x' name what 'x' and 'a/x' do (the exporter lists them so); '..' never stays inside
        rel = "/".join([p for p in stage_dir_rel.split("/") if p] + [p for p in parts if p not in ("", ".")])
        if (not location or location.startswith(("/", "\\")) or ":" in parts[0] or ".." in parts
                or rel not in listed):
            raise BundleError(f"{where}: its graph reads external data from {location!r} (tensor "
                              f"{tensors[0]!r}{f' and {len(tensors) - 1} more' if len(tensors) > 1 else ''}), which is "
                              f"not one of the stage's listed external-data files ({', '.join(listed) or 'none'}): "
                              "it would be read unchecked; the bundle was edited or is not edgeact's: re-export it")
