"""The bytes of each member of a sample, format 1: the one encoder (and decoder) of each.

- ``KEY.<model>.mp``: the msgpack map ``{"dtype": "float16"|"float32", "shape": [d0, d1, ...],
  "data": <bin: raw little-endian bytes, C order>}``, keys in that order. Decoding is bounded:
  the unpacker refuses more than a handful of short strings and dims, so a hostile member cannot
  make the reader allocate more than the member's own size.
- ``KEY.cls``: the class id in ASCII decimal (``LABEL_RE``).
- ``KEY.json``: what the sample came from, compact JSON with sorted keys. bombkd writes it (and
  ``featurize --dry-run`` measures it); training never reads it, video mode reads its
  ``decoded_by`` once (``decode_meta``) to say whether its clips are decoded the same way.
"""
from __future__ import annotations

import json
import math
import re

import msgpack
import numpy as np

from bombkd_io.errors import FormatError

# dtype name in the member -> the exact little-endian numpy type of its data.
DTYPES = {"float16": np.dtype("<f2"), "float32": np.dtype("<f4")}
KEYS = ("dtype", "shape", "data")
MAX_DIMS = 8
MAX_TENSOR_BYTES = 1 << 30  # one member holds one clip's features: far below this
LABEL_RE = re.compile(rb"-?[0-9]{1,18}")  # a .cls member: a decimal that fits int64


def encode_tensor(array: np.ndarray) -> bytes:
    """Encode a float16 / float32 array as a format-1 member (any byte order in, LE out)."""
    array = np.asarray(array)
    name = array.dtype.name
    if name not in DTYPES:
        raise FormatError(f"cannot store dtype {array.dtype}; cast to one of {sorted(DTYPES)} "
                          "first")
    if array.ndim > MAX_DIMS:
        raise FormatError(f"cannot store a {array.ndim}-d array; at most {MAX_DIMS} dims")
    data = array.astype(DTYPES[name], copy=False).tobytes(order="C")
    return msgpack.packb({"dtype": name, "shape": list(array.shape), "data": data},
                         use_bin_type=True)


def decode_tensor(payload: bytes | memoryview, *, where: str = "") -> np.ndarray:
    """Decode a format-1 member; a read-only array viewing the unpacked bytes (no extra copy).

    ``where`` (shard and sample) starts every error message. Raises ``FormatError`` for anything
    that is not exactly a format-1 tensor: bad msgpack, trailing bytes, extra or missing keys,
    an unknown dtype, or data whose size does not match the shape.
    """
    where = _prefix(where)
    try:
        obj = msgpack.unpackb(payload, raw=False, use_list=True, strict_map_key=True,
                              max_bin_len=min(len(payload), MAX_TENSOR_BYTES),
                              max_str_len=16, max_array_len=MAX_DIMS, max_map_len=len(KEYS),
                              max_ext_len=0)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError,
            msgpack.StackError) as exc:
        raise FormatError(f"{where}not a bombkd tensor member (msgpack: {exc})") from exc
    if not isinstance(obj, dict) or set(obj) != set(KEYS):
        got = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise FormatError(f"{where}tensor member must be a map with keys {list(KEYS)}, got {got}")
    dtype, shape, data = obj["dtype"], obj["shape"], obj["data"]
    if dtype not in DTYPES:
        raise FormatError(f"{where}unknown dtype {dtype!r}; format 1 knows {sorted(DTYPES)}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise FormatError(f"{where}shape must be a list of non-negative ints, got {shape!r}")
    if not isinstance(data, bytes):
        raise FormatError(f"{where}data must be msgpack bin, got {type(data).__name__}")
    expected = math.prod(shape) * DTYPES[dtype].itemsize
    if len(data) != expected:
        raise FormatError(f"{where}data holds {len(data)} bytes; shape {shape} of {dtype} "
                          f"needs {expected}")
    return np.frombuffer(data, dtype=DTYPES[dtype]).reshape(shape)


def encode_label(label: int) -> bytes:
    """A ``KEY.cls`` member: ``1`` -> ``b"1"``."""
    return str(int(label)).encode("ascii")


def decode_label(payload: bytes | memoryview, *, where: str = "") -> int:
    """The class id of a ``KEY.cls`` member; ``FormatError`` (starting with ``where``) unless it
    is an ASCII decimal of at most 18 digits (``LABEL_RE``)."""
    text = bytes(payload)
    if not LABEL_RE.fullmatch(text):
        raise FormatError(f"{_prefix(where)}member .cls is {text[:24]!r}, not a decimal class id")
    return int(text)


def encode_meta(doc: dict) -> bytes:
    """A ``KEY.json`` member: ``doc`` as JSON with sorted keys and no spaces."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode("utf-8")


def decode_meta(payload: bytes | memoryview, *, where: str = "") -> dict:
    """The JSON object of a ``KEY.json`` member; ``FormatError`` (starting with ``where``) for
    anything else."""
    try:
        doc = json.loads(bytes(payload).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise FormatError(f"{_prefix(where)}member .json is not JSON ({exc})") from exc
    if not isinstance(doc, dict):
        raise FormatError(f"{_prefix(where)}member .json holds a {type(doc).__name__}, not an "
                          "object")
    return doc


def _prefix(where: str) -> str:
    return f"{where}: " if where else ""
