"""PackedLinear: same math as F.linear at every row count, through a bounded set of shapes."""
import pytest
import torch
import torch.nn.functional as F

from engine.models.cpu_linear import EXACT_ROWS, PackedLinear, packing_available, row_bucket


def test_row_bucket_bounds_the_shapes_and_the_padding():
    sizes = {row_bucket(r) for r in range(1, 4097)}
    assert len(sizes) <= EXACT_ROWS + 8 * 8  # exact up to 16, then 8 per octave to 4096
    for rows in range(1, 4097):
        b = row_bucket(rows)
        assert b >= rows and row_bucket(b) == b
        assert b == rows if rows <= EXACT_ROWS else b - rows <= rows / 8
    assert [row_bucket(r) for r in (16, 17, 19, 33, 100, 1000)] == [16, 18, 20, 36, 104, 1024]


@pytest.mark.parametrize("rows", [1, 7, 16, 17, 33, 130])
def test_packed_linear_matches_f_linear_with_padded_rows(rows):
    g = torch.Generator().manual_seed(rows)
    w, b = torch.randn(96, 40, generator=g), torch.randn(96, generator=g)
    x = torch.randn(rows, 40, generator=g)
    assert packing_available()  # the CPU torch wheel CI installs ships oneDNN
    got = PackedLinear(w, b, 16)(x)
    assert got.shape == (rows, 96)
    torch.testing.assert_close(got, F.linear(x, w, b), atol=1e-4, rtol=1e-5)


def test_heap_trimmer_rate_limits_by_state():
    from engine.memory_trim import BUSY_INTERVAL_S, IDLE_INTERVAL_S, HeapTrimmer
    now = [0.0]
    trimmer = HeapTrimmer(clock=lambda: now[0])
    assert trimmer.available  # glibc (CI and the Docker image are Linux/glibc)
    assert not trimmer.maybe_trim(idle=True)  # just started
    now[0] = IDLE_INTERVAL_S
    assert not trimmer.maybe_trim(idle=False)  # busy waits longer
    assert trimmer.maybe_trim(idle=True)
    assert not trimmer.maybe_trim(idle=True)
    now[0] += BUSY_INTERVAL_S
    assert trimmer.maybe_trim(idle=False) and trimmer.trims == 2
