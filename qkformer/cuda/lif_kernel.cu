// Fused multistep LIF neuron (docs/original.md §1): forward and BPTT backward over all T steps in one launch.
//
// One thread owns one neuron and walks its time axis, so the membrane never leaves a register and
// each launch reads/writes every [T, N] tensor exactly once (x is [T, N] contiguous: step t of
// neuron i sits at t * N + i, and neighbouring threads touch neighbouring addresses).
//
// The arithmetic is lif_forward_torch / lif_backward_torch of qkformer/lif_loops.py, special
// values included (+-inf and NaN inputs give the same spikes, H and gradients). Every value is
// computed in float. For 16-bit types H is rounded to the storage type before it is compared with
// the threshold and carried on, so the spike, the reset and the saved H the backward pass
// recomputes from are the same number.
//
// No headers: 16-bit values travel as raw bits (unsigned short) and are converted here, so the
// source compiles under NVRTC without an include path for cuda_fp16.h / cuda_bf16.h (CuPy cannot
// always find the toolkit headers) and under plain nvcc alike.

#ifndef __CUDACC_RTC__
#include <cmath>    // host side of the test build only; NVRTC has no standard headers
#include <cstring>
#endif

// Host-device so that tests can build the per-neuron loops into a CPU program; the GPU kernels
// at the bottom are the only device callers. Execution spaces do not depend on __CUDA_ARCH__,
// only function bodies do.
#define LIF_HD __host__ __device__ __forceinline__

// _rn intrinsics keep the compiler from fusing a*b+c into an FMA, so the backward rounds after
// every operation, exactly like the chain of tensor ops in the torch backend.
LIF_HD float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
    return __fmul_rn(a, b);
#else
    return a * b;
#endif
}
LIF_HD float add_rn(float a, float b) {
#ifdef __CUDA_ARCH__
    return __fadd_rn(a, b);
#else
    return a + b;
#endif
}
LIF_HD float sub_rn(float a, float b) {
#ifdef __CUDA_ARCH__
    return __fsub_rn(a, b);
#else
    return a - b;
#endif
}

struct F32 {
    typedef float T;
    static LIF_HD float load(float v) { return v; }
    static LIF_HD float store(float v) { return v; }
};

struct F16 {  // IEEE half; cvt.rn is round-to-nearest-even, as __float2half and torch (GPU only)
    typedef unsigned short T;
    static __device__ __forceinline__ float load(unsigned short b) {
        float f;
        asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(b));
        return f;
    }
    static __device__ __forceinline__ unsigned short store(float f) {
        unsigned short b;
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(b) : "f"(f));
        return b;
    }
};

struct BF16 {  // bfloat16 = the top 16 bits of a float; round-to-nearest-even, quiet NaN as torch
    typedef unsigned short T;
    static LIF_HD float load(unsigned short b) {
        const unsigned int u = ((unsigned int)b) << 16;
#ifdef __CUDA_ARCH__
        return __uint_as_float(u);
#else
        float f;
        std::memcpy(&f, &u, 4);
        return f;
#endif
    }
    static LIF_HD unsigned short store(float f) {
#ifdef __CUDA_ARCH__
        unsigned int u = __float_as_uint(f);
#else
        unsigned int u;
        std::memcpy(&u, &f, 4);
#endif
        if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)0x7fc0;
        u += 0x7fffu + ((u >> 16) & 1u);
        return (unsigned short)(u >> 16);
    }
};

LIF_HD float lif_sigmoid(float z) {
#ifdef __CUDA_ARCH__
    return 1.0f / (1.0f + expf(-z));
#else
    return 1.0f / (1.0f + std::exp(-z));
#endif
}

// Neuron i of a [T, N] tensor. h_seq may be null (inference: nothing to save for backward).
template <class S>
LIF_HD void lif_forward_neuron(const typename S::T* x, typename S::T* spikes, typename S::T* h_seq,
                               long long i, long long N, int T, float tau, float v_th) {
    float v = 0.0f;
    for (int t = 0; t < T; ++t) {
        const long long k = (long long)t * N + i;
        // A true division, as spikingjelly's torch backend does; lif_loops.py's multiply by 1/tau
        // for power-of-two tau (tau = 2 in QKFormer) is the same number.
        const typename S::T h_st = S::store(v + (S::load(x[k]) - v) / tau);
        const float h = S::load(h_st);
        const float s = h >= v_th ? 1.0f : 0.0f;
        spikes[k] = S::store(s);
        if (h_seq) h_seq[k] = h_st;
        // The reset of the torch backend (V = H - H*S), not a select: equal for finite H, and
        // NaN after H = +inf (inf - inf), so an overflowed input propagates as NaN exactly as
        // in the reference (under fp16 AMP this is what lets GradScaler see the overflow).
        v = sub_rn(h, mul_rn(h, s));
    }
}

// g_H(t) = g_S(t) sg(t) + g_H(t+1) (1 - 1/tau) dV/dH(t),  g_X(t) = g_H(t) / tau, for t = T-1 .. 0.
template <class S>
LIF_HD void lif_backward_neuron(const typename S::T* grad_s, const typename S::T* h_seq,
                                typename S::T* grad_x, long long i, long long N, int T, float tau,
                                float decay, float v_th, float alpha, int detach_reset) {
    float carry = 0.0f;  // g_H(t+1) * (1 - 1/tau)
    for (int t = T - 1; t >= 0; --t) {
        const long long k = (long long)t * N + i;
        const float h = S::load(h_seq[k]);
        const float sig = lif_sigmoid(mul_rn(sub_rn(h, v_th), alpha));
        const float sg = mul_rn(mul_rn(sub_rn(1.0f, sig), sig), alpha);
        const float keep = h < v_th ? 1.0f : 0.0f;  // 1 - S
        const float dv_dh = detach_reset ? keep : sub_rn(keep, mul_rn(h, sg));
        float g_h = mul_rn(S::load(grad_s[k]), sg);
        // No carry into the last step, as in the torch backend: 0 * dV/dH would be NaN where
        // dV/dH is (H = +-inf or NaN with the reset differentiated).
        if (t < T - 1) g_h = add_rn(g_h, mul_rn(carry, dv_dh));
        grad_x[k] = S::store(g_h / tau);
        carry = mul_rn(g_h, decay);
    }
}

// One extern "C" pair per storage type: fixed, unmangled names that CuPy's RawModule looks up.
#define LIF_KERNELS(SUFFIX, S)                                                                   \
    extern "C" __global__ void lif_forward_##SUFFIX(                                             \
        const S::T* __restrict__ x, S::T* __restrict__ spikes, S::T* __restrict__ h_seq,         \
        long long N, int T, float tau, float v_th) {                                             \
        const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;                    \
        if (i < N) lif_forward_neuron<S>(x, spikes, h_seq, i, N, T, tau, v_th);                  \
    }                                                                                            \
    extern "C" __global__ void lif_backward_##SUFFIX(                                            \
        const S::T* __restrict__ grad_s, const S::T* __restrict__ h_seq,                         \
        S::T* __restrict__ grad_x, long long N, int T, float tau, float decay, float v_th,        \
        float alpha, int detach_reset) {                                                         \
        const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;                    \
        if (i < N)                                                                               \
            lif_backward_neuron<S>(grad_s, h_seq, grad_x, i, N, T, tau, decay, v_th, alpha,      \
                                   detach_reset);                                                \
    }

LIF_KERNELS(f32, F32)
LIF_KERNELS(f16, F16)
LIF_KERNELS(bf16, BF16)
