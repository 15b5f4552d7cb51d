// dsv2_moe.cuh: DeepSeekMoE (paper eqs. 20-22) on the GPU: the router, and the decode step's two FFN
// kernels, dsv2.c's moe_route and moe_ffn (ffn for the shared experts and the dense layers).
// Shapes: dim = hidden size, E = n_routed_experts, K = n_experts_per_tok (K_r), mi =
// moe_intermediate_size; the shared experts are one FFN of width ws = N_s * mi (or the dense FFN,
// intermediate_size wide). The prefill's MoE is in dsv2_prefill.cuh and prefill_pass.

// ---------------- The router (eqs. 21-22)
// The affinities u^T e_i come from moe_router_kernel (decode) or the prefill's product; then one block per
// token takes dsv2.c's moe_route: softmax, the topk_group best groups (route_groups, device-limited
// routing), the top K_r experts. dsv2.c picks them one at a time, each the best of those left, lowest index
// on ties; that order is a sort by (score descending, index ascending), so here each expert finds its own
// place in it at once: its rank is the number of experts ahead of it, and the experts of rank < K are the
// picks, rank k the k-th. The same experts, in the same order, as the CPU, in one pass of the block.
// (Before: one warp picked them one at a time, each a warp-wide argmax. In the decode router's launch that
// took 6 us a layer, behind the streaming loads of the warps beside it; moved to moe_gate_up, the two
// versions cost the same. docs/BENCHMARKS.md, the third pass at issue 14.)
// expert i is ahead of expert j (a strict total order: NaN counts as -inf, so ranks never collide)
__device__ __forceinline__ bool route_ahead(float vi, int i, float vj, int j) {
    vi = isnan(vi) ? -INFINITY : vi; vj = isnan(vj) ? -INFINITY : vj;
    return vi > vj || (vi == vj && i < j);
}
// dsv2.c's moe_route for one token, by the whole block: logits (E, shared memory) -> pick, pick_w (K,
// shared memory): the chosen experts best first, and their weights g_i,t.
//   eq. (22) s_i = softmax_i(u^T e_i) (by the first warp); device-limited routing (method 1) leaves as
//   candidates only the experts of the topk_group best groups (a group's score is its best expert's), the
//   others -inf; eq. (21) the top K of the candidates, their weights s_i normalised (norm_topk_prob) or
//   scaled by routed_scaling_factor, as in dsv2.c.
// rs: 2 E + 2 n_group words of shared memory (scores, candidates, group_score, kept). Ends with a barrier.
__device__ void route_block(int *pick, float *pick_w, const float *logits, float *rs, int E, int K, int method,
                            int n_group, int topk_group, int norm_topk_prob, float routed_scaling) {
    float *scores = rs, *cand = rs + E, *group_score = cand + E;
    int *kept = (int *)(group_score + n_group);
    int tid = threadIdx.x, bd = blockDim.x;
    if (tid < 32) {  // eq. (22) s_i,t = softmax_i(u_t^T e_i)
        float max = -INFINITY, sum = 0.0f;
        for (int i = tid; i < E; i += 32) max = fmaxf(max, logits[i]);
        max = warp_max(max);
        for (int i = tid; i < E; i += 32) { scores[i] = expf(logits[i] - max); sum += scores[i]; }
        sum = warp_sum(sum);
        for (int i = tid; i < E; i += 32) cand[i] = scores[i] /= sum;
    }
    __syncthreads();
    if (method == 1) {  // group_limited_greedy: only the experts of the kept groups are candidates
        int per = E / n_group;
        for (int g = tid; g < n_group; g += bd) {
            group_score[g] = scores[g * per];
            for (int e = 1; e < per; e++) group_score[g] = fmaxf(group_score[g], scores[g * per + e]);
        }
        __syncthreads();
        for (int g = tid; g < n_group; g += bd) {
            int rank = 0;
            for (int h = 0; h < n_group; h++) rank += route_ahead(group_score[h], h, group_score[g], g);
            kept[g] = rank < topk_group;
        }
        __syncthreads();
        for (int i = tid; i < E; i += bd) if (!kept[i / per]) cand[i] = -INFINITY;
        __syncthreads();
    }
    for (int i = tid; i < E; i += bd) {  // eq. (21) g_i,t: the top K_r
        int rank = 0;
        for (int j = 0; j < E; j++) rank += route_ahead(cand[j], j, cand[i], i);
        if (rank < K) { pick[rank] = i; pick_w[rank] = scores[i]; }
    }
    __syncthreads();
    float wsum = 0.0f;  // in pick order, as dsv2.c adds them
    for (int k = 0; k < K; k++) wsum += pick_w[k];
    __syncthreads();  // every thread has read pick_w
    for (int k = tid; k < K; k += bd) pick_w[k] = norm_topk_prob && K > 1 ? pick_w[k] / (wsum + 1e-20f) : pick_w[k] * routed_scaling;
    __syncthreads();
}
// the prefill's router, eqs. (21)-(22) for T tokens: logits (T, E) -> topk_idx, topk_w (T, K).
// One block per token (route_block).
__global__ void moe_route_kernel(int *topk_idx, float *topk_w, const float *logits, int E, int K, int method,
                                 int n_group, int topk_group, int norm_topk_prob, float routed_scaling) {
    pdl_launch_next();
    pdl_wait();
    extern __shared__ float lg[];  // the token's logits (E), route_block's 2 E + 2 n_group words, the picks (2 K)
    float *rs = lg + E, *pick_w = rs + 2 * E + 2 * n_group;
    int *pick = (int *)(pick_w + K);
    size_t t = blockIdx.x;
    for (int i = threadIdx.x; i < E; i += blockDim.x) lg[i] = logits[t * E + i];
    __syncthreads();
    route_block(pick, pick_w, lg, rs, E, K, method, n_group, topk_group, norm_topk_prob, routed_scaling);
    for (int k = threadIdx.x; k < K; k += blockDim.x) { topk_idx[t * K + k] = pick[k]; topk_w[t * K + k] = pick_w[k]; }
}
// rows r = j0, j0 + stride, ... < n of the first half of an FFN (one warp a row, x in shared memory):
//   hb[r] = silu(Wg[r] . x) * (Wu[r] . x)      (the gate and up rows loaded together: warp_dot2)
__device__ void swiglu_rows(float *hb, const float *x, const bf16 *Wg, const bf16 *Wu, int n, int j0, int stride, int dim) {
    for (int r = j0; r < n; r += stride) {
        float gv, uv;
        warp_dot2(Wg + (size_t)r * dim, Wu + (size_t)r * dim, x, dim, &gv, &uv);
        if ((threadIdx.x & 31) == 0) hb[r] = silu_dev(gv) * uv;
    }
}
// The decode step's router launch, with the RMSNorm before the FFN fused (dsv2.c forward's
// rmsnorm(post_attention_layernorm)), and beside it the first half of the shared experts (they need the
// same normalised input and no routing):
//   xn_out (dim) = RMSNorm(x) * norm_w;  logits (E) = gate (E, dim) @ xn   (the affinities u^T e_i)
//   hbs (ws) = silu(Wsg @ xn) * (Wsu @ xn)   (swiglu_rows)
// Blocks [0, RB), RB = E / 8: the affinities, one expert a warp (warp_dot). Blocks RB..: the shared rows,
// row j to block j % nsb (nsb shared blocks), so every block has as many rows (+-1) and, the grid being one
// wave, every multiprocessor as many blocks. Each block (8 warps) stages xn in shared memory. The rows
// depend on no earlier kernel: before pdl_wait each warp copies its row pair into shared memory (pre: when
// a warp has at most one, V2-Lite, and the wave still fits), else prefetches its first into L2 (issue 14's
// seventh pass). The experts are picked from the affinities by the next kernel (moe_gate_up_kernel),
// eqs. (21)-(22).
// Why the shared experts are here: the routed experts must wait for the affinities, a chain of latencies
// (the norm, one row a warp), and the shared experts' 23 MB (V2-Lite) stream from memory meanwhile.
// (Measured otherwise, docs/BENCHMARKS.md, the third pass at issue 14: this launch also picked the experts,
// in one warp of block 0 after a cluster barrier, and that warp's pick took 6 us, the launch's whole tail;
// and with the shared rows in moe_gate_up instead, prefetched while this launch ran, the step was no faster.)
__global__ void moe_router_kernel(float *logits, const bf16 *gate, const float *x, const float *norm_w, float eps,
                                  float *xn_out, int dim, int E, int RB, float *hbs, const bf16 *Wsg, const bf16 *Wsu,
                                  int ws, int pre) {
    pdl_launch_next();
    extern __shared__ float xs[];  // xn (dim floats); with pre, then each warp's shared row pair (2 x 8 x dim bf16)
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if ((int)blockIdx.x >= RB) {  // the shared experts
        int nsb = (int)gridDim.x - RB, j0 = ((int)blockIdx.x - RB) + nsb * warp, stride = nsb * 8;
        const bf16 *g = j0 < ws ? Wsg + (size_t)j0 * dim : NULL, *u = j0 < ws ? Wsu + (size_t)j0 * dim : NULL;
        bf16 *gs = (bf16 *)(xs + dim) + (size_t)warp * 2 * dim, *us = gs + dim;  // with pre: this warp's row pair
        if (pre && g) {
            for (int i = 8 * lane; i < dim; i += 256) { cp_async16(gs + i, g + i, 16); cp_async16(us + i, u + i, 16); }
            cp_async_commit();
        } else if (g && lane == 0) {
            prefetch_l2(g, (size_t)dim * sizeof(bf16));
            prefetch_l2(u, (size_t)dim * sizeof(bf16));
        }
        pdl_wait();
        stage_vector(xs, x, norm_w, dim, eps);
        timeline_mark();  // xn staged
        if (pre) {
            cp_async_wait<0>();  // this lane's copies have landed
            __syncwarp();        // and the other lanes' of this warp
            if (g) {
                float gv, uv;
                warp_dot2<true>(gs, us, xs, dim, &gv, &uv);
                if (lane == 0) hbs[j0] = silu_dev(gv) * uv;
            }
            return;
        }
        swiglu_rows(hbs, xs, Wsg, Wsu, ws, j0, stride, dim);
        return;
    }
    int e = blockIdx.x * 8 + warp;  // this warp's expert
    if (e < E && lane == 0) prefetch_l2(gate + (size_t)e * dim, (size_t)dim * sizeof(bf16));
    pdl_wait();
    stage_vector(xs, x, norm_w, dim, eps);
    timeline_mark();  // xn staged
    if (blockIdx.x == 0)
        for (int i = threadIdx.x; i < dim; i += blockDim.x) xn_out[i] = xs[i];
    if (e >= E) return;
    float v = warp_dot(gate + (size_t)e * dim, xs, dim);
    if (lane == 0) logits[e] = v;
}
static void moe_route_forward(int *topk_idx, float *topk_w, const float *logits, int T) {
    const Config *c = &gpu.c;
    size_t smem = (3 * (size_t)c->n_routed_experts + 2 * c->n_group + 2 * c->n_experts_per_tok) * 4;
    launch(moe_route_kernel, T, 256, smem, topk_idx, topk_w, logits, c->n_routed_experts, c->n_experts_per_tok,
           c->topk_method, c->n_group, c->topk_group, c->norm_topk_prob, c->routed_scaling_factor);
}
// decode: x -> xn_out = RMSNorm(x), the affinities logits (E), and the shared experts' hbs, in one launch
static void moe_router_forward(float *logits, const GpuLayer *L, const float *x, float *xn_out, float *hbs) {
    const Config *c = &gpu.c;
    int E = c->n_routed_experts, RB = ceil_div(E, 8);
    size_t smem = (size_t)c->dim * 4;
    if (smem > STAGE_MAX_BYTES) die("dsv2cu: hidden size %d is too large for the GPU router", c->dim);
    static int wave = 0, wave_pre = 0;
    size_t pair_bytes = (size_t)8 * 2 * c->dim * sizeof(bf16);
    if (!wave) wave = one_wave(moe_router_kernel, 256, smem);
    if (!wave_pre && smem + pair_bytes <= STAGE_MAX_BYTES) wave_pre = one_wave(moe_router_kernel, 256, smem + pair_bytes);
    // more shared rows than 8 a multiprocessor: the rest of the wave (V2-Lite: 388 blocks of 7 or 8 rows)
    int want = ceil_div(L->ffn_width, 8), shared_blocks = want <= gpu.n_sm ? want : std::max(1, wave - RB);
    if (!L->ffn_width) shared_blocks = 0;
    // at most one row pair a warp, and with the pairs beside xn the grid is still one wave: the pairs go to
    // shared memory before the wait
    int pre = shared_blocks * 8 >= L->ffn_width && !(c->dim & 7) && smem + pair_bytes <= STAGE_MAX_BYTES &&
              wave_pre >= RB + shared_blocks;
    if (pre) smem += pair_bytes;
    launch(moe_router_kernel, RB + shared_blocks, 256, smem, logits, (const bf16 *)L->gate, x,
           (const float *)L->post_attention_layernorm, c->rms_norm_eps, xn_out, c->dim, E, RB, hbs,
           (const bf16 *)L->ffn_gate, (const bf16 *)L->ffn_up, L->ffn_width, pre);
}

// The first half of the routed experts' FFN_i of eq. (20) at decode (dsv2.c's ffn up to the SwiGLU, for the
// K routed experts of moe_ffn), reading only the chosen experts' rows; or of a dense layer's FFN (one
// "expert" of mi = intermediate_size rows, no routing). A MoE layer's shared experts run beside the router.
//   topk_idx, topk_w (K) = route(logits)                          eqs. (21)-(22), route_block
//   hb (K, mi):  hb[k][r] = silu(gate_e[r] . x) * (up_e[r] . x),  e = topk_idx[k]   (Wg, Wu (E, mi, dim))
// Every block picks the experts itself from the E affinities (route_block: the same picks in every block,
// the same code on the same numbers); block 0 writes them for moe_down. (In the router's launch, one warp's
// pick took 6 us a layer, the launch's tail; moved here the step is only 16 us shorter at context 512, and
// what this kernel's start now costs is measured by its timeline mark: docs/BENCHMARKS.md, third pass.)
// Work item j < K * mi is slot k = j / mi, row r = j % mi: one warp per item, the gate and up rows loaded
// together (warp_dot2, 16-byte loads). One block stages x (dim) in shared memory, its warps stride over
// the items. The grid is one wave of the GPU (no idle blocks, no partial last wave). A dense FFN's rows
// depend on no earlier kernel: each warp prefetches them into L2 before pdl_wait.
struct Routing {  // the pick of eqs. (21)-(22) (route_block's parameters); logits NULL: a dense FFN
    const float *logits;
    int *topk_idx; float *topk_w;
    int E, method, n_group, topk_group, norm_topk_prob;
    float routed_scaling;
};
__global__ void __launch_bounds__(256, 4) moe_gate_up_kernel(float *hb, const float *x, const bf16 *Wg, const bf16 *Wu,
                                                            Routing rt, int K, int mi, int dim) {
    pdl_launch_next();
    int warps = gridDim.x * (blockDim.x >> 5), lane = threadIdx.x & 31, total = K * mi, tid = threadIdx.x;
    int j0 = blockIdx.x * (blockDim.x >> 5) + (tid >> 5), E = rt.E;
    if (!rt.logits && lane == 0)
        for (int j = j0; j < total; j += warps) {
            prefetch_l2(Wg + (size_t)j * dim, (size_t)dim * sizeof(bf16));
            prefetch_l2(Wu + (size_t)j * dim, (size_t)dim * sizeof(bf16));
        }
    pdl_wait();
    extern __shared__ float xs[];  // x (dim); routed: the affinities (E), route_block's 2 E + 2 n_group words, the picks
    float *aff = xs + dim, *rs = aff + E, *pick_w = rs + 2 * E + 2 * rt.n_group;
    int *pick = (int *)(pick_w + K);
    float a0 = rt.logits && tid < E ? __ldcg(rt.logits + tid) : 0.0f;  // (requested with x's loads)
    stage_vector(xs, x, NULL, dim, 0.0f);
    if (rt.logits) {
        for (int i = tid; i < E; i += blockDim.x) aff[i] = i == tid ? a0 : __ldcg(rt.logits + i);
        __syncthreads();
        route_block(pick, pick_w, aff, rs, E, K, rt.method, rt.n_group, rt.topk_group, rt.norm_topk_prob, rt.routed_scaling);
        if (blockIdx.x == 0)
            for (int k = tid; k < K; k += blockDim.x) { rt.topk_idx[k] = pick[k]; rt.topk_w[k] = pick_w[k]; }
    }
    timeline_mark();  // x staged, the experts picked
    for (int j = j0; j < total; j += warps) {
        int k = j / mi, r = j % mi;
        size_t e = rt.logits ? pick[k] : 0;
        float gv, uv;
        warp_dot2(Wg + (e * mi + r) * dim, Wu + (e * mi + r) * dim, xs, dim, &gv, &uv);
        if (lane == 0) hb[j] = silu_dev(gv) * uv;
    }
}
static void moe_gate_up_forward(float *hb, const float *x, const bf16 *Wg, const bf16 *Wu, const Routing &rt, int K, int mi) {
    const Config *c = &gpu.c;
    size_t smem = (c->dim + (rt.logits ? 3 * (size_t)rt.E + 2 * rt.n_group + 2 * K : 0)) * sizeof(float);
    if (smem > STAGE_MAX_BYTES) die("dsv2cu: hidden size %d with %d routed experts is too large for the GPU's gate/up", c->dim, rt.E);
    static int wave = 0;  // (the grid of a MoE layer's shared memory, the larger, for the dense layers too)
    if (!wave) wave = one_wave(moe_gate_up_kernel, 256, (c->dim + 3 * (size_t)c->n_routed_experts + 2 * c->n_group +
                                                         2 * c->n_experts_per_tok) * sizeof(float));
    launch(moe_gate_up_kernel, std::min(ceil_div(K * mi, 8), wave), 256, smem, hb, x, Wg, Wu, rt, K, mi, c->dim);
}

// The second half of eq. (20) at decode, with its residual: dsv2.c's down projections in moe_ffn / ffn,
//   x (dim) += sum_k g_k down_e_k @ hb[k]  +  down_shared @ hbs
//   expert_down (E, dim, mi), g_k = topk_w[k]; down_shared (dim, ws) (either part may be absent)
// One warp per output row r (8 per block), after the block stages hb and hbs in shared memory.
// Slots and pieces: row r's value is a sum of dot products ("slots"): one per routed expert k (length
// mi, weight g_k) and the shared row down_shared[r] cut into P equal pieces (weight 1). With V2-Lite's
// K = 6, mi = 1408 and two shared experts (ws = 2816 = 2 x 1408), that is 8 slots of 1408 values, and each
// lane loads 16 bytes from all 8 slots before it uses any: 8 independent loads in flight, the same trick
// as warp_dot's, across matrices. This needs at most DOWN_SLOTS slots of one length, a multiple of 8
// (moe_down_forward picks P: a dense FFN is cut into up to 8 pieces); otherwise slot by slot (warp_dot).
// (A version whose lanes copied their pieces into shared memory by cp.async, two rounds ahead, kept twice
// the bytes in flight per multiprocessor and was no faster: docs/BENCHMARKS.md, issue 14 item 2.)
// The shared row depends on no earlier kernel: before pdl_wait each warp copies it into shared memory
// (cp.async, when it fits), so it arrives during gate/up's tail (issue 14's seventh pass).
#define DOWN_SLOTS 8
// moe_down_kernel's shared memory: hb and hbs, and with rows the 8 warps' shared rows
static __host__ __device__ size_t down_smem(int K, int mi, int si, bool rows) {
    return (size_t)(K * mi + si) * sizeof(float) + (rows ? (size_t)8 * si * sizeof(bf16) : 0);
}
__global__ void moe_down_kernel(float *x, const bf16 *Wd, const int *idx, const float *w, const float *hb, int K, int mi,
                                const bf16 *Wsd, const float *hbs, int si, int P, int dim) {
    pdl_launch_next();
    int r = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    extern __shared__ float hs[];  // hb (K * mi) then hbs (si), when they fit
    int piece = P ? si / P : 0, n_slots = K + P;
    bool fast = n_slots <= DOWN_SLOTS && (K == 0 || P == 0 || piece == mi) && ((K ? mi : piece) & 7) == 0;
    // the shared row depends on no earlier kernel: into shared memory before the wait (pre), else into L2
    bf16 *srow = (bf16 *)(hs + K * mi + si) + (size_t)(threadIdx.x >> 5) * si;  // this warp's shared row
    bool pre = fast && Wsd && down_smem(K, mi, si, true) <= STAGE_MAX_BYTES;
    if (pre && r < dim) {
        for (int i = 8 * lane; i < si; i += 256) cp_async16(srow + i, Wsd + (size_t)r * si + i, 16);
        cp_async_commit();
    } else if (Wsd && r < dim && lane == 0) {
        prefetch_l2(Wsd + (size_t)r * si, (size_t)si * sizeof(bf16));
    }
    pdl_wait();
    if ((size_t)(K * mi + si) * sizeof(float) <= STAGE_MAX_BYTES && !((K * mi) & 3) && !(si & 3)) {
        stage_copy<12>(hs, hb, K * mi, hbs, si);  // both in one round (V2-Lite: 11 16-byte loads a thread)
        __syncthreads();
        hb = hs; hbs = hs + K * mi;
    }
    timeline_mark();  // hb and hbs staged
    if (pre) {
        cp_async_wait<0>();  // this lane's copies of the shared row have landed
        __syncwarp();        // and the other lanes' of this warp
    }
    if (r >= dim) return;
    float acc = 0.0f;
    if (fast) {
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
                if (pre) rows[s] = (const uint4 *)(srow + (size_t)(s - K) * piece);
            } else {
                rows[s] = NULL; xs[s] = NULL; wt[s] = 0.0f;
            }
        }
        for (int i = lane; i < len8; i += 32) {
            uint4 v[DOWN_SLOTS];
            #pragma unroll
            for (int s = 0; s < DOWN_SLOTS; s++) if (s < n_slots) v[s] = pre && s >= K ? rows[s][i] : __ldg(rows[s] + i);
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
// P: the shared row's pieces (see moe_down_kernel)
static void moe_down_forward(float *x, const GpuLayer *L, const int *idx, const float *w, const float *hb, int K,
                             const float *hbs) {
    int mi = gpu.c.moe_intermediate_size, si = L->ffn_width, P = 0;
    if (si && K && si % mi == 0) P = si / mi;                        // the shared experts, one slot each
    if (si && !K) for (P = DOWN_SLOTS; P > 1 && si % (8 * P); P--) {}  // a dense FFN, cut in P equal pieces
    if (si && !P) P = 1;
    size_t smem = down_smem(K, mi, si, si && down_smem(K, mi, si, true) <= STAGE_MAX_BYTES);
    launch(moe_down_kernel, ceil_div(gpu.c.dim, 8), 256, smem <= STAGE_MAX_BYTES ? smem : 0, x, (const bf16 *)L->expert_down, idx, w, hb, K, mi,
           (const bf16 *)(si ? L->ffn_down : NULL), hbs, si, P, gpu.c.dim);
}

// eq. (20) for the decode step's token with the RMSNorm before it, x += FFN(RMSNorm(x)): a MoE layer's
// router (the norm, the affinities) with the shared experts' first half, the routed experts' first half
// (picked at its start), then every down projection and the residual; a dense layer's FFN in the same two
// kernels after an RMSNorm
static void ffn_decode_forward(float *x, const GpuLayer *L) {
    const Config *c = &gpu.c;
    if (L->is_moe) {
        int K = c->n_experts_per_tok;
        moe_router_forward(gpu.route_logits, L, x, gpu.xb, gpu.hb_shared);  // the affinities; xb keeps the norm
        Routing rt = {gpu.route_logits, gpu.topk_idx, gpu.topk_w, c->n_routed_experts, c->topk_method, c->n_group,
                      c->topk_group, c->norm_topk_prob, c->routed_scaling_factor};  // eqs. (21)-(22)
        moe_gate_up_forward(gpu.hb, gpu.xb, L->expert_gate, L->expert_up, rt, K, c->moe_intermediate_size);
        moe_down_forward(x, L, gpu.topk_idx, gpu.topk_w, gpu.hb, K, gpu.hb_shared);
    } else {
        rmsnorm_forward(gpu.xb, x, L->post_attention_layernorm, c->dim, 1);
        moe_gate_up_forward(gpu.hb_shared, gpu.xb, L->ffn_gate, L->ffn_up, Routing{}, 1, L->ffn_width);
        moe_down_forward(x, L, gpu.topk_idx, gpu.topk_w, gpu.hb, 0, gpu.hb_shared);
    }
}

// ---------------- The MoE over a batch of tokens (eqs. 20-22 for T tokens of any mix of sequences)
// moe_batch_forward: x (T, dim) += sum_k g_t,k FFN_{e_t,k}(xn_t) + shared FFN(xn_t), for the batched decode
// step and the prefill, in seven launches and no host round trip (so a CUDA graph can hold it):
//   1. split3        xn -> xs (T, 3, dim): each activation as three bf16 parts (dsv2_prefill.cuh)
//   2. moe_grouped   the affinities u^T e_i (T, E) on the tensor cores (the gate as one dense group)
//   3. moe_route     top-K per token (route_block, as the decode step: the same experts as dsv2.c)
//   4. moe_plan      the (token, slot) pairs grouped by expert on the GPU: counts, offsets, the
//                    permutation, and the list of work units
//   5. moe_grouped   gate and up of every unit, SwiGLU, split again: hs (rows, 3, piece)
//   6. moe_grouped   down of every unit: y (rows, dim)
//   7. moe_combine   x[t] += the shared rows + sum_k g_t,k y[row of (t, k)], in a fixed order
// Slots and groups: token t has S = K + N_s slots, its K routed experts, then the N_s shared experts as
// "pieces" (the shared FFN of width N_s * mi split into N_s FFNs of width mi, each hidden unit being
// independent: the same sum in another order). So every slot is a pair (token, group) with G = E + N_s
// groups, and the shared experts are groups E.. that every token chose. A dense layer (not MoE) is the
// same with K = 0 and one piece, its whole FFN. Rows: the pairs sorted by group, in token order within
// a group (stable, so the result does not depend on timing); perm[row] = token, inv[t * S + s] = row.
// Work unit: up to NT rows of one group. The grouped products run one block per (unit, block of rows
// of the weight): a unit's block reads its rows of its group's matrix once, for all the unit's rows (a
// group with more than NT rows has several units, which read its matrix again, mostly from L2); groups
// nobody chose have no unit, so their weights are never read. The grids depend on T and on static sizes
// only (the unit count is bounded from T); blocks past the device's unit count return at once.
// Usage: moe_batch_init(c, max_T) once after gpu_init; then moe_batch_forward on gpu.stream, any T <= max_T.

// A grouped product's operands (one launch, passed by value). Group g < G_r: the matrix at W + g *
// stride (m rows of k, row stride ld); group g >= G_r: the shared piece g - G_r, at Ws + (g - G_r) *
// s_stride, row stride s_ld. W2 / Ws2: the second matrix of gate/up (up), the same offsets.
typedef struct {
    const bf16 *W, *W2, *Ws, *Ws2;
    long stride, s_stride;
    int ld, s_ld, G_r, m, k;
    const bf16 *X;       // split activations: row a's parts at X + (3 a + p) k
    const int *x_row;    // grouped row -> row of X (NULL: the same row)
    float *Y; int ldy;   // one matrix: Y[row * ldy + r] = W_r . x_row
    bf16 *H;             // two matrices: H (rows, 3, m) = split3(silu(W_r . x) * (W2_r . x))
} GroupedArgs;

__device__ __forceinline__ uint32_t u4_at(const uint4 &v, int i) { return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w; }

// The grouped product (dsv2.c's matmul in ffn, for every work unit): for unit (g, row0, n) and the
// weight rows r of this block, y[row0 + i][r] = W_g[r] . x[x_row(row0 + i)] for i < n (and the SwiGLU of
// gate and up when TWO), at float32 accuracy: x = x1 + x2 + x3 in bf16 (split3), W x = W x1 + (W x2 + W x3),
// two accumulators (big, small) as in mma_3xtf32.
// FLUSH: a tensor-core accumulator loses bits as it sums more products (measured: one accumulator over
// k = 10944 erred by 1.6e-5, docs/BENCHMARKS.md), so the big one is added into a float32 sum after every
// round (128 values of k) and restarted from zero; the small one (W x2 + W x3, 2^-8 of the big) keeps its
// sum. This lets one warp take a whole k (KS = 1) and so more unit rows per weight tile.
// PARTS = 2 (an experiment, measured in --bench --moe-only 3): x1 + x2 only, W x3 dropped: 2/3 of the
// tensor work, each activation kept to about 2^-18 of itself instead of float32's 2^-24.
// Block: 8 warps = RW row groups x KS splits of k. Warp (rw, ks): 16 weight rows (r0 = 16 (RW blockIdx.x
// + rw)) against the unit's NT = 8 NG rows; the KS partial sums are added in shared memory in a fixed
// order. Grid: (m / (16 RW), units).
// Fragments straight from 16-byte pieces: lane (g, t) takes k = 8t..8t+7 of a 32-wide chunk of weight rows
// g and g + 8 and of activation row g. The k order inside a chunk may be any permutation (the same for
// both operands), so step s (0, 1) of the chunk's two k16 products takes the lane's registers 2s, 2s + 1
// (elements 4s..4s+3) as its k = 2t, 2t+1, 2t+8, 2t+9.
// Rounds of 4 chunks (128 values of k); in round r, warp ks multiplies chunks 4r + ks + KS jj (jj < J =
// 4 / KS). Operands come through shared memory by cp.async (dsv2_common.cuh), two rounds in flight:
// round r + 1 is asked for before round r is multiplied, so memory latency overlaps the products.
//   - weights: each thread copies the 16-byte pieces it will itself use into its own slots, [round & 1]
//     [slot][256 threads] (consecutive threads, consecutive 16 bytes);
//   - activations: the block copies the round's pieces of its NT unit rows once, for all its warps,
//     piece ((cc PARTS + p) NT + i) 4 + quarter = 16 bytes of chunk cc, part p, unit row i (a warp's 32
//     lanes read 32 consecutive pieces: no bank conflicts).
// Measured against loads straight into registers (the compiler then interleaved loads and products, and
// each lane waited for one load before it asked for the next) and other shapes: docs/BENCHMARKS.md.
template <int NG, int KS, int TWO, int FLUSH, int PARTS>
__global__ void __launch_bounds__(256) moe_grouped_kernel(GroupedArgs a, const int4 *units, const int *n_units, int T) {
    constexpr int RW = 8 / KS, NM = TWO ? 2 : 1, NT = 8 * NG, J = 4 / KS;
    constexpr int SLOTS = J * 2 * NM;          // each thread's 16-byte weight pieces per round
    constexpr int XTILE = NT * PARTS * 4 * 4;  // the block's 16-byte activation pieces per round
    extern __shared__ uint4 slot[];        // [round & 1][SLOTS x 256 threads, then XTILE]
    __shared__ size_t xoff[NT];            // where each unit row's split activations start in X
    pdl_launch_next();
    pdl_wait();
    int4 u;  // (group, first row, rows)
    if (units) {
        if ((int)blockIdx.y >= *n_units) return;
        u = units[blockIdx.y];
    } else {  // one dense group over the T tokens (the router's affinities)
        u = make_int4(0, blockIdx.y * NT, min(NT, T - (int)blockIdx.y * NT), 0);
    }
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    int rw = warp % RW, ks = warp / RW, m = a.m, k = a.k;
    int r0 = (blockIdx.x * RW + rw) * 16;
    const bf16 *Wm[NM];
    int ld = u.x < a.G_r ? a.ld : a.s_ld;
    Wm[0] = u.x < a.G_r ? a.W + u.x * a.stride : a.Ws + (u.x - a.G_r) * a.s_stride;
    if (TWO) Wm[NM - 1] = u.x < a.G_r ? a.W2 + u.x * a.stride : a.Ws2 + (u.x - a.G_r) * a.s_stride;
    const bf16 *wrow[NM][2];  // rows g and g + 8 (clamped: rows past m are computed and not stored)
    for (int q = 0; q < NM; q++) {
        wrow[q][0] = Wm[q] + (size_t)min(r0 + g, m - 1) * ld;
        wrow[q][1] = Wm[q] + (size_t)min(r0 + g + 8, m - 1) * ld;
    }
    if (threadIdx.x < NT) {
        int i = threadIdx.x;
        xoff[i] = i < u.z ? (size_t)3 * (a.x_row ? a.x_row[u.y + i] : u.y + i) * k : 0;
    }
    __syncthreads();
    float acc[NM][NG][2][4];  // [matrix][8 rows][big, small][fragment]
    float sum[NM][NG][4];     // FLUSH: the big accumulators' float32 sums, round by round
    #pragma unroll
    for (int q = 0; q < NM; q++)
        #pragma unroll
        for (int j = 0; j < NG; j++)
            #pragma unroll
            for (int e = 0; e < 4; e++) {
                acc[q][j][0][e] = acc[q][j][1][e] = 0.0f;
                sum[q][j][e] = 0.0f;
            }
    int chunks = (k + 31) / 32;
    // ask for round r's operands into buffer r & 1 (k % 8 == 0: a lane's 8 values are all inside k or all
    // outside; outside ones are zero-filled, cp.async reading nothing)
    auto stage = [&](int r) {
        uint4 *sl = slot + (size_t)(r & 1) * (SLOTS * 256 + XTILE);
        #pragma unroll
        for (int jj = 0; jj < J; jj++) {
            int col = (4 * r + ks + jj * KS) * 32 + 8 * t, in = col < k;
            #pragma unroll
            for (int q = 0; q < NM; q++)
                #pragma unroll
                for (int h = 0; h < 2; h++)
                    cp_async16(sl + (size_t)((jj * NM + q) * 2 + h) * 256 + threadIdx.x, in ? wrow[q][h] + col : wrow[q][h], in ? 16 : 0);
        }
        for (int pc = threadIdx.x; pc < XTILE; pc += 256) {
            int quarter = pc & 3, i = (pc >> 2) % NT, p = (pc >> 2) / NT % PARTS, cc = (pc >> 2) / NT / PARTS;
            int col = (4 * r + cc) * 32 + 8 * quarter, ok = col < k && i < u.z;
            cp_async16(sl + SLOTS * 256 + pc, ok ? a.X + xoff[i] + (size_t)p * k + col : a.X, ok ? 16 : 0);
        }
        cp_async_commit();
    };
    stage(0);
    for (int r = 0; 4 * r < chunks; r++) {
        if (r > 0) __syncthreads();    // every warp is done with round r - 1's buffer, refilled now
        if (4 * (r + 1) < chunks) stage(r + 1);
        else cp_async_commit();        // an empty group keeps the count
        cp_async_wait<1>();            // this thread's copies of round r have landed
        __syncthreads();               // and every thread's: the activations are visible
        const uint4 *sl = slot + (size_t)(r & 1) * (SLOTS * 256 + XTILE);
        uint4 w[J][NM][2], xh[J][NG][PARTS];
        #pragma unroll
        for (int jj = 0; jj < J; jj++) {
            #pragma unroll
            for (int q = 0; q < NM; q++)
                #pragma unroll
                for (int h = 0; h < 2; h++) w[jj][q][h] = sl[(size_t)((jj * NM + q) * 2 + h) * 256 + threadIdx.x];
            #pragma unroll
            for (int j = 0; j < NG; j++)
                #pragma unroll
                for (int p = 0; p < PARTS; p++) xh[jj][j][p] = sl[SLOTS * 256 + (((jj * KS + ks) * PARTS + p) * NT + j * 8 + g) * 4 + t];
        }
        #pragma unroll
        for (int jj = 0; jj < J; jj++) {
            #pragma unroll
            for (int j = 0; j < NG; j++) {
                const uint4 *x = xh[jj][j];
                #pragma unroll
                for (int s = 0; s < 2; s++)
                    #pragma unroll
                    for (int q = 0; q < NM; q++) {
                        uint32_t a0 = u4_at(w[jj][q][0], 2 * s), a1 = u4_at(w[jj][q][1], 2 * s);
                        uint32_t a2 = u4_at(w[jj][q][0], 2 * s + 1), a3 = u4_at(w[jj][q][1], 2 * s + 1);
                        mma_bf16(acc[q][j][0], a0, a1, a2, a3, u4_at(x[0], 2 * s), u4_at(x[0], 2 * s + 1));  // W x1
                        mma_bf16(acc[q][j][1], a0, a1, a2, a3, u4_at(x[1], 2 * s), u4_at(x[1], 2 * s + 1));  // W x2
                        if (PARTS == 3) mma_bf16(acc[q][j][1], a0, a1, a2, a3, u4_at(x[PARTS - 1], 2 * s), u4_at(x[PARTS - 1], 2 * s + 1));  // W x3
                    }
            }
        }
        if (FLUSH)  // the round's W x1 (128 values of k) into float32
            #pragma unroll
            for (int q = 0; q < NM; q++)
                #pragma unroll
                for (int j = 0; j < NG; j++)
                    #pragma unroll
                    for (int e = 0; e < 4; e++) { sum[q][j][e] += acc[q][j][0][e]; acc[q][j][0][e] = 0.0f; }
    }
    float v[NM][NG][4];
    #pragma unroll
    for (int q = 0; q < NM; q++)
        #pragma unroll
        for (int j = 0; j < NG; j++)
            #pragma unroll
            for (int e = 0; e < 4; e++) v[q][j][e] = (FLUSH ? sum[q][j][e] : acc[q][j][0][e]) + acc[q][j][1][e];
    if (KS > 1) {  // the k splits' sums, added by warp ks = 0 in the order ks = 1, 2, ..., in the slots once all are done
        typedef float Part[NM * NG * 4][32];
        Part *part = (Part *)slot;
        cp_async_wait<0>();
        __syncthreads();
        if (ks > 0)
            #pragma unroll
            for (int q = 0; q < NM; q++)
                #pragma unroll
                for (int j = 0; j < NG; j++)
                    #pragma unroll
                    for (int e = 0; e < 4; e++) part[warp][(q * NG + j) * 4 + e][lane] = v[q][j][e];
        __syncthreads();
        if (ks > 0) return;
        for (int o = 1; o < KS; o++)
            #pragma unroll
            for (int q = 0; q < NM; q++)
                #pragma unroll
                for (int j = 0; j < NG; j++)
                    #pragma unroll
                    for (int e = 0; e < 4; e++) v[q][j][e] += part[rw + o * RW][(q * NG + j) * 4 + e][lane];
    }
    #pragma unroll
    for (int j = 0; j < NG; j++)
        #pragma unroll
        for (int e = 0; e < 4; e++) {
            int r = r0 + g + (e >= 2 ? 8 : 0), i = j * 8 + 2 * t + (e & 1);
            if (r >= m || i >= u.z) continue;
            size_t row = u.y + i;
            if (TWO) store_split3(a.H + 3 * row * m + r, m, silu_dev(v[0][j][e]) * v[NM - 1][j][e]);  // dsv2.c ffn's hb
            else a.Y[row * a.ldy + r] = v[0][j][e];
        }
}

// The grouping, by one block (1024 threads): the pairs (t, s) of T tokens x S slots, slot s < K being the
// routed expert idx[t * K + s] and slot K + p the shared piece p (group E + p), sorted by group:
//   count (G), offset (G) of each group's rows; perm (T S): row -> token; inv (T S): pair -> row;
//   units, *n_units: each group's rows cut in units of up to NT, group by group.
// Counting: integer atomics (exact in any order). Placing: one warp per group scans the pairs in order,
// 32 at a time, and each pair of its group takes the next row (a ballot and a popcount): stable, so the
// rows of a group are in token order whatever the timing. The routed choices are staged in shared memory.
__global__ void moe_plan_kernel(int4 *units, int *n_units, int *perm, int *inv, int *count, int *offset, int *ustart,
                                const int *idx, int T, int K, int E, int n_pieces, int NT, int staged) {
    pdl_launch_next();
    pdl_wait();
    extern __shared__ int sidx[];
    int S = K + n_pieces, G = E + n_pieces, P = T * S;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    if (staged) {
        for (int i = threadIdx.x; i < T * K; i += blockDim.x) sidx[i] = idx[i];
        idx = sidx;
    }
    for (int gi = threadIdx.x; gi < G; gi += blockDim.x) count[gi] = 0;
    __syncthreads();
    for (int i = threadIdx.x; i < P; i += blockDim.x) {
        int t = i / S, s = i % S;
        atomicAdd(&count[s < K ? idx[t * K + s] : E + s - K], 1);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        int rows = 0, n = 0;
        for (int gi = 0; gi < G; gi++) {
            offset[gi] = rows; ustart[gi] = n;
            rows += count[gi]; n += (count[gi] + NT - 1) / NT;
        }
        *n_units = n;
    }
    __syncthreads();
    for (int gi = warp; gi < G; gi += warps) {
        int row = offset[gi], n = count[gi];
        for (int c = lane; c * NT < n; c += 32) units[ustart[gi] + c] = make_int4(gi, row + c * NT, min(NT, n - c * NT), 0);
        if (gi >= E) {  // a shared piece: every token, in order
            for (int t = lane; t < T; t += 32) { perm[row + t] = t; inv[t * S + K + gi - E] = row + t; }
            continue;
        }
        for (int i0 = 0; i0 < T * K; i0 += 32) {
            int i = i0 + lane, mine = i < T * K && idx[i] == gi;
            unsigned b = __ballot_sync(0xffffffffu, mine);
            if (mine) {
                int r = row + __popc(b & ((1u << lane) - 1));
                perm[r] = i / K;
                inv[(i / K) * S + i % K] = r;
            }
            row += __popc(b);
        }
    }
}

// eq. (20) with its residual, for T tokens: x[t] (dim) += sum_p y[inv[t, K + p]] + sum_k g_t,k y[inv[t, k]]
// (y (rows, dim): the down products; the shared pieces first, then the routed experts in rank order, as
// dsv2.c's moe_ffn adds them). One block per token, its threads over dim; no atomics: deterministic.
__global__ void moe_batch_combine_kernel(float *x, const float *y, const int *inv, const float *w, int K, int S, int dim) {
    pdl_launch_next();
    pdl_wait();
    size_t t = blockIdx.x;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        float acc = 0.0f;
        for (int s = K; s < S; s++) acc += y[(size_t)inv[t * S + s] * dim + i];
        for (int k = 0; k < K; k++) acc += w[t * K + k] * y[(size_t)inv[t * S + k] * dim + i];
        x[t * dim + i] += acc;
    }
}

// The grouped product's shapes: rows of 8 per unit (NG), splits of k (KS), FLUSH, PARTS (moe_grouped_kernel).
// moe_shape_for picks by the rows a group gets on average, R = T K / E for a MoE layer (T for a dense layer,
// one group): the last shape of the table whose threshold R >= from holds (MOE_NEVER: only when asked for by
// moe_batch.shape, as the benchmark does). Measured on the H200 (docs/BENCHMARKS.md), V2-Lite shapes:
//   (1, 4) below R = 3 (dense layers: below T = 128): short accumulators, the most blocks at small T;
//   (2, 2) from R = 3 (never for a dense layer: the least accurate shape there, 8.6e-6 against 4.4e-6 for
//   (1, 4), although the fastest at T = 16 and 128). (4, 1) without FLUSH was faster still from T = 256 but erred by 1.6e-5 on the
//   dense down product (k = 10944; bound 1e-5), (2, 2) by 9e-6 there, (1, 4) by 5e-6;
//   (4, 1) FLUSH from R = 16 (dense: T = 128), (8, 1) FLUSH for dense layers from T = 2048: whole-k warps with
//   float32 sums every 128 values of k, and larger units (a block's weight tile serves 32 or 64 rows, so fewer
//   bytes come from L2 per product). The thresholds are the measured winners of `./dsv2cu --bench MODEL
//   --moe-only 3` (H200, 2026-12-01, a 2-layer V2-Lite-shaped model; ms per layer):
//     MoE   T 64: (2,2) 0.41 | 256: (4,1)F 0.72, (2,2) 0.82 | 512: (8,1)F 1.32, (4,1)F 1.36 | 1024: (4,1)F 2.39,
//           (8,1)F 2.52 | 2048: both 4.36 (so (8,1)F is never chosen for a MoE layer: at most 4% either way)
//     dense T 16: (1,4) 0.16 | 128: (4,1)F 0.52, (1,4) 0.57 | 512: (4,1)F 1.00 | 2048: (8,1)F 3.71, (4,1)F 3.87
//   (2, 1) FLUSH and (4, 1) FLUSH PARTS = 2: measured, never chosen. PARTS = 2 was the fastest from T = 256
//   (1.8 ms at T = 1024) within 5e-6 of dsv2.c, but two bf16 parts keep 16 of float32's 24 bits: not float32.
// Thresholds must grow down the table for the shapes that may be chosen (the last that qualifies wins;
// MOE_NEVER counts as infinite).
// The router's affinities always use shape 0 (three parts, short sums): the experts chosen for a token do not
// depend on the shape, so not on the batch size either.
// The guard: a shape whose check fails in this process is never chosen (moe_shape_failed: set by
// moe_batch_guard at init, and by the benchmark's checks).
typedef void (*GroupedKernel)(GroupedArgs, const int4 *, const int *, int);
typedef struct { int NG, KS, flush, parts; GroupedKernel one, two; int moe_from, dense_from; } MoeShape;
#define MOE_NEVER 0x7fffffff
#define MOE_SHAPE(NG, KS, FLUSH, PARTS, moe_from, dense_from)                                                 \
    {NG, KS, FLUSH, PARTS, moe_grouped_kernel<NG, KS, 0, FLUSH, PARTS>, moe_grouped_kernel<NG, KS, 1, FLUSH, PARTS>, \
     moe_from, dense_from}
static const MoeShape moe_shapes[] = {
    //        NG KS FLUSH PARTS  from R (MoE)  from T (dense)
    MOE_SHAPE(1, 4, 0, 3, 0, 0),
    MOE_SHAPE(2, 2, 0, 3, 3, MOE_NEVER),
    MOE_SHAPE(4, 1, 1, 3, 16, 128),
    MOE_SHAPE(8, 1, 1, 3, MOE_NEVER, 2048),
    MOE_SHAPE(2, 1, 1, 3, MOE_NEVER, MOE_NEVER),
    MOE_SHAPE(4, 1, 1, 2, MOE_NEVER, MOE_NEVER),
};
#define MOE_N_SHAPES ((int)(sizeof moe_shapes / sizeof moe_shapes[0]))
static char moe_shape_failed[MOE_N_SHAPES];
static int moe_shape_for(int T, int K, int E, int moe) {
    int best = 0;
    for (int v = 1; v < MOE_N_SHAPES; v++) {
        long from = moe ? moe_shapes[v].moe_from : moe_shapes[v].dense_from;
        if (from != MOE_NEVER && !moe_shape_failed[v] && (moe ? (long)T * K >= from * E : T >= from)) best = v;
    }
    return best;
}
// dynamic shared memory: two rounds of weight slots and activation pieces (at least the k splits' sums)
static size_t moe_shape_smem(const MoeShape *sh, int two) {
    int NM = two ? 2 : 1, J = 4 / sh->KS;
    size_t rounds = (size_t)2 * ((size_t)J * 2 * NM * 256 + 8 * sh->NG * sh->parts * 4 * 4) * 16;
    return std::max(rounds, (size_t)8 * NM * sh->NG * 4 * 32 * 4);
}

// scratch of the batched MoE, sized for max_T tokens
static struct {
    int max_T, shape;      // the grouped product's shape (moe_shapes); -1: chosen by T (moe_shape_for)
    bf16 *xs, *hs;         // xn split (max_T, 3, dim); the SwiGLU outputs split (rows, 3, piece)
    float *logits, *w, *y; // affinities (max_T, E); g_t,k (max_T, K); down products (rows, dim)
    int *idx, *perm, *inv, *count, *offset, *ustart, *n_units;
    int4 *units;
} moe_batch;

// units of up to NT rows: at most one partial unit per group that has rows, plus rows / NT full ones
static int moe_units_max(int T, int S, int G, int NT) { return std::min(G, T * S) + T * S / NT; }

static void moe_batch_guard(int T);
static void moe_batch_init(const Config *c, int max_T) {
    int dim = c->dim, E = c->n_routed_experts, K = c->n_experts_per_tok, mi = c->moe_intermediate_size;
    int S = K + c->n_shared_experts, G = E + c->n_shared_experts;
    if (dim % 8 || mi % 8 || c->intermediate_size % 8)
        die("dsv2cu: the batched MoE needs hidden and FFN sizes that are multiples of 8 (%d, %d, %d)", dim, mi,
            c->intermediate_size);
    size_t hs = std::max((size_t)S * mi, (size_t)c->intermediate_size), rows = (size_t)max_T * std::max(S, 1);
    moe_batch.max_T = max_T;
    moe_batch.xs = dev_bf16((size_t)3 * max_T * dim);
    moe_batch.hs = dev_bf16((size_t)3 * max_T * hs);
    moe_batch.y = dev_floats(rows * dim);
    moe_batch.logits = dev_floats((size_t)max_T * E);
    moe_batch.w = dev_floats((size_t)max_T * K);
    moe_batch.idx = dev_ints((size_t)max_T * K);
    moe_batch.perm = dev_ints(rows); moe_batch.inv = dev_ints(rows);
    moe_batch.count = dev_ints(G + 1); moe_batch.offset = dev_ints(G + 1); moe_batch.ustart = dev_ints(G + 1);
    moe_batch.n_units = dev_ints(1);
    moe_batch.units = (int4 *)dev_ints(4 * (size_t)moe_units_max(max_T, std::max(S, 1), std::max(G, 1), 8));
    cudaCheck(cudaFuncSetAttribute(moe_plan_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, STAGE_MAX_BYTES));
    moe_batch.shape = -1;
    std::vector<const void *> kernels = {(const void *)moe_plan_kernel, (const void *)moe_batch_combine_kernel};
    for (const MoeShape &sh : moe_shapes)
        for (int two = 0; two < 2; two++) {
            GroupedKernel kern = two ? sh.two : sh.one;
            cudaCheck(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)moe_shape_smem(&sh, two)));
            kernels.push_back((const void *)kern);
        }
    for (const void *k : kernels)  // one L1/shared split for every kernel (gpu_init says why)
        cudaCheck(cudaFuncSetAttribute(k, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared));
    moe_batch_guard(std::min(max_T, 512));
}

// one grouped product of shape sh (two: gate and up); units NULL = one dense group over T tokens
static void moe_grouped_forward(const GroupedArgs &a, const MoeShape *sh, int two, const int4 *units, int n_units_max, int T) {
    dim3 grid(ceil_div(a.m, 16 * (8 / sh->KS)), units ? n_units_max : ceil_div(T, 8 * sh->NG));
    launch(two ? sh->two : sh->one, grid, 256, moe_shape_smem(sh, two), a, units, (const int *)moe_batch.n_units, T);
}

// eqs. (20)-(22) for T tokens, with the residual: x (T, dim) += sum_k g_t,k FFN_{e_t,k}(xn_t) + shared FFN(xn_t),
// xn (T, dim) the RMSNorm'd input. A dense layer (L->is_moe == 0): x += FFN(xn). Capturable in a CUDA graph.
static void moe_batch_forward(float *x, const float *xn, const GpuLayer *L, int T) {
    const Config *c = &gpu.c;
    if (T < 1 || T > moe_batch.max_T) die("dsv2cu: moe_batch_forward of %d tokens (room for %d)", T, moe_batch.max_T);
    int dim = c->dim, mi = c->moe_intermediate_size, moe = L->is_moe;
    int E = moe ? c->n_routed_experts : 0, K = moe ? c->n_experts_per_tok : 0;
    int piece = moe ? mi : L->ffn_width, n_pieces = L->ffn_width / piece;  // shared experts (or the dense FFN)
    int S = K + n_pieces, G = E + n_pieces;
    const MoeShape *sh = &moe_shapes[moe_batch.shape >= 0 ? moe_batch.shape : moe_shape_for(T, K, E, moe)];
    int NT = 8 * sh->NG;
    split3_forward(moe_batch.xs, xn, T, dim);
    if (moe) {
        GroupedArgs r = {};  // eq. (22)'s u_t^T e_i: the gate (E, dim) as one dense group
        r.W = L->gate; r.G_r = 1; r.ld = dim; r.m = E; r.k = dim; r.X = moe_batch.xs; r.Y = moe_batch.logits; r.ldy = E;
        moe_grouped_forward(r, &moe_shapes[0], 0, NULL, 0, T);  // shape 0 always (moe_shapes says why)
        moe_route_forward(moe_batch.idx, moe_batch.w, moe_batch.logits, T);   // eqs. (21)-(22)
    }
    size_t smem = (size_t)T * K * sizeof(int);
    int staged = smem <= STAGE_MAX_BYTES;
    launch(moe_plan_kernel, 1, 1024, staged ? smem : 0, moe_batch.units, moe_batch.n_units, moe_batch.perm, moe_batch.inv,
           moe_batch.count, moe_batch.offset, moe_batch.ustart, (const int *)moe_batch.idx, T, K, E, n_pieces, NT, staged);
    int units_max = moe_units_max(T, S, G, NT);
    GroupedArgs gu = {};  // eq. (20)'s FFNs, first half: hs = split3(silu(gate x) * up x), per unit
    gu.W = L->expert_gate; gu.W2 = L->expert_up; gu.stride = (long)mi * dim; gu.ld = dim; gu.G_r = E;
    gu.Ws = L->ffn_gate; gu.Ws2 = L->ffn_up; gu.s_stride = (long)piece * dim; gu.s_ld = dim;
    gu.m = piece; gu.k = dim; gu.X = moe_batch.xs; gu.x_row = moe_batch.perm; gu.H = moe_batch.hs;
    moe_grouped_forward(gu, sh, 1, moe_batch.units, units_max, T);
    GroupedArgs dn = {};  // second half: y = down hs, per unit (a shared piece: its columns of ffn_down)
    dn.W = L->expert_down; dn.stride = (long)dim * mi; dn.ld = mi; dn.G_r = E;
    dn.Ws = L->ffn_down; dn.s_stride = piece; dn.s_ld = L->ffn_width;
    dn.m = dim; dn.k = piece; dn.X = moe_batch.hs; dn.Y = moe_batch.y; dn.ldy = dim;
    moe_grouped_forward(dn, sh, 0, moe_batch.units, units_max, T);
    launch(moe_batch_combine_kernel, T, 256, 0, x, (const float *)moe_batch.y, (const int *)moe_batch.inv,
           (const float *)moe_batch.w, K, S, dim);                                                     // eq. (20)
}

// The guard, run by moe_batch_init: every shape that moe_shape_for may pick (a threshold set) runs T random
// tokens (xn uniform in [-1.7, 1.7)) through the model's first MoE layer and its first dense layer, against
// shape 0 (the shortest tensor-core sums, checked against dsv2.c by --bench); a shape whose output differs
// by 1e-5 of the output's scale or more (or is not finite) is marked in moe_shape_failed, never chosen, and
// a line on stderr says so. A few milliseconds, once.
__global__ void moe_guard_fill_kernel(float *p, size_t n, float scale) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        uint32_t h = (uint32_t)i * 2654435761u ^ 0x9e3779b9u;
        h ^= h >> 15; h *= 2246822519u; h ^= h >> 13; h *= 3266489917u; h ^= h >> 16;
        p[i] = ((h >> 8) / 16777216.0f * 2.0f - 1.0f) * scale;
    }
}
static void moe_batch_guard(int T) {
    const Config *c = &gpu.c;
    size_t n = (size_t)T * c->dim;
    float *x = dev_floats(n), *xn = dev_floats(n);
    std::vector<float> ref(n), got(n);
    moe_guard_fill_kernel<<<256, 256, 0, gpu.stream>>>(xn, n, 1.7f);
    launchCheck();
    for (int moe = 1; moe >= 0; moe--) {
        int l = 0;
        while (l < c->n_layers && gpu.layers[l].is_moe != moe) l++;
        if (l == c->n_layers) continue;
        for (int v = 0; v < MOE_N_SHAPES; v++) {
            if (v > 0 && (moe ? moe_shapes[v].moe_from : moe_shapes[v].dense_from) == MOE_NEVER) continue;
            moe_batch.shape = v;
            cudaCheck(cudaMemsetAsync(x, 0, n * sizeof(float), gpu.stream));
            moe_batch_forward(x, xn, &gpu.layers[l], T);  // x = the FFN's output
            cudaCheck(cudaStreamSynchronize(gpu.stream));
            cudaCheck(cudaMemcpy(v ? got.data() : ref.data(), x, n * sizeof(float), cudaMemcpyDeviceToHost));
            if (v == 0) continue;
            double d = 0, r = 0;
            int finite = 1;
            for (size_t i = 0; i < n; i++) {
                finite &= std::isfinite(got[i]) && std::isfinite(ref[i]);
                d = fmax(d, fabs((double)got[i] - ref[i])); r = fmax(r, fabs((double)ref[i]));
            }
            if (!finite || !(d < 1e-5 * r)) {
                moe_shape_failed[v] = 1;
                fprintf(stderr, "dsv2cu: the batched MoE's shape %d differs from shape 0 by %.3e of the output's scale on layer %d (%s); "
                        "it is not used\n", v, r > 0 ? d / r : INFINITY, l, moe ? "MoE" : "dense");
            }
        }
    }
    moe_batch.shape = -1;
    cudaCheck(cudaFree(x)); cudaCheck(cudaFree(xn));
}
