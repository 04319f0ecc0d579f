// The fp32 and int8 GEMVs of jamba_core/ops/cpu_kernels.cpp built for aarch64 (NEON, 4 lanes) against a
// double-precision reference on fresh random inputs; tests/test_ops.py builds it with a cross compiler and
// runs it under qemu where both exist. Exit status: the number of shapes beyond the bound (fp32's 1e-5).
#include <cstdint>
#include <cstdio>
#include <cmath>
#include <random>
#include <vector>
extern "C" void jl_gemv_i8(int, int64_t, int64_t, int64_t, const void*, int64_t, const int8_t*, const float*, void*, int);
extern "C" void jl_gemv(int, int64_t, int64_t, int64_t, const void*, int64_t, const void*, const void*, void*, int);
int main() {
    std::mt19937 rng(0);
    std::uniform_int_distribution<int> qd(-127, 127);
    std::normal_distribution<float> nd;
    int bad = 0;
    const int64_t shapes[][3] = {{1, 100, 37}, {1, 4099, 512}, {3, 64, 1024}, {5, 7, 16}, {2, 33, 15}, {1, 1, 48}, {2, 5, 96}, {1, 9, 16384 + 160 + 37}};
    for (auto& sh : shapes) {
        const int64_t M = sh[0], N = sh[1], K = sh[2];
        std::vector<float> x(M * K), sc(N), y(M * N), yf(M * N), wf(N * K);
        std::vector<int8_t> w(N * K);
        for (auto& v : x) v = nd(rng);
        for (auto& v : w) v = int8_t(qd(rng));
        for (auto& v : sc) v = 0.001f + 0.02f * std::abs(nd(rng));
        for (int64_t i = 0; i < N * K; ++i) wf[i] = nd(rng);
        jl_gemv_i8(0, M, N, K, x.data(), K, w.data(), sc.data(), y.data(), 2);
        jl_gemv(0, M, N, K, x.data(), K, wf.data(), nullptr, yf.data(), 2);
        double e8 = 0, n8 = 0, ef = 0, nf = 0;
        for (int64_t m = 0; m < M; ++m)
            for (int64_t n = 0; n < N; ++n) {
                double r8 = 0, rf = 0;
                for (int64_t k = 0; k < K; ++k) r8 += double(x[m * K + k]) * w[n * K + k], rf += double(x[m * K + k]) * wf[n * K + k];
                r8 *= sc[n];
                e8 = std::max(e8, std::abs(r8 - y[m * N + n])), n8 = std::max(n8, std::abs(r8));
                ef = std::max(ef, std::abs(rf - yf[m * N + n])), nf = std::max(nf, std::abs(rf));
            }
        const bool ok = e8 / n8 < 1e-5 && ef / nf < 1e-5;
        bad += !ok;
        std::printf("M=%ld N=%ld K=%ld int8 rel %.2e fp32 rel %.2e %s\n", (long)M, (long)N, (long)K, e8 / n8, ef / nf, ok ? "ok" : "BAD");
    }
    return bad;
}
