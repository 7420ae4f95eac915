// Where do the blocks of W concurrent kernels (one per stream, B blocks each) land, and what does
// the direct two-shot model cost launched that way (one kernel per "rank") against one kernel?
#include <cuda_bf16.h>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <algorithm>
#define CK(x) do { cudaError_t e_ = (x); if (e_ != cudaSuccess) { printf("%s: %s\n", #x, cudaGetErrorString(e_)); exit(1); } } while (0)
struct alignas(16) V { unsigned x, y, z, w; };
struct Ptrs { V* p[8]; };
__device__ unsigned smid() { unsigned s; asm volatile("mov.u32 %0, %%smid;" : "=r"(s)); return s; }
__device__ unsigned long long gt() { unsigned long long t; asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); return t; }
__global__ void probe(int* out, int k) {
    if (threadIdx.x == 0) out[k * gridDim.x + blockIdx.x] = smid();
    const unsigned long long t0 = gt();
    while (gt() - t0 < 200000) {}
}
__device__ __forceinline__ void add(const V& v, float* acc) {
    const unsigned* u = &v.x;
#pragma unroll
    for (int k = 0; k < 4; k++) {
        float2 f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&u[k]));
        acc[2 * k] += f.x; acc[2 * k + 1] += f.y;
    }
}
__device__ __forceinline__ V pack(const float* acc) {
    V v; unsigned* u = &v.x;
#pragma unroll
    for (int k = 0; k < 4; k++) { __nv_bfloat162 h = __floats2bfloat162_rn(acc[2 * k], acc[2 * k + 1]); u[k] = *reinterpret_cast<unsigned*>(&h); }
    return v;
}
// rank < 0: one kernel of N*B blocks, block group r = rank r; else this launch is rank `rank`.
template <int N>
__global__ void __launch_bounds__(256, 4) direct(Ptrs in, size_t nvec, int B, int rank) {
    const int r = rank < 0 ? blockIdx.x / B : rank, b = rank < 0 ? blockIdx.x % B : blockIdx.x;
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
template <typename F>
float graph_us(cudaStream_t s0, F f) {
    for (int i = 0; i < 3; i++) f();
    CK(cudaStreamSynchronize(s0));
    cudaGraph_t g; cudaGraphExec_t ge;
    CK(cudaStreamBeginCapture(s0, cudaStreamCaptureModeGlobal));
    for (int i = 0; i < 10; i++) f();
    CK(cudaStreamEndCapture(s0, &g));
    CK(cudaGraphInstantiate(&ge, g, 0));
    cudaEvent_t a, b; CK(cudaEventCreate(&a)); CK(cudaEventCreate(&b));
    std::vector<float> t;
    for (int k = 0; k < 30; k++) {
        CK(cudaEventRecord(a, s0)); CK(cudaGraphLaunch(ge, s0)); CK(cudaEventRecord(b, s0)); CK(cudaEventSynchronize(b));
        float ms; CK(cudaEventElapsedTime(&ms, a, b)); t.push_back(ms * 100.f);
    }
    std::sort(t.begin(), t.end());
    return t[t.size() / 2];
}
template <int N>
void model(std::vector<cudaStream_t>& st, Ptrs in, int B) {
    cudaEvent_t fork, join[8];
    CK(cudaEventCreateWithFlags(&fork, cudaEventDisableTiming));
    for (int r = 0; r < N; r++) CK(cudaEventCreateWithFlags(&join[r], cudaEventDisableTiming));
    for (size_t bytes : {4u << 20, 8u << 20, 16u << 20}) {
        const size_t nvec = bytes / 16;
        float one = graph_us(st[0], [&] { direct<N><<<N * B, 256, 0, st[0]>>>(in, nvec, B, -1); });
        float per = graph_us(st[0], [&] {
            CK(cudaEventRecord(fork, st[0]));
            for (int r = 1; r < N; r++) CK(cudaStreamWaitEvent(st[r], fork, 0));
            for (int r = 0; r < N; r++) direct<N><<<B, 256, 0, st[r]>>>(in, nvec, B, r);
            for (int r = 1; r < N; r++) { CK(cudaEventRecord(join[r], st[r])); CK(cudaStreamWaitEvent(st[0], join[r], 0)); }
        });
        printf("model n=%d bytes=%zu B=%d: one kernel %.2f us, one kernel per rank on its stream %.2f us\n", N, bytes, B, one, per);
    }
}
int main() {
    std::vector<cudaStream_t> st(8);
    for (auto& s : st) CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    int* out; CK(cudaMalloc(&out, 8 * 256 * 4));
    int nsm; CK(cudaDeviceGetAttribute(&nsm, cudaDevAttrMultiProcessorCount, 0));
    for (int W : {2, 4, 8}) for (int B : {16, 32, 64}) {
        CK(cudaMemset(out, 0xff, 8 * 256 * 4));
        for (int k = 0; k < W; k++) probe<<<B, 256, 0, st[k]>>>(out, k);
        CK(cudaDeviceSynchronize());
        std::vector<int> h(W * B); CK(cudaMemcpy(h.data(), out, 4 * W * B, cudaMemcpyDeviceToHost));
        std::vector<int> per(nsm, 0); for (int s : h) if (s >= 0 && s < nsm) per[s]++;
        int used = 0, mx = 0; for (int c : per) { used += c > 0; mx = std::max(mx, c); }
        printf("placement W=%d B=%d (%d blocks on %d SMs): %d SMs used, at most %d blocks on one SM\n", W, B, W * B, nsm, used, mx);
    }
    Ptrs in;
    for (int p = 0; p < 8; p++) { CK(cudaMalloc(&in.p[p], 16u << 20)); CK(cudaMemset(in.p[p], 0x3c, 16u << 20)); }
    model<4>(st, in, 32); model<4>(st, in, 64); model<8>(st, in, 32); model<2>(st, in, 64);
    return 0;
}
