# dsv2: `make run` generates from the default model, `make test` runs every test.
CC ?= gcc
CFLAGS ?= -O3 -march=native -Wall -Wextra
OMP = -fopenmp
PYTHON ?= python3

.PHONY: all run test clean
all: dsv2

dsv2: dsv2.c
	$(CC) $(CFLAGS) $(OMP) -o $@ dsv2.c -lm

test_all: test_all.c dsv2.c
	$(CC) $(CFLAGS) $(OMP) -o $@ test_all.c -lm

# the tokenizer work stream's prerequisites (exported tokenizers, downloads, fuzz)
include tests/tokenizer.mk

test: dsv2 test_all $(TOK_TEST_DEPS)
	./test_all

clean:
	rm -rf dsv2 test_all build
