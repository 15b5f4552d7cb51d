# dsv2: `make run` generates from the default model, `make test` runs every test.
CC ?= gcc
CFLAGS ?= -O3 -march=native -Wall -Wextra
OMP = -fopenmp
PYTHON ?= python3
FIXTURES = lite v2
FIXTURE_MODELS = $(foreach f,$(FIXTURES),build/fixtures/$(f).fp32.bin build/fixtures/$(f).bf16.bin build/fixtures/$(f).q8.bin)
FIXTURE_TOKS = $(foreach f,$(FIXTURES),build/fixtures/$(f).tok.bin)

NVCC := $(shell command -v nvcc 2>/dev/null)
# dsv2cu is built (and so compiled in CI) wherever nvcc exists; test_all runs it when a GPU is there
# (and dsv2cu_timeline: the same with a per-block timeline of the decode step, --bench MODEL --timeline CTX)
CUDA_TARGETS := $(if $(NVCC),dsv2cu dsv2cu_timeline,)

.PHONY: all run test clean
all: dsv2

# the default model: a 7.8M-parameter DeepSeek-V2 trained here (docs/MODEL.md)
PROMPT ?= The jury said that the city
run: dsv2
	./dsv2 dsv2_tiny.bin -z tokenizer.bin -i "$(PROMPT)" -n 200 -t 0.8 -p 0.9

dsv2: dsv2.c
	$(CC) $(CFLAGS) $(OMP) -o $@ dsv2.c -lm

CUDA_SRC = dsv2.cu dsv2_common.cuh dsv2_mla.cuh dsv2_mla_decode.cuh dsv2_moe.cuh dsv2_prefill.cuh dsv2_sample.cuh dsv2_bench.cuh dsv2_serve.cuh dsv2.c
dsv2cu: $(CUDA_SRC)
	nvcc -O3 -arch=sm_90 -Xcompiler -fopenmp -o $@ dsv2.cu -lcublas -lgomp

dsv2cu_timeline: $(CUDA_SRC)
	nvcc -O3 -arch=sm_90 -DDSV2_TIMELINE -Xcompiler -fopenmp -o $@ dsv2.cu -lcublas -lgomp

test_all: test_all.c dsv2.c
	$(CC) $(CFLAGS) $(OMP) -o $@ test_all.c -lm

build/fixtures/%.fp32.bin: tests/fixtures/%/config.json export.py
	@mkdir -p build/fixtures
	$(PYTHON) export.py tests/fixtures/$* $@ --dtype fp32

build/fixtures/%.bf16.bin: tests/fixtures/%/config.json export.py
	@mkdir -p build/fixtures
	$(PYTHON) export.py tests/fixtures/$* $@ --dtype bf16

build/fixtures/%.q8.bin: tests/fixtures/%/config.json export.py
	@mkdir -p build/fixtures
	$(PYTHON) export.py tests/fixtures/$* $@ --dtype q8

build/fixtures/%.tok.bin: tests/fixtures/%/tokenizer.json export.py tools/unicode_classes.txt
	@mkdir -p build/fixtures
	$(PYTHON) export.py tests/fixtures/$* --tokenizer $@

# export.py's input checks: malformed and valid variations of the fixtures (test_all runs them)
build/malformed/cases.txt: tests/make_malformed.py $(wildcard tests/fixtures/*/*.json tests/fixtures/*/*.safetensors)
	$(PYTHON) tests/make_malformed.py build/malformed

# the tokenizer tests' prerequisites (exported tokenizers, downloads, fuzz)
include tests/tokenizer.mk
# the word list the default model's samples are checked against (a download)
include tests/wordlist.mk

# the default model in q8, for test_all's q8 checks
build/dsv2_tiny.q8.bin: dsv2_tiny.bin tools/convert_model.py export.py
	@mkdir -p build
	$(PYTHON) tools/convert_model.py dsv2_tiny.bin $@ --dtype q8

test: dsv2 test_all $(CUDA_TARGETS) $(FIXTURE_MODELS) $(FIXTURE_TOKS) build/dsv2_tiny.q8.bin $(TOK_TEST_DEPS) \
      build/malformed/cases.txt $(WORDLIST)
	V2_TOKENIZER=$(V2_TOKENIZER) FUZZ_SECONDS=$(FUZZ_SECONDS) FUZZ_PAIRS="$(FUZZ_PAIRS)" ./test_all

clean:
	rm -rf dsv2 dsv2cu dsv2cu_timeline test_all build
