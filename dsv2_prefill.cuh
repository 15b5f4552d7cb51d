// dsv2_prefill.cuh: the prefill's matrix products (dsv2.c's matmul for T tokens at once) on the tensor
// cores through cuBLAS, at float32 accuracy, and the kernels around them; prefill_pass in dsv2.cu
// strings them together layer by layer.
//
// ---------------- The bf16 x 3 split: float32 accuracy from bf16 tensor cores
// The weights are bf16 already, so they are exact as tensor-core operands. Each float32 activation
// is split into three bf16 parts, x = x1 + x2 + x3 (8 + 8 + 8 mantissa bits: all 24 of a float32;
// x1 = bf16(x), x2 = bf16(x - x1), x3 = bf16(x - x1 - x2)). Stacked as three rows per token, one
// bf16 product with float32 accumulation gives W x1, W x2, W x3, and their sum is W x to float32
// accuracy at tensor-core speed, for three times the work of a bf16 product. (A plain bf16 product
// moved the CPU/GPU greedy text apart.) The attention's 3xTF32 (dsv2_common.cuh) is the same idea
// with both operands float32.
// Layout: a split (T, n) activation is (T, 3, n) bf16; a product of it is (3T, out) float32.

// v as its three bf16 parts at dst[0], dst[stride], dst[2 * stride]
__device__ __forceinline__ void store_split3(bf16 *dst, size_t stride, float v) {
    bf16 p1 = __float2bfloat16_rn(v);
    float r1 = v - __bfloat162float(p1);
    bf16 p2 = __float2bfloat16_rn(r1);
    dst[0] = p1;
    dst[stride] = p2;
    dst[2 * stride] = __float2bfloat16_rn(r1 - __bfloat162float(p2));
}
// x (rows, n) float32 -> xs (rows, 3, n) bf16, the three parts of each value. One thread per value
// (grid-stride loop).
__global__ void split3_kernel(bf16 *xs, const float *x, size_t rows, int n) {
    pdl_launch_next();
    pdl_wait();
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < rows * n; i += (size_t)gridDim.x * blockDim.x) {
        size_t r = i / n, j = i % n;
        store_split3(xs + (r * 3) * n + j, n, x[i]);
    }
}
static void split3_forward(bf16 *xs, const float *x, int T, int n) {
    launch(split3_kernel, std::min(ceil_div((long)T * n, 256), 4 * gpu.n_sm * 8), 256, 0, xs, x, (size_t)T, n);
}
// The end of a split product: y3 (3T, batch * out) -> y[t][b * sy + o] = beta * y + (the sum of token t's
// three rows), for o < out, b < batch (batched products: b = head); y's row stride is ldy.
// One thread per output value (grid-stride loop); the three parts are added in a fixed order.
__global__ void sum3_kernel(float *y, int ldy, int sy, const float *y3, size_t T, int batch, int out, float beta) {
    pdl_launch_next();
    pdl_wait();
    size_t R = (size_t)batch * out;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < T * R; i += (size_t)gridDim.x * blockDim.x) {
        size_t t = i / R, j = i % R;
        float s = (y3[(3 * t) * R + j] + y3[(3 * t + 1) * R + j]) + y3[(3 * t + 2) * R + j];
        float *dst = y + t * ldy + (j / out) * sy + j % out;
        *dst = beta != 0.0f ? beta * *dst + s : s;
    }
}
static void sum3_forward(float *y, int ldy, int sy, const float *y3, int T, int batch, int out, float beta) {
    launch(sum3_kernel, std::min(ceil_div((long)T * batch * out, 256), 4 * gpu.n_sm * 8), 256, 0, y, ldy, sy, y3,
           (size_t)T, batch, out, beta);
}
// dsv2.c ffn's hb = silu(gate x) * up x for the prefill: g3, u3 (3 rows, n) per row (split products) are
// summed, combined and split again for the down product: hs (rows, 3, n). One thread per value.
__global__ void swiglu_split3_kernel(bf16 *hs, const float *g3, const float *u3, size_t rows, int n) {
    pdl_launch_next();
    pdl_wait();
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < rows * n; i += (size_t)gridDim.x * blockDim.x) {
        size_t r = i / n, j = i % n;
        float g = (g3[(3 * r) * n + j] + g3[(3 * r + 1) * n + j]) + g3[(3 * r + 2) * n + j];
        float u = (u3[(3 * r) * n + j] + u3[(3 * r + 1) * n + j]) + u3[(3 * r + 2) * n + j];
        store_split3(hs + (r * 3) * n + j, n, silu_dev(g) * u);
    }
}
static void swiglu_split3_forward(bf16 *hs, const float *g3, const float *u3, int rows, int n) {
    launch(swiglu_split3_kernel, std::min(ceil_div((long)rows * n, 256), 4 * gpu.n_sm * 8), 256, 0, hs, g3, u3,
           (size_t)rows, n);
}
// C (n, m) = beta C + B (n, k) @ op(A), all row-major (leading dimensions ldc, ldb, lda), through cuBLAS
// in bf16 with float32 accumulation. A is a linear layer's (m, k) weight, op(A) = A^T (a_out_in = 1), or
// a (k, m) matrix, op(A) = A (W^UK_h in q^C W^UK_h). batch > 1 steps A, B, C by sA, sB, sC.
// (cuBLAS is column-major: it sees our row-major C (n, m) as C^T (m, n), and computes
// C^T = op'(A) B^T with op' = T for a weight; the same numbers, no transposes in memory.)
static void gemm_bf16(float *C, long ldc, long sC, const bf16 *A, long lda, long sA, int a_out_in, const bf16 *B, long ldb,
                      long sB, int n, int m, int k, int batch, float beta) {
    float one = 1.0f;
    cublasCheck(cublasGemmStridedBatchedEx(gpu.blas, a_out_in ? CUBLAS_OP_T : CUBLAS_OP_N, CUBLAS_OP_N, m, n, k, &one, A,
                                           CUDA_R_16BF, lda, sA, B, CUDA_R_16BF, ldb, sB, &beta, C, CUDA_R_32F, ldc, sC,
                                           batch, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}
// a linear layer on split activations: Y (T, out) = beta Y + X W^T, X given split as xs (T, 3, in)
static void linear_forward(float *Y, const bf16 *xs, const bf16 *W, int T, int in, int out, float beta) {
    gemm_bf16(gpu.Y3, out, 0, W, in, 0, 1, xs, in, 0, 3 * T, out, in, 1, 0.0f);
    sum3_forward(Y, out, 0, gpu.Y3, T, 1, out, beta);
}

// The prefill's routed experts (moe_ffn for T tokens): each (token, slot) pair becomes a row, and the
// rows are grouped by expert so that each expert is one product (prefill_pass, expert_gemm).
// gather: xgs (rows, 3, dim) = xs[perm[row]] (a token's split input); one block per grouped row.
__global__ void gather_rows_kernel(bf16 *xgs, const bf16 *xs, const int *perm, int n3) {
    pdl_launch_next();
    pdl_wait();
    int row = blockIdx.x;
    for (int i = threadIdx.x; i < n3; i += blockDim.x) xgs[(size_t)row * n3 + i] = xs[(size_t)perm[row] * n3 + i];
}
// The weighted sum of eq. (20) for the prefill, with its residual: x[t] (dim) += sum_k g_t,k y[inv[t, k]],
// where y (rows, dim) is each grouped row's down product, summed from its three split rows, and inv[t, k]
// the row of token t's k-th expert. One block per token, threads over dim; a fixed order: deterministic,
// no atomics.
__global__ void moe_combine_kernel(float *x, const float *y3, const int *inv, const float *w, int K, int dim) {
    pdl_launch_next();
    pdl_wait();
    int t = blockIdx.x;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        float acc = 0.0f;
        for (int k = 0; k < K; k++) {
            size_t r = inv[t * K + k];
            acc += w[t * K + k] * ((y3[(3 * r) * dim + i] + y3[(3 * r + 1) * dim + i]) + y3[(3 * r + 2) * dim + i]);
        }
        x[(size_t)t * dim + i] += acc;
    }
}
