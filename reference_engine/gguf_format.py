"""Reading the GGUF container: header, metadata, tensor table, tensor bytes.

A GGUF file (version 2 or 3) is, in little-endian order:
    magic b"GGUF", version (uint32), tensor count (uint64), metadata count (uint64)
    metadata, each: key (string), value type (uint32), value
    tensor table, each: name (string), n_dims (uint32), dims (uint64 each, fastest axis
        first), ggml type (uint32), offset of its bytes from the start of the data section
    padding up to `general.alignment` (default 32), then the data section.
A string is a uint64 byte count and UTF-8 bytes; an array is an element type (uint32), a
count (uint64) and the elements.

The `gguf` package's own reader builds a numpy view for every metadata element, which
takes seconds for a 49152-token vocabulary and its 48900 merges. This reader decodes the
metadata straight into Python values and maps the tensor bytes without copying them;
`gguf_loader.py` then dequantizes them with `gguf.quants`.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# value type -> struct format of one scalar (8: string, 9: array are handled apart)
SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
         7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
STRING, ARRAY = 8, 9


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order, fastest axis first (the reverse of PyTorch's)
    tensor_type: object  # gguf.GGMLQuantizationType
    data_offset: int  # absolute position of the first byte in the file
    n_bytes: int
    data: np.ndarray  # the raw bytes (uint8, read-only, mapped from the file)


class GGUFFile:
    """Metadata (`fields`: key -> str, int, float, bool or list) and `tensors` of a GGUF file."""

    def __init__(self, path: str | Path):
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        with open(path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.pos = 0
        magic, version = self._read("<4sI")
        if magic != b"GGUF":
            raise ValueError("not a GGUF file")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} (this reader handles versions 2 and 3)")
        n_tensors, n_fields = self._read("<QQ")
        self.fields = {}
        for _ in range(n_fields):
            key = self._string()
            self.fields[key] = self._value(self._read("<I")[0])
        table = []
        for _ in range(n_tensors):
            name = self._string()
            (n_dims,) = self._read("<I")
            dims = self._read(f"<{n_dims}Q")
            kind, offset = self._read("<IQ")
            table.append((name, dims, kind, offset))
        alignment = int(self.fields.get("general.alignment", 32))
        data_start = -(-self.pos // alignment) * alignment  # round up to the alignment
        self.tensors = []
        for name, dims, kind, offset in table:
            try:
                tensor_type = GGMLQuantizationType(kind)
            except ValueError:
                raise ValueError(f"tensor {name} has unknown ggml type {kind}") from None
            block, type_size = GGML_QUANT_SIZES[tensor_type]
            n_bytes = int(np.prod(dims, dtype=np.int64)) // block * type_size
            start = data_start + offset
            available = max(0, min(n_bytes, len(self._map) - start))  # a truncated file keeps what it has
            data = (np.frombuffer(self._map, dtype=np.uint8, count=available, offset=start) if available
                    else np.empty(0, dtype=np.uint8))
            self.tensors.append(TensorInfo(name, tuple(dims), tensor_type, start, n_bytes, data))

    def _read(self, fmt: str) -> tuple:
        values = struct.unpack_from(fmt, self._map, self.pos)  # raises struct.error past the end
        self.pos += struct.calcsize(fmt)
        return values

    def _string(self) -> str:
        (n,) = self._read("<Q")
        if self.pos + n > len(self._map):
            raise ValueError("a string runs past the end of the file")
        text = self._map[self.pos : self.pos + n].decode("utf-8", errors="replace")
        self.pos += n
        return text

    def _value(self, kind: int):
        if kind in SCALARS:
            return self._read(SCALARS[kind])[0]
        if kind == STRING:
            return self._string()
        if kind != ARRAY:
            raise ValueError(f"unknown metadata value type {kind}")
        item, count = self._read("<IQ")
        if item in NUMPY:  # numbers in one block
            values = np.frombuffer(self._map, dtype=NUMPY[item], count=count, offset=self.pos)
            self.pos += values.nbytes
            return values.tolist()
        return [self._value(item) for _ in range(count)]  # strings (the vocabulary), nested arrays
