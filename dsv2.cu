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
 * Keeping float32 accuracy on the tensor cores: the attention runs in 3xTF32 (each float32 operand
 * split in two tf32 parts, three products), the prefill's matrix products in bf16 x 3 (the weights are
 * bf16 already; each activation split in three bf16 parts). The decode step is 9 kernels per MoE
 * layer, each launched while the previous one runs (programmatic dependent launch) so that it can
 * stream its weights into L2 early. docs/BENCHMARKS.md has the measurements behind each choice.
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

static __host__ __device__ int ceil_div(long a, long b) { return (int)((a + b - 1) / b); }

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

// 8 bf16 weights (one 16-byte load) times 8 floats
__device__ __forceinline__ float dot8_bf16(uint4 v, float4 xa, float4 xb) {
    float2 a = bf16x2_to_float2(v.x), b = bf16x2_to_float2(v.y), c = bf16x2_to_float2(v.z), d = bf16x2_to_float2(v.w);
    return a.x * xa.x + a.y * xa.y + b.x * xa.z + b.y * xa.w + c.x * xb.x + c.y * xb.y + d.x * xb.z + d.y * xb.w;
}

// One warp: dot(w[0..n), x[0..n)), w bf16, x float32; every lane gets the result.
// Trick: when n % 8 == 0 each lane loads 16 bytes (8 weights) at a time, and 8 such loads are
// issued before the first is used, so a warp keeps 4 KB of weights in flight (a 2048-wide row
// in one round trip to memory).
__device__ float warp_dot(const bf16 *w, const float *x, int n) {
    int lane = threadIdx.x & 31;
    float acc = 0.0f;
    if ((n & 7) == 0) {
        const uint4 *w4 = (const uint4 *)w;
        const float4 *x4 = (const float4 *)x;
        int n8 = n >> 3;
        for (int i = lane; i < n8; i += 256) {
            uint4 v[8];
            #pragma unroll
            for (int u = 0; u < 8; u++)
                if (i + 32 * u < n8) v[u] = __ldg(w4 + i + 32 * u);
            #pragma unroll
            for (int u = 0; u < 8; u++)
                if (i + 32 * u < n8) acc += dot8_bf16(v[u], x4[2 * (i + 32 * u)], x4[2 * (i + 32 * u) + 1]);
        }
    } else {
        for (int i = lane; i < n; i += 32) acc += __bfloat162float(w[i]) * x[i];
    }
    return warp_sum(acc);
}

// Two rows against the same x at once (8 loads of 16 bytes in flight per lane): *d1 = w1 . x, *d2 = w2 . x
__device__ void warp_dot2(const bf16 *w1, const bf16 *w2, const float *x, int n, float *d1, float *d2) {
    if (n & 7) { *d1 = warp_dot(w1, x, n); *d2 = warp_dot(w2, x, n); return; }
    int lane = threadIdx.x & 31, n8 = n >> 3;
    const uint4 *a4 = (const uint4 *)w1, *b4 = (const uint4 *)w2;
    const float4 *x4 = (const float4 *)x;
    float s1 = 0.0f, s2 = 0.0f;
    for (int i = lane; i < n8; i += 128) {
        uint4 va[4], vb[4];
        #pragma unroll
        for (int u = 0; u < 4; u++)
            if (i + 32 * u < n8) { va[u] = __ldg(a4 + i + 32 * u); vb[u] = __ldg(b4 + i + 32 * u); }
        #pragma unroll
        for (int u = 0; u < 4; u++) {
            if (i + 32 * u >= n8) break;
            float4 xa = x4[2 * (i + 32 * u)], xb = x4[2 * (i + 32 * u) + 1];
            s1 += dot8_bf16(va[u], xa, xb);
            s2 += dot8_bf16(vb[u], xa, xb);
        }
    }
    *d1 = warp_sum(s1);
    *d2 = warp_sum(s2);
}

__device__ __forceinline__ float silu_dev(float x) { return x / (1.0f + expf(-x)); }


// ---------------- Hopper helpers: programmatic dependent launch, L2 prefetch, async copies, tensor cores

// Programmatic dependent launch (PDL). Every kernel here is launched with the
// ProgrammaticStreamSerialization attribute (launch() below) and begins the same way:
//   pdl_launch_next()   the next kernel in the stream may start now, on whatever room is left;
//   (prefetch the weights this block will read: they depend on no earlier kernel)
//   pdl_wait()          block until the previous kernel has finished and its writes are visible.
// So a kernel streams its weights into L2 while the one before it still runs, and launch
// latency overlaps with work. Order still holds transitively: every kernel waits before it reads
// or writes an activation, so kernel n+1 cannot finish before kernel n has. Without the attribute
// (DSV2_NO_PDL=1) both instructions do nothing.
__device__ __forceinline__ void pdl_launch_next() { asm volatile("griddepcontrol.launch_dependents;" ::: "memory"); }
__device__ __forceinline__ void pdl_wait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }

// ask the copy engine to bring [p, p + bytes) into L2 (one instruction; the 16-byte-aligned inside of the range)
__device__ __forceinline__ void prefetch_l2(const void *p, size_t bytes) {
    uintptr_t a = ((uintptr_t)p + 15) & ~(uintptr_t)15, e = ((uintptr_t)p + bytes) & ~(uintptr_t)15;
    if (e > a) asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(a), "r"((uint32_t)(e - a)) : "memory");
}

// 16-byte asynchronous copy global -> shared (bytes < 16 fill the rest with zeros), committed as a group
__device__ __forceinline__ void cp_async16(void *smem, const void *gmem, int bytes) {
    uint32_t s = (uint32_t)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(s), "l"(gmem), "r"(bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory"); }

// Tensor cores in float32 precision ("3xTF32"). A tf32 holds 11 of a float32's 24 mantissa bits, so
// x = hi + lo with hi = tf32(x), lo = tf32(x - hi) keeps 22, and
//   a b = a_hi b_hi + a_hi b_lo + a_lo b_hi   (+ a_lo b_lo, about 2^-22 |a b|, dropped)
// is three tensor-core products with float32 accumulation. One tf32 product alone would err by ~1e-3.
//
// tf32(x), rounded to nearest (ties away from zero) on the bits: add half a tf32 unit of the 13 dropped
// mantissa bits, then clear them. Two integer instructions; cvt.rna.tf32.f32 compiles to about six on sm_90
// (Nsight Compute: the splits were most of the attention kernel's instructions). Finite x only.
__device__ __forceinline__ uint32_t tf32_bits(float x) { return (__float_as_uint(x) + 0x1000u) & 0xffffe000u; }
__device__ __forceinline__ void split_tf32(float x, uint32_t *hi, uint32_t *lo) {
    *hi = tf32_bits(x);
    *lo = tf32_bits(x - __uint_as_float(*hi));
}
// d (16x8) += a (16x8) b (8x8), one warp. With g = lane / 4, t = lane % 4 each lane holds
// a: [g][t], [g+8][t], [g][t+4], [g+8][t+4];  b: [t][g], [t+4][g];  d: [g][2t], [g][2t+1], [g+8][2t], [g+8][2t+1]
__device__ __forceinline__ void mma_tf32(float *d, const uint32_t *a, const uint32_t *b) {
    asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
// big += a_hi b_hi, small += a_hi b_lo + a_lo b_hi (two accumulators: shorter dependency chains)
__device__ __forceinline__ void mma_3xtf32(float *big, float *small, const uint32_t *ah, const uint32_t *al,
                                           const float *b) {
    uint32_t bh[2], bl[2];
    split_tf32(b[0], &bh[0], &bl[0]);
    split_tf32(b[1], &bh[1], &bl[1]);
    mma_tf32(small, al, bh);
    mma_tf32(small, ah, bl);
    mma_tf32(big, ah, bh);
}

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

#define MLA_HEADS 16      // heads per block of the attention kernel: the M = 16 of the tensor-core products
#define MLA_TILE 32       // cache rows per shared-memory tile
#define MLA_WARPS 8
#define MLA_NT 8          // 8-column tiles of the latent per warp: kv_lora_rank <= 8 * MLA_NT * MLA_WARPS = 512
#define ABS_COLS 64       // latent columns per block of the absorbed query
#define PF_MAX 2048       // prefill: tokens per pass (longer prompts take several)
#define PF_QUERIES 128    // prefill: queries per attention launch
#define PF_CHUNK 256      // prefill: at most this many cache rows per attention block

typedef struct {
    int ready, seq_len, n_sm, pdl;
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
    int *route_ticket;        // blocks of the decode router that have finished (the last one picks the experts)
    float *route_logits;      // (PF_MAX, n_routed_experts) affinities u^T e_i for the router
    float *part_o, *part_ml;  // split-sequence partial results of the attention
    int dec_splits;
    cudaStream_t stream;
    cudaGraphExec_t graph;
    cublasHandle_t blas;
    // prefill activations (PF_MAX tokens), allocated on the first prefill
    int pf_ready, pf_compact;  // pf_compact: always the compact expert layout (the benchmark checks both)
    int *pf_tokens, *pf_perm, *pf_inv;
    float *X, *Xb, *CQ, *Q, *KVA, *QLAT, *OLAT, *O, *WTS;
    bf16 *XS, *XGS, *HS;      // activations split in three bf16 parts for the tensor cores (below)
    float *Y3, *G3, *U3, *E3; // products of split activations, three rows per token, before their sum
    size_t pf_rows;           // room for expert rows (E x the largest expert's count, padded)
    int *IDX;
} Gpu;

static Gpu gpu;

// launch a kernel on the GPU stream, with programmatic dependent launch unless DSV2_NO_PDL is set
template <typename... Params, typename... Args>
static void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, Args... args) {
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cudaLaunchConfig_t cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.gridDim = grid; cfg.blockDim = block; cfg.dynamicSmemBytes = smem; cfg.stream = gpu.stream;
    cfg.attrs = attr; cfg.numAttrs = gpu.pdl ? 1 : 0;
    cudaCheck(cudaLaunchKernelEx(&cfg, kernel, ((Params)args)...));
}

// blocks of `threads` threads that fit on the whole GPU at once (one wave), for kernels whose warps stride over their work
template <typename... Params>
static int one_wave(void (*kernel)(Params...), int threads, size_t smem) {
    int per_sm = 0;
    cudaCheck(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem));
    return (per_sm > 0 ? per_sm : 1) * gpu.n_sm;
}

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
    pdl_launch_next();
    pdl_wait();
    int t = blockIdx.x;
    const bf16 *row = embed + (size_t)tokens[t] * dim;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) x[(size_t)t * dim + i] = __bfloat162float(row[i]);
}
static void embed_forward(float *x, const int *tokens, int T) {
    launch(embed_kernel, T, 256, 0, x, gpu.embed_tokens, tokens, gpu.c.dim);
}

// RMSNorm of row x (n) into out: w * (x * rsqrt(mean(x^2) + eps)), the whole block; out may be x
__device__ void rmsnorm_block(float *out, const float *x, const float *w, int n, float eps) {
    float ss = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) ss += x[i] * x[i];
    float r = 1.0f / sqrtf(block_sum(ss) / n + eps);
    for (int i = threadIdx.x; i < n; i += blockDim.x) out[i] = w[i] * (x[i] * r);
}
// x (n floats) into this block's shared memory xs, with 16-byte loads (n % 4 == 0 and x aligned),
// normalised on the way when w is given: xs = w * (x * rsqrt(mean(x^2) + eps)). Ends with a barrier.
__device__ void stage_vector(float *xs, const float *x, const float *w, int n, float eps) {
    if ((n & 3) || ((uintptr_t)x & 15)) {
        if (w) rmsnorm_block(xs, x, w, n, eps);
        else for (int i = threadIdx.x; i < n; i += blockDim.x) xs[i] = x[i];
        __syncthreads();
        return;
    }
    const float4 *x4 = (const float4 *)x;
    float4 *s4 = (float4 *)xs;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < n / 4; i += blockDim.x) {
        float4 v = x4[i];
        s4[i] = v;
        ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
    }
    if (w) {
        float r = 1.0f / sqrtf(block_sum(ss) / n + eps);  // block_sum's barriers also publish s4
        for (int i = threadIdx.x; i < n / 4; i += blockDim.x) {
            float4 v = s4[i];
            v.x = w[4 * i] * (v.x * r); v.y = w[4 * i + 1] * (v.y * r); v.z = w[4 * i + 2] * (v.z * r); v.w = w[4 * i + 3] * (v.w * r);
            s4[i] = v;
        }
    }
    __syncthreads();
}
#define STAGE_MAX_BYTES (96 * 1024)  // shared memory for a staged input vector (larger ones are read from global)

// RMSNorm: one block per token
__global__ void rmsnorm_kernel(float *out, const float *x, const float *w, int n, float eps) {
    pdl_launch_next();
    pdl_wait();
    size_t t = blockIdx.x;
    rmsnorm_block(out + t * n, x + t * n, w, n, eps);
}
static void rmsnorm_forward(float *out, const float *x, const float *w, int n, int T) {
    launch(rmsnorm_kernel, T, 256, 0, out, x, w, n, gpu.c.rms_norm_eps);
}

// Matrix-vector products of the decode step, one warp per output row, the RMSNorm before them fused:
//   rows [0, d1) of W1 into out1, rows [d1, d1 + d2) of W2 into out2 (q and kv_a share their input);
//   input norm_w ? RMSNorm(x) * norm_w : x. Each block normalises x (n floats, in L2) into its own
//   shared memory, so no separate norm kernel runs.
//   residual: out1[r] = residual[r] + W1[r,:] . x  (residual == out1 fuses the residual add)
// One wave of blocks (as many as fit at once), warps striding over the rows, two at a time (lm_head:
// about 50 rows a warp), so few blocks repeat the norm. Before waiting for the previous kernel, each warp prefetches its
// first weight row into L2.
__device__ __forceinline__ const bf16 *matvec_row(int r, const bf16 *W1, int d1, const bf16 *W2, int d2, int n) {
    return r < d1 ? W1 + (size_t)r * n : r < d1 + d2 ? W2 + (size_t)(r - d1) * n : NULL;
}
__global__ void matvec_kernel(float *out1, const bf16 *W1, int d1, float *out2, const bf16 *W2, int d2, const float *x,
                              int n, const float *norm_w, float eps, const float *residual) {
    pdl_launch_next();
    extern __shared__ float xs[];
    int warps = gridDim.x * (blockDim.x >> 5), lane = threadIdx.x & 31;
    int r0 = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const bf16 *first = matvec_row(r0, W1, d1, W2, d2, n);
    if (first && lane == 0) prefetch_l2(first, (size_t)n * sizeof(bf16));
    pdl_wait();
    const float *xv = x;
    if ((size_t)n * sizeof(float) <= STAGE_MAX_BYTES) {  // norm_w requires it (matvec_forward checks)
        stage_vector(xs, x, norm_w, n, eps);
        xv = xs;
    }
    for (int r = r0; r < d1 + d2; r += 2 * warps) {  // rows r and r + warps together when both exist
        float v[2];
        int rr[2] = {r, r + warps};
        if (rr[1] < d1 + d2) warp_dot2(matvec_row(rr[0], W1, d1, W2, d2, n), matvec_row(rr[1], W1, d1, W2, d2, n), xv, n, &v[0], &v[1]);
        else v[0] = warp_dot(matvec_row(r, W1, d1, W2, d2, n), xv, n);
        for (int i = 0; i < 2 && rr[i] < d1 + d2; i++)
            if (lane == 0) {
                if (rr[i] < d1) out1[rr[i]] = (residual ? residual[rr[i]] : 0.0f) + v[i];
                else out2[rr[i] - d1] = v[i];
            }
    }
}
static void matvec_forward(float *out1, const bf16 *W1, int d1, float *out2, const bf16 *W2, int d2, const float *x,
                           int n, const float *norm_w, const float *residual) {
    static int wave = 0;
    if (!wave) wave = one_wave(matvec_kernel, 256, 16384);
    size_t smem = (size_t)n * sizeof(float);
    if (smem > STAGE_MAX_BYTES) {
        if (norm_w) die("dsv2cu: a normalised input of %d values exceeds the GPU's staging space", n);
        smem = 0;
    }
    int blocks = std::min(ceil_div(d1 + d2, 8), wave);
    launch(matvec_kernel, blocks, 256, smem, out1, W1, d1, out2, W2, d2, x, n, norm_w,
           gpu.c.rms_norm_eps, residual);
}

// this position's RoPE angle i, as dsv2.c's rope_position: cos/sin of (float)pos * inv_freq[i], times mscale
__device__ __forceinline__ void rope_cos_sin(int pos, const float *inv_freq, int i, float mscale, float *cs, float *sn) {
    float angle = (float)pos * inv_freq[i];
    *cs = (float)cos((double)angle) * mscale;
    *sn = (float)sin((double)angle) * mscale;
}

// Everything MLA needs before the attention, for token t = blockIdx.y at position pos0 + t:
//   blocks [0, H*CT): the absorbed query (Appendix C), q_lat[t][h][c] = (W^UK_h^T q_t,h^C)[c] for a
//     strip of ABS_COLS latent columns c; CT = 0 skips them (the prefill does this part as a product);
//   blocks [H*CT, H*CT + H): the query's rotary part, q_lat[t][h][d_c + i] = RoPE(q_t,h^R) (eq. 14);
//   block H*CT + H: the token's cache row, cache[pos] = [RMSNorm(c^KV) ; RoPE(k^R)] (eqs. 9, 15).
// Then a head's score with cache row j is q_lat[t][h] . cache[j] (eqs. 10, 17 absorbed).
// Absorbed query: thread = (8 columns, one of 32 slices of the q^C index), 16-byte weight loads,
// then a sum over the slices in shared memory.
__global__ void mla_prep_kernel(float *q_lat, float *cache, const float *q, const float *kv_a, const bf16 *kv_b,
                                const float *kv_norm, const int *pos0, int CT, int H, int d_c, int nope, int rope,
                                int vdim, float eps, const float *inv_freq, float mscale) {
    pdl_launch_next();
    int blk = blockIdx.x, t = blockIdx.y, tid = threadIdx.x, W = d_c + rope;
    if (blk < H * CT) {
        __shared__ float red[32][ABS_COLS + 1];
        int h = blk / CT, c0 = (blk % CT) * ABS_COLS;
        const bf16 *wk = kv_b + (size_t)h * (nope + vdim) * d_c;  // W^UK_h (nope, d_c), row-major
        if (tid < nope) prefetch_l2(wk + (size_t)tid * d_c + c0, (size_t)min(ABS_COLS, d_c - c0) * sizeof(bf16));
        pdl_wait();
        int cg = tid & 7, kg = tid >> 3, c = c0 + 8 * cg;
        const float *qh = q + ((size_t)t * H + h) * (nope + rope);  // [q^C (nope) ; q^R (rope)], eq. (16)
        float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        if (c < d_c)
            for (int k = kg; k < nope; k += 32) {
                uint4 w = __ldg((const uint4 *)(wk + (size_t)k * d_c + c));
                float qk = qh[k];
                float2 a = bf16x2_to_float2(w.x), b = bf16x2_to_float2(w.y), e = bf16x2_to_float2(w.z), f = bf16x2_to_float2(w.w);
                acc[0] += a.x * qk; acc[1] += a.y * qk; acc[2] += b.x * qk; acc[3] += b.y * qk;
                acc[4] += e.x * qk; acc[5] += e.y * qk; acc[6] += f.x * qk; acc[7] += f.y * qk;
            }
        #pragma unroll
        for (int i = 0; i < 8; i++) red[kg][8 * cg + i] = acc[i];
        __syncthreads();
        if (tid < ABS_COLS && c0 + tid < d_c) {
            float s = 0.0f;
            for (int i = 0; i < 32; i++) s += red[i][tid];
            q_lat[((size_t)t * H + h) * W + c0 + tid] = s;
        }
        return;
    }
    pdl_wait();
    int pos = *pos0 + t;
    if (blk < H * CT + H) {  // eq. (14): the rotary part of head h's query
        int h = blk - H * CT;
        const float *qr = q + ((size_t)t * H + h) * (nope + rope) + nope;
        float *out = q_lat + ((size_t)t * H + h) * W + d_c;
        for (int i = tid; i < rope / 2; i += blockDim.x) {
            float cs, sn, x0 = qr[2 * i], x1 = qr[2 * i + 1];
            rope_cos_sin(pos, inv_freq, i, mscale, &cs, &sn);
            out[2 * i] = x0 * cs - x1 * sn;
            out[2 * i + 1] = x0 * sn + x1 * cs;
        }
        return;
    }
    const float *a = kv_a + (size_t)t * W;  // [W^DKV h ; W^KR h]
    float *row = cache + (size_t)pos * W;
    rmsnorm_block(row, a, kv_norm, d_c, eps);                                                          // eq. (9)
    for (int i = tid; i < rope / 2; i += blockDim.x) {                                                 // eq. (15)
        float cs, sn, x0 = a[d_c + 2 * i], x1 = a[d_c + 2 * i + 1];
        rope_cos_sin(pos, inv_freq, i, mscale, &cs, &sn);
        row[d_c + 2 * i] = x0 * cs - x1 * sn;
        row[d_c + 2 * i + 1] = x0 * sn + x1 * cs;
    }
}
static void mla_prep_forward(float *q_lat, float *cache, const float *q, const float *kv_a, const bf16 *kv_b,
                             const float *kv_norm, const int *pos0, int absorb, int T) {
    const Config *c = &gpu.c;
    int CT = absorb ? ceil_div(c->kv_lora_rank, ABS_COLS) : 0;
    launch(mla_prep_kernel, dim3(c->n_heads * (CT + 1) + 1, T), 256, 0, q_lat, cache, q, kv_a, kv_b, kv_norm, pos0, CT,
           c->n_heads, c->kv_lora_rank, c->qk_nope_head_dim, c->qk_rope_head_dim, c->v_head_dim, c->rms_norm_eps,
           (const float *)gpu.inv_freq, gpu.rope_mscale);
}

// MLA decode attention on the latent cache, on tensor cores (the FlashMLA idea).
// Grid (split, b, head group): a block owns rows [split*chunk, +chunk) of sequence b's cache and
// MLA_HEADS = 16 heads. All those heads share each cache row, so attention over the latent is two
// matrix products per tile of 32 rows, run on the tensor cores in 3xTF32 (float32 accuracy):
//   scores  S (16 heads x 32 rows) = Q_lat (16 x W) . tile^T        (eqs. 10, 17, absorbed)
//   values  O (16 x d_c)          += softmax-weights P (16 x 32) . tile[:, :d_c]   (eq. 18 on the latent)
// Each cache row is read from device memory once, by cp.async into a double-buffered shared tile
// (the next tile loads while this one is used). Online softmax across tiles; the block writes its
// partial (max m, sum l, unnormalised o_latent) and mla_combine_kernel merges the splits (log-sum-exp).
// Sequence b has len = lens ? lens[b] : *pos0 + len_offset + b + 1 rows (causal prefill: query b
// sees the rows up to its own position), its cache at cache + b * seq_stride. The split size is
// chosen from len (mla_chunk), so a short context uses few blocks of one tile each.
// Work of the 8 warps: scores: warp w takes W/8 of the columns for all 32 rows; its slice of the
// queries stays in registers, already split hi/lo, for the whole block; softmax: warp w sums the 8
// partial scores of heads 2w, 2w+1, lane = row; values: warp w takes latent columns 8w + 64j.
// Shared rows are padded to a stride = 8 (mod 32) words: both products then load without bank conflicts.
__host__ __device__ __forceinline__ int mla_stride(int W) { return W + ((8 - W % 32) + 32) % 32; }
__host__ __device__ __forceinline__ int mla_chunk(int len, int n_split) {
    int c = (len + n_split - 1) / n_split;
    return (c + MLA_TILE - 1) / MLA_TILE * MLA_TILE;
}
#define MLA_SP (MLA_TILE + 4)  // row stride of the score and probability tiles
#define MLA_KS 9               // 8-column steps of the scores per warp: W <= 8 * MLA_KS * MLA_WARPS = 576
static size_t mla_smem_bytes(int W) {
    return (2 * (size_t)MLA_TILE * mla_stride(W) + (MLA_WARPS + 2) * MLA_HEADS * MLA_SP + 3 * MLA_HEADS) * 4;
}
// rows [t0, t0 + MLA_TILE) of the cache into a shared tile, zeros past `end`; warp w loads rows w, w + 8, ...
__device__ __forceinline__ void mla_load_tile(float *tile, const float *cb, int t0, int end, int W, int S) {
    int lane = threadIdx.x & 31;
    for (int r = threadIdx.x >> 5; r < MLA_TILE; r += MLA_WARPS) {
        bool ok = t0 + r < end;
        const float *src = ok ? cb + (size_t)(t0 + r) * W : cb;
        for (int k = 4 * lane; k < W; k += 128) cp_async16(tile + r * S + k, ok ? src + k : cb, ok ? 16 : 0);
    }
    cp_async_commit();
}
__global__ void __launch_bounds__(MLA_WARPS * 32, 1)
mla_attention_kernel(float *part_o, float *part_ml, const float *q_lat, const float *cache, size_t seq_stride,
                     const int *lens, const int *pos0, int len_offset, int H, int W, int d_c, int n_split, float scale) {
    pdl_launch_next();
    pdl_wait();
    const int S = mla_stride(W);
    int split = blockIdx.x, b = blockIdx.y, h0 = blockIdx.z * MLA_HEADS, tid = threadIdx.x;
    int lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
    int nh = min(MLA_HEADS, H - h0);
    int len = lens ? lens[b] : *pos0 + len_offset + b + 1;
    int chunk = mla_chunk(len, n_split), start = split * chunk, end = min(start + chunk, len);
    if (start >= end) return;  // past the end: mla_combine_kernel counts only the splits that ran
    extern __shared__ float smem[];
    float *tiles = smem;                                  // 2 x (MLA_TILE, S) cache rows
    float *s_part = tiles + 2 * MLA_TILE * S;             // (MLA_WARPS, 16, MLA_SP) partial scores
    uint32_t *p_hi = (uint32_t *)(s_part + MLA_WARPS * MLA_HEADS * MLA_SP), *p_lo = p_hi + MLA_HEADS * MLA_SP;  // P split
    float *m_s = (float *)(p_lo + MLA_HEADS * MLA_SP), *l_s = m_s + MLA_HEADS, *a_s = l_s + MLA_HEADS;  // max, sum, rescale
    const float *cb = cache + b * seq_stride;
    int n_tiles = (end - start + MLA_TILE - 1) / MLA_TILE;
    mla_load_tile(tiles, cb, start, end, W, S);
    // this warp's column steps of the scores, and its queries there as tensor-core fragments (hi, lo).
    // Fragment column t is latent column 8s + 2t and t + 4 is 8s + 2t + 1: one 8-byte load each.
    const int n_ks = W / 8, ksw = (n_ks + MLA_WARPS - 1) / MLA_WARPS, ks0 = warp * ksw, ks1 = min(n_ks, ks0 + ksw);
    uint32_t qh[MLA_KS][4], ql[MLA_KS][4];
    #pragma unroll
    for (int i = 0; i < MLA_KS; i++) {
        int k = 8 * (ks0 + i) + 2 * t;
        float2 A0 = make_float2(0, 0), A1 = make_float2(0, 0);
        if (ks0 + i < ks1) {
            if (g < nh) A0 = *(const float2 *)(q_lat + ((size_t)b * H + h0 + g) * W + k);
            if (g + 8 < nh) A1 = *(const float2 *)(q_lat + ((size_t)b * H + h0 + g + 8) * W + k);
        }
        split_tf32(A0.x, &qh[i][0], &ql[i][0]); split_tf32(A1.x, &qh[i][1], &ql[i][1]);
        split_tf32(A0.y, &qh[i][2], &ql[i][2]); split_tf32(A1.y, &qh[i][3], &ql[i][3]);
    }
    if (tid < MLA_HEADS) { m_s[tid] = -INFINITY; l_s[tid] = 0.0f; }
    const int n_ct = d_c / 8;
    float acc[MLA_NT][4];
    #pragma unroll
    for (int j = 0; j < MLA_NT; j++) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
    for (int it = 0; it < n_tiles; it++) {
        int t0 = start + it * MLA_TILE;
        const float *tile = tiles + (it & 1) * MLA_TILE * S;
        if (it + 1 < n_tiles) {
            mla_load_tile(tiles + ((it + 1) & 1) * MLA_TILE * S, cb, t0 + MLA_TILE, end, W, S);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();  // this tile (and, the first time, m_s and l_s) is visible to every thread
        {   // 1. partial scores over this warp's columns, rows 8n + g of the tile (n < 4)
            float big[4][4], small[4][4];
            #pragma unroll
            for (int n = 0; n < 4; n++)
                #pragma unroll
                for (int i = 0; i < 4; i++) big[n][i] = small[n][i] = 0.0f;
            #pragma unroll
            for (int i = 0; i < MLA_KS; i++) {
                if (ks0 + i >= ks1) break;
                int k = 8 * (ks0 + i) + 2 * t;
                #pragma unroll
                for (int n = 0; n < 4; n++) {
                    float2 B = *(const float2 *)(tile + (8 * n + g) * S + k);
                    float bb[2] = {B.x, B.y};
                    mma_3xtf32(big[n], small[n], qh[i], ql[i], bb);
                }
            }
            float *sp = s_part + warp * MLA_HEADS * MLA_SP;  // d: heads g, g+8; rows 8n + 2t, 8n + 2t + 1
            #pragma unroll
            for (int n = 0; n < 4; n++) {
                *(float2 *)(sp + g * MLA_SP + 8 * n + 2 * t) = make_float2(big[n][0] + small[n][0], big[n][1] + small[n][1]);
                *(float2 *)(sp + (g + 8) * MLA_SP + 8 * n + 2 * t) = make_float2(big[n][2] + small[n][2], big[n][3] + small[n][3]);
            }
        }
        __syncthreads();
        // 2. online softmax: warp w takes heads 2w, 2w+1, lane = row; P is stored split for the values
        #pragma unroll
        for (int k = 0; k < 2; k++) {
            int h = 2 * warp + k;
            bool ok = t0 + lane < end;
            float s = 0.0f;
            #pragma unroll
            for (int w = 0; w < MLA_WARPS; w++) s += s_part[(w * MLA_HEADS + h) * MLA_SP + lane];
            s = ok ? s * scale : -INFINITY;
            float m_old = m_s[h], m_new = fmaxf(m_old, warp_max(s));  // finite: row t0 < end
            float p = ok ? expf(s - m_new) : 0.0f;
            float sum = warp_sum(p);
            split_tf32(p, &p_hi[h * MLA_SP + lane], &p_lo[h * MLA_SP + lane]);
            if (lane == 0) {
                float a = expf(m_old - m_new);  // 0 on the first tile (m_old = -inf)
                a_s[h] = a; l_s[h] = l_s[h] * a + sum; m_s[h] = m_new;
            }
        }
        __syncthreads();
        {   // 3. values: o_latent (16 x d_c) = a * o_latent + P (16 x 32) . tile (32 x d_c)
            float sa = a_s[g], sb = a_s[g + 8];
            #pragma unroll
            for (int j = 0; j < MLA_NT; j++) { acc[j][0] *= sa; acc[j][1] *= sa; acc[j][2] *= sb; acc[j][3] *= sb; }
            #pragma unroll
            for (int kr = 0; kr < MLA_TILE; kr += 8) {
                int i0 = g * MLA_SP + kr + t, i1 = (g + 8) * MLA_SP + kr + t;
                uint32_t ah[4] = {p_hi[i0], p_hi[i1], p_hi[i0 + 4], p_hi[i1 + 4]};
                uint32_t al[4] = {p_lo[i0], p_lo[i1], p_lo[i0 + 4], p_lo[i1 + 4]};
                #pragma unroll
                for (int j = 0; j < MLA_NT; j++) {
                    int ct = warp + MLA_WARPS * j;
                    if (ct < n_ct) {
                        float bb[2] = {tile[(kr + t) * S + 8 * ct + g], tile[(kr + t + 4) * S + 8 * ct + g]};
                        mma_3xtf32(acc[j], acc[j], ah, al, bb);
                    }
                }
            }
        }
        __syncthreads();  // every warp is done with this tile before the loader refills it
    }
    size_t pb = ((size_t)b * n_split + split) * H + h0;  // (b, split, head) index of head h0
    #pragma unroll
    for (int j = 0; j < MLA_NT; j++) {
        int ct = warp + MLA_WARPS * j, c = 8 * ct + 2 * t;
        if (ct >= n_ct) continue;
        if (g < nh) *(float2 *)(part_o + (pb + g) * d_c + c) = make_float2(acc[j][0], acc[j][1]);
        if (g + 8 < nh) *(float2 *)(part_o + (pb + g + 8) * d_c + c) = make_float2(acc[j][2], acc[j][3]);
    }
    if (tid < nh) { part_ml[(pb + tid) * 2] = m_s[tid]; part_ml[(pb + tid) * 2 + 1] = l_s[tid]; }
}

// merge the splits that ran: one block per (head, sequence), one thread per latent column.
// o_latent = sum_s e^(m_s - M) o_s / sum_s e^(m_s - M) l_s, M = max_s m_s (log-sum-exp merge);
// the split weights e^(m_s - M) / L are computed once, in shared memory (n_split floats)
__global__ void mla_combine_kernel(float *o_lat, const float *part_o, const float *part_ml, const int *lens,
                                   const int *pos0, int len_offset, int H, int d_c, int n_split) {
    pdl_launch_next();
    pdl_wait();
    extern __shared__ float wgt[];
    int h = blockIdx.x, b = blockIdx.y;
    int len = lens ? lens[b] : *pos0 + len_offset + b + 1;
    int n_run = ceil_div(len, mla_chunk(len, n_split));
    const float *ml = part_ml + ((size_t)b * n_split * H + h) * 2;  // split s at ml[s * H * 2]
    if (threadIdx.x < 32) {
        float M = -INFINITY, L = 0.0f;
        for (int s = threadIdx.x; s < n_run; s += 32) M = fmaxf(M, ml[(size_t)s * H * 2]);
        M = warp_max(M);
        for (int s = threadIdx.x; s < n_run; s += 32) {
            wgt[s] = expf(ml[(size_t)s * H * 2] - M);
            L += wgt[s] * ml[(size_t)s * H * 2 + 1];
        }
        L = warp_sum(L);
        __syncwarp();
        for (int s = threadIdx.x; s < n_run; s += 32) wgt[s] /= L;
    }
    __syncthreads();
    const float *po = part_o + ((size_t)b * n_split * H + h) * d_c;  // split s at po[s * H * d_c]
    for (int c = threadIdx.x; c < d_c; c += blockDim.x) {
        float o = 0.0f;
        #pragma unroll 4
        for (int s = 0; s < n_run; s++) o += wgt[s] * po[(size_t)s * H * d_c + c];
        o_lat[((size_t)b * H + h) * d_c + c] = o;
    }
}

static void mla_config_check(const Config *c) {
    int W = c->kv_lora_rank + c->qk_rope_head_dim;
    if (c->kv_lora_rank % 8 || c->qk_rope_head_dim % 8 || c->kv_lora_rank > 8 * MLA_NT * MLA_WARPS || W > 8 * MLA_KS * MLA_WARPS)
        die("dsv2cu: kv_lora_rank %d / qk_rope_head_dim %d not supported on the GPU (multiples of 8, kv_lora_rank <= %d, "
            "their sum <= %d)", c->kv_lora_rank, c->qk_rope_head_dim, 8 * MLA_NT * MLA_WARPS, 8 * MLA_KS * MLA_WARPS);
}
// attention of B query sets (b = sequence or prefill query) -> o_lat (B, H, d_c)
static void mla_attention_forward(float *o_lat, const float *q_lat, const float *cache, size_t seq_stride,
                                  const int *lens, const int *pos0, int len_offset, int B, int n_split) {
    const Config *c = &gpu.c;
    int H = c->n_heads, W = gpu.W, d_c = c->kv_lora_rank;
    launch(mla_attention_kernel, dim3(n_split, B, ceil_div(H, MLA_HEADS)), MLA_WARPS * 32, mla_smem_bytes(W), gpu.part_o,
           gpu.part_ml, q_lat, cache, seq_stride, lens, pos0, len_offset, H, W, d_c, n_split, gpu.softmax_scale);
    launch(mla_combine_kernel, dim3(H, B), 256, n_split * sizeof(float), o_lat, (const float *)gpu.part_o, (const float *)gpu.part_ml, lens,
           pos0, len_offset, H, d_c, n_split);
}

// W^UV applied once per head after the sum (eq. 11 absorbed): one warp per output,
// o[v + h*vdim] = W^UV_h[v,:] . o_lat[h]   (decode; the prefill does this as a product)
__global__ void v_up_kernel(float *o, const float *o_lat, const bf16 *kv_b, int H, int d_c, int nope, int vdim) {
    pdl_launch_next();
    int r = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    int h = r / vdim, v = r % vdim;
    const bf16 *row = kv_b + ((size_t)h * (nope + vdim) + nope + v) * d_c;
    if (r < H * vdim && (threadIdx.x & 31) == 0) prefetch_l2(row, (size_t)d_c * sizeof(bf16));
    pdl_wait();
    if (r >= H * vdim) return;
    float val = warp_dot(row, o_lat + (size_t)h * d_c, d_c);
    if ((threadIdx.x & 31) == 0) o[r] = val;
}
static void v_up_forward(float *o, const float *o_lat, const bf16 *kv_b) {
    const Config *c = &gpu.c;
    launch(v_up_kernel, ceil_div(c->n_heads * c->v_head_dim, 8), 256, 0, o, o_lat, kv_b, c->n_heads, c->kv_lora_rank,
           c->qk_nope_head_dim, c->v_head_dim);
}

// The router (eqs. 21-22). The affinities u^T e_i come from moe_router_kernel (decode) or the
// prefill's product; then one warp per token takes dsv2.c's moe_route step by step: softmax, the
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
// one warp: the experts of one token from its affinities logits[0..E) (read past L1: another block
// of the same launch may have written them); rs: 2 E + 2 n_group words of shared memory
__device__ void route_token(int *topk_idx, float *topk_w, const float *logits, float *rs, int E, int K, int method,
                            int n_group, int topk_group, int norm_topk_prob, float routed_scaling) {
    float *scores = rs;                            // (E)
    int *chosen = (int *)(scores + E);             // (E)
    float *group_score = (float *)(chosen + E);    // (n_group)
    int *taken = (int *)(group_score + n_group);   // (n_group)
    int lane = threadIdx.x & 31;
    float max = -INFINITY, sum = 0.0f;             // eq. (22) s_i,t = softmax_i(u_t^T e_i)
    for (int i = lane; i < E; i += 32) { scores[i] = __ldcg(logits + i); max = fmaxf(max, scores[i]); chosen[i] = 0; }
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
        if (lane == 0) { chosen[best] = 1; topk_idx[k] = best; topk_w[k] = v; }
        wsum += v;
        __syncwarp();
    }
    if (lane < K) {
        if (norm_topk_prob && K > 1) topk_w[lane] /= wsum + 1e-20f;
        else topk_w[lane] *= routed_scaling;
    }
}
// the prefill's router: one warp per token
__global__ void moe_route_kernel(int *topk_idx, float *topk_w, const float *logits, int E, int K, int method,
                                 int n_group, int topk_group, int norm_topk_prob, float routed_scaling) {
    pdl_launch_next();
    pdl_wait();
    extern __shared__ float rs[];
    size_t t = blockIdx.x;
    route_token(topk_idx + t * K, topk_w + t * K, logits + t * E, rs, E, K, method, n_group, topk_group, norm_topk_prob,
                routed_scaling);
}
// the decode step's router in one launch: RMSNorm (kept in xn_out), the affinities u^T e_i one warp
// per expert, and then the last block to finish (a ticket counter, reset by that block) picks the experts
__global__ void moe_router_kernel(int *topk_idx, float *topk_w, float *logits, const bf16 *gate, const float *x,
                                  const float *norm_w, float eps, float *xn_out, int *ticket, int dim, int E, int K,
                                  int method, int n_group, int topk_group, int norm_topk_prob, float routed_scaling) {
    pdl_launch_next();
    extern __shared__ float xs[];  // dim floats, then the router's 2 E + 2 n_group words
    __shared__ int last;
    int warps = gridDim.x * (blockDim.x >> 5), lane = threadIdx.x & 31;
    int r0 = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (r0 < E && lane == 0) prefetch_l2(gate + (size_t)r0 * dim, (size_t)dim * sizeof(bf16));
    pdl_wait();
    stage_vector(xs, x, norm_w, dim, eps);
    if (blockIdx.x == 0)
        for (int i = threadIdx.x; i < dim; i += blockDim.x) xn_out[i] = xs[i];
    for (int r = r0; r < E; r += warps) {
        float v = warp_dot(gate + (size_t)r * dim, xs, dim);
        if (lane == 0) logits[r] = v;
    }
    __threadfence();  // this block's affinities are visible device-wide before it takes its ticket
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(ticket, 1) == (int)gridDim.x - 1;
    __syncthreads();
    if (!last || threadIdx.x >= 32) return;
    if (threadIdx.x == 0) *ticket = 0;  // ready for the next layer / step
    route_token(topk_idx, topk_w, logits, xs + dim, E, K, method, n_group, topk_group, norm_topk_prob, routed_scaling);
}
static void moe_route_forward(int *topk_idx, float *topk_w, const float *logits, int T) {
    const Config *c = &gpu.c;
    size_t smem = (2 * (size_t)c->n_routed_experts + 2 * c->n_group) * 4;
    launch(moe_route_kernel, T, 32, smem, topk_idx, topk_w, logits, c->n_routed_experts, c->n_experts_per_tok,
           c->topk_method, c->n_group, c->topk_group, c->norm_topk_prob, c->routed_scaling_factor);
}
// decode: x -> xn_out = RMSNorm(x), and the token's experts (eqs. 21-22), in one launch
static void moe_router_forward(int *topk_idx, float *topk_w, const bf16 *gate, const float *x, const float *norm_w,
                               float *xn_out) {
    const Config *c = &gpu.c;
    int E = c->n_routed_experts;
    size_t smem = ((size_t)c->dim + 2 * E + 2 * c->n_group) * 4;
    if (smem > STAGE_MAX_BYTES) die("dsv2cu: hidden size %d is too large for the GPU router", c->dim);
    launch(moe_router_kernel, ceil_div(E, 8), 256, smem, topk_idx, topk_w, gpu.route_logits, gate, x, norm_w,
           c->rms_norm_eps, xn_out, gpu.route_ticket, c->dim, E, c->n_experts_per_tok, c->topk_method, c->n_group,
           c->topk_group, c->norm_topk_prob, c->routed_scaling_factor);
}

// gate/up/SwiGLU of the decode step, fused, reading only the selected experts' rows. Work item j:
// j < K*mi: routed slot k = j / mi, row r = j % mi: hb[k][r] = silu(gate_e[r] . x) * (up_e[r] . x), e = idx[k];
// j >= K*mi: row j - K*mi of the shared experts (or the dense FFN, K = 0) into hbs (ws rows).
// One warp per item, gate and up rows loaded together; the grid is one wave of the GPU and the warps
// stride over the items (no idle blocks, no partial last wave). The shared rows are known before the
// router has run: each warp prefetches its shared rows before the wait.
__global__ void moe_gate_up_kernel(float *hb, float *hbs, const float *x, const bf16 *Wg, const bf16 *Wu, const int *idx,
                                   int K, int mi, const bf16 *Wsg, const bf16 *Wsu, int ws, int dim) {
    pdl_launch_next();
    int warps = gridDim.x * (blockDim.x >> 5), lane = threadIdx.x & 31, total = K * mi + ws;
    int j0 = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (lane == 0)
        for (int j = j0; j < total; j += warps)
            if (j >= K * mi) {
                prefetch_l2(Wsg + (size_t)(j - K * mi) * dim, (size_t)dim * sizeof(bf16));
                prefetch_l2(Wsu + (size_t)(j - K * mi) * dim, (size_t)dim * sizeof(bf16));
            }
    pdl_wait();
    extern __shared__ float xs[];
    stage_vector(xs, x, NULL, dim, 0.0f);
    x = xs;
    for (int j = j0; j < total; j += warps) {
        int shared = j >= K * mi, k = shared ? K : j / mi, r = shared ? j - K * mi : j % mi;
        size_t e = shared ? 0 : idx[k];
        const bf16 *g = shared ? Wsg + (size_t)r * dim : Wg + (e * mi + r) * dim;
        const bf16 *u = shared ? Wsu + (size_t)r * dim : Wu + (e * mi + r) * dim;
        float gv, uv;
        warp_dot2(g, u, x, dim, &gv, &uv);
        if (lane == 0) (shared ? hbs : hb + (size_t)k * mi)[r] = silu_dev(gv) * uv;
    }
}
static void moe_gate_up_forward(float *hb, float *hbs, const float *x, const GpuLayer *L, const int *idx, int K) {
    int mi = gpu.c.moe_intermediate_size, total = K * mi + L->ffn_width;
    static int wave = 0;
    if (!wave) wave = one_wave(moe_gate_up_kernel, 256, gpu.c.dim * sizeof(float));
    launch(moe_gate_up_kernel, std::min(ceil_div(total, 8), wave), 256, gpu.c.dim * sizeof(float), hb, hbs, x, (const bf16 *)L->expert_gate,
           (const bf16 *)L->expert_up, idx, K, mi, (const bf16 *)L->ffn_gate, (const bf16 *)L->ffn_up, L->ffn_width,
           gpu.c.dim);
}

// down projections of the decode step plus the residual, one warp per output row r (eq. 20):
// x[r] += sum_k g_k down_e_k[r] . hb[k]  +  down_shared[r] . hb_shared  (either part may be absent)
// The row is a sum over slots: the K routed experts (weight g_k, length mi) and the shared row cut in
// P pieces of the same length. With at most DOWN_SLOTS slots of one length (a multiple of 8), each
// lane loads 16 bytes from every slot before using any (8 loads in flight); otherwise slot by slot.
#define DOWN_SLOTS 8
__global__ void moe_down_kernel(float *x, const bf16 *Wd, const int *idx, const float *w, const float *hb, int K, int mi,
                                const bf16 *Wsd, const float *hbs, int si, int P, int dim) {
    pdl_launch_next();
    int r = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (Wsd && r < dim && lane == 0) prefetch_l2(Wsd + (size_t)r * si, (size_t)si * sizeof(bf16));
    pdl_wait();
    extern __shared__ float hs[];  // hb (K * mi) then hbs (si), when they fit
    if ((size_t)(K * mi + si) * sizeof(float) <= STAGE_MAX_BYTES && !((K * mi) & 3)) {
        if (K) stage_vector(hs, hb, NULL, K * mi, 0.0f);
        if (si) stage_vector(hs + K * mi, hbs, NULL, si, 0.0f);
        hb = hs; hbs = hs + K * mi;
    }
    if (r >= dim) return;
    int piece = P ? si / P : 0, n_slots = K + P;
    float acc = 0.0f;
    if (n_slots <= DOWN_SLOTS && (K == 0 || P == 0 || piece == mi) && ((K ? mi : piece) & 7) == 0) {
        int len8 = (K ? mi : piece) >> 3;
        const uint4 *rows[DOWN_SLOTS];
        const float4 *xs[DOWN_SLOTS];
        float wt[DOWN_SLOTS], part[DOWN_SLOTS];
        #pragma unroll
        for (int s = 0; s < DOWN_SLOTS; s++) {
            part[s] = 0.0f;
            if (s < K) {
                rows[s] = (const uint4 *)(Wd + ((size_t)idx[s] * dim + r) * mi); xs[s] = (const float4 *)(hb + (size_t)s * mi); wt[s] = w[s];
            } else if (s < n_slots) {
                rows[s] = (const uint4 *)(Wsd + (size_t)r * si + (size_t)(s - K) * piece); xs[s] = (const float4 *)(hbs + (size_t)(s - K) * piece); wt[s] = 1.0f;
            } else {
                rows[s] = NULL; xs[s] = NULL; wt[s] = 0.0f;
            }
        }
        for (int i = lane; i < len8; i += 32) {
            uint4 v[DOWN_SLOTS];
            #pragma unroll
            for (int s = 0; s < DOWN_SLOTS; s++) if (s < n_slots) v[s] = __ldg(rows[s] + i);
            #pragma unroll
            for (int s = 0; s < DOWN_SLOTS; s++) if (s < n_slots) part[s] += dot8_bf16(v[s], xs[s][2 * i], xs[s][2 * i + 1]);
        }
        #pragma unroll
        for (int s = 0; s < DOWN_SLOTS; s++) if (s < n_slots) acc += wt[s] * warp_sum(part[s]);
    } else {
        for (int k = 0; k < K; k++) acc += w[k] * warp_dot(Wd + ((size_t)idx[k] * dim + r) * mi, hb + (size_t)k * mi, mi);
        if (Wsd) acc += warp_dot(Wsd + (size_t)r * si, hbs, si);
    }
    if (lane == 0) x[r] += acc;
}
static void moe_down_forward(float *x, const GpuLayer *L, const int *idx, const float *w, const float *hb, int K,
                             const float *hbs) {
    int mi = gpu.c.moe_intermediate_size, si = L->ffn_width, P = 0;
    if (si && K && si % mi == 0) P = si / mi;                        // the shared experts, one slot each
    if (si && !K) for (P = DOWN_SLOTS; P > 1 && si % (8 * P); P--) {}  // a dense FFN, cut in P equal pieces
    if (si && !P) P = 1;
    size_t smem = (size_t)(K * mi + si) * sizeof(float);
    launch(moe_down_kernel, ceil_div(gpu.c.dim, 8), 256, smem <= STAGE_MAX_BYTES ? smem : 0, x, (const bf16 *)L->expert_down, idx, w, hb, K, mi,
           (const bf16 *)(si ? L->ffn_down : NULL), hbs, si, P, gpu.c.dim);
}

// ---------------- Prefill products on tensor cores, to float32 accuracy
// The weights are bf16 already, so they are exact as tensor-core operands. Each float32 activation
// is split into three bf16 parts, x = x1 + x2 + x3 (8 + 8 + 8 mantissa bits: all 24 of a float32;
// x1 = bf16(x), x2 = bf16(x - x1), x3 = bf16(x - x1 - x2)). Stacked as three rows per token, one
// bf16 product with float32 accumulation gives W x1, W x2, W x3, and their sum is W x to float32
// accuracy at tensor-core speed. (A plain bf16 product moved the CPU/GPU greedy text apart.)
// Layout: a split (T, n) activation is (T, 3, n) bf16; a product of it is (3T, out) float32.
// v as its three bf16 parts at dst[0], dst[stride], dst[2 * stride]
__device__ __forceinline__ void store_split3(bf16 *dst, size_t stride, float v) {
    bf16 p1 = __float2bfloat16_rn(v);
    float r1 = v - __bfloat162float(p1);
    bf16 p2 = __float2bfloat16_rn(r1);
    dst[0] = p1;
    dst[stride] = p2;
    dst[2 * stride] = __float2bfloat16_rn(r1 - __bfloat162float(p2));
}
__global__ void split3_kernel(bf16 *xs, const float *x, size_t rows, int n) {
    pdl_launch_next();
    pdl_wait();
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < rows * n; i += (size_t)gridDim.x * blockDim.x) {
        size_t r = i / n, j = i % n;
        store_split3(xs + (r * 3) * n + j, n, x[i]);
    }
}
static void split3_forward(bf16 *xs, const float *x, int T, int n) {
    launch(split3_kernel, std::min(ceil_div((long)T * n, 256), 4 * gpu.n_sm * 8), 256, 0, xs, x, (size_t)T, n);
}
// y[t][b*sy + o] = beta * y + (sum of the three rows of token t) for o < out, b < batch; y row stride ldy
__global__ void sum3_kernel(float *y, int ldy, int sy, const float *y3, size_t T, int batch, int out, float beta) {
    pdl_launch_next();
    pdl_wait();
    size_t R = (size_t)batch * out;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < T * R; i += (size_t)gridDim.x * blockDim.x) {
        size_t t = i / R, j = i % R;
        float s = (y3[(3 * t) * R + j] + y3[(3 * t + 1) * R + j]) + y3[(3 * t + 2) * R + j];
        float *dst = y + t * ldy + (j / out) * sy + j % out;
        *dst = beta != 0.0f ? beta * *dst + s : s;
    }
}
static void sum3_forward(float *y, int ldy, int sy, const float *y3, int T, int batch, int out, float beta) {
    launch(sum3_kernel, std::min(ceil_div((long)T * batch * out, 256), 4 * gpu.n_sm * 8), 256, 0, y, ldy, sy, y3,
           (size_t)T, batch, out, beta);
}
// SwiGLU of summed products, split again for the down product: hs (rows, 3, n) from g3, u3 (3 rows, n)
__global__ void swiglu_split3_kernel(bf16 *hs, const float *g3, const float *u3, size_t rows, int n) {
    pdl_launch_next();
    pdl_wait();
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < rows * n; i += (size_t)gridDim.x * blockDim.x) {
        size_t r = i / n, j = i % n;
        float g = (g3[(3 * r) * n + j] + g3[(3 * r + 1) * n + j]) + g3[(3 * r + 2) * n + j];
        float u = (u3[(3 * r) * n + j] + u3[(3 * r + 1) * n + j]) + u3[(3 * r + 2) * n + j];
        store_split3(hs + (r * 3) * n + j, n, silu_dev(g) * u);
    }
}
static void swiglu_split3_forward(bf16 *hs, const float *g3, const float *u3, int rows, int n) {
    launch(swiglu_split3_kernel, std::min(ceil_div((long)rows * n, 256), 4 * gpu.n_sm * 8), 256, 0, hs, g3, u3,
           (size_t)rows, n);
}
// C (n, m) row-major, ldc = beta C + B (n, k) row-major, ldb @ op(A): A bf16 is a linear layer's (m, k)
// weight (a_out_in: A^T) or a (k, m) matrix (W^UK_h in q W^UK_h); batch > 1 steps A, B, C by sA, sB, sC.
// (cuBLAS is column-major: there this is C^T = op(A)^T-ish; the row-major (n, k) B is its (k, n).)
static void gemm_bf16(float *C, long ldc, long sC, const bf16 *A, long lda, long sA, int a_out_in, const bf16 *B, long ldb,
                      long sB, int n, int m, int k, int batch, float beta) {
    float one = 1.0f;
    cublasCheck(cublasGemmStridedBatchedEx(gpu.blas, a_out_in ? CUBLAS_OP_T : CUBLAS_OP_N, CUBLAS_OP_N, m, n, k, &one, A,
                                           CUDA_R_16BF, lda, sA, B, CUDA_R_16BF, ldb, sB, &beta, C, CUDA_R_32F, ldc, sC,
                                           batch, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}
// a linear layer on split activations: Y (T, out) = beta Y + X W^T, X given split as xs (T, 3, in)
static void linear_forward(float *Y, const bf16 *xs, const bf16 *W, int T, int in, int out, float beta) {
    gemm_bf16(gpu.Y3, out, 0, W, in, 0, 1, xs, in, 0, 3 * T, out, in, 1, 0.0f);
    sum3_forward(Y, out, 0, gpu.Y3, T, 1, out, beta);
}

// prefill MoE, rows grouped by expert. gather: one block per grouped row, xgs[row] = xs[perm[row]] (3 parts)
__global__ void gather_rows_kernel(bf16 *xgs, const bf16 *xs, const int *perm, int n3) {
    pdl_launch_next();
    pdl_wait();
    int row = blockIdx.x;
    for (int i = threadIdx.x; i < n3; i += blockDim.x) xgs[(size_t)row * n3 + i] = xs[(size_t)perm[row] * n3 + i];
}
// combine: one block per token, x[t] += sum_k g_t,k y[inv[t,k]], y summed from its three rows
// (fixed order: deterministic, no atomics)
__global__ void moe_combine_kernel(float *x, const float *y3, const int *inv, const float *w, int K, int dim) {
    pdl_launch_next();
    pdl_wait();
    int t = blockIdx.x;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        float acc = 0.0f;
        for (int k = 0; k < K; k++) {
            size_t r = inv[t * K + k];
            acc += w[t * K + k] * ((y3[(3 * r) * dim + i] + y3[(3 * r + 1) * dim + i]) + y3[(3 * r + 2) * dim + i]);
        }
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
    g->pdl = getenv("DSV2_NO_PDL") == NULL;
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
        G->q_proj = upload_mat(L->q_b_proj, (size_t)H * g->qk_head * q_in, NULL);
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
    g->route_ticket = dev_ints(1);
    cudaCheck(cudaMemset(g->route_ticket, 0, sizeof(int)));
    g->route_logits = dev_floats((size_t)PF_MAX * c->n_routed_experts);
    // decode attention: up to one block per multiprocessor (mla_chunk sizes the splits from the length)
    g->dec_splits = g->n_sm;
    size_t heads = (size_t)ceil_div(H, MLA_HEADS) * MLA_HEADS;
    size_t parts = std::max((size_t)g->dec_splits * heads, (size_t)PF_QUERIES * ceil_div(seq_len, PF_CHUNK) * heads);
    g->part_o = dev_floats(parts * c->kv_lora_rank);
    g->part_ml = dev_floats(parts * 2);
    cudaCheck(cudaFuncSetAttribute(mla_attention_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)mla_smem_bytes(g->W)));
    cudaCheck(cudaFuncSetAttribute(matvec_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, STAGE_MAX_BYTES));
    cudaCheck(cudaFuncSetAttribute(moe_gate_up_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, STAGE_MAX_BYTES));
    cudaCheck(cudaFuncSetAttribute(moe_down_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, STAGE_MAX_BYTES));
    cudaCheck(cudaFuncSetAttribute(moe_router_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, STAGE_MAX_BYTES));
    // One L1/shared-memory split for every kernel: the attention needs the largest shared memory, and
    // when neighbouring kernels ask for different splits the multiprocessors reconfigure between them
    // (Nsight Compute: a 17 us attention launch at context 1 with about 1 us of work in it).
    const void *kernels[] = {(const void *)embed_kernel, (const void *)rmsnorm_kernel, (const void *)matvec_kernel,
                             (const void *)mla_prep_kernel, (const void *)mla_attention_kernel,
                             (const void *)mla_combine_kernel, (const void *)v_up_kernel, (const void *)moe_route_kernel, (const void *)moe_router_kernel,
                             (const void *)moe_gate_up_kernel, (const void *)moe_down_kernel, (const void *)split3_kernel,
                             (const void *)sum3_kernel, (const void *)swiglu_split3_kernel, (const void *)gather_rows_kernel,
                             (const void *)moe_combine_kernel};
    for (const void *k : kernels)
        cudaCheck(cudaFuncSetAttribute(k, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared));
    cudaCheck(cudaDeviceSynchronize());
    fprintf(stderr, "dsv2cu: model on the GPU in %.1f s; context %d%s\n", now_s() - t0, seq_len,
            g->pdl ? "" : " (DSV2_NO_PDL: no programmatic dependent launch)");
    g->ready = 1;
}

// ----------------------------------------------------------------------------
// ---------------- The forward pass on the GPU: one token (decode), captured as a CUDA graph

// token and pos are read from gpu.step on the device, so the captured graph serves every step.
// Per MoE layer: 9 kernels (10 with q_lora_rank), each launched while the one before still runs (PDL).
static void decode_step(void) {
    const Config *c = &gpu.c;
    int dim = c->dim, H = c->n_heads, W = gpu.W;
    const int *pos = gpu.step + 1;
    embed_forward(gpu.x, gpu.step, 1);
    for (int l = 0; l < c->n_layers; l++) {
        const GpuLayer *L = &gpu.layers[l];
        float *cache = gpu.kv_cache + (size_t)l * gpu.seq_len * W;
        // RMSNorm, then the query path (eqs. 12-13) and [c^KV ; k^R] (eqs. 9, 15) in one launch
        if (c->q_lora_rank) {
            matvec_forward(gpu.c_q, L->q_a_proj, c->q_lora_rank, gpu.kv_a, L->kv_a_proj_with_mqa, W, gpu.x, dim,
                           L->input_layernorm, NULL);
            matvec_forward(gpu.q, L->q_proj, H * gpu.qk_head, NULL, NULL, 0, gpu.c_q, c->q_lora_rank, L->q_a_layernorm, NULL);
        } else {
            matvec_forward(gpu.q, L->q_proj, H * gpu.qk_head, gpu.kv_a, L->kv_a_proj_with_mqa, W, gpu.x, dim,
                           L->input_layernorm, NULL);
        }
        mla_prep_forward(gpu.q_lat, cache, gpu.q, gpu.kv_a, L->kv_b_proj, L->kv_a_layernorm, pos, 1, 1);  // W^UK absorbed
        mla_attention_forward(gpu.o_lat, gpu.q_lat, cache, 0, NULL, pos, 0, 1, gpu.dec_splits);        // eqs. (17)-(18)
        v_up_forward(gpu.o, gpu.o_lat, L->kv_b_proj);                                                // eq. (11) W^UV
        matvec_forward(gpu.x, L->o_proj, dim, NULL, NULL, 0, gpu.o, H * c->v_head_dim, NULL, gpu.x);  // (19) + residual
        int K = 0;
        if (L->is_moe) {  // RMSNorm, the router's affinities and the top-k in one launch (xb keeps the norm)
            K = c->n_experts_per_tok;
            moe_router_forward(gpu.topk_idx, gpu.topk_w, L->gate, gpu.x, L->post_attention_layernorm, gpu.xb);  // (21)-(22)
        } else {
            rmsnorm_forward(gpu.xb, gpu.x, L->post_attention_layernorm, dim, 1);
        }
        moe_gate_up_forward(gpu.hb, gpu.hb_shared, gpu.xb, L, gpu.topk_idx, K);  // routed and shared, one launch
        moe_down_forward(gpu.x, L, gpu.topk_idx, gpu.topk_w, gpu.hb, K, gpu.hb_shared);  // eq. (20) + residual
    }
    matvec_forward(gpu.logits, gpu.lm_head, c->vocab_size, NULL, NULL, 0, gpu.x, dim, gpu.norm, NULL);
}

static void decode_graph_build(void) {
    if (gpu.graph) cudaCheck(cudaGraphExecDestroy(gpu.graph));
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
    size_t TK = T * K, d_c = c->kv_lora_rank, vdim = c->v_head_dim, ffn = gpu.ffn_max;
    size_t ins[] = {dim, (size_t)c->q_lora_rank, H * gpu.qk_head, H * d_c, H * vdim, ffn};
    size_t outs[] = {dim, (size_t)c->q_lora_rank, H * gpu.qk_head, (size_t)gpu.W, H * d_c, H * vdim, ffn, (size_t)c->n_routed_experts};
    size_t max_in = *std::max_element(ins, ins + 6), max_out = *std::max_element(outs, outs + 8);
    gpu.pf_tokens = dev_ints(T); gpu.pf_inv = dev_ints(TK);
    gpu.X = dev_floats(T * dim); gpu.Xb = dev_floats(T * dim);
    gpu.CQ = dev_floats(T * c->q_lora_rank);
    gpu.Q = dev_floats(T * H * gpu.qk_head); gpu.KVA = dev_floats(T * gpu.W);
    gpu.QLAT = dev_floats(T * H * gpu.W); gpu.OLAT = dev_floats(T * H * d_c);
    gpu.O = dev_floats(T * H * vdim);
    gpu.XS = dev_bf16(3 * T * max_in);
    size_t rows = 2 * TK;  // expert rows with padding (below): up to twice the average per expert
    gpu.pf_rows = rows;
    gpu.pf_perm = dev_ints(rows);
    gpu.XGS = dev_bf16(3 * rows * dim);
    gpu.HS = dev_bf16(3 * std::max(T * ffn, rows * mi));
    gpu.Y3 = dev_floats(3 * T * max_out);
    gpu.G3 = dev_floats(3 * std::max(T * ffn, rows * mi));
    gpu.U3 = dev_floats(3 * std::max(T * ffn, rows * mi));
    gpu.E3 = dev_floats(3 * rows * dim);
    gpu.IDX = dev_ints(TK); gpu.WTS = dev_floats(TK);
    gpu.pf_ready = 1;
}

// The routed experts' products, C_e (3 n, m) = B_e (3 n, k) @ A_e^T for every expert e, where A_e =
// A + e m k is the expert's (m, k) weight and B_e its n (padded) rows of split activations. The rows are
// laid out expert by expert with the same count n for every expert (the largest; the padding rows
// repeat token 0 and are never read back), so all experts are ONE strided batched product.
static void expert_gemm(float *C, const bf16 *A, const bf16 *B, int E, int n, int m, int k) {
    gemm_bf16(C, m, (long)3 * n * m, A, k, (long)m * k, 1, B, k, (long)3 * n * k, 3 * n, m, k, E, 0.0f);
}

// T tokens (in gpu.pf_tokens) at positions pos0.. : fills every layer's cache rows
static void prefill_pass(int T, int pos0) {
    const Config *c = &gpu.c;
    int dim = c->dim, H = c->n_heads, W = gpu.W, d_c = c->kv_lora_rank, K = c->n_experts_per_tok;
    int mi = c->moe_intermediate_size, E = c->n_routed_experts, nope = c->qk_nope_head_dim, vdim = c->v_head_dim;
    int qk = gpu.qk_head;
    long kvb_head = (long)(nope + vdim) * d_c;  // one head's rows of kv_b_proj: W^UK_h (nope, d_c), W^UV_h (vdim, d_c)
    const int *pos = gpu.pf_step + 1;
    std::vector<int> idx((size_t)T * K), perm(gpu.pf_rows), inv((size_t)T * K), count(E), offset(E + 1);
    embed_forward(gpu.X, gpu.pf_tokens, T);
    for (int l = 0; l < c->n_layers; l++) {
        const GpuLayer *L = &gpu.layers[l];
        float *cache = gpu.kv_cache + (size_t)l * gpu.seq_len * W;
        rmsnorm_forward(gpu.Xb, gpu.X, L->input_layernorm, dim, T);
        split3_forward(gpu.XS, gpu.Xb, T, dim);
        linear_forward(gpu.KVA, gpu.XS, L->kv_a_proj_with_mqa, T, dim, W, 0.0f);                  // eqs. (9), (15) inputs
        if (c->q_lora_rank) {
            linear_forward(gpu.CQ, gpu.XS, L->q_a_proj, T, dim, c->q_lora_rank, 0.0f);           // eq. (12)
            rmsnorm_forward(gpu.CQ, gpu.CQ, L->q_a_layernorm, c->q_lora_rank, T);
            split3_forward(gpu.XS, gpu.CQ, T, c->q_lora_rank);
            linear_forward(gpu.Q, gpu.XS, L->q_proj, T, c->q_lora_rank, H * qk, 0.0f);           // eq. (13)
        } else {
            linear_forward(gpu.Q, gpu.XS, L->q_proj, T, dim, H * qk, 0.0f);
        }
        mla_prep_forward(gpu.QLAT, cache, gpu.Q, gpu.KVA, L->kv_b_proj, L->kv_a_layernorm, pos, 0, T);  // cache rows, q^R
        // absorbed query, all heads in one batched product: QLAT[t][h][:d_c] = q_t,h^C W^UK_h
        split3_forward(gpu.XS, gpu.Q, T, H * qk);
        gemm_bf16(gpu.Y3, (long)H * d_c, d_c, L->kv_b_proj, d_c, kvb_head, 0, gpu.XS, (long)H * qk, qk, 3 * T, d_c, nope, H, 0.0f);
        sum3_forward(gpu.QLAT, H * W, W, gpu.Y3, T, H, d_c, 0.0f);
        // causal attention: query b sees rows 0..pos0+b; the decode kernel with one "sequence" per query
        for (int q0 = 0; q0 < T; q0 += PF_QUERIES) {
            int nb = T - q0 < PF_QUERIES ? T - q0 : PF_QUERIES;
            mla_attention_forward(gpu.OLAT + (size_t)q0 * H * d_c, gpu.QLAT + (size_t)q0 * H * W, cache, 0, NULL, pos, q0,
                                  nb, ceil_div(pos0 + q0 + nb, PF_CHUNK));
        }
        // W^UV per head, batched: O[t][h*vdim + v] = W^UV_h[v] . OLAT[t][h]   (eq. 11 absorbed)
        split3_forward(gpu.XS, gpu.OLAT, T, H * d_c);
        gemm_bf16(gpu.Y3, (long)H * vdim, vdim, L->kv_b_proj + (size_t)nope * d_c, d_c, kvb_head, 1, gpu.XS, (long)H * d_c,
                  d_c, 3 * T, vdim, d_c, H, 0.0f);
        sum3_forward(gpu.O, H * vdim, vdim, gpu.Y3, T, H, vdim, 0.0f);
        split3_forward(gpu.XS, gpu.O, T, H * vdim);
        linear_forward(gpu.X, gpu.XS, L->o_proj, T, H * vdim, dim, 1.0f);                          // eq. (19) + residual
        rmsnorm_forward(gpu.Xb, gpu.X, L->post_attention_layernorm, dim, T);
        split3_forward(gpu.XS, gpu.Xb, T, dim);
        if (L->ffn_width) {  // the shared experts, or the dense FFN
            int w = L->ffn_width;
            gemm_bf16(gpu.G3, w, 0, L->ffn_gate, dim, 0, 1, gpu.XS, dim, 0, 3 * T, w, dim, 1, 0.0f);
            gemm_bf16(gpu.U3, w, 0, L->ffn_up, dim, 0, 1, gpu.XS, dim, 0, 3 * T, w, dim, 1, 0.0f);
            swiglu_split3_forward(gpu.HS, gpu.G3, gpu.U3, T, w);
            linear_forward(gpu.X, gpu.HS, L->ffn_down, T, w, dim, 1.0f);
        }
        if (!L->is_moe) continue;
        // routed experts: route on the GPU, group the (token, slot) pairs by expert on the host
        linear_forward(gpu.route_logits, gpu.XS, L->gate, T, dim, E, 0.0f);
        moe_route_forward(gpu.IDX, gpu.WTS, gpu.route_logits, T);
        cudaCheck(cudaMemcpyAsync(idx.data(), gpu.IDX, idx.size() * sizeof(int), cudaMemcpyDeviceToHost, gpu.stream));
        cudaCheck(cudaStreamSynchronize(gpu.stream));
        std::fill(count.begin(), count.end(), 0);
        for (size_t i = 0; i < idx.size(); i++) count[idx[i]]++;
        int n_max = *std::max_element(count.begin(), count.end());
        int padded = !gpu.pf_compact && (size_t)E * n_max <= gpu.pf_rows;
        if (padded) {  // padded: expert e's j-th row at e * n_max + j
            for (int e = 0; e < E; e++) offset[e] = e * n_max;
        } else {  // too uneven for the padded layout: compact rows, one product per expert
            offset[0] = 0;
            for (int e = 0; e < E; e++) offset[e + 1] = offset[e] + count[e];
        }
        int n_rows = padded ? E * n_max : T * K;
        std::fill(perm.begin(), perm.begin() + n_rows, 0);  // padding rows: token 0
        std::fill(count.begin(), count.end(), 0);
        for (size_t i = 0; i < idx.size(); i++) {  // i = t*K + k, in token order within each expert
            int row = offset[idx[i]] + count[idx[i]]++;
            perm[row] = (int)(i / K);
            inv[i] = row;
        }
        cudaCheck(cudaMemcpyAsync(gpu.pf_perm, perm.data(), n_rows * sizeof(int), cudaMemcpyHostToDevice, gpu.stream));
        cudaCheck(cudaMemcpyAsync(gpu.pf_inv, inv.data(), inv.size() * sizeof(int), cudaMemcpyHostToDevice, gpu.stream));
        launch(gather_rows_kernel, n_rows, 256, 0, gpu.XGS, (const bf16 *)gpu.XS, (const int *)gpu.pf_perm, 3 * dim);
        size_t ew = (size_t)mi * dim;
        if (padded) {
            expert_gemm(gpu.G3, L->expert_gate, gpu.XGS, E, n_max, mi, dim);
            expert_gemm(gpu.U3, L->expert_up, gpu.XGS, E, n_max, mi, dim);
        } else {
            for (int e = 0; e < E; e++) {
                if (!count[e]) continue;
                expert_gemm(gpu.G3 + (size_t)3 * offset[e] * mi, L->expert_gate + e * ew, gpu.XGS + (size_t)3 * offset[e] * dim, 1, count[e], mi, dim);
                expert_gemm(gpu.U3 + (size_t)3 * offset[e] * mi, L->expert_up + e * ew, gpu.XGS + (size_t)3 * offset[e] * dim, 1, count[e], mi, dim);
            }
        }
        swiglu_split3_forward(gpu.HS, gpu.G3, gpu.U3, n_rows, mi);
        if (padded) {
            expert_gemm(gpu.E3, L->expert_down, gpu.HS, E, n_max, dim, mi);
        } else {
            for (int e = 0; e < E; e++)
                if (count[e])
                    expert_gemm(gpu.E3 + (size_t)3 * offset[e] * dim, L->expert_down + e * ew, gpu.HS + (size_t)3 * offset[e] * mi, 1, count[e], dim, mi);
        }
        launch(moe_combine_kernel, T, 256, 0, gpu.X, (const float *)gpu.E3, (const int *)gpu.pf_inv, (const float *)gpu.WTS,
               K, dim);                                                                             // eq. (20)
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
