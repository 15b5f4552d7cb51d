/* dsv2.cu: DeepSeek-V2 inference on an NVIDIA Hopper GPU (sm_90), next to dsv2.c.
 *
 * The loader, tokenizer, sampler, generation loop and command line are dsv2.c's: this file
 * includes it with DSV2_GPU defined, which points the generation loop's two hooks at
 * forward_gpu() (one token, the decode step, replayed as a CUDA graph) and prefill_gpu()
 * (the prompt, one pass per layer with cuBLAS matrix products). Same model file, same flags.
 *
 * On the GPU: weights in bf16 (fp32 files are rounded at upload), the latent KV cache in float32
 * [layers][seq][kv_lora_rank + qk_rope_head_dim], activations and accumulation in float32.
 * Why a float32 cache: a bf16 cache perturbs the logits by about 2e-3 of their scale, and on the
 * default model that flipped greedy decoding at step 4, where the two best logits were 0.006
 * apart (measured on an H100); with float32 the GPU computes what dsv2.c computes, token by token.
 * The cache still holds only the latent (576 values per token per layer for DeepSeek-V2).
 * Attention is always the absorbed form (paper Appendix C); -a naive is accepted and ignored.
 *
 * Build: nvcc -O3 -arch=sm_90 -o dsv2cu dsv2.cu -lcublas
 * Extra modes (before the usual flags): ./dsv2cu --gpu-check   exit 0 if a GPU is usable
 *                                      ./dsv2cu --bench MODEL  benchmarks (tools/bench_cuda.sh)
 */
#define DSV2_GPU
#define main dsv2_main  // dsv2.c's main is the CLI; ours adds --gpu-check and --bench first
#include "dsv2.c"
#undef main
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cublas_v2.h>
#include <vector>
#include <algorithm>

typedef __nv_bfloat16 bf16;

// ----------------------------------------------------------------------------
// ---------------- CUDA utilities

static void cuda_check(cudaError_t err, const char *what, const char *file, int line) {
    if (err != cudaSuccess) die("CUDA error at %s:%d (%s): %s", file, line, what, cudaGetErrorString(err));
}
#define cudaCheck(call) cuda_check((call), #call, __FILE__, __LINE__)
#define launchCheck() cuda_check(cudaGetLastError(), "kernel launch", __FILE__, __LINE__)
static void cublas_check(cublasStatus_t st, const char *what, const char *file, int line) {
    if (st != CUBLAS_STATUS_SUCCESS) die("cuBLAS error %d at %s:%d (%s)", (int)st, file, line, what);
}
#define cublasCheck(call) cublas_check((call), #call, __FILE__, __LINE__)

static int ceil_div(long a, long b) { return (int)((a + b - 1) / b); }

// float32 -> bf16, round to nearest even (the host side of the upload)
static uint16_t float_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffff) > 0x7f800000) return 0x7fc0;  // NaN
    return (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
    return v;
}
// sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the total
__device__ float block_sum(float v) {
    __shared__ float part[32];
    __syncthreads();  // part[] may still be read from a previous call
    v = warp_sum(v);
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = v;
    __syncthreads();
    float total = 0.0f;
    for (int i = 0; i < (int)(blockDim.x >> 5); i++) total += part[i];
    return total;
}

// unpack the two bf16 of a 32-bit word (low half first) to floats: a bf16 is the top half of a float
__device__ __forceinline__ float2 bf16x2_to_float2(uint32_t w) {
    return make_float2(__uint_as_float(w << 16), __uint_as_float(w & 0xffff0000u));
}

// One warp: dot(w[0..n), x[0..n)), w bf16, x float32; every lane gets the result.
// Trick: when n % 8 == 0 each lane loads 16 bytes (8 weights) at a time, and 4 such loads are
// issued before the first is used, so a warp keeps 2 KB of weights in flight.
__device__ float warp_dot(const bf16 *w, const float *x, int n) {
    int lane = threadIdx.x & 31;
    float acc = 0.0f;
    if ((n & 7) == 0) {
        const uint4 *w4 = (const uint4 *)w;
        const float4 *x4 = (const float4 *)x;
        int n8 = n >> 3, i = lane;
        for (; i + 96 < n8; i += 128) {
            uint4 v[4];
            #pragma unroll
            for (int u = 0; u < 4; u++) v[u] = __ldg(w4 + i + 32 * u);
            #pragma unroll
            for (int u = 0; u < 4; u++) {
                float4 xa = x4[2 * (i + 32 * u)], xb = x4[2 * (i + 32 * u) + 1];
                float2 a = bf16x2_to_float2(v[u].x), b = bf16x2_to_float2(v[u].y);
                float2 c = bf16x2_to_float2(v[u].z), d = bf16x2_to_float2(v[u].w);
                acc += a.x * xa.x + a.y * xa.y + b.x * xa.z + b.y * xa.w + c.x * xb.x + c.y * xb.y + d.x * xb.z + d.y * xb.w;
            }
        }
        for (; i < n8; i += 32) {
            uint4 v = __ldg(w4 + i);
            float4 xa = x4[2 * i], xb = x4[2 * i + 1];
            float2 a = bf16x2_to_float2(v.x), b = bf16x2_to_float2(v.y);
            float2 c = bf16x2_to_float2(v.z), d = bf16x2_to_float2(v.w);
            acc += a.x * xa.x + a.y * xa.y + b.x * xa.z + b.y * xa.w + c.x * xb.x + c.y * xb.y + d.x * xb.z + d.y * xb.w;
        }
    } else {
        for (int i = lane; i < n; i += 32) acc += __bfloat162float(w[i]) * x[i];
    }
    return warp_sum(acc);
}

__device__ __forceinline__ float silu_dev(float x) { return x / (1.0f + expf(-x)); }

// ----------------------------------------------------------------------------
// ---------------- The GPU state: weights, latent cache, activations

typedef struct {
    float *input_layernorm, *q_a_layernorm, *kv_a_layernorm, *post_attention_layernorm;  // float32 copies
    bf16 *q_a_proj, *q_proj, *kv_a_proj_with_mqa, *kv_b_proj, *o_proj;
    int is_moe;
    bf16 *gate;                          // router centroids (n_routed_experts, dim)
    bf16 *expert_gate, *expert_up;       // routed experts, contiguous: (n_routed_experts, mi, dim)
    bf16 *expert_down;                   // (n_routed_experts, dim, mi)
    bf16 *ffn_gate, *ffn_up, *ffn_down;  // the shared experts as one FFN, or the dense FFN: (w, dim), (w, dim), (dim, w)
    int ffn_width;                       // w: N_s * mi (0 without shared experts), or intermediate_size
} GpuLayer;

#define MLA_HEADS 16      // heads per block of mla_decode_kernel
#define MLA_TILE 32       // cache rows per shared-memory tile
#define MLA_THREADS 256
#define PF_MAX 2048       // prefill: tokens per pass (longer prompts take several)
#define PF_QUERIES 128    // prefill: queries per attention launch
#define PF_CHUNK 256      // prefill: cache rows per attention block

typedef struct {
    int ready, seq_len, n_sm;
    Config c;
    int W, qk_head, ffn_max;  // cache row width d_c + d_h^R; d_h + d_h^R; widest FFN
    bf16 *embed_tokens, *lm_head;
    float *norm;
    GpuLayer *layers;
    float *kv_cache;          // (n_layers, seq_len, W) float32: c^KV then k^R, exactly dsv2.c's kv_cache
    float *inv_freq;          // (d_h^R / 2), from dsv2.c's rope_init
    float rope_mscale, softmax_scale;
    int *step;                // device [token, pos]: the decode graph reads them, so one graph serves every step
    int *pf_step;             // device [unused, pos0] for the prefill
    // decode activations (one token)
    float *x, *xb, *c_q, *q, *kv_a, *q_lat, *o_lat, *o, *hb, *hb_shared, *logits;
    int *topk_idx; float *topk_w;
    float *route_logits;      // (PF_MAX, n_routed_experts) affinities u^T e_i for the router
    float *part_o, *part_ml;  // split-sequence partial results of the attention
    size_t part_elems;
    int dec_chunk, dec_splits;
    cudaStream_t stream;
    cudaGraphExec_t graph;
    cublasHandle_t blas;
    // prefill activations (PF_MAX tokens), allocated on the first prefill
    int pf_ready;
    int *pf_tokens, *pf_perm, *pf_inv;
    float *X, *Xb, *CQ, *Q, *KVA, *QLAT, *OLAT, *O, *G, *U, *Y, *WTS;
    float *H, *XG;            // SwiGLU output; the rows gathered by expert
    float *wscratch;          // one weight matrix widened to float32 for cuBLAS
    size_t wscratch_elems;
    int *IDX;
} Gpu;

static Gpu gpu;

// a weight tensor of n elements -> a new device buffer in bf16 (dst NULL) or into dst
static bf16 *upload_mat(Mat w, size_t n, bf16 *dst) {
    if (!dst) cudaCheck(cudaMalloc(&dst, n * sizeof(bf16)));
    if (w.bf16) {
        cudaCheck(cudaMemcpy(dst, w.data, n * sizeof(bf16), cudaMemcpyHostToDevice));
    } else {
        std::vector<uint16_t> tmp(n);
        for (size_t i = 0; i < n; i++) tmp[i] = float_to_bf16(((const float *)w.data)[i]);
        cudaCheck(cudaMemcpy(dst, tmp.data(), n * sizeof(bf16), cudaMemcpyHostToDevice));
    }
    return dst;
}

// a small vector (norm weights) -> device float32
static float *upload_vec(Mat w, size_t n) {
    std::vector<float> tmp(n);
    for (size_t i = 0; i < n; i++) tmp[i] = mat_at(w, i);
    float *dst;
    cudaCheck(cudaMalloc(&dst, n * sizeof(float)));
    cudaCheck(cudaMemcpy(dst, tmp.data(), n * sizeof(float), cudaMemcpyHostToDevice));
    return dst;
}

static float *dev_floats(size_t n) { float *p; cudaCheck(cudaMalloc(&p, (n ? n : 1) * sizeof(float))); return p; }
static bf16 *dev_bf16(size_t n) { bf16 *p; cudaCheck(cudaMalloc(&p, (n ? n : 1) * sizeof(bf16))); return p; }
static int *dev_ints(size_t n) { int *p; cudaCheck(cudaMalloc(&p, (n ? n : 1) * sizeof(int))); return p; }

// ----------------------------------------------------------------------------
// ---------------- Kernels (each with its launcher); T = tokens, grid.y (or grid.x) walks them

// embedding: one block per token, x[t] = embed_tokens[tokens[t]] (dim)
__global__ void embed_kernel(float *x, const bf16 *embed, const int *tokens, int dim) {
    int t = blockIdx.x;
    const bf16 *row = embed + (size_t)tokens[t] * dim;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) x[(size_t)t * dim + i] = __bfloat162float(row[i]);
}
static void embed_forward(float *x, const int *tokens, int T) {
    embed_kernel<<<T, 256, 0, gpu.stream>>>(x, gpu.embed_tokens, tokens, gpu.c.dim);
    launchCheck();
}

// RMSNorm: one block per token, out = x * rsqrt(mean(x^2) + eps) * w (n); out may be x
__global__ void rmsnorm_kernel(float *out, const float *x, const float *w, int n, float eps) {
    size_t t = blockIdx.x;
    x += t * n;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) ss += x[i] * x[i];
    float r = 1.0f / sqrtf(block_sum(ss) / n + eps);
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float v = w[i] * (x[i] * r);
        out[t * n + i] = v;
    }
}
static void rmsnorm_forward(float *out, const float *x, const float *w, int n, int T) {
    rmsnorm_kernel<<<T, 256, 0, gpu.stream>>>(out, x, w, n, gpu.c.rms_norm_eps);
    launchCheck();
}

// matrix-vector product for the decode step: one warp per output row,
// out[r] = (residual ? residual[r] : 0) + W[r,:] . x;  W (d,n) bf16 @ x (n,) -> out (d,)
// (residual == out fuses the residual add: each row is read and written by the same warp)
__global__ void matvec_kernel(float *out, const float *x, const bf16 *W, int n, int d, const float *residual) {
    int r = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (r >= d) return;
    float v = warp_dot(W + (size_t)r * n, x, n);
    if ((threadIdx.x & 31) == 0) out[r] = (residual ? residual[r] : 0.0f) + v;
}
static void matvec_forward(float *out, const float *x, const bf16 *W, int n, int d, const float *residual) {
    matvec_kernel<<<ceil_div(d, 8), 256, 0, gpu.stream>>>(out, x, W, n, d, residual);
    launchCheck();
}

// prefill matrix products with cuBLAS: Y (T, out) = beta*Y + X (T, in) @ W^T, W (out, in) bf16,
// X and Y float32. The weights are widened to float32 first (one pass over W into gpu.wscratch) and
// the product runs in float32 (no TF32): the activations keep float32 precision, so the prefill
// fills the cache with the values the CPU computes and greedy decoding agrees token by token.
// cuBLAS is column-major: there this is Y^T = W X^T with W read as the (in, out) matrix it is in memory.
__global__ void widen_kernel(float *dst, const bf16 *src, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        dst[i] = __bfloat162float(src[i]);
}
static void gemm_forward(float *Y, const float *X, const bf16 *W, int T, int in, int out, float beta) {
    float alpha = 1.0f;
    size_t n = (size_t)in * out;
    if (n > gpu.wscratch_elems) die("dsv2cu: internal: a %d x %d weight exceeds the prefill scratch", out, in);
    widen_kernel<<<1024, 256, 0, gpu.stream>>>(gpu.wscratch, W, n);
    launchCheck();
    cublasCheck(cublasGemmEx(gpu.blas, CUBLAS_OP_T, CUBLAS_OP_N, out, T, in, &alpha, gpu.wscratch, CUDA_R_32F, in,
                             X, CUDA_R_32F, in, &beta, Y, CUDA_R_32F, out, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

// this position's RoPE angle i, as dsv2.c's rope_position: cos/sin of (float)pos * inv_freq[i], times mscale
__device__ __forceinline__ void rope_cos_sin(int pos, const float *inv_freq, int i, float mscale, float *cs, float *sn) {
    float angle = (float)pos * inv_freq[i];
    *cs = (float)cos((double)angle) * mscale;
    *sn = (float)sin((double)angle) * mscale;
}

// the new cache row of each token: one block per token t at position pos0 + t.
// kv_a (T, W) = [W^DKV h ; W^KR h] -> cache[pos] = [RMSNorm(c^KV) ; RoPE(k^R)] (eqs. 9, 15)
__global__ void kv_latent_kernel(float *cache, const float *kv_a, const float *norm_w, const int *pos0,
                                 int d_c, int rope, float eps, const float *inv_freq, float mscale) {
    int t = blockIdx.x, W = d_c + rope, pos = *pos0 + t;
    const float *a = kv_a + (size_t)t * W;
    float *row = cache + (size_t)pos * W;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < d_c; i += blockDim.x) ss += a[i] * a[i];
    float r = 1.0f / sqrtf(block_sum(ss) / d_c + eps);
    for (int i = threadIdx.x; i < d_c; i += blockDim.x) row[i] = norm_w[i] * (a[i] * r);                    // eq. (9)
    for (int i = threadIdx.x; i < rope / 2; i += blockDim.x) {                                              // eq. (15)
        float cs, sn, x0 = a[d_c + 2 * i], x1 = a[d_c + 2 * i + 1];
        rope_cos_sin(pos, inv_freq, i, mscale, &cs, &sn);
        row[d_c + 2 * i] = x0 * cs - x1 * sn;
        row[d_c + 2 * i + 1] = x0 * sn + x1 * cs;
    }
}
static void kv_latent_forward(float *cache, const float *kv_a, const float *norm_w, const int *pos0, int T) {
    kv_latent_kernel<<<T, 256, 0, gpu.stream>>>(cache, kv_a, norm_w, pos0, gpu.c.kv_lora_rank, gpu.c.qk_rope_head_dim,
                                                gpu.c.rms_norm_eps, gpu.inv_freq, gpu.rope_mscale);
    launchCheck();
}

// The absorbed query (Appendix C): one thread per element c of q_lat[t][h] (W = d_c + d_h^R):
// c < d_c: (W^UK_h^T q_t,h^C)[c]; c >= d_c: q_t,h^R rotated (eq. 14). Then a head's score with
// cache row j is simply q_lat[t][h] . cache[j] (eqs. 10, 17 absorbed). Block (h, c-tile, t).
__global__ void q_absorb_kernel(float *q_lat, const float *q, const bf16 *kv_b, const int *pos0, int H, int d_c,
                                int nope, int rope, int vdim, const float *inv_freq, float mscale) {
    int h = blockIdx.x, c = blockIdx.y * blockDim.x + threadIdx.x, t = blockIdx.z, W = d_c + rope;
    if (c >= W) return;
    const float *qh = q + ((size_t)t * H + h) * (nope + rope);  // [q^C (nope) ; q^R (rope)], eq. (16)
    float out;
    if (c < d_c) {
        const bf16 *wk = kv_b + (size_t)h * (nope + vdim) * d_c + c;  // column c of W^UK_h (nope, d_c)
        out = 0.0f;
        for (int k = 0; k < nope; k++) out += __bfloat162float(wk[(size_t)k * d_c]) * qh[k];
    } else {
        int i = (c - d_c) / 2;
        float cs, sn, x0 = qh[nope + 2 * i], x1 = qh[nope + 2 * i + 1];
        rope_cos_sin(*pos0 + t, inv_freq, i, mscale, &cs, &sn);
        out = ((c - d_c) & 1) ? x0 * sn + x1 * cs : x0 * cs - x1 * sn;
    }
    q_lat[((size_t)t * H + h) * W + c] = out;
}
static void q_absorb_forward(float *q_lat, const float *q, const bf16 *kv_b, const int *pos0, int T) {
    const Config *c = &gpu.c;
    dim3 grid(c->n_heads, ceil_div(gpu.W, 128), T);
    q_absorb_kernel<<<grid, 128, 0, gpu.stream>>>(q_lat, q, kv_b, pos0, c->n_heads, c->kv_lora_rank, c->qk_nope_head_dim,
                                                  c->qk_rope_head_dim, c->v_head_dim, gpu.inv_freq, gpu.rope_mscale);
    launchCheck();
}

// MLA decode attention on the latent cache, the FlashMLA idea on CUDA cores.
// Grid (split, b, head group): a block owns rows [split*chunk, +chunk) of sequence b's cache and
// MLA_HEADS heads. Each cache row is read from device memory ONCE into shared memory and used by
// all those heads, both as key (scores against q_lat, eq. 17 absorbed) and as value (eq. 18 on
// the latent). Online softmax over the tiles; the block writes its partial (max m, sum l,
// unnormalised o_latent) and mla_combine_kernel merges the splits with log-sum-exp.
// Sequence b has len = lens ? lens[b] : *pos0 + len_offset + b + 1 rows (causal prefill: query b
// sees the rows up to its own position), its cache at cache + b * seq_stride.
// Threads: scores: thread = (row t = tid % 32, heads 2*(tid/32), +1); values: thread = latent
// columns 2*tid, 2*tid+1 for all heads (32 accumulators in registers). Shared-memory tile rows are
// padded to an odd number of 4-byte words so the 32 rows a warp reads sit in 32 different banks.
__global__ void __launch_bounds__(MLA_THREADS)
mla_decode_kernel(float *part_o, float *part_ml, const float *q_lat, const float *cache, size_t seq_stride,
                  const int *lens, const int *pos0, int len_offset, int H, int W, int d_c, int chunk, int n_split,
                  float scale) {
    const int HG = MLA_HEADS;
    int split = blockIdx.x, b = blockIdx.y, h0 = blockIdx.z * HG, tid = threadIdx.x;
    int nh = min(HG, H - h0);
    int len = lens ? lens[b] : *pos0 + len_offset + b + 1;
    int start = split * chunk, end = min(start + chunk, len);
    int half = W / 2, sw = half | 1;  // float pairs per row in memory / in shared memory (odd)
    extern __shared__ float smem[];
    float *q_s = smem;                                 // (HG, W) this block's queries
    float2 *tile = (float2 *)(q_s + HG * W);           // (MLA_TILE, sw) cache rows as float pairs
    float *p_s = (float *)(tile + MLA_TILE * sw);      // (MLA_TILE, HG) scores, then probabilities
    float *m_s = p_s + MLA_TILE * HG, *l_s = m_s + HG, *a_s = l_s + HG;  // running max, sum; rescale
    for (int i = tid; i < HG * W; i += MLA_THREADS) {
        int h = i / W;
        q_s[i] = h < nh ? q_lat[((size_t)b * H + h0 + h) * W + i % W] : 0.0f;
    }
    if (tid < HG) { m_s[tid] = -INFINITY; l_s[tid] = 0.0f; }
    float acc[HG][2];
    #pragma unroll
    for (int h = 0; h < HG; h++) acc[h][0] = acc[h][1] = 0.0f;
    const float *cb = cache + b * seq_stride;
    int lane = tid & 31, warp = tid >> 5, hA = 2 * warp;
    for (int t0 = start; t0 < end; t0 += MLA_TILE) {
        int rows = min(MLA_TILE, end - t0);
        __syncthreads();  // the previous tile is consumed (and q_s, m_s are written, first time)
        if ((W & 3) == 0) {  // 16-byte loads, coalesced: the tile's rows are contiguous in memory
            const float4 *src = (const float4 *)(cb + (size_t)t0 * W);
            int per_row = W / 4;
            #pragma unroll 4
            for (int i = tid; i < rows * per_row; i += MLA_THREADS) {
                float4 v = src[i];
                float2 *d = tile + (i / per_row) * sw + (i % per_row) * 2;
                d[0] = make_float2(v.x, v.y); d[1] = make_float2(v.z, v.w);
            }
        } else {
            const float2 *src = (const float2 *)(cb + (size_t)t0 * W);
            for (int i = tid; i < rows * half; i += MLA_THREADS) tile[(i / half) * sw + i % half] = src[i];
        }
        __syncthreads();
        // scores of row lane for heads hA, hA+1 (eqs. 10, 17 absorbed), times the softmax scale
        float sA = 0.0f, sB = 0.0f;
        if (lane < rows) {
            const float2 *row = tile + lane * sw;
            const float2 *qa = (const float2 *)(q_s + hA * W), *qb = (const float2 *)(q_s + (hA + 1) * W);
            for (int w = 0; w < half; w++) {
                float2 kv = row[w], a = qa[w], bb = qb[w];
                sA += a.x * kv.x + a.y * kv.y;
                sB += bb.x * kv.x + bb.y * kv.y;
            }
        }
        // online softmax: this warp's two heads, lane = row
        #pragma unroll
        for (int k = 0; k < 2; k++) {
            int h = hA + k;
            float s = lane < rows ? (k ? sB : sA) * scale : -INFINITY;
            float m_old = m_s[h], m_new = fmaxf(m_old, warp_max(s));  // finite: rows >= 1
            float p = lane < rows ? expf(s - m_new) : 0.0f;
            float sum = warp_sum(p);
            p_s[lane * HG + h] = p;
            if (lane == 0) {
                float a = expf(m_old - m_new);  // 0 on the first tile (m_old = -inf)
                a_s[h] = a; l_s[h] = l_s[h] * a + sum; m_s[h] = m_new;
            }
        }
        __syncthreads();
        // values: o_latent += p_j c_j for latent columns 2*tid, 2*tid+1 (eq. 18 on the latent)
        if (2 * tid < d_c) {
            #pragma unroll
            for (int h = 0; h < HG; h++) { acc[h][0] *= a_s[h]; acc[h][1] *= a_s[h]; }
            for (int r = 0; r < rows; r++) {
                float2 kv = tile[r * sw + tid];
                const float4 *p4 = (const float4 *)(p_s + r * HG);
                #pragma unroll
                for (int h4 = 0; h4 < HG / 4; h4++) {
                    float4 p = p4[h4];
                    acc[4 * h4 + 0][0] += p.x * kv.x; acc[4 * h4 + 0][1] += p.x * kv.y;
                    acc[4 * h4 + 1][0] += p.y * kv.x; acc[4 * h4 + 1][1] += p.y * kv.y;
                    acc[4 * h4 + 2][0] += p.z * kv.x; acc[4 * h4 + 2][1] += p.z * kv.y;
                    acc[4 * h4 + 3][0] += p.w * kv.x; acc[4 * h4 + 3][1] += p.w * kv.y;
                }
            }
        }
    }
    __syncthreads();
    size_t pb = ((size_t)b * n_split + split) * H + h0;  // (b, split, head) index of head h0
    if (2 * tid < d_c) {
        #pragma unroll
        for (int h = 0; h < HG; h++)
            if (h < nh) *(float2 *)(part_o + (pb + h) * d_c + 2 * tid) = make_float2(acc[h][0], acc[h][1]);
    }
    if (tid < nh) { part_ml[(pb + tid) * 2] = m_s[tid]; part_ml[(pb + tid) * 2 + 1] = l_s[tid]; }
}

// merge the splits: one block per (head, sequence), one thread per latent column.
// o_latent = sum_s e^(m_s - M) o_s / sum_s e^(m_s - M) l_s, M = max_s m_s (log-sum-exp merge)
__global__ void mla_combine_kernel(float *o_lat, const float *part_o, const float *part_ml, int H, int d_c, int n_split) {
    int h = blockIdx.x, b = blockIdx.y;
    float M = -INFINITY, L = 0.0f;
    for (int s = 0; s < n_split; s++) M = fmaxf(M, part_ml[(((size_t)b * n_split + s) * H + h) * 2]);
    for (int s = 0; s < n_split; s++) {
        const float *ml = part_ml + (((size_t)b * n_split + s) * H + h) * 2;
        L += ml[1] > 0.0f ? expf(ml[0] - M) * ml[1] : 0.0f;
    }
    for (int c = threadIdx.x; c < d_c; c += blockDim.x) {
        float o = 0.0f;
        for (int s = 0; s < n_split; s++) {
            size_t i = ((size_t)b * n_split + s) * H + h;
            if (part_ml[i * 2 + 1] > 0.0f) o += expf(part_ml[i * 2] - M) * part_o[i * d_c + c];
        }
        o_lat[((size_t)b * H + h) * d_c + c] = o / L;
    }
}

static void mla_config_check(const Config *c) {
    if (c->kv_lora_rank % 2 || c->kv_lora_rank > 2 * MLA_THREADS)
        die("dsv2cu: kv_lora_rank %d is not supported on the GPU (even, at most %d)", c->kv_lora_rank, 2 * MLA_THREADS);
}
static size_t mla_smem_bytes(int W) {
    return (size_t)MLA_HEADS * W * 4 + (size_t)MLA_TILE * ((W / 2) | 1) * 8 + MLA_TILE * MLA_HEADS * 4 + 3 * MLA_HEADS * 4;
}
// attention of B query sets (b = sequence or prefill query) -> o_lat (B, H, d_c)
static void mla_decode_forward(float *o_lat, const float *q_lat, const float *cache, size_t seq_stride, const int *lens,
                               const int *pos0, int len_offset, int B, int H, int W, int d_c, int chunk, int n_split,
                               float scale, float *part_o, float *part_ml) {
    dim3 grid(n_split, B, ceil_div(H, MLA_HEADS));
    size_t smem = mla_smem_bytes(W);
    mla_decode_kernel<<<grid, MLA_THREADS, smem, gpu.stream>>>(part_o, part_ml, q_lat, cache, seq_stride, lens, pos0,
                                                               len_offset, H, W, d_c, chunk, n_split, scale);
    launchCheck();
    mla_combine_kernel<<<dim3(H, B), 256, 0, gpu.stream>>>(o_lat, part_o, part_ml, H, d_c, n_split);
    launchCheck();
}

// W^UV applied once per head after the sum (eq. 11 absorbed): one warp per output,
// o[t][h*vdim + v] = W^UV_h[v,:] . o_lat[t][h]
__global__ void v_up_kernel(float *o, const float *o_lat, const bf16 *kv_b, int H, int d_c, int nope, int vdim) {
    int r = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), t = blockIdx.y;
    if (r >= H * vdim) return;
    int h = r / vdim, v = r % vdim;
    float val = warp_dot(kv_b + ((size_t)h * (nope + vdim) + nope + v) * d_c, o_lat + ((size_t)t * H + h) * d_c, d_c);
    if ((threadIdx.x & 31) == 0) o[(size_t)t * H * vdim + r] = val;
}
static void v_up_forward(float *o, const float *o_lat, const bf16 *kv_b, int T) {
    const Config *c = &gpu.c;
    v_up_kernel<<<dim3(ceil_div(c->n_heads * c->v_head_dim, 8), T), 256, 0, gpu.stream>>>(
        o, o_lat, kv_b, c->n_heads, c->kv_lora_rank, c->qk_nope_head_dim, c->v_head_dim);
    launchCheck();
}

// The router (eqs. 21-22). The affinities u^T e_i come from matvec (decode) or the prefill's
// product; then one warp per token takes dsv2.c's moe_route step by step: softmax, the
// topk_group best groups (device-limited routing), the top K_r experts, each choice a warp-wide
// argmax with the lowest index winning ties, so the GPU picks the same experts as the CPU.
// (A first version did all of this in one block with thread 0 running the loops: 51 us a layer.)
__device__ __forceinline__ void warp_argmax(float *v, int *i) {  // over the lanes' (v, i) pairs
    for (int o = 16; o > 0; o >>= 1) {
        float v2 = __shfl_xor_sync(0xffffffffu, *v, o);
        int i2 = __shfl_xor_sync(0xffffffffu, *i, o);
        if (v2 > *v || (v2 == *v && i2 < *i)) { *v = v2; *i = i2; }
    }
}
__global__ void moe_route_kernel(int *topk_idx, float *topk_w, const float *logits, int E, int K, int method,
                                 int n_group, int topk_group, int norm_topk_prob, float routed_scaling) {
    extern __shared__ float rs[];
    float *scores = rs;                            // (E)
    int *chosen = (int *)(scores + E);             // (E)
    float *group_score = (float *)(chosen + E);    // (n_group)
    int *taken = (int *)(group_score + n_group);   // (n_group)
    int t = blockIdx.x, lane = threadIdx.x;
    float max = -INFINITY, sum = 0.0f;             // eq. (22) s_i,t = softmax_i(u_t^T e_i)
    for (int i = lane; i < E; i += 32) { scores[i] = logits[(size_t)t * E + i]; max = fmaxf(max, scores[i]); chosen[i] = 0; }
    max = warp_max(max);
    for (int i = lane; i < E; i += 32) { scores[i] = expf(scores[i] - max); sum += scores[i]; }
    sum = warp_sum(sum);
    for (int i = lane; i < E; i += 32) scores[i] /= sum;
    __syncwarp();
    if (method == 1) {  // group_limited_greedy: a group's score is its best expert's
        int per = E / n_group;
        for (int g = lane; g < n_group; g += 32) {
            taken[g] = 0;
            group_score[g] = scores[g * per];
            for (int e = 1; e < per; e++) group_score[g] = fmaxf(group_score[g], scores[g * per + e]);
        }
        __syncwarp();
        for (int k = 0; k < topk_group; k++) {
            float v = -INFINITY; int best = 0x7fffffff;
            for (int g = lane; g < n_group; g += 32)
                if (!taken[g] && (group_score[g] > v || best == 0x7fffffff)) { v = group_score[g]; best = g; }
            warp_argmax(&v, &best);
            if (lane == 0) taken[best] = 1;
            __syncwarp();
        }
        for (int i = lane; i < E; i += 32) if (!taken[i / per]) scores[i] = 0.0f;  // dropped groups count as 0
        __syncwarp();
    }
    float wsum = 0.0f;
    for (int k = 0; k < K; k++) {                  // eq. (21) g_i,t: the top K_r
        float v = -INFINITY; int best = 0x7fffffff;
        for (int i = lane; i < E; i += 32)
            if (!chosen[i] && (scores[i] > v || best == 0x7fffffff)) { v = scores[i]; best = i; }
        warp_argmax(&v, &best);
        if (lane == 0) { chosen[best] = 1; topk_idx[t * K + k] = best; topk_w[t * K + k] = v; }
        wsum += v;
        __syncwarp();
    }
    if (lane < K) {
        if (norm_topk_prob && K > 1) topk_w[t * K + lane] /= wsum + 1e-20f;
        else topk_w[t * K + lane] *= routed_scaling;
    }
}
static void moe_route_forward(int *topk_idx, float *topk_w, const float *u, const bf16 *gate, int T) {
    const Config *c = &gpu.c;
    if (T == 1) matvec_forward(gpu.route_logits, u, gate, c->dim, c->n_routed_experts, NULL);
    else gemm_forward(gpu.route_logits, u, gate, T, c->dim, c->n_routed_experts, 0.0f);
    size_t smem = (2 * (size_t)c->n_routed_experts + 2 * c->n_group) * 4;
    moe_route_kernel<<<T, 32, smem, gpu.stream>>>(topk_idx, topk_w, gpu.route_logits, c->n_routed_experts,
                                                  c->n_experts_per_tok, c->topk_method, c->n_group, c->topk_group,
                                                  c->norm_topk_prob, c->routed_scaling_factor);
    launchCheck();
}

// gate/up/SwiGLU of the decode step, fused: one warp per (row r, slot k), reading only the
// selected experts' rows: hb[k][r] = silu(gate_e[r] . x) * (up_e[r] . x), e = idx ? idx[k] : 0
// (idx NULL: the shared experts or the dense FFN, one slot)
__global__ void moe_gate_up_kernel(float *hb, const float *x, const bf16 *Wg, const bf16 *Wu, const int *idx, int dim, int width) {
    int r = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), k = blockIdx.y;
    if (r >= width) return;
    size_t e = idx ? idx[k] : 0;
    float g = warp_dot(Wg + (e * width + r) * dim, x, dim);
    float u = warp_dot(Wu + (e * width + r) * dim, x, dim);
    if ((threadIdx.x & 31) == 0) hb[(size_t)k * width + r] = silu_dev(g) * u;
}
static void moe_gate_up_forward(float *hb, const float *x, const bf16 *Wg, const bf16 *Wu, const int *idx, int n_slots, int width) {
    moe_gate_up_kernel<<<dim3(ceil_div(width, 8), n_slots), 256, 0, gpu.stream>>>(hb, x, Wg, Wu, idx, gpu.c.dim, width);
    launchCheck();
}

// down projections of the decode step plus the residual, one warp per output row r (eq. 20):
// x[r] += sum_k g_k down_e_k[r] . hb[k]  +  down_shared[r] . hb_shared  (either part may be absent)
__global__ void moe_down_kernel(float *x, const bf16 *Wd, const int *idx, const float *w, const float *hb, int K, int mi,
                                const bf16 *Wsd, const float *hbs, int si, int dim) {
    int r = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (r >= dim) return;
    float acc = 0.0f;
    for (int k = 0; k < K; k++) acc += w[k] * warp_dot(Wd + ((size_t)idx[k] * dim + r) * mi, hb + (size_t)k * mi, mi);
    if (Wsd) acc += warp_dot(Wsd + (size_t)r * si, hbs, si);
    if ((threadIdx.x & 31) == 0) x[r] += acc;
}
static void moe_down_forward(float *x, const bf16 *Wd, const int *idx, const float *w, const float *hb, int K, int mi,
                             const bf16 *Wsd, const float *hbs, int si) {
    moe_down_kernel<<<ceil_div(gpu.c.dim, 8), 256, 0, gpu.stream>>>(x, Wd, idx, w, hb, K, mi, Wsd, hbs, si, gpu.c.dim);
    launchCheck();
}

// prefill SwiGLU, one thread per element: h = silu(g) * u
__global__ void swiglu_kernel(float *h, const float *g, const float *u, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) h[i] = silu_dev(g[i]) * u[i];
}
static void swiglu_forward(float *h, const float *g, const float *u, size_t n) {
    swiglu_kernel<<<ceil_div(n, 256), 256, 0, gpu.stream>>>(h, g, u, n);
    launchCheck();
}

// prefill MoE: rows grouped by expert. gather: one block per grouped row, xg[row] = xb[perm[row]]
__global__ void gather_rows_kernel(float *xg, const float *xb, const int *perm, int dim) {
    int row = blockIdx.x;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) xg[(size_t)row * dim + i] = xb[(size_t)perm[row] * dim + i];
}
// combine: one block per token, x[t] += sum_k g_t,k y[inv[t,k]] (fixed order: deterministic, no atomics)
__global__ void moe_combine_kernel(float *x, const float *y, const int *inv, const float *w, int K, int dim) {
    int t = blockIdx.x;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        float acc = 0.0f;
        for (int k = 0; k < K; k++) acc += w[t * K + k] * y[(size_t)inv[t * K + k] * dim + i];
        x[(size_t)t * dim + i] += acc;
    }
}

// ----------------------------------------------------------------------------
// ---------------- Setup: upload the model, allocate the cache and activations

static void gpu_init(const Model *m, int seq_len) {
    const Config *c = &m->config;
    Gpu *g = &gpu;
    if (g->ready) {
        if (seq_len != g->seq_len) die("dsv2cu: one context length per process (%d, then %d)", g->seq_len, seq_len);
        return;
    }
    int n_dev = 0;
    if (cudaGetDeviceCount(&n_dev) != cudaSuccess || n_dev == 0) die("dsv2cu: no CUDA GPU found");
    mla_config_check(c);
    g->c = *c;
    g->seq_len = seq_len;
    g->W = kv_cache_width(c);
    g->qk_head = c->qk_nope_head_dim + c->qk_rope_head_dim;
    int dim = c->dim, H = c->n_heads, E = c->n_routed_experts, mi = c->moe_intermediate_size;
    cudaCheck(cudaDeviceGetAttribute(&g->n_sm, cudaDevAttrMultiProcessorCount, 0));
    cudaCheck(cudaStreamCreate(&g->stream));
    cublasCheck(cublasCreate(&g->blas));
    cublasCheck(cublasSetStream(g->blas, g->stream));
    double t0 = now_s();
    g->embed_tokens = upload_mat(m->embed_tokens, (size_t)c->vocab_size * dim, NULL);
    g->lm_head = upload_mat(m->lm_head, (size_t)c->vocab_size * dim, NULL);
    g->norm = upload_vec(m->norm, dim);
    g->layers = (GpuLayer *)xcalloc(c->n_layers, sizeof(GpuLayer));
    g->ffn_max = c->intermediate_size > mi * c->n_shared_experts ? c->intermediate_size : mi * c->n_shared_experts;
    for (int l = 0; l < c->n_layers; l++) {
        const Layer *L = &m->layers[l];
        GpuLayer *G = &g->layers[l];
        G->input_layernorm = upload_vec(L->input_layernorm, dim);
        G->post_attention_layernorm = upload_vec(L->post_attention_layernorm, dim);
        G->kv_a_layernorm = upload_vec(L->kv_a_layernorm, c->kv_lora_rank);
        int q_in = c->q_lora_rank ? c->q_lora_rank : dim;
        if (c->q_lora_rank) {
            G->q_a_proj = upload_mat(L->q_a_proj, (size_t)c->q_lora_rank * dim, NULL);
            G->q_a_layernorm = upload_vec(L->q_a_layernorm, c->q_lora_rank);
        }
        G->q_proj = upload_mat(L->q_proj, (size_t)H * g->qk_head * q_in, NULL);
        G->kv_a_proj_with_mqa = upload_mat(L->kv_a_proj_with_mqa, (size_t)g->W * dim, NULL);
        G->kv_b_proj = upload_mat(L->kv_b_proj, (size_t)H * (c->qk_nope_head_dim + c->v_head_dim) * c->kv_lora_rank, NULL);
        G->o_proj = upload_mat(L->o_proj, (size_t)dim * H * c->v_head_dim, NULL);
        G->is_moe = L->is_moe;
        if (L->is_moe) {
            size_t ew = (size_t)mi * dim;
            G->gate = upload_mat(L->gate, (size_t)E * dim, NULL);
            G->expert_gate = dev_bf16(E * ew); G->expert_up = dev_bf16(E * ew); G->expert_down = dev_bf16(E * ew);
            for (int e = 0; e < E; e++) {
                upload_mat(L->experts[e].gate_proj, ew, G->expert_gate + e * ew);
                upload_mat(L->experts[e].up_proj, ew, G->expert_up + e * ew);
                upload_mat(L->experts[e].down_proj, ew, G->expert_down + e * ew);
            }
            G->ffn_width = mi * c->n_shared_experts;
            if (G->ffn_width) {
                G->ffn_gate = upload_mat(L->shared.gate_proj, (size_t)G->ffn_width * dim, NULL);
                G->ffn_up = upload_mat(L->shared.up_proj, (size_t)G->ffn_width * dim, NULL);
                G->ffn_down = upload_mat(L->shared.down_proj, (size_t)G->ffn_width * dim, NULL);
            }
        } else {
            G->ffn_width = c->intermediate_size;
            G->ffn_gate = upload_mat(L->dense.gate_proj, (size_t)G->ffn_width * dim, NULL);
            G->ffn_up = upload_mat(L->dense.up_proj, (size_t)G->ffn_width * dim, NULL);
            G->ffn_down = upload_mat(L->dense.down_proj, (size_t)G->ffn_width * dim, NULL);
        }
    }
    // RoPE / YaRN tables from dsv2.c's rope_init, so both paths rotate by the same angles
    RunState tmp;
    memset(&tmp, 0, sizeof tmp);
    tmp.inv_freq = (float *)xcalloc(c->qk_rope_head_dim / 2, sizeof(float));
    rope_init(&tmp, c);
    g->rope_mscale = tmp.rope_mscale;
    g->softmax_scale = tmp.softmax_scale;
    g->inv_freq = dev_floats(c->qk_rope_head_dim / 2);
    cudaCheck(cudaMemcpy(g->inv_freq, tmp.inv_freq, c->qk_rope_head_dim / 2 * sizeof(float), cudaMemcpyHostToDevice));
    free(tmp.inv_freq);
    // the latent cache and the decode activations
    g->kv_cache = dev_floats((size_t)c->n_layers * seq_len * g->W);
    cudaCheck(cudaMemset(g->kv_cache, 0, (size_t)c->n_layers * seq_len * g->W * sizeof(float)));
    g->step = dev_ints(2); g->pf_step = dev_ints(2);
    g->x = dev_floats(dim); g->xb = dev_floats(dim); g->c_q = dev_floats(c->q_lora_rank);
    g->q = dev_floats((size_t)H * g->qk_head); g->kv_a = dev_floats(g->W);
    g->q_lat = dev_floats((size_t)H * g->W); g->o_lat = dev_floats((size_t)H * c->kv_lora_rank);
    g->o = dev_floats((size_t)H * c->v_head_dim);
    g->hb = dev_floats((size_t)c->n_experts_per_tok * mi); g->hb_shared = dev_floats(g->ffn_max);
    g->logits = dev_floats(c->vocab_size);
    g->topk_idx = dev_ints(c->n_experts_per_tok); g->topk_w = dev_floats(c->n_experts_per_tok);
    g->route_logits = dev_floats((size_t)PF_MAX * c->n_routed_experts);
    // split the sequence so that a full context gives about one block per multiprocessor
    g->dec_chunk = ceil_div(ceil_div(seq_len, g->n_sm), MLA_TILE) * MLA_TILE;
    g->dec_splits = ceil_div(seq_len, g->dec_chunk);
    size_t dec_parts = (size_t)g->dec_splits * H, pf_parts = (size_t)PF_QUERIES * ceil_div(seq_len, PF_CHUNK) * H;
    g->part_elems = dec_parts > pf_parts ? dec_parts : pf_parts;
    g->part_o = dev_floats(g->part_elems * c->kv_lora_rank);
    g->part_ml = dev_floats(g->part_elems * 2);
    cudaCheck(cudaFuncSetAttribute(mla_decode_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)mla_smem_bytes(g->W)));
    cudaCheck(cudaDeviceSynchronize());
    fprintf(stderr, "dsv2cu: model on the GPU in %.1f s; context %d, decode attention in %d splits of %d rows\n",
            now_s() - t0, seq_len, g->dec_splits, g->dec_chunk);
    g->ready = 1;
}

// ----------------------------------------------------------------------------
// ---------------- The forward pass on the GPU: one token (decode), captured as a CUDA graph

// token and pos are read from gpu.step on the device, so the captured graph serves every step
static void decode_step(void) {
    const Config *c = &gpu.c;
    int dim = c->dim, H = c->n_heads, W = gpu.W, d_c = c->kv_lora_rank;
    const int *pos = gpu.step + 1;
    embed_forward(gpu.x, gpu.step, 1);
    for (int l = 0; l < c->n_layers; l++) {
        const GpuLayer *L = &gpu.layers[l];
        float *cache = gpu.kv_cache + (size_t)l * gpu.seq_len * W;
        rmsnorm_forward(gpu.xb, gpu.x, L->input_layernorm, dim, 1);
        if (c->q_lora_rank) {
            matvec_forward(gpu.c_q, gpu.xb, L->q_a_proj, dim, c->q_lora_rank, NULL);           // eq. (12)
            rmsnorm_forward(gpu.c_q, gpu.c_q, L->q_a_layernorm, c->q_lora_rank, 1);
            matvec_forward(gpu.q, gpu.c_q, L->q_proj, c->q_lora_rank, H * gpu.qk_head, NULL);  // eq. (13)
        } else {
            matvec_forward(gpu.q, gpu.xb, L->q_proj, dim, H * gpu.qk_head, NULL);
        }
        matvec_forward(gpu.kv_a, gpu.xb, L->kv_a_proj_with_mqa, dim, W, NULL);
        kv_latent_forward(cache, gpu.kv_a, L->kv_a_layernorm, pos, 1);                        // eqs. (9), (15)
        q_absorb_forward(gpu.q_lat, gpu.q, L->kv_b_proj, pos, 1);                             // eq. (14), W^UK absorbed
        mla_decode_forward(gpu.o_lat, gpu.q_lat, cache, 0, NULL, pos, 0, 1, H, W, d_c, gpu.dec_chunk, gpu.dec_splits,
                           gpu.softmax_scale, gpu.part_o, gpu.part_ml);                        // eqs. (17)-(18)
        v_up_forward(gpu.o, gpu.o_lat, L->kv_b_proj, 1);                            // eq. (11) W^UV
        matvec_forward(gpu.x, gpu.o, L->o_proj, H * c->v_head_dim, dim, gpu.x);               // eq. (19) + residual
        rmsnorm_forward(gpu.xb, gpu.x, L->post_attention_layernorm, dim, 1);
        if (L->is_moe) {
            int K = c->n_experts_per_tok, mi = c->moe_intermediate_size;
            moe_route_forward(gpu.topk_idx, gpu.topk_w, gpu.xb, L->gate, 1);                  // eqs. (21)-(22)
            moe_gate_up_forward(gpu.hb, gpu.xb, L->expert_gate, L->expert_up, gpu.topk_idx, K, mi);
            if (L->ffn_width) moe_gate_up_forward(gpu.hb_shared, gpu.xb, L->ffn_gate, L->ffn_up, NULL, 1, L->ffn_width);
            moe_down_forward(gpu.x, L->expert_down, gpu.topk_idx, gpu.topk_w, gpu.hb, K, mi,  // eq. (20) + residual
                             L->ffn_width ? L->ffn_down : NULL, gpu.hb_shared, L->ffn_width);
        } else {
            moe_gate_up_forward(gpu.hb_shared, gpu.xb, L->ffn_gate, L->ffn_up, NULL, 1, L->ffn_width);
            moe_down_forward(gpu.x, NULL, NULL, NULL, NULL, 0, 0, L->ffn_down, gpu.hb_shared, L->ffn_width);
        }
    }
    rmsnorm_forward(gpu.xb, gpu.x, gpu.norm, dim, 1);
    matvec_forward(gpu.logits, gpu.xb, gpu.lm_head, dim, c->vocab_size, NULL);
}

static void decode_graph_build(void) {
    cudaGraph_t graph;
    cudaCheck(cudaStreamBeginCapture(gpu.stream, cudaStreamCaptureModeGlobal));
    decode_step();
    cudaCheck(cudaStreamEndCapture(gpu.stream, &graph));
    cudaCheck(cudaGraphInstantiate(&gpu.graph, graph, 0));
    cudaCheck(cudaGraphDestroy(graph));
}

static void decode_launch(int token, int pos) {
    int step[2] = {token, pos};
    cudaCheck(cudaMemcpyAsync(gpu.step, step, sizeof step, cudaMemcpyHostToDevice, gpu.stream));
    cudaCheck(cudaGraphLaunch(gpu.graph, gpu.stream));
}

// dsv2.c's forward() on the GPU: logits of token at pos, copied into s->logits
static float *forward_gpu(const Model *m, RunState *s, int token, int pos, AttnForm form) {
    (void)form;  // the GPU always runs the absorbed form
    gpu_init(m, s->seq_len);
    if (!gpu.graph) decode_graph_build();
    if (pos < 0 || pos >= gpu.seq_len) die("dsv2cu: position %d outside the context of %d", pos, gpu.seq_len);
    if (token < 0 || token >= gpu.c.vocab_size) die("dsv2cu: token %d outside the vocabulary", token);
    decode_launch(token, pos);
    cudaCheck(cudaMemcpyAsync(s->logits, gpu.logits, gpu.c.vocab_size * sizeof(float), cudaMemcpyDeviceToHost, gpu.stream));
    cudaCheck(cudaStreamSynchronize(gpu.stream));
    return s->logits;
}

// ----------------------------------------------------------------------------
// ---------------- Prefill: the prompt in one pass per layer

static void prefill_alloc(void) {
    const Config *c = &gpu.c;
    size_t T = PF_MAX, dim = c->dim, H = c->n_heads, K = c->n_experts_per_tok, mi = c->moe_intermediate_size;
    size_t ffn = T * gpu.ffn_max > T * K * mi ? T * gpu.ffn_max : T * K * mi;
    gpu.pf_tokens = dev_ints(T); gpu.pf_perm = dev_ints(T * K); gpu.pf_inv = dev_ints(T * K);
    gpu.X = dev_floats(T * dim); gpu.Xb = dev_floats(T * dim);
    gpu.CQ = dev_floats(T * c->q_lora_rank);
    gpu.Q = dev_floats(T * H * gpu.qk_head); gpu.KVA = dev_floats(T * gpu.W);
    gpu.QLAT = dev_floats(T * H * gpu.W); gpu.OLAT = dev_floats(T * H * c->kv_lora_rank);
    gpu.O = dev_floats(T * H * c->v_head_dim);
    gpu.G = dev_floats(ffn); gpu.U = dev_floats(ffn); gpu.H = dev_floats(ffn);
    gpu.Y = dev_floats(T * K * dim); gpu.XG = dev_floats(T * K * dim);
    size_t q_in = c->q_lora_rank ? c->q_lora_rank : dim, biggest = (size_t)H * gpu.qk_head * q_in;
    size_t sizes[] = {(size_t)c->q_lora_rank * dim, (size_t)c->n_routed_experts * dim, (size_t)gpu.W * dim, dim * H * c->v_head_dim,
                      (size_t)gpu.ffn_max * dim, mi * dim};
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) if (sizes[i] > biggest) biggest = sizes[i];
    gpu.wscratch = dev_floats(biggest);
    gpu.wscratch_elems = biggest;
    gpu.IDX = dev_ints(T * K); gpu.WTS = dev_floats(T * K);
    gpu.pf_ready = 1;
}

// T tokens (in gpu.pf_tokens) at positions pos0.. : fills every layer's cache rows
static void prefill_pass(int T, int pos0) {
    const Config *c = &gpu.c;
    int dim = c->dim, H = c->n_heads, W = gpu.W, d_c = c->kv_lora_rank, K = c->n_experts_per_tok;
    int mi = c->moe_intermediate_size, E = c->n_routed_experts;
    const int *pos = gpu.pf_step + 1;
    std::vector<int> idx((size_t)T * K), perm((size_t)T * K), inv((size_t)T * K), count(E), offset(E + 1);
    embed_forward(gpu.X, gpu.pf_tokens, T);
    for (int l = 0; l < c->n_layers; l++) {
        const GpuLayer *L = &gpu.layers[l];
        float *cache = gpu.kv_cache + (size_t)l * gpu.seq_len * W;
        rmsnorm_forward(gpu.Xb, gpu.X, L->input_layernorm, dim, T);
        if (c->q_lora_rank) {
            gemm_forward(gpu.CQ, gpu.Xb, L->q_a_proj, T, dim, c->q_lora_rank, 0.0f);          // eq. (12)
            rmsnorm_forward(gpu.CQ, gpu.CQ, L->q_a_layernorm, c->q_lora_rank, T);
            gemm_forward(gpu.Q, gpu.CQ, L->q_proj, T, c->q_lora_rank, H * gpu.qk_head, 0.0f);  // eq. (13)
        } else {
            gemm_forward(gpu.Q, gpu.Xb, L->q_proj, T, dim, H * gpu.qk_head, 0.0f);
        }
        gemm_forward(gpu.KVA, gpu.Xb, L->kv_a_proj_with_mqa, T, dim, W, 0.0f);
        kv_latent_forward(cache, gpu.KVA, L->kv_a_layernorm, pos, T);                            // eqs. (9), (15)
        q_absorb_forward(gpu.QLAT, gpu.Q, L->kv_b_proj, pos, T);
        // causal attention: query b sees rows 0..pos0+b; the decode kernel with one "sequence" per query
        for (int q0 = 0; q0 < T; q0 += PF_QUERIES) {
            int nb = T - q0 < PF_QUERIES ? T - q0 : PF_QUERIES;
            int n_split = ceil_div(pos0 + q0 + nb, PF_CHUNK);
            mla_decode_forward(gpu.OLAT + (size_t)q0 * H * d_c, gpu.QLAT + (size_t)q0 * H * W, cache, 0, NULL, pos, q0,
                               nb, H, W, d_c, PF_CHUNK, n_split, gpu.softmax_scale, gpu.part_o, gpu.part_ml);
        }
        v_up_forward(gpu.O, gpu.OLAT, L->kv_b_proj, T);
        gemm_forward(gpu.X, gpu.O, L->o_proj, T, H * c->v_head_dim, dim, 1.0f);             // eq. (19) + residual
        rmsnorm_forward(gpu.Xb, gpu.X, L->post_attention_layernorm, dim, T);
        if (L->ffn_width) {  // the shared experts, or the dense FFN
            gemm_forward(gpu.G, gpu.Xb, L->ffn_gate, T, dim, L->ffn_width, 0.0f);
            gemm_forward(gpu.U, gpu.Xb, L->ffn_up, T, dim, L->ffn_width, 0.0f);
            swiglu_forward(gpu.H, gpu.G, gpu.U, (size_t)T * L->ffn_width);
            gemm_forward(gpu.X, gpu.H, L->ffn_down, T, L->ffn_width, dim, 1.0f);
        }
        if (!L->is_moe) continue;
        // routed experts: route on the GPU, group the (token, slot) pairs by expert on the host
        moe_route_forward(gpu.IDX, gpu.WTS, gpu.Xb, L->gate, T);
        cudaCheck(cudaMemcpyAsync(idx.data(), gpu.IDX, idx.size() * sizeof(int), cudaMemcpyDeviceToHost, gpu.stream));
        cudaCheck(cudaStreamSynchronize(gpu.stream));
        std::fill(count.begin(), count.end(), 0);
        for (size_t i = 0; i < idx.size(); i++) count[idx[i]]++;
        offset[0] = 0;
        for (int e = 0; e < E; e++) offset[e + 1] = offset[e] + count[e];
        std::fill(count.begin(), count.end(), 0);
        for (size_t i = 0; i < idx.size(); i++) {  // i = t*K + k, in token order within each expert
            int row = offset[idx[i]] + count[idx[i]]++;
            perm[row] = (int)(i / K);
            inv[i] = row;
        }
        cudaCheck(cudaMemcpyAsync(gpu.pf_perm, perm.data(), perm.size() * sizeof(int), cudaMemcpyHostToDevice, gpu.stream));
        cudaCheck(cudaMemcpyAsync(gpu.pf_inv, inv.data(), inv.size() * sizeof(int), cudaMemcpyHostToDevice, gpu.stream));
        gather_rows_kernel<<<T * K, 256, 0, gpu.stream>>>(gpu.XG, gpu.Xb, gpu.pf_perm, dim);
        launchCheck();
        size_t ew = (size_t)mi * dim;
        for (int e = 0; e < E; e++) {
            int n = offset[e + 1] - offset[e];
            if (!n) continue;
            gemm_forward(gpu.G + (size_t)offset[e] * mi, gpu.XG + (size_t)offset[e] * dim, L->expert_gate + e * ew, n, dim, mi, 0.0f);
            gemm_forward(gpu.U + (size_t)offset[e] * mi, gpu.XG + (size_t)offset[e] * dim, L->expert_up + e * ew, n, dim, mi, 0.0f);
        }
        swiglu_forward(gpu.H, gpu.G, gpu.U, (size_t)T * K * mi);
        for (int e = 0; e < E; e++) {
            int n = offset[e + 1] - offset[e];
            if (!n) continue;
            gemm_forward(gpu.Y + (size_t)offset[e] * dim, gpu.H + (size_t)offset[e] * mi, L->expert_down + e * ew, n, mi, dim, 0.0f);
        }
        moe_combine_kernel<<<T, 256, 0, gpu.stream>>>(gpu.X, gpu.Y, gpu.pf_inv, gpu.WTS, K, dim);  // eq. (20)
        launchCheck();
    }
    // the final norm and lm_head are not needed: the last prompt token goes through forward_gpu
}

// the first n prompt tokens at positions pos0..pos0+n-1, PF_MAX at a time; returns n
static int prefill_gpu(const Model *m, RunState *s, const int *ids, int n, int pos0, AttnForm form) {
    (void)form;
    gpu_init(m, s->seq_len);
    if (!gpu.pf_ready) prefill_alloc();
    if (pos0 + n > gpu.seq_len) die("dsv2cu: prefill past the context (%d + %d > %d)", pos0, n, gpu.seq_len);
    for (int i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= gpu.c.vocab_size) die("dsv2cu: token %d outside the vocabulary", ids[i]);
    for (int done = 0; done < n;) {
        int T = n - done < PF_MAX ? n - done : PF_MAX;
        int step[2] = {0, pos0 + done};
        cudaCheck(cudaMemcpyAsync(gpu.pf_step, step, sizeof step, cudaMemcpyHostToDevice, gpu.stream));
        cudaCheck(cudaMemcpyAsync(gpu.pf_tokens, ids + done, T * sizeof(int), cudaMemcpyHostToDevice, gpu.stream));
        prefill_pass(T, pos0 + done);
        done += T;
    }
    cudaCheck(cudaStreamSynchronize(gpu.stream));
    return n;
}

#include "dsv2_bench.cuh"  // --bench: benchmarks and self-checks for tools/bench_cuda.sh

int main(int argc, char **argv) {
    if (argc >= 2 && !strcmp(argv[1], "--gpu-check")) {  // exit 0 when a GPU is usable (test_all asks)
        int n = 0;
        if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) { printf("no CUDA GPU\n"); return 1; }
        cudaDeviceProp p;
        cudaCheck(cudaGetDeviceProperties(&p, 0));
        printf("%s, compute capability %d.%d\n", p.name, p.major, p.minor);
        return 0;
    }
    if (argc >= 3 && !strcmp(argv[1], "--bench")) return bench_main(argc - 2, argv + 2);
    return dsv2_main(argc, argv);
}
