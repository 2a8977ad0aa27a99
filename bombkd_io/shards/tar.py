"""Everything the cache knows about tar: headers, member and archive sizes, the sequential
member walk, and the numpy fast path for a regular shard.

Sizes: a member is a 512-byte header plus its data padded to whole blocks; a finished archive
adds two zero blocks and is padded to whole 10240-byte records (what ``tarfile``, under
``webdataset.TarWriter``, writes). ``featurize --dry-run`` adds up a cache with them.

The walk, generators over a file object (or bytes in memory), in big reads that grow only with
the bytes that arrive:
  _Stream -> iter_members   yields (key, suffix, payload view) per regular file member
          -> iter_samples   yields (key, {suffix: payload view}) for consecutive members of a key

``read_regular`` is the fast path: a shard whose samples all repeat the first sample's layout
(same members, same block counts, same tensor header: what ``ShardSetWriter`` writes) is checked
and decoded with a few array operations instead of per-member Python. It checks every header's
checksum, type, size and name, and every tensor member's msgpack header byte for byte against
the first one (decoded with the bounded ``decode_tensor``), and returns ``None`` at the first
irregularity: the walk then reads the shard and names any problem.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from numpy.lib.stride_tricks import as_strided

from bombkd_io.errors import FormatError, ShardError
from bombkd_io.shards.codec import decode_label, decode_tensor

BLOCK = 512
RECORD = 20 * BLOCK  # tarfile pads a closed archive to whole records
CHUNK = 8 << 20  # bytes per read: big reads keep syscalls and Python calls per sample low
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


def member_bytes(size: int) -> int:
    """Bytes of one member holding ``size`` bytes: a header block plus the data padded to whole
    blocks."""
    return BLOCK + padded(size)


def archive_bytes(members: int) -> int:
    """Bytes of a finished archive whose members take ``members`` bytes: two zero blocks, then
    padding to whole records."""
    return -(-(members + 2 * BLOCK) // RECORD) * RECORD


# ---- the member walk ----------------------------------------------------------------------------

class _Stream:
    """Big reads from a file object (or a memoryview of bytes already in memory); ``take(n)``
    returns a view of the next ``n`` bytes."""

    def __init__(self, source, shard: str, chunk: int = CHUNK):
        self.file = _ViewFile(source) if isinstance(source, memoryview) else source
        self.shard, self.chunk = shard, chunk
        self.buf, self.pos, self.offset = memoryview(b""), 0, 0  # offset: of buf[0] in the file
        self.member = ""  # name of the member being read, for errors

    def error(self, reason: str) -> ShardError:
        return ShardError(self.shard, reason, split_name(self.member)[0] if self.member else None)

    def take(self, n: int) -> memoryview | None:
        """The next ``n`` bytes; ``None`` at a clean end of file; ShardError if cut short."""
        end = self.pos + n
        if end > len(self.buf):
            self._refill(n)
            end = self.pos + n
            if end > len(self.buf):
                if self.pos == len(self.buf):
                    return None
                raise self.error(f"truncated at byte {self.offset + len(self.buf)}: {n} bytes "
                                 f"wanted, {len(self.buf) - self.pos} left")
        view = self.buf[self.pos:end]
        self.pos = end
        return view

    def _refill(self, need: int) -> None:
        """Make the next ``need`` bytes readable (fewer at the end of the file). The buffer grows
        only with bytes that arrive: a tar header claiming terabytes in a small shard costs one
        chunk, then a "truncated" error - never an allocation of the claimed size."""
        rest = self.buf[self.pos:]
        size = max(self.chunk, min(need, len(rest) + self.chunk))
        left = getattr(self.file, "left", None)  # what the source still holds, where it knows
        if left is not None:
            size = len(rest) + min(size - len(rest), left)
        buf = bytearray(size)  # fresh buffers: views already handed out stay valid
        buf[:len(rest)] = rest
        filled = len(rest) + read_into(self.file, memoryview(buf)[len(rest):])
        while filled == len(buf) < need:  # more is wanted and the file went on: double
            bigger = bytearray(min(need, 2 * len(buf)))
            bigger[:filled] = buf
            buf = bigger
            filled += read_into(self.file, memoryview(buf)[filled:])
        self.offset += self.pos
        self.buf, self.pos = memoryview(buf)[:filled], 0


class _ViewFile:
    """A read-only file over bytes already in memory, without copying them (unlike BytesIO)."""

    def __init__(self, view: memoryview):
        self.view, self.pos = view, 0

    @property
    def left(self) -> int:
        return len(self.view) - self.pos

    def readinto(self, out: memoryview) -> int:
        n = min(len(out), len(self.view) - self.pos)
        out[:n] = self.view[self.pos:self.pos + n]
        self.pos += n
        return n


def read_into(fileobj, view: memoryview) -> int:
    """Fill ``view`` from ``fileobj`` (fewer bytes at its end); the number of bytes read."""
    got = 0
    readinto = getattr(fileobj, "readinto", None)
    while got < len(view):
        if readinto is not None:
            n = readinto(view[got:])
        else:  # webdataset's Pipe objects only have read()
            data = fileobj.read(len(view) - got)
            n = len(data)
            view[got:got + n] = data
        if not n:
            break
        got += n
    return got


def _header(block: memoryview, stream: _Stream):
    try:
        return parse_header(bytes(block))
    except ValueError as exc:
        raise stream.error(f"corrupt tar header at byte {stream.offset + stream.pos - BLOCK} "
                           f"({exc})") from exc


def iter_members(source, shard: str) -> Iterator[tuple[str, str, memoryview]]:
    """Yields (key, suffix, payload) of each regular file member of ``source`` (a file object or
    a memoryview), in tar order. ``KEY.a.b`` gives (``KEY``, ``a.b``); pax and GNU long names
    are followed. ShardError naming ``shard`` (and the member's key) for a corrupt or truncated
    archive.
    """
    stream, long_name = _Stream(source, shard), None
    while True:
        block = stream.take(BLOCK)
        head = None if block is None else _header(block, stream)
        if head is None:
            return
        name, size, kind = head
        stream.member = long_name or name
        block = stream.take(padded(size)) if size else memoryview(b"")
        if block is None:
            raise stream.error(f"truncated: member {name} has no data")
        if kind in (b"L", b"x"):  # GNU long name / pax header: names the next member
            long_name = _long_name(bytes(block[:size]), kind) or long_name
            continue
        if kind in (b"0", b"\0", b"7"):  # not directories, links, global pax headers
            long_name = None
            yield *split_name(stream.member), block[:size]


def _long_name(payload: bytes, kind: bytes) -> str | None:
    if kind == b"L":
        return payload.split(b"\0", 1)[0].decode("utf-8", "replace")
    for record in payload.decode("utf-8", "replace").splitlines():
        _, _, keyval = record.partition(" ")
        if keyval.startswith("path="):
            return keyval[5:]
    return None


def iter_samples(source, shard: str) -> Iterator[tuple[str, dict[str, memoryview]]]:
    """Yields (key, {suffix: payload}) for each run of consecutive members sharing a key."""
    key, fields = None, {}
    for k, suffix, payload in iter_members(source, shard):
        if k != key:
            if fields:
                yield key, fields
            key, fields = k, {}
        if suffix in fields:
            raise ShardError(shard, f"member {k}.{suffix} appears twice", key)
        fields[suffix] = payload
    if fields:
        yield key, fields


# ---- the fast path for a regular shard ----------------------------------------------------------

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
        off += member_bytes(head[1])
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

    ``buf`` (the whole shard: bytes read into a buffer, or a read-only mapping) stays
    referenced by the features view.
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
