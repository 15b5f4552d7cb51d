/* dsv2.c: DeepSeek-V2 inference in one C file (arXiv 2405.04434, "DeepSeek-V2: A Strong,
 * Economical, and Efficient Mixture-of-Experts Language Model").
 *
 * Multi-head Latent Attention (sec. 2.1, eqs. 9-19): low-rank joint compression of keys and
 * values, a cache that holds only the latent c^KV and one shared RoPE key per token, query
 * compression, decoupled RoPE with YaRN, and the absorbed form of Appendix C.
 * DeepSeekMoE (sec. 2.2, eqs. 20-22): shared and routed experts, top-k and device-limited routing.
 * Each of eqs. 9-22 is a `// eq. (N)` comment on the line that computes it, in the paper's order
 * within MLA (the MoE section runs 22, 21, 20 and says why); what the checkpoints add to the
 * equations is marked `// not in the paper: ...` with the reason.
 *
 * Build: gcc -O3 -march=native -fopenmp -o dsv2 dsv2.c -lm      (or: make)
 * Run:   ./dsv2 dsv2_tiny.bin -z tokenizer.bin -i "The jury said that the city"
 * Real checkpoints: python3 export.py HF_DIR model.bin --tokenizer tok.bin   (see README.md)
 */
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>
#include <math.h>
#include <time.h>
#include <fcntl.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <errno.h>
#include <stdarg.h>
#include <sys/resource.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__) && !defined(DSV2_PLAIN_C)
#include <immintrin.h>
#endif

// one clear error line, then a non-zero exit
static void die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void die(const char *fmt, ...) {
    va_list ap; va_start(ap, fmt);
    fprintf(stderr, "dsv2: error: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    exit(1);
}

// ----------------------------------------------------------------------------
// ---------------- The model file: config and weights
//
// export.py writes one file: a 256-byte header (magic "DSV2", version, the Config fields below
// in this order), then every tensor in the order map_weights() walks, each aligned to 64 bytes,
// as fp32, bf16 or q8, row-major in the Hugging Face shape [out, in]. docs/FORMAT.md has the table.

#define DSV2_MAGIC 0x32565344u  // "DSV2" read as a little-endian uint32
#define DSV2_VERSION 1
#define HEADER_BYTES 256
#define TENSOR_ALIGN 64

typedef struct {
    int32_t dtype;                  // the weights: DTYPE_F32, DTYPE_BF16 or DTYPE_Q8 (below)
    int32_t dim;                    // d, hidden size
    int32_t n_layers;
    int32_t n_heads;                // n_h
    int32_t vocab_size;
    int32_t q_lora_rank;            // d_c', 0 when the query is not compressed (V2-Lite)
    int32_t kv_lora_rank;           // d_c, the KV latent
    int32_t qk_nope_head_dim;       // d_h
    int32_t qk_rope_head_dim;       // d_h^R
    int32_t v_head_dim;             // value dimension per head
    int32_t intermediate_size;      // dense FFN width
    int32_t moe_intermediate_size;  // one expert's width
    int32_t n_routed_experts;       // N_r
    int32_t n_shared_experts;       // N_s
    int32_t n_experts_per_tok;      // K_r
    int32_t first_k_dense_replace;  // layers below this use the dense FFN
    int32_t moe_layer_freq;         // (original hub code) MoE only where layer % freq == 0
    int32_t topk_method;            // 0 greedy, 1 group_limited_greedy (device-limited routing)
    int32_t n_group;                // M groups of experts ("devices")
    int32_t topk_group;             // groups kept per token
    int32_t norm_topk_prob;         // renormalise the top-k weights (original hub code)
    int32_t max_position_embeddings;
    int32_t rope_yarn;              // 1: rope_scaling type yarn
    int32_t original_max_position_embeddings;
    int32_t bos_token_id, eos_token_id;  // from config.json (-1 if absent)
    float rms_norm_eps;
    float rope_theta;
    float routed_scaling_factor;
    float rope_factor, beta_fast, beta_slow, mscale, mscale_all_dim, attention_factor;  // YaRN
} Config;

// How the weights are stored (the header's dtype). A q8 file keeps the RMSNorm weights, the
// router and any matrix whose rows are not whole blocks in fp32 (tensor_dtype() in map_weights).
enum { DTYPE_F32 = 0, DTYPE_BF16 = 1, DTYPE_Q8 = 2 };

// q8: each row cut into blocks of 32 consecutive values w = d * q, one fp16 scale d per block
// and 32 int8 q (llama.cpp's Q8_0 block, byte for byte, so a GGUF converter only copies it)
#define Q8_BLOCK 32
typedef struct {
    uint16_t d;            // the scale, fp16
    int8_t q[Q8_BLOCK];    // the values, w = d * q
} BlockQ8;                 // 34 bytes, no padding

// a weight matrix inside the memory map, in one of the DTYPEs
typedef struct {
    const void *data;
    int dtype;
} Mat;

typedef struct {
    Mat gate_proj, up_proj, down_proj;  // SwiGLU: down(silu(gate x) * up x)
} FFN;

typedef struct {
    Mat input_layernorm;     // (dim)
    Mat q_a_proj;            // W^DQ (q_lora_rank, dim); data NULL when q_lora_rank == 0
    Mat q_a_layernorm;       // (q_lora_rank)
    Mat q_b_proj;            // [W^UQ_i; W^QR_i] per head (n_heads*(d_h+d_h^R), q_lora_rank); without query
                             // compression (V2-Lite) the checkpoint's q_proj (same rows, dim): c_t^Q = h_t
    Mat kv_a_proj_with_mqa;  // [W^DKV; W^KR] (kv_lora_rank + d_h^R, dim)
    Mat kv_a_layernorm;      // (kv_lora_rank)
    Mat kv_b_proj;           // per head [W^UK_i; W^UV_i] (n_heads*(d_h+v_head_dim), kv_lora_rank)
    Mat o_proj;              // W^O (dim, n_heads*v_head_dim)
    Mat post_attention_layernorm;  // (dim)
    int is_moe;
    FFN dense;               // dense layers: width intermediate_size
    Mat gate;                // MoE: the centroids e_i as rows (n_routed_experts, dim)
    FFN *experts;            // MoE: n_routed_experts routed experts, width moe_intermediate_size
    FFN shared;              // MoE: the N_s shared experts as one FFN, width N_s * moe_intermediate_size
} Layer;

typedef struct {
    Config config;
    Mat embed_tokens;        // (vocab_size, dim)
    Layer *layers;           // (n_layers)
    Mat norm;                // (dim)
    Mat lm_head;             // (vocab_size, dim)
    void *map;               // the memory-mapped file
    size_t file_size;
} Model;

static void *xcalloc(size_t n, size_t size) {
    void *p = calloc(n ? n : 1, size);
    if (!p) die("out of memory (%zu x %zu bytes)", n, size);
    return p;
}

static inline float bf16_to_float(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

// x rounded to the nearest bf16 value (ties to even), kept as a float: what --kv bf16 stores. The same
// bits as dsv2_common.cuh's float_to_bf16 (and CUDA's __float2bfloat16_rn), NaN included.
static inline float bf16_round(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    if ((u & 0x7fffffff) > 0x7f800000) return bf16_to_float(0x7fc0);  // NaN
    return bf16_to_float((uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16));
}

// IEEE half -> float: shift the 15 exponent+mantissa bits into float position, then rescale the
// exponent bias (15 -> 127) by multiplying with 2^112; exact, subnormal halves included
static inline float fp16_to_float(uint16_t h) {
    uint32_t u = (uint32_t)(h & 0x7FFF) << 13;
    float f;
    memcpy(&f, &u, 4);
    f *= 0x1p112f;
    return h & 0x8000 ? -f : f;
}

// element i of a tensor (row-major, i = row * n + column)
static inline float mat_at(Mat m, size_t i) {
    if (m.dtype == DTYPE_Q8) {
        const BlockQ8 *b = (const BlockQ8 *)m.data + i / Q8_BLOCK;
        return fp16_to_float(b->d) * b->q[i % Q8_BLOCK];
    }
    return m.dtype == DTYPE_BF16 ? bf16_to_float(((const uint16_t *)m.data)[i]) : ((const float *)m.data)[i];
}

static int is_moe_layer(const Config *c, int l) {
    return c->n_routed_experts > 0 && l >= c->first_k_dense_replace && l % c->moe_layer_freq == 0;
}

// How the file stores one tensor of `cols` values a row: in its dtype, except that a q8 file
// keeps vectors and the router (matrix = 0) and rows that are not whole blocks in fp32
static int tensor_dtype(const Config *c, int matrix, uint64_t cols) {
    if (c->dtype != DTYPE_Q8) return c->dtype;
    return matrix && cols % Q8_BLOCK == 0 ? DTYPE_Q8 : DTYPE_F32;
}

static uint64_t tensor_bytes(int dtype, uint64_t rows, uint64_t cols) {
    if (dtype == DTYPE_Q8) return rows * (cols / Q8_BLOCK) * sizeof(BlockQ8);
    return rows * cols * (dtype == DTYPE_BF16 ? 2 : 4);
}

// Walks the tensors in file order and returns the bytes the file must have. With base NULL it
// only counts, so model_load can compare that with the file size before allocating anything;
// with base set it also points every weight at its place in the file. The sizes fit easily in
// 64 bits: check_config bounds every dimension first.
static uint64_t map_weights(Model *m, const char *base) {
    const Config *c = &m->config;
    uint64_t off = HEADER_BYTES;
    uint64_t qk_head = (uint64_t)c->qk_nope_head_dim + c->qk_rope_head_dim;
#define TAKE_AS(dst, rows, cols, matrix) do { \
        off = (off + TENSOR_ALIGN - 1) / TENSOR_ALIGN * TENSOR_ALIGN; \
        if (base) { (dst).data = base + off; (dst).dtype = tensor_dtype(c, matrix, cols); } \
        off += tensor_bytes(tensor_dtype(c, matrix, cols), rows, cols); \
    } while (0)
#define TAKE(dst, rows, cols) TAKE_AS(dst, rows, cols, 1)
#define TAKE_VECTOR(dst, n) TAKE_AS(dst, 1, n, 0)
    TAKE(m->embed_tokens, c->vocab_size, c->dim);
    for (int l = 0; l < c->n_layers; l++) {
        Layer *L = base ? &m->layers[l] : NULL;
        TAKE_VECTOR(L->input_layernorm, c->dim);
        if (c->q_lora_rank) {
            TAKE(L->q_a_proj, c->q_lora_rank, c->dim);
            TAKE_VECTOR(L->q_a_layernorm, c->q_lora_rank);
            TAKE(L->q_b_proj, c->n_heads * qk_head, c->q_lora_rank);
        } else {
            TAKE(L->q_b_proj, c->n_heads * qk_head, c->dim);
        }
        TAKE(L->kv_a_proj_with_mqa, c->kv_lora_rank + c->qk_rope_head_dim, c->dim);
        TAKE_VECTOR(L->kv_a_layernorm, c->kv_lora_rank);
        TAKE(L->kv_b_proj, (uint64_t)c->n_heads * (c->qk_nope_head_dim + c->v_head_dim), c->kv_lora_rank);
        TAKE(L->o_proj, c->dim, (uint64_t)c->n_heads * c->v_head_dim);
        TAKE_VECTOR(L->post_attention_layernorm, c->dim);
        if (base) L->is_moe = is_moe_layer(c, l);
        if (is_moe_layer(c, l)) {
            uint64_t mi = c->moe_intermediate_size, si = mi * c->n_shared_experts;
            TAKE_AS(L->gate, c->n_routed_experts, c->dim, 0);  // the router stays fp32 in a q8 file
            for (int e = 0; e < c->n_routed_experts; e++) {
                TAKE(L->experts[e].gate_proj, mi, c->dim);
                TAKE(L->experts[e].up_proj, mi, c->dim);
                TAKE(L->experts[e].down_proj, c->dim, mi);
            }
            if (c->n_shared_experts) {
                TAKE(L->shared.gate_proj, si, c->dim);
                TAKE(L->shared.up_proj, si, c->dim);
                TAKE(L->shared.down_proj, c->dim, si);
            }
        } else {
            TAKE(L->dense.gate_proj, c->intermediate_size, c->dim);
            TAKE(L->dense.up_proj, c->intermediate_size, c->dim);
            TAKE(L->dense.down_proj, c->dim, c->intermediate_size);
        }
    }
    TAKE_VECTOR(m->norm, c->dim);
    TAKE(m->lm_head, c->vocab_size, c->dim);
#undef TAKE
#undef TAKE_VECTOR
#undef TAKE_AS
    return off;
}

// Every field a corrupt header could set to something the code cannot run: dimensions within
// bounds that keep every product below 2^31 where the code counts in int (n_heads * (d_h + d_h^R),
// N_s * moe_intermediate_size, ...) and every file offset below 2^63; the router's choices
// within its arrays; floats finite and in their domain.
static void check_config(const Config *c, const char *path) {
#define RANGE(field, lo, hi) do { if (c->field < (lo) || c->field > (hi)) \
        die("%s: unsupported or corrupt config: " #field " = %d (expected %d..%d)", path, \
            (int)c->field, (int)(lo), (int)(hi)); } while (0)
    RANGE(dtype, DTYPE_F32, DTYPE_Q8);
    RANGE(dim, 1, 1 << 16);
    RANGE(n_layers, 1, 1024);
    RANGE(n_heads, 1, 1024);
    RANGE(vocab_size, 1, 1 << 22);
    RANGE(q_lora_rank, 0, 1 << 16);
    RANGE(kv_lora_rank, 1, 1 << 16);
    RANGE(qk_nope_head_dim, 1, 4096);
    RANGE(qk_rope_head_dim, 2, 4096);
    RANGE(v_head_dim, 1, 4096);
    RANGE(intermediate_size, 1, 1 << 20);
    RANGE(moe_intermediate_size, 1, 1 << 20);
    RANGE(n_routed_experts, 1, 4096);     // moe_route's arrays hold 4096
    RANGE(n_shared_experts, 0, 64);
    RANGE(n_experts_per_tok, 1, c->n_routed_experts);
    RANGE(first_k_dense_replace, 0, c->n_layers);
    RANGE(moe_layer_freq, 1, 1024);
    RANGE(topk_method, 0, 1);
    RANGE(n_group, 1, c->n_routed_experts);
    RANGE(topk_group, 1, c->n_group);
    RANGE(norm_topk_prob, 0, 1);
    RANGE(max_position_embeddings, 1, 1 << 24);
    RANGE(rope_yarn, 0, 1);
    if (c->rope_yarn) RANGE(original_max_position_embeddings, 1, 1 << 24);
    RANGE(bos_token_id, -1, c->vocab_size - 1);
    RANGE(eos_token_id, -1, c->vocab_size - 1);
#undef RANGE
    if (c->qk_rope_head_dim % 2) die("%s: unsupported or corrupt config: qk_rope_head_dim = %d is odd", path, c->qk_rope_head_dim);
    if (c->n_routed_experts % c->n_group)
        die("%s: unsupported or corrupt config: n_routed_experts = %d is not a multiple of n_group = %d", path,
            c->n_routed_experts, c->n_group);
    if (c->topk_method == 1 && c->topk_group * (c->n_routed_experts / c->n_group) < c->n_experts_per_tok)
        die("%s: unsupported config: topk_group %d groups of %d experts hold fewer than n_experts_per_tok %d", path,
            c->topk_group, c->n_routed_experts / c->n_group, c->n_experts_per_tok);
#define FLOAT(field, ok, want) do { if (!isfinite(c->field) || !(ok)) \
        die("%s: unsupported or corrupt config: " #field " = %g (expected " want ")", path, (double)c->field); } while (0)
    FLOAT(rms_norm_eps, c->rms_norm_eps > 0 && c->rms_norm_eps < 1, "in (0, 1)");
    FLOAT(rope_theta, c->rope_theta > 1, "above 1");
    FLOAT(routed_scaling_factor, 1, "a finite number");
    if (c->rope_yarn) {
        FLOAT(rope_factor, c->rope_factor >= 1, "at least 1");
        FLOAT(beta_fast, c->beta_fast > 0, "above 0");
        FLOAT(beta_slow, c->beta_slow > 0, "above 0");
        FLOAT(mscale, 1, "a finite number");
        FLOAT(mscale_all_dim, 1, "a finite number");
        FLOAT(attention_factor, c->attention_factor >= 0, "at least 0");
    }
#undef FLOAT
}

static void model_load(Model *m, const char *path) {
    memset(m, 0, sizeof(*m));
    int fd = open(path, O_RDONLY);
    if (fd < 0) die("cannot open model file %s: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) die("model file %s is not a regular file", path);
    m->file_size = (size_t)st.st_size;
    if (m->file_size < HEADER_BYTES) die("%s: too short for a dsv2 model file (%zu bytes)", path, m->file_size);
    m->map = mmap(NULL, m->file_size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (m->map == MAP_FAILED) { m->map = NULL; die("%s: mmap failed: %s", path, strerror(errno)); }
    const uint32_t *head = (const uint32_t *)m->map;
    if (memcmp(m->map, "DSV2TOK", 8) == 0) die("%s is a tokenizer file; pass it with -z (the model file comes first)", path);
    if (head[0] != DSV2_MAGIC) die("%s: not a dsv2 model file (bad magic); convert with export.py", path);
    if (head[1] != DSV2_VERSION)
        die("%s: model file version %u, this dsv2 reads version %d; re-export with export.py", path, head[1], DSV2_VERSION);
    memcpy(&m->config, (const char *)m->map + 8, sizeof(Config));
    check_config(&m->config, path);
    uint64_t need = map_weights(m, NULL);
    if (need != m->file_size)
        die("%s: file is %zu bytes but its config needs %llu (truncated or corrupt)", path, m->file_size,
            (unsigned long long)need);
    m->layers = (Layer *)xcalloc(m->config.n_layers, sizeof(Layer));
    for (int l = 0; l < m->config.n_layers; l++)
        if (is_moe_layer(&m->config, l)) m->layers[l].experts = (FFN *)xcalloc(m->config.n_routed_experts, sizeof(FFN));
    map_weights(m, (const char *)m->map);
}

static void model_free(Model *m) {
    for (int l = 0; l < m->config.n_layers; l++) free(m->layers[l].experts);
    free(m->layers);
    munmap(m->map, m->file_size);
}

// ----------------------------------------------------------------------------
// ---------------- The run state: activations and the latent KV cache
//
// Paper symbols in the comments: d = dim, n_h = n_heads, d_h = qk_nope_head_dim, d_h^R =
// qk_rope_head_dim, d_c = kv_lora_rank, d_c' = q_lora_rank; d_v = v_head_dim (the paper's d_h).

// -a: what attention reads from the latent cache. Both forms give the same logits (mla_attention).
typedef enum { ATTN_ABSORBED, ATTN_NAIVE } AttnForm;

// How the cache stores a row (--kv, --kv-layout; default: the latent, in float32). bf16: each value
// rounded to bf16 when its row is written (the CPU keeps it in a float; the GPU in 2 bytes). mha: instead
// of the latent, every head's key and value expanded from it (kv_store), the cache a model without MLA
// would need; its attention is mla_attend_mha.
typedef struct {
    int bf16;  // --kv bf16 (0: --kv f32)
    int mha;   // --kv-layout mha (0: --kv-layout latent)
} KvFormat;

typedef struct Trace Trace;  // the teaching trace (--trace, --routing-out): its section follows forward()

// A chunk of T consecutive tokens runs through forward() at once (T = 1 when generating, up to
// max_T for a prompt): each matrix is then read once per chunk instead of once per token. Tensors
// with a T are (T, ...), row t being the token at position pos + t.
#define PROMPT_CHUNK 64  // max_T: the prompt's tokens per forward() (at most the context)

typedef struct {
    float *x;          // the residual stream (T, dim)
    float *h;          // h_t = RMSNorm(x), the attention's input (T, dim)
    float *c_q;        // c_t^Q, the compressed query (T, d_c')
    float *q;          // every head's query [q_t,i^C ; q_t,i^R] (T, n_h, d_h + d_h^R)
    float *kv_rebuilt; // naive form: k_j,i^C then v_j,i^C of one cached token j, per head (n_h, d_h + d_v)
    float *q_latent;   // absorbed form: W^UK_i^T q_t,i^C per head, one token at a time (n_h, d_c)
    float *o_latent;   // absorbed form: sum_j p_t,i,j c_j^KV per head, one token at a time (n_h, d_c)
    float *att;        // p_t,i,j, the attention probabilities of every head, one token at a time (n_h, seq_len)
    float *o;          // o_t,i of every head (T, n_h, d_v)
    float *attn_out;   // the attention's output, u_t of eq. 19 (T, dim)
    float *u;          // the FFN's input, u_t of eq. 20: RMSNorm of x after the attention's residual (T, dim)
    float *scores;     // u_t^T e_i of every routed expert, turned into s_i,t by moe_route (T, n_routed_experts)
    int *topk_idx;     // the chosen routed experts, best first (T, n_experts_per_tok)
    float *topk_w;     // their g_i,t (T, n_experts_per_tok)
    float *expert_in;  // the u_t of the tokens that chose one routed expert, gathered (T, dim)
    int *expert_slot;  // where each gathered token's output goes: t * n_experts_per_tok + k (T)
    float *expert_y;   // that expert's FFN_i^(r)(u_t) of those tokens (T, dim)
    float *expert_out; // each token's k-th routed expert's FFN_i^(r)(u_t) (T, n_experts_per_tok, dim)
    float *hb, *hb2;   // an FFN's hidden layer: silu(gate u) * up u, and up u (T, the widest FFN's width)
    float *ffn_out;    // the FFN's output: eq. 20's sums, without its "u_t +" (T, dim)
    float *rope_cos, *rope_sin;  // each position's rotation (T, d_h^R / 2)
    float *inv_freq;   // RoPE / YaRN inverse frequencies (d_h^R / 2)
    float rope_mscale;     // YaRN's factor on cos/sin (1 without YaRN)
    float softmax_scale;   // 1/sqrt(d_h + d_h^R), times YaRN's mscale^2
    float *logits;     // (T, vocab_size): every token's, or the last token's in row 0 (forward's LogitRows)
    float *kv_cache;   // THE cache: (n_layers, seq_len, d_c + d_h^R), each row [c_j^KV ; k_j^R]; with
                       // --kv-layout mha (n_layers, seq_len, kv_row_width) rows of every head's key and value
    float *kv_latent;  // --kv-layout mha: the chunk's new rows [c_t^KV ; k_t^R] before kv_store expands them (T, d_c + d_h^R)
    KvFormat kv;       // --kv, --kv-layout: how the cache stores its rows
    int seq_len;
    int max_T;         // the most tokens one forward() takes: PROMPT_CHUNK, or seq_len when shorter
    Trace *trace;      // the teaching trace, NULL when off
} RunState;

static int kv_cache_width(const Config *c) { return c->kv_lora_rank + c->qk_rope_head_dim; }

// Values in one cache row (a token in a layer) of a layout. latent: [c^KV (d_c) ; k^R (d_h^R)]. mha:
// [k_0 | k_1 | ... | k_{n_h-1} | v_0 | ... | v_{n_h-1}], head i's key k_i = [k_i^C (d_h) ; k^R (d_h^R)]
// (k^R repeated in every head, as an MHA model stores it) and value v_i^C (d_v). The GPU's rows
// (dsv2.cu, -m batch) are the same.
static long kv_row_width(const Config *c, int mha) {
    return mha ? (long)c->n_heads * (c->qk_nope_head_dim + c->qk_rope_head_dim + c->v_head_dim) : kv_cache_width(c);
}

// layer l's cache row of position pos: [c^KV (d_c) ; k^R (d_h^R)] (or the mha layout's row)
static float *cache_row(const RunState *s, const Config *c, int l, int pos) {
    return s->kv_cache + ((size_t)l * s->seq_len + pos) * kv_row_width(c, s->kv.mha);
}

static void rope_init(RunState *s, const Config *c);

// A context whose cache would not fit in this machine's memory is refused before anything is
// allocated (the weights are memory-mapped and not counted). The CPU keeps a bf16 cache in floats too.
static void check_context_fits(const Config *c, int seq_len, KvFormat kv) {
    long width = kv_row_width(c, kv.mha);
    double cache = 4.0 * c->n_layers * seq_len * width + 4.0 * c->n_heads * seq_len;
    double ram = (double)sysconf(_SC_PHYS_PAGES) * (double)sysconf(_SC_PAGESIZE);
    if (seq_len < 1 || (ram > 0 && cache > ram))
        die("a context of %d tokens needs %.1f GiB for the KV cache (%d layers x %ld values per token%s), "
            "more than this machine's %.1f GiB", seq_len, cache / (1 << 30), c->n_layers, width,
            kv.mha ? ", mha layout" : "", ram / (1 << 30));
}

// a run state for contexts of seq_len tokens, its cache in the given format
static void runstate_init_kv(RunState *s, const Config *c, int seq_len, KvFormat kv) {
    check_context_fits(c, seq_len, kv);
    int qk_head = c->qk_nope_head_dim + c->qk_rope_head_dim;
    int ffn_width = c->intermediate_size;
    if (c->moe_intermediate_size * (c->n_shared_experts > 1 ? c->n_shared_experts : 1) > ffn_width)
        ffn_width = c->moe_intermediate_size * (c->n_shared_experts > 1 ? c->n_shared_experts : 1);
    int T = seq_len < PROMPT_CHUNK ? seq_len : PROMPT_CHUNK;
    if (T < 1) T = 1;
    s->seq_len = seq_len;
    s->max_T = T;
    s->kv = kv;
    s->trace = NULL;
    s->x = (float *)xcalloc((size_t)T * c->dim, sizeof(float));
    s->h = (float *)xcalloc((size_t)T * c->dim, sizeof(float));
    s->c_q = (float *)xcalloc((size_t)T * c->q_lora_rank, sizeof(float));
    s->q = (float *)xcalloc((size_t)T * c->n_heads * qk_head, sizeof(float));
    s->kv_rebuilt = (float *)xcalloc((size_t)c->n_heads * (c->qk_nope_head_dim + c->v_head_dim), sizeof(float));
    s->q_latent = (float *)xcalloc((size_t)c->n_heads * c->kv_lora_rank, sizeof(float));
    s->o_latent = (float *)xcalloc((size_t)c->n_heads * c->kv_lora_rank, sizeof(float));
    s->att = (float *)xcalloc((size_t)c->n_heads * seq_len, sizeof(float));
    s->o = (float *)xcalloc((size_t)T * c->n_heads * c->v_head_dim, sizeof(float));
    s->attn_out = (float *)xcalloc((size_t)T * c->dim, sizeof(float));
    s->u = (float *)xcalloc((size_t)T * c->dim, sizeof(float));
    s->scores = (float *)xcalloc((size_t)T * c->n_routed_experts, sizeof(float));
    s->topk_idx = (int *)xcalloc((size_t)T * c->n_experts_per_tok, sizeof(int));
    s->topk_w = (float *)xcalloc((size_t)T * c->n_experts_per_tok, sizeof(float));
    s->expert_in = (float *)xcalloc((size_t)T * c->dim, sizeof(float));
    s->expert_slot = (int *)xcalloc(T, sizeof(int));
    s->expert_y = (float *)xcalloc((size_t)T * c->dim, sizeof(float));
    s->expert_out = (float *)xcalloc((size_t)T * c->n_experts_per_tok * c->dim, sizeof(float));
    s->hb = (float *)xcalloc((size_t)T * ffn_width, sizeof(float));
    s->hb2 = (float *)xcalloc((size_t)T * ffn_width, sizeof(float));
    s->ffn_out = (float *)xcalloc((size_t)T * c->dim, sizeof(float));
    s->rope_cos = (float *)xcalloc((size_t)T * (c->qk_rope_head_dim / 2), sizeof(float));
    s->rope_sin = (float *)xcalloc((size_t)T * (c->qk_rope_head_dim / 2), sizeof(float));
    s->inv_freq = (float *)xcalloc(c->qk_rope_head_dim / 2, sizeof(float));
    s->logits = (float *)xcalloc((size_t)T * c->vocab_size, sizeof(float));
    s->kv_cache = (float *)xcalloc((size_t)c->n_layers * seq_len * kv_row_width(c, kv.mha), sizeof(float));
    s->kv_latent = (float *)xcalloc(kv.mha ? (size_t)T * kv_cache_width(c) : 0, sizeof(float));
    rope_init(s, c);
}

// the default: the latent cache of the paper, in float32
static inline void runstate_init(RunState *s, const Config *c, int seq_len) {
    KvFormat latent_f32 = {0, 0};
    runstate_init_kv(s, c, seq_len, latent_f32);
}

static void runstate_free(RunState *s) {
    float *all[] = {s->x, s->h, s->c_q, s->q, s->kv_rebuilt, s->q_latent, s->o_latent, s->att, s->o, s->attn_out,
                    s->u, s->scores, s->topk_w, s->expert_in, s->expert_y, s->expert_out, s->hb, s->hb2, s->ffn_out,
                    s->rope_cos, s->rope_sin, s->inv_freq, s->logits, s->kv_cache, s->kv_latent};
    for (size_t i = 0; i < sizeof(all) / sizeof(all[0]); i++) free(all[i]);
    free(s->topk_idx);
    free(s->expert_slot);
}

// The teaching trace's hooks, when RunState.trace is set: forward() first asks trace_begin whether
// this position is traced; then each block's last line reports what the block computed. They are
// defined after forward(), and they read the blocks' results without changing them.
static void trace_begin(Trace *t, int token, int pos);
static void trace_mla(const Model *m, const RunState *s, int l, int pos);
static void trace_dense(const Config *c, const RunState *s, int l);
static void trace_moe(const Config *c, const RunState *s, int l);
static void trace_cache(const Config *c, const RunState *s, int pos);

// ----------------------------------------------------------------------------
// ---------------- Neural net blocks

// RMSNorm: o = x * rsqrt(mean(x^2) + eps) * w, in float32; x, w, o are (n,), o may be x
static void rmsnorm(float *o, const float *x, Mat w, int n, float eps) {
    float ss = 0.0f;
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
    float r = 1.0f / sqrtf(ss / n + eps);
    for (int i = 0; i < n; i++) o[i] = mat_at(w, i) * (x[i] * r);
}

// x (n,) -> softmax(x) in place
static void softmax(float *x, int n) {
    float max = x[0];
    for (int i = 1; i < n; i++) if (x[i] > max) max = x[i];
    float sum = 0.0f;
    for (int i = 0; i < n; i++) { x[i] = expf(x[i] - max); sum += x[i]; }
    for (int i = 0; i < n; i++) x[i] /= sum;
}

// a q8 row of nb blocks . x (32 nb,): sum over blocks b of d_b * sum_j q_b[j] x[32 b + j]
static float q8_row_dot(const BlockQ8 *row, const float *x, int nb) {
#if defined(__AVX512F__) && !defined(DSV2_PLAIN_C)
    // The loop below, with AVX-512 intrinsics: 16 int8 become 16 floats in two instructions,
    // two accumulators of 16 sums. GCC 12 turns the plain loop into 8-wide code that widens the
    // int8 in two steps; this runs 2.2x faster (development machine, Zen 5, matrix in L2: 31
    // against 14 G weights/s a core). Build with -DDSV2_PLAIN_C for the plain loop.
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    for (int b = 0; b < nb; b++) {
        __m512 d = _mm512_set1_ps(fp16_to_float(row[b].d));
        __m512 q0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)row[b].q)));
        __m512 q1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(row[b].q + 16))));
        acc0 = _mm512_fmadd_ps(_mm512_mul_ps(q0, _mm512_loadu_ps(x + b * Q8_BLOCK)), d, acc0);
        acc1 = _mm512_fmadd_ps(_mm512_mul_ps(q1, _mm512_loadu_ps(x + b * Q8_BLOCK + 16)), d, acc1);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
#else
    // one running sum per position in a block, so the compiler keeps all 32 in vector registers
    // and no block ends in a horizontal sum; added up once at the end
    float sum[Q8_BLOCK] = {0}, val = 0.0f;
    for (int b = 0; b < nb; b++) {
        float d = fp16_to_float(row[b].d);
        const float *xb = x + b * Q8_BLOCK;
        #pragma omp simd
        for (int j = 0; j < Q8_BLOCK; j++) sum[j] += d * (row[b].q[j] * xb[j]);
    }
    for (int j = 0; j < Q8_BLOCK; j++) val += sum[j];
    return val;
#endif
}

// row i of W (., n) . x (n,): the dot product, in the weights' dtype
static float row_dot(Mat w, size_t i, const float *x, int n) {
    float val = 0.0f;
    if (w.dtype == DTYPE_Q8) {
        val = q8_row_dot((const BlockQ8 *)w.data + i * (n / Q8_BLOCK), x, n / Q8_BLOCK);
    } else if (w.dtype == DTYPE_BF16) {
        const uint16_t *row = (const uint16_t *)w.data + i * n;
        #pragma omp simd reduction(+:val)
        for (int j = 0; j < n; j++) val += bf16_to_float(row[j]) * x[j];
    } else {
        const float *row = (const float *)w.data + i * n;
        #pragma omp simd reduction(+:val)
        for (int j = 0; j < n; j++) val += row[j] * x[j];
    }
    return val;
}

// y (n,) += a * row i of W (., n)
static void row_axpy(float *y, float a, Mat w, size_t i, int n) {
    if (w.dtype == DTYPE_Q8) {
        const BlockQ8 *row = (const BlockQ8 *)w.data + i * (n / Q8_BLOCK);
        for (int b = 0; b < n / Q8_BLOCK; b++) {
            float ad = a * fp16_to_float(row[b].d);
            #pragma omp simd
            for (int j = 0; j < Q8_BLOCK; j++) y[b * Q8_BLOCK + j] += ad * row[b].q[j];
        }
    } else if (w.dtype == DTYPE_BF16) {
        const uint16_t *row = (const uint16_t *)w.data + i * n;
        #pragma omp simd
        for (int j = 0; j < n; j++) y[j] += a * bf16_to_float(row[j]);
    } else {
        const float *row = (const float *)w.data + i * n;
        #pragma omp simd
        for (int j = 0; j < n; j++) y[j] += a * row[j];
    }
}

// row i of W (., n) in float32: wrow (n,)
static void row_to_float(float *wrow, Mat w, size_t i, int n) {
    if (w.dtype == DTYPE_Q8) {
        const BlockQ8 *row = (const BlockQ8 *)w.data + i * (n / Q8_BLOCK);
        for (int b = 0; b < n / Q8_BLOCK; b++) {
            float d = fp16_to_float(row[b].d);
            for (int j = 0; j < Q8_BLOCK; j++) wrow[b * Q8_BLOCK + j] = d * row[b].q[j];
        }
    } else {
        for (int j = 0; j < n; j++) wrow[j] = mat_at(w, i * (size_t)n + j);
    }
}

// W (d,n) @ x (T,n) -> xout (T,d), each of T inputs by every row of W; OpenMP over the rows,
// when there is enough work to pay for waking the threads (small matrices run faster on one core).
// T = 1 is generation's matrix-vector product, row by row: each weight is read once anyway.
// For T > 1 (a chunk of the prompt) the product is blocked: 4 rows of W, widened to float32 once
// into wrows (4, n), meet 4 inputs at a time, 16 sums in registers, so each value loaded serves 4
// products and each weight is read from memory once per chunk. Remainder rows and inputs go one
// by one.
static void matmul(float *xout, const float *x, Mat w, int n, int d, int T) {
    if (T == 1) {
        #pragma omp parallel for schedule(static) if ((long)n * d >= (1L << 17))
        for (int i = 0; i < d; i++) xout[i] = row_dot(w, i, x, n);
        return;
    }
    #pragma omp parallel if ((long)n * d * T >= (1L << 17))
    {
        float *wrows = (float *)xcalloc((size_t)4 * n, sizeof(float));
        #pragma omp for schedule(static)
        for (int i0 = 0; i0 < d; i0 += 4) {
            int rows = d - i0 < 4 ? d - i0 : 4, t = 0;
            for (int r = 0; r < rows; r++) row_to_float(wrows + (size_t)r * n, w, i0 + r, n);
            const float *w0 = wrows, *w1 = w0 + n, *w2 = w1 + n, *w3 = w2 + n;
            for (; rows == 4 && t + 4 <= T; t += 4) {  // the 4 x 4 block
                const float *x0 = x + (size_t)t * n, *x1 = x0 + n, *x2 = x1 + n, *x3 = x2 + n;
                float s00 = 0, s01 = 0, s02 = 0, s03 = 0, s10 = 0, s11 = 0, s12 = 0, s13 = 0;
                float s20 = 0, s21 = 0, s22 = 0, s23 = 0, s30 = 0, s31 = 0, s32 = 0, s33 = 0;
                #pragma omp simd reduction(+:s00, s01, s02, s03, s10, s11, s12, s13, s20, s21, s22, s23, s30, s31, s32, s33)
                for (int j = 0; j < n; j++) {
                    s00 += w0[j] * x0[j]; s01 += w0[j] * x1[j]; s02 += w0[j] * x2[j]; s03 += w0[j] * x3[j];
                    s10 += w1[j] * x0[j]; s11 += w1[j] * x1[j]; s12 += w1[j] * x2[j]; s13 += w1[j] * x3[j];
                    s20 += w2[j] * x0[j]; s21 += w2[j] * x1[j]; s22 += w2[j] * x2[j]; s23 += w2[j] * x3[j];
                    s30 += w3[j] * x0[j]; s31 += w3[j] * x1[j]; s32 += w3[j] * x2[j]; s33 += w3[j] * x3[j];
                }
                float *o = xout + (size_t)t * d + i0;  // xout[t + k][i0 + r] = s_rk
                o[0] = s00; o[1] = s10; o[2] = s20; o[3] = s30; o += d;
                o[0] = s01; o[1] = s11; o[2] = s21; o[3] = s31; o += d;
                o[0] = s02; o[1] = s12; o[2] = s22; o[3] = s32; o += d;
                o[0] = s03; o[1] = s13; o[2] = s23; o[3] = s33;
            }
            for (; t < T; t++)  // the inputs left over, by each of the rows
                for (int r = 0; r < rows; r++) {
                    const float *wr = wrows + (size_t)r * n, *xt = x + (size_t)t * n;
                    float val = 0.0f;
                    #pragma omp simd reduction(+:val)
                    for (int j = 0; j < n; j++) val += wr[j] * xt[j];
                    xout[(size_t)t * d + i0 + r] = val;
                }
        }
        free(wrows);
    }
}

// rows [r0, r0+d) of W (., n) @ x (n,) -> xout (d,); single-threaded, for per-head work
static void matmul_rows(float *xout, const float *x, Mat w, size_t r0, int n, int d) {
    for (int i = 0; i < d; i++) xout[i] = row_dot(w, r0 + i, x, n);
}

// rows [r0, r0+d) of W (., n), transposed: W^T (n, d) @ x (d,) -> xout (n,); single-threaded
static void matmul_rows_t(float *xout, const float *x, Mat w, size_t r0, int n, int d) {
    for (int j = 0; j < n; j++) xout[j] = 0.0f;
    for (int i = 0; i < d; i++) row_axpy(xout, x[i], w, r0 + i, n);
}

static float silu(float x) { return x / (1.0f + expf(-x)); }

// index of the largest of x (n,), the lowest index on ties
static int argmax(const float *x, int n) {
    int best = 0;
    for (int i = 1; i < n; i++) if (x[i] > x[best]) best = i;
    return best;
}

// ---------------- Decoupled RoPE with YaRN (sec. 2.1.3; used by eqs. 14-15)

// YaRN's magnitude correction: 0.1 m ln(s) + 1 for s > 1
static double yarn_get_mscale(double scale, double m) { return scale <= 1 ? 1.0 : 0.1 * m * log(scale) + 1.0; }

// the dimension whose wavelength makes num_rotations turns over the original context
static double yarn_correction_dim(double num_rotations, int dim, double base, int max_pos) {
    return (dim * log(max_pos / (num_rotations * 2 * M_PI))) / (2 * log(base));
}

// inv_freq (d_h^R / 2): inv_freq[i] = theta^(-2i/d_h^R); with YaRN, the low frequencies are
// interpolated (divided by the factor) and the high ones kept, with a linear ramp between the
// correction dimensions of beta_fast and beta_slow. Float32 steps as transformers takes them.
// Also the two scalars YaRN changes: rope_mscale (on cos/sin) and softmax_scale (eq. 18's).
static void rope_init(RunState *s, const Config *c) {
    int half = c->qk_rope_head_dim / 2, dim = c->qk_rope_head_dim;
    s->rope_mscale = 1.0f;
    s->softmax_scale = 1.0f / sqrtf((float)(c->qk_nope_head_dim + c->qk_rope_head_dim));
    for (int i = 0; i < half; i++) {
        float pos_freq = powf(c->rope_theta, (float)(2 * i) / (float)dim);
        s->inv_freq[i] = 1.0f / pos_freq;
    }
    if (!c->rope_yarn) return;
    double low = floor(yarn_correction_dim(c->beta_fast, dim, c->rope_theta, c->original_max_position_embeddings));
    double high = ceil(yarn_correction_dim(c->beta_slow, dim, c->rope_theta, c->original_max_position_embeddings));
    if (low < 0) low = 0;
    if (high > dim - 1) high = dim - 1;
    if (low == high) high += 0.001;
    for (int i = 0; i < half; i++) {
        float pos_freq = powf(c->rope_theta, (float)(2 * i) / (float)dim);
        float extrapolated = 1.0f / pos_freq, interpolated = 1.0f / (c->rope_factor * pos_freq);
        float ramp = (float)((i - low) / (high - low));
        ramp = ramp < 0 ? 0 : ramp > 1 ? 1 : ramp;
        float keep = 1.0f - ramp;  // 1: extrapolate (high frequency), 0: interpolate
        s->inv_freq[i] = interpolated * (1.0f - keep) + extrapolated * keep;
    }
    if (c->attention_factor > 0) s->rope_mscale = c->attention_factor;
    else if (c->mscale != 0 && c->mscale_all_dim != 0)
        s->rope_mscale = (float)(yarn_get_mscale(c->rope_factor, c->mscale) / yarn_get_mscale(c->rope_factor, c->mscale_all_dim));
    else s->rope_mscale = (float)yarn_get_mscale(c->rope_factor, 1.0);
    if (c->mscale_all_dim != 0) {
        // not in the paper: YaRN's attention temperature, get_mscale(factor, mscale_all_dim)^2 (1.59 for
        // V2) on every q.k, not only the RoPE halves: it keeps attention as sharp over the extended context
        float m = (float)yarn_get_mscale(c->rope_factor, c->mscale_all_dim);
        s->softmax_scale = (float)((1.0 / sqrt((double)(c->qk_nope_head_dim + c->qk_rope_head_dim))) * m * m);
    }
}

// rope_cos, rope_sin (T, d_h^R / 2): cos and sin of positions pos..pos+T-1's angles
// (pos + t) * inv_freq[i], in float32, times YaRN's mscale
static void rope_position(RunState *s, const Config *c, int pos, int T) {
    int half = c->qk_rope_head_dim / 2;
    for (int t = 0; t < T; t++)
        for (int i = 0; i < half; i++) {
            float angle = (float)(pos + t) * s->inv_freq[i];
            s->rope_cos[t * half + i] = (float)cos(angle) * s->rope_mscale;
            s->rope_sin[t * half + i] = (float)sin(angle) * s->rope_mscale;
        }
}

// v (rope_dim,) rotated in place by row t of rope_cos, rope_sin: the INTERLEAVED pairs (2i, 2i+1)
// turn together, as the checkpoints expect
static void rope_apply(float *v, const RunState *s, int t, int rope_dim) {
    const float *cos_t = s->rope_cos + t * (rope_dim / 2), *sin_t = s->rope_sin + t * (rope_dim / 2);
    for (int i = 0; i < rope_dim / 2; i++) {
        float a = v[2 * i], b = v[2 * i + 1];
        v[2 * i] = a * cos_t[i] - b * sin_t[i];
        v[2 * i + 1] = a * sin_t[i] + b * cos_t[i];
    }
}

// ----------------------------------------------------------------------------
// ---------------- Multi-head Latent Attention (sec. 2.1, eqs. 9-19)
//
// A token's keys and values are compressed into one latent c_t^KV (eq. 9) which, with one RoPE key
// k_t^R shared by all heads (eq. 15), is all the cache keeps: a row of d_c + d_h^R floats per token
// and layer. mla_attention, at the end of this section, runs three steps:
//   mla_project          the cache row and every head's query (eqs. 9, 12-15)
//   mla_attend_naive     keys and values rebuilt from the cached latents (eqs. 10-11), then
//                        multi-head attention over them (eqs. 16-18), or
//   mla_attend_absorbed  the same numbers computed on the latents themselves (Appendix C)
// and the output projection (eq. 19). The pieces of eqs. 9-11 come first, so that the equations
// read in the paper's order. Not in the paper, for comparisons: --kv bf16 rounds each cached value
// to bf16, and --kv-layout mha caches what multi-head attention would (every head's key and value,
// built by kv_store when the row is written; mla_attend_mha reads them).

// The joint KV compression (eq. 9): h (T, dim) -> the T tokens' cache rows [c_t^KV (d_c) ; W^KR h_t
// (d_h^R)], consecutive in the cache; one product since kv_a_proj_with_mqa is [W^DKV ; W^KR];
// mla_project ropes the tails.
static void kv_compress(float *rows, const float *h, const Layer *L, const Config *c, int T) {
    int width = kv_cache_width(c);
    matmul(rows, h, L->kv_a_proj_with_mqa, c->dim, width, T);  // eq. (9) c_t^KV = W^DKV h_t (+ W^KR h_t)
    // not in the paper: kv_a_layernorm, RMSNorm of the latent (sec. 3.1.2 adds it "to ensure stable training")
    for (int t = 0; t < T; t++)
        rmsnorm(rows + (size_t)t * width, rows + (size_t)t * width, L->kv_a_layernorm, c->kv_lora_rank, c->rms_norm_eps);
}

// kv_b_proj holds, for each head i, W^UK_i (d_h rows) then W^UV_i (d_v rows), each row (d_c,)
static size_t w_uk_row(const Config *c, int i) { return (size_t)i * (c->qk_nope_head_dim + c->v_head_dim); }
static size_t w_uv_row(const Config *c, int i) { return w_uk_row(c, i) + c->qk_nope_head_dim; }

// Head i's key from a latent (eq. 10): c_kv (d_c,) -> k_c (d_h,)
static void key_up(float *k_c, const float *c_kv, const Layer *L, const Config *c, int i) {
    int d_c = c->kv_lora_rank, d_h = c->qk_nope_head_dim;
    matmul_rows(k_c, c_kv, L->kv_b_proj, w_uk_row(c, i), d_c, d_h);      // eq. (10) k_j,i^C = W^UK_i c_j^KV
}

// Head i's value from a latent (eq. 11): c_kv (d_c,) -> v_c (d_v,). Linear, so the absorbed form
// applies it once to the attention-weighted sum of latents.
static void value_up(float *v_c, const float *c_kv, const Layer *L, const Config *c, int i) {
    int d_c = c->kv_lora_rank, d_v = c->v_head_dim;
    matmul_rows(v_c, c_kv, L->kv_b_proj, w_uv_row(c, i), d_c, d_v);      // eq. (11) v_j,i^C = W^UV_i c_j^KV
}

// not in the paper: the cache formats for comparisons (KvFormat), applied to the T new rows of layer l
// once they are complete. --kv-layout mha stores, instead of the latent row (in kv_latent), each
// head's key k_t,i = [k_t,i^C ; k_t^R] and value v_t,i^C, expanded from it as eqs. 10, 11 and 17 say:
// the cache of a model without MLA (kv_row_width). --kv bf16 then rounds every value of the row.
static void kv_store(const Model *m, RunState *s, int l, int pos, int T) {
    const Config *c = &m->config;
    const Layer *L = &m->layers[l];
    int d_h = c->qk_nope_head_dim, d_hR = c->qk_rope_head_dim, d_v = c->v_head_dim, d_c = c->kv_lora_rank, H = c->n_heads;
    long width = kv_row_width(c, s->kv.mha);
    #pragma omp parallel for schedule(static) if (s->kv.mha && (long)T * H * (d_h + d_v) * d_c >= (1L << 17))
    for (int t = 0; t < T; t++) {
        float *row = cache_row(s, c, l, pos + t);
        if (s->kv.mha) {
            const float *c_kv = s->kv_latent + (size_t)t * kv_cache_width(c), *k_r = c_kv + d_c;
            for (int i = 0; i < H; i++) {
                float *k = row + (size_t)i * (d_h + d_hR), *v = row + (size_t)H * (d_h + d_hR) + (size_t)i * d_v;
                key_up(k, c_kv, L, c, i);                              // k_t,i^C = W^UK_i c_t^KV
                memcpy(k + d_h, k_r, d_hR * sizeof(float));            // k_t,i = [k_t,i^C ; k_t^R]
                value_up(v, c_kv, L, c, i);                            // v_t,i^C = W^UV_i c_t^KV
            }
        }
        if (s->kv.bf16) for (long e = 0; e < width; e++) row[e] = bf16_round(row[e]);
    }
}

// The projections and the cache writes (eqs. 9, 12-15): h (T, dim) -> the cache rows of (l, pos..pos+T-1)
// and q (T, n_h, d_h + d_h^R), each head's [q_t,i^C ; q_t,i^R] (q_b_proj's rows per head: no-RoPE, then RoPE).
static void mla_project(const Model *m, RunState *s, int l, int pos, int T) {
    const Config *c = &m->config;
    const Layer *L = &m->layers[l];
    int d_h = c->qk_nope_head_dim, d_hR = c->qk_rope_head_dim, n_q = c->n_heads * (d_h + d_hR), d_cq = c->q_lora_rank;
    float *rows = s->kv.mha ? s->kv_latent : cache_row(s, c, l, pos);  // the mha layout expands them (kv_store)
    kv_compress(rows, s->h, L, c, T);                                            // c_t^KV and W^KR h_t
    if (d_cq) {
        matmul(s->c_q, s->h, L->q_a_proj, c->dim, d_cq, T);                      // eq. (12) c_t^Q = W^DQ h_t
        // not in the paper: q_a_layernorm, the same RMSNorm on the query latent (sec. 3.1.2)
        for (int t = 0; t < T; t++) rmsnorm(s->c_q + t * d_cq, s->c_q + t * d_cq, L->q_a_layernorm, d_cq, c->rms_norm_eps);
        matmul(s->q, s->c_q, L->q_b_proj, d_cq, n_q, T);                         // eq. (13) q_t^C = W^UQ c_t^Q, and W^QR c_t^Q
    } else {  // no query compression (V2-Lite): its q_proj maps h_t straight to every head
        matmul(s->q, s->h, L->q_b_proj, c->dim, n_q, T);                         // eq. (13) with c_t^Q = h_t
    }
    for (int t = 0; t < T; t++) {
        for (int i = 0; i < c->n_heads; i++)
            rope_apply(s->q + (size_t)t * n_q + i * (d_h + d_hR) + d_h, s, t, d_hR);  // eq. (14) q_t,i^R = RoPE(W^QR c_t^Q)
        rope_apply(rows + (size_t)t * kv_cache_width(c) + c->kv_lora_rank, s, t, d_hR);  // eq. (15) k_t^R = RoPE(W^KR h_t)
    }
    if (s->kv.mha || s->kv.bf16) kv_store(m, s, l, pos, T);
}

// The naive form (eqs. 10-11, 16-18): every head rebuilds each cached token's key and value from
// its latent, then attends as multi-head attention does. Causal: token t of the chunk (position
// pos + t) reads the cache rows 0..pos+t (d_c + d_h^R), all written by mla_project already.
// q (T, n_h, d_h + d_h^R) -> o (T, n_h, d_v); att (n_h, seq_len) keeps the last token's p.
static void mla_attend_naive(const Model *m, RunState *s, int l, int pos, int T) {
    const Config *c = &m->config;
    const Layer *L = &m->layers[l];
    int d_h = c->qk_nope_head_dim, d_hR = c->qk_rope_head_dim, d_v = c->v_head_dim, d_c = c->kv_lora_rank;
    int width = kv_cache_width(c);
    const float *cache = cache_row(s, c, l, 0);
    #pragma omp parallel for schedule(static) if ((long)c->n_heads * T * (pos + T) * d_c >= (1L << 17))
    for (int i = 0; i < c->n_heads; i++) for (int t = 0; t < T; t++) {
        int last = pos + t;  // the causal mask: token t sees positions 0..pos+t
        const float *q_c = s->q + ((size_t)t * c->n_heads + i) * (d_h + d_hR), *q_r = q_c + d_h;
        float *k_c = s->kv_rebuilt + (size_t)i * (d_h + d_v), *v_c = k_c + d_h;
        float *p = s->att + (size_t)i * s->seq_len, *o = s->o + ((size_t)t * c->n_heads + i) * d_v;
        for (int j = 0; j <= last; j++) {
            const float *c_kv = cache + (size_t)j * width, *k_r = c_kv + d_c;
            key_up(k_c, c_kv, L, c, i);                                          // k_j,i^C
            float score = 0.0f;  // q_t,i^T k_j,i, the concatenations dotted half by half:
            for (int e = 0; e < d_h; e++) score += q_c[e] * k_c[e];              // eq. (16) q_t,i = [q_t,i^C ; q_t,i^R]
            for (int e = 0; e < d_hR; e++) score += q_r[e] * k_r[e];             // eq. (17) k_j,i = [k_j,i^C ; k_j^R]
            p[j] = score * s->softmax_scale;                                     // eq. (18) q^T k / sqrt(d_h + d_h^R)
        }
        softmax(p, last + 1);                                                    // eq. (18) softmax_j
        memset(o, 0, d_v * sizeof(float));
        for (int j = 0; j <= last; j++) {
            value_up(v_c, cache + (size_t)j * width, L, c, i);                   // v_j,i^C
            for (int e = 0; e < d_v; e++) o[e] += p[j] * v_c[e];                 // eq. (18) o_t,i = sum_j p_t,i,j v_j,i^C
        }
    }
}

// The absorbed form (Appendix C): q_t,i^C . (W^UK_i c_j) = (W^UK_i^T q_t,i^C) . c_j and
// sum_j p_j (W^UV_i c_j) = W^UV_i (sum_j p_j c_j), so each head scores and sums the cached
// latents themselves and no key or value is ever built; the same numbers as mla_attend_naive.
// Causal as there: q (T, n_h, d_h + d_h^R) and the cache rows 0..pos+t -> o (T, n_h, d_v).
static void mla_attend_absorbed(const Model *m, RunState *s, int l, int pos, int T) {
    const Config *c = &m->config;
    const Layer *L = &m->layers[l];
    int d_h = c->qk_nope_head_dim, d_hR = c->qk_rope_head_dim, d_v = c->v_head_dim, d_c = c->kv_lora_rank;
    int width = kv_cache_width(c);
    const float *cache = cache_row(s, c, l, 0);
    #pragma omp parallel for schedule(static) if ((long)c->n_heads * T * (pos + T) * d_c >= (1L << 17))
    for (int i = 0; i < c->n_heads; i++) for (int t = 0; t < T; t++) {
        int last = pos + t;  // the causal mask: token t sees positions 0..pos+t
        const float *q_c = s->q + ((size_t)t * c->n_heads + i) * (d_h + d_hR), *q_r = q_c + d_h;
        float *q_lat = s->q_latent + (size_t)i * d_c, *o_lat = s->o_latent + (size_t)i * d_c;
        float *p = s->att + (size_t)i * s->seq_len, *o = s->o + ((size_t)t * c->n_heads + i) * d_v;
        matmul_rows_t(q_lat, q_c, L->kv_b_proj, w_uk_row(c, i), d_c, d_h);    // W^UK_i^T q_t,i^C: W^UK_i absorbed
        for (int j = 0; j <= last; j++) {
            const float *c_kv = cache + (size_t)j * width, *k_r = c_kv + d_c;
            float score = 0.0f;
            for (int e = 0; e < d_c; e++) score += q_lat[e] * c_kv[e];           // = q_t,i^C . k_j,i^C
            for (int e = 0; e < d_hR; e++) score += q_r[e] * k_r[e];             //  + q_t,i^R . k_j^R
            p[j] = score * s->softmax_scale;
        }
        softmax(p, last + 1);
        memset(o_lat, 0, d_c * sizeof(float));
        for (int j = 0; j <= last; j++) {
            const float *c_kv = cache + (size_t)j * width;
            for (int e = 0; e < d_c; e++) o_lat[e] += p[j] * c_kv[e];            // sum_j p_t,i,j c_j^KV
        }
        value_up(o, o_lat, L, c, i);                                             // W^UV_i once, after the sum: o_t,i
    }
}

// The attention of the mha layout (--kv-layout mha): mla_attend_naive's computation, but each cached
// token's key k_j,i = [k_j,i^C ; k_j^R] and value v_j,i^C are read from the cache, where kv_store put
// them, instead of being rebuilt from its latent: what multi-head attention with a KV cache does. The
// query is not absorbed. Causal as there: q (T, n_h, d_h + d_h^R) and the cache rows 0..pos+t -> o (T, n_h, d_v).
static void mla_attend_mha(const Model *m, RunState *s, int l, int pos, int T) {
    const Config *c = &m->config;
    int d_h = c->qk_nope_head_dim, d_hR = c->qk_rope_head_dim, d_v = c->v_head_dim, H = c->n_heads, d_k = d_h + d_hR;
    long width = kv_row_width(c, 1);
    const float *cache = cache_row(s, c, l, 0);
    #pragma omp parallel for schedule(static) if ((long)H * T * (pos + T) * (d_k + d_v) >= (1L << 17))
    for (int i = 0; i < H; i++) for (int t = 0; t < T; t++) {
        int last = pos + t;  // the causal mask: token t sees positions 0..pos+t
        const float *q_c = s->q + ((size_t)t * H + i) * d_k, *q_r = q_c + d_h;
        float *p = s->att + (size_t)i * s->seq_len, *o = s->o + ((size_t)t * H + i) * d_v;
        for (int j = 0; j <= last; j++) {
            const float *k_c = cache + (size_t)j * width + (size_t)i * d_k, *k_r = k_c + d_h;  // cached k_j,i
            float score = 0.0f;
            for (int e = 0; e < d_h; e++) score += q_c[e] * k_c[e];              // q_t,i^C . k_j,i^C
            for (int e = 0; e < d_hR; e++) score += q_r[e] * k_r[e];             //  + q_t,i^R . k_j^R
            p[j] = score * s->softmax_scale;
        }
        softmax(p, last + 1);
        memset(o, 0, d_v * sizeof(float));
        for (int j = 0; j <= last; j++) {
            const float *v_c = cache + (size_t)j * width + (size_t)H * d_k + (size_t)i * d_v;  // cached v_j,i^C
            for (int e = 0; e < d_v; e++) o[e] += p[j] * v_c[e];                 // o_t,i = sum_j p_t,i,j v_j,i^C
        }
    }
}

// Multi-head Latent Attention of the T tokens at pos..pos+T-1 in layer l: h (T, dim) -> attn_out
// (T, dim), and their rows of the latent cache written first, so that each token attends to the
// ones before it in the chunk. form: which way to attend; both give the same logits. The mha layout
// has its keys and values cached, so it reads them (mla_attend_mha), whatever the form.
static void mla_attention(const Model *m, RunState *s, int l, int pos, int T, AttnForm form) {
    const Config *c = &m->config;
    mla_project(m, s, l, pos, T);
    if (s->kv.mha) mla_attend_mha(m, s, l, pos, T);
    else if (form == ATTN_NAIVE) mla_attend_naive(m, s, l, pos, T);
    else mla_attend_absorbed(m, s, l, pos, T);
    int n_o = c->n_heads * c->v_head_dim;
    matmul(s->attn_out, s->o, m->layers[l].o_proj, n_o, c->dim, T);          // eq. (19) u_t = W^O [o_t,1; ...; o_t,n_h]
    if (s->trace) trace_mla(m, s, l, pos);
}

// ----------------------------------------------------------------------------
// ---------------- The FFNs: dense SwiGLU and DeepSeekMoE (sec. 2.2, eqs. 20-22)
//
// The MoE code runs bottom-up, the reverse of the paper's order: the affinities s_i,t (eq. 22)
// choose the gates g_i,t (eq. 21) that weight the routed experts in the output h'_t (eq. 20).

// SwiGLU FFN of width `width`: x (T, dim) -> out = down(silu(gate x) * up x) (T, dim); hb, hb2 (T, width)
static void ffn(float *out, const float *x, const FFN *f, int dim, int width, int T, float *hb, float *hb2) {
    matmul(hb, x, f->gate_proj, dim, width, T);
    matmul(hb2, x, f->up_proj, dim, width, T);
    for (size_t i = 0; i < (size_t)T * width; i++) hb[i] = silu(hb[i]) * hb2[i];
    matmul(out, hb, f->down_proj, width, dim, T);
}

// The FFN of a dense layer (l < first_k_dense_replace): u (T, dim) -> ffn_out (T, dim), width intermediate_size
static void dense_ffn(const Model *m, RunState *s, int l, int T) {
    const Config *c = &m->config;
    ffn(s->ffn_out, s->u, &m->layers[l].dense, c->dim, c->intermediate_size, T, s->hb, s->hb2);
    if (s->trace) trace_dense(c, s, l);
}

// Device-limited routing (sec. 2.2.2): the routed experts form n_group equal groups ("devices")
// in index order; a group's score is its best affinity (V2; V3 sums its best two). scores
// (n_routed_experts,) -> kept (n_group,): 1 for the topk_group best groups (lowest index on ties).
static void route_groups(const Config *c, const float *scores, int *kept) {
    int per_group = c->n_routed_experts / c->n_group;
    float group_score[4096];  // check_config: n_group <= n_routed_experts <= 4096
    for (int g = 0; g < c->n_group; g++) {
        kept[g] = 0;
        group_score[g] = scores[g * per_group];
        for (int i = g * per_group + 1; i < (g + 1) * per_group; i++) group_score[g] = fmaxf(group_score[g], scores[i]);
    }
    for (int k = 0; k < c->topk_group; k++) {
        int best = argmax(group_score, c->n_group);
        kept[best] = 1;
        group_score[best] = -INFINITY;
    }
}

// The router (eqs. 21-22): scores (n_routed_experts,) holds u_t^T e_i on entry and s_i,t on
// return; topk_idx, topk_w (n_experts_per_tok,) get the chosen experts, best first (lowest index on
// ties), and their g_i,t. An expert that may not be chosen is masked with -inf.
static void moe_route(const Config *c, float *scores, int *topk_idx, float *topk_w) {
    int E = c->n_routed_experts, K = c->n_experts_per_tok;
    softmax(scores, E);                                                      // eq. (22) s_i,t = softmax_i(u_t^T e_i)
    float candidate[4096];  // s_i,t, or -inf (check_config: E <= 4096)
    memcpy(candidate, scores, E * sizeof(float));
    if (c->topk_method == 1) {  // group_limited_greedy: only the experts of the kept groups
        int kept[4096];
        route_groups(c, scores, kept);
        for (int i = 0; i < E; i++) if (!kept[i / (E / c->n_group)]) candidate[i] = -INFINITY;
    }
    float sum = 0.0f;
    unsigned char taken[4096];  // chosen already: never twice, whatever the scores (NaN from corrupt weights too)
    memset(taken, 0, E);
    for (int k = 0; k < K; k++) {
        int best = -1;
        for (int i = 0; i < E; i++) if (!taken[i] && (best < 0 || candidate[i] > candidate[best])) best = i;
        taken[best] = 1;
        topk_idx[k] = best;
        topk_w[k] = scores[best];                                            // eq. (21) g_i,t = s_i,t for the top K_r
        sum += scores[best];
    }
    for (int k = 0; k < K; k++) {
        // not in the paper: norm_topk_prob (set by no released V2 config) makes the hub code renormalise
        if (c->norm_topk_prob && K > 1) topk_w[k] /= sum + 1e-20f;
        // not in the paper: routed_scaling_factor (V2 16, V2-Lite 1), likely sec. 3.1.2's stabilising "scaling factors"
        else topk_w[k] *= c->routed_scaling_factor;
    }
}

// The DeepSeekMoE FFN (eq. 20; forward adds its "u_t +"): u (T, dim) -> ffn_out (T, dim), by way of
// scores (T, n_routed_experts), topk_idx and topk_w (T, n_experts_per_tok), expert_out (T, K_r, dim).
// The tokens are grouped by expert: each routed expert runs once over the tokens that chose it,
// so a chunk reads each chosen expert's weights once.
static void moe_ffn(const Model *m, RunState *s, int l, int T) {
    const Config *c = &m->config;
    const Layer *L = &m->layers[l];
    int dim = c->dim, E = c->n_routed_experts, K = c->n_experts_per_tok;
    matmul(s->scores, s->u, L->gate, dim, E, T);                             // u_t^T e_i for every routed expert
    for (int t = 0; t < T; t++)
        moe_route(c, s->scores + (size_t)t * E, s->topk_idx + t * K, s->topk_w + t * K);  // s_i,t and g_i,t
    int I = c->moe_intermediate_size, N_s = c->n_shared_experts;
    // not in the paper: the N_s shared experts are ONE SwiGLU of width N_s x I (their gate and up rows and
    // their down columns stacked): the same sum, as each hidden unit is independent of the others
    if (N_s) ffn(s->ffn_out, s->u, &L->shared, dim, I * N_s, T, s->hb, s->hb2);  // eq. (20) sum_i FFN_i^(s)(u_t)
    else memset(s->ffn_out, 0, (size_t)T * dim * sizeof(float));
    for (int e = 0; e < E; e++) {  // FFN_e^(r) of the tokens that chose e: gather, run, scatter to their slot k
        int n = 0;  // a token chooses an expert at most once, so at most T of them
        for (int tk = 0; tk < T * K; tk++)
            if (s->topk_idx[tk] == e) {
                memcpy(s->expert_in + (size_t)n * dim, s->u + (size_t)(tk / K) * dim, dim * sizeof(float));
                s->expert_slot[n++] = tk;
            }
        if (n == 0) continue;
        ffn(s->expert_y, s->expert_in, &L->experts[e], dim, I, n, s->hb, s->hb2);
        for (int r = 0; r < n; r++) memcpy(s->expert_out + (size_t)s->expert_slot[r] * dim, s->expert_y + (size_t)r * dim, dim * sizeof(float));
    }
    for (int t = 0; t < T; t++)
        for (int k = 0; k < K; k++) {  // in rank order, as the sum is written
            const float *y = s->expert_out + ((size_t)t * K + k) * dim;
            float g = s->topk_w[t * K + k], *out = s->ffn_out + (size_t)t * dim;
            for (int i = 0; i < dim; i++) out[i] += g * y[i];                // eq. (20) + sum_i g_i,t FFN_i^(r)(u_t)
        }
    if (s->trace) trace_moe(c, s, l);
}

// ----------------------------------------------------------------------------
// ---------------- The forward pass: T tokens at positions pos..pos+T-1 -> logits
//
// x (T, dim) is the residual stream. Each layer: x += MLA(RMSNorm(x)), x += FFN(RMSNorm(x)), the
// FFN dense or DeepSeekMoE; then a final RMSNorm and lm_head (not tied to the embedding). The
// paper's u_t + FFN(u_t) (eq. 20) adds to x here, of which u_t is the RMSNorm. Generation runs
// T = 1; a prompt runs in chunks of up to max_T tokens, which give the same logits as one token
// at a time (test_all checks it) but read every weight once per chunk.

// Which rows of a chunk go through lm_head: none (a prompt chunk that only fills the cache), the last
// token's (generation), or every token's (perplexity, the tests).
typedef enum { LOGITS_NONE, LOGITS_LAST, LOGITS_ALL } LogitRows;

// tokens (T,) at positions pos..pos+T-1 -> logits: (T, vocab_size) with LOGITS_ALL, the last
// token's (vocab_size,) with LOGITS_LAST, NULL with LOGITS_NONE; and the tokens' cache rows
// written in every layer. The trace
// (s->trace) follows one token: T must be 1 then.
static float *forward(const Model *m, RunState *s, const int *tokens, int T, int pos, AttnForm form, LogitRows rows) {
    const Config *c = &m->config;
    int dim = c->dim;
    if (T < 1 || T > s->max_T || pos + T > s->seq_len || (s->trace && T != 1))
        die("forward: %d tokens at position %d do not fit (chunk %d, context %d, trace: one token)", T, pos, s->max_T, s->seq_len);
    for (int t = 0; t < T; t++)
        for (int i = 0; i < dim; i++) s->x[(size_t)t * dim + i] = mat_at(m->embed_tokens, (size_t)tokens[t] * dim + i);
    rope_position(s, c, pos, T);
    if (s->trace) trace_begin(s->trace, tokens[0], pos);
    for (int l = 0; l < c->n_layers; l++) {
        const Layer *L = &m->layers[l];
        for (int t = 0; t < T; t++)
            rmsnorm(s->h + (size_t)t * dim, s->x + (size_t)t * dim, L->input_layernorm, dim, c->rms_norm_eps);  // h_t
        mla_attention(m, s, l, pos, T, form);
        for (size_t i = 0; i < (size_t)T * dim; i++) s->x[i] += s->attn_out[i];      // residual around attention
        for (int t = 0; t < T; t++)
            rmsnorm(s->u + (size_t)t * dim, s->x + (size_t)t * dim, L->post_attention_layernorm, dim, c->rms_norm_eps);  // u_t
        if (L->is_moe) moe_ffn(m, s, l, T);
        else dense_ffn(m, s, l, T);
        for (size_t i = 0; i < (size_t)T * dim; i++) s->x[i] += s->ffn_out[i];       // eq. (20)'s "u_t +": the residual
    }
    if (s->trace) trace_cache(c, s, pos);
    if (rows == LOGITS_NONE) return NULL;
    int first = rows == LOGITS_ALL ? 0 : T - 1;
    for (int t = first; t < T; t++) rmsnorm(s->x + (size_t)t * dim, s->x + (size_t)t * dim, m->norm, dim, c->rms_norm_eps);
    matmul(s->logits, s->x + (size_t)first * dim, m->lm_head, dim, c->vocab_size, T - first);
    return s->logits;
}

// one token at position pos -> its logits (vocab_size,): generation's step
static float *forward_token(const Model *m, RunState *s, int token, int pos, AttnForm form) {
    return forward(m, s, &token, 1, pos, form, LOGITS_LAST);
}

// The prompt's first n tokens at positions pos0..pos0+n-1, max_T at a time (one at a time when
// tracing, as the trace follows one token): the cache filled, no logits kept. Returns n.
static int prefill(const Model *m, RunState *s, const int *ids, int n, int pos0, AttnForm form) {
    int chunk = s->trace ? 1 : s->max_T;
    for (int done = 0; done < n; done += chunk)
        forward(m, s, ids + done, n - done < chunk ? n - done : chunk, pos0 + done, form, LOGITS_NONE);
    return n;
}

// ----------------------------------------------------------------------------
// ---------------- The teaching trace: each equation's tensor, after the block that computes it
//
// --trace and --routing-out (docs/WORKSHOP.md). Each block of the model ends with one hook (its
// prototype is next to RunState); a hook only reads. Consumers: 80-column text lines
// `L<layer> eq.(N) <paper name> [shape] first values ...` (layers from 0 as in the code; per-head
// tensors show head 1, i = 1 in the paper, index 0 here), a routing CSV, and the tests, which get
// every full vector through `record`.
struct Trace {
    FILE *out;              // --trace: one line per equation (NULL: no text)
    FILE *routing_csv;      // --routing-out: pos,token,text,layer,rank,expert,weight rows (NULL: none)
    const int *positions;   // --trace-pos: only these positions (n_positions 0: every position)
    int n_positions;
    void (*record)(void *ctx, int layer, const char *name, const float *v, int n);  // NULL: none
    void *record_ctx;
    int (*token_text)(void *ctx, int id, char *buf, int size);  // a token's text (tokenizer below)
    void *token_ctx;
    int active, pos, token; // set by forward(): is this position traced, and which it is
    long first_index;       // -m ppl: index in the text of the window's first token (CSV column pos)
};

static int tracing(const RunState *s) { return s->trace && s->trace->active; }

// copies token id's text into buf with newlines, tabs, quotes and control bytes escaped
static void trace_token_text(const Trace *t, int id, char *buf, int size) {
    char raw[64];
    int n = t->token_text ? t->token_text(t->token_ctx, id, raw, sizeof(raw)) : 0, k = 0;
    for (int i = 0; i < n && k < size - 5; i++) {
        unsigned char ch = (unsigned char)raw[i];
        if (ch == '\n') { buf[k++] = '\\'; buf[k++] = 'n'; }
        else if (ch == '\t') { buf[k++] = '\\'; buf[k++] = 't'; }
        else if (ch == '"' || ch == '\\') { buf[k++] = '\\'; buf[k++] = (char)ch; }
        else if (ch < 0x20 || ch == 0x7f) k += snprintf(buf + k, size - k, "\\x%02x", ch);
        else buf[k++] = (char)ch;
    }
    buf[k] = 0;
}

// forward() calls this first: is position pos traced? prints the token's header line
static void trace_begin(Trace *t, int token, int pos) {
    t->pos = pos;
    t->token = token;
    t->active = t->n_positions == 0;
    for (int i = 0; i < t->n_positions; i++) if (t->positions[i] == pos) t->active = 1;
    if (t->active && t->out) {
        char text[160];
        trace_token_text(t, token, text, sizeof(text));
        fflush(stdout);  // the prompt echoed so far, when the trace goes to the terminal too
        fprintf(t->out, "\n--- position %d, token %d \"%s\"\n", pos, token, text);
    }
}

// one line: `L3 eq.(9)  c_t^KV  [64]  0.12 -0.53 ...`; rows > 1 shows the shape as [rows x n/rows]
static void trace_vec(const RunState *s, int l, const char *eq, const char *name, const float *v, int n, int rows) {
    Trace *t = s->trace;
    if (t->record) t->record(t->record_ctx, l, name, v, n);
    if (!t->out) return;
    char line[128];
    int k = rows > 1 ? snprintf(line, sizeof(line), "L%d %-9s %-9s [%dx%d]", l, eq, name, rows, n / rows)
                     : snprintf(line, sizeof(line), "L%d %-9s %-9s [%d]", l, eq, name, n);
    while (k < 34) line[k++] = ' ';
    line[k] = 0;
    for (int i = 0; i < n; i++) {
        char val[32];
        int w = snprintf(val, sizeof(val), " %.3g", v[i]);
        if (k + w > (i + 1 < n ? 75 : 79)) { k += snprintf(line + k, sizeof(line) - k, " ..."); break; }
        memcpy(line + k, val, w + 1);
        k += w;
    }
    fprintf(t->out, "%s\n", line);
}

// a line of words: shapes of concatenations, routing decisions, the cache
static void trace_text(const RunState *s, int l, const char *eq, const char *fmt, ...) __attribute__((format(printf, 4, 5)));
static void trace_text(const RunState *s, int l, const char *eq, const char *fmt, ...) {
    if (!s->trace->out) return;
    va_list ap; va_start(ap, fmt);
    if (l >= 0) fprintf(s->trace->out, "L%d %-9s ", l, eq);
    vfprintf(s->trace->out, fmt, ap);
    fprintf(s->trace->out, "\n");
    va_end(ap);
}

// mla_attention's tensors in the paper's order. Head 1's key and value of this token (eqs. 10-11),
// which the absorbed form never builds, are computed here from the cached latent.
static void trace_mla(const Model *m, const RunState *s, int l, int pos) {
    if (!tracing(s)) return;
    const Config *c = &m->config;
    const Layer *L = &m->layers[l];
    int d_h = c->qk_nope_head_dim, d_hR = c->qk_rope_head_dim, d_v = c->v_head_dim, d_c = c->kv_lora_rank;
    const float *row = s->kv.mha ? s->kv_latent : cache_row(s, c, l, pos);  // the latent row (mha: before kv_store)
    float *k_c = (float *)xcalloc(d_h + d_v, sizeof(float)), *v_c = k_c + d_h;
    key_up(k_c, row, L, c, 0);
    value_up(v_c, row, L, c, 0);
    trace_vec(s, l, "eq.(9)", "c_t^KV", row, d_c, 1);
    trace_vec(s, l, "eq.(10)", "k_t,1^C", k_c, d_h, 1);
    trace_vec(s, l, "eq.(11)", "v_t,1^C", v_c, d_v, 1);
    if (c->q_lora_rank) trace_vec(s, l, "eq.(12)", "c_t^Q", s->c_q, c->q_lora_rank, 1);
    trace_vec(s, l, "eq.(13)", "q_t,1^C", s->q, d_h, 1);
    trace_vec(s, l, "eq.(14)", "q_t,1^R", s->q + d_h, d_hR, 1);
    trace_vec(s, l, "eq.(15)", "k_t^R", row + d_c, d_hR, 1);
    trace_text(s, l, "eq.(16)", "q_t,1 = [q_t,1^C; q_t,1^R]  [%d+%d]", d_h, d_hR);
    trace_text(s, l, "eq.(17)", "k_t,1 = [k_t,1^C; k_t^R]    [%d+%d]  (k_t^R shared by all heads)", d_h, d_hR);
    trace_vec(s, l, "eq.(18)", "p_t,1,j", s->att, pos + 1, 1);  // head 1's attention over j = 0..t
    trace_vec(s, l, "eq.(18)", "o_t,i", s->o, c->n_heads * d_v, c->n_heads);
    trace_vec(s, l, "eq.(19)", "u_t", s->attn_out, c->dim, 1);
    free(k_c);
}

// dense_ffn's output
static void trace_dense(const Config *c, const RunState *s, int l) {
    if (tracing(s)) trace_vec(s, l, "dense", "FFN(u_t)", s->ffn_out, c->dim, 1);
}

// moe_ffn's routing decision (affinities, groups kept, chosen experts: trace and CSV) and output
static void trace_moe(const Config *c, const RunState *s, int l) {
    if (!tracing(s)) return;
    Trace *t = s->trace;
    int K = c->n_experts_per_tok;
    trace_vec(s, l, "eq.(22)", "s_i,t", s->scores, c->n_routed_experts, 1);
    if (c->topk_method == 1 && t->out) {
        int kept[4096];
        char list[256];
        int n = 0;
        route_groups(c, s->scores, kept);
        for (int g = 0; g < c->n_group && n < 200; g++) if (kept[g]) n += snprintf(list + n, sizeof(list) - n, " %d", g);
        list[n] = 0;
        trace_text(s, l, "sec.2.2.2", "groups kept:%s (top %d of %d by best s_i,t; %d experts each)", list,
                   c->topk_group, c->n_group, c->n_routed_experts / c->n_group);
    }
    float idx[4096];
    for (int k = 0; k < K; k++) idx[k] = (float)s->topk_idx[k];
    if (t->record) {
        t->record(t->record_ctx, l, "experts", idx, K);
        t->record(t->record_ctx, l, "g_i,t", s->topk_w, K);
    }
    if (t->out) {
        char line[128];
        int n = snprintf(line, sizeof(line), "L%d %-9s g_i,t    ", l, "eq.(21)");
        if (K == 0) n += snprintf(line + n, sizeof(line) - n, " (no routed experts)");
        for (int k = 0; k < K && n < 70; k++) n += snprintf(line + n, sizeof(line) - n, " e%d:%.3f", s->topk_idx[k], s->topk_w[k]);
        if (n >= 70 && K > 0) snprintf(line + 70, sizeof(line) - 70, " ...");
        fprintf(t->out, "%s\n", line);
    }
    if (t->routing_csv) {
        char text[160];
        trace_token_text(t, t->token, text, sizeof(text));
        for (int k = 0; k < K; k++) {
            fprintf(t->routing_csv, "%ld,%d,\"", t->first_index + t->pos, t->token);
            for (const char *p = text; *p; p++) fprintf(t->routing_csv, *p == '"' ? "\"\"" : "%c", *p);
            fprintf(t->routing_csv, "\",%d,%d,%d,%.6g\n", l, k, s->topk_idx[k], s->topk_w[k]);
        }
    }
    trace_vec(s, l, "eq.(20)", "h'_t-u_t", s->ffn_out, c->dim, 1);  // the FFN part of h'_t
}

// forward()'s last line: what the latent cache holds so far
static void trace_cache(const Config *c, const RunState *s, int pos) {
    if (!tracing(s)) return;
    long floats = (long)c->n_layers * (pos + 1) * kv_row_width(c, s->kv.mha);
    if (!s->kv.mha && !s->kv.bf16)
        trace_text(s, -1, "", "cache so far: %d layers x %d tokens x (d_c+d_h^R = %d) = %ld floats, %ld bytes",
                   c->n_layers, pos + 1, kv_cache_width(c), floats, floats * 4);
    else
        trace_text(s, -1, "", "cache so far: %d layers x %d tokens x %ld values (%s layout, %s) = %ld values, %ld bytes as %s",
                   c->n_layers, pos + 1, kv_row_width(c, s->kv.mha), s->kv.mha ? "mha" : "latent",
                   s->kv.bf16 ? "bf16" : "float32", floats, floats * (s->kv.bf16 ? 2 : 4), s->kv.bf16 ? "bf16" : "float32");
}

// ----------------------------------------------------------------------------
// ---------------- The Byte Pair Encoding (BPE) Tokenizer
//
// What the rest of dsv2.c uses: tokenizer_load / tokenizer_free, tokenizer_encode (text -> ids,
// added tokens matched, BOS first when asked), tokenizer_put / tokenizer_flush (streamed decoding
// that holds back an incomplete UTF-8 character), tokenizer_chat_prompt (one chat turn in the
// model's template, without BOS) and tokenizer_cli (-m encode / decode). Bad input die()s.
//
// It reproduces Hugging Face `tokenizers` (Tokenizer.encode(text, add_special_tokens=False))
// for byte-level BPE tokenizers such as DeepSeek-V2's and V3's, in four steps:
//   1. added tokens: found in the raw text first (leftmost-longest), never split further
//   2. pre-tokenizer: a sequence of Split(regex, Isolated) steps cuts the rest into pieces
//   3. byte-level: each piece's UTF-8 bytes are the starting symbols (GPT-2 bytes_to_unicode)
//   4. BPE: adjacent symbols are merged, lowest merge rank first
// tokenizer.bin (written by export.py, layout documented there) holds everything resolved to
// ids: merges as (left, right, merged) id triples, the regexes compiled to character classes.

#define TOK_EXISTS  1   // token_flags bits
#define TOK_SPECIAL 2
#define TOK_ADDED   4
enum { ATOM_CLASS, ATOM_END, ATOM_NOT_AHEAD };  // kinds of regex atoms, see match_atoms
enum { CHAT_SYS_PREFIX, CHAT_SYS_SUFFIX, CHAT_USER_PREFIX, CHAT_USER_SUFFIX, CHAT_GEN_PROMPT, CHAT_PIECES };

typedef struct { uint64_t pair; int32_t rank, merged; } MergeSlot;  // pair = left << 32 | right
#define BPE_CACHE_SLOTS 16384   // a direct-mapped cache of short pieces' BPE results
typedef struct { uint8_t len, n_ids; char bytes[22]; int32_t ids[6]; } BpeCacheSlot;  // len 0 = empty

typedef struct {
    int vocab_size, bos_id, eos_id, add_bos;
    char unicode_version[17];       // of the character classes (export.py's table): "regexes/Digits", e.g. "16.0.0/17.0.0"
    // views into the memory-mapped tokenizer.bin
    void *map; size_t map_size;
    const int32_t *token_off;       // (vocab_size+1,) token bytes = token_blob[off[id]:off[id+1]]
    const uint8_t *token_flags;     // (vocab_size,) TOK_* bits
    const char *token_blob;
    int n_merges; const int32_t *merges;    // (n_merges, 3) left, right, merged; index = rank
    const int32_t *byte_ids;        // (256,) one-byte token per byte, -1 if none
    int n_added; const int32_t *added;      // (n_added, 2) id, normalized
    int n_classes; const int32_t *class_off; const uint32_t *ranges;  // code point ranges (lo, hi)
    int n_steps; const int32_t *step_off, *alt_off, *atoms;          // pre-tokenizer regexes
    int has_chat; const char *chat[CHAT_PIECES]; int chat_len[CHAT_PIECES];
    // built at load time
    MergeSlot *merge_table; uint64_t merge_mask;   // open addressing hash (left,right) -> rank
    uint64_t (*class_ascii)[2];     // (n_classes,) 128-bit membership of ASCII, a fast path
    int *added_order;               // added token indices sorted by (first byte, longest first)
    int added_first[257];           // added_order[added_first[b]:added_first[b+1]] start with byte b
    BpeCacheSlot *bpe_cache;        // (BPE_CACHE_SLOTS,) like tokenizers' BPE cache of words
} Tokenizer;

typedef struct { unsigned char pending[4]; int n_pending; } DecodeState;

// ---------------- UTF-8

// The character at s[0..n): returns its length (and sets *cp) when valid; 0 when s is a valid
// but incomplete prefix; -k when invalid, k >= 1 being the length of the longest valid prefix
// (one U+FFFD replaces those k bytes, as Rust's String::from_utf8_lossy does).
static int utf8_char(const unsigned char *s, size_t n, uint32_t *cp) {
    unsigned char c = s[0];
    if (c < 0x80) { *cp = c; return 1; }
    int len; unsigned char lo = 0x80, hi = 0xBF;  // allowed range of the second byte
    if (c >= 0xC2 && c <= 0xDF) len = 2;
    else if (c >= 0xE0 && c <= 0xEF) { len = 3; if (c == 0xE0) lo = 0xA0; if (c == 0xED) hi = 0x9F; }
    else if (c >= 0xF0 && c <= 0xF4) { len = 4; if (c == 0xF0) lo = 0x90; if (c == 0xF4) hi = 0x8F; }
    else return -1;
    uint32_t v = c & (0x7F >> len);
    for (int i = 1; i < len; i++) {
        if ((size_t)i >= n) return 0;
        if (s[i] < (i == 1 ? lo : 0x80) || s[i] > (i == 1 ? hi : 0xBF)) return -i;
        v = (v << 6) | (s[i] & 0x3F);
    }
    *cp = v;
    return len;
}

// byte offset of the first invalid UTF-8 sequence in text, or -1 if it is all valid
long utf8_invalid_offset(const char *text, size_t len) {
    const unsigned char *s = (const unsigned char *)text;
    uint32_t cp;
    for (size_t i = 0; i < len;) {
        int k = utf8_char(s + i, len - i, &cp);
        if (k <= 0) return (long)i;
        i += k;
    }
    return -1;
}

// ---------------- loading tokenizer.bin

typedef struct { const char *path; const uint8_t *p, *end; } Reader;

static const void *take(Reader *r, size_t count, size_t elem) {
    size_t n = (count * elem + 3) & ~(size_t)3;  // sections are padded to 4 bytes
    if (count > (1u << 28) || n > (size_t)(r->end - r->p)) die("tokenizer file %s is truncated or corrupt", r->path);
    const void *at = r->p;
    r->p += n;
    return at;
}
static int take_int(Reader *r) { return *(const int32_t *)take(r, 1, 4); }

static void check_ids(Reader *r, const int32_t *ids, long n, long stride, int vocab_size, int allow_none) {
    for (long i = 0; i < n; i += stride)
        if (ids[i] >= vocab_size || ids[i] < (allow_none ? -1 : 0))
            die("tokenizer file %s is corrupt (token id %d out of range)", r->path, ids[i]);
}

static void check_offsets(Reader *r, const int32_t *off, int n, int limit) {
    if (off[0] != 0 || off[n] != limit) die("tokenizer file %s is corrupt (bad offsets)", r->path);
    for (int i = 0; i < n; i++)
        if (off[i] > off[i + 1]) die("tokenizer file %s is corrupt (bad offsets)", r->path);
}

static uint64_t hash_pair(uint64_t pair) { pair *= 0x9E3779B97F4A7C15ull; return pair ^ (pair >> 29); }

// (left, right) -> merge rank, or -1: the MergeMap of tokenizers' BPE model
static int merge_rank(const Tokenizer *t, int left, int right) {
    uint64_t pair = (uint64_t)(uint32_t)left << 32 | (uint32_t)right;
    for (uint64_t i = hash_pair(pair) & t->merge_mask;; i = (i + 1) & t->merge_mask) {
        if (t->merge_table[i].rank < 0) return -1;
        if (t->merge_table[i].pair == pair) return t->merge_table[i].rank;
    }
}

static void build_merge_table(Tokenizer *t) {
    uint64_t size = 16;
    while (size < 2 * (uint64_t)t->n_merges) size *= 2;
    t->merge_table = (MergeSlot *)malloc(size * sizeof(MergeSlot));
    if (!t->merge_table) die("out of memory loading the tokenizer");
    for (uint64_t i = 0; i < size; i++) t->merge_table[i].rank = -1;
    t->merge_mask = size - 1;
    for (int r = 0; r < t->n_merges; r++) {
        const int32_t *m = t->merges + 3 * r;
        uint64_t pair = (uint64_t)(uint32_t)m[0] << 32 | (uint32_t)m[1], i = hash_pair(pair) & t->merge_mask;
        while (t->merge_table[i].rank >= 0 && t->merge_table[i].pair != pair) i = (i + 1) & t->merge_mask;
        t->merge_table[i] = (MergeSlot){pair, r, m[2]};
    }
}

static int class_has(const Tokenizer *t, int c, uint32_t cp);

static void build_class_ascii(Tokenizer *t) {
    t->class_ascii = (uint64_t (*)[2])calloc(t->n_classes ? t->n_classes : 1, sizeof *t->class_ascii);
    for (int c = 0; c < t->n_classes; c++)
        for (int r = t->class_off[c]; r < t->class_off[c + 1] && t->ranges[2 * r] < 128; r++)
            for (uint32_t cp = t->ranges[2 * r]; cp <= t->ranges[2 * r + 1] && cp < 128; cp++)
                t->class_ascii[c][cp >> 6] |= 1ull << (cp & 63);
}

static const Tokenizer *sort_tok;  // qsort has no context argument
static int cmp_added(const void *a, const void *b) {
    const Tokenizer *t = sort_tok;
    int ia = t->added[2 * *(const int *)a], ib = t->added[2 * *(const int *)b];
    int la = t->token_off[ia + 1] - t->token_off[ia], lb = t->token_off[ib + 1] - t->token_off[ib];
    unsigned char fa = t->token_blob[t->token_off[ia]], fb = t->token_blob[t->token_off[ib]];
    return fa != fb ? fa - fb : lb - la;
}

static void build_added_index(Tokenizer *t) {
    t->added_order = (int *)malloc((t->n_added + 1) * sizeof(int));
    int n = 0;
    for (int i = 0; i < t->n_added; i++) {
        int id = t->added[2 * i];
        if (t->token_off[id + 1] > t->token_off[id]) t->added_order[n++] = i;  // skip empty ones
    }
    sort_tok = t;
    qsort(t->added_order, n, sizeof(int), cmp_added);
    for (int b = 0, i = 0; b <= 256; b++) {
        while (i < n && (unsigned char)t->token_blob[t->token_off[t->added[2 * t->added_order[i]]]] < b) i++;
        t->added_first[b] = i;
    }
    t->added_first[256] = n;
}

void tokenizer_load(Tokenizer *t, const char *path) {
    memset(t, 0, sizeof *t);
    int fd = open(path, O_RDONLY);
    if (fd < 0) die("cannot open tokenizer file %s", path);
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) die("tokenizer file %s is not a regular file", path);
    if (st.st_size < 8) die("tokenizer file %s is truncated or corrupt", path);
    t->map_size = st.st_size;
    t->map = mmap(NULL, t->map_size, PROT_READ, MAP_PRIVATE | MAP_POPULATE, fd, 0);  // prefault: one pass, not 700 faults
    close(fd);
    if (t->map == MAP_FAILED) die("cannot mmap tokenizer file %s", path);
    Reader r = {path, (const uint8_t *)t->map, (const uint8_t *)t->map + t->map_size};
    const char *magic = (const char *)take(&r, 8, 1);
    if (memcmp(magic, "DSV2", 4) == 0 && memcmp(magic, "DSV2TOK\0", 8) != 0)
        die("%s is a dsv2 model file, not a tokenizer; the model comes first, the tokenizer after -z", path);
    if (memcmp(magic, "DSV2TOK\0", 8) != 0) die("%s is not a dsv2 tokenizer file (bad magic)", path);
    int version = take_int(&r);  // 2: character classes from export.py's Unicode table (1: from Python's unicodedata)
    if (version != 2) die("tokenizer file %s has version %d, this dsv2 reads version 2 (re-export it with export.py)", path, version);
    t->vocab_size = take_int(&r); t->n_merges = take_int(&r); t->n_added = take_int(&r);
    t->bos_id = take_int(&r); t->eos_id = take_int(&r); t->add_bos = take_int(&r);
    t->n_classes = take_int(&r); int n_ranges = take_int(&r);
    t->n_steps = take_int(&r); int n_alts = take_int(&r), n_atoms = take_int(&r);
    int blob_bytes = take_int(&r); t->has_chat = take_int(&r);
    memcpy(t->unicode_version, take(&r, 16, 1), 16);
    if (strspn(t->unicode_version, "0123456789./") != strlen(t->unicode_version) || !t->unicode_version[0])
        die("tokenizer file %s is corrupt (Unicode version)", path);
    if (t->vocab_size <= 0 || t->n_merges < 0 || t->n_added < 0 || t->n_classes < 0 || n_ranges < 0 ||
        t->n_steps < 0 || n_alts < 0 || n_atoms < 0 || blob_bytes < 0)
        die("tokenizer file %s is corrupt (negative sizes)", path);
    t->token_off = (const int32_t *)take(&r, (size_t)t->vocab_size + 1, 4);
    t->token_flags = (const uint8_t *)take(&r, t->vocab_size, 1);
    t->token_blob = (const char *)take(&r, blob_bytes, 1);
    t->merges = (const int32_t *)take(&r, 3 * (size_t)t->n_merges, 4);
    t->byte_ids = (const int32_t *)take(&r, 256, 4);
    t->added = (const int32_t *)take(&r, 2 * (size_t)t->n_added, 4);
    t->class_off = (const int32_t *)take(&r, (size_t)t->n_classes + 1, 4);
    t->ranges = (const uint32_t *)take(&r, 2 * (size_t)n_ranges, 4);
    t->step_off = (const int32_t *)take(&r, (size_t)t->n_steps + 1, 4);
    t->alt_off = (const int32_t *)take(&r, (size_t)n_alts + 1, 4);
    t->atoms = (const int32_t *)take(&r, 4 * (size_t)n_atoms, 4);
    for (int i = 0; i < CHAT_PIECES; i++) {
        t->chat_len[i] = take_int(&r);
        if (t->chat_len[i] < 0) die("tokenizer file %s is corrupt (chat template)", path);
        t->chat[i] = (const char *)take(&r, t->chat_len[i], 1);
    }
    if (r.p != r.end) die("tokenizer file %s is corrupt (%ld unexpected trailing bytes)", path, (long)(r.end - r.p));
    // validate everything later code indexes with, so a corrupt file cannot crash us
    check_offsets(&r, t->token_off, t->vocab_size, t->token_off[t->vocab_size]);
    if (t->token_off[t->vocab_size] > blob_bytes) die("tokenizer file %s is corrupt (token bytes)", path);
    check_ids(&r, t->merges, 3L * t->n_merges, 1, t->vocab_size, 0);
    check_ids(&r, t->byte_ids, 256, 1, t->vocab_size, 1);
    check_ids(&r, t->added, 2L * t->n_added, 2, t->vocab_size, 0);
    check_offsets(&r, t->class_off, t->n_classes, n_ranges);
    check_offsets(&r, t->step_off, t->n_steps, n_alts);
    check_offsets(&r, t->alt_off, n_alts, n_atoms);
    for (int a = 0; a < n_atoms; a++) {
        const int32_t *at = t->atoms + 4 * a;
        if (at[0] < ATOM_CLASS || at[0] > ATOM_NOT_AHEAD || (at[0] != ATOM_END && (at[1] < 0 || at[1] >= t->n_classes)) ||
            at[2] < 0 || (at[3] >= 0 && at[3] < at[2]) || at[3] < -1)
            die("tokenizer file %s is corrupt (pre-tokenizer atom %d)", path, a);
    }
    if (t->bos_id < -1 || t->bos_id >= t->vocab_size || t->eos_id < -1 || t->eos_id >= t->vocab_size)
        die("tokenizer file %s is corrupt (BOS id %d, EOS id %d; expected -1..%d)", path, t->bos_id, t->eos_id, t->vocab_size - 1);
    if (t->add_bos && t->bos_id < 0) die("tokenizer file %s adds BOS but has no BOS token", path);
    build_merge_table(t);
    build_class_ascii(t);
    build_added_index(t);
    t->bpe_cache = (BpeCacheSlot *)calloc(BPE_CACHE_SLOTS, sizeof(BpeCacheSlot));  // zero pages: costs nothing until used
    if (!t->bpe_cache) die("out of memory loading the tokenizer");
}

void tokenizer_free(Tokenizer *t) {
    if (t->map) munmap(t->map, t->map_size);
    free(t->merge_table); free(t->class_ascii); free(t->added_order); free(t->bpe_cache);
    memset(t, 0, sizeof *t);
}

// ---------------- pre-tokenizer: a tiny backtracking matcher for the compiled regexes
// Oniguruma (which tokenizers uses) is a backtracking engine too: alternatives are tried in
// order, quantifiers are greedy and give back one character at a time, the leftmost match wins.

static int class_has(const Tokenizer *t, int c, uint32_t cp) {
    if (cp < 128) return (t->class_ascii[c][cp >> 6] >> (cp & 63)) & 1;
    int lo = t->class_off[c], hi = t->class_off[c + 1] - 1;  // binary search the ranges
    while (lo <= hi) {
        int mid = (lo + hi) / 2;
        if (cp < t->ranges[2 * mid]) hi = mid - 1;
        else if (cp > t->ranges[2 * mid + 1]) lo = mid + 1;
        else return 1;
    }
    return 0;
}

// Match atoms[0..n) at cps[pos..], inside the piece that ends at `end`: returns the end of the
// match or -1. Atoms: class{min,max} (greedy), `$` (end of piece or before a "\n", Oniguruma's
// Ruby syntax), (?!class) (negative lookahead of one character).
static int match_atoms(const Tokenizer *t, const int32_t *atom, int n, const uint32_t *cps, int pos, int end) {
    if (n == 0) return pos;
    int kind = atom[0], c = atom[1], min = atom[2], max = atom[3];
    if (kind == ATOM_END)
        return pos == end || cps[pos] == '\n' ? match_atoms(t, atom + 4, n - 1, cps, pos, end) : -1;
    if (kind == ATOM_NOT_AHEAD)
        return pos < end && class_has(t, c, cps[pos]) ? -1 : match_atoms(t, atom + 4, n - 1, cps, pos, end);
    int count = 0;
    while (count != max && pos + count < end && class_has(t, c, cps[pos + count])) count++;
    int next_is_end = n > 1 && atom[4] == ATOM_END;
    for (; count >= min; count--) {
        int at = pos + count;
        if (next_is_end && at != end && cps[at] != '\n') continue;  // `$` cannot match there
        int m = match_atoms(t, atom + 4, n - 1, cps, at, end);
        if (m >= 0) return m;
    }
    return -1;
}

// The leftmost non-empty match of pre-tokenizer step s in cps[from..end): sets *mstart, returns its end or -1
static int find_match(const Tokenizer *t, int s, const uint32_t *cps, int from, int end, int *mstart) {
    for (int pos = from; pos < end; pos++)
        for (int a = t->step_off[s]; a < t->step_off[s + 1]; a++) {
            int m = match_atoms(t, t->atoms + 4 * t->alt_off[a], t->alt_off[a + 1] - t->alt_off[a], cps, pos, end);
            if (m > pos) { *mstart = pos; return m; }
            if (m == pos) break;  // an empty match at pos: tokenizers drops it and searches on
        }
    return -1;
}

// ---------------- BPE
// tokenizers' Word::merge_all: symbols in a doubly linked list, candidate merges in a min-heap
// ordered by (rank, position); pop the best, skip it if stale, merge, push the two new pairs.
// O(n log n) in the piece length.

typedef struct {
    int *ids; int n_ids, cap_ids;           // output
    uint32_t *cps; int *byte_at;            // the text as code points, their byte offsets
    int *sym, *prev, *next;                 // BPE symbols (token id; -1 = merged away)
    uint64_t *heap; int n_heap;             // rank << 32 | position
} Encoder;

static void emit(Encoder *e, int id) {
    if (e->n_ids == e->cap_ids) {
        e->cap_ids = e->cap_ids ? 2 * e->cap_ids : 64;
        e->ids = (int *)realloc(e->ids, e->cap_ids * sizeof(int));
        if (!e->ids) die("out of memory encoding text");
    }
    e->ids[e->n_ids++] = id;
}

static void heap_push(Encoder *e, uint64_t key) {
    int i = e->n_heap++;
    for (; i > 0 && e->heap[(i - 1) / 2] > key; i = (i - 1) / 2) e->heap[i] = e->heap[(i - 1) / 2];
    e->heap[i] = key;
}

static uint64_t heap_pop(Encoder *e) {
    uint64_t top = e->heap[0], last = e->heap[--e->n_heap];
    int i = 0;
    for (int child; (child = 2 * i + 1) < e->n_heap; i = child) {
        if (child + 1 < e->n_heap && e->heap[child + 1] < e->heap[child]) child++;
        if (e->heap[child] >= last) break;
        e->heap[i] = e->heap[child];
    }
    e->heap[i] = last;
    return top;
}

static void push_pair(const Tokenizer *t, Encoder *e, int pos) {
    if (pos < 0 || e->next[pos] < 0) return;
    int rank = merge_rank(t, e->sym[pos], e->sym[e->next[pos]]);
    if (rank >= 0) heap_push(e, (uint64_t)rank << 32 | (uint32_t)pos);
}

// BPE over the UTF-8 bytes of one piece, appending its token ids to e->ids
static void bpe_piece(const Tokenizer *t, Encoder *e, const unsigned char *bytes, int n) {
    BpeCacheSlot *slot = NULL;
    if (n <= (int)sizeof slot->bytes) {  // short piece: look in the cache first
        uint32_t h = 2166136261u;  // FNV-1a
        for (int i = 0; i < n; i++) h = (h ^ bytes[i]) * 16777619u;
        slot = &t->bpe_cache[h % BPE_CACHE_SLOTS];
        if (slot->len == n && memcmp(slot->bytes, bytes, n) == 0) {
            for (int i = 0; i < slot->n_ids; i++) emit(e, slot->ids[i]);
            return;
        }
    }
    int first_out = e->n_ids, n_sym = 0;
    for (int i = 0; i < n; i++) {
        int id = t->byte_ids[bytes[i]];
        if (id < 0) continue;  // a byte without a token (cannot occur in valid UTF-8): dropped, as tokenizers does
        e->sym[n_sym] = id; e->prev[n_sym] = n_sym - 1; e->next[n_sym] = n_sym + 1; n_sym++;
    }
    if (n_sym == 0) return;
    e->next[n_sym - 1] = -1;
    e->n_heap = 0;
    for (int i = 0; i + 1 < n_sym; i++) push_pair(t, e, i);
    while (e->n_heap > 0) {
        uint64_t top = heap_pop(e);
        int rank = (int)(top >> 32), pos = (int)(uint32_t)top;
        int right = e->next[pos];
        if (e->sym[pos] < 0 || right < 0 || merge_rank(t, e->sym[pos], e->sym[right]) != rank) continue;  // stale
        e->sym[pos] = t->merges[3 * rank + 2];  // merge right into pos
        e->sym[right] = -1;
        e->next[pos] = e->next[right];
        if (e->next[pos] >= 0) e->prev[e->next[pos]] = pos;
        push_pair(t, e, e->prev[pos]);
        push_pair(t, e, pos);
    }
    for (int i = 0; i >= 0; i = e->next[i]) emit(e, e->sym[i]);
    int n_out = e->n_ids - first_out;
    if (slot && n_out <= (int)(sizeof slot->ids / sizeof *slot->ids)) {
        slot->len = n; slot->n_ids = n_out;
        memcpy(slot->bytes, bytes, n);
        memcpy(slot->ids, e->ids + first_out, n_out * sizeof(int));
    }
}

// Apply pre-tokenizer steps s, s+1, ... to the piece cps[start..end), then BPE each final piece
static void pretokenize(const Tokenizer *t, Encoder *e, const char *text, int s, int start, int end) {
    if (start >= end) return;
    if (s == t->n_steps) {
        bpe_piece(t, e, (const unsigned char *)text + e->byte_at[start], e->byte_at[end] - e->byte_at[start]);
        return;
    }
    int pos = start, mstart, mend;
    while (pos < end && (mend = find_match(t, s, e->cps, pos, end, &mstart)) >= 0) {
        pretokenize(t, e, text, s + 1, pos, mstart);       // the gap before the match
        pretokenize(t, e, text, s + 1, mstart, mend);      // the match, isolated
        pos = mend;
    }
    pretokenize(t, e, text, s + 1, pos, end);
}

// ---------------- added tokens
// tokenizers' AddedVocabulary::extract_and_normalize: first the non-normalized added tokens
// (the special ones here) are split off the raw text, then the normalized ones off the
// remaining pieces (after the normalizer, which for DeepSeek is the identity). Each pass is an
// Aho-Corasick search with MatchKind::LeftmostLongest.

// the longest added token of the given normalized-ness starting at byte offset `at`, or -1
static int added_at(const Tokenizer *t, const char *text, size_t len, size_t at, int normalized) {
    unsigned char b = text[at];
    for (int i = t->added_first[b]; i < t->added_first[b + 1]; i++) {  // longest first
        const int32_t *a = t->added + 2 * t->added_order[i];
        size_t n = t->token_off[a[0] + 1] - t->token_off[a[0]];
        if (a[1] == normalized && n <= len - at && memcmp(text + at, t->token_blob + t->token_off[a[0]], n) == 0)
            return a[0];
    }
    return -1;
}

// Split cps[start..end) on added tokens of pass `pass` (0: non-normalized, 1: normalized);
// gaps go to the next pass, then to the pre-tokenizer.
static void split_added(const Tokenizer *t, Encoder *e, const char *text, size_t len, int pass, int start, int end) {
    if (start >= end) return;
    if (pass == 2) { pretokenize(t, e, text, 0, start, end); return; }
    int gap = start;
    for (int i = start; i < end; i++) {
        int id = added_at(t, text, e->byte_at[end], e->byte_at[i], pass);
        if (id < 0) continue;
        split_added(t, e, text, len, pass + 1, gap, i);
        emit(e, id);
        int stop = e->byte_at[i] + t->token_off[id + 1] - t->token_off[id];
        while (e->byte_at[i] < stop) i++;
        gap = i--;
    }
    split_added(t, e, text, len, pass + 1, gap, end);
}

int *tokenizer_encode(Tokenizer *t, const char *text, size_t len, int add_bos, int *n_ids) {
    long bad = utf8_invalid_offset(text, len);
    if (bad >= 0) die("invalid UTF-8 in the text to encode at byte offset %ld (byte 0x%02x)", bad, (unsigned char)text[bad]);
    if (len >= (1u << 30)) die("text to encode is too long (%zu bytes; at most 2^30 - 1)", len);  // ids stay below 2^30
    Encoder e = {0};
    e.cps = (uint32_t *)malloc((len + 1) * sizeof(uint32_t));
    e.byte_at = (int *)malloc((len + 1) * sizeof(int));
    e.sym = (int *)malloc((len + 1) * sizeof(int)); e.prev = (int *)malloc((len + 1) * sizeof(int)); e.next = (int *)malloc((len + 1) * sizeof(int));
    e.heap = (uint64_t *)malloc((2 * len + 1) * sizeof(uint64_t));
    if (!e.cps || !e.byte_at || !e.sym || !e.prev || !e.next || !e.heap) die("out of memory encoding %zu bytes", len);
    int n_cps = 0;
    for (size_t i = 0; i < len; n_cps++) {
        e.byte_at[n_cps] = (int)i;
        i += utf8_char((const unsigned char *)text + i, len - i, &e.cps[n_cps]);
    }
    e.byte_at[n_cps] = (int)len;
    if (add_bos && t->bos_id >= 0) emit(&e, t->bos_id);
    split_added(t, &e, text, len, 0, 0, n_cps);
    free(e.cps); free(e.byte_at); free(e.sym); free(e.prev); free(e.next); free(e.heap);
    *n_ids = e.n_ids;
    return e.ids ? e.ids : (int *)malloc(sizeof(int));
}

// ---------------- decoder
// ids -> bytes (export.py already mapped byte-level characters back to bytes) -> UTF-8, one
// character at a time so a character split across tokens is written once it is complete.
// Invalid sequences become U+FFFD as in tokenizers' ByteLevel decoder (from_utf8_lossy).
// Added tokens are written as their text (tokenizers would instead byte-map DeepSeek-V2's
// one-character added tokens such as "ü" to the byte 0xFC, i.e. U+FFFD).

static void decode_byte(DecodeState *s, unsigned char b, FILE *out) {
    if (s->n_pending == 0 && b < 0x80) { fputc(b, out); return; }
    s->pending[s->n_pending++] = b;
    while (s->n_pending > 0) {
        uint32_t cp;
        int k = utf8_char(s->pending, s->n_pending, &cp);
        if (k == 0) return;  // incomplete: wait for more bytes
        if (k > 0) fwrite(s->pending, 1, k, out);
        else { fputs("\xEF\xBF\xBD", out); k = -k; }
        memmove(s->pending, s->pending + k, s->n_pending - k);
        s->n_pending -= k;
    }
}

static void check_id(const Tokenizer *t, int id) {
    if (id < 0 || id >= t->vocab_size || !(t->token_flags[id] & TOK_EXISTS))
        die("token id %d is out of range (the tokenizer has ids 0..%d)", id, t->vocab_size - 1);
}

void tokenizer_put(Tokenizer *t, DecodeState *s, int id, int skip_special, FILE *out) {
    check_id(t, id);
    if (skip_special && (t->token_flags[id] & TOK_SPECIAL)) return;
    for (int i = t->token_off[id]; i < t->token_off[id + 1]; i++) decode_byte(s, t->token_blob[i], out);
}

void tokenizer_flush(Tokenizer *t, DecodeState *s, FILE *out) {
    (void)t;
    if (s->n_pending > 0) fputs("\xEF\xBF\xBD", out);  // a truncated character at the very end
    s->n_pending = 0;
    fflush(out);
}

// ---------------- chat template and CLI

// system (NULL or "" = none) and user rendered with the template's literal pieces, without BOS
char *tokenizer_chat_prompt(Tokenizer *t, const char *system, const char *user) {
    if (!t->has_chat) die("this tokenizer has no chat template that dsv2 understands (export.py stored none)");
    int has_sys = system && *system;
    size_t n = strlen(user) + (has_sys ? strlen(system) : 0) + 1;
    for (int i = 0; i < CHAT_PIECES; i++) n += t->chat_len[i];
    char *out = (char *)malloc(n), *p = out;
    if (!out) die("out of memory");
#define PUT(s, len) (memcpy(p, s, len), p += len)
    if (has_sys) { PUT(t->chat[CHAT_SYS_PREFIX], t->chat_len[CHAT_SYS_PREFIX]); PUT(system, strlen(system)); PUT(t->chat[CHAT_SYS_SUFFIX], t->chat_len[CHAT_SYS_SUFFIX]); }
    PUT(t->chat[CHAT_USER_PREFIX], t->chat_len[CHAT_USER_PREFIX]); PUT(user, strlen(user)); PUT(t->chat[CHAT_USER_SUFFIX], t->chat_len[CHAT_USER_SUFFIX]);
    PUT(t->chat[CHAT_GEN_PROMPT], t->chat_len[CHAT_GEN_PROMPT]);
#undef PUT
    *p = '\0';
    return out;
}

// -m encode: the ids of input (BOS first if the tokenizer adds it); -m decode: the text of "ids..."
void tokenizer_cli(Tokenizer *t, const char *mode, const char *input) {
    if (!input) die("-m %s needs the input text: -i TEXT", mode);
    if (strcmp(mode, "encode") == 0) {
        int n;
        int *ids = tokenizer_encode(t, input, strlen(input), t->add_bos, &n);
        for (int i = 0; i < n; i++) printf(i ? " %d" : "%d", ids[i]);
        printf("\n");
        fprintf(stderr, "%d ids (tokenizer: %d tokens, character classes of Unicode %s, regexes/digits)\n", n, t->vocab_size,
                t->unicode_version);
        free(ids);
    } else if (strcmp(mode, "decode") == 0) {
        DecodeState s = {0};
        for (const char *p = input; *p;) {
            char *stop;
            while (*p == ' ' || *p == '\t' || *p == '\n' || *p == ',') p++;
            if (!*p) break;
            long id = strtol(p, &stop, 10);
            if (stop == p || (*stop && !strchr(" \t\n,", *stop))) die("-m decode: '%.20s' is not a token id", p);
            if (id < 0 || id >= t->vocab_size) die("token id %ld is out of range (the tokenizer has ids 0..%d)", id, t->vocab_size - 1);
            tokenizer_put(t, &s, (int)id, 0, stdout);
            p = stop;
        }
        tokenizer_flush(t, &s, stdout);
        printf("\n");
    } else {
        die("-m %s: unknown tokenizer mode (expected encode or decode)", mode);
    }
}

// ----------------------------------------------------------------------------
// ---------------- The sampler: greedy, temperature, top-p

typedef struct {
    float temperature;   // 0: greedy
    float topp;          // nucleus sampling threshold in (0, 1]; 1 disables it
    uint64_t rng_state;
    int *order;          // (vocab_size) scratch for top-p
} Sampler;

#ifdef __CUDACC__
#define HOST_DEVICE __host__ __device__  // dsv2.cu's sampler (dsv2_sample.cuh) draws its coins with these too
#else
#define HOST_DEVICE
#endif
HOST_DEVICE static uint32_t random_u32(uint64_t *state) {  // xorshift*
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    return (uint32_t)((*state * 0x2545F4914F6CDD1Dull) >> 32);
}
HOST_DEVICE static float random_f32(uint64_t *state) { return (random_u32(state) >> 8) / 16777216.0f; }

static int sample_argmax(const float *p, int n) { return argmax(p, n); }

static int sample_mult(const float *p, int n, float coin) {
    float cdf = 0.0f;
    for (int i = 0; i < n; i++) { cdf += p[i]; if (coin < cdf) return i; }
    return n - 1;
}

static const float *topp_probs;
static int topp_cmp(const void *a, const void *b) {
    float pa = topp_probs[*(const int *)a], pb = topp_probs[*(const int *)b];
    return pa > pb ? -1 : pa < pb ? 1 : *(const int *)a - *(const int *)b;
}

// sample from the smallest set of tokens whose probability reaches topp
static int sample_topp(const float *p, int n, float topp, int *order, float coin) {
    int m = 0;
    float cutoff = (1.0f - topp) / (n - 1 > 0 ? n - 1 : 1);  // tokens below this can't be in the set
    for (int i = 0; i < n; i++) if (p[i] >= cutoff) order[m++] = i;
    if (m == 0) return sample_argmax(p, n);  // only when p is not a distribution (NaN): never index order[-1]
    topp_probs = p;
    qsort(order, m, sizeof(int), topp_cmp);
    float cum = 0.0f;
    int last = m - 1;
    for (int i = 0; i < m; i++) { cum += p[order[i]]; if (cum > topp) { last = i; break; } }
    float r = coin * cum, cdf = 0.0f;
    for (int i = 0; i <= last; i++) { cdf += p[order[i]]; if (r < cdf) return order[i]; }
    return order[last];
}

// softmax(logits / T), taken as exp((logit - max) / T): every exponent is <= 0 and the largest is
// exactly 0, so no temperature, however small, overflows it (-t 1e-38 is greedy, not NaN)
static int sample(Sampler *sp, float *logits, int n) {
    int best = sample_argmax(logits, n);
    if (sp->temperature == 0.0f) return best;
    float max = logits[best], sum = 0.0f;
    for (int i = 0; i < n; i++) { logits[i] = expf((logits[i] - max) / sp->temperature); sum += logits[i]; }
    for (int i = 0; i < n; i++) logits[i] /= sum;
    float coin = random_f32(&sp->rng_state);
    if (sp->topp <= 0.0f || sp->topp >= 1.0f) return sample_mult(logits, n, coin);
    return sample_topp(logits, n, sp->topp, sp->order, coin);
}

// ----------------------------------------------------------------------------
// ---------------- Generation

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

// The paper's Table 1 for the loaded model: what the latent cache costs per token next to MHA; and
// what this run's cache held, when --kv or --kv-layout changed it.
static void print_kv_cache_size(const Config *c, KvFormat kv) {
    long mla = (long)c->n_layers * kv_cache_width(c);
    long mha = 2L * c->n_layers * c->n_heads * c->qk_nope_head_dim;  // 2 n_h d_h l
    fprintf(stderr, "KV cache per token: MLA %ld values (%d layers x (d_c %d + d_h^R %d)) = %ld bytes (float32); "
            "MHA with %d heads of %d would need %ld values = %ld bytes (MLA is %.1f%%)\n",
            mla, c->n_layers, c->kv_lora_rank, c->qk_rope_head_dim, mla * 4, c->n_heads, c->qk_nope_head_dim,
            mha, mha * 4, 100.0 * mla / mha);
    if (kv.mha || kv.bf16)
        fprintf(stderr, "KV cache of this run (--kv-layout %s --kv %s): %ld values per token (%ld bytes in %s)\n",
                kv.mha ? "mha" : "latent", kv.bf16 ? "bf16" : "f32", c->n_layers * kv_row_width(c, kv.mha),
                c->n_layers * kv_row_width(c, kv.mha) * (kv.bf16 ? 2 : 4), kv.bf16 ? "bf16; ./dsv2 keeps them in floats" : "float32");
}

// Memory after a run: resident now and at the peak (the touched pages of the mapped model file
// count), next to the size of the mapping itself.
static void print_memory_summary(const Model *m) {
    long pages = 0, resident = 0, page = sysconf(_SC_PAGESIZE);
    FILE *f = fopen("/proc/self/statm", "r");  // Linux: total and resident size, in pages
    if (f && fscanf(f, "%ld %ld", &pages, &resident) != 2) resident = 0;
    if (f) fclose(f);
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);  // ru_maxrss: the peak, in KiB on Linux
    int threads = 1;
#ifdef _OPENMP
    threads = omp_get_max_threads();
#endif
    const char *dtype = m->config.dtype == DTYPE_Q8 ? "q8" : m->config.dtype == DTYPE_BF16 ? "bf16" : "fp32";
    double now_mib = resident * (double)page / (1 << 20), peak_mib = ru.ru_maxrss / 1024.0;
    fprintf(stderr, "memory: resident %.1f MiB (peak %.1f MiB); model file mapped: %.1f MiB (%s); %d thread%s\n",
            now_mib, peak_mib > now_mib ? peak_mib : now_mib, m->file_size / (double)(1 << 20), dtype,
            threads, threads == 1 ? "" : "s");
}

// The generation loop's two hooks: the prompt, all of it but the last token, in chunks (prefill),
// then one token per forward (forward_token). dsv2.cu (which includes this file with DSV2_GPU
// defined) runs both on the GPU, and adds two: DSV2_SETUP uploads the model before the clock starts,
// and DSV2_NEXT is a forward and sample() in one step on the GPU, so that only the token id comes back.
#ifdef DSV2_GPU
static float *forward_gpu(const Model *m, RunState *s, int token, int pos, AttnForm form);
static int prefill_gpu(const Model *m, RunState *s, const int *ids, int n, int pos0, AttnForm form);
static void gpu_check_model(const Model *m);  // refuses, before any output, a model the GPU cannot run
static void gpu_setup(const Model *m, RunState *s, const Sampler *sp);
static int forward_sample_gpu(const Model *m, RunState *s, Sampler *sp, int token, int pos);
#define DSV2_FORWARD forward_gpu
#define DSV2_PREFILL prefill_gpu
#define DSV2_SETUP gpu_setup
#define DSV2_NEXT forward_sample_gpu
#else
#define DSV2_FORWARD forward_token
#define DSV2_PREFILL prefill
#define DSV2_SETUP(m, s, sp)
#endif

typedef struct {
    const char *dump_logits;  // write every position's logits here (float32, [pos][vocab])
    AttnForm form;
    int n_new;                // new tokens to generate, per answer in chat (-n)
    int ctx;                  // -m chat: the context in tokens (--ctx; 0: the model's, at most 4096)
    Trace *trace;             // --trace / --routing-out, NULL when off
    KvFormat kv;              // --kv, --kv-layout
} GenOptions;

// what one call of generate_ids did; the caller prints it after the text (print_speed)
typedef struct {
    int pos;                  // the next free position
    int n_prompt, n_gen;      // tokens read, tokens generated (an EOS included)
    double prompt_s, gen_s;   // seconds spent on each
    int eos;                  // the answer ended with EOS (counted in n_gen)
    int full;                 // generation stopped because the context was full
} GenStats;

static void put_token(Tokenizer *tok, DecodeState *ds, int id, FILE *out) {
    if (id >= 0 && id < tok->vocab_size && (tok->token_flags[id] & TOK_EXISTS)) tokenizer_put(tok, ds, id, 1, out);
    else fprintf(out, "[%d]", id);  // the model's vocabulary can be larger than the tokenizer's, or have holes
    fflush(out);
}

// logits that are NaN or infinite come from corrupt weights (or an overflow): nothing sensible
// can be sampled or scored from them, so stop and say where
static void check_logits(const float *logits, int n, int pos) {
    for (int i = 0; i < n; i++)
        if (!isfinite(logits[i]))
            die("the logits at position %d are not finite (token %d: %g): the model's weights are corrupt", pos, i, logits[i]);
}

// Runs the prompt ids through the model and generates up to n_new tokens after them, printing
// them as they come; the ids of the answer (without its EOS) go to answer (NULL: not kept).
// Positions start at pos0 (chat continues a conversation in the same cache).
static GenStats generate_ids(const Model *m, RunState *s, Tokenizer *tok, Sampler *sp, const int *ids, int n_ids,
                             int pos0, const GenOptions *opt, FILE *dump, int *answer) {
    const Config *c = &m->config;
    if (n_ids < 1 || pos0 + n_ids > s->seq_len)
        die("the prompt is %d tokens but the context holds %d (max_position_embeddings %d)",
            pos0 + n_ids, s->seq_len, c->max_position_embeddings);
    GenStats st = {pos0, n_ids, 0, 0.0, 0.0, 0, 0};
    DecodeState ds;
    memset(&ds, 0, sizeof(ds));
    double t0 = now_s(), t1 = t0;
    int pos = pos0, token = ids[0], done = 0;
    if (!dump && n_ids > 1) {  // --dump-logits needs every position's logits: no prefill then
        int taken = DSV2_PREFILL(m, s, ids, n_ids - 1, pos0, opt->form);
        pos += taken;
        token = ids[taken];
    }
    while (pos < s->seq_len) {
        float *logits = NULL;
        int next = -1;
#ifdef DSV2_NEXT
        Sampler after = *sp;  // the sampler's state after the GPU's draw, kept if its token is taken
        if (!dump && pos + 1 - pos0 >= n_ids) next = DSV2_NEXT(m, s, &after, token, pos);
        else
#endif
        {
            logits = DSV2_FORWARD(m, s, token, pos, opt->form);
            check_logits(logits, c->vocab_size, pos);
            if (dump && fwrite(logits, sizeof(float), c->vocab_size, dump) != (size_t)c->vocab_size)
                die("--dump-logits: write failed");
        }
        pos++;
        int i = pos - pos0;  // tokens of this call processed so far
        if (i < n_ids) next = ids[i];
        else {
            if (i == n_ids) t1 = now_s();
            if (st.n_gen >= opt->n_new) { done = 1; break; }
            if (logits) next = sample(sp, logits, c->vocab_size);
#ifdef DSV2_NEXT
            else *sp = after;
#endif
            st.n_gen++;
            if (next == tok->eos_id) { done = st.eos = 1; break; }
            if (answer) answer[st.n_gen - 1] = next;
            put_token(tok, &ds, next, stdout);
        }
        token = next;
    }
    tokenizer_flush(tok, &ds, stdout);
    if (pos - pos0 < n_ids || (!done && st.n_gen == 0)) t1 = now_s();
    st.pos = pos;
    st.full = !done;
    st.prompt_s = t1 - t0;
    st.gen_s = now_s() - t1;
    return st;
}

// the lines after an answer (stderr): a stop at the context, then the speeds
static void print_speed(const GenStats *st, int seq_len) {
    if (st->full) fprintf(stderr, "dsv2: stopped at the end of the context (%d tokens)\n", seq_len);
    fprintf(stderr, "prompt: %d tokens, %.1f tok/s; generated: %d tokens, %.1f tok/s\n", st->n_prompt,
            st->n_prompt / (st->prompt_s > 0 ? st->prompt_s : 1e-9), st->n_gen, st->n_gen / (st->gen_s > 0 ? st->gen_s : 1e-9));
}

static int context_for(const Config *c, int n_prompt, int n_new) {
    long want = (long)n_prompt + n_new;
    return (int)(want < c->max_position_embeddings ? want : c->max_position_embeddings);
}

static void generate(const Model *m, Tokenizer *tok, Sampler *sp, const char *prompt, const GenOptions *opt) {
    int n_ids;
    int *ids = tokenizer_encode(tok, prompt, strlen(prompt), tok->add_bos, &n_ids);
    if (n_ids == 0) die("the prompt is empty and the tokenizer adds no BOS: nothing to run");
    if (n_ids > m->config.max_position_embeddings)
        die("the prompt is %d tokens, longer than the model's context of %d", n_ids, m->config.max_position_embeddings);
    RunState s;
    runstate_init_kv(&s, &m->config, context_for(&m->config, n_ids, opt->n_new), opt->kv);
    s.trace = opt->trace;
    DSV2_SETUP(m, &s, sp);
    FILE *dump = NULL;
    if (opt->dump_logits && !(dump = fopen(opt->dump_logits, "wb"))) die("--dump-logits: cannot write %s", opt->dump_logits);
    printf("%s", prompt);
    fflush(stdout);
    GenStats st = generate_ids(m, &s, tok, sp, ids, n_ids, 0, opt, dump, NULL);
    printf("\n");
    fflush(stdout);
    print_speed(&st, s.seq_len);
    if (dump) fclose(dump);
    print_kv_cache_size(&m->config, opt->kv);
    print_memory_summary(m);
    runstate_free(&s);
    free(ids);
}

// ---------------- Chat
// The conversation is [BOS] system + turn 1, answer 1, EOS, turn 2, answer 2, EOS, ... in the
// model's template. When the next turn does not fit in the context (with room for an answer),
// the oldest turns are dropped, as llama.cpp does, and what is left is read again from position
// 0: the system prompt and the first kept turn rendered together, exactly as if the conversation
// had started there, then the later turns and the answers given. A turn that does not fit even
// alone is refused, and the conversation goes on.

typedef struct {
    char *user;          // the user's text
    int *answer;         // the answer's ids, without its EOS
    int n_answer;
} ChatTurn;

// the ids of one user turn: first (with BOS and the system prompt) or after an answer (EOS first)
static int *chat_turn_ids(Tokenizer *tok, const char *system, const char *user, int first, int *n_ids) {
    char *text = tokenizer_chat_prompt(tok, first ? system : NULL, user);
    int n, *ids = tokenizer_encode(tok, text, strlen(text), first && tok->add_bos, &n);
    free(text);
    int *out = (int *)xcalloc((size_t)n + 1, sizeof(int));
    if (!first) out[0] = tok->eos_id;
    memcpy(out + !first, ids, n * sizeof(int));
    free(ids);
    *n_ids = n + !first;
    return out;
}

// appends n ids to the growing array *all (length *n_all)
static void append_ids(int **all, int *n_all, const int *ids, int n) {
    *all = (int *)realloc(*all, ((size_t)*n_all + n + 1) * sizeof(int));
    if (!*all) die("out of memory");
    memcpy(*all + *n_all, ids, (size_t)n * sizeof(int));
    *n_all += n;
}

// the whole conversation from turn `from` on, as it is read again after the turns before it are dropped
static int *chat_history_ids(Tokenizer *tok, const char *system, const ChatTurn *turns, int from, int n_turns, int *n_all) {
    int *all = NULL, n;
    *n_all = 0;
    for (int k = from; k < n_turns; k++) {
        int *ids = chat_turn_ids(tok, system, turns[k].user, k == from, &n);
        append_ids(&all, n_all, ids, n);
        append_ids(&all, n_all, turns[k].answer, turns[k].n_answer);
        free(ids);
    }
    return all;
}

// Chat: the model's template around each user turn; with -i one turn, else turns from stdin
// (lines of any length) until end of input.
static void chat(const Model *m, Tokenizer *tok, Sampler *sp, const char *prompt, const char *system,
                 const GenOptions *opt) {
    if (!tok->has_chat) die("-m chat: this tokenizer has no chat template that dsv2 understands (export.py stored none)");
    if (tok->eos_id < 0) die("-m chat: this tokenizer has no EOS token, so an answer could not end");
    int max_ctx = m->config.max_position_embeddings < 4096 ? m->config.max_position_embeddings : 4096;
    int ctx = opt->ctx ? opt->ctx : max_ctx;
    if (ctx > m->config.max_position_embeddings)
        die("--ctx %d is longer than the model's context of %d", ctx, m->config.max_position_embeddings);
    int room = opt->n_new < ctx / 2 ? opt->n_new : ctx / 2;  // kept free for each answer
    RunState s;
    runstate_init_kv(&s, &m->config, ctx, opt->kv);
    s.trace = opt->trace;
    DSV2_SETUP(m, &s, sp);
    FILE *dump = NULL;
    if (opt->dump_logits && !(dump = fopen(opt->dump_logits, "wb"))) die("--dump-logits: cannot write %s", opt->dump_logits);
    ChatTurn *turns = NULL;
    int n_turns = 0, pos = 0;
    char *line = NULL;
    size_t line_cap = 0;
    for (;;) {
        const char *user = prompt;
        if (!prompt) {
            printf("User: ");
            fflush(stdout);
            ssize_t len = getline(&line, &line_cap, stdin);
            if (len < 0) { printf("\n"); fflush(stdout); break; }  // end of input (Ctrl-D): end the prompt's line
            if (len > 0 && line[len - 1] == '\n') line[--len] = '\0';
            if (len > 0 && line[len - 1] == '\r') line[--len] = '\0';
            long bad = utf8_invalid_offset(line, len);
            if (memchr(line, 0, len) || bad >= 0) {
                fprintf(stderr, "dsv2: this line is not UTF-8 text (at byte %ld): skipped\n", bad >= 0 ? bad : (long)strlen(line));
                continue;
            }
            user = line;
        }
        int n_alone, n_ids;
        int *alone = chat_turn_ids(tok, system, user, 1, &n_alone);  // this turn as the first one
        int *ids = n_turns ? chat_turn_ids(tok, system, user, 0, &n_ids) : NULL;
        if (n_alone + room > ctx) {
            free(alone); free(ids);
            if (prompt)
                die("-m chat: the turn is %d tokens (with the template and system prompt); the context of %d holds %d "
                    "with %d kept for the answer", n_alone, ctx, ctx - room, room);
            fprintf(stderr, "dsv2: this turn is %d tokens (with the template and system prompt); the context of %d holds %d "
                    "with %d kept for the answer: skipped\n", n_alone, ctx, ctx - room, room);
            continue;
        }
        if (n_turns && pos + n_ids + room > ctx) {  // drop the oldest turns until this one fits
            int from = 1, n_kept = 0, *kept = NULL;
            for (; from < n_turns; from++) {
                kept = chat_history_ids(tok, system, turns, from, n_turns, &n_kept);
                if (n_kept + n_ids + room <= ctx) break;
                free(kept);
                kept = NULL;
            }
            if (kept) { append_ids(&kept, &n_kept, ids, n_ids); free(ids); ids = kept; n_ids = n_kept; }
            else { free(ids); ids = alone; n_ids = n_alone; alone = NULL; }
            fprintf(stderr, "dsv2: the conversation outgrew the context of %d tokens: dropped the oldest %d turn(s), "
                    "kept the system prompt, reading %d tokens again\n", ctx, from, n_ids);
            for (int k = 0; k < from; k++) { free(turns[k].user); free(turns[k].answer); }
            memmove(turns, turns + from, (n_turns - from) * sizeof(ChatTurn));
            n_turns -= from;
            pos = 0;
        } else if (!n_turns) {
            ids = alone; n_ids = n_alone; alone = NULL;
            pos = 0;
        }
        free(alone);
        turns = (ChatTurn *)realloc(turns, (n_turns + 1) * sizeof(ChatTurn));
        if (!turns) die("out of memory");
        ChatTurn *t = &turns[n_turns++];
        t->user = strdup(user);
        t->answer = (int *)xcalloc((size_t)(opt->n_new < ctx ? opt->n_new : ctx) + 1, sizeof(int));
        if (!t->user) die("out of memory");
        printf("Assistant:");
        fflush(stdout);
        GenStats st = generate_ids(m, &s, tok, sp, ids, n_ids, pos, opt, dump, t->answer);
        t->n_answer = st.n_gen - st.eos;
        printf("\n");
        fflush(stdout);
        print_speed(&st, ctx);
        pos = st.pos;
        free(ids);
        if (prompt) break;
    }
    for (int k = 0; k < n_turns; k++) { free(turns[k].user); free(turns[k].answer); }
    free(turns);
    free(line);
    if (dump) fclose(dump);
    print_kv_cache_size(&m->config, opt->kv);
    print_memory_summary(m);
    runstate_free(&s);
}

// ----------------------------------------------------------------------------
// ---------------- Teaching: ablation knobs, the paper's Table 1, perplexity (docs/WORKSHOP.md)

// Ablation knobs for experiments: each overrides one config field after loading, so it changes
// only what it names; 0 = the model's own value. They make a different model than the one trained.
typedef struct {
    int topk;        // --topk K: routed experts per token, K_r (config n_experts_per_tok)
    int topk_group;  // --topk-group G: groups kept by device-limited routing (config topk_group)
    int no_shared;   // --no-shared: drop the shared experts of eq. 20
    int no_routed;   // --no-routed: drop the routed experts of eq. 20 (the router still runs)
    int no_yarn;     // --no-yarn: plain RoPE and softmax scale, even beyond the trained context
} Knobs;

static void knobs_apply(Config *c, const Knobs *k) {
    int per = c->n_routed_experts / c->n_group;
    if (k->topk > c->n_routed_experts)
        die("--topk %d: this model has %d routed experts (expected 1..%d)", k->topk, c->n_routed_experts, c->n_routed_experts);
    if (k->topk_group && c->topk_method != 1)
        die("--topk-group needs device-limited routing (topk_method group_limited_greedy); this model routes greedily");
    if (k->topk_group > c->n_group)
        die("--topk-group %d: this model has %d expert groups (expected 1..%d)", k->topk_group, c->n_group, c->n_group);
    int topk = k->topk ? k->topk : c->n_experts_per_tok, groups = k->topk_group ? k->topk_group : c->topk_group;
    if (c->topk_method == 1 && groups * per < topk)
        die("--topk %d with --topk-group %d: %d groups of %d experts hold fewer than %d experts", topk, groups, groups, per, topk);
    if (k->no_shared && c->n_shared_experts == 0) die("--no-shared: this model has no shared experts");
    if (k->no_yarn && !c->rope_yarn) die("--no-yarn: this model uses plain RoPE already (no rope_scaling yarn)");
    c->n_experts_per_tok = topk;
    c->topk_group = groups;
    if (k->no_shared) c->n_shared_experts = 0;
    if (k->no_routed) c->n_experts_per_tok = 0;
    if (k->no_yarn) c->rope_yarn = 0;
}

// --kv-table: the paper's Table 1 (KV cache per token) with this model's dimensions:
// MHA 2 n_h d_h l, GQA 2 n_g d_h l, MQA 2 d_h l, MLA (d_c + d_h^R) l values per token
static void print_kv_table(const Config *c, double mem_gib) {
    int l = c->n_layers, nh = c->n_heads, dh = c->qk_nope_head_dim, ctx = c->max_position_embeddings;
    double mem = mem_gib * 1024.0 * 1024.0 * 1024.0;
    long mla = (long)(c->kv_lora_rank + c->qk_rope_head_dim) * l, mha = 2L * nh * dh * l;
    printf("KV cache per token, paper Table 1, this model: l=%d layers, n_h=%d heads, d_h=%d,\n"
           "d_c=%d, d_h^R=%d; %d bytes a value (dsv2's float32 cache; bf16 would halve it)\n\n",
           l, nh, dh, c->kv_lora_rank, c->qk_rope_head_dim, 4);
    char ctx_head[32], mem_head[32];
    snprintf(ctx_head, sizeof(ctx_head), "%d tokens", ctx);
    snprintf(mem_head, sizeof(mem_head), "in %.3g GiB", mem_gib);
    printf("%-11s %-16s %7s %7s %7s %11s %12s\n", "per token", "formula", "values", "bytes", "vs MHA", ctx_head, mem_head);
    struct { char name[24]; char formula[20]; long values; } rows[16];
    int n = 0;
    snprintf(rows[n].name, sizeof(rows[n].name), "MHA"); snprintf(rows[n].formula, 20, "2 n_h d_h l"); rows[n++].values = mha;
    for (int g = nh / 2; g > 1 && n < 12; g /= 2)
        if (nh % g == 0) {
            snprintf(rows[n].name, sizeof(rows[n].name), "GQA n_g=%d", g); snprintf(rows[n].formula, 20, "2 n_g d_h l");
            rows[n++].values = 2L * g * dh * l;
        }
    snprintf(rows[n].name, sizeof(rows[n].name), "MQA"); snprintf(rows[n].formula, 20, "2 d_h l"); rows[n++].values = 2L * dh * l;
    snprintf(rows[n].name, sizeof(rows[n].name), "MLA"); snprintf(rows[n].formula, 20, "(d_c + d_h^R) l"); rows[n++].values = mla;
    for (int i = 0; i < n; i++) {
        long bytes = rows[i].values * 4;
        char ctxb[32];
        double cb = (double)bytes * ctx;
        if (cb >= 1 << 30) snprintf(ctxb, sizeof(ctxb), "%.2f GiB", cb / (1 << 30));
        else if (cb >= 1 << 20) snprintf(ctxb, sizeof(ctxb), "%.2f MiB", cb / (1 << 20));
        else snprintf(ctxb, sizeof(ctxb), "%.1f KiB", cb / 1024);
        printf("%-11s %-16s %7ld %7ld %6.1f%% %11s %12.0f\n", rows[i].name, rows[i].formula, rows[i].values, bytes,
               100.0 * rows[i].values / mha, ctxb, floor(mem / bytes));
    }
    printf("\nMLA caches as much as GQA with %.2f groups (paper: 2.25 for DeepSeek-V2's d_c = 4 d_h,\n"
           "d_h^R = d_h/2); DeepSeek-V2 itself: MLA 576 values per layer, MHA 32768 (1.8%%).\n",
           (double)mla / (2.0 * dh * l));
}

// -m ppl: sum of -log p(next token) over ids, run in windows of `window` tokens that overlap by
// one token (window k starts at k * (window - 1)), so every token after the first is predicted
// exactly once and no window is longer than the context. tests/make_teach_golden.py does the same.
typedef struct { long n_tokens, n_predicted; int n_windows; double nats; } Perplexity;

static Perplexity perplexity(const Model *m, const int *ids, int n, int window, AttnForm form, KvFormat kv, Trace *trace,
                             int progress) {
    const Config *c = &m->config;
    Perplexity r = {n, 0, 0, 0.0};
    RunState s;
    runstate_init_kv(&s, c, window, kv);
    s.trace = trace;
    double t0 = now_s();
    for (long start = 0; start + 1 < n; start += window - 1) {
        int len = (int)(n - start < window ? n - start : window);
        r.n_windows++;
        if (trace) trace->first_index = start;
        int chunk = trace ? 1 : s.max_T;  // the trace follows one token at a time
        for (int pos = 0; pos + 1 < len; pos++) {
            int t = pos % chunk;  // the row of this position's logits in its chunk
            if (t == 0) forward(m, &s, ids + start + pos, len - 1 - pos < chunk ? len - 1 - pos : chunk, pos, form, LOGITS_ALL);
            const float *logits = s.logits + (size_t)t * c->vocab_size;
            check_logits(logits, c->vocab_size, (int)(start + pos));
            double max = logits[0], sum = 0.0;                          // log-softmax in double
            for (int v = 1; v < c->vocab_size; v++) if (logits[v] > max) max = logits[v];
            for (int v = 0; v < c->vocab_size; v++) sum += exp(logits[v] - max);
            r.nats += log(sum) + max - logits[ids[start + pos + 1]];   // -log p(next token)
            r.n_predicted++;
            if (progress && (r.n_predicted % 128 == 0 || r.n_predicted == n - 1))
                fprintf(stderr, "\rppl: %ld/%d tokens predicted, window %d, %.0f tok/s, perplexity so far %.3f   ",
                        r.n_predicted, n - 1, r.n_windows, r.n_predicted / (now_s() - t0 + 1e-9), exp(r.nats / r.n_predicted));
        }
    }
    if (progress) fprintf(stderr, "\n");
    runstate_free(&s);
    return r;
}

// the raw bytes of token id (for the trace and the routing CSV); returns their count
static int token_text(void *tok, int id, char *buf, int size) {
    const Tokenizer *t = (const Tokenizer *)tok;
    if (id < 0 || id >= t->vocab_size) return snprintf(buf, size, "[%d]", id);
    int n = t->token_off[id + 1] - t->token_off[id];
    if (n > size) n = size;
    memcpy(buf, t->token_blob + t->token_off[id], n);
    return n;
}

// -f FILE: the whole file's bytes (a regular file or a pipe), NUL-terminated; what = "text file", ...
static char *read_file_bytes(const char *path, const char *what, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) die("-f: cannot open %s %s: %s", what, path, strerror(errno));
    struct stat st;
    if (fstat(fileno(f), &st) == 0 && S_ISDIR(st.st_mode)) die("-f %s is a directory; expected a %s", path, what);
    size_t n = 0, cap = 1 << 16;
    char *buf = (char *)xcalloc(cap, 1);
    for (size_t got; (got = fread(buf + n, 1, cap - 1 - n, f)) > 0;) {
        n += got;
        if (n + 1 == cap && !(buf = (char *)realloc(buf, cap *= 2))) die("-f %s: out of memory reading it", path);
    }
    if (ferror(f)) die("-f: cannot read %s %s: %s", what, path, strerror(errno));
    fclose(f);
    buf[n] = '\0';
    *len = n;
    return buf;
}

// -f FILE: the whole file (a regular file or a pipe), which must be UTF-8 text
static char *read_text_file(const char *path, size_t *len) {
    char *buf = read_file_bytes(path, "text file", len);
    size_t n = *len;
    if (memchr(buf, 0, n)) die("-f %s is not a text file (it holds a zero byte)", path);
    long bad = utf8_invalid_offset(buf, n);
    if (bad >= 0) die("-f %s: invalid UTF-8 at byte %ld", path, bad);
    return buf;
}

static void ppl_cli(const Model *m, Tokenizer *tok, const char *text, size_t len, const char *what, int window,
                    const GenOptions *opt) {
    int n;
    int *ids = tokenizer_encode(tok, text, len, tok->add_bos, &n);
    if (n < 2) die("-m ppl: %s has %d token(s); perplexity needs at least 2", what, n);
    Perplexity r = perplexity(m, ids, n, window, opt->form, opt->kv, opt->trace, 1);
    double loss = r.nats / r.n_predicted;
    printf("%s: %ld tokens, %ld predicted in %d window(s) of up to %d, %zu bytes\n", what, r.n_tokens, r.n_predicted,
           r.n_windows, window, len);
    printf("loss %.6f nats/token  perplexity %.4f  bits/byte %.4f\n", loss, exp(loss), r.nats / log(2.0) / (double)len);
    free(ids);
}

// --trace-pos "0,5,9" -> positions (at most max)
static int parse_positions(const char *v, int *out, int max) {
    int n = 0;
    for (const char *p = v; *p;) {
        char *end;
        long x = strtol(p, &end, 10);
        if (end == p || x < 0 || x > (1 << 24) || (*end && *end != ',') || n >= max)
            die("--trace-pos expects positions like 0,5,9 (at most %d, each >= 0), got '%s'", max, v);
        out[n++] = (int)x;
        p = *end ? end + 1 : end;
    }
    if (!n) die("--trace-pos expects positions like 0,5,9, got '%s'", v);
    return n;
}

// the teaching flags of the command line
typedef struct {
    Knobs knobs;
    const char *trace_path;   // --trace FILE ("-": stderr)
    const char *routing_out;  // --routing-out FILE.csv
    const char *text_file;    // -f FILE: the input text (-m ppl's text, or the prompt)
    int positions[64], n_positions;  // --trace-pos
    int kv_table;             // --kv-table
    double mem_gib;           // --mem GiB for --kv-table
    int ctx;                  // --ctx N: -m ppl's window, -m chat's context (0: the model's)
} TeachOptions;

static long parse_int(const char *flag, const char *v, long lo, long hi);
static float parse_float(const char *flag, const char *v, float lo, float hi);

// flags without a value; returns 1 if flag was one of them
static int teach_switch(TeachOptions *t, const char *flag) {
    if (!strcmp(flag, "--no-shared")) t->knobs.no_shared = 1;
    else if (!strcmp(flag, "--no-routed")) t->knobs.no_routed = 1;
    else if (!strcmp(flag, "--no-yarn")) t->knobs.no_yarn = 1;
    else if (!strcmp(flag, "--kv-table")) t->kv_table = 1;
    else return 0;
    return 1;
}

// flags with a value; returns 1 if flag was one of them
static int teach_flag(TeachOptions *t, const char *flag, const char *v) {
    if (!strcmp(flag, "--topk")) t->knobs.topk = (int)parse_int("--topk", v, 1, 4096);
    else if (!strcmp(flag, "--topk-group")) t->knobs.topk_group = (int)parse_int("--topk-group", v, 1, 4096);
    else if (!strcmp(flag, "--trace")) t->trace_path = v;
    else if (!strcmp(flag, "--trace-pos")) t->n_positions = parse_positions(v, t->positions, 64);
    else if (!strcmp(flag, "--routing-out")) t->routing_out = v;
    else if (!strcmp(flag, "-f")) t->text_file = v;
    else if (!strcmp(flag, "--mem")) t->mem_gib = parse_float("--mem", v, 1e-6f, 1e9f);
    else if (!strcmp(flag, "--ctx")) t->ctx = (int)parse_int("--ctx", v, 2, 1 << 24);
    else return 0;
    return 1;
}

// opens the trace's outputs; NULL when neither --trace nor --routing-out is given
static Trace *teach_trace(Trace *tr, const TeachOptions *t, Tokenizer *tok) {
    if (!t->trace_path && !t->routing_out) return NULL;
    memset(tr, 0, sizeof(*tr));
    if (t->trace_path) tr->out = strcmp(t->trace_path, "-") ? fopen(t->trace_path, "w") : stderr;
    if (t->trace_path && !tr->out) die("--trace: cannot write %s", t->trace_path);
    if (t->routing_out && !(tr->routing_csv = fopen(t->routing_out, "w"))) die("--routing-out: cannot write %s", t->routing_out);
    if (tr->routing_csv) fprintf(tr->routing_csv, "pos,token,text,layer,rank,expert,weight\n");
    tr->positions = t->positions;
    tr->n_positions = t->n_positions;
    tr->token_text = token_text;
    tr->token_ctx = tok;
    return tr;
}

// ----------------------------------------------------------------------------
// ---------------- Batched generation: -m batch
//
// ./dsv2 MODEL -m batch -f PROMPTS [-n N] [-t T -p P -s S] [--kv f32|bf16] [--kv-layout latent|mha]
// PROMPTS holds one prompt per line; inside a line `\n` stands for a newline and `\\` for a
// backslash. Every prompt runs to EOS, -n tokens or the end of its context, and stdout gets one JSON
// line per prompt, in the file's order:
//   {"id": 0, "prompt": "...", "completion": "...", "prompt_tokens": 7, "completion_tokens": 32}
// completion: the generated text as -m generate prints it (EOS excluded, invalid UTF-8 as U+FFFD);
// completion_tokens: the ids in it. stderr gets a progress line (sequences done, in flight, tok/s).
// ./dsv2 runs one sequence after another (batch_run_cpu); ./dsv2cu runs up to --batch B at once over
// a paged cache (batch_run_gpu, dsv2.cu). All the rest is shared, so the two compare token by token.
//
// The hook between this section and the engine, DSV2_BATCH(m, seqs, n, o, eos_id, run):
// - it runs seqs[0..n) (n >= 1, each n_ids in 1..max_position_embeddings, checked by batch_cli), each
//   from position 0 in a context of its own of ctx = min(n_ids + n_new, max_position_embeddings)
//   positions, as ./dsv2 -m generate -s batch_seed(o->seed, i) runs that prompt: its tokens but the
//   last through the prefill, then one token at a time; the sampler state starts at
//   batch_seed(o->seed, i) and advances as sample() advances it (one random_f32 per token, only when
//   temperature > 0); temperature 0 is the argmax (lowest id on ties);
// - sequence i ends at EOS (eos_id; not stored, eos = 1), after n_new tokens, or when its context is
//   full: the token sampled from the logits at the last position (ctx - 1) is kept, so a prompt of p
//   tokens gets at most min(n_new, max_position_embeddings - p + 1) tokens (out has room for that);
// - it fills out[0..n_out) and eos, calls batch_finished(run, i) as soon as sequence i is complete
//   (in any order), and batch_progress(run, in_flight, sampled) as often as it likes (at most 4 lines
//   a second are printed); sampled = tokens sampled so far over all sequences, EOS included.
// The paged cache of ./dsv2cu keeps a sequence's rows in blocks of KV_BLOCK tokens: a sequence of
// context ctx takes ceil(ctx / KV_BLOCK) blocks of n_layers x KV_BLOCK x kv_row_width values (4 bytes
// each, 2 with --kv bf16). ./dsv2 does not page: each sequence has a RunState of its own.
#define KV_BLOCK 64  // tokens per block (page) of ./dsv2cu's paged cache

typedef struct {
    int *ids;       // the prompt's token ids (BOS first when the tokenizer adds one)
    int n_ids;
    int *out;       // the generated ids, EOS excluded (room for min(n_new, max_position_embeddings - n_ids + 1))
    int n_out;      // how many: set by the run
    int eos;        // 1 when the sequence ended with EOS: set by the run
} BatchSeq;

typedef struct {
    float temperature, topp;  // -t, -p, as sample() takes them (temperature 0: greedy)
    uint64_t seed;            // -s: sequence i samples with batch_seed(seed, i)
    int n_new;                // -n: the most tokens one sequence generates
    int max_batch;            // --batch B (./dsv2cu): sequences in flight at once; 0: not given (./dsv2: one at a time)
    int kv_bf16, kv_mha;      // --kv bf16, --kv-layout mha (KvFormat)
    double kv_mem_gib;        // --kv-mem GIB (./dsv2cu): the paged cache's size; 0: its default
    AttnForm form;            // -a (./dsv2, latent layout): how attention reads the cache
} BatchOptions;

typedef struct BatchRun BatchRun;  // the output side of a batch: JSON lines and the progress line
static void batch_finished(BatchRun *run, int i);
static void batch_progress(BatchRun *run, int in_flight, long sampled);
static void batch_run_cpu(const Model *m, BatchSeq *seqs, int n, const BatchOptions *o, int eos_id, BatchRun *run);
#ifdef DSV2_GPU
static void batch_run_gpu(const Model *m, BatchSeq *seqs, int n, const BatchOptions *o, int eos_id, BatchRun *run);
#define DSV2_BATCH batch_run_gpu
#else
#define DSV2_BATCH batch_run_cpu
#endif

// Sequence i's sampler seed: splitmix64 of (seed, i), halved into 1..2^63-1 so that it is a valid -s:
// ./dsv2 -m generate -s batch_seed(seed, i) samples what sequence i of -m batch -s seed samples.
// Never 0, where xorshift would stay.
static uint64_t batch_seed(uint64_t seed, int i) {
    uint64_t z = seed + (uint64_t)(i + 1) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z = (z ^ (z >> 31)) >> 1;
    return z ? z : 1;
}

// ./dsv2's engine: one sequence after another, each as generate_ids runs it, in a run state of its own
static void batch_run_cpu(const Model *m, BatchSeq *seqs, int n, const BatchOptions *o, int eos_id, BatchRun *run) {
    const Config *c = &m->config;
    KvFormat kv = {o->kv_bf16, o->kv_mha};
    int *order = (int *)xcalloc(c->vocab_size, sizeof(int));
    long sampled = 0;
    for (int i = 0; i < n; i++) {
        BatchSeq *q = &seqs[i];
        RunState s;
        runstate_init_kv(&s, c, context_for(c, q->n_ids, o->n_new), kv);
        Sampler sp = {o->temperature, o->topp, batch_seed(o->seed, i), order};
        int pos = prefill(m, &s, q->ids, q->n_ids - 1, 0, o->form), token = q->ids[pos];
        q->n_out = q->eos = 0;
        while (pos < s.seq_len && q->n_out < o->n_new) {
            float *logits = forward_token(m, &s, token, pos, o->form);
            check_logits(logits, c->vocab_size, pos++);
            token = sample(&sp, logits, c->vocab_size);
            batch_progress(run, 1, ++sampled);
            if (token == eos_id) { q->eos = 1; break; }
            q->out[q->n_out++] = token;
        }
        runstate_free(&s);
        batch_finished(run, i);
    }
    free(order);
}

// The prompt file: one prompt per line (also a last line without a newline; a \r before the newline
// is dropped), `\n` in a line a newline and `\\` a backslash. A blank line, a zero byte, invalid UTF-8
// or another backslash stops with one error line naming the line. Returns the n >= 1 prompts.
static char **batch_read_prompts(const char *path, int *n_prompts) {
    size_t len;
    char *buf = read_file_bytes(path, "prompt file", &len), **prompts = NULL;
    int n = 0;
    for (size_t start = 0; start < len;) {
        const char *line = buf + start, *nl = (const char *)memchr(line, '\n', len - start);
        size_t k = nl ? (size_t)(nl - line) : len - start;
        start += k + 1;
        if (k > 0 && line[k - 1] == '\r') k--;
        int number = n + 1;
        if (memchr(line, 0, k)) die("-f %s, line %d: holds a zero byte; expected text", path, number);
        long bad = utf8_invalid_offset(line, k);
        if (bad >= 0) die("-f %s, line %d: invalid UTF-8 at byte %ld of the line (byte 0x%02x)", path, number, bad + 1,
                          (unsigned char)line[bad]);
        size_t blank = 0;
        while (blank < k && (line[blank] == ' ' || line[blank] == '\t')) blank++;
        if (blank == k) die("-f %s, line %d is blank; every line is a prompt (a newline inside one is written \\n)", path, number);
        char *prompt = (char *)xcalloc(k + 1, 1);
        size_t m = 0;
        for (size_t j = 0; j < k; j++) {
            if (line[j] != '\\') { prompt[m++] = line[j]; continue; }
            if (j + 1 < k && (line[j + 1] == 'n' || line[j + 1] == '\\')) prompt[m++] = line[++j] == 'n' ? '\n' : '\\';
            else die("-f %s, line %d: a backslash at byte %zu not followed by n or \\ (in a prompt \\n is a newline, "
                     "\\\\ a backslash)", path, number, j + 1);
        }
        prompt[m] = '\0';
        prompts = (char **)realloc(prompts, (size_t)(n + 1) * sizeof(char *));
        if (!prompts) die("out of memory reading %s", path);
        prompts[n++] = prompt;
    }
    free(buf);
    if (n == 0) die("-f %s holds no prompts (one per line)", path);
    *n_prompts = n;
    return prompts;
}

struct BatchRun {
    FILE *out;                 // the JSON lines (NULL: none, as in test_all)
    int progress;              // 1: the progress line on stderr
    Tokenizer *tok;
    char *const *prompts;      // (n) the prompts' texts
    const BatchSeq *seqs;      // (n)
    int n, n_done, n_written;  // sequences; finished; written out (in input order)
    char *done;                // (n) 1 once sequence i has finished
    long sampled;              // tokens sampled so far, as batch_progress last heard
    double t0, last_print;     // when the run started; when the progress line was last printed
    int printed;               // 1 once the progress line has been printed
};

// s (n bytes of UTF-8) as a JSON string: quotes, backslashes and control characters escaped
static void json_string(FILE *f, const char *s, size_t n) {
    fputc('"', f);
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)s[i];
        if (ch == '"' || ch == '\\') fprintf(f, "\\%c", ch);
        else if (ch == '\n') fputs("\\n", f);
        else if (ch == '\t') fputs("\\t", f);
        else if (ch == '\r') fputs("\\r", f);
        else if (ch < 0x20 || ch == 0x7f) fprintf(f, "\\u%04x", ch);
        else fputc(ch, f);
    }
    fputc('"', f);
}

// sequence i's JSON line; the completion decoded as generate_ids prints it
static void batch_write_json(BatchRun *run, int i) {
    const BatchSeq *q = &run->seqs[i];
    char *text = NULL;
    size_t len = 0;
    FILE *mem = open_memstream(&text, &len);
    if (!mem) die("out of memory writing the output of prompt %d", i);
    DecodeState ds;
    memset(&ds, 0, sizeof(ds));
    for (int k = 0; k < q->n_out; k++) put_token(run->tok, &ds, q->out[k], mem);
    tokenizer_flush(run->tok, &ds, mem);
    fclose(mem);
    fprintf(run->out, "{\"id\": %d, \"prompt\": ", i);
    json_string(run->out, run->prompts[i], strlen(run->prompts[i]));
    fprintf(run->out, ", \"completion\": ");
    json_string(run->out, text, len);
    fprintf(run->out, ", \"prompt_tokens\": %d, \"completion_tokens\": %d}\n", q->n_ids, q->n_out);
    free(text);
}

// sequence i is complete: every JSON line that can now go out in input order goes out
static void batch_finished(BatchRun *run, int i) {
    if (i < 0 || i >= run->n || run->done[i]) die("batch: sequence %d finished twice, or there is no such sequence", i);
    run->done[i] = 1;
    run->n_done++;
    for (; run->n_written < run->n && run->done[run->n_written]; run->n_written++)
        if (run->out) batch_write_json(run, run->n_written);
    if (run->out) fflush(run->out);
}

// the progress line on stderr, rewritten in place: sequences done, in flight, tokens sampled per second
static void batch_progress(BatchRun *run, int in_flight, long sampled) {
    run->sampled = sampled;
    double t = now_s();
    if (!run->progress || t - run->last_print < 0.25) return;
    run->last_print = t;
    run->printed = 1;
    fprintf(stderr, "\rbatch: %d/%d done, %d in flight, %ld tokens, %.1f tok/s   ", run->n_done, run->n, in_flight,
            sampled, sampled / (t - run->t0 + 1e-9));
}

// -m batch: every prompt read and checked before anything runs, then DSV2_BATCH, then the summary
static void batch_cli(const Model *m, Tokenizer *tok, const char *path, const BatchOptions *o) {
    const Config *c = &m->config;
    int n;
    char **prompts = batch_read_prompts(path, &n);
    BatchSeq *seqs = (BatchSeq *)xcalloc(n, sizeof(BatchSeq));
    long prompt_tokens = 0, generated = 0;
    for (int i = 0; i < n; i++) {
        BatchSeq *q = &seqs[i];
        q->ids = tokenizer_encode(tok, prompts[i], strlen(prompts[i]), tok->add_bos, &q->n_ids);
        if (q->n_ids == 0) die("-f %s, line %d: the prompt gives no tokens", path, i + 1);
        if (q->n_ids > c->max_position_embeddings)
            die("-f %s, line %d: the prompt is %d tokens, longer than the model's context of %d", path, i + 1, q->n_ids,
                c->max_position_embeddings);
        int room = c->max_position_embeddings - q->n_ids + 1;
        q->out = (int *)xcalloc(o->n_new < room ? o->n_new : room, sizeof(int));
        prompt_tokens += q->n_ids;
    }
    BatchRun run = {.out = stdout, .progress = 1, .tok = tok, .prompts = prompts, .seqs = seqs, .n = n,
                    .done = (char *)xcalloc(n, 1), .t0 = now_s()};
    run.last_print = run.t0;
    DSV2_BATCH(m, seqs, n, o, tok->eos_id, &run);
    if (run.n_written != n) die("batch: %d of %d sequences never finished", n - run.n_written, n);
    double secs = now_s() - run.t0;
    for (int i = 0; i < n; i++) generated += seqs[i].n_out + seqs[i].eos;
    fprintf(stderr, "%sbatch: %d sequences, %ld prompt tokens, %ld tokens generated in %.2f s: %.1f tok/s\n",
            run.printed ? "\r" : "", n, prompt_tokens, generated, secs, generated / (secs > 0 ? secs : 1e-9));
    KvFormat kv = {o->kv_bf16, o->kv_mha};
    print_kv_cache_size(c, kv);
    print_memory_summary(m);
    for (int i = 0; i < n; i++) { free(prompts[i]); free(seqs[i].ids); free(seqs[i].out); }
    free(prompts);
    free(seqs);
    free(run.done);
}

// ----------------------------------------------------------------------------
// ---------------- The command line

#ifdef DSV2_GPU
#define PROGRAM "./dsv2cu"
#else
#define PROGRAM "./dsv2"
#endif

static void error_usage(FILE *out, int status) {
    fprintf(out,
        "usage: " PROGRAM " MODEL [options]          generate from a dsv2 model file (export.py makes one)\n"
        "       " PROGRAM " -m encode|decode -i TEXT [-z TOK]   tokenizer only, no model file\n"
        "options ([modes] where an option has an effect; elsewhere it is refused):\n"
        "  -z TOK        tokenizer file (default: tokenizer.bin)\n"
        "  -i TEXT       the prompt, the text or the ids (default prompt: \"%s\")\n"
        "  -f FILE       read the input text from FILE instead; -m batch: the prompts, one a line\n"
        "                (\\n in a line is a newline, \\\\ a backslash)\n"
        "  -m MODE       generate | chat | ppl | batch | encode | decode (default generate);\n"
        "                batch: every prompt of -f FILE, one JSON line each on stdout\n"
        "  -n N          [generate, chat, batch] new tokens, per answer in chat, 0..16777216;\n"
        "                0 = only read the prompt (default 256)\n"
        "  -t TEMP       [generate, chat, batch] temperature in [0, 100], 0 = greedy (default 1.0)\n"
        "  -p TOPP       [generate, chat, batch; -t > 0] top-p threshold in (0, 1], 1 = off\n"
        "                (default 0.9)\n"
        "  -s SEED       [generate, chat, batch; -t > 0] random seed >= 1 (default: the time);\n"
        "                batch: prompt i samples with its own seed, derived from SEED and i\n"
        "  -y SYSTEM     [chat] system prompt\n"
        "  --ctx N       [chat, ppl] context of N >= 2 tokens (default: the model's; chat\n"
        "                at most 4096); ppl reads the text in windows of N\n"
        "  -a FORM       [generate, chat, ppl, batch] attention form: absorbed (paper Appendix C,\n"
        "                default) | naive (eqs. 10-11)\n"
        "  --kv f32|bf16 [generate, chat, ppl, batch] cache values in float32 (default) or\n"
        "                rounded to bf16\n"
        "  --kv-layout latent|mha   [generate, chat, ppl, batch] cache the latent (default) or\n"
        "                every head's key and value, as multi-head attention would (no -a then)\n"
        "  --batch B     [batch, ./dsv2cu only] sequences in flight at once (default 64)\n"
        "  --kv-mem GIB  [batch, ./dsv2cu only] GiB for the paged KV cache (default: 90%% of the GPU's\n"
        "                free memory less 2 GiB, at most what the sequences in flight can use)\n"
        "  --dump-logits FILE   [generate, chat] every position's logits, float32 [pos][vocab]\n"
        "  --threads N   [generate, chat, ppl, batch] OpenMP threads (default: all cores, or\n"
        "                OMP_NUM_THREADS)\n"
        "teaching (docs/WORKSHOP.md):\n"
        "  -m ppl        perplexity and bits per byte of the text (-f FILE or -i TEXT)\n"
        "  --trace FILE  [generate, chat, ppl] each equation's tensor per layer and position\n"
        "                (- = stderr)\n"
        "  --trace-pos P,Q    with --trace or --routing-out: only these positions (default all)\n"
        "  --routing-out FILE.csv  [generate, chat, ppl] chosen experts and gate values\n"
        "  --kv-table    the paper's Table 1 for this model (KV cache of MHA/GQA/MQA/MLA); alone\n"
        "  --mem GIB     [--kv-table] tokens that fit in GIB GiB, > 0 (default 1)\n"
        "ablation knobs [generate, chat, ppl] (change the model; the defaults are its config):\n"
        "  --topk K      routed experts per token, K_r, 1..n_routed_experts\n"
        "  --topk-group G     groups kept by device-limited routing, 1..n_group\n"
        "  --no-shared   drop the shared experts;  --no-routed: drop the routed experts\n"
        "  --no-yarn     plain RoPE and softmax scale, even beyond the trained context\n"
        "./dsv2cu, the GPU build, refuses what it cannot do: -m ppl, -a naive, --trace,\n"
        "--trace-pos, --routing-out and the knobs (use ./dsv2 for those); --kv and\n"
        "--kv-layout only with -m batch.\n",
        "Once upon a time");
    exit(status);
}

// a command line dsv2 cannot make sense of: one line that says why, and where the usage is
static void usage_error(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void usage_error(const char *fmt, ...) {
    va_list ap; va_start(ap, fmt);
    fprintf(stderr, "dsv2: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "; see " PROGRAM " -h\n");
    va_end(ap);
    exit(1);
}

static float parse_float(const char *flag, const char *v, float lo, float hi) {
    char *end;
    errno = 0;
    float x = strtof(v, &end);
    if (errno || *end || end == v || !(x >= lo && x <= hi))
        die("%s expects a number in [%g, %g], got '%s'", flag, lo, hi, v);
    return x;
}

static long parse_int(const char *flag, const char *v, long lo, long hi) {
    char *end;
    errno = 0;
    long x = strtol(v, &end, 10);
    if (errno || *end || end == v || x < lo || x > hi) die("%s expects an integer in [%ld, %ld], got '%s'", flag, lo, hi, v);
    return x;
}

// Every option, whether a value follows it, the modes in which it has an effect (given in any
// other it is refused: it would be silently ignored) and which build implements it: on_gpu 0 only
// ./dsv2, 1 both, GPU_ONLY only ./dsv2cu.
enum { GENERATE = 1, CHAT = 2, PPL = 4, TOKENIZER = 8, KV_TABLE = 16, BATCH = 32 };
enum { GPU_ONLY = 2 };
typedef struct { const char *name; int takes_value, modes, on_gpu; } Option;
static const Option options[] = {
    {"-z", 1, GENERATE | CHAT | PPL | TOKENIZER | BATCH, 1},  {"-i", 1, GENERATE | CHAT | PPL | TOKENIZER, 1},
    {"-f", 1, GENERATE | CHAT | PPL | TOKENIZER | BATCH, 1},  {"-m", 1, GENERATE | CHAT | PPL | TOKENIZER | BATCH, 1},
    {"-n", 1, GENERATE | CHAT | BATCH, 1},  {"-t", 1, GENERATE | CHAT | BATCH, 1},  {"-p", 1, GENERATE | CHAT | BATCH, 1},
    {"-s", 1, GENERATE | CHAT | BATCH, 1},  {"-y", 1, CHAT, 1},  {"--ctx", 1, CHAT | PPL, 1},
    {"-a", 1, GENERATE | CHAT | PPL | BATCH, 1},  {"--dump-logits", 1, GENERATE | CHAT, 1},
    {"--kv", 1, GENERATE | CHAT | PPL | BATCH, 1},  {"--kv-layout", 1, GENERATE | CHAT | PPL | BATCH, 1},
    {"--batch", 1, BATCH, GPU_ONLY},  {"--kv-mem", 1, BATCH, GPU_ONLY},
    {"--trace", 1, GENERATE | CHAT | PPL, 0},  {"--trace-pos", 1, GENERATE | CHAT | PPL, 0},
    {"--routing-out", 1, GENERATE | CHAT | PPL, 0},  {"--kv-table", 0, KV_TABLE, 1},  {"--mem", 1, KV_TABLE, 1},
    {"--topk", 1, GENERATE | CHAT | PPL, 0},  {"--topk-group", 1, GENERATE | CHAT | PPL, 0},
    {"--no-shared", 0, GENERATE | CHAT | PPL, 0},  {"--no-routed", 0, GENERATE | CHAT | PPL, 0},
    {"--no-yarn", 0, GENERATE | CHAT | PPL, 0},  {"--threads", 1, GENERATE | CHAT | PPL | BATCH, 0},
};
#define N_OPTIONS (int)(sizeof(options) / sizeof(options[0]))

static int option_index(const char *name) {
    for (int k = 0; k < N_OPTIONS; k++) if (!strcmp(options[k].name, name)) return k;
    return -1;
}

#ifndef DSV2_NO_MAIN
int main(int argc, char **argv) {
    const char *model_path = NULL, *tok_path = "tokenizer.bin", *prompt = NULL, *system = NULL, *mode = "generate";
    float temperature = 1.0f, topp = 0.9f;
    long seed = 0;
    GenOptions opt = {NULL, ATTN_ABSORBED, 256, 0, NULL, {0, 0}};
    int max_batch = 0;      // --batch (./dsv2cu)
    double kv_mem_gib = 0;  // --kv-mem (./dsv2cu)
    TeachOptions teach;
    memset(&teach, 0, sizeof(teach));
    teach.mem_gib = 1.0;
    if (argc < 2) error_usage(stderr, 1);
    int given[N_OPTIONS] = {0};
    for (int i = 1; i < argc; i++) {
        const char *flag = argv[i];
        if (!strcmp(flag, "-h") || !strcmp(flag, "--help")) error_usage(stdout, 0);
        if (flag[0] != '-') {  // the model file, once
            if (model_path) usage_error("unexpected argument '%s' (the model file is %s)", flag, model_path);
            model_path = flag;
            continue;
        }
        int k = option_index(flag);
        if (k < 0) usage_error("unknown option %s", flag);
        given[k] = 1;
        if (!options[k].takes_value) { teach_switch(&teach, flag); continue; }
        if (i + 1 >= argc) usage_error("%s needs a value", flag);
        const char *v = argv[++i];
        if (teach_flag(&teach, flag, v)) continue;
        if (!strcmp(flag, "-z")) tok_path = v;
        else if (!strcmp(flag, "-i")) prompt = v;
        else if (!strcmp(flag, "-t")) temperature = parse_float("-t", v, 0.0f, 100.0f);
        else if (!strcmp(flag, "-p")) {
            topp = parse_float("-p", v, 0.0f, 1.0f);
            if (topp == 0.0f) die("-p expects a number in (0, 1], got '%s'", v);
        }
        else if (!strcmp(flag, "-s")) seed = parse_int("-s", v, 1, 0x7fffffffffffffffL);
        else if (!strcmp(flag, "-n")) opt.n_new = (int)parse_int("-n", v, 0, 1 << 24);
        else if (!strcmp(flag, "-m")) mode = v;
        else if (!strcmp(flag, "-y")) system = v;
        else if (!strcmp(flag, "--dump-logits")) opt.dump_logits = v;
        else if (!strcmp(flag, "--threads")) {
            int threads = (int)parse_int("--threads", v, 1, 4096);
#ifdef _OPENMP
            omp_set_num_threads(threads);
#else
            (void)threads;
#endif
        }
        else if (!strcmp(flag, "-a")) {
            if (!strcmp(v, "absorbed")) opt.form = ATTN_ABSORBED;
            else if (!strcmp(v, "naive")) opt.form = ATTN_NAIVE;
            else die("-a expects absorbed or naive, got '%s'", v);
        }
        else if (!strcmp(flag, "--kv")) {
            if (!strcmp(v, "f32")) opt.kv.bf16 = 0;
            else if (!strcmp(v, "bf16")) opt.kv.bf16 = 1;
            else die("--kv expects f32 or bf16, got '%s'", v);
        }
        else if (!strcmp(flag, "--kv-layout")) {
            if (!strcmp(v, "latent")) opt.kv.mha = 0;
            else if (!strcmp(v, "mha")) opt.kv.mha = 1;
            else die("--kv-layout expects latent or mha, got '%s'", v);
        }
        else if (!strcmp(flag, "--batch")) max_batch = (int)parse_int("--batch", v, 1, 65536);
        else if (!strcmp(flag, "--kv-mem")) kv_mem_gib = parse_float("--kv-mem", v, 1e-3f, 1e6f);
    }
    int is_gen = !strcmp(mode, "generate"), is_chat = !strcmp(mode, "chat"), is_ppl = !strcmp(mode, "ppl");
    int is_batch = !strcmp(mode, "batch");
    if (!is_gen && !is_chat && !is_ppl && !is_batch && strcmp(mode, "encode") && strcmp(mode, "decode"))
        die("-m expects generate, chat, ppl, batch, encode or decode, got '%s'", mode);

    // what each mode reads, and the options that would have no effect in it
    int mode_bit = teach.kv_table ? KV_TABLE : is_gen ? GENERATE : is_chat ? CHAT : is_ppl ? PPL : is_batch ? BATCH : TOKENIZER;
    char mode_text[32];
    if (teach.kv_table) snprintf(mode_text, sizeof(mode_text), "--kv-table");
    else snprintf(mode_text, sizeof(mode_text), "-m %s", mode);
    for (int k = 0; k < N_OPTIONS; k++)
        if (given[k] && !(options[k].modes & mode_bit)) usage_error("%s has no effect with %s", options[k].name, mode_text);
    if (mode_bit == TOKENIZER && model_path) usage_error("%s reads no model file (got %s)", mode_text, model_path);
    if (mode_bit != TOKENIZER && !model_path) usage_error("no model file given (it comes first: " PROGRAM " MODEL ...)");
    if (temperature == 0.0f && given[option_index("-p")]) usage_error("-p has no effect with -t 0 (greedy)");
    if (temperature == 0.0f && given[option_index("-s")]) usage_error("-s has no effect with -t 0 (greedy)");
    if (given[option_index("--trace-pos")] && !teach.trace_path && !teach.routing_out)
        usage_error("--trace-pos has no effect without --trace or --routing-out");
    if (opt.kv.mha && given[option_index("-a")])
        usage_error("-a has no effect with --kv-layout mha (its attention reads the cached keys and values)");
    if (is_batch && !teach.text_file) usage_error("-m batch needs the prompt file: -f PROMPTS (one prompt a line)");
#ifndef DSV2_GPU
    for (int k = 0; k < N_OPTIONS; k++)
        if (given[k] && options[k].on_gpu == GPU_ONLY)
            die("%s is implemented by ./dsv2cu only (./dsv2 runs the sequences one after another)", options[k].name);
#else
    if (!is_batch && (given[option_index("--kv")] || given[option_index("--kv-layout")]))
        die("%s is implemented by ./dsv2cu with -m batch only: run ./dsv2 for it",
            given[option_index("--kv")] ? "--kv" : "--kv-layout");
    // what the GPU path does not implement is refused, never ignored or run on the CPU instead
    for (int k = 0; k < N_OPTIONS; k++)
        if (given[k] && !options[k].on_gpu) die("%s is not implemented by ./dsv2cu (the GPU build): run ./dsv2 for it", options[k].name);
    if (is_ppl) die("-m ppl is not implemented by ./dsv2cu (the GPU build): run ./dsv2 for it");
    if (opt.form == ATTN_NAIVE) die("-a naive is not implemented by ./dsv2cu, which runs the absorbed form: run ./dsv2 for it");
#endif

    size_t text_len = 0;
    char *text = teach.text_file && !is_batch ? read_text_file(teach.text_file, &text_len) : NULL;  // batch: its own reader
    if (text && prompt) die("-f %s and -i: give the input text one way", teach.text_file);
    if (text) prompt = text;
    else if (prompt) text_len = strlen(prompt);
    Tokenizer tok;
    if (mode_bit == TOKENIZER) {
        if (!prompt) die("-m %s needs -i TEXT", mode);
        tokenizer_load(&tok, tok_path);
        tokenizer_cli(&tok, mode, prompt);
        tokenizer_free(&tok);
        free(text);
        return 0;
    }
    Model model;
    model_load(&model, model_path);
#ifdef DSV2_GPU
    gpu_check_model(&model);
#endif
    knobs_apply(&model.config, &teach.knobs);
    if (teach.kv_table) {
        print_kv_table(&model.config, teach.mem_gib);
        model_free(&model);
        return 0;
    }
    tokenizer_load(&tok, tok_path);
    if (tok.vocab_size > model.config.vocab_size)
        die("tokenizer %s has %d tokens, model %s only %d: they do not belong together", tok_path, tok.vocab_size,
            model_path, model.config.vocab_size);
    Trace trace;
    opt.trace = teach_trace(&trace, &teach, &tok);
    opt.ctx = teach.ctx;
    if (is_ppl) {
        if (!prompt) die("-m ppl needs the text: -f FILE or -i TEXT");
        int window = teach.ctx ? teach.ctx : model.config.max_position_embeddings;
        if (window > model.config.max_position_embeddings)
            die("--ctx %d is longer than the model's context of %d", window, model.config.max_position_embeddings);
        ppl_cli(&model, &tok, prompt, text_len, teach.text_file ? teach.text_file : "-i text", window, &opt);
    }
    Sampler sp = {temperature, topp, (uint64_t)(seed ? seed : (long)time(NULL)), NULL};
    sp.order = (int *)xcalloc(model.config.vocab_size, sizeof(int));
    if (is_gen) generate(&model, &tok, &sp, prompt ? prompt : "Once upon a time", &opt);
    else if (is_chat) chat(&model, &tok, &sp, prompt, system, &opt);
    else if (is_batch) {
        BatchOptions bo = {temperature, topp, sp.rng_state, opt.n_new, max_batch, opt.kv.bf16, opt.kv.mha, kv_mem_gib, opt.form};
        batch_cli(&model, &tok, teach.text_file, &bo);
    }
    if (opt.trace && opt.trace->out && opt.trace->out != stderr) fclose(opt.trace->out);
    if (opt.trace && opt.trace->routing_csv) fclose(opt.trace->routing_csv);
    free(text);
    free(sp.order);
    model_free(&model);
    tokenizer_free(&tok);
    return 0;
}
#endif
