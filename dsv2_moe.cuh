// dsv2_moe.cuh: DeepSeekMoE (paper eqs. 20-22) on the GPU: the router, and the decode step's two FFN
// kernels, dsv2.c's moe_route and moe_ffn (ffn for the shared experts and the dense layers).
// Shapes: dim = hidden size, E = n_routed_experts, K = n_experts_per_tok (K_r), mi =
// moe_intermediate_size; the shared experts are one FFN of width ws = N_s * mi (or the dense FFN,
// intermediate_size wide). The prefill's MoE is in dsv2_prefill.cuh and prefill_pass.

// ---------------- The router (eqs. 21-22)
// The affinities u^T e_i come from moe_router_kernel (decode) or the prefill's product; then one warp
// per token takes dsv2.c's moe_route step by step: softmax, the topk_group best groups (route_groups,
// device-limited routing), the top K_r experts, each choice a warp-wide argmax with the lowest index
// winning ties, so the GPU picks the same experts as the CPU.
// (A first version did all of this in one block with thread 0 running the loops: 51 us a layer.)
__device__ __forceinline__ void warp_argmax(float *v, int *i) {  // over the lanes' (v, i) pairs
    for (int o = 16; o > 0; o >>= 1) {
        float v2 = __shfl_xor_sync(0xffffffffu, *v, o);
        int i2 = __shfl_xor_sync(0xffffffffu, *i, o);
        if (v2 > *v || (v2 == *v && i2 < *i)) { *v = v2; *i = i2; }
    }
}
// dsv2.c's moe_route for one token, by one warp: logits (E) = u^T e_i -> topk_idx (K), topk_w (K).
//   eq. (22) s_i = softmax_i(u^T e_i); device-limited routing zeroes the experts outside the topk_group
//   best groups (method 1); eq. (21) the top K of s, their weights normalised (norm_topk_prob) or scaled
//   by routed_scaling_factor, as in dsv2.c. Each lane holds experts lane, lane + 32, ...
// logits are read past L1 (__ldcg): another block of the same launch may have written them.
// rs: 2 E + 2 n_group words of shared memory (scores, chosen, group_score, taken).
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
// the prefill's router, eqs. (21)-(22) for T tokens: logits (T, E) -> topk_idx, topk_w (T, K).
// One block of one warp per token (route_token).
__global__ void moe_route_kernel(int *topk_idx, float *topk_w, const float *logits, int E, int K, int method,
                                 int n_group, int topk_group, int norm_topk_prob, float routed_scaling) {
    pdl_launch_next();
    pdl_wait();
    extern __shared__ float rs[];
    size_t t = blockIdx.x;
    route_token(topk_idx + t * K, topk_w + t * K, logits + t * E, rs, E, K, method, n_group, topk_group, norm_topk_prob,
                routed_scaling);
}
// The decode step's router in one launch, eqs. (21)-(22) for one token, with the RMSNorm before the
// FFN fused (dsv2.c forward's rmsnorm(post_attention_layernorm) + moe_route):
//   xn_out (dim) = RMSNorm(x) * norm_w;  logits (E) = gate (E, dim) @ xn;  topk_idx, topk_w (K) = route(logits)
// Each block (8 warps) stages xn in shared memory; one warp per expert computes u^T e_i (warp_dot).
// Then the last block to finish picks the experts: each block counts itself on a ticket (atomicAdd
// after a __threadfence, so its affinities are visible first); the block that draws gridDim.x - 1
// knows all E affinities are written, resets the ticket for the next layer, and runs route_token
// with its first warp. One launch instead of two saves one kernel boundary per layer.
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

// The first half of every FFN_i of eq. (20) at decode (dsv2.c's ffn up to the SwiGLU, for the K routed
// experts of moe_ffn and the shared experts, or a dense layer's FFN), reading only the chosen experts' rows:
//   hb (K, mi):  hb[k][r] = silu(gate_e[r] . x) * (up_e[r] . x),  e = idx[k]   (expert_gate/up (E, mi, dim))
//   hbs (ws):    the same for the shared experts' (or the dense FFN's) ws rows  (Wsg, Wsu (ws, dim))
// Work item j < K * mi is routed slot k = j / mi, row r = j % mi; item j >= K * mi is shared row j - K * mi.
// One warp per item: the gate and up rows loaded together (warp_dot2, 16-byte loads). One block: stages
// x (dim) in shared memory, its warps stride over the items. The grid is one wave of the GPU (no idle
// blocks, no partial last wave). The shared rows do not depend on the router: each warp prefetches
// its shared rows into L2 before pdl_wait.
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
// P: the shared row's pieces (see moe_down_kernel)
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
