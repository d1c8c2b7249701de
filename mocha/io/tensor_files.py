"""safetensors files written tensor by tensor and read slice by slice, local or ``s3://``.

The format is exactly safetensors (8-byte little-endian header length, a JSON header naming every
tensor's dtype, shape and byte range, then the raw bytes), so the files open with
``safetensors.safe_open`` and any tool that reads safetensors. What the library does not offer,
and checkpoints at scale need:

* :func:`write_tensors` streams: the header is computed from the tensors' shapes up front, then
  each tensor's bytes are written as it is produced (a generator), so a writer never holds more
  than one tensor (moved to CPU) beyond what it already had. The file appears complete or not at
  all (``mocha.io.storage.atomic_writer``).
* :func:`read_header` + :func:`read_slice` read the header and then only the byte range of the
  elements wanted (a ranged GET on S3), so a reader fetches only its share.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from mocha.io import storage

DTYPES: dict[torch.dtype, str] = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
                                  torch.uint8: "U8", torch.int64: "I64"}
TORCH_DTYPES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    numel: int  # tensors are stored flat (1-D); shapes live in the caller's index


@dataclass(frozen=True)
class StoredTensor:
    dtype: torch.dtype
    numel: int
    offset: int  # absolute byte offset of element 0 in the file


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def write_tensors(url: str, specs: list[TensorSpec], tensors: Iterable[torch.Tensor],
                  metadata: dict[str, str] | None = None) -> int:
    """Write ``specs`` (in order) with the values ``tensors`` yields (same order, 1-D, matching
    dtype and numel); returns the file's size in bytes."""
    header: dict = {"__metadata__": metadata or {}}
    offset = 0
    for spec in specs:
        if spec.dtype not in DTYPES:
            raise TypeError(f"{spec.name}: dtype {spec.dtype} is not supported")
        size = spec.numel * _element_size(spec.dtype)
        header[spec.name] = {"dtype": DTYPES[spec.dtype], "shape": [spec.numel], "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # safetensors aligns the data start to 8 bytes
    written = 8 + len(blob)
    with storage.atomic_writer(url) as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for spec, tensor in zip(specs, tensors, strict=True):
            t = tensor.detach().reshape(-1)
            if t.dtype != spec.dtype or t.numel() != spec.numel:
                raise ValueError(f"{spec.name}: got {t.dtype} x {t.numel()}, declared {spec.dtype} x {spec.numel}")
            raw = t.to("cpu").contiguous().view(torch.uint8).numpy()
            f.write(memoryview(raw))
            written += raw.nbytes
    return written


def read_header(url: str) -> dict[str, StoredTensor]:
    """Every tensor's dtype, element count and absolute byte offset (two small ranged reads)."""
    (length,) = struct.unpack("<Q", storage.read_range(url, 0, 8))
    header = json.loads(storage.read_range(url, 8, length))
    header.pop("__metadata__", None)
    base = 8 + length
    out = {}
    for name, entry in header.items():
        dtype = TORCH_DTYPES[entry["dtype"]]
        begin, end = entry["data_offsets"]
        out[name] = StoredTensor(dtype, (end - begin) // _element_size(dtype), base + begin)
    return out


def read_slice(url: str, stored: StoredTensor, start: int, numel: int) -> torch.Tensor:
    """Elements ``[start, start + numel)`` of a stored flat tensor, reading only their bytes."""
    if start < 0 or start + numel > stored.numel:
        raise IndexError(f"{url}: elements [{start}, {start + numel}) outside a tensor of {stored.numel}")
    size = _element_size(stored.dtype)
    data = storage.read_range(url, stored.offset + start * size, numel * size)
    return torch.frombuffer(bytearray(data), dtype=stored.dtype)

