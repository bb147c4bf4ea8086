// The fused TIES pass of mergekit_mllm.ops.streaming in one loop (see mergekit_mllm/ops/native.py).
//
// Per entry the same float32 operations, in the same order, as ``fused._ties_kernel`` (and so as
// the eager and dense TIES): the results are bit-identical (tests/test_fused.py runs every fused
// TIES test with this kernel and with the inductor one). Compiled once per machine and variant
// with -ffp-contract=off (no fused multiply-adds: they would round differently) and
// -march=native; the variant is chosen by the macros below:
//
//   MM_EXPERTS  number of experts (1 ... 64)
//   MM_DARE     1: DARE's keep test from the counter-based hash of mergekit_mllm.ops.counter_rng
//   MM_BF16     1: bfloat16 inputs and output, 0: float32
//   MM_PER_WORD experts per int32 flag word (fused.EXPERTS_PER_WORD)
//
// What the inductor kernel returns and streaming then did eagerly (the flagged entries' positions
// by ``nonzero`` and their flag words by ``index_select``) is done here too: the flagged entries
// are written compacted, in ascending order.
#include <cmath>
#include <cstdint>
#include <cstring>

#ifndef MM_EXPERTS
#error "MM_EXPERTS must be defined"
#endif
#ifndef MM_DARE
#define MM_DARE 0
#endif
#ifndef MM_BF16
#define MM_BF16 1
#endif
#ifndef MM_PER_WORD
#error "MM_PER_WORD (fused.EXPERTS_PER_WORD) must be defined"
#endif

namespace {

constexpr int N = MM_EXPERTS;
constexpr int PER_WORD = MM_PER_WORD;  // experts per flag word: 3 bits each above the "undecided" bit 0
constexpr int W = (N + PER_WORD - 1) / PER_WORD;
constexpr int64_t BLOCK = 256;  // entries whose flag words wait in a stack buffer before compaction

#if MM_BF16
typedef uint16_t value_t;
inline float to_float(uint16_t v) {  // bfloat16 -> float32 is exact
    const uint32_t u = uint32_t(v) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline uint16_t from_float(float f) {  // round to nearest even, as c10::BFloat16
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if (f != f) return 0x7FC0;
    return uint16_t((u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16);
}
inline bool stored_finite(uint16_t v) { return (v & 0x7F80u) != 0x7F80u; }
#else
typedef float value_t;
inline float to_float(float v) { return v; }
inline float from_float(float f) { return f; }
inline bool stored_finite(float v) { return std::isfinite(v); }
#endif

inline bool finite(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return (u & 0x7F800000u) != 0x7F800000u;
}

inline uint32_t lowbias32(uint32_t x) {  // counter_rng.lowbias32 (C. Wellons), wrapping uint32
    x ^= x >> 16;
    x *= 0x7feb352du;
    x ^= x >> 15;
    x *= 0x846ca68bu;
    x ^= x >> 16;
    return x;
}

}  // namespace

// One span of a chunk: entries [0, length) of ``base``/``experts`` (flat positions position0 + i,
// DARE counters lo + i). Per-expert arguments are arrays of N. Accumulates into counts (4N: per
// expert |τ| < lower, < estimate, <= estimate, <= upper), sign_sum (Σ sign of the trimmed sums),
// nonfinite[0] (an input is NaN/Inf) and nonfinite[1] (a stored result is). Writes the result to
// ``out`` and, for each entry with a non-zero flag word, its flat position to ``flagged`` and its
// W words to ``words[j]``; returns how many entries were flagged (at most ``length``).
extern "C" int64_t mm_ties_pass(const value_t* __restrict base, const value_t* const* experts, const float* weights,
                                int32_t lo, const int32_t* k1, const int32_t* k2, int32_t drop, float keep_divisor,
                                const float* estimate, const float* low, const float* high, const float* excluded,
                                const float* lower, const float* upper, float scale, int64_t length,
                                value_t* __restrict out, int64_t* counts, int64_t* sign_sum, int32_t* nonfinite,
                                int64_t position0, int64_t* __restrict flagged, int32_t* const* words) {
    (void)lo; (void)k1; (void)k2; (void)drop; (void)keep_divisor;
    int64_t flagged_count = 0;
    int64_t count_sum[4 * N] = {0};
    int64_t signs = 0;
    int32_t bad_input = 0, bad_result = 0;
    float w_[N], est_[N], low_[N], high_[N], exc_[N], lower_[N], upper_[N];
    uint32_t k1_[N], k2_[N];
    for (int k = 0; k < N; ++k) {
        w_[k] = weights[k]; est_[k] = estimate[k]; low_[k] = low[k]; high_[k] = high[k];
        exc_[k] = excluded[k]; lower_[k] = lower[k]; upper_[k] = upper[k];
        k1_[k] = MM_DARE ? uint32_t(k1[k]) : 0u;
        k2_[k] = MM_DARE ? uint32_t(k2[k]) : 0u;
    }
    for (int64_t s = 0; s < length; s += BLOCK) {
        const int64_t e = s + BLOCK < length ? s + BLOCK : length;
        int32_t block_words[W][BLOCK];
        int32_t cnt[4 * N] = {0};  // int32 within a block, summed into int64
        int32_t block_signs = 0;
#pragma GCC ivdep
        for (int64_t i = s; i < e; ++i) {
            const float b = to_float(base[i]);
            int32_t bad = !finite(b);
            float trimmed[N];
            float total = 0.0f;
            int32_t word[W] = {0};
#pragma GCC unroll 64
            for (int k = 0; k < N; ++k) {
                float tv = (to_float(experts[k][i]) - b) * w_[k];
                bad |= !finite(tv);
#if MM_DARE
                const uint32_t counter = uint32_t(lo) + uint32_t(i);
                const uint32_t bits = lowbias32(lowbias32(counter ^ k1_[k]) + k2_[k]) >> 8;
                const float keep_mask = int32_t(bits) >= drop ? 1.0f : 0.0f;
                tv = (tv * keep_mask) / keep_divisor;
#endif
                const float magnitude = std::fabs(tv);
                const bool keep = magnitude >= est_[k];
                const bool above_lower = magnitude >= lower_[k];
                const bool beyond_upper = magnitude > upper_[k];
                cnt[4 * k + 0] += !above_lower;
                cnt[4 * k + 1] += !keep;
                cnt[4 * k + 2] += magnitude <= est_[k];
                cnt[4 * k + 3] += !beyond_upper;
                const bool inside = (magnitude >= low_[k]) & (magnitude <= high_[k]) & (magnitude != exc_[k]);
                const int32_t code =
                    int32_t(inside) * (1 + int32_t(above_lower) + int32_t(keep) + int32_t(beyond_upper));
                word[k / PER_WORD] += code << (1 + 3 * (k % PER_WORD));
                const float t = keep ? tv : 0.0f;  // torch.where(keep, tv, 0.0)
                trimmed[k] = t;
                total = k == 0 ? t : total + t;  // trimmed[0] + trimmed[1] + ... left to right
            }
            const float sign = total > 0.0f ? 1.0f : -1.0f;
            int32_t count = 0;
            float kept = 0.0f;
#pragma GCC unroll 64
            for (int k = 0; k < N; ++k) {
                const float aligned = trimmed[k] * sign;
                count += aligned > 0.0f;
                const float positive = aligned > 0.0f ? aligned : 0.0f;  // clamp(min=0): +0 for ±0
                kept = k == 0 ? positive : kept + positive;
            }
            const float merged = (kept * sign) / float(count > 1 ? count : 1);
            const value_t stored = from_float(b + merged * scale);
            out[i] = stored;
            bad_result |= !stored_finite(stored);
            bad_input |= bad;
            block_signs += int32_t(total > 0.0f) - int32_t(total < 0.0f);
            word[0] += int32_t(total == 0.0f) & int32_t(count > 0);  // a non-empty sum cancelling to 0
#pragma GCC unroll 8
            for (int j = 0; j < W; ++j) block_words[j][i - s] = word[j];
        }
        for (int k = 0; k < 4 * N; ++k) count_sum[k] += cnt[k];
        signs += block_signs;
        for (int64_t i = s; i < e; ++i) {  // compaction, branch-free
            int32_t any = 0;
            for (int j = 0; j < W; ++j) any |= block_words[j][i - s];
            flagged[flagged_count] = position0 + i;
            for (int j = 0; j < W; ++j) words[j][flagged_count] = block_words[j][i - s];
            flagged_count += any != 0;
        }
    }
    for (int k = 0; k < 4 * N; ++k) counts[k] += count_sum[k];
    *sign_sum += signs;
    nonfinite[0] |= bad_input;
    nonfinite[1] |= bad_result;
    return flagged_count;
}
