"""Text in bounded chunks and the order-preserving worker pool."""

import pytest

from pkm_lm.data.textio import read_chunks


def test_chunks_never_split_lines(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes("é".encode() * 3000 + b"\nshort\n" + "ü".encode() * 10)
    chunks = list(read_chunks(path, chunk_bytes=1001))
    assert [line for c in chunks for line in c.lines] == ["é" * 3000, "short", "ü" * 10]
    assert sum(c.n_bytes for c in chunks) == path.stat().st_size


def _slow_square(x):
    import time

    time.sleep(0.02 * (x % 3))  # later items often finish first
    if x == 13:
        raise ZeroDivisionError("item 13")
    return x * x


@pytest.mark.parametrize("workers", [1, 2])
def test_ordered_map_keeps_order_and_raises(workers):
    from pkm_lm.data.textio import ordered_map

    assert list(ordered_map(_slow_square, range(12), workers)) == [(i, i * i) for i in range(12)]
    with pytest.raises(ZeroDivisionError, match="item 13"):
        list(ordered_map(_slow_square, range(20), workers))
    with pytest.raises(ValueError, match="workers=0"):
        list(ordered_map(_slow_square, range(3), 0))
