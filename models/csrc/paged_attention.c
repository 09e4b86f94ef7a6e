/* Paged attention on the CPU, reading each sequence's K/V in place through its block table.
 *
 * The gather-based reference (models/attention.py) copies every sequence's blocks, padded to
 * the longest context of the batch, into a dense tensor per layer and then runs batched
 * matmuls whose rows are a handful of query heads: both the copy and the tiny matmuls cost far
 * more than reading the cache once. Here one work item is one sequence's next (up to) 16 new
 * tokens: it reads their keys once for all their query rows (heads times those tokens),
 * softmaxes in float32, then reads the values once, skipping the keys the causal mask hides from
 * the whole tile. Work items are spread over the OpenMP threads of the process (the runtime
 * PyTorch already loaded). Decodes are one item each; prefill chunks, many.
 *
 * Two layouts, by the rows a K/V head has in the tile (its query heads times the tokens):
 *   - fewer than 16 (decodes): one row per query. Keys and values are read 16 tokens at a time,
 *     in place through the block table when those lie in one block (converted in registers from
 *     bfloat16; the next 16 prefetched), and each key vector serves all the query heads sharing
 *     its K/V head; a row's 16 dot products are summed across lanes together (sum16). On CPUs
 *     with AVX512-BF16, bfloat16 scores are pair dot products of the keys as stored (dot_scores),
 *     and the weighted sum of the values pair dot products of two tokens' values with the
 *     weights rounded to bfloat16 (dot_values), as PyTorch's own bfloat16 attention rounds them.
 *     A 12-sequence step of 500-2100-token contexts reads its cache at 27-29 GB/s (2 threads, block
 *     size 16, blocks scattered; bfloat16 and float32 alike), 30-32 GB/s with each prompt's blocks
 *     in order, against 42 GB/s for a plain sequential read: latency to memory, not arithmetic,
 *     bounds it (the same step with its cache warm takes half the time).
 *   - 16 or more (prefill chunks): rows in vector lanes (attend_wide), where both products are
 *     register-tiled broadcast multiply-adds with no horizontal sums: bound by arithmetic.
 * GCC's vector extensions give the common head sizes (32, 64, 128) explicit 16-float vectors on
 * any target (AVX-512, AVX2 pairs, NEON quads); other sizes take plain loops.
 *
 * Layouts (all contiguous, row-major):
 *   q, out        [tokens, heads, head_dim]             the flat batch; q's tokens q_stride elements apart
 *   k/v cache     [blocks, block_size, kv_heads, head_dim]
 *   block_tables  [seqs, table_width]                   int64 physical block ids
 *   query_starts  [seqs]                                int64 where each sequence's new tokens begin
 *   query_lens    [seqs]                                int64 how many new tokens it has
 *   context_lens  [seqs]                                int64 tokens cached once this step's are written
 * Query j of a sequence with n new tokens sits at position context - n + j and sees keys 0..that.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#include "vec16.h"

/* Products and sums fused into FMAs in this file's code (ISO C mode, -std=c11, leaves them apart):
 * prefill chunks are bound by arithmetic, and a 1024-token chunk over 1024 cached ones ran
 * 1.15-1.3x faster fused (decodes, bound by memory, no different). Each fused product is rounded
 * once instead of twice, within the tolerances the reference is tested to. Other compilers ignore
 * the pragma and keep the two operations. */
#pragma GCC optimize("fp-contract=fast")

#define CHUNK 16
enum dtype { F32 = 0, BF16 = 1 };

/* n elements from element offset `at` of a float32 or bfloat16 array, as float32. */
static inline void load(const void *src, enum dtype dtype, int64_t at, float *dst, int64_t n) {
    if (dtype == BF16) {
        const uint16_t *s = (const uint16_t *)src + at;
        for (int64_t i = 0; i < n; i++) dst[i] = bf16_to_float(s[i]);
    } else {
        memcpy(dst, (const float *)src + at, sizeof(float) * (size_t)n);
    }
}

static inline void store(void *dst, enum dtype dtype, int64_t at, const float *src, int64_t n) {
    if (dtype == BF16) {
        uint16_t *d = (uint16_t *)dst + at;
        for (int64_t i = 0; i < n; i++) d[i] = float_to_bf16(src[i]);
    } else {
        memcpy((float *)dst + at, src, sizeof(float) * (size_t)n);
    }
}

/* The lane sums of 16 vectors as one vector (lane i: the sum of v[i]'s lanes), by four levels
 * of "add the two interleaved halves of a pair": 30 shuffles and 15 adds for 16 sums, where
 * summing each vector on its own would take 16 dependent reductions. */
static inline v16 sum16(const v16 v[16]) {
    const vi16 lo1 = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
    const vi16 hi1 = {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31};
    const vi16 lo2 = {0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27};
    const vi16 hi2 = {4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31};
    const vi16 lo3 = {0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29};
    const vi16 hi3 = {2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31};
    const vi16 lo4 = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
    const vi16 hi4 = {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31};
    v16 a[8], b[4], c[2];
    for (int i = 0; i < 8; i++) a[i] = __builtin_shuffle(v[2 * i], v[2 * i + 1], lo1) + __builtin_shuffle(v[2 * i], v[2 * i + 1], hi1);
    for (int i = 0; i < 4; i++) b[i] = __builtin_shuffle(a[2 * i], a[2 * i + 1], lo2) + __builtin_shuffle(a[2 * i], a[2 * i + 1], hi2);
    for (int i = 0; i < 2; i++) c[i] = __builtin_shuffle(b[2 * i], b[2 * i + 1], lo3) + __builtin_shuffle(b[2 * i], b[2 * i + 1], hi3);
    return __builtin_shuffle(c[0], c[1], lo4) + __builtin_shuffle(c[0], c[1], hi4);
}

struct problem {
    const void *q, *k_cache, *v_cache;
    void *out;
    enum dtype dtype;
    const int64_t *block_tables, *query_starts, *query_lens, *context_lens;
    int64_t table_width, heads, kv_heads, block_size, q_stride, tokens, num_blocks;
    float scale;
};

/* Up to TILE consecutive new tokens of one sequence: the unit of parallel work. Tokens j0..j1 of
 * a sequence with n new tokens and `context` in all attend exactly as a sequence whose new
 * tokens are those, with context - (n - j1) in all; tiling a long prefill chunk spreads it over
 * the threads and bounds each thread's score buffer to TILE * heads * context floats. */
#define TILE 16
enum status { OK = 0, OUT_OF_MEMORY = 1, BAD_INPUT = 2 };
struct tile {
    int64_t seq, first, n_new, context;
};

/* Convert the next tokens [t, t + n) of a sequence (all K/V heads) into chunk[n][kv_heads *
 * head_dim]; n <= CHUNK. Walks the block table with a running offset: no division per token. */
static inline int64_t load_chunk(const struct problem *p, const void *cache, const int64_t *table, int64_t t,
                                 int64_t context, float *chunk, const int64_t token_stride) {
    const int64_t n = context - t < CHUNK ? context - t : CHUNK;
    int64_t block = t / p->block_size, offset = t % p->block_size;
    for (int64_t i = 0; i < n; i++) {
        load(cache, p->dtype, (table[block] * p->block_size + offset) * token_stride, chunk + i * token_stride,
             token_stride);
        if (++offset == p->block_size) {
            offset = 0;
            block++;
        }
    }
    return n;
}

/* The next tokens [t, t + *n) of a sequence: in place (*bf16 telling the dtype) when CHUNK
 * tokens from t lie in one block (always, with block sizes that are multiples of CHUNK), else
 * converted or copied into chunk as float32. In place, the tokens past *n up to CHUNK are
 * readable (stale, maybe not even numbers); callers compute with them and drop the results.
 *
 * *ahead is the distance in bytes from this chunk to the next one in place (0 if there is none):
 * each K/V head reads its slice of every token, in strides the hardware prefetchers follow badly
 * (from memory, 30% slower than copying the chunk whole), so the loops ask for the line at the
 * same place in the next chunk as they read each one. Asking for the whole next chunk at once
 * instead stalled on the full miss queue for a sixth of the kernel's time (perf). */
static inline const void *chunk_at(const struct problem *p, const void *cache, const int64_t *table, int64_t t,
                                   int64_t context, float *chunk, const int64_t token_stride, int64_t *n, int *bf16,
                                   int64_t *ahead) {
    const int64_t offset = t % p->block_size, bytes = p->dtype == BF16 ? 2 : 4;
    *ahead = 0;
    if (offset + CHUNK <= p->block_size) {
        *n = context - t < CHUNK ? context - t : CHUNK;
        *bf16 = p->dtype == BF16;
        const int64_t at = (table[t / p->block_size] * p->block_size + offset) * token_stride;
        const int64_t next = t + CHUNK;
        if (next < context && next % p->block_size + CHUNK <= p->block_size)
            *ahead = ((table[next / p->block_size] * p->block_size + next % p->block_size) * token_stride - at) * bytes;
        return *bf16 ? (const void *)((const uint16_t *)cache + at) : (const void *)((const float *)cache + at);
    }
    *n = load_chunk(p, cache, table, t, context, chunk, token_stride);
    *bf16 = 0;
    return chunk;
}

/* Asks for the line at the same place as element `at` of src (elements of `bytes` each) in the next chunk */
static inline void prefetch_ahead(const void *src, int64_t at, int64_t bytes, int64_t ahead) {
    __builtin_prefetch((const void *)((uintptr_t)src + (uintptr_t)(at * bytes + ahead)));
}

/* The scores of nv (<= 3) query rows that share a K/V head (q_step floats apart) against a
 * chunk's CHUNK keys: each key vector is loaded and converted once for all nv rows, 8 keys at a
 * time (24 accumulators), then each row's 16 dot products are summed across lanes at once. */
static inline __attribute__((always_inline)) void group_scores(const float *q, int64_t q_step, const void *keys,
                                                               int64_t k_at, int64_t token_stride, int64_t ahead, float *s,
                                                               int64_t s_step, int64_t n, const int bf16,
                                                               const int nv, const int64_t head_dim) {
    v16 sums[3][CHUNK];
    for (int64_t i0 = 0; i0 < CHUNK; i0 += 8) {
        v16 acc[3][8] = {{{0}}};
        for (int64_t l = 0; l < head_dim / 16; l++)
            for (int64_t i = 0; i < 8; i++) {
                const int64_t at = k_at + (i0 + i) * token_stride + 16 * l;
                prefetch_ahead(keys, at, bf16 ? 2 : 4, ahead);
                const v16 k = load16(keys, bf16, at);
                for (int v = 0; v < nv; v++) {
                    v16 qv;
                    memcpy(&qv, q + v * q_step + 16 * l, sizeof qv);
                    acc[v][i] += qv * k;
                }
            }
        for (int v = 0; v < nv; v++) memcpy(&sums[v][i0], acc[v], sizeof acc[v]);
    }
    for (int v = 0; v < nv; v++) {
        const v16 dots = sum16(sums[v]);
        memcpy(s + v * s_step, &dots, sizeof(float) * (size_t)n);
    }
}

#ifdef __AVX512BF16__
#include <immintrin.h>
/* group_scores for bfloat16 keys read in place on CPUs with AVX512-BF16: the unscaled bfloat16
 * queries times the keys by pair dot products (two products a lane per instruction, and no
 * conversion of the keys), scaled afterwards. A bfloat16 product is exact in float32, so this
 * differs from converting first only in the order of the sums; it halves the instructions of a
 * decode's scores. (The bf16 argument is BY_GROUP's dtype flag, always 1 here.) */
static inline __attribute__((always_inline)) void dot_scores(const uint16_t *q, int64_t q_step, const uint16_t *keys,
                                                             int64_t k_at, int64_t token_stride, int64_t ahead, float *s,
                                                             int64_t s_step, int64_t n, float scale, const int bf16,
                                                             const int nv, const int64_t head_dim) {
    (void)bf16;
    v16 sums[3][CHUNK];
    __m512bh qv[3][head_dim / 32];
    for (int v = 0; v < nv; v++)
        for (int64_t l = 0; l < head_dim / 32; l++) qv[v][l] = (__m512bh)_mm512_loadu_si512(q + v * q_step + 32 * l);
    for (int64_t i0 = 0; i0 < CHUNK; i0 += 8) {
        __m512 acc[3][8];
        for (int v = 0; v < nv; v++)
            for (int64_t i = 0; i < 8; i++) acc[v][i] = _mm512_setzero_ps();
        for (int64_t l = 0; l < head_dim / 32; l++)
            for (int64_t i = 0; i < 8; i++) {
                const int64_t at = k_at + (i0 + i) * token_stride + 32 * l;
                prefetch_ahead(keys, at, 2, ahead);
                const __m512bh k = (__m512bh)_mm512_loadu_si512(keys + at);
                for (int v = 0; v < nv; v++) acc[v][i] = _mm512_dpbf16_ps(acc[v][i], qv[v][l], k);
            }
        for (int v = 0; v < nv; v++) memcpy(&sums[v][i0], acc[v], sizeof acc[v]);
    }
    for (int v = 0; v < nv; v++) {
        const v16 dots = sum16(sums[v]) * scale;
        memcpy(s + v * s_step, &dots, sizeof(float) * (size_t)n);
    }
}

/* group_values for bfloat16 values read in place: acc (in unpacked order, see below) += the nv
 * rows' bfloat16 weights (w_step apart) times the chunk's n values, by pair dot products over two
 * tokens at a time. Interleaving two tokens' values (unpacklo/hi) puts, per 128-bit lane L, dims
 * 8L..8L+3 in the lo vector and 8L+4..8L+7 in the hi one: each 32 dims accumulate as [lo | hi]
 * and unpacked_to_dims puts them back in order once, at the end. */
static inline __attribute__((always_inline)) void dot_values(const uint16_t *w, int64_t w_step, const uint16_t *values,
                                                             int64_t v_at, int64_t token_stride, int64_t ahead, float *acc,
                                                             int64_t n, const int bf16, const int nv,
                                                             const int64_t head_dim) {
    (void)bf16; /* BY_GROUP's dtype flag, always 1 here */
    __m512 a[3][head_dim / 16];
    for (int v = 0; v < nv; v++)
        for (int64_t l = 0; l < head_dim / 16; l++) a[v][l] = _mm512_loadu_ps(acc + v * head_dim + 16 * l);
    for (int64_t i = 0; i < n; i += 2)
        for (int64_t l = 0; l < head_dim / 32; l++) {
            const int64_t at = v_at + i * token_stride + 32 * l;
            prefetch_ahead(values, at, 2, ahead);
            prefetch_ahead(values, at + token_stride, 2, ahead);
            const __m512i x = _mm512_loadu_si512(values + at);
            const __m512i y = i + 1 < n ? _mm512_loadu_si512(values + v_at + (i + 1) * token_stride + 32 * l)
                                        : _mm512_setzero_si512(); /* past the context: stale, maybe not numbers */
            const __m512bh lo = (__m512bh)_mm512_unpacklo_epi16(x, y), hi = (__m512bh)_mm512_unpackhi_epi16(x, y);
            for (int v = 0; v < nv; v++) {
                int32_t pair; /* weights i and i + 1 */
                memcpy(&pair, w + v * w_step + i, sizeof pair);
                const __m512bh weights = (__m512bh)_mm512_set1_epi32(pair);
                a[v][2 * l] = _mm512_dpbf16_ps(a[v][2 * l], lo, weights);
                a[v][2 * l + 1] = _mm512_dpbf16_ps(a[v][2 * l + 1], hi, weights);
            }
        }
    for (int v = 0; v < nv; v++)
        for (int64_t l = 0; l < head_dim / 16; l++) _mm512_storeu_ps(acc + v * head_dim + 16 * l, a[v][l]);
}

/* One row of dot_values' accumulators, [lo | hi] per 32 dims, back in the order of the dims. */
static inline void unpacked_to_dims(float *row, int64_t head_dim) {
    float ordered[head_dim];
    for (int64_t l = 0; l < head_dim / 32; l++)
        for (int lane = 0; lane < 4; lane++)
            for (int j = 0; j < 4; j++) {
                ordered[32 * l + 8 * lane + j] = row[32 * l + 4 * lane + j];
                ordered[32 * l + 8 * lane + 4 + j] = row[32 * l + 16 + 4 * lane + j];
            }
    memcpy(row, ordered, sizeof(float) * (size_t)head_dim);
}

/* The rows' softmax weights (context floats each, context apart) rounded to bfloat16, as
 * PyTorch's bfloat16 attention rounds them before multiplying by V, into w (stride apart, zero
 * from context on). */
static inline void weights_to_bf16(const float *scores, int64_t rows, int64_t context, uint16_t *w, int64_t stride) {
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t t = 0; t < context; t += 16) {
            const __mmask16 some = context - t >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (context - t)) - 1);
            const __m512 x = _mm512_maskz_loadu_ps(some, scores + r * context + t);
            _mm256_mask_storeu_epi16(w + r * stride + t, some, (__m256i)_mm512_cvtneps_pbh(x));
        }
        for (int64_t t = context; t < stride; t++) w[r * stride + t] = 0;
    }
}
#define DOT_SCORES 1
#else
#define DOT_SCORES 0
#endif

/* acc rows (head_dim apart) += the nv rows' weights (w_step apart) times the chunk's n values */
static inline __attribute__((always_inline)) void group_values(const float *w, int64_t w_step, const void *values,
                                                               int64_t v_at, int64_t token_stride, int64_t ahead, float *acc,
                                                               int64_t n, const int bf16, const int nv,
                                                               const int64_t head_dim) {
    v16 a[3][head_dim / 16];
    for (int v = 0; v < nv; v++) memcpy(a[v], acc + v * head_dim, sizeof a[v]);
    for (int64_t i = 0; i < n; i++)
        for (int64_t l = 0; l < head_dim / 16; l++) {
            const int64_t at = v_at + i * token_stride + 16 * l;
            prefetch_ahead(values, at, bf16 ? 2 : 4, ahead);
            const v16 x = load16(values, bf16, at);
            for (int v = 0; v < nv; v++) a[v][l] += w[v * w_step + i] * x;
        }
    for (int v = 0; v < nv; v++) memcpy(acc + v * head_dim, a[v], sizeof a[v]);
}

/* Calls CALL(..., bf16, nv, head_dim) over the query heads of each K/V head, three at a time,
 * with bf16 and nv constants in each call so that the accumulators stay in registers. */
#define BY_GROUP(CALL, first, bf16, ...)                                                                  \
    for (int64_t h = 0, nv; h < heads; h += nv) {                                                          \
        const int64_t g = h / group, r = (first) + h;                                                      \
        nv = (g + 1) * group - h < 3 ? (g + 1) * group - h : 3;                                            \
        if (bf16) {                                                                                        \
            if (nv == 3) CALL(__VA_ARGS__, 1, 3, head_dim);                                                \
            else if (nv == 2) CALL(__VA_ARGS__, 1, 2, head_dim);                                           \
            else CALL(__VA_ARGS__, 1, 1, head_dim);                                                        \
        } else {                                                                                           \
            if (nv == 3) CALL(__VA_ARGS__, 0, 3, head_dim);                                                \
            else if (nv == 2) CALL(__VA_ARGS__, 0, 2, head_dim);                                           \
            else CALL(__VA_ARGS__, 0, 1, head_dim);                                                        \
        }                                                                                                  \
    }

/* element at of a float32 or bfloat16 array, as float32 */
static inline float element(const void *src, const int bf16, int64_t at) {
    return bf16 ? bf16_to_float(((const uint16_t *)src)[at]) : ((const float *)src)[at];
}

/* One sequence: query rows r = j * heads + h (token j, head h) read K/V head h / group.
 * Always inlined into a switch on head_dim, so the common head sizes get constant-length
 * loops and a register-resident query or accumulator. */
static inline __attribute__((always_inline)) void attend(const struct problem *p, struct tile tile, float *scores,
                                                         float *queries, float *acc, float *chunk, uint16_t *weights,
                                                         const int64_t head_dim) {
    const int64_t heads = p->heads, group = heads / p->kv_heads, token_stride = p->kv_heads * head_dim;
    const int64_t seq = tile.seq, n_new = tile.n_new, context = tile.context, rows = n_new * heads;
    const int vectors = head_dim % 16 == 0;
    const int64_t *table = p->block_tables + seq * p->table_width;
    for (int64_t j = 0; j < n_new; j++)
        load(p->q, p->dtype, (tile.first + j) * p->q_stride, queries + j * heads * head_dim,
             heads * head_dim);
    for (int64_t x = 0; x < rows * head_dim; x++) queries[x] *= p->scale;

    for (int64_t t = 0; t < context;) {
        int64_t n, ahead;
        int bf16;
        const void *keys = chunk_at(p, p->k_cache, table, t, context, chunk, token_stride, &n, &bf16, &ahead);
        /* causal: token j's rows see the chunk only if j >= t - (context - n_new) */
        for (int64_t j = t > context - n_new ? t - (context - n_new) : 0; j < n_new; j++) {
#if DOT_SCORES
            if (bf16 && head_dim % 32 == 0) {
                const uint16_t *qj = (const uint16_t *)p->q + (tile.first + j) * p->q_stride;
                BY_GROUP(dot_scores, j * heads, 1, qj + h * head_dim, head_dim, (const uint16_t *)keys, g * head_dim,
                         token_stride, ahead, scores + r * context + t, context, n, p->scale)
                continue;
            }
#endif
            if (vectors) {
                BY_GROUP(group_scores, j * heads, bf16, queries + r * head_dim, head_dim, keys, g * head_dim,
                         token_stride, ahead, scores + r * context + t, context, n)
                continue;
            }
            for (int64_t r = j * heads; r < (j + 1) * heads; r++)
                for (int64_t i = 0; i < n; i++) {
                    float sum = 0.0f;
                    for (int64_t d = 0; d < head_dim; d++)
                        sum += queries[r * head_dim + d]
                               * element(keys, bf16, (r % heads) / group * head_dim + i * token_stride + d);
                    scores[r * context + t + i] = sum;
                }
        }
        t += n;
    }

    for (int64_t r = 0; r < rows; r++) { /* causal softmax: row r sees keys 0..visible-1 */
        const int64_t visible = context - n_new + r / heads + 1;
        float *s = scores + r * context, peak = s[0], total = 0.0f;
#pragma omp simd reduction(max : peak)
        for (int64_t t = 1; t < visible; t++) peak = s[t] > peak ? s[t] : peak;
        v16 x = {0};
        int64_t t = 0;
        for (; t + 16 <= visible; t += 16) {
            memcpy(&x, s + t, sizeof x);
            x = exp16(x - peak);
            memcpy(s + t, &x, sizeof x);
        }
        if (t < visible) { /* the last few, in the lanes of one more vector */
            const size_t some = sizeof(float) * (size_t)(visible - t);
            memcpy(&x, s + t, some);
            x = exp16(x - peak);
            memcpy(s + t, &x, some);
        }
#pragma omp simd reduction(+ : total)
        for (int64_t t = 0; t < visible; t++) total += s[t];
        const float inverse = 1.0f / total;
        for (int64_t t = 0; t < visible; t++) s[t] *= inverse;
        for (int64_t t = visible; t < context; t++) s[t] = 0.0f;
    }

    memset(acc, 0, sizeof(float) * (size_t)(rows * head_dim));
#if DOT_SCORES
    /* bfloat16 values, all read in place (block sizes a multiple of CHUNK): pair dot products */
    if (p->dtype == BF16 && head_dim % 32 == 0 && p->block_size % CHUNK == 0) {
        const int64_t stride = context + (context & 1);
        weights_to_bf16(scores, rows, context, weights, stride);
        for (int64_t t = 0; t < context;) {
            int64_t n, ahead;
            int bf16;
            const void *values = chunk_at(p, p->v_cache, table, t, context, chunk, token_stride, &n, &bf16, &ahead);
            for (int64_t j = t > context - n_new ? t - (context - n_new) : 0; j < n_new; j++)
                BY_GROUP(dot_values, j * heads, 1, weights + r * stride + t, stride, (const uint16_t *)values,
                         g * head_dim, token_stride, ahead, acc + r * head_dim, n)
            t += n;
        }
        for (int64_t r = 0; r < rows; r++) unpacked_to_dims(acc + r * head_dim, head_dim);
        store(p->out, p->dtype, tile.first * heads * head_dim, acc, rows * head_dim);
        return;
    }
#endif
    for (int64_t t = 0; t < context;) {
        int64_t n, ahead;
        int bf16;
        const void *values = chunk_at(p, p->v_cache, table, t, context, chunk, token_stride, &n, &bf16, &ahead);
        for (int64_t j = t > context - n_new ? t - (context - n_new) : 0; j < n_new; j++) { /* as above */
            if (vectors) {
                BY_GROUP(group_values, j * heads, bf16, scores + r * context + t, context, values, g * head_dim,
                         token_stride, ahead, acc + r * head_dim, n)
                continue;
            }
            for (int64_t r = j * heads; r < (j + 1) * heads; r++)
                for (int64_t i = 0; i < n; i++)
                    for (int64_t d = 0; d < head_dim; d++)
                        acc[r * head_dim + d] += scores[r * context + t + i] *
                            element(values, bf16, (r % heads) / group * head_dim + i * token_stride + d);
        }
        t += n;
    }
    store(p->out, p->dtype, tile.first * heads * head_dim, acc, rows * head_dim);
}


/* Tiles with at least 16 rows per K/V head (prefill chunks): rows in vector lanes.
 *
 * A K/V head's rows (its query heads times the tile's tokens) are a small matrix multiplied by
 * the keys and then by the values. Putting 16 rows in the lanes of a vector turns both products
 * into broadcast multiply-adds with no horizontal sums: scores for 8 keys and up to 48 rows sit in
 * 24 registers while the 64 (or 32, 128) dimensions stream past, each query vector loaded once
 * for 8 keys and each key element broadcast to 48 rows. The softmax then runs down the keys with
 * each row's running maximum and total in a lane. Per K/V head g the buffers are
 *   qt[g]  [head_dim][rpad]      scaled queries, row r = j * group + i (token j, head g * group + i)
 *   st[g]  [cpad][rpad]          scores, then probabilities, for keys 0..cpad (context rounded up to CHUNK)
 *   at[g]  [head_dim][rpad]      the weighted sums of the values, transposed back into out at the end
 *   inverse[g] [rpad]            each row's largest score (kept by the QK pass), then 1 / (sum of its exponentials)
 * rpad is the rows rounded up to 16: the padding lanes hold zero queries and are never stored. */
#define KEYS 8 /* keys (scores) or dims (values) per register tile */

/* st[t + i][v * 16 ..] = qt[.][v * 16 ..] . key(t + i) for the CHUNK keys from t, NV row vectors;
 * peak[v * 16 ..] becomes the larger of itself and each score its lane's row sees (key <= last[v]):
 * the softmax's maximum, taken while the scores are in registers instead of in a pass of its own
 * over st (which, at a few hundred KB per K/V head, sits in L2 or beyond). */
static inline __attribute__((always_inline)) void wide_scores(const float *qt, int64_t rpad, const float *keys,
                                                               int64_t token_stride, float *st, float *peak,
                                                               const vi16 *last, int64_t t, const int nv,
                                                               const int64_t head_dim) {
    v16 peaks[3];
    for (int v = 0; v < nv; v++) memcpy(&peaks[v], peak + 16 * v, sizeof(v16));
    for (int64_t i0 = 0; i0 < CHUNK; i0 += KEYS) {
        v16 acc[3][KEYS] = {{{0}}};
        for (int64_t d = 0; d < head_dim; d++) {
            v16 q[3];
            for (int v = 0; v < nv; v++) memcpy(&q[v], qt + d * rpad + 16 * v, sizeof(v16));
            for (int64_t i = 0; i < KEYS; i++) {
                const float k = keys[(i0 + i) * token_stride + d];
                for (int v = 0; v < nv; v++) acc[v][i] += q[v] * k;
            }
        }
        for (int64_t i = 0; i < KEYS; i++)
            for (int v = 0; v < nv; v++) {
                memcpy(st + (i0 + i) * rpad + 16 * v, &acc[v][i], sizeof(v16));
                peaks[v] = select((acc[v][i] > peaks[v]) & ((int32_t)(t + i0 + i) <= last[v]), acc[v][i], peaks[v]);
            }
    }
    for (int v = 0; v < nv; v++) memcpy(peak + 16 * v, &peaks[v], sizeof(v16));
}

/* at[d][v * 16 ..] += sum over the chunk's keys of st[t + i][v * 16 ..] * value(t + i)[d] */
static inline __attribute__((always_inline)) void wide_values(const float *st, int64_t rpad, const float *values,
                                                               int64_t token_stride, float *at, const int nv,
                                                               const int64_t head_dim) {
    for (int64_t d0 = 0; d0 < head_dim; d0 += KEYS) {
        v16 acc[3][KEYS];
        for (int64_t d = 0; d < KEYS; d++)
            for (int v = 0; v < nv; v++) memcpy(&acc[v][d], at + (d0 + d) * rpad + 16 * v, sizeof(v16));
        for (int64_t i = 0; i < CHUNK; i++) {
            v16 w[3];
            for (int v = 0; v < nv; v++) memcpy(&w[v], st + i * rpad + 16 * v, sizeof(v16));
            for (int64_t d = 0; d < KEYS; d++) {
                const float x = values[i * token_stride + d0 + d];
                for (int v = 0; v < nv; v++) acc[v][d] += w[v] * x;
            }
        }
        for (int64_t d = 0; d < KEYS; d++)
            for (int v = 0; v < nv; v++) memcpy(at + (d0 + d) * rpad + 16 * v, &acc[v][d], sizeof(v16));
    }
}

/* The row vectors of one K/V head, three at a time (24 accumulators, 3 operands: 27 of AVX-512's
 * 32 registers), with nv a constant in each call so that the accumulators stay in registers. */
#define BY_THREE(CALL, rvecs, ...)                                                   \
    for (int64_t v0 = 0; v0 < (rvecs); v0 += 3) {                                   \
        const int64_t left = (rvecs) - v0;                                          \
        if (left >= 3) CALL(__VA_ARGS__, 3, head_dim);                              \
        else if (left == 2) CALL(__VA_ARGS__, 2, head_dim);                         \
        else CALL(__VA_ARGS__, 1, head_dim);                                        \
    }

/* CHUNK tokens from t as float32, zero past the context, so that the register tiles always take
 * CHUNK keys: in place where they are float32 in one block and all within the context (every
 * chunk but the last with block sizes that are multiples of CHUNK), else converted or copied
 * into chunk. Copying every chunk for every tile took 9% of a long prefill's kernel time. */
static inline const float *full_chunk(const struct problem *p, const void *cache, const int64_t *table, int64_t t,
                                      int64_t context, float *chunk, int64_t token_stride) {
    const int64_t offset = t % p->block_size;
    if (p->dtype == F32 && offset + CHUNK <= p->block_size && t + CHUNK <= context)
        return (const float *)cache + (table[t / p->block_size] * p->block_size + offset) * token_stride;
    const int64_t n = load_chunk(p, cache, table, t, context, chunk, token_stride);
    memset(chunk + n * token_stride, 0, sizeof(float) * (size_t)((CHUNK - n) * token_stride));
    return chunk;
}

static inline __attribute__((always_inline)) void attend_wide(const struct problem *p, struct tile tile,
                                                              float *buffer, float *chunk, const int64_t head_dim) {
    const int64_t heads = p->heads, kv_heads = p->kv_heads, group = heads / kv_heads;
    const int64_t token_stride = kv_heads * head_dim, n_new = tile.n_new, context = tile.context;
    const int64_t rows = n_new * group, rvecs = (rows + 15) / 16, rpad = 16 * rvecs;
    const int64_t cpad = (context + CHUNK - 1) / CHUNK * CHUNK, base = context - n_new; /* row r sees keys 0..base + r / group */
    const int64_t *table = p->block_tables + tile.seq * p->table_width;
    float *qt = buffer, *at = qt + kv_heads * head_dim * rpad, *inverse = at + kv_heads * head_dim * rpad;
    float *st = inverse + kv_heads * rpad;

    memset(qt, 0, sizeof(float) * (size_t)(2 * kv_heads * head_dim * rpad)); /* queries and sums */
    for (int64_t j = 0; j < n_new; j++) {
        float row[heads * head_dim];
        load(p->q, p->dtype, (tile.first + j) * p->q_stride, row, heads * head_dim);
        for (int64_t h = 0; h < heads; h++)
            for (int64_t d = 0; d < head_dim; d++)
                qt[((h / group) * head_dim + d) * rpad + j * group + h % group] = row[h * head_dim + d] * p->scale;
    }

    vi16 last[rvecs]; /* the last key each lane's row sees: keys up to base are seen by all */
    for (int64_t v = 0; v < rvecs; v++)
        for (int l = 0; l < 16; l++) last[v][l] = (int32_t)(base + (16 * v + l) / group);
    float *peak = inverse; /* each row's largest score, until the softmax makes it 1 / its total */
    for (int64_t r = 0; r < kv_heads * rpad; r++) peak[r] = -INFINITY;
    for (int64_t t = 0; t < context; t += CHUNK) {
        const float *tokens = full_chunk(p, p->k_cache, table, t, context, chunk, token_stride);
        for (int64_t g = 0; g < kv_heads; g++) {
            const float *qg = qt + g * head_dim * rpad, *keys = tokens + g * head_dim;
            float *sg = st + (g * cpad + t) * rpad;
            BY_THREE(wide_scores, rvecs, qg + 16 * v0, rpad, keys, token_stride, sg + 16 * v0,
                     peak + g * rpad + 16 * v0, last + v0, t)
        }
    }

    for (int64_t g = 0; g < kv_heads; g++) /* causal softmax down the keys, one row per lane */
        for (int64_t v = 0; v < rvecs; v++) {
            float *s = st + g * cpad * rpad + 16 * v;
            v16 top, total = {0}, x;
            memcpy(&top, peak + g * rpad + 16 * v, sizeof top);
            for (int64_t t = 0; t < cpad; t++) {
                memcpy(&x, s + t * rpad, sizeof x);
                x = exp16(x - top);
                if (t > base) x = select((int32_t)t <= last[v], x, (v16){0});
                total += x;
                memcpy(s + t * rpad, &x, sizeof x);
            }
            const v16 one = 1.0f / total;
            memcpy(inverse + g * rpad + 16 * v, &one, sizeof one);
        }

    for (int64_t t = 0; t < context; t += CHUNK) {
        const float *tokens = full_chunk(p, p->v_cache, table, t, context, chunk, token_stride);
        for (int64_t g = 0; g < kv_heads; g++) {
            const float *sg = st + (g * cpad + t) * rpad, *values = tokens + g * head_dim;
            float *ag = at + g * head_dim * rpad;
            BY_THREE(wide_values, rvecs, sg + 16 * v0, rpad, values, token_stride, ag + 16 * v0)
        }
    }

    for (int64_t j = 0; j < n_new; j++) {
        float row[heads * head_dim];
        for (int64_t h = 0; h < heads; h++) {
            const int64_t g = h / group, r = j * group + h % group;
            for (int64_t d = 0; d < head_dim; d++)
                row[h * head_dim + d] = at[(g * head_dim + d) * rpad + r] * inverse[g * rpad + r];
        }
        store(p->out, p->dtype, (tile.first + j) * heads * head_dim, row, heads * head_dim);
    }
}

/* Largest first (keys times new tokens), so that the threads' dynamic schedule ends on small
 * tiles: in order, a thread could spend a tenth of a decode step waiting for the other's last
 * long sequence. */
static int by_cost(const void *a, const void *b) {
    const struct tile *x = a, *y = b;
    const int64_t cx = x->context * x->n_new, cy = y->context * y->n_new;
    return (cx < cy) - (cx > cy);
}

static int paged_attention(const struct problem *p, int64_t seqs, int64_t head_dim) {
    int64_t tiles = 0, most_context = 0, most_new = 0;
    for (int64_t seq = 0; seq < seqs; seq++) { /* check every index before touching memory: O(blocks) */
        const int64_t n = p->query_lens[seq], context = p->context_lens[seq], first = p->query_starts[seq];
        if (n <= 0) continue;
        if (context < n || first < 0 || first + n > p->tokens || context > p->table_width * p->block_size)
            return BAD_INPUT;
        const int64_t *table = p->block_tables + seq * p->table_width;
        for (int64_t b = 0; b < (context + p->block_size - 1) / p->block_size; b++)
            if (table[b] < 0 || table[b] >= p->num_blocks) return BAD_INPUT;
        tiles += (n + TILE - 1) / TILE;
        most_context = context > most_context ? context : most_context;
        most_new = n > most_new ? n : most_new;
    }
    struct tile *work = malloc(sizeof(struct tile) * (size_t)(tiles ? tiles : 1));
    if (!work) return OUT_OF_MEMORY;
    for (int64_t seq = 0, at = 0; seq < seqs; seq++) {
        const int64_t n = p->query_lens[seq], context = p->context_lens[seq];
        if (n <= 0) continue;
        for (int64_t j0 = 0; j0 < n; j0 += TILE) {
            const int64_t j1 = j0 + TILE < n ? j0 + TILE : n;
            work[at++] = (struct tile){seq, p->query_starts[seq] + j0, j1 - j0, context - (n - j1)};
        }
    }
    qsort(work, (size_t)tiles, sizeof *work, by_cost);
    const int64_t most_rows = (most_new < TILE ? most_new : TILE) * p->heads; /* decodes: one row per head */
    const int64_t group = p->heads / p->kv_heads, most_rpad = (most_rows / p->kv_heads + 15) / 16 * 16;
    const int64_t narrow = most_rows * most_context + 2 * most_rows * head_dim;
    const int64_t wide = p->kv_heads * most_rpad * (2 * head_dim + 1 + (most_context + CHUNK - 1) / CHUNK * CHUNK);
    const int64_t most_floats = narrow > wide ? narrow : wide;
    int failed = 0;
#pragma omp parallel reduction(| : failed)
    {
        /* one buffer per thread: scores, scaled queries and accumulators in either layout, then a
         * chunk of K or V, then the weights in bfloat16 (dot_values) */
        const int64_t weight_floats = (most_rows * (most_context + 1) + 1) / 2;
        float *scores = malloc(sizeof(float) * (size_t)(most_floats + CHUNK * p->kv_heads * head_dim + weight_floats));
        float *queries = scores + most_rows * most_context, *acc = queries + most_rows * head_dim;
        float *chunk = scores + most_floats;
        uint16_t *weights = (uint16_t *)(chunk + CHUNK * p->kv_heads * head_dim); /* bfloat16 softmax weights */
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < tiles; i++) {
            if (!scores) {
                failed = OUT_OF_MEMORY;
                continue;
            }
            if (work[i].n_new * group >= 16 && (head_dim == 32 || head_dim == 64 || head_dim == 128)) {
                switch (head_dim) {
                case 32: attend_wide(p, work[i], scores, chunk, 32); break;
                case 64: attend_wide(p, work[i], scores, chunk, 64); break;
                default: attend_wide(p, work[i], scores, chunk, 128);
                }
                continue;
            }
            switch (head_dim) {
            case 32: attend(p, work[i], scores, queries, acc, chunk, weights, 32); break;
            case 64: attend(p, work[i], scores, queries, acc, chunk, weights, 64); break;
            case 128: attend(p, work[i], scores, queries, acc, chunk, weights, 128); break;
            default: attend(p, work[i], scores, queries, acc, chunk, weights, head_dim);
            }
        }
        free(scores);
    }
    free(work);
    return failed;
}

#define ENTRY(NAME, DTYPE)                                                                                 \
    int NAME(const void *q, int64_t tokens, int64_t q_stride, const void *k_cache, const void *v_cache,     \
             int64_t num_blocks, void *out, const int64_t *block_tables, int64_t table_width,               \
             const int64_t *query_starts, const int64_t *query_lens, const int64_t *context_lens,            \
             int64_t seqs, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t block_size,           \
             float scale) {                                                                                  \
        const struct problem p = {q,          k_cache,     v_cache,      out,         DTYPE,      block_tables, \
                                  query_starts, query_lens, context_lens, table_width, heads,    kv_heads,   \
                                  block_size, q_stride,   tokens,       num_blocks,  scale};                \
        return paged_attention(&p, seqs, head_dim);                                                         \
    }
ENTRY(paged_attention_f32, F32)
ENTRY(paged_attention_bf16, BF16)
