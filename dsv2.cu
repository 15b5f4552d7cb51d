/* dsv2.cu: DeepSeek-V2 inference on an NVIDIA Hopper GPU (sm_90), next to dsv2.c.
 *
 * The loader, tokenizer, sampler, generation loop and command line are dsv2.c's: this file
 * includes it with DSV2_GPU defined, which points the generation loop's hooks at
 * forward_gpu() (one token, the decode step, replayed as a CUDA graph), forward_sample_gpu() (the
 * same step with dsv2.c's sample() on the GPU at its end: only the token id comes back),
 * prefill_gpu() (the prompt, one pass per layer with cuBLAS matrix products) and gpu_setup() (the
 * upload, before the clock starts). Same model file, same flags.
 *
 * On the GPU: weights in bf16 (fp32 files are rounded at upload), the latent KV cache in float32
 * [layers][seq][kv_lora_rank + qk_rope_head_dim], activations and accumulation in float32.
 * Why a float32 cache: a bf16 cache perturbs the logits by about 2e-3 of their scale, and on the
 * default model that flipped greedy decoding at step 4, where the two best logits were 0.006
 * apart (measured on an H100); with float32 the GPU computes what dsv2.c computes, token by token.
 * The cache still holds only the latent (576 values per token per layer for DeepSeek-V2).
 * -m batch (dsv2_serve.cuh) keeps many sequences' caches in pages, float32 or, with --kv bf16, bf16
 * (each value rounded as dsv2.c rounds it), and with --kv-layout mha the expanded cache a model without
 * MLA would need (the economy experiment, docs/BENCHMARKS.md).
 * Attention is the absorbed form (paper Appendix C), except over the mha layout's expanded rows, which it
 * reads as multi-head attention does; -a naive is refused (run ./dsv2 for it).
 *
 * Keeping float32 accuracy on the tensor cores: the attention runs in 3xTF32 (each float32 operand
 * split in two tf32 parts, three products), the prefill's matrix products in bf16 x 3 (the weights are
 * bf16 already; each activation split in three bf16 parts). The decode step is 9 kernels per MoE
 * layer, each launched while the previous one runs (programmatic dependent launch) so that it can
 * stream its weights into L2 early. docs/BENCHMARKS.md has the measurements behind each choice.
 *
 * Reading order. Each kernel's first comment names the equations and the dsv2.c function it
 * implements, its shapes, and what one thread / warp / block does; each trick is explained once,
 * where it is defined:
 *   dsv2_common.cuh   CUDA utilities and the tricks used everywhere: warp reductions, 16-byte bf16
 *                     dot products, programmatic dependent launch (PDL), L2 prefetch, cp.async,
 *                     the mma.sync fragment layout, 3xTF32
 *   dsv2.cu (here)    the GPU state, the building blocks (embedding, RMSNorm, matrix-vector products),
 *                     setup, decode_step (dsv2.c's forward, one token) and prefill_pass (the prompt)
 *   dsv2_mla.cuh      Multi-head Latent Attention: mla_prep, mla_attention + mla_combine (split-KV with
 *                     a log-sum-exp merge, tensor cores, double buffering), v_up
 *   dsv2_mla_decode.cuh  the attention of a batch of queries over the paged cache (the batch engine):
 *                     latent rows (a plan balances the splits; bf16 or float32 cache) and expanded MHA rows
 *   dsv2_moe.cuh      DeepSeekMoE at decode: the router, gate/up/SwiGLU, down + residual; and over a batch
 *                     of tokens (moe_batch_forward): grouping by expert on the GPU, grouped tensor-core products
 *   dsv2_prefill.cuh  the prefill's products on tensor cores at float32 accuracy (bf16 x 3), expert rows
 *   dsv2_sample.cuh   dsv2.c's sample() for B rows of logits (argmax, softmax, top-p by a radix select),
 *                     run inside the decode graph so that only the drawn token id comes back to the host
 *   dsv2_bench.cuh    --bench: self-checks and benchmarks (tools/bench_cuda.sh)
 *   dsv2_serve.cuh    -m batch: many sequences at once over a paged cache (forward_batch, continuous
 *                     batching, decode graphs per batch size), --bench-serve, --serve-check
 *   dev/cuda/         the MLA decode kernel version by version, from dsv2.c's loop to mla_attention_kernel
 *
 * Paper equation -> kernel (decode step; the prefill is named where it differs):
 *   (9)  c^KV = W^DKV h       matvec_kernel (rows of kv_a_proj_with_mqa), RMSNorm into the cache row in mla_prep_kernel
 *   (10), (11) k^C, v^C       never built (Appendix C): W^UK goes into the query in mla_prep_kernel (prefill:
 *                             gemm_bf16), W^UV is applied after the sum in v_up_kernel (prefill: gemm_bf16)
 *   (12) c^Q = W^DQ h         matvec_kernel (q_a_proj; prefill: linear_forward)
 *   (13) q^C = W^UQ c^Q       matvec_kernel (q_proj, which also holds W^QR)
 *   (14), (15) RoPE           mla_prep_kernel (q^R of each head; k^R into the cache row)
 *   (16), (17) [q^C; q^R], [k^C; k^R]   one dot product of width d_c + d_h^R in mla_attention_kernel
 *   (18) softmax, sum_j p v   mla_attention_kernel (per split of the cache) + mla_combine_kernel (merge)
 *   (19) u = W^O o            matvec_kernel (o_proj, residual added)
 *   (20) h' = u + FFNs        the shared experts' gate/up in moe_router_kernel's launch, the routed experts' in
 *                             moe_gate_up_kernel, every down projection in moe_down_kernel (ffn_decode_forward;
 *                             prefill: gemm_bf16, swiglu_split3_kernel, moe_combine_kernel)
 *   (21), (22) top-K of softmax(u^T e)  the affinities in moe_router_kernel, the pick in moe_gate_up_kernel
 *                             (prefill: linear_forward + moe_route_kernel), both through route_block
 *
 * Build: nvcc -O3 -arch=sm_90 -o dsv2cu dsv2.cu -lcublas   (or make dsv2cu)
 * Extra modes (before the usual flags): ./dsv2cu --gpu-check   exit 0 if a GPU is usable
 *                                      ./dsv2cu --bench MODEL  benchmarks (tools/bench_cuda.sh; --ablate CTX: where
 *                                                              the decode step's time goes, kernel by kernel;
 *                                                              --timeline CTX in the dsv2cu_timeline build: block by block)
 *                                      ./dsv2cu --check-sampler  the GPU sampler against dsv2.c's sample()
 *                                      ./dsv2cu --bench-serve MODEL ...  batched decode steps (dsv2_serve.cuh)
 *                                      ./dsv2cu --serve-check MODEL [N]  the batch engine against dsv2.c
 *                                      ./dsv2cu --bench-attn [CTX]  the batch attention over a paged cache, checked and timed
 */
#define DSV2_GPU
#define main dsv2_main  // dsv2.c's main is the CLI; ours adds --gpu-check and --bench first
#include "dsv2.c"
#undef main
#include "dsv2_common.cuh"  // CUDA utilities and the Hopper tricks (PDL, L2 prefetch, cp.async, 3xTF32)

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

#define PF_MAX 2048       // prefill: tokens per pass (longer prompts take several)
#define PF_QUERIES 128    // prefill: queries per attention launch
#define PF_CHUNK 256      // prefill: at most this many cache rows per attention block

// the single-sequence decode step's inputs on the device, and what the sampling graph leaves there
typedef struct {
    int token, pos;      // the token to run and its position; after a sampling step: the drawn token, pos + 1
    uint64_t rng;        // the sampler's xorshift state (dsv2.c's Sampler.rng_state)
} StepIO;

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
    int *step;                // device StepIO: the decode graph reads token and pos there, so one graph serves every step
    StepIO *step_host;        // pinned: the sampling graph copies the StepIO of the next step here (only the id crosses)
    StepIO *step_upload;      // pinned: what the host sends when the device's StepIO is not the step it asks for
    int step_known;           // step_host holds the device's StepIO (no upload needed if the step asks for it)
    int *pf_step;             // device [unused, pos0] for the prefill
    // decode activations (one token)
    float *x, *xb, *c_q, *q, *kv_a, *q_lat, *o_lat, *o, *hb, *hb_shared, *logits;
    int *topk_idx; float *topk_w;
    float *route_logits;      // (PF_MAX, n_routed_experts) affinities u^T e_i for the router
    float *part_o, *part_ml;  // split-sequence partial results of the attention
    int dec_splits;           // the decode attention's splits of the cache (DSV2_DEC_SPLITS: fewer)
    cudaStream_t stream;
    const void *ablate;          // --bench --ablate: launch() skips this kernel (the step timed without it)
    int launches;                // launch() calls so far (--bench --ablate counts a decode step's)
    cudaGraphExec_t graph;       // decode_step: the logits (--dump-logits, --bench)
    cudaGraphExec_t graph_next;  // decode_step, then the draw of the next token (sample_forward)
    float next_temperature, next_topp;  // the sampler graph_next was captured with
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

// launch a kernel on the GPU stream, with programmatic dependent launch unless DSV2_NO_PDL is set;
// launch_cluster: in clusters of `cluster` blocks along x (sm_90: blocks that share their shared memory)
template <typename... Params, typename... Args>
static void launch_cluster(int cluster, void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, Args... args) {
    if ((const void *)kernel == gpu.ablate) return;
    gpu.launches++;
    cudaLaunchAttribute attr[2];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = cluster; attr[0].val.clusterDim.y = 1; attr[0].val.clusterDim.z = 1;
    attr[1].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[1].val.programmaticStreamSerializationAllowed = 1;
    cudaLaunchConfig_t cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.gridDim = grid; cfg.blockDim = block; cfg.dynamicSmemBytes = smem; cfg.stream = gpu.stream;
    cfg.attrs = cluster ? attr : attr + 1; cfg.numAttrs = (cluster ? 1 : 0) + (gpu.pdl ? 1 : 0);
    cudaCheck(cudaLaunchKernelEx(&cfg, kernel, ((Params)args)...));
}
template <typename... Params, typename... Args>
static void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, Args... args) {
    launch_cluster(0, kernel, grid, block, smem, args...);
}

// what enqueue() puts on gpu.stream, captured as a CUDA graph and instantiated (the graph itself is freed)
template <typename F> static cudaGraphExec_t capture_graph(F enqueue) {
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    cudaCheck(cudaStreamBeginCapture(gpu.stream, cudaStreamCaptureModeGlobal));
    enqueue();
    cudaCheck(cudaStreamEndCapture(gpu.stream, &graph));
    cudaCheck(cudaGraphInstantiate(&exec, graph, 0));
    cudaCheck(cudaGraphDestroy(graph));
    return exec;
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
    if (w.dtype == DTYPE_BF16) {
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
// ---------------- Building blocks (each kernel with its launcher); T = tokens

// dsv2.c forward's first line, x = embed_tokens[token], for T tokens: x (T, dim) float32 from
// embed_tokens (vocab, dim) bf16. One block per token, its threads stride over the dim values.
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

// dsv2.c's rmsnorm for one row, by the whole block: out (n) = w * (x * rsqrt(mean(x^2) + eps)); out may be x
__device__ void rmsnorm_block(float *out, const float *x, const float *w, int n, float eps) {
    float ss = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) ss += x[i] * x[i];
    float r = 1.0f / sqrtf(block_sum(ss) / n + eps);
    for (int i = threadIdx.x; i < n; i += blockDim.x) out[i] = w[i] * (x[i] * r);
}
// Staging a vector into shared memory, the first thing most decode kernels do after pdl_wait, so it is
// on every kernel's critical path. Trick: each thread issues all its loads of a round before its first
// store to shared memory. A plain copy loop (load, store, load, store...) costs one round trip to memory
// per 16 bytes a thread copies, because the compiler cannot move a global load above a shared-memory
// store it cannot prove distinct: moe_down's 45 KB of hb took 11 round trips before its first weight load.
#define STAGE_U 4       // 16-byte loads in flight per thread per round (one round: n <= 4096 at 256 threads)
#define STAGE_NORM_U 2  // with the norm: x and w pieces per thread kept in registers (n <= 2048 at 256 threads;
                        // more would cost the router a block per multiprocessor)
// dst (na + nb floats) = [a ; b], from global memory: U loads in flight per thread per round. dst, a, b
// 16-byte aligned, na and nb multiples of 4. No barrier.
template <int U>
__device__ void stage_copy(float *dst, const float *a, int na, const float *b, int nb) {
    const float4 *a4 = (const float4 *)a, *b4 = (const float4 *)b;
    float4 *d4 = (float4 *)dst;
    int na4 = na >> 2, n4 = na4 + (nb >> 2), bd = blockDim.x;
    for (int i0 = threadIdx.x; i0 < n4; i0 += U * bd) {
        float4 v[U];
        #pragma unroll
        for (int u = 0; u < U; u++) {
            int i = i0 + u * bd;
            if (i < n4) v[u] = *(i < na4 ? a4 + i : b4 + (i - na4));
        }
        #pragma unroll
        for (int u = 0; u < U; u++)
            if (i0 + u * bd < n4) d4[i0 + u * bd] = v[u];
    }
}
__device__ __forceinline__ float sumsq4(float4 v) { return v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w; }
__device__ __forceinline__ float4 norm4(float4 g, float4 v, float r) {  // rmsnorm_block's w[i] * (x[i] * r), 4 at once
    return make_float4(g.x * (v.x * r), g.y * (v.y * r), g.z * (v.z * r), g.w * (v.w * r));
}
// x (n floats) into this block's shared memory xs, normalised on the way when w is given:
// xs = w * (x * rsqrt(mean(x^2) + eps)). When n <= 4 STAGE_NORM_U blockDim, one round: each thread loads its
// x and w pieces at once and keeps them in registers across the sum. Ends with a barrier.
__device__ void stage_vector(float *xs, const float *x, const float *w, int n, float eps) {
    int n4 = n >> 2, bd = blockDim.x, tid = threadIdx.x;
    if ((n & 3) || ((uintptr_t)x & 15) || ((uintptr_t)w & 15)) {
        if (w) rmsnorm_block(xs, x, w, n, eps);
        else for (int i = tid; i < n; i += bd) xs[i] = x[i];
        __syncthreads();
        return;
    }
    if (!w) {
        stage_copy<STAGE_U>(xs, x, n, NULL, 0);
        __syncthreads();
        return;
    }
    const float4 *x4 = (const float4 *)x, *w4 = (const float4 *)w;
    float4 *s4 = (float4 *)xs;
    float ss = 0.0f;
    if (n4 <= STAGE_NORM_U * bd) {  // one round
        float4 v[STAGE_NORM_U], g[STAGE_NORM_U];
        #pragma unroll
        for (int u = 0; u < STAGE_NORM_U; u++)
            if (tid + u * bd < n4) { v[u] = x4[tid + u * bd]; g[u] = w4[tid + u * bd]; }
        #pragma unroll
        for (int u = 0; u < STAGE_NORM_U; u++)
            if (tid + u * bd < n4) ss += sumsq4(v[u]);
        float r = 1.0f / sqrtf(block_sum(ss) / n + eps);
        #pragma unroll
        for (int u = 0; u < STAGE_NORM_U; u++)
            if (tid + u * bd < n4) s4[tid + u * bd] = norm4(g[u], v[u], r);
        __syncthreads();
        return;
    }
    stage_copy<STAGE_U>(xs, x, n, NULL, 0);  // larger: x in rounds, then the norm in place
    __syncthreads();
    for (int i = tid; i < n4; i += bd) ss += sumsq4(s4[i]);
    float r = 1.0f / sqrtf(block_sum(ss) / n + eps);  // block_sum's barriers end the reads of s4 above
    for (int i0 = tid; i0 < n4; i0 += STAGE_U * bd) {
        float4 g[STAGE_U];
        #pragma unroll
        for (int u = 0; u < STAGE_U; u++) if (i0 + u * bd < n4) g[u] = w4[i0 + u * bd];
        #pragma unroll
        for (int u = 0; u < STAGE_U; u++)
            if (i0 + u * bd < n4) s4[i0 + u * bd] = norm4(g[u], s4[i0 + u * bd], r);
    }
    __syncthreads();
}
#define STAGE_MAX_BYTES (96 * 1024)  // shared memory for a staged input vector (larger ones are read from global)

// dsv2.c's rmsnorm for T rows: out (T, n) = RMSNorm(x (T, n)) * w (n). One block per row (token).
// (The decode step fuses its norms into matvec_kernel and moe_router_kernel; the prefill uses this.)
__global__ void rmsnorm_kernel(float *out, const float *x, const float *w, int n, float eps) {
    pdl_launch_next();
    pdl_wait();
    size_t t = blockIdx.x;
    rmsnorm_block(out + t * n, x + t * n, w, n, eps);
}
static void rmsnorm_forward(float *out, const float *x, const float *w, int n, int T) {
    launch(rmsnorm_kernel, T, 256, 0, out, x, w, n, gpu.c.rms_norm_eps);
}

// dsv2.c's matmul at decode (one token), with the rmsnorm before it fused: the products of eqs. (9),
// (12), (13), (15) (q_a_proj / q_proj and kv_a_proj_with_mqa), (19) (o_proj) and the lm_head.
//   out1 (d1) = W1 (d1, n) @ xn,  out2 (d2) = W2 (d2, n) @ xn,  xn = norm_w ? RMSNorm(x) * norm_w : x (n)
//   (two matrices with the same input in one launch: q and kv_a); with residual, out1 = residual + W1 @ xn
//   (residual == out1 fuses the residual add of eq. 19).
// One warp per output row: warp_dot over the row's n bf16 weights, two rows at a time (warp_dot2).
// One block: stages xn (n floats, normalised on the way) in its shared memory, then its 8 warps stride
// over the rows. The grid is one wave (as many blocks as fit on the GPU at once, one_wave), so each
// warp takes several rows (lm_head: about 50) and few blocks repeat the norm. The weights depend on no
// earlier kernel, so before pdl_wait each warp either prefetches its first row into L2, or (pre > 0, every
// row of every warp: at most pre) copies all its rows into shared memory behind xn (cp.async). The copy is
// asked for where the kernel before is a weight stream (q and kv_a, after moe_down; in layer 0 after the
// embedding): the blocks start as moe_down's leave, and their rows arrive during its tail. For o_proj,
// whose blocks start during the latency-bound attention chain, the same copies gained nothing at context
// 512 and cost about 15 us a step at 8192 (docs/BENCHMARKS.md, issue 14's seventh pass).
__device__ __forceinline__ const bf16 *matvec_row(int r, const bf16 *W1, int d1, const bf16 *W2, int d2, int n) {
    return r < d1 ? W1 + (size_t)r * n : r < d1 + d2 ? W2 + (size_t)(r - d1) * n : NULL;
}
__global__ void matvec_kernel(float *out1, const bf16 *W1, int d1, float *out2, const bf16 *W2, int d2, const float *x,
                              int n, const float *norm_w, float eps, const float *residual, int pre) {
    pdl_launch_next();
    extern __shared__ float xs[];  // xn (n), then with pre each warp's rows (8 x pre x n bf16)
    int warps = gridDim.x * (blockDim.x >> 5), lane = threadIdx.x & 31;
    int r0 = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    bf16 *rows = (bf16 *)(xs + n) + (size_t)(threadIdx.x >> 5) * pre * n;  // this warp's rows r0, r0 + warps, ...
    if (pre) {
        for (int k = 0; k < pre; k++) {
            const bf16 *w = matvec_row(r0 + k * warps, W1, d1, W2, d2, n);
            if (w) for (int i = 8 * lane; i < n; i += 256) cp_async16(rows + (size_t)k * n + i, w + i, 16);
        }
        cp_async_commit();
    } else {
        const bf16 *first = matvec_row(r0, W1, d1, W2, d2, n);
        if (first && lane == 0) prefetch_l2(first, (size_t)n * sizeof(bf16));
    }
    pdl_wait();
    const float *xv = x;
    if ((size_t)n * sizeof(float) <= STAGE_MAX_BYTES) {  // norm_w and pre require it (matvec_forward checks)
        stage_vector(xs, x, norm_w, n, eps);
        xv = xs;
    }
    if (pre) {
        cp_async_wait<0>();  // this lane's copies have landed
        __syncwarp();        // and the other lanes' of this warp
    }
    for (int r = r0, k = 0; r < d1 + d2; r += 2 * warps, k += 2) {  // rows r and r + warps together when both exist
        float v[2];
        int rr[2] = {r, r + warps};
        const bf16 *a = pre ? rows + (size_t)k * n : matvec_row(rr[0], W1, d1, W2, d2, n);
        const bf16 *b = rr[1] >= d1 + d2 ? NULL : pre ? rows + (size_t)(k + 1) * n : matvec_row(rr[1], W1, d1, W2, d2, n);
        if (b) {
            if (pre) warp_dot2<true>(a, b, xv, n, &v[0], &v[1]);
            else warp_dot2(a, b, xv, n, &v[0], &v[1]);
        } else {
            v[0] = pre ? warp_dot<true>(a, xv, n) : warp_dot(a, xv, n);
        }
        for (int i = 0; i < 2 && rr[i] < d1 + d2; i++)
            if (lane == 0) {
                if (rr[i] < d1) out1[rr[i]] = (residual ? residual[rr[i]] : 0.0f) + v[i];
                else out2[rr[i] - d1] = v[i];
            }
    }
}
// preload: the kernel before is a weight stream, so the rows may go to shared memory before the wait
// (when every warp's rows fit: at most 2 a warp)
static void matvec_forward(float *out1, const bf16 *W1, int d1, float *out2, const bf16 *W2, int d2, const float *x,
                           int n, const float *norm_w, const float *residual, bool preload) {
    static int wave = 0;
    if (!wave) wave = one_wave(matvec_kernel, 256, 16384);
    size_t smem = (size_t)n * sizeof(float);
    if (smem > STAGE_MAX_BYTES) {
        if (norm_w) die("dsv2cu: a normalised input of %d values exceeds the GPU's staging space", n);
        smem = 0;
    }
    int blocks = std::min(ceil_div(d1 + d2, 8), wave);
    int pre = ceil_div(d1 + d2, blocks * 8);  // rows a warp, at most
    size_t row_bytes = (size_t)8 * pre * n * sizeof(bf16);
    if (!preload || !smem || (n & 7) || pre > 2 || smem + row_bytes > STAGE_MAX_BYTES) pre = 0;  // (16-byte copies)
    else smem += row_bytes;
    launch(matvec_kernel, blocks, 256, smem, out1, W1, d1, out2, W2, d2, x, n, norm_w,
           gpu.c.rms_norm_eps, residual, pre);
}

#include "dsv2_mla.cuh"      // MLA: absorbed query, cache row, attention (split-KV), W^UV
#include "dsv2_mla_decode.cuh"  // attention of a batch over the paged cache: latent (MLA) and expanded (MHA) rows
#include "dsv2_prefill.cuh"  // prefill products on tensor cores (bf16 x 3) and the expert grouping
#include "dsv2_moe.cuh"      // DeepSeekMoE: decode (router, gate/up, down) and over a batch (split3 from the prefill)
#include "dsv2_sample.cuh"   // dsv2.c's sample() for B rows of logits, inside the decode graph

// ----------------------------------------------------------------------------
// ---------------- Setup: upload the model, allocate the cache and activations

// what this GPU path cannot run is refused in one line: dsv2.c's CLI calls this right after loading
static void gpu_check_model(const Model *m) {
    if (m->config.dtype == DTYPE_Q8)
        die("dsv2cu runs fp32 and bf16 model files; q8 runs on the CPU (./dsv2), or export with --dtype bf16");
}

static void gpu_init(const Model *m, int seq_len) {
    const Config *c = &m->config;
    Gpu *g = &gpu;
    if (g->ready) {
        if (seq_len != g->seq_len) die("dsv2cu: one context length per process (%d, then %d)", g->seq_len, seq_len);
        return;
    }
    gpu_check_model(m);
    // DSV2_DEC_SPLITS=N: the decode attention in at most N splits (tests: several 32-row tiles a split at short
    // contexts); a whole number, checked here, and against the GPU's split count below
    const char *dec_env = getenv("DSV2_DEC_SPLITS");
    long dec_want = 0;
    if (dec_env) {
        char *end;
        dec_want = strtol(dec_env, &end, 10);
        if (end == dec_env || *end || dec_want < 1 || dec_want > INT_MAX)
            die("dsv2cu: DSV2_DEC_SPLITS=%s is not a whole number of at least 1", dec_env);
    }
    int n_dev = 0;
    if (cudaGetDeviceCount(&n_dev) != cudaSuccess || n_dev == 0) die("dsv2cu: no CUDA GPU found");
    mla_config_check(c);
    g->c = *c;
    g->seq_len = seq_len;
    g->pdl = getenv("DSV2_NO_PDL") == NULL;
    int no_prefetch = getenv("DSV2_NO_PREFETCH") != NULL;  // prefetch_l2 does nothing (what the prefetches buy)
    cudaCheck(cudaMemcpyToSymbol(prefetch_off, &no_prefetch, sizeof(int)));
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
    cudaCheck(cudaMalloc(&g->step, sizeof(StepIO)));
    cudaCheck(cudaMallocHost(&g->step_host, sizeof(StepIO)));
    cudaCheck(cudaMallocHost(&g->step_upload, sizeof(StepIO)));
    g->pf_step = dev_ints(2);
    sample_init(1, c->vocab_size);
    g->x = dev_floats(dim); g->xb = dev_floats(dim); g->c_q = dev_floats(c->q_lora_rank);
    g->q = dev_floats((size_t)H * g->qk_head); g->kv_a = dev_floats(g->W);
    g->q_lat = dev_floats((size_t)H * g->W); g->o_lat = dev_floats((size_t)H * c->kv_lora_rank);
    g->o = dev_floats((size_t)H * c->v_head_dim);
    g->hb = dev_floats((size_t)c->n_experts_per_tok * mi); g->hb_shared = dev_floats(g->ffn_max);
    g->logits = dev_floats(c->vocab_size);
    g->topk_idx = dev_ints(c->n_experts_per_tok); g->topk_w = dev_floats(c->n_experts_per_tok);
    g->route_logits = dev_floats((size_t)PF_MAX * c->n_routed_experts);
    // decode attention: up to one block per multiprocessor (mla_chunk sizes the splits from the length)
    g->dec_splits = g->n_sm;
    if (dec_want > g->dec_splits) die("dsv2cu: DSV2_DEC_SPLITS=%s outside 1..%d", dec_env, g->dec_splits);
    if (dec_want) g->dec_splits = (int)dec_want;
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
                           L->input_layernorm, NULL, true);
            matvec_forward(gpu.q, L->q_proj, H * gpu.qk_head, NULL, NULL, 0, gpu.c_q, c->q_lora_rank, L->q_a_layernorm, NULL,
                           false);
        } else {
            matvec_forward(gpu.q, L->q_proj, H * gpu.qk_head, gpu.kv_a, L->kv_a_proj_with_mqa, W, gpu.x, dim,
                           L->input_layernorm, NULL, true);
        }
        mla_prep_forward(gpu.q_lat, cache, gpu.q, gpu.kv_a, L->kv_b_proj, L->kv_a_layernorm, pos, 1, 1);  // W^UK absorbed
        mla_attention_forward(gpu.o_lat, gpu.q_lat, cache, 0, NULL, pos, 0, 1, gpu.dec_splits);        // eqs. (17)-(18)
        v_up_forward(gpu.o, gpu.o_lat, L->kv_b_proj);                                                // eq. (11) W^UV
        matvec_forward(gpu.x, L->o_proj, dim, NULL, NULL, 0, gpu.o, H * c->v_head_dim, NULL, gpu.x, false);  // (19) + residual
        ffn_decode_forward(gpu.x, L);  // eqs. (20)-(22) + residual: router (and shared experts), gate/up, down
    }
    matvec_forward(gpu.logits, gpu.lm_head, c->vocab_size, NULL, NULL, 0, gpu.x, dim, gpu.norm, NULL, false);
}

// after a sampling step: the next step runs the drawn token (already in StepIO.token) at pos + 1
__global__ void step_advance_kernel(StepIO *io) {
    pdl_launch_next();
    pdl_wait();
    io->pos++;
}

// decode_step captured as a CUDA graph; with a sampler, followed by dsv2.c's sample() on the logits
// (sample_forward: the token into StepIO, which then moves to the next position) and the copy of the
// StepIO to pinned host memory: per token, 16 bytes cross to the host instead of the logits
static cudaGraphExec_t decode_capture(const Sampler *sp) {
    cudaGraphExec_t exec = capture_graph([&] {
        decode_step();
        if (sp) {
            StepIO *io = (StepIO *)gpu.step;
            sample_forward(&io->token, gpu.logits, 1, gpu.c.vocab_size, sp->temperature, sp->topp, &io->rng);
            launch(step_advance_kernel, 1, 32, 0, io);
            cudaCheck(cudaMemcpyAsync(gpu.step_host, io, sizeof(StepIO), cudaMemcpyDeviceToHost, gpu.stream));
        }
    });
    cudaCheck(cudaGraphUpload(exec, gpu.stream));
    return exec;
}

static void decode_graph_build(void) {
    if (gpu.graph) cudaCheck(cudaGraphExecDestroy(gpu.graph));
    gpu.graph = decode_capture(NULL);
}

static void decode_launch(int token, int pos) {
    int step[2] = {token, pos};
    cudaCheck(cudaMemcpyAsync(gpu.step, step, sizeof step, cudaMemcpyHostToDevice, gpu.stream));
    cudaCheck(cudaGraphLaunch(gpu.graph, gpu.stream));
    gpu.step_known = 0;
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

// dsv2.c's forward() and sample() in one step on the GPU (the generation loop's DSV2_NEXT): the token
// drawn after token at pos; sp->rng_state advances as sample() advances it. Only the token id and the
// sampler's state come back; the step's inputs go to the GPU only when the device does not hold them
// already (the first step, or after the host did not take a draw).
static int forward_sample_gpu(const Model *m, RunState *s, Sampler *sp, int token, int pos) {
    gpu_init(m, s->seq_len);
    if (pos < 0 || pos >= gpu.seq_len) die("dsv2cu: position %d outside the context of %d", pos, gpu.seq_len);
    if (token < 0 || token >= gpu.c.vocab_size) die("dsv2cu: token %d outside the vocabulary", token);
    if (!gpu.graph_next || sp->temperature != gpu.next_temperature || sp->topp != gpu.next_topp) {
        if (gpu.graph_next) cudaCheck(cudaGraphExecDestroy(gpu.graph_next));
        gpu.graph_next = decode_capture(sp);
        gpu.next_temperature = sp->temperature;
        gpu.next_topp = sp->topp;
    }
    StepIO *known = gpu.step_host;
    if (!gpu.step_known || known->token != token || known->pos != pos || known->rng != sp->rng_state) {
        *gpu.step_upload = (StepIO){token, pos, sp->rng_state};
        cudaCheck(cudaMemcpyAsync(gpu.step, gpu.step_upload, sizeof(StepIO), cudaMemcpyHostToDevice, gpu.stream));
    }
    cudaCheck(cudaGraphLaunch(gpu.graph_next, gpu.stream));
    cudaCheck(cudaStreamSynchronize(gpu.stream));
    gpu.step_known = 1;
    if (known->token < 0)  // dsv2.c's check_logits
        die("the logits at position %d are not finite (token %d): the model's weights are corrupt", pos, -1 - known->token);
    sp->rng_state = known->rng;
    return known->token;
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

// before generation (the generation loop's DSV2_SETUP): the model upload and every one-time cost of
// the GPU path, so that the prompt's tok/s measures the prompt alone
static void gpu_setup(const Model *m, RunState *s, const Sampler *sp) {
    gpu_init(m, s->seq_len);  // prints the upload's time
    double t0 = now_s();
    if (!gpu.pf_ready) prefill_alloc();
    if (!gpu.graph_next) {
        gpu.graph_next = decode_capture(sp);
        gpu.next_temperature = sp->temperature;
        gpu.next_topp = sp->topp;
    }
    // the first use of cuBLAS and of the prefill's kernels (loaded lazily) on two tokens: the cache rows
    // they write, 0 and 1, are written again by the prompt before anything reads them
    int warm[2] = {0, 0};
    if (s->seq_len >= 2) prefill_gpu(m, s, warm, 2, 0, ATTN_ABSORBED);
    fprintf(stderr, "dsv2cu: graphs captured and first use warmed up in %.0f ms\n", (now_s() - t0) * 1e3);
}

#include "dsv2_bench.cuh"  // --bench: benchmarks and self-checks for tools/bench_cuda.sh
#include "dsv2_serve.cuh"  // many sequences at once: paged cache, forward_batch, continuous batching, --bench-serve

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
    if (argc >= 3 && !strcmp(argv[1], "--bench-serve")) return bench_serve_main(argc - 2, argv + 2);
    if (argc >= 3 && !strcmp(argv[1], "--serve-check")) return serve_check_main(argc - 2, argv + 2);
    if (argc == 2 && !strcmp(argv[1], "--check-sampler")) return check_sampler_main();  // GPU sampler vs dsv2.c's sample()
    if (argc >= 2 && !strcmp(argv[1], "--bench-attn")) return bench_attn_main(argc - 2, argv + 2);
    return dsv2_main(argc, argv);
}
