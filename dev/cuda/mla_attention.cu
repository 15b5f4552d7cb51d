/* dev/cuda/mla_attention.cu: the MLA decode attention kernel of dsv2.cu, version by version
 * (the llm.c dev/cuda manner: every version in one file, a float64 check and a timing for each).
 *
 * What every version computes: dsv2.c's absorbed attention loop (mla_attention, Appendix C of the
 * paper) for B sequences of len[b] cached tokens and H heads, each cache row c_j = [c_j^KV ; k_j^R]
 * of W = d_c + d_h^R floats, each query q_lat[b][h] = [W^UK_h^T q^C ; RoPE(q^R)] (mla_prep_kernel):
 *   s_j = scale * q_lat[b][h] . c_j           j < len[b]     eqs. (10), (16), (17) absorbed
 *   o_lat[b][h] = sum_j softmax(s)_j c_j[0:d_c]               eq. (18) on the latent
 *   q_lat (B, H, W), cache (B, L, W), o_lat (B, H, d_c), float32 in and out.
 *
 * The versions, each the step that made it faster:
 *   1  one warp per (sequence, head), plain float32: dsv2.c's loop as it is (scores into a scratch
 *      array, softmax, weighted sum). Every head reads its sequence's whole cache, twice.
 *   2  one cache read for all heads: a block per (sequence, 16 heads) stages each tile of 32 rows in
 *      shared memory once for its 16 heads; online softmax, so the rows are read in one pass.
 *   3  split-KV: the rows cut into n_split chunks, a block each, merged by log-sum-exp
 *      (mla_combine_kernel). One sequence now spreads over the whole GPU.
 *   4  tensor cores: the scores and the values as two mma.sync products per tile, in 3xTF32
 *      (float32 accuracy). One shared tile: load, wait, compute.
 *   5  double buffering: cp.async brings tile i+1 while tile i is used; and the values' three
 *      products each over all 8 column tiles in turn, not one after another into each tile's sum.
 *      This is dsv2_mla.cuh's mla_attention_kernel, copied verbatim below (run_mla.sh checks the
 *      copy with same_as_dsv2.py).
 *   6  the paged cache of the batch engine, float32 or bf16 elements, splits balanced by a plan, a
 *      deeper pipeline, bf16 read as tf32 (two products, not three): dsv2_mla_decode.cuh's
 *      mla_decode_kernel, included (it is what dsv2cu's batch engine runs).
 *   7  bf16 cache only: the cache tile as the bf16 operand of m16n8k16 products, loaded by ldmatrix
 *      (no conversion), the query and the probabilities split in three bf16 parts (float32-exact):
 *      dsv2_mla_decode.cuh's mla_decode_kernel_v7, included (dsv2cu's default for a bf16 cache).
 * The tricks (online softmax, split-KV with the log-sum-exp merge, the mma fragment layout, 3xTF32,
 * cp.async) are explained once, in dsv2_mla.cuh and dsv2_common.cuh, which this file includes or copies.
 *
 * Build: make -C dev/cuda (nvcc -arch=sm_90). Run:
 *   dev/cuda/mla_attention             every version on the standard shapes; prints a markdown table
 *   dev/cuda/mla_attention V B L H     version V (1-5) on B sequences of L tokens, H heads
 *   dev/cuda/mla_attention paged       versions 5, 6 and 7 (paged, float32 and bf16 cache): checks, then a table
 *   dev/cuda/mla_attention paged-check the checks alone (small: for compute-sanitizer)
 *   dev/cuda/mla_attention paged-profile  dsv2cu's float32 and bf16 variants (6 and 7) once, 64 x 8192 (for ncu)
 * dev/cuda/run_mla.sh does both checks and the table in one call on the GPU machine.
 */
#include <stdio.h>
#include <stdlib.h>
#include <stdarg.h>
#include <stdint.h>
#include <string.h>
#include <math.h>
#include <omp.h>
static void die(const char *fmt, ...) {  // dsv2_common.cuh's cudaCheck reports through dsv2.c's die()
    va_list ap;
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, "\n");
    exit(1);
}
#include "../../dsv2_common.cuh"  // warp_sum/max, cp.async, split_tf32, mma_tf32, mma_3xtf32

// dsv2_mla.cuh's constants, split rule (mla_chunk: versions 3-5), tile layout and loader (versions 4-5)
// >>> verbatim from dsv2_mla.cuh (same_as_dsv2.py checks it)
#define MLA_HEADS 16      // heads per block of the attention kernel: the M = 16 of the tensor-core products
#define MLA_TILE 32       // cache rows per shared-memory tile
#define MLA_WARPS 8
#define MLA_NT 8          // 8-column tiles of the latent per warp: kv_lora_rank <= 8 * MLA_NT * MLA_WARPS = 512
// <<< end of the verbatim copy
// >>> verbatim from dsv2_mla.cuh (same_as_dsv2.py checks it)
// row stride of a shared cache tile: W padded to 8 (mod 32) words (no bank conflicts, see below)
__host__ __device__ __forceinline__ int mla_stride(int W) { return W + ((8 - W % 32) + 32) % 32; }
// rows per split: len / n_split rounded up to whole tiles (so a short context runs few blocks of one
// tile each, and splits past the end do nothing)
__host__ __device__ __forceinline__ int mla_chunk(int len, int n_split) {
    int c = (len + n_split - 1) / n_split;
    return (c + MLA_TILE - 1) / MLA_TILE * MLA_TILE;
}
#define MLA_SP (MLA_TILE + 4)  // row stride of the score and probability tiles
#define MLA_KS 9               // 8-column steps of the scores per warp: W <= 8 * MLA_KS * MLA_WARPS = 576
// shared memory of mla_attention_kernel: two cache tiles, the per-warp partial scores, P split hi/lo, m, l, a
static size_t mla_smem_bytes(int W) {
    return (2 * (size_t)MLA_TILE * mla_stride(W) + (MLA_WARPS + 2) * MLA_HEADS * MLA_SP + 3 * MLA_HEADS) * 4;
}
// rows [t0, t0 + MLA_TILE) of the cache into a shared tile, zeros past `end`; warp w loads rows w, w + 8, ...
// (r0, r1: only the tile's rows t0 + r0 .. t0 + r1 - 1, one group of copies all the same)
__device__ __forceinline__ void mla_load_tile(float *tile, const float *cb, int t0, int end, int W, int S, int r0 = 0,
                                              int r1 = MLA_TILE) {
    int lane = threadIdx.x & 31;
    for (int r = r0 + (((threadIdx.x >> 5) - r0) % MLA_WARPS + MLA_WARPS) % MLA_WARPS; r < r1; r += MLA_WARPS) {
        bool ok = t0 + r < end;
        const float *src = ok ? cb + (size_t)(t0 + r) * W : cb;
        for (int k = 4 * lane; k < W; k += 128) cp_async16(tile + r * S + k, ok ? src + k : cb, ok ? 16 : 0);
    }
    cp_async_commit();
}
// <<< end of the verbatim copy

// ----------------------------------------------------------------------------
// Version 1: dsv2.c's absorbed loop, one warp per (sequence b, head h), plain float32.
// Grid: B * H warps, 8 per block. The lanes split each dot product (k = lane, lane + 32, ...) and
// warp_sum adds them; the scores go to a scratch array att (B, H, L) in device memory, as dsv2.c's
// s->att, then softmax (dsv2.c's softmax: max, exp and sum, divide), then the weighted sum of the
// latents, lane = latent column. Bytes: every head reads its sequence's cache twice, 2 H times the cache.
__global__ void mla_attention_kernel1(float *o_lat, float *att, const float *q_lat, const float *cache, size_t seq_stride,
                                      const int *lens, int B, int H, int W, int d_c, int L, float scale) {
    int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    if (warp >= B * H) return;
    int b = warp / H, len = lens[b], rope = W - d_c;
    const float *q_c = q_lat + (size_t)warp * W, *q_r = q_c + d_c;  // [W^UK_h^T q^C (d_c) ; q^R (rope)]
    const float *cb = cache + b * seq_stride;
    float *a = att + (size_t)warp * L;
    for (int j = 0; j < len; j++) {
        const float *cj = cb + (size_t)j * W;
        float score = 0.0f;
        for (int k = lane; k < d_c; k += 32) score += q_c[k] * cj[k];  // eqs. (10), (17) absorbed
        for (int k = lane; k < rope; k += 32) score += q_r[k] * cj[d_c + k];
        score = warp_sum(score);
        if (lane == 0) a[j] = score * scale;
    }
    __syncwarp();  // lane 0's scores are visible to every lane
    float max = -INFINITY, sum = 0.0f;
    for (int j = lane; j < len; j += 32) max = fmaxf(max, a[j]);
    max = warp_max(max);
    for (int j = lane; j < len; j += 32) { a[j] = expf(a[j] - max); sum += a[j]; }
    sum = warp_sum(sum);
    for (int j = lane; j < len; j += 32) a[j] /= sum;
    __syncwarp();
    for (int k = lane; k < d_c; k += 32) {  // eq. (18) on the latent
        float o = 0.0f;
        for (int j = 0; j < len; j++) o += a[j] * cb[(size_t)j * W + k];
        o_lat[(size_t)warp * d_c + k] = o;
    }
}

// ----------------------------------------------------------------------------
// Versions 2 and 3: a block of 8 warps per (sequence, 16 heads), float32 on the CUDA cores.
// The block walks rows [start, end) in tiles of 32: the tile goes into shared memory (plain loads,
// all threads), and each warp w takes heads 2w and 2w + 1 of the block's 16 (queries in shared memory):
//   scores: lane = row of the tile, s = scale * q[h] . tile[lane] over W (the tile's rows are padded to
//           a stride of 1 (mod 32) words, so the 32 lanes read 32 different banks);
//   online softmax (dsv2_mla.cuh): m, l and the rescale a live in registers, the same in every lane;
//   values: lane = latent columns lane + 32 i, o = a o + sum_r p_r tile[r], p_r shuffled from lane r.
// Each tile is read from device memory once for 16 heads, instead of once per head.
#define F32_NC 16  // latent columns per lane: d_c <= 32 * F32_NC = 512
__host__ __device__ __forceinline__ int f32_stride(int W) { return W + ((1 - W % 32) + 32) % 32; }
static size_t f32_smem_bytes(int W) { return ((size_t)MLA_HEADS * W + (size_t)MLA_TILE * f32_stride(W)) * 4; }
__device__ void f32_attend_rows(float m[2], float l[2], float acc[2][F32_NC], const float *q_lat, const float *cb,
                                int b, int h0, int H, int W, int d_c, int start, int end, float scale) {
    extern __shared__ float smem[];
    const int S = f32_stride(W);
    float *qs = smem, *tile = smem + MLA_HEADS * W;  // (16, W) queries, (32, S) cache rows
    int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nh = min(MLA_HEADS, H - h0);
    for (int i = tid; i < MLA_HEADS * W; i += blockDim.x)
        qs[i] = i / W < nh ? q_lat[((size_t)b * H + h0) * W + i] : 0.0f;
    for (int k = 0; k < 2; k++) {
        m[k] = -INFINITY; l[k] = 0.0f;
        for (int i = 0; i < F32_NC; i++) acc[k][i] = 0.0f;
    }
    for (int t0 = start; t0 < end; t0 += MLA_TILE) {
        __syncthreads();  // every warp is done with the previous tile (and, the first time, qs is written)
        for (int i = tid; i < MLA_TILE * W; i += blockDim.x) {
            int r = i / W, c = i % W;
            tile[r * S + c] = t0 + r < end ? cb[(size_t)(t0 + r) * W + c] : 0.0f;
        }
        __syncthreads();
        bool ok = t0 + lane < end;
        for (int k = 0; k < 2; k++) {
            const float *q = qs + (2 * warp + k) * W, *row = tile + lane * S;
            float s = 0.0f;
            for (int c = 0; c < W; c++) s += q[c] * row[c];  // eqs. (10), (17) absorbed
            s = ok ? s * scale : -INFINITY;
            float m_new = fmaxf(m[k], warp_max(s));  // finite: row t0 < end
            float p = ok ? expf(s - m_new) : 0.0f, a = expf(m[k] - m_new);
            l[k] = l[k] * a + warp_sum(p);
            m[k] = m_new;
            #pragma unroll
            for (int i = 0; i < F32_NC; i++) acc[k][i] *= a;
            for (int r = 0; r < MLA_TILE; r++) {  // eq. (18) on the latent
                float pr = __shfl_sync(0xffffffffu, p, r);
                #pragma unroll
                for (int i = 0; i < F32_NC; i++)
                    if (lane + 32 * i < d_c) acc[k][i] += pr * tile[r * S + lane + 32 * i];
            }
        }
    }
}
// Version 2: grid (B, H / 16), one block per sequence and head group; it walks all the rows and
// writes o_lat = o / l. A block per sequence: at batch 1, one or a few multiprocessors of 132 work.
__global__ void mla_attention_kernel2(float *o_lat, const float *q_lat, const float *cache, size_t seq_stride,
                                      const int *lens, int H, int W, int d_c, float scale) {
    int b = blockIdx.x, h0 = blockIdx.y * MLA_HEADS, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    float m[2], l[2], acc[2][F32_NC];
    f32_attend_rows(m, l, acc, q_lat, cache + b * seq_stride, b, h0, H, W, d_c, 0, lens[b], scale);
    for (int k = 0; k < 2; k++) {
        int h = h0 + 2 * warp + k;
        if (h >= H) continue;
        #pragma unroll
        for (int i = 0; i < F32_NC; i++)
            if (lane + 32 * i < d_c) o_lat[((size_t)b * H + h) * d_c + lane + 32 * i] = acc[k][i] / l[k];
    }
}
// Version 3: grid (n_split, B, H / 16): the same block on rows [split * chunk, + chunk) only; it writes
// its partial (m, l, unnormalised o) in dsv2_mla.cuh's layout, and mla_combine_kernel merges the splits.
__global__ void mla_attention_kernel3(float *part_o, float *part_ml, const float *q_lat, const float *cache,
                                      size_t seq_stride, const int *lens, int H, int W, int d_c, int n_split, float scale) {
    int split = blockIdx.x, b = blockIdx.y, h0 = blockIdx.z * MLA_HEADS, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int len = lens[b], chunk = mla_chunk(len, n_split), start = split * chunk, end = min(start + chunk, len);
    if (start >= end) return;  // past the end: mla_combine_kernel counts only the splits that ran
    float m[2], l[2], acc[2][F32_NC];
    f32_attend_rows(m, l, acc, q_lat, cache + b * seq_stride, b, h0, H, W, d_c, start, end, scale);
    size_t pb = ((size_t)b * n_split + split) * H;  // (b, split, head 0)
    for (int k = 0; k < 2; k++) {
        int h = h0 + 2 * warp + k;
        if (h >= H) continue;
        #pragma unroll
        for (int i = 0; i < F32_NC; i++)
            if (lane + 32 * i < d_c) part_o[(pb + h) * d_c + lane + 32 * i] = acc[k][i];
        if (lane == 0) { part_ml[(pb + h) * 2] = m[k]; part_ml[(pb + h) * 2 + 1] = l[k]; }
    }
}

// Version 4: version 3's grid and partials, the two products of each tile on the tensor cores in
// 3xTF32: version 5 (below, the kernel dsv2.cu runs) with one shared tile instead of two: each tile is
// loaded (cp.async), waited for, then used, so the loads and the arithmetic do not overlap; and the values'
// three products (mma_3xtf32) one after another into each column tile's sum.
static size_t mla_smem_bytes_single(int W) {
    return ((size_t)MLA_TILE * mla_stride(W) + (MLA_WARPS + 2) * MLA_HEADS * MLA_SP + 3 * MLA_HEADS) * 4;
}
__global__ void __launch_bounds__(MLA_WARPS * 32, 1)
mla_attention_kernel4(float *part_o, float *part_ml, const float *q_lat, const float *cache, size_t seq_stride,
                      const int *lens, int H, int W, int d_c, int n_split, float scale) {
    const int S = mla_stride(W);
    int split = blockIdx.x, b = blockIdx.y, h0 = blockIdx.z * MLA_HEADS, tid = threadIdx.x;
    int lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
    int nh = min(MLA_HEADS, H - h0);
    int len = lens[b];
    int chunk = mla_chunk(len, n_split), start = split * chunk, end = min(start + chunk, len);
    if (start >= end) return;
    extern __shared__ float smem[];
    float *tile = smem;                                   // (MLA_TILE, S) cache rows: one buffer
    float *s_part = tile + MLA_TILE * S;                  // (MLA_WARPS, 16, MLA_SP) partial scores
    uint32_t *p_hi = (uint32_t *)(s_part + MLA_WARPS * MLA_HEADS * MLA_SP), *p_lo = p_hi + MLA_HEADS * MLA_SP;
    float *m_s = (float *)(p_lo + MLA_HEADS * MLA_SP), *l_s = m_s + MLA_HEADS, *a_s = l_s + MLA_HEADS;
    const float *cb = cache + b * seq_stride;
    int n_tiles = (end - start + MLA_TILE - 1) / MLA_TILE;
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
        mla_load_tile(tile, cb, t0, end, W, S);  // load this tile, and wait for it: nothing to overlap with
        cp_async_wait<0>();
        __syncthreads();
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
            float *sp = s_part + warp * MLA_HEADS * MLA_SP;
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
            float m_old = m_s[h], m_new = fmaxf(m_old, warp_max(s));
            float p = ok ? expf(s - m_new) : 0.0f;
            float sum = warp_sum(p);
            split_tf32(p, &p_hi[h * MLA_SP + lane], &p_lo[h * MLA_SP + lane]);
            __syncwarp();
            if (lane == 0) {
                float a = expf(m_old - m_new);
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
        __syncthreads();  // every warp is done with the tile before it is loaded again
    }
    size_t pb = ((size_t)b * n_split + split) * H + h0;
    #pragma unroll
    for (int j = 0; j < MLA_NT; j++) {
        int ct = warp + MLA_WARPS * j, c = 8 * ct + 2 * t;
        if (ct >= n_ct) continue;
        if (g < nh) *(float2 *)(part_o + (pb + g) * d_c + c) = make_float2(acc[j][0], acc[j][1]);
        if (g + 8 < nh) *(float2 *)(part_o + (pb + g + 8) * d_c + c) = make_float2(acc[j][2], acc[j][3]);
    }
    if (tid < nh) { part_ml[(pb + tid) * 2] = m_s[tid]; part_ml[(pb + tid) * 2 + 1] = l_s[tid]; }
}

// ----------------------------------------------------------------------------
// Version 5 = dsv2_mla.cuh's mla_attention_kernel (double-buffered), and the merge of versions 3-5
// >>> verbatim from dsv2_mla.cuh (same_as_dsv2.py checks it)
// dsv2.c mla_attention's absorbed loop (eqs. 16-18 on the latent) for one split of the cache, on the
// tensor cores (the FlashMLA idea), at float32 accuracy (3xTF32).
// In:  q_lat (B, H, W) from mla_prep_kernel; cache: sequence b's rows at cache + b * seq_stride, (len, W).
//      Sequence b has len = lens ? lens[b] : *pos0 + len_offset + b + 1 rows (the prefill runs one
//      "sequence" per query: query b sees the rows up to its own position).
// Out: the split's partials, part_o (B, n_split, H, d_c) = unnormalised o, part_ml (B, n_split, H, 2) = (m, l).
// One block (8 warps): grid (split, b, head group) owns rows [split * chunk, + chunk) of sequence b and
// MLA_HEADS = 16 heads. Those 16 heads read the same cache rows, so per tile of 32 rows the attention
// is two small matrix products, done with mma.sync (dsv2_common.cuh) in 3xTF32:
//   scores  S (16 heads x 32 rows) = Q_lat (16 x W) . tile^T                       eqs. (10), (17) absorbed
//   values  O (16 x d_c)          = a O + P (16 x 32) . tile[:, :d_c]             eq. (18) on the latent
// and each cache row comes from device memory once for 16 heads (V2-Lite's 16 heads: once).
// Double buffering: two shared tiles; while the warps compute on tile i, cp.async brings tile i+1.
// The three phases of each tile, per warp w:
//   1. scores: warp w takes its 1/8 of the W columns (ks0..ks1, 8 at a time) for all 32 rows and 16
//      heads; its slice of the queries stays in registers for the whole block, already split hi/lo.
//      Fragment column t holds latent column 8s + 2t and t + 4 holds 8s + 2t + 1 (a permutation of k,
//      see mma_tf32), so each lane loads two adjacent floats at once. The 8 partial score tiles go to
//      shared memory (s_part).
//   2. online softmax: warp w sums the 8 partials of heads 2w and 2w+1, lane = row of the tile; updates
//      m, l and the rescale a of its heads; stores P split hi/lo for the tensor cores.
//   3. values: warp w accumulates latent columns 8w + 64j (j < MLA_NT) of O in registers (acc). The three
//      products of 3xTF32 run each over the 8 column tiles in turn, so no product waits on the one before
//      (they went one after another into the same acc[j]: the values took 2.6 us of a 6.9 us tile at context
//      512, the scores 1.4; docs/BENCHMARKS.md, sixth pass).
// Shared rows are padded to a stride = 8 (mod 32) words: both products then load without bank conflicts.
__global__ void __launch_bounds__(MLA_WARPS * 32, 1)
mla_attention_kernel(float *part_o, float *part_ml, const float *q_lat, const float *cache, size_t seq_stride,
                     const int *lens, const int *pos0, int len_offset, int H, int W, int d_c, int n_split, float scale) {
    pdl_launch_next();
    const int S = mla_stride(W);
    int split = blockIdx.x, b = blockIdx.y, h0 = blockIdx.z * MLA_HEADS, tid = threadIdx.x;
    int lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
    int nh = min(MLA_HEADS, H - h0);
    int len = lens ? lens[b] : *pos0 + len_offset + b + 1;  // (both set before the launch: by the host, or by step_advance_kernel in the graph before)
    int chunk = mla_chunk(len, n_split), start = split * chunk, end = min(start + chunk, len);
    extern __shared__ float smem[];
    const float *cb = cache + b * seq_stride;
    // The rows before *pos0 were written by earlier steps (or prefill passes); mla_prep, the kernel before
    // this one, writes rows *pos0 on. So the first tile's old rows are asked for before pdl_wait: their trip
    // from memory overlaps the end of mla_prep. The tile's other rows follow after it. (With lens: all after.)
    int old_rows = lens || start >= end ? 0 : max(0, min(MLA_TILE, min(*pos0, end) - start));
    if (old_rows) mla_load_tile(smem, cb, start, end, W, S, 0, old_rows);
    pdl_wait();
    if (start >= end) return;  // past the end: mla_combine_kernel counts only the splits that ran
    float *tiles = smem;                                  // 2 x (MLA_TILE, S) cache rows
    float *s_part = tiles + 2 * MLA_TILE * S;             // (MLA_WARPS, 16, MLA_SP) partial scores
    uint32_t *p_hi = (uint32_t *)(s_part + MLA_WARPS * MLA_HEADS * MLA_SP), *p_lo = p_hi + MLA_HEADS * MLA_SP;  // P split
    float *m_s = (float *)(p_lo + MLA_HEADS * MLA_SP), *l_s = m_s + MLA_HEADS, *a_s = l_s + MLA_HEADS;  // max, sum, rescale
    int n_tiles = (end - start + MLA_TILE - 1) / MLA_TILE;
    mla_load_tile(tiles, cb, start, end, W, S, old_rows, MLA_TILE);  // (tiles == smem)
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
        if (it == 0) timeline_mark();  // the first tile and the queries loaded
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
            __syncwarp();  // every lane has read m_s[h] before lane 0 overwrites it (a shuffle orders no memory)
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
                // the 8 column tiles' cache values, split; then the three products of 3xTF32 (mma_3xtf32's, in its
                // order) each over all 8 tiles: 7 independent products between two that add into one acc[j]
                uint32_t bh[MLA_NT][2], bl[MLA_NT][2];
                #pragma unroll
                for (int j = 0; j < MLA_NT; j++) {
                    int ct = warp + MLA_WARPS * j;
                    float b0 = ct < n_ct ? tile[(kr + t) * S + 8 * ct + g] : 0.0f, b1 = ct < n_ct ? tile[(kr + t + 4) * S + 8 * ct + g] : 0.0f;
                    split_tf32(b0, &bh[j][0], &bl[j][0]);
                    split_tf32(b1, &bh[j][1], &bl[j][1]);
                }
                #pragma unroll
                for (int j = 0; j < MLA_NT; j++) if (warp + MLA_WARPS * j < n_ct) mma_tf32(acc[j], al, bh[j]);
                #pragma unroll
                for (int j = 0; j < MLA_NT; j++) if (warp + MLA_WARPS * j < n_ct) mma_tf32(acc[j], ah, bl[j]);
                #pragma unroll
                for (int j = 0; j < MLA_NT; j++) if (warp + MLA_WARPS * j < n_ct) mma_tf32(acc[j], ah, bh[j]);
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

// The log-sum-exp merge of the splits (explained above mla_chunk), the end of dsv2.c's absorbed loop:
//   o_lat[b][h] (d_c) = sum_s e^(m_s - M) o_s / L,  L = sum_s e^(m_s - M) l_s,  M = max_s m_s
// over the splits that ran (mla_attention_kernel returns early for splits past the end).
// In: part_o (B, n_split, H, d_c), part_ml (B, n_split, H, 2). Out: o_lat (B, H, d_c).
// One block per (head, sequence, strip of COMBINE_COLS columns): its first warp computes the split
// weights e^(m_s - M) / L into shared memory (n_split floats), then warp w adds splits w, w + 8, ... of
// the strip (one column per lane: 128-byte loads), and the 8 sums are added in warp order. Spreading a
// head over strips and its splits over warps matters at long contexts: with one block per head and one
// thread per column, 132 splits (8K) were 132 dependent adds a thread, 18 us a layer (--bench --ablate).
#define COMBINE_COLS 32
__global__ void mla_combine_kernel(float *o_lat, const float *part_o, const float *part_ml, const int *lens,
                                   const int *pos0, int len_offset, int H, int d_c, int n_split) {
    pdl_launch_next();
    pdl_wait();
    extern __shared__ float wgt[];
    __shared__ float sums[8][COMBINE_COLS];
    int h = blockIdx.x, b = blockIdx.y, warp = threadIdx.x >> 5, c = blockIdx.z * COMBINE_COLS + (threadIdx.x & 31);
    int len = lens ? lens[b] : *pos0 + len_offset + b + 1;
    int n_run = ceil_div(len, mla_chunk(len, n_split));
    const float *ml = part_ml + ((size_t)b * n_split * H + h) * 2;  // split s at ml[s * H * 2]
    if (warp == 0) {
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
    float o = 0.0f;
    if (c < d_c) {
        #pragma unroll 4
        for (int s = warp; s < n_run; s += 8) o += wgt[s] * po[(size_t)s * H * d_c + c];
    }
    sums[warp][threadIdx.x & 31] = o;
    __syncthreads();
    if (warp == 0 && c < d_c) {
        for (int w = 1; w < 8; w++) o += sums[w][threadIdx.x];
        o_lat[((size_t)b * H + h) * d_c + c] = o;
    }
}
// <<< end of the verbatim copy

// ----------------------------------------------------------------------------
// Version 6: the paged cache of the batch engine (issue 13), float32 or bf16 elements: dsv2_mla_decode.cuh's
// mla_decode_plan_kernel + mla_decode_kernel<T, STAGES> + mla_decode_combine_kernel, included here, not
// copied (so this IS what dsv2cu runs; its host launcher mla_decode_forward is left out, it needs dsv2.cu's
// state). What it adds to version 5, each explained in that header:
//   - pages: a 32-row tile is inside one 64-row page, one block-table lookup per tile;
//   - balanced splits from a plan: one chunk per multiprocessor, each the same number of tiles of
//     whatever sequences (mixed lengths cost no idle multiprocessors), partials only for cut sequences;
//   - a STAGES-deep cp.async pipeline that runs across sequence boundaries;
//   - a bf16 cache read as tf32 without a split: two tensor-core products instead of three.
// Variants timed below: float32 cache (2 stages, what fits) and bf16 cache (2 and 4 stages), 8 and 16
// warps per block (dsv2cu: 16 warps; 2 stages for float32, 4 for bf16).
// Version 7 (bf16 cache): mla_decode_kernel_v7 from the same header, in the same plan and merge; variants
// 4 stages x 16 warps with the phases overlapped (dsv2cu) and in series (dsv2cu's 7s), 4 x 8 and 5 x 8 overlapped.
#define MLA_DECODE_KERNELS_ONLY
#include "../../dsv2_mla_decode.cuh"

// ----------------------------------------------------------------------------
// The harness: random inputs, a float64 reference, a check and a timing of each version

#define W_ROW 576  // cache row width of DeepSeek-V2 and V2-Lite: d_c 512 + d_h^R 64
#define D_C 512
static float g_scale;  // V2's softmax scale: mscale^2 / sqrt(192), mscale = 0.1 ln(40) + 1 (YaRN, factor 40)
static int g_n_sm;
static const char *g_what[6] = {"", "one warp per head, float32 (dsv2.c's loop)", "one cache read for 16 heads",
                                "+ split-KV, log-sum-exp merge", "+ tensor cores, 3xTF32", "+ double buffering, values in 3 passes (dsv2.cu)"};

// values in [-1, 1) from a hash of (i, seed): fresh inputs without host work, never zeros
__global__ void fill_random_kernel(float *p, size_t n, uint32_t seed) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        uint32_t h = (uint32_t)i * 2654435761u ^ seed ^ (uint32_t)(i >> 32) * 40503u;
        h ^= h >> 15; h *= 2246822519u; h ^= h >> 13; h *= 3266489917u; h ^= h >> 16;
        p[i] = (h >> 8) / 8388608.0f - 1.0f;
    }
}

// splits for versions 3-5: 256-row chunks, or more (down to one tile) until the blocks fill the GPU
static int n_splits(int B, int L, int H) {
    int groups = ceil_div(H, MLA_HEADS), n = ceil_div(L, 256), fill = ceil_div(g_n_sm, B * groups);
    return std::min(std::max(n, fill), ceil_div(L, MLA_TILE));
}

typedef struct { float *att, *part_o, *part_ml; } Scratch;

// version v: o (B, H, D_C) from q (B, H, W_ROW) and cache (B, L, W_ROW), lens (B)
static void run_version(int v, float *o, const float *q, const float *cache, const int *lens, int B, int L, int H,
                        int n_split, Scratch sc) {
    size_t stride = (size_t)L * W_ROW;
    int groups = ceil_div(H, MLA_HEADS);
    dim3 split_grid(n_split, B, groups);
    if (v == 1) mla_attention_kernel1<<<ceil_div((long)B * H, 8), 256>>>(o, sc.att, q, cache, stride, lens, B, H, W_ROW, D_C, L, g_scale);
    if (v == 2) mla_attention_kernel2<<<dim3(B, groups), 256, f32_smem_bytes(W_ROW)>>>(o, q, cache, stride, lens, H, W_ROW, D_C, g_scale);
    if (v == 3) mla_attention_kernel3<<<split_grid, 256, f32_smem_bytes(W_ROW)>>>(sc.part_o, sc.part_ml, q, cache, stride, lens, H, W_ROW, D_C, n_split, g_scale);
    if (v == 4) mla_attention_kernel4<<<split_grid, MLA_WARPS * 32, mla_smem_bytes_single(W_ROW)>>>(sc.part_o, sc.part_ml, q, cache, stride, lens, H, W_ROW, D_C, n_split, g_scale);
    if (v == 5) mla_attention_kernel<<<split_grid, MLA_WARPS * 32, mla_smem_bytes(W_ROW)>>>(sc.part_o, sc.part_ml, q, cache, stride, lens, NULL, 0, H, W_ROW, D_C, n_split, g_scale);
    launchCheck();
    if (v >= 3) {
        mla_combine_kernel<<<dim3(H, B, ceil_div(D_C, COMBINE_COLS)), 256, (size_t)ceil_div(n_split, 4) * 4 * sizeof(float)>>>(o, sc.part_o, sc.part_ml, lens, NULL, 0, H, D_C, n_split);
        launchCheck();
    }
}

// float64 reference of sequence b, all heads: ref (H, D_C)
static void reference(double *ref, const float *q, const float *cb, int len, int H) {
    #pragma omp parallel for schedule(dynamic)
    for (int h = 0; h < H; h++) {
        const float *qh = q + (size_t)h * W_ROW;
        double *s = (double *)malloc((size_t)len * sizeof(double)), mx = -1e300, sum = 0;
        for (int j = 0; j < len; j++) {
            double d = 0;
            for (int k = 0; k < W_ROW; k++) d += (double)qh[k] * cb[(size_t)j * W_ROW + k];
            s[j] = d * g_scale;
            mx = fmax(mx, s[j]);
        }
        for (int j = 0; j < len; j++) { s[j] = exp(s[j] - mx); sum += s[j]; }
        double *r = ref + (size_t)h * D_C;
        for (int k = 0; k < D_C; k++) r[k] = 0;
        for (int j = 0; j < len; j++)
            for (int k = 0; k < D_C; k++) r[k] += s[j] / sum * cb[(size_t)j * W_ROW + k];
        free(s);
    }
}

static double median(std::vector<double> v) { std::sort(v.begin(), v.end()); return v[v.size() / 2]; }

// 1 GiB device-to-device copy, bytes read + written over the median time: the bandwidth ceiling
static double copy_bandwidth(void) {
    size_t n = (size_t)1 << 30;
    void *a, *b;
    cudaCheck(cudaMalloc(&a, n));
    cudaCheck(cudaMalloc(&b, n));
    cudaCheck(cudaMemset(a, 1, n));
    cudaEvent_t e0, e1;
    cudaCheck(cudaEventCreate(&e0));
    cudaCheck(cudaEventCreate(&e1));
    std::vector<double> t;
    for (int i = 0; i < 13; i++) {
        float ms;
        cudaCheck(cudaEventRecord(e0));
        cudaCheck(cudaMemcpyAsync(b, a, n, cudaMemcpyDeviceToDevice));
        cudaCheck(cudaEventRecord(e1));
        cudaCheck(cudaEventSynchronize(e1));
        cudaCheck(cudaEventElapsedTime(&ms, e0, e1));
        if (i >= 3) t.push_back(ms);
    }
    cudaCheck(cudaFree(a));
    cudaCheck(cudaFree(b));
    return 2.0 * n / (median(t) * 1e-3) / 1e9;
}

// Runs the given versions on B sequences (lengths hl, at most L) and H heads: each version's output is
// poisoned, computed, checked against float64 on sequences 0 and B-1 (all heads), then timed (median
// of up to 10 launches after a warm-up, the L2 flushed before each). Prints one table row per version.
// Returns the number of versions that failed the check.
static int run_shape(const std::vector<int> &versions, int B, int L, int H, const std::vector<int> &hl, double copy_gbs,
                     uint32_t seed, int timed) {
    int n_split = n_splits(B, L, H), groups = ceil_div(H, MLA_HEADS);
    size_t n_cache = (size_t)B * L * W_ROW, n_q = (size_t)B * H * W_ROW, n_o = (size_t)B * H * D_C;
    float *cache, *q, *o, *flush;
    int *lens;
    Scratch sc;
    cudaCheck(cudaMalloc(&cache, n_cache * 4));
    cudaCheck(cudaMalloc(&q, n_q * 4));
    cudaCheck(cudaMalloc(&o, n_o * 4));
    cudaCheck(cudaMalloc(&lens, B * sizeof(int)));
    cudaCheck(cudaMalloc(&sc.att, (size_t)B * H * L * 4));
    cudaCheck(cudaMalloc(&sc.part_o, (size_t)B * n_split * groups * MLA_HEADS * D_C * 4));
    cudaCheck(cudaMalloc(&sc.part_ml, (size_t)B * n_split * groups * MLA_HEADS * 2 * 4));
    size_t flush_bytes = (size_t)256 << 20;  // several times the L2
    cudaCheck(cudaMalloc(&flush, flush_bytes));
    cudaCheck(cudaMemcpy(lens, hl.data(), B * sizeof(int), cudaMemcpyHostToDevice));
    fill_random_kernel<<<1024, 256>>>(cache, n_cache, seed);
    fill_random_kernel<<<1024, 256>>>(q, n_q, seed ^ 0x9e3779b9u);
    launchCheck();
    // the float64 reference of the first and the last sequence
    std::vector<float> hq(n_q), ho(n_o), hc;
    cudaCheck(cudaMemcpy(hq.data(), q, n_q * 4, cudaMemcpyDeviceToHost));
    int checked[2] = {0, B - 1};
    std::vector<double> ref[2];
    for (int i = 0; i < (B > 1 ? 2 : 1); i++) {
        int b = checked[i];
        hc.resize((size_t)hl[b] * W_ROW);
        cudaCheck(cudaMemcpy(hc.data(), cache + (size_t)b * L * W_ROW, hc.size() * 4, cudaMemcpyDeviceToHost));
        ref[i].resize((size_t)H * D_C);
        reference(ref[i].data(), hq.data() + (size_t)b * H * W_ROW, hc.data(), hl[b], H);
    }
    double bytes = 4.0 * (n_q + n_o);
    for (int b = 0; b < B; b++) bytes += 4.0 * hl[b] * W_ROW;
    cudaEvent_t e0, e1;
    cudaCheck(cudaEventCreate(&e0));
    cudaCheck(cudaEventCreate(&e1));
    int failed = 0;
    double prev_ms = 0;
    for (int v : versions) {
        cudaCheck(cudaMemset(o, 0xff, n_o * 4));  // poison: NaN wherever nothing is written
        run_version(v, o, q, cache, lens, B, L, H, n_split, sc);
        cudaCheck(cudaDeviceSynchronize());
        cudaCheck(cudaMemcpy(ho.data(), o, n_o * 4, cudaMemcpyDeviceToHost));
        double worst = 0;
        for (int i = 0; i < (B > 1 ? 2 : 1); i++)
            for (int h = 0; h < H; h++) {
                double dm = 0, rm = 0;
                for (int k = 0; k < D_C; k++) {
                    double g = ho[((size_t)checked[i] * H + h) * D_C + k], r = ref[i][(size_t)h * D_C + k];
                    dm = std::isfinite(g) ? fmax(dm, fabs(g - r)) : INFINITY;
                    rm = fmax(rm, fabs(r));
                }
                worst = fmax(worst, dm / rm);
            }
        bool ok = worst < 1e-5;  // float32 arithmetic; a single tf32 product would be near 1e-3
        failed += !ok;
        if (!timed) {
            printf("%s version %d, %d sequences (lengths %d..%d), %d heads: max rel err vs float64 %.2e\n", ok ? "OK    " : "NOT OK",
                   v, B, *std::min_element(hl.begin(), hl.end()), *std::max_element(hl.begin(), hl.end()), H, worst);
            continue;
        }
        std::vector<double> t;
        double total = 0;
        for (int r = 0; r < 10 && (r < 3 || total < 2000); r++) {
            float ms;
            cudaCheck(cudaMemsetAsync(flush, r, flush_bytes));
            cudaCheck(cudaEventRecord(e0));
            run_version(v, o, q, cache, lens, B, L, H, n_split, sc);
            cudaCheck(cudaEventRecord(e1));
            cudaCheck(cudaEventSynchronize(e1));
            cudaCheck(cudaEventElapsedTime(&ms, e0, e1));
            t.push_back(ms);
            total += ms;
        }
        double ms = median(t), gbs = bytes / (ms * 1e-3) / 1e9;
        char speedup[32] = "";
        if (prev_ms > 0) snprintf(speedup, sizeof speedup, "%.2fx", prev_ms / ms);
        printf("| %d x %d | %d | %d %s | %d | %.3f | %.0f | %.0f%% | %s | %.1e %s |\n", B, L, H, v, g_what[v],
               v >= 3 ? n_split : 1, ms, gbs, 100 * gbs / copy_gbs, speedup, worst, ok ? "OK" : "NOT OK");
        fflush(stdout);
        prev_ms = ms;
    }
    cudaCheck(cudaFree(cache)); cudaCheck(cudaFree(q)); cudaCheck(cudaFree(o)); cudaCheck(cudaFree(lens));
    cudaCheck(cudaFree(sc.att)); cudaCheck(cudaFree(sc.part_o)); cudaCheck(cudaFree(sc.part_ml)); cudaCheck(cudaFree(flush));
    cudaCheck(cudaEventDestroy(e0)); cudaCheck(cudaEventDestroy(e1));
    return failed;
}

// ----------------------------------------------------------------------------
// Versions 6 and 7 against version 5 on a paged cache: the same random rows, scattered into pages

typedef struct { const char *name; int bf16; } PagedVariant;
static const PagedVariant g_paged[] = {{"6 paged, float32 cache, 2 stages, 8 warps", 0},
                                       {"6 paged, float32 cache, 2 stages, 16 warps (dsv2cu)", 0},
                                       {"6 paged, bf16 cache, 2 stages, 8 warps", 1},
                                       {"6 paged, bf16 cache, 4 stages, 8 warps", 1},
                                       {"6 paged, bf16 cache, 2 stages, 16 warps", 1},
                                       {"6 paged, bf16 cache, 4 stages, 16 warps (dsv2cu 6)", 1},
                                       {"7 paged, bf16 cache, bf16 x 3 on ldmatrix, overlapped, 4 stages, 16 warps (dsv2cu 7)", 1},
                                       {"7 paged, bf16 cache, bf16 x 3 on ldmatrix, serial phases, 4 stages, 16 warps (dsv2cu 7s)", 1},
                                       {"7 paged, bf16 cache, bf16 x 3 on ldmatrix, overlapped, 4 stages, 8 warps", 1},
                                       {"7 paged, bf16 cache, bf16 x 3 on ldmatrix, overlapped, 5 stages, 8 warps", 1}};

typedef struct { float *part_o, *part_ml; int *tile_start; } PagedScratch;

// the plan, the attention over N = one chunk per multiprocessor, the merge of the cut sequences
template <typename T, int STAGES, int WARPS>
static void run_v6(float *o, PagedScratch sc, const float *q, const T *pool, const int *tables, int max_blocks,
                   const int *seq_of, const int *lens, int B, int H) {
    static bool attr_set = false;  // one per instantiation
    size_t smem = dec_smem_bytes<T, STAGES, WARPS>(W_ROW);
    if (!attr_set) {
        cudaCheck(cudaFuncSetAttribute(mla_decode_kernel<T, STAGES, WARPS>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
        attr_set = true;
    }
    mla_decode_plan_kernel<<<1, 1024>>>(sc.tile_start, lens, B);
    launchCheck();
    mla_decode_kernel<T, STAGES, WARPS><<<dim3(ceil_div(H, MLA_HEADS), g_n_sm), WARPS * 32, smem>>>(
        o, sc.part_o, sc.part_ml, q, pool, tables, max_blocks, seq_of, lens, sc.tile_start, B, H, W_ROW, D_C, g_scale);
    launchCheck();
    mla_decode_combine_kernel<<<dim3(H, g_n_sm), 256, (g_n_sm + 4) * sizeof(float)>>>(o, sc.part_o, sc.part_ml, sc.tile_start, B, H, D_C);
    launchCheck();
}
// version 7 (bf16 cache only): the same plan and merge around mla_decode_kernel_v7
template <int STAGES, int WARPS, bool OVERLAP>
static void run_v7(float *o, PagedScratch sc, const float *q, const bf16 *pool, const int *tables, int max_blocks,
                   const int *seq_of, const int *lens, int B, int H) {
    static bool attr_set = false;  // one per instantiation
    size_t smem = dec7_smem_bytes<STAGES, WARPS>(W_ROW);
    if (!attr_set) {
        cudaCheck(cudaFuncSetAttribute(mla_decode_kernel_v7<STAGES, WARPS, OVERLAP>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
        attr_set = true;
    }
    mla_decode_plan_kernel<<<1, 1024>>>(sc.tile_start, lens, B);
    launchCheck();
    mla_decode_kernel_v7<STAGES, WARPS, OVERLAP><<<dim3(ceil_div(H, MLA_HEADS), g_n_sm), WARPS * 32, smem>>>(
        o, sc.part_o, sc.part_ml, q, pool, tables, max_blocks, seq_of, lens, sc.tile_start, B, H, W_ROW, D_C, g_scale);
    launchCheck();
    mla_decode_combine_kernel<<<dim3(H, g_n_sm), 256, (g_n_sm + 4) * sizeof(float)>>>(o, sc.part_o, sc.part_ml, sc.tile_start, B, H, D_C);
    launchCheck();
}
static void run_paged_variant(int i, float *o, PagedScratch sc, const float *q, const float *pool_f, const bf16 *pool_b,
                              const int *tables, int max_blocks, const int *seq_of, const int *lens, int B, int H) {
    switch (i) {
    case 0: run_v6<float, 2, 8>(o, sc, q, pool_f, tables, max_blocks, seq_of, lens, B, H); break;
    case 1: run_v6<float, 2, 16>(o, sc, q, pool_f, tables, max_blocks, seq_of, lens, B, H); break;
    case 2: run_v6<bf16, 2, 8>(o, sc, q, pool_b, tables, max_blocks, seq_of, lens, B, H); break;
    case 3: run_v6<bf16, 4, 8>(o, sc, q, pool_b, tables, max_blocks, seq_of, lens, B, H); break;
    case 4: run_v6<bf16, 2, 16>(o, sc, q, pool_b, tables, max_blocks, seq_of, lens, B, H); break;
    case 5: run_v6<bf16, 4, 16>(o, sc, q, pool_b, tables, max_blocks, seq_of, lens, B, H); break;
    case 6: run_v7<4, 16, true>(o, sc, q, pool_b, tables, max_blocks, seq_of, lens, B, H); break;
    case 7: run_v7<4, 16, false>(o, sc, q, pool_b, tables, max_blocks, seq_of, lens, B, H); break;
    case 8: run_v7<4, 8, true>(o, sc, q, pool_b, tables, max_blocks, seq_of, lens, B, H); break;
    default: run_v7<5, 8, true>(o, sc, q, pool_b, tables, max_blocks, seq_of, lens, B, H); break;
    }
}

// row j of sequence b of the contiguous cache (B, L, W) -> block tables[seq_of[b]][j / KV_BLOCK], row j % KV_BLOCK,
// of both pools (float32, and bf16 rounded to nearest even)
__global__ void scatter_kernel(float *pool_f, bf16 *pool_b, const float *cache, const int *tables, int max_blocks,
                               const int *seq_of, const int *lens, int L) {
    int b = blockIdx.y;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (size_t)lens[b] * W_ROW; i += (size_t)gridDim.x * blockDim.x) {
        int j = (int)(i / W_ROW), k = (int)(i % W_ROW);
        size_t dst = ((size_t)tables[(size_t)seq_of[b] * max_blocks + j / KV_BLOCK] * KV_BLOCK + j % KV_BLOCK) * W_ROW + k;
        float v = cache[((size_t)b * L + j) * W_ROW + k];
        pool_f[dst] = v;
        pool_b[dst] = __float2bfloat16_rn(v);
    }
}
static float bf16_round(float x) { uint32_t u = (uint32_t)float_to_bf16(x) << 16; float f; memcpy(&f, &u, 4); return f; }

// Version 5 (contiguous float32 cache) and the version 6 variants (paged) on B sequences of lengths hl (at
// most L), H heads: the pages are a random permutation of the pool's blocks (block 0, the scratch block,
// never used), the slots a random permutation of the sequences, and every pool row that no sequence owns
// (the tails of last pages) is NaN, so a kernel that reads past a length fails the check. Each version's
// output is poisoned, computed, checked against float64 on a few sequences (all heads; the bf16 cache's
// reference uses the bf16-rounded rows), then timed as run_shape does. Returns the failures.
static int run_paged(int B, int L, int H, const std::vector<int> &hl, const char *label, double copy_gbs, uint32_t seed, int timed,
                     unsigned mask = ~0u) {  // mask: bit 0 version 5, bit 1 + i variant i of g_paged
    int n_split = n_splits(B, L, H), groups = ceil_div(H, MLA_HEADS), max_blocks = ceil_div(L, KV_BLOCK), n_used = 0;
    for (int b = 0; b < B; b++) n_used += ceil_div(hl[b], KV_BLOCK);
    size_t n_blocks = n_used + 1, n_pool = n_blocks * KV_BLOCK * W_ROW;
    uint64_t rng = seed * 2654435761ull + 1;
    auto next = [&rng](int n) { rng = rng * 6364136223846793005ull + 1442695040888963407ull; return (int)((rng >> 33) % n); };
    std::vector<int> perm(n_used), slot(B), tab((size_t)B * max_blocks, 0);
    for (int i = 0; i < n_used; i++) perm[i] = i + 1;
    for (int i = 0; i < B; i++) slot[i] = i;
    for (int i = n_used - 1; i > 0; i--) std::swap(perm[i], perm[next(i + 1)]);
    for (int i = B - 1; i > 0; i--) std::swap(slot[i], slot[next(i + 1)]);
    for (int b = 0, u = 0; b < B; b++)
        for (int j = 0; j < ceil_div(hl[b], KV_BLOCK); j++) tab[(size_t)slot[b] * max_blocks + j] = perm[u++];
    size_t n_cache = (size_t)B * L * W_ROW, n_q = (size_t)B * H * W_ROW, n_o = (size_t)B * H * D_C;
    float *cache, *pool_f, *q, *o, *flush;
    bf16 *pool_b;
    int *lens, *tables, *seq_of;
    Scratch sc5;
    PagedScratch sc6;
    cudaCheck(cudaMalloc(&cache, n_cache * 4));
    cudaCheck(cudaMalloc(&pool_f, n_pool * 4));
    cudaCheck(cudaMalloc(&pool_b, n_pool * 2));
    cudaCheck(cudaMalloc(&q, n_q * 4));
    cudaCheck(cudaMalloc(&o, n_o * 4));
    cudaCheck(cudaMalloc(&lens, B * sizeof(int)));
    cudaCheck(cudaMalloc(&seq_of, B * sizeof(int)));
    cudaCheck(cudaMalloc(&tables, tab.size() * sizeof(int)));
    sc5.att = NULL;
    cudaCheck(cudaMalloc(&sc5.part_o, (size_t)B * n_split * groups * MLA_HEADS * D_C * 4));
    cudaCheck(cudaMalloc(&sc5.part_ml, (size_t)B * n_split * groups * MLA_HEADS * 2 * 4));
    cudaCheck(cudaMalloc(&sc6.part_o, (size_t)2 * g_n_sm * H * D_C * 4));
    cudaCheck(cudaMalloc(&sc6.part_ml, (size_t)2 * g_n_sm * H * 2 * 4));
    cudaCheck(cudaMalloc(&sc6.tile_start, (B + 1) * sizeof(int)));
    size_t flush_bytes = (size_t)256 << 20;
    cudaCheck(cudaMalloc(&flush, flush_bytes));
    cudaCheck(cudaMemcpy(lens, hl.data(), B * sizeof(int), cudaMemcpyHostToDevice));
    cudaCheck(cudaMemcpy(seq_of, slot.data(), B * sizeof(int), cudaMemcpyHostToDevice));
    cudaCheck(cudaMemcpy(tables, tab.data(), tab.size() * sizeof(int), cudaMemcpyHostToDevice));
    fill_random_kernel<<<1024, 256>>>(cache, n_cache, seed);
    fill_random_kernel<<<1024, 256>>>(q, n_q, seed ^ 0x9e3779b9u);
    cudaCheck(cudaMemset(pool_f, 0xff, n_pool * 4));  // NaN (and a bf16 NaN) wherever no sequence's row is
    cudaCheck(cudaMemset(pool_b, 0xff, n_pool * 2));
    scatter_kernel<<<dim3(256, B), 256>>>(pool_f, pool_b, cache, tables, max_blocks, seq_of, lens, L);
    launchCheck();
    // float64 references (float32 rows and bf16-rounded rows) of a few sequences
    std::vector<int> checked = {0, B / 2, B - 1};
    checked.erase(std::unique(checked.begin(), checked.end()), checked.end());
    std::vector<float> hq(n_q), ho(n_o), hc;
    cudaCheck(cudaMemcpy(hq.data(), q, n_q * 4, cudaMemcpyDeviceToHost));
    std::vector<std::vector<double>> ref_f(checked.size()), ref_b(checked.size());
    for (size_t i = 0; i < checked.size(); i++) {
        int b = checked[i];
        hc.resize((size_t)hl[b] * W_ROW);
        cudaCheck(cudaMemcpy(hc.data(), cache + (size_t)b * L * W_ROW, hc.size() * 4, cudaMemcpyDeviceToHost));
        ref_f[i].resize((size_t)H * D_C);
        reference(ref_f[i].data(), hq.data() + (size_t)b * H * W_ROW, hc.data(), hl[b], H);
        for (auto &v : hc) v = bf16_round(v);
        ref_b[i].resize((size_t)H * D_C);
        reference(ref_b[i].data(), hq.data() + (size_t)b * H * W_ROW, hc.data(), hl[b], H);
    }
    double rows = 0;
    for (int b = 0; b < B; b++) rows += hl[b];
    cudaEvent_t e0, e1;
    cudaCheck(cudaEventCreate(&e0));
    cudaCheck(cudaEventCreate(&e1));
    int failed = 0;
    double v5_ms = 0;
    int n_var = (int)(sizeof g_paged / sizeof g_paged[0]);
    for (int vi = -1; vi < n_var; vi++) {  // -1: version 5
        if (!(mask >> (vi + 1) & 1)) continue;
        int is_bf16 = vi >= 0 && g_paged[vi].bf16;
        auto run = [&]() {
            if (vi < 0) run_version(5, o, q, cache, lens, B, L, H, n_split, sc5);
            else run_paged_variant(vi, o, sc6, q, pool_f, pool_b, tables, max_blocks, seq_of, lens, B, H);
        };
        cudaCheck(cudaMemset(o, 0xff, n_o * 4));
        run();
        cudaCheck(cudaDeviceSynchronize());
        cudaCheck(cudaMemcpy(ho.data(), o, n_o * 4, cudaMemcpyDeviceToHost));
        double worst = 0;
        for (size_t i = 0; i < checked.size(); i++)
            for (int h = 0; h < H; h++) {
                const double *r = (is_bf16 ? ref_b[i] : ref_f[i]).data() + (size_t)h * D_C;
                double dm = 0, rm = 0;
                for (int k = 0; k < D_C; k++) {
                    double gv = ho[((size_t)checked[i] * H + h) * D_C + k];
                    dm = std::isfinite(gv) ? fmax(dm, fabs(gv - r[k])) : INFINITY;
                    rm = fmax(rm, fabs(r[k]));
                }
                worst = fmax(worst, dm / rm);
            }
        // a NaN anywhere in the output (an unwritten head of an unchecked sequence, a NaN row read) fails too
        for (size_t i = 0; i < n_o; i++)
            if (!std::isfinite(ho[i])) { worst = INFINITY; break; }
        bool ok = worst < 1e-5;
        failed += !ok;
        const char *name = vi < 0 ? "5 contiguous float32 cache (dsv2.cu today)" : g_paged[vi].name;
        if (!timed) {
            printf("%s %s, %d sequences (%s), %d heads: max rel err vs float64 %.2e\n", ok ? "OK    " : "NOT OK", name, B, label, H, worst);
            continue;
        }
        std::vector<double> t;
        double total = 0;
        for (int r = 0; r < 10 && (r < 3 || total < 2000); r++) {
            float ms;
            cudaCheck(cudaMemsetAsync(flush, r, flush_bytes));
            cudaCheck(cudaEventRecord(e0));
            run();
            cudaCheck(cudaEventRecord(e1));
            cudaCheck(cudaEventSynchronize(e1));
            cudaCheck(cudaEventElapsedTime(&ms, e0, e1));
            t.push_back(ms);
            total += ms;
        }
        double ms = median(t), bytes = rows * W_ROW * (is_bf16 ? 2 : 4) + 4.0 * (n_q + n_o), gbs = bytes / (ms * 1e-3) / 1e9;
        if (vi < 0) v5_ms = ms;
        printf("| %d x %s | %d | %s | %.3f | %.0f | %.0f%% | %.2fx | %.1e %s |\n", B, label, H, name, ms, gbs, 100 * gbs / copy_gbs,
               v5_ms / ms, worst, ok ? "OK" : "NOT OK");
        fflush(stdout);
    }
    cudaCheck(cudaFree(cache)); cudaCheck(cudaFree(pool_f)); cudaCheck(cudaFree(pool_b)); cudaCheck(cudaFree(q));
    cudaCheck(cudaFree(o)); cudaCheck(cudaFree(lens)); cudaCheck(cudaFree(seq_of)); cudaCheck(cudaFree(tables));
    cudaCheck(cudaFree(sc5.part_o)); cudaCheck(cudaFree(sc5.part_ml)); cudaCheck(cudaFree(sc6.part_o));
    cudaCheck(cudaFree(sc6.part_ml)); cudaCheck(cudaFree(sc6.tile_start)); cudaCheck(cudaFree(flush));
    cudaCheck(cudaEventDestroy(e0)); cudaCheck(cudaEventDestroy(e1));
    return failed;
}

// The tensor cores' rate through mma.sync, measured: every warp runs 8 independent accumulators of
// m16n8k8 tf32 (or m16n8k16 bf16) products, 4096 times, from registers (no memory traffic). The
// ceiling of versions 4-6, whose products are all mma.sync; FLOPs = 2 m n k per product.
template <int BF16>
__global__ void mma_peak_kernel(float *out, int iters) {
    uint32_t a[4], b[2];
    float d[8][4];
    for (int i = 0; i < 4; i++) a[i] = 0x3f800000u ^ (threadIdx.x * 7919u + i) << 8;
    for (int i = 0; i < 2; i++) b[i] = 0x3f800000u ^ (threadIdx.x * 104729u + i) << 8;
    for (int j = 0; j < 8; j++) d[j][0] = d[j][1] = d[j][2] = d[j][3] = 0.0f;
    for (int it = 0; it < iters; it++)
        #pragma unroll
        for (int j = 0; j < 8; j++) {
            if (BF16)
                asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                             : "+f"(d[j][0]), "+f"(d[j][1]), "+f"(d[j][2]), "+f"(d[j][3])
                             : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
            else
                mma_tf32(d[j], a, b);
        }
    float s = 0;
    for (int j = 0; j < 8; j++) s += d[j][0] + d[j][1] + d[j][2] + d[j][3];
    if (s == 12345.678f) out[0] = s;  // keeps the products alive
}
static void mma_peak(void) {
    float *out;
    cudaCheck(cudaMalloc(&out, 4));
    cudaEvent_t e0, e1;
    cudaCheck(cudaEventCreate(&e0));
    cudaCheck(cudaEventCreate(&e1));
    int iters = 4096, blocks = g_n_sm * 8, threads = 256;
    for (int bf = 0; bf <= 1; bf++) {
        std::vector<double> t;
        for (int r = 0; r < 6; r++) {
            float ms;
            cudaCheck(cudaEventRecord(e0));
            if (bf) mma_peak_kernel<1><<<blocks, threads>>>(out, iters);
            else mma_peak_kernel<0><<<blocks, threads>>>(out, iters);
            cudaCheck(cudaEventRecord(e1));
            cudaCheck(cudaEventSynchronize(e1));
            launchCheck();
            cudaCheck(cudaEventElapsedTime(&ms, e0, e1));
            if (r > 0) t.push_back(ms);
        }
        double flops = 2.0 * 16 * 8 * (bf ? 16 : 8) * 8 * iters * (double)blocks * threads / 32;
        printf("mma.sync %s: %.0f TFLOP/s (%d blocks of %d threads, 8 independent products per warp)\n",
               bf ? "m16n8k16 bf16" : "m16n8k8 tf32", flops / (median(t) * 1e-3) / 1e12, blocks, threads);
    }
    cudaCheck(cudaFree(out));
}

// `mla_attention paged`: version 5 and the version 6 variants: checks on ragged batches, then the table
static int paged_main(double copy_gbs, int timed) {
    int failed = 0;
    auto ragged = [](int B, int lo, int hi, uint32_t seed) {  // B lengths, uniform in [lo, hi]
        std::vector<int> v(B);
        uint64_t r = seed;
        for (auto &x : v) { r = r * 6364136223846793005ull + 1442695040888963407ull; x = lo + (int)((r >> 33) % (hi - lo + 1)); }
        return v;
    };
    failed += run_paged(5, 4099, 20, {1, 31, 33, 1000, 4099}, "1..4099", copy_gbs, 81, 0);
    failed += run_paged(3, 300, 128, {300, 17, 299}, "17..300", copy_gbs, 82, 0);
    std::vector<int> pf(700);  // a prefill's queries: query b sees rows 0..b (many sequences per chunk)
    for (int b = 0; b < 700; b++) pf[b] = b + 1;
    failed += run_paged(700, 700, 16, pf, "1..700, a prefill", copy_gbs, 83, 0);
    failed += run_paged(1, 8192, 16, {8192}, "8192", copy_gbs, 84, 0);
    if (!timed) { printf("\n%d checks failed\n", failed); return failed ? 1 : 0; }
    mma_peak();
    printf("\n| sequences x tokens | heads | version | ms | GB/s | of copy | vs version 5 | max rel err |\n|---|---|---|---|---|---|---|---|\n");
    for (int H : {16, 128}) {
        failed += run_paged(64, 8192, H, std::vector<int>(64, 8192), "8192", copy_gbs, 1000 + H, 1);
        failed += run_paged(64, 16383, H, ragged(64, 1, 16383, 7), "1..16383 (mixed, mean ~8K)", copy_gbs, 2000 + H, 1);
    }
    failed += run_paged(1, 32768, 16, {32768}, "32768", copy_gbs, 3000, 1);
    printf("\n%d checks failed\n", failed);
    return failed ? 1 : 0;
}

int main(int argc, char **argv) {
    double mscale = 0.1 * log(40.0) + 1.0;
    g_scale = (float)(mscale * mscale / sqrt(192.0));
    cudaDeviceProp prop;
    cudaCheck(cudaGetDeviceProperties(&prop, 0));
    g_n_sm = prop.multiProcessorCount;
    cudaCheck(cudaFuncSetAttribute(mla_attention_kernel2, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)f32_smem_bytes(W_ROW)));
    cudaCheck(cudaFuncSetAttribute(mla_attention_kernel3, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)f32_smem_bytes(W_ROW)));
    cudaCheck(cudaFuncSetAttribute(mla_attention_kernel4, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)mla_smem_bytes_single(W_ROW)));
    cudaCheck(cudaFuncSetAttribute(mla_attention_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)mla_smem_bytes(W_ROW)));
    double copy_gbs = copy_bandwidth();
    printf("device %s, %d multiprocessors; copy bandwidth (1 GiB device-to-device, read + write) %.1f GB/s\n", prop.name,
           g_n_sm, copy_gbs);
    printf("cache rows of %d floats (d_c %d + d_h^R %d), softmax scale %.4f (DeepSeek-V2's)\n", W_ROW, D_C, W_ROW - D_C, g_scale);
    std::vector<int> all = {1, 2, 3, 4, 5};
    if (argc == 2 && !strcmp(argv[1], "paged")) return paged_main(copy_gbs, 1);
    if (argc == 2 && !strcmp(argv[1], "paged-check")) return paged_main(copy_gbs, 0);  // small, for compute-sanitizer
    if (argc == 2 && !strcmp(argv[1], "paged-profile"))  // for Nsight Compute: dsv2cu's two variants once each, 64 x 8192, 16 heads
        return run_paged(64, 8192, 16, std::vector<int>(64, 8192), "8192", copy_gbs, 1016, 0, 1u << 2 | 1u << 6 | 1u << 7) ? 1 : 0;
    if (argc == 5) {  // one version, one shape
        int v = atoi(argv[1]), B = atoi(argv[2]), L = atoi(argv[3]), H = atoi(argv[4]);
        if (v < 1 || v > 5 || B < 1 || L < 1 || H < 1) die("usage: %s [VERSION B L H]  (VERSION 1-5)", argv[0]);
        printf("| sequences x tokens | heads | version | splits | ms | GB/s | of copy | speedup | max rel err |\n|---|---|---|---|---|---|---|---|---|\n");
        return run_shape({v}, B, L, H, std::vector<int>(B, L), copy_gbs, 1234, 1) ? 1 : 0;
    }
    if (argc != 1) die("usage: %s [VERSION B L H | paged | paged-check | paged-profile]  (VERSION 1-5; no arguments: every version on the standard shapes; "
                         "paged: versions 5, 6 and 7 on paged caches, float32 and bf16)", argv[0]);
    int failed = 0;
    // ragged lengths (1 row, tails that are not whole tiles) and a head count that is not a multiple of 16
    failed += run_shape(all, 5, 4099, 20, {1, 31, 33, 1000, 4099}, copy_gbs, 77, 0);
    failed += run_shape(all, 3, 300, 128, {300, 17, 299}, copy_gbs, 78, 0);
    printf("\n| sequences x tokens | heads | version | splits | ms | GB/s | of copy | speedup | max rel err |\n|---|---|---|---|---|---|---|---|---|\n");
    int shapes[][3] = {{1, 4096, 16}, {1, 32768, 16}, {64, 8192, 16}, {1, 4096, 128}, {1, 32768, 128}, {64, 8192, 128}};
    for (auto &s : shapes) failed += run_shape(all, s[0], s[1], s[2], std::vector<int>(s[0], s[1]), copy_gbs, 1000 + s[1] + s[2], 1);
    printf("\n%d checks failed\n", failed);
    return failed ? 1 : 0;
}
