// tpcomm's real twoshot_direct kernel, every "rank" in one process: rank r's launches go to stream r
// (a graph with one branch per rank, 10 calls per branch), buffers in one address space.
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <algorithm>
#include "portable.cuh"
#include "common.cuh"
#include "barrier.cuh"
#include "rms_norm.cuh"
#include "custom_allreduce.cu"

#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("%s: %s\n", #x, cudaGetErrorString(e)); exit(1); } } while (0)

int main(int argc, char** argv) {
    const int W = TPCOMM_WORLD;
    const int blocks = argc > 2 ? atoi(argv[2]) : 32;
    const size_t maxb = 16u << 20;
    std::vector<char*> buf(W), sig(W);
    Ptrs rows = {}, sigs = {};
    for (int r = 0; r < W; r++) {
        CK(cudaMalloc(&buf[r], maxb));
        CK(cudaMemset(buf[r], 0x3c, maxb));
        CK(cudaMalloc(&sig[r], sizeof(Signal)));
        CK(cudaMemset(sig[r], 0, sizeof(Signal)));
        rows.p[r] = (u64)buf[r];
        sigs.p[r] = (u64)sig[r];
    }
    Ptrs* rd;
    u64 *err, *fault;
    CK(cudaMalloc(&rd, sizeof(Ptrs)));
    CK(cudaMemcpy(rd, &rows, sizeof(Ptrs), cudaMemcpyHostToDevice));
    CK(cudaMalloc(&err, 8 * W));
    CK(cudaMemset(err, 0, 8 * W));
    CK(cudaMalloc(&fault, 8));
    CK(cudaMemset(fault, 0, 8));
    std::vector<cudaStream_t> st(W);
    for (auto& s : st) CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    cudaEvent_t fork, join[8];
    CK(cudaEventCreateWithFlags(&fork, cudaEventDisableTiming));
    for (int r = 0; r < W; r++) CK(cudaEventCreateWithFlags(&join[r], cudaEventDisableTiming));
    const size_t sizes[] = {2u << 20, 4u << 20, 8u << 20, 16u << 20};
    for (size_t bytes : sizes) {
        const u64 count = bytes / 2;
        auto launch_all = [&](int calls) {
            CK(cudaEventRecord(fork, st[0]));
            for (int r = 1; r < W; r++) CK(cudaStreamWaitEvent(st[r], fork, 0));
            for (int r = 0; r < W; r++)
                for (int c = 0; c < calls; c++)
                    twoshot_direct_bf16<<<blocks, TPCOMM_AR_THREADS, 0, st[r]>>>(
                        rd, 0, buf[r], rd, 0, sigs, sigs, buf[r], r, count, 5000000000ull, err + r, 7u, fault, 1ull,
                        nullptr, nullptr, nullptr, 0, 0.f, 0);
            for (int r = 1; r < W; r++) {
                CK(cudaEventRecord(join[r], st[r]));
                CK(cudaStreamWaitEvent(st[0], join[r], 0));
            }
        };
        launch_all(3);
        CK(cudaStreamSynchronize(st[0]));
        cudaGraph_t g;
        cudaGraphExec_t ge;
        CK(cudaStreamBeginCapture(st[0], cudaStreamCaptureModeGlobal));
        launch_all(10);
        CK(cudaStreamEndCapture(st[0], &g));
        CK(cudaGraphInstantiate(&ge, g, 0));
        cudaEvent_t a, b;
        CK(cudaEventCreate(&a));
        CK(cudaEventCreate(&b));
        std::vector<float> t;
        for (int k = 0; k < 30; k++) {
            CK(cudaEventRecord(a, st[0]));
            CK(cudaGraphLaunch(ge, st[0]));
            CK(cudaEventRecord(b, st[0]));
            CK(cudaEventSynchronize(b));
            float ms;
            CK(cudaEventElapsedTime(&ms, a, b));
            t.push_back(ms * 100.f);
        }
        std::sort(t.begin(), t.end());
        u64 ew[8];
        CK(cudaMemcpy(ew, err, 8 * W, cudaMemcpyDeviceToHost));
        u64 any = 0;
        for (int r = 0; r < W; r++) any |= ew[r];
        printf("real twoshot_direct %s n=%d bytes=%zu blocks=%d: %.2f us per call (median of 30 graphs of 10)%s\n",
               argc > 1 ? argv[1] : "", W, bytes, blocks, t[t.size() / 2], any ? "  ERROR WORD SET" : "");
        CK(cudaGraphExecDestroy(ge));
        CK(cudaGraphDestroy(g));
    }
    return 0;
}
