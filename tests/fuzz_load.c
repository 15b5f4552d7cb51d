// fuzz_load.c: corrupt model and tokenizer files through the whole of dsv2, in-process, under
// AddressSanitizer + UBSan (make fuzz-quick / make fuzz; tests/tokenizer.mk builds it):
//   ./build/fuzz_load SECONDS MODEL TOKENIZER [MODEL TOKENIZER ...]
//   ./build/fuzz_load --case N MODEL TOKENIZER ...     re-runs case N alone, saying what it does
// Each case changes one model file or one tokenizer file: a header field or config value set to
// 0, -1, INT_MAX, a huge or a random value, a float to NaN or inf (and, half the time, the file
// cut or grown to the size the new config needs, so the forward pass runs on it), one entry of
// one of the tokenizer's tables, a truncation or an extension, NaN / inf weights, random bytes.
// Then dsv2's own main() runs on it: a few tokens of generate, a scripted chat, ppl, a trace,
// encode or decode. A case passes when main returns or ends with one "dsv2: ..." line on stderr;
// a sanitizer report, a crash or a case that takes over 10 s of CPU time or 300 s in all (a hang)
// stops the fuzzer, which saves the changed file as build/fuzz_fail.bin and prints the case number.
#define _GNU_SOURCE  // memfd_create
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>
#include <setjmp.h>
#include <signal.h>
#include <fcntl.h>
#include <unistd.h>
#include <time.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sanitizer/common_interface_defs.h>

// ---------------- What dsv2.c calls, redirected
// dsv2.c ends a run with exit() (die(), usage errors) and frees its memory, maps and files on
// its success paths only, as a program may. Here exit() jumps back to the fuzzer, and every
// allocation, map, descriptor and FILE is listed so that the fuzzer releases what a case left.
// stdin (chat's turns) and stderr (the error line a case ends with) are streams of the fuzzer.

typedef struct { void *p; size_t len; int kind; } Held;  // kind: 0 memory, 1 map, 2 fd, 3 FILE
static Held held[1 << 16];
static int n_held;
static jmp_buf *fz_jump;  // where exit() returns to
static int fz_status;     // the status exit() was called with
static FILE *fz_stdin, *fz_stderr;

static void hold(void *p, size_t len, int kind) {
    if (n_held == (int)(sizeof held / sizeof *held)) { fprintf(stderr, "fuzz_load: too many live objects\n"); abort(); }
    held[n_held++] = (Held){p, len, kind};
}
static void unhold(void *p, int kind) {  // the latest first: what is freed was mostly just made
    for (int i = n_held - 1; i >= 0; i--)
        if (held[i].p == p && held[i].kind == kind) { held[i] = held[--n_held]; return; }
}
static void *fz_malloc(size_t n) { void *p = malloc(n); if (p) hold(p, 0, 0); return p; }
static void *fz_calloc(size_t n, size_t size) { void *p = calloc(n, size); if (p) hold(p, 0, 0); return p; }
static void *fz_realloc(void *old, size_t n) {
    if (old) unhold(old, 0);
    void *p = realloc(old, n);
    hold(p ? p : old, 0, 0);
    return p;
}
static void fz_free(void *p) { if (p) unhold(p, 0); free(p); }
static char *fz_strdup(const char *s) { char *p = strdup(s); if (p) hold(p, 0, 0); return p; }
static ssize_t fz_getline(char **line, size_t *cap, FILE *f) {
    char *old = *line;
    ssize_t n = getline(line, cap, f);
    if (*line != old) { if (old) unhold(old, 0); hold(*line, 0, 0); }
    return n;
}
static void *fz_mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off) {
    void *p = mmap(addr, len, prot, flags, fd, off);
    if (p != MAP_FAILED) hold(p, len, 1);
    return p;
}
static int fz_munmap(void *p, size_t len) { unhold(p, 1); return munmap(p, len); }
static int fz_open(const char *path, int flags) { int fd = open(path, flags); if (fd >= 0) hold((void *)(intptr_t)fd, 0, 2); return fd; }
static int fz_close(int fd) { unhold((void *)(intptr_t)fd, 2); return close(fd); }
static FILE *fz_fopen(const char *path, const char *mode) { FILE *f = fopen(path, mode); if (f) hold(f, 0, 3); return f; }
static int fz_fclose(FILE *f) { if (f == fz_stderr) return 0; unhold(f, 3); return fclose(f); }
static void fz_exit(int status) __attribute__((noreturn));
static void fz_exit(int status) { fz_status = status; longjmp(*fz_jump, 1); }

// releases everything a case left behind
static void release_all(void) {
    while (n_held > 0) {
        Held h = held[--n_held];
        if (h.kind == 0) free(h.p);
        else if (h.kind == 1) munmap(h.p, h.len);
        else if (h.kind == 2) close((int)(intptr_t)h.p);
        else fclose((FILE *)h.p);
    }
}

#define malloc fz_malloc
#define calloc fz_calloc
#define realloc fz_realloc
#define free fz_free
#define strdup fz_strdup
#define getline fz_getline
#define mmap fz_mmap
#define munmap fz_munmap
#define open fz_open
#define close fz_close
#define fopen fz_fopen
#define fclose fz_fclose
#define exit fz_exit
#undef stdin
#define stdin fz_stdin
#undef stderr
#define stderr fz_stderr
#define main dsv2_main
#pragma GCC diagnostic ignored "-Wunused-function"
#include "../dsv2.c"
#undef malloc
#undef calloc
#undef realloc
#undef free
#undef strdup
#undef getline
#undef mmap
#undef munmap
#undef open
#undef close
#undef fopen
#undef fclose
#undef exit
#undef stdin
#define stdin stdin
#undef stderr
#define stderr stderr
#undef main

// ---------------- Random choices (xorshift64*, seeded per case so that any case can be re-run)

static uint64_t rng;
static uint32_t rnd(uint32_t n) {
    rng ^= rng >> 12; rng ^= rng << 25; rng ^= rng >> 27;
    return n ? (uint32_t)((rng * 0x2545F4914F6CDD1Dull) >> 32) % n : 0;
}
static int32_t special_int(int32_t orig) {
    switch (rnd(14)) {
    case 0: return 0;
    case 1: return -1;
    case 2: return 1;
    case 3: return 2;
    case 4: return INT32_MAX;
    case 5: return INT32_MIN;
    case 6: return INT32_MAX - (int32_t)rnd(4);
    case 7: return 1 << (16 + rnd(15));
    case 8: return (int32_t)((uint32_t)orig + 1u);  // (unsigned: no overflow in the fuzzer itself)
    case 9: return (int32_t)((uint32_t)orig - 1u);
    case 10: return (int32_t)((uint32_t)orig * 2u);
    case 11: return orig / 2;
    case 12: return (int32_t)rnd(1u << 31);
    default: return (int32_t)rnd(64);
    }
}
static float special_float(void) {
    const float v[] = {NAN, INFINITY, -INFINITY, 0.0f, -1.0f, 1e38f, 1e-38f, 1e-45f, 0.5f, 2.0f, 1e6f};
    return v[rnd(sizeof v / sizeof *v)];
}

// ---------------- The inputs: a model and a tokenizer, pristine and as the case changes them

typedef struct { char *bytes; size_t len; } Buf;
typedef struct {
    Buf model, tok;
    const char *model_name, *tok_name;
    size_t tok_section[16][2]; int n_sections;  // (offset, bytes) of each table of the tokenizer file
    int tok_only;            // the tokenizer does not belong to the model: fuzz the tokenizer alone
} Pair;
static Buf mutated;                 // the file this case changed
static char what[256];              // what this case does, in words
static int scratch_fd[2];           // memfds holding the case's model and tokenizer
static char scratch_path[2][64];

static Buf read_buf(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) { fprintf(stderr, "fuzz_load: cannot open %s\n", path); exit(1); }
    fseek(f, 0, SEEK_END);
    Buf b = {NULL, (size_t)ftell(f)};
    fseek(f, 0, SEEK_SET);
    b.bytes = malloc(b.len);
    if (fread(b.bytes, 1, b.len, f) != b.len) { fprintf(stderr, "fuzz_load: cannot read %s\n", path); exit(1); }
    fclose(f);
    return b;
}

// where each table of a tokenizer file lies (offset, bytes), from the pointers tokenizer_load sets
static void find_sections(Pair *p) {
    Tokenizer t;
    jmp_buf jb;
    fz_jump = &jb;
    if (setjmp(jb)) { fprintf(stderr, "fuzz_load: %s does not load\n", p->tok_name); exit(1); }
    tokenizer_load(&t, p->tok_name);
    const char *base = (const char *)t.map;
    const void *at[] = {t.token_off, t.token_flags, t.token_blob, t.merges, t.byte_ids, t.added, t.class_off,
                        t.ranges, t.step_off, t.alt_off, t.atoms, t.chat[0]};
    int n = sizeof at / sizeof *at;
    p->tok_section[0][0] = 8; p->tok_section[0][1] = 4 * 14;  // the header's counts
    for (int i = 0; i < n; i++) {
        size_t start = (const char *)at[i] - base, end = i + 1 < n ? (size_t)((const char *)at[i + 1] - base) : t.map_size;
        p->tok_section[i + 1][0] = start;
        p->tok_section[i + 1][1] = end - start;
    }
    p->n_sections = n + 1;
    int32_t model_vocab;
    memcpy(&model_vocab, p->model.bytes + 8 + 4 * 4, 4);
    p->tok_only = t.vocab_size > model_vocab;
    tokenizer_free(&t);
    release_all();
}

static void buf_resize(Buf *b, size_t len, const Buf *fill) {
    b->bytes = realloc(b->bytes, len ? len : 1);
    for (size_t i = b->len; i < len; i++) b->bytes[i] = fill ? fill->bytes[i % fill->len] : (char)rnd(256);
    b->len = len;
}

// the size a model file with this header needs, or 0 if dsv2 refuses the header
static size_t model_size_for(const Buf *b) {
    Model m;
    memset(&m, 0, sizeof m);
    memcpy(&m.config, b->bytes + 8, sizeof(Config));
    jmp_buf jb;
    fz_jump = &jb;
    volatile size_t need = 0;
    if (!setjmp(jb)) { check_config(&m.config, "fuzz"); need = (size_t)map_weights(&m, NULL); }
    rewind(fz_stderr);
    return need;
}

static void mutate_model(const Pair *p) {
    Buf *b = &mutated;
    buf_resize(b, 0, NULL);
    buf_resize(b, p->model.len, &p->model);
    int kind = rnd(8), n_ints = 2 + 26;
    size_t weights = 256, span = b->len - weights;
    if (kind == 0 || kind == 1) {  // a header int: magic, version or a config value
        int k = rnd(n_ints);
        int32_t v, orig;
        memcpy(&orig, b->bytes + 4 * k, 4);
        v = special_int(orig);
        memcpy(b->bytes + 4 * k, &v, 4);
        snprintf(what, sizeof what, "model header int %d: %d -> %d", k, orig, v);
        size_t need = kind == 1 ? model_size_for(b) : 0;
        if (need && need <= (64u << 20) && need != b->len) {
            buf_resize(b, need, &p->model);
            snprintf(what + strlen(what), sizeof what - strlen(what), ", file resized to %zu", need);
        }
    } else if (kind == 2) {  // a header float
        int k = n_ints + rnd(9);
        float v = special_float();
        memcpy(b->bytes + 4 * k, &v, 4);
        snprintf(what, sizeof what, "model header float %d -> %g", k - n_ints, v);
    } else if (kind == 3) {  // truncated, often inside the header
        size_t len = rnd(3) ? rnd(300) : rnd((uint32_t)b->len);
        buf_resize(b, len, NULL);
        snprintf(what, sizeof what, "model truncated to %zu bytes", len);
    } else if (kind == 4) {  // extended
        size_t extra = 1 + rnd(rnd(2) ? 8 : 100000);
        buf_resize(b, b->len + extra, NULL);
        snprintf(what, sizeof what, "model extended by %zu bytes", extra);
    } else if (kind == 5 || kind == 6) {  // NaN / inf / huge weights
        int bf16 = b->bytes[8] == 1, n = 1 + rnd(kind == 5 ? 3 : 300);
        for (int i = 0; i < n; i++) {
            float v = special_float();
            uint32_t u; memcpy(&u, &v, 4);
            size_t at = weights + (rnd((uint32_t)span) & ~(size_t)(bf16 ? 1 : 3));
            if (bf16) { uint16_t h = u >> 16; memcpy(b->bytes + at, &h, 2); }
            else memcpy(b->bytes + at, &u, 4);
        }
        snprintf(what, sizeof what, "model: %d weights set to NaN / inf / extremes", n);
    } else {  // random bytes anywhere
        int n = 1 + rnd(16);
        for (int i = 0; i < n; i++) b->bytes[rnd(rnd(2) ? 256 : (uint32_t)b->len)] = (char)rnd(256);
        snprintf(what, sizeof what, "model: %d random bytes", n);
    }
}

static void mutate_tok(const Pair *p) {
    Buf *b = &mutated;
    buf_resize(b, 0, NULL);
    buf_resize(b, p->tok.len, &p->tok);
    int kind = rnd(6);
    if (kind <= 2) {  // one entry of one table (the header's counts are section 0)
        int s = rnd(p->n_sections);
        size_t start = p->tok_section[s][0], bytes = p->tok_section[s][1];
        if (bytes < 4) { snprintf(what, sizeof what, "tokenizer: section %d is empty, unchanged", s); return; }
        size_t at = start + 4 * rnd((uint32_t)(bytes / 4));
        int32_t orig, v;
        memcpy(&orig, b->bytes + at, 4);
        v = special_int(orig);
        if (rnd(4) == 0) memcpy(&v, b->bytes + start + 4 * rnd((uint32_t)(bytes / 4)), 4);  // another entry's value
        memcpy(b->bytes + at, &v, 4);
        snprintf(what, sizeof what, "tokenizer section %d, byte %zu: %d -> %d", s, at, orig, v);
    } else if (kind == 3) {
        size_t len = rnd(3) ? rnd(100) : rnd((uint32_t)b->len);
        buf_resize(b, len, NULL);
        snprintf(what, sizeof what, "tokenizer truncated to %zu bytes", len);
    } else if (kind == 4) {
        size_t extra = 1 + rnd(rnd(2) ? 8 : 10000);
        buf_resize(b, b->len + extra, NULL);
        snprintf(what, sizeof what, "tokenizer extended by %zu bytes", extra);
    } else {
        int n = 1 + rnd(8);
        for (int i = 0; i < n; i++) b->bytes[rnd((uint32_t)b->len)] = (char)rnd(256);
        snprintf(what, sizeof what, "tokenizer: %d random bytes", n);
    }
}

static void write_scratch(int which, const Buf *b) {
    if (ftruncate(scratch_fd[which], 0) != 0 || pwrite(scratch_fd[which], b->bytes, b->len, 0) != (ssize_t)b->len) {
        fprintf(stderr, "fuzz_load: cannot write the scratch file\n");
        exit(1);
    }
}

// ---------------- One case: a mutated file, then one run of dsv2's main

static const char *texts[] = {
    "The jury said that the city", "def mean(values):\n    return sum(values) / len(values)", "a", "",
    "Hello, world! 123 \xc3\xbc\xe4\xb8\xad\xf0\x9f\x98\x80", "<\xef\xbd\x9c" "end\xe2\x96\x81of\xe2\x96\x81sentence\xef\xbd\x9c>",
    "   \n\n\t  spaces", "one two three four five six seven eight nine ten eleven twelve thirteen",
};
static const char *chats[] = {
    "hi\nhow are you?\n", "a\n\nb\nc\nd\ne\n", "\xff\xfe bad\nok\n", "tell me about the jury and the city\n"
    "and then the river\nand the tower\nand the sea\nthe end\n", "no newline at the end",
};

static char argv_store[32][96];
static char *case_argv[32];
static int case_argc;
static void arg(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void arg(const char *fmt, ...) {
    va_list ap; va_start(ap, fmt);
    vsnprintf(argv_store[case_argc], sizeof argv_store[0], fmt, ap);
    va_end(ap);
    case_argv[case_argc] = argv_store[case_argc];
    case_argc++;
}

static long case_number, n_ran;  // n_ran: cases that ran to the end (the others were refused)
static const char *fail_reason = "a sanitizer report";

static void save_failure(void) {
    FILE *f = fopen("build/fuzz_fail.bin", "wb");
    if (f) { fwrite(mutated.bytes, 1, mutated.len, f); fclose(f); }
    fprintf(stderr, "fuzz_load: case %ld failed (%s): %s; ran:", case_number, fail_reason, what);
    for (int i = 0; i < case_argc; i++) fprintf(stderr, " '%s'", case_argv[i]);
    fprintf(stderr, "\nfuzz_load: the changed file is build/fuzz_fail.bin; re-run with --case %ld\n", case_number);
}
// a hang: a case over 10 s of CPU time (SIGPROF), or 300 s of wall time when that is all it waits (SIGALRM)
static void on_alarm(int sig) {
    fail_reason = sig == SIGPROF ? "a hang: over 10 s of CPU time" : "a hang: over 300 s";
    save_failure();
    _exit(1);
}

static int run_case(Pair *pairs, int n_pairs, long number, int verbose) {
    rng = 0x9E3779B97F4A7C15ull * (uint64_t)(number + 1) ^ 0xD1B54A32D192ED03ull;
    for (int i = 0; i < 4; i++) rnd(2);
    case_number = number;
    Pair *p = &pairs[rnd(n_pairs)];
    int on_model = !p->tok_only && rnd(5) < 3;
    if (on_model) mutate_model(p); else mutate_tok(p);
    write_scratch(0, on_model ? &mutated : &p->model);
    write_scratch(1, on_model ? &p->tok : &mutated);
    case_argc = 0;
    arg("dsv2");
    int mode = p->tok_only ? rnd(2) : rnd(9);
    const char *text = texts[rnd(sizeof texts / sizeof *texts)];
    if (mode == 0) {  // encode
        arg("-m"); arg("encode"); arg("-z"); arg("%s", scratch_path[1]); arg("-i"); arg("%s", text[0] ? text : "x");
    } else if (mode == 1) {  // decode
        arg("-m"); arg("decode"); arg("-z"); arg("%s", scratch_path[1]); arg("-i");
        arg("%d %d %u %d", rnd(300), rnd(5000), rnd(110000), rnd(3) ? (int)rnd(10) : -1);
    } else {
        arg("%s", scratch_path[0]); arg("-z"); arg("%s", scratch_path[1]);
        if (mode == 2) {  // ppl
            arg("-m"); arg("ppl"); arg("-i"); arg("%s", text[0] ? text : "a b"); arg("--ctx"); arg("%d", 2 + rnd(12));
        } else if (mode == 3 || mode == 4) {  // chat, from a script on stdin
            arg("-m"); arg("chat"); arg("-n"); arg("%d", rnd(4)); arg("-t"); arg("0");
            if (rnd(2)) { arg("--ctx"); arg("%d", 2 + rnd(60)); }
            if (rnd(2)) { arg("-y"); arg("Be brief."); }
        } else {  // generate, sometimes traced
            if (rnd(20)) { arg("-i"); arg("%s", text); } else { arg("-f"); arg("/"); }  // (a directory)
            arg("-n"); arg("%d", rnd(4));
            const char *temps[] = {"0", "1", "0.8", "3e-38", "100"};
            const char *t = temps[rnd(5)];
            arg("-t"); arg("%s", t);
            if (strcmp(t, "0")) { arg("-s"); arg("1"); arg("-p"); arg("%s", rnd(2) ? "0.9" : "1e-6"); }
            if (mode >= 7) { arg("--trace"); arg(rnd(2) ? "-" : "/dev/null"); }
            if (mode == 8) { arg("--routing-out"); arg("/dev/null"); }
        }
        if (mode >= 2 && rnd(8) == 0) { arg("-a"); arg("naive"); }
        if (mode >= 2 && rnd(8) == 0) { const char *k[] = {"--no-shared", "--no-routed", "--no-yarn"}; arg("%s", k[rnd(3)]); }
    }
    const char *script = chats[rnd(sizeof chats / sizeof *chats)];
    fz_stdin = fmemopen((void *)script, strlen(script), "r");
    rewind(fz_stderr);
    if (verbose) {
        fprintf(stderr, "case %ld: %s; ran:", number, what);
        for (int i = 0; i < case_argc; i++) fprintf(stderr, " '%s'", case_argv[i]);
        fprintf(stderr, "\n");
    }
    jmp_buf jb;
    fz_jump = &jb;
    fz_status = 0;
    struct itimerval cpu_limit = {{0, 0}, {10, 0}}, off = {{0, 0}, {0, 0}};
    setitimer(ITIMER_PROF, &cpu_limit, NULL);
    alarm(300);
    if (!setjmp(jb)) fz_status = dsv2_main(case_argc, case_argv);
    alarm(0);
    setitimer(ITIMER_PROF, &off, NULL);
    fclose(fz_stdin);
    release_all();
    // the case ends cleanly, or with one line that says why: read back the end of its stderr
    static char err[1 << 16];
    long n = ftell(fz_stderr), from = n > (long)sizeof err - 1 ? n - (long)sizeof err + 1 : 0;
    fseek(fz_stderr, from, SEEK_SET);
    n = (long)fread(err, 1, n - from, fz_stderr);
    err[n] = 0;
    rewind(fz_stderr);
    if (verbose) fprintf(stderr, "exit status %d, stderr:\n%s", fz_status, err);
    if (fz_status == 0) { n_ran++; return 1; }
    char *last = err + (n > 1 ? n - 2 : 0);
    while (last > err && last[-1] != '\n') last--;
    if (fz_status != 1 || n == 0 || strncmp(last, "dsv2: ", 6) != 0 || err[n - 1] != '\n') {
        fail_reason = "no one-line error at exit";
        save_failure();
        fprintf(stderr, "fuzz_load: exit status %d, stderr ends with: %.300s\n", fz_status, last);
        return 0;
    }
    return 1;
}

int main(int argc, char **argv) {
    long only = -1;
    if (argc >= 3 && !strcmp(argv[1], "--case")) { only = atol(argv[2]); argv++; argc--; }  // N takes SECONDS' place
    if (argc < 4 || (argc - 2) % 2) {
        fprintf(stderr, "usage: %s SECONDS MODEL TOKENIZER [MODEL TOKENIZER ...]\n       %s --case N MODEL TOKENIZER ...\n", argv[0], argv[0]);
        return 1;
    }
    double seconds = atof(argv[1]);
    int n_pairs = (argc - 2) / 2;
    Pair *pairs = calloc(n_pairs, sizeof(Pair));
    FILE *report = fdopen(dup(1), "w");  // stdout itself goes to /dev/null: dsv2 prints the text there
    if (!freopen("/dev/null", "w", stdout)) return 1;
    fz_stderr = tmpfile();
    for (int i = 0; i < n_pairs; i++) {
        pairs[i].model_name = argv[2 + 2 * i];
        pairs[i].tok_name = argv[3 + 2 * i];
        pairs[i].model = read_buf(pairs[i].model_name);
        pairs[i].tok = read_buf(pairs[i].tok_name);
        find_sections(&pairs[i]);
    }
    for (int i = 0; i < 2; i++) {
        scratch_fd[i] = memfd_create(i ? "fuzz_tok" : "fuzz_model", 0);
        if (scratch_fd[i] < 0) { perror("memfd_create"); return 1; }
        snprintf(scratch_path[i], sizeof scratch_path[i], "/proc/self/fd/%d", scratch_fd[i]);
    }
    signal(SIGALRM, on_alarm);
    signal(SIGPROF, on_alarm);
    __sanitizer_set_death_callback(save_failure);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    long cases = 0, ok = 1;
    if (only >= 0) { ok = run_case(pairs, n_pairs, only, 1); seconds = 0; }
    for (double elapsed = 0; elapsed < seconds && ok; cases++) {
        ok = run_case(pairs, n_pairs, cases, 0);
        clock_gettime(CLOCK_MONOTONIC, &t1);
        elapsed = t1.tv_sec - t0.tv_sec + 1e-9 * (t1.tv_nsec - t0.tv_nsec);
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    __sanitizer_set_death_callback(NULL);
    for (int i = 0; i < n_pairs; i++) { free(pairs[i].model.bytes); free(pairs[i].tok.bytes); }
    free(pairs);
    free(mutated.bytes);
    if (only < 0)
        fprintf(report, "fuzz_load: %ld cases in %.1f s on %d model/tokenizer pair(s): %ld ran to the end, %ld refused "
                "with one line, %ld failures (sanitizer reports, crashes, hangs stop the run)\n", cases,
                t1.tv_sec - t0.tv_sec + 1e-9 * (t1.tv_nsec - t0.tv_nsec), n_pairs, n_ran, cases - n_ran - !ok, ok ? 0L : 1L);
    fclose(report);
    return ok ? 0 : 1;
}
