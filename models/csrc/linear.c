/* y = x W^T (+ bias) on the CPU for the row counts of decode steps, at the speed of reading W.
 *
 * A decode step multiplies a few dozen rows by every weight of the model once: for SmolLM2-135M,
 * 212 MB of bfloat16 weights streamed from memory for 12 rows. oneDNN's prepacked matmul read them
 * at 18 GB/s (2 threads; a plain sequential read reaches 42): its kernels are blocked for large
 * matrices and leave the weight stream waiting on memory. Here the weight is packed once into
 * tiles of 16 output columns, read front to back exactly once per call with the next lines
 * prefetched, while every row of x (up to 12 at a time; x stays in L1/L2) accumulates against
 * each loaded weight vector:
 *   - float32: packed [tiles][k][16]; acc[row][tile] += x[row][k] (broadcast) * the 16 weights.
 *   - bfloat16 (AVX512-BF16): packed [tiles][k / 2][16][2]; one pair dot product takes two k
 *     at once from x's pair (broadcast) and the 16 columns' pairs, accumulated in float32.
 * Two tiles (32 columns) and 12 rows make 24 accumulators in registers. Past 12 rows, each tile
 * pair is used by several blocks of rows in turn, bound by arithmetic once its first block has
 * brought it in; the thread's next pair is prefetched into L2 meanwhile (2026-12-02, all 30
 * layers' weights cold: 1.02-1.25x faster at 24-64 rows, most at 24-36, in both dtypes). The
 * packed weight is padded to a multiple of 32 columns with zeros; stores are masked to the n
 * real columns. Each output is its k products summed in order in float32 (plus the bias),
 * rounded once to the dtype. Threads split the column tiles (OpenMP, PyTorch's runtime).
 *
 *   x [rows, k] and y [rows, n] contiguous; bias [n] or NULL; k even for bfloat16.
 * Built without AVX-512 (or, for bfloat16, AVX512-BF16) the functions return UNSUPPORTED and
 * the caller uses oneDNN.
 */
#include <stdint.h>
#include <string.h>

#define UNSUPPORTED 3
#define ROWS 12                /* rows of x per register tile */
#define PREFETCH_LINES 32      /* how far ahead each weight stream asks for its cache lines */

#ifdef __AVX512F__
#include <immintrin.h>

/* 16 masked columns of one row of y, from a float32 accumulator (plus bias) */
static inline void store_f32(float *y, const float *bias, __m512 acc, __mmask16 mask) {
    if (bias) acc = _mm512_add_ps(acc, _mm512_maskz_loadu_ps(mask, bias));
    _mm512_mask_storeu_ps(y, mask, acc);
}

static inline __mmask16 columns(int64_t n, int64_t c0) {
    const int64_t left = n - c0;
    return left >= 16 ? (__mmask16)0xffff : left <= 0 ? (__mmask16)0 : (__mmask16)((1u << left) - 1);
}

static inline __attribute__((always_inline)) void tile_f32(const float *x, int64_t k, const float *w, const float *bias,
                                                           float *y, int64_t n, int64_t c0, const int rows,
                                                           const float *ahead, int near) {
    __m512 acc[ROWS][2];
    for (int r = 0; r < rows; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    const float *w0 = w + c0 * k, *w1 = w0 + 16 * k; /* tile c0 / 16 and the next */
    for (int64_t i = 0; i < k; i++) {
        const __m512 a = _mm512_loadu_ps(w0 + 16 * i), b = _mm512_loadu_ps(w1 + 16 * i);
        if (near) {
            __builtin_prefetch(w0 + 16 * (i + PREFETCH_LINES));
            __builtin_prefetch(w1 + 16 * (i + PREFETCH_LINES));
        }
        if (ahead) __builtin_prefetch(ahead + 16 * i, 0, 2);
        for (int r = 0; r < rows; r++) {
            const __m512 xr = _mm512_set1_ps(x[r * k + i]);
            acc[r][0] = _mm512_fmadd_ps(xr, a, acc[r][0]);
            acc[r][1] = _mm512_fmadd_ps(xr, b, acc[r][1]);
        }
    }
    const __mmask16 m0 = columns(n, c0), m1 = columns(n, c0 + 16);
    for (int r = 0; r < rows; r++) {
        store_f32(y + r * n + c0, bias ? bias + c0 : 0, acc[r][0], m0);
        if (m1) store_f32(y + r * n + c0 + 16, bias ? bias + c0 + 16 : 0, acc[r][1], m1);
    }
}

/* Calls TILE(..., rows) over x's rows in blocks of ROWS, with rows a constant in each call so
 * that the accumulators stay in registers. Only the first block streams this tile pair from
 * memory (`near`: it prefetches its next lines); the later blocks find it in L2. With more than
 * one block, the first two also prefetch the thread's next tile pair into L2 (`ahead`, one line
 * a step: its first tile in block 0, its second in block 1), so that the next pair's memory
 * traffic overlaps this pair's arithmetic instead of stalling the next pair's first block. */
#define BY_ROWS(TILE, x, y, w, ...)                                                                       \
    for (int64_t r0 = 0, b = 0; r0 < m; r0 += ROWS, b++) {                                                \
        const int near = b == 0;                                                                          \
        const __typeof__(w) ahead = m > ROWS && b < 2 && c0 + 32 < n ? w + (c0 + 32 + 16 * b) * k : 0;    \
        switch (m - r0 < ROWS ? m - r0 : ROWS) {                                                          \
        case 1: TILE(x + r0 * k, k, w, __VA_ARGS__, y + r0 * n, n, c0, 1, ahead, near); break;            \
        case 2: TILE(x + r0 * k, k, w, __VA_ARGS__, y + r0 * n, n, c0, 2, ahead, near); break;            \
        case 3: TILE(x + r0 * k, k, w, __VA_ARGS__, y + r0 * n, n, c0, 3, ahead, near); break;            \
        case 4: TILE(x + r0 * k, k, w, __VA_ARGS__, y + r0 * n, n, c0, 4, ahead, near); break;            \
        case 5: TILE(x + r0 * k, k, w, __VA_ARGS__, y + r0 * n, n, c0, 5, ahead, near); break;            \
        case 6: TILE(x + r0 * k, k, w, __VA_ARGS__, y + r0 * n, n, c0, 6, ahead, near); break;            \
        case 7: TILE(x + r0 * k, k, w, __VA_ARGS__, y + r0 * n, n, c0, 7, ahead, near); break;            \
        case 8: TILE(x + r0 * k, k, w, __VA_ARGS__, y + r0 * n, n, c0, 8, ahead, near); break;            \
        case 9: TILE(x + r0 * k, k, w, __VA_ARGS__, y + r0 * n, n, c0, 9, ahead, near); break;            \
        case 10: TILE(x + r0 * k, k, w, __VA_ARGS__, y + r0 * n, n, c0, 10, ahead, near); break;          \
        case 11: TILE(x + r0 * k, k, w, __VA_ARGS__, y + r0 * n, n, c0, 11, ahead, near); break;          \
        default: TILE(x + r0 * k, k, w, __VA_ARGS__, y + r0 * n, n, c0, ROWS, ahead, near);               \
        }                                                                                                 \
    }

int linear_f32(const float *x, int64_t m, int64_t k, const float *packed, const float *bias, float *y, int64_t n) {
#pragma omp parallel for schedule(static)
    for (int64_t c0 = 0; c0 < n; c0 += 32) BY_ROWS(tile_f32, x, y, packed, bias)
    return 0;
}
#else
int linear_f32(const float *x, int64_t m, int64_t k, const float *packed, const float *bias, float *y, int64_t n) {
    (void)x, (void)m, (void)k, (void)packed, (void)bias, (void)y, (void)n;
    return UNSUPPORTED;
}
#endif

#if defined(__AVX512F__) && defined(__AVX512BF16__)
static inline void store_bf16(uint16_t *y, const uint16_t *bias, __m512 acc, __mmask16 mask) {
    if (bias) { /* bfloat16 -> float32: the 16 bits on top */
        const __m512i bits = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, bias)), 16);
        acc = _mm512_add_ps(acc, _mm512_castsi512_ps(bits));
    }
    _mm256_mask_storeu_epi16(y, mask, (__m256i)_mm512_cvtneps_pbh(acc));
}

static inline __attribute__((always_inline)) void tile_bf16(const uint16_t *x, int64_t k, const uint16_t *w,
                                                            const uint16_t *bias, uint16_t *y, int64_t n, int64_t c0,
                                                            const int rows, const uint16_t *ahead, int near) {
    __m512 acc[ROWS][2];
    for (int r = 0; r < rows; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    const uint16_t *w0 = w + c0 * k, *w1 = w0 + 16 * k;
    for (int64_t i = 0; i < k / 2; i++) {
        const __m512bh a = (__m512bh)_mm512_loadu_si512(w0 + 32 * i), b = (__m512bh)_mm512_loadu_si512(w1 + 32 * i);
        if (near) {
            __builtin_prefetch(w0 + 32 * (i + PREFETCH_LINES));
            __builtin_prefetch(w1 + 32 * (i + PREFETCH_LINES));
        }
        if (ahead) __builtin_prefetch(ahead + 32 * i, 0, 2);
        for (int r = 0; r < rows; r++) {
            int32_t pair;
            memcpy(&pair, x + r * k + 2 * i, sizeof pair);
            const __m512bh xr = (__m512bh)_mm512_set1_epi32(pair);
            acc[r][0] = _mm512_dpbf16_ps(acc[r][0], xr, a);
            acc[r][1] = _mm512_dpbf16_ps(acc[r][1], xr, b);
        }
    }
    const __mmask16 m0 = columns(n, c0), m1 = columns(n, c0 + 16);
    for (int r = 0; r < rows; r++) {
        store_bf16(y + r * n + c0, bias ? bias + c0 : 0, acc[r][0], m0);
        if (m1) store_bf16(y + r * n + c0 + 16, bias ? bias + c0 + 16 : 0, acc[r][1], m1);
    }
}

int linear_bf16(const uint16_t *x, int64_t m, int64_t k, const uint16_t *packed, const uint16_t *bias, uint16_t *y,
                int64_t n) {
    if (k % 2) return UNSUPPORTED;
#pragma omp parallel for schedule(static)
    for (int64_t c0 = 0; c0 < n; c0 += 32) BY_ROWS(tile_bf16, x, y, packed, bias)
    return 0;
}
#else
int linear_bf16(const uint16_t *x, int64_t m, int64_t k, const uint16_t *packed, const uint16_t *bias, uint16_t *y,
                int64_t n) {
    (void)x, (void)m, (void)k, (void)packed, (void)bias, (void)y, (void)n;
    return UNSUPPORTED;
}
#endif

/* 1 where this build has linear_f32 (bf16 = 0) or linear_bf16 (bf16 = 1), else 0 */
int linear_supported(int bf16) {
#if defined(__AVX512F__) && defined(__AVX512BF16__)
    return 1;
#elif defined(__AVX512F__)
    return !bf16;
#else
    (void)bf16;
    return 0;
#endif
}
