/* 16-float vectors for the CPU kernels (GCC vector extensions: AVX-512 registers, AVX2 pairs or
 * NEON quads, whatever the target has): loads and stores from float32 or bfloat16, a select, and
 * the softmax's exp. */
#ifndef PAGEDKV_VEC16_H
#define PAGEDKV_VEC16_H
#include <stdint.h>
#include <string.h>

#include "bf16.h"

typedef float v16 __attribute__((vector_size(64)));
typedef int32_t vi16 __attribute__((vector_size(64)));
typedef uint32_t vu16 __attribute__((vector_size(64)));
typedef uint16_t vh16 __attribute__((vector_size(32)));

/* yes where mask is true (all bits set), no where it is false */
static inline v16 select(vi16 mask, v16 yes, v16 no) {
    return (v16)(((vi16)yes & mask) | ((vi16)no & ~mask));
}

/* exp(x) of 16 lanes for the softmax's x <= 0, in plain arithmetic (libm's expf does not
 * vectorize without -ffast-math, which would also drop NaN and infinity semantics). Cephes'
 * single-precision polynomial: within 2 ulp of expf; x below -87 gives about 1e-38, not 0; NaN
 * stays NaN. floor() is truncation, one less where that rounded a negative value up. */
static inline v16 exp16(v16 x) {
    x = select(x < -87.0f, (v16){0} - 87.0f, x);
    const v16 y = x * 1.44269504088896341f + 0.5f;
    vi16 whole = __builtin_convertvector(y, vi16);
    whole += __builtin_convertvector(whole, v16) > y; /* true is -1: one less where truncation rounded up */
    const v16 n = __builtin_convertvector(whole, v16);
    const v16 r = x - n * 0.693359375f + n * 2.12194440e-4f;
    v16 p = r * 1.9875691500e-4f + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    return (p * r * r + r + 1.0f) * (v16)((whole + 127) << 23);
}

/* 16 elements from element `at` of a float32 or (bf16) bfloat16 array, as float32 */
static inline v16 load16(const void *src, const int bf16, int64_t at) {
    v16 x;
    if (bf16) {
        vh16 h;
        memcpy(&h, (const uint16_t *)src + at, sizeof h);
        const vi16 bits = __builtin_convertvector(h, vi16) << 16;
        memcpy(&x, &bits, sizeof x);
    } else {
        memcpy(&x, (const float *)src + at, sizeof x);
    }
    return x;
}

/* The first n (<= 16) elements from element `at`, the other lanes zero: the tail of a row */
static inline v16 load16n(const void *src, const int bf16, int64_t at, int64_t n) {
    v16 x = {0};
    for (int64_t i = 0; i < n; i++)
        x[i] = bf16 ? bf16_to_float(((const uint16_t *)src)[at + i]) : ((const float *)src)[at + i];
    return x;
}

/* The first n (<= 16) lanes of x into element `at` of a float32 or (bf16) bfloat16 array,
 * bfloat16 rounded to nearest even with NaN kept a NaN (as float_to_bf16). */
static inline void store16(void *dst, const int bf16, int64_t at, v16 x, int64_t n) {
    if (!bf16) {
        if (n == 16) memcpy((float *)dst + at, &x, sizeof x); /* a constant size: one vector store */
        else memcpy((float *)dst + at, &x, sizeof(float) * (size_t)n);
        return;
    }
    vu16 bits;
    memcpy(&bits, &x, sizeof bits);
    const vi16 nan = x != x;
    bits = ((bits + 0x7fff + ((bits >> 16) & 1)) & ~(vu16)nan) | ((bits | 0x400000) & (vu16)nan);
    const vh16 h = __builtin_convertvector(bits >> 16, vh16);
    if (n == 16) memcpy((uint16_t *)dst + at, &h, sizeof h);
    else memcpy((uint16_t *)dst + at, &h, sizeof(uint16_t) * (size_t)n);
}
#endif
