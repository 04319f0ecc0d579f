// Fast CPU kernels for Jamba, called from jamba_core/ops/cpu.py through ctypes.
//
// Compiled on first use with the system C++ compiler (g++ -O3 -march=native -fopenmp, no fast-math):
// see cpu.py. Each kernel computes what its reference in reference.py computes, in fp32, and is tested
// against it (tests/test_ops.py). GCC vector extensions (W fp32 lanes, below) keep the source portable:
// they lower to AVX-512, to AVX2 or to SSE, whatever the machine has.
//
// Layouts: activations are token-major with channels contiguous ((b, L, d), any token / batch stride);
// the selective scan runs W channels side by side with their (W x d_state) SSM state held in
// registers, so no (b, d, L, d_state) tensor ever exists (Mamba paper, Gu & Dao 2023, section 3.3.2:
// the state is kept in fast memory and never written out per step).
// dtype codes: 0 = fp32, 1 = bf16. Threads: OpenMP pragmas (sharing the libgomp that torch loaded; ignored,
// so serial, when the compiler has no OpenMP).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX__)
#include <immintrin.h>
#elif defined(__SSE2__)
#include <xmmintrin.h>
#elif defined(__ARM_NEON)
#include <arm_neon.h>
#endif

namespace {

// lanes per vector: the register's width in floats, 16 (one zmm) with AVX-512, 8 (one ymm) with AVX / AVX2,
// 4 (one xmm, one NEON q register) otherwise (SSE2, aarch64). GCC 12 lowers a vector wider than the target's
// registers lane by lane, through the stack, for comparisons, `cond ? a : b`, scalar broadcasts and stores:
// on an AVX2 EPYC the clamps of `vexp` alone made the prefill scan several times slower and the training
// scan's step took ~380 cycles per channel; 16 lanes on SSE2 or aarch64 left ~10,000 scalar operations in
// the library's code (`fcsel` and scalar `fmax` / `fmul` in place of vector ones on aarch64), ~800 at 4.
#if defined(__AVX512F__)
constexpr int W = 16;
#elif defined(__AVX__)
constexpr int W = 8;
#else
constexpr int W = 4;
#endif
constexpr int MAX_N = 64;  // the most SSM states (d_state) the scans hold: cpu.MAX_D_STATE
typedef float vf __attribute__((vector_size(4 * W)));
typedef int32_t vi __attribute__((vector_size(4 * W)));
typedef uint32_t vu __attribute__((vector_size(4 * W)));
typedef uint16_t vh __attribute__((vector_size(2 * W)));
typedef uint16_t bf16;

inline vf splat(float a) { return vf{} + a; }

// exp in fp32 (Cephes expf: n = round(x / ln2), r = x - n ln2 in two parts, exp(r) by a degree-6
// polynomial, times 2^n built in the exponent bits). About 1 ulp; inputs clamped to [-87.3, 88.0] so
// 2^n stays a normal float (exp below -87.3 returns 1.2e-38 instead of a denormal or 0).
inline vf vexp(vf x) {
    x = x < -87.33654f ? splat(-87.33654f) : x;
    x = x > 88.0f ? splat(88.0f) : x;
    const vf magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
    vf t = x * 1.44269504088896341f + magic;
    vi n = (vi)t - (vi)magic;
    vf fn = t - magic;
    vf r = x - fn * 0.693359375f;
    r = r - fn * -2.12194440e-4f;
    vf r2 = r * r;
    vf p = splat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r2 + r + 1.0f;
    vi e = (n + 127) << 23;
    return p * (vf)e;
}

inline vf vsilu(vf x) { return x / (1.0f + vexp(-x)); }

// log for x >= 1 (Cephes logf: x = m 2^e with m in [sqrt(1/2), sqrt(2)), log(m) by a degree-9 polynomial).
inline vf vlog_ge1(vf x) {
    vu u = (vu)x;
    vi e = (vi)((u >> 23) & 0xffu) - 126;
    vf m = (vf)((u & 0x807fffffu) | 0x3f000000u);  // in [0.5, 1)
    vi small = (vi)(m < 0.707106781186547524f);
    e = e + small;  // small is -1 where true
    m = m + (vf)((vu)small & (vu)m) - 1.0f;
    const vf z = m * m;
    vf y = splat(7.0376836292e-2f);
    y = y * m - 1.1514610310e-1f;
    y = y * m + 1.1676998740e-1f;
    y = y * m - 1.2420140846e-1f;
    y = y * m + 1.4249322787e-1f;
    y = y * m - 1.6668057665e-1f;
    y = y * m + 2.0000714765e-1f;
    y = y * m - 2.4999993993e-1f;
    y = y * m + 3.3333331174e-1f;
    y = y * m * z;
    const vf fe = __builtin_convertvector(e, vf);
    y = y + fe * -2.12194440e-4f - 0.5f * z;
    return m + y + fe * 0.693359375f;
}

// F.softplus (beta 1, threshold 20): x above 20 as is, else log1p(exp(x)), with log1p(v) = log(u) -
// ((u - 1) - v) / u for u = 1 + v (the rounding of 1 + v corrected to first order).
inline vf vsoftplus(vf x) {
    const vf v = vexp(x);
    const vf u = 1.0f + v;
    const vf lp = vlog_ge1(u) - ((u - 1.0f) - v) / u;
    return x > 20.0f ? x : lp;
}

inline float bf16_to_f(bf16 h) {
    uint32_t u = uint32_t(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

inline bf16 f_to_bf16(float f) {  // round to nearest even, NaN kept
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    u += 0x7fffu + ((u >> 16) & 1u);
    return bf16(u >> 16);
}

inline float round_bf16(float f) { return bf16_to_f(f_to_bf16(f)); }

// load / store n <= W lanes (zeros past n)
inline vf load(const float* p, int n) {
    vf v;
    if (n == W) {
        std::memcpy(&v, p, sizeof v);
    } else {
        v = vf{};
        for (int i = 0; i < n; ++i) v[i] = p[i];
    }
    return v;
}
inline vf load(const bf16* p, int n) {
    if (n == W) {
        vh h;
        std::memcpy(&h, p, sizeof h);
        return (vf)(__builtin_convertvector(h, vu) << 16);
    }
    vf v = vf{};
    for (int i = 0; i < n; ++i) v[i] = bf16_to_f(p[i]);
    return v;
}
inline void store(float* p, vf v, int n) {
    if (n == W) std::memcpy(p, &v, sizeof v);
    else for (int i = 0; i < n; ++i) p[i] = v[i];
}
inline void store(bf16* p, vf v, int n) {
    if (n == W) {
        vu u = (vu)v;
        vi nan = (vi)(v != v);
        vu r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
        r = ((vu)nan & 0x7fc0u) | (~(vu)nan & r);
        vh h = __builtin_convertvector(r, vh);
        std::memcpy(p, &h, sizeof h);
    } else {
        for (int i = 0; i < n; ++i) p[i] = f_to_bf16(v[i]);
    }
}

inline float to_f(float x) { return x; }
inline float to_f(bf16 x) { return bf16_to_f(x); }
// int8 weights (jamba_core.quant.int8): full vectors only. GCC 12 turns a direct int8 -> float
// __builtin_convertvector into scalar code (measured: 3 GB/s); widening to int32 first, or AVX-512's
// sign-extending load, keeps it vectorised.
typedef int8_t vb __attribute__((vector_size(W)));
inline vf load(const int8_t* p, int) {
#if defined(__AVX512F__)
    const __m512 f = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
    vf v;
    std::memcpy(&v, &f, sizeof v);
    return v;
#elif defined(__AVX2__)  // GCC 12 widened the generic form byte by byte in scalar registers: int8 GEMVs 3-5 G weights/s, 16-17 with this
    const __m256 f = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
    vf v;
    std::memcpy(&v, &f, sizeof v);
    return v;
#elif defined(__ARM_NEON)  // the same byte-by-byte widening on aarch64 (sbfx + ins per byte, seen in the assembly)
    static_assert(W == 4, "one q register of fp32");
    int32_t q;
    std::memcpy(&q, p, sizeof q);
    const float32x4_t f = vcvtq_f32_s32(vmovl_s16(vget_low_s16(vmovl_s8(vreinterpret_s8_s32(vdup_n_s32(q))))));
    vf v;
    std::memcpy(&v, &f, sizeof v);
    return v;
#else
    vb q;
    std::memcpy(&q, p, sizeof q);
    return __builtin_convertvector(__builtin_convertvector(q, vi), vf);
#endif
}
inline float to_f(int8_t x) { return float(x); }

// Round a value to the storage dtype T and back (what torch does when an intermediate is held in T).
template <typename T> inline float rnd(float x) { return x; }
template <> inline float rnd<bf16>(float x) { return round_bf16(x); }
template <typename T> inline vf vrnd(vf x) { return x; }
template <> inline vf vrnd<bf16>(vf x) {
    vu u = (vu)x;
    vu r = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
    vi nan = (vi)(x != x);
    return (vf)(((vu)nan & (vu)x) | (~(vu)nan & r));
}

// sum of the W lanes as a tree (halves added, then their halves): log2(W) dependent adds instead of a
// chain of sixteen, which at the end of every GEMV row and every per-channel dot was the critical path
inline float hsum(vf v) {
#if defined(__AVX512F__)
    __m512 m;
    std::memcpy(&m, &v, sizeof v);
    return _mm512_reduce_add_ps(m);
#else
    float h[W];
    std::memcpy(h, &v, sizeof v);
    for (int w = W / 2; w > 0; w /= 2)
        for (int i = 0; i < w; ++i) h[i] += h[i + w];
    return h[0];
#endif
}

// p[c * stride] for lanes c < n (a column of a row-major matrix, from its top; zeros past n)
inline vf load_column(const float* p, int64_t stride, int n) {
#if defined(__AVX512F__)
    if (n == W && stride * W < (int64_t(1) << 31) / 4) {
        const __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                               _mm512_set1_epi32(int(stride)));
        const __m512 g = _mm512_i32gather_ps(idx, p, 4);
        vf v;
        std::memcpy(&v, &g, sizeof v);
        return v;
    }
#endif
    vf v = vf{};
    for (int i = 0; i < n; ++i) v[i] = p[i * stride];
    return v;
}
inline vf load_column(const bf16* p, int64_t stride, int n) {
    vf v = vf{};
    for (int i = 0; i < n; ++i) v[i] = bf16_to_f(p[i * stride]);
    return v;
}

// ---------------------------------------------------------------------------------------------
// Selective scan (reference.selective_scan): for W channels at a time,
//   h_t = exp(delta_t A) h_{t-1} + delta_t B_t x_t,  y_t = (C_t . h_t + D x_t) * silu(z_t).
// x, z: (b, L, d) of T with strides (sxb, sxt) / (szb, szt), channel stride 1; delta fp32 likewise;
// At: (N, d) fp32 (A transposed); B, C: (b, L, N) fp32 contiguous; D: (d,) fp32;
// state: (b, d, N) fp32 contiguous, updated in place; y: (b, L, d) fp32 contiguous.
template <typename T, typename TD, int NS>
void scan_block(int64_t L, int64_t d, int64_t N_rt, int64_t d0, int nc, const T* x, int64_t sxt, const T* z, int64_t szt,
                const TD* dl, int64_t sdt, const float* dt_bias, int softplus, const float* At, const float* Bm,
                const float* Cm, const float* D, float* state, float* y) {
    const int64_t N = NS > 0 ? NS : N_rt;
    vf h[NS > 0 ? NS : MAX_N];
    for (int64_t n = 0; n < N; ++n) {
        h[n] = vf{};
        for (int c = 0; c < nc; ++c) h[n][c] = state[(d0 + c) * N + n];
    }
    const vf Dv = load(D + d0, nc);
    const vf bias = dt_bias ? load(dt_bias + d0, nc) : vf{};
    for (int64_t t = 0; t < L; ++t) {
        const vf xv = load(x + t * sxt + d0, nc);
        vf dv = load(dl + t * sdt + d0, nc) + bias;
        if (softplus) dv = vsoftplus(dv);
        const vf zv = load(z + t * szt + d0, nc);
        const vf dx = dv * xv;
        const float* Bt = Bm + t * N;
        const float* Ct = Cm + t * N;
        vf acc = vf{};
#pragma GCC unroll 16
        for (int64_t n = 0; n < N; ++n) {
            const vf a = load(At + n * d + d0, nc);
            h[n] = vexp(dv * a) * h[n] + dx * Bt[n];
            acc += h[n] * Ct[n];
        }
        store(y + t * d + d0, (acc + Dv * xv) * vsilu(zv), nc);
    }
    for (int64_t n = 0; n < N; ++n)
        for (int c = 0; c < nc; ++c) state[(d0 + c) * N + n] = h[n][c];
}

template <typename T, typename TD>
void scan(int64_t b, int64_t L, int64_t d, int64_t N, const T* x, int64_t sxb, int64_t sxt, const T* z, int64_t szb,
          int64_t szt, const TD* dl, int64_t sdb, int64_t sdt, const float* dt_bias, int softplus, const float* At,
          const float* Bm, const float* Cm, const float* D, float* state, float* y, int nthreads) {
    const int64_t nblk = (d + W - 1) / W;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t i = 0; i < b * nblk; ++i) {
        const int64_t bi = i / nblk, d0 = (i % nblk) * W;
        const int nc = int(d - d0 < W ? d - d0 : W);
        const T* xb = x + bi * sxb;
        const T* zb = z + bi * szb;
        const TD* db = dl + bi * sdb;
        const float* Bb = Bm + bi * L * N;
        const float* Cb = Cm + bi * L * N;
        float* sb = state + bi * d * N;
        float* yb = y + bi * L * d;
#define JL_SCAN(NS) scan_block<T, TD, NS>(L, d, N, d0, nc, xb, sxt, zb, szt, db, sdt, dt_bias, softplus, At, Bb, Cb, D, sb, yb)
        switch (N) {
            case 16: JL_SCAN(16); break;
            case 8: JL_SCAN(8); break;
            default: JL_SCAN(0); break;
        }
#undef JL_SCAN
    }
}

// ---------------------------------------------------------------------------------------------
// Depthwise causal conv continuing a state (reference.causal_conv1d), optionally followed by silu.
// x: (b, L, d) of T, strides (sxb, sxt), channel stride 1; state: (b, d, K-1) of T contiguous;
// wT: (K, d) fp32; bias: (d,) fp32 or null; out: (b, L, d) of T contiguous.
// With T = bf16 the result is rounded to bf16 before silu, as torch's bf16 conv then silu do.
template <typename T>
void conv(int64_t b, int64_t L, int64_t d, int64_t K, const T* x, int64_t sxb, int64_t sxt, T* state, const float* wT,
          const float* bias, T* out, int silu, int nthreads) {
    const int64_t nblk = (d + W - 1) / W;
    const int64_t S = K - 1;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t i = 0; i < b * nblk; ++i) {
        const int64_t bi = i / nblk, d0 = (i % nblk) * W;
        const int nc = int(d - d0 < W ? d - d0 : W);
        const T* xb = x + bi * sxb;
        T* sb = state + bi * d * S;
        T* ob = out + bi * L * d;
        vf hist[8];  // the last K-1 inputs, oldest first
        for (int64_t k = 0; k < S; ++k) {
            hist[k] = vf{};
            for (int c = 0; c < nc; ++c) hist[k][c] = to_f(sb[(d0 + c) * S + k]);
        }
        vf w[8];
        for (int64_t k = 0; k < K; ++k) w[k] = load(wT + k * d + d0, nc);
        const vf bv = bias ? load(bias + d0, nc) : vf{};
        for (int64_t t = 0; t < L; ++t) {
            const vf xv = load(xb + t * sxt + d0, nc);
            vf acc = bv;
            for (int64_t k = 0; k < S; ++k) acc += w[k] * hist[k];
            acc += w[S] * xv;
            for (int64_t k = 0; k + 1 < S; ++k) hist[k] = hist[k + 1];
            if (S > 0) hist[S - 1] = xv;
            if (silu) acc = vsilu(vrnd<T>(acc));
            store(ob + t * d + d0, acc, nc);
        }
        for (int64_t k = 0; k < S; ++k) {
            T tmp[W];
            store(tmp, hist[k], W);
            for (int c = 0; c < nc; ++c) sb[(d0 + c) * S + k] = tmp[c];
        }
    }
}

// ---------------------------------------------------------------------------------------------
// y (M, N) = x (M, K) W^T (N, K) + bias, fp32 accumulation, for few rows M (decode): a
// bandwidth-bound pass over W, split across threads.
// Each thread reads its share of W's rows as NS sequential streams at once (RowStreams): block g holds
// rows g, g + Q, g + 2Q, ... (Q = N / NS rounded up), and the dot kernels below multiply a block's rows
// together, so NS streams of weights are in flight per core. Measured on the 2-vCPU AVX2 EPYC (L3 32 MiB),
// fp32 matrices of bench-small's shapes (2048 x 512 ... 65536 x 512) rotated through 300 MiB, 2 threads,
// five alternating rounds: one row after the other 19-23 GB/s, two streams 21-25, four 22-27; four adjacent
// rows at once 15-20. On the 2-vCPU Zen 4 EPYC (AVX512-BF16, VNNI; weights in huge pages as the engine
// loads them, builds alternating in one process): the VNNI int8 kernel four streams 18-25 GB/s against 12-17
// in row pairs, bench-small's int8+lm_head decode 133.9 -> 176.5 tokens/s; fp32 decode the same within the
// noise (69.5 / 70.6); the AVX512-BF16 kernel better one row after the other (bf16 decode 146.7 against
// 131.9 tokens/s with four streams, 16 alternating rounds of 16 steps), and not on every CPU: bf16_streams.
constexpr int NS = 4;
struct RowStreams {
    int64_t N, Q;  // rows, blocks
    RowStreams(int64_t n, int streams) : N(n), Q((n + streams - 1) / streams) {}
    int rows(int64_t g) const { return int((N - 1 - g) / Q) + 1; }  // the rows of block g < Q
};
// blocks of RB adjacent rows: the router's few rows
constexpr int RB = 8;
// how far ahead of the GEMV kernels' weight stream to prefetch in software (JL_PREFETCH_BYTES at build time; 0:
// none, the default). Measured on the 2-vCPU AMD EPYC (Zen 4), interleaved builds in one process, bench-small's
// layer matrices rotated cold plus its LM head, 2 threads: without software prefetch 26.3 / 27.9 / 36.7 GB/s fp32
// and 28.4 / 31.1 / 26.8 bf16 against 23.8 / 22.9 / 30.6 and 25.7 / 28.0 / 22.0 with it 1 KiB ahead (4 and 8 KiB
// no better), the same as a plain read loop of the same shape (presumably the hardware prefetcher follows these
// sequential streams and the extra requests only got in its way).
#ifndef JL_PREFETCH_BYTES
#define JL_PREFETCH_BYTES 0
#endif
constexpr int PREFETCH_BYTES = JL_PREFETCH_BYTES;
// The row streams per thread of the bf16 GEMVs on AVX512-BF16 (dot_rows_dp): 1 (one row after the other) or NS,
// set at run time by jl_set_bf16_streams (jamba_core.ops.cpu measures which is faster on the CPU it runs on).
// Whole bench-small bf16 decode steps, builds alternating in one process: on the 2-vCPU Zen 4 EPYC one stream
// 146.7 tokens/s against 131.9 with four; on a 2-vCPU Intel Xeon with AMX (480 MiB L3) four 6.35 ms per step
// against 7.80 with one (16 of 16 rounds faster).
static int bf16_streams = 1;
// out[r] = sum_k x[k] w[r rs + k] for the nr rows at w (rs: the elements from one row to the next), in
// fp32: NS rows together (two FMA chains each, each x load serving all), fewer one after the other (four
// chains); x stays in L1.
template <typename TW>
inline void dot_rows(const float* x, const TW* w, int64_t K, int64_t rs, int nr, float* out) {
    if (nr == NS) {
        const int64_t K2 = K / (2 * W) * (2 * W), K1 = K / W * W;
        vf a[NS][2] = {};
        int64_t k = 0;
        for (; k < K2; k += 2 * W) {
            const vf x0 = load(x + k, W), x1 = load(x + k + W, W);
            for (int j = 0; j < NS; ++j) {
                a[j][0] += load(w + j * rs + k, W) * x0;
                a[j][1] += load(w + j * rs + k + W, W) * x1;
            }
        }
        for (; k < K1; k += W) {
            const vf x0 = load(x + k, W);
            for (int j = 0; j < NS; ++j) a[j][0] += load(w + j * rs + k, W) * x0;
        }
        for (int j = 0; j < NS; ++j) {
            float s = hsum(a[j][0] + a[j][1]);
            for (int64_t t = k; t < K; ++t) s += to_f(w[j * rs + t]) * x[t];
            out[j] = s;
        }
        return;
    }
    const int64_t K64 = K / (4 * W) * (4 * W), K16 = K / W * W;
    for (int r = 0; r < nr; ++r) {
        const TW* wr = w + r * rs;
        vf a0 = vf{}, a1 = vf{}, a2 = vf{}, a3 = vf{};
        int64_t k = 0;
        for (; k < K64; k += 4 * W) {
            if constexpr (PREFETCH_BYTES > 0)
                for (int line = 0; line < int(4 * W * sizeof(TW)); line += 64)  // the cache lines of this step, ahead
                    __builtin_prefetch(reinterpret_cast<const char*>(wr + k) + PREFETCH_BYTES + line);
            a0 += load(wr + k, W) * load(x + k, W);
            a1 += load(wr + k + W, W) * load(x + k + W, W);
            a2 += load(wr + k + 2 * W, W) * load(x + k + 2 * W, W);
            a3 += load(wr + k + 3 * W, W) * load(x + k + 3 * W, W);
        }
        for (; k < K16; k += W) a0 += load(wr + k, W) * load(x + k, W);
        float s = hsum((a0 + a1) + (a2 + a3));
        for (; k < K; ++k) s += to_f(wr[k]) * x[k];
        out[r] = s;
    }
}

// The same dot for bf16 weights and bf16 x on a CPU with AVX512-BF16: VDPBF16PS multiplies 32 pairs of
// bf16 (each product exact in fp32) and adds them, pair by pair, into 16 fp32 lanes (round to nearest even,
// denormals flushed). One instruction per 64 bytes of weights replaces the widening shifts and two FMAs per
// 16 weights of dot_rows, which left the bf16 GEMVs short of the fp32 ones' bytes per second.
#if defined(__AVX512BF16__)
constexpr bool HAS_DPBF16 = true;
inline void dot_rows_dp(const bf16* x, const bf16* w, int64_t K, int64_t rs, int nr, float* out) {
    const int64_t K128 = K / 128 * 128, K32 = K / 32 * 32;
    if (nr == NS) {  // NS streams together (RowStreams of NS): two chains each, each x load serving all
        const int64_t K64 = K / 64 * 64;
        __m512 a[NS][2];
        for (int j = 0; j < NS; ++j) a[j][0] = a[j][1] = _mm512_setzero_ps();
        int64_t k = 0;
        for (; k < K64; k += 64) {
            const __m512bh x0 = (__m512bh)_mm512_loadu_si512(x + k), x1 = (__m512bh)_mm512_loadu_si512(x + k + 32);
            for (int j = 0; j < NS; ++j) {
                a[j][0] = _mm512_dpbf16_ps(a[j][0], (__m512bh)_mm512_loadu_si512(w + j * rs + k), x0);
                a[j][1] = _mm512_dpbf16_ps(a[j][1], (__m512bh)_mm512_loadu_si512(w + j * rs + k + 32), x1);
            }
        }
        for (; k < K32; k += 32)
            for (int j = 0; j < NS; ++j)
                a[j][0] = _mm512_dpbf16_ps(a[j][0], (__m512bh)_mm512_loadu_si512(w + j * rs + k), (__m512bh)_mm512_loadu_si512(x + k));
        for (int j = 0; j < NS; ++j) {
            float s = _mm512_reduce_add_ps(_mm512_add_ps(a[j][0], a[j][1]));
            for (int64_t t = k; t < K; ++t) s += bf16_to_f(w[j * rs + t]) * bf16_to_f(x[t]);
            out[j] = s;
        }
        return;
    }
    for (int r = 0; r < nr; ++r) {
        const bf16* wr = w + r * rs;
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
        int64_t k = 0;
        for (; k < K128; k += 128) {
            if constexpr (PREFETCH_BYTES > 0)
                for (int line = 0; line < 256; line += 64)
                    __builtin_prefetch(reinterpret_cast<const char*>(wr + k) + PREFETCH_BYTES + line);
            a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(wr + k), (__m512bh)_mm512_loadu_si512(x + k));
            a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(wr + k + 32), (__m512bh)_mm512_loadu_si512(x + k + 32));
            a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_loadu_si512(wr + k + 64), (__m512bh)_mm512_loadu_si512(x + k + 64));
            a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_loadu_si512(wr + k + 96), (__m512bh)_mm512_loadu_si512(x + k + 96));
        }
        for (; k < K32; k += 32)
            a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(wr + k), (__m512bh)_mm512_loadu_si512(x + k));
        float s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
        for (; k < K; ++k) s += bf16_to_f(wr[k]) * bf16_to_f(x[k]);
        out[r] = s;
    }
}
#else
constexpr bool HAS_DPBF16 = false;
inline void dot_rows_dp(const bf16*, const bf16*, int64_t, int64_t, int, float*) {}
#endif

// int8 weights on a CPU with AVX512-VNNI: x (fp32) is split into two int16 vectors with one scale,
// x[k] = s (hi[k] + lo[k] / 2^16) + e[k], s = max|x| / 32767, |e[k]| <= s 2^-16 (about max|x| 2^-31: below
// fp32's own rounding of x, so the product is the fp32 one to fp32 accuracy). VPDPWSSD multiplies 32
// int16 pairs exactly and sums them in 16 int32 lanes; per 32 weights one sign extension and two VPDPWSSD
// replace dot_rows' 2 x (widen, convert, FMA) per 16. Measured on a 2-vCPU Xeon, 2 threads: a 64 MiB matrix
// in the L3 36 -> 52 GB/s; streamed from memory 16 -> 18-20 GB/s at 32 MiB, unchanged at 4 MiB (both
// ~16-19, short of the 25 GB/s copy bandwidth), and bench-small's int8 decode unchanged within the noise.
// Rows in pairs there (two weight streams per thread, each x load serving both): 17-21 GB/s from memory,
// within that VM's +-30% noise of the single-row form; now a RowStreams block's rows go together (see RowStreams).
// The int32 lanes are moved to fp32 every VNNI_BLOCK weights: each instruction adds at most 2 x 32767 x 128
// per lane, so 256 of them (8192 weights, one instruction per accumulator per 32) stay below 2^31.
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
constexpr bool HAS_VNNI = true;
constexpr int64_t VNNI_BLOCK = 8192;
inline bool split_i16(const float* x, int64_t n, int16_t* hi, int16_t* lo, float* scale) {
    float amax = 0.0f;
    for (int64_t i = 0; i < n; ++i) {
        if (!std::isfinite(x[i])) return false;  // inf / nan: the fp32 kernel propagates them
        amax = std::max(amax, std::fabs(x[i]));
    }
    const double s = amax > 0.0f ? double(amax) / 32767.0 : 1.0;
    for (int64_t i = 0; i < n; ++i) {
        const double t = double(x[i]) / s, h = std::nearbyint(t);  // double: the split is exact to 2^-17
        hi[i] = int16_t(h);
        lo[i] = int16_t(std::clamp(std::nearbyint((t - h) * 65536.0), -32767.0, 32767.0));
    }
    *scale = float(s);
    return true;
}
// R rows at once (rs: the elements from one row to the next), one accumulator per row and half of x, 32
// weights a step, each x load serving all R rows
template <int R>
inline void vnni_rows(const float* x, const int16_t* hi, const int16_t* lo, float s, const int8_t* w, int64_t K,
                      int64_t rs, float* out) {
    const int64_t K32 = K / 32 * 32;
    __m512 f[R][2];
    for (int j = 0; j < R; ++j) f[j][0] = f[j][1] = _mm512_setzero_ps();
    int64_t k = 0;
    while (k < K32) {
        const int64_t end = std::min(K32, k + VNNI_BLOCK);
        __m512i a[R][2];
        for (int j = 0; j < R; ++j) a[j][0] = a[j][1] = _mm512_setzero_si512();
        for (; k < end; k += 32) {
            const __m512i xh = _mm512_loadu_si512(hi + k), xl = _mm512_loadu_si512(lo + k);
            for (int j = 0; j < R; ++j) {
                const __m512i v = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + j * rs + k)));
                a[j][0] = _mm512_dpwssd_epi32(a[j][0], v, xh);
                a[j][1] = _mm512_dpwssd_epi32(a[j][1], v, xl);
            }
        }
        for (int j = 0; j < R; ++j)
            for (int h = 0; h < 2; ++h) f[j][h] = _mm512_add_ps(f[j][h], _mm512_cvtepi32_ps(a[j][h]));
    }
    for (int j = 0; j < R; ++j) {
        float sum = s * (_mm512_reduce_add_ps(f[j][0]) + _mm512_reduce_add_ps(f[j][1]) * (1.0f / 65536.0f));
        for (int64_t t = k; t < K; ++t) sum += float(w[j * rs + t]) * x[t];
        out[j] = sum;
    }
}
// the nr (1 .. NS) rows of a RowStreams block together
inline void dot_rows_vnni(const float* x, const int16_t* hi, const int16_t* lo, float s, const int8_t* w, int64_t K,
                          int64_t rs, int nr, float* out) {
    static_assert(NS == 4, "one case per row count");
    switch (nr) {
        case 4: vnni_rows<4>(x, hi, lo, s, w, K, rs, out); break;
        case 3: vnni_rows<3>(x, hi, lo, s, w, K, rs, out); break;
        case 2: vnni_rows<2>(x, hi, lo, s, w, K, rs, out); break;
        default: vnni_rows<1>(x, hi, lo, s, w, K, rs, out); break;
    }
}
#else
constexpr bool HAS_VNNI = false;
inline bool split_i16(const float*, int64_t, int16_t*, int16_t*, float*) { return false; }
inline void dot_rows_vnni(const float*, const int16_t*, const int16_t*, float, const int8_t*, int64_t, int64_t, int, float*) {}
#endif

// x (K values, K even) split into its even (e) and odd (o) elements, as fp32
template <typename T>
inline void split_pairs(const T* x, int64_t K, float* e, float* o) {
    for (int64_t k = 0; k < K / 2; ++k) e[k] = to_f(x[2 * k]), o[k] = to_f(x[2 * k + 1]);
}

// out[r] = sum_k x[k] w[r K + k] for nr bf16 rows (K even) on a CPU without AVX512-BF16, x given as its even
// and odd elements (split_pairs): each 32-bit word of a row holds a weight pair, its high half read as fp32
// is the odd weight exactly and its low half shifted up the even one (no widening conversion). Four
// independent FMA chains per row (two words of W pairs per step): the earlier single accumulator indexed by
// the step stayed in memory, a store-to-load round trip per step. On an AVX2 EPYC, 2 threads: an 8 MiB matrix
// in the L3 9.1-9.5 -> 13.9-18.9 G weights/s; from memory unchanged (7.2-8.3 G weights/s, 15-17 GB/s).
inline void dot_rows_pairs(const float* e, const float* o, const bf16* w, int64_t K, int64_t rs, int nr, float* out) {
    const int64_t H = K / 2, H2 = H / (2 * W) * (2 * W), H1 = H / W * W;
    if (nr == NS) {  // NS rows together (RowStreams), two chains each: one per half of the word
        vf a[NS][2] = {};
        int64_t k = 0;
        for (; k < H1; k += W) {
            const vf ev = load(e + k, W), ov = load(o + k, W);
            for (int j = 0; j < NS; ++j) {
                vu u;
                std::memcpy(&u, w + j * rs + 2 * k, sizeof u);
                a[j][0] += (vf)(u << 16) * ev;
                a[j][1] += (vf)(u & 0xffff0000u) * ov;
            }
        }
        for (int j = 0; j < NS; ++j) {
            float s = hsum(a[j][0] + a[j][1]);
            for (int64_t t = k; t < H; ++t) s += bf16_to_f(w[j * rs + 2 * t]) * e[t] + bf16_to_f(w[j * rs + 2 * t + 1]) * o[t];
            out[j] = s;
        }
        return;
    }
    for (int r = 0; r < nr; ++r) {
        const bf16* wr = w + r * rs;
        vf a0 = vf{}, a1 = vf{}, a2 = vf{}, a3 = vf{};
        int64_t k = 0;
        for (; k < H2; k += 2 * W) {
            vu u0, u1;
            std::memcpy(&u0, wr + 2 * k, sizeof u0);
            std::memcpy(&u1, wr + 2 * k + 2 * W, sizeof u1);
            if constexpr (PREFETCH_BYTES > 0)
                for (int line = 0; line < int(4 * W * sizeof(bf16)); line += 64)
                    __builtin_prefetch(reinterpret_cast<const char*>(wr + 2 * k) + PREFETCH_BYTES + line);
            a0 += (vf)(u0 << 16) * load(e + k, W);
            a1 += (vf)(u0 & 0xffff0000u) * load(o + k, W);
            a2 += (vf)(u1 << 16) * load(e + k + W, W);
            a3 += (vf)(u1 & 0xffff0000u) * load(o + k + W, W);
        }
        for (; k < H1; k += W) {
            vu u0;
            std::memcpy(&u0, wr + 2 * k, sizeof u0);
            a0 += (vf)(u0 << 16) * load(e + k, W);
            a1 += (vf)(u0 & 0xffff0000u) * load(o + k, W);
        }
        float s = hsum((a0 + a1) + (a2 + a3));
        for (; k < H; ++k) s += bf16_to_f(wr[2 * k]) * e[k] + bf16_to_f(wr[2 * k + 1]) * o[k];
        out[r] = s;
    }
}

// An activation vector x (fp32, n values) with the other form the dot kernel for TW weights reads, made
// once per vector: bf16 (bf16 weights on AVX512-BF16: dot_rows_dp; the values are bf16 already, as every
// activation a bf16 matmul takes is), its even / odd split (bf16 weights without AVX512-BF16, n even:
// dot_rows_pairs, as gemv_bf16_pairs), or the int16 split (int8 weights on AVX512-VNNI: dot_rows_vnni);
// otherwise dot_rows on x itself.
template <typename TW>
struct XForm {
    // whether set() makes a second form (then it must see all of x, once)
    static constexpr bool prepared = std::is_same_v<TW, bf16> || (std::is_same_v<TW, int8_t> && HAS_VNNI);
    // the weight streams its dot reads at once (RowStreams): bf16_streams for the AVX512-BF16 kernel
    static int streams() { return std::is_same_v<TW, bf16> && HAS_DPBF16 ? bf16_streams : NS; }
    const float* x = nullptr;
    std::vector<bf16> b;
    std::vector<float> pairs;  // bf16 without AVX512-BF16: x's even elements, then its odd ones
    std::vector<int16_t> hi, lo;
    float s = 0.0f;
    bool split = false;
    void set(const float* v, int64_t n) {
        x = v;
        if constexpr (std::is_same_v<TW, bf16> && HAS_DPBF16) {
            b.resize(n);
            for (int64_t i = 0; i < n; ++i) b[i] = f_to_bf16(v[i]);
        } else if constexpr (std::is_same_v<TW, bf16>) {
            split = n % 2 == 0;
            if (split) {
                pairs.resize(n);
                split_pairs(v, n, pairs.data(), pairs.data() + n / 2);
            }
        } else if constexpr (std::is_same_v<TW, int8_t> && HAS_VNNI) {
            hi.resize(n);
            lo.resize(n);
            split = split_i16(v, n, hi.data(), lo.data(), &s);
        }
    }
    // rows r < nr at w + r rs
    void dot(const TW* w, int64_t K, int64_t rs, int nr, float* out) const {
        if constexpr (std::is_same_v<TW, bf16> && HAS_DPBF16) dot_rows_dp(b.data(), w, K, rs, nr, out);
        else if constexpr (std::is_same_v<TW, bf16>) {
            if (split) dot_rows_pairs(pairs.data(), pairs.data() + K / 2, w, K, rs, nr, out);
            else dot_rows(x, w, K, rs, nr, out);
        } else if constexpr (std::is_same_v<TW, int8_t> && HAS_VNNI) {
            if (split) dot_rows_vnni(x, hi.data(), lo.data(), s, w, K, rs, nr, out);
            else dot_rows(x, w, K, rs, nr, out);
        } else dot_rows(x, w, K, rs, nr, out);
    }
};

template <typename T> inline void put(T* p, float v) {
    if constexpr (sizeof(T) == 2) *p = f_to_bf16(v);
    else *p = v;
}

// y = x W^T (+ bias) for M rows. TW = int8_t: weight-only int8 with one fp32 scale per row
// (jamba_core.quant.int8); the scale factors out of the sum, y[m, n] = scale[n] * sum_k x[m, k] w[n, k],
// and the int8 matrix streams once.
template <typename T, typename TW>
void gemv(int64_t M, int64_t N, int64_t K, const T* x, int64_t sx, const TW* w, const T* bias, const float* scale, T* y,
          int nthreads) {
    float* xf = new float[M * K];
    for (int64_t m = 0; m < M; ++m)
        for (int64_t k = 0; k < K; ++k) xf[m * K + k] = to_f(x[m * sx + k]);
    std::vector<XForm<TW>> xs(M);
    for (int64_t m = 0; m < M; ++m) xs[m].set(xf + m * K, K);
    const RowStreams rows(N, XForm<TW>::streams());
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t g = 0; g < rows.Q; ++g) {
        const int nr = rows.rows(g);
        for (int64_t m = 0; m < M; ++m) {
            float s[NS];
            xs[m].dot(w + g * K, K, rows.Q * K, nr, s);
            for (int r = 0; r < nr; ++r) {
                const int64_t n = g + r * rows.Q;
                if (scale) s[r] *= scale[n];
                if (bias) s[r] += to_f(bias[n]);
                put(y + m * N + n, s[r]);
            }
        }
    }
    delete[] xf;
}

// bf16 weights, K even, on a CPU without AVX512-BF16: each 32-bit word of W holds two bf16 weights; the
// high half read as fp32 is the odd element exactly, the low half shifted up the even one (no
// lane-crossing conversion), matched with x split into its even and odd elements beforehand.
void gemv_bf16_pairs(int64_t M, int64_t N, int64_t K, const bf16* x, int64_t sx, const bf16* w, const bf16* bias,
                     bf16* y, int nthreads) {
    const int64_t H = K / 2;
    float* xe = new float[M * H];
    float* xo = new float[M * H];
    for (int64_t m = 0; m < M; ++m) split_pairs(x + m * sx, K, xe + m * H, xo + m * H);
    const RowStreams rows(N, NS);
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t g = 0; g < rows.Q; ++g) {
        const int nr = rows.rows(g);
        for (int64_t m = 0; m < M; ++m) {
            float s[NS];
            dot_rows_pairs(xe + m * H, xo + m * H, w + g * K, K, rows.Q * K, nr, s);
            for (int r = 0; r < nr; ++r) {
                const int64_t n = g + r * rows.Q;
                y[m * N + n] = f_to_bf16(bias ? s[r] + bf16_to_f(bias[n]) : s[r]);
            }
        }
    }
    delete[] xe;
    delete[] xo;
}

// ---------------------------------------------------------------------------------------------
// The feed-forward of a few tokens (decode), fused (model.moe): the SwiGLU MLP down(silu(gate x) * up x),
// or the MoE: router logits, softmax over the experts in fp32, the top-k experts' MLPs weighted by their
// probabilities, not renormalised (Jamba paper, section 2; transformers' JambaSparseMoeBlock). Sums in
// fp32; gate, up, silu and their product rounded to T as torch's ops in T round them; the k experts'
// outputs summed in fp32. Weights TW: T, or int8 with fp32 row scales (sg / su / sd non-null).
// One parallel region per expert: its gate and up rows, a barrier, its down rows.
template <typename T, typename TW>
void mlp_accumulate(int64_t H, int64_t I, const float* x, const TW* wg, const float* sg, const TW* wu, const float* su,
                    const TW* wd, const float* sd, float weight, float* h, float* y, int nthreads) {
    const RowStreams rows_i(I, XForm<TW>::streams()), rows_h(H, XForm<TW>::streams());
    XForm<TW> xf, hf;
    xf.set(x, H);
    if constexpr (!XForm<TW>::prepared) hf.set(h, I);  // x itself: h's values are read after the barrier below
#pragma omp parallel num_threads(nthreads)
    {
#pragma omp for schedule(static)
        for (int64_t b = 0; b < rows_i.Q; ++b) {
            const int nr = rows_i.rows(b);
            float g[NS], u[NS];
            xf.dot(wg + b * H, H, rows_i.Q * H, nr, g);
            xf.dot(wu + b * H, H, rows_i.Q * H, nr, u);
            for (int r = 0; r < nr; ++r) {
                const int64_t n = b + r * rows_i.Q;
                const float gv = rnd<T>(sg ? g[r] * sg[n] : g[r]), uv = rnd<T>(su ? u[r] * su[n] : u[r]);
                h[n] = rnd<T>(rnd<T>(gv / (1.0f + std::exp(-gv))) * uv);
            }
        }
        if constexpr (XForm<TW>::prepared) {
#pragma omp single
            hf.set(h, I);  // all of h is written (the loop's barrier); the single's barrier: read only after
        }
#pragma omp for schedule(static)
        for (int64_t b = 0; b < rows_h.Q; ++b) {
            const int nr = rows_h.rows(b);
            float d[NS];
            hf.dot(wd + b * I, I, rows_h.Q * I, nr, d);
            for (int r = 0; r < nr; ++r) {
                const int64_t n = b + r * rows_h.Q;
                y[n] += weight * rnd<T>(sd ? d[r] * sd[n] : d[r]);
            }
        }
    }
}

template <typename T, typename TW>
void ffn_decode(int64_t ntok, int64_t H, int64_t I, int64_t E, int64_t topk, const T* x, int64_t sx, const T* router,
                const TW* const* wg, const float* const* sg, const TW* const* wu, const float* const* su,
                const TW* const* wd, const float* const* sd, T* out, int nthreads) {
    float* xf = new float[H];
    float* h = new float[I];
    float* y = new float[H];
    float* p = new float[E];
    for (int64_t t = 0; t < ntok; ++t) {
        for (int64_t k = 0; k < H; ++k) xf[k] = to_f(x[t * sx + k]);
        for (int64_t k = 0; k < H; ++k) y[k] = 0.0f;
        if (!router) {
            mlp_accumulate<T, TW>(H, I, xf, wg[0], sg ? sg[0] : nullptr, wu[0], su ? su[0] : nullptr, wd[0],
                                  sd ? sd[0] : nullptr, 1.0f, h, y, nthreads);
        } else {
            float top = -INFINITY, total = 0.0f;
            for (int64_t e = 0; e < E; e += RB) {
                const int nr = int(E - e < RB ? E - e : RB);
                dot_rows(xf, router + e * H, H, H, nr, p + e);
            }
            for (int64_t e = 0; e < E; ++e) top = std::max(top, p[e] = rnd<T>(p[e]));
            for (int64_t e = 0; e < E; ++e) total += (p[e] = std::exp(p[e] - top));
            for (int64_t e = 0; e < E; ++e) p[e] /= total;
            for (int64_t j = 0; j < topk; ++j) {  // the largest remaining probability; ties to the lower index
                int64_t best = 0;
                for (int64_t e = 1; e < E; ++e)
                    if (p[e] > p[best]) best = e;
                mlp_accumulate<T, TW>(H, I, xf, wg[best], sg ? sg[best] : nullptr, wu[best], su ? su[best] : nullptr,
                                      wd[best], sd ? sd[best] : nullptr, rnd<T>(p[best]), h, y, nthreads);
                p[best] = -1.0f;
            }
        }
        for (int64_t k = 0; k < H; ++k) put(out + t * H + k, y[k]);
    }
    delete[] xf;
    delete[] h;
    delete[] y;
    delete[] p;
}

// ---------------------------------------------------------------------------------------------
// RMSNorm rows (model.norm.RMSNorm): out = w * (x / sqrt(mean(x^2) + eps)).to(T), in fp32.
template <typename T, typename TW>
void rmsnorm(int64_t rows, int64_t n, const T* x, int64_t sx, const TW* w, float eps, T* out, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads) if (rows > 16)
    for (int64_t r = 0; r < rows; ++r) {
        const T* xr = x + r * sx;
        T* o = out + r * n;
        float ss = 0.0f;
        for (int64_t i = 0; i < n; ++i) {
            const float v = to_f(xr[i]);
            ss += v * v;
        }
        const float inv = 1.0f / std::sqrt(ss / float(n) + eps);
        for (int64_t i = 0; i < n; ++i) {
            const float v = rnd<T>(to_f(xr[i]) * inv);
            if constexpr (sizeof(T) == 2) o[i] = f_to_bf16(to_f(w[i]) * v);
            else o[i] = to_f(w[i]) * v;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// One Mamba decode step after in_proj, fused (model.mamba.MambaMixer with L = 1): conv step + silu,
// x_proj, RMSNorms on dt / B / C, dt_proj + bias, softplus, SSM state update, D skip, silu(z) gate.
// Intermediates are rounded to T where the unfused model holds them in T.
// xz: (b, 2d) of T (row stride sxz); conv_state (b, d, K-1) of T; wT (K, d) fp32; conv_b (d) fp32|null;
// xw: (R+2N, d) of T; dtn, bn, cn: norm weights of T; dtw: (d, R) of T; dt_bias (d) fp32;
// A: (d, N) fp32; D (d) fp32; ssm (b, d, N) fp32; y (b, d) fp32 out.
template <typename T>
void mamba_decode(int64_t b, int64_t d, int64_t N, int64_t R, int64_t K, const T* xz, int64_t sxz, T* conv_state,
                  const float* wT, const float* conv_b, const T* xw, const T* dtn, const T* bn, const T* cn, float eps,
                  const T* dtw, const float* dt_bias, const float* A, const float* D, float* ssm, float* y,
                  int nthreads) {
    const int64_t P = R + 2 * N;
    const int64_t S = K - 1;
    float* xs = new float[b * d];
    float* proj = new float[b * P];
    const int64_t nblk = (d + W - 1) / W;  // the per-channel loops run W channels at a time, one per lane
#pragma omp parallel num_threads(nthreads)
    {
#pragma omp for schedule(static)
        for (int64_t i = 0; i < b * nblk; ++i) {  // conv step + silu
            const int64_t bi = i / nblk, c0 = (i % nblk) * W;
            const int nc = int(d - c0 < W ? d - c0 : W);
            T* st = conv_state + (bi * d + c0) * S;
            const vf xin = load(xz + bi * sxz + c0, nc);
            vf acc = conv_b ? load(conv_b + c0, nc) : vf{};
            for (int64_t k = 0; k < S; ++k) acc += load(wT + k * d + c0, nc) * load_column(st + k, S, nc);
            acc += load(wT + S * d + c0, nc) * xin;
            for (int c = 0; c < nc; ++c) {  // shift the window; the input joins it as stored (exact in T)
                for (int64_t k = 0; k + 1 < S; ++k) st[c * S + k] = st[c * S + k + 1];
                if (S > 0) st[c * S + S - 1] = xz[bi * sxz + c0 + c];
            }
            store(xs + bi * d + c0, vrnd<T>(vsilu(vrnd<T>(acc))), nc);
        }
#pragma omp for schedule(static)
        for (int64_t i = 0; i < b * P; ++i) {  // x_proj
            const int64_t bi = i / P, j = i % P;
            const float* xv = xs + bi * d;
            const T* wr = xw + j * d;
            vf acc = vf{};
            int64_t k = 0;
            for (; k + W <= d; k += W) acc += load(wr + k, W) * load(xv + k, W);
            float s = hsum(acc);
            for (; k < d; ++k) s += to_f(wr[k]) * xv[k];
            proj[i] = rnd<T>(s);
        }
#pragma omp single
        for (int64_t bi = 0; bi < b; ++bi) {  // RMSNorms on dt (R), B (N), C (N)
            const int64_t lens[3] = {R, N, N};
            const T* ws[3] = {dtn, bn, cn};
            float* p = proj + bi * P;
            for (int part = 0; part < 3; ++part) {
                float ss = 0.0f;
                for (int64_t i = 0; i < lens[part]; ++i) ss += p[i] * p[i];
                const float inv = 1.0f / std::sqrt(ss / float(lens[part]) + eps);
                for (int64_t i = 0; i < lens[part]; ++i) p[i] = rnd<T>(to_f(ws[part][i]) * rnd<T>(p[i] * inv));
                p += lens[part];
            }
        }
#pragma omp for schedule(static)
        for (int64_t i = 0; i < b * nblk; ++i) {  // dt_proj, softplus, state update, output
            const int64_t bi = i / nblk, c0 = (i % nblk) * W;
            const int nc = int(d - c0 < W ? d - c0 : W);
            const float* p = proj + bi * P;
            const float* Bv = p + R;
            const float* Cv = p + R + N;
            vf s = vf{};
            for (int c = 0; c < nc; ++c) {  // dt_proj: a channel's R weights are one contiguous row (read
                // column-wise, W channels a lane each, the gathers cost 8-10 of the mixer's 40-50 us per
                // layer on bench-small, 2 threads)
                const T* wr = dtw + (c0 + c) * R;
                vf a = vf{};
                int64_t r = 0;
                for (; r + W <= R; r += W) a += load(wr + r, W) * load(p + r, W);
                float sc = hsum(a);
                for (; r < R; ++r) sc += to_f(wr[r]) * p[r];
                s[c] = sc;
            }
            const vf delta = vsoftplus(vrnd<T>(s) + load(dt_bias + c0, nc));  // F.softplus, threshold 20
            const vf xv = load(xs + bi * d + c0, nc);
            vf acc = vf{};
            for (int c = 0; c < nc; ++c) {
                float* h = ssm + (bi * d + c0 + c) * N;
                const float* a = A + (c0 + c) * N;
                vf accv = vf{};
                for (int64_t n0 = 0; n0 < N; n0 += W) {  // the d_state axis, W lanes at a time
                    const int nn = int(N - n0 < W ? N - n0 : W);
                    const vf hv = vexp(delta[c] * load(a + n0, nn)) * load(h + n0, nn) + delta[c] * load(Bv + n0, nn) * xv[c];
                    store(h + n0, hv, nn);
                    accv += hv * load(Cv + n0, nn);
                }
                acc[c] = hsum(accv);
            }
            const vf zv = load(xz + bi * sxz + d + c0, nc);
            store(y + bi * d + c0, (acc + load(D + c0, nc) * xv) * vsilu(zv), nc);
        }
    }
    delete[] xs;
    delete[] proj;
}

// Keys lo..hi-1 of one KV head for its g query heads (q: g x hd fp32), updating each query's running max
// m, sum l and weighted sum of values acc (g x hd) as an online softmax does (Milakov & Gimelshein 2018),
// a block of AB keys at a time (flash attention's order, Dao et al. 2022, Algorithm 1): the block's scores
// for all g heads (each key read once), then per head the block's max, exp(score - max) W lanes at a
// time, and one rescale of l and acc per block instead of per key.
constexpr int AB = 64;
template <typename T>
void attend_keys(const float* q, const T* k, const T* v, int64_t lo, int64_t hi, int64_t g, int64_t hd, float scale,
                 float* m, float* l, float* acc) {
    std::vector<float> p(g * AB);
    for (int64_t s0 = lo; s0 < hi; s0 += AB) {
        const int n = int(hi - s0 < AB ? hi - s0 : AB);
        for (int j = 0; j < n; ++j) {
            const T* kr = k + (s0 + j) * hd;
            for (int64_t r = 0; r < g; ++r) {
                const float* qr = q + r * hd;
                vf a = vf{};
                for (int64_t i = 0; i < hd; i += W) {
                    const int c = int(hd - i < W ? hd - i : W);
                    a += load(kr + i, c) * load(qr + i, c);
                }
                p[r * AB + j] = hsum(a) * scale;
            }
        }
        for (int64_t r = 0; r < g; ++r) {
            float* pr = p.data() + r * AB;
            float mb = -INFINITY;
            for (int j = 0; j < n; ++j) mb = std::max(mb, pr[j]);
            const float mn = std::max(m[r], mb), corr = std::exp(m[r] - mn);  // exp(-inf) = 0: no keys before
            vf sum = vf{};
            for (int j = 0; j < n; j += W) {
                const int c = n - j < W ? n - j : W;
                const vf e = vexp(load(pr + j, c) - splat(mn));
                store(pr + j, e, c);
                sum += c == W ? e : load(pr + j, c);  // lanes past c are not keys
            }
            l[r] = l[r] * corr + hsum(sum);
            m[r] = mn;
            float* ar = acc + r * hd;
            for (int64_t i = 0; i < hd; i += W) {
                const int c = int(hd - i < W ? hd - i : W);
                store(ar + i, load(ar + i, c) * corr, c);
            }
        }
        for (int j = 0; j < n; ++j) {
            const T* vr = v + (s0 + j) * hd;
            for (int64_t i = 0; i < hd; i += W) {
                const int c = int(hd - i < W ? hd - i : W);
                const vf vv = load(vr + i, c);
                for (int64_t r = 0; r < g; ++r) {
                    float* ar = acc + r * hd + i;
                    store(ar, load(ar, c) + vv * p[r * AB + j], c);
                }
            }
        }
    }
}


// Prefill attention over a block of past keys (flash attention's order, Dao et al. 2022, Algorithm 1), bf16
// on AVX512-BF16 (the pairwise VDPBF16PS products as in dot_rows_dp) and fp32 on AVX-512. Every query row sees
// every key (no mask: chunked prefill's past part). Per head, K and V are first packed so that each 64-byte
// load feeds VDPBF16PS as it is: K as [group of 16 keys][dim pair][16
// keys][2 dims], V as [key pair][dim][2 keys]. Each tile of FQ query rows then runs over the keys FK at a
// time: scores S = scale * q.K^T (bf16 products summed in fp32), the running max m and sum l updated and acc
// rescaled once per FK keys, P = exp(S - m) summed in fp32 and rounded to bf16, acc += P.V in fp32. Result:
// out = acc / l (fp32) and lse = m + log(l), so blocks merge by their log-sum-exp. torch's CPU flash kernel
// also rounds P to bf16 before P.V. Measured on a 2-core EPYC (bf16 matmul ~440 GFLOP/s), 8,192 folded query
// rows, hd 64, 2 threads: torch's bf16 kernel 150-158 GFLOP/s (no faster than its fp32 one), this one 300-320
// at 8K and 32K keys (about 2x). Tried: 8 or 16 rows per tile, 64 / 128 / 256 keys per update (256: +3%),
// passes of 1K-32K keys; the exp2 below in place of vexp (+10-15%); K and V vectors pinned in registers (GCC
// had reloaded them for every row, which left P.V twice as slow as QK^T: +15% at 32K keys). Without the exp
// the kernel is no faster (so the softmax is not what limits it); QK^T and P.V take about half each.
// Session 11: the P.V loops kept V's vectors in an array, which GCC also stored to the stack on every key
// pair (4 zmm stores per 16 VDPBF16PS, seen in the assembly); named registers: bf16 286-299 -> 306-333
// GFLOP/s, fp32 155-163 -> 181-186. Reading each 64 keys' K and V once for all rows of a tile (L1 reuse
// instead of L2) changed nothing.
// The fp32 form (any AVX-512 CPU; plain FMAs, K packed as [group of 16 keys][dim][16 keys]): 165-169 GFLOP/s
// against torch's 149-152 (fp32 matmul ~200); bench-small fp32 prefill at 128K 705 -> 779 tokens/s. Session 35,
// the Xeon with AMX (fp32 matmul ~320 GFLOP/s; 2 KV heads x 8,192 folded rows, hd 64, the two builds alternating
// in one process): 16 rows per tile, K read per 64 keys for all rows and P.V swept per 128 keys for all rows,
// so that each reads K and V from the L2 once per tile: 252 -> 273 GFLOP/s over 8K keys, 222 -> 251 over 32K. Step
// by step over 8K keys, each against the 8-row kernel in its own alternating run: K for all rows 256 -> 267, and
// P.V swept per 128 keys too 254 -> 270 (per 64 keys: less); 16 rows is the rest. 512 or 128 keys per softmax
// update, 1,024 or 4,096 keys per pass, and the row maxima kept from the QK^T registers: no better.
#if defined(__AVX512F__)
constexpr int FQ = 8;   // bf16: query rows per tile, at most 16 (groups of 4 rows x 4 vectors = 16 accumulators)
constexpr int FQ32 = 16;  // fp32: query rows per tile
constexpr int PVK = 128;  // fp32: keys per P.V sweep of all the tile's rows (V's 32 KiB at hd 64 stays in the L1)
constexpr int FK = 256;  // keys per softmax update (a multiple of 64: scores in blocks of 4 x 4 vectors)
static_assert(FK % 64 == 0 && FK % PVK == 0, "the key blocks of QK^T and of the P.V sweeps divide FK");
constexpr int64_t FLASH_MAX_HD = 512;
constexpr int64_t FLASH_KEYS = 2048;  // keys per pass over all tiles: 512 KiB of packed K and V (hd 64), in the L2

// 2^x for x <= 0 (scores minus their running max, in log2 units): 2^x = 2^n 2^f, n = round(x), f in
// [-0.5, 0.5], 2^f by a degree-5 polynomial fitted to minimise the largest relative error on that interval
// (7.6e-8, below fp32's rounding; the degree-6 Taylor series before: 2e-7); VSCALEFPS applies 2^n and
// returns 0 below 2^-126 (x clamped at -200, so -inf, a padding key's score, gives 0 too). Nine vector
// operations against vexp's twenty.
inline __m512 exp2_neg(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-200.0f));
    const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(x, n);
    __m512 p = _mm512_set1_ps(1.32767357e-3f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.67563893e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.55071326e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.40221176e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.93146966e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.00000007f));
    return _mm512_scalef_ps(p, n);
}

// the online-softmax step of a tile (Dao et al. 2022, Algorithm 1, lines 9-10): raw scores q.k s (keys from
// `valid` on are padding and set to -inf here) and `scale` (hd^-0.5 log2 e: log2 units) -> m (running max of
// scale s), corr = 2^(m_old - m_new), l (running sum, fp32), and P = 2^(scale s - m), one FMA before the
// exponent, handed to put(row, key, 16 values)
template <int NR, typename Put>
inline void softmax_block(float (*s)[FK], int valid, float scale, float* m, float* l, float* corr, Put put) {
    static_assert(NR <= 16, "one vector of running maxima");
    alignas(64) float mo[16] = {}, mn[16] = {};
    for (int r = 0; r < NR; ++r) {
        for (int j = valid; j < FK; ++j) s[r][j] = -INFINITY;
        __m512 mx = _mm512_load_ps(&s[r][0]);
        for (int j = 16; j < FK; j += 16) mx = _mm512_max_ps(mx, _mm512_load_ps(&s[r][j]));
        mo[r] = m[r];
        mn[r] = m[r] = std::max(m[r], scale * _mm512_reduce_max_ps(mx));  // scale > 0
    }
    _mm512_store_ps(mo, exp2_neg(_mm512_sub_ps(_mm512_load_ps(mo), _mm512_load_ps(mn))));  // corr, 0 at first
    for (int r = 0; r < NR; ++r) {
        corr[r] = mo[r];
        const __m512 mr = _mm512_set1_ps(mn[r]), sc = _mm512_set1_ps(scale);
        __m512 sum = _mm512_setzero_ps();
        for (int j = 0; j < FK; j += 16) {
            const __m512 e = exp2_neg(_mm512_fmsub_ps(_mm512_load_ps(&s[r][j]), sc, mr));
            sum = _mm512_add_ps(sum, e);
            put(r, j, e);
        }
        l[r] = l[r] * corr[r] + _mm512_reduce_add_ps(sum);
    }
}

// fp32 q, K, V (the same order; plain FMAs): K packed as [group of 16 keys][dim][16 keys], V as rows
void pack_kv_f32(const float* k, int64_t sk, const float* v, int64_t sv, int64_t n, int64_t npad, int64_t hd, float* kp,
                 float* vp) {
    for (int64_t key = 0; key < npad; ++key) {
        float* dst = kp + (key / 16 * hd) * 16 + key % 16;
        for (int64_t d = 0; d < hd; ++d) dst[d * 16] = key < n ? k[key * sk + d] : 0.0f;
        if (key < n) std::memcpy(vp + key * hd, v + key * sv, hd * 4);
        else std::fill(vp + key * hd, vp + (key + 1) * hd, 0.0f);
    }
}

// acc rows 0..3 (row stride hd), dims i0 .. i0 + 16 NV: acc (times corr, unless null) += P . V over keys t0 .. t1
template <int NV>
inline void pv_rows4_f32(const float* p, const float* vp, int64_t hd, int64_t i0, const float* corr, float* acc, int t0, int t1) {
    __m512 a[4][NV];
    for (int r = 0; r < 4; ++r)
        for (int j = 0; j < NV; ++j) {
            a[r][j] = _mm512_loadu_ps(acc + r * hd + i0 + 16 * j);
            if (corr) a[r][j] = _mm512_mul_ps(a[r][j], _mm512_set1_ps(corr[r]));
        }
    for (int t = t0; t < t1; ++t) {
        const float* vt = vp + t * hd + i0;  // named registers, pinned (see pv_rows4)
        __m512 v0 = _mm512_loadu_ps(vt), v1 = NV > 1 ? _mm512_loadu_ps(vt + 16) : v0, v2 = NV > 2 ? _mm512_loadu_ps(vt + 32) : v0,
               v3 = NV > 3 ? _mm512_loadu_ps(vt + 48) : v0;
        __asm__("" : "+v"(v0), "+v"(v1), "+v"(v2), "+v"(v3));
        for (int r = 0; r < 4; ++r) {
            const __m512 pb = _mm512_set1_ps(p[r * FK + t]);
            a[r][0] = _mm512_fmadd_ps(pb, v0, a[r][0]);
            if constexpr (NV > 1) a[r][1] = _mm512_fmadd_ps(pb, v1, a[r][1]);
            if constexpr (NV > 2) a[r][2] = _mm512_fmadd_ps(pb, v2, a[r][2]);
            if constexpr (NV > 3) a[r][3] = _mm512_fmadd_ps(pb, v3, a[r][3]);
        }
    }
    for (int r = 0; r < 4; ++r)
        for (int j = 0; j < NV; ++j) _mm512_storeu_ps(acc + r * hd + i0 + 16 * j, a[r][j]);
}

void flash_tile_f32(const float* q, int nr, const float* kp, const float* vp, int64_t kb0, int64_t kb1, int64_t n,
                    int64_t hd, float scale, float* m, float* l, float* acc) {
    alignas(64) float s[FQ32][FK];
    alignas(64) float p[FQ32][FK];
    float corr[FQ32];
    const float* qr[FQ32];
    for (int r = 0; r < FQ32; ++r) qr[r] = q + std::min(r, nr - 1) * hd;
    for (int64_t kb = kb0; kb < kb1; kb += FK) {
        // each 64 keys' K (16 KiB at hd 64) read from the L2 once for all rows, then from the L1
        for (int kc = 0; kc < FK; kc += 64)
            for (int r0 = 0; r0 < FQ32; r0 += 4) {
                const float* kg = kp + (kb + kc) / 16 * hd * 16;
                __m512 c[4][4];
                for (int r = 0; r < 4; ++r)
                    for (int j = 0; j < 4; ++j) c[r][j] = _mm512_setzero_ps();
                for (int64_t d = 0; d < hd; ++d) {
                    __m512 k0 = _mm512_loadu_ps(kg + d * 16), k1 = _mm512_loadu_ps(kg + (hd + d) * 16),
                           k2 = _mm512_loadu_ps(kg + (2 * hd + d) * 16), k3 = _mm512_loadu_ps(kg + (3 * hd + d) * 16);
                    __asm__("" : "+v"(k0), "+v"(k1), "+v"(k2), "+v"(k3));
                    for (int r = 0; r < 4; ++r) {
                        const __m512 qb = _mm512_set1_ps(qr[r0 + r][d]);
                        c[r][0] = _mm512_fmadd_ps(qb, k0, c[r][0]);
                        c[r][1] = _mm512_fmadd_ps(qb, k1, c[r][1]);
                        c[r][2] = _mm512_fmadd_ps(qb, k2, c[r][2]);
                        c[r][3] = _mm512_fmadd_ps(qb, k3, c[r][3]);
                    }
                }
                for (int r = 0; r < 4; ++r)
                    for (int j = 0; j < 4; ++j) _mm512_store_ps(&s[r0 + r][kc + 16 * j], c[r][j]);
            }
        softmax_block<FQ32>(s, int(std::min<int64_t>(FK, n - kb)), scale, m, l, corr,
                            [&](int r, int j, __m512 e) { _mm512_store_ps(&p[r][j], e); });
        const float* vb = vp + kb * hd;
        for (int t0 = 0; t0 < FK; t0 += PVK)  // as for K: V read from the L2 once per tile
            for (int r0 = 0; r0 < FQ32; r0 += 4)
                for (int64_t i0 = 0; i0 < hd; i0 += 64) {
                    const float* cr = t0 ? nullptr : corr + r0;  // acc rescaled once, at the first sweep
                    switch (std::min<int64_t>(4, (hd - i0) / 16)) {
                        case 4: pv_rows4_f32<4>(&p[r0][0], vb, hd, i0, cr, acc + r0 * hd, t0, t0 + PVK); break;
                        case 3: pv_rows4_f32<3>(&p[r0][0], vb, hd, i0, cr, acc + r0 * hd, t0, t0 + PVK); break;
                        case 2: pv_rows4_f32<2>(&p[r0][0], vb, hd, i0, cr, acc + r0 * hd, t0, t0 + PVK); break;
                        default: pv_rows4_f32<1>(&p[r0][0], vb, hd, i0, cr, acc + r0 * hd, t0, t0 + PVK); break;
                    }
                }
    }
}

// the flash kernels' driver: per (batch, KV head) pack K and V (`pack`, into E-typed buffers of `per_row`
// elements per key) and copy the query rows (T, strides in elements), then every tile of TR rows over the keys in passes of FLASH_KEYS (each
// thread's tiles reuse one pass's K and V from its L2: one pass over all 32K keys per tile ran at 230
// GFLOP/s against 264 at 8K keys, bf16 on the EPYC), then out = acc / l and lse = (m + log2 l) ln 2
template <int TR, typename T, typename E, typename Pack, typename Tile>
void flash_run(int64_t B, int64_t NKV, int64_t R, int64_t S, int64_t hd, int64_t per_row, const T* q, int64_t sqb,
               int64_t sqh, int64_t sqr, const T* k, int64_t skb, int64_t skh, int64_t sks, const T* v, int64_t svb,
               int64_t svh, int64_t svs, float scale, float* out, float* lse, int nthreads, Pack pack, Tile tile) {
    const int64_t H = B * NKV, npad = (S + FK - 1) / FK * FK, tiles = (R + TR - 1) / TR, Rp = tiles * TR;
    std::vector<E> kp(H * npad * per_row), vp(H * npad * per_row), qp(H * Rp * per_row);
    std::vector<float> m(H * Rp, -INFINITY), l(H * Rp, 0.0f), acc(H * Rp * hd, 0.0f);
    const float scale2 = scale * 1.4426950408889634f;  // scores in log2 units: exp2_neg, no exp
#pragma omp parallel num_threads(nthreads)
    {
#pragma omp for schedule(static)
        for (int64_t h = 0; h < H; ++h) {
            const int64_t bi = h / NKV, j = h % NKV;
            pack(k + bi * skb + j * skh, sks, v + bi * svb + j * svh, svs, S, npad, hd, kp.data() + h * npad * per_row,
                 vp.data() + h * npad * per_row);
            for (int64_t r = 0; r < R; ++r)
                std::memcpy(qp.data() + (h * Rp + r) * per_row, q + bi * sqb + j * sqh + r * sqr, hd * sizeof(T));
        }
        for (int64_t k0 = 0; k0 < npad; k0 += FLASH_KEYS) {
#pragma omp for schedule(static)
            for (int64_t i = 0; i < H * tiles; ++i) {
                const int64_t h = i / tiles, r0 = i % tiles * TR;
                tile(qp.data() + (h * Rp + r0) * per_row, int(std::min<int64_t>(TR, R - r0)), kp.data() + h * npad * per_row,
                     vp.data() + h * npad * per_row, k0, std::min(k0 + FLASH_KEYS, npad), S, hd, scale2, &m[h * Rp + r0],
                     &l[h * Rp + r0], &acc[(h * Rp + r0) * hd]);
            }
        }
#pragma omp for schedule(static)
        for (int64_t i = 0; i < H * R; ++i) {
            const int64_t h = i / R, r = i % R;
            const float inv = 1.0f / l[h * Rp + r];
            for (int64_t c = 0; c < hd; ++c) out[i * hd + c] = acc[(h * Rp + r) * hd + c] * inv;
            lse[i] = (m[h * Rp + r] + std::log2(l[h * Rp + r])) * 0.6931471805599453f;
        }
    }
}
#endif

#if defined(__AVX512BF16__)
inline __m512bh bh(const uint32_t* p) { return (__m512bh)_mm512_loadu_si512(p); }
inline __m512bh bh_set1(uint32_t x) { return (__m512bh)_mm512_set1_epi32(int(x)); }

// acc rows 0..3 (row stride hd), dims i0 .. i0 + 16 NV: acc = acc * corr + P . V over FK keys
template <int NV>
inline void pv_rows4(const uint32_t* p32, const uint32_t* vp, int64_t hd, int64_t i0, const float* corr, float* acc) {
    __m512 a[4][NV];
    for (int r = 0; r < 4; ++r)
        for (int j = 0; j < NV; ++j) a[r][j] = _mm512_mul_ps(_mm512_loadu_ps(acc + r * hd + i0 + 16 * j), _mm512_set1_ps(corr[r]));
    for (int t = 0; t < FK / 2; ++t) {
        // V's vectors in named registers, pinned by an empty asm: GCC otherwise reloads them for every row,
        // and kept out of an array, which GCC then also stores to the stack on every key pair
        const uint32_t* vt = vp + t * hd + i0;
        __m512bh v0 = bh(vt), v1 = NV > 1 ? bh(vt + 16) : v0, v2 = NV > 2 ? bh(vt + 32) : v0, v3 = NV > 3 ? bh(vt + 48) : v0;
        __asm__("" : "+v"(v0), "+v"(v1), "+v"(v2), "+v"(v3));
        for (int r = 0; r < 4; ++r) {
            const __m512bh pb = bh_set1(p32[r * (FK / 2) + t]);
            a[r][0] = _mm512_dpbf16_ps(a[r][0], v0, pb);
            if constexpr (NV > 1) a[r][1] = _mm512_dpbf16_ps(a[r][1], v1, pb);
            if constexpr (NV > 2) a[r][2] = _mm512_dpbf16_ps(a[r][2], v2, pb);
            if constexpr (NV > 3) a[r][3] = _mm512_dpbf16_ps(a[r][3], v3, pb);
        }
    }
    for (int r = 0; r < 4; ++r)
        for (int j = 0; j < NV; ++j) _mm512_storeu_ps(acc + r * hd + i0 + 16 * j, a[r][j]);
}

// K (n keys, row stride sk) and V into the packed layouts above, keys n .. npad zero
void pack_kv(const bf16* k, int64_t sk, const bf16* v, int64_t sv, int64_t n, int64_t npad, int64_t hd, uint32_t* kp,
             uint32_t* vp) {
    const int64_t hp = hd / 2;
    for (int64_t key = 0; key < npad; ++key) {
        uint32_t* dst = kp + (key / 16 * hp) * 16 + key % 16;
        for (int64_t d = 0; d < hp; ++d) {
            uint32_t pair = 0;
            if (key < n) std::memcpy(&pair, k + key * sk + 2 * d, 4);
            dst[d * 16] = pair;
        }
    }
    for (int64_t t = 0; t < npad / 2; ++t)
        for (int64_t i = 0; i < hd; ++i) {
            const uint32_t lo = 2 * t < n ? v[2 * t * sv + i] : 0, hi = 2 * t + 1 < n ? v[(2 * t + 1) * sv + i] : 0;
            vp[t * hd + i] = lo | hi << 16;
        }
}

// one tile: query rows q32[0 .. nr) (hd / 2 bf16 pairs each) over keys kb0 .. kb1 (multiples of FK) of the
// n keys packed in kp, vp (padded to FK); m, l (FQ) and acc (FQ x hd) carry the tile's state from the keys
// before kb0
void flash_tile(const uint32_t* q32, int nr, const uint32_t* kp, const uint32_t* vp, int64_t kb0, int64_t kb1, int64_t n,
                int64_t hd, float scale, float* m, float* l, float* acc) {
    const int64_t hp = hd / 2;
    alignas(64) float s[FQ][FK];
    alignas(64) uint16_t p[FQ][FK];
    float corr[FQ];
    const uint32_t* qr[FQ];
    for (int r = 0; r < FQ; ++r) qr[r] = q32 + std::min(r, nr - 1) * hp;  // rows past nr repeat the last one
    for (int64_t kb = kb0; kb < kb1; kb += FK) {
        for (int r0 = 0; r0 < FQ; r0 += 4)
            for (int kc = 0; kc < FK; kc += 64) {
                const uint32_t* kg = kp + (kb + kc) / 16 * hp * 16;
                __m512 c[4][4];
                for (int r = 0; r < 4; ++r)
                    for (int j = 0; j < 4; ++j) c[r][j] = _mm512_setzero_ps();
                for (int64_t d = 0; d < hp; ++d) {
                    __m512bh k0 = bh(kg + d * 16), k1 = bh(kg + (hp + d) * 16), k2 = bh(kg + (2 * hp + d) * 16),
                             k3 = bh(kg + (3 * hp + d) * 16);
                    __asm__("" : "+v"(k0), "+v"(k1), "+v"(k2), "+v"(k3));  // as in pv_rows4
                    for (int r = 0; r < 4; ++r) {
                        const __m512bh qb = bh_set1(qr[r0 + r][d]);
                        c[r][0] = _mm512_dpbf16_ps(c[r][0], k0, qb);
                        c[r][1] = _mm512_dpbf16_ps(c[r][1], k1, qb);
                        c[r][2] = _mm512_dpbf16_ps(c[r][2], k2, qb);
                        c[r][3] = _mm512_dpbf16_ps(c[r][3], k3, qb);
                    }
                }
                for (int r = 0; r < 4; ++r)
                    for (int j = 0; j < 4; ++j) _mm512_store_ps(&s[r0 + r][kc + 16 * j], c[r][j]);
            }
        softmax_block<FQ>(s, int(std::min<int64_t>(FK, n - kb)), scale, m, l, corr, [&](int r, int j, __m512 e) {
            _mm256_store_si256((__m256i*)&p[r][j], (__m256i)_mm512_cvtneps_pbh(e));
        });
        const uint32_t* vb = vp + kb / 2 * hd;
        for (int r0 = 0; r0 < FQ; r0 += 4) {
            const uint32_t* p32 = reinterpret_cast<const uint32_t*>(&p[r0][0]);
            for (int64_t i0 = 0; i0 < hd; i0 += 64) {
                switch (std::min<int64_t>(4, (hd - i0) / 16)) {
                    case 4: pv_rows4<4>(p32, vb, hd, i0, corr + r0, acc + r0 * hd); break;
                    case 3: pv_rows4<3>(p32, vb, hd, i0, corr + r0, acc + r0 * hd); break;
                    case 2: pv_rows4<2>(p32, vb, hd, i0, corr + r0, acc + r0 * hd); break;
                    default: pv_rows4<1>(p32, vb, hd, i0, corr + r0, acc + r0 * hd); break;
                }
            }
        }
    }
}
#endif


// ---------------------------------------------------------------------------------------------
// The selective scan for training (jamba_core/train/scan.py): forward and backward, fp32, contiguous,
// from a zero state. Mamba paper eq. 2a/2b, per (batch i, channel c):
//   h_t = exp(delta_t A_c) h_{t-1} + delta_t B_t x_t,  y_t = C_t . h_t
// The lanes are the state index n (d_state <= 64: NV vectors of W lanes, lanes past N zero, so they stay 0).
// Backward: the recurrence's adjoint run in reverse, dh_{t-1} = exp(delta_t A) (dh_t + gy_t C_t), with the
// channel's forward states recomputed into a (L + 1) x N buffer (not stored by the forward).
// x, delta, gy, y, dx, ddelta: (b, d, L); A, dA: (d, N); B, C, dB, dC: (b, L, N).
//
// Decayed states and adjoints underflow towards zero over long spans; in subnormal range every multiply
// costs ~100x (a training run stalled in the backward once). They are flushed to zero on each thread while
// the kernel runs and the thread's mode is restored after: the calling thread is Python's, and a mode left
// set changed every later float operation of the process.
struct DenormalsFlushed {
#if defined(__SSE2__)
    unsigned int saved = _mm_getcsr();
    DenormalsFlushed() { _mm_setcsr(saved | 0x8040u); }  // flush-to-zero and denormals-are-zero
    ~DenormalsFlushed() { _mm_setcsr(saved); }
#endif
};

// the training scan (train_scan_fwd / train_scan_bwd below) instantiated for ceil(N / W) vectors per state:
// N <= MAX_N, so 1 .. MAX_N / W (4 with AVX-512, 8 with AVX, 16 with 4 lanes)
template <int NV = 1, typename F>
void by_nv(int64_t N, F f) {
    if constexpr (NV < MAX_N / W) {
        if (N > int64_t(NV) * W) return by_nv<NV + 1>(N, f);
    }
    f(std::integral_constant<int, NV>{});
}

inline int lanes(int64_t N, int k) { return int(std::min<int64_t>(W, N - int64_t(k) * W)); }

template <int NV>  // vectors per state: ceil(N / W)
void train_scan_fwd(int64_t b, int64_t d, int64_t L, int64_t N, const float* x, const float* delta, const float* A,
                    const float* B, const float* C, float* y, int nthreads) {
#pragma omp parallel num_threads(nthreads)
    {
        [[maybe_unused]] DenormalsFlushed flushed;
#pragma omp for collapse(2) schedule(static)
        for (int64_t i = 0; i < b; ++i)
            for (int64_t c = 0; c < d; ++c) {
                vf h[NV], a[NV];
                for (int k = 0; k < NV; ++k) h[k] = vf{}, a[k] = load(A + c * N + k * W, lanes(N, k));
                const float* xs = x + (i * d + c) * L;
                const float* ds = delta + (i * d + c) * L;
                float* ys = y + (i * d + c) * L;
                for (int64_t t = 0; t < L; ++t) {
                    const float* Bt = B + (i * L + t) * N;
                    const float* Ct = C + (i * L + t) * N;
                    const float dt = ds[t], dx = dt * xs[t];
                    vf acc = vf{};
                    for (int k = 0; k < NV; ++k) {
                        const int n = lanes(N, k);
                        h[k] = vexp(dt * a[k]) * h[k] + dx * load(Bt + k * W, n);
                        acc += load(Ct + k * W, n) * h[k];
                    }
                    ys[t] = hsum(acc);
                }
            }
    }
}

template <int NV>
void train_scan_bwd(int64_t b, int64_t d, int64_t L, int64_t N, const float* x, const float* delta, const float* A,
                    const float* B, const float* C, const float* gy, float* dx, float* ddelta, float* dA, float* dB,
                    float* dC, int nthreads) {
    const int64_t M = b * L * N;
    std::vector<std::vector<float>> part(nthreads, std::vector<float>(2 * M, 0.f));  // each thread's dB, dC
#pragma omp parallel num_threads(nthreads)
    {
        [[maybe_unused]] DenormalsFlushed flushed;
#ifdef _OPENMP
        float* pB = part[omp_get_thread_num()].data();
#else
        float* pB = part[0].data();
#endif
        float* pC = pB + M;
        std::vector<vf> hs((L + 1) * NV);  // hs[(t + 1) NV + k] = h_t, hs[k] = h_{-1} = 0
#pragma omp for schedule(static)
        for (int64_t c = 0; c < d; ++c) {
            vf a[NV], gA[NV];
            for (int k = 0; k < NV; ++k) a[k] = load(A + c * N + k * W, lanes(N, k)), gA[k] = vf{};
            for (int64_t i = 0; i < b; ++i) {
                const float* xs = x + (i * d + c) * L;
                const float* ds = delta + (i * d + c) * L;
                const float* gs = gy + (i * d + c) * L;
                for (int k = 0; k < NV; ++k) hs[k] = vf{};
                for (int64_t t = 0; t < L; ++t) {
                    const float* Bt = B + (i * L + t) * N;
                    const float dt = ds[t], u = dt * xs[t];
                    for (int k = 0; k < NV; ++k)
                        hs[(t + 1) * NV + k] = vexp(dt * a[k]) * hs[t * NV + k] + u * load(Bt + k * W, lanes(N, k));
                }
                vf dh[NV];
                for (int k = 0; k < NV; ++k) dh[k] = vf{};
                for (int64_t t = L - 1; t >= 0; --t) {
                    const int64_t o = (i * L + t) * N;
                    const float dt = ds[t], xt = xs[t], g = gs[t];
                    vf gdt = vf{}, gx = vf{};
                    for (int k = 0; k < NV; ++k) {
                        const int n = lanes(N, k);
                        const vf Bv = load(B + o + k * W, n), Cv = load(C + o + k * W, n);
                        const vf hp = hs[t * NV + k], hc = hs[(t + 1) * NV + k];
                        store(pC + o + k * W, load(pC + o + k * W, n) + g * hc, n);
                        const vf adj = dh[k] + g * Cv;  // dL/dh_t
                        const vf e = vexp(dt * a[k]);
                        const vf ah = adj * e * hp;
                        gdt += ah * a[k] + adj * Bv * xt;
                        gA[k] += ah * dt;
                        store(pB + o + k * W, load(pB + o + k * W, n) + adj * (dt * xt), n);
                        gx += adj * Bv;
                        dh[k] = adj * e;  // dL/dh_{t-1} through the recurrence
                    }
                    ddelta[(i * d + c) * L + t] = hsum(gdt);
                    dx[(i * d + c) * L + t] = hsum(gx) * dt;
                }
            }
            for (int k = 0; k < NV; ++k) store(dA + c * N + k * W, gA[k], lanes(N, k));
        }
    }
    for (int64_t m = 0; m < M; ++m) {
        float sb = 0.f, sc = 0.f;
        for (int p = 0; p < nthreads; ++p) sb += part[p][m], sc += part[p][M + m];
        dB[m] = sb, dC[m] = sc;
    }
}

}  // namespace

extern "C" {

int jl_version() { return 1; }

// what this build was compiled with (its flags and the CPU's): the vector lanes W in bits 8-15, and bit 0
// AVX-512F (the fp32 flash kernel), bit 1 AVX512-BF16 (VDPBF16PS: bf16 GEMVs, the bf16 flash kernel), bit 2
// AVX512-VNNI (int8 GEMVs)
int jl_features() {
    int f = W << 8;
#if defined(__AVX512F__)
    f |= 1;
#endif
    if (HAS_DPBF16) f |= 2;
    if (HAS_VNNI) f |= 4;
    return f;
}

// the bf16 GEMVs' row streams per thread (see bf16_streams): 1 or NS; other values keep the setting. Returns it.
int jl_set_bf16_streams(int streams) {
    if (streams == 1 || streams == NS) bf16_streams = streams;
    return bf16_streams;
}

// delta: fp32 (ddtype 0) or bf16 (1); with dt_bias / softplus, delta is the raw dt_proj output and the
// kernel applies softplus(delta + dt_bias) itself (one pass fewer over a (b, L, d) fp32 tensor).
void jl_scan(int dtype, int ddtype, int64_t b, int64_t L, int64_t d, int64_t N, const void* x, int64_t sxb, int64_t sxt,
             const void* z, int64_t szb, int64_t szt, const void* dl, int64_t sdb, int64_t sdt, const float* dt_bias,
             int softplus, const float* At, const float* B, const float* C, const float* D, float* state, float* y,
             int nthreads) {
#define JL_ARGS(T, TD) b, L, d, N, (const T*)x, sxb, sxt, (const T*)z, szb, szt, (const TD*)dl, sdb, sdt, dt_bias, softplus, At, B, C, D, state, y, nthreads
    if (dtype == 1 && ddtype == 1) scan<bf16, bf16>(JL_ARGS(bf16, bf16));
    else if (dtype == 1) scan<bf16, float>(JL_ARGS(bf16, float));
    else if (ddtype == 1) scan<float, bf16>(JL_ARGS(float, bf16));
    else scan<float, float>(JL_ARGS(float, float));
#undef JL_ARGS
}

void jl_conv(int dtype, int64_t b, int64_t L, int64_t d, int64_t K, const void* x, int64_t sxb, int64_t sxt, void* state,
             const float* wT, const float* bias, void* out, int silu, int nthreads) {
    if (dtype == 1)
        conv<bf16>(b, L, d, K, (const bf16*)x, sxb, sxt, (bf16*)state, wT, bias, (bf16*)out, silu, nthreads);
    else
        conv<float>(b, L, d, K, (const float*)x, sxb, sxt, (float*)state, wT, bias, (float*)out, silu, nthreads);
}

void jl_gemv(int dtype, int64_t M, int64_t N, int64_t K, const void* x, int64_t sx, const void* w, const void* bias,
             void* y, int nthreads) {
    if (dtype == 1 && K % 2 == 0 && !HAS_DPBF16)
        gemv_bf16_pairs(M, N, K, (const bf16*)x, sx, (const bf16*)w, (const bf16*)bias, (bf16*)y, nthreads);
    else if (dtype == 1)
        gemv<bf16, bf16>(M, N, K, (const bf16*)x, sx, (const bf16*)w, (const bf16*)bias, nullptr, (bf16*)y, nthreads);
    else
        gemv<float, float>(M, N, K, (const float*)x, sx, (const float*)w, (const float*)bias, nullptr, (float*)y, nthreads);
}

void jl_gemv_i8(int dtype, int64_t M, int64_t N, int64_t K, const void* x, int64_t sx, const int8_t* w, const float* scale,
                void* y, int nthreads) {
    if (dtype == 1)
        gemv<bf16, int8_t>(M, N, K, (const bf16*)x, sx, w, nullptr, scale, (bf16*)y, nthreads);
    else
        gemv<float, int8_t>(M, N, K, (const float*)x, sx, w, nullptr, scale, (float*)y, nthreads);
}

// wtype: 0 = fp32, 1 = bf16 (the activations' dtype), 2 = int8 with row scales; router null: a dense MLP
void jl_ffn_decode(int dtype, int wtype, int64_t ntok, int64_t H, int64_t I, int64_t E, int64_t topk, const void* x,
                   int64_t sx, const void* router, const void* const* wg, const float* const* sg, const void* const* wu,
                   const float* const* su, const void* const* wd, const float* const* sd, void* out, int nthreads) {
#define JL_FFN(T, TW) ffn_decode<T, TW>(ntok, H, I, E, topk, (const T*)x, sx, (const T*)router, (const TW* const*)wg, sg, \
                                        (const TW* const*)wu, su, (const TW* const*)wd, sd, (T*)out, nthreads)
    if (dtype == 1 && wtype == 2) JL_FFN(bf16, int8_t);
    else if (dtype == 1) JL_FFN(bf16, bf16);
    else if (wtype == 2) JL_FFN(float, int8_t);
    else JL_FFN(float, float);
#undef JL_FFN
}

void jl_rmsnorm(int dtype, int wdtype, int64_t rows, int64_t n, const void* x, int64_t sx, const void* w, float eps,
                void* out, int nthreads) {
    if (dtype == 1 && wdtype == 1)
        rmsnorm<bf16, bf16>(rows, n, (const bf16*)x, sx, (const bf16*)w, eps, (bf16*)out, nthreads);
    else if (dtype == 1)
        rmsnorm<bf16, float>(rows, n, (const bf16*)x, sx, (const float*)w, eps, (bf16*)out, nthreads);
    else if (wdtype == 1)
        rmsnorm<float, bf16>(rows, n, (const float*)x, sx, (const bf16*)w, eps, (float*)out, nthreads);
    else
        rmsnorm<float, float>(rows, n, (const float*)x, sx, (const float*)w, eps, (float*)out, nthreads);
}

void jl_mamba_decode(int dtype, int64_t b, int64_t d, int64_t N, int64_t R, int64_t K, const void* xz, int64_t sxz,
                     void* conv_state, const float* wT, const float* conv_b, const void* xw, const void* dtn,
                     const void* bn, const void* cn, float eps, const void* dtw, const float* dt_bias, const float* A,
                     const float* D, float* ssm, float* y, int nthreads) {
    if (dtype == 1)
        mamba_decode<bf16>(b, d, N, R, K, (const bf16*)xz, sxz, (bf16*)conv_state, wT, conv_b, (const bf16*)xw,
                           (const bf16*)dtn, (const bf16*)bn, (const bf16*)cn, eps, (const bf16*)dtw, dt_bias, A, D, ssm, y,
                           nthreads);
    else
        mamba_decode<float>(b, d, N, R, K, (const float*)xz, sxz, (float*)conv_state, wT, conv_b, (const float*)xw,
                            (const float*)dtn, (const float*)bn, (const float*)cn, eps, (const float*)dtw, dt_bias, A, D,
                            ssm, y, nthreads);
}


// The pieces both decoder-layer kernels share: T <-> fp32 row copies, and the feed-forward half of a
// layer, x_out += ffn(norm2(x_out)), as the unfused path runs it (norm in fp32, rounded to T).
static void rows_to_dtype(int dtype, const float* src, void* dst, int64_t n) {
    if (dtype == 1)
        for (int64_t i = 0; i < n; ++i) ((bf16*)dst)[i] = f_to_bf16(src[i]);
    else
        std::memcpy(dst, src, n * sizeof(float));
}

// n values from dtype `from` to dtype `to` (0 fp32, 1 bf16; round to nearest even): a K/V row into a cache of
// another dtype than the model's (kv_cache_dtype)
static void copy_row(int from, const void* src, int to, void* dst, int64_t n) {
    if (from == 0) rows_to_dtype(to, (const float*)src, dst, n);
    else if (to == 1) std::memcpy(dst, src, n * 2);
    else for (int64_t i = 0; i < n; ++i) ((float*)dst)[i] = bf16_to_f(((const bf16*)src)[i]);
}

static void add_rows(int dtype, const float* base, const void* h, float* out, int64_t n) {
    for (int64_t i = 0; i < n; ++i) out[i] = base[i] + (dtype == 1 ? bf16_to_f(((const bf16*)h)[i]) : ((const float*)h)[i]);
}

static void ffn_half(int dtype, int wtype, int64_t b, int64_t H, int64_t I, int64_t E, int64_t topk, float* x_out,
                     const void* ln2, float eps, const void* router, const void* const* wg, const float* const* sg,
                     const void* const* wu, const float* const* su, const void* const* wd, const float* const* sd,
                     int nthreads) {
    const int64_t es = dtype == 1 ? 2 : 4;
    std::vector<float> nf(b * H);
    std::vector<char> hn(b * H * es), ho(b * H * es);
    jl_rmsnorm(0, dtype, b, H, x_out, H, ln2, eps, nf.data(), 1);
    rows_to_dtype(dtype, nf.data(), hn.data(), b * H);
    jl_ffn_decode(dtype, wtype, b, H, I, E, topk, hn.data(), H, router, wg, sg, wu, su, wd, sd, ho.data(), nthreads);
    add_rows(dtype, x_out, ho.data(), x_out, b * H);
}

// A whole Mamba decoder layer for b sequences of one token each (model.jamba.DecoderLayer, L = 1):
// x_out = x + out_proj(mixer(in_proj(norm1(x)))), then x_out += ffn(norm2(x_out)). The pieces are the
// kernels above, called as the unfused path calls them, with the same roundings (norm outputs fp32, then
// rounded to the weight dtype T; the mixer's y rounded to T before out_proj; sublayer outputs back to
// fp32 for the residual adds), so the result is the same bit for bit. x, x_out: (b, H) fp32. Weights as
// in jl_gemv, jl_mamba_decode and jl_ffn_decode (wtype: the feed-forward's weight type); s_in / s_out
// non-null: in_proj / out_proj are int8 with those fp32 row scales (jl_gemv_i8, no bias).
void jl_mamba_layer_decode(int dtype, int wtype, int64_t b, int64_t H, int64_t d, int64_t N, int64_t R, int64_t K,
                           int64_t I, int64_t E, int64_t topk, const float* x, float* x_out, const void* ln1, float eps,
                           const void* w_in, const void* b_in, const float* s_in, void* conv_state, const float* wT,
                           const float* conv_b, const void* xw, const void* dtn, const void* bn, const void* cn, float eps_dt,
                           const void* dtw, const float* dt_bias, const float* A, const float* D, float* ssm,
                           const void* w_out, const void* b_out, const float* s_out, const void* ln2, const void* router, const void* const* wg,
                           const float* const* sg, const void* const* wu, const float* const* su, const void* const* wd,
                           const float* const* sd, int nthreads, int mamba_threads) {
    const int64_t es = dtype == 1 ? 2 : 4;
    std::vector<float> nf(b * H), y(b * d);
    std::vector<char> hn(b * H * es), xz(b * 2 * d * es), yt(b * d * es), ho(b * H * es);
    jl_rmsnorm(0, dtype, b, H, x, H, ln1, eps, nf.data(), 1);
    rows_to_dtype(dtype, nf.data(), hn.data(), b * H);
    if (s_in) jl_gemv_i8(dtype, b, 2 * d, H, hn.data(), H, (const int8_t*)w_in, s_in, xz.data(), nthreads);
    else jl_gemv(dtype, b, 2 * d, H, hn.data(), H, w_in, b_in, xz.data(), nthreads);
    jl_mamba_decode(dtype, b, d, N, R, K, xz.data(), 2 * d, conv_state, wT, conv_b, xw, dtn, bn, cn, eps_dt, dtw, dt_bias,
                    A, D, ssm, y.data(), mamba_threads);
    rows_to_dtype(dtype, y.data(), yt.data(), b * d);
    if (s_out) jl_gemv_i8(dtype, b, H, d, yt.data(), d, (const int8_t*)w_out, s_out, ho.data(), nthreads);
    else jl_gemv(dtype, b, H, d, yt.data(), d, w_out, b_out, ho.data(), nthreads);
    add_rows(dtype, x, ho.data(), x_out, b * H);
    ffn_half(dtype, wtype, b, H, I, E, topk, x_out, ln2, eps, router, wg, sg, wu, su, wd, sd, nthreads);
}

// A whole attention decoder layer for b sequences of one token each, no padding (model.jamba.DecoderLayer
// and model.attention.Attention, L = 1): q, k, v GEMVs of norm1(x); k, v written at position `pos` of the
// cache (b, kv, capacity, hd; strides sb, sh in elements); each query head attends over the pos + 1
// cached keys of its KV head (query heads j*g .. j*g+g-1 use KV head j; scale hd^-0.5; scores, softmax and
// the weighted sum in fp32, the keys split across threads, each with its own running max and sum, merged
// by their log-sum-exp as flash-decoding does); output rounded to T, o_proj, residual add; then the
// feed-forward half. Equal to scaled_dot_product_attention within float rounding, not bit for bit.
void jl_attn_layer_decode(int dtype, int wtype, int kvtype, int64_t b, int64_t H, int64_t nh, int64_t nkv, int64_t hd, int64_t pos,
                          int64_t I, int64_t E, int64_t topk, const float* x, float* x_out, const void* ln1, float eps,
                          const void* wq, const void* wk, const void* wv, const void* wo, void* kc, void* vc,
                          int64_t sb, int64_t sh, const void* ln2, const void* router, const void* const* wg,
                          const float* const* sg, const void* const* wu, const float* const* su, const void* const* wd,
                          const float* const* sd, int nthreads) {
    const int64_t es = dtype == 1 ? 2 : 4, kes = kvtype == 1 ? 2 : 4, g = nh / nkv, S = pos + 1;
    std::vector<float> nf(b * H), of(b * nh * hd);
    std::vector<char> hn(b * H * es), q(b * nh * hd * es), k(b * nkv * hd * es), v(b * nkv * hd * es),
        o(b * nh * hd * es), ho(b * H * es);
    jl_rmsnorm(0, dtype, b, H, x, H, ln1, eps, nf.data(), 1);
    rows_to_dtype(dtype, nf.data(), hn.data(), b * H);
    jl_gemv(dtype, b, nh * hd, H, hn.data(), H, wq, nullptr, q.data(), nthreads);
    jl_gemv(dtype, b, nkv * hd, H, hn.data(), H, wk, nullptr, k.data(), nthreads);
    jl_gemv(dtype, b, nkv * hd, H, hn.data(), H, wv, nullptr, v.data(), nthreads);
    for (int64_t bi = 0; bi < b; ++bi)
        for (int64_t j = 0; j < nkv; ++j) {
            const int64_t dst = (bi * sb + j * sh + pos * hd) * kes, src = (bi * nkv + j) * hd * es;
            copy_row(dtype, k.data() + src, kvtype, (char*)kc + dst, hd);
            copy_row(dtype, v.data() + src, kvtype, (char*)vc + dst, hd);
        }
    const float scale = 1.0f / std::sqrt(float(hd));
    const int nt = S < 256 ? 1 : nthreads;
    std::vector<float> qf(g * hd), m(nt * g), l(nt * g), acc(nt * g * hd);
    for (int64_t bi = 0; bi < b; ++bi)
        for (int64_t j = 0; j < nkv; ++j) {
            for (int64_t i = 0; i < g * hd; ++i) {
                const int64_t at = (bi * nh + j * g) * hd + i;
                qf[i] = dtype == 1 ? bf16_to_f(((const bf16*)q.data())[at]) : ((const float*)q.data())[at];
            }
            const int64_t base = bi * sb + j * sh;
            std::fill(m.begin(), m.end(), -INFINITY);  // every slot: a thread the runtime did not start adds nothing
            std::fill(l.begin(), l.end(), 0.0f);
            std::fill(acc.begin(), acc.end(), 0.0f);
#pragma omp parallel num_threads(nt)
            {
#ifdef _OPENMP
                const int t = omp_get_thread_num(), T = omp_get_num_threads();
#else
                const int t = 0, T = 1;
#endif
                const int64_t lo = S * t / T, hi = S * (t + 1) / T;
                float* mt = m.data() + t * g;
                float* lt = l.data() + t * g;
                float* at = acc.data() + t * g * hd;
                if (kvtype == 1)
                    attend_keys(qf.data(), (const bf16*)kc + base, (const bf16*)vc + base, lo, hi, g, hd, scale, mt, lt, at);
                else
                    attend_keys(qf.data(), (const float*)kc + base, (const float*)vc + base, lo, hi, g, hd, scale, mt, lt, at);
            }
            for (int64_t r = 0; r < g; ++r) {
                float mx = -INFINITY, total = 0.0f;
                for (int t = 0; t < nt; ++t) mx = std::max(mx, m[t * g + r]);
                float* out = of.data() + (bi * nh + j * g + r) * hd;
                for (int64_t i = 0; i < hd; ++i) out[i] = 0.0f;
                for (int t = 0; t < nt; ++t) {
                    if (l[t * g + r] == 0.0f) continue;  // a thread with no keys
                    const float w = std::exp(m[t * g + r] - mx);
                    total += l[t * g + r] * w;
                    for (int64_t i = 0; i < hd; ++i) out[i] += acc[(t * g + r) * hd + i] * w;
                }
                for (int64_t i = 0; i < hd; ++i) out[i] /= total;
            }
        }
    rows_to_dtype(dtype, of.data(), o.data(), b * nh * hd);
    jl_gemv(dtype, b, H, nh * hd, o.data(), nh * hd, wo, nullptr, ho.data(), nthreads);
    add_rows(dtype, x, ho.data(), x_out, b * H);
    ffn_half(dtype, wtype, b, H, I, E, topk, x_out, ln2, eps, router, wg, sg, wu, su, wd, sd, nthreads);
}

// Attention of R query rows per (batch, KV head) over S keys with no mask (chunked prefill's past part: the
// chunk's queries of a KV head's g query heads folded into R rows), q, k, v in dtype (0 fp32, 1 bf16; strides
// in elements for batch, head, row); out (B, NKV, R, hd) fp32 = softmax(scale q K^T) V and lse (B, NKV, R)
// fp32 = the log-sum-exp of the scaled scores. Returns 1, or 0 without touching out where this CPU lacks
// AVX-512 (bf16: AVX512-BF16) or hd is not a multiple of 16 up to FLASH_MAX_HD (the caller then runs torch's).
int jl_flash(int dtype, int64_t B, int64_t NKV, int64_t R, int64_t S, int64_t hd, const void* q, int64_t sqb, int64_t sqh,
             int64_t sqr, const void* k, int64_t skb, int64_t skh, int64_t sks, const void* v, int64_t svb, int64_t svh,
             int64_t svs, float scale, float* out, float* lse, int nthreads) {
#if defined(__AVX512F__)
    if (hd % 16 != 0 || hd > FLASH_MAX_HD || S <= 0 || R <= 0) return 0;
#define JL_FLASH_ARGS(T) q, sqb, sqh, sqr, (const T*)k, skb, skh, sks, (const T*)v, svb, svh, svs, scale, out, lse, nthreads
    if (dtype == 1) {
#if defined(__AVX512BF16__)
        flash_run<FQ, bf16, uint32_t>(B, NKV, R, S, hd, hd / 2, (const bf16*)JL_FLASH_ARGS(bf16), pack_kv, flash_tile);
        return 1;
#else
        return 0;
#endif
    }
    flash_run<FQ32, float, float>(B, NKV, R, S, hd, hd, (const float*)JL_FLASH_ARGS(float), pack_kv_f32, flash_tile_f32);
#undef JL_FLASH_ARGS
    return 1;
#else
    (void)dtype, (void)B, (void)NKV, (void)R, (void)S, (void)hd, (void)q, (void)sqb, (void)sqh, (void)sqr, (void)k, (void)skb;
    (void)skh, (void)sks, (void)v, (void)svb, (void)svh, (void)svs, (void)scale, (void)out, (void)lse, (void)nthreads;
    return 0;
#endif
}

void jl_train_scan_fwd(int64_t b, int64_t d, int64_t L, int64_t N, const float* x, const float* delta, const float* A,
                       const float* B, const float* C, float* y, int nthreads) {
    by_nv(N, [&](auto nv) { train_scan_fwd<decltype(nv)::value>(b, d, L, N, x, delta, A, B, C, y, nthreads); });
}

void jl_train_scan_bwd(int64_t b, int64_t d, int64_t L, int64_t N, const float* x, const float* delta, const float* A,
                       const float* B, const float* C, const float* gy, float* dx, float* ddelta, float* dA, float* dB,
                       float* dC, int nthreads) {
    by_nv(N, [&](auto nv) {
        train_scan_bwd<decltype(nv)::value>(b, d, L, N, x, delta, A, B, C, gy, dx, ddelta, dA, dB, dC, nthreads);
    });
}

}  // extern "C"
