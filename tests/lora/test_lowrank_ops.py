"""The low-rank kernels against the dense ones (float64, pure tensors)."""

from __future__ import annotations

import pytest
import torch

from mergekit_mllm import ops
from mergekit_mllm.ops import lowrank


def low_rank_experts(shape=(32, 48), rank=4, experts=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    m, n = shape
    return [lowrank.LowRank(torch.randn(m, rank, generator=generator, dtype=torch.float64) * 0.1,
                            torch.randn(rank, n, generator=generator, dtype=torch.float64)) for _ in range(experts)]


def dense(task_vectors):
    return torch.stack([tv.dense() for tv in task_vectors])


def relative(a, b):
    return float((a - b).norm() / b.norm())


def test_low_rank_svd_is_the_exact_thin_svd_without_zero_triplets():
    total = lowrank.low_rank_sum(low_rank_experts())  # rank 12 in a 32×48 space
    u, s, vh = lowrank.low_rank_svd(total)
    assert s.numel() == 12
    torch.testing.assert_close((u * s) @ vh, total.dense())
    torch.testing.assert_close(s, torch.linalg.svdvals(total.dense())[:12])
    torch.testing.assert_close(u.T @ u, torch.eye(12, dtype=torch.float64))
    assert lowrank.low_rank_svd(total, 5)[1].numel() == 5
    assert float(total.squared_norm()) == pytest.approx(float(total.dense().square().sum()))


@pytest.mark.parametrize("shape", [(32, 32), (16, 32), (48, 32)])
def test_full_rank_sums_match_every_dense_kernel(shape):
    experts = low_rank_experts(shape, rank=16)
    stacked = dense(experts)
    pairs = [
        (lowrank.tsv(experts, rank_fraction=1 / 3), ops.tsv(stacked, rank_fraction=1 / 3)),
        (lowrank.iso_c(experts), ops.iso_c(stacked)),
        (lowrank.iso_cts(experts, common_space_fraction=0.8), ops.iso_cts(stacked, common_space_fraction=0.8)),
        (lowrank.wudi(experts, iterations=20, lr=1e-3), ops.wudi(stacked, iterations=20, lr=1e-3)),
        (lowrank.wudi_exact(experts), ops.wudi_exact(stacked)),
    ]
    for variant in ("lora", "full"):
        pairs.append((lowrank.optmerge(experts, variant=variant, rank_fraction=1 / 3, iterations=20, lr=1e-3),
                      ops.optmerge(stacked, variant=variant, rank_fraction=1 / 3, iterations=20, lr=1e-3)))
        pairs.append((lowrank.optmerge_exact(experts, variant=variant, rank_fraction=1 / 3),
                      ops.optmerge_exact(stacked, variant=variant, rank_fraction=1 / 3)))
    for ours, theirs in pairs:
        assert relative(ours, theirs) < 1e-10


def test_interference_methods_match_on_low_rank_experts_with_an_untouched_one():
    experts = low_rank_experts()
    experts.append(lowrank.LowRank(torch.zeros(32, 0, dtype=torch.float64), torch.zeros(0, 48, dtype=torch.float64)))
    stacked = dense(experts)
    assert relative(lowrank.wudi(experts, iterations=20, lr=1e-3), ops.wudi(stacked, iterations=20, lr=1e-3)) < 1e-10
    for variant in ("lora", "full"):
        ours = lowrank.optmerge(experts, variant=variant, rank_fraction=0.25, iterations=20, lr=1e-3)
        assert relative(ours, ops.optmerge(stacked, variant=variant, rank_fraction=0.25, iterations=20, lr=1e-3)) < 1e-10
    # thin projectors: the factor C = BBᵀ is Σrᵢ = 12 wide, not Σm = 96
    assert lowrank.wudi_problem(experts).total_rank == 12


def test_tsv_with_k_within_the_ranks_matches_and_beyond_it_the_dense_form_is_arbitrary():
    experts = low_rank_experts(rank=4)
    stacked = dense(experts)
    assert relative(lowrank.tsv(experts, rank_fraction=1 / 8), ops.tsv(stacked, rank_fraction=1 / 8)) < 1e-10
    # k = 10 > r = 4: the dense TSV takes 6 zero-σ triplets per expert whose
    # vectors are rounding noise, and its polar factor mixes them in
    jitter = torch.randn(stacked.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 1e-12
    dense_a, dense_b = ops.tsv(stacked, rank_fraction=1 / 3), ops.tsv(stacked + jitter, rank_fraction=1 / 3)
    assert relative(dense_a, dense_b) > 1e-3
    ours = lowrank.tsv(experts, rank_fraction=1 / 3)
    assert relative(ours, lowrank.tsv(experts, rank_fraction=1 / 8 + 1e-9)) < 1e-10  # only the 4 real triplets count


def test_iso_c_is_the_dense_result_on_the_spaces_of_the_sum():
    experts = low_rank_experts()
    result = ops.iso_c(dense(experts))
    u, _, vh = torch.linalg.svd(lowrank.low_rank_sum(experts).dense())
    left, right = u[:, :12] @ u[:, :12].T, vh[:12].T @ vh[:12]
    torch.testing.assert_close(lowrank.iso_c(experts), left @ result @ right)
    assert float((result - left @ result @ right).norm()) > float((left @ result @ right).norm())
