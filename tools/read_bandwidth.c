// read_bandwidth.c: how fast this machine reads memory, the roofline of a decode step (which reads
// every weight it uses once). STREAM-like: sums a buffer of GB gigabytes, larger than any cache,
// with all threads (OpenMP), best of 5 passes. tools/bench_cpu.sh runs it.
//
//   gcc -O3 -march=native -fopenmp -o build/read_bandwidth tools/read_bandwidth.c
//   ./build/read_bandwidth [GB (default 4)]          (threads: OMP_NUM_THREADS, default all cores)
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <time.h>
#include <omp.h>

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
    double gb = argc > 1 ? atof(argv[1]) : 4.0;
    if (!(gb > 0 && gb < 1024)) { fprintf(stderr, "read_bandwidth: error: GB expects a number in (0, 1024)\n"); return 1; }
    size_t n = (size_t)(gb * 1e9) / sizeof(uint64_t);
    uint64_t *buf = malloc(n * sizeof(uint64_t));
    if (!buf) { fprintf(stderr, "read_bandwidth: error: cannot allocate %.1f GB\n", gb); return 1; }
    #pragma omp parallel for schedule(static)  // first touch by the threads that read it later
    for (size_t i = 0; i < n; i++) buf[i] = i;
    double best = 1e30;
    uint64_t check = 0;
    for (int pass = 0; pass < 5; pass++) {
        double t0 = now_s();
        uint64_t sum = 0;
        #pragma omp parallel for schedule(static) reduction(+:sum)
        for (size_t i = 0; i < n; i++) sum += buf[i];
        double t = now_s() - t0;
        if (t < best) best = t;
        check += sum;
    }
    printf("BENCH read_bandwidth GBps %.2f bytes %zu threads %d (check %llu)\n", n * sizeof(uint64_t) / best / 1e9,
           n * sizeof(uint64_t), omp_get_max_threads(), (unsigned long long)(check & 0xff));
    free(buf);
    return 0;
}
