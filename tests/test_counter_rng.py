"""DARE's counter-based mask generator: bits against an independent NumPy uint32 implementation,
consistency between its entry points, and the masks' statistics."""

import hashlib

import numpy as np
import pytest
import torch

from mergekit_mllm.ops import counter_rng, dare_drop


def _lowbias32(x):
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x7FEB352D)
    x = x ^ (x >> np.uint32(15))
    x = x * np.uint32(0x846CA68B)
    return x ^ (x >> np.uint32(16))


def oracle_uniform(seed, name, expert, positions):
    """The documented generator, written with NumPy's wrapping uint32 and Python ints."""
    digest = hashlib.sha256(f"{seed}\0{name}\0{expert}".encode()).digest()
    k1 = np.uint32(int.from_bytes(digest[:4], "little"))
    k2 = int.from_bytes(digest[4:8], "little")
    positions = np.asarray(positions, dtype=np.int64)
    lo = (positions % (1 << 31)).astype(np.uint32)
    hi = positions // (1 << 31)
    k2_at = ((k2 + hi * 0x9E3779B9) % (1 << 32)).astype(np.uint32)
    with np.errstate(over="ignore"):
        h = _lowbias32(_lowbias32(lo ^ k1) + k2_at)
    return (h >> np.uint32(8)).astype(np.float32) * np.float32(2.0 ** -24)


def test_uniforms_match_the_numpy_oracle_across_the_counter_split():
    key = counter_rng.expert_key(7, "model.layers.3.mlp.up_proj.weight", 2)
    split = counter_rng.SPLIT
    for start, stop in [(0, 1000), (split - 700, split), (split, split + 500), (3 * split + 11, 3 * split + 400)]:
        want = oracle_uniform(7, "model.layers.3.mlp.up_proj.weight", 2, np.arange(start, stop))
        got_span = counter_rng.uniform_span(key, start, stop)
        got_at = counter_rng.uniform_at(key, torch.arange(start, stop))
        np.testing.assert_array_equal(got_span.numpy(), want)
        np.testing.assert_array_equal(got_at.numpy(), want)


def test_spans_never_cross_the_counter_split():
    split = counter_rng.SPLIT
    spans = list(counter_rng.spans(2 * split + 5, 3 * (1 << 29) + 7))
    assert spans[0][0] == 0 and spans[-1][1] == 2 * split + 5
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert all(start // split == (stop - 1) // split for start, stop in spans)
    assert split in {stop for _, stop in spans}


def test_dare_drop_uses_the_generator_on_each_experts_flat_positions():
    g = torch.Generator().manual_seed(0)
    tvs = torch.randn(3, 17, 29, generator=g)
    dropped = dare_drop(tvs, drop_rate=0.4, seed=5, tensor_name="w")
    for index in range(3):
        keep = oracle_uniform(5, "w", index, np.arange(17 * 29)).reshape(17, 29) >= np.float32(0.4)
        want = tvs[index] * torch.from_numpy(keep) / 0.6
        torch.testing.assert_close(dropped[index], want, rtol=0, atol=0)


@pytest.mark.parametrize("drop_rate", [0.1, 0.5, 0.9])
def test_masks_keep_the_right_fraction_independently(drop_rate):
    """Keep rate within 5 binomial standard errors; two experts' masks, and neighbouring entries
    of one mask, are independent (joint keep rate ≈ product); seeds and names change the mask."""
    n = 1 << 20
    keep = [counter_rng.keep_mask(counter_rng.expert_key(0, "t", i), n, drop_rate) for i in range(2)]
    p = 1.0 - drop_rate
    se = (p * (1 - p) / n) ** 0.5
    for mask in keep:
        assert abs(mask.float().mean().item() - p) < 5 * se
    joint_se = (p * p * (1 - p * p) / n) ** 0.5
    assert abs((keep[0] & keep[1]).float().mean().item() - p * p) < 5 * joint_se
    assert abs((keep[0][1:] & keep[0][:-1]).float().mean().item() - p * p) < 5 * joint_se
    other_seed = counter_rng.keep_mask(counter_rng.expert_key(1, "t", 0), n, drop_rate)
    other_name = counter_rng.keep_mask(counter_rng.expert_key(0, "u", 0), n, drop_rate)
    for other in (other_seed, other_name):
        assert abs((keep[0] & other).float().mean().item() - p * p) < 5 * joint_se


def test_uniforms_are_uniform_on_the_grid():
    u = counter_rng.uniform_span(counter_rng.expert_key(3, "x", 0), 0, 1 << 20)
    assert u.min() >= 0 and u.max() < 1
    assert torch.equal(u, torch.round(u * (1 << 24)) / (1 << 24))
    counts = torch.histc(u, bins=16, min=0, max=1)
    expected = u.numel() / 16
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 50  # 15 degrees of freedom: p ≈ 1e-5


@pytest.mark.parametrize("drop_rate", [0.0, 0.1, 0.3, 1 / 3, 0.5, 0.9, 3 * 2.0 ** -24, 1 - 2.0 ** -24, 0.123456789])
def test_integer_keep_test_is_the_uniform_keep_test(drop_rate):
    """The fused kernels keep where ``bits24 >= keep_threshold(p)``; the eager code where
    ``uniform >= p``. Equal on every 24-bit value near the threshold and on a million draws."""
    threshold = counter_rng.keep_threshold(drop_rate)
    bits = torch.arange(max(0, threshold - 3), min(1 << 24, threshold + 4), dtype=torch.int32)
    near = bits.to(torch.float32) * 2.0 ** -24
    assert torch.equal(bits >= threshold, near >= drop_rate)
    key = counter_rng.expert_key(5, "t", 1)
    counters = torch.arange(1 << 20, dtype=torch.int32)
    drawn = counter_rng.bits24(counters, *key)
    assert torch.equal(drawn >= threshold, counter_rng.uniform(counters, *key) >= drop_rate)
    assert torch.equal(counter_rng.uniform(counters, *key), drawn.to(torch.float32) * 2.0 ** -24)
