"""Stage windows against the tables of SPEC 5 (3 decimals; the reference's 1000-step grid is coarser)."""

import pytest

from msdd.flow.schedule import local_times, stage_of_tau, stage_windows


def _close(a, b, tol=1.5e-3):
    assert a == pytest.approx(b, abs=tol)


def test_four_stage_table():
    w = stage_windows(4, 256)
    assert [x.resolution for x in w] == [32, 64, 128, 256]
    for x, t0, e in zip(w, [1.0, 0.857, 0.667, 0.400], [0.75, 0.5, 0.25, 0.0]):
        _close(x.t_start, t0)
        _close(x.t_end, e)
    taus = [1.0, 0.824, 0.574, 0.281, 0.0]
    for x, a, b in zip(w, taus[:-1], taus[1:]):
        _close(x.tau_start, a)
        _close(x.tau_end, b)
    for x, a, b in zip(w[1:], [0.571, 0.667, 0.800], [0.742, 0.577, 0.346]):
        _close(x.alpha, a)
        _close(x.beta, b)
    assert (w[0].alpha, w[0].beta) == (1.0, 0.0)


def test_three_stage_table():
    w = stage_windows(3, 256)
    assert [x.resolution for x in w] == [64, 128, 256]
    for x, t0 in zip(w, [1.0, 0.800, 0.500]):
        _close(x.t_start, t0)
    taus = [1.0, 0.744, 0.385, 0.0]
    for x, a, b in zip(w, taus[:-1], taus[1:]):
        _close(x.tau_start, a)
        _close(x.tau_end, b)
    for x, a, b in zip(w[1:], [0.600, 0.750], [0.693, 0.433]):
        _close(x.alpha, a)
        _close(x.beta, b)


@pytest.mark.parametrize("S", [1, 2, 3, 4, 5])
def test_windows_are_contiguous_and_rectified(S):
    w = stage_windows(S, 512)
    assert w[0].tau_start == 1.0 and w[-1].tau_end == 0.0 and w[-1].t_end == 0.0
    for a, b in zip(w[:-1], w[1:]):
        assert a.tau_end == b.tau_start
        # the renoised start's noise std (alpha * k * sigma) equals the rectified start t0
        sigma = a.t_end
        k = (1 + 1 / (1 / 3)) ** 0.5
        _close(b.alpha * k * sigma, b.t_start, 1e-9)
        _close(b.alpha * (1 - sigma) + b.t_start, 1.0, 1e-9)


def test_stage_of_tau_matches_windows():
    w = stage_windows(4, 256)
    for x in w:
        mid = (x.tau_start + x.tau_end) / 2
        assert stage_of_tau(w, mid) == x.index
        assert stage_of_tau(w, x.tau_start) == x.index  # windows are (tau_end, tau_start]
    assert stage_of_tau(w, 0.0) == 3
    with pytest.raises(ValueError, match="tau must be in"):
        stage_of_tau(w, 1.5)


def test_windows_carry_gamma_and_the_stage_time_grid():
    assert {x.gamma for x in stage_windows(3, 64, 0.2)} == {0.2}
    assert {x.gamma for x in stage_windows(3, 64)} == {1 / 3}
    with pytest.raises(ValueError, match=r"gamma must be in \(0, 1/3\], got 0\.5"):
        stage_windows(3, 64, 0.5)
    assert local_times(4) == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert local_times(2, 0.5) == [0.5, 0.25, 0.0]  # a chain started part-way through a stage
