// dsv2_mla_decode.cuh: the attention of a BATCH of queries over the PAGED cache of ./dsv2cu's batch
// engine (issue 13), in the two cache layouts, with float32 or bf16 cache elements:
//   mla_decode_forward  latent rows [c^KV ; k^R] (the absorbed form, eqs. 16-18 on the latent, as
//                       mla_attention_kernel in dsv2_mla.cuh): plan + attention + merge; the attention is
//                       mla_decode_kernel (version 6: float32 cache, or bf16 read as tf32) or, for a bf16
//                       cache, mla_decode_kernel_v7 (version 7: bf16 products, DSV2_MLA_VERSION selects)
//   mha_decode_forward  expanded rows [k_0..k_{H-1} | v_0..v_{H-1}] (--kv-layout mha: dsv2.c's
//                       mla_attend_naive, but cached), the counterfactual of the throughput comparison
// Included by dsv2.cu after dsv2_mla.cuh (it uses that file's MLA_* tile constants, mla_stride,
// mla_chunk and mla_combine_kernel). dev/cuda/mla_attention.cu includes the kernels as its versions 6 and 7
// (with MLA_DECODE_KERNELS_ONLY defined: no host functions, which need dsv2.cu's gpu state).
//
// The paged cache (the batch engine owns it): a layer's pool is (n_blocks, KV_BLOCK, row) elements
// of float or bf16; slot s's row j is in block tables[s * max_blocks + j / KV_BLOCK], at offset
// j % KV_BLOCK. Query b (b < B) belongs to slot seq_of[b] and attends rows [0, lens[b]), lens[b] >= 1.
// A bf16 element is exact in tf32 and in float32, so the cache is never split for the tensor cores:
// float32 accuracy needs only the query and the probabilities split (see mla_decode_kernel).
// Launches are graph-capturable: every grid depends on B and static sizes, never on lens.
#define DEC_WARPS 16  // warps per block of mla_decode_kernel in dsv2cu (dev/cuda times 8 and 16)
#ifndef KV_BLOCK
#define KV_BLOCK 64  // tokens per block (page) of the paged cache; dsv2.c defines it
#endif

// ---------------- MLA over the paged latent cache: balanced splits from a plan
//
// mla_attention_kernel (dsv2_mla.cuh) cuts each sequence into n_split equal chunks. With B sequences
// of different lengths that leaves multiprocessors idle: the blocks of short sequences finish early,
// and B x n_split blocks rarely make whole waves. So this kernel balances the work itself (FlashMLA's
// metadata pass, simplified): count each sequence's 32-row tiles, lay all B sequences' tiles end to end
// (tile_start, the plan), and give chunk i of N (one per multiprocessor) the tiles
//   [i T / N, (i + 1) T / N),  T = total tiles,
// whatever sequences they belong to. A chunk's tiles form segments, one per sequence it touches. A
// sequence inside one chunk is finished there (o_lat = o / l written directly); one cut by chunk
// boundaries leaves a partial (m, l, o) in each chunk it touches, merged by log-sum-exp afterwards
// (mla_decode_combine_kernel, as mla_combine_kernel). A chunk holds at most two cut sequences: the one
// that began before it (slot 0) and the one that goes on after it (slot 1), so the partials take
// 2 N slots whatever B is. Every grid is (head groups, N): fixed for a model and a GPU.

// first tile of chunk i of N, T tiles in all
__host__ __device__ __forceinline__ int dec_chunk_start(int i, int T, int N) { return (int)((long long)i * T / N); }
// the chunk that holds tile tau: the largest i with dec_chunk_start(i) <= tau (empty chunks come before it)
__device__ __forceinline__ int dec_chunk_of(int tau, int T, int N) { return (int)(((long long)(tau + 1) * N + T - 1) / T) - 1; }
// the sequence that holds tile tau: the largest b with tile_start[b] <= tau (binary search)
__device__ __forceinline__ int dec_seq_of(const int *tile_start, int B, int tau) {
    int lo = 0, hi = B - 1;
    while (lo < hi) {
        int mid = (lo + hi + 1) >> 1;
        if (tile_start[mid] <= tau) lo = mid; else hi = mid - 1;
    }
    return lo;
}

// The plan: tile_start[b] = sum_{b' < b} ceil(lens[b'] / MLA_TILE), b = 0..B (tile_start[B] = T).
// One block of 1024 threads: thread i sums a run of consecutive sequences, a block-wide scan (warp
// shuffles, then the warps' totals) gives each run's start.
__global__ void mla_decode_plan_kernel(int *tile_start, const int *lens, int B) {
    pdl_launch_next();
    pdl_wait();
    __shared__ int warp_total[32];
    int per = ceil_div(B, blockDim.x), i0 = threadIdx.x * per, i1 = min(B, i0 + per), lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int n = 0;
    for (int i = i0; i < i1; i++) n += ceil_div(lens[i], MLA_TILE);
    int x = n;  // inclusive scan over the warp
    for (int o = 1; o < 32; o <<= 1) {
        int y = __shfl_up_sync(0xffffffffu, x, o);
        if (lane >= o) x += y;
    }
    if (lane == 31) warp_total[warp] = x;
    __syncthreads();
    if (warp == 0) {  // inclusive scan of the warps' totals
        int w = lane < (int)(blockDim.x >> 5) ? warp_total[lane] : 0;
        for (int o = 1; o < 32; o <<= 1) {
            int y = __shfl_up_sync(0xffffffffu, w, o);
            if (lane >= o) w += y;
        }
        warp_total[lane] = w;
    }
    __syncthreads();
    int before = x - n + (warp ? warp_total[warp - 1] : 0);
    for (int i = i0; i < i1; i++) { tile_start[i] = before; before += ceil_div(lens[i], MLA_TILE); }
    if (threadIdx.x == blockDim.x - 1) tile_start[B] = before;  // the last thread's runs end at the total
}

// tile lt (rows [32 lt, 32 lt + 32)) of slot `slot`'s rows into shared memory (row stride S elements),
// zeros for rows >= len. A tile lies inside one page (KV_BLOCK is a multiple of MLA_TILE), so its rows
// are contiguous: one table lookup, then 16-byte cp.async pieces over the whole block. Each shared row
// is zero-filled up to a whole number of 32 bytes (the scores read 8-byte pieces of 32-byte column
// chunks: with W = 8 (mod 16) bf16 the last chunk is half past the row). Not committed.
template <typename T>
__device__ __forceinline__ void dec_load_tile(T *tile, const T *pool, const int *tables, int max_blocks, int slot,
                                              int lt, int len, int W, int S) {
    int j0 = lt * MLA_TILE, per_row = W * (int)sizeof(T) / 16, per_row_pad = ceil_div(W * (int)sizeof(T), 32) * 2;
    const char *rows = (const char *)(pool + ((size_t)tables[(size_t)slot * max_blocks + j0 / KV_BLOCK] * KV_BLOCK + j0 % KV_BLOCK) * W);
    for (int c = threadIdx.x; c < MLA_TILE * per_row_pad; c += blockDim.x) {
        int r = c / per_row_pad, k = c - r * per_row_pad;
        bool ok = j0 + r < len && k < per_row;
        cp_async16((char *)(tile + r * S) + 16 * k, ok ? rows + ((size_t)r * per_row + k) * 16 : rows, ok ? 16 : 0);
    }
}

// row stride of a shared cache tile in elements: W * sizeof(T) bytes padded to 8 (mod 32) words, as mla_stride
template <typename T> __host__ __device__ __forceinline__ int dec_stride(int W) {
    return mla_stride(W * (int)sizeof(T) / 4) * 4 / (int)sizeof(T);
}
// shared memory of mla_decode_kernel: STAGES cache tiles, the per-warp partial scores, P split hi/lo, m, l, a
template <typename T, int STAGES, int WARPS> static size_t dec_smem_bytes(int W) {
    return (size_t)STAGES * MLA_TILE * dec_stride<T>(W) * sizeof(T) + ((WARPS + 2) * MLA_HEADS * MLA_SP + 3 * MLA_HEADS) * 4;
}

// dsv2.c mla_attention's absorbed loop (eqs. 16-18 on the latent) for the tiles of chunk blockIdx.y,
// 16 heads (blockIdx.x), over the paged cache, on the tensor cores at float32 accuracy.
// In:  q_lat (B, H, W) float32; pool (n_blocks, KV_BLOCK, W) of T = float or bf16; the plan tile_start.
// Out: o_lat (B, H, d_c) for the sequences finished in this chunk; part_o (2 N, H, d_c), part_ml
//      (2 N, H, 2) for the cut ones (slot 2 i + 0 or 1, see above).
// One block of WARPS warps (8 or 16), one block per multiprocessor. Per 32-row tile, the three phases
// of mla_attention_kernel (read its comment): the scores split over the warps by columns (each warp's
// queries in registers, the partial scores summed in shared memory), the online softmax (warp w takes
// heads 16 w / WARPS ..), the values split over the warps by latent columns. What differs:
// - Pages and segments: a loader cursor and a consumer cursor walk the chunk's tiles; a tile belongs to
//   sequence b (its row 32 lt of slot seq_of[b]). At a segment's first tile the block loads that
//   sequence's queries and resets m, l, o; at its last it writes o / l or the partial.
// - STAGES-deep cp.async pipeline: tiles k+1 .. k+STAGES-1 are in flight while tile k is used, across
//   segment boundaries too (the pipeline never drains inside a chunk).
// - 16 warps: the kernel is bound by latencies (dependent tensor-core products, shuffles, barriers),
//   not by issue slots or memory; twice the warps do each phase in about half the time.
// - Each tile's P . V goes into fresh accumulators, then o = a o + (P . V) on the CUDA cores. A chunk
//   walks ~100 tiles; summing them all in the tensor cores' accumulators lost precision (3e-5 relative
//   at 64 x 8K, against 2e-6 for version 5's 8-tile splits; the tensor cores' float32 sums are not
//   rounded to nearest).
// - bf16 cache: a bf16 value is a tf32 value (8 of tf32's 10 mantissa bits), so b = c exactly and
//   a b = a_hi c + a_lo c: two products (3xTF32 less its a_hi b_lo term), nothing to split in the tile.
//   A bf16 becomes a tf32 by a shift (low half of a 32-bit word) or a mask (high half). Each lane loads
//   8 bytes: 4 bf16 = two k-steps of the scores (fragment column t of step 2p is latent column
//   16p + 4t, t + 4 is 16p + 4t + 1; step 2p + 1 the next two), and in the values a 32-bit word holds
//   latent columns 2n and 2n + 1 of a 16-column strip: one load feeds two 8-column n-tiles (the
//   "even" tile holds columns 16s + 2n, the "odd" one 16s + 2n + 1; a lane's outputs are then the four
//   adjacent columns 16s + 4t .. + 3: one float4).
// - float32 cache: mla_attention_kernel's 3xTF32 products.
template <typename T, int STAGES, int WARPS>
__global__ void __launch_bounds__(WARPS * 32, 1)
mla_decode_kernel(float *o_lat, float *part_o, float *part_ml, const float *q_lat, const T *pool, const int *tables,
                  int max_blocks, const int *seq_of, const int *lens, const int *tile_start, int B, int H, int W, int d_c,
                  float scale) {
    pdl_launch_next();
    pdl_wait();
    constexpr int VPL = 8 / sizeof(T);      // cache values per 8-byte load: 2 floats or 4 bf16
    constexpr int SPL = VPL / 2;            // k-steps of the scores per load: 1 or 2
    constexpr int KC = (576 / (4 * VPL) + WARPS - 1) / WARPS;  // loads (column chunks) per warp, W <= 576
    constexpr int NT = 512 / 8 / WARPS;     // 8-column n-tiles of the values per warp, d_c <= 512
    constexpr int HPW = MLA_HEADS / WARPS;  // heads per warp in the softmax
    const int S = dec_stride<T>(W), n_chunks = ceil_div(W / 8, SPL);  // W / 8 k-steps of 8 columns
    int N = gridDim.y, ci = blockIdx.y, h0 = blockIdx.x * MLA_HEADS, tid = threadIdx.x;
    int lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3, nh = min(MLA_HEADS, H - h0);
    int n_all = tile_start[B], t_beg = dec_chunk_start(ci, n_all, N), t_end = dec_chunk_start(ci + 1, n_all, N);
    int n = t_end - t_beg;
    if (n <= 0) return;  // more chunks than tiles: this one is empty
    extern __shared__ float4 dec_smem[];
    T *tiles = (T *)dec_smem;                                            // STAGES x (MLA_TILE, S) cache rows
    float *s_part = (float *)(tiles + STAGES * MLA_TILE * S);            // (WARPS, 16, MLA_SP) partial scores
    uint32_t *p_hi = (uint32_t *)(s_part + WARPS * MLA_HEADS * MLA_SP), *p_lo = p_hi + MLA_HEADS * MLA_SP;  // P split
    float *m_s = (float *)(p_lo + MLA_HEADS * MLA_SP), *l_s = m_s + MLA_HEADS, *a_s = l_s + MLA_HEADS;  // max, sum, rescale
    // the loader's sequence lb and the consumer's cb: the sequences of the tiles being loaded and used
    int lb = dec_seq_of(tile_start, B, t_beg), cb = lb;
    for (int k = 0; k < STAGES - 1; k++) {
        if (k < n) {
            while (tile_start[lb + 1] <= t_beg + k) lb++;
            dec_load_tile(tiles + k * MLA_TILE * S, pool, tables, max_blocks, seq_of[lb], t_beg + k - tile_start[lb], lens[lb], W, S);
        }
        cp_async_commit();  // one group per tile, empty ones too: cp_async_wait counts groups
    }
    // this warp's column chunks of the scores (c0..c1), and its queries there as fragments (hi, lo)
    const int c0 = n_chunks * warp / WARPS, c1 = n_chunks * (warp + 1) / WARPS;
    uint32_t qh[KC][SPL][4], ql[KC][SPL][4];
    float acc[NT][4];
    int len = 0;
    for (int k = 0; k < n; k++) {
        int tau = t_beg + k;
        cp_async_wait<STAGES - 2>();  // tile k has landed (this thread's pieces) ...
        __syncthreads();              // ... everyone's, and every warp is done with tile k - 1's buffer
        if (k + STAGES - 1 < n) {     // refill that buffer with tile k + STAGES - 1
            int tn = tau + STAGES - 1;
            while (tile_start[lb + 1] <= tn) lb++;
            dec_load_tile(tiles + ((k + STAGES - 1) % STAGES) * MLA_TILE * S, pool, tables, max_blocks, seq_of[lb],
                          tn - tile_start[lb], lens[lb], W, S);
        }
        cp_async_commit();
        if (k == 0 || tau >= tile_start[cb + 1]) {  // a new segment: sequence cb's queries, fresh m, l, o
            while (tile_start[cb + 1] <= tau) cb++;
            len = lens[cb];
            const float *qb = q_lat + ((size_t)cb * H + h0) * W;
            #pragma unroll
            for (int i = 0; i < KC; i++)
                #pragma unroll
                for (int st = 0; st < SPL; st++) {
                    int col = (c0 + i) * 4 * VPL + VPL * t + 2 * st;
                    bool ok = c0 + i < c1 && col < W;  // zeros past W: the tile's padding is zeros too
                    float a0 = ok && g < nh ? qb[(size_t)g * W + col] : 0.0f, a2 = ok && g < nh ? qb[(size_t)g * W + col + 1] : 0.0f;
                    float a1 = ok && g + 8 < nh ? qb[(size_t)(g + 8) * W + col] : 0.0f;
                    float a3 = ok && g + 8 < nh ? qb[(size_t)(g + 8) * W + col + 1] : 0.0f;
                    split_tf32(a0, &qh[i][st][0], &ql[i][st][0]); split_tf32(a1, &qh[i][st][1], &ql[i][st][1]);
                    split_tf32(a2, &qh[i][st][2], &ql[i][st][2]); split_tf32(a3, &qh[i][st][3], &ql[i][st][3]);
                }
            if (tid < MLA_HEADS) { m_s[tid] = -INFINITY; l_s[tid] = 0.0f; }
            #pragma unroll
            for (int j = 0; j < NT; j++) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
        }
        int r0 = (tau - tile_start[cb]) * MLA_TILE;  // the tile's first row in sequence cb
        const T *tile = tiles + (k % STAGES) * MLA_TILE * S;
        {   // 1. partial scores over this warp's columns, rows 8 nn + g of the tile (nn < 4)
            float sc[4][4];
            #pragma unroll
            for (int nn = 0; nn < 4; nn++) sc[nn][0] = sc[nn][1] = sc[nn][2] = sc[nn][3] = 0.0f;
            #pragma unroll
            for (int i = 0; i < KC; i++) {
                if (c0 + i >= c1) break;
                int col = (c0 + i) * 4 * VPL + VPL * t;
                #pragma unroll
                for (int nn = 0; nn < 4; nn++) {
                    const T *src = tile + (8 * nn + g) * S + col;
                    if constexpr (sizeof(T) == 4) {
                        float2 v = *(const float2 *)src;
                        float bb[2] = {v.x, v.y};
                        mma_3xtf32(sc[nn], sc[nn], qh[i][0], ql[i][0], bb);
                    } else {
                        uint2 v = *(const uint2 *)src;
                        uint32_t b0[2] = {v.x << 16, v.x & 0xffff0000u}, b1[2] = {v.y << 16, v.y & 0xffff0000u};
                        mma_tf32(sc[nn], ql[i][0], b0);
                        mma_tf32(sc[nn], qh[i][0], b0);
                        mma_tf32(sc[nn], ql[i][1], b1);
                        mma_tf32(sc[nn], qh[i][1], b1);
                    }
                }
            }
            float *sp = s_part + warp * MLA_HEADS * MLA_SP;  // d: heads g, g+8; rows 8nn + 2t, 8nn + 2t + 1
            #pragma unroll
            for (int nn = 0; nn < 4; nn++) {
                *(float2 *)(sp + g * MLA_SP + 8 * nn + 2 * t) = make_float2(sc[nn][0], sc[nn][1]);
                *(float2 *)(sp + (g + 8) * MLA_SP + 8 * nn + 2 * t) = make_float2(sc[nn][2], sc[nn][3]);
            }
        }
        __syncthreads();
        // 2. online softmax: warp w takes heads HPW w .. HPW w + HPW - 1, lane = row; P is stored split for the values
        #pragma unroll
        for (int kk = 0; kk < HPW; kk++) {
            int h = HPW * warp + kk;
            bool ok = r0 + lane < len;
            float s = 0.0f;
            #pragma unroll
            for (int w = 0; w < WARPS; w++) s += s_part[(w * MLA_HEADS + h) * MLA_SP + lane];
            s = ok ? s * scale : -INFINITY;
            float m_old = m_s[h], m_new = fmaxf(m_old, warp_max(s));  // finite: row r0 < len
            float p = ok ? expf(s - m_new) : 0.0f;
            float sum = warp_sum(p);
            split_tf32(p, &p_hi[h * MLA_SP + lane], &p_lo[h * MLA_SP + lane]);
            __syncwarp();  // every lane has read m_s[h] before lane 0 overwrites it
            if (lane == 0) {
                float a = expf(m_old - m_new);  // 0 on a segment's first tile (m_old = -inf)
                a_s[h] = a; l_s[h] = l_s[h] * a + sum; m_s[h] = m_new;
            }
        }
        __syncthreads();
        {   // 3. values: o_latent (16 x d_c) = a * o_latent + P (16 x 32) . tile (32 x d_c)
            float pv[NT][4];  // this tile's P . V
            #pragma unroll
            for (int j = 0; j < NT; j++) pv[j][0] = pv[j][1] = pv[j][2] = pv[j][3] = 0.0f;
            #pragma unroll
            for (int kr = 0; kr < MLA_TILE; kr += 8) {
                int i0 = g * MLA_SP + kr + t, i1 = (g + 8) * MLA_SP + kr + t;
                uint32_t ah[4] = {p_hi[i0], p_hi[i1], p_hi[i0 + 4], p_hi[i1 + 4]};
                uint32_t al[4] = {p_lo[i0], p_lo[i1], p_lo[i0 + 4], p_lo[i1 + 4]};
                if constexpr (sizeof(T) == 4) {  // warp w: 8-column tiles ct = w + WARPS j
                    #pragma unroll
                    for (int j = 0; j < NT; j++) {
                        int ct = warp + WARPS * j;
                        if (8 * ct < d_c) {
                            float bb[2] = {tile[(kr + t) * S + 8 * ct + g], tile[(kr + t + 4) * S + 8 * ct + g]};
                            mma_3xtf32(pv[j], pv[j], ah, al, bb);
                        }
                    }
                } else {  // warp w: 16-column strips sp = w + WARPS j, each an even and an odd n-tile
                    #pragma unroll
                    for (int j = 0; j < NT / 2; j++) {
                        int sp = warp + WARPS * j;
                        if (16 * sp < d_c) {
                            uint32_t w0 = *(const uint32_t *)(tile + (kr + t) * S + 16 * sp + 2 * g);
                            uint32_t w1 = *(const uint32_t *)(tile + (kr + t + 4) * S + 16 * sp + 2 * g);
                            uint32_t be[2] = {w0 << 16, w1 << 16}, bo[2] = {w0 & 0xffff0000u, w1 & 0xffff0000u};
                            mma_tf32(pv[2 * j], al, be);
                            mma_tf32(pv[2 * j], ah, be);
                            mma_tf32(pv[2 * j + 1], al, bo);
                            mma_tf32(pv[2 * j + 1], ah, bo);
                        }
                    }
                }
            }
            float sa = a_s[g], sb = a_s[g + 8];
            #pragma unroll
            for (int j = 0; j < NT; j++) {
                acc[j][0] = acc[j][0] * sa + pv[j][0]; acc[j][1] = acc[j][1] * sa + pv[j][1];
                acc[j][2] = acc[j][2] * sb + pv[j][2]; acc[j][3] = acc[j][3] * sb + pv[j][3];
            }
        }
        if (k == n - 1 || tau + 1 == tile_start[cb + 1]) {  // the segment's last tile: write it out
            bool whole = tile_start[cb] >= t_beg && tile_start[cb + 1] <= t_end;
            float *dst = whole ? o_lat : part_o;
            size_t base = whole ? (size_t)cb * H + h0 : (size_t)(2 * ci + (tile_start[cb] < t_beg ? 0 : 1)) * H + h0;
            float ig = whole ? 1.0f / l_s[g] : 1.0f, ig8 = whole ? 1.0f / l_s[g + 8] : 1.0f;
            if (!whole && tid < nh) { part_ml[(base + tid) * 2] = m_s[tid]; part_ml[(base + tid) * 2 + 1] = l_s[tid]; }
            #pragma unroll
            for (int j = 0; j < NT; j++) {
                if constexpr (sizeof(T) == 4) {
                    int c = 8 * (warp + WARPS * j) + 2 * t;
                    if (c >= d_c) continue;
                    if (g < nh) *(float2 *)(dst + (base + g) * d_c + c) = make_float2(acc[j][0] * ig, acc[j][1] * ig);
                    if (g + 8 < nh) *(float2 *)(dst + (base + g + 8) * d_c + c) = make_float2(acc[j][2] * ig8, acc[j][3] * ig8);
                } else {
                    if (j % 2) continue;  // even and odd tiles of strip j / 2 together
                    int c = 16 * (warp + WARPS * (j / 2)) + 4 * t;
                    if (c >= d_c) continue;
                    const float *e = acc[j], *o = acc[j + 1];
                    if (g < nh) *(float4 *)(dst + (base + g) * d_c + c) = make_float4(e[0] * ig, o[0] * ig, e[1] * ig, o[1] * ig);
                    if (g + 8 < nh) *(float4 *)(dst + (base + g + 8) * d_c + c) = make_float4(e[2] * ig8, o[2] * ig8, e[3] * ig8, o[3] * ig8);
                }
            }
        }
    }
}

// ---------------- Version 7 of the latent attention, bf16 cache: bf16 products, operands by ldmatrix
//
// mla_decode_kernel reads a bf16 cache as tf32 (each element shifted or masked into a 32-bit word by the
// CUDA cores, then m16n8k8 products). Here the cache tile is the bf16 operand itself: m16n8k16 products
// whose cache fragments come from shared memory by ldmatrix (one instruction: a 16 x 16 piece for two
// n-tiles), with nothing converted. Float32 accuracy then needs the other operand split in three bf16
// parts (dsv2_prefill.cuh's split3: 8 + 8 + 8 mantissa bits, all of a float32's), so each product is three:
//   scores  q . c = q1 . c + q2 . c + q3 . c       q's parts made once per segment, kept in registers
//   values  p . c = p1 . c + p2 . c + p3 . c       P's parts written by the softmax, read by ldmatrix
// Every bf16 x bf16 product is exact in the float32 accumulators. The plan, the pipeline, the three
// phases per 32-row tile and the outputs are mla_decode_kernel's (read its comment); what differs:
// - scores: warp w takes 16-column k-steps ks0..ks1 of the W columns (its queries' parts: 12 registers a
//   step); per step two ldmatrix.x4 give the B fragments of the 4 n-tiles (tile rows 0..15, 16..31), each
//   x4 the four 8 x 8 matrices (rows +0..7, columns +0..7), (+0..7, +8..15), (+8..15, +0..7), (+8..15, +8..15).
// - values: warp w takes the 8-column n-tiles w NT .. w NT + NT - 1 of the latent; B = tile rows (k) x
//   latent columns (n), row-major, so ldmatrix.x4.trans gives B fragments for two n-tiles and a 16-row
//   k-step: matrices (rows +0..7, columns +0..7), (+8..15, +0..7), (+0..7, +8..15), (+8..15, +8..15).
//   P (16 heads x 32 rows, three parts) is row-major too: ldmatrix.x4 (not trans) gives A's fragment.
// - shared rows are padded to a stride of 16 (mod 128) bytes (dec7_stride): the 8 row addresses of one
//   ldmatrix matrix then hit 8 different 16-byte bank groups (no conflicts).
// float32 cache: version 6 (mla_decode_kernel) stays; there the cache itself would need splitting.
#define DEC7_WARPS 16  // warps per block of mla_decode_kernel_v7 in dsv2cu
#define DEC7_STAGES 4  // tiles in the cp.async pipeline (4 x 37 KB at W = 576)
#define DEC7_PS 40     // row stride of the P parts in bf16: 80 bytes = 16 (mod 128)

// row stride of version 7's shared cache tiles in bf16 elements: W zero-padded to whole 32-byte pieces (the
// last k-step of 16 columns), then to 16 (mod 128) bytes
__host__ __device__ __forceinline__ int dec7_stride(int W) {
    int bytes = ceil_div(2 * W, 32) * 32;
    return (bytes + (16 - bytes % 128 + 128) % 128) / 2;
}
// shared memory of mla_decode_kernel_v7: STAGES cache tiles, the per-warp partial scores, P's three parts, m, l, a
template <int STAGES, int WARPS> static size_t dec7_smem_bytes(int W) {
    return (size_t)STAGES * MLA_TILE * dec7_stride(W) * 2 + (size_t)WARPS * MLA_HEADS * MLA_SP * 4 + 3 * MLA_HEADS * DEC7_PS * 2 +
           3 * MLA_HEADS * 4;
}
// two floats (columns k, k + 1) -> three bf16x2 words x = p[0] + p[1] + p[2] (exactly), column k in the low half
__device__ __forceinline__ void split3_bf16x2(float x0, float x1, uint32_t *p) {
    #pragma unroll
    for (int i = 0; i < 3; i++) {
        __nv_bfloat162 h = __floats2bfloat162_rn(x0, x1);  // .x (x0) in the low half
        p[i] = *(uint32_t *)&h;
        x0 -= __low2float(h);
        x1 -= __high2float(h);
    }
}

// In, out, grid and the plan: as mla_decode_kernel<bf16, ...>. One block of WARPS warps (8 or 16).
// OVERLAP (dsv2cu's choice): two barriers per tile instead of three. mla_decode_kernel's order per tile k
// is [barrier] scores(k) [barrier] softmax(k) [barrier] values(k); here it is
//   [barrier] softmax(k) [barrier] values(k), scores(k + 1)
// so each warp has the values of one tile and the scores of the next between two barriers (independent
// tensor-core products, one wait fewer). That needs STAGES >= 3 (tiles k and k + 1 are read while the
// buffer of tile k - 1 is refilled), and m, l are never reset by a segment's start (another warp may still
// be writing out the segment before): a segment's first softmax starts from m = -inf, l = 0 itself.
template <int STAGES, int WARPS, bool OVERLAP>
__global__ void __launch_bounds__(WARPS * 32, 1)
mla_decode_kernel_v7(float *o_lat, float *part_o, float *part_ml, const float *q_lat, const bf16 *pool, const int *tables,
                     int max_blocks, const int *seq_of, const int *lens, const int *tile_start, int B, int H, int W,
                     int d_c, float scale) {
    pdl_launch_next();
    pdl_wait();
    constexpr int KC = (576 / 16 + WARPS - 1) / WARPS;  // 16-column k-steps of the scores per warp, W <= 576
    constexpr int NT = 512 / 8 / WARPS;                 // 8-column n-tiles of the values per warp, d_c <= 512
    constexpr int HPW = MLA_HEADS / WARPS;              // heads per warp in the softmax
    static_assert(NT % 2 == 0 && HPW >= 1, "WARPS: 8 or 16");
    static_assert(STAGES >= (OVERLAP ? 3 : 2), "too few stages");
    const int S = dec7_stride(W), n_ks = ceil_div(W, 16);
    int N = gridDim.y, ci = blockIdx.y, h0 = blockIdx.x * MLA_HEADS, tid = threadIdx.x;
    int lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3, nh = min(MLA_HEADS, H - h0);
    int n_all = tile_start[B], t_beg = dec_chunk_start(ci, n_all, N), t_end = dec_chunk_start(ci + 1, n_all, N);
    int n = t_end - t_beg;
    if (n <= 0) return;  // more chunks than tiles: this one is empty
    extern __shared__ float4 dec_smem[];
    bf16 *tiles = (bf16 *)dec_smem;                                      // STAGES x (MLA_TILE, S) cache rows
    float *s_part = (float *)(tiles + STAGES * MLA_TILE * S);            // (WARPS, 16, MLA_SP) partial scores
    bf16 *p_s = (bf16 *)(s_part + WARPS * MLA_HEADS * MLA_SP);           // (3, 16, DEC7_PS) P's parts
    float *m_s = (float *)(p_s + 3 * MLA_HEADS * DEC7_PS), *l_s = m_s + MLA_HEADS, *a_s = l_s + MLA_HEADS;  // max, sum, rescale
    int lb = dec_seq_of(tile_start, B, t_beg), cb = lb;  // the loader's and the consumer's sequences
    for (int k = 0; k < STAGES - 1; k++) {
        if (k < n) {
            while (tile_start[lb + 1] <= t_beg + k) lb++;
            dec_load_tile(tiles + k * MLA_TILE * S, pool, tables, max_blocks, seq_of[lb], t_beg + k - tile_start[lb], lens[lb], W, S);
        }
        cp_async_commit();  // one group per tile, empty ones too: cp_async_wait counts groups
    }
    // this warp's k-steps of the scores: warp w takes the share of slot (w % 4) (WARPS / 4) + w / 4, so that the
    // larger shares (36 k-steps over 16 warps: 4 warps take 3, 12 take 2) go to warps of different schedulers
    // (warp w issues on scheduler w % 4), and each scheduler's four warps do 9 k-steps of products
    const int slot = (warp % 4) * (WARPS / 4) + warp / 4;
    const int ks0 = n_ks * slot / WARPS, ks1 = n_ks * (slot + 1) / WARPS;
    uint32_t qa[KC][3][4];  // its queries' three parts there, A fragments
    float acc[NT][4];
    // this lane's ldmatrix row addresses (element offsets in a tile): the scores' x4 (rows r, columns k0 + c)
    // and the values' x4.trans (rows kr + r, columns c0 + c)
    const int sc_off = ((lane & 7) + ((lane >> 4) << 3)) * S + ((lane >> 3) & 1) * 8;
    const int v_off = ((lane & 7) + ((lane >> 3) & 1) * 8) * S + (lane >> 4) * 8;
    const int p_off = (lane & 15) * DEC7_PS + (lane >> 4) * 8;  // P's x4: rows (heads) lane % 16, columns + 8 (lane / 16)

    auto refill = [&](int k) {  // tile k + STAGES - 1 into the buffer of tile k - 1, and a group for it
        if (k + STAGES - 1 < n) {
            int tn = t_beg + k + STAGES - 1;
            while (tile_start[lb + 1] <= tn) lb++;
            dec_load_tile(tiles + ((k + STAGES - 1) % STAGES) * MLA_TILE * S, pool, tables, max_blocks, seq_of[lb],
                          tn - tile_start[lb], lens[lb], W, S);
        }
        cp_async_commit();
    };
    auto segment_start = [&]() {  // sequence cb's queries split in three, fresh o
        const float *qb = q_lat + ((size_t)cb * H + h0) * W;
        #pragma unroll
        for (int i = 0; i < KC; i++)
            #pragma unroll
            for (int half = 0; half < 2; half++) {  // a[0], a[1]: columns 2t, 2t + 1; a[2], a[3]: + 8
                int col = 16 * (ks0 + i) + 8 * half + 2 * t;
                bool ok = ks0 + i < ks1 && col < W;  // zeros past W: the tile's padding is zeros too
                float2 x = ok && g < nh ? *(const float2 *)(qb + (size_t)g * W + col) : make_float2(0.0f, 0.0f);
                float2 y = ok && g + 8 < nh ? *(const float2 *)(qb + (size_t)(g + 8) * W + col) : make_float2(0.0f, 0.0f);
                uint32_t px[3], py[3];
                split3_bf16x2(x.x, x.y, px);
                split3_bf16x2(y.x, y.y, py);
                #pragma unroll
                for (int p = 0; p < 3; p++) { qa[i][p][2 * half] = px[p]; qa[i][p][2 * half + 1] = py[p]; }
            }
        #pragma unroll
        for (int j = 0; j < NT; j++) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
    };
    auto scores = [&](int k) {  // 1. partial scores of tile k over this warp's k-steps -> s_part
        const bf16 *tile = tiles + (k % STAGES) * MLA_TILE * S;
        float sc[4][4];  // rows 8 nn + .. of the tile
        #pragma unroll
        for (int nn = 0; nn < 4; nn++) sc[nn][0] = sc[nn][1] = sc[nn][2] = sc[nn][3] = 0.0f;
        #pragma unroll
        for (int i = 0; i < KC; i++) {
            if (ks0 + i >= ks1) break;
            #pragma unroll
            for (int rh = 0; rh < 2; rh++) {  // tile rows 16 rh .. 16 rh + 15: n-tiles 2 rh and 2 rh + 1
                uint32_t b[4];
                ldmatrix_x4(b, tile + 16 * rh * S + 16 * (ks0 + i) + sc_off);
                #pragma unroll
                for (int p = 2; p >= 0; p--) {  // the small parts first
                    mma_bf16(sc[2 * rh], qa[i][p][0], qa[i][p][1], qa[i][p][2], qa[i][p][3], b[0], b[1]);
                    mma_bf16(sc[2 * rh + 1], qa[i][p][0], qa[i][p][1], qa[i][p][2], qa[i][p][3], b[2], b[3]);
                }
            }
        }
        float *sp = s_part + warp * MLA_HEADS * MLA_SP;  // d: heads g, g+8; rows 8nn + 2t, 8nn + 2t + 1
        #pragma unroll
        for (int nn = 0; nn < 4; nn++) {
            *(float2 *)(sp + g * MLA_SP + 8 * nn + 2 * t) = make_float2(sc[nn][0], sc[nn][1]);
            *(float2 *)(sp + (g + 8) * MLA_SP + 8 * nn + 2 * t) = make_float2(sc[nn][2], sc[nn][3]);
        }
    };
    auto softmax = [&](int k) {  // 2. online softmax of tile k: warp w takes heads HPW w .., lane = row; P in three parts
        int tau = t_beg + k, r0 = (tau - tile_start[cb]) * MLA_TILE, len = lens[cb];  // the tile's first row in cb
        bool first = k == 0 || tau == tile_start[cb];  // a segment's first tile: no m, l before it
        #pragma unroll
        for (int kk = 0; kk < HPW; kk++) {
            int h = HPW * warp + kk;
            bool ok = r0 + lane < len;
            float s = 0.0f;
            #pragma unroll
            for (int w = 0; w < WARPS; w++) s += s_part[(w * MLA_HEADS + h) * MLA_SP + lane];
            s = ok ? s * scale : -INFINITY;
            float m_old = first ? -INFINITY : m_s[h], m_new = fmaxf(m_old, warp_max(s));  // finite: row r0 < len
            float p = ok ? expf(s - m_new) : 0.0f;
            float sum = warp_sum(p);
            #pragma unroll
            for (int i = 0; i < 3; i++) {  // p = p1 + p2 + p3 (split3)
                bf16 part = __float2bfloat16_rn(p);
                p_s[(i * MLA_HEADS + h) * DEC7_PS + lane] = part;
                p -= __bfloat162float(part);
            }
            __syncwarp();  // every lane has read m_s[h] before lane 0 overwrites it
            if (lane == 0) {
                float a = expf(m_old - m_new);  // 0 on a segment's first tile (m_old = -inf)
                a_s[h] = a; l_s[h] = (first ? 0.0f : l_s[h]) * a + sum; m_s[h] = m_new;
            }
        }
    };
    auto values = [&](int k) {  // 3. o_latent (16 x d_c) = a o_latent + P (16 x 32) . tile (32 x d_c), n-tiles warp NT + j
        const bf16 *tile = tiles + (k % STAGES) * MLA_TILE * S;
        float pv[NT][4];  // this tile's P . V (fresh accumulators: see mla_decode_kernel)
        #pragma unroll
        for (int j = 0; j < NT; j++) pv[j][0] = pv[j][1] = pv[j][2] = pv[j][3] = 0.0f;
        #pragma unroll
        for (int kr = 0; kr < MLA_TILE; kr += 16) {
            uint32_t pa[3][4];
            #pragma unroll
            for (int p = 0; p < 3; p++) ldmatrix_x4(pa[p], p_s + p * MLA_HEADS * DEC7_PS + kr + p_off);
            #pragma unroll
            for (int j = 0; j < NT; j += 2) {
                int c0 = 8 * (warp * NT + j);
                if (c0 < d_c) {
                    uint32_t b[4];
                    ldmatrix_x4_trans(b, tile + kr * S + c0 + v_off);
                    #pragma unroll
                    for (int p = 2; p >= 0; p--) {
                        mma_bf16(pv[j], pa[p][0], pa[p][1], pa[p][2], pa[p][3], b[0], b[1]);
                        mma_bf16(pv[j + 1], pa[p][0], pa[p][1], pa[p][2], pa[p][3], b[2], b[3]);
                    }
                }
            }
        }
        float sa = a_s[g], sb = a_s[g + 8];
        #pragma unroll
        for (int j = 0; j < NT; j++) {
            acc[j][0] = acc[j][0] * sa + pv[j][0]; acc[j][1] = acc[j][1] * sa + pv[j][1];
            acc[j][2] = acc[j][2] * sb + pv[j][2]; acc[j][3] = acc[j][3] * sb + pv[j][3];
        }
    };
    auto write_out = [&](int k) {  // after tile k: at a segment's last tile, o / l (or the partial) out
        int tau = t_beg + k;
        if (k != n - 1 && tau + 1 != tile_start[cb + 1]) return;
        bool whole = tile_start[cb] >= t_beg && tile_start[cb + 1] <= t_end;
        float *dst = whole ? o_lat : part_o;
        size_t base = whole ? (size_t)cb * H + h0 : (size_t)(2 * ci + (tile_start[cb] < t_beg ? 0 : 1)) * H + h0;
        float ig = whole ? 1.0f / l_s[g] : 1.0f, ig8 = whole ? 1.0f / l_s[g + 8] : 1.0f;
        if (!whole && tid < nh) { part_ml[(base + tid) * 2] = m_s[tid]; part_ml[(base + tid) * 2 + 1] = l_s[tid]; }
        #pragma unroll
        for (int j = 0; j < NT; j++) {
            int c = 8 * (warp * NT + j) + 2 * t;
            if (c >= d_c) continue;
            if (g < nh) *(float2 *)(dst + (base + g) * d_c + c) = make_float2(acc[j][0] * ig, acc[j][1] * ig);
            if (g + 8 < nh) *(float2 *)(dst + (base + g + 8) * d_c + c) = make_float2(acc[j][2] * ig8, acc[j][3] * ig8);
        }
    };
    auto next_segment = [&](int k) {  // before tile k: a new segment starts there -> cb, its queries
        int tau = t_beg + k;
        if (k == 0 || tau >= tile_start[cb + 1]) {
            while (tile_start[cb + 1] <= tau) cb++;
            segment_start();
        }
    };

    if constexpr (!OVERLAP) {
        for (int k = 0; k < n; k++) {
            cp_async_wait<STAGES - 2>();  // tile k has landed (this thread's pieces) ...
            __syncthreads();              // ... everyone's, and every warp is done with tile k - 1's buffer
            refill(k);
            next_segment(k);
            scores(k);
            __syncthreads();
            softmax(k);
            __syncthreads();
            values(k);
            write_out(k);
        }
    } else {
        cp_async_wait<STAGES - 2>();  // tile 0
        __syncthreads();
        next_segment(0);
        scores(0);
        for (int k = 0; k < n; k++) {
            __syncthreads();  // tile k's partial scores are in; every warp is done with tile k - 1 (its buffer, P, a)
            refill(k);
            softmax(k);
            cp_async_wait<STAGES - 2>();  // tile k + 1 has landed (this thread's pieces) ...
            __syncthreads();              // ... everyone's; P, a, m, l of tile k are in; s_part is free
            values(k);
            write_out(k);
            if (k + 1 < n) {
                next_segment(k + 1);
                scores(k + 1);
            }
        }
    }
}

// The log-sum-exp merge (dsv2_mla.cuh, above mla_chunk) of the sequences cut by chunk boundaries.
// Block (h, i) merges the cut sequence b that begins in chunk i (its slot 1 there) and goes on in
// chunks i+1 .. last (slot 0 in each; empty chunks in between are skipped):
//   o_lat[b][h] = sum_p e^(m_p - M) o_p / sum_p e^(m_p - M) l_p,  M = max_p m_p.
// Its first warp computes the weights into shared memory (N + 1 floats), then each thread takes
// latent columns c, c + 256, ... Blocks of chunks with no such sequence return at once.
__global__ void mla_decode_combine_kernel(float *o_lat, const float *part_o, const float *part_ml, const int *tile_start,
                                          int B, int H, int d_c) {
    pdl_launch_next();
    pdl_wait();
    extern __shared__ float dec_wgt[];
    int h = blockIdx.x, ci = blockIdx.y, N = gridDim.y;
    int n_all = tile_start[B], t_beg = dec_chunk_start(ci, n_all, N), t_end = dec_chunk_start(ci + 1, n_all, N);
    if (t_beg >= t_end) return;
    int b = dec_seq_of(tile_start, B, t_end - 1);
    if (tile_start[b] < t_beg || tile_start[b + 1] <= t_end) return;  // no sequence begins here and goes on
    int n_p = dec_chunk_of(tile_start[b + 1] - 1, n_all, N) - ci + 1;  // chunks ci .. last
    if (threadIdx.x < 32) {
        float M = -INFINITY, L = 0.0f;
        for (int p = threadIdx.x; p < n_p; p += 32) {
            int c = ci + p;
            bool empty = dec_chunk_start(c, n_all, N) == dec_chunk_start(c + 1, n_all, N);
            if (!empty) M = fmaxf(M, part_ml[((size_t)(2 * c + (p == 0)) * H + h) * 2]);
        }
        M = warp_max(M);
        for (int p = threadIdx.x; p < n_p; p += 32) {
            int c = ci + p;
            bool empty = dec_chunk_start(c, n_all, N) == dec_chunk_start(c + 1, n_all, N);
            const float *ml = part_ml + ((size_t)(2 * c + (p == 0)) * H + h) * 2;
            dec_wgt[p] = empty ? 0.0f : expf(ml[0] - M);
            if (!empty) L += dec_wgt[p] * ml[1];
        }
        L = warp_sum(L);
        __syncwarp();
        for (int p = threadIdx.x; p < n_p; p += 32) dec_wgt[p] /= L;
    }
    __syncthreads();
    for (int c = threadIdx.x; c < d_c; c += blockDim.x) {
        float o = 0.0f;
        for (int p = 0; p < n_p; p++)  // a weight of 0: an empty chunk (nothing written there) or an underflow
            if (dec_wgt[p] != 0.0f) o += dec_wgt[p] * part_o[((size_t)(2 * (ci + p) + (p == 0)) * H + h) * d_c + c];
        o_lat[((size_t)b * H + h) * d_c + c] = o;
    }
}

// ---------------- MHA over the paged expanded cache (--kv-layout mha): the naive form, cached
//
// Row layout (one token, H heads): [k_0 | ... | k_{H-1} | v_0 | ... | v_{H-1}], k_h = [k^C_h ; k^R]
// (qk = nope + rope values), v_h (vdim values). Head h's attention is dsv2.c's mla_attend_naive:
//   s_j = scale * q_h . k_h,j,  o_h = sum_j softmax(s)_j v_h,j      (eqs. 16-18, the query not absorbed)
// Each cache value is used by one head for one multiply-add: bandwidth-bound, so CUDA cores, float32
// accumulation, and the work is to read the bytes fast: 16-byte cp.async pieces, two tiles in flight,
// enough blocks. Splits: mla_attention_kernel's rule (mla_chunk) and its merge, mla_combine_kernel.
#define MHA_THREADS 128
#define MHA_VC 2  // value columns per thread: v_head_dim <= 2 * MHA_THREADS

// shared memory of mha_decode_kernel: two (K tile, V tile) pairs, the query, the scores
template <typename T> static size_t mha_smem_bytes(int qk, int vdim) {
    int SK = dec_stride<T>(qk), SV = ceil_div(vdim * (int)sizeof(T), 16) * 16 / (int)sizeof(T);
    return 2 * (size_t)MLA_TILE * (SK + SV) * sizeof(T) + (size_t)(qk + MLA_TILE + 4) * 4;
}

// Head blockIdx.y of query blockIdx.z over rows [split * chunk, + chunk) of its sequence, split = blockIdx.x.
// In:  q (B, H, qk) float32 = [q^C_h ; RoPE(q^R_h)]; pool (n_blocks, KV_BLOCK, H (qk + vdim)) of T.
// Out: part_o (B, n_split, H, vdim) unnormalised o, part_ml (B, n_split, H, 2) = (m, l) (mla_combine_kernel's).
// One block of 4 warps, per 32-row tile (K and V of this head in shared memory, row stride padded as
// dec_stride):
//   scores: thread (row r = tid / 4, quarter u = tid % 4) sums its 8-byte pieces u, u + 4, ... of
//           q . k_r (two shuffles add the quarters), row r's score goes to shared memory;
//   softmax: every warp computes the same online-softmax update (lane = row), so m, l and p stay in
//           registers and no second barrier is needed;
//   values:  thread c keeps o[c] (and o[c + 128]), o = a o + sum_r p_r v_r[c], p_r shuffled from lane r.
// Where a head's K or V is not a whole number of 16-byte pieces (the test fixtures), the tile is loaded
// element by element instead.
template <typename T>
__global__ void __launch_bounds__(MHA_THREADS)
mha_decode_kernel(float *part_o, float *part_ml, const float *q, const T *pool, const int *tables, int max_blocks,
                  const int *seq_of, const int *lens, int H, int qk, int vdim, int n_split, float scale) {
    pdl_launch_next();
    pdl_wait();
    constexpr int VPL = 8 / sizeof(T);  // values per 8-byte piece
    int split = blockIdx.x, h = blockIdx.y, b = blockIdx.z, tid = threadIdx.x, lane = tid & 31;
    int len = lens[b], chunk = mla_chunk(len, n_split), start = split * chunk, end = min(start + chunk, len);
    if (start >= end) return;  // past the end: mla_combine_kernel counts only the splits that ran
    const int SK = dec_stride<T>(qk), SV = ceil_div(vdim * (int)sizeof(T), 16) * 16 / (int)sizeof(T);
    const int R = H * (qk + vdim), kp = qk * (int)sizeof(T) / 16, vp = vdim * (int)sizeof(T) / 16;
    const bool vec = qk * sizeof(T) % 16 == 0 && vdim * sizeof(T) % 16 == 0;
    extern __shared__ float4 mha_smem[];
    T *kt = (T *)mha_smem, *vt = kt + 2 * MLA_TILE * SK;           // 2 x (32, SK) keys, 2 x (32, SV) values
    float *q_s = (float *)(vt + 2 * MLA_TILE * SV), *sc = q_s + qk;  // the query (qk), the scores (32)
    const int slot = seq_of[b];
    // rows [t0, t0 + 32) into buffer `buf` (inside one page: chunks are whole tiles); zeros past `end`
    auto load = [&](int t0, int buf) {
        const T *rows = pool + ((size_t)tables[(size_t)slot * max_blocks + t0 / KV_BLOCK] * KV_BLOCK + t0 % KV_BLOCK) * R;
        T *kd = kt + buf * MLA_TILE * SK, *vd = vt + buf * MLA_TILE * SV;
        if (vec) {
            for (int c = tid; c < MLA_TILE * (kp + vp); c += MHA_THREADS) {
                int r = c / (kp + vp), k = c - r * (kp + vp);
                bool ok = t0 + r < end;
                const T *src = rows + (size_t)r * R + (k < kp ? h * qk + 16 / sizeof(T) * k : H * qk + h * vdim + 16 / sizeof(T) * (k - kp));
                T *dst = k < kp ? kd + r * SK + 16 / sizeof(T) * k : vd + r * SV + 16 / sizeof(T) * (k - kp);
                cp_async16(dst, ok ? src : rows, ok ? 16 : 0);
            }
        } else {
            for (int c = tid; c < MLA_TILE * (qk + vdim); c += MHA_THREADS) {
                int r = c / (qk + vdim), k = c - r * (qk + vdim);
                T v = t0 + r < end ? rows[(size_t)r * R + (k < qk ? h * qk + k : H * qk + h * vdim + k - qk)] : T(0.0f);
                if (k < qk) kd[r * SK + k] = v; else vd[r * SV + k - qk] = v;
            }
        }
        cp_async_commit();
    };
    for (int i = tid; i < qk; i += MHA_THREADS) q_s[i] = q[((size_t)b * H + h) * qk + i];
    int n_tiles = (end - start + MLA_TILE - 1) / MLA_TILE;
    load(start, 0);
    float m = -INFINITY, l = 0.0f, o[MHA_VC] = {0.0f, 0.0f};
    int r = tid >> 2, u0 = tid & 3, n_units = qk / VPL;
    for (int it = 0; it < n_tiles; it++) {
        int t0 = start + it * MLA_TILE;
        cp_async_wait<0>();  // tile it has landed (this thread's pieces) ...
        __syncthreads();     // ... everyone's (and q_s); every warp is done with tile it - 1, its buffer and sc
        // the next tile comes while this one is used. Its buffer held tile it - 1: issued before the barrier,
        // the copy raced with slower warps still reading it (bf16 outputs off by 5e-2 under compute-sanitizer)
        if (it + 1 < n_tiles) load(t0 + MLA_TILE, (it + 1) & 1);
        const T *kd = kt + (it & 1) * MLA_TILE * SK, *vd = vt + (it & 1) * MLA_TILE * SV;
        {   // scores: thread (r, u0), 8-byte pieces u0, u0 + 4, ...
            float s = 0.0f;
            for (int u = u0; u < n_units; u += 4) {
                if constexpr (sizeof(T) == 4) {
                    float2 k2 = *(const float2 *)(kd + r * SK + 2 * u);
                    s += k2.x * q_s[2 * u] + k2.y * q_s[2 * u + 1];
                } else {
                    uint2 w = *(const uint2 *)(kd + r * SK + 4 * u);
                    float2 a = bf16x2_to_float2(w.x), c = bf16x2_to_float2(w.y);
                    float4 qv = *(const float4 *)(q_s + 4 * u);
                    s += a.x * qv.x + a.y * qv.y + c.x * qv.z + c.y * qv.w;
                }
            }
            s += __shfl_xor_sync(0xffffffffu, s, 1);
            s += __shfl_xor_sync(0xffffffffu, s, 2);
            if (u0 == 0) sc[r] = t0 + r < end ? s * scale : -INFINITY;
        }
        __syncthreads();
        float s = sc[lane], m_new = fmaxf(m, warp_max(s));  // finite: row t0 < end
        float p = expf(s - m_new), a = expf(m - m_new);       // p = 0 past the end; a = 0 on the first tile
        l = l * a + warp_sum(p);
        m = m_new;
        #pragma unroll
        for (int cc = 0; cc < MHA_VC; cc++) o[cc] *= a;
        int rows = min(MLA_TILE, end - t0);
        for (int j = 0; j < rows; j++) {
            float pj = __shfl_sync(0xffffffffu, p, j);
            #pragma unroll
            for (int cc = 0; cc < MHA_VC; cc++) {
                int c = tid + MHA_THREADS * cc;
                if (c < vdim) o[cc] += pj * (float)vd[j * SV + c];
            }
        }
    }
    size_t pb = ((size_t)b * n_split + split) * H + h;
    #pragma unroll
    for (int cc = 0; cc < MHA_VC; cc++)
        if (tid + MHA_THREADS * cc < vdim) part_o[pb * vdim + tid + MHA_THREADS * cc] = o[cc];
    if (tid == 0) { part_ml[pb * 2] = m; part_ml[pb * 2 + 1] = l; }
}

// splits of mha_decode_kernel for B queries: about 8 waves of blocks (few waves leave the last one
// half empty), at least one 32-row tile each; at most the tiles of the longest context
static int mha_splits(int B, int H, int max_len, int blocks_per_wave) {
    return std::max(1, std::min(ceil_div(max_len, MLA_TILE), ceil_div(8L * blocks_per_wave, (long)B * H)));
}

#ifndef MLA_DECODE_KERNELS_ONLY
// ---------------- Host side: scratch, launches (gpu.stream, PDL; capturable in a CUDA graph)

// Which latent kernel reads a bf16 cache: 6 (mla_decode_kernel, tf32) or 7 (mla_decode_kernel_v7, bf16
// products, the overlapped phases); the environment variable DSV2_MLA_VERSION = 6, 7 or 7s (version 7 with
// the three phases in series) overrides it at attn_decode_init. A float32 cache always takes version 6.
// `./dsv2cu --bench-attn` checks and times all three.
#define MLA_DECODE_DEFAULT_VERSION 7

static struct {
    int max_B, max_len, n_chunk, mha_wave, mha_parts_max;
    int mla_version, v7_serial;  // the kernel for a bf16 latent cache: 6, 7 (v7_serial 0) or 7s (v7_serial 1)
    int *tile_start;          // (max_B + 1) the plan
    float *part_o, *part_ml;  // partials of both layouts: max of 2 N x H x d_c and the MHA splits'
} dec;

// scratch for split partials sized for max_B queries and contexts up to max_len (call once in setup)
static void attn_decode_init(const Config *c, int max_B, int max_len) {
    mla_config_check(c);
    int H = c->n_heads, d_c = c->kv_lora_rank, vdim = c->v_head_dim, qk = c->qk_nope_head_dim + c->qk_rope_head_dim;
    if (vdim > MHA_VC * MHA_THREADS || c->qk_nope_head_dim % 2 || c->qk_rope_head_dim % 2 || qk % 4)
        die("dsv2cu: v_head_dim %d / qk head dim %d not supported by the MHA-layout attention (v_head_dim <= %d, even parts, "
            "qk a multiple of 4)", vdim, qk, MHA_VC * MHA_THREADS);
    if (dec.tile_start) {  // a second call (the benchmark, another shape): new scratch
        cudaCheck(cudaFree(dec.tile_start)); cudaCheck(cudaFree(dec.part_o)); cudaCheck(cudaFree(dec.part_ml));
    }
    dec.max_B = max_B; dec.max_len = max_len;
    const char *version = getenv("DSV2_MLA_VERSION");
    dec.mla_version = MLA_DECODE_DEFAULT_VERSION;
    dec.v7_serial = 0;
    if (version) {
        if (strcmp(version, "6") && strcmp(version, "7") && strcmp(version, "7s"))
            die("dsv2cu: DSV2_MLA_VERSION=%s: expected 6, 7 or 7s", version);
        dec.mla_version = version[0] - '0';
        dec.v7_serial = version[1] == 's';
    }
    dec.n_chunk = gpu.n_sm;  // one chunk of the balanced MLA split per multiprocessor
    size_t smem[4] = {dec_smem_bytes<float, 2, DEC_WARPS>(gpu.W), dec_smem_bytes<bf16, 4, DEC_WARPS>(gpu.W), mha_smem_bytes<float>(qk, vdim),
                      mha_smem_bytes<bf16>(qk, vdim)};
    cudaCheck(cudaFuncSetAttribute(mla_decode_kernel<float, 2, DEC_WARPS>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem[0]));
    cudaCheck(cudaFuncSetAttribute(mla_decode_kernel<bf16, 4, DEC_WARPS>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem[1]));
    cudaCheck(cudaFuncSetAttribute(mla_decode_kernel_v7<DEC7_STAGES, DEC7_WARPS, true>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                   (int)dec7_smem_bytes<DEC7_STAGES, DEC7_WARPS>(gpu.W)));
    cudaCheck(cudaFuncSetAttribute(mla_decode_kernel_v7<DEC7_STAGES, DEC7_WARPS, false>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                   (int)dec7_smem_bytes<DEC7_STAGES, DEC7_WARPS>(gpu.W)));
    cudaCheck(cudaFuncSetAttribute(mha_decode_kernel<float>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem[2]));
    cudaCheck(cudaFuncSetAttribute(mha_decode_kernel<bf16>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem[3]));
    // the MHA splits follow the smaller wave (float32), so one scratch size serves both element types
    dec.mha_wave = std::min(one_wave(mha_decode_kernel<float>, MHA_THREADS, smem[2]), one_wave(mha_decode_kernel<bf16>, MHA_THREADS, smem[3]));
    size_t mha_parts = 0;
    for (int b = 1; b <= max_B; b++) mha_parts = std::max(mha_parts, (size_t)b * mha_splits(b, H, max_len, dec.mha_wave) * H * vdim);
    size_t mla_parts = (size_t)2 * dec.n_chunk * H * d_c;
    dec.tile_start = dev_ints(max_B + 1);
    dec.part_o = dev_floats(std::max(mha_parts, mla_parts));
    dec.part_ml = dev_floats(std::max(mha_parts / vdim, (size_t)2 * dec.n_chunk * H) * 2);
}

// latent layout: o_lat (B, H, d_c) float32 = softmax(scale * q_lat . rows^T) . rows[:, :d_c]
// q_lat (B, H, W) float32 (absorbed query, from mla_prep), pool_l = layer's pool (float or bf16 per kv_bf16)
static void mla_decode_forward(float *o_lat, const float *q_lat, const void *pool_l, int kv_bf16,
                               const int *tables, int max_blocks, const int *seq_of, const int *lens, int B) {
    const Config *c = &gpu.c;
    int H = c->n_heads, W = gpu.W, d_c = c->kv_lora_rank, N = dec.n_chunk;
    if (B > dec.max_B) die("dsv2cu: mla_decode_forward: %d queries, scratch for %d (attn_decode_init)", B, dec.max_B);
    launch(mla_decode_plan_kernel, 1, 1024, 0, dec.tile_start, lens, B);
    dim3 grid(ceil_div(H, MLA_HEADS), N);
    if (kv_bf16 && dec.mla_version == 7)
        launch(dec.v7_serial ? mla_decode_kernel_v7<DEC7_STAGES, DEC7_WARPS, false> : mla_decode_kernel_v7<DEC7_STAGES, DEC7_WARPS, true>, grid, DEC7_WARPS * 32, dec7_smem_bytes<DEC7_STAGES, DEC7_WARPS>(W), o_lat,
               dec.part_o, dec.part_ml, q_lat, (const bf16 *)pool_l, tables, max_blocks, seq_of, lens, (const int *)dec.tile_start,
               B, H, W, d_c, gpu.softmax_scale);
    else if (kv_bf16)
        launch(mla_decode_kernel<bf16, 4, DEC_WARPS>, grid, DEC_WARPS * 32, dec_smem_bytes<bf16, 4, DEC_WARPS>(W), o_lat, dec.part_o, dec.part_ml,
               q_lat, (const bf16 *)pool_l, tables, max_blocks, seq_of, lens, (const int *)dec.tile_start, B, H, W, d_c,
               gpu.softmax_scale);
    else
        launch(mla_decode_kernel<float, 2, DEC_WARPS>, grid, DEC_WARPS * 32, dec_smem_bytes<float, 2, DEC_WARPS>(W), o_lat, dec.part_o,
               dec.part_ml, q_lat, (const float *)pool_l, tables, max_blocks, seq_of, lens, (const int *)dec.tile_start, B,
               H, W, d_c, gpu.softmax_scale);
    launch(mla_decode_combine_kernel, dim3(H, N), 256, (size_t)(N + 4) * sizeof(float), o_lat, (const float *)dec.part_o,
           (const float *)dec.part_ml, (const int *)dec.tile_start, B, H, d_c);
}

// mha layout: o (B, H, vdim) float32; q (B, H, nope + rope) float32 = [q^C_h ; RoPE(q^R_h)]
static void mha_decode_forward(float *o, const float *q, const void *pool_l, int kv_bf16,
                               const int *tables, int max_blocks, const int *seq_of, const int *lens, int B) {
    const Config *c = &gpu.c;
    int H = c->n_heads, vdim = c->v_head_dim, qk = c->qk_nope_head_dim + c->qk_rope_head_dim;
    if (B > dec.max_B) die("dsv2cu: mha_decode_forward: %d queries, scratch for %d (attn_decode_init)", B, dec.max_B);
    int n_split = mha_splits(B, H, dec.max_len, dec.mha_wave);
    dim3 grid(n_split, H, B);
    if (kv_bf16)
        launch(mha_decode_kernel<bf16>, grid, MHA_THREADS, mha_smem_bytes<bf16>(qk, vdim), dec.part_o, dec.part_ml, q,
               (const bf16 *)pool_l, tables, max_blocks, seq_of, lens, H, qk, vdim, n_split, gpu.softmax_scale);
    else
        launch(mha_decode_kernel<float>, grid, MHA_THREADS, mha_smem_bytes<float>(qk, vdim), dec.part_o, dec.part_ml, q,
               (const float *)pool_l, tables, max_blocks, seq_of, lens, H, qk, vdim, n_split, gpu.softmax_scale);
    mla_combine_forward(o, dec.part_o, dec.part_ml, lens, NULL, 0, B, H, vdim, n_split);
}
#endif
