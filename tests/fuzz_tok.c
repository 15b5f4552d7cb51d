// fuzz_tok.c: random text through the tokenizer, built with -fsanitize=address,undefined.
//   ./build/fuzz_tok SECONDS tokenizer.bin [more.bin...]
// Random byte strings: the UTF-8 validator must agree with a naive check; valid ones (and all
// random Unicode strings, built from pools of tricky characters and special-token snippets) must
// encode -> decode back to the same bytes, whole and streamed one token at a time.
#define DSV2_NO_MAIN
#pragma GCC diagnostic ignored "-Wunused-function"  // only the tokenizer of dsv2.c is used here
#include "../dsv2.c"

static uint64_t rng_state = 0x2545F4914F6CDD1Dull;
static uint32_t rnd(uint32_t n) {  // xorshift64*, uniform enough in [0, n)
    rng_state ^= rng_state >> 12; rng_state ^= rng_state << 25; rng_state ^= rng_state >> 27;
    return (uint32_t)((rng_state * 0x2545F4914F6CDD1Dull) >> 32) % n;
}

static int put_utf8(char *s, uint32_t cp) {
    if (cp < 0x80) { s[0] = cp; return 1; }
    if (cp < 0x800) { s[0] = 0xC0 | cp >> 6; s[1] = 0x80 | (cp & 63); return 2; }
    if (cp < 0x10000) { s[0] = 0xE0 | cp >> 12; s[1] = 0x80 | (cp >> 6 & 63); s[2] = 0x80 | (cp & 63); return 3; }
    s[0] = 0xF0 | cp >> 18; s[1] = 0x80 | (cp >> 12 & 63); s[2] = 0x80 | (cp >> 6 & 63); s[3] = 0x80 | (cp & 63);
    return 4;
}

// the reference validity check: decode with a different method (round trip through put_utf8)
static int naive_valid(const unsigned char *s, size_t n) {
    for (size_t i = 0; i < n;) {
        int len = s[i] < 0x80 ? 1 : s[i] >> 5 == 6 ? 2 : s[i] >> 4 == 14 ? 3 : s[i] >> 3 == 30 ? 4 : 0;
        if (!len || i + len > n) return 0;
        uint32_t cp = len == 1 ? s[i] : s[i] & (0x7F >> len);
        for (int k = 1; k < len; k++) { if (s[i + k] >> 6 != 2) return 0; cp = cp << 6 | (s[i + k] & 63); }
        char re[4];
        if (cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF) || put_utf8(re, cp) != len) return 0;  // overlong
        i += len;
    }
    return 1;
}

static const uint32_t pool_ranges[][2] = {
    {0x20, 0x7E}, {0x30, 0x39}, {0x41, 0x5A}, {0x09, 0x0D}, {0x20, 0x20}, {0x20, 0x20}, {0x0A, 0x0A},
    {0x80, 0xFF}, {0xC0, 0xFF}, {0x0300, 0x036F}, {0x0400, 0x04FF}, {0x0600, 0x06FF}, {0x0900, 0x097F},
    {0x2000, 0x206F}, {0x3000, 0x30FF}, {0x4E00, 0x9FA5}, {0xAC00, 0xD7A3}, {0xFF00, 0xFFEF},
    {0x1F300, 0x1FAFF}, {0x1F3FB, 0x1F3FF}, {0x200D, 0x200D}, {0xFE0F, 0xFE0F}, {0x2160, 0x2188},
    {0x0660, 0x0669}, {0x10000, 0x10FFFF}, {0x0085, 0x0085}, {0x00A0, 0x00A0}, {0x2028, 0x2029},
};
static const char *snippets[] = {
    "<｜end▁of▁sentence｜>", "<｜begin▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<｜tool▁sep｜>",
    "<｜end▁of▁sent", "ü", "'s", "'ll", "\r\n", "   ", "123456", "½", "👨‍👩‍👧", "ｶﾀｶﾅ", "한국어",
};

static size_t random_unicode(char *s, size_t max) {
    size_t n = 0, target = rnd(rnd(8) == 0 ? (uint32_t)max - 64 : 48);
    while (n < target) {
        if (rnd(10) == 0) {
            const char *snip = snippets[rnd(sizeof snippets / sizeof *snippets)];
            memcpy(s + n, snip, strlen(snip)); n += strlen(snip);
            continue;
        }
        const uint32_t *r = pool_ranges[rnd(sizeof pool_ranges / sizeof *pool_ranges)];
        uint32_t cp = r[0] + rnd(r[1] - r[0] + 1);
        if (cp >= 0xD800 && cp <= 0xDFFF) continue;
        n += put_utf8(s + n, cp);
    }
    return n;
}

static int roundtrip(Tokenizer *t, const char *text, size_t len) {
    int n_ids;
    int add_bos = rnd(2) && t->bos_id >= 0;
    int *ids = tokenizer_encode(t, text, len, add_bos, &n_ids);
    if (add_bos && (n_ids == 0 || ids[0] != t->bos_id)) { fprintf(stderr, "BOS missing\n"); return 0; }
    char *out; size_t out_len;
    FILE *f = open_memstream(&out, &out_len);
    DecodeState s = {0};
    for (int i = add_bos; i < n_ids; i++) tokenizer_put(t, &s, ids[i], 0, f);  // special tokens as text
    tokenizer_flush(t, &s, f);
    fclose(f);
    int ok = out_len == len && memcmp(out, text, len) == 0;
    if (!ok) {
        fprintf(stderr, "round trip failed for %zu bytes:", len);
        for (size_t i = 0; i < len && i < 64; i++) fprintf(stderr, " %02x", (unsigned char)text[i]);
        fprintf(stderr, "\n");
    }
    free(out); free(ids);
    return ok;
}

int main(int argc, char **argv) {
    if (argc < 3) { fprintf(stderr, "usage: %s SECONDS tokenizer.bin...\n", argv[0]); return 1; }
    double seconds = atof(argv[1]) / (argc - 2);
    static char buf[8192];
    for (int v = 2; v < argc; v++) {
        Tokenizer t;
        tokenizer_load(&t, argv[v]);
        long bytes_tested = 0, valid_bytes = 0, unicode_tested = 0, failures = 0;
        time_t start = time(NULL);
        while (difftime(time(NULL), start) < seconds && failures < 10) {
            for (int rep = 0; rep < 100; rep++) {
                size_t n = rnd(64);  // random bytes, biased toward UTF-8-looking ones
                for (size_t i = 0; i < n; i++) buf[i] = rnd(3) ? 0x80 + rnd(0x80) : rnd(3) ? rnd(0x80) : 0xC0 + rnd(0x40);
                int valid = utf8_invalid_offset(buf, n) < 0;
                if (valid != naive_valid((unsigned char *)buf, n)) { fprintf(stderr, "validator disagrees\n"); failures++; }
                long off = utf8_invalid_offset(buf, n);
                if (off >= 0 && (!naive_valid((unsigned char *)buf, off) || off >= (long)n)) { fprintf(stderr, "bad offset\n"); failures++; }
                if (valid) { failures += !roundtrip(&t, buf, n); valid_bytes++; }
                bytes_tested++;
                n = random_unicode(buf, sizeof buf);
                failures += !roundtrip(&t, buf, n);
                unicode_tested++;
            }
        }
        printf("fuzz %s: %ld random byte strings (%ld valid UTF-8), %ld random Unicode strings, %ld failures\n",
               argv[v], bytes_tested, valid_bytes, unicode_tested, failures);
        tokenizer_free(&t);
        if (failures) return 1;
    }
    return 0;
}
