"""lowrank.py against numpy / torch references, edge cases (r = 0, full rank, non-square) and bad input."""

import math

import numpy as np
import pytest
import torch

from lora_course.lowrank import (
    best_rank_r,
    compression_ratio,
    dense_cost,
    effective_rank,
    energy_captured,
    low_rank_error,
    random_like,
    random_subspace_approximation,
    rank_for_energy,
    singular_values,
    stable_rank,
    storage_cost,
    subspace_similarity,
    truncated_svd,
    update_spectrum,
)

SHAPES = [(7, 5), (5, 7), (6, 6)]


def _matrix(d, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(d, k, generator=g, dtype=torch.float64)


def _numpy_best_rank_r(M, r):
    U, s, Vh = np.linalg.svd(M, full_matrices=False)
    return (U[:, :r] * s[:r]) @ Vh[:r]


@pytest.mark.parametrize("d,k", SHAPES)
def test_truncated_svd_shapes_and_values(d, k):
    M = _matrix(d, k)
    m = min(d, k)
    for r in range(m + 1):
        U_r, S_r, Vh_r = truncated_svd(M, r)
        assert U_r.shape == (d, r) and S_r.shape == (r,) and Vh_r.shape == (r, k)
        np.testing.assert_allclose(S_r.numpy(), np.linalg.svd(M.numpy(), compute_uv=False)[:r], rtol=1e-12)
        # orthonormal columns / rows
        np.testing.assert_allclose((U_r.T @ U_r).numpy(), np.eye(r), atol=1e-12)
        np.testing.assert_allclose((Vh_r @ Vh_r.T).numpy(), np.eye(r), atol=1e-12)


@pytest.mark.parametrize("d,k", SHAPES)
def test_best_rank_r_matches_numpy_and_has_rank_r(d, k):
    M = _matrix(d, k, seed=1)
    for r in range(min(d, k) + 1):
        M_r = best_rank_r(M, r)
        assert M_r.shape == (d, k)
        np.testing.assert_allclose(M_r.numpy(), _numpy_best_rank_r(M.numpy(), r), atol=1e-12)
        assert np.linalg.matrix_rank(M_r.numpy()) == r


def test_rank_zero_is_zero_and_full_rank_is_exact():
    M = _matrix(5, 3, seed=2)
    assert torch.count_nonzero(best_rank_r(M, 0)) == 0
    torch.testing.assert_close(best_rank_r(M, 3), M, atol=1e-12, rtol=0)
    S = singular_values(M)
    torch.testing.assert_close(low_rank_error(S, 0), torch.linalg.matrix_norm(M))
    torch.testing.assert_close(low_rank_error(S, 0, norm="spectral"), torch.linalg.matrix_norm(M, ord=2))
    assert float(low_rank_error(S, 3)) == 0.0
    assert float(low_rank_error(S, 3, norm="spectral")) == 0.0


@pytest.mark.parametrize("d,k", SHAPES)
def test_eckart_young_error_from_singular_values(d, k):
    M = _matrix(d, k, seed=3)
    S = singular_values(M)
    for r in range(min(d, k) + 1):
        residual = M - best_rank_r(M, r)
        fro = torch.linalg.matrix_norm(residual, ord="fro")
        spec = torch.linalg.matrix_norm(residual, ord=2)
        assert math.isclose(float(low_rank_error(S, r, "fro")), float(fro), rel_tol=1e-9, abs_tol=1e-12)
        assert math.isclose(float(low_rank_error(S, r, "spectral")), float(spec), rel_tol=1e-9, abs_tol=1e-12)


def test_fro_and_spectral_errors_differ_when_more_than_one_value_is_dropped():
    S = torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    assert float(low_rank_error(S, 1, "fro")) == pytest.approx(math.sqrt(9 + 4 + 1))
    assert float(low_rank_error(S, 1, "spectral")) == pytest.approx(3.0)
    assert float(low_rank_error(S, 2, "fro")) == pytest.approx(math.sqrt(5))
    assert float(low_rank_error(S, 2, "spectral")) == pytest.approx(2.0)


def test_float32_input_keeps_dtype():
    M = _matrix(8, 4).float()
    assert best_rank_r(M, 2).dtype == torch.float32
    assert low_rank_error(singular_values(M), 2).dtype == torch.float32


def test_integer_input_is_promoted_to_float():
    M = torch.tensor([[2, 0], [0, 1], [0, 0]])
    torch.testing.assert_close(best_rank_r(M, 1), torch.tensor([[2.0, 0.0], [0.0, 0.0], [0.0, 0.0]]))


def test_random_rank_r_subspace_does_worse_than_truncated_svd():
    M = _matrix(30, 20, seed=4)
    g = torch.Generator().manual_seed(0)
    for r in (1, 5, 10):
        R = random_subspace_approximation(M, r, generator=g)
        assert np.linalg.matrix_rank(R.numpy()) == r
        assert torch.linalg.matrix_norm(M - R) > torch.linalg.matrix_norm(M - best_rank_r(M, r))


def test_storage_cost_and_ratio():
    assert storage_cost(4096, 4096, 8) == 65_536
    assert dense_cost(4096, 4096) == 16_777_216
    assert compression_ratio(4096, 4096, 8) == pytest.approx(65_536 / 16_777_216)
    assert storage_cost(10, 3, 0) == 0
    assert storage_cost(10, 3, 3) == 39 and dense_cost(10, 3) == 30  # full rank factors cost more
    assert compression_ratio(10, 3, 3) > 1


def test_energy_captured():
    S = torch.tensor([3.0, 2.0, 1.0])
    assert energy_captured(S, 0) == 0.0
    assert energy_captured(S, 1) == pytest.approx(9 / 14)
    assert energy_captured(S, 2) == pytest.approx(13 / 14)
    assert energy_captured(S, 3) == pytest.approx(1.0)
    # Energy captured and the Frobenius error agree: 1 - e_r = err_r^2 / ||M||_F^2.
    M = _matrix(9, 6, seed=5)
    Sm = singular_values(M)
    for r in range(7):
        lhs = 1 - energy_captured(Sm, r)
        rhs = float(low_rank_error(Sm, r) ** 2 / torch.linalg.matrix_norm(M) ** 2)
        assert lhs == pytest.approx(rhs, abs=1e-12)


def test_rank_for_energy():
    S = torch.tensor([3.0, 2.0, 1.0])  # cumulative energy 9/14, 13/14, 1
    assert rank_for_energy(S, 0.5) == 1
    assert rank_for_energy(S, 9 / 14) == 1
    assert rank_for_energy(S, 0.9) == 2
    assert rank_for_energy(S, 0.95) == 3
    assert rank_for_energy(S, 1.0) == 3
    assert rank_for_energy(S, 0.0) == 0
    with pytest.raises(ValueError, match="fraction"):
        rank_for_energy(S, 1.5)


def test_effective_rank_reference_values():
    # Equal singular values: effective rank = their number.
    assert effective_rank(torch.ones(5)) == pytest.approx(5.0)
    # One direction only (zeros are ignored: 0 log 0 = 0).
    assert effective_rank(torch.tensor([2.0, 0.0, 0.0])) == pytest.approx(1.0)
    # By hand: p = (0.75, 0.25) -> exp(-(0.75 ln 0.75 + 0.25 ln 0.25)).
    expected = math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert effective_rank(torch.tensor([3.0, 1.0])) == pytest.approx(expected)
    assert effective_rank(torch.zeros(3)) == 0.0
    # Scale-invariant and bounded by the rank.
    S = singular_values(_matrix(10, 8, seed=6))
    assert effective_rank(7 * S) == pytest.approx(effective_rank(S))
    assert 1.0 <= effective_rank(S) <= 8.0


def test_stable_rank_reference_values():
    M = _matrix(10, 8, seed=7)
    S = singular_values(M)
    expected = float(torch.linalg.matrix_norm(M) ** 2 / torch.linalg.matrix_norm(M, ord=2) ** 2)
    assert stable_rank(S) == pytest.approx(expected)
    assert stable_rank(torch.ones(4)) == pytest.approx(4.0)
    assert stable_rank(torch.tensor([5.0, 0.0])) == pytest.approx(1.0)
    assert stable_rank(torch.zeros(3)) == 0.0
    assert 1.0 <= stable_rank(S) <= 8.0


def test_effective_and_stable_rank_can_disagree():
    # One big value and many small ones: the stable rank sees ~1, the entropy sees the tail.
    S = torch.tensor([10.0] + [1.0] * 50)
    assert stable_rank(S) < 1.6
    assert effective_rank(S) > 10


def test_subspace_similarity():
    g = torch.Generator().manual_seed(8)
    U, _, _ = torch.linalg.svd(torch.randn(12, 12, generator=g, dtype=torch.float64))
    assert subspace_similarity(U, U, 3, 3) == pytest.approx(1.0)
    assert subspace_similarity(U, U, 2, 5) == pytest.approx(1.0)  # nested subspaces
    assert subspace_similarity(U[:, :4], U[:, 4:], 4, 8) == pytest.approx(0.0, abs=1e-12)  # orthogonal
    # Against a direct numpy evaluation of Eq. 4 for two unrelated bases.
    V, _, _ = torch.linalg.svd(torch.randn(12, 12, generator=g, dtype=torch.float64))
    i, j = 3, 5
    ref = np.linalg.norm(U[:, :i].numpy().T @ V[:, :j].numpy(), "fro") ** 2 / min(i, j)
    assert subspace_similarity(U, V, i, j) == pytest.approx(ref)
    assert 0.0 <= subspace_similarity(U, V, i, j) <= 1.0
    # Two random directions in 12-d: the expected overlap is j/d, far from 1.
    assert subspace_similarity(U, V, 1, 1) < 0.9


def test_random_like_has_same_shape_and_norm():
    M = _matrix(6, 9, seed=9)
    R = random_like(M, generator=torch.Generator().manual_seed(0))
    assert R.shape == M.shape
    torch.testing.assert_close(torch.linalg.matrix_norm(R), torch.linalg.matrix_norm(M))


@pytest.mark.parametrize("bad_r", [-1, 6])
def test_bad_rank_raises_clear_error(bad_r):
    M = _matrix(7, 5)
    with pytest.raises(ValueError, match=r"r="):
        truncated_svd(M, bad_r)
    with pytest.raises(ValueError, match=r"r="):
        best_rank_r(M, bad_r)
    with pytest.raises(ValueError, match=r"r="):
        low_rank_error(singular_values(M), bad_r)
    with pytest.raises(ValueError, match=r"r="):
        energy_captured(singular_values(M), bad_r)
    with pytest.raises(ValueError, match=r"r="):
        storage_cost(7, 5, bad_r)


def test_too_large_rank_message_says_the_limit():
    with pytest.raises(ValueError, match=r"min\(d, k\).*7x5.*= 5"):
        best_rank_r(_matrix(7, 5), 6)


@pytest.mark.parametrize("bad_r", [2.0, "2", True, None])
def test_non_int_rank_raises_type_error(bad_r):
    with pytest.raises(TypeError, match="must be an int"):
        best_rank_r(_matrix(4, 4), bad_r)


def test_bad_inputs():
    with pytest.raises(ValueError, match="2-D"):
        best_rank_r(torch.ones(3), 1)
    with pytest.raises(ValueError, match="1-D"):
        low_rank_error(torch.ones(3, 3), 1)
    with pytest.raises(ValueError, match="sorted descending"):
        low_rank_error(torch.tensor([1.0, 2.0]), 1)
    with pytest.raises(ValueError, match="norm must be"):
        low_rank_error(torch.tensor([2.0, 1.0]), 1, norm="nuclear")
    with pytest.raises(ValueError, match="same space"):
        subspace_similarity(torch.eye(3), torch.eye(4), 1, 1)
    with pytest.raises(ValueError, match="i and j"):
        subspace_similarity(torch.eye(3), torch.eye(3), 0, 1)
    with pytest.raises(ValueError, match="j=4"):
        subspace_similarity(torch.eye(3), torch.eye(3), 1, 4)
    with pytest.raises(ValueError, match="positive int"):
        storage_cost(0, 3, 0)
    with pytest.raises(ValueError, match="positive int"):
        dense_cost(3, -1)


def test_update_spectrum_low_rank_vs_random():
    g = torch.Generator().manual_seed(0)
    dW = torch.randn(40, 2, generator=g) @ torch.randn(2, 30, generator=g)  # rank 2
    s = update_spectrum(dW, r=2, generator=g)
    assert s.shape == (40, 30) and s.max_rank == 30
    assert s.energy_top_r == pytest.approx(1.0)
    assert s.energy_top_r_random < 0.5
    assert s.effective_rank <= 2.0 + 1e-6 < s.effective_rank_random
    assert s.stable_rank <= 2.0 + 1e-6 < s.stable_rank_random
    torch.testing.assert_close(s.S_random.square().sum(), s.S.square().sum())  # same norm
