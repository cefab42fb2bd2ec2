// The kernels of src/gpu/kernels.cu on the CPU (cuda_shim.h), against plain loops written here
// from the definitions: NCHW and NHWC BatchNorm statistics, normalisation and backward, the
// option-A shortcut and its adjoint in both layouts, the NCHW <-> NHWC transpose, the KRSC
// weight copies and the gradient that comes back from them, the residual passes of the planned
// backward (add_masked, add_into, grad_add), the stem's max-pooling, bn_invstd and the
// multi-tensor SGD. Run by
// tests/kernels_on_cpu.rs; prints one line per check and exits non-zero on the first failure.
#include "cuda_shim.h"

#include "../../src/gpu/kernels.cu"

#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <string>

// The tables' layout as gpu/mod.rs writes them (its `const` assertions say the same).
static_assert(sizeof(SgdTable) == 2056 && offsetof(SgdTable, count) == 2048);
static_assert(sizeof(CastTable) == 2056 && offsetof(CastTable, n) == 1024 &&
              offsetof(CastTable, cin) == 1536 && offsetof(CastTable, count) == 2048);

namespace {

int checks = 0;

// A deterministic value in [-1, 1) (a 64-bit LCG).
struct Rng {
    uint64_t s;
    float next() {
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        return float((s >> 40) & 0xffffff) / float(1 << 23) - 1.0f;
    }
};

std::vector<float> random(size_t n, uint64_t seed, float scale = 1.0f, float offset = 0.0f) {
    Rng r{seed};
    std::vector<float> v(n);
    for (auto& x : v) x = offset + scale * r.next();
    return v;
}

void fail(const std::string& what) {
    std::fprintf(stderr, "FAILED: %s\n", what.c_str());
    std::exit(1);
}

// |got − want| ≤ tol · max(1, |want|) for every element.
void expect_close(const std::string& what, const std::vector<float>& got,
                  const std::vector<double>& want, double tol) {
    if (got.size() != want.size()) fail(what + ": lengths differ");
    for (size_t i = 0; i < got.size(); ++i) {
        const double err = std::fabs(double(got[i]) - want[i]);
        if (!(err <= tol * std::max(1.0, std::fabs(want[i])))) {
            fail(what + ": element " + std::to_string(i) + " is " + std::to_string(got[i]) +
                 ", expected " + std::to_string(want[i]));
        }
    }
    ++checks;
    std::printf("ok  %s\n", what.c_str());
}

void expect_equal(const std::string& what, const std::vector<float>& got,
                  const std::vector<float>& want) {
    expect_close(what, got, std::vector<double>(want.begin(), want.end()), 0.0);
}

// Index of (i, ch, k) of an n × c × hw activation in either layout.
size_t at(bool nhwc, size_t i, size_t ch, size_t k, size_t c, size_t hw) {
    return nhwc ? (i * hw + k) * c + ch : (i * c + ch) * hw + k;
}

// `v` (NCHW, n × c × hw) in the layout asked for.
std::vector<float> layout(const std::vector<float>& v, bool nhwc, size_t n, size_t c, size_t hw) {
    std::vector<float> out(v.size());
    for (size_t i = 0; i < n; ++i)
        for (size_t ch = 0; ch < c; ++ch)
            for (size_t k = 0; k < hw; ++k) out[at(nhwc, i, ch, k, c, hw)] = v[(i * c + ch) * hw + k];
    return out;
}

dim3 elementwise(size_t total) {
    return dim3{unsigned(std::min<size_t>((total + 255) / 256, 65535)), 1, 1};
}

// The reduction grid gpu/norm.rs launches for `parts` parts, with blocks of `threads` threads
// (512 there; fewer here keeps the thread count of the emulation down, and the kernels take
// any multiple of 32 up to 512).
void reduction_grid(bool nhwc, int c, int parts, unsigned threads, dim3& grid, dim3& block) {
    if (nhwc) {
        int width = 8;
        while (width < c && width < 32) width *= 2;
        grid = {unsigned((c + width - 1) / width), unsigned(parts), 1};
        block = {unsigned(width), threads / width, 1};
    } else {
        grid = {unsigned(c), unsigned(parts), 1};
        block = {threads, 1, 1};
    }
}

// Batch statistics: the partial and finalising kernels against sums in double.
void batch_norm_statistics(int n, int c, int hw, int parts, unsigned threads, bool nhwc) {
    const std::string name = "bn statistics n=" + std::to_string(n) + " c=" + std::to_string(c) +
                             " hw=" + std::to_string(hw) + " parts=" + std::to_string(parts) +
                             " threads=" + std::to_string(threads) + (nhwc ? " NHWC" : " NCHW");
    // An offset larger than the spread: what the kernels' shift is for.
    const auto x_nchw = random(size_t(n) * c * hw, 11 + c, 0.5f, 3.0f);
    const auto x = layout(x_nchw, nhwc, n, c, hw);
    std::vector<float> partial(size_t(c) * parts * 2), mean(c), invstd(c);
    std::vector<float> rmean = random(c, 5, 0.1f), rvar = random(c, 6, 0.1f, 1.0f);
    std::vector<double> want_mean(c), want_invstd(c), want_rmean(c), want_rvar(c);
    const double m = double(n) * hw, eps = 1e-5, momentum = 0.1;
    for (int ch = 0; ch < c; ++ch) {
        double s = 0, s2 = 0;
        for (int i = 0; i < n; ++i)
            for (int k = 0; k < hw; ++k) s += x_nchw[(size_t(i) * c + ch) * hw + k];
        const double mu = s / m;
        for (int i = 0; i < n; ++i)
            for (int k = 0; k < hw; ++k) {
                const double d = x_nchw[(size_t(i) * c + ch) * hw + k] - mu;
                s2 += d * d;
            }
        const double var = s2 / m;
        want_mean[ch] = mu;
        want_invstd[ch] = 1.0 / std::sqrt(var + eps);
        want_rmean[ch] = (1 - momentum) * rmean[ch] + momentum * mu;
        want_rvar[ch] = (1 - momentum) * rvar[ch] + momentum * var * m / (m - 1);
    }
    dim3 grid, block;
    reduction_grid(nhwc, c, parts, threads, grid, block);
    launch(grid, block, [&] {
        if (nhwc)
            bn_stats_partial_nhwc_f32(x.data(), partial.data(), n, c, hw);
        else
            bn_stats_partial_f32(x.data(), partial.data(), n, c, hw);
    });
    launch_serial(dim3{unsigned((c + 127) / 128), 1, 1}, dim3{128, 1, 1}, [&] {
        bn_stats_finalize_f32(x.data(), partial.data(), mean.data(), invstd.data(), rmean.data(),
                              rvar.data(), n, c, hw, parts, eps, float(momentum), nhwc);
    });
    expect_close(name + ": mean", mean, want_mean, 1e-5);
    expect_close(name + ": invstd", invstd, want_invstd, 1e-4);
    expect_close(name + ": running mean", rmean, want_rmean, 1e-5);
    expect_close(name + ": running variance", rvar, want_rvar, 1e-4);
}

// Normalisation (+ ReLU) and the backward through the batch statistics, masked by the output.
void batch_norm_apply_and_backward(int n, int c, int hw, int parts, bool nhwc) {
    const std::string name = "bn apply/backward n=" + std::to_string(n) + " c=" +
                             std::to_string(c) + " hw=" + std::to_string(hw) +
                             (nhwc ? " NHWC" : " NCHW");
    const size_t total = size_t(n) * c * hw;
    const auto x_nchw = random(total, 21, 1.0f, 0.2f), dy_nchw = random(total, 22);
    const auto mean = random(c, 23, 0.2f), gamma = random(c, 24, 0.5f, 1.0f),
               beta = random(c, 25, 0.3f);
    std::vector<float> invstd = random(c, 26, 0.2f, 1.0f);
    const auto x = layout(x_nchw, nhwc, n, c, hw), dy = layout(dy_nchw, nhwc, n, c, hw);
    // Forward with the fused ReLU.
    std::vector<float> y(total);
    std::vector<double> want_y(total);
    for (int i = 0; i < n; ++i)
        for (int ch = 0; ch < c; ++ch)
            for (int k = 0; k < hw; ++k) {
                const size_t j = at(nhwc, i, ch, k, c, hw);
                const double v = (double(x[j]) - mean[ch]) * invstd[ch] * gamma[ch] + beta[ch];
                want_y[j] = std::max(v, 0.0);
            }
    launch_serial(elementwise(total), dim3{256, 1, 1}, [&] {
        bn_apply_f32(x.data(), y.data(), mean.data(), invstd.data(), gamma.data(), beta.data(),
                     (long long)total, c, hw, 1, nhwc);
    });
    expect_close(name + ": y", y, want_y, 1e-5);
    // Backward, masked where y is not positive.
    std::vector<double> want_dgamma(c), want_dbeta(c), want_dx(total);
    const double m = double(n) * hw;
    for (int ch = 0; ch < c; ++ch) {
        double sg = 0, sgx = 0;
        for (int i = 0; i < n; ++i)
            for (int k = 0; k < hw; ++k) {
                const size_t j = at(nhwc, i, ch, k, c, hw);
                const double g = y[j] > 0 ? dy[j] : 0.0;
                sg += g;
                sgx += g * (double(x[j]) - mean[ch]);
            }
        want_dbeta[ch] = sg;
        want_dgamma[ch] = sgx * invstd[ch];
        const double kk = double(gamma[ch]) * invstd[ch];
        for (int i = 0; i < n; ++i)
            for (int k = 0; k < hw; ++k) {
                const size_t j = at(nhwc, i, ch, k, c, hw);
                const double g = y[j] > 0 ? dy[j] : 0.0, xm = double(x[j]) - mean[ch];
                want_dx[j] = kk * (g - sg / m - xm * invstd[ch] * invstd[ch] * sgx / m);
            }
    }
    std::vector<float> partial(size_t(c) * parts * 2), dgamma(c), dbeta(c), coef(3 * c),
        dx(total);
    dim3 grid, block;
    reduction_grid(nhwc, c, parts, 64, grid, block);
    launch(grid, block, [&] {
        if (nhwc)
            bn_bwd_partial_nhwc_f32(x.data(), y.data(), dy.data(), mean.data(), partial.data(), n,
                                    c, hw, 1);
        else
            bn_bwd_partial_f32(x.data(), y.data(), dy.data(), mean.data(), partial.data(), n, c,
                               hw, 1);
    });
    launch_serial(dim3{unsigned((c + 127) / 128), 1, 1}, dim3{128, 1, 1}, [&] {
        bn_bwd_finalize(partial.data(), invstd.data(), gamma.data(), dgamma.data(), dbeta.data(),
                        coef.data(), n, c, hw, parts, 1);
    });
    launch_serial(elementwise(total), dim3{256, 1, 1}, [&] {
        bn_bwd_apply_f32(x.data(), y.data(), dy.data(), mean.data(), coef.data(), dx.data(),
                         (long long)total, c, hw, 1, nhwc);
    });
    expect_close(name + ": dbeta", dbeta, want_dbeta, 1e-4);
    expect_close(name + ": dgamma", dgamma, want_dgamma, 1e-4);
    expect_close(name + ": dx", dx, want_dx, 1e-4);
}

// Option A's shortcut and its masked adjoint, against NCHW loops.
void subsample_both_ways(int n, int c, int h, int w, int pad, int stride, bool nhwc) {
    const std::string name = "subsample c=" + std::to_string(c) + " " + std::to_string(h) + "x" +
                             std::to_string(w) + " pad=" + std::to_string(pad) + " stride=" +
                             std::to_string(stride) + (nhwc ? " NHWC" : " NCHW");
    const int ho = (h + stride - 1) / stride, wo = (w + stride - 1) / stride, co = c + pad;
    const auto x_nchw = random(size_t(n) * c * h * w, 31);
    std::vector<float> want_nchw(size_t(n) * co * ho * wo, 0.0f);
    for (int i = 0; i < n; ++i)
        for (int ch = 0; ch < c; ++ch)
            for (int oy = 0; oy < ho; ++oy)
                for (int ox = 0; ox < wo; ++ox)
                    want_nchw[((size_t(i) * co + pad / 2 + ch) * ho + oy) * wo + ox] =
                        x_nchw[((size_t(i) * c + ch) * h + oy * stride) * w + ox * stride];
    const auto x = layout(x_nchw, nhwc, n, c, h * w);
    std::vector<float> y(want_nchw.size(), 7.0f);
    launch_serial(elementwise(y.size()), dim3{256, 1, 1}, [&] {
        subsample_f32(x.data(), y.data(), n, c, h, w, pad, stride, nhwc);
    });
    expect_equal(name, y, layout(want_nchw, nhwc, n, co, ho * wo));
    // dx += dy[the channels from x] where out > 0, at the subsampled pixels.
    const auto dy_nchw = random(want_nchw.size(), 32), out_nchw = random(want_nchw.size(), 33);
    auto dx_nchw = random(x_nchw.size(), 34);
    const auto dx0 = layout(dx_nchw, nhwc, n, c, h * w);
    for (int i = 0; i < n; ++i)
        for (int ch = 0; ch < c; ++ch)
            for (int oy = 0; oy < ho; ++oy)
                for (int ox = 0; ox < wo; ++ox) {
                    const size_t o = ((size_t(i) * co + pad / 2 + ch) * ho + oy) * wo + ox;
                    if (out_nchw[o] > 0)
                        dx_nchw[((size_t(i) * c + ch) * h + oy * stride) * w + ox * stride] +=
                            dy_nchw[o];
                }
    const auto dy = layout(dy_nchw, nhwc, n, co, ho * wo),
               out = layout(out_nchw, nhwc, n, co, ho * wo);
    std::vector<float> dx = dx0;
    launch_serial(elementwise(size_t(n) * c * ho * wo), dim3{256, 1, 1}, [&] {
        subsample_bwd_f32(dx.data(), dy.data(), out.data(), n, c, h, w, pad, stride, nhwc);
    });
    expect_equal(name + ": adjoint", dx, layout(dx_nchw, nhwc, n, c, h * w));
}

// Max-pooling forward and backward against NCHW loops in PyTorch's rule (the first maximum in
// window order from −∞, a NaN winning; each output's gradient added at its maximum, output by
// output), bitwise. `levels` > 0 rounds the inputs to that many steps per unit, so windows hold
// equal maxima; `nan` puts a NaN into the first image's first plane.
void max_pooling(int n, int c, int h, int w, int k, int s, int p, int levels, bool nan, bool nhwc) {
    const std::string name = "max-pool c=" + std::to_string(c) + " " + std::to_string(h) + "x" +
                             std::to_string(w) + " k=" + std::to_string(k) + " s=" +
                             std::to_string(s) + " p=" + std::to_string(p) +
                             (levels ? " ties" : "") + (nan ? " NaN" : "") +
                             (nhwc ? " NHWC" : " NCHW");
    const int ho = (h + 2 * p - k) / s + 1, wo = (w + 2 * p - k) / s + 1;
    auto x_nchw = random(size_t(n) * c * h * w, 51);
    if (levels)
        for (auto& v : x_nchw) v = std::floor(v * levels) / levels;
    if (nan) x_nchw[size_t(w) + 1] = NAN;
    std::vector<float> want_y(size_t(n) * c * ho * wo);
    const auto dy_nchw = random(want_y.size(), 52);
    std::vector<float> want_dx(x_nchw.size(), 0.0f);
    for (size_t plane = 0; plane < size_t(n) * c; ++plane)
        for (int oy = 0; oy < ho; ++oy)
            for (int ox = 0; ox < wo; ++ox) {
                float m = -INFINITY;
                size_t best = SIZE_MAX;
                for (int iy = oy * s - p; iy < oy * s - p + k; ++iy)
                    for (int ix = ox * s - p; ix < ox * s - p + k; ++ix) {
                        if (iy < 0 || ix < 0 || iy >= h || ix >= w) continue;
                        const size_t at = (plane * h + iy) * w + ix;
                        if (best == SIZE_MAX) best = at;
                        if (x_nchw[at] > m || std::isnan(x_nchw[at])) m = x_nchw[at], best = at;
                    }
                const size_t o = (plane * ho + oy) * wo + ox;
                want_y[o] = x_nchw[best];
                want_dx[best] += dy_nchw[o];
            }
    const auto x = layout(x_nchw, nhwc, n, c, h * w), dy = layout(dy_nchw, nhwc, n, c, ho * wo);
    std::vector<float> y(want_y.size(), 7.0f), dx(x.size(), 7.0f);
    launch_serial(elementwise(y.size()), dim3{256, 1, 1}, [&] {
        max_pool_fwd_f32(x.data(), y.data(), n, c, h, w, ho, wo, k, s, p, nhwc);
    });
    launch_serial(elementwise(x.size()), dim3{256, 1, 1}, [&] {
        max_pool_bwd_f32(x.data(), dy.data(), dx.data(), n, c, h, w, ho, wo, k, s, p, nhwc);
    });
    // A NaN is not equal to itself: compare bit patterns through the NaN's position first.
    auto y_want = layout(want_y, nhwc, n, c, ho * wo);
    for (size_t i = 0; i < y.size(); ++i)
        if (std::isnan(y_want[i])) {
            if (!std::isnan(y[i])) fail(name + ": a window holding a NaN lost it");
            y[i] = y_want[i] = 0.0f;
        }
    expect_equal(name, y, y_want);
    expect_equal(name + ": backward", dx, layout(want_dx, nhwc, n, c, h * w));
}

void transposes(int n, int c, int hw) {
    const auto v = random(size_t(n) * c * hw, 41);
    std::vector<float> t(v.size()), back(v.size());
    launch_serial(elementwise(v.size()), dim3{256, 1, 1},
                  [&] { transpose_f32(v.data(), t.data(), n, c, hw); });
    expect_equal("transpose NCHW -> NHWC c=" + std::to_string(c), t, layout(v, true, n, c, hw));
    launch_serial(elementwise(v.size()), dim3{256, 1, 1},
                  [&] { transpose_f32(t.data(), back.data(), n, hw, c); });
    expect_equal("transpose NHWC -> NCHW c=" + std::to_string(c), back, v);
}

// The weight copies (f32 KCRS to f32/bf16, KCRS or KRSC) of several convolutions in one launch,
// and a KRSC gradient back into KCRS.
void weight_copies() {
    struct Conv {
        int k, cin, kh, kw;
    };
    const Conv convs[] = {{16, 3, 3, 3}, {32, 16, 3, 3}, {8, 4, 1, 1}, {12, 6, 3, 3}};
    std::vector<std::vector<float>> src;
    for (int s = 0; s < 4; ++s) {
        const auto& cv = convs[s];
        src.push_back(random(size_t(cv.k) * cv.cin * cv.kh * cv.kw, 50 + s));
    }
    auto krsc = [&](int s) {
        const auto& cv = convs[s];
        const int taps = cv.kh * cv.kw;
        std::vector<float> out(src[s].size());
        for (int o = 0; o < cv.k; ++o)
            for (int ci = 0; ci < cv.cin; ++ci)
                for (int p = 0; p < taps; ++p)
                    out[(size_t(o) * taps + p) * cv.cin + ci] = src[s][(size_t(o) * cv.cin + ci) * taps + p];
        return out;
    };
    for (int layout_krsc = 0; layout_krsc < 2; ++layout_krsc) {
        std::vector<std::vector<float>> dst_f32;
        std::vector<std::vector<__nv_bfloat16>> dst_bf16;
        CastTable t32{}, t16{};
        size_t largest = 0;
        for (int s = 0; s < 4; ++s) {
            dst_f32.emplace_back(src[s].size(), 9.0f);
            dst_bf16.emplace_back(src[s].size());
            for (CastTable* t : {&t32, &t16}) {
                t->src[s] = src[s].data();
                t->n[s] = (long long)src[s].size();
                t->cin[s] = convs[s].cin;
                t->taps[s] = convs[s].kh * convs[s].kw;
            }
            t32.dst[s] = dst_f32[s].data();
            t16.dst[s] = dst_bf16[s].data();
            largest = std::max(largest, src[s].size());
        }
        t32.count = t16.count = 4;
        launch_serial(elementwise(largest), dim3{256, 1, 1}, [&] {
            cast_weights_f32(t32, layout_krsc);
            cast_weights_bf16(t16, layout_krsc);
        });
        for (int s = 0; s < 4; ++s) {
            const auto want = layout_krsc ? krsc(s) : src[s];
            const std::string name = std::string("weight copy ") + std::to_string(s) +
                                     (layout_krsc ? " KRSC" : " KCRS");
            expect_equal(name + " f32", dst_f32[s], want);
            std::vector<float> got(want.size());
            std::vector<double> want_d(want.size());
            for (size_t i = 0; i < want.size(); ++i) {
                got[i] = __bfloat162float(dst_bf16[s][i]);
                want_d[i] = want[i];
            }
            expect_close(name + " bf16", got, want_d, 1.0 / 256);
        }
    }
    // The KRSC gradient of convolution 1 added into a KCRS one, then set.
    const auto& cv = convs[1];
    const auto d = krsc(1);
    auto g = random(d.size(), 60);
    std::vector<double> added(d.size());
    for (size_t i = 0; i < d.size(); ++i) added[i] = double(g[i]) + src[1][i];
    launch_serial(elementwise(d.size()), dim3{256, 1, 1}, [&] {
        grad_add_f32(g.data(), d.data(), (long long)d.size(), 1, 1, cv.cin, cv.kh * cv.kw);
    });
    expect_close("grad_add KRSC into KCRS, accumulating", g, added, 1e-6);
    launch_serial(elementwise(d.size()), dim3{256, 1, 1}, [&] {
        grad_add_f32(g.data(), d.data(), (long long)d.size(), 0, 1, cv.cin, cv.kh * cv.kw);
    });
    expect_equal("grad_add KRSC into KCRS, setting", g, src[1]);
}

// The residual passes of the planned backward, and the plain parameter-gradient copy.
void residual_passes() {
    const size_t n = 1000;
    const auto dy = random(n, 101), out = random(n, 102), d = random(n, 103);
    auto dx = random(n, 104);
    std::vector<float> want_masked(n), want_added(n);
    for (size_t i = 0; i < n; ++i) {
        want_masked[i] = out[i] > 0 ? dx[i] + dy[i] : dx[i];
        want_added[i] = want_masked[i] + d[i];
    }
    launch_serial(elementwise(n), dim3{256, 1, 1},
                  [&] { add_masked_f32(dx.data(), dy.data(), out.data(), (long long)n); });
    expect_equal("add_masked", dx, want_masked);
    launch_serial(elementwise(n), dim3{256, 1, 1},
                  [&] { add_into_f32(dx.data(), d.data(), (long long)n); });
    expect_equal("add_into", dx, want_added);
    // bf16 activations into an f32 gradient: set, then accumulate.
    std::vector<__nv_bfloat16> g16(n);
    std::vector<float> g(n, 5.0f), rounded(n), twice(n);
    for (size_t i = 0; i < n; ++i) {
        g16[i] = __float2bfloat16(d[i]);
        rounded[i] = __bfloat162float(g16[i]);
        twice[i] = rounded[i] + rounded[i];
    }
    launch_serial(elementwise(n), dim3{256, 1, 1},
                  [&] { grad_add_bf16(g.data(), g16.data(), (long long)n, 0, 0, 1, 1); });
    expect_equal("grad_add bf16, setting", g, rounded);
    launch_serial(elementwise(n), dim3{256, 1, 1},
                  [&] { grad_add_bf16(g.data(), g16.data(), (long long)n, 1, 0, 1, 1); });
    expect_equal("grad_add bf16, accumulating", g, twice);
    // 1/sqrt(var + eps) of the running variance, for evaluation mode.
    std::vector<float> invstd(40);
    // As the CPU's BatchNorm (`inv_std` in batch_norm.rs) computes it: in double with the f64
    // eps, rounded to float once. Variances near 0 (dead channels) are where eps's own
    // rounding would show.
    auto var = random(40, 105, 0.5f, 1.0f);
    for (int c = 0; c < 8; ++c) var[c] = c * 1e-7f;
    std::vector<float> want(40);
    for (int c = 0; c < 40; ++c) want[c] = float(1.0 / std::sqrt(double(var[c]) + 1e-5));
    launch_serial(dim3{1, 1, 1}, dim3{128, 1, 1},
                  [&] { bn_invstd(var.data(), invstd.data(), 40, 1e-5); });
    expect_equal("bn_invstd", invstd, want);
}

// PyTorch's SGD with momentum, weight decay and Nesterov over a table of three parameters.
void multi_tensor_sgd() {
    const size_t sizes[] = {5, 700, 33};
    const float lr = 0.05f, mom = 0.9f, wd = 5e-4f;
    for (int nesterov = 0; nesterov < 2; ++nesterov) {
        std::vector<std::vector<float>> w, g, b;
        SgdTable t{};
        for (int s = 0; s < 3; ++s) {
            w.push_back(random(sizes[s], 70 + s));
            g.push_back(random(sizes[s], 80 + s));
            b.push_back(random(sizes[s], 90 + s));
        }
        auto want_w = w, want_b = b;
        for (int s = 0; s < 3; ++s) {
            for (size_t i = 0; i < sizes[s]; ++i) {
                const float gi = g[s][i] + wd * w[s][i];
                want_b[s][i] = mom * b[s][i] + gi;
                const float d = nesterov ? gi + mom * want_b[s][i] : want_b[s][i];
                want_w[s][i] = w[s][i] - lr * d;
            }
            t.w[s] = w[s].data();
            t.g[s] = g[s].data();
            t.b[s] = b[s].data();
            t.n[s] = (long long)sizes[s];
        }
        t.count = 3;
        launch_serial(dim3{2, 1, 1}, dim3{256, 1, 1},
                      [&] { sgd_multi_f32(t, &lr, mom, wd, nesterov); });
        for (int s = 0; s < 3; ++s) {
            const std::string name = "sgd_multi parameter " + std::to_string(s) +
                                     (nesterov ? " nesterov" : "");
            expect_close(name + ": weights", w[s],
                         std::vector<double>(want_w[s].begin(), want_w[s].end()), 1e-6);
            expect_close(name + ": momentum", b[s],
                         std::vector<double>(want_b[s].begin(), want_b[s].end()), 1e-6);
        }
    }
}

}  // namespace

int main() {
    for (bool nhwc : {false, true}) {
        // Narrow (8 and 16 channels: NHWC blocks of 8 and 16), wider than a block (40), several
        // parts, and a part count that does not divide the rows.
        batch_norm_statistics(4, 16, 64, 1, 512, nhwc);
        batch_norm_statistics(6, 40, 49, 3, 64, nhwc);
        batch_norm_statistics(3, 8, 100, 7, 64, nhwc);
        batch_norm_apply_and_backward(4, 16, 64, 2, nhwc);
        batch_norm_apply_and_backward(5, 40, 9, 3, nhwc);
        subsample_both_ways(2, 4, 8, 8, 4, 2, nhwc);
        subsample_both_ways(3, 6, 7, 5, 6, 2, nhwc);
        subsample_both_ways(2, 3, 6, 6, 0, 3, nhwc);
    }
    for (bool nhwc : {false, true}) {
        // The ImageNet stem's window on even and odd sizes, one with ties, one with a NaN, a
        // plain 2x2 pooling and overlapping windows of stride 1.
        max_pooling(2, 3, 8, 8, 3, 2, 1, 0, false, nhwc);
        max_pooling(1, 4, 7, 9, 3, 2, 1, 0, false, nhwc);
        max_pooling(2, 3, 8, 6, 3, 2, 1, 2, false, nhwc);
        max_pooling(1, 2, 6, 6, 3, 2, 1, 0, true, nhwc);
        max_pooling(2, 2, 6, 5, 2, 2, 0, 0, false, nhwc);
        max_pooling(1, 3, 5, 5, 3, 1, 1, 3, false, nhwc);
    }
    transposes(3, 5, 12);
    transposes(2, 16, 49);
    weight_copies();
    residual_passes();
    multi_tensor_sgd();
    std::printf("%d checks passed\n", checks);
    return 0;
}
