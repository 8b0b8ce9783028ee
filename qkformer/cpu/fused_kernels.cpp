// Fused CPU kernels of the fast path: BatchNorm statistics, BatchNorm + [max-pool] + multistep
// LIF forward and backward, and the compact storage of spike / count tensors.
//
// Compiled on first use by qkformer/cpu/__init__.py (g++ -O3 -march=native, no fast-math:
// -ffp-contract=off keeps every rounding where the source puts it; -fno-trapping-math only lets
// branch-free clamps and conversions vectorise; -fopenmp shares a call's parts over threads,
// see parts.h) and called through ctypes with raw pointers, one call per problem.
// Every kernel works on parts [r0, r1) of its rows, so results never depend on how the parts
// are shared out; reductions write one partial result per part and the caller sums them in a
// fixed order.
//
// Layouts are token-major: a tensor is [steps, M, C] (C channels innermost), or for the pooled
// units [steps, B, H, W, C]. `y_step` is the distance between time steps in y: M*C normally,
// 0 when a static image's conv output is computed once and repeated over the steps.
//
// The per-neuron arithmetic is that of qkformer/neuron.py and qkformer/cuda/lif_kernel.cu:
//   H = V + (Z - V) / tau;  S = H >= V_th;  V = H - H*S
//   g_H = g_S sg + carry dV/dH;  g_Z = g_H / tau;  carry = g_H (1 - 1/tau)
// with sg = alpha sig (1 - sig), sig = 1 / (1 + exp(-alpha (H - V_th))).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "parts.h"

struct F32 {
    typedef float S;  // storage
    typedef float A;  // arithmetic
    static inline A ld(S v) { return v; }
    static inline S st(A v) { return v; }
};
struct F64 {
    typedef double S;
    typedef double A;
    static inline A ld(S v) { return v; }
    static inline S st(A v) { return v; }
};
struct BF16 {  // bfloat16 storage, float arithmetic (autocast); round to nearest even
    typedef uint16_t S;
    typedef float A;
    static inline A ld(S b) {
        uint32_t u = (uint32_t)b << 16;
        float f;
        std::memcpy(&f, &u, 4);
        return f;
    }
    static inline S st(A f) {
        uint32_t u;
        std::memcpy(&u, &f, 4);
        if ((u & 0x7fffffffu) > 0x7f800000u) return (S)0x7fc0;
        u += 0x7fffu + ((u >> 16) & 1u);
        return (S)(u >> 16);
    }
};

// exp without libm calls, so the loops vectorise (libm's exp is scalar without fast-math).
// Cody-Waite reduction x = k ln2 + r, |r| <= ln2/2, Taylor series of exp(r), times 2^k.
// Error: about 1 ulp. NaN stays NaN; the clamp only moves results that over/underflow anyway.
static inline float exp_a(float x) {
    x = x > 88.0f ? 88.0f : x;
    x = x < -87.0f ? -87.0f : x;
    const float magic = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer
    const float k = (x * 1.44269504088896341f + magic) - magic;
    float r = x - k * 0.693145751953125f;
    r = r - k * 1.428606765330187045e-06f;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const int32_t ki = (int32_t)(k == k ? k : 0.0f);
    const uint32_t bits = (uint32_t)(ki + 127) << 23;
    float two_k;
    std::memcpy(&two_k, &bits, 4);
    return p * two_k;
}
static inline double exp_a(double x) {
    x = x > 709.0 ? 709.0 : x;
    x = x < -708.0 ? -708.0 : x;
    const double magic = 6755399441055744.0;  // 1.5 * 2^52
    const double k = (x * 1.4426950408889634 + magic) - magic;
    double r = x - k * 6.93147180369123816490e-01;
    r = r - k * 1.90821492927058770002e-10;
    double p = 1.0 / 6227020800.0;  // 1/13!
    p = p * r + 1.0 / 479001600.0;
    p = p * r + 1.0 / 39916800.0;
    p = p * r + 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0;
    p = p * r + 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    const int64_t ki = (int64_t)(k == k ? k : 0.0);
    const uint64_t bits = (uint64_t)(ki + 1023) << 52;
    double two_k;
    std::memcpy(&two_k, &bits, 8);
    return p * two_k;
}

// ---------------------------------------------------------------------------------------------
// BatchNorm statistics in one pass: per-channel sums of d = x - shift and of d^2 over rows
// [r0, r1) of x [R, C], added into sum[C] and sq[C] (double; the caller zeroes them). Shifting
// by a sample of each channel keeps E[d^2] - E[d]^2 free of cancellation. Runs of 16 rows are
// summed in the arithmetic type, then in double.
template <class F>
static void colstats(const typename F::S* x, i64 C, i64 r0, i64 r1, const typename F::A* shift,
                     double* sum, double* sq) {
    typedef typename F::A A;
    std::vector<A> s1(C), s2(C);
    for (i64 r = r0; r < r1;) {
        const i64 stop = r + 16 < r1 ? r + 16 : r1;
        for (i64 c = 0; c < C; ++c) s1[c] = s2[c] = A(0);
        for (; r < stop; ++r) {
            const typename F::S* xr = x + r * C;
#pragma omp simd
            for (i64 c = 0; c < C; ++c) {
                const A d = F::ld(xr[c]) - shift[c];
                s1[c] += d;
                s2[c] += d * d;
            }
        }
        for (i64 c = 0; c < C; ++c) {
            sum[c] += (double)s1[c];
            sq[c] += (double)s2[c];
        }
    }
}

// Z = Y*scale + shift of element c (scale == nullptr: Z = Y), and of a row of C into z[C].
template <class F>
static inline typename F::A affine(const typename F::S* y, i64 c, const typename F::A* scale,
                                   const typename F::A* shift) {
    return scale ? F::ld(y[c]) * scale[c] + shift[c] : F::ld(y[c]);
}

template <class F>
static inline void affine_row(const typename F::S* yr, i64 C, const typename F::A* scale,
                              const typename F::A* shift, typename F::A* z) {
#pragma omp simd
    for (i64 c = 0; c < C; ++c) z[c] = affine<F>(yr, c, scale, shift);
}

// x / tau, as a multiplication where that is the same number (tau a power of two: QKFormer's
// tau = 2), else as the division spikingjelly does.
template <class A>
static inline A over_tau(A x, A tau, A inv_tau, bool exact) {
    return exact ? x * inv_tau : x / tau;
}

template <class A>
static inline bool exact_inverse(A tau) {
    int e;
    return std::frexp(tau, &e) == A(0.5);  // a power of two
}

// The neuron's arithmetic per element, which every kernel below goes through (so all of them
// compute the same numbers). LIF_ARGS are its constants, unpacked into scalars by LIF_CONSTS
// so that the loops calling these vectorise.
#define LIF_CONSTS(A, tau, v_th, alpha, detach_reset)                                           \
    [[maybe_unused]] const A l_tau = (tau), l_inv = A(1) / l_tau, l_decay = A(1) - l_inv;      \
    [[maybe_unused]] const A l_vth = (v_th), l_alpha = (alpha);                                \
    [[maybe_unused]] const bool l_exact = exact_inverse(l_tau);                                \
    [[maybe_unused]] const int l_detach = (detach_reset)
#define LIF_ARGS l_tau, l_inv, l_exact, l_vth
#define LIF_BACK_ARGS l_tau, l_inv, l_exact, l_vth, l_alpha, l_decay, l_detach

// Charge from v with z: returns H, leaves the reset potential in v and the spike in fired.
template <class A>
static inline A lif_charge(A z, A& v, A& fired, A tau, A inv, bool exact, A v_th) {
    const A h = v + over_tau(z - v, tau, inv, exact);
    fired = h >= v_th ? A(1) : A(0);
    v = h - h * fired;
    return h;
}

// One step back: g_Z from g_S and H; carry is the gradient reaching H from the next step.
template <class A>
static inline A lif_grad(A g_s, A h, A& carry, A tau, A inv, bool exact, A v_th, A alpha,
                         A decay, int detach_reset) {
    const A sig = A(1) / (A(1) + exp_a(-((h - v_th) * alpha)));
    const A sg = (A(1) - sig) * sig * alpha;
    const A keep = h < v_th ? A(1) : A(0);
    const A dv_dh = detach_reset ? keep : keep - h * sg;
    const A g_h = g_s * sg + carry * dv_dh;
    carry = g_h * decay;
    return over_tau(g_h, tau, inv, exact);
}

// One LIF step over C neurons: charge with z, fire into s, reset v; h (optional) keeps H.
template <class F>
static inline void lif_step(const typename F::A* z, typename F::A* v, typename F::S* s,
                            typename F::A* h_out, i64 C, typename F::A tau,
                            typename F::A v_th) {
    typedef typename F::A A;
    LIF_CONSTS(A, tau, v_th, A(0), 1);
#pragma omp simd
    for (i64 c = 0; c < C; ++c) {
        A fired;
        const A h = lif_charge(z[c], v[c], fired, LIF_ARGS);
        if (s) s[c] = F::st(fired);
        if (h_out) h_out[c] = h;
    }
}

// BPTT of one step over C neurons; returns g_Z in gz and updates carry.
template <class F>
static inline void lif_step_back(const typename F::S* gs, const typename F::A* h,
                                 typename F::A* carry, typename F::A* gz, i64 C,
                                 typename F::A tau, typename F::A v_th, typename F::A alpha,
                                 int detach_reset) {
    typedef typename F::A A;
    LIF_CONSTS(A, tau, v_th, alpha, detach_reset);
#pragma omp simd
    for (i64 c = 0; c < C; ++c) gz[c] = lif_grad(F::ld(gs[c]), h[c], carry[c], LIF_BACK_ARGS);
}

// The plain (unpooled) kernels run on blocks of LANES channels at a time through all the steps,
// so the neuron state stays in registers (a few vectors per block, whose independent chains the
// CPU overlaps: 64 floats was fastest on the project's machine, 1.4x the row-at-a-time loop).
template <class A>
struct Block {
    static constexpr int LANES = 256 / sizeof(A);
};

// body(full, c0, width) for each block of channels, full a std::true_type for whole blocks
// (a compile-time width) and std::false_type for the remainder.
template <class A, class Body>
static inline void channel_blocks(i64 C, Body body) {
    constexpr int LANES = Block<A>::LANES;
    i64 c0 = 0;
    for (; c0 + LANES <= C; c0 += LANES) body(std::true_type(), c0, LANES);
    if (c0 < C) body(std::false_type(), c0, (int)(C - c0));
}

// BN affine + LIF forward of one block of channels through all steps, from y (this block's
// first element at step 0; steps y_step apart): spikes into s (steps s_step apart) and/or the
// charges into h [steps][LANES]; either may be null.
template <class F, bool FULL>
static inline void charge_block(const typename F::S* y, i64 y_step, i64 steps, int width,
                                const typename F::A* sc, const typename F::A* sh,
                                typename F::A tau, typename F::A v_th, typename F::S* s,
                                i64 s_step, typename F::A* h) {
    typedef typename F::A A;
    constexpr int LANES = Block<A>::LANES;
    LIF_CONSTS(A, tau, v_th, A(0), 1);
    const int w = FULL ? LANES : width;
    A v[LANES] = {};
    for (i64 t = 0; t < steps; ++t) {
        const typename F::S* yr = y + t * y_step;
        typename F::S* sr = s ? s + t * s_step : nullptr;
        A* hb = h ? h + t * LANES : nullptr;
#pragma omp simd
        for (int l = 0; l < w; ++l) {
            A fired;
            const A hl = lif_charge(affine<F>(yr, l, sc, sh), v[l], fired, LIF_ARGS);
            if (sr) sr[l] = F::st(fired);
            if (hb) hb[l] = hl;
        }
    }
}

template <class A>
static inline const A* at(const A* p, i64 c0) {
    return p ? p + c0 : nullptr;
}

// ---------------------------------------------------------------------------------------------
// BN affine + LIF, forward, rows m in [m0, m1) of y [steps, M, C] -> spikes s [steps, M, C].
template <class F>
static void bn_lif_fwd(const typename F::S* y, typename F::S* s, i64 steps, i64 M, i64 C,
                       i64 y_step, i64 m0, i64 m1, const typename F::A* scale,
                       const typename F::A* shift, typename F::A tau, typename F::A v_th) {
    for (i64 m = m0; m < m1; ++m)
        channel_blocks<typename F::A>(C, [&](auto full, i64 c0, int w) {
            charge_block<F, decltype(full)::value>(y + m * C + c0, y_step, steps, w,
                                                   at(scale, c0), at(shift, c0), tau, v_th,
                                                   s + m * C + c0, M * C, nullptr);
        });
}

// Backward of bn_lif_fwd: H is recomputed from y; g_Z goes to gz ([steps, M, C], or [M, C]
// summed over the steps when gz_step == 0). psum (nullable) accumulates sum(g_Z) into
// psum[0:C] and sum(g_Z * y) into psum[C:2C]: a row's steps in A, rows in double. hbuf holds
// [steps][LANES] charges.
template <class F, bool FULL>
static inline void bn_lif_bwd_block(const typename F::S* gs, const typename F::S* y,
                                    typename F::A* gz, i64 steps, i64 M, i64 C, i64 y_step,
                                    i64 gz_step, i64 m, i64 c0, int width,
                                    const typename F::A* scale, const typename F::A* shift,
                                    typename F::A tau, typename F::A v_th, typename F::A alpha,
                                    int detach_reset, double* psum, typename F::A* hbuf) {
    typedef typename F::A A;
    constexpr int LANES = Block<A>::LANES;
    LIF_CONSTS(A, tau, v_th, alpha, detach_reset);
    const int w = FULL ? LANES : width;
    charge_block<F, FULL>(y + m * C + c0, y_step, steps, w, at(scale, c0), at(shift, c0), tau,
                          v_th, nullptr, 0, hbuf);
    A carry[LANES] = {}, acc[LANES] = {}, s1[LANES] = {}, s2[LANES] = {};
    for (i64 t = steps - 1; t >= 0; --t) {
        const typename F::S* gr = gs + (t * M + m) * C + c0;
        const typename F::S* yr = y + t * y_step + m * C + c0;
        const A* hb = hbuf + t * LANES;
        A* out = gz + t * gz_step + m * C + c0;
#pragma omp simd
        for (int l = 0; l < w; ++l) {
            const A g = lif_grad(F::ld(gr[l]), hb[l], carry[l], LIF_BACK_ARGS);
            if (gz_step == 0)
                acc[l] += g;
            else
                out[l] = g;
            if (psum) {
                s1[l] += g;
                s2[l] += g * F::ld(yr[l]);
            }
        }
    }
    if (gz_step == 0)
        for (int l = 0; l < w; ++l) gz[m * C + c0 + l] = acc[l];
    if (psum)
        for (int l = 0; l < w; ++l) {
            psum[c0 + l] += (double)s1[l];
            psum[C + c0 + l] += (double)s2[l];
        }
}

template <class F>
static void bn_lif_bwd(const typename F::S* gs, const typename F::S* y, typename F::A* gz,
                       i64 steps, i64 M, i64 C, i64 y_step, i64 gz_step, i64 m0, i64 m1,
                       const typename F::A* scale, const typename F::A* shift, typename F::A tau,
                       typename F::A v_th, typename F::A alpha, int detach_reset, double* psum) {
    std::vector<typename F::A> hbuf(steps * Block<typename F::A>::LANES);
    for (i64 m = m0; m < m1; ++m)
        channel_blocks<typename F::A>(C, [&](auto full, i64 c0, int w) {
            bn_lif_bwd_block<F, decltype(full)::value>(gs, y, gz, steps, M, C, y_step, gz_step, m,
                                                       c0, w, scale, shift, tau, v_th, alpha,
                                                       detach_reset, psum, hbuf.data());
        });
}

// g_Y = a g_Z + b (y - mu) + d per channel, rows [r0, r1) of [R, C]; b == nullptr: a g_Z;
// a == nullptr: g_Z (no BatchNorm: only the storage type changes).
template <class F>
static void bn_bwd_apply(const typename F::A* g, const typename F::S* y, typename F::S* out,
                         i64 C, i64 r0, i64 r1, const typename F::A* a, const typename F::A* b,
                         const typename F::A* mu, const typename F::A* d) {
    for (i64 r = r0; r < r1; ++r) {
        const typename F::A* gr = g + r * C;
        typename F::S* o = out + r * C;
        if (!a) {
#pragma omp simd
            for (i64 c = 0; c < C; ++c) o[c] = F::st(gr[c]);
        } else if (!b) {
#pragma omp simd
            for (i64 c = 0; c < C; ++c) o[c] = F::st(a[c] * gr[c]);
        } else {
            const typename F::S* yr = y + r * C;
#pragma omp simd
            for (i64 c = 0; c < C; ++c)
                o[c] = F::st(a[c] * gr[c] + b[c] * (F::ld(yr[c]) - mu[c]) + d[c]);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// BN affine -> MaxPool2d(3, 2, 1) -> LIF, forward, images b in [b0, b1) of y [steps, B, H, W, C]
// -> s [steps, B, Ho, Wo, C]. The max takes the first of equal values in window order and lets
// NaN win, as torch's max_pool2d does (so the backward routes gradients to the same inputs).
static inline void window(i64 o, i64 n, i64* a, i64* b) {
    *a = 2 * o - 1 < 0 ? 0 : 2 * o - 1;
    *b = 2 * o + 2 > n ? n : 2 * o + 2;
}

template <class F>
static void pooled_row(const typename F::S* yt, i64 H, i64 W, i64 C, i64 b, i64 oh, i64 ow,
                       const typename F::A* scale, const typename F::A* shift, typename F::A* mx,
                       int32_t* arg, typename F::A* z) {
    i64 h0, h1, w0, w1;
    window(oh, H, &h0, &h1);
    window(ow, W, &w0, &w1);
    bool first = true;
    for (i64 ih = h0; ih < h1; ++ih)
        for (i64 iw = w0; iw < w1; ++iw) {
            const int32_t pos = (int32_t)(ih * W + iw);
            affine_row<F>(yt + ((b * H + ih) * W + iw) * C, C, scale, shift, z);
            if (first) {
                for (i64 c = 0; c < C; ++c) {
                    mx[c] = z[c];
                    if (arg) arg[c] = pos;
                }
                first = false;
                continue;
            }
            if (arg) {
#pragma omp simd
                for (i64 c = 0; c < C; ++c) {
                    const bool take = (z[c] > mx[c]) || (z[c] != z[c]);
                    mx[c] = take ? z[c] : mx[c];
                    arg[c] = take ? pos : arg[c];
                }
            } else {
#pragma omp simd
                for (i64 c = 0; c < C; ++c) {
                    const bool take = (z[c] > mx[c]) || (z[c] != z[c]);
                    mx[c] = take ? z[c] : mx[c];
                }
            }
        }
}

template <class F>
static void bn_pool_lif_fwd(const typename F::S* y, typename F::S* s, i64 steps, i64 B, i64 H,
                            i64 W, i64 C, i64 Ho, i64 Wo, i64 y_step, i64 b0, i64 b1,
                            const typename F::A* scale, const typename F::A* shift,
                            typename F::A tau, typename F::A v_th) {
    typedef typename F::A A;
    std::vector<A> v(C), mx(C), z(C);
    for (i64 b = b0; b < b1; ++b)
        for (i64 oh = 0; oh < Ho; ++oh)
            for (i64 ow = 0; ow < Wo; ++ow) {
                for (i64 c = 0; c < C; ++c) v[c] = A(0);
                for (i64 t = 0; t < steps; ++t) {
                    pooled_row<F>(y + t * y_step, H, W, C, b, oh, ow, scale, shift, mx.data(),
                                  nullptr, z.data());
                    lif_step<F>(mx.data(), v.data(), s + (((t * B + b) * Ho + oh) * Wo + ow) * C,
                                nullptr, C, tau, v_th);
                }
            }
}

// Backward: g_Z of the pre-pool map into gz ([steps, B, H, W, C], or [B, H, W, C] summed over
// the steps when y_step == 0), zeroed here for the images of this call; psum as in bn_lif_bwd.
template <class F>
static void bn_pool_lif_bwd(const typename F::S* gs, const typename F::S* y, typename F::A* gz,
                            i64 steps, i64 B, i64 H, i64 W, i64 C, i64 Ho, i64 Wo, i64 y_step,
                            i64 b0, i64 b1, const typename F::A* scale,
                            const typename F::A* shift, typename F::A tau, typename F::A v_th,
                            typename F::A alpha, int detach_reset, double* psum) {
    typedef typename F::A A;
    const i64 HWC = H * W * C;
    const i64 gz_step = y_step == 0 ? 0 : B * HWC;
    const i64 gz_steps = y_step == 0 ? 1 : steps;
    std::vector<A> v(C), z(C), mx(steps * C), hbuf(steps * C), carry(C), g(C);
    std::vector<int32_t> arg(steps * C);
    for (i64 b = b0; b < b1; ++b) {
        for (i64 t = 0; t < gz_steps; ++t) {
            A* p = gz + t * gz_step + b * HWC;
            for (i64 i = 0; i < HWC; ++i) p[i] = A(0);
        }
        for (i64 oh = 0; oh < Ho; ++oh)
            for (i64 ow = 0; ow < Wo; ++ow) {
                for (i64 c = 0; c < C; ++c) v[c] = A(0);
                for (i64 t = 0; t < steps; ++t) {
                    pooled_row<F>(y + t * y_step, H, W, C, b, oh, ow, scale, shift,
                                  mx.data() + t * C, arg.data() + t * C, z.data());
                    lif_step<F>(mx.data() + t * C, v.data(), nullptr, hbuf.data() + t * C, C, tau,
                             v_th);
                }
                for (i64 c = 0; c < C; ++c) carry[c] = A(0);
                for (i64 t = steps - 1; t >= 0; --t) {
                    lif_step_back<F>(gs + (((t * B + b) * Ho + oh) * Wo + ow) * C,
                                     hbuf.data() + t * C, carry.data(), g.data(), C, tau,
                                     v_th, alpha, detach_reset);
                    A* base = gz + t * gz_step + b * HWC;
                    const int32_t* a = arg.data() + t * C;
                    for (i64 c = 0; c < C; ++c) base[(i64)a[c] * C + c] += g[c];
                }
            }
        if (psum) {  // per image row in A, rows in double
            std::vector<A> s1(C), s2(C);
            for (i64 t = 0; t < gz_steps; ++t)
                for (i64 ih = 0; ih < H; ++ih) {
                    for (i64 c = 0; c < C; ++c) s1[c] = s2[c] = A(0);
                    const A* gp = gz + t * gz_step + b * HWC + ih * W * C;
                    const typename F::S* yp = y + t * y_step + b * HWC + ih * W * C;
                    for (i64 iw = 0; iw < W; ++iw) {
#pragma omp simd
                        for (i64 c = 0; c < C; ++c) {
                            s1[c] += gp[iw * C + c];
                            s2[c] += gp[iw * C + c] * F::ld(yp[iw * C + c]);
                        }
                    }
                    for (i64 c = 0; c < C; ++c) {
                        psum[c] += (double)s1[c];
                        psum[C + c] += (double)s2[c];
                    }
                }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Compact storage. to_u8: values that are integers in [0, 255] -> uint8; returns how many were
// not (the caller then keeps the original). to_bits: 0/1 values -> 1 bit each, element i in
// bit (i % 8) of byte i / 8; elements [n0, n1) with n0 % 8 == 0; returns how many were not 0/1.
template <class F>
static i64 to_u8(const typename F::S* x, uint8_t* out, i64 n0, i64 n1) {
    typedef typename F::A A;
    i64 bad = 0;
    // clamped (not branched on) and counted in 32 bits per chunk, so that the loop vectorises
    for (i64 c0 = n0; c0 < n1; c0 += i64(1) << 24) {
        const i64 c1 = c0 + (i64(1) << 24) < n1 ? c0 + (i64(1) << 24) : n1;
        int32_t b = 0;
#pragma omp simd reduction(+ : b)
        for (i64 i = c0; i < c1; ++i) {
            const A v = F::ld(x[i]);
            const A low = v > A(0) ? v : A(0);  // NaN -> 0, then counted
            const int32_t q = (int32_t)(low < A(255) ? low : A(255));
            b += (A)q != v;
            out[i] = (uint8_t)q;
        }
        bad += b;
    }
    return bad;
}

template <class F>
static void from_u8(const uint8_t* in, typename F::S* out, i64 n0, i64 n1) {
#pragma omp simd
    for (i64 i = n0; i < n1; ++i) out[i] = F::st((typename F::A)in[i]);
}

template <class F>
static inline uint32_t byte_of(const typename F::S* p, int count, i64* bad) {
    typedef typename F::A A;
    uint32_t byte = 0;
    i64 b = 0;
    for (int k = 0; k < count; ++k) {
        const A v = F::ld(p[k]);
        const bool one = v == A(1);
        b += !(one || v == A(0));
        byte |= (uint32_t)one << k;
    }
    *bad += b;
    return byte;
}

template <class F>
static i64 to_bits(const typename F::S* x, uint8_t* out, i64 n, i64 n0, i64 n1) {
    i64 bad = 0;
    const i64 j0 = n0 / 8, j1 = (n1 + 7) / 8, full = n / 8;
    const i64 jf = j1 < full ? j1 : full;
    for (i64 j = j0; j < jf; ++j) out[j] = (uint8_t)byte_of<F>(x + j * 8, 8, &bad);
    if (jf < j1) out[jf] = (uint8_t)byte_of<F>(x + jf * 8, (int)(n - jf * 8), &bad);
    return bad;
}

template <class F>
static void from_bits(const uint8_t* in, typename F::S* out, i64 n, i64 n0, i64 n1) {
    typedef typename F::A A;
    const i64 j0 = n0 / 8, j1 = (n1 + 7) / 8, full = n / 8;
    const i64 jf = j1 < full ? j1 : full;
    const typename F::S one = F::st(A(1)), zero = F::st(A(0));
    for (i64 j = j0; j < jf; ++j) {
        const uint32_t byte = in[j];
        typename F::S* o = out + j * 8;
#pragma omp simd
        for (int k = 0; k < 8; ++k) o[k] = ((byte >> k) & 1u) ? one : zero;
    }
    if (jf < j1)
        for (i64 i = jf * 8; i < n; ++i) out[i] = ((in[jf] >> (i - jf * 8)) & 1u) ? one : zero;
}

// ---------------------------------------------------------------------------------------------
// C entry points, one set per storage type: fixed names that qkformer/cpu looks up with ctypes.
// Each takes the parts of its rows (QK_PARTS, see parts.h); partial sums go one row per part.
#define QK_KERNELS(SUF, F)                                                                     \
    extern "C" void qk_colstats_##SUF(const F::S* x, i64 C, QK_PARTS, const F::A* shift,      \
                                      double* sum, double* sq) {                               \
        QK_EACH_PART({ colstats<F>(x, C, r0, r1, shift, sum + part * C, sq + part * C); });   \
    }                                                                                          \
    extern "C" void qk_bn_lif_fwd_##SUF(const F::S* y, F::S* s, i64 steps, i64 M, i64 C,      \
                                        i64 y_step, QK_PARTS, const F::A* scale,               \
                                        const F::A* shift, F::A tau, F::A v_th) {              \
        QK_EACH_PART({ bn_lif_fwd<F>(y, s, steps, M, C, y_step, r0, r1, scale, shift, tau, v_th); }); \
    }                                                                                          \
    extern "C" void qk_bn_lif_bwd_##SUF(const F::S* gs, const F::S* y, F::A* gz, i64 steps,   \
                                        i64 M, i64 C, i64 y_step, i64 gz_step, QK_PARTS,       \
                                        const F::A* scale, const F::A* shift, F::A tau,        \
                                        F::A v_th, F::A alpha, int detach_reset,               \
                                        double* psum) {                                        \
        QK_EACH_PART({                                                                         \
            bn_lif_bwd<F>(gs, y, gz, steps, M, C, y_step, gz_step, r0, r1, scale, shift, tau,  \
                          v_th, alpha, detach_reset, psum ? psum + part * 2 * C : nullptr);    \
        });                                                                                    \
    }                                                                                          \
    extern "C" void qk_bn_bwd_apply_##SUF(const F::A* g, const F::S* y, F::S* out, i64 C,     \
                                          QK_PARTS, const F::A* a, const F::A* b,              \
                                          const F::A* mu, const F::A* d) {                     \
        QK_EACH_PART({ bn_bwd_apply<F>(g, y, out, C, r0, r1, a, b, mu, d); });                 \
    }                                                                                          \
    extern "C" void qk_bn_pool_lif_fwd_##SUF(const F::S* y, F::S* s, i64 steps, i64 B, i64 H, \
                                             i64 W, i64 C, i64 Ho, i64 Wo, i64 y_step,         \
                                             QK_PARTS, const F::A* scale, const F::A* shift,   \
                                             F::A tau, F::A v_th) {                            \
        QK_EACH_PART({                                                                         \
            bn_pool_lif_fwd<F>(y, s, steps, B, H, W, C, Ho, Wo, y_step, r0, r1, scale, shift,  \
                               tau, v_th);                                                     \
        });                                                                                    \
    }                                                                                          \
    extern "C" void qk_bn_pool_lif_bwd_##SUF(const F::S* gs, const F::S* y, F::A* gz,         \
                                             i64 steps, i64 B, i64 H, i64 W, i64 C, i64 Ho,    \
                                             i64 Wo, i64 y_step, QK_PARTS,                     \
                                             const F::A* scale, const F::A* shift, F::A tau,   \
                                             F::A v_th, F::A alpha, int detach_reset,          \
                                             double* psum) {                                   \
        QK_EACH_PART({                                                                         \
            bn_pool_lif_bwd<F>(gs, y, gz, steps, B, H, W, C, Ho, Wo, y_step, r0, r1, scale,    \
                               shift, tau, v_th, alpha, detach_reset,                          \
                               psum ? psum + part * 2 * C : nullptr);                          \
        });                                                                                    \
    }                                                                                          \
    extern "C" i64 qk_to_u8_##SUF(const F::S* x, uint8_t* out, QK_PARTS) {                    \
        return QK_COUNT_PARTS({ return to_u8<F>(x, out, r0, r1); });                           \
    }                                                                                          \
    extern "C" void qk_from_u8_##SUF(const uint8_t* in, F::S* out, QK_PARTS) {                \
        QK_EACH_PART({ from_u8<F>(in, out, r0, r1); });                                        \
    }                                                                                          \
    extern "C" i64 qk_to_bits_##SUF(const F::S* x, uint8_t* out, i64 n, QK_PARTS) {           \
        return QK_COUNT_PARTS({ return to_bits<F>(x, out, n, r0, r1); });                      \
    }                                                                                          \
    extern "C" void qk_from_bits_##SUF(const uint8_t* in, F::S* out, i64 n, QK_PARTS) {       \
        QK_EACH_PART({ from_bits<F>(in, out, n, r0, r1); });                                   \
    }

QK_KERNELS(f32, F32)
QK_KERNELS(f64, F64)
QK_KERNELS(bf16, BF16)
