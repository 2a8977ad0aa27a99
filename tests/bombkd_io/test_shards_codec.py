"""codec: round trip, refusal of anything that is not a format-1 member, golden bytes."""
from __future__ import annotations

import msgpack
import numpy as np
import pytest

from bombkd_io.errors import FormatError
from bombkd_io.shards.codec import (decode_label, decode_meta, decode_tensor, encode_label,
                                   encode_meta, encode_tensor)

# The student member of golden sample 0 (tests/assets/golden): float16 [2, 4] of
# (arange(8) - 3) * 0.5, i.e. -1.5 .. 2.0. Format 1 is these bytes, forever.
GOLDEN_HEX = ("83a56474797065a7666c6f61743136a57368617065920204a464617461c41000be00bc00b800000038"
              "003c003e0040")
GOLDEN = ((np.arange(8, dtype=np.float32).reshape(2, 4) - 3) * 0.5).astype(np.float16)


@pytest.mark.parametrize("dtype", ["float16", "float32", ">f2", ">f4"])
@pytest.mark.parametrize("shape", [(16, 768), (1, 5), (3,), (), (0, 4)])
def test_round_trip_exact_and_little_endian(dtype, shape):
    rng = np.random.default_rng(0)
    array = rng.standard_normal(shape).astype(dtype)
    out = decode_tensor(encode_tensor(array))
    assert out.shape == shape
    assert out.dtype == np.dtype(dtype).newbyteorder("<")
    np.testing.assert_array_equal(out, array)


def test_decode_is_zero_copy_view_of_the_unpacked_bytes():
    out = decode_tensor(encode_tensor(np.ones((4, 8), np.float16)))
    assert not out.flags.owndata and not out.flags.writeable
    assert isinstance(out.base, (bytes, memoryview)) or isinstance(out.base.base, bytes)


def test_decode_accepts_memoryview_of_a_larger_buffer():
    payload = encode_tensor(GOLDEN)
    buf = memoryview(b"xx" + payload + b"yy")[2:-2]
    np.testing.assert_array_equal(decode_tensor(buf), GOLDEN)


def test_golden_bytes():
    assert encode_tensor(GOLDEN).hex() == GOLDEN_HEX
    out = decode_tensor(bytes.fromhex(GOLDEN_HEX))
    assert out.dtype == np.float16 and out.shape == (2, 4)
    assert out.tolist() == [[-1.5, -1.0, -0.5, 0.0], [0.5, 1.0, 1.5, 2.0]]


def _pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


GOOD = {"dtype": "float16", "shape": [2], "data": b"\x00\x3c\x00\x40"}


@pytest.mark.parametrize("payload, message", [
    (b"", "msgpack"),
    (b"\xc1", "msgpack"),                                        # reserved byte
    (_pack(GOOD) + b"\x00", "msgpack"),                          # trailing bytes
    (_pack([1, 2, 3]), "must be a map"),
    (_pack({**GOOD, "extra": 1}), "msgpack"),                    # 4 keys > max_map_len
    (_pack({"dtype": "float16", "shape": [2]}), "must be a map with keys"),
    (_pack({"dtype": "float16", "shape": [2], "date": b"1234"}), "must be a map with keys"),
    (_pack({**GOOD, "dtype": "int8"}), "unknown dtype 'int8'"),
    (_pack({**GOOD, "dtype": "float64"}), "unknown dtype"),
    (_pack({**GOOD, "shape": [3]}), "needs 6"),                  # size mismatch
    (_pack({**GOOD, "shape": [-2]}), "non-negative"),
    (_pack({**GOOD, "shape": [True, 2]}), "non-negative ints"),
    (_pack({**GOOD, "shape": "2"}), "list"),
    (_pack({**GOOD, "shape": [1] * 9}), "msgpack"),              # more dims than allowed
    (_pack({**GOOD, "data": "text"}), "bin"),
    (_pack({**GOOD, "dtype": "x" * 100}), "msgpack"),            # long string refused unpacking
])
def test_invalid_members_raise_format_error_naming_where(payload, message):
    with pytest.raises(FormatError, match=message) as info:
        decode_tensor(payload, where="shard-000003.tar sample k7")
    assert str(info.value).startswith("shard-000003.tar sample k7: ")


def test_declared_huge_bin_is_refused_without_allocating():
    # bin32 header announcing 2 GiB of data, followed by 4 bytes.
    payload = (b"\x83\xa5dtype\xa7float16\xa5shape\x91\xce\x40\x00\x00\x00\xa4data"
               b"\xc6\x80\x00\x00\x00" + b"\x00" * 4)
    with pytest.raises(FormatError, match="msgpack"):
        decode_tensor(payload)


@pytest.mark.parametrize("array", [np.zeros(3, np.float64), np.zeros(3, np.int32),
                                   np.zeros([1] * 9, np.float16)])
def test_encode_refuses_what_format_1_cannot_hold(array):
    with pytest.raises(FormatError):
        encode_tensor(array)


# ---- KEY.cls and KEY.json ----------------------------------------------------------------------

@pytest.mark.parametrize("label", [0, 7, 123, 10 ** 17, -1])
def test_label_round_trip(label):
    assert decode_label(memoryview(encode_label(label))) == label


def test_label_and_meta_golden_bytes():
    """Golden sample 1's .cls and sample 0's .json (tests/assets/golden)."""
    assert encode_label(1) == b"1"
    doc = {"path": "videos/v_jump_g01_c01.avi", "class_name": "jump",
           "frame_indices": [0, 2, 4, 6], "fps": 25.0}
    assert encode_meta(doc) == (b'{"class_name":"jump","fps":25.0,"frame_indices":[0,2,4,6],'
                                b'"path":"videos/v_jump_g01_c01.avi"}')


@pytest.mark.parametrize("payload", [b"", b"abc", b"1.0", b" 1", b"+1", b"1\n", b"9" * 19])
def test_invalid_labels_raise_format_error_naming_where(payload):
    with pytest.raises(FormatError, match="not a decimal class id") as info:
        decode_label(payload, where="shard-000003.tar sample k7")
    assert str(info.value).startswith("shard-000003.tar sample k7: ")


def test_meta_round_trip_and_invalid():
    doc = {"path": "videos/a.avi", "decoded_by": "dali/mixed", "frame_indices": [0, 2]}
    assert decode_meta(memoryview(encode_meta(doc))) == doc
    for payload in (b"{", b"[1]", b"\xff"):
        with pytest.raises(FormatError, match="shard-000003.tar sample k7: member .json"):
            decode_meta(payload, where="shard-000003.tar sample k7")
