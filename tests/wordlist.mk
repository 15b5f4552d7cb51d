# the word list of the default model's safety test (test_all.c, test_default_model_words):
# en.json of the npm package naughty-words (tools/wordlist.py says which version and why),
# fetched with npm pack into .cache/npm/ as tools/get_data.sh does; never committed.
# Offline: a SKIPPED line here, and the test prints SKIPPED (not counted).
WORDLIST_PKG = naughty-words-1.2.0
WORDLIST = .cache/npm/$(WORDLIST_PKG)/package/en.json

$(WORDLIST):
	@mkdir -p .cache/npm/$(WORDLIST_PKG) && \
	  npm pack naughty-words@1.2.0 --pack-destination .cache/npm >/dev/null 2>&1 && \
	  tar -xzf .cache/npm/$(WORDLIST_PKG).tgz -C .cache/npm/$(WORDLIST_PKG) || \
	  echo "SKIPPED: npm could not fetch naughty-words (offline?): the default model's samples are not checked"
