"""Read a GGUF file (llama.cpp's format): metadata, tensor table, dequantized tensors.

The header is parsed here rather than with `gguf.GGUFReader`, which takes ~7 s on SmolLM2's
98k-string vocabulary (one numpy view per string) and fails on damaged files with errors that
do not name the file. Every read is bounds-checked and every tensor's declared extent is
checked against the file size before any data is trusted, so a truncated or foreign file is
one `ValueError` naming it. Dequantization is `gguf.quants.dequantize` (numpy).

Layout (little-endian): magic `GGUF`, version u32 (2 or 3), tensor count u64, metadata count
u64, the metadata key/values, the tensor table (name, dims in ggml `ne` order = innermost
first, type, offset), padding to `general.alignment`, then the tensor data.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# GGUF metadata value types -> (struct format, size) for the fixed-size ones.
_SCALARS = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4),
            6: ("<f", 4), 7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8)}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?",
          10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9
_FLOAT32 = 6

# ggml types that `gguf.quants.dequantize` handles and llama checkpoints use in practice.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                   "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy / PyTorch order: ggml's `ne` reversed ([out, in] for a linear)
    type_name: str  # ggml type: F32, Q4_1, ...
    offset: int  # absolute byte offset in the file
    num_bytes: int


@dataclass
class GGUFFile:
    path: Path
    metadata: dict[str, Any]
    float32_keys: set[str]  # keys stored as FLOAT32 (printed at float32 precision)
    tensors: dict[str, TensorInfo]

    def tensor(self, name: str) -> np.ndarray:
        """The tensor dequantized to a new float32 array of `info.shape`."""
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        info = self.tensors[name]
        if info.type_name not in SUPPORTED_TYPES:
            raise ValueError(f"{self.path}: tensor '{name}' is {info.type_name}, which is not "
                             f"supported (supported: {', '.join(SUPPORTED_TYPES)})")
        with open(self.path, "rb") as f:
            raw = np.fromfile(f, dtype=np.uint8, count=info.num_bytes, offset=info.offset)
        if raw.size != info.num_bytes:
            raise ValueError(f"{self.path}: truncated while reading tensor '{name}'")
        rows = raw.reshape(*info.shape[:-1], -1)  # [..., bytes per row]
        out = dequantize(rows, GGMLQuantizationType[info.type_name])
        return np.array(out, dtype=np.float32).reshape(info.shape)  # a copy even for F32


class _Cursor:
    """Bounds-checked little-endian reads from a buffer; running off the end is a clean error."""

    def __init__(self, buf: mmap.mmap, path: Path) -> None:
        self.buf, self.path, self.pos, self.size = buf, path, 0, len(buf)

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise ValueError(f"{self.path}: truncated or corrupt GGUF header ({what} runs past the "
                             f"end of the {self.size}-byte file)")

    def scalar(self, vtype: int, what: str) -> Any:
        fmt, size = _SCALARS[vtype]
        self.need(size, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self, what: str) -> str:
        length = self.scalar(10, what)
        self.need(length, what)
        raw = self.buf[self.pos : self.pos + length]
        self.pos += length
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{self.path}: corrupt GGUF header ({what} is not UTF-8)") from None

    def value(self, vtype: int, what: str) -> Any:
        if vtype in _SCALARS:
            return self.scalar(vtype, what)
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            item_type, count = self.scalar(4, what), self.scalar(10, what)
            if item_type in _NUMPY:
                size = _SCALARS[item_type][1] * count
                self.need(size, what)
                arr = np.frombuffer(self.buf, dtype=_NUMPY[item_type], count=count, offset=self.pos)
                self.pos += size
                return arr.tolist()  # a copy: nothing may keep the mapping alive
            self.need(count * 8, what)  # each string or array has at least its u64 length
            return [self.value(item_type, what) for _ in range(count)]
        raise ValueError(f"{self.path}: corrupt GGUF header ({what} has unknown value type {vtype})")


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse the header of a GGUF file and check its tensor table against the file size.

    Tensor types are not checked against `SUPPORTED_TYPES` here (callers first say what else
    is wrong with a file); `GGUFFile.tensor` refuses them.
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    file_size = path.stat().st_size
    if file_size < 24:
        raise ValueError(f"{path}: not a GGUF file ({file_size} bytes, too short for a header)")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file (starts with {bytes(buf[:4])!r}, not b'GGUF')")
        cur = _Cursor(buf, path)
        cur.pos = 4
        version = cur.scalar(4, "version")
        if version not in (2, 3):
            hint = " (a big-endian file?)" if version > 0xFFFF else ""
            raise ValueError(f"{path}: GGUF version {version} is not supported (only 2 and 3){hint}")
        num_tensors, num_kv = cur.scalar(10, "tensor count"), cur.scalar(10, "metadata count")
        cur.need(num_kv * 12 + num_tensors * 24, "the declared metadata and tensor table")
        metadata: dict[str, Any] = {}
        float32_keys: set[str] = set()
        for _ in range(num_kv):
            key = cur.string("a metadata key")
            vtype = cur.scalar(4, f"metadata '{key}'")
            metadata[key] = cur.value(vtype, f"metadata '{key}'")
            if vtype == _FLOAT32:
                float32_keys.add(key)
        table = []
        for _ in range(num_tensors):
            name = cur.string("a tensor name")
            num_dims = cur.scalar(4, f"tensor '{name}'")
            if num_dims > 8:
                raise ValueError(f"{path}: corrupt GGUF tensor table ('{name}' has {num_dims} dims)")
            ne = [cur.scalar(10, f"tensor '{name}'") for _ in range(num_dims)]
            type_id, offset = cur.scalar(4, f"tensor '{name}'"), cur.scalar(10, f"tensor '{name}'")
            table.append((name, ne, type_id, offset))
        alignment = metadata.get("general.alignment", 32)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"{path}: corrupt GGUF header (general.alignment = {alignment!r})")
        data_start = -(-cur.pos // alignment) * alignment

    tensors: dict[str, TensorInfo] = {}
    for name, ne, type_id, offset in table:
        if name in tensors:
            raise ValueError(f"{path}: corrupt GGUF tensor table (tensor '{name}' appears twice)")
        try:
            qtype = GGMLQuantizationType(type_id)
        except ValueError:
            raise ValueError(f"{path}: tensor '{name}' has unknown ggml type id {type_id}") from None
        block, block_bytes = GGML_QUANT_SIZES[qtype]
        if not ne or ne[0] % block:
            raise ValueError(f"{path}: tensor '{name}' has shape {ne}, not whole {qtype.name} blocks")
        num_bytes = math.prod(ne) // block * block_bytes
        start = data_start + offset
        if start + num_bytes > file_size:
            raise ValueError(f"{path}: truncated: tensor '{name}' ends at byte {start + num_bytes} "
                             f"but the file has {file_size} bytes")
        tensors[name] = TensorInfo(name, tuple(reversed(ne)), qtype.name, start, num_bytes)
    return GGUFFile(path, metadata, float32_keys, tensors)
