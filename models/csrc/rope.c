/* Rotary position embedding (rotate-half form) on the CPU, in place.
 *
 * In PyTorch, rotating q and k is a gather of the cos/sin rows, a split, four multiplies, an add,
 * a subtract and a concatenation: eight dispatches and a copy of q and k per layer (24 us a layer
 * for a 12-row decode step). Here one pass over the heads that rotate, in float32 rounded once to
 * the dtype, written back where they are (the fused QKV output, so q and k stay views of it).
 *
 *   x          [tokens, token_stride]: each token's first `heads` heads of head_dim rotate
 *   positions  [tokens] int64, each below max_positions (checked first: 2 if not, nothing written)
 *   cos, sin   [max_positions, head_dim / 2] in x's dtype
 * Head h of a token at position p: x1, x2 its halves; x1' = x1 cos - x2 sin, x2' = x2 cos + x1 sin.
 */
#include <stdint.h>

#include "vec16.h"

static int rope(void *x, int64_t tokens, int64_t token_stride, int64_t heads, int64_t head_dim,
                const int64_t *positions, const void *cos, const void *sin, int64_t max_positions, const int bf16) {
    for (int64_t t = 0; t < tokens; t++)
        if (positions[t] < 0 || positions[t] >= max_positions) return 2;
    const int64_t half = head_dim / 2;
#pragma omp parallel for if (tokens * heads * head_dim >= 65536)
    for (int64_t t = 0; t < tokens; t++)
        for (int64_t d = 0; d < half; d += 16) {
            const int64_t n = half - d < 16 ? half - d : 16, table = positions[t] * half + d;
            const v16 c = n == 16 ? load16(cos, bf16, table) : load16n(cos, bf16, table, n);
            const v16 s = n == 16 ? load16(sin, bf16, table) : load16n(sin, bf16, table, n);
            for (int64_t h = 0; h < heads; h++) {
                const int64_t first = t * token_stride + h * head_dim + d, second = first + half;
                const v16 x1 = n == 16 ? load16(x, bf16, first) : load16n(x, bf16, first, n);
                const v16 x2 = n == 16 ? load16(x, bf16, second) : load16n(x, bf16, second, n);
                store16(x, bf16, first, x1 * c - x2 * s, n);
                store16(x, bf16, second, x2 * c + x1 * s, n);
            }
        }
    return 0;
}

int rope_f32(float *x, int64_t tokens, int64_t token_stride, int64_t heads, int64_t head_dim,
             const int64_t *positions, const float *cos, const float *sin, int64_t max_positions) {
    return rope(x, tokens, token_stride, heads, head_dim, positions, cos, sin, max_positions, 0);
}

int rope_bf16(uint16_t *x, int64_t tokens, int64_t token_stride, int64_t heads, int64_t head_dim,
              const int64_t *positions, const uint16_t *cos, const uint16_t *sin, int64_t max_positions) {
    return rope(x, tokens, token_stride, heads, head_dim, positions, cos, sin, max_positions, 1);
}
