// dsv2_mla.cuh: Multi-head Latent Attention on the GPU (paper eqs. 9-19 in the absorbed form of
// Appendix C), the kernels of dsv2.c's mla_attention after its projections (those are matvec_kernel):
//   mla_prep_kernel       the absorbed query, the query's RoPE and the token's cache row (eqs. 9, 14, 15)
//   mla_attention_kernel  softmax(q_lat . cache^T) . cache over one split of the cache (eqs. 16-18)
//   mla_combine_kernel    the splits merged (log-sum-exp)
//   v_up_kernel           W^UV after the sum (eq. 11 absorbed), decode only
// Shapes: H heads, latent d_c = kv_lora_rank, rotary d_h^R = qk_rope_head_dim, cache row width
// W = d_c + d_h^R; q^C is nope = qk_nope_head_dim wide, a value vdim = v_head_dim.
// dev/cuda/mla_attention.cu rebuilds mla_attention_kernel step by step from dsv2.c's loop.
#define MLA_HEADS 16      // heads per block of the attention kernel: the M = 16 of the tensor-core products
#define MLA_TILE 32       // cache rows per shared-memory tile
#define MLA_WARPS 8
#define MLA_NT 8          // 8-column tiles of the latent per warp: kv_lora_rank <= 8 * MLA_NT * MLA_WARPS = 512
#define ABS_COLS 64       // latent columns per block of the absorbed query

// this position's RoPE angle i, as dsv2.c's rope_position: cos/sin of (float)pos * inv_freq[i], times mscale
__device__ __forceinline__ void rope_cos_sin(int pos, const float *inv_freq, int i, float mscale, float *cs, float *sn) {
    float angle = (float)pos * inv_freq[i];
    *cs = (float)cos((double)angle) * mscale;
    *sn = (float)sin((double)angle) * mscale;
}
// dsv2.c's rope_apply on one vector, by the whole block (one thread per rotated pair): out[2i], out[2i+1] =
// the pair in[2i], in[2i+1] rotated by this position's angle i (rope_cos_sin). out may be in.
__device__ __forceinline__ void rope_block(float *out, const float *in, int rope, int pos, const float *inv_freq, float mscale) {
    for (int i = threadIdx.x; i < rope / 2; i += blockDim.x) {
        float cs, sn, x0 = in[2 * i], x1 = in[2 * i + 1];
        rope_cos_sin(pos, inv_freq, i, mscale, &cs, &sn);
        out[2 * i] = x0 * cs - x1 * sn;
        out[2 * i + 1] = x0 * sn + x1 * cs;
    }
}

// Everything MLA needs between the projections and the attention, for T tokens: the lines of dsv2.c's
// mla_attention that apply rope_apply to q (eq. 14), rmsnorm + rope_apply into the cache row (eqs. 9,
// 15), and matmul_rows_t (W^UK_i absorbed into the query, Appendix C). Three independent jobs, so one
// launch does all three, each block taking one by its blockIdx.x (token t = blockIdx.y, at pos0 + t):
//   blocks [0, H*CT)         q_lat[t][h][c] = (W^UK_h^T q_t,h^C)[c] for one strip of ABS_COLS latent
//                            columns c (CT strips per head); CT = 0 skips this job (the prefill does
//                            it as one batched product, gemm_bf16)
//   blocks [H*CT, H*CT + H)  q_lat[t][h][d_c + i] = RoPE(q_t,h^R)[i]                       eq. (14)
//   block H*CT + H           cache[pos] = [RMSNorm(c_t^KV) ; RoPE(k_t^R)]                    eqs. (9), (15)
// In:  q (T, H, nope + d_h^R) = [q^C ; q^R] per head (eq. 13's output), kv_a (T, W) = [W^DKV h ; W^KR h],
//      kv_b = kv_b_proj (H, nope + vdim, d_c) bf16, whose first nope rows per head are W^UK_h.
// Out: q_lat (T, H, W), and one cache row (W) per token. After this, head h's score with cache row j
// is the single dot product q_lat[t][h] . cache[j] (eqs. 10, 16, 17 absorbed).
// Absorbed-query block (256 threads): thread (cg = tid % 8, kg = tid / 8) multiplies 8 latent columns
// (one 16-byte load of W^UK) by every 32nd q^C element from kg; the 32 partial sums per column are
// added in shared memory. RoPE blocks: one thread per rotated pair. Cache-row block: the whole block.
__global__ void mla_prep_kernel(float *q_lat, float *cache, const float *q, const float *kv_a, const bf16 *kv_b,
                                const float *kv_norm, const int *pos0, int CT, int H, int d_c, int nope, int rope,
                                int vdim, float eps, const float *inv_freq, float mscale) {
    pdl_launch_next();
    int blk = blockIdx.x, t = blockIdx.y, tid = threadIdx.x, W = d_c + rope;
    if (blk < H * CT) {
        __shared__ float red[32][ABS_COLS + 1];
        int h = blk / CT, c0 = (blk % CT) * ABS_COLS;
        const bf16 *wk = kv_b + (size_t)h * (nope + vdim) * d_c;  // W^UK_h (nope, d_c), row-major
        int cg = tid & 7, kg = tid >> 3, c = c0 + 8 * cg;
        // this thread's first 4 weight loads (k = kg, kg + 32, ..., all of V2's nope = 128) are issued before
        // pdl_wait: the weights depend on no earlier kernel, so their trip from memory overlaps its end
        uint4 wv[4];
        #pragma unroll
        for (int i = 0; i < 4; i++)
            if (c < d_c && kg + 32 * i < nope) wv[i] = __ldg((const uint4 *)(wk + (size_t)(kg + 32 * i) * d_c + c));
        pdl_wait();
        const float *qh = q + ((size_t)t * H + h) * (nope + rope);  // [q^C (nope) ; q^R (rope)], eq. (16)
        float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0}, qv[4];
        #pragma unroll
        for (int i = 0; i < 4; i++) qv[i] = kg + 32 * i < nope ? qh[kg + 32 * i] : 0.0f;  // all loads first
        if (c < d_c)
            for (int k = kg, i = 0; k < nope; k += 32, i++) {
                uint4 w = i < 4 ? wv[i] : __ldg((const uint4 *)(wk + (size_t)k * d_c + c));
                float qk = i < 4 ? qv[i] : qh[k];
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
        rope_block(q_lat + ((size_t)t * H + h) * W + d_c, qr, rope, pos, inv_freq, mscale);
        return;
    }
    const float *a = kv_a + (size_t)t * W;  // [W^DKV h ; W^KR h]
    float *row = cache + (size_t)pos * W;
    rmsnorm_block(row, a, kv_norm, d_c, eps);                                                          // eq. (9)
    rope_block(row + d_c, a + d_c, rope, pos, inv_freq, mscale);                                       // eq. (15)
}
static void mla_prep_forward(float *q_lat, float *cache, const float *q, const float *kv_a, const bf16 *kv_b,
                             const float *kv_norm, const int *pos0, int absorb, int T) {
    const Config *c = &gpu.c;
    int CT = absorb ? ceil_div(c->kv_lora_rank, ABS_COLS) : 0;
    launch(mla_prep_kernel, dim3(c->n_heads * (CT + 1) + 1, T), 256, 0, q_lat, cache, q, kv_a, kv_b, kv_norm, pos0, CT,
           c->n_heads, c->kv_lora_rank, c->qk_nope_head_dim, c->qk_rope_head_dim, c->v_head_dim, c->rms_norm_eps,
           (const float *)gpu.inv_freq, gpu.rope_mscale);
}

// ---------------- The attention (eqs. 16-18, absorbed), split over the cache
//
// dsv2.c's absorbed loop for head h at position t, with row j of the cache c_j = [c_j^KV ; k_j^R] (W):
//   s_j = scale * q_lat[h] . c_j   (j = 0..t),   p = softmax(s),   o_lat[h] = sum_j p_j c_j[0:d_c]
// reads the whole cache, and one token's cache is too small a job for one block at batch 1 and too
// large a walk for one block at long contexts. Two tricks make it parallel and single-pass:
//
// Online softmax (a block walks its rows in tiles): keep the running max m, the running sum
// l = sum_j e^(s_j - m) and the unnormalised o = sum_j e^(s_j - m) c_j; for each new tile,
//   m' = max(m, max_tile s_j),  a = e^(m - m'),  l' = a l + sum_tile e^(s_j - m'),  o' = a o + sum_tile e^(s_j - m') c_j.
// The rows are read once, and exp never overflows (every exponent is <= 0).
//
// Split-KV with a log-sum-exp merge: the cache rows [0, len) are cut into n_split chunks, each walked
// by its own block, which writes its partial (m_s, l_s, o_s). mla_combine_kernel then merges:
//   M = max_s m_s,  o_lat = sum_s e^(m_s - M) o_s / sum_s e^(m_s - M) l_s,
// exactly the softmax over all rows (each split's sums are rescaled to the common max M). So a
// single sequence spreads over every multiprocessor (decode: one split per multiprocessor).

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
// the merge's launch: blocks of 8 warps over (head, sequence, column strip); the split weights' shared memory
// rounded up to whole float4s (the compiler reads the weights several at a time, past the last one too:
// compute-sanitizer memcheck found a 12-byte read of the 4-byte allocation of one split, before this)
static void mla_combine_forward(float *o, const float *part_o, const float *part_ml, const int *lens, const int *pos0,
                                int len_offset, int B, int H, int d, int n_split) {
    launch(mla_combine_kernel, dim3(H, B, ceil_div(d, COMBINE_COLS)), 256, (size_t)ceil_div(n_split, 4) * 4 * sizeof(float),
           o, part_o, part_ml, lens, pos0, len_offset, H, d, n_split);
}

// the shapes mla_attention_kernel's fixed register tiles can hold
static void mla_config_check(const Config *c) {
    int W = c->kv_lora_rank + c->qk_rope_head_dim;
    if (c->kv_lora_rank % 8 || c->qk_rope_head_dim % 8 || c->kv_lora_rank > 8 * MLA_NT * MLA_WARPS || W > 8 * MLA_KS * MLA_WARPS)
        die("dsv2cu: kv_lora_rank %d / qk_rope_head_dim %d not supported on the GPU (multiples of 8, kv_lora_rank <= %d, "
            "their sum <= %d)", c->kv_lora_rank, c->qk_rope_head_dim, 8 * MLA_NT * MLA_WARPS, 8 * MLA_KS * MLA_WARPS);
}
// attention of B query sets (b = sequence or prefill query) -> o_lat (B, H, d_c): the splits, then the merge
static void mla_attention_forward(float *o_lat, const float *q_lat, const float *cache, size_t seq_stride,
                                  const int *lens, const int *pos0, int len_offset, int B, int n_split) {
    const Config *c = &gpu.c;
    int H = c->n_heads, W = gpu.W, d_c = c->kv_lora_rank;
    launch(mla_attention_kernel, dim3(n_split, B, ceil_div(H, MLA_HEADS)), MLA_WARPS * 32, mla_smem_bytes(W), gpu.part_o,
           gpu.part_ml, q_lat, cache, seq_stride, lens, pos0, len_offset, H, W, d_c, n_split, gpu.softmax_scale);
    mla_combine_forward(o_lat, gpu.part_o, gpu.part_ml, lens, pos0, len_offset, B, H, d_c, n_split);
}

// dsv2.c mla_attention's last matmul_rows: W^UV applied once per head, after the sum (eq. 11 absorbed),
//   o (H * vdim) : o[h * vdim + v] = W^UV_h[v, :] . o_lat[h]   with W^UV_h = rows nope.. of head h in kv_b_proj
// One warp per output value (warp_dot over d_c bf16 weights); 8 per block; grid row y = token y (the
// batch engine's few-token steps; the decode step has one). The prefill does it as one batched product.
__global__ void v_up_kernel(float *o, const float *o_lat, const bf16 *kv_b, int H, int d_c, int nope, int vdim) {
    pdl_launch_next();
    o += (size_t)blockIdx.y * H * vdim;
    o_lat += (size_t)blockIdx.y * H * d_c;
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

