"""`untrusted.load_npz` on hostile `.npz` files: what it reads is bounded by `limit` and its
messages stay short whatever the member names are."""

import io
import zipfile

import numpy as np
import pytest

from exchange import untrusted
from exchange.errors import ExchangeFileError

MESSAGE_LIMIT = 400  # a path, a member name cut to 80 characters and the reason


def _member(descr: str, shape: tuple, payload: bytes) -> bytes:
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": descr, "fortran_order": False, "shape": shape})
    return header.getvalue() + payload


@pytest.mark.parametrize(
    "descr, shape, payload, reason",
    [("|O", (3,), b"\x80\x04N.", "Python objects"), ("<f4", (10**6,), bytes(64), "declares float32")],
    ids=["objects", "shape"],
)
def test_a_long_member_name_is_cut_in_the_message(tmp_path, descr, shape, payload, reason):
    path = tmp_path / "inputs.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x" * 5000 + ".npy", _member(descr, shape, payload))
    with pytest.raises(ExchangeFileError, match=reason) as raised:
        untrusted.load_npz(path)
    assert len(str(raised.value)) < MESSAGE_LIMIT


def test_members_that_inflate_beyond_the_limit_are_refused_before_reading(tmp_path):
    """Zeros deflate about 1000x: the compression cap alone lets 32x the file's limit through."""
    path = tmp_path / "inputs.npz"
    np.savez_compressed(path, x=np.zeros((64, 1024), np.float32))  # 256 KiB inflated, a few KiB on disk
    limit = 8 * path.stat().st_size
    with pytest.raises(ExchangeFileError, match="inflate"):
        untrusted.load_npz(path, limit=limit)
    assert set(untrusted.load_npz(path, limit=1 << 20)) == {"x"}


def test_a_member_name_with_a_line_break_stays_one_line(tmp_path):
    """A zip member's name is the file's: in a refusal it is repr'd (no line break) and cut."""
    path = tmp_path / "odd.npz"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_BZIP2) as archive:
        archive.writestr("x\nerror: forged line" + "y" * 200 + ".npy", b"\x93NUMPY")
    with pytest.raises(ExchangeFileError) as refused:
        untrusted.load_npz(path)
    message = str(refused.value)
    assert "\n" not in message and "uses an unsupported compression" in message
    assert "'x\\nerror: forged line" in message and "y" * 100 not in message
