"""Read .safetensors files with numpy alone (the runtime has no torch), bf16 included.

The format is an 8-byte little-endian header length, a JSON header ({name: {dtype, shape,
data_offsets}}, plus an optional "__metadata__" dict of strings), then the raw tensor bytes. The
`safetensors` package's numpy loader refuses bf16 (numpy has no such dtype), which many published
LoRAs use; reading the layout directly handles it (bf16 is the top half of a float32) and lets a
truncated or inconsistent file fail with a message naming the file instead of a Rust panic.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import SdcError

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": "bf16",
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
           "BOOL": np.bool_}
_MAX_HEADER = 100 * 2**20


@dataclass
class SafetensorsFile:
    path: Path
    metadata: dict[str, str]
    entries: dict[str, dict]  # name -> {dtype, shape, data_offsets}
    data_start: int

    def keys(self) -> list[str]:
        return list(self.entries)

    def tensor(self, name: str) -> np.ndarray:
        """The tensor as a numpy array (bf16 widened to float32)."""
        e = self.entries[name]
        begin, end = e["data_offsets"]
        dtype = _DTYPES[e["dtype"]]
        with open(self.path, "rb") as f:
            f.seek(self.data_start + begin)
            raw = f.read(end - begin)
        if dtype == "bf16":
            arr = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            arr = np.frombuffer(raw, dtype).copy()
        return arr.reshape(e["shape"])


def read_safetensors(path) -> SafetensorsFile:
    path = Path(path)
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("shorter than a safetensors header")
            n = int.from_bytes(head, "little")
            if n <= 1 or n > min(_MAX_HEADER, size - 8):
                raise ValueError(f"header length {n} does not fit a {size}-byte file")
            header = json.loads(f.read(n))
    except (ValueError, UnicodeDecodeError) as e:
        raise SdcError(f"{path}: not a readable .safetensors file ({e}); expected a LoRA or "
                       "embedding saved as safetensors") from None
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    for name, e in header.items():
        if not isinstance(e, dict) or e.get("dtype") not in _DTYPES:
            raise SdcError(f"{path}: tensor {name!r} has an unsupported dtype "
                           f"{e.get('dtype') if isinstance(e, dict) else e!r}")
        begin, end = e["data_offsets"]
        itemsize = 2 if e["dtype"] == "BF16" else np.dtype(_DTYPES[e["dtype"]]).itemsize
        if end - begin != itemsize * int(np.prod(e["shape"], dtype=np.int64)):
            raise SdcError(f"{path}: tensor {name!r} byte range does not match its shape")
        if data_start + end > size:
            raise SdcError(f"{path}: truncated ({size} bytes, tensor {name!r} ends at byte "
                           f"{data_start + end}); download or copy the file again")
    return SafetensorsFile(path, {str(k): str(v) for k, v in metadata.items()}, header, data_start)
