// The selective scan's forward and backward for training (jamba_core/train/scan.py), fp32, contiguous.
// Built by jamba_core.ops.cpu.build (g++ -O3 -march=native -fopenmp), called through ctypes.
//
// Forward, per channel (batch i, channel c), Mamba paper eq. 2a/2b (zero-order-hold A, Euler B):
//   h_t[n] = exp(delta_t A[n]) h_{t-1}[n] + delta_t B_t[n] x_t,   y_t = sum_n C_t[n] h_t[n]
// from h_{-1} = 0. Backward: the same recurrence run in reverse for dh (the adjoint),
//   dh_t += gy_t C_t ;  grads of delta_t, x_t, A, B_t from dh_t and h_{t-1} ;  dh_{t-1} = exp(delta_t A) dh_t
// recomputing the forward states of one channel (L x N floats, in cache) instead of storing them.
// Threads split the channels by c; dB and dC (shared by all channels) go to per-thread buffers.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#include <omp.h>
#if defined(__SSE2__)
#include <pmmintrin.h>
#include <xmmintrin.h>
#endif

// Decayed states and adjoints underflow towards zero over long spans; in subnormal range every multiply
// and exp costs ~100x (a training run stalled in the backward). Flush them to zero on this thread while
// the kernel runs, and restore the thread's mode after: the calling thread is Python's, and a mode left
// set changed every later float operation of the process (denormals read as zero; hypothesis refused
// to run in a test session that had trained first).
struct DenormalsFlushed {
#if defined(__SSE2__)
    unsigned int saved = _mm_getcsr();
    DenormalsFlushed() {
        _MM_SET_FLUSH_ZERO_MODE(_MM_FLUSH_ZERO_ON);
        _MM_SET_DENORMALS_ZERO_MODE(_MM_DENORMALS_ZERO_ON);
    }
    ~DenormalsFlushed() { _mm_setcsr(saved); }
#endif
};

extern "C" {

// x, delta: (b, d, L); A: (d, N); B, C: (b, L, N); y: (b, d, L)
void jl_scan_fwd(int64_t b, int64_t d, int64_t L, int64_t N, const float* x, const float* delta, const float* A,
                 const float* B, const float* C, float* y, int nthreads) {
#pragma omp parallel num_threads(nthreads)
    {
    DenormalsFlushed flushed;
#pragma omp for collapse(2) schedule(static)
    for (int64_t i = 0; i < b; ++i)
        for (int64_t c = 0; c < d; ++c) {
            float h[64] = {0};
            const float* xs = x + (i * d + c) * L;
            const float* ds = delta + (i * d + c) * L;
            const float* Ac = A + c * N;
            float* ys = y + (i * d + c) * L;
            for (int64_t t = 0; t < L; ++t) {
                const float* Bt = B + (i * L + t) * N;
                const float* Ct = C + (i * L + t) * N;
                float dt = ds[t], dx = dt * xs[t], acc = 0.f;
                for (int64_t n = 0; n < N; ++n) {
                    h[n] = std::exp(dt * Ac[n]) * h[n] + dx * Bt[n];
                    acc += Ct[n] * h[n];
                }
                ys[t] = acc;
            }
        }
    }
}

// gy: (b, d, L) grad of y. Outputs (overwritten): dx, ddelta (b, d, L); dA (d, N); dB, dC (b, L, N).
void jl_scan_bwd(int64_t b, int64_t d, int64_t L, int64_t N, const float* x, const float* delta, const float* A,
                 const float* B, const float* C, const float* gy, float* dx, float* ddelta, float* dA, float* dB,
                 float* dC, int nthreads) {
    std::memset(dA, 0, sizeof(float) * d * N);
    std::vector<std::vector<float>> part(nthreads, std::vector<float>(2 * b * L * N, 0.f));
#pragma omp parallel num_threads(nthreads)
    {
        DenormalsFlushed flushed;
        int tid = omp_get_thread_num();
        float* pB = part[tid].data();
        float* pC = pB + b * L * N;
        std::vector<float> hs((L + 1) * N);
#pragma omp for schedule(static)
        for (int64_t c = 0; c < d; ++c) {
            const float* Ac = A + c * N;
            float dAc[64] = {0};
            for (int64_t i = 0; i < b; ++i) {
                const float* xs = x + (i * d + c) * L;
                const float* ds = delta + (i * d + c) * L;
                const float* gs = gy + (i * d + c) * L;
                std::fill(hs.begin(), hs.begin() + N, 0.f);  // hs[t+1] = h_t, hs[0] = h_{-1} = 0
                for (int64_t t = 0; t < L; ++t) {
                    const float* Bt = B + (i * L + t) * N;
                    float dt = ds[t], u = dt * xs[t];
                    for (int64_t n = 0; n < N; ++n) hs[(t + 1) * N + n] = std::exp(dt * Ac[n]) * hs[t * N + n] + u * Bt[n];
                }
                float dh[64] = {0};
                for (int64_t t = L - 1; t >= 0; --t) {
                    const float* Bt = B + (i * L + t) * N;
                    const float* Ct = C + (i * L + t) * N;
                    float* gB = pB + (i * L + t) * N;
                    float* gC = pC + (i * L + t) * N;
                    float dt = ds[t], xt = xs[t], g = gs[t], gdt = 0.f, gx = 0.f;
                    const float* hp = &hs[t * N];       // h_{t-1}
                    const float* hc = &hs[(t + 1) * N]; // h_t
                    for (int64_t n = 0; n < N; ++n) {
                        gC[n] += g * hc[n];
                        float a = dh[n] + g * Ct[n];    // dL/dh_t
                        float e = std::exp(dt * Ac[n]);
                        float ah = a * e * hp[n];
                        gdt += ah * Ac[n] + a * Bt[n] * xt;
                        dAc[n] += ah * dt;
                        gB[n] += a * dt * xt;
                        gx += a * dt * Bt[n];
                        dh[n] = a * e;                  // dL/dh_{t-1} through the recurrence
                    }
                    ddelta[(i * d + c) * L + t] = gdt;
                    dx[(i * d + c) * L + t] = gx;
                }
            }
            for (int64_t n = 0; n < N; ++n) dA[c * N + n] = dAc[n];
        }
    }
    const int64_t M = b * L * N;
    for (int64_t k = 0; k < M; ++k) {
        float sb = 0.f, sc = 0.f;
        for (int tdx = 0; tdx < nthreads; ++tdx) { sb += part[tdx][k]; sc += part[tdx][M + k]; }
        dB[k] = sb;
        dC[k] = sc;
    }
}

}  // extern "C"
