"""DARE's keep-mask generator: counter-based, so any entry's draw is computed from its position.

A mask entry is ``u(i) >= drop_rate`` with ``u(i)`` a uniform in [0, 1) on a 2⁻²⁴ grid that
depends only on (seed, tensor name, expert index) and the flat position ``i`` of the entry:

* key: two 32-bit words ``k1, k2`` from SHA-256 of ``"{seed}\\0{tensor name}\\0{expert index}"``
  (a stable hash, not Python's salted ``hash()``);
* counter: ``i = hi·2³¹ + lo`` with ``lo < 2³¹``;
* ``h = lowbias32(lowbias32(lo ^ k1) + k2 + hi·0x9E3779B9)`` (32-bit wrapping arithmetic;
  ``lowbias32`` is C. Wellons's bijective integer hash: xorshift 16, × 0x7feb352d, xorshift 15,
  × 0x846ca68b, xorshift 16);
* ``u = (h >> 8) · 2⁻²⁴``.

This replaced drawing the masks in order from torch's CPU Mersenne Twister (≈ 2 ns per draw,
serial; half of DARE+TIES's time on a 7B matrix). The hash is a few integer operations that
inductor vectorises inside the fused kernels (≈ 0.6 ns per entry and expert, no uniforms written
to or read from memory), gives the same bits eagerly, compiled, on the CPU and on a GPU, and needs
no replay: the TIES threshold sample and the fix-up after a fused pass compute the masks at just
the positions they need. ``tests/test_counter_rng.py`` checks it against a NumPy ``uint32``
implementation and checks the masks' statistics.

All arithmetic is on ``int32`` tensors; torch's (and inductor's) ``int32`` multiply and add wrap
modulo 2³², and right shifts are made logical with a mask.
"""

from __future__ import annotations

import hashlib
import math
from typing import List, Optional, Tuple

import torch

#: counters are split at this power of two (spans of a chunked pass never cross it)
SPLIT = 1 << 31
_LO_MASK = SPLIT - 1
_GOLDEN = 0x9E3779B9
_M1 = 0x7FEB352D
_M2 = 0x846CA68B - (1 << 32)  # as a signed int32
_SCALE = 1.0 / (1 << 24)


def _wrap32(value: int) -> int:
    """``value`` modulo 2³² as a signed int32 Python int."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= (1 << 31) else value


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of an int32 tensor (``>>`` is arithmetic on signed ints)."""
    return (x >> bits) & ((1 << (32 - bits)) - 1)


def lowbias32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ _shift_right(x, 16)
    x = x * _M1
    x = x ^ _shift_right(x, 15)
    x = x * _M2
    return x ^ _shift_right(x, 16)


def bits24(lo: torch.Tensor, k1, k2) -> torch.Tensor:
    """``h >> 8`` (int32 in ``0 … 2²⁴−1``) for int32 counters ``lo`` (< 2³¹) with keys ``k1`` and
    ``k2`` (int32 tensors or ints; ``k2`` already holds the ``hi·0x9E3779B9`` term, see
    :func:`span_keys`). Traceable: the fused kernels call this same function."""
    return _shift_right(lowbias32(lowbias32(lo ^ k1) + k2), 8)


def uniform(lo: torch.Tensor, k1, k2) -> torch.Tensor:
    """float32 uniforms ``bits24 · 2⁻²⁴`` (exact) for counters ``lo`` with keys ``k1``, ``k2``."""
    return bits24(lo, k1, k2).to(torch.float32) * _SCALE


def keep_threshold(drop_rate: float) -> int:
    """The integer form of the keep test: ``uniform >= drop_rate`` (compared in float32, as torch
    compares a float32 tensor with a Python float) is exactly ``bits24 >= keep_threshold(drop_rate)``,
    because ``uniform`` is ``bits24·2⁻²⁴`` exactly. The fused kernels test the integers: no
    conversion and multiply per entry and expert."""
    return math.ceil(float(torch.tensor(drop_rate, dtype=torch.float32)) * (1 << 24))


def expert_key(seed: int, tensor_name: Optional[str], expert_index: int) -> Tuple[int, int]:
    """(k1, k2) for one expert's mask of one tensor, as signed int32 Python ints."""
    digest = hashlib.sha256(f"{seed}\0{tensor_name or ''}\0{expert_index}".encode()).digest()
    return (_wrap32(int.from_bytes(digest[:4], "little")), _wrap32(int.from_bytes(digest[4:8], "little")))


def span_keys(keys: List[Tuple[int, int]], start: int) -> Tuple[List[int], List[int], int]:
    """(k1 per expert, k2 per expert with the counter's high part folded in, lo of ``start``) for a
    span that starts at flat position ``start`` and does not cross a multiple of :data:`SPLIT`."""
    hi = start // SPLIT
    return ([k1 for k1, _ in keys], [_wrap32(k2 + hi * _GOLDEN) for _, k2 in keys], start & _LO_MASK)


def spans(n: int, size: int):
    """(start, stop) blocks of at most ``size`` entries over ``0…n−1`` that never cross a multiple
    of :data:`SPLIT` (so each has one ``hi``)."""
    start = 0
    while start < n:
        stop = min(n, start + size, (start // SPLIT + 1) * SPLIT)
        yield start, stop
        start = stop


def uniform_span(key: Tuple[int, int], start: int, stop: int, device=None) -> torch.Tensor:
    """The uniforms of one expert at flat positions ``start…stop−1`` (one ``hi``)."""
    k1s, k2s, lo = span_keys([key], start)
    counters = torch.arange(lo, lo + (stop - start), dtype=torch.int32, device=device)
    return uniform(counters, k1s[0], k2s[0])


def uniform_at(key: Tuple[int, int], positions: torch.Tensor) -> torch.Tensor:
    """The uniforms of one expert at arbitrary flat ``positions`` (int64, any device)."""
    k1, k2 = key
    lo = (positions & _LO_MASK).to(torch.int32)
    hi = (positions // SPLIT)
    k2_at = ((hi * _GOLDEN + (k2 & 0xFFFFFFFF)) & 0xFFFFFFFF)
    k2_at = torch.where(k2_at >= (1 << 31), k2_at - (1 << 32), k2_at).to(torch.int32)
    return uniform(lo, k1, k2_at)


def keep_mask(key: Tuple[int, int], numel: int, drop_rate: float, device=None, block: int = 1 << 24) -> torch.Tensor:
    """Bool keep-mask of one expert over a whole flattened tensor (computed in blocks)."""
    keep = torch.empty(numel, dtype=torch.bool, device=device)
    for start, stop in spans(numel, block):
        torch.ge(uniform_span(key, start, stop, device), drop_rate, out=keep[start:stop])
    return keep
