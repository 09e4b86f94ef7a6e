/* bfloat16 <-> float32 for the CPU kernels: bfloat16 is the top half of a float32. */
#ifndef PAGEDKV_BF16_H
#define PAGEDKV_BF16_H
#include <stdint.h>

static inline float bf16_to_float(uint16_t h) {
    const union { uint32_t bits; float value; } u = {(uint32_t)h << 16};
    return u.value;
}

static inline uint16_t float_to_bf16(float f) {
    union { float value; uint32_t bits; } u = {f};
    if (f != f) return (uint16_t)((u.bits >> 16) | 0x40); /* keep NaN a NaN */
    u.bits += 0x7fff + ((u.bits >> 16) & 1);               /* round to nearest even */
    return (uint16_t)(u.bits >> 16);
}
#endif
