# tokenizer work stream: targets that `make test` needs for the tokenizer tests
TOK_TEST_DEPS =
