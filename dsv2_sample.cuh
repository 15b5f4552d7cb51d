// dsv2_sample.cuh: dsv2.c's sampler on the GPU, for B rows of logits at once (issue 14.1).
// Included by dsv2.cu after dsv2_common.cuh (it uses launch(), PDL and dsv2.c's random_f32).
//
//   sample_forward(tokens (B), logits (B, V), B, V, temperature, topp, rng (B))
//
// Row b gets what dsv2.c's sample(sp, row, V) returns with sp->rng_state = rng[b], and rng[b] advances
// exactly as there (one random_f32 per row, only when temperature > 0):
//   temperature 0   argmax, the lowest index on ties (dsv2.c's argmax)
//   else            p = exp((l - max) / T) / sum; coin = random_f32(&rng[b]); then
//     topp <= 0 or >= 1   sample_mult: the first i whose running sum p_0 + ... + p_i exceeds coin
//     otherwise           sample_topp: candidates p >= cutoff = (1 - topp) / (V - 1), ordered by p
//                         descending then id ascending; the nucleus ends at the first one whose running
//                         sum cum exceeds topp; r = coin * cum; the first in the nucleus whose running
//                         sum exceeds r (the nucleus' last when rounding leaves none)
// A row with a logit that is not finite gets tokens[b] = -1 - i, i its first such logit (dsv2.c's
// check_logits stops there; nothing is drawn). The logits may be overwritten (long rows hold p after).
// No host round trip and a grid that depends on B only: the call can be captured in a CUDA graph.
//
// One block of 1024 threads per row. What can differ from dsv2.c, and what is done about it:
// - sums: dsv2.c adds in index order, one value after another, in float. Where that is cheap (rows of
//   at most SAMPLE_SERIAL_MAX values, held in shared memory: the default model's 4096) one thread adds
//   in exactly that order, and exp is taken in double and rounded once to float: glibc's expf, which
//   dsv2.c calls, is correctly rounded but for rare inputs (on the default model's logits the two
//   differed in 0.06% of 20.5M values, by 1 ulp; CUDA's own expf is off by up to 2 ulp). So the
//   probabilities are dsv2.c's bit for bit but for those. Longer rows (V2's 102400: one thread's
//   102400 dependent adds would cost a large part of a decode step) take CUDA's expf and sum in
//   parallel, in double: their probabilities differ from dsv2.c's in the last bits, and a token can
//   differ where the coin falls within such a difference of a boundary (simulated on the CPU with
//   the default model's logits: 1 draw in 5012 for a parallel sum).
// - the nucleus: sorting 102400 candidates per token is what made sampling slow; only the nucleus
//   needs an order. A radix select over the probabilities' bits (positive floats order like their
//   bits), with sums in fixed point (integers: the same in any order), finds the smallest prefix of
//   the order whose sum exceeds topp + SAMPLE_MARGIN; when that prefix has at most SAMPLE_KEYS
//   candidates they are sorted in shared memory and ONE thread walks them as sample_topp does (same
//   order, same float sums: the same cum, r and token). A flatter row (a random model's nucleus holds
//   most of the vocabulary) is sampled by two more radix selects, for cum and for r, with the
//   fixed-point sums; there dsv2.c's own float running sum over tens of thousands of candidates
//   drifts, and the tokens agree up to that rounding (./dsv2cu --check-sampler measures it).
#define SAMPLE_THREADS 1024
#define SAMPLE_KEYS 4096          // the largest nucleus sorted and walked as sample_topp walks it
#define SAMPLE_SERIAL_MAX 8192    // rows up to this long are summed by one thread in dsv2.c's order
#define SAMPLE_MARGIN 1e-3        // room above topp for the float sums of up to SAMPLE_KEYS values
#define SAMPLE_FX 0x1p31          // fixed point for the selects' sums: p * 2^31 rounded (a row's sum stays < 2^32)

typedef unsigned long long u64;

// p in fixed point: integer sums are exact and the same in any order (deterministic atomics)
__device__ __forceinline__ unsigned to_fixed(float p) { return (unsigned)__double2uint_rn((double)p * SAMPLE_FX); }

// f(i, p[i]) for this thread's values of p (n), 16-byte loads when p allows (the passes over a row are
// bound by the loads one block keeps in flight); each thread sees its values in increasing index order
template <typename F> __device__ __forceinline__ void for_each_value(const float *p, int n, F f) {
    if ((n & 3) == 0 && ((uintptr_t)p & 15) == 0) {
        const float4 *p4 = (const float4 *)p;
        #pragma unroll 2
        for (int i = threadIdx.x; i < n / 4; i += blockDim.x) {
            float4 v = p4[i];
            f(4 * i, v.x); f(4 * i + 1, v.y); f(4 * i + 2, v.z); f(4 * i + 3, v.w);
        }
    } else {
        #pragma unroll 4
        for (int i = threadIdx.x; i < n; i += blockDim.x) f(i, p[i]);
    }
}
// out[i] = f(i, in[i]) for this thread's values (out may be in)
template <typename F> __device__ __forceinline__ void map_values(float *out, const float *in, int n, F f) {
    if ((n & 3) == 0 && ((uintptr_t)in & 15) == 0 && ((uintptr_t)out & 15) == 0) {
        const float4 *in4 = (const float4 *)in;
        float4 *out4 = (float4 *)out;
        #pragma unroll 2
        for (int i = threadIdx.x; i < n / 4; i += blockDim.x) {
            float4 v = in4[i];
            v.x = f(4 * i, v.x); v.y = f(4 * i + 1, v.y); v.z = f(4 * i + 2, v.z); v.w = f(4 * i + 3, v.w);
            out4[i] = v;
        }
    } else {
        #pragma unroll 4
        for (int i = threadIdx.x; i < n; i += blockDim.x) out[i] = f(i, in[i]);
    }
}

// (value, index) of the larger value, the lower index on ties: dsv2.c's argmax order
__device__ __forceinline__ bool arg_before(float va, int ia, float vb, int ib) { return va > vb || (va == vb && ia < ib); }
__device__ void block_argmax(float *v, int *i) {  // every thread gets the block's best
    __shared__ float sv[32];
    __shared__ int si[32];
    for (int o = 16; o > 0; o >>= 1) {
        float v2 = __shfl_xor_sync(0xffffffff, *v, o);
        int i2 = __shfl_xor_sync(0xffffffff, *i, o);
        if (arg_before(v2, i2, *v, *i)) { *v = v2; *i = i2; }
    }
    __syncthreads();
    if ((threadIdx.x & 31) == 0) { sv[threadIdx.x >> 5] = *v; si[threadIdx.x >> 5] = *i; }
    __syncthreads();
    *v = sv[0]; *i = si[0];
    for (int w = 1; w < (int)(blockDim.x >> 5); w++)
        if (arg_before(sv[w], si[w], *v, *i)) { *v = sv[w]; *i = si[w]; }
}
__device__ int block_min_int(int v) {
    __shared__ int part[32];
    for (int o = 16; o > 0; o >>= 1) v = min(v, __shfl_xor_sync(0xffffffff, v, o));
    __syncthreads();
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = v;
    __syncthreads();
    for (int w = 0; w < (int)(blockDim.x >> 5); w++) v = min(v, part[w]);
    return v;
}
__device__ double block_sum_double(double v) {
    __shared__ double part[32];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    __syncthreads();
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = v;
    __syncthreads();
    double total = 0.0;
    for (int w = 0; w < (int)(blockDim.x >> 5); w++) total += part[w];
    return total;
}
// exclusive prefix sum over the block in thread order; *total gets the sum of all
template <typename T> __device__ T block_scan(T v, T *total) {
    __shared__ T part[32];
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    T x = v;
    for (int o = 1; o < 32; o <<= 1) { T y = __shfl_up_sync(0xffffffff, x, o); if (lane >= o) x += y; }
    __syncthreads();
    if (lane == 31) part[w] = x;
    __syncthreads();
    if (w == 0) {
        T s = lane < n_warps ? part[lane] : (T)0;
        for (int o = 1; o < 32; o <<= 1) { T y = __shfl_up_sync(0xffffffff, s, o); if (lane >= o) s += y; }
        part[lane] = s;
    }
    __syncthreads();
    *total = part[n_warps - 1];
    return (w ? part[w - 1] : (T)0) + x - v;
}

// this warp's contiguous share [*lo, *hi) of n values, for walks in index order (its lanes read 32
// consecutive values at a time)
__device__ __forceinline__ void warp_range(int n, int *lo, int *hi) {
    int n_warps = blockDim.x >> 5, per = ((n + n_warps - 1) / n_warps + 31) & ~31;
    *lo = min(n, (int)(threadIdx.x >> 5) * per);
    *hi = min(n, *lo + per);
}

// the index of the rank-th (from 0) value of p (n) whose bits are `bits`, counting in index order
__device__ int find_rank(const float *p, int n, unsigned bits, int rank) {
    int lo, hi, count = 0, total, lane = threadIdx.x & 31;
    warp_range(n, &lo, &hi);
    for (int i = lo + lane; i < hi; i += 32) count += __float_as_uint(p[i]) == bits;
    for (int o = 16; o > 0; o >>= 1) count += __shfl_xor_sync(0xffffffff, count, o);
    int before = block_scan(lane == 0 ? count : 0, &total);  // lane 0 carries its warp's count
    before = __shfl_sync(0xffffffff, before, 0);
    __shared__ int found;
    if (threadIdx.x == 0) found = -1;
    __syncthreads();
    if (rank >= before && rank < before + count)  // this warp holds it: walk 32 values at a time
        for (int i0 = lo, k = before; i0 < hi; i0 += 32) {
            unsigned hit = __ballot_sync(0xffffffff, i0 + lane < hi && __float_as_uint(p[i0 + lane]) == bits);
            if (rank < k + __popc(hit)) {
                for (int r = rank - k; r > 0; r--) hit &= hit - 1;  // drop the lowest hits before it
                if (lane == 0) found = i0 + __ffs(hit) - 1;
                break;
            }
            k += __popc(hit);
        }
    __syncthreads();
    return found;
}

// Where the running sum crosses `target`, along sample_topp's order of the candidates (p >= cutoff,
// p descending, then index ascending): the first candidate whose running sum, in fixed point,
// exceeds target (the last candidate when none does). A radix select: four rounds over the 8-bit
// digits of p's bits, high to low; each round histograms (count, sum) of the candidates that share
// the digits chosen so far, and warp 0 picks the digit where the sum crosses.
typedef struct {
    unsigned bits;       // the crossing candidate's p, as bits
    int rank;            // its rank among the candidates with that p (in index order)
    int n_through;       // candidates up to and including it
    int n_at_least;      // candidates with p >= its p (its ties after it too); > limit: the select stopped early
    u64 sum_through;     // their sum (fixed point)
} Crossing;

// the digit histogram's (count, sum) of one thread's run of values with the same digit
__device__ __forceinline__ void hist_add(unsigned *h_count, unsigned *h_sum, int digit, unsigned count, unsigned sum) {
    if (count) { atomicAdd(&h_count[digit], count); atomicAdd(&h_sum[digit], sum); }
}

// limit: stop once more than `limit` candidates lie above the crossing (the caller cannot sort them)
__device__ Crossing topp_cross(const float *p, int n, float cutoff, u64 target, int limit) {
    __shared__ unsigned h_count[256], h_sum[256];
    __shared__ unsigned s_prefix;
    __shared__ u64 s_above, s_target;
    __shared__ int s_n_above, s_n_eq;
    if (threadIdx.x == 0) { s_prefix = 0; s_above = 0; s_n_above = 0; s_target = target; }
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int d = threadIdx.x; d < 256; d += blockDim.x) { h_count[d] = 0; h_sum[d] = 0; }
        __syncthreads();
        unsigned prefix = s_prefix, run_count = 0, run_sum = 0;
        int run_digit = 0;
        for_each_value(p, n, [&](int i, float x) {  // runs of one digit take one atomic (flat rows)
            unsigned b = __float_as_uint(x);
            if (x >= cutoff && (shift == 24 || (b >> (shift + 8)) == prefix)) {
                int digit = (b >> shift) & 255;
                if (digit != run_digit) { hist_add(h_count, h_sum, run_digit, run_count, run_sum); run_digit = digit; run_count = 0; run_sum = 0; }
                run_count++;
                run_sum += to_fixed(x);
            }
        });
        hist_add(h_count, h_sum, run_digit, run_count, run_sum);
        __syncthreads();
        if (threadIdx.x < 32) {  // lane L holds digits 255 - 8L down to 248 - 8L
            int lane = threadIdx.x;
            u64 sum = 0;
            unsigned count = 0;
            for (int k = 0; k < 8; k++) { sum += h_sum[255 - 8 * lane - k]; count += h_count[255 - 8 * lane - k]; }
            u64 incl = sum;
            unsigned cincl = count;
            for (int o = 1; o < 32; o <<= 1) {
                u64 y = __shfl_up_sync(0xffffffff, incl, o);
                unsigned cy = __shfl_up_sync(0xffffffff, cincl, o);
                if (lane >= o) { incl += y; cincl += cy; }
            }
            u64 above = s_above, t = s_target;
            if (shift == 24) {  // no candidate crosses: aim at the last one
                u64 total = __shfl_sync(0xffffffff, incl, 31);
                if (total <= t) t = total - 1;
            }
            unsigned crossing = __ballot_sync(0xffffffff, above + incl > t);
            if (lane == __ffs(crossing) - 1) {
                u64 a = above + incl - sum;
                int na = s_n_above + (int)(cincl - count);
                for (int k = 0; k < 8; k++) {
                    int d = 255 - 8 * lane - k;
                    if (a + h_sum[d] > t) { s_prefix = (s_prefix << 8) | d; s_above = a; s_n_above = na; s_n_eq = h_count[d]; break; }
                    a += h_sum[d];
                    na += h_count[d];
                }
                s_target = t;
            }
        }
        __syncthreads();
        if (s_n_above > limit) break;
    }
    Crossing c;
    c.bits = s_prefix;
    u64 q = to_fixed(__uint_as_float(c.bits)), t = s_target, above = s_above;
    if (s_n_above > limit) q = 0;  // stopped early: bits is a prefix, not a value
    int ties = q ? (int)((t - above) / q) + 1 : s_n_eq;  // the first tie whose running sum exceeds t
    if (ties > s_n_eq) ties = s_n_eq;
    c.rank = ties - 1;
    c.n_through = s_n_above + ties;
    c.n_at_least = s_n_above > limit ? s_n_above : s_n_above + s_n_eq;
    c.sum_through = above + ties * q;
    __syncthreads();  // the shared results are read before the next call resets them
    return c;
}

__global__ void __launch_bounds__(SAMPLE_THREADS) sample_kernel(int *tokens, float *logits, int V, float temperature,
                                                                float topp, uint64_t *rng) {
    pdl_launch_next();
    pdl_wait();
    __shared__ u64 keys[SAMPLE_KEYS];
    __shared__ int s_int;
    __shared__ float s_float, s_coin;
    extern __shared__ float row_smem[];  // the row, when V <= SAMPLE_SERIAL_MAX
    int b = blockIdx.x, tid = threadIdx.x;
    float *l = logits + (size_t)b * V;
    // argmax (lowest index on ties) and the first logit that is not finite
    float best_v = -INFINITY;
    int best = V, bad = V;
    for_each_value(l, V, [&](int i, float x) {
        if (!isfinite(x)) bad = min(bad, i);
        else if (x > best_v) { best_v = x; best = i; }
    });
    bad = block_min_int(bad);
    block_argmax(&best_v, &best);
    if (bad < V || temperature == 0.0f) {
        if (tid == 0) tokens[b] = bad < V ? -1 - bad : best;
        return;
    }
    // softmax as dsv2.c's sample(): e = exp((l - max) / T), their sum, then p = e / sum, in place
    // (in shared memory for a short row, which one thread then sums in dsv2.c's order)
    int serial = V <= SAMPLE_SERIAL_MAX;
    float *p = serial ? row_smem : l;
    double part = 0.0;
    map_values(p, l, V, [&](int i, float logit) {
        float x = (logit - best_v) / temperature;
        float e = serial ? (float)exp((double)x) : expf(x);  // exp in double, rounded once: glibc's expf but for ~1e-9 of inputs
        part += e;
        return e;
    });
    float sum;
    if (serial) {
        __syncthreads();
        if (tid == 0) {
            float s = 0.0f;
            for (int i = 0; i < V; i++) s += p[i];
            s_float = s;
        }
        __syncthreads();
        sum = s_float;
    } else {
        sum = (float)block_sum_double(part);
    }
    float cutoff = (1.0f - topp) / (float)(V - 1 > 0 ? V - 1 : 1);  // sample_topp's
    int m = 0;
    map_values(p, p, V, [&](int i, float e) { float q = e / sum; m += q >= cutoff; return q; });
    if (tid == 0) {
        uint64_t state = rng[b];
        s_coin = random_f32(&state);
        rng[b] = state;
    }
    m = (int)block_sum_double((double)m);  // its barriers publish p and the coin
    float coin = s_coin;
    int token;
    if (topp <= 0.0f || topp >= 1.0f) {
        // sample_mult: the first i whose running sum exceeds the coin, in index order
        if (serial) {
            if (tid == 0) {
                float cdf = 0.0f;
                int pick = V - 1;
                for (int i = 0; i < V; i++) { cdf += p[i]; if (coin < cdf) { pick = i; break; } }
                s_int = pick;
            }
            __syncthreads();
            token = s_int;
        } else {  // each warp walks its share, 32 values at a time, from the sum of the shares before it
            int lo, hi, lane = tid & 31, pick = V;
            warp_range(V, &lo, &hi);
            float share = 0.0f, total;
            for (int i = lo + lane; i < hi; i += 32) share += p[i];
            share = warp_sum(share);
            float cdf = block_scan(lane == 0 ? share : 0.0f, &total);
            cdf = __shfl_sync(0xffffffff, cdf, 0);
            float start = cdf;
            for (int i0 = lo; i0 < hi && pick == V; i0 += 32) {
                float v = i0 + lane < hi ? p[i0 + lane] : 0.0f, incl = v;
                for (int o = 1; o < 32; o <<= 1) { float y = __shfl_up_sync(0xffffffff, incl, o); if (lane >= o) incl += y; }
                unsigned hit = __ballot_sync(0xffffffff, i0 + lane < hi && coin < cdf + incl);
                if (hit) pick = i0 + __ffs(hit) - 1;
                cdf += __shfl_sync(0xffffffff, incl, 31);
            }
            if (pick == V && hi > lo && coin < start + share) pick = hi - 1;  // rounding between two shares
            token = block_min_int(pick);
            if (token == V) token = V - 1;
        }
    } else if (m == 0) {
        // no candidate (only when p is no distribution): sample_topp takes the argmax of p
        float v = -INFINITY;
        int i_best = V;
        for_each_value(p, V, [&](int i, float x) { if (x > v) { v = x; i_best = i; } });
        block_argmax(&v, &i_best);
        token = i_best;
    } else {
        // sample_topp. The smallest prefix of its order whose fixed-point sum exceeds topp + SAMPLE_MARGIN:
        Crossing wide = topp_cross(p, V, cutoff, to_fixed(topp) + (u64)(SAMPLE_MARGIN * SAMPLE_FX), SAMPLE_KEYS);
        int fallback = 1;
        if (wide.n_at_least <= SAMPLE_KEYS) {
            // sort that prefix in shared memory, key = p's bits : ~index (descending = p down, index up),
            // then one thread walks it exactly as sample_topp walks `order`
            if (tid == 0) s_int = 0;
            __syncthreads();
            for (int i0 = 0; i0 < V; i0 += blockDim.x) {  // one atomic per warp: the lanes that take one count off it
                int i = i0 + tid, lane = tid & 31;
                float x = i < V ? p[i] : 0.0f;
                unsigned bits = __float_as_uint(x);
                bool take = i < V && x >= cutoff && bits >= wide.bits;
                unsigned mask = __ballot_sync(0xffffffff, take);
                int base = 0;
                if (lane == 0 && mask) base = atomicAdd(&s_int, __popc(mask));
                base = __shfl_sync(0xffffffff, base, 0);
                if (take) keys[base + __popc(mask & ((1u << lane) - 1))] = (u64)bits << 32 | (0xffffffffu - i);
            }
            __syncthreads();
            int n = s_int, n2 = 1;
            while (n2 < n) n2 <<= 1;
            for (int i = n + tid; i < n2; i += blockDim.x) keys[i] = 0;
            __syncthreads();
            for (int k = 2; k <= n2; k <<= 1)  // bitonic sort, descending
                for (int j = k >> 1; j > 0; j >>= 1) {
                    for (int i = tid; i < n2; i += blockDim.x) {
                        int partner = i ^ j;
                        if (partner > i) {
                            u64 a = keys[i], c = keys[partner];
                            if (((i & k) == 0) ? a < c : a > c) { keys[i] = c; keys[partner] = a; }
                        }
                    }
                    __syncthreads();
                }
            if (tid == 0) {
                float cum = 0.0f;
                int last = -1;
                for (int i = 0; i < n; i++) { cum += __uint_as_float(keys[i] >> 32); if (cum > topp) { last = i; break; } }
                if (last < 0 && n == m) last = n - 1;  // every candidate, and still not above topp: sample_topp's default
                int pick = -1;
                if (last >= 0) {
                    float r = coin * cum, cdf = 0.0f;
                    pick = 0xffffffffu - (unsigned)keys[last];
                    for (int i = 0; i <= last; i++) {
                        cdf += __uint_as_float(keys[i] >> 32);
                        if (r < cdf) { pick = 0xffffffffu - (unsigned)keys[i]; break; }
                    }
                }
                s_int = pick;
            }
            __syncthreads();
            token = s_int;
            fallback = token < 0;
        }
        if (fallback) {
            // a nucleus too large to sort: its end and the pick by two more selects, with the fixed-point sums
            Crossing last = topp_cross(p, V, cutoff, to_fixed(topp), V);
            float cum = (float)((double)last.sum_through / SAMPLE_FX), r = coin * cum;
            Crossing pick = topp_cross(p, V, cutoff, to_fixed(r), V);
            if (pick.n_through > last.n_through) pick = last;
            token = find_rank(p, V, pick.bits, pick.rank);
        }
    }
    if (tid == 0) tokens[b] = token;
}

static size_t sample_smem(int V) { return V <= SAMPLE_SERIAL_MAX ? (size_t)V * sizeof(float) : 0; }

static void sample_init(int max_B, int V) {
    (void)max_B;  // all the scratch lives in shared memory
    cudaCheck(cudaFuncSetAttribute(sample_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sample_smem(V)));
    cudaCheck(cudaFuncSetAttribute(sample_kernel, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared));
}

static void sample_forward(int *tokens, float *logits, int B, int V, float temperature, float topp, uint64_t *rng) {
    launch(sample_kernel, B, SAMPLE_THREADS, sample_smem(V), tokens, logits, V, temperature, topp, rng);
}
