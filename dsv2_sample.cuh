// dsv2_sample.cuh: dsv2.c's sampler on the GPU, for B rows of logits at once (issue 14.1).
// Included by dsv2.cu after dsv2_common.cuh (it uses launch_cluster(), PDL and dsv2.c's random_f32).
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
// check_logits stops there; nothing is drawn). The logits are only read.
// No host round trip and a grid that depends on B only: the call can be captured in a CUDA graph.
//
// The row lives in shared memory: a short row (V <= SAMPLE_SERIAL_MAX, the default model's 4096) in one
// block of SAMPLE_THREADS threads, a long one (V2's 102400) split over a thread block cluster of up to
// SAMPLE_CLUSTER blocks (sm_90: blocks scheduled together on one GPC, each able to read, write and add to
// the others' shared memory, "distributed shared memory"), block k holding values [k S, (k + 1) S) of the
// row, S = V / blocks rounded up (6400 values, 25 KB, for 16 blocks). The row is read from global memory
// once; every later pass (a dozen: exp, divide, the radix selects' histograms below) reads shared memory,
// spread over up to 16 multiprocessors. (One block per row read the row's 400 KB from global memory on
// every pass, ~15 us each, bound by the loads one multiprocessor keeps in flight: 192 us a draw at
// T 0.8, topp 0.9 on an H200, now 59 us; docs/BENCHMARKS.md.)
// The blocks agree through distributed shared memory (cluster_share): each publishes its part, all wait
// at the cluster's barrier, then each reads every block's part and folds them in block order: every
// block computes the same max, sum and histogram, and so takes the same branches.
//
// What can differ from dsv2.c, and what is done about it:
// - sums: dsv2.c adds in index order, one value after another, in float. Where that is cheap (rows of
//   at most SAMPLE_SERIAL_MAX values: the default model's 4096) one warp adds in exactly that order
//   (warp_running_sum), and exp is taken in double and rounded once to float: glibc's expf, which
//   dsv2.c calls, is correctly rounded but for rare inputs (on the default model's logits the two
//   differed in 0.06% of 20.5M values, by 1 ulp; CUDA's own expf is off by up to 2 ulp). So the
//   probabilities are dsv2.c's bit for bit but for those. Longer rows (V2's 102400: 102400 dependent
//   adds would cost a large part of a decode step) take CUDA's expf and sum in parallel, in double:
//   their probabilities differ from dsv2.c's in the last bits, and a token can differ where the coin
//   falls within such a difference of a boundary (simulated on the CPU with the default model's
//   logits: 1 draw in 5012 for a parallel sum).
// - the nucleus: sorting 102400 candidates per token is what made sampling slow; only the nucleus
//   needs an order. A radix select over the probabilities' bits (positive floats order like their
//   bits), with sums in fixed point (integers: the same in any order), finds the smallest prefix of
//   the order whose sum exceeds topp + SAMPLE_MARGIN; when that prefix has at most SAMPLE_KEYS
//   candidates they are gathered into block 0, sorted, and ONE warp walks them as sample_topp does
//   (same order, same float sums: the same cum, r and token). A flatter row (a random model's nucleus
//   holds most of the vocabulary) is sampled by two more radix selects, for cum and for r, with the
//   fixed-point sums; there dsv2.c's own float running sum over tens of thousands of candidates
//   drifts, and the tokens agree up to that rounding (./dsv2cu --check-sampler measures it).
#define SAMPLE_THREADS 256        // threads per block (several blocks share a multiprocessor: B rows at once)
#ifndef SAMPLE_CLUSTER           // (-DSAMPLE_CLUSTER=8: the 8-block build docs/BENCHMARKS.md compares)
#define SAMPLE_CLUSTER 16         // blocks per long row (fewer where the GPU cannot schedule that many together)
#endif
#define SAMPLE_KEYS 4096          // the largest nucleus sorted and walked as sample_topp walks it
#define SAMPLE_SERIAL_MAX 8192    // rows up to this long are summed in dsv2.c's order
#define SAMPLE_MARGIN 1e-3        // room above topp for the float sums of up to SAMPLE_KEYS values
#define SAMPLE_FX 0x1p31          // fixed point for the selects' sums: p * 2^31 rounded (a row's sum stays < 2^32)

typedef unsigned long long u64;

// p in fixed point: integer sums are exact and the same in any order (deterministic atomics)
__device__ __forceinline__ unsigned to_fixed(float p) { return (unsigned)__double2uint_rn((double)p * SAMPLE_FX); }

// f(i, p[i]) for this thread's values of p (n), 16-byte loads when p allows; each thread sees its values
// in increasing index order
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

// One warp adds x(0), x(1), ..., x(n - 1) one after another in float, exactly as dsv2.c's loops do, and
// stops at the first i whose running sum s satisfies stop(s): returns that i (-1 when none) with *sum =
// s there (the whole sum when none). keep(i, s) is called with each running sum up to there, by the
// lane that loaded x(i). A loop in one thread pays a shared-memory load's latency per value; here the
// 32 lanes load 32 values at once, then every lane adds them in order from shuffles, which do not wait
// on the sum: the adds run back to back, and every lane holds the same sums.
template <typename Load, typename Stop, typename Keep>
__device__ int warp_running_sum(int n, Load x, Stop stop, Keep keep, float *sum) {
    int lane = threadIdx.x & 31;
    float s = 0.0f;
    for (int i0 = 0; i0 < n; i0 += 32) {
        float v = i0 + lane < n ? x(i0 + lane) : 0.0f, mine = 0.0f;  // past n: adding 0 leaves s as it is
        #pragma unroll
        for (int k = 0; k < 32; k++) {
            s += __shfl_sync(0xffffffff, v, k);
            if (lane == k) mine = s;  // the running sum through value i0 + lane
        }
        unsigned hit = __ballot_sync(0xffffffff, i0 + lane < n && stop(mine));
        int last = hit ? __ffs(hit) - 1 : 31;
        if (lane <= last && i0 + lane < n) keep(i0 + lane, mine);
        if (hit) { *sum = __shfl_sync(0xffffffff, mine, last); return i0 + last; }
    }
    *sum = s;
    return -1;
}

// ---------------- the cluster's blocks agreeing on a value

typedef struct {
    int rank, n_ranks;  // this block's place in its row's cluster, and the cluster's size
    int turn, round;    // cluster_share calls and radix rounds so far (the same in every thread)
} Cluster;

// Every block of the cluster gets all[k] = block k's v (thread 0's), the same array in every block.
// Two slots used in turn: a block may publish its next part while another still reads this one, but
// not the part after (that waits behind the next call's cluster.sync, which follows every read).
template <typename T> __device__ const T *cluster_share(Cluster *c, T v) {
    __shared__ T slot[2], all[SAMPLE_CLUSTER];
    cg::cluster_group cluster = cg::this_cluster();
    T *mine = &slot[c->turn++ & 1];
    if (threadIdx.x == 0) *mine = v;
    cluster_sync();
    if ((int)threadIdx.x < c->n_ranks) all[threadIdx.x] = *cluster.map_shared_rank(mine, (int)threadIdx.x);
    __syncthreads();
    return all;
}

typedef struct { float v; int i, bad; } ArgBest;  // a block's argmax (value, index), first non-finite index

// the argmax over the cluster (lowest index on ties) of the blocks' (v, i), and the first bad index
__device__ ArgBest cluster_argmax(Cluster *c, ArgBest mine) {
    const ArgBest *all = cluster_share(c, mine);
    ArgBest best = all[0];
    for (int k = 1; k < c->n_ranks; k++) {
        if (arg_before(all[k].v, all[k].i, best.v, best.i)) { best.v = all[k].v; best.i = all[k].i; }
        best.bad = min(best.bad, all[k].bad);
    }
    return best;
}
__device__ int cluster_min_int(Cluster *c, int v) {
    const int *all = cluster_share(c, v);
    for (int k = 0; k < c->n_ranks; k++) v = min(v, all[k]);
    return v;
}

// the index (in this block's values p (n)) of the rank-th value whose bits are `bits`, counting in index
// order; -1 when this block has fewer
__device__ int find_rank(const float *p, int n, unsigned bits, int rank) {
    int lo, hi, count = 0, total, lane = threadIdx.x & 31;
    int n_warps = blockDim.x >> 5, per = ((n + n_warps - 1) / n_warps + 31) & ~31;  // each warp a contiguous share
    lo = min(n, (int)(threadIdx.x >> 5) * per);
    hi = min(n, lo + per);
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

// ---------------- the radix select

// Where the running sum crosses `target`, along sample_topp's order of the candidates (p >= cutoff,
// p descending, then index ascending): the first candidate whose running sum, in fixed point,
// exceeds target (the last candidate when none does). A radix select: four rounds over the 8-bit
// digits of p's bits, high to low; each round histograms (count, sum) of the candidates that share
// the digits chosen so far, and warp 0 of every block picks the digit where the sum crosses.
typedef struct {
    unsigned bits;       // the crossing candidate's p, as bits
    int rank;            // its rank among the candidates with that p (in index order)
    int n_through;       // candidates up to and including it
    int n_at_least;      // candidates with p >= its p (its ties after it too); > limit: the select stopped early
    int n_candidates;    // all candidates (m in sample_topp)
    u64 sum_through;     // their sum (fixed point)
} Crossing;

// The histograms. Each block counts its own values into count/sum; the cluster's histogram is summed
// bin by bin in the bin's owner, block d % n_ranks, by distributed-shared-memory atomics (integers: the
// same sums in any order), then every block reads all 256 bins back from their owners. The owners'
// copies are used in turn, three of them: copy r % 3, read in round r, is zeroed in round r + 2, after
// the cluster.sync of round r + 1 that every block reaches only once it has read it, and before the
// cluster.sync of round r + 2 that the atomics of round r + 3 wait behind.
typedef struct {
    unsigned count[256], sum[256];                    // this block's values
    unsigned owned_count[3][256], owned_sum[3][256];  // the cluster's, for the bins this block owns
    unsigned all_count[256], all_sum[256];            // the cluster's, every bin
    unsigned prefix;                                  // the select's state (the same in every block):
    u64 above, target;                                //   digits chosen, the sum above them, the target
    int n_above, n_eq, n_candidates;                  //   candidates above / in the chosen bin / all
} Radix;

// the digit histogram's (count, sum) of one thread's run of values with the same digit
__device__ __forceinline__ void hist_add(unsigned *h_count, unsigned *h_sum, int digit, unsigned count, unsigned sum) {
    if (count) { atomicAdd(&h_count[digit], count); atomicAdd(&h_sum[digit], sum); }
}

// limit: stop once more than `limit` candidates lie above the crossing (the caller cannot sort them).
// p (n): this block's values
__device__ Crossing topp_cross(const float *p, int n, float cutoff, u64 target, int limit, Cluster *c, Radix *rx) {
    cg::cluster_group cluster = cg::this_cluster();
    int tid = threadIdx.x;
    if (tid == 0) { rx->prefix = 0; rx->above = 0; rx->n_above = 0; rx->n_eq = 0; rx->target = target; }
    for (int shift = 24; shift >= 0; shift -= 8) {
        __syncthreads();
        unsigned prefix = rx->prefix, run_count = 0, run_sum = 0;
        int run_digit = 0;
        for_each_value(p, n, [&](int i, float x) {  // runs of one digit take one atomic (flat rows)
            unsigned b = __float_as_uint(x);
            if (x >= cutoff && (shift == 24 || (b >> (shift + 8)) == prefix)) {
                int digit = (b >> shift) & 255;
                if (digit != run_digit) { hist_add(rx->count, rx->sum, run_digit, run_count, run_sum); run_digit = digit; run_count = 0; run_sum = 0; }
                run_count++;
                run_sum += to_fixed(x);
            }
        });
        hist_add(rx->count, rx->sum, run_digit, run_count, run_sum);
        __syncthreads();
        int copy = c->round % 3, spare = (c->round + 1) % 3;  // spare: the copy read two rounds ago
        c->round++;
        for (int d = tid; d < 256; d += blockDim.x) {
            int owner = d % c->n_ranks;
            if (rx->count[d]) {
                atomicAdd(cluster.map_shared_rank(&rx->owned_count[copy][d], owner), rx->count[d]);
                atomicAdd(cluster.map_shared_rank(&rx->owned_sum[copy][d], owner), rx->sum[d]);
            }
            rx->count[d] = 0; rx->sum[d] = 0;
            if (owner == c->rank) { rx->owned_count[spare][d] = 0; rx->owned_sum[spare][d] = 0; }
        }
        cluster_sync();
        for (int d = tid; d < 256; d += blockDim.x) {
            int owner = d % c->n_ranks;
            rx->all_count[d] = *cluster.map_shared_rank(&rx->owned_count[copy][d], owner);
            rx->all_sum[d] = *cluster.map_shared_rank(&rx->owned_sum[copy][d], owner);
        }
        __syncthreads();
        if (tid < 32) {  // lane L holds digits 255 - 8L down to 248 - 8L
            int lane = tid;
            u64 sum = 0;
            unsigned count = 0;
            for (int k = 0; k < 8; k++) { sum += rx->all_sum[255 - 8 * lane - k]; count += rx->all_count[255 - 8 * lane - k]; }
            u64 incl = sum;
            unsigned cincl = count;
            for (int o = 1; o < 32; o <<= 1) {
                u64 y = __shfl_up_sync(0xffffffff, incl, o);
                unsigned cy = __shfl_up_sync(0xffffffff, cincl, o);
                if (lane >= o) { incl += y; cincl += cy; }
            }
            u64 above = rx->above, t = rx->target;
            if (shift == 24) {  // every candidate is in this histogram; none crosses: aim at the last one
                u64 total = __shfl_sync(0xffffffff, incl, 31);
                unsigned n_total = __shfl_sync(0xffffffff, cincl, 31);
                if (lane == 0) rx->n_candidates = (int)n_total;
                if (total <= t) t = total - 1;
            }
            unsigned crossing = __ballot_sync(0xffffffff, above + incl > t);
            if (lane == __ffs(crossing) - 1) {
                u64 a = above + incl - sum;
                int na = rx->n_above + (int)(cincl - count);
                for (int k = 0; k < 8; k++) {
                    int d = 255 - 8 * lane - k;
                    if (a + rx->all_sum[d] > t) { rx->prefix = (rx->prefix << 8) | d; rx->above = a; rx->n_above = na; rx->n_eq = rx->all_count[d]; break; }
                    a += rx->all_sum[d];
                    na += rx->all_count[d];
                }
                rx->target = t;
            }
        }
        __syncthreads();
        if (rx->n_candidates == 0 || rx->n_above > limit) break;
    }
    Crossing cr;
    cr.bits = rx->prefix;
    u64 q = to_fixed(__uint_as_float(cr.bits)), t = rx->target, above = rx->above;
    if (rx->n_above > limit) q = 0;  // stopped early: bits is a prefix, not a value
    int ties = q ? (int)((t - above) / q) + 1 : rx->n_eq;  // the first tie whose running sum exceeds t
    if (ties > rx->n_eq) ties = rx->n_eq;
    cr.rank = ties - 1;
    cr.n_through = rx->n_above + ties;
    cr.n_at_least = rx->n_above > limit ? rx->n_above : rx->n_above + rx->n_eq;
    cr.n_candidates = rx->n_candidates;
    cr.sum_through = above + ties * q;
    __syncthreads();  // the shared results are read before the next call resets them
    return cr;
}

// sample_topp on the candidates p >= cutoff with bits >= `bits` (at most SAMPLE_KEYS: a prefix of its
// order that holds the nucleus, m candidates in all): gathered into block 0's keys, key = p's bits :
// ~index (descending = p down, index up), sorted there and walked by one warp exactly as sample_topp
// walks `order`. Every block gets the token, or -1 when the walk does not get above topp (rounding
// beyond SAMPLE_MARGIN) before the prefix ends.
__device__ int nucleus_token(const float *p, int n, int lo, float cutoff, unsigned bits, int m, float topp,
                             float coin, u64 *keys, Cluster *c) {
    cg::cluster_group cluster = cg::this_cluster();
    int tid = threadIdx.x, count = 0, in_block, n_keys = 0, before = 0;
    for_each_value(p, n, [&](int i, float x) { count += x >= cutoff && __float_as_uint(x) >= bits; });
    int at = block_scan(count, &in_block);
    const int *counts = cluster_share(c, in_block);
    for (int k = 0; k < c->n_ranks; k++) { before += k < c->rank ? counts[k] : 0; n_keys += counts[k]; }
    u64 *dst = cluster.map_shared_rank(keys, 0) + before + at;
    for_each_value(p, n, [&](int i, float x) {
        unsigned b = __float_as_uint(x);
        if (x >= cutoff && b >= bits) *dst++ = (u64)b << 32 | (0xffffffffu - (unsigned)(lo + i));
    });
    cluster_sync();  // the keys are in block 0
    __shared__ int s_pick;
    if (c->rank == 0) {
        int n2 = 1;
        while (n2 < n_keys) n2 <<= 1;
        for (int i = n_keys + tid; i < n2; i += blockDim.x) keys[i] = 0;
        __syncthreads();
        for (int k = 2; k <= n2; k <<= 1)  // bitonic sort, descending
            for (int j = k >> 1; j > 0; j >>= 1) {
                for (int q = tid; q < n2 / 2; q += blockDim.x) {
                    int i = 2 * q - (q & (j - 1));  // the q-th pair (i, i + j) of this step
                    u64 a = keys[i], b = keys[i + j];
                    if (((i & k) == 0) ? a < b : a > b) { keys[i] = b; keys[i + j] = a; }
                }
                __syncthreads();
            }
        if (tid < 32) {
            // cum over the sorted keys until it exceeds topp; each key keeps its running sum in place of p
            float cum;
            int last = warp_running_sum(n_keys, [&](int i) { return __uint_as_float((unsigned)(keys[i] >> 32)); },
                                        [&](float s) { return s > topp; },
                                        [&](int i, float s) { keys[i] = (u64)__float_as_uint(s) << 32 | (unsigned)keys[i]; }, &cum);
            if (last < 0 && n_keys == m) last = n_keys - 1;  // every candidate, and still not above topp: sample_topp's default
            int pick = -1;
            __syncwarp();
            if (last >= 0 && tid == 0) {
                // sample_topp's second loop adds the same values in the same order: its cdf at i is the
                // running sum kept at i, which never decreases, so the first i with r < cdf is a binary search
                float r = coin * cum;
                int a = 0, z = last;
                while (a < z) {
                    int mid = (a + z) / 2;
                    if (r < __uint_as_float((unsigned)(keys[mid] >> 32))) z = mid; else a = mid + 1;
                }
                pick = (int)(0xffffffffu - (unsigned)keys[a]);  // a == last also when no cdf exceeds r
            }
            if (tid == 0) s_pick = pick;
        }
        __syncthreads();
    }
    return cluster_share(c, c->rank == 0 ? s_pick : 0)[0];  // block 0's
}

// One cluster of SAMPLE_THREADS-thread blocks per row (a cluster of 1 for short rows): the row's values
// in the blocks' shared memory, then sample() as above; block 0's thread 0 writes the token and the rng.
__global__ void __launch_bounds__(SAMPLE_THREADS) sample_kernel(int *tokens, const float *logits, int V, float temperature,
                                                                float topp, uint64_t *rng) {
    pdl_launch_next();
    extern __shared__ __align__(16) unsigned char sample_smem_bytes[];
    __shared__ Radix rx;
    __shared__ float s_sum;
    __shared__ int s_pick;
    cg::cluster_group cluster = cg::this_cluster();
    Cluster c = {(int)cluster.block_rank(), (int)cluster.num_blocks(), 0, 0};
    int b = blockIdx.x / c.n_ranks, tid = threadIdx.x;
    int slice = ((V + c.n_ranks - 1) / c.n_ranks + 3) & ~3;  // a multiple of 4: 16-byte aligned slices
    int lo = min(V, c.rank * slice), n = min(V, lo + slice) - lo;  // this block holds values [lo, lo + n)
    float *p = (float *)sample_smem_bytes;                          // (slice) those values: logits, then e, then p
    u64 *keys = (u64 *)(sample_smem_bytes + (size_t)slice * sizeof(float));  // (SAMPLE_KEYS) block 0: the nucleus
    for (int d = tid; d < 256; d += blockDim.x) {  // the histograms start at zero (topp_cross keeps them so)
        rx.count[d] = 0; rx.sum[d] = 0;
        for (int k = 0; k < 3; k++) { rx.owned_count[k][d] = 0; rx.owned_sum[k][d] = 0; }
    }
    pdl_wait();
    uint64_t state = rng[b];  // every block draws the same coin; block 0 writes the state back at the end
    // the row into shared memory; its argmax (lowest index on ties) and first logit that is not finite
    ArgBest best = {-INFINITY, V, V};
    map_values(p, logits + (size_t)b * V + lo, n, [&](int i, float x) {
        if (!isfinite(x)) best.bad = min(best.bad, lo + i);
        else if (x > best.v) { best.v = x; best.i = lo + i; }
        return x;
    });
    best.bad = block_min_int(best.bad);
    block_argmax(&best.v, &best.i);
    best = cluster_argmax(&c, best);
    int token, drew = 0;
    if (best.bad < V || temperature == 0.0f) {
        token = best.bad < V ? -1 - best.bad : best.i;
    } else {
        // softmax as dsv2.c's sample(): e = exp((l - max) / T), their sum, then p = e / sum
        int serial = V <= SAMPLE_SERIAL_MAX;  // then the cluster is this one block, and p the whole row
        double part = 0.0;
        map_values(p, p, n, [&](int i, float logit) {
            float x = (logit - best.v) / temperature;
            float e = serial ? (float)exp((double)x) : expf(x);  // exp in double, rounded once: glibc's expf but for ~1e-9 of inputs
            part += e;
            return e;
        });
        float sum;
        if (serial) {  // in dsv2.c's order
            __syncthreads();
            if (tid < 32) {
                warp_running_sum(V, [&](int i) { return p[i]; }, [](float) { return false; }, [](int, float) {}, &sum);
                if (tid == 0) s_sum = sum;
            }
            __syncthreads();
            sum = s_sum;
        } else {  // in double, the blocks' parts added in block order
            const double *parts = cluster_share(&c, block_sum_double(part));
            double total = 0.0;
            for (int k = 0; k < c.n_ranks; k++) total += parts[k];
            sum = (float)total;
        }
        map_values(p, p, n, [&](int i, float e) { return e / sum; });
        __syncthreads();
        float coin = random_f32(&state);
        drew = 1;
        float cutoff = (1.0f - topp) / (float)(V - 1 > 0 ? V - 1 : 1);  // sample_topp's
        if (topp <= 0.0f || topp >= 1.0f) {
            // sample_mult: the first i whose running sum exceeds the coin, in index order
            if (serial) {
                if (tid < 32) {
                    float cdf;
                    int pick = warp_running_sum(V, [&](int i) { return p[i]; }, [&](float s) { return coin < s; }, [](int, float) {}, &cdf);
                    if (tid == 0) s_pick = pick < 0 ? V - 1 : pick;
                }
                __syncthreads();
                token = s_pick;
            } else {  // each warp walks its share, 32 values at a time, from the sum of everything before it
                int w_lo, w_hi, lane = tid & 31, pick = V;
                int n_warps = blockDim.x >> 5, per = ((n + n_warps - 1) / n_warps + 31) & ~31;
                w_lo = min(n, (tid >> 5) * per);
                w_hi = min(n, w_lo + per);
                float share = 0.0f, in_block;
                for (int i = w_lo + lane; i < w_hi; i += 32) share += p[i];
                share = warp_sum(share);
                float cdf = block_scan(lane == 0 ? share : 0.0f, &in_block);
                cdf = __shfl_sync(0xffffffff, cdf, 0);
                const float *blocks = cluster_share(&c, in_block);
                float before = 0.0f;
                for (int k = 0; k < c.rank; k++) before += blocks[k];
                cdf = before + cdf;
                float start = cdf;
                for (int i0 = w_lo; i0 < w_hi && pick == V; i0 += 32) {
                    float v = i0 + lane < w_hi ? p[i0 + lane] : 0.0f, incl = v;
                    for (int o = 1; o < 32; o <<= 1) { float y = __shfl_up_sync(0xffffffff, incl, o); if (lane >= o) incl += y; }
                    unsigned hit = __ballot_sync(0xffffffff, i0 + lane < w_hi && coin < cdf + incl);
                    if (hit) pick = lo + i0 + __ffs(hit) - 1;
                    cdf += __shfl_sync(0xffffffff, incl, 31);
                }
                if (pick == V && w_hi > w_lo && coin < start + share) pick = lo + w_hi - 1;  // rounding between two shares
                token = cluster_min_int(&c, block_min_int(pick));
                if (token == V) token = V - 1;
            }
        } else {
            // sample_topp. The smallest prefix of its order whose fixed-point sum exceeds topp + SAMPLE_MARGIN:
            Crossing wide = topp_cross(p, n, cutoff, to_fixed(topp) + (u64)(SAMPLE_MARGIN * SAMPLE_FX), SAMPLE_KEYS, &c, &rx);
            if (wide.n_candidates == 0) {
                // no candidate (only when topp is tiny and p flat): sample_topp takes the argmax of p
                ArgBest top = {-INFINITY, V, V};
                for_each_value(p, n, [&](int i, float x) { if (x > top.v) { top.v = x; top.i = lo + i; } });
                block_argmax(&top.v, &top.i);
                token = cluster_argmax(&c, top).i;
            } else {
                token = -1;
                if (wide.n_at_least <= SAMPLE_KEYS)
                    token = nucleus_token(p, n, lo, cutoff, wide.bits, wide.n_candidates, topp, coin, keys, &c);
                if (token < 0) {
                    // a nucleus too large to sort: its end and the pick by two more selects, with the fixed-point sums
                    Crossing last = topp_cross(p, n, cutoff, to_fixed(topp), V, &c, &rx);
                    float cum = (float)((double)last.sum_through / SAMPLE_FX), r = coin * cum;
                    Crossing pick = topp_cross(p, n, cutoff, to_fixed(r), V, &c, &rx);
                    if (pick.n_through > last.n_through) pick = last;
                    // the pick.rank-th value with those bits in index order: in which block, then where
                    int here = 0, in_block, before = 0;
                    for_each_value(p, n, [&](int i, float x) { here += __float_as_uint(x) == pick.bits; });
                    block_scan(here, &in_block);
                    const int *counts = cluster_share(&c, in_block);
                    for (int k = 0; k < c.rank; k++) before += counts[k];
                    int at = V;
                    if (pick.rank >= before && pick.rank < before + in_block) at = lo + find_rank(p, n, pick.bits, pick.rank - before);
                    token = cluster_min_int(&c, at);
                }
            }
        }
    }
    if (c.rank == 0 && tid == 0) {
        tokens[b] = token;
        if (drew) rng[b] = state;
    }
    cluster_sync();  // no block leaves while another may still read its shared memory
}

static int sample_ranks = 1;      // blocks per row (sample_init): 1 for short rows, else the cluster's size
static int sample_rows_at_once;  // rows (clusters) the GPU runs at once (sample_init; --check-sampler prints it)

// dynamic shared memory of a block: its slice of the row, then the keys (used in block 0)
static size_t sample_smem(int V, int ranks) {
    size_t slice = (size_t)(((V + ranks - 1) / ranks + 3) & ~3);
    return slice * sizeof(float) + SAMPLE_KEYS * sizeof(u64);
}

static void sample_init(int max_B, int V) {
    (void)max_B;  // all the scratch lives in shared memory
    int smem_max = 0, n_sm = 0;
    cudaCheck(cudaDeviceGetAttribute(&smem_max, cudaDevAttrMaxSharedMemoryPerBlockOptin, 0));
    cudaCheck(cudaDeviceGetAttribute(&n_sm, cudaDevAttrMultiProcessorCount, 0));
    smem_max -= (int)sizeof(Radix) + 1024;  // room for the static shared memory
    cudaCheck(cudaFuncSetAttribute(sample_kernel, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared));
    cudaCheck(cudaFuncSetAttribute(sample_kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
    // one block for a short row; for a long one the largest cluster (SAMPLE_CLUSTER, 8, 4, 2) that holds
    // the row and of which the GPU can run one
    for (int ranks = V <= SAMPLE_SERIAL_MAX ? 1 : SAMPLE_CLUSTER;; ranks /= 2) {
        if (ranks < 1 || sample_smem(V, ranks) > (size_t)smem_max) {
            fprintf(stderr, "dsv2cu: a vocabulary of %d is too large for the GPU sampler (a row must fit in the shared memory of %d blocks)\n",
                    V, SAMPLE_CLUSTER);
            exit(1);
        }
        cudaCheck(cudaFuncSetAttribute(sample_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sample_smem(V, ranks)));
        sample_ranks = ranks;
        sample_rows_at_once = 0;
        if (ranks == 1) {
            int per_sm = 0;
            cudaCheck(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, sample_kernel, SAMPLE_THREADS, sample_smem(V, 1)));
            sample_rows_at_once = per_sm * n_sm;
        } else {
            cudaLaunchAttribute attr;
            attr.id = cudaLaunchAttributeClusterDimension;
            attr.val.clusterDim.x = ranks; attr.val.clusterDim.y = 1; attr.val.clusterDim.z = 1;
            cudaLaunchConfig_t cfg;
            memset(&cfg, 0, sizeof cfg);
            cfg.gridDim = dim3(ranks); cfg.blockDim = dim3(SAMPLE_THREADS); cfg.dynamicSmemBytes = sample_smem(V, ranks);
            cfg.attrs = &attr; cfg.numAttrs = 1;
            if (cudaOccupancyMaxActiveClusters(&sample_rows_at_once, sample_kernel, &cfg) != cudaSuccess) sample_rows_at_once = 0;
            (void)cudaGetLastError();  // a cluster size this GPU refuses: try half
        }
        if (sample_rows_at_once > 0) break;
    }
}

static void sample_forward(int *tokens, float *logits, int B, int V, float temperature, float topp, uint64_t *rng) {
    launch_cluster(sample_ranks, sample_kernel, B * sample_ranks, SAMPLE_THREADS, sample_smem(V, sample_ranks), tokens,
                   (const float *)logits, V, temperature, topp, rng);
}
