"""The protobuf wire format (https://protobuf.dev/programming-guides/encoding/), read in place on a buffer.

The runtime reads a few fields of its ONNX graphs without the `onnx` package (the robot carries onnxruntime only):
the initializers' sizes (runtime/membw.py) and the tensors' external-data locations (runtime/onnx_refs.py). Over a
memory map, length-delimited fields are skipped unread, so a graph with its weights inline costs what its structure
does, where protobuf's own Python messages would copy every weight.
"""
from __future__ import annotations

from typing import Iterator

VARINT, I64, LEN, I32 = 0, 1, 2, 5      # wire types


class WireError(ValueError):
    """The bytes are not a protobuf message (a damaged or truncated file)."""


def varint(buf, pos: int, end: int | None = None) -> tuple[int, int]:
    """(value, position after it) of the varint at `pos`, which must end before `end` (default: the buffer's end)."""
    end = len(buf) if end is None else end
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise WireError(f"a varint runs past byte {end}")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def fields(buf, start: int, end: int) -> Iterator[tuple[int, int, object]]:
    """(field number, wire type, value) of the message in buf[start:end]: an int for a varint, the (start, end) span
    of the bytes otherwise (a length-delimited field's content, a fixed-width field's 4 or 8 bytes)."""
    pos = start
    while pos < end:
        key, pos = varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if wire == VARINT:
            value, pos = varint(buf, pos, end)
            yield number, wire, value
            continue
        if wire == LEN:
            size, pos = varint(buf, pos, end)
        elif wire in (I64, I32):
            size = 8 if wire == I64 else 4
        else:
            raise WireError(f"protobuf wire type {wire} at byte {pos}")
        if pos + size > end:
            raise WireError(f"a field of {size} bytes at byte {pos} overruns its message's {end - start} bytes")
        yield number, wire, (pos, pos + size)
        pos += size
