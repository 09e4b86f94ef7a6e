/* One Llama decoder layer of a decode-sized step on the CPU, as one call: the kernels of the
 * other files in the order models/llama.py calls them, without Python between them.
 *
 * A decode step of SmolLM2-135M runs about 300 small calls; in Python each costs 5-15 us around
 * the C (module dispatch, checks, a new tensor), about 100 us a layer and 3 ms a step, a tenth of
 * a float32 step at 9-34 sequences (docs/benchmarks.md). Here a layer is one call, up to its MLP's
 * activation, which stays PyTorch's silu(gate) * up so that the outputs equal the module path's
 * bit for bit:
 *   x = act @ down(previous layer)^T          (layer > 0; layer 0 starts from the embeddings in x)
 *   hidden = rms_norm(residual += x)          (layer 0: residual = x, hidden = rms_norm(x))
 *   qkv = hidden @ qkv^T; RoPE on q and k in place; k and v written to their cache slots
 *   attn = paged_attention(q, cache)
 *   hidden = rms_norm(residual += attn @ o^T)
 *   gate_up = hidden @ gate_up^T
 * and a call with layer == layers only computes the last layer's down projection into x.
 * All tensors are contiguous and of one dtype (float32, or bfloat16 on CPUs with AVX512-BF16);
 * rows at most what the linear kernel takes (Python checks, and falls back to the modules).
 * Returns 0, or the status of the kernel that failed (2: an index out of range, 1: no memory).
 */
#include <stdint.h>
#include <string.h>

int linear_f32(const float *x, int64_t m, int64_t k, const float *packed, const float *bias, float *y, int64_t n);
int linear_bf16(const uint16_t *x, int64_t m, int64_t k, const uint16_t *packed, const uint16_t *bias, uint16_t *y,
                int64_t n);
void rms_norm_f32(const float *x, float *residual, const float *weight, float *out, int64_t rows, int64_t dim,
                  float eps);
void rms_norm_bf16(const uint16_t *x, uint16_t *residual, const uint16_t *weight, uint16_t *out, int64_t rows,
                   int64_t dim, float eps);
int rope_f32(float *x, int64_t tokens, int64_t token_stride, int64_t heads, int64_t head_dim,
             const int64_t *positions, const float *cos, const float *sin, int64_t max_positions);
int rope_bf16(uint16_t *x, int64_t tokens, int64_t token_stride, int64_t heads, int64_t head_dim,
              const int64_t *positions, const uint16_t *cos, const uint16_t *sin, int64_t max_positions);
int paged_attention_f32(const void *q, int64_t tokens, int64_t q_stride, const void *k_cache, const void *v_cache,
                        int64_t num_blocks, void *out, const int64_t *block_tables, int64_t table_width,
                        const int64_t *query_starts, const int64_t *query_lens, const int64_t *context_lens,
                        int64_t seqs, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t block_size,
                        float scale);
int paged_attention_bf16(const void *q, int64_t tokens, int64_t q_stride, const void *k_cache, const void *v_cache,
                         int64_t num_blocks, void *out, const int64_t *block_tables, int64_t table_width,
                         const int64_t *query_starts, const int64_t *query_lens, const int64_t *context_lens,
                         int64_t seqs, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t block_size,
                         float scale);

/* What a layer's pointers are, in each row of llama_step.layer_table */
enum { INPUT_NORM, QKV, O, POST_NORM, GATE_UP, DOWN, K_CACHE, V_CACHE, LAYER_POINTERS };

/* One forward's shapes, step metadata and buffers; mirrored by models/cpu_kernel.py's LlamaStep */
struct llama_step {
    int64_t bf16, tokens, hidden, heads, kv_heads, head_dim, intermediate, layers;
    int64_t seqs, block_size, num_blocks, table_width, max_positions;
    const int64_t *positions, *slots, *block_tables, *query_starts, *query_lens, *context_lens;
    const void *cos, *sin;
    const int64_t *layer_table; /* [layers][LAYER_POINTERS] addresses */
    void *x, *residual, *normed, *qkv, *attn, *gate_up;
    float eps, scale;
};

static int linear(const struct llama_step *s, const void *x, int64_t k, int64_t weight, void *y, int64_t n) {
    return s->bf16 ? linear_bf16(x, s->tokens, k, (const uint16_t *)weight, 0, y, n)
                   : linear_f32(x, s->tokens, k, (const float *)weight, 0, y, n);
}

/* out = rms_norm(residual += x), or out = rms_norm(x) without a residual */
static void norm(const struct llama_step *s, const void *x, void *residual, int64_t weight, void *out) {
    if (s->bf16) rms_norm_bf16(x, residual, (const uint16_t *)weight, out, s->tokens, s->hidden, s->eps);
    else rms_norm_f32(x, residual, (const float *)weight, out, s->tokens, s->hidden, s->eps);
}

int llama_layer(const struct llama_step *s, int64_t layer, const void *act) {
    const int64_t size = s->bf16 ? 2 : 4, row = (s->heads + 2 * s->kv_heads) * s->head_dim;
    const int64_t kv_row = s->kv_heads * s->head_dim;
    int status;
    if (layer > 0) {
        status = linear(s, act, s->intermediate, s->layer_table[(layer - 1) * LAYER_POINTERS + DOWN], s->x, s->hidden);
        if (status || layer == s->layers) return status;
    }
    const int64_t *w = s->layer_table + layer * LAYER_POINTERS;
    if (layer == 0) {
        memcpy(s->residual, s->x, (size_t)(s->tokens * s->hidden * size));
        norm(s, s->x, 0, w[INPUT_NORM], s->normed);
    } else {
        norm(s, s->x, s->residual, w[INPUT_NORM], s->normed);
    }
    if ((status = linear(s, s->normed, s->hidden, w[QKV], s->qkv, row))) return status;
    status = s->bf16 ? rope_bf16(s->qkv, s->tokens, row, s->heads + s->kv_heads, s->head_dim, s->positions, s->cos,
                                 s->sin, s->max_positions)
                     : rope_f32(s->qkv, s->tokens, row, s->heads + s->kv_heads, s->head_dim, s->positions, s->cos,
                                s->sin, s->max_positions);
    if (status) return status;
    char *k_cache = (char *)w[K_CACHE], *v_cache = (char *)w[V_CACHE];
    const char *qkv = s->qkv;
    for (int64_t t = 0; t < s->tokens; t++) /* every slot checked before any is written */
        if (s->slots[t] < 0 || s->slots[t] >= s->num_blocks * s->block_size) return 2;
    for (int64_t t = 0; t < s->tokens; t++) {
        const int64_t slot = s->slots[t];
        memcpy(k_cache + slot * kv_row * size, qkv + (t * row + s->heads * s->head_dim) * size, (size_t)(kv_row * size));
        memcpy(v_cache + slot * kv_row * size, qkv + (t * row + s->heads * s->head_dim + kv_row) * size,
               (size_t)(kv_row * size));
    }
    status = (s->bf16 ? paged_attention_bf16 : paged_attention_f32)(
        s->qkv, s->tokens, row, k_cache, v_cache, s->num_blocks, s->attn, s->block_tables, s->table_width,
        s->query_starts, s->query_lens, s->context_lens, s->seqs, s->heads, s->kv_heads, s->head_dim, s->block_size,
        s->scale);
    if (status) return status;
    if ((status = linear(s, s->attn, s->heads * s->head_dim, w[O], s->x, s->hidden))) return status;
    norm(s, s->x, s->residual, w[POST_NORM], s->normed);
    return linear(s, s->normed, s->hidden, w[GATE_UP], s->gate_up, 2 * s->intermediate);
}
