/* dsv2.c: DeepSeek-V2 inference in one C file (arXiv 2405.04434).
 *
 * SKELETON -- sections are filled in by separate work streams:
 *   - model core (config, loader, MLA, MoE, forward, sampler, CLI): main author
 *   - the BPE tokenizer section below: tokenizer work stream
 * Build: gcc -O3 -fopenmp -o dsv2 dsv2.c -lm
 */
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>
#include <math.h>
#include <time.h>
#include <fcntl.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/stat.h>

// one clear error line, then a non-zero exit
static void die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
#include <stdarg.h>
static void die(const char *fmt, ...) {
    va_list ap; va_start(ap, fmt);
    fprintf(stderr, "dsv2: error: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    exit(1);
}

// ----------------------------------------------------------------------------
// ---------------- The Byte Pair Encoding (BPE) Tokenizer
// (tokenizer work stream: everything from here to "end of tokenizer")
//
// Contract used by the rest of dsv2.c:
//   typedef struct {...} Tokenizer;   with at least the fields
//       int vocab_size, bos_id, eos_id, add_bos;
//   void tokenizer_load(Tokenizer *t, const char *path);      // die()s with one line on bad input
//   void tokenizer_free(Tokenizer *t);
//   int *tokenizer_encode(Tokenizer *t, const char *text, size_t len, int add_bos, int *n_ids);
//        malloc'd ids (caller frees); special tokens in the text are matched; BOS first if add_bos;
//        die()s on invalid UTF-8
//   typedef struct {...} DecodeState;  zero-initialised = fresh stream
//   void tokenizer_put(Tokenizer *t, DecodeState *s, int id, int skip_special, FILE *out);
//        streams the token's text; holds back an incomplete UTF-8 character until complete
//   void tokenizer_flush(Tokenizer *t, DecodeState *s, FILE *out);
//   char *tokenizer_chat_prompt(Tokenizer *t, const char *system, const char *user);
//        the chat template rendered for one user turn + generation prompt, WITHOUT the leading
//        BOS (the caller encodes with add_bos); malloc'd; die()s if the tokenizer has no template
//   void tokenizer_cli(Tokenizer *t, const char *mode, const char *input);  // -m encode|decode
//
// It reproduces Hugging Face `tokenizers` (Tokenizer.encode(text, add_special_tokens=False))
// for byte-level BPE tokenizers such as DeepSeek-V2's and V3's, in four steps:
//   1. added tokens: found in the raw text first (leftmost-longest), never split further
//   2. pre-tokenizer: a sequence of Split(regex, Isolated) steps cuts the rest into pieces
//   3. byte-level: each piece's UTF-8 bytes are the starting symbols (GPT-2 bytes_to_unicode)
//   4. BPE: adjacent symbols are merged, lowest merge rank first
// tokenizer.bin (written by export.py, layout documented there) holds everything resolved to
// ids: merges as (left, right, merged) id triples, the regexes compiled to character classes.

#define TOK_EXISTS  1   // token_flags bits
#define TOK_SPECIAL 2
#define TOK_ADDED   4
enum { ATOM_CLASS, ATOM_END, ATOM_NOT_AHEAD };  // kinds of regex atoms, see match_atoms
enum { CHAT_SYS_PREFIX, CHAT_SYS_SUFFIX, CHAT_USER_PREFIX, CHAT_USER_SUFFIX, CHAT_GEN_PROMPT, CHAT_PIECES };

typedef struct { uint64_t pair; int32_t rank, merged; } MergeSlot;  // pair = left << 32 | right
#define BPE_CACHE_SLOTS 16384   // a direct-mapped cache of short pieces' BPE results
typedef struct { uint8_t len, n_ids; char bytes[22]; int32_t ids[6]; } BpeCacheSlot;  // len 0 = empty

typedef struct {
    int vocab_size, bos_id, eos_id, add_bos;
    char unicode_version[17];       // of the unicodedata export.py computed the classes with
    // views into the memory-mapped tokenizer.bin
    void *map; size_t map_size;
    const int32_t *token_off;       // (vocab_size+1,) token bytes = token_blob[off[id]:off[id+1]]
    const uint8_t *token_flags;     // (vocab_size,) TOK_* bits
    const char *token_blob;
    int n_merges; const int32_t *merges;    // (n_merges, 3) left, right, merged; index = rank
    const int32_t *byte_ids;        // (256,) one-byte token per byte, -1 if none
    int n_added; const int32_t *added;      // (n_added, 2) id, normalized
    int n_classes; const int32_t *class_off; const uint32_t *ranges;  // code point ranges (lo, hi)
    int n_steps; const int32_t *step_off, *alt_off, *atoms;          // pre-tokenizer regexes
    int has_chat; const char *chat[CHAT_PIECES]; int chat_len[CHAT_PIECES];
    // built at load time
    MergeSlot *merge_table; uint64_t merge_mask;   // open addressing hash (left,right) -> rank
    uint64_t (*class_ascii)[2];     // (n_classes,) 128-bit membership of ASCII, a fast path
    int *added_order;               // added token indices sorted by (first byte, longest first)
    int added_first[257];           // added_order[added_first[b]:added_first[b+1]] start with byte b
    BpeCacheSlot *bpe_cache;        // (BPE_CACHE_SLOTS,) like tokenizers' BPE cache of words
} Tokenizer;

typedef struct { unsigned char pending[4]; int n_pending; } DecodeState;

// ---------------- UTF-8

// The character at s[0..n): returns its length (and sets *cp) when valid; 0 when s is a valid
// but incomplete prefix; -k when invalid, k >= 1 being the length of the longest valid prefix
// (one U+FFFD replaces those k bytes, as Rust's String::from_utf8_lossy does).
static int utf8_char(const unsigned char *s, size_t n, uint32_t *cp) {
    unsigned char c = s[0];
    if (c < 0x80) { *cp = c; return 1; }
    int len; unsigned char lo = 0x80, hi = 0xBF;  // allowed range of the second byte
    if (c >= 0xC2 && c <= 0xDF) len = 2;
    else if (c >= 0xE0 && c <= 0xEF) { len = 3; if (c == 0xE0) lo = 0xA0; if (c == 0xED) hi = 0x9F; }
    else if (c >= 0xF0 && c <= 0xF4) { len = 4; if (c == 0xF0) lo = 0x90; if (c == 0xF4) hi = 0x8F; }
    else return -1;
    uint32_t v = c & (0x7F >> len);
    for (int i = 1; i < len; i++) {
        if ((size_t)i >= n) return 0;
        if (s[i] < (i == 1 ? lo : 0x80) || s[i] > (i == 1 ? hi : 0xBF)) return -i;
        v = (v << 6) | (s[i] & 0x3F);
    }
    *cp = v;
    return len;
}

// byte offset of the first invalid UTF-8 sequence in text, or -1 if it is all valid
long utf8_invalid_offset(const char *text, size_t len) {
    const unsigned char *s = (const unsigned char *)text;
    uint32_t cp;
    for (size_t i = 0; i < len;) {
        int k = utf8_char(s + i, len - i, &cp);
        if (k <= 0) return (long)i;
        i += k;
    }
    return -1;
}

// ---------------- loading tokenizer.bin

typedef struct { const char *path; const uint8_t *p, *end; } Reader;

static const void *take(Reader *r, size_t count, size_t elem) {
    size_t n = (count * elem + 3) & ~(size_t)3;  // sections are padded to 4 bytes
    if (count > (1u << 28) || n > (size_t)(r->end - r->p)) die("tokenizer file %s is truncated or corrupt", r->path);
    const void *at = r->p;
    r->p += n;
    return at;
}
static int take_int(Reader *r) { return *(const int32_t *)take(r, 1, 4); }

static void check_ids(Reader *r, const int32_t *ids, long n, long stride, int vocab_size, int allow_none) {
    for (long i = 0; i < n; i += stride)
        if (ids[i] >= vocab_size || ids[i] < (allow_none ? -1 : 0))
            die("tokenizer file %s is corrupt (token id %d out of range)", r->path, ids[i]);
}

static void check_offsets(Reader *r, const int32_t *off, int n, int limit) {
    if (off[0] != 0 || off[n] != limit) die("tokenizer file %s is corrupt (bad offsets)", r->path);
    for (int i = 0; i < n; i++)
        if (off[i] > off[i + 1]) die("tokenizer file %s is corrupt (bad offsets)", r->path);
}

static uint64_t hash_pair(uint64_t pair) { pair *= 0x9E3779B97F4A7C15ull; return pair ^ (pair >> 29); }

// (left, right) -> merge rank, or -1: the MergeMap of tokenizers' BPE model
static int merge_rank(const Tokenizer *t, int left, int right) {
    uint64_t pair = (uint64_t)(uint32_t)left << 32 | (uint32_t)right;
    for (uint64_t i = hash_pair(pair) & t->merge_mask;; i = (i + 1) & t->merge_mask) {
        if (t->merge_table[i].rank < 0) return -1;
        if (t->merge_table[i].pair == pair) return t->merge_table[i].rank;
    }
}

static void build_merge_table(Tokenizer *t) {
    uint64_t size = 16;
    while (size < 2 * (uint64_t)t->n_merges) size *= 2;
    t->merge_table = malloc(size * sizeof(MergeSlot));
    if (!t->merge_table) die("out of memory loading the tokenizer");
    for (uint64_t i = 0; i < size; i++) t->merge_table[i].rank = -1;
    t->merge_mask = size - 1;
    for (int r = 0; r < t->n_merges; r++) {
        const int32_t *m = t->merges + 3 * r;
        uint64_t pair = (uint64_t)(uint32_t)m[0] << 32 | (uint32_t)m[1], i = hash_pair(pair) & t->merge_mask;
        while (t->merge_table[i].rank >= 0 && t->merge_table[i].pair != pair) i = (i + 1) & t->merge_mask;
        t->merge_table[i] = (MergeSlot){pair, r, m[2]};
    }
}

static int class_has(const Tokenizer *t, int c, uint32_t cp);

static void build_class_ascii(Tokenizer *t) {
    t->class_ascii = calloc(t->n_classes ? t->n_classes : 1, sizeof *t->class_ascii);
    for (int c = 0; c < t->n_classes; c++)
        for (int r = t->class_off[c]; r < t->class_off[c + 1] && t->ranges[2 * r] < 128; r++)
            for (uint32_t cp = t->ranges[2 * r]; cp <= t->ranges[2 * r + 1] && cp < 128; cp++)
                t->class_ascii[c][cp >> 6] |= 1ull << (cp & 63);
}

static const Tokenizer *sort_tok;  // qsort has no context argument
static int cmp_added(const void *a, const void *b) {
    const Tokenizer *t = sort_tok;
    int ia = t->added[2 * *(const int *)a], ib = t->added[2 * *(const int *)b];
    int la = t->token_off[ia + 1] - t->token_off[ia], lb = t->token_off[ib + 1] - t->token_off[ib];
    unsigned char fa = t->token_blob[t->token_off[ia]], fb = t->token_blob[t->token_off[ib]];
    return fa != fb ? fa - fb : lb - la;
}

static void build_added_index(Tokenizer *t) {
    t->added_order = malloc((t->n_added + 1) * sizeof(int));
    int n = 0;
    for (int i = 0; i < t->n_added; i++) {
        int id = t->added[2 * i];
        if (t->token_off[id + 1] > t->token_off[id]) t->added_order[n++] = i;  // skip empty ones
    }
    sort_tok = t;
    qsort(t->added_order, n, sizeof(int), cmp_added);
    for (int b = 0, i = 0; b <= 256; b++) {
        while (i < n && (unsigned char)t->token_blob[t->token_off[t->added[2 * t->added_order[i]]]] < b) i++;
        t->added_first[b] = i;
    }
    t->added_first[256] = n;
}

void tokenizer_load(Tokenizer *t, const char *path) {
    memset(t, 0, sizeof *t);
    int fd = open(path, O_RDONLY);
    if (fd < 0) die("cannot open tokenizer file %s", path);
    struct stat st;
    if (fstat(fd, &st) != 0 || st.st_size < 8) die("tokenizer file %s is truncated or corrupt", path);
    t->map_size = st.st_size;
    t->map = mmap(NULL, t->map_size, PROT_READ, MAP_PRIVATE | MAP_POPULATE, fd, 0);  // prefault: one pass, not 700 faults
    close(fd);
    if (t->map == MAP_FAILED) die("cannot mmap tokenizer file %s", path);
    Reader r = {path, t->map, (const uint8_t *)t->map + t->map_size};
    if (memcmp(take(&r, 8, 1), "DSV2TOK\0", 8) != 0) die("%s is not a dsv2 tokenizer file (bad magic)", path);
    int version = take_int(&r);
    if (version != 1) die("tokenizer file %s has version %d, this dsv2 reads version 1 (re-export it)", path, version);
    t->vocab_size = take_int(&r); t->n_merges = take_int(&r); t->n_added = take_int(&r);
    t->bos_id = take_int(&r); t->eos_id = take_int(&r); t->add_bos = take_int(&r);
    t->n_classes = take_int(&r); int n_ranges = take_int(&r);
    t->n_steps = take_int(&r); int n_alts = take_int(&r), n_atoms = take_int(&r);
    int blob_bytes = take_int(&r); t->has_chat = take_int(&r);
    memcpy(t->unicode_version, take(&r, 16, 1), 16);
    if (t->vocab_size <= 0 || t->n_merges < 0 || t->n_added < 0 || t->n_classes < 0 || n_ranges < 0 ||
        t->n_steps < 0 || n_alts < 0 || n_atoms < 0 || blob_bytes < 0)
        die("tokenizer file %s is corrupt (negative sizes)", path);
    t->token_off = take(&r, t->vocab_size + 1, 4);
    t->token_flags = take(&r, t->vocab_size, 1);
    t->token_blob = take(&r, blob_bytes, 1);
    t->merges = take(&r, 3 * (size_t)t->n_merges, 4);
    t->byte_ids = take(&r, 256, 4);
    t->added = take(&r, 2 * (size_t)t->n_added, 4);
    t->class_off = take(&r, t->n_classes + 1, 4);
    t->ranges = take(&r, 2 * (size_t)n_ranges, 4);
    t->step_off = take(&r, t->n_steps + 1, 4);
    t->alt_off = take(&r, n_alts + 1, 4);
    t->atoms = take(&r, 4 * (size_t)n_atoms, 4);
    for (int i = 0; i < CHAT_PIECES; i++) {
        t->chat_len[i] = take_int(&r);
        if (t->chat_len[i] < 0) die("tokenizer file %s is corrupt (chat template)", path);
        t->chat[i] = take(&r, t->chat_len[i], 1);
    }
    if (r.p != r.end) die("tokenizer file %s is corrupt (%ld unexpected trailing bytes)", path, (long)(r.end - r.p));
    // validate everything later code indexes with, so a corrupt file cannot crash us
    check_offsets(&r, t->token_off, t->vocab_size, t->token_off[t->vocab_size]);
    if (t->token_off[t->vocab_size] > blob_bytes) die("tokenizer file %s is corrupt (token bytes)", path);
    check_ids(&r, t->merges, 3L * t->n_merges, 1, t->vocab_size, 0);
    check_ids(&r, t->byte_ids, 256, 1, t->vocab_size, 1);
    check_ids(&r, t->added, 2L * t->n_added, 2, t->vocab_size, 0);
    check_offsets(&r, t->class_off, t->n_classes, n_ranges);
    check_offsets(&r, t->step_off, t->n_steps, n_alts);
    check_offsets(&r, t->alt_off, n_alts, n_atoms);
    for (int a = 0; a < n_atoms; a++) {
        const int32_t *at = t->atoms + 4 * a;
        if (at[0] < ATOM_CLASS || at[0] > ATOM_NOT_AHEAD || (at[0] != ATOM_END && (at[1] < 0 || at[1] >= t->n_classes)) ||
            at[2] < 0 || (at[3] >= 0 && at[3] < at[2]) || at[3] < -1)
            die("tokenizer file %s is corrupt (pre-tokenizer atom %d)", path, a);
    }
    if (t->bos_id >= t->vocab_size || t->eos_id >= t->vocab_size) die("tokenizer file %s is corrupt (BOS/EOS id)", path);
    if (t->add_bos && t->bos_id < 0) die("tokenizer file %s adds BOS but has no BOS token", path);
    build_merge_table(t);
    build_class_ascii(t);
    build_added_index(t);
    t->bpe_cache = calloc(BPE_CACHE_SLOTS, sizeof(BpeCacheSlot));  // zero pages: costs nothing until used
    if (!t->bpe_cache) die("out of memory loading the tokenizer");
}

void tokenizer_free(Tokenizer *t) {
    if (t->map) munmap(t->map, t->map_size);
    free(t->merge_table); free(t->class_ascii); free(t->added_order); free(t->bpe_cache);
    memset(t, 0, sizeof *t);
}

// ---------------- pre-tokenizer: a tiny backtracking matcher for the compiled regexes
// Oniguruma (which tokenizers uses) is a backtracking engine too: alternatives are tried in
// order, quantifiers are greedy and give back one character at a time, the leftmost match wins.

static int class_has(const Tokenizer *t, int c, uint32_t cp) {
    if (cp < 128) return (t->class_ascii[c][cp >> 6] >> (cp & 63)) & 1;
    int lo = t->class_off[c], hi = t->class_off[c + 1] - 1;  // binary search the ranges
    while (lo <= hi) {
        int mid = (lo + hi) / 2;
        if (cp < t->ranges[2 * mid]) hi = mid - 1;
        else if (cp > t->ranges[2 * mid + 1]) lo = mid + 1;
        else return 1;
    }
    return 0;
}

// Match atoms[0..n) at cps[pos..], inside the piece that ends at `end`: returns the end of the
// match or -1. Atoms: class{min,max} (greedy), `$` (end of piece or before a "\n", Oniguruma's
// Ruby syntax), (?!class) (negative lookahead of one character).
static int match_atoms(const Tokenizer *t, const int32_t *atom, int n, const uint32_t *cps, int pos, int end) {
    if (n == 0) return pos;
    int kind = atom[0], c = atom[1], min = atom[2], max = atom[3];
    if (kind == ATOM_END)
        return pos == end || cps[pos] == '\n' ? match_atoms(t, atom + 4, n - 1, cps, pos, end) : -1;
    if (kind == ATOM_NOT_AHEAD)
        return pos < end && class_has(t, c, cps[pos]) ? -1 : match_atoms(t, atom + 4, n - 1, cps, pos, end);
    int count = 0;
    while (count != max && pos + count < end && class_has(t, c, cps[pos + count])) count++;
    int next_is_end = n > 1 && atom[4] == ATOM_END;
    for (; count >= min; count--) {
        int at = pos + count;
        if (next_is_end && at != end && cps[at] != '\n') continue;  // `$` cannot match there
        int m = match_atoms(t, atom + 4, n - 1, cps, at, end);
        if (m >= 0) return m;
    }
    return -1;
}

// The leftmost non-empty match of pre-tokenizer step s in cps[from..end): sets *mstart, returns its end or -1
static int find_match(const Tokenizer *t, int s, const uint32_t *cps, int from, int end, int *mstart) {
    for (int pos = from; pos < end; pos++)
        for (int a = t->step_off[s]; a < t->step_off[s + 1]; a++) {
            int m = match_atoms(t, t->atoms + 4 * t->alt_off[a], t->alt_off[a + 1] - t->alt_off[a], cps, pos, end);
            if (m > pos) { *mstart = pos; return m; }
            if (m == pos) break;  // an empty match at pos: tokenizers drops it and searches on
        }
    return -1;
}

// ---------------- BPE
// tokenizers' Word::merge_all: symbols in a doubly linked list, candidate merges in a min-heap
// ordered by (rank, position); pop the best, skip it if stale, merge, push the two new pairs.
// O(n log n) in the piece length.

typedef struct {
    int *ids; int n_ids, cap_ids;           // output
    uint32_t *cps; int *byte_at;            // the text as code points, their byte offsets
    int *sym, *prev, *next;                 // BPE symbols (token id; -1 = merged away)
    uint64_t *heap; int n_heap;             // rank << 32 | position
} Encoder;

static void emit(Encoder *e, int id) {
    if (e->n_ids == e->cap_ids) {
        e->cap_ids = e->cap_ids ? 2 * e->cap_ids : 64;
        e->ids = realloc(e->ids, e->cap_ids * sizeof(int));
        if (!e->ids) die("out of memory encoding text");
    }
    e->ids[e->n_ids++] = id;
}

static void heap_push(Encoder *e, uint64_t key) {
    int i = e->n_heap++;
    for (; i > 0 && e->heap[(i - 1) / 2] > key; i = (i - 1) / 2) e->heap[i] = e->heap[(i - 1) / 2];
    e->heap[i] = key;
}

static uint64_t heap_pop(Encoder *e) {
    uint64_t top = e->heap[0], last = e->heap[--e->n_heap];
    int i = 0;
    for (int child; (child = 2 * i + 1) < e->n_heap; i = child) {
        if (child + 1 < e->n_heap && e->heap[child + 1] < e->heap[child]) child++;
        if (e->heap[child] >= last) break;
        e->heap[i] = e->heap[child];
    }
    e->heap[i] = last;
    return top;
}

static void push_pair(const Tokenizer *t, Encoder *e, int pos) {
    if (pos < 0 || e->next[pos] < 0) return;
    int rank = merge_rank(t, e->sym[pos], e->sym[e->next[pos]]);
    if (rank >= 0) heap_push(e, (uint64_t)rank << 32 | (uint32_t)pos);
}

// BPE over the UTF-8 bytes of one piece, appending its token ids to e->ids
static void bpe_piece(const Tokenizer *t, Encoder *e, const unsigned char *bytes, int n) {
    BpeCacheSlot *slot = NULL;
    if (n <= (int)sizeof slot->bytes) {  // short piece: look in the cache first
        uint32_t h = 2166136261u;  // FNV-1a
        for (int i = 0; i < n; i++) h = (h ^ bytes[i]) * 16777619u;
        slot = &t->bpe_cache[h % BPE_CACHE_SLOTS];
        if (slot->len == n && memcmp(slot->bytes, bytes, n) == 0) {
            for (int i = 0; i < slot->n_ids; i++) emit(e, slot->ids[i]);
            return;
        }
    }
    int first_out = e->n_ids, n_sym = 0;
    for (int i = 0; i < n; i++) {
        int id = t->byte_ids[bytes[i]];
        if (id < 0) continue;  // a byte without a token (cannot occur in valid UTF-8): dropped, as tokenizers does
        e->sym[n_sym] = id; e->prev[n_sym] = n_sym - 1; e->next[n_sym] = n_sym + 1; n_sym++;
    }
    if (n_sym == 0) return;
    e->next[n_sym - 1] = -1;
    e->n_heap = 0;
    for (int i = 0; i + 1 < n_sym; i++) push_pair(t, e, i);
    while (e->n_heap > 0) {
        uint64_t top = heap_pop(e);
        int rank = (int)(top >> 32), pos = (int)(uint32_t)top;
        int right = e->next[pos];
        if (e->sym[pos] < 0 || right < 0 || merge_rank(t, e->sym[pos], e->sym[right]) != rank) continue;  // stale
        e->sym[pos] = t->merges[3 * rank + 2];  // merge right into pos
        e->sym[right] = -1;
        e->next[pos] = e->next[right];
        if (e->next[pos] >= 0) e->prev[e->next[pos]] = pos;
        push_pair(t, e, e->prev[pos]);
        push_pair(t, e, pos);
    }
    for (int i = 0; i >= 0; i = e->next[i]) emit(e, e->sym[i]);
    int n_out = e->n_ids - first_out;
    if (slot && n_out <= (int)(sizeof slot->ids / sizeof *slot->ids)) {
        slot->len = n; slot->n_ids = n_out;
        memcpy(slot->bytes, bytes, n);
        memcpy(slot->ids, e->ids + first_out, n_out * sizeof(int));
    }
}

// Apply pre-tokenizer steps s, s+1, ... to the piece cps[start..end), then BPE each final piece
static void pretokenize(const Tokenizer *t, Encoder *e, const char *text, int s, int start, int end) {
    if (start >= end) return;
    if (s == t->n_steps) {
        bpe_piece(t, e, (const unsigned char *)text + e->byte_at[start], e->byte_at[end] - e->byte_at[start]);
        return;
    }
    int pos = start, mstart, mend;
    while (pos < end && (mend = find_match(t, s, e->cps, pos, end, &mstart)) >= 0) {
        pretokenize(t, e, text, s + 1, pos, mstart);       // the gap before the match
        pretokenize(t, e, text, s + 1, mstart, mend);      // the match, isolated
        pos = mend;
    }
    pretokenize(t, e, text, s + 1, pos, end);
}

// ---------------- added tokens
// tokenizers' AddedVocabulary::extract_and_normalize: first the non-normalized added tokens
// (the special ones here) are split off the raw text, then the normalized ones off the
// remaining pieces (after the normalizer, which for DeepSeek is the identity). Each pass is an
// Aho-Corasick search with MatchKind::LeftmostLongest.

// the longest added token of the given normalized-ness starting at byte offset `at`, or -1
static int added_at(const Tokenizer *t, const char *text, size_t len, size_t at, int normalized) {
    unsigned char b = text[at];
    for (int i = t->added_first[b]; i < t->added_first[b + 1]; i++) {  // longest first
        const int32_t *a = t->added + 2 * t->added_order[i];
        size_t n = t->token_off[a[0] + 1] - t->token_off[a[0]];
        if (a[1] == normalized && n <= len - at && memcmp(text + at, t->token_blob + t->token_off[a[0]], n) == 0)
            return a[0];
    }
    return -1;
}

// Split cps[start..end) on added tokens of pass `pass` (0: non-normalized, 1: normalized);
// gaps go to the next pass, then to the pre-tokenizer.
static void split_added(const Tokenizer *t, Encoder *e, const char *text, size_t len, int pass, int start, int end) {
    if (start >= end) return;
    if (pass == 2) { pretokenize(t, e, text, 0, start, end); return; }
    int gap = start;
    for (int i = start; i < end; i++) {
        int id = added_at(t, text, e->byte_at[end], e->byte_at[i], pass);
        if (id < 0) continue;
        split_added(t, e, text, len, pass + 1, gap, i);
        emit(e, id);
        int stop = e->byte_at[i] + t->token_off[id + 1] - t->token_off[id];
        while (e->byte_at[i] < stop) i++;
        gap = i--;
    }
    split_added(t, e, text, len, pass + 1, gap, end);
}

int *tokenizer_encode(Tokenizer *t, const char *text, size_t len, int add_bos, int *n_ids) {
    long bad = utf8_invalid_offset(text, len);
    if (bad >= 0) die("invalid UTF-8 in the text to encode at byte offset %ld (byte 0x%02x)", bad, (unsigned char)text[bad]);
    if (len > (1u << 30)) die("text to encode is too long (%zu bytes)", len);
    Encoder e = {0};
    e.cps = malloc((len + 1) * sizeof(uint32_t));
    e.byte_at = malloc((len + 1) * sizeof(int));
    e.sym = malloc((len + 1) * sizeof(int)); e.prev = malloc((len + 1) * sizeof(int)); e.next = malloc((len + 1) * sizeof(int));
    e.heap = malloc((2 * len + 1) * sizeof(uint64_t));
    if (!e.cps || !e.byte_at || !e.sym || !e.prev || !e.next || !e.heap) die("out of memory encoding %zu bytes", len);
    int n_cps = 0;
    for (size_t i = 0; i < len; n_cps++) {
        e.byte_at[n_cps] = (int)i;
        i += utf8_char((const unsigned char *)text + i, len - i, &e.cps[n_cps]);
    }
    e.byte_at[n_cps] = (int)len;
    if (add_bos && t->bos_id >= 0) emit(&e, t->bos_id);
    split_added(t, &e, text, len, 0, 0, n_cps);
    free(e.cps); free(e.byte_at); free(e.sym); free(e.prev); free(e.next); free(e.heap);
    *n_ids = e.n_ids;
    return e.ids ? e.ids : malloc(sizeof(int));
}

// ---------------- decoder
// ids -> bytes (export.py already mapped byte-level characters back to bytes) -> UTF-8, one
// character at a time so a character split across tokens is written once it is complete.
// Invalid sequences become U+FFFD as in tokenizers' ByteLevel decoder (from_utf8_lossy).
// Added tokens are written as their text (tokenizers would instead byte-map DeepSeek-V2's
// one-character added tokens such as "ü" to the byte 0xFC, i.e. U+FFFD).

static void decode_byte(DecodeState *s, unsigned char b, FILE *out) {
    if (s->n_pending == 0 && b < 0x80) { fputc(b, out); return; }
    s->pending[s->n_pending++] = b;
    while (s->n_pending > 0) {
        uint32_t cp;
        int k = utf8_char(s->pending, s->n_pending, &cp);
        if (k == 0) return;  // incomplete: wait for more bytes
        if (k > 0) fwrite(s->pending, 1, k, out);
        else { fputs("\xEF\xBF\xBD", out); k = -k; }
        memmove(s->pending, s->pending + k, s->n_pending - k);
        s->n_pending -= k;
    }
}

static void check_id(const Tokenizer *t, int id) {
    if (id < 0 || id >= t->vocab_size || !(t->token_flags[id] & TOK_EXISTS))
        die("token id %d is out of range (the tokenizer has ids 0..%d)", id, t->vocab_size - 1);
}

void tokenizer_put(Tokenizer *t, DecodeState *s, int id, int skip_special, FILE *out) {
    check_id(t, id);
    if (skip_special && (t->token_flags[id] & TOK_SPECIAL)) return;
    for (int i = t->token_off[id]; i < t->token_off[id + 1]; i++) decode_byte(s, t->token_blob[i], out);
}

void tokenizer_flush(Tokenizer *t, DecodeState *s, FILE *out) {
    (void)t;
    if (s->n_pending > 0) fputs("\xEF\xBF\xBD", out);  // a truncated character at the very end
    s->n_pending = 0;
    fflush(out);
}

// ---------------- chat template and CLI

// system (NULL or "" = none) and user rendered with the template's literal pieces, without BOS
char *tokenizer_chat_prompt(Tokenizer *t, const char *system, const char *user) {
    if (!t->has_chat) die("this tokenizer has no chat template that dsv2 understands (export.py stored none)");
    int has_sys = system && *system;
    size_t n = strlen(user) + (has_sys ? strlen(system) : 0) + 1;
    for (int i = 0; i < CHAT_PIECES; i++) n += t->chat_len[i];
    char *out = malloc(n), *p = out;
    if (!out) die("out of memory");
#define PUT(s, len) (memcpy(p, s, len), p += len)
    if (has_sys) { PUT(t->chat[CHAT_SYS_PREFIX], t->chat_len[CHAT_SYS_PREFIX]); PUT(system, strlen(system)); PUT(t->chat[CHAT_SYS_SUFFIX], t->chat_len[CHAT_SYS_SUFFIX]); }
    PUT(t->chat[CHAT_USER_PREFIX], t->chat_len[CHAT_USER_PREFIX]); PUT(user, strlen(user)); PUT(t->chat[CHAT_USER_SUFFIX], t->chat_len[CHAT_USER_SUFFIX]);
    PUT(t->chat[CHAT_GEN_PROMPT], t->chat_len[CHAT_GEN_PROMPT]);
#undef PUT
    *p = '\0';
    return out;
}

// -m encode: the ids of input (BOS first if the tokenizer adds it); -m decode: the text of "ids..."
void tokenizer_cli(Tokenizer *t, const char *mode, const char *input) {
    if (!input) die("-m %s needs the input text: -i TEXT", mode);
    if (strcmp(mode, "encode") == 0) {
        int n;
        int *ids = tokenizer_encode(t, input, strlen(input), t->add_bos, &n);
        for (int i = 0; i < n; i++) printf(i ? " %d" : "%d", ids[i]);
        printf("\n");
        free(ids);
    } else if (strcmp(mode, "decode") == 0) {
        DecodeState s = {0};
        for (const char *p = input; *p;) {
            char *stop;
            while (*p == ' ' || *p == '\t' || *p == '\n' || *p == ',') p++;
            if (!*p) break;
            long id = strtol(p, &stop, 10);
            if (stop == p || (*stop && !strchr(" \t\n,", *stop))) die("-m decode: '%.20s' is not a token id", p);
            if (id < 0 || id >= t->vocab_size) die("token id %ld is out of range (the tokenizer has ids 0..%d)", id, t->vocab_size - 1);
            tokenizer_put(t, &s, (int)id, 0, stdout);
            p = stop;
        }
        tokenizer_flush(t, &s, stdout);
        printf("\n");
    } else {
        die("-m %s: unknown tokenizer mode (expected encode or decode)", mode);
    }
}

// ---------------- end of tokenizer
// ----------------------------------------------------------------------------

// ---------------- Model (config, weights, forward, sampler, CLI): main author

#ifndef DSV2_NO_MAIN
int main(int argc, char **argv) {
    (void)argc; (void)argv;
    return 0;
}
#endif
