"""The one .safetensors reader in sdc: a validating header parser and numpy tensor reads (no torch).

Every path that opens a .safetensors file goes through `read_safetensors`: `--lora` (build, re-fuse
and run-time swap), `--embedding`, `sdc inspect FILE.safetensors`, single-file checkpoint
detection and the diffusers-folder truncation check in export/sources.py. A LoRA, an embedding or
a checkpoint is untrusted input, so the header is checked completely before any tensor byte is
used, and every way it can be wrong is one `SdcError` line naming the file.

The format is an 8-byte little-endian header length N, N bytes of UTF-8 JSON, then the raw tensor
bytes. The JSON is an object {name: {"dtype": str, "shape": [int, ...], "data_offsets": [begin,
end]}} plus an optional "__metadata__" object of str -> str; offsets are relative to the end of
the header. The `safetensors` package's numpy loader refuses bf16 (numpy has no such dtype),
which many published LoRAs use; reading the layout directly handles it (bf16 is the top half of
a float32) and turns a broken file into a message instead of a Rust panic.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import SdcError

# Bytes per element for every dtype the safetensors format defines, readable or not: the size
# check needs them all, so an fp8 checkpoint is refused for what it is, not as "corrupt".
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
            "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1,
            "BOOL": 1}
# The ones numpy can hold; "bf16" is widened to float32 by hand.
_NUMPY = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": "bf16",
          "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U64": np.uint64,
          "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_}
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")

# The reference implementation's own cap; a real SD checkpoint's header is ~200 KB.
MAX_HEADER = 100 * 2**20
# A valid header nests 3 deep (object > tensor entry > shape list). Anything much deeper is not a
# safetensors header, and json.loads would otherwise recurse once per level until RecursionError.
MAX_NESTING = 8

# A JSON string, escapes included; the closing quote is optional so an unterminated string is
# consumed in one linear pass (possessive quantifiers: no backtracking on hostile input).
_JSON_STRING = re.compile(r'"(?:[^"\\]++|\\.)*+"?', re.S)
_NOT_BRACKET = re.compile(r"[^\[\]{}]++")


@dataclass
class SafetensorsFile:
    path: Path
    metadata: dict[str, str]
    entries: dict[str, dict]  # name -> {dtype, shape, data_offsets}, all validated
    data_start: int
    label: str = ""  # how errors name the file, e.g. "--lora PATH"

    def keys(self) -> list[str]:
        return list(self.entries)

    def dtype(self, name: str) -> str:
        return self.entries[name]["dtype"]

    def shape(self, name: str) -> list[int]:
        return list(self.entries[name]["shape"])

    def shapes(self) -> dict[str, list[int]]:
        return {k: list(e["shape"]) for k, e in self.entries.items()}

    def tensor(self, name: str) -> np.ndarray:
        """The tensor as a numpy array (bf16 widened to float32)."""
        e = self.entries[name]
        label = self.label or str(self.path)
        dtype = _NUMPY.get(e["dtype"])
        if dtype is None:
            raise SdcError(f"{label}: tensor {_q(name)} is {e['dtype']}, which sdc cannot read; "
                           f"expected one of {', '.join(_NUMPY)}")
        begin, end = e["data_offsets"]
        try:
            with open(self.path, "rb") as f:
                f.seek(self.data_start + begin)
                raw = f.read(end - begin)
        except OSError as err:
            raise SdcError(f"{label}: cannot be read ({err.strerror or err})") from None
        if len(raw) != end - begin:  # the file shrank after its header was checked
            raise SdcError(f"{label}: truncated (tensor {_q(name)} ends past the end of the file); "
                           "download or copy the file again")
        if dtype == "bf16":
            arr = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            arr = np.frombuffer(raw, dtype).copy()
        return arr.reshape(e["shape"])


def read_safetensors(path, label: str | None = None, allow_empty: bool = False) -> SafetensorsFile:
    """Parse and validate `path`'s header; raises a one-line SdcError naming `label` (default: the
    path) for any malformed file. `allow_empty` accepts a header with no tensors."""
    path = Path(path)
    label = label or str(path)

    def bad(problem: str, todo: str = "re-download or re-save the file") -> SdcError:
        return SdcError(f"{label}: not a valid .safetensors file: {problem}; {todo}")

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise bad(f"{size} bytes, shorter than the 8-byte header length it starts with")
            n = int.from_bytes(head, "little")
            if n < 2:  # "{}" is the shortest header there is
                raise bad(f"header length is {n}, expected at least 2 (a JSON object)")
            if n > MAX_HEADER:
                raise bad(f"header length {n} exceeds the {MAX_HEADER}-byte limit (is it a "
                          "safetensors file at all?)")
            if n > size - 8:
                raise bad(f"header length {n} runs past the end of the {size}-byte file "
                          "(truncated, or not safetensors)", "download or copy the file again")
            raw = f.read(n)
    except OSError as err:
        raise SdcError(f"{label}: cannot be read ({err.strerror or err})") from None
    header = _parse_header(raw, bad)
    metadata = _metadata(header.pop("__metadata__", None), bad)
    data_start = 8 + n
    entries = {name: _entry(name, e, bad) for name, e in header.items()}
    if not entries and not allow_empty:
        raise bad("it holds no tensors (the header lists none)",
                  "expected a file with weights in it")
    _check_layout(entries, size - data_start, size, bad)
    return SafetensorsFile(path, metadata, entries, data_start, label)


def _parse_header(raw: bytes, bad) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad(f"the header is not UTF-8 (byte {e.start})") from None
    try:
        header = loads_bounded(text, MAX_NESTING, "the header")
    except ValueError as e:
        raise bad(str(e)) from None
    if not isinstance(header, dict):
        raise bad(f"the header is a JSON {json_type(header)}, expected an object")
    return header


def loads_bounded(text: str, max_depth: int, what: str):
    """json.loads with the nesting depth checked first (json.loads recurses once per level) and
    repeated object keys refused; raises ValueError with a one-line reason naming `what`."""
    depth = _nesting(text)
    if depth > max_depth:
        raise ValueError(f"{what} nests JSON {depth} levels deep, expected at most {max_depth}")
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except _DuplicateKey as e:
        raise ValueError(f"{what} names {_q(e.args[0])} twice") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"{what} is not JSON ({str(e).splitlines()[0][:80]})") from None


def _nesting(text: str) -> int:
    """Maximum bracket depth of a JSON text, ignoring brackets inside strings (vectorised: a
    100 MB header must not take a Python loop per character)."""
    skeleton = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text))
    if not skeleton:
        return 0
    codes = np.frombuffer(skeleton.encode("ascii"), np.uint8)
    deepest, depth, chunk = 0, 0, 1 << 20  # in chunks: a 100 MB header of brackets stays small
    for i in range(0, len(codes), chunk):
        c = codes[i:i + chunk]
        running = depth + np.cumsum(np.where((c == ord("[")) | (c == ord("{")), 1, -1)
                                    .astype(np.int32), dtype=np.int64)
        deepest, depth = max(deepest, int(running.max())), int(running[-1])
    return deepest


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs):
    # json.loads keeps the last of two equal keys silently: two readers of the same file could
    # then disagree on what a tensor is, so a repeated name is an error.
    out = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def json_type(value) -> str:
    """A parsed JSON value's kind in JSON's own words, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    return {dict: "object", list: "list", str: "string", int: "number",
            float: "number"}.get(type(value), type(value).__name__)


def _metadata(meta, bad) -> dict[str, str]:
    if meta is None:  # the reference reader accepts an explicit null as "no metadata"
        return {}
    if not isinstance(meta, dict):
        raise bad(f"__metadata__ is a JSON {json_type(meta)}, expected an object of strings")
    for k, v in meta.items():
        if not isinstance(v, str):
            raise bad(f"__metadata__ {_q(k)} is a JSON {json_type(v)}, expected a string (the "
                      "format allows string values only)")
    return dict(meta)


def _is_int(x) -> bool:
    return type(x) is int  # bool is an int subclass; true/false are not sizes


def _entry(name: str, e, bad) -> dict:
    if not isinstance(e, dict):
        raise bad(f"tensor {_q(name)} is a JSON {json_type(e)}, expected an object with dtype, "
                  "shape and data_offsets")
    dtype, shape, offsets = e.get("dtype"), e.get("shape"), e.get("data_offsets")
    if not isinstance(dtype, str):
        raise bad(f"tensor {_q(name)} has dtype {shorten(dtype)}, expected a string such as "
                  '"F16"')
    if dtype not in ITEMSIZE:
        raise bad(f"tensor {_q(name)} has unknown dtype {_q(dtype)}, expected one of "
                  f"{', '.join(ITEMSIZE)}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise bad(f"tensor {_q(name)} has shape {shorten(shape)}, expected a list of non-negative "
                  "integers")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_int, offsets))
            or not 0 <= offsets[0] <= offsets[1]):
        raise bad(f"tensor {_q(name)} has data_offsets {shorten(offsets)}, expected [begin, end] "
                  "integers with 0 <= begin <= end")
    # Python ints: a shape like [2**40, 2**40] must not wrap around to a small byte count
    nbytes = ITEMSIZE[dtype] * math.prod(shape)
    if offsets[1] - offsets[0] != nbytes:
        raise bad(f"tensor {_q(name)} ({dtype} {shorten(shape)}) needs {nbytes} bytes but its "
                  f"data_offsets span {offsets[1] - offsets[0]}")
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


def shorten(value) -> str:
    """A JSON value for a message, cut short: names and shapes in a hostile header can be huge."""
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 120 else text[:117] + "..."


def _q(name: str) -> str:
    return repr(shorten(name))


def quote(value) -> str:
    """repr() of a header- or metadata-supplied value, cut short for a one-line message."""
    return _q(value) if isinstance(value, str) else shorten(value)


def _check_layout(entries: dict, data_size: int, size: int, bad) -> None:
    """Every tensor inside the file, and no two sharing bytes (a crafted header could otherwise
    alias one tensor's bytes as another's)."""
    if not entries:
        return
    last = max(entries, key=lambda k: entries[k]["data_offsets"][1])
    end = entries[last]["data_offsets"][1]
    if end > data_size:
        raise bad(f"truncated: tensor {_q(last)} ends at byte {size - data_size + end}, the file "
                  f"has {size}", "download or copy the file again")
    spans = sorted((e["data_offsets"][0], e["data_offsets"][1], k) for k, e in entries.items()
                   if e["data_offsets"][0] < e["data_offsets"][1])  # empty tensors share nothing
    for (_, prev_end, prev), (begin, _, name) in zip(spans, spans[1:]):
        if begin < prev_end:
            raise bad(f"tensors {_q(prev)} and {_q(name)} overlap (bytes {begin}..{prev_end})")
