// bench_tok.c: single-thread speed of dsv2's tokenizer.
//   gcc -O3 -march=native -o build/bench_tok tools/bench_tok.c -lm
//   ./build/bench_tok tokenizer.bin text.txt [repeats]
// prints: load_ms=... encode_MBps=... tokens=... bytes=...
#define DSV2_NO_MAIN
#include "../dsv2.c"

static double now(void) { struct timespec ts; clock_gettime(CLOCK_MONOTONIC, &ts); return ts.tv_sec + ts.tv_nsec * 1e-9; }

int main(int argc, char **argv) {
    if (argc < 3) die("usage: %s tokenizer.bin text.txt [repeats]", argv[0]);
    int repeats = argc > 3 ? atoi(argv[3]) : 3;
    Tokenizer t;
    double best_load = 1e9;
    for (int i = 0; i < 5; i++) {  // best of 5 (the file is in the page cache after the first)
        double t0 = now();
        tokenizer_load(&t, argv[1]);
        double dt = now() - t0;
        if (dt < best_load) best_load = dt;
        if (i < 4) tokenizer_free(&t);
    }
    FILE *f = fopen(argv[2], "rb");
    if (!f) die("cannot open %s", argv[2]);
    fseek(f, 0, SEEK_END); long len = ftell(f); rewind(f);
    char *text = malloc(len + 1);
    if (fread(text, 1, len, f) != (size_t)len) die("cannot read %s", argv[2]);
    fclose(f);
    double best = 1e9;
    int n_ids = 0;
    for (int r = 0; r < repeats; r++) {
        double t0 = now();
        int *ids = tokenizer_encode(&t, text, len, 0, &n_ids);
        double dt = now() - t0;
        if (dt < best) best = dt;
        free(ids);
    }
    printf("load_ms=%.2f encode_MBps=%.2f tokens=%d bytes=%ld\n", best_load * 1e3, len / 1e6 / best, n_ids, len);
    tokenizer_free(&t);
    return 0;
}
