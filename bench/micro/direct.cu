// Model of the direct two-shot on one GPU in one process: "rank" r is blocks [r*B, (r+1)*B) of one
// launch. Rank r reads shard r of every input, sums bf16 in fp32, stores the sum into shard r of
// every output. No barriers: the launch boundary stands in for them. Prints us per launch.
#include <cuda_bf16.h>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <algorithm>
struct alignas(16) V { unsigned x, y, z, w; };
struct Ptrs { V* p[8]; };

template <int HINT>
__device__ __forceinline__ V load(const V* a) {
    V v;
    if (HINT == 1) {
        asm volatile("ld.global.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(a));
    } else if (HINT == 2) {
        asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(a));
    } else {
        v = *a;
    }
    return v;
}
__device__ __forceinline__ void add(const V& v, float* acc) {
    const unsigned* u = &v.x;
#pragma unroll
    for (int k = 0; k < 4; k++) {
        __nv_bfloat162 h = *reinterpret_cast<const __nv_bfloat162*>(&u[k]);
        float2 f = __bfloat1622float2(h);
        acc[2 * k] += f.x;
        acc[2 * k + 1] += f.y;
    }
}
__device__ __forceinline__ V pack(const float* acc) {
    V v;
    unsigned* u = &v.x;
#pragma unroll
    for (int k = 0; k < 4; k++) {
        __nv_bfloat162 h = __floats2bfloat162_rn(acc[2 * k], acc[2 * k + 1]);
        u[k] = *reinterpret_cast<unsigned*>(&h);
    }
    return v;
}

template <int N, int UNROLL, int HINT, int ROT>
__global__ void direct(Ptrs in, Ptrs out, size_t nvec, int B) {
    const int r = blockIdx.x / B, b = blockIdx.x % B;
    const size_t base = nvec / N, s0 = r * base, s1 = s0 + base;
    const size_t tid = (size_t)b * blockDim.x + threadIdx.x, stride = (size_t)B * blockDim.x;
    for (size_t i = s0 + tid; i < s1; i += UNROLL * stride) {
        V v[UNROLL][N];
#pragma unroll
        for (int u = 0; u < UNROLL; u++)
            if (i + u * stride < s1)
#pragma unroll
                for (int p = 0; p < N; p++) v[u][p] = load<HINT>(in.p[p] + i + u * stride);
#pragma unroll
        for (int u = 0; u < UNROLL; u++) {
            if (i + u * stride >= s1) break;
            float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
#pragma unroll
            for (int p = 0; p < N; p++) add(v[u][p], acc);
            const V s = pack(acc);
#pragma unroll
            for (int p = 0; p < N; p++) out.p[ROT ? (p + r) % N : p][i + u * stride] = s;
        }
    }
}

// As `direct` (one vector per pass), the row of pointers read from device memory as tpcomm does,
// and tpcomm's register budget (four 256-thread blocks per SM).
template <int N>
__global__ void __launch_bounds__(256, 4) direct_row(const Ptrs* __restrict__ rd, size_t nvec, int B) {
    const Ptrs in = *rd;
    const int r = blockIdx.x / B, b = blockIdx.x % B;
    const size_t base = nvec / N, s0 = r * base, s1 = s0 + base;
    const size_t tid = (size_t)b * blockDim.x + threadIdx.x, stride = (size_t)B * blockDim.x;
    for (size_t i = s0 + tid; i < s1; i += stride) {
        V v[N];
#pragma unroll
        for (int p = 0; p < N; p++) v[p] = in.p[p][i];
        float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
#pragma unroll
        for (int p = 0; p < N; p++) add(v[p], acc);
        const V s = pack(acc);
#pragma unroll
        for (int p = 0; p < N; p++) in.p[p][i] = s;
    }
}

// The scratch two-shot's bytes for comparison is not modelled; a plain copy gives the ceiling.
__global__ void copy(const V* a, V* b, size_t nvec) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < nvec; i += (size_t)gridDim.x * blockDim.x) b[i] = a[i];
}

#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("%s: %s\n", #x, cudaGetErrorString(e)); exit(1); } } while (0)

template <typename F>
float time_us(F f, int iters) {
    cudaStream_t s;
    CK(cudaStreamCreate(&s));
    for (int i = 0; i < 3; i++) f(s);
    cudaGraph_t g;
    cudaGraphExec_t ge;
    CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
    for (int i = 0; i < 10; i++) f(s);
    CK(cudaStreamEndCapture(s, &g));
    CK(cudaGraphInstantiate(&ge, g, 0));
    cudaEvent_t a, b;
    CK(cudaEventCreate(&a));
    CK(cudaEventCreate(&b));
    std::vector<float> t;
    for (int k = 0; k < iters; k++) {
        CK(cudaEventRecord(a, s));
        CK(cudaGraphLaunch(ge, s));
        CK(cudaEventRecord(b, s));
        CK(cudaEventSynchronize(b));
        float ms;
        CK(cudaEventElapsedTime(&ms, a, b));
        t.push_back(ms * 100.f);  // per call of 10, in us
    }
    std::sort(t.begin(), t.end());
    CK(cudaGraphExecDestroy(ge));
    CK(cudaGraphDestroy(g));
    CK(cudaStreamDestroy(s));
    return t[t.size() / 2];
}

template <int N, int UNROLL, int HINT, int ROT>
void run(const char* name, size_t bytes, int threads, int B, bool inplace, Ptrs in, Ptrs out) {
    const size_t nvec = bytes / 16;
    Ptrs o = inplace ? in : out;
    float us = time_us([&](cudaStream_t s) { direct<N, UNROLL, HINT, ROT><<<N * B, threads, 0, s>>>(in, o, nvec, B); }, 30);
    CK(cudaGetLastError());
    const double tb = 2.0 * N * bytes / (us * 1e-6) / 1e12;
    printf("%-10s n=%d bytes=%zu %s threads=%d blocks/rank=%d unroll=%d hint=%d rot=%d: %.2f us (%.2f TB/s read+write)\n", name, N,
           bytes, inplace ? "ip " : "oop", threads, B, UNROLL, HINT, ROT, us, tb);
}

int main(int argc, char** argv) {
    const size_t maxb = 16u << 20;
    Ptrs in, out;
    for (int p = 0; p < 8; p++) {
        CK(cudaMalloc(&in.p[p], maxb));
        CK(cudaMalloc(&out.p[p], maxb));
        CK(cudaMemset(in.p[p], 0x3c, maxb));
    }
    const char* only = argc > 1 ? argv[1] : "";
    Ptrs* rd;
    CK(cudaMalloc(&rd, sizeof(Ptrs)));
    CK(cudaMemcpy(rd, &in, sizeof(Ptrs), cudaMemcpyHostToDevice));
    if (only[0] == 'r') {  // row mode: the model with its pointers in device memory, in place
        for (size_t bytes : {4u << 20, 8u << 20, 16u << 20}) {
            const size_t nvec = bytes / 16;
            float a = time_us([&](cudaStream_t s) { direct<4, 1, 0, 0><<<4 * 32, 256, 0, s>>>(in, in, nvec, 32); }, 30);
            float b = time_us([&](cudaStream_t s) { direct_row<4><<<4 * 32, 256, 0, s>>>(rd, nvec, 32); }, 30);
            float c = time_us([&](cudaStream_t s) { direct<8, 1, 0, 0><<<8 * 32, 256, 0, s>>>(in, in, nvec, 32); }, 30);
            float d = time_us([&](cudaStream_t s) { direct_row<8><<<8 * 32, 256, 0, s>>>(rd, nvec, 32); }, 30);
            printf("row mode bytes=%zu: n=4 params %.2f us, row in memory %.2f us; n=8 params %.2f, row %.2f\n", bytes, a, b, c, d);
        }
        return 0;
    }
    if (only[0] == 'n') {  // ncu mode: 8 MiB in place, 6 eager launches of each variant
        const size_t nvec = (8u << 20) / 16;
        for (int k = 0; k < 6; k++) direct<4, 1, 0, 0><<<4 * 32, 256>>>(in, in, nvec, 32);
        for (int k = 0; k < 6; k++) direct<4, 2, 1, 0><<<4 * 33, 512>>>(in, in, nvec, 33);
        for (int k = 0; k < 6; k++) copy<<<264, 512>>>(in.p[0], in.p[1], nvec * 4);
        CK(cudaDeviceSynchronize());
        return 0;
    }
    for (size_t bytes : {4u << 20, 8u << 20, 16u << 20}) {
        const size_t nvec = bytes / 16;
        float c = time_us([&](cudaStream_t s) { copy<<<264, 512, 0, s>>>(in.p[0], out.p[0], nvec); }, 30);
        printf("copy       bytes=%zu: %.2f us (%.2f TB/s read+write)\n", bytes, c, 2.0 * bytes / (c * 1e-6) / 1e12);
        for (bool ip : {true, false}) {
            // tpcomm today at 4 ranks: 32 blocks of 256, one vector per pass.
            run<4, 1, 0, 0>("today", bytes, 256, 32, ip, in, out);
            run<4, 2, 0, 0>("unroll2", bytes, 256, 32, ip, in, out);
            run<4, 4, 0, 0>("unroll4", bytes, 256, 32, ip, in, out);
            run<4, 1, 1, 0>("l2hint", bytes, 256, 32, ip, in, out);
            run<4, 2, 1, 0>("u2+hint", bytes, 256, 32, ip, in, out);
            run<4, 1, 0, 1>("rotate", bytes, 256, 32, ip, in, out);
            run<4, 1, 0, 0>("512x33", bytes, 512, 33, ip, in, out);
            run<4, 1, 0, 0>("256x64", bytes, 256, 64, ip, in, out);
            run<4, 2, 0, 0>("u2 512x33", bytes, 512, 33, ip, in, out);
            run<4, 2, 1, 0>("u2h 512x33", bytes, 512, 33, ip, in, out);
            run<8, 1, 0, 0>("today8", bytes, 256, 32, ip, in, out);
            run<8, 2, 0, 0>("unroll2_8", bytes, 256, 32, ip, in, out);
            run<8, 1, 1, 0>("l2hint8", bytes, 256, 32, ip, in, out);
            run<8, 1, 0, 0>("8 512x16", bytes, 512, 16, ip, in, out);
            run<2, 1, 0, 0>("today2", bytes, 256, 64, ip, in, out);
            run<2, 2, 0, 0>("unroll2_2", bytes, 256, 64, ip, in, out);
            run<2, 1, 1, 0>("l2hint2", bytes, 256, 64, ip, in, out);
        }
    }
    (void)only;
    return 0;
}
