// dsv2_common.cuh: CUDA utilities and the GPU tricks that dsv2.cu's kernels share, each explained
// here, once: warp reductions, 16-byte bf16 dot products (warp_dot), programmatic dependent launch
// (PDL), L2 prefetch, cp.async copies, the tensor cores' mma.sync fragment layout, and 3xTF32
// (float32 accuracy from tf32 tensor cores). Included by dsv2.cu after dsv2.c (it uses die()).
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cublas_v2.h>
#include <vector>
#include <algorithm>
#include <climits>

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

// 16 bytes of weights: from global memory through the read-only path, or (SHARED) from shared memory
template <bool SHARED> __device__ __forceinline__ uint4 load_w16(const uint4 *p) { return SHARED ? *p : __ldg(p); }

// One warp: dot(w[0..n), x[0..n)), w bf16, x float32; every lane gets the result.
// Trick: when n % 8 == 0 each lane loads 16 bytes (8 weights) at a time, and 8 such loads are
// issued before the first is used, so a warp keeps 4 KB of weights in flight (a 2048-wide row
// in one round trip to memory). SHARED: w is in shared memory (matvec_kernel's preloaded rows).
template <bool SHARED = false>
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
                if (i + 32 * u < n8) v[u] = load_w16<SHARED>(w4 + i + 32 * u);
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
// (SHARED: both rows in shared memory)
template <bool SHARED = false>
__device__ void warp_dot2(const bf16 *w1, const bf16 *w2, const float *x, int n, float *d1, float *d2) {
    if (n & 7) { *d1 = warp_dot<SHARED>(w1, x, n); *d2 = warp_dot<SHARED>(w2, x, n); return; }
    int lane = threadIdx.x & 31, n8 = n >> 3;
    const uint4 *a4 = (const uint4 *)w1, *b4 = (const uint4 *)w2;
    const float4 *x4 = (const float4 *)x;
    float s1 = 0.0f, s2 = 0.0f;
    for (int i = lane; i < n8; i += 128) {
        uint4 va[4], vb[4];
        #pragma unroll
        for (int u = 0; u < 4; u++)
            if (i + 32 * u < n8) { va[u] = load_w16<SHARED>(a4 + i + 32 * u); vb[u] = load_w16<SHARED>(b4 + i + 32 * u); }
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

#ifdef DSV2_TIMELINE
// A timeline of the decode step as it runs (make dsv2cu_timeline; ./dsv2cu_timeline --bench MODEL --timeline CTX;
// tools/timeline_decode.py reads it). Nsight Compute times kernels one at a time, and --ablate gives only
// what each kind costs in place; this records, per block, when it started, when its pdl_wait returned and
// when its thread 0 finished (%globaltimer, ns), and on which multiprocessor. Only in that build: every
// kernel begins with pdl_launch_next(), which there also declares a TimelineScope that lives until the kernel
// returns (its destructor writes the record); pdl_wait() notes the time its wait ended, and timeline_mark()
// one point of the kernel's own (where thread 0 passes: the decode's MoE kernels and the attention mark the
// end of their setup, before their weight or cache loop). In the default build timeline_mark() is nothing.
struct TimelineRec { unsigned long long fn, t0, t1, t2, t3; unsigned block, sm; };
__device__ TimelineRec *timeline_buf;  // NULL: not recording
__device__ unsigned timeline_cap, timeline_n;
__device__ __forceinline__ unsigned long long global_ns() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}
struct TimelineScope {
    const char *fn;
    unsigned long long t0, t1, t3;
    __device__ TimelineScope(const char *f) : fn(f), t0(global_ns()), t1(0), t3(0) {}
    __device__ ~TimelineScope() {  // (the end is read before the atomic: its trip delays the exit, not the record)
        if (threadIdx.x || !timeline_buf) return;
        unsigned long long t2 = global_ns();
        unsigned i = atomicAdd(&timeline_n, 1), sm;
        if (i >= timeline_cap) return;
        asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
        TimelineRec r = {(unsigned long long)fn, t0, t1, t2, t3, blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z), sm};
        timeline_buf[i] = r;
    }
};
#define pdl_launch_next() TimelineScope timeline_scope_(__func__); pdl_launch_next()
#define pdl_wait() do { pdl_wait(); timeline_scope_.t1 = global_ns(); } while (0)
#define timeline_mark() (timeline_scope_.t3 = global_ns())
#else
#define timeline_mark() ((void)0)
#endif

// ask the copy engine to bring [p, p + bytes) into L2 (one instruction; the 16-byte-aligned inside of the range)
__device__ int prefetch_off;  // DSV2_NO_PREFETCH=1 (and --bench --ablate): the prefetches off, to measure them
__device__ __forceinline__ void prefetch_l2(const void *p, size_t bytes) {
    if (prefetch_off) return;
    uintptr_t a = ((uintptr_t)p + 15) & ~(uintptr_t)15, e = ((uintptr_t)p + bytes) & ~(uintptr_t)15;
    if (e > a) asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(a), "r"((uint32_t)(e - a)) : "memory");
}

// Thread block clusters (sm_90): the blocks of a cluster (launch_cluster) run at once on one GPU processing
// cluster and read each other's shared memory (cluster.map_shared_rank: distributed shared memory).
// cluster_sync: every thread of the cluster's blocks arrives; shared-memory writes before it, local or
// remote, are seen by every block after it.
#include <cooperative_groups.h>
namespace cg = cooperative_groups;
__device__ __forceinline__ void cluster_sync() { cg::this_cluster().sync(); }

// Asynchronous copies (cp.async, sm_80+): global -> shared without passing through registers, so a
// thread can issue the copy of the next tile and go on computing on the current one. Copies issued by a
// thread are closed into a group by cp_async_commit; cp_async_wait<N> blocks until at most N of this
// thread's groups are still in flight (then a __syncthreads makes every thread's copies visible).
// With two shared-memory buffers this is double buffering: wait<1> = "the older tile has landed".
// cp_async16: 16 bytes (bytes < 16 copies that many and fills the rest with zeros).
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
// One tensor-core product, d (16x8) += a (16x8) b (8x8), by one warp (mma.sync m16n8k8, tf32 in, float32
// accumulate). No thread holds a whole matrix: each of the 32 lanes holds a fixed few elements of each
// ("fragments"). With g = lane / 4 (0..7) and t = lane % 4 (0..3), lane (g, t) holds
//   a[0..3] = A[g][t], A[g+8][t], A[g][t+4], A[g+8][t+4]     (rows g and g+8, columns t and t+4)
//   b[0..1] = B[t][g], B[t+4][g]                             (column g, rows t and t+4)
//   d[0..3] = D[g][2t], D[g][2t+1], D[g+8][2t], D[g+8][2t+1] (rows g and g+8, two adjacent columns)
// so a kernel loads its operands straight into these registers. The k index (A's columns, B's rows)
// is summed over, so any permutation of k, the same for A and B, gives the same D: the attention
// kernel uses that to load two adjacent floats at once.
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
// One tensor-core product, d (16x8) += a (16x16) b (16x8), bf16 in, float32 accumulate (mma.sync
// m16n8k16). Fragments as for m16n8k8 (mma_tf32 above) with k doubled: lane (g, t) holds
//   a = A[g][2t..2t+1], A[g+8][2t..2t+1], A[g][2t+8..2t+9], A[g+8][2t+8..2t+9]   (two bf16 per register)
//   b = B[2t..2t+1][g], B[2t+8..2t+9][g];  d = D[g][2t], D[g][2t+1], D[g+8][2t], D[g+8][2t+1]
__device__ __forceinline__ void mma_bf16(float *d, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
// ldmatrix (sm_75+): a warp loads 8x8 matrices of 16-bit elements from shared memory straight into mma
// fragments. Each matrix is 8 rows of 16 bytes; lanes 8i..8i+7 give the row addresses of matrix i (x4: four
// matrices, r[i] from matrix i). Lane (g, t) receives M[g][2t..2t+1] (two bf16 in one register, the lower
// column in the low half), or with .trans M[2t][g], M[2t+1][g]: the fragment of B = M when M is stored
// row-major with k along its rows (mma_bf16's b).
__device__ __forceinline__ void ldmatrix_x4(uint32_t *r, const void *row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"((uint32_t)__cvta_generic_to_shared(row)) : "memory");
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t *r, const void *row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"((uint32_t)__cvta_generic_to_shared(row)) : "memory");
}
