"""Tar headers, parsed one at a time, or all of a regular shard at once with numpy.

``parse_header`` is the member walk's rule. ``read_regular`` is the fast path of
``reader.read_shard``: a shard whose samples all repeat the first sample's layout (same members,
same block counts, same tensor header: what ``ShardSetWriter`` writes) is checked and decoded
with a few array operations instead of per-member Python. It checks every header's checksum,
type, size and name, and every tensor member's msgpack header byte for byte against the first
one (decoded with the bounded ``decode_tensor``), and returns ``None`` at the first
irregularity: the member walk then reads the shard and names any problem.
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import as_strided

from bombkd_io.errors import FormatError
from bombkd_io.shards.codec import decode_label, decode_tensor

BLOCK = 512
_POW8 = 8 ** np.arange(10, -1, -1, dtype=np.int64)  # 11 octal digits, most significant first


def _octal(field: bytes) -> int:
    if field[0] & 0x80:  # GNU base-256 for sizes >= 8 GiB
        return int.from_bytes(field[1:], "big")
    return int(field.split(b"\0", 1)[0].strip() or b"0", 8)


def parse_header(raw: bytes) -> tuple[str, int, bytes] | None:
    """(name, size, typeflag) of a 512-byte header; ``None`` for an end-of-archive block.

    Raises ValueError when the checksum does not match.
    """
    if raw[0] == 0 and not any(raw):
        return None
    try:  # ustar writes 11 octal digits and a NUL: parse that directly, the general rule else
        checksum, size = int(raw[148:154], 8), int(raw[124:135], 8)
    except ValueError:
        try:
            checksum, size = _octal(raw[148:156]), _octal(raw[124:136])
        except ValueError:
            checksum = size = -1
    if checksum != sum(raw) - sum(raw[148:156]) + 8 * 32:
        raise ValueError("checksum mismatch")
    name = raw[:100].split(b"\0", 1)[0]
    if raw[345] and raw[257:262] == b"ustar":  # ustar prefix: names longer than 100 bytes
        name = raw[345:500].split(b"\0", 1)[0] + b"/" + name
    return name.decode("utf-8", "replace"), size, raw[156:157]


def split_name(name: str) -> tuple[str, str]:
    """``dir/KEY.a.b`` -> (``dir/KEY``, ``a.b``): webdataset's rule, first dot of the basename."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1:])


def padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def _first_sample(buf: memoryview) -> tuple[list[tuple[int, str, int]], int] | None:
    """Members of sample 0 as (offset, suffix, size), and where sample 1 starts."""
    members, off, key0 = [], 0, None
    while off + BLOCK <= len(buf):
        try:
            head = parse_header(bytes(buf[off:off + BLOCK]))
        except ValueError:
            return None
        if head is None or head[2] != b"0":
            return None
        key, suffix = split_name(head[0])
        if key0 is not None and key != key0:
            return members, off
        key0 = key
        members.append((off, suffix, head[1]))
        off += BLOCK + padded(head[1])
    return None


def _rows(arr: np.ndarray, start: int, n: int, stride: int, width: int) -> np.ndarray:
    """[n, width] view: ``width`` bytes at ``start + i * stride`` for each sample i."""
    return as_strided(arr[start:], shape=(n, width), strides=(stride, 1), writeable=False)


def _headers_ok(h: np.ndarray, size0: int, suffix: bytes, keylen: np.ndarray,
                names: np.ndarray) -> np.ndarray | None:
    """Sizes of one member in every sample ([n, 512] headers), or None if any header is off."""
    digits = h[:, 148:154].astype(np.int64) - 48
    sizes = h[:, 124:135].astype(np.int64) - 48
    if (digits < 0).any() or (digits > 7).any() or (sizes < 0).any() or (sizes > 7).any():
        return None
    total = h.sum(axis=1, dtype=np.int64) - h[:, 148:156].sum(axis=1, dtype=np.int64) + 256
    sizes = sizes @ _POW8
    if ((digits @ _POW8[-6:]) != total).any() or (h[:, 156] != ord("0")).any() \
            or h[:, 345].any() \
            or ((sizes + BLOCK - 1) // BLOCK != (size0 + BLOCK - 1) // BLOCK).any():
        return None
    n = len(h)
    cols = np.arange(100)
    same_key = (h[:, :100] == names) | (cols >= keylen[:, None])  # key bytes as in the .mp name
    tail = np.frombuffer(b"." + suffix + b"\0", np.uint8)
    at = keylen[:, None] + np.arange(len(tail))
    if not same_key.all() or at.max() >= 100 or not (h[np.arange(n)[:, None], at] == tail).all():
        return None
    return sizes


def _labels(buf: memoryview, start: int, stride: int, sizes: np.ndarray) -> np.ndarray | None:
    """The ``.cls`` member of every sample (at ``start + i * stride``), or None if one is bad."""
    try:
        return np.array([decode_label(buf[start + i * stride:start + i * stride + size])
                         for i, size in enumerate(sizes.tolist())], np.int64)
    except FormatError:
        return None


def read_regular(buf, n: int, member: str, shape: tuple, dtype: np.dtype,
                 labels: bool) -> tuple[list[str], np.ndarray, np.ndarray | None] | None:
    """(keys, features [n, *shape], labels or None) of a regular shard; None if it is not.

    ``buf`` (the whole shard, a writable buffer) stays referenced by the features view.
    """
    buf = memoryview(buf).cast("B")
    first = _first_sample(buf) if n >= 2 else None
    if first is None:
        return None
    members, stride = first
    suffixes = [s for _, s, _ in members]
    if member not in suffixes or (labels and "cls" not in suffixes) \
            or n * stride + 2 * BLOCK > len(buf) or any(buf[n * stride:]):
        return None
    arr = np.frombuffer(buf, np.uint8)
    off, _, size = members[suffixes.index(member)]
    try:
        first_tensor = decode_tensor(buf[off + BLOCK:off + BLOCK + size])
    except FormatError:
        return None
    if first_tensor.shape != shape or first_tensor.dtype != dtype:
        return None
    mp_names = _rows(arr, off, n, stride, 100)
    dots = mp_names == ord(".")
    keylen = dots.argmax(axis=1)
    if not dots.any(axis=1).all():
        return None
    sizes = {}
    for moff, suffix, msize in members:
        sizes[suffix] = _headers_ok(_rows(arr, moff, n, stride, BLOCK), msize,
                                    suffix.encode(), keylen, mp_names)
        if sizes[suffix] is None:
            return None
    prefix = size - first_tensor.nbytes  # msgpack bytes before the raw data
    heads = _rows(arr, off + BLOCK, n, stride, prefix)
    if (sizes[member] != size).any() or not (heads == heads[0]).all():
        return None
    # A view into the shard's bytes: no copy; a batch gathers its rows from here.
    rows = _rows(arr, off + BLOCK + prefix, n, stride, first_tensor.nbytes)  # [n, bytes]
    features = rows.view(dtype).reshape(n, *shape)                            # [n, T', D]
    cls = None
    if labels:
        coff = members[suffixes.index("cls")][0]
        cls = _labels(buf, coff + BLOCK, stride, sizes["cls"])
        if cls is None:
            return None
    keys = [bytes(mp_names[i, :keylen[i]]).decode("utf-8", "replace") for i in range(n)]
    return keys, features, cls
