// Spike-driven convolutions: the products of QKFormer's convolutions and projections whose input
// is spikes or small integer counts (most of its values are zero), computed from the non-zeros
// only. Built and called like fused_kernels.cpp (qkformer/cpu/__init__.py).
//
// The input x [N, H, W, C] (C innermost; a token list is H = tokens, W = 1) is first turned into
// CSR form: for each pixel, the channels that are non-zero and their values. Then
//
//   forward      y[p, :]      = sum over taps d and non-zeros (c, v) of pixel q = p*s + d - pad:
//                               v * w[d, c, :]                         (+ bias)
//   weight grad  dw[d, c, :] += v * dy[p, :]  over the same (p, d, q, c, v)
//
// with w / dw laid out [k*k, C, Co] (output channels innermost). Each output element is a sum
// in a fixed order (taps, then channels by index), so results do not depend on the threading:
// the forward splits output pixels over threads, the weight gradient splits output channels.
// The gradient with respect to x needs all of dy and is left to the dense libraries.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>  // compress-stores (AVX-512) or table-driven permutes (AVX2) for the CSR fill
#endif

#include "parts.h"

// Vectors through GCC's vector extensions, one register wide: 64 bytes with AVX-512, 32 bytes
// elsewhere (AVX2 has 16 registers: 64-byte vectors, two registers each, spilled the
// accumulator tiles). Every output element is summed on its own in the same order whatever the
// width, so the results are the same bits on every instruction set.
#if defined(__AVX512F__)
#define QK_VEC_BYTES 64
#define QK_WIDE_REGISTERS 1  // 32 registers: room for two vectors per 3x3 tap
#else
#define QK_VEC_BYTES 32
#define QK_WIDE_REGISTERS 0
#endif
template <class T> struct Vec;
template <> struct Vec<float> {
    typedef float V __attribute__((vector_size(QK_VEC_BYTES)));
    static const int N = QK_VEC_BYTES / 4;
};
template <> struct Vec<double> {
    typedef double V __attribute__((vector_size(QK_VEC_BYTES)));
    static const int N = QK_VEC_BYTES / 8;
};

template <class T>
static inline typename Vec<T>::V vload(const T* p) {
    typename Vec<T>::V v;
    std::memcpy(&v, p, sizeof(v));
    return v;
}
template <class T>
static inline void vstore(T* p, typename Vec<T>::V v) {
    std::memcpy(p, &v, sizeof(v));
}

// ---------------------------------------------------------------------------------------------
// CSR construction, in two passes over row ranges: count the non-zeros of each row, then (after
// the caller's prefix sum) fill indices and values. Sources: dense values, bytes, or bits
// (element i of the flat tensor in bit i % 8 of byte i / 8).
template <class X>  // X: the stored values (float, double or uint8_t)
static void count_nonzero(const X* x, i64 C, i64 r0, i64 r1, int32_t* counts) {
    for (i64 r = r0; r < r1; ++r) {
        const X* xr = x + r * C;
        int32_t n = 0;
#pragma omp simd reduction(+ : n)
        for (i64 c = 0; c < C; ++c) n += xr[c] != X(0);
        counts[r] = n;
    }
}

// Branch-free: every candidate is written and the position advances on a non-zero. The writes
// go to a row-local buffer first: written in place, a row's trailing candidates would land on
// the next row's first slot, which another thread may own.
template <class T>
static void fill_row(i64 C, const i64* rowptr, i64 r, int32_t* idx, T* val, int32_t* ti, T* tv) {
    const i64 n = rowptr[r + 1] - rowptr[r];
    std::memcpy(idx + rowptr[r], ti, n * sizeof(int32_t));
    std::memcpy(val + rowptr[r], tv, n * sizeof(T));
}

template <class T, class X>  // T: the product's type; X: the stored values
static void fill_values(const X* x, i64 C, i64 r0, i64 r1, const i64* rowptr, int32_t* idx,
                        T* val) {
    std::vector<int32_t> ti(C + 1);
    std::vector<T> tv(C + 1);
    for (i64 r = r0; r < r1; ++r) {
        const X* xr = x + r * C;
        i64 k = 0;
        for (i64 c = 0; c < C; ++c) {
            ti[k] = (int32_t)c;
            tv[k] = (T)xr[c];
            k += xr[c] != X(0);
        }
        fill_row<T>(C, rowptr, r, idx, val, ti.data(), tv.data());
    }
}

#if defined(__AVX512F__)
// 16 channels at a time: the non-zeros compressed in registers (compress-to-memory is microcoded
// and slow on some CPUs), stored whole into a row buffer, the row copied out.
template <>
void fill_values<float, float>(const float* x, i64 C, i64 r0, i64 r1, const i64* rowptr,
                               int32_t* idx, float* val) {
    std::vector<int32_t> ti(C + 16);
    std::vector<float> tv(C + 16);
    const __m512i step = _mm512_set1_epi32(16);
    for (i64 r = r0; r < r1; ++r) {
        const float* xr = x + r * C;
        i64 k = 0;
        __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        i64 c = 0;
        for (; c + 16 <= C; c += 16) {
            const __m512 v = _mm512_loadu_ps(xr + c);
            const __mmask16 m = _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_NEQ_UQ);
            _mm512_storeu_si512(ti.data() + k, _mm512_maskz_compress_epi32(m, iota));
            _mm512_storeu_ps(tv.data() + k, _mm512_maskz_compress_ps(m, v));
            k += __builtin_popcount((unsigned)m);
            iota = _mm512_add_epi32(iota, step);
        }
        for (; c < C; ++c) {
            ti[k] = (int32_t)c;
            tv[k] = xr[c];
            k += xr[c] != 0.0f;
        }
        fill_row<float>(C, rowptr, r, idx, val, ti.data(), tv.data());
    }
}
#endif

#if defined(__AVX2__) && !defined(__AVX512F__)
// AVX2 has no compress: for each 8-bit mask of non-zeros, a table holds the positions of its set
// bits, lowest first (8 bytes per mask), which a permute turns into the packed values and indices.
struct SetBitTable {
    alignas(64) uint8_t pos[256][8];
    SetBitTable() {
        for (int m = 0; m < 256; ++m) {
            int k = 0;
            for (int b = 0; b < 8; ++b)
                if (m >> b & 1) pos[m][k++] = (uint8_t)b;
            for (; k < 8; ++k) pos[m][k] = 0;
        }
    }
};
static const SetBitTable set_bits;

static inline __m256i positions(unsigned m) {  // 8 int32 lanes: the set bits of m, lowest first
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)set_bits.pos[m]));
}

// 8 channels at a time, as the AVX-512 version below does with 16.
template <>
void fill_values<float, float>(const float* x, i64 C, i64 r0, i64 r1, const i64* rowptr,
                               int32_t* idx, float* val) {
    std::vector<int32_t> ti(C + 8);
    std::vector<float> tv(C + 8);
    for (i64 r = r0; r < r1; ++r) {
        const float* xr = x + r * C;
        i64 k = 0, c = 0;
        for (; c + 8 <= C; c += 8) {
            const __m256 v = _mm256_loadu_ps(xr + c);
            const unsigned m = (unsigned)_mm256_movemask_ps(
                _mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_NEQ_UQ));
            const __m256i p = positions(m);
            _mm256_storeu_si256((__m256i*)(ti.data() + k),
                                _mm256_add_epi32(p, _mm256_set1_epi32((int)c)));
            _mm256_storeu_ps(tv.data() + k, _mm256_permutevar8x32_ps(v, p));
            k += __builtin_popcount(m);
        }
        for (; c < C; ++c) {
            ti[k] = (int32_t)c;
            tv[k] = xr[c];
            k += xr[c] != 0.0f;
        }
        fill_row<float>(C, rowptr, r, idx, val, ti.data(), tv.data());
    }
}
#endif

static inline int bit(const uint8_t* bits, i64 i) { return (bits[i >> 3] >> (i & 7)) & 1; }

static void count_bits(const uint8_t* bits, i64 C, i64 r0, i64 r1, int32_t* counts) {
    for (i64 r = r0; r < r1; ++r) {
        i64 i = r * C;
        const i64 end = i + C;
        int32_t n = 0;
        for (; i < end && (i & 7); ++i) n += bit(bits, i);
        for (; i + 64 <= end; i += 64) {  // whole 64-bit words
            uint64_t w;
            std::memcpy(&w, bits + (i >> 3), 8);
            n += __builtin_popcountll(w);
        }
        for (; i + 8 <= end; i += 8) n += __builtin_popcount(bits[i >> 3]);
        for (; i < end; ++i) n += bit(bits, i);
        counts[r] = n;
    }
}

template <class T>
static void fill_bits(const uint8_t* bits, i64 C, i64 r0, i64 r1, const i64* rowptr,
                      int32_t* idx, T* val) {
#if defined(__AVX512F__)
    if (C % 16 == 0) {  // rows start on whole bytes: 16 channels = 2 bytes = one mask
        std::vector<int32_t> ti(C + 16);
        const __m512i step = _mm512_set1_epi32(16);
        for (i64 r = r0; r < r1; ++r) {
            const uint8_t* br = bits + r * C / 8;
            __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
            i64 k = 0;
            for (i64 c = 0; c < C; c += 16) {
                uint16_t m;
                std::memcpy(&m, br + c / 8, 2);
                _mm512_storeu_si512(ti.data() + k, _mm512_maskz_compress_epi32(m, iota));
                k += __builtin_popcount((unsigned)m);
                iota = _mm512_add_epi32(iota, step);
            }
            std::memcpy(idx + rowptr[r], ti.data(), k * sizeof(int32_t));
            for (i64 e = rowptr[r]; e < rowptr[r] + k; ++e) val[e] = T(1);
        }
        return;
    }
#elif defined(__AVX2__)
    if (C % 8 == 0) {  // rows start on whole bytes: one byte = 8 channels = one table entry
        for (i64 r = r0; r < r1; ++r) {
            const uint8_t* br = bits + r * C / 8;
            i64 k = rowptr[r];
            for (i64 c = 0; c < C; c += 8) {
                const unsigned m = br[c / 8];
                const int n = __builtin_popcount(m);
                if (n == 0) continue;
                alignas(32) int32_t lanes[8];
                _mm256_store_si256((__m256i*)lanes,
                                   _mm256_add_epi32(positions(m), _mm256_set1_epi32((int)c)));
                std::memcpy(idx + k, lanes, n * sizeof(int32_t));  // only this row's slots
                k += n;
            }
            for (i64 e = rowptr[r]; e < k; ++e) val[e] = T(1);
        }
        return;
    }
#endif
    for (i64 r = r0; r < r1; ++r) {
        const i64 base = r * C;
        i64 k = rowptr[r];
        i64 i = base;
        const i64 end = base + C;
        for (; i < end && (i & 7); ++i)
            if (bit(bits, i)) idx[k++] = (int32_t)(i - base);
        for (; i + 8 <= end; i += 8)  // set bits of each whole byte, lowest first
            for (uint32_t b = bits[i >> 3]; b; b &= b - 1)
                idx[k++] = (int32_t)(i - base + __builtin_ctz(b));
        for (; i < end; ++i)
            if (bit(bits, i)) idx[k++] = (int32_t)(i - base);
        for (i64 e = rowptr[r]; e < k; ++e) val[e] = T(1);
    }
}

// ---------------------------------------------------------------------------------------------
struct Geometry {  // input [N, H, W, C] -> output [N, Ho, Wo, Co], square k x k taps
    i64 N, H, W, C, Ho, Wo, k, stride, pad, Co;
};

// For output pixels [p0, p1): the input row each of the k*k taps reads, or -1 (padding).
static std::vector<int32_t> tap_rows(const Geometry& g, i64 p0, i64 p1) {
    const i64 K = g.k * g.k;
    std::vector<int32_t> rows((p1 - p0) * K);
    i64 n = p0 / (g.Ho * g.Wo), oh = (p0 / g.Wo) % g.Ho, ow = p0 % g.Wo;
    for (i64 p = p0; p < p1; ++p) {
        int32_t* t = rows.data() + (p - p0) * K;
        for (i64 kh = 0; kh < g.k; ++kh)
            for (i64 kw = 0; kw < g.k; ++kw) {
                const i64 ih = oh * g.stride + kh - g.pad, iw = ow * g.stride + kw - g.pad;
                t[kh * g.k + kw] = (ih < 0 || ih >= g.H || iw < 0 || iw >= g.W)
                                       ? -1 : (int32_t)((n * g.H + ih) * g.W + iw);
            }
        if (++ow == g.Wo) {
            ow = 0;
            if (++oh == g.Ho) {
                oh = 0;
                ++n;
            }
        }
    }
    return rows;
}

// Forward for output pixels [p0, p1), output channels from co0 in NV-vector tiles.
template <class T, int NV>
static void spconv_tile(const i64* rowptr, const int32_t* idx, const T* val, const Geometry& g,
                        const int32_t* taps, const T* w, const T* bias, T* y, i64 p0, i64 p1,
                        i64 co0) {
    typedef typename Vec<T>::V V;
    const int L = Vec<T>::N;
    const i64 K = g.k * g.k;
    for (i64 p = p0; p < p1; ++p) {
        V acc[NV];
        for (int j = 0; j < NV; ++j) acc[j] = bias ? vload<T>(bias + co0 + j * L) : V{};
        const int32_t* t = taps + (p - p0) * K;
        for (i64 d = 0; d < K; ++d) {
            const i64 q = t[d];
            if (q < 0) continue;
            const T* wd = w + d * g.C * g.Co + co0;
            for (i64 e = rowptr[q]; e < rowptr[q + 1]; ++e) {
                const V v = V{} + val[e];
                const T* wr = wd + (i64)idx[e] * g.Co;
                for (int j = 0; j < NV; ++j) acc[j] += v * vload<T>(wr + j * L);
            }
        }
        T* yr = y + p * g.Co + co0;
        for (int j = 0; j < NV; ++j) vstore<T>(yr + j * L, acc[j]);
    }
}

template <class T>
static void spconv_tail(const i64* rowptr, const int32_t* idx, const T* val, const Geometry& g,
                        const int32_t* taps, const T* w, const T* bias, T* y, i64 p0, i64 p1,
                        i64 co0) {
    const i64 K = g.k * g.k;
    for (i64 p = p0; p < p1; ++p) {
        const int32_t* t = taps + (p - p0) * K;
        for (i64 co = co0; co < g.Co; ++co) {
            T acc = bias ? bias[co] : T(0);
            for (i64 d = 0; d < K; ++d) {
                const i64 q = t[d];
                if (q < 0) continue;
                const T* wd = w + d * g.C * g.Co + co;
                for (i64 e = rowptr[q]; e < rowptr[q + 1]; ++e)
                    acc += val[e] * wd[(i64)idx[e] * g.Co];
            }
            y[p * g.Co + co] = acc;
        }
    }
}

// Calls body.template operator()<NV>(co0) over output channels [co0, co1) in tiles of at most
// `nv` vectors, then the scalar remainder as tail(co, co1).
template <class T, class Body, class Tail>
static void over_tiles(i64 co0, i64 co1, int nv, Body body, Tail tail) {
    const int L = Vec<T>::N;
    i64 c = co0;
    if (nv >= 8)
        for (; c + 8 * L <= co1; c += 8 * L) body.template run<8>(c);
    if (nv >= 4)
        for (; c + 4 * L <= co1; c += 4 * L) body.template run<4>(c);
    if (nv >= 2)
        for (; c + 2 * L <= co1; c += 2 * L) body.template run<2>(c);
    for (; c + L <= co1; c += L) body.template run<1>(c);
    if (c < co1) tail(c, co1);
}

template <class T>
struct FwdTile {
    const i64* rowptr;
    const int32_t* idx;
    const T* val;
    const Geometry& g;
    const int32_t* taps;
    const T* w;
    const T* bias;
    T* y;
    i64 p0, p1;
    template <int NV>
    void run(i64 co0) const {
        spconv_tile<T, NV>(rowptr, idx, val, g, taps, w, bias, y, p0, p1, co0);
    }
};

template <class T>
static void spconv_fwd(const i64* rowptr, const int32_t* idx, const T* val, const Geometry& g,
                       const T* w, const T* bias, T* y, i64 p0, i64 p1) {
    const std::vector<int32_t> taps = tap_rows(g, p0, p1);
    const FwdTile<T> body{rowptr, idx, val, g, taps.data(), w, bias, y, p0, p1};
    over_tiles<T>(0, g.Co, 8, body, [&](i64 c, i64) {
        spconv_tail<T>(rowptr, idx, val, g, taps.data(), w, bias, y, p0, p1, c);
    });
}

// Weight gradient, for output channels [co0, co1); dw[.., co0:co1] is overwritten.
//
// Projections and stride-1 k x k maps (padding k / 2). In those, the non-zero (q, c) of the
// input feeds tap d of output pixel q - offset(d). So per input channel c, with a tile of output
// channels, all k*k taps are summed in registers while the channel's non-zeros stream past:
//     acc[d] += x[q, c] * dy[q - offset(d), tile]        for every non-zero (q, c)
// and dw[d, c, tile] is written once per block of input pixels. Blocks of pixels (their dy rows
// stay in L2) are regrouped by channel first. Sums run over blocks in order, then pixels, so the
// result does not depend on the threading.
static const i64 DW_BLOCK = 1024;  // input pixels per block

template <class T>
struct ChannelLists {  // one block's non-zeros grouped by channel, each list in pixel order
    std::vector<i64> ptr;
    std::vector<int32_t> q;
    std::vector<T> v;
    std::vector<i64> fill;
    explicit ChannelLists(i64 C) : ptr(C + 1), fill(C) {}

    void build(const i64* rowptr, const int32_t* idx, const T* val, i64 C, i64 q0, i64 q1) {
        for (i64 c = 0; c <= C; ++c) ptr[c] = 0;
        for (i64 e = rowptr[q0]; e < rowptr[q1]; ++e) ++ptr[idx[e] + 1];
        for (i64 c = 0; c < C; ++c) ptr[c + 1] += ptr[c];
        q.resize(ptr[C]);
        v.resize(ptr[C]);
        for (i64 c = 0; c < C; ++c) fill[c] = ptr[c];
        for (i64 p = q0; p < q1; ++p)
            for (i64 e = rowptr[p]; e < rowptr[p + 1]; ++e) {
                const i64 k = fill[idx[e]]++;
                q[k] = (int32_t)p;
                v[k] = val[e];
            }
    }
};

// K taps, NV vectors per tap in registers.
template <class T, int K, int NV>
static void dw_channels(const ChannelLists<T>& lists, const Geometry& g, const T* dy, T* dw,
                        i64 co0) {
    typedef typename Vec<T>::V V;
    const int L = Vec<T>::N;
    const i64 k = g.k, pad = g.pad, H = g.H, W = g.W;
    i64 offset[K];
    for (i64 d = 0; d < K; ++d) offset[d] = (d / k - pad) * W + (d % k - pad);
    for (i64 c = 0; c < g.C; ++c) {
        const i64 e0 = lists.ptr[c], e1 = lists.ptr[c + 1];
        if (e0 == e1) continue;
        V acc[K][NV];
        for (int d = 0; d < K; ++d)
            for (int j = 0; j < NV; ++j) acc[d][j] = V{};
        for (i64 e = e0; e < e1; ++e) {
            const i64 q = lists.q[e];
            const V v = V{} + lists.v[e];
            bool interior = true;
            i64 ih = 0, iw = 0;
            if (K > 1) {
                iw = q % W;
                ih = (q / W) % H;
                interior = ih >= pad && ih < H - pad && iw >= pad && iw < W - pad;
            }
            if (interior) {
                for (int d = 0; d < K; ++d) {
                    const T* r = dy + (q - offset[d]) * g.Co + co0;
                    for (int j = 0; j < NV; ++j) acc[d][j] += v * vload<T>(r + j * L);
                }
            } else {  // image border: only the taps whose output pixel exists
                for (int d = 0; d < K; ++d) {
                    const i64 oh = ih - (d / k - pad), ow = iw - (d % k - pad);
                    if (oh < 0 || oh >= g.Ho || ow < 0 || ow >= g.Wo) continue;
                    const T* r = dy + (q - offset[d]) * g.Co + co0;
                    for (int j = 0; j < NV; ++j) acc[d][j] += v * vload<T>(r + j * L);
                }
            }
        }
        for (int d = 0; d < K; ++d) {
            T* o = dw + (d * g.C + c) * g.Co + co0;
            for (int j = 0; j < NV; ++j) vstore<T>(o + j * L, vload<T>(o + j * L) + acc[d][j]);
        }
    }
}

// The output channels past the last whole vector, summed as dw_channels sums them (a block's
// terms into a zeroed accumulator, then added to dw), so they round the same whichever
// channels a vector width leaves to this tail.
template <class T, int K>
static void dw_channels_tail(const ChannelLists<T>& lists, const Geometry& g, const T* dy, T* dw,
                             i64 co0, i64 co1) {
    const i64 k = g.k, pad = g.pad, W = g.W, H = g.H, n = co1 - co0;
    std::vector<T> acc(K * n);
    for (i64 c = 0; c < g.C; ++c) {
        const i64 e0 = lists.ptr[c], e1 = lists.ptr[c + 1];
        if (e0 == e1) continue;
        std::fill(acc.begin(), acc.end(), T(0));
        for (i64 e = e0; e < e1; ++e) {
            const i64 q = lists.q[e];
            const i64 iw = K > 1 ? q % W : 0, ih = K > 1 ? (q / W) % H : 0;
            for (int d = 0; d < K; ++d) {
                const i64 oh = ih - (d / k - pad), ow = iw - (d % k - pad);
                if (K > 1 && (oh < 0 || oh >= g.Ho || ow < 0 || ow >= g.Wo)) continue;
                const i64 p = q - ((d / k - pad) * W + (d % k - pad));
                for (i64 j = 0; j < n; ++j) acc[d * n + j] += lists.v[e] * dy[p * g.Co + co0 + j];
            }
        }
        for (int d = 0; d < K; ++d)
            for (i64 j = 0; j < n; ++j) dw[(d * g.C + c) * g.Co + co0 + j] += acc[d * n + j];
    }
}

template <class T, int K>
static void dw_blocks(const i64* rowptr, const int32_t* idx, const T* val, const Geometry& g,
                      const T* dy, T* dw, i64 co0, i64 co1) {
    const int L = Vec<T>::N;
    const i64 P = g.N * g.H * g.W;
    ChannelLists<T> lists(g.C);
    for (i64 q0 = 0; q0 < P; q0 += DW_BLOCK) {
        lists.build(rowptr, idx, val, g.C, q0, q0 + DW_BLOCK < P ? q0 + DW_BLOCK : P);
        i64 c = co0;
        if (K == 1) {
            for (; c + 8 * L <= co1; c += 8 * L) dw_channels<T, K, 8>(lists, g, dy, dw, c);
            for (; c + 2 * L <= co1; c += 2 * L) dw_channels<T, K, 2>(lists, g, dy, dw, c);
        } else if (QK_WIDE_REGISTERS) {  // 9 taps x 2 vectors: 18 of 32 registers
            for (; c + 2 * L <= co1; c += 2 * L) dw_channels<T, K, 2>(lists, g, dy, dw, c);
        }
        for (; c + L <= co1; c += L) dw_channels<T, K, 1>(lists, g, dy, dw, c);
        if (c < co1) dw_channels_tail<T, K>(lists, g, dy, dw, c, co1);
    }
}

static bool dw_supported(const Geometry& g) {
    return g.stride == 1 && g.pad == g.k / 2 && (g.k == 1 || g.k == 3);
}

template <class T>
static void spconv_dw(const i64* rowptr, const int32_t* idx, const T* val, const Geometry& g,
                      const T* dy, T* dw, i64 co0, i64 co1) {
    const i64 K = g.k * g.k;
    for (i64 d = 0; d < K; ++d)
        for (i64 c = 0; c < g.C; ++c)
            for (i64 co = co0; co < co1; ++co) dw[(d * g.C + c) * g.Co + co] = T(0);
    if (g.k == 1)
        dw_blocks<T, 1>(rowptr, idx, val, g, dy, dw, co0, co1);
    else
        dw_blocks<T, 9>(rowptr, idx, val, g, dy, dw, co0, co1);
}

// ---------------------------------------------------------------------------------------------
// C entry points; QK_PARTS (parts.h): rows for the CSR passes, output pixels for the forward,
// output channels for the weight gradient.
extern "C" void qk_csr_prefix(const int32_t* counts, i64 R, i64* rowptr) {
    i64 s = 0;
    for (i64 r = 0; r < R; ++r) {
        rowptr[r] = s;
        s += counts[r];
    }
    rowptr[R] = s;
}
extern "C" void qk_csr_count_u8(const uint8_t* x, i64 C, QK_PARTS, int32_t* counts) {
    QK_EACH_PART({ count_nonzero<uint8_t>(x, C, r0, r1, counts); });
}
extern "C" void qk_csr_count_bits(const uint8_t* x, i64 C, QK_PARTS, int32_t* counts) {
    QK_EACH_PART({ count_bits(x, C, r0, r1, counts); });
}

static inline Geometry geometry_of(const i64* a) {
    return {a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8], a[9]};
}

#define QK_SPARSE(SUF, T)                                                                      \
    extern "C" void qk_csr_count_##SUF(const T* x, i64 C, QK_PARTS, int32_t* counts) {        \
        QK_EACH_PART({ count_nonzero<T>(x, C, r0, r1, counts); });                             \
    }                                                                                          \
    extern "C" void qk_csr_fill_##SUF(const T* x, i64 C, QK_PARTS, const i64* rowptr,         \
                                      int32_t* idx, T* val) {                                  \
        QK_EACH_PART({ fill_values<T, T>(x, C, r0, r1, rowptr, idx, val); });                  \
    }                                                                                          \
    extern "C" void qk_csr_fill_u8_##SUF(const uint8_t* x, i64 C, QK_PARTS, const i64* rowptr, \
                                         int32_t* idx, T* val) {                               \
        QK_EACH_PART({ fill_values<T, uint8_t>(x, C, r0, r1, rowptr, idx, val); });            \
    }                                                                                          \
    extern "C" void qk_csr_fill_bits_##SUF(const uint8_t* x, i64 C, QK_PARTS,                 \
                                           const i64* rowptr, int32_t* idx, T* val) {          \
        QK_EACH_PART({ fill_bits<T>(x, C, r0, r1, rowptr, idx, val); });                       \
    }                                                                                          \
    extern "C" void qk_spconv_fwd_##SUF(const i64* rowptr, const int32_t* idx, const T* val,  \
                                        const i64* geometry, const T* w, const T* bias, T* y,  \
                                        QK_PARTS) {                                            \
        const Geometry g = geometry_of(geometry);                                              \
        QK_EACH_PART({ spconv_fwd<T>(rowptr, idx, val, g, w, bias, y, r0, r1); });             \
    }                                                                                          \
    extern "C" int qk_spconv_dw_##SUF(const i64* rowptr, const int32_t* idx, const T* val,    \
                                      const i64* geometry, const T* dy, T* dw, QK_PARTS) {     \
        const Geometry g = geometry_of(geometry);                                              \
        if (!dw_supported(g)) return 0;                                                        \
        QK_EACH_PART({ spconv_dw<T>(rowptr, idx, val, g, dy, dw, r0, r1); });                  \
        return 1;                                                                              \
    }

QK_SPARSE(f32, float)
QK_SPARSE(f64, double)
