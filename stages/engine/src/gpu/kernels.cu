// CUDA kernels of the GPU training path: fused BatchNorm (+ ReLU) forward and backward, the fused
// residual add + ReLU, the ImageNet stem's max-pooling, and the SGD-momentum update. Compiled to
// PTX by stages/engine/build.rs (nvcc) in a build with the `cuda` feature, and loaded by candle's device
// on first use.
//
// Activations are `T` (float or __nv_bfloat16), NCHW or, for the planned step's channels-last
// option, NHWC (`nhwc` arguments; the kernels of a layout-free operation take none); everything
// accumulated (batch statistics, their gradients) and every parameter is float. Reductions over a channel are split over a grid of
// (channel, part) blocks writing partial sums, combined by a per-channel finalise kernel: one
// block per channel alone would leave most of the GPU idle for the wide-and-shallow layers
// (64 channels × 262,144 values at ResNet-18's first stage, batch 256).

#include <cuda_bf16.h>
#include <stdint.h>

typedef __nv_bfloat16 bf16;

__device__ __forceinline__ float load(const float* p, size_t i) { return p[i]; }
__device__ __forceinline__ float load(const bf16* p, size_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ void store(float* p, size_t i, float v) { p[i] = v; }
__device__ __forceinline__ void store(bf16* p, size_t i, float v) { p[i] = __float2bfloat16(v); }

// The channel of value i of an n × c × hw activation: NCHW, or NHWC when nhwc.
__device__ __forceinline__ int channel_of(long long i, int c, int hw, int nhwc) {
    return nhwc ? (int)(i % c) : (int)((i / hw) % c);
}

// Sums `a` and `b` over the block; the result is valid in thread 0. blockDim.x is a multiple
// of 32 and at most 1024.
__device__ __forceinline__ void block_sum2(float& a, float& b) {
    __shared__ float sa[32], sb[32];
    for (int o = 16; o > 0; o >>= 1) {
        a += __shfl_down_sync(0xffffffffu, a, o);
        b += __shfl_down_sync(0xffffffffu, b, o);
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) { sa[warp] = a; sb[warp] = b; }
    __syncthreads();
    const int warps = blockDim.x >> 5;
    if (warp == 0) {
        a = lane < warps ? sa[lane] : 0.f;
        b = lane < warps ? sb[lane] : 0.f;
        for (int o = 16; o > 0; o >>= 1) {
            a += __shfl_down_sync(0xffffffffu, a, o);
            b += __shfl_down_sync(0xffffffffu, b, o);
        }
    }
}

// Partial Σ(x − s) and Σ(x − s)² of channel c = blockIdx.x over part blockIdx.y of its
// n·hw values, where s = x[0, c, 0] (a shift that keeps the one-pass variance accurate when
// the mean is large next to the spread). partial: [c][parts][2].
template <typename T>
__device__ void bn_stats_partial(const T* x, float* partial, int n, int c, int hw) {
    const int ch = blockIdx.x, part = blockIdx.y, parts = gridDim.y;
    const long long m = (long long)n * hw;
    const long long chunk = (m + parts - 1) / parts;
    const long long lo = part * chunk, hi = min(m, lo + chunk);
    const float shift = load(x, (size_t)ch * hw);
    float s = 0.f, s2 = 0.f;
    for (long long j = lo + threadIdx.x; j < hi; j += blockDim.x) {
        const long long i = j / hw, k = j - i * hw;
        const float d = load(x, (size_t)((i * c + ch) * hw + k)) - shift;
        s += d;
        s2 += d * d;
    }
    block_sum2(s, s2);
    if (threadIdx.x == 0) {
        partial[(ch * parts + part) * 2] = s;
        partial[(ch * parts + part) * 2 + 1] = s2;
    }
}

// Sums `a` and `b` over the threads of a block column (the same threadIdx.x); the result is
// valid in row threadIdx.y == 0. blockDim.x · blockDim.y is at most 512.
__device__ __forceinline__ void column_sum2(float& a, float& b) {
    __shared__ float sa[512], sb[512];
    const int at = threadIdx.y * blockDim.x + threadIdx.x;
    sa[at] = a;
    sb[at] = b;
    __syncthreads();
    if (threadIdx.y == 0) {
        for (unsigned r = 1; r < blockDim.y; ++r) {
            a += sa[r * blockDim.x + threadIdx.x];
            b += sb[r * blockDim.x + threadIdx.x];
        }
    }
}

// bn_stats_partial for NHWC activations: channels are the fastest dimension, so a block takes
// blockDim.x adjacent channels (threadIdx.x; a warp reads consecutive addresses) over
// blockDim.y interleaved rows of part blockIdx.y of the n·hw rows. The shift is x[0, 0, ch].
template <typename T>
__device__ void bn_stats_partial_nhwc(const T* x, float* partial, int n, int c, int hw) {
    const int ch = blockIdx.x * blockDim.x + threadIdx.x, part = blockIdx.y, parts = gridDim.y;
    const long long m = (long long)n * hw;
    const long long chunk = (m + parts - 1) / parts;
    const long long lo = part * chunk, hi = min(m, lo + chunk);
    float s = 0.f, s2 = 0.f;
    if (ch < c) {
        const float shift = load(x, (size_t)ch);
        for (long long j = lo + threadIdx.y; j < hi; j += blockDim.y) {
            const float d = load(x, (size_t)(j * c + ch)) - shift;
            s += d;
            s2 += d * d;
        }
    }
    column_sum2(s, s2);
    if (threadIdx.y == 0 && ch < c) {
        partial[(ch * parts + part) * 2] = s;
        partial[(ch * parts + part) * 2 + 1] = s2;
    }
}

// Per channel: mean and 1/sqrt(var + eps) of the batch (biased variance) into save_mean and
// save_invstd, and the running statistics updated in place with PyTorch's rule (unbiased
// variance, `momentum` the weight of the batch). The shift is the partial kernels' (x[0, ch, 0]
// in either layout).
template <typename T>
__device__ void bn_stats_finalize(const T* x, const float* partial, float* save_mean,
                                  float* save_invstd, float* running_mean, float* running_var,
                                  int n, int c, int hw, int parts, double eps, float momentum,
                                  int nhwc) {
    const int ch = blockIdx.x * blockDim.x + threadIdx.x;
    if (ch >= c) return;
    double s = 0.0, s2 = 0.0;
    for (int p = 0; p < parts; ++p) {
        s += partial[(ch * parts + p) * 2];
        s2 += partial[(ch * parts + p) * 2 + 1];
    }
    const double m = (double)n * hw;
    const double dm = s / m;
    const double var = fmax(s2 / m - dm * dm, 0.0);
    const double mean = (double)load(x, nhwc ? (size_t)ch : (size_t)ch * hw) + dm;
    save_mean[ch] = (float)mean;
    save_invstd[ch] = (float)(1.0 / sqrt(var + eps));
    const double unbias = m > 1.0 ? m / (m - 1.0) : 1.0;
    running_mean[ch] = (float)((1.0 - momentum) * running_mean[ch] + momentum * mean);
    running_var[ch] = (float)((1.0 - momentum) * running_var[ch] + momentum * unbias * var);
}

// invstd[c] = 1/sqrt(var[c] + eps), for inference with running statistics: in double with the
// f64 eps, as the CPU's BatchNorm computes it (bitwise the same; rsqrtf is approximate).
extern "C" __global__ void bn_invstd(const float* var, float* invstd, int c, double eps) {
    const int ch = blockIdx.x * blockDim.x + threadIdx.x;
    if (ch < c) invstd[ch] = (float)(1.0 / sqrt((double)var[ch] + eps));
}

// y = γ·(x − μ)·invstd + β, then max(·, 0) when relu; over n·c·hw values.
template <typename T>
__device__ void bn_apply(const T* x, T* y, const float* mean, const float* invstd,
                         const float* gamma, const float* beta, long long total, int c, int hw,
                         int relu, int nhwc) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const int ch = channel_of(i, c, hw, nhwc);
        const float scale = gamma[ch] * invstd[ch];
        float v = (load(x, i) - mean[ch]) * scale + beta[ch];
        if (relu) v = fmaxf(v, 0.f);
        store(y, i, v);
    }
}

// Partial Σg and Σg·(x − μ) per (channel, part), where g = dy, zeroed where the fused ReLU's
// output y is not positive (PyTorch's convention at 0) when relu.
template <typename T>
__device__ void bn_bwd_partial(const T* x, const T* y, const T* dy, const float* mean,
                               float* partial, int n, int c, int hw, int relu) {
    const int ch = blockIdx.x, part = blockIdx.y, parts = gridDim.y;
    const long long m = (long long)n * hw;
    const long long chunk = (m + parts - 1) / parts;
    const long long lo = part * chunk, hi = min(m, lo + chunk);
    const float mu = mean[ch];
    float s = 0.f, s2 = 0.f;
    for (long long j = lo + threadIdx.x; j < hi; j += blockDim.x) {
        const long long i = j / hw, k = j - i * hw;
        const size_t at = (size_t)((i * c + ch) * hw + k);
        float g = load(dy, at);
        if (relu && !(load(y, at) > 0.f)) g = 0.f;
        s += g;
        s2 += g * (load(x, at) - mu);
    }
    block_sum2(s, s2);
    if (threadIdx.x == 0) {
        partial[(ch * parts + part) * 2] = s;
        partial[(ch * parts + part) * 2 + 1] = s2;
    }
}

// bn_bwd_partial for NHWC activations, over the blocks of bn_stats_partial_nhwc.
template <typename T>
__device__ void bn_bwd_partial_nhwc(const T* x, const T* y, const T* dy, const float* mean,
                                    float* partial, int n, int c, int hw, int relu) {
    const int ch = blockIdx.x * blockDim.x + threadIdx.x, part = blockIdx.y, parts = gridDim.y;
    const long long m = (long long)n * hw;
    const long long chunk = (m + parts - 1) / parts;
    const long long lo = part * chunk, hi = min(m, lo + chunk);
    float s = 0.f, s2 = 0.f;
    if (ch < c) {
        const float mu = mean[ch];
        for (long long j = lo + threadIdx.y; j < hi; j += blockDim.y) {
            const size_t at = (size_t)(j * c + ch);
            float g = load(dy, at);
            if (relu && !(load(y, at) > 0.f)) g = 0.f;
            s += g;
            s2 += g * (load(x, at) - mu);
        }
    }
    column_sum2(s, s2);
    if (threadIdx.y == 0 && ch < c) {
        partial[(ch * parts + part) * 2] = s;
        partial[(ch * parts + part) * 2 + 1] = s2;
    }
}

// Per channel: dγ = Σg·x̂, dβ = Σg, and the coefficients of dx = k·g − c0 − (x − μ)·c1 with
// k = γ·invstd; in training c0 = k·Σg/m and c1 = k·invstd²·Σg(x − μ)/m (the gradient through
// the batch statistics), in inference both 0. coef: [3][c] = k, c0, c1.
extern "C" __global__ void bn_bwd_finalize(const float* partial, const float* invstd,
                                           const float* gamma, float* dgamma, float* dbeta,
                                           float* coef, int n, int c, int hw, int parts,
                                           int train) {
    const int ch = blockIdx.x * blockDim.x + threadIdx.x;
    if (ch >= c) return;
    double s = 0.0, s2 = 0.0;
    for (int p = 0; p < parts; ++p) {
        s += partial[(ch * parts + p) * 2];
        s2 += partial[(ch * parts + p) * 2 + 1];
    }
    const double is = invstd[ch], m = (double)n * hw;
    const double k = (double)gamma[ch] * is;
    dgamma[ch] = (float)(s2 * is);
    dbeta[ch] = (float)s;
    coef[ch] = (float)k;
    coef[c + ch] = train ? (float)(k * s / m) : 0.f;
    coef[2 * c + ch] = train ? (float)(k * is * is * s2 / m) : 0.f;
}

template <typename T>
__device__ void bn_bwd_apply(const T* x, const T* y, const T* dy, const float* mean,
                             const float* coef, T* dx, long long total, int c, int hw, int relu,
                             int nhwc) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const int ch = channel_of(i, c, hw, nhwc);
        float g = load(dy, i);
        if (relu && !(load(y, i) > 0.f)) g = 0.f;
        store(dx, i, coef[ch] * g - coef[c + ch] - (load(x, i) - mean[ch]) * coef[2 * c + ch]);
    }
}

// y = max(a + b, 0).
template <typename T>
__device__ void add_relu_fwd(const T* a, const T* b, T* y, long long total) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        store(y, i, fmaxf(load(a, i) + load(b, i), 0.f));
    }
}

// g = dy where y > 0, else 0: the gradient of both addends.
template <typename T>
__device__ void relu_bwd(const T* y, const T* dy, T* g, long long total) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        store(g, i, load(y, i) > 0.f ? load(dy, i) : 0.f);
    }
}

// The planned step's residual passes (gpu/plan.rs; the CPU's are in models/plan_cpu.rs).

// dx += dy where out > 0: the residual ReLU's gradient reaching an identity shortcut, added in
// place instead of accumulated through a zero tensor.
template <typename T>
__device__ void add_masked(T* dx, const T* dy, const T* out, long long total) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        if (load(out, i) > 0.f) store(dx, i, load(dx, i) + load(dy, i));
    }
}

// dx += d.
template <typename T>
__device__ void add_into(T* dx, const T* d, long long total) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        store(dx, i, load(dx, i) + load(d, i));
    }
}

// Position (i, ch, y, x) of value j of an n × c × h × w activation, NCHW or NHWC.
struct Pos {
    long long i;
    int ch, y, x;
};

__device__ __forceinline__ Pos position(long long j, int c, int h, int w, int nhwc) {
    Pos p;
    if (nhwc) {
        p.ch = (int)(j % c), j /= c, p.x = (int)(j % w), j /= w, p.y = (int)(j % h), p.i = j / h;
    } else {
        p.x = (int)(j % w), j /= w, p.y = (int)(j % h), j /= h, p.ch = (int)(j % c), p.i = j / c;
    }
    return p;
}

// Index of (i, ch, y, x) in an n × c × h × w activation, NCHW or NHWC.
__device__ __forceinline__ size_t offset(long long i, int ch, long long y, long long x, int c,
                                         int h, int w, int nhwc) {
    return (size_t)(nhwc ? ((i * h + y) * w + x) * c + ch : ((i * c + ch) * h + y) * w + x);
}

// Option A's shortcut: y[i, pad/2 + ch, oy, ox] = x[i, ch, oy·stride, ox·stride], the other
// pad channels 0; one thread per output value of y (n × (c + pad) × ho × wo), NCHW or NHWC.
template <typename T>
__device__ void subsample(const T* x, T* y, int n, int c, int h, int w, int pad, int stride,
                          int nhwc) {
    const int ho = (h + stride - 1) / stride, wo = (w + stride - 1) / stride, co = c + pad;
    const long long total = (long long)n * co * ho * wo;
    for (long long j = blockIdx.x * (long long)blockDim.x + threadIdx.x; j < total;
         j += (long long)gridDim.x * blockDim.x) {
        const Pos p = position(j, co, ho, wo, nhwc);
        const int ch = p.ch - pad / 2;
        float v = 0.f;
        if (ch >= 0 && ch < c) {
            v = load(x, offset(p.i, ch, (long long)p.y * stride, (long long)p.x * stride, c, h, w,
                               nhwc));
        }
        store(y, j, v);
    }
}

// The adjoint of subsample, masked by the residual ReLU's output: dx[i, ch, oy·s, ox·s] +=
// dy[i, pad/2 + ch, oy, ox] where out there is positive; one thread per subsampled input value.
template <typename T>
__device__ void subsample_bwd(T* dx, const T* dy, const T* out, int n, int c, int h, int w, int pad,
                              int stride, int nhwc) {
    const int ho = (h + stride - 1) / stride, wo = (w + stride - 1) / stride, co = c + pad;
    const long long total = (long long)n * c * ho * wo;
    for (long long j = blockIdx.x * (long long)blockDim.x + threadIdx.x; j < total;
         j += (long long)gridDim.x * blockDim.x) {
        const Pos p = position(j, c, ho, wo, nhwc);
        const size_t at = offset(p.i, pad / 2 + p.ch, p.y, p.x, co, ho, wo, nhwc);
        if (load(out, at) > 0.f) {
            const size_t to =
                offset(p.i, p.ch, (long long)p.y * stride, (long long)p.x * stride, c, h, w, nhwc);
            store(dx, to, load(dx, to) + load(dy, at));
        }
    }
}

// dst[i, b, a] = src[i, a, b] for src of n × rows × cols: NCHW to NHWC with (rows, cols) =
// (c, h·w), NHWC to NCHW with (h·w, c). One thread per value of dst.
template <typename T>
__device__ void transpose(const T* src, T* dst, int n, int rows, int cols) {
    const long long total = (long long)n * rows * cols;
    for (long long j = blockIdx.x * (long long)blockDim.x + threadIdx.x; j < total;
         j += (long long)gridDim.x * blockDim.x) {
        const int r = (int)(j % rows), col = (int)((j / rows) % cols);
        const long long i = j / ((long long)rows * cols);
        dst[j] = src[(i * rows + r) * cols + col];
    }
}

// Index in a KRSC (channels-last) filter of value i of the same filter in KCRS (PyTorch's
// cout × cin × kh × kw) order, with cin input channels (per group) and taps = kh·kw.
__device__ __forceinline__ long long krsc_index(long long i, int cin, int taps) {
    const long long per = (long long)cin * taps;
    const long long o = i / per;
    const int rem = (int)(i - o * per), ci = rem / taps, tap = rem - ci * taps;
    return o * per + (long long)tap * cin + ci;
}

// A parameter's f32 gradient from a computed one of the activations' type: g = d, or g += d
// when accumulate (a second forward pass of the same step). With krsc, d is a conv weight's
// gradient in KRSC order (cin channels per group, taps = kh·kw) and g in KCRS order.
template <typename T>
__device__ void grad_add(float* g, const T* d, long long total, int accumulate, int krsc,
                         int cin, int taps) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const float v = load(d, krsc ? krsc_index(i, cin, taps) : i);
        g[i] = (accumulate ? g[i] : 0.f) + v;
    }
}

// Max-pooling as PyTorch's max_pool2d (square window k, stride s, padding p; models/pool.rs is
// the CPU's): the index in x of the first maximum of output (i, ch, oy, ox)'s window in window
// order, a NaN winning; padding never wins. Starting from the window's first value picks what
// PyTorch's start from −∞ picks.
template <typename T>
__device__ __forceinline__ size_t pool_argmax(const T* x, long long i, int ch, int oy, int ox,
                                              int c, int h, int w, int k, int s, int p,
                                              int nhwc) {
    const int y0 = max(oy * s - p, 0), y1 = min(oy * s - p + k, h);
    const int x0 = max(ox * s - p, 0), x1 = min(ox * s - p + k, w);
    size_t best = offset(i, ch, y0, x0, c, h, w, nhwc);
    float m = load(x, best);
    for (int iy = y0; iy < y1; ++iy)
        for (int ix = x0; ix < x1; ++ix) {
            const size_t at = offset(i, ch, iy, ix, c, h, w, nhwc);
            const float v = load(x, at);
            if (v > m || v != v) {
                m = v;
                best = at;
            }
        }
    return best;
}

// y = the max-pooling of x (n × c × h × w, NCHW or NHWC) into n × c × ho × wo; one thread per
// output value.
template <typename T>
__device__ void max_pool_fwd(const T* x, T* y, int n, int c, int h, int w, int ho, int wo, int k,
                             int s, int p, int nhwc) {
    const long long total = (long long)n * c * ho * wo;
    for (long long j = blockIdx.x * (long long)blockDim.x + threadIdx.x; j < total;
         j += (long long)gridDim.x * blockDim.x) {
        const Pos o = position(j, c, ho, wo, nhwc);
        y[j] = x[pool_argmax(x, o.i, o.ch, o.y, o.x, c, h, w, k, s, p, nhwc)];
    }
}

// dx = the max-pooling's input gradient from dy: each input value sums the gradients of the
// outputs whose window's maximum it is, over the windows holding it in output order (the order
// the CPU adds them in). One thread per input value, so no atomics.
template <typename T>
__device__ void max_pool_bwd(const T* x, const T* dy, T* dx, int n, int c, int h, int w, int ho,
                             int wo, int k, int s, int p, int nhwc) {
    const long long total = (long long)n * c * h * w;
    for (long long j = blockIdx.x * (long long)blockDim.x + threadIdx.x; j < total;
         j += (long long)gridDim.x * blockDim.x) {
        const Pos q = position(j, c, h, w, nhwc);
        // The windows o with o·s − p ≤ q < o·s − p + k, in each direction.
        const int ya = q.y + p - k + 1, xa = q.x + p - k + 1;
        const int oy0 = ya <= 0 ? 0 : (ya + s - 1) / s, ox0 = xa <= 0 ? 0 : (xa + s - 1) / s;
        const int oy1 = min((q.y + p) / s, ho - 1), ox1 = min((q.x + p) / s, wo - 1);
        float g = 0.f;
        for (int oy = oy0; oy <= oy1; ++oy)
            for (int ox = ox0; ox <= ox1; ++ox)
                if (pool_argmax(x, q.i, q.ch, oy, ox, c, h, w, k, s, p, nhwc) == (size_t)j)
                    g += load(dy, offset(q.i, q.ch, oy, ox, c, ho, wo, nhwc));
        store(dx, j, g);
    }
}

#define FOR_TYPES(F) F(f32, float) F(bf16, bf16)

#define INSTANTIATE(SUF, T)                                                                    \
    extern "C" __global__ void bn_stats_partial_##SUF(const T* x, float* partial, int n, int c, \
                                                      int hw) {                                \
        bn_stats_partial<T>(x, partial, n, c, hw);                                             \
    }                                                                                          \
    extern "C" __global__ void bn_stats_partial_nhwc_##SUF(const T* x, float* partial, int n,  \
                                                           int c, int hw) {                    \
        bn_stats_partial_nhwc<T>(x, partial, n, c, hw);                                        \
    }                                                                                          \
    extern "C" __global__ void bn_stats_finalize_##SUF(                                        \
        const T* x, const float* partial, float* save_mean, float* save_invstd,                \
        float* running_mean, float* running_var, int n, int c, int hw, int parts, double eps,  \
        float momentum, int nhwc) {                                                            \
        bn_stats_finalize<T>(x, partial, save_mean, save_invstd, running_mean, running_var, n, \
                             c, hw, parts, eps, momentum, nhwc);                               \
    }                                                                                          \
    extern "C" __global__ void bn_apply_##SUF(const T* x, T* y, const float* mean,              \
                                              const float* invstd, const float* gamma,         \
                                              const float* beta, long long total, int c,       \
                                              int hw, int relu, int nhwc) {                    \
        bn_apply<T>(x, y, mean, invstd, gamma, beta, total, c, hw, relu, nhwc);                \
    }                                                                                          \
    extern "C" __global__ void bn_bwd_partial_##SUF(const T* x, const T* y, const T* dy,        \
                                                    const float* mean, float* partial, int n,  \
                                                    int c, int hw, int relu) {                 \
        bn_bwd_partial<T>(x, y, dy, mean, partial, n, c, hw, relu);                            \
    }                                                                                          \
    extern "C" __global__ void bn_bwd_partial_nhwc_##SUF(const T* x, const T* y, const T* dy,   \
                                                         const float* mean, float* partial,    \
                                                         int n, int c, int hw, int relu) {     \
        bn_bwd_partial_nhwc<T>(x, y, dy, mean, partial, n, c, hw, relu);                       \
    }                                                                                          \
    extern "C" __global__ void bn_bwd_apply_##SUF(const T* x, const T* y, const T* dy,          \
                                                  const float* mean, const float* coef, T* dx, \
                                                  long long total, int c, int hw, int relu,    \
                                                  int nhwc) {                                  \
        bn_bwd_apply<T>(x, y, dy, mean, coef, dx, total, c, hw, relu, nhwc);                   \
    }                                                                                          \
    extern "C" __global__ void add_relu_fwd_##SUF(const T* a, const T* b, T* y,                 \
                                                  long long total) {                           \
        add_relu_fwd<T>(a, b, y, total);                                                       \
    }                                                                                          \
    extern "C" __global__ void relu_bwd_##SUF(const T* y, const T* dy, T* g, long long total) { \
        relu_bwd<T>(y, dy, g, total);                                                          \
    }                                                                                          \
    extern "C" __global__ void add_masked_##SUF(T* dx, const T* dy, const T* out,              \
                                                long long total) {                             \
        add_masked<T>(dx, dy, out, total);                                                     \
    }                                                                                          \
    extern "C" __global__ void add_into_##SUF(T* dx, const T* d, long long total) {             \
        add_into<T>(dx, d, total);                                                             \
    }                                                                                          \
    extern "C" __global__ void subsample_##SUF(const T* x, T* y, int n, int c, int h, int w,    \
                                               int pad, int stride, int nhwc) {                \
        subsample<T>(x, y, n, c, h, w, pad, stride, nhwc);                                     \
    }                                                                                          \
    extern "C" __global__ void subsample_bwd_##SUF(T* dx, const T* dy, const T* out, int n,     \
                                                   int c, int h, int w, int pad, int stride,   \
                                                   int nhwc) {                                 \
        subsample_bwd<T>(dx, dy, out, n, c, h, w, pad, stride, nhwc);                          \
    }                                                                                          \
    extern "C" __global__ void transpose_##SUF(const T* src, T* dst, int n, int rows,           \
                                               int cols) {                                     \
        transpose<T>(src, dst, n, rows, cols);                                                 \
    }                                                                                          \
    extern "C" __global__ void grad_add_##SUF(float* g, const T* d, long long total,            \
                                              int accumulate, int krsc, int cin, int taps) {   \
        grad_add<T>(g, d, total, accumulate, krsc, cin, taps);                                 \
    }                                                                                          \
    extern "C" __global__ void max_pool_fwd_##SUF(const T* x, T* y, int n, int c, int h, int w, \
                                                  int ho, int wo, int k, int s, int p,         \
                                                  int nhwc) {                                  \
        max_pool_fwd<T>(x, y, n, c, h, w, ho, wo, k, s, p, nhwc);                              \
    }                                                                                          \
    extern "C" __global__ void max_pool_bwd_##SUF(const T* x, const T* dy, T* dx, int n, int c, \
                                                  int h, int w, int ho, int wo, int k, int s,  \
                                                  int p, int nhwc) {                           \
        max_pool_bwd<T>(x, dy, dx, n, c, h, w, ho, wo, k, s, p, nhwc);                         \
    }

FOR_TYPES(INSTANTIATE)

// Parameters per launch of the multi-tensor SGD. The table travels as a kernel argument
// (4 × 64 × 8 + 8 bytes, inside the 4 KiB every architecture accepts), so a step is
// ⌈parameters / 64⌉ launches and no host-to-device copy. Layout shared with gpu/mod.rs.
#define SGD_TABLE 64
struct SgdTable {
    float* w[SGD_TABLE];
    const float* g[SGD_TABLE];
    float* b[SGD_TABLE];
    long long n[SGD_TABLE];
    int count;
};

// One SGD step of up to SGD_TABLE f32 parameters, in place, with PyTorch's semantics (see
// optim.rs): g ← g + wd·w; b ← μ·b + g (b starts at 0, so b = g on the first step); d ← g + μ·b
// with Nesterov, else b; w ← w − lr·d. With μ = 0 there are no buffers (b may be null). The
// learning rate is read from device memory, so a replayed CUDA graph follows the schedule.
// Every block walks every parameter, grid-striding inside each, so the threads of a warp
// always read the same table entry.
extern "C" __global__ void sgd_multi_f32(const SgdTable t, const float* lr_at, float momentum,
                                         float weight_decay, int nesterov) {
    const float lr = *lr_at;
    for (int s = 0; s < t.count; ++s) {
        float* w = t.w[s];
        const float* grad = t.g[s];
        float* buf = t.b[s];
        const long long n = t.n[s];
        for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
             i += (long long)gridDim.x * blockDim.x) {
            float g = grad[i] + weight_decay * w[i];
            float d = g;
            if (momentum != 0.f) {
                const float b = momentum * buf[i] + g;
                buf[i] = b;
                d = nesterov ? g + momentum * b : b;
            }
            w[i] -= lr * d;
        }
    }
}

// Conv weights per launch of cast_weights. Like SgdTable, the table travels as a kernel
// argument (64 × (8 + 8 + 8 + 4 + 4) + 4 bytes, padded to 2,056). Layout shared with gpu/mod.rs.
#define CAST_TABLE 64
struct CastTable {
    const float* src[CAST_TABLE];
    void* dst[CAST_TABLE];
    long long n[CAST_TABLE];
    int cin[CAST_TABLE];
    int taps[CAST_TABLE];
    int count;
};

// The copies of up to CAST_TABLE f32 conv weights (KCRS) that a planned forward pass convolves
// with: of type T, and in KRSC order when krsc (channels-last convolutions). Every block walks
// every entry, grid-striding over the destination's values.
template <typename T>
__device__ void cast_weights(const CastTable& t, int krsc) {
    for (int s = 0; s < t.count; ++s) {
        const float* src = t.src[s];
        T* dst = (T*)t.dst[s];
        const long long n = t.n[s];
        const int cin = t.cin[s], taps = t.taps[s];
        for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
             i += (long long)gridDim.x * blockDim.x) {
            store(dst, krsc ? krsc_index(i, cin, taps) : i, src[i]);
        }
    }
}

extern "C" __global__ void cast_weights_f32(const CastTable t, int krsc) {
    cast_weights<float>(t, krsc);
}

extern "C" __global__ void cast_weights_bf16(const CastTable t, int krsc) {
    cast_weights<bf16>(t, krsc);
}
