// Shared by the CPU kernel sources: how one call's work is shared out over threads.
#pragma once
#include <cstdint>

typedef int64_t i64;

// body(i, a, b) for every part i = [bounds[i], bounds[i + 1]) of a problem. The caller cuts the
// parts from the problem size alone and each part is computed the same way on any thread, so no
// result depends on the thread count. The parts run on an OpenMP team inside the call: with GNU
// OpenMP that is the runtime torch loaded, and its intra-op threads, still spinning after the
// last GEMM, take the parts at once (threads of our own would compete with them for the cores).
// Built without OpenMP the pragma is ignored and the parts run in order on the calling thread.
template <class Body>
static inline void for_parts(const i64* bounds, i64 nparts, int threads, Body body) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1 && nparts > 1)
    for (i64 i = 0; i < nparts; ++i) body(i, bounds[i], bounds[i + 1]);
}

// The count over all parts of what body(a, b) returns (bad values found, ...).
template <class Body>
static inline i64 count_parts(const i64* bounds, i64 nparts, int threads, Body body) {
    i64 total = 0;
    for_parts(bounds, nparts, threads, [&](i64, i64 a, i64 b) {
        const i64 n = body(a, b);
        if (n) {
#pragma omp atomic
            total += n;
        }
    });
    return total;
}

// The arguments that stand for the parts in every C entry point, and the parts' loop over them.
#define QK_PARTS const i64 *parts, i64 nparts, int threads
#define QK_EACH_PART(...) for_parts(parts, nparts, threads, [&](i64 part, i64 r0, i64 r1) __VA_ARGS__)
#define QK_COUNT_PARTS(...) count_parts(parts, nparts, threads, [&](i64 r0, i64 r1) __VA_ARGS__)
