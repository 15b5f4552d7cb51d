#!/usr/bin/env python3
"""export.py: a Hugging Face DeepSeek-V2 directory -> one dsv2 model file and/or tokenizer.bin.

  python3 export.py HF_DIR [MODEL_OUT] [--tokenizer TOK_OUT] [--dtype fp32|bf16|q8]

Standard library only. The model file is written tensor by tensor (peak memory is one chunk of
one tensor, not the checkpoint); docs/FORMAT.md describes it. tokenizer.bin's layout is
described in the tokenizer section below.
"""
import argparse
import array
import json
import operator
import os
import re
import signal
import struct
import sys
import time


_progress_open = False  # a "\r" progress line is on stderr and has no newline yet


def fail(msg):
    """The one error line (on a line of its own, after any progress line) and exit status 1."""
    global _progress_open
    if _progress_open:
        print(file=sys.stderr)
        _progress_open = False
    print(f"export.py: error: {msg}", file=sys.stderr)
    sys.exit(1)


def load_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as e:
        fail(f"{path}: cannot read ({e.strerror})")
    except (ValueError, UnicodeDecodeError) as e:
        fail(f"{path}: not valid JSON ({e})")
    except RecursionError:
        fail(f"{path}: not valid JSON (nested too deeply)")


def is_int(v):
    """A JSON integer: 3, not 3.0, "3" or true (bool is an int subclass in Python)."""
    return isinstance(v, int) and not isinstance(v, bool)


# ---------------- tokenizer.bin
#
# tokenizer.bin holds everything dsv2.c's encoder/decoder needs, already resolved to ids
# so that loading is one mmap plus one hash table build (all little-endian, int32 unless noted):
#
#   magic "DSV2TOK\0" (8 bytes), version, vocab_size, n_merges, n_added, bos_id, eos_id,
#   add_bos, n_classes, n_ranges, n_steps, n_alts, n_atoms, blob_bytes, has_chat,
#   unicode_version (16 bytes, e.g. "16.0.0/17.0.0": the Unicode versions of the classes, see below)
#   token_off[vocab_size+1]     token id -> its bytes token_blob[off[id]:off[id+1]] (decoded:
#                               byte-level chars mapped back to raw bytes; added tokens verbatim)
#   token_flags[vocab_size]     u8, padded to 4: TOK_EXISTS 1, TOK_SPECIAL 2, TOK_ADDED 4
#   token_blob[blob_bytes]      padded to 4
#   merges[n_merges][3]         (left id, right id, merged id) in merge-rank order
#   byte_ids[256]               the id of the one-byte token of each byte (byte-level BPE start),
#                               -1 for the bytes that cannot occur in UTF-8 and have none
#   added[n_added][2]           (id, normalized) of each added token, in tokenizer.json order
#   class_off[n_classes+1]      character class c = ranges[class_off[c]:class_off[c+1]]
#   ranges[n_ranges][2]         u32 inclusive code point ranges (lo, hi), sorted, disjoint
#   step_off[n_steps+1]         pre-tokenizer step s = alternatives alt_off[step_off[s]:...]
#   alt_off[n_alts+1]           alternative a = atoms[alt_off[a]:alt_off[a+1]]
#   atoms[n_atoms][4]           (kind, class, min, max): ATOM_CLASS = class{min,max} greedy
#                               (max -1 = unbounded), ATOM_END = `$`, ATOM_NOT_AHEAD = (?!class)
#   chat template pieces, 5 x (int32 len, bytes padded to 4): system prefix, system suffix,
#                               user prefix, user suffix, generation prompt
#
# Each pre-tokenizer step is a Split(regex, Isolated): matches become pieces of their own,
# the gaps between them stay pieces; each step applies to every piece of the previous step.
# The regexes are compiled here (a small subset of Oniguruma syntax, see compile_regex) into
# alternatives of atoms over character classes, so the C side is one tiny backtracking matcher.
#
# The classes come from tools/unicode_classes.txt, a table of General_Category and White_Space
# in the Unicode versions that tokenizers 0.23 classifies by: 16.0 for the Split regexes' \p{X}
# \d \s (Oniguruma's tables), 17.0 for the Digits pre-tokenizer (Rust's char::is_numeric); the
# header records both ("16.0.0/17.0.0"). Not from Python's unicodedata: its Unicode is the running
# Python's (14.0 in 3.11, 15.0 in 3.12), and a character assigned after it would split
# differently. So every Python writes the same tokenizer.bin. tools/unicode_classes.mjs
# regenerates the table for other Unicode versions.

# version 2: the classes come from UNICODE_TABLE (version 1 took them from Python's unicodedata)
TOK_MAGIC, TOK_VERSION = b"DSV2TOK\0", 2
TOK_EXISTS, TOK_SPECIAL, TOK_ADDED = 1, 2, 4
ATOM_CLASS, ATOM_END, ATOM_NOT_AHEAD = 0, 1, 2
MAX_CP = 0x10FFFF
UNICODE_TABLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tools", "unicode_classes.txt")
# GPT-2's pattern, which ByteLevel(use_regex=true) applies
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def bytes_to_unicode():
    """GPT-2's byte -> printable character map used by the ByteLevel pre-tokenizer."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


_unicode = {"version": None, "numeric_version": None, "classes": {}}


def unicode_table():
    """tools/unicode_classes.txt -> {"version": "16.0.0" (of the regex classes), "numeric_version":
    "17.0.0" (of Numeric), "classes": {name: [(lo, hi), ...]}}."""
    if _unicode["version"] is None:
        try:
            with open(UNICODE_TABLE, encoding="ascii") as f:
                for line in f:
                    name, *items = line.split() or ["#"]
                    if name == "unicode":
                        _unicode["version"] = items[0]
                    elif name == "unicode_numeric":
                        _unicode["numeric_version"] = items[0]
                    elif not name.startswith("#"):
                        _unicode["classes"].setdefault(name, []).extend(
                            (int(lo, 16), int(hi or lo, 16)) for lo, _, hi in (r.partition("-") for r in items))
        except (OSError, ValueError, IndexError) as e:
            fail(f"{UNICODE_TABLE}: cannot read the Unicode table ({e}); it comes with export.py")
        if _unicode["version"] is None or _unicode["numeric_version"] is None:
            fail(f"{UNICODE_TABLE}: no 'unicode X.Y.Z' or 'unicode_numeric X.Y.Z' line")
    return _unicode


def unicode_versions():
    """What tokenizer.bin records: "16.0.0/17.0.0" (regex classes / Digits)."""
    table = unicode_table()
    return f"{table['version']}/{table['numeric_version']}"


def category_ranges(name):
    """Code point ranges of a class of the Unicode table: "L", "Nd", "White_Space", ..."""
    classes = unicode_table()["classes"]
    if name not in classes:
        raise ValueError(f"\\p{{{name}}} is not in {UNICODE_TABLE} (it has {' '.join(classes)}; "
                         "add it to tools/unicode_classes.mjs and regenerate)")
    return normalize_ranges(classes[name])


def normalize_ranges(ranges):
    """Sort and merge overlapping/adjacent ranges."""
    out = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def complement(ranges):
    out, nxt = [], 0
    for lo, hi in normalize_ranges(ranges):
        if lo > nxt:
            out.append((nxt, lo - 1))
        nxt = hi + 1
    if nxt <= MAX_CP:
        out.append((nxt, MAX_CP))
    return out


ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "f": "\f", "v": "\v"}


class RegexCompiler:
    """Compiles the subset of Oniguruma syntax the supported pre-tokenizers use:
    top-level alternation; literals, [classes] (ranges, ^negation, escapes, \\s \\S \\p{X}
    \\P{X} \\d inside), \\s \\S \\d \\p{X} \\P{X}; greedy ? * + {m} {m,} {m,n}; `$`; and
    (?!atom). Anything else raises ValueError with the offset."""

    def __init__(self, pattern):
        self.s, self.i = pattern, 0

    def error(self, what):
        raise ValueError(f"{what} at offset {self.i} of regex {self.s!r}")

    def peek(self):
        return self.s[self.i] if self.i < len(self.s) else None

    def take(self):
        if self.i >= len(self.s):
            self.error("unexpected end")
        self.i += 1
        return self.s[self.i - 1]

    def escape_ranges(self):
        """After a backslash: the ranges of \\s \\S \\d \\p{X} \\P{X}, or None for a literal."""
        c = self.take()
        if c == "s":  # Oniguruma's \s is the White_Space property, not a general category
            return category_ranges("White_Space")
        if c == "S":
            return complement(category_ranges("White_Space"))
        if c == "d":  # Unicode digits: Oniguruma's default (Ruby) syntax has no ASCII-only \d
            return category_ranges("Nd")
        if c in "pP":
            if self.take() != "{":
                self.error("expected { after \\p")
            j = self.s.find("}", self.i)
            if j < 0:
                self.error("unterminated \\p{")
            name, self.i = self.s[self.i:j], j + 1
            neg = name.startswith("^")
            name = name.lstrip("^")
            if not re.fullmatch(r"[A-Z][a-z]?", name):
                self.error(f"unsupported property \\p{{{name}}}")
            rs = category_ranges(name)
            return complement(rs) if (c == "P") != neg else rs
        if c.isalnum() and c not in ESCAPES:
            self.error(f"unsupported escape \\{c}")
        self.escaped = ESCAPES.get(c, c)
        return None

    def class_char(self):
        """One element inside [...]: returns ranges, or a single literal character."""
        c = self.take()
        if c == "\\":
            rs = self.escape_ranges()
            return rs if rs is not None else self.escaped
        if c == "[":
            self.error("nested classes are not supported")
        return c

    def bracket_class(self):
        neg = self.peek() == "^"
        if neg:
            self.i += 1
        ranges, first = [], True
        while True:
            if self.peek() == "]" and not first:
                self.i += 1
                break
            first = False
            item = self.class_char()
            if isinstance(item, list):
                ranges += item
                continue
            if self.peek() == "-" and self.i + 1 < len(self.s) and self.s[self.i + 1] != "]":
                self.i += 1
                hi = self.class_char()
                if isinstance(hi, list) or ord(hi) < ord(item):
                    self.error("bad range in class")
                ranges.append((ord(item), ord(hi)))
            else:
                ranges.append((ord(item), ord(item)))
        return complement(ranges) if neg else normalize_ranges(ranges)

    def atom_ranges(self):
        c = self.take()
        if c == "[":
            return self.bracket_class()
        if c == "\\":
            rs = self.escape_ranges()
            return rs if rs is not None else [(ord(self.escaped), ord(self.escaped))]
        if c in "()|*+?{.^":
            self.i -= 1
            self.error(f"unsupported regex construct {c!r}")
        return [(ord(c), ord(c))]

    def quantifier(self):
        c = self.peek()
        lo, hi = 1, 1
        if c == "?":
            lo, hi = 0, 1
        elif c == "*":
            lo, hi = 0, -1
        elif c == "+":
            lo, hi = 1, -1
        elif c == "{":
            m = re.match(r"\{(\d+)(,(\d*))?\}", self.s[self.i:])
            if not m:
                self.error("bad {m,n} quantifier")
            lo = int(m.group(1))
            hi = lo if m.group(2) is None else (int(m.group(3)) if m.group(3) else -1)
            self.i += m.end() - 1
        else:
            return lo, hi
        self.i += 1
        if self.peek() in ("?", "+"):
            self.error("lazy/possessive quantifiers are not supported")
        return lo, hi

    def compile(self):
        """-> list of alternatives, each a list of (kind, ranges, min, max)."""
        alts, cur = [], []
        while self.i < len(self.s):
            c = self.peek()
            if c == "|":
                self.i += 1
                alts.append(cur)
                cur = []
            elif c == "$":
                self.i += 1
                cur.append((ATOM_END, None, 0, 0))
            elif self.s.startswith("(?!", self.i):
                self.i += 3
                rs = self.atom_ranges()
                if self.take() != ")":
                    self.error("only (?!single-atom) lookaheads are supported")
                cur.append((ATOM_NOT_AHEAD, rs, 0, 0))
            else:
                rs = self.atom_ranges()
                lo, hi = self.quantifier()
                cur.append((ATOM_CLASS, rs, lo, hi))
        alts.append(cur)
        for alt in alts:
            if all(k != ATOM_CLASS or lo == 0 for k, _, lo, _ in alt):
                raise ValueError(f"regex {self.s!r} can match the empty string (unsupported)")
        return alts


def compile_regex(pattern):
    return RegexCompiler(pattern).compile()


def literal_pattern(text):
    return [[(ATOM_CLASS, [(ord(c), ord(c))], 1, 1) for c in text]]


def pretokenizer_steps(pre):
    """tokenizer.json's pre_tokenizer -> list of compiled Split(Isolated) patterns."""
    if pre is None:
        raise ValueError("no pre_tokenizer (a byte-level BPE needs ByteLevel)")
    items = pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre]
    if not items or items[-1].get("type") != "ByteLevel":
        raise ValueError("the pre_tokenizer must end with ByteLevel")
    steps = []
    for k, p in enumerate(items):
        kind = p.get("type")
        if kind == "Split":
            if p.get("behavior") != "Isolated" or p.get("invert"):
                raise ValueError(f"Split behavior {p.get('behavior')!r} invert={p.get('invert')} "
                                 "is not supported (only Isolated)")
            pat = p["pattern"]
            steps.append(compile_regex(pat["Regex"]) if "Regex" in pat else literal_pattern(pat["String"]))
        elif kind == "Digits":  # Rust's char::is_numeric (class Numeric); Isolated each, or Contiguous runs
            steps.append([[(ATOM_CLASS, category_ranges("Numeric"), 1, 1 if p.get("individual_digits") else -1)]])
        elif kind == "ByteLevel" and k == len(items) - 1:
            if p.get("add_prefix_space"):
                raise ValueError("ByteLevel add_prefix_space=true is not supported")
            if p.get("use_regex", True):
                steps.append(compile_regex(GPT2_PATTERN))
        else:
            raise ValueError(f"pre_tokenizer {kind!r} is not supported")
    return steps


def chat_literal(s):
    """A jinja single-quoted string literal's text (its backslash escapes resolved)."""
    return re.sub(r"\\(.)", lambda m: ESCAPES.get(m.group(1), m.group(1)), s)


def parse_chat_template(tpl):
    """The literal pieces around message['content'] for one system + one user turn and the
    generation prompt, recognised with regexes (there is no jinja2 here). None if not understood."""
    if not tpl or not isinstance(tpl, str):
        return None
    lit = r"'((?:[^'\\]|\\.)*)'"

    def around_content(role):
        m = re.search(r"message\['role'\]\s*==\s*'" + role + r"'\s*%\}(.*?)\{%-?\s*(?:elif|endif|else)",
                      tpl, re.S)
        if not m:
            return None
        m2 = re.search(r"\{\{\s*(?:" + lit + r"\s*\+\s*)?message\['content'\]\s*(?:\+\s*" + lit + r"\s*)?\}\}",
                       m.group(1))
        return (chat_literal(m2.group(1) or ""), chat_literal(m2.group(2) or "")) if m2 else None

    user = around_content("user")
    gen = re.search(r"\{%-?\s*if add_generation_prompt[^%]*%\}\s*\{\{\s*" + lit + r"\s*\}\}", tpl)
    system = around_content("system")
    if system is None and re.search(r"\{\{\s*bos_token\s*\}\}\s*\{\{\s*ns\.system_prompt\s*\}\}", tpl):
        system = ("", "")  # DeepSeek-V3 style: the system prompt verbatim right after BOS
    if user is None or gen is None or system is None:
        return None
    return [system[0], system[1], user[0], user[1], chat_literal(gen.group(1))]


def token_content(tok):
    return tok.get("content") if isinstance(tok, dict) else tok


def check_model(model):
    if model.get("type", "BPE") != "BPE":
        raise ValueError(f"model type {model.get('type')!r} is not supported (only BPE)")
    for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise ValueError(f"BPE {key}={model[key]!r} is not supported")
    if model.get("byte_fallback") or model.get("ignore_merges"):
        raise ValueError("BPE byte_fallback/ignore_merges are not supported")


def tokenizer_tables(tj, cfg):
    """tokenizer.json + tokenizer_config.json -> dict of everything tokenizer.bin stores."""
    check_model(tj["model"])
    norm = tj.get("normalizer")
    if norm is not None and not (norm.get("type") == "Sequence" and not norm.get("normalizers")):
        raise ValueError(f"normalizer {norm.get('type')!r} is not supported")
    if (tj.get("decoder") or {}).get("type") != "ByteLevel":
        raise ValueError("the decoder must be ByteLevel")
    vocab = tj["model"]["vocab"]
    added = [a for a in tj.get("added_tokens", []) if a["content"]]
    for a in added:
        if a.get("lstrip") or a.get("rstrip") or a.get("single_word"):
            raise ValueError(f"added token {a['content']!r}: lstrip/rstrip/single_word unsupported")
    vocab_size = max(list(vocab.values()) + [a["id"] for a in added]) + 1
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    tokens, flags = [b""] * vocab_size, [0] * vocab_size
    for s, i in vocab.items():
        # the ByteLevel decoder maps each char back to its byte; a token with a char outside the
        # map is emitted as its UTF-8 text instead
        tokens[i] = bytes(byte_of[c] for c in s) if all(c in byte_of for c in s) else s.encode()
        flags[i] = TOK_EXISTS
    for a in added:
        tokens[a["id"]] = a["content"].encode()
        flags[a["id"]] = TOK_EXISTS | TOK_ADDED | (TOK_SPECIAL if a.get("special") else 0)
    ids = dict(vocab)
    ids.update({a["content"]: a["id"] for a in added})
    merges = {}
    for rank, m in enumerate(tj["model"]["merges"]):
        pair = m.split(" ") if isinstance(m, str) else m
        if len(pair) != 2 or pair[0] not in vocab or pair[1] not in vocab or pair[0] + pair[1] not in vocab:
            raise ValueError(f"merge #{rank} {m!r} is not a pair of vocabulary tokens")
        # tokenizers collects the merges into a HashMap: a repeated pair keeps its last rank
        merges[(vocab[pair[0]], vocab[pair[1]])] = (rank, vocab[pair[0] + pair[1]])
    merges = sorted((r, a, b, new) for (a, b), (r, new) in merges.items())
    b2u = bytes_to_unicode()
    # bytes that never occur in UTF-8 (C0, C1, F5-FF) may lack a token (DeepSeek's do: their
    # byte-level characters "À" "ü" ... are added tokens instead); any other byte must have one
    missing = [b for b in range(256) if b2u[b] not in vocab]
    if any(b < 0xC0 or 0xC2 <= b <= 0xF4 for b in missing):
        raise ValueError(f"the vocabulary lacks byte-level tokens for bytes {missing}")

    def special_id(key):
        c = token_content(cfg.get(key))
        return ids.get(c, -1) if c else -1
    bos_id, eos_id = special_id("bos_token"), special_id("eos_token")
    add_bos = cfg.get("add_bos_token")
    if add_bos is None:  # not configured: add BOS iff the post-processor's template starts with it
        single = ((tj.get("post_processor") or {}).get("single") or [{}])[0]
        add_bos = bos_id >= 0 and "SpecialToken" in single and ids.get(single["SpecialToken"]["id"]) == bos_id
    return dict(tokens=tokens, flags=flags, merges=merges, added=added,
                byte_ids=[vocab.get(b2u[b], -1) for b in range(256)],
                bos_id=bos_id, eos_id=eos_id, add_bos=bool(add_bos) and bos_id >= 0,
                steps=pretokenizer_steps(tj.get("pre_tokenizer")),
                chat=parse_chat_template(cfg.get("chat_template")))


def pad4(b):
    return b + b"\0" * (-len(b) % 4)


def i32s(values):
    return struct.pack(f"<{len(values)}i", *values)


def tokenizer_bytes(tab):
    """The tables -> the bytes of tokenizer.bin (layout at the top of this section)."""
    classes, class_index, step_off, alt_off, atoms = [], {}, [0], [0], []
    for step in tab["steps"]:
        for alt in step:
            for kind, ranges, lo, hi in alt:
                c = -1
                if ranges is not None:
                    key = tuple(ranges)
                    c = class_index.setdefault(key, len(classes))
                    if c == len(classes):
                        classes.append(key)
                atoms += [kind, c, lo, hi]
            alt_off.append(len(atoms) // 4)
        step_off.append(len(alt_off) - 1)
    class_off, ranges = [0], []
    for cls in classes:
        ranges += [v for r in cls for v in r]
        class_off.append(len(ranges) // 2)
    token_off, blob = [0], bytearray()
    for t in tab["tokens"]:
        blob += t
        token_off.append(len(blob))
    blob = pad4(bytes(blob))
    chat = tab["chat"] or [""] * 5
    header = TOK_MAGIC + i32s([TOK_VERSION, len(tab["tokens"]), len(tab["merges"]), len(tab["added"]),
                               tab["bos_id"], tab["eos_id"], int(tab["add_bos"]), len(classes),
                               len(ranges) // 2, len(tab["steps"]), len(alt_off) - 1, len(atoms) // 4,
                               len(blob), int(tab["chat"] is not None)])
    header += unicode_versions().encode().ljust(16, b"\0")
    parts = [header, i32s(token_off), pad4(bytes(tab["flags"])), blob,
             i32s([v for _, a, b, new in tab["merges"] for v in (a, b, new)]), i32s(tab["byte_ids"]),
             i32s([v for a in tab["added"] for v in (a["id"], int(bool(a.get("normalized"))))]),
             i32s(class_off), struct.pack(f"<{len(ranges)}I", *ranges),
             i32s(step_off), i32s(alt_off), i32s(atoms)]
    parts += [i32s([len(s.encode())]) + pad4(s.encode()) for s in chat]
    return b"".join(parts)


MAX_TOKEN_ID = 1 << 24  # far above any real vocabulary (DeepSeek-V2: 102400); bounds the tables


def check_tokenizer_files(tj, cfg, tj_path, cfg_path):
    """What tokenizer_tables takes for granted: ids are integers in [0, MAX_TOKEN_ID), one
    vocabulary entry per id, special tokens are strings. Anything else: one error line."""
    model = tj.get("model") if isinstance(tj, dict) else None
    if not isinstance(model, dict):
        fail(f"{tj_path}: not a tokenizer.json (no 'model' object)")
    vocab = model.get("vocab")
    if not isinstance(vocab, dict) or not vocab:
        fail(f"{tj_path}: model.vocab is not a non-empty object of token -> id")
    owner = {}
    for tok, i in vocab.items():
        if not is_int(i) or not 0 <= i < MAX_TOKEN_ID:
            fail(f"{tj_path}: token {tok!r} has id {i!r}; expected an integer in [0, {MAX_TOKEN_ID})")
        if i in owner:
            fail(f"{tj_path}: tokens {owner[i]!r} and {tok!r} have the same id {i}")
        owner[i] = tok
    if not isinstance(model.get("merges"), list):
        fail(f"{tj_path}: model.merges is not a list")
    added = tj.get("added_tokens", [])
    if not isinstance(added, list):
        fail(f"{tj_path}: added_tokens is not a list")
    for a in added:
        if not (isinstance(a, dict) and isinstance(a.get("content"), str) and is_int(a.get("id"))
                and 0 <= a["id"] < MAX_TOKEN_ID):
            fail(f"{tj_path}: added token {a!r:.80}: expected a string 'content' and an integer 'id' "
                 f"in [0, {MAX_TOKEN_ID})")
    if not isinstance(cfg, dict):
        fail(f"{cfg_path}: not a JSON object")
    for key in ("bos_token", "eos_token"):
        v = cfg.get(key)
        if not (v is None or isinstance(v, str) or isinstance(v, dict) and isinstance(v.get("content"), str)):
            fail(f"{cfg_path}: {key} is {v!r:.80}; expected a string, {{\"content\": string}} or null")
    if not (cfg.get("add_bos_token") is None or isinstance(cfg["add_bos_token"], bool)):
        fail(f"{cfg_path}: add_bos_token is {cfg['add_bos_token']!r:.80}; expected true, false or null")


def read_tokenizer(hf_dir):
    """tokenizer.json + tokenizer_config.json in hf_dir -> the tables of tokenizer.bin, validated."""
    tj_path = os.path.join(hf_dir, "tokenizer.json")
    cfg_path = os.path.join(hf_dir, "tokenizer_config.json")
    tj = load_json(tj_path)
    cfg = load_json(cfg_path) if os.path.exists(cfg_path) else {}
    check_tokenizer_files(tj, cfg, tj_path, cfg_path)
    try:
        return tokenizer_tables(tj, cfg)
    except (KeyError, TypeError, AttributeError, IndexError) as e:
        fail(f"{tj_path}: unexpected structure ({type(e).__name__}: {e})")
    except ValueError as e:
        fail(f"{tj_path}: unsupported configuration: {e}")


def export_tokenizer(tab, out, out_path):
    """The tables -> tokenizer.bin in the open file out (the caller renames it to out_path)."""
    data = tokenizer_bytes(tab)
    out.write(data)
    return (f"wrote {out_path}: {len(tab['tokens'])} tokens, {len(tab['merges'])} merges, "
            f"{len(tab['added'])} added, {len(tab['steps'])} pre-tokenizer steps, "
            f"chat template {'yes' if tab['chat'] else 'no'}, unicode {unicode_versions()}, "
            f"{len(data)} bytes")


# ---------------- model file
#
# Layout (all little-endian; docs/FORMAT.md has the table):
#   header, HEADER_BYTES long: magic "DSV2", version, then the int32 fields of HEADER_INTS and
#   the float32 fields of HEADER_FLOATS in that order, zero padded;
#   then every tensor in the order of tensor_names(), each starting at a multiple of ALIGN,
#   row-major in the Hugging Face shape [out, in], as fp32, bf16 or q8 (the header's dtype;
#   tensor_dtype() says which tensors a q8 file keeps in fp32).

MAGIC = b"DSV2"
VERSION = 1
HEADER_BYTES = 256
ALIGN = 64
DTYPES = {"fp32": 0, "bf16": 1, "q8": 2}
Q8_BLOCK = 32                # q8: values per block, consecutive along a row (the input dimension)
Q8_BLOCK_BYTES = 2 + Q8_BLOCK  # an fp16 scale d, then 32 int8 q; value = d * q (llama.cpp's Q8_0)
HEADER_INTS = [
    "dtype", "dim", "n_layers", "n_heads", "vocab_size", "q_lora_rank", "kv_lora_rank",
    "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "intermediate_size",
    "moe_intermediate_size", "n_routed_experts", "n_shared_experts", "n_experts_per_tok",
    "first_k_dense_replace", "moe_layer_freq", "topk_method", "n_group", "topk_group",
    "norm_topk_prob", "max_position_embeddings", "rope_yarn", "original_max_position_embeddings",
    "bos_token_id", "eos_token_id",
]
HEADER_FLOATS = [
    "rms_norm_eps", "rope_theta", "routed_scaling_factor", "rope_factor", "beta_fast",
    "beta_slow", "mscale", "mscale_all_dim", "attention_factor",
]
TOPK_METHODS = {"greedy": 0, "group_limited_greedy": 1}


# Bounds of config.json's integers. The upper ones are far above DeepSeek-V2 236B (60 layers,
# hidden 5120, 128 heads, 160 experts, vocab 102400, 163840 positions); they stop a corrupt value
# (num_hidden_layers 100000000) before anything is sized from it, and keep the header's int32s exact.
CONFIG_INTS = {
    "hidden_size": (1, 1 << 16), "num_hidden_layers": (1, 1024), "num_attention_heads": (1, 1024),
    "num_key_value_heads": (1, 1024), "vocab_size": (1, MAX_TOKEN_ID), "q_lora_rank": (1, 1 << 16),
    "kv_lora_rank": (1, 1 << 16), "qk_nope_head_dim": (1, 4096), "qk_rope_head_dim": (2, 4096),
    "v_head_dim": (1, 4096), "intermediate_size": (1, 1 << 20), "moe_intermediate_size": (1, 1 << 20),
    "n_routed_experts": (1, 4096), "n_shared_experts": (0, 64), "num_experts_per_tok": (1, 4096),
    "first_k_dense_replace": (0, 1024), "moe_layer_freq": (1, 1024), "n_group": (1, 4096),
    "topk_group": (1, 4096), "max_position_embeddings": (1, 1 << 24),
    "original_max_position_embeddings": (1, 1 << 24),
}
FLOAT32_MAX = 3.4028234663852886e38


class ConfigReader:
    """Typed, bounded access to config.json (or its rope_scaling object); a field of the wrong
    type or out of range is one error line naming it. null counts as absent, as in transformers."""

    def __init__(self, d, where):
        self.d, self.where = d, where

    def bad(self, key, want):
        fail(f"{self.where}{key} is {self.d[key]!r:.60}; expected {want}")

    def present(self, key, default):
        if self.d.get(key) is None and default is None:
            fail(f"{self.where}{key} is missing")
        return self.d.get(key) is not None

    def integer(self, key, default=None):
        if not self.present(key, default):
            return default
        lo, hi = CONFIG_INTS[key]
        if not is_int(self.d[key]) or not lo <= self.d[key] <= hi:
            self.bad(key, f"an integer in [{lo}, {hi}]")
        return self.d[key]

    def number(self, key, default=None, low=None):
        """A finite number that fits a float32 (JSON integers welcome: rope_theta 10000);
        low: it must be above this."""
        if not self.present(key, default):
            return default
        v = self.d[key]
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not abs(v) <= FLOAT32_MAX:
            self.bad(key, "a finite number")
        if low is not None and not v > low:
            self.bad(key, f"a number above {low}")
        return float(v)

    def boolean(self, key, default):
        if not self.present(key, default):
            return default
        if not isinstance(self.d[key], bool):
            self.bad(key, "true or false")
        return self.d[key]


def read_config(hf_dir):
    """config.json -> dict of the header fields, every field type- and range-checked; refuses
    what dsv2.c does not implement."""
    path = os.path.join(hf_dir, "config.json")
    c = load_json(path)
    if not isinstance(c, dict):
        fail(f"{path}: not a JSON object")
    cfg = ConfigReader(c, f"{path}: ")

    if c.get("model_type") != "deepseek_v2":
        fail(f"{path}: model_type is {c.get('model_type')!r:.60}; dsv2 supports 'deepseek_v2' only")
    if c.get("scoring_func", "softmax") != "softmax":
        fail(f"{path}: scoring_func {c['scoring_func']!r:.60} is not supported (DeepSeek-V2 uses softmax)")
    method = c.get("topk_method", "greedy")
    if not isinstance(method, str) or method not in TOPK_METHODS:
        fail(f"{path}: topk_method {method!r:.60} is not supported (greedy or group_limited_greedy)")
    if c.get("hidden_act", "silu") != "silu":
        fail(f"{path}: hidden_act {c['hidden_act']!r:.60} is not supported (silu)")
    if cfg.boolean("attention_bias", False) or cfg.boolean("mlp_bias", False):
        fail(f"{path}: attention_bias / mlp_bias are not supported (DeepSeek-V2 has none)")
    if c.get("n_routed_experts") is None:
        fail(f"{path}: n_routed_experts is null (a dense model); dsv2 expects DeepSeekMoE layers")
    heads = cfg.integer("num_attention_heads")
    if cfg.integer("num_key_value_heads", heads) != heads:
        fail(f"{path}: num_key_value_heads must equal num_attention_heads under MLA")

    h = {k: 0 for k in HEADER_INTS}
    h.update({k: 0.0 for k in HEADER_FLOATS})
    h["dim"] = cfg.integer("hidden_size")
    h["n_layers"] = cfg.integer("num_hidden_layers")
    h["n_heads"] = heads
    h["vocab_size"] = cfg.integer("vocab_size")
    h["q_lora_rank"] = cfg.integer("q_lora_rank", 0)  # null (V2-Lite): no query compression
    for k in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
              "intermediate_size", "moe_intermediate_size", "n_routed_experts",
              "max_position_embeddings"):
        h[k] = cfg.integer(k)
    h["n_shared_experts"] = cfg.integer("n_shared_experts", 0)
    h["n_experts_per_tok"] = cfg.integer("num_experts_per_tok")
    h["first_k_dense_replace"] = cfg.integer("first_k_dense_replace", 0)
    h["moe_layer_freq"] = cfg.integer("moe_layer_freq", 1)
    h["topk_method"] = TOPK_METHODS[method]
    h["n_group"] = cfg.integer("n_group", 1)
    h["topk_group"] = cfg.integer("topk_group", 1)
    h["norm_topk_prob"] = int(cfg.boolean("norm_topk_prob", False))
    h["bos_token_id"] = token_id(c, "bos_token_id", h["vocab_size"], path)
    h["eos_token_id"] = token_id(c, "eos_token_id", h["vocab_size"], path)
    h["rms_norm_eps"] = cfg.number("rms_norm_eps", 1e-6, low=0.0)
    if h["rms_norm_eps"] >= 1:
        cfg.bad("rms_norm_eps", "a small positive number (1e-06)")
    h["rope_theta"] = cfg.number("rope_theta", 10000.0, low=0.0)
    h["routed_scaling_factor"] = cfg.number("routed_scaling_factor", 1.0, low=0.0)

    key = "rope_scaling" if c.get("rope_scaling") is not None else "rope_parameters"
    rs = c.get(key)
    if rs is not None and not isinstance(rs, dict):
        cfg.bad(key, "null or an object")
    rs = rs or {}
    rope = ConfigReader(rs, f"{path}: {key}.")
    rtype = rs.get("type") or rs.get("rope_type") or "default"
    if "rope_theta" in rs:
        h["rope_theta"] = rope.number("rope_theta", h["rope_theta"], low=0.0)
    if rtype == "yarn":
        h["rope_yarn"] = 1
        h["rope_factor"] = rope.number("factor")
        if h["rope_factor"] < 1:
            rope.bad("factor", "a number >= 1 (the context extension factor)")
        h["original_max_position_embeddings"] = rope.integer("original_max_position_embeddings")
        # transformers reads these with `or`: 0 means the default, as here
        h["beta_fast"] = rope.number("beta_fast", 0.0) or 32.0
        h["beta_slow"] = rope.number("beta_slow", 0.0) or 1.0
        for beta in ("beta_fast", "beta_slow"):
            if h[beta] < 0:
                rope.bad(beta, "a positive number (a count of rotations)")
        h["mscale"] = rope.number("mscale", 0.0)
        h["mscale_all_dim"] = rope.number("mscale_all_dim", 0.0)
        h["attention_factor"] = rope.number("attention_factor", 0.0)
        if rs.get("attention_factor") is not None and h["attention_factor"] <= 0:
            rope.bad("attention_factor", "null or a positive number")
    elif rtype != "default":
        fail(f"{path}: rope_scaling type {rtype!r:.60} is not supported (none or yarn)")

    if h["n_routed_experts"] % h["n_group"]:
        fail(f"{path}: n_routed_experts {h['n_routed_experts']} is not divisible by n_group {h['n_group']}")
    if not 0 < h["topk_group"] <= h["n_group"] or not 0 < h["n_experts_per_tok"] <= h["n_routed_experts"]:
        fail(f"{path}: topk_group / num_experts_per_tok out of range")
    if h["qk_rope_head_dim"] % 2:
        fail(f"{path}: qk_rope_head_dim must be even")
    h["tie_word_embeddings"] = cfg.boolean("tie_word_embeddings", False)
    return h


def token_id(c, key, vocab_size, path):
    """bos_token_id / eos_token_id -> an id in the vocabulary, or -1 for null/absent.
    An eos_token_id list means, in transformers, "stop at any of these"; the model file has one
    EOS slot (informational: dsv2 stops at tokenizer.bin's EOS), so a list of one id is that id,
    [] is none, and a longer list is refused rather than silently cut to its first id."""
    v = c.get(key)
    if key == "eos_token_id" and isinstance(v, list):
        if len(v) > 1:
            fail(f"{path}: eos_token_id lists {len(v)} ids {v!r:.60}; the dsv2 file stores one: "
                 "keep the id that ends a turn")
        v = v[0] if v else None
    if v is None:
        return -1
    if not is_int(v) or not 0 <= v < vocab_size:
        fail(f"{path}: {key} is {v!r:.60}; expected null or an integer in [0, vocab_size {vocab_size})")
    return v


def is_moe_layer(h, l):
    # the original hub code's rule (transformers' native class ignores moe_layer_freq)
    return l >= h["first_k_dense_replace"] and l % h["moe_layer_freq"] == 0


def tensor_names(h):
    """Yields (hub tensor name, shape) in file order; dsv2.c's map_weights() walks the same order.
    A generator, so that checking a checkpoint against a corrupt config stops at the first missing
    tensor instead of listing millions."""
    d, nh = h["dim"], h["n_heads"]
    qk_head = h["qk_nope_head_dim"] + h["qk_rope_head_dim"]
    yield "model.embed_tokens.weight", (h["vocab_size"], d)
    for l in range(h["n_layers"]):
        p = f"model.layers.{l}."
        yield p + "input_layernorm.weight", (d,)
        if h["q_lora_rank"]:
            yield p + "self_attn.q_a_proj.weight", (h["q_lora_rank"], d)
            yield p + "self_attn.q_a_layernorm.weight", (h["q_lora_rank"],)
            yield p + "self_attn.q_b_proj.weight", (nh * qk_head, h["q_lora_rank"])
        else:
            yield p + "self_attn.q_proj.weight", (nh * qk_head, d)
        yield p + "self_attn.kv_a_proj_with_mqa.weight", (h["kv_lora_rank"] + h["qk_rope_head_dim"], d)
        yield p + "self_attn.kv_a_layernorm.weight", (h["kv_lora_rank"],)
        yield p + "self_attn.kv_b_proj.weight", (nh * (h["qk_nope_head_dim"] + h["v_head_dim"]), h["kv_lora_rank"])
        yield p + "self_attn.o_proj.weight", (d, nh * h["v_head_dim"])
        yield p + "post_attention_layernorm.weight", (d,)
        if is_moe_layer(h, l):
            mi = h["moe_intermediate_size"]
            yield p + "mlp.gate.weight", (h["n_routed_experts"], d)
            for e in range(h["n_routed_experts"]):
                q = f"{p}mlp.experts.{e}."
                yield from [(q + "gate_proj.weight", (mi, d)), (q + "up_proj.weight", (mi, d)),
                            (q + "down_proj.weight", (d, mi))]
            if h["n_shared_experts"]:
                si = mi * h["n_shared_experts"]
                q = p + "mlp.shared_experts."
                yield from [(q + "gate_proj.weight", (si, d)), (q + "up_proj.weight", (si, d)),
                            (q + "down_proj.weight", (d, si))]
        else:
            fi = h["intermediate_size"]
            q = p + "mlp."
            yield from [(q + "gate_proj.weight", (fi, d)), (q + "up_proj.weight", (fi, d)),
                        (q + "down_proj.weight", (d, fi))]
    yield "model.norm.weight", (d,)
    yield "lm_head.weight", (h["vocab_size"], d)


def pack_header(h, dtype):
    h = dict(h, dtype=DTYPES[dtype])
    body = MAGIC + struct.pack("<I", VERSION)
    body += struct.pack(f"<{len(HEADER_INTS)}i", *[int(h[k]) for k in HEADER_INTS])
    body += struct.pack(f"<{len(HEADER_FLOATS)}f", *[float(h[k]) for k in HEADER_FLOATS])
    assert len(body) <= HEADER_BYTES
    return body + b"\0" * (HEADER_BYTES - len(body))


# safetensors' dtypes and their element sizes (export.py converts BF16, F16 and F32 tensors)
ST_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2,
                  "F16": 2, "BF16": 2, "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8}
ST_MAX_HEADER = 100_000_000  # the safetensors library's own limit on the header's JSON


def _no_duplicate_keys(pairs):
    d = dict(pairs)
    if len(d) != len(pairs):
        names = [k for k, _ in pairs]
        raise ValueError(f"{next(k for k in names if names.count(k) > 1)!r} appears twice")
    return d


def read_safetensors_header(path):
    """A safetensors file's tensors, checked against the file before any is read:
    {name: (dtype, shape, start, end)}, start/end absolute offsets in the file.
    Layout: u64 header length n, n bytes of JSON {name: {dtype, shape, data_offsets: [start, end]}}
    (offsets relative to the data after the header), the data."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                fail(f"{path}: not a safetensors file ({size} bytes, no 8-byte header length)")
            n = struct.unpack("<Q", head)[0]
            if n > size - 8:
                fail(f"{path}: header length {n} is past the end of the file ({size} bytes): "
                     "truncated, or not safetensors")
            if n > ST_MAX_HEADER:
                fail(f"{path}: header length {n} is above the safetensors limit of {ST_MAX_HEADER} bytes")
            raw = f.read(n)
    except OSError as e:
        fail(f"{path}: cannot read ({e.strerror})")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except ValueError as e:  # UnicodeDecodeError included
        fail(f"{path}: the header is not valid JSON ({e})")
    except RecursionError:
        fail(f"{path}: the header is not valid JSON (nested too deeply)")
    if not isinstance(header, dict):
        fail(f"{path}: the header is not a JSON object")
    if not isinstance(header.get("__metadata__", {}), dict):
        fail(f"{path}: __metadata__ is not an object")
    data_start, data_size = 8 + n, size - 8 - n
    tensors = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        where = f"{path}: tensor {name}"
        if not isinstance(t, dict):
            fail(f"{where}: its entry is not an object")
        dtype, shape, offsets = t.get("dtype"), t.get("shape"), t.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in ST_DTYPE_BYTES:
            fail(f"{where}: unknown dtype {dtype!r:.40}")
        if not isinstance(shape, list) or not all(is_int(s) and s >= 0 for s in shape):
            fail(f"{where}: shape {shape!r:.60} is not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_int(o) for o in offsets)):
            fail(f"{where}: data_offsets {offsets!r:.60} is not a pair of integers")
        start, end = offsets
        if not 0 <= start <= end:
            fail(f"{where}: data_offsets [{start}, {end}] are not 0 <= start <= end")
        if end > data_size:
            fail(f"{where}: data_offsets end {end} is past the {data_size} bytes of data (truncated file?)")
        need = _numel(shape) * ST_DTYPE_BYTES[dtype]
        if end - start != need:
            fail(f"{where}: {end - start} bytes of data, but {dtype} {shape} needs {need}")
        tensors[name] = (dtype, tuple(shape), data_start + start, data_start + end)
    # no two tensors may share bytes (gaps between them are harmless and allowed)
    spans = sorted((start, end, name) for name, (_, _, start, end) in tensors.items() if end > start)
    for (_, end0, a), (start1, _, b) in zip(spans, spans[1:]):
        if start1 < end0:
            fail(f"{path}: tensors {a} and {b} overlap ({end0 - start1} bytes in common)")
    return tensors


def read_shard_index(path, hf_dir):
    """model.safetensors.index.json -> its weight_map {tensor name: shard file name}, checked."""
    index = load_json(path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        fail(f"{path}: no 'weight_map' object of tensor name -> shard file")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or os.path.basename(shard) != shard or shard in ("", ".", ".."):
            fail(f"{path}: tensor {name}: {shard!r:.60} is not a file name in {hf_dir}")
    return weight_map


class SafeTensors:
    """Index of the tensors in model.safetensors or model-*.safetensors (every header checked
    when opened); reads one tensor at a time."""

    def __init__(self, hf_dir):
        index = os.path.join(hf_dir, "model.safetensors.index.json")
        single = os.path.join(hf_dir, "model.safetensors")
        weight_map = None
        if os.path.exists(index):
            weight_map = read_shard_index(index, hf_dir)
            files = sorted(set(weight_map.values()))
            for shard in files:
                if not os.path.isfile(os.path.join(hf_dir, shard)):
                    fail(f"{index}: lists shard {shard}, which is not a file in {hf_dir}")
        elif os.path.exists(single):
            files = ["model.safetensors"]
        else:
            fail(f"{hf_dir}: no model.safetensors or model.safetensors.index.json")
        self.where = {}  # name -> (path, dtype, shape, start, end)
        for shard in files:
            path = os.path.join(hf_dir, shard)
            for name, (dtype, shape, start, end) in read_safetensors_header(path).items():
                if name in self.where:
                    fail(f"{path}: tensor {name} is also in {self.where[name][0]}")
                if weight_map is not None and weight_map.get(name) != shard:
                    fail(f"{path}: has tensor {name}, which {index} "
                         f"{'puts in ' + weight_map[name] if name in weight_map else 'does not list'}")
                self.where[name] = (path, dtype, shape, start, end)
        for name, shard in (weight_map or {}).items():
            if name not in self.where:
                fail(f"{index}: lists tensor {name} in {shard}, which has no such tensor")

    def __contains__(self, name):
        return name in self.where

    def stream(self, name, shape, chunk_elems=1 << 24):
        """Yield the tensor's values as little-endian float32 bytes, chunk by chunk."""
        if name not in self.where:
            fail(f"tensor {name} not found in the checkpoint")
        path, dtype, got, start, end = self.where[name]
        if tuple(got) != tuple(shape):
            fail(f"tensor {name} has shape {list(got)}, expected {list(shape)} from config.json")
        width = {"BF16": 2, "F16": 2, "F32": 4}.get(dtype)
        if width is None:
            fail(f"tensor {name}: dtype {dtype} is not supported (BF16, F16, F32)")
        with open(path, "rb") as f:
            f.seek(start)
            left = end - start
            while left:
                raw = f.read(min(left, chunk_elems * width))
                if not raw:
                    fail(f"{path}: unexpected end of file in {name}")
                left -= len(raw)
                yield dtype, raw


# ---------------- tensor data: conversions in bulk
#
# The standard library has no vector arithmetic, so the conversions do their per-value work in
# operations implemented in C over a whole chunk (big-integer arithmetic, bytes.translate,
# extended slices, array, struct), not in a Python statement per value.

BIG_ENDIAN = sys.byteorder == "big"  # the arrays below are byte-swapped there: files are little-endian


def floats(raw):
    """little-endian float32 bytes -> array('f')"""
    a = array.array("f", raw)
    if BIG_ENDIAN:
        a.byteswap()
    return a


def le_bytes(a):
    """an array -> its little-endian bytes"""
    if BIG_ENDIAN:
        a = array.array(a.typecode, a)
        a.byteswap()
    return a.tobytes()


def byte_table(f):
    """a bytes.translate table: byte b -> f(b)"""
    return bytes(f(b) for b in range(256))


def bf16_to_f32(raw):
    """bf16 -> fp32 is a byte shuffle: the bf16 bits are the high half of the fp32 bits."""
    out = bytearray(2 * len(raw))
    out[2::4] = raw[0::2]
    out[3::4] = raw[1::2]
    return bytes(out)


def bits(b):
    """bytes as one big integer (little-endian): bitwise operations on it work on all bytes at once"""
    return int.from_bytes(b, "little")


EXP_HIGH_ONES = byte_table(lambda b: 0xFF if b & 0x7F == 0x7F else 0)  # byte 3: the exponent's 7 high bits set
EXP_LOW_ONE = byte_table(lambda b: 0xFF if b & 0x80 else 0)            # byte 2: the exponent's low bit set
ABOVE_HALF = byte_table(lambda b: 1 if b > 0x80 else 0)
IS_HALF = byte_table(lambda b: 1 if b == 0x80 else 0)
NONZERO = byte_table(lambda b: 1 if b else 0)
ODD = byte_table(lambda b: b & 1)


def f32_to_bf16(raw):
    """fp32 -> bf16, rounding to nearest even (as torch does); NaN stays NaN.

    The bf16 is the fp32's high half (bytes 2, 3), plus 1 where the low half (bytes 0, 1) is
    above 0x8000, or exactly 0x8000 with the high half odd. Each byte column is one bytes object
    (raw[k::4]); the tests are byte tables, combined as big integers."""
    n = len(raw) // 4
    b0, b1, b2, b3 = raw[0::4], raw[1::4], raw[2::4], raw[3::4]
    inf_nan = bits(b3.translate(EXP_HIGH_ONES)) & bits(b2.translate(EXP_LOW_ONE))  # exponent all ones
    up = bits(b1.translate(ABOVE_HALF)) | (bits(b1.translate(IS_HALF)) & (bits(b0.translate(NONZERO)) | bits(b2.translate(ODD))))
    up &= ~inf_nan  # (an inf never rounds up; a NaN is redone below)
    ups, high = bytearray(2 * n), bytearray(2 * n)
    ups[0::2] = up.to_bytes(n, "little")
    high[0::2], high[1::2] = b2, b3
    out = bytearray((bits(high) + bits(ups)).to_bytes(2 * n, "little"))  # no carry leaves its 16 bits
    if inf_nan:  # rare: NaN keeps its high half with the quiet bit set, as torch does
        marks = inf_nan.to_bytes(n, "little")
        i = marks.find(0xFF)
        while i >= 0:
            w = int.from_bytes(raw[4 * i:4 * i + 4], "little")
            if w & 0x7FFFFF:
                out[2 * i:2 * i + 2] = ((w >> 16) | 0x40).to_bytes(2, "little")
            i = marks.find(0xFF, i + 1)
    return bytes(out)


def f16_to_f32(raw):
    vals = struct.unpack(f"<{len(raw) // 2}e", raw)
    return struct.pack(f"<{len(vals)}f", *vals)


# q8: llama.cpp's Q8_0, computed exactly as ggml's quantize_row_q8_0_ref does in float32, so
# that the same weights give the same bytes as llama.cpp's own quantizer:
#   amax = max |x| over the block;  d = amax / 127;  id = d ? 1/d : 0;  q = roundf(x * id)
#   stored: d as fp16 (round to nearest even), then the 32 q as int8
# Float32 steps: a float32 division (amax / 127, 1 / d) done in double and rounded to float32
# gives the float32 result (double has more than twice float32's precision), and the product of
# two float32s is exact in double, so storing it into an array('f') rounds it as float32 would.
# roundf(y) for 0 <= y < 128 is floor(y + 0.5): the integer part plus the first bit after the
# point, both inside y's high 16 bits (sign, exponent, 7 mantissa bits). So it is a byte table
# on the second-highest byte for each value of the highest byte; y < 0.5 when the highest byte
# is below 63 (exponent < 126).
CLEAR_SIGN = byte_table(lambda b: b & 0x7F)
SIGN_MASK = byte_table(lambda b: 0xFF if b & 0x80 else 0)
NEGATE = byte_table(lambda b: -b & 0xFF)


def _roundf_tables():
    tables = []
    for top in (63, 64, 65, 66):  # y in [0.5, 2), [2, 8), [8, 32), [32, 128)
        def rounded(b):
            y = struct.unpack("<f", bytes([0, 0, b, top]))[0]
            return int(y + 0.5) if y < 128 else 0
        tables.append((byte_table(lambda b: 0xFF if b == top else 0), byte_table(rounded)))
    return tables


ROUNDF_TABLES = _roundf_tables()


def f32_to_q8(raw):
    """float32 values (a multiple of 32, rows of whole blocks) -> Q8_0 blocks"""
    n = len(raw) // 4
    nb = n // Q8_BLOCK
    if n % Q8_BLOCK:
        raise ValueError(f"q8 needs whole blocks of {Q8_BLOCK} values, got {n}")
    # |x|: clear the sign bits; as uint32 the same values compare in the same order
    absolute = bytearray(raw)
    absolute[3::4] = raw[3::4].translate(CLEAR_SIGN)
    words = array.array("I", absolute)
    if BIG_ENDIAN:
        words.byteswap()
    blocks = memoryview(words)
    amax = array.array("f", array.array("I", [max(blocks[i:i + Q8_BLOCK]) for i in range(0, n, Q8_BLOCK)]).tobytes())
    d = array.array("f", [m / 127 for m in amax])
    inv = array.array("f", [1 / v if v else 0.0 for v in d])
    inv_per_value = array.array("f", bytes(4 * n))
    for k in range(Q8_BLOCK):
        inv_per_value[k::Q8_BLOCK] = inv
    y = le_bytes(array.array("f", map(operator.mul, floats(absolute), inv_per_value)))  # |x| * id
    q = 0  # roundf(|x| * id), one byte a value
    for is_top, table in ROUNDF_TABLES:
        q |= bits(y[2::4].translate(table)) & bits(y[3::4].translate(is_top))
    negative = bits(raw[3::4].translate(SIGN_MASK))
    minus_q = bits(q.to_bytes(n, "little").translate(NEGATE))
    qs = ((q & ~negative) | (minus_q & negative)).to_bytes(n, "little")  # int8 two's complement
    try:
        scales = struct.pack(f"<{nb}e", *d)
    except OverflowError:
        raise ValueError("a weight is too large for q8's fp16 scale (|w| > 8.3e6)") from None
    out = bytearray(nb * Q8_BLOCK_BYTES)
    out[0::Q8_BLOCK_BYTES] = scales[0::2]
    out[1::Q8_BLOCK_BYTES] = scales[1::2]
    for k in range(Q8_BLOCK):
        out[2 + k::Q8_BLOCK_BYTES] = qs[k::Q8_BLOCK]
    return bytes(out)


def convert(dtype_in, raw, dtype_out):
    """a chunk of checkpoint values (BF16, F16 or F32 bytes) -> the bytes of dtype_out"""
    if dtype_in == "BF16" and dtype_out == "bf16":
        return raw
    f32 = raw if dtype_in == "F32" else bf16_to_f32(raw) if dtype_in == "BF16" else f16_to_f32(raw)
    if dtype_out == "bf16":
        return f32_to_bf16(f32)
    return f32_to_q8(f32) if dtype_out == "q8" else f32


def tensor_dtype(name, shape, dtype):
    """How a file of this dtype stores one tensor. A q8 file keeps in fp32: the vectors (RMSNorm
    weights, read once per token: no gain), the router (mlp.gate: its top-k picks experts, and a
    small error there moves a token to another expert) and any matrix whose rows are not whole
    blocks of 32 (none in DeepSeek-V2 or -Lite; the small test fixtures have some)."""
    if dtype != "q8":
        return dtype
    if len(shape) == 2 and shape[1] % Q8_BLOCK == 0 and not name.endswith("mlp.gate.weight"):
        return "q8"
    return "fp32"


def tensor_bytes(shape, tdtype):
    n = _numel(shape)
    return n // Q8_BLOCK * Q8_BLOCK_BYTES if tdtype == "q8" else n * (2 if tdtype == "bf16" else 4)


# buffers some checkpoints store; dsv2 computes them from config.json
IGNORED_TENSORS = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
CONVERTED_DTYPES = ("BF16", "F16", "F32")


def read_model(hf_dir):
    """config.json + the safetensors -> (header fields, checkpoint, [(name, shape)] in file order),
    all checked before anything is written: every tensor of the model config.json describes is
    present with its shape and a dtype export.py converts, and no tensor is left unaccounted for
    (a checkpoint with more layers or experts than the config is the wrong checkpoint)."""
    h = read_config(hf_dir)
    st = SafeTensors(hf_dir)
    for l in range(h["n_layers"]):  # the checkpoint must have each layer and agree with the dense/MoE rule
        p = f"model.layers.{l}."
        if p + "input_layernorm.weight" not in st:
            fail(f"{hf_dir}: config.json says {h['n_layers']} layers, the checkpoint has no {p}input_layernorm.weight")
        has_gate = p + "mlp.gate.weight" in st
        if has_gate != is_moe_layer(h, l):
            fail(f"layer {l}: config.json says {'MoE' if is_moe_layer(h, l) else 'dense'} "
                 f"but the checkpoint {'has' if has_gate else 'lacks'} mlp.gate.weight")
    names = []
    for name, shape in tensor_names(h):
        if name == "lm_head.weight" and h["tie_word_embeddings"] and name not in st:
            name = "model.embed_tokens.weight"  # tied: the head is the embedding
        if name not in st:
            fail(f"{hf_dir}: tensor {name} {list(shape)} is missing from the checkpoint")
        path, dtype, got = st.where[name][:3]
        if got != shape:
            fail(f"{path}: tensor {name} has shape {list(got)}, expected {list(shape)} from config.json")
        if dtype not in CONVERTED_DTYPES:
            fail(f"{path}: tensor {name} is {dtype}; export.py converts {', '.join(CONVERTED_DTYPES)}")
        names.append((name, shape))
    used = {name for name, _ in names}
    extra = sorted(name for name in st.where if name not in used and not IGNORED_TENSORS.fullmatch(name))
    if extra:
        fail(f"{st.where[extra[0]][0]}: tensor {extra[0]}{f' and {len(extra) - 1} more' if len(extra) > 1 else ''} "
             "not part of the model config.json describes: checkpoint and config.json do not match")
    return h, st, names


def end_progress():
    global _progress_open
    if _progress_open:
        print(file=sys.stderr)
        _progress_open = False


def export_model(h, st, names, out, out_path, dtype):
    """The checked model -> the dsv2 file in the open file out (the caller renames it to out_path)."""
    global _progress_open
    total = sum(_numel(s) for _, s in names)
    done, t0, last = 0, time.time(), 0.0
    out.write(pack_header(h, dtype))
    for name, shape in names:
        out.write(b"\0" * (-out.tell() % ALIGN))
        tdtype = tensor_dtype(name, shape, dtype)
        for dt, raw in st.stream(name, shape):
            out.write(convert(dt, raw, tdtype))
        done += _numel(shape)
        if time.time() - last > 1.0 or done == total:
            last = time.time()
            print(f"\rexport.py: {done / total:6.1%} of {total / 1e6:.1f}M parameters, "
                  f"{done / max(last - t0, 1e-9) / 1e6:.1f}M parameters/s", end="", file=sys.stderr)
            _progress_open = True
    return f"export.py: wrote {out_path} ({out.tell() / 2**20:.1f} MiB, {dtype})"


class Outputs:
    """The output files: each is written beside its final name as NAME.PID.tmp and renamed into
    place only when all of them are complete; discard() removes the rest (error, Ctrl-C)."""

    def __init__(self):
        self.pending = []  # (temporary path, final path, open file)

    def create(self, path):
        tmp = f"{path}.{os.getpid()}.tmp"
        f = open(tmp, "xb")
        self.pending.append((tmp, path, f))
        return f

    def commit(self):
        for _, _, f in self.pending:
            f.close()
        for tmp, path, _ in self.pending:
            os.replace(tmp, path)
        self.pending = []

    def discard(self):
        for tmp, _, f in self.pending:
            f.close()
            try:
                os.remove(tmp)
            except OSError:
                pass
        self.pending = []


def check_output_path(path):
    """Refuse an output path that cannot be written, before any work."""
    parent = os.path.dirname(path) or "."
    if os.path.isdir(path):
        fail(f"{path}: is a directory; give the output file's name")
    if not os.path.exists(parent):
        fail(f"{path}: directory {parent} does not exist")
    if not os.path.isdir(parent):
        fail(f"{path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK):
        fail(f"{path}: directory {parent} is not writable")


def _numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other error (argparse's own adds the usage)
        fail(f"{message}; see python3 export.py -h")


def _terminated(signum, frame):
    raise KeyboardInterrupt


def export(args):
    if not args.model_out and not args.tokenizer:
        fail("nothing to do: give MODEL_OUT and/or --tokenizer TOK_OUT")
    if not os.path.isdir(args.hf_dir):
        fail(f"{args.hf_dir}: not a directory")
    outs = [p for p in (args.model_out, args.tokenizer) if p]
    for path in outs:
        check_output_path(path)
    if len(outs) == 2 and os.path.realpath(outs[0]) == os.path.realpath(outs[1]):
        fail(f"{args.model_out}: the model and the tokenizer cannot be written to the same file")
    # everything is read and checked first: an error leaves no file behind
    tab = read_tokenizer(args.hf_dir) if args.tokenizer else None
    model = read_model(args.hf_dir) if args.model_out else None
    if tab and model and len(tab["tokens"]) > model[0]["vocab_size"]:
        fail(f"{args.hf_dir}: tokenizer.json has {len(tab['tokens'])} tokens, config.json's vocab_size "
             f"is {model[0]['vocab_size']}: they do not belong together")
    outputs = Outputs()
    try:
        done = []
        if model:
            done.append((sys.stderr, export_model(*model, outputs.create(args.model_out), args.model_out, args.dtype)))
        if tab:
            done.append((sys.stdout, export_tokenizer(tab, outputs.create(args.tokenizer), args.tokenizer)))
        outputs.commit()
    except OSError as e:  # a file that cannot be created, a full disk, a read error
        if e.filename:
            fail(f"{e.filename}: {e.strerror or e}")
        fail(f"{outputs.pending[-1][1] if outputs.pending else args.model_out}: cannot write ({e.strerror or e})")
    finally:
        outputs.discard()
    end_progress()
    for stream, line in done:
        print(line, file=stream)


def main():
    ap = ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("hf_dir", help="Hugging Face model directory (config.json, *.safetensors, tokenizer.json)")
    ap.add_argument("model_out", nargs="?", help="output model file")
    ap.add_argument("--tokenizer", metavar="TOK_OUT", help="also write tokenizer.bin here")
    ap.add_argument("--dtype", choices=["fp32", "bf16", "q8"], default="fp32",
                    help="weight type in the model file (q8: int8 blocks of 32 with an fp16 scale, "
                         "llama.cpp's Q8_0; docs/FORMAT.md)")
    signal.signal(signal.SIGTERM, _terminated)
    try:
        export(ap.parse_args())
    except KeyboardInterrupt:
        fail("interrupted; no file written")
    except MemoryError:
        fail("out of memory")
    except RecursionError:
        fail("input nested too deeply")
    except Exception as e:  # a case the checks above missed: still one line, and a bug to report
        fail(f"unexpected {type(e).__name__}: {e} (a bug in export.py: please report it with the checkpoint's config.json)")


if __name__ == "__main__":
    main()
