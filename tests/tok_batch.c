// tok_batch.c: encodes many texts with dsv2's tokenizer in one process, for tests/tok_diff.py.
//   gcc -O2 -fopenmp -o build/tok_batch tests/tok_batch.c -lm   (tests/tok_diff.py builds it)
//   ./build/tok_batch tokenizer.bin TEXTS > IDS
// TEXTS: records of a uint32 little-endian byte length followed by that many bytes of UTF-8.
// IDS: one line per record, its ids without BOS (as tokenizers' encode(add_special_tokens=False)).
#define DSV2_NO_MAIN
#pragma GCC diagnostic ignored "-Wunused-function"  // only the tokenizer of dsv2.c is used here
#include "../dsv2.c"

int main(int argc, char **argv) {
    if (argc != 3) die("usage: %s tokenizer.bin TEXTS > IDS", argv[0]);
    Tokenizer t;
    tokenizer_load(&t, argv[1]);
    FILE *f = fopen(argv[2], "rb");
    if (!f) die("cannot open %s", argv[2]);
    size_t cap = 1 << 16;
    char *text = (char *)malloc(cap);
    uint32_t len;
    long n_texts = 0;
    while (fread(&len, 4, 1, f) == 1) {
        if (len >= cap) {
            while (len >= cap) cap *= 2;
            text = (char *)realloc(text, cap);
            if (!text) die("out of memory");
        }
        if (fread(text, 1, len, f) != len) die("%s: record %ld is truncated", argv[2], n_texts);
        int n;
        int *ids = tokenizer_encode(&t, text, len, 0, &n);
        for (int i = 0; i < n; i++) printf(i ? " %d" : "%d", ids[i]);
        putchar('\n');
        free(ids);
        n_texts++;
    }
    fclose(f);
    free(text);
    tokenizer_free(&t);
    return 0;
}
