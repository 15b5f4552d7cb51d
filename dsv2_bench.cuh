// dsv2_bench.cuh: ./dsv2cu --bench MODEL, included by dsv2.cu (tools/bench_cuda.sh runs it).
// Self-checks first (GPU against dsv2.c's CPU forward on this model, prefill against decode,
// the MLA kernel against a float64 reference), then the timings, one "BENCH key value" line each.

static double median(std::vector<double> v) { std::sort(v.begin(), v.end()); return v[v.size() / 2]; }

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
    cudaEvent_t e0, e1;
    cudaCheck(cudaEventCreate(&e0));
    cudaCheck(cudaEventCreate(&e1));
    float ms;
    double copy_gbs;
    size_t n = (size_t)1 << 30;
    void *a, *b;
    cudaCheck(cudaMalloc(&a, n));
    cudaCheck(cudaMalloc(&b, n));
    cudaCheck(cudaMemset(a, 1, n));
    std::vector<double> t;
    for (int i = 0; i < 13; i++) {
        cudaCheck(cudaEventRecord(e0, gpu.stream));
        cudaCheck(cudaMemcpyAsync(b, a, n, cudaMemcpyDeviceToDevice, gpu.stream));
        cudaCheck(cudaEventRecord(e1, gpu.stream));
        cudaCheck(cudaEventSynchronize(e1));
        cudaCheck(cudaEventElapsedTime(&ms, e0, e1));
        if (i >= 3) t.push_back(ms);
    }
    copy_gbs = 2.0 * n / (median(t) * 1e-3) / 1e9;
    printf("BENCH copy_bandwidth_GBps %.1f\n", copy_gbs);
    cudaCheck(cudaFree(a));
    cudaCheck(cudaFree(b));
    return copy_gbs;
}

// 6. the MLA decode kernel alone: B sequences of L rows, the model's heads, own cache each
static void bench_mla_kernel(const Config *c, int ctx_max, double copy_gbs, uint64_t *rng_state) {
    cudaEvent_t e0, e1;
    cudaCheck(cudaEventCreate(&e0));
    cudaCheck(cudaEventCreate(&e1));
    float ms;
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
    std::vector<double> t;
    for (int i = 0; i < 23; i++) {
        cudaCheck(cudaEventRecord(e0, gpu.stream));
        mla_attention_forward(o, q, cache, (size_t)L * W, lens, NULL, 0, B, n_split);
        cudaCheck(cudaEventRecord(e1, gpu.stream));
        cudaCheck(cudaEventSynchronize(e1));
        cudaCheck(cudaEventElapsedTime(&ms, e0, e1));
        if (i >= 3) t.push_back(ms);
    }
    double bytes = (double)B * L * W * 4, gbs = bytes / (median(t) * 1e-3) / 1e9;
    // check two sequences against a float64 reference
    std::vector<float> hc((size_t)L * W);
    std::vector<float> ho((size_t)B * H * d_c);
    cudaCheck(cudaMemcpy(ho.data(), o, ho.size() * 4, cudaMemcpyDeviceToHost));
    double worst = 0;
    for (int b : {0, B - 1}) {
        cudaCheck(cudaMemcpy(hc.data(), cache + (size_t)b * L * W, hc.size() * 4, cudaMemcpyDeviceToHost));
        for (int h = 0; h < H; h++) {
            const float *qh = hq.data() + ((size_t)b * H + h) * W;
            std::vector<double> sc(L), ref(d_c, 0.0);
            double mx = -1e300, sum = 0;
            for (int j = 0; j < L; j++) {
                double d = 0;
                for (int k = 0; k < W; k++) d += (double)qh[k] * hc[(size_t)j * W + k];
                sc[j] = d * scale; mx = fmax(mx, sc[j]);
            }
            for (int j = 0; j < L; j++) { sc[j] = exp(sc[j] - mx); sum += sc[j]; }
            for (int j = 0; j < L; j++) for (int k = 0; k < d_c; k++) ref[k] += sc[j] / sum * hc[(size_t)j * W + k];
            double dm = 0, rm = 0;
            for (int k = 0; k < d_c; k++) {
                double g = ho[((size_t)b * H + h) * d_c + k];
                dm = std::isnan(g) ? 1e30 : fmax(dm, fabs(g - ref[k])); rm = fmax(rm, fabs(ref[k]));
            }
            worst = fmax(worst, dm / rm);
        }
    }
    // float32 accuracy expected (3xTF32 on the tensor cores): 1e-5 is well above float32 rounding, far below tf32's ~1e-3
    printf("BENCH check_mla_kernel_vs_float64 max_rel_err %.3e %s\n", worst, worst < 1e-5 ? "OK" : "NOT OK");
    printf("BENCH mla_kernel batch %d ctx %d heads %d ms %.3f GBps %.1f ratio_to_copy %.3f\n", B, L, H, median(t), gbs,
           gbs / copy_gbs);
    cudaCheck(cudaFree(gpu.part_o)); cudaCheck(cudaFree(gpu.part_ml));
    cudaCheck(cudaFree(cache)); cudaCheck(cudaFree(q)); cudaCheck(cudaFree(o)); cudaCheck(cudaFree(lens));
    gpu.part_o = po; gpu.part_ml = pml;
}

static int bench_main(int argc, char **argv) {
    const char *path = argv[0];
    int check_tokens = 4, ctx_max = 8192, prompt = 2048, decode_only = 0, mla_only = 0;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--check")) check_tokens = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--decode-only")) decode_only = atoi(argv[i + 1]);  // N graph replays, nothing else (for ncu)
        else if (!strcmp(argv[i], "--mla-only")) mla_only = atoi(argv[i + 1]);        // the MLA kernel benchmark alone
        else if (!strcmp(argv[i], "--ctx")) ctx_max = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--prompt")) prompt = atoi(argv[i + 1]);
        else die("--bench: unknown option %s", argv[i]);
    }
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
    if (decode_only || mla_only) forward_gpu(&m, &s, ids[0], 0, ATTN_ABSORBED);  // sets the GPU up
    if (decode_only) {  // the decode step alone at context ctx_max, for a profiler
        fill_random(gpu.kv_cache, (size_t)c->n_layers * gpu.seq_len * gpu.W, 777, 1.0f);
        for (int i = 0; i < decode_only; i++) decode_launch(ids[i % prompt], ctx_max);
        cudaCheck(cudaStreamSynchronize(gpu.stream));
        return 0;
    }
    if (mla_only) {
        bench_mla_kernel(c, ctx_max, bench_copy_bandwidth(), &rng);
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
    cudaEvent_t e0, e1;
    cudaCheck(cudaEventCreate(&e0));
    cudaCheck(cudaEventCreate(&e1));
    float ms;
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
            std::vector<double> t;
            for (int i = 0; i < 60; i++) {
                cudaCheck(cudaEventRecord(e0, gpu.stream));
                decode_launch(ids[i % prompt], n_ctx);  // attends over n_ctx + 1 rows
                cudaCheck(cudaEventRecord(e1, gpu.stream));
                cudaCheck(cudaEventSynchronize(e1));
                cudaCheck(cudaEventElapsedTime(&ms, e0, e1));
                if (i >= 10) t.push_back(ms);
            }
            double sec = median(t) * 1e-3, bytes = decode_bytes(c, n_ctx + 1);
            printf("BENCH decode%s ctx %d ms %.3f tok_per_s %.1f bytes %.0f roofline_tok_per_s %.1f ratio %.3f\n",
                   pdl ? "" : "_no_pdl", n_ctx, sec * 1e3, 1 / sec, bytes, copy_gbs * 1e9 / bytes,
                   (bytes / sec) / (copy_gbs * 1e9));
            fflush(stdout);
        }
    }
    gpu.pdl = pdl_default;
    decode_graph_build();
    bench_mla_kernel(c, ctx_max, copy_gbs, &rng);
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
