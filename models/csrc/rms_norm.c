/* RMSNorm, optionally fused with the residual add before it, on the CPU.
 *
 * PyTorch's CPU RMSNorm is a composite of about fifteen ops (casts, pow, mean, rsqrt, muls) and the
 * residual add one more, each a dispatch and a pass over the activations; a decode step of a
 * 30-layer model runs 61 of them. Here one pass per row: out = x / rms(x) * weight, computed in
 * float32 and rounded once to the input's dtype, exactly as torch.nn.RMSNorm defines it; with a
 * residual, residual += x first (rounded to the dtype, as the separate add would) and the sum is
 * normalized.
 *
 *   x, out, residual  [rows, dim]   contiguous, float32 or bfloat16 (residual may be NULL)
 *   weight            [dim]
 */
#include <math.h>
#include <stdint.h>

#include "bf16.h"

#define IDENTITY(x) (x)
#define DEFINE_RMS_NORM(NAME, T, LOAD, STORE)                                                            \
    void NAME(const T *x, T *residual, const T *weight, T *out, int64_t rows, int64_t dim, float eps) {    \
        _Pragma("omp parallel for if (rows * dim >= 65536)")                                             \
        for (int64_t row = 0; row < rows; row++) {                                                       \
            const T *in = x + row * dim;                                                                 \
            T *sum = residual ? residual + row * dim : 0, *dst = out + row * dim;                        \
            float squares = 0.0f;                                                                        \
            if (sum) {                                                                                   \
                _Pragma("omp simd reduction(+ : squares)")                                               \
                for (int64_t d = 0; d < dim; d++) {                                                      \
                    sum[d] = STORE(LOAD(sum[d]) + LOAD(in[d]));                                          \
                    const float v = LOAD(sum[d]);                                                        \
                    squares += v * v;                                                                    \
                }                                                                                        \
                in = sum;                                                                                \
            } else {                                                                                     \
                _Pragma("omp simd reduction(+ : squares)")                                               \
                for (int64_t d = 0; d < dim; d++) squares += LOAD(in[d]) * LOAD(in[d]);                  \
            }                                                                                            \
            const float scale = 1.0f / sqrtf(squares / (float)dim + eps);                                \
            _Pragma("omp simd")                                                                          \
            for (int64_t d = 0; d < dim; d++) dst[d] = STORE(LOAD(in[d]) * scale * LOAD(weight[d]));     \
        }                                                                                                \
    }

DEFINE_RMS_NORM(rms_norm_f32, float, IDENTITY, IDENTITY)
DEFINE_RMS_NORM(rms_norm_bf16, uint16_t, bf16_to_float, float_to_bf16)
