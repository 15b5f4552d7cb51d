// dsv2_bench.cuh: ./dsv2cu --bench MODEL, included by dsv2.cu (tools/bench_cuda.sh runs it).
// Self-checks first (GPU against dsv2.c's CPU forward on this model, prefill against decode,
// the MLA kernel against a float64 reference), then the timings, one "BENCH key value" line each;
// last the batch attention over a paged cache (dsv2_mla_decode.cuh), checked and timed.
// ./dsv2cu --bench-attn [CTX] runs only that last part, on V2-Lite's and V2's attention shapes, no model needed.
// Options that run one part and stop: --checks-only 1 (the self-checks), --decode-only N (N decode steps, for a
// profiler), --mla-only 1, --moe-only 1|2|3, --ablate CTX (the decode step without each kernel in turn: bench_ablate),
// --timeline CTX (dsv2cu_timeline only: the decode step block by block, bench_timeline).

static double median(std::vector<double> v) { std::sort(v.begin(), v.end()); return v[v.size() / 2]; }

// the median milliseconds of run(i) over reps calls, after skip warm-up calls: each one timed alone by two
// events on the GPU stream (what run(i) enqueues there, from the first launch to the last kernel's end)
template <typename F> static double median_ms(int skip, int reps, F run) {
    cudaEvent_t e0, e1;
    cudaCheck(cudaEventCreate(&e0));
    cudaCheck(cudaEventCreate(&e1));
    std::vector<double> t;
    for (int i = 0; i < skip + reps; i++) {
        cudaCheck(cudaEventRecord(e0, gpu.stream));
        run(i);
        cudaCheck(cudaEventRecord(e1, gpu.stream));
        cudaCheck(cudaEventSynchronize(e1));
        float ms;
        cudaCheck(cudaEventElapsedTime(&ms, e0, e1));
        if (i >= skip) t.push_back(ms);
    }
    cudaCheck(cudaEventDestroy(e0));
    cudaCheck(cudaEventDestroy(e1));
    return median(t);
}

// max |a - b| / max |b|; infinite if either holds a NaN or an infinity (fmax would skip a NaN)
static double rel_err_f(const float *a, const float *b, size_t n) {
    double d = 0, r = 0;
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(a[i]) || !isfinite(b[i])) return INFINITY;
        d = fmax(d, fabs((double)a[i] - b[i])); r = fmax(r, fabs((double)b[i]));
    }
    return r > 0 ? d / r : INFINITY;  // all-zero logits are not a pass either
}

// fill n floats with a hash of (i, seed): values in [-scale, scale) (never zeros: see METHOD.md)
__global__ void fill_random_kernel(float *p, size_t n, uint32_t seed, float scale) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        uint32_t h = (uint32_t)i * 2654435761u ^ seed;
        h ^= h >> 15; h *= 2246822519u; h ^= h >> 13; h *= 3266489917u; h ^= h >> 16;
        p[i] = ((h >> 8) / 16777216.0f * 2.0f - 1.0f) * scale;
    }
}
static void fill_random(float *p, size_t n, uint32_t seed, float scale) {
    fill_random_kernel<<<1024, 256, 0, gpu.stream>>>(p, n, seed, scale);
    launchCheck();
}

// bytes one decode step must read at context n_ctx: every weight it touches once, plus the cache
static double decode_bytes(const Config *c, long n_ctx) {
    double dim = c->dim, H = c->n_heads, W = kv_cache_width(c), qk = c->qk_nope_head_dim + c->qk_rope_head_dim;
    double per_layer_attn = (c->q_lora_rank ? c->q_lora_rank * dim + H * qk * c->q_lora_rank : H * qk * dim) + W * dim +
                            H * (c->qk_nope_head_dim + c->v_head_dim) * c->kv_lora_rank + dim * H * c->v_head_dim;
    double total = dim + c->vocab_size * dim;  // the embedding row, lm_head
    for (int l = 0; l < c->n_layers; l++) {
        total += per_layer_attn;
        if (is_moe_layer(c, l))
            total += c->n_routed_experts * dim + 3.0 * dim * c->moe_intermediate_size * (c->n_experts_per_tok + c->n_shared_experts);
        else total += 3.0 * dim * c->intermediate_size;
    }
    return total * 2 + (double)c->n_layers * n_ctx * W * 4;  // bf16 weights, float32 cache
}

// 3. copy bandwidth: device-to-device memcpy of 1 GiB, bytes read + written
static double bench_copy_bandwidth(void) {
    double copy_gbs;
    size_t n = (size_t)1 << 30;
    void *a, *b;
    cudaCheck(cudaMalloc(&a, n));
    cudaCheck(cudaMalloc(&b, n));
    cudaCheck(cudaMemset(a, 1, n));
    double ms = median_ms(3, 10, [&](int) { cudaCheck(cudaMemcpyAsync(b, a, n, cudaMemcpyDeviceToDevice, gpu.stream)); });
    copy_gbs = 2.0 * n / (ms * 1e-3) / 1e9;
    printf("BENCH copy_bandwidth_GBps %.1f\n", copy_gbs);
    cudaCheck(cudaFree(a));
    cudaCheck(cudaFree(b));
    return copy_gbs;
}

// 6. the MLA decode kernel alone: B sequences of L rows, the model's heads, own cache each
static void bench_mla_kernel(const Config *c, int ctx_max, double copy_gbs, uint64_t *rng_state) {
    uint64_t rng = *rng_state;
    int B = 64, L = ctx_max, H = c->n_heads, W = gpu.W, d_c = c->kv_lora_rank, n_split = ceil_div(L, 256);
    float *cache = dev_floats((size_t)B * L * W);
    float *q = dev_floats((size_t)B * H * W), *o = dev_floats((size_t)B * H * d_c);
    float *po = gpu.part_o, *pml = gpu.part_ml;  // the attention's partial results: make room for B sequences
    gpu.part_o = dev_floats((size_t)B * n_split * ceil_div(H, MLA_HEADS) * MLA_HEADS * d_c);
    gpu.part_ml = dev_floats((size_t)B * n_split * ceil_div(H, MLA_HEADS) * MLA_HEADS * 2);
    int *lens = dev_ints(B);
    std::vector<int> hl(B, L);
    cudaCheck(cudaMemcpy(lens, hl.data(), B * sizeof(int), cudaMemcpyHostToDevice));
    fill_random(cache, (size_t)B * L * W, 99, 1.0f);
    std::vector<float> hq((size_t)B * H * W);
    for (auto &v : hq) v = (random_f32(&rng) * 2 - 1) * 0.1f;
    cudaCheck(cudaMemcpy(q, hq.data(), hq.size() * 4, cudaMemcpyHostToDevice));
    cudaCheck(cudaMemset(o, 0xff, (size_t)B * H * d_c * 4));  // poison: NaN unless written
    double scale = gpu.softmax_scale;
    double ms = median_ms(3, 20, [&](int) { mla_attention_forward(o, q, cache, (size_t)L * W, lens, NULL, 0, B, n_split); });
    double bytes = (double)B * L * W * 4, gbs = bytes / (ms * 1e-3) / 1e9;
    // check two sequences against a float64 reference: max |o - ref| / max |ref| over sequence b's heads, its
    // first len rows (ho: the kernel's o of that sequence, H x d_c)
    std::vector<float> hc((size_t)L * W);
    std::vector<float> ho((size_t)B * H * d_c);
    auto err_vs_float64 = [&](int b, int len, const float *ho_b) {
        double worst = 0;
        for (int h = 0; h < H; h++) {
            const float *qh = hq.data() + ((size_t)b * H + h) * W;
            std::vector<double> sc(len), ref(d_c, 0.0);
            double mx = -1e300, sum = 0;
            for (int j = 0; j < len; j++) {
                double d = 0;
                for (int k = 0; k < W; k++) d += (double)qh[k] * hc[(size_t)j * W + k];
                sc[j] = d * scale; mx = fmax(mx, sc[j]);
            }
            for (int j = 0; j < len; j++) { sc[j] = exp(sc[j] - mx); sum += sc[j]; }
            for (int j = 0; j < len; j++) for (int k = 0; k < d_c; k++) ref[k] += sc[j] / sum * hc[(size_t)j * W + k];
            double dm = 0, rm = 0;
            for (int k = 0; k < d_c; k++) {
                double g = ho_b[(size_t)h * d_c + k];
                dm = std::isnan(g) ? 1e30 : fmax(dm, fabs(g - ref[k])); rm = fmax(rm, fabs(ref[k]));
            }
            worst = fmax(worst, dm / rm);
        }
        return worst;
    };
    cudaCheck(cudaMemcpy(ho.data(), o, ho.size() * 4, cudaMemcpyDeviceToHost));
    double worst = 0;
    for (int b : {0, B - 1}) {
        cudaCheck(cudaMemcpy(hc.data(), cache + (size_t)b * L * W, hc.size() * 4, cudaMemcpyDeviceToHost));
        worst = fmax(worst, err_vs_float64(b, L, ho.data() + (size_t)b * H * d_c));
    }
    // float32 accuracy expected (3xTF32 on the tensor cores): 1e-5 is well above float32 rounding, far below tf32's ~1e-3
    printf("BENCH check_mla_kernel_vs_float64 max_rel_err %.3e %s\n", worst, worst < 1e-5 ? "OK" : "NOT OK");
    printf("BENCH mla_kernel batch %d ctx %d heads %d ms %.3f GBps %.1f ratio_to_copy %.3f\n", B, L, H, ms, gbs,
           gbs / copy_gbs);
    cudaCheck(cudaFree(gpu.part_o)); cudaCheck(cudaFree(gpu.part_ml));
    gpu.part_o = po; gpu.part_ml = pml;
    // the decode step's attention (decode_step's call: one sequence of *pos + 1 rows, gpu.dec_splits splits) on
    // sequence B - 1's cache (hc) at lengths of one tile, several splits, and several tiles a split
    int *pos = dev_ints(1);
    worst = 0;
    for (int len : {1, 33, 1000, 4099, L}) {
        if (len > L) continue;
        int p = len - 1;
        cudaCheck(cudaMemcpy(pos, &p, sizeof(int), cudaMemcpyHostToDevice));
        cudaCheck(cudaMemset(o, 0xff, (size_t)H * d_c * 4));
        mla_attention_forward(o, q + (size_t)(B - 1) * H * W, cache + (size_t)(B - 1) * L * W, 0, NULL, pos, 0, 1, gpu.dec_splits);
        cudaCheck(cudaMemcpy(ho.data(), o, (size_t)H * d_c * 4, cudaMemcpyDeviceToHost));
        double e = err_vs_float64(B - 1, len, ho.data());
        printf("BENCH check_decode_attention_vs_float64 len %d splits %d max_rel_err %.3e %s\n", len, gpu.dec_splits, e,
               e < 1e-5 ? "OK" : "NOT OK");
        worst = fmax(worst, e);
    }
    cudaCheck(cudaFree(pos));
    cudaCheck(cudaFree(cache)); cudaCheck(cudaFree(q)); cudaCheck(cudaFree(o)); cudaCheck(cudaFree(lens));
}

// 7. the MoE over a batch of tokens (moe_batch_forward, dsv2_moe.cuh) on the model's first MoE layer.
// Checks, for T random tokens: against dsv2.c's moe_ffn on the CPU (the FFN's output x_after - x_before,
// max relative error, on all T tokens or MOE_CPU_TOKENS of them spread over the batch; the same experts
// chosen), against all T tokens one at a time through the decode kernels (moe_router/gate_up/down: CUDA
// cores, float32), deterministic (two runs bitwise equal), and a CUDA graph of it equal to the direct
// launches; each for the shape chosen by T and for every shape (moe_shapes). A dense layer too, when the
// model has one. A shape that fails a check is marked in moe_shape_failed, so moe_shape_for no longer
// picks it. Timings: graph replays at several T, every shape, against the same tokens one at a time
// through the decode kernels, in one graph; bytes = the weights the step must read (router, the chosen
// experts once, the shared experts). --moe-only 1 runs this section alone (after the copy bandwidth),
// --moe-only 2 its checks alone, --moe-only 3 its checks and then the sweep: every shape at T = 1 ... 2048
// (MoE layer) and T = 16 ... 2048 (dense layer), checked and timed, one line per (shape, T), then the
// fastest shape that passed at each T: what moe_shapes' thresholds are set from.
#define MOE_CPU_TOKENS 256

// T random tokens through layer l (MoE or dense): the input, and what a batched run must give
typedef struct {
    int l, T, K;
    std::vector<float> h;    // the residual (T, dim) before the FFN; xn = RMSNorm(h) sits on the device
    std::vector<int> sub;    // the tokens dsv2.c computes: all, or MOE_CPU_TOKENS spread evenly over T
    std::vector<float> ref;  // dsv2.c's moe_ffn (dense_ffn) output for the tokens sub (sub.size(), dim)
    std::vector<int> ref_idx;  // and its experts (sub.size(), K)
    std::vector<float> one;  // the decode kernels' FFN output, token by token (T, dim): x after - x before
    std::vector<int> one_idx;  // and their experts (T, K)
} MoeCase;

// draws the case, runs dsv2.c and the decode kernels on it, leaves xn (T, dim) in dxn
static void moe_case_init(MoeCase *mc, const Model *m, RunState *s, int l, int T, float *dx, float *dxn, uint64_t *rng) {
    const Config *c = &m->config;
    const GpuLayer *L = &gpu.layers[l];
    int dim = c->dim, K = L->is_moe ? c->n_experts_per_tok : 0, ns = std::min(T, MOE_CPU_TOKENS);
    size_t n = (size_t)T * dim;
    mc->l = l; mc->T = T; mc->K = K;
    mc->h.resize(n);
    std::vector<float> u(n);
    for (auto &v : mc->h) v = (random_f32(rng) * 2 - 1) * 0.1f;
    for (int t = 0; t < T; t++)
        rmsnorm(u.data() + (size_t)t * dim, mc->h.data() + (size_t)t * dim, m->layers[l].post_attention_layernorm, dim, c->rms_norm_eps);
    mc->sub.resize(ns);
    for (int i = 0; i < ns; i++) mc->sub[i] = (int)((long)i * T / ns);
    mc->ref.resize((size_t)ns * dim);
    mc->ref_idx.resize((size_t)ns * K);
    for (int i0 = 0; i0 < ns; i0 += s->max_T) {  // dsv2.c's moe_ffn (dense_ffn), max_T tokens at a time
        int tc = std::min(s->max_T, ns - i0);
        for (int i = 0; i < tc; i++) memcpy(s->u + (size_t)i * dim, u.data() + (size_t)mc->sub[i0 + i] * dim, dim * sizeof(float));
        if (L->is_moe) moe_ffn(m, s, l, tc);
        else dense_ffn(m, s, l, tc);
        memcpy(mc->ref.data() + (size_t)i0 * dim, s->ffn_out, (size_t)tc * dim * sizeof(float));
        memcpy(mc->ref_idx.data() + (size_t)i0 * K, s->topk_idx, (size_t)tc * K * sizeof(int));
    }
    cudaCheck(cudaMemcpy(dxn, u.data(), n * 4, cudaMemcpyHostToDevice));
    // the same tokens one at a time through the decode kernels (x: the residual, normalised by the router)
    cudaCheck(cudaMemcpy(dx, mc->h.data(), n * 4, cudaMemcpyHostToDevice));
    mc->one_idx.resize((size_t)T * K);
    for (int t = 0; t < T; t++) {
        float *xt = dx + (size_t)t * dim;
        ffn_decode_forward(xt, L);
        if (K) cudaCheck(cudaMemcpy(mc->one_idx.data() + (size_t)t * K, gpu.topk_idx, K * sizeof(int), cudaMemcpyDeviceToHost));
    }
    mc->one.resize(n);
    cudaCheck(cudaMemcpy(mc->one.data(), dx, n * 4, cudaMemcpyDeviceToHost));
    for (size_t i = 0; i < n; i++) mc->one[i] -= mc->h[i];
}

typedef struct { double e_cpu, e_one; int same_cpu, same_one, det, ok; } MoeCheck;

// the case through moe_batch_forward with shape v (-1: the one moe_shape_for picks), twice
static MoeCheck moe_case_check(const MoeCase *mc, int v, float *dx, const float *dxn) {
    const GpuLayer *L = &gpu.layers[mc->l];
    int dim = gpu.c.dim, T = mc->T, K = mc->K, ns = (int)mc->sub.size();
    size_t n = (size_t)T * dim;
    std::vector<float> got(n), got2(n), gsub((size_t)ns * dim);
    std::vector<int> got_idx((size_t)T * K);
    int used = v >= 0 ? v : moe_shape_for(T, K, gpu.c.n_routed_experts, L->is_moe);
    moe_batch.shape = v;
    for (int run = 0; run < 2; run++) {  // twice: bitwise the same
        cudaCheck(cudaMemcpy(dx, mc->h.data(), n * 4, cudaMemcpyHostToDevice));
        moe_batch_forward(dx, dxn, L, T);
        cudaCheck(cudaMemcpy(run ? got2.data() : got.data(), dx, n * 4, cudaMemcpyDeviceToHost));
    }
    moe_batch.shape = -1;
    cudaCheck(cudaMemcpy(got_idx.data(), moe_batch.idx, got_idx.size() * 4, cudaMemcpyDeviceToHost));
    MoeCheck r = {};
    r.det = !memcmp(got.data(), got2.data(), n * 4);
    for (size_t i = 0; i < n; i++) got[i] -= mc->h[i];
    for (int i = 0; i < ns; i++) {
        int t = mc->sub[i];
        memcpy(gsub.data() + (size_t)i * dim, got.data() + (size_t)t * dim, dim * sizeof(float));
        r.same_cpu += !memcmp(got_idx.data() + (size_t)t * K, mc->ref_idx.data() + (size_t)i * K, K * sizeof(int));
    }
    for (int t = 0; t < T; t++) r.same_one += !memcmp(got_idx.data() + (size_t)t * K, mc->one_idx.data() + (size_t)t * K, K * sizeof(int));
    r.e_cpu = rel_err_f(gsub.data(), mc->ref.data(), gsub.size());
    r.e_one = rel_err_f(got.data(), mc->one.data(), n);
    // float32 accuracy: 1e-5 of the output's scale is far above float32 rounding and far below a bf16 error (~4e-3)
    r.ok = r.e_cpu < 1e-5 && r.e_one < 1e-5 && r.same_cpu == ns && r.same_one == T && r.det;
    if (!r.ok) moe_shape_failed[used] = 1;
    return r;
}

// a shape moe_shape_for may pick (the others are measured, never chosen)
static int moe_shape_used(int v) { return v <= 0 || moe_shapes[v].moe_from != MOE_NEVER || moe_shapes[v].dense_from != MOE_NEVER; }

// one check: T random tokens through layer l (MoE or dense), every shape; returns 1 when all that may be chosen pass
static int check_moe_batch(const Model *m, RunState *s, int l, int T, float *dx, float *dxn, uint64_t *rng) {
    const GpuLayer *L = &gpu.layers[l];
    MoeCase mc;
    moe_case_init(&mc, m, s, l, T, dx, dxn, rng);
    int all_ok = 1;
    for (int v = -1; v < MOE_N_SHAPES; v++) {  // the shape chosen by T, then each shape
        MoeCheck r = moe_case_check(&mc, v, dx, dxn);
        if (moe_shape_used(v)) all_ok &= r.ok;
        printf("BENCH check_moe_batch layer %d (%s) T %d shape %d vs_cpu max_rel_err %.3e (%d tokens) experts_same %d/%d "
               "vs_decode max_rel_err %.3e experts_same %d/%d deterministic %d %s%s\n", l, L->is_moe ? "moe" : "dense", T, v,
               r.e_cpu, (int)mc.sub.size(), r.same_cpu, (int)mc.sub.size(), r.e_one, r.same_one, T, r.det,
               r.ok ? "OK" : "NOT OK", moe_shape_used(v) ? "" : " (a shape never chosen)");
    }
    fflush(stdout);
    return all_ok;
}

// median ms of a CUDA graph of moe_batch_forward (shape v) over 10 replays after 3
static double time_moe_batch(const GpuLayer *L, int T, int v, float *dx, const float *dxn) {
    moe_batch.shape = v;
    cudaGraphExec_t exec = capture_graph([&] { moe_batch_forward(dx, dxn, L, T); });
    moe_batch.shape = -1;
    double ms = median_ms(3, 10, [&](int) { cudaCheck(cudaGraphLaunch(exec, gpu.stream)); });
    cudaCheck(cudaGraphExecDestroy(exec));
    return ms;
}

// the sweep (--moe-only 3): layer l, every shape at each T: checked, timed, one line each; then the fastest that passed
static void sweep_moe_shapes(const Model *m, RunState *s, int l, const std::vector<int> &Ts, double copy_gbs, float *dx,
                             float *dxn, uint64_t *rng) {
    const Config *c = &m->config;
    const GpuLayer *L = &gpu.layers[l];
    int moe = L->is_moe, dim = c->dim, E = moe ? c->n_routed_experts : 0, K = moe ? c->n_experts_per_tok : 0;
    double mi = c->moe_intermediate_size, ws = L->ffn_width;
    for (int T : Ts) {
        MoeCase mc;
        double t0 = now_s();
        moe_case_init(&mc, m, s, l, T, dx, dxn, rng);
        double cpu_s = now_s() - t0;
        std::vector<char> chosen(E, 0);
        for (int e : mc.one_idx) chosen[e] = 1;
        int n_chosen = 0;
        for (char ch : chosen) n_chosen += ch;
        // bytes: the router, each chosen expert once, the shared experts (or the dense FFN); FLOPs: 2 per product
        double bytes = 2.0 * ((double)E * dim + 3.0 * dim * mi * n_chosen + 3.0 * dim * ws);
        double route_flop = 2.0 * T * E * dim, ffn_flop = 2.0 * T * 3.0 * dim * (mi * K + ws);
        int best = -1;
        double best_ms = 0;
        for (int v = 0; v < MOE_N_SHAPES; v++) {
            const MoeShape *sh = &moe_shapes[v];
            MoeCheck r = moe_case_check(&mc, v, dx, dxn);
            double ms = time_moe_batch(L, T, v, dx, dxn), gbs = bytes / (ms * 1e-3) / 1e9;
            double tflops = (route_flop + ffn_flop) / (ms * 1e-3) / 1e12;
            double tensor = (3 * route_flop + sh->parts * ffn_flop) / (ms * 1e-3) / 1e12;  // with the split's parts
            printf("BENCH moe_sweep layer %d (%s) T %d shape %d (NG %d KS %d flush %d parts %d) ms %.4f GBps %.1f "
                   "of_copy %.3f TFLOPs %.1f tensor_TFLOPs %.1f vs_cpu %.3e (%d tokens) experts_same %d/%d vs_decode %.3e "
                   "deterministic %d %s%s\n", l, moe ? "moe" : "dense", T, v, sh->NG, sh->KS, sh->flush, sh->parts, ms, gbs,
                   gbs / copy_gbs, tflops, tensor, r.e_cpu, (int)mc.sub.size(), r.same_cpu, (int)mc.sub.size(), r.e_one,
                   r.det, r.ok ? "OK" : "NOT OK", moe_shape_used(v) ? "" : " (never chosen)");
            fflush(stdout);
            if (r.ok && (best < 0 || ms < best_ms)) { best = v; best_ms = ms; }
        }
        int pick = moe_shape_for(T, K, c->n_routed_experts, moe);
        printf("BENCH moe_sweep_best layer %d (%s) T %d rows_per_group %.1f fastest_ok_shape %d ms %.4f | moe_shape_for %d "
               "(cpu reference %.1f s)\n", l, moe ? "moe" : "dense", T, moe ? (double)T * K / E : (double)T, best, best_ms,
               pick, cpu_s);
        fflush(stdout);
    }
}

static void bench_moe_batch(const Model *m, double copy_gbs, int mode) {
    const Config *c = &m->config;
    int l = 0;
    while (l < c->n_layers && !is_moe_layer(c, l)) l++;
    if (l == c->n_layers) { printf("SKIPPED: moe_batch: the model has no MoE layer\n"); return; }
    const GpuLayer *L = &gpu.layers[l];
    int dim = c->dim, K = c->n_experts_per_tok, E = c->n_routed_experts, mi = c->moe_intermediate_size;
    int max_T = PF_MAX;
    moe_batch_init(c, max_T);
    float *dx = dev_floats((size_t)max_T * dim), *dxn = dev_floats((size_t)max_T * dim);
    uint64_t rng = 4242;
    RunState s;
    runstate_init(&s, c, 160);
    int all_ok = 1;
    for (int T : {1, 3, 16, 64, 256}) all_ok &= check_moe_batch(m, &s, l, T, dx, dxn, &rng);
    if (!is_moe_layer(c, 0)) all_ok &= check_moe_batch(m, &s, 0, 16, dx, dxn, &rng);  // a dense layer too
    // a CUDA graph of moe_batch_forward gives what the direct launches give (the shape chosen by T)
    for (int T : {64, 512}) {
        size_t n = (size_t)T * dim;
        std::vector<float> a(n), b(n);
        fill_random(dxn, n, 5, 1.7f);
        fill_random(dx, n, 6, 0.1f);
        moe_batch_forward(dx, dxn, L, T);
        cudaCheck(cudaMemcpy(a.data(), dx, n * 4, cudaMemcpyDeviceToHost));
        fill_random(dx, n, 6, 0.1f);
        cudaGraphExec_t exec = capture_graph([&] { moe_batch_forward(dx, dxn, L, T); });
        cudaCheck(cudaGraphLaunch(exec, gpu.stream));
        cudaCheck(cudaMemcpy(b.data(), dx, n * 4, cudaMemcpyDeviceToHost));
        int same = !memcmp(a.data(), b.data(), n * 4);
        printf("BENCH check_moe_batch_graph T %d shape %d bitwise_equal %d %s\n", T, moe_shape_for(T, K, E, 1), same,
               same ? "OK" : "NOT OK");
        all_ok &= same;
        cudaCheck(cudaGraphExecDestroy(exec));
    }
    printf("BENCH check_moe_batch_all %s\n", all_ok ? "OK" : "NOT OK");
    printf("BENCH moe_shape_failed");
    for (int v = 0; v < MOE_N_SHAPES; v++) printf(" %d", moe_shape_failed[v]);
    printf("\n");
    fflush(stdout);
    if (mode == 3) {  // the sweep
        sweep_moe_shapes(m, &s, l, {1, 8, 64, 256, 512, 1024, 2048}, copy_gbs, dx, dxn, &rng);
        if (!is_moe_layer(c, 0)) sweep_moe_shapes(m, &s, 0, {16, 128, 512, 2048}, copy_gbs, dx, dxn, &rng);
        printf("BENCH moe_shape_failed");
        for (int v = 0; v < MOE_N_SHAPES; v++) printf(" %d", moe_shape_failed[v]);
        printf("\n");
    }
    runstate_free(&s);
    if (mode != 1) { cudaCheck(cudaFree(dx)); cudaCheck(cudaFree(dxn)); return; }
    // timings
    for (int T : {1, 8, 64, 256, 512, 2048}) {
        size_t n = (size_t)T * dim;
        fill_random(dxn, n, 100 + T, 1.7f);
        fill_random(dx, n, 200 + T, 0.1f);
        double ms = time_moe_batch(L, T, -1, dx, dxn);
        std::vector<double> shape_ms;
        for (int v = 0; v < MOE_N_SHAPES; v++) shape_ms.push_back(time_moe_batch(L, T, v, dx, dxn));
        // the weights this step must read: the router, each chosen expert once, the shared experts
        std::vector<int> idx((size_t)T * K);
        cudaCheck(cudaMemcpy(idx.data(), moe_batch.idx, idx.size() * 4, cudaMemcpyDeviceToHost));
        std::vector<char> chosen(E, 0);
        for (int e : idx) chosen[e] = 1;
        int n_chosen = 0;
        for (char ch : chosen) n_chosen += ch;
        double bytes = 2.0 * ((double)E * dim + 3.0 * dim * mi * n_chosen + 3.0 * dim * L->ffn_width);
        // the same T tokens one at a time through the decode kernels (one graph of T x 3 launches)
        double one_ms = 0;
        if (T <= 512) {
            cudaGraphExec_t exec = capture_graph([&] {
                for (int t = 0; t < T; t++) ffn_decode_forward(dx + (size_t)t * dim, L);
            });
            one_ms = median_ms(1, 4, [&](int) { cudaCheck(cudaGraphLaunch(exec, gpu.stream)); });
            cudaCheck(cudaGraphExecDestroy(exec));
        }
        double gbs = bytes / (ms * 1e-3) / 1e9;
        int sh = moe_shape_for(T, K, E, 1);
        printf("BENCH moe_batch T %d ms %.4f shape %d (NG %d, KS %d, flush %d, parts %d) experts_read %d/%d weight_bytes %.0f "
               "GBps %.1f ratio_to_copy %.3f one_at_a_time_ms %.4f speedup %.2f | shape_ms", T, ms, sh, moe_shapes[sh].NG,
               moe_shapes[sh].KS, moe_shapes[sh].flush, moe_shapes[sh].parts, n_chosen, E, bytes, gbs, gbs / copy_gbs,
               one_ms, one_ms > 0 ? one_ms / ms : 0.0);
        for (double v : shape_ms) printf(" %.4f", v);
        printf("\n");
        fflush(stdout);
    }
    cudaCheck(cudaFree(dx)); cudaCheck(cudaFree(dxn));
}

// ---------------- 8. The batch attention over a paged cache (dsv2_mla_decode.cuh): checks and speed

// the same hash as fill_random_kernel, rounded to bf16 (round to nearest even)
__global__ void fill_random_bf16_kernel(bf16 *p, size_t n, uint32_t seed, float scale) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        uint32_t h = (uint32_t)i * 2654435761u ^ seed;
        h ^= h >> 15; h *= 2246822519u; h ^= h >> 13; h *= 3266489917u; h ^= h >> 16;
        p[i] = __float2bfloat16_rn(((h >> 8) / 16777216.0f * 2.0f - 1.0f) * scale);
    }
}

// One case: B queries with lengths lens over a random paged pool of the given layout and element type:
// each query its own slot (a random permutation of slots 1..B), or all queries on one slot (one_slot: a
// prefill, query b sees rows 0..lens[b]-1 of the same sequence); the slots' pages a random permutation
// of the pool's blocks (block 0, the scratch block, unused); the unused rows of every last page NaN, so
// reading past a length fails the check. The output is poisoned (NaN), computed, and the queries
// `check` compared with a float64 host reference (all heads; max |diff| / max |ref| per head); a NaN
// anywhere in the output also fails. With reps > 0, *ms = median time of reps launches (after one warm-up).
static double attn_case(const Config *c, int mha, int kv_bf16, const std::vector<int> &lens, int one_slot,
                        const std::vector<int> &check, int reps, double *ms, double *bytes, uint64_t *rng) {
    int B = (int)lens.size(), H = c->n_heads, W = gpu.W, d_c = c->kv_lora_rank, vdim = c->v_head_dim;
    int qk = c->qk_nope_head_dim + c->qk_rope_head_dim, max_len = *std::max_element(lens.begin(), lens.end());
    int row = mha ? H * (qk + vdim) : W, qw = mha ? qk : W, ow = mha ? vdim : d_c, es = kv_bf16 ? 2 : 4;
    int n_slots = one_slot ? 2 : B + 1, max_blocks = ceil_div(max_len, KV_BLOCK), n_used = 0;
    std::vector<int> seq_of(B), slot_len(n_slots, 0);
    for (int b = 0; b < B; b++) seq_of[b] = one_slot ? 1 : b + 1;
    for (int b = B - 1; b > 0 && !one_slot; b--) std::swap(seq_of[b], seq_of[random_u32(rng) % (b + 1)]);
    for (int b = 0; b < B; b++) slot_len[seq_of[b]] = std::max(slot_len[seq_of[b]], lens[b]);
    for (int s = 1; s < n_slots; s++) n_used += ceil_div(slot_len[s], KV_BLOCK);
    std::vector<int> perm(n_used), tab((size_t)n_slots * max_blocks, 0);
    for (int i = 0; i < n_used; i++) perm[i] = i + 1;
    for (int i = n_used - 1; i > 0; i--) std::swap(perm[i], perm[random_u32(rng) % (i + 1)]);
    for (int s = 1, u = 0; s < n_slots; s++)
        for (int j = 0; j < ceil_div(slot_len[s], KV_BLOCK); j++) tab[(size_t)s * max_blocks + j] = perm[u++];
    size_t row_bytes = (size_t)row * es, block_bytes = row_bytes * KV_BLOCK, n_pool = (size_t)(n_used + 1) * KV_BLOCK * row;
    void *pool;
    cudaCheck(cudaMalloc(&pool, n_pool * es));
    if (kv_bf16) fill_random_bf16_kernel<<<1024, 256, 0, gpu.stream>>>((bf16 *)pool, n_pool, random_u32(rng), 1.0f);
    else fill_random_kernel<<<1024, 256, 0, gpu.stream>>>((float *)pool, n_pool, random_u32(rng), 1.0f);
    launchCheck();
    for (int s = 1; s < n_slots; s++) {  // NaN past the end of each slot's rows
        int j = slot_len[s], blk = tab[(size_t)s * max_blocks + (j - 1) / KV_BLOCK];
        if (j % KV_BLOCK)
            cudaCheck(cudaMemsetAsync((char *)pool + blk * block_bytes + (j % KV_BLOCK) * row_bytes, 0xff,
                                      (KV_BLOCK - j % KV_BLOCK) * row_bytes, gpu.stream));
    }
    float *q = dev_floats((size_t)B * H * qw), *o = dev_floats((size_t)B * H * ow);
    int *d_tab = dev_ints(tab.size()), *d_seq = dev_ints(B), *d_lens = dev_ints(B);
    std::vector<float> hq((size_t)B * H * qw);
    for (auto &v : hq) v = random_f32(rng) * 2 - 1;
    cudaCheck(cudaMemcpy(q, hq.data(), hq.size() * 4, cudaMemcpyHostToDevice));
    cudaCheck(cudaMemcpy(d_tab, tab.data(), tab.size() * sizeof(int), cudaMemcpyHostToDevice));
    cudaCheck(cudaMemcpy(d_seq, seq_of.data(), B * sizeof(int), cudaMemcpyHostToDevice));
    cudaCheck(cudaMemcpy(d_lens, lens.data(), B * sizeof(int), cudaMemcpyHostToDevice));
    cudaCheck(cudaMemset(o, 0xff, (size_t)B * H * ow * 4));
    auto run = [&]() {
        if (mha) mha_decode_forward(o, q, pool, kv_bf16, d_tab, max_blocks, d_seq, d_lens, B);
        else mla_decode_forward(o, q, pool, kv_bf16, d_tab, max_blocks, d_seq, d_lens, B);
    };
    run();
    cudaCheck(cudaStreamSynchronize(gpu.stream));
    std::vector<float> ho((size_t)B * H * ow);
    cudaCheck(cudaMemcpy(ho.data(), o, ho.size() * 4, cudaMemcpyDeviceToHost));
    double worst = 0;
    for (float v : ho)
        if (!std::isfinite(v)) worst = INFINITY;
    for (int b : check) {  // the float64 reference of query b: its slot's rows, page by page
        int len = lens[b];
        std::vector<float> rows((size_t)len * row);
        std::vector<uint16_t> tmp((size_t)KV_BLOCK * row);
        for (int j0 = 0; j0 < len; j0 += KV_BLOCK) {
            int n = std::min(KV_BLOCK, len - j0), blk = tab[(size_t)seq_of[b] * max_blocks + j0 / KV_BLOCK];
            if (kv_bf16) {
                cudaCheck(cudaMemcpy(tmp.data(), (char *)pool + blk * block_bytes, n * row_bytes, cudaMemcpyDeviceToHost));
                for (size_t i = 0; i < (size_t)n * row; i++) { uint32_t u = (uint32_t)tmp[i] << 16; memcpy(&rows[(size_t)j0 * row + i], &u, 4); }
            } else {
                cudaCheck(cudaMemcpy(&rows[(size_t)j0 * row], (char *)pool + blk * block_bytes, n * row_bytes, cudaMemcpyDeviceToHost));
            }
        }
        #pragma omp parallel for reduction(max : worst)
        for (int h = 0; h < H; h++) {
            const float *qh = hq.data() + ((size_t)b * H + h) * qw;
            int koff = mha ? h * qk : 0, voff = mha ? H * qk + h * vdim : 0;  // key and value columns in a row
            std::vector<double> p(len), ref(ow, 0.0);
            double mx = -1e300, sum = 0;
            for (int j = 0; j < len; j++) {
                double d = 0;
                for (int k = 0; k < qw; k++) d += (double)qh[k] * rows[(size_t)j * row + koff + k];
                p[j] = d * gpu.softmax_scale;
                mx = fmax(mx, p[j]);
            }
            for (int j = 0; j < len; j++) { p[j] = exp(p[j] - mx); sum += p[j]; }
            for (int j = 0; j < len; j++)
                for (int k = 0; k < ow; k++) ref[k] += p[j] / sum * rows[(size_t)j * row + voff + k];
            double dm = 0, rm = 0;
            for (int k = 0; k < ow; k++) {
                dm = fmax(dm, fabs(ho[((size_t)b * H + h) * ow + k] - ref[k]));
                rm = fmax(rm, fabs(ref[k]));
            }
            worst = fmax(worst, dm / rm);
        }
    }
    *bytes = 4.0 * B * H * (qw + ow);
    for (int b = 0; b < B && !one_slot; b++) *bytes += (double)lens[b] * row_bytes;  // each query's rows, once
    if (one_slot) *bytes += (double)max_len * row_bytes;                                // the one sequence's rows
    if (reps > 0) *ms = median_ms(1, reps, [&](int) { run(); });
    cudaCheck(cudaFree(pool)); cudaCheck(cudaFree(q)); cudaCheck(cudaFree(o));
    cudaCheck(cudaFree(d_tab)); cudaCheck(cudaFree(d_seq)); cudaCheck(cudaFree(d_lens));
    return worst;
}

// mla_decode_forward and mha_decode_forward on this config's heads: checks on mixed lengths (each layout,
// each element type, and a prefill's queries on one slot), then timings at 64 sequences x ctx (and mixed
// lengths averaging ctx, and a prefill's last 2048 queries of one ctx-long sequence); the MHA layout also
// at the largest batch whose cache fits 40 GB over all layers. A bf16 latent cache runs every kernel version
// (6, 7 and 7s: DSV2_MLA_VERSION's values, dsv2_mla_decode.cuh) on the same cases; the default is restored
// after. For the prefill's queries GB/s counts the sequence's rows once (each query reads them, from L2).
// TFLOP/s counts the attention's own products, 2 H (W + d_c) per row and query; mma_TFLOP/s what the
// tensor cores execute for them (version 6: two tf32 products each, version 7: three bf16 products).
static void bench_attn_decode(const Config *c, int ctx, double copy_gbs, uint64_t *rng) {
    int H = c->n_heads, qk = c->qk_nope_head_dim + c->qk_rope_head_dim, W = gpu.W, d_c = c->kv_lora_rank;
    int n_pf = std::min(ctx, 2048);  // a prefill chunk: PF_MAX queries
    attn_decode_init(c, std::max(300, n_pf), 2 * ctx);
    const int default_version = dec.mla_version, default_serial = dec.v7_serial;
    auto set_version = [](int vc) { dec.mla_version = vc == 6 ? 6 : 7; dec.v7_serial = vc == 70; };
    auto vname = [](int vc) { return vc == 6 ? "6" : vc == 7 ? "7" : "7s"; };
    const char *layout[2] = {"latent", "mha"}, *kv[2] = {"f32", "bf16"};
    std::vector<int> mixed = {1, 31, 33, 64, 65, 1000, 4099}, all = {0, 1, 2, 3, 4, 5, 6}, pf(300);
    for (int b = 0; b < 300; b++) pf[b] = b + 1;
    double ms, bytes;
    int v7_failed[2] = {0, 0};  // checks failed by versions 7 and 7s
    for (int mha = 0; mha <= 1; mha++)
        for (int bf = 0; bf <= 1; bf++)
            for (int version : {6, 7, 70}) {  // 70: 7s
                if (version != 6 && (mha || !bf)) continue;  // version 7: the bf16 latent cache only
                set_version(version);
                // float32 accuracy: 1e-5 is well above float32 rounding, far below a single tf32 product's ~1e-3
                double e = attn_case(c, mha, bf, mixed, 0, all, 0, &ms, &bytes, rng);
                printf("BENCH check_attn_vs_float64 layout %s kv %s version %s heads %d queries 7 lengths 1..4099 max_rel_err %.3e %s\n",
                       layout[mha], kv[bf], vname(version), H, e, e < 1e-5 ? "OK" : "NOT OK");
                v7_failed[version == 70] += version != 6 && !(e < 1e-5);
                e = attn_case(c, mha, bf, pf, 1, {0, 1, 150, 299}, 0, &ms, &bytes, rng);
                printf("BENCH check_attn_vs_float64 layout %s kv %s version %s heads %d prefill queries 300 on one slot max_rel_err %.3e %s\n",
                       layout[mha], kv[bf], vname(version), H, e, e < 1e-5 ? "OK" : "NOT OK");
                v7_failed[version == 70] += version != 6 && !(e < 1e-5);
                fflush(stdout);
            }
    std::vector<int> rnd(64), prefill(n_pf);
    for (auto &x : rnd) x = 1 + (int)(random_u32(rng) % (2 * ctx - 1));
    for (int b = 0; b < n_pf; b++) prefill[b] = ctx - n_pf + b + 1;
    for (int bf = 1; bf >= 0; bf--)
        for (int version : {7, 70, 6}) {
            if (version != 6 && !bf) continue;
            set_version(version);
            for (int which = 0; which < 3; which++) {  // 64 x ctx, 64 mixed, the prefill's queries on one slot
                const std::vector<int> &lens = which == 0 ? std::vector<int>(64, ctx) : which == 1 ? rnd : prefill;
                int B = (int)lens.size();
                double e = attn_case(c, 0, bf, lens, which == 2, {0, B - 1}, which == 2 ? 5 : 20, &ms, &bytes, rng);
                double gbs = bytes / (ms * 1e-3) / 1e9, rows = 0;
                for (int l : lens) rows += l;
                double tflops = 2.0 * H * (W + d_c) * rows / (ms * 1e-3) / 1e12, mma = tflops * (bf && version != 6 ? 3 : bf ? 2 : 3);
                char what[64];
                if (which == 2) snprintf(what, sizeof what, "prefill %d queries on one slot ctx %d", B, ctx);
                else snprintf(what, sizeof what, "batch 64 ctx %s%d", which ? "mixed_mean_" : "", ctx);
                printf("BENCH attn layout latent kv %s version %s heads %d %s ms %.3f GBps %.1f ratio_to_copy %.3f TFLOPs %.1f "
                       "mma_TFLOPs %.1f max_rel_err %.2e %s\n", kv[bf], vname(version), H, what, ms, gbs, gbs / copy_gbs, tflops, mma, e,
                       e < 1e-5 ? "OK" : "NOT OK");
                v7_failed[version == 70] += version != 6 && !(e < 1e-5);
                fflush(stdout);
            }
        }
    dec.mla_version = default_version;
    dec.v7_serial = default_serial;
    for (int i = 0; i < 2; i++)
        if (v7_failed[i])
            printf("BENCH VERSION %s FAILED %d checks at %d heads: do not use it (DSV2_MLA_VERSION=6, or MLA_DECODE_DEFAULT_VERSION 6 "
                   "in dsv2_mla_decode.cuh)\n", i ? "7s" : "7", v7_failed[i], H);
    for (int bf = 1; bf >= 0; bf--) {
        // the largest batch whose MHA cache (all layers, context ctx) fits 40 GB, and 64 (capped at 300)
        double per_seq = (double)c->n_layers * ctx * H * (qk + c->v_head_dim) * (bf ? 2 : 4);
        int fit = (int)(40e9 / per_seq);
        for (int B : {fit, 64, 4}) {
            if (B < 1 || B > 300 || (double)B * per_seq / c->n_layers > 30e9) continue;
            double e = attn_case(c, 1, bf, std::vector<int>(B, ctx), 0, {0, B - 1}, 10, &ms, &bytes, rng);
            double gbs = bytes / (ms * 1e-3) / 1e9;
            printf("BENCH attn layout mha kv %s heads %d batch %d%s ctx %d ms %.3f GBps %.1f ratio_to_copy %.3f max_rel_err %.2e %s\n",
                   kv[bf], H, B, B == fit ? " (fits_40GB)" : "", ctx, ms, gbs, gbs / copy_gbs, e, e < 1e-5 ? "OK" : "NOT OK");
            fflush(stdout);
        }
    }
}

// ./dsv2cu --bench-attn [CTX]: bench_attn_decode without a model file, on DeepSeek-V2-Lite's attention
// (16 heads, 27 layers) and DeepSeek-V2's (128 heads, 60 layers): d_c 512, d_h^R 64, nope 128, v 128,
// DeepSeek-V2's softmax scale (YaRN mscale^2 / sqrt(192), mscale = 0.1 ln 40 + 1); first the test fixture
// lite's odd shapes (4 heads, d_c 32, d_h^R 8, nope 16, v 12), which take the kernels' padded paths (quick)
static int bench_attn_main(int argc, char **argv) {
    int ctx = argc >= 1 ? atoi(argv[0]) : 8192;
    if (ctx < 64 || ctx > 65536) die("--bench-attn: context %s out of range (64..65536)", argc >= 1 ? argv[0] : "");
    cudaDeviceProp prop;
    cudaCheck(cudaGetDeviceProperties(&prop, 0));
    printf("BENCH device %s\n", prop.name);
    cudaCheck(cudaStreamCreate(&gpu.stream));
    cudaCheck(cudaDeviceGetAttribute(&gpu.n_sm, cudaDevAttrMultiProcessorCount, 0));
    gpu.pdl = getenv("DSV2_NO_PDL") == NULL;
    double mscale = 0.1 * log(40.0) + 1.0;
    gpu.softmax_scale = (float)(mscale * mscale / sqrt(192.0));
    double copy_gbs = bench_copy_bandwidth();
    uint64_t rng = 4242;
    for (int heads : {4, 16, 128}) {
        Config c;
        memset(&c, 0, sizeof c);
        c.n_heads = heads; c.n_layers = heads == 16 ? 27 : 60;
        c.kv_lora_rank = 512; c.qk_rope_head_dim = 64; c.qk_nope_head_dim = 128; c.v_head_dim = 128;
        if (heads == 4) {  // the test fixture "lite": rows of 40 values (W = 8 mod 16), v_head_dim 12 (not 16-byte pieces)
            c.n_layers = 2; c.kv_lora_rank = 32; c.qk_rope_head_dim = 8; c.qk_nope_head_dim = 16; c.v_head_dim = 12;
        }
        gpu.c = c;
        gpu.W = kv_cache_width(&c);
        bench_attn_decode(&c, ctx, copy_gbs, &rng);
    }
    return 0;
}

// --ablate CTX: where the decode step's time goes inside the pipelined graph (Nsight Compute times kernels one
// by one, without the overlap PDL gives). The step at context CTX is timed whole, then without each kind of
// kernel in turn (launch() skips it; the logits are then wrong, only the time counts): the difference is
// what that kernel costs in place. Then the floor of the step's dependent launches: a graph of as many empty
// kernels, each waiting for the one before (programmatic dependent launch, as the step's), of 1 block and of
// one block per multiprocessor. In between: the step with its L2 prefetches off (DSV2_NO_PREFETCH).
__global__ void empty_kernel(int *unused) {
    pdl_launch_next();
    pdl_wait();
    if (unused && threadIdx.x == 0) *unused = 0;
}
static void bench_ablate(const Config *c, int n_ctx, const std::vector<int> &ids) {
    struct { const char *name; const void *kernel; } kinds[] = {
        {"matvec", (const void *)matvec_kernel}, {"mla_prep", (const void *)mla_prep_kernel},
        {"mla_attention", (const void *)mla_attention_kernel}, {"mla_combine", (const void *)mla_combine_kernel},
        {"v_up", (const void *)v_up_kernel}, {"moe_router", (const void *)moe_router_kernel},
        {"moe_gate_up", (const void *)moe_gate_up_kernel}, {"moe_down", (const void *)moe_down_kernel},
        {"rmsnorm", (const void *)rmsnorm_kernel}, {"embed", (const void *)embed_kernel}};
    fill_random(gpu.kv_cache, (size_t)c->n_layers * gpu.seq_len * gpu.W, 779, 1.0f);
    auto step_ms = [&]() {
        decode_graph_build();
        return median_ms(10, 50, [&](int i) { decode_launch(ids[i % ids.size()], n_ctx); });
    };
    gpu.launches = 0;
    double base = step_ms();
    int n = gpu.launches;
    printf("BENCH ablate ctx %d none ms %.3f launches %d\n", n_ctx, base, n);
    for (auto &k : kinds) {
        gpu.ablate = k.kernel;
        gpu.launches = 0;
        double t = step_ms();
        printf("BENCH ablate ctx %d %s ms %.3f saves_us %.1f launches %d\n", n_ctx, k.name, t, (base - t) * 1e3, n - gpu.launches);
        fflush(stdout);
    }
    gpu.ablate = NULL;
    // the step without its L2 prefetches (prefetch_l2 does nothing, as with DSV2_NO_PREFETCH), timed; logits against the default's
    std::vector<float> ref(c->vocab_size), got(c->vocab_size);
    for (int off = 0; off <= 1; off++) {
        cudaCheck(cudaMemcpyToSymbol(prefetch_off, &off, sizeof(int)));
        double t = step_ms();
        decode_launch(ids[0], n_ctx);
        cudaCheck(cudaMemcpy(off ? got.data() : ref.data(), gpu.logits, c->vocab_size * 4, cudaMemcpyDeviceToHost));
        printf("BENCH variant ctx %d prefetch_off %d ms %.3f tok_per_s %.1f logits_vs_first %.3e\n", n_ctx, off, t, 1e3 / t,
               off ? rel_err_f(got.data(), ref.data(), c->vocab_size) : 0.0);
        fflush(stdout);
    }
    int zero = 0;
    cudaCheck(cudaMemcpyToSymbol(prefetch_off, &zero, sizeof(int)));
    for (int blocks : {1, gpu.n_sm}) {
        cudaGraphExec_t exec = capture_graph([&] { for (int i = 0; i < n; i++) launch(empty_kernel, blocks, 256, 0, (int *)NULL); });
        double t = median_ms(10, 50, [&](int) { cudaCheck(cudaGraphLaunch(exec, gpu.stream)); });
        printf("BENCH ablate floor %d empty launches of %d blocks ms %.3f us_per_launch %.2f\n", n, blocks, t, t * 1e3 / n);
        cudaCheck(cudaGraphExecDestroy(exec));
    }
    decode_graph_build();
}

#ifdef DSV2_TIMELINE
// --timeline CTX (the dsv2cu_timeline build, DSV2_TIMELINE): three decode steps at context CTX recorded block by block
// (TimelineScope, dsv2_common.cuh) into build/timeline_CTX.csv: step, kernel, block, multiprocessor, and when the
// block started, its pdl_wait returned, it finished and it passed its timeline_mark(), in ns from the step's
// first block (-1: no wait, no mark).
// tools/timeline_decode.py turns that into a table per kind of kernel.
__global__ void timeline_names_kernel(char *out, const unsigned long long *fns, int n) {  // the kernels' __func__
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const char *name = (const char *)fns[i];
    int k = 0;
    for (; k < 63 && name[k]; k++) out[i * 64 + k] = name[k];
    out[i * 64 + k] = 0;
}
static void bench_timeline(const Config *c, int n_ctx, const std::vector<int> &ids) {
    fill_random(gpu.kv_cache, (size_t)c->n_layers * gpu.seq_len * gpu.W, 780, 1.0f);
    decode_graph_build();
    double plain = median_ms(10, 50, [&](int i) { decode_launch(ids[i % ids.size()], n_ctx); });
    unsigned cap = 1 << 19, zero = 0;
    TimelineRec *buf;
    cudaCheck(cudaMalloc(&buf, cap * sizeof(TimelineRec)));
    cudaCheck(cudaMemcpyToSymbol(timeline_buf, &buf, sizeof buf));
    cudaCheck(cudaMemcpyToSymbol(timeline_cap, &cap, sizeof cap));
    cudaCheck(cudaMemcpyToSymbol(timeline_n, &zero, sizeof zero));
    double traced = median_ms(0, 3, [&](int i) { decode_launch(ids[i % ids.size()], n_ctx); });
    unsigned n;
    cudaCheck(cudaMemcpyFromSymbol(&n, timeline_n, sizeof n));
    TimelineRec *none = NULL;
    cudaCheck(cudaMemcpyToSymbol(timeline_buf, &none, sizeof none));
    if (n > cap) die("--timeline: %u records, room for %u", n, cap);
    std::vector<TimelineRec> rec(n);
    cudaCheck(cudaMemcpy(rec.data(), buf, n * sizeof(TimelineRec), cudaMemcpyDeviceToHost));
    std::vector<unsigned long long> fns;
    for (auto &r : rec) if (std::find(fns.begin(), fns.end(), r.fn) == fns.end()) fns.push_back(r.fn);
    unsigned long long *d_fns;
    char *d_names;
    cudaCheck(cudaMalloc(&d_fns, fns.size() * 8));
    cudaCheck(cudaMalloc(&d_names, fns.size() * 64));
    cudaCheck(cudaMemcpy(d_fns, fns.data(), fns.size() * 8, cudaMemcpyHostToDevice));
    timeline_names_kernel<<<ceil_div(fns.size(), 64), 64>>>(d_names, d_fns, (int)fns.size());
    std::vector<char> names(fns.size() * 64);
    cudaCheck(cudaMemcpy(names.data(), d_names, names.size(), cudaMemcpyDeviceToHost));
    // the three steps ran one after another (median_ms synchronises each), each beginning with embed_kernel
    std::sort(rec.begin(), rec.end(), [](const TimelineRec &a, const TimelineRec &b) { return a.t0 < b.t0; });
    char path[64];
    snprintf(path, sizeof path, "build/timeline_%d.csv", n_ctx);
    FILE *f = fopen(path, "w");
    if (!f) die("--timeline: cannot write %s", path);
    fprintf(f, "step,kernel,block,sm,start_ns,wait_end_ns,end_ns,mark_ns\n");
    int step = -1;
    unsigned long long base = rec.empty() ? 0 : rec[0].t0;
    for (auto &r : rec) {
        const char *name = &names[64 * (std::find(fns.begin(), fns.end(), r.fn) - fns.begin())];
        if (!strcmp(name, "embed_kernel") || step < 0) { step++; base = r.t0; }
        fprintf(f, "%d,%s,%u,%u,%llu,%lld,%llu,%lld\n", step, name, r.block, r.sm, r.t0 - base,
                r.t1 ? (long long)(r.t1 - base) : -1LL, r.t2 - base, r.t3 ? (long long)(r.t3 - base) : -1LL);
    }
    fclose(f);
    printf("BENCH timeline ctx %d steps %d records %u file %s step_ms %.3f traced_step_ms %.3f\n", n_ctx, step + 1, n, path,
           plain, traced);
    cudaCheck(cudaFree(buf)); cudaCheck(cudaFree(d_fns)); cudaCheck(cudaFree(d_names));
}
#endif

static int bench_main(int argc, char **argv) {
    const char *path = argv[0];
    int check_tokens = 4, ctx_max = 8192, prompt = 2048, decode_only = 0, mla_only = 0, moe_only = 0, ablate = 0, checks_only = 0, timeline = 0;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--check")) check_tokens = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--decode-only")) decode_only = atoi(argv[i + 1]);  // N graph replays, nothing else (for ncu)
        else if (!strcmp(argv[i], "--mla-only")) mla_only = atoi(argv[i + 1]);        // the MLA kernel benchmark alone
        else if (!strcmp(argv[i], "--moe-only")) moe_only = atoi(argv[i + 1]);        // the batched MoE section alone (2: its checks only, 3: checks and the sweep of every shape)
        else if (!strcmp(argv[i], "--checks-only")) checks_only = atoi(argv[i + 1]);  // 1: the self-checks (1, 2) and stop
        else if (!strcmp(argv[i], "--ablate")) ablate = atoi(argv[i + 1]);            // the decode step at context N without each kernel in turn
        else if (!strcmp(argv[i], "--timeline")) timeline = atoi(argv[i + 1]);        // the decode step at context N, block by block (dsv2cu_timeline)
        else if (!strcmp(argv[i], "--ctx")) ctx_max = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--prompt")) prompt = atoi(argv[i + 1]);
        else die("--bench: unknown option %s", argv[i]);
    }
    int room = (ctx_max > prompt ? ctx_max : prompt) + 64;  // the GPU context (seq_len below)
    if (ablate && (ablate < 1 || ablate >= room)) die("--bench: --ablate %d outside 1..%d (--ctx sets the room)", ablate, room - 1);
    if (timeline && (timeline < 1 || timeline >= room)) die("--bench: --timeline %d outside 1..%d (--ctx sets the room)", timeline, room - 1);
#ifndef DSV2_TIMELINE
    if (timeline) die("--bench: --timeline needs the timeline build (make dsv2cu_timeline; run ./dsv2cu_timeline)");
#endif
    Model m;
    model_load(&m, path);
    const Config *c = &m.config;
    int seq_len = (ctx_max > prompt ? ctx_max : prompt) + 64;
    RunState s;
    runstate_init(&s, c, 160);  // the CPU reference state (small context); the GPU's is seq_len
    s.seq_len = seq_len;        // forward_gpu sizes the GPU context from it; the CPU runs below use s_cpu
    cudaDeviceProp prop;
    cudaCheck(cudaGetDeviceProperties(&prop, 0));
    printf("BENCH device %s\n", prop.name);
    uint64_t rng = 12345;
    std::vector<int> ids(prompt);
    for (int i = 0; i < prompt; i++) ids[i] = (int)(random_u32(&rng) % c->vocab_size);
    if (decode_only || mla_only || moe_only || ablate || timeline) forward_gpu(&m, &s, ids[0], 0, ATTN_ABSORBED);  // sets the GPU up
    if (decode_only) {  // the decode step alone at context ctx_max, for a profiler
        fill_random(gpu.kv_cache, (size_t)c->n_layers * gpu.seq_len * gpu.W, 777, 1.0f);
        for (int i = 0; i < decode_only; i++) decode_launch(ids[i % prompt], ctx_max);
        cudaCheck(cudaStreamSynchronize(gpu.stream));
        return 0;
    }
    if (ablate) {
        bench_ablate(c, ablate, ids);
        return 0;
    }
#ifdef DSV2_TIMELINE
    if (timeline) {
        bench_timeline(c, timeline, ids);
        return 0;
    }
#endif
    if (mla_only) {
        bench_mla_kernel(c, ctx_max, bench_copy_bandwidth(), &rng);
        return 0;
    }
    if (moe_only) {
        bench_moe_batch(&m, bench_copy_bandwidth(), moe_only);
        return 0;
    }

    // 1. GPU decode vs dsv2.c's CPU forward on this model, check_tokens positions
    {
        RunState sc;
        runstate_init(&sc, c, 160);
        std::vector<float> gl(c->vocab_size);
        double worst = 0;
        int argmax_same = 0;
        for (int p = 0; p < check_tokens; p++) {
            float *cl = forward_token(&m, &sc, ids[p], p, ATTN_ABSORBED);
            memcpy(gl.data(), forward_gpu(&m, &s, ids[p], p, ATTN_ABSORBED), c->vocab_size * sizeof(float));
            worst = fmax(worst, rel_err_f(gl.data(), cl, c->vocab_size));
            argmax_same += sample_argmax(gl.data(), c->vocab_size) == sample_argmax(cl, c->vocab_size);
        }
        printf("BENCH check_decode_vs_cpu positions %d max_rel_err %.3e argmax_same %d/%d max|logit| %.3f %s\n", check_tokens,
               worst, argmax_same, check_tokens, fabs(sc.logits[sample_argmax(sc.logits, c->vocab_size)]),
               worst < 1e-4 ? "OK" : "NOT OK");
        runstate_free(&sc);
    }
    // 2. prefill vs decode: logits of the last of 128 prompt tokens both ways; the prefill with the
    //    padded expert layout (the default) and with the compact one (the fallback for uneven routing)
    {
        int n = 128;
        std::vector<float> a(c->vocab_size), b(c->vocab_size);
        for (int p = 0; p < n; p++) forward_gpu(&m, &s, ids[p], p, ATTN_ABSORBED);
        memcpy(a.data(), s.logits, c->vocab_size * sizeof(float));
        for (int compact = 0; compact <= 1; compact++) {
            gpu.pf_compact = compact;
            prefill_gpu(&m, &s, ids.data(), n - 1, 0, ATTN_ABSORBED);
            memcpy(b.data(), forward_gpu(&m, &s, ids[n - 1], n - 1, ATTN_ABSORBED), c->vocab_size * sizeof(float));
            double e = rel_err_f(b.data(), a.data(), c->vocab_size);
            printf("BENCH check_prefill%s_vs_decode tokens %d max_rel_err %.3e argmax_same %d %s\n", compact ? "_compact" : "",
                   n, e, sample_argmax(a.data(), c->vocab_size) == sample_argmax(b.data(), c->vocab_size),
                   e < 1e-4 ? "OK" : "NOT OK");
        }
        gpu.pf_compact = 0;
    }
    fflush(stdout);
    if (checks_only) return 0;
    double copy_gbs = bench_copy_bandwidth();
    // 4. prefill of `prompt` tokens (a warm-up pass first); padded expert layout, then compact (one product per expert)
    for (int compact = 0; compact <= 1; compact++) {
        gpu.pf_compact = compact;
        prefill_gpu(&m, &s, ids.data(), 256, 0, ATTN_ABSORBED);
        std::vector<double> t;
        for (int r = 0; r < 3; r++) {
            cudaCheck(cudaDeviceSynchronize());
            double t0 = now_s();
            prefill_gpu(&m, &s, ids.data(), prompt, 0, ATTN_ABSORBED);
            t.push_back(now_s() - t0);
        }
        printf("BENCH prefill%s tokens %d seconds %.4f tok_per_s %.1f\n", compact ? "_compact" : "", prompt, median(t),
               prompt / median(t));
    }
    gpu.pf_compact = 0;
    // 5. decode at contexts 512 and ctx_max: the cache filled with random latents, graph replays timed;
    //    with programmatic dependent launch (the default) and without (DSV2_NO_PDL), same process
    int ctxs[2] = {512, ctx_max};
    int pdl_default = gpu.pdl;
    for (int ci = 0; ci < 2; ci++) {
        int n_ctx = ctxs[ci];
        fill_random(gpu.kv_cache, (size_t)c->n_layers * gpu.seq_len * gpu.W, 777 + ci, 1.0f);
        for (int pdl = 1; pdl >= 0; pdl--) {
            gpu.pdl = pdl;
            decode_graph_build();
            double sec = median_ms(10, 50, [&](int i) { decode_launch(ids[i % prompt], n_ctx); }) * 1e-3,  // n_ctx + 1 rows
                   bytes = decode_bytes(c, n_ctx + 1);
            printf("BENCH decode%s ctx %d ms %.3f tok_per_s %.1f bytes %.0f roofline_tok_per_s %.1f ratio %.3f\n",
                   pdl ? "" : "_no_pdl", n_ctx, sec * 1e3, 1 / sec, bytes, copy_gbs * 1e9 / bytes,
                   (bytes / sec) / (copy_gbs * 1e9));
            fflush(stdout);
        }
    }
    gpu.pdl = pdl_default;
    decode_graph_build();
    bench_mla_kernel(c, ctx_max, copy_gbs, &rng);
    bench_moe_batch(&m, copy_gbs, 1);
    bench_attn_decode(c, ctx_max, copy_gbs, &rng);
    return 0;
}

// Where sample_forward's token t differs from dsv2.c's for a row: is the difference one of float rounding?
// dsv2.c's walk (sample_mult: index order; sample_topp: its sorted candidates up to the nucleus' end) adds
// the p (which dsv2.c has left in p) one after another in float; the GPU sums the exps in another order
// and the walk exactly. Both can be off by at most about (terms added) * 2^-24 of the sum (first order),
// so r (dsv2.c's coin * cum, or the coin) must lie within that of t's interval [cdf before t, cdf after t]
// in dsv2.c's order, computed here in double. Returns |distance| / allowed (<= 1: rounding), or 1e30 when
// t is not in dsv2.c's nucleus at all.
static double sampler_rounding_gap(const float *p, int V, float topp, float coin, int t, int *order) {
    int n = 0, last;
    float cum = 0.0f;
    if (topp <= 0.0f || topp >= 1.0f) {
        for (int i = 0; i < V; i++) order[n++] = i;
        last = V - 1;
        cum = 1.0f;
    } else {
        float cutoff = (1.0f - topp) / (V - 1 > 0 ? V - 1 : 1);
        for (int i = 0; i < V; i++) if (p[i] >= cutoff) order[n++] = i;
        topp_probs = p;
        qsort(order, n, sizeof(int), topp_cmp);
        last = n - 1;
        for (int i = 0; i < n; i++) { cum += p[order[i]]; if (cum > topp) { last = i; break; } }
    }
    double r = (topp <= 0.0f || topp >= 1.0f) ? coin : (double)(coin * cum), before = 0.0;
    for (int i = 0; i <= last; i++) {
        if (order[i] == t) {
            double after = before + p[t], allowed = (double)(i + 1 + V) / 16777216.0 * fmax(cum, 1.0);
            double gap = r < before ? before - r : r > after ? r - after : 0.0;
            return gap / allowed;
        }
        before += p[order[i]];
    }
    return 1e30;
}

// ./dsv2cu --check-sampler: sample_forward (dsv2_sample.cuh) against dsv2.c's sample() on random rows of
// logits, B = 64 rows of eight kinds (below) for each (V, temperature, topp); then its time per call.
// V = 4096 (summed in dsv2.c's order): the same token and rng state for every row. V = 102400 (summed in
// parallel): the same rng state, and the same token or one that float rounding explains
// (sampler_rounding_gap <= 1). One "BENCH check_sampler ..." line per case; exit status 1 if one fails.
static int check_sampler_main(void) {
    const int B = 64, Vs[2] = {4096, 102400};
    const float cases[][2] = {{0.0f, 0.9f}, {0.8f, 0.9f}, {1.0f, 0.5f}, {0.6f, 0.99f}, {2.0f, 0.3f},
                              {1.0f, 0.9999f}, {1.2f, 1.0f}, {0.7f, 0.0f}};
    const int n_cases = sizeof cases / sizeof *cases;
    cudaCheck(cudaStreamCreate(&gpu.stream));
    cudaCheck(cudaDeviceGetAttribute(&gpu.n_sm, cudaDevAttrMultiProcessorCount, 0));
    gpu.pdl = 1;
    int failed = 0;
    cudaEvent_t e0, e1;
    cudaCheck(cudaEventCreate(&e0));
    cudaCheck(cudaEventCreate(&e1));
    for (int vi = 0; vi < 2; vi++) {
        int V = Vs[vi];
        sample_init(B, V);
        printf("BENCH sampler_layout V %d blocks_per_row %d threads %d rows_at_once %d\n", V, sample_ranks, SAMPLE_THREADS, sample_rows_at_once);
        std::vector<float> rows((size_t)B * V), cpu_row(V);
        uint64_t r = 7 + vi;
        for (int b = 0; b < B; b++) {
            float *l = rows.data() + (size_t)b * V;
            for (int i = 0; i < V; i++) {
                float g = random_f32(&r) + random_f32(&r) + random_f32(&r) + random_f32(&r) - 2.0f;  // about normal, sd 0.58
                switch (b % 8) {
                case 0: l[i] = 4.0f * g; break;                              // a trained model's spread
                case 1: l[i] = g + (i == 77 ? 25.0f : 0.0f); break;          // one token holds nearly all
                case 2: l[i] = roundf(6.0f * g) * 0.5f; break;               // many ties at every level
                case 3: l[i] = 0.1f * g; break;                              // flat: the nucleus is most of the row
                case 4: l[i] = 1.0f; break;                                  // all equal
                case 5: l[i] = (i == 5 || i == V - 3) ? 9.0f : 2.0f * g; break;  // two tied top tokens
                case 6: l[i] = 8.0f * g; break;                              // peaked
                default: l[i] = 2.0f * random_f32(&r) - 1.0f; break;         // uniform
                }
            }
        }
        float *d_rows, *d_work;
        int *d_tok;
        uint64_t *d_rng;
        cudaCheck(cudaMalloc(&d_rows, rows.size() * 4));
        cudaCheck(cudaMalloc(&d_work, rows.size() * 4));
        cudaCheck(cudaMalloc(&d_tok, B * sizeof(int)));
        cudaCheck(cudaMalloc(&d_rng, B * sizeof(uint64_t)));
        cudaCheck(cudaMemcpy(d_rows, rows.data(), rows.size() * 4, cudaMemcpyHostToDevice));
        Sampler sp = {0, 0, 0, (int *)xcalloc(V, sizeof(int))};
        for (int k = 0; k < n_cases; k++) {
            float T = cases[k][0], topp = cases[k][1];
            std::vector<uint64_t> rng(B);
            for (int b = 0; b < B; b++) rng[b] = 1000 + 17 * b + k;
            cudaCheck(cudaMemcpy(d_work, d_rows, rows.size() * 4, cudaMemcpyDeviceToDevice));
            cudaCheck(cudaMemcpy(d_rng, rng.data(), B * sizeof(uint64_t), cudaMemcpyHostToDevice));
            sample_forward(d_tok, d_work, B, V, T, topp, d_rng);
            std::vector<int> tok(B);
            std::vector<uint64_t> rng_gpu(B);
            cudaCheck(cudaMemcpy(tok.data(), d_tok, B * sizeof(int), cudaMemcpyDeviceToHost));
            cudaCheck(cudaMemcpy(rng_gpu.data(), d_rng, B * sizeof(uint64_t), cudaMemcpyDeviceToHost));
            int same = 0, rng_same = 0, rounding = 0;
            double worst_gap = 0.0;
            for (int b = 0; b < B; b++) {
                memcpy(cpu_row.data(), rows.data() + (size_t)b * V, V * 4);
                sp.temperature = T; sp.topp = topp; sp.rng_state = rng[b];
                int want = sample(&sp, cpu_row.data(), V);  // leaves p in cpu_row (temperature > 0)
                same += tok[b] == want;
                rng_same += rng_gpu[b] == sp.rng_state;
                if (tok[b] != want) {
                    uint64_t state = rng[b];
                    float coin = random_f32(&state);
                    double gap = T > 0.0f && tok[b] >= 0 && tok[b] < V && V > SAMPLE_SERIAL_MAX
                                     ? sampler_rounding_gap(cpu_row.data(), V, topp, coin, tok[b], sp.order) : 1e30;
                    rounding += gap <= 1.0;
                    worst_gap = fmax(worst_gap, gap);
                    if (gap > 1.0)
                        printf("BENCH check_sampler mismatch V %d t %g p %g row %d (kind %d): gpu %d cpu %d, gap %.3g of the rounding allowed\n",
                               V, T, topp, b, b % 8, tok[b], want, gap);
                }
            }
            // time per call at B = 1 and B = 64 (the row restored before each call, outside the timing)
            double us[2];
            for (int bi = 0; bi < 2; bi++) {
                int nb = bi ? B : 1;
                std::vector<double> t;
                for (int it = 0; it < 15; it++) {
                    cudaCheck(cudaMemcpyAsync(d_work, d_rows, (size_t)nb * V * 4, cudaMemcpyDeviceToDevice, gpu.stream));
                    cudaCheck(cudaEventRecord(e0, gpu.stream));
                    sample_forward(d_tok, d_work, nb, V, T, topp, d_rng);
                    cudaCheck(cudaEventRecord(e1, gpu.stream));
                    cudaCheck(cudaEventSynchronize(e1));
                    float ms;
                    cudaCheck(cudaEventElapsedTime(&ms, e0, e1));
                    if (it >= 3) t.push_back(ms * 1e3);
                }
                us[bi] = median(t);
            }
            int ok = same + rounding == B && rng_same == B;
            failed += !ok;
            printf("BENCH check_sampler V %d t %g p %g rows %d same_token %d rounding %d (worst gap %.2f) same_rng %d us_B1 %.1f "
                   "us_B64 %.1f %s\n", V, T, topp, B, same, rounding, worst_gap, rng_same, us[0], us[1], ok ? "OK" : "NOT OK");
            fflush(stdout);
        }
        free(sp.order);
        cudaCheck(cudaFree(d_rows)); cudaCheck(cudaFree(d_work)); cudaCheck(cudaFree(d_tok)); cudaCheck(cudaFree(d_rng));
    }
    return failed ? 1 : 0;
}
