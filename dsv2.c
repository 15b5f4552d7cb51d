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

typedef struct {
    int vocab_size, bos_id, eos_id, add_bos;
} Tokenizer;
typedef struct { int dummy; } DecodeState;

void tokenizer_load(Tokenizer *t, const char *path) { (void)t; die("tokenizer not implemented yet (%s)", path); }
void tokenizer_free(Tokenizer *t) { (void)t; }
int *tokenizer_encode(Tokenizer *t, const char *text, size_t len, int add_bos, int *n_ids) {
    (void)t; (void)text; (void)len; (void)add_bos; *n_ids = 0; die("tokenizer not implemented yet");
}
void tokenizer_put(Tokenizer *t, DecodeState *s, int id, int skip_special, FILE *out) {
    (void)t; (void)s; (void)skip_special; fprintf(out, "[%d]", id);
}
void tokenizer_flush(Tokenizer *t, DecodeState *s, FILE *out) { (void)t; (void)s; (void)out; }
char *tokenizer_chat_prompt(Tokenizer *t, const char *system, const char *user) {
    (void)t; (void)system; (void)user; die("tokenizer not implemented yet");
}
void tokenizer_cli(Tokenizer *t, const char *mode, const char *input) {
    (void)t; (void)input; die("-m %s: tokenizer not implemented yet", mode);
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
