#!/usr/bin/env python3
"""export.py: a Hugging Face DeepSeek-V2 directory -> one dsv2 model file and/or tokenizer.bin.

  python3 export.py HF_DIR [MODEL_OUT] [--tokenizer TOK_OUT] [--dtype fp32|bf16]

Standard library only. The model file is written tensor by tensor (peak memory is one chunk of
one tensor, not the checkpoint); docs/FORMAT.md describes it. tokenizer.bin's layout is
described in the tokenizer section below.
"""
import argparse
import array
import json
import os
import re
import struct
import sys
import time


def fail(msg):
    print(f"export.py: error: {msg}", file=sys.stderr)
    sys.exit(1)


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


def load_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as e:
        fail(f"{path}: cannot read ({e.strerror})")
    except (ValueError, UnicodeDecodeError) as e:
        fail(f"{path}: not valid JSON ({e})")


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


def export_tokenizer(hf_dir, out_path):
    """tokenizer.json + tokenizer_config.json in hf_dir -> out_path (tokenizer.bin)."""
    tj_path = os.path.join(hf_dir, "tokenizer.json")
    cfg_path = os.path.join(hf_dir, "tokenizer_config.json")
    tj = load_json(tj_path)
    cfg = load_json(cfg_path) if os.path.exists(cfg_path) else {}
    try:
        tab = tokenizer_tables(tj, cfg)
    except (KeyError, TypeError, AttributeError, IndexError) as e:
        fail(f"{tj_path}: unexpected structure ({type(e).__name__}: {e})")
    except ValueError as e:
        fail(f"{tj_path}: unsupported configuration: {e}")
    data = tokenizer_bytes(tab)
    with open(out_path, "wb") as f:
        f.write(data)
    print(f"wrote {out_path}: {len(tab['tokens'])} tokens, {len(tab['merges'])} merges, "
          f"{len(tab['added'])} added, {len(tab['steps'])} pre-tokenizer steps, "
          f"chat template {'yes' if tab['chat'] else 'no'}, unicode {unicode_versions()}, "
          f"{len(data)} bytes")



# ---------------- model file
#
# Layout (all little-endian; docs/FORMAT.md has the table):
#   header, HEADER_BYTES long: magic "DSV2", version, then the int32 fields of HEADER_INTS and
#   the float32 fields of HEADER_FLOATS in that order, zero padded;
#   then every tensor in the order of tensor_names(), each starting at a multiple of ALIGN,
#   as fp32 or bf16 (the header's dtype), row-major in the Hugging Face shape [out, in].

MAGIC = b"DSV2"
VERSION = 1
HEADER_BYTES = 256
ALIGN = 64
DTYPES = {"fp32": 0, "bf16": 1}
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


def read_config(hf_dir):
    """config.json -> dict of the header fields; refuses what dsv2.c does not implement."""
    path = os.path.join(hf_dir, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            c = json.load(f)
    except OSError as e:
        fail(f"{path}: cannot read ({e.strerror})")
    except json.JSONDecodeError as e:
        fail(f"{path}: not valid JSON ({e})")

    def need(key):
        if c.get(key) is None:
            fail(f"{path}: missing '{key}'")
        return c[key]

    if c.get("model_type") != "deepseek_v2":
        fail(f"{path}: model_type is {c.get('model_type')!r}; dsv2 supports 'deepseek_v2' only")
    if c.get("scoring_func", "softmax") != "softmax":
        fail(f"{path}: scoring_func {c['scoring_func']!r} is not supported (DeepSeek-V2 uses softmax)")
    method = c.get("topk_method", "greedy")
    if method not in TOPK_METHODS:
        fail(f"{path}: topk_method {method!r} is not supported (greedy or group_limited_greedy)")
    if c.get("hidden_act", "silu") != "silu":
        fail(f"{path}: hidden_act {c['hidden_act']!r} is not supported (silu)")
    if c.get("attention_bias") or c.get("mlp_bias"):
        fail(f"{path}: attention_bias / mlp_bias are not supported (DeepSeek-V2 has none)")
    if c.get("n_routed_experts") is None:
        fail(f"{path}: n_routed_experts is null (a dense model); dsv2 expects DeepSeekMoE layers")
    heads = need("num_attention_heads")
    if c.get("num_key_value_heads", heads) != heads:
        fail(f"{path}: num_key_value_heads must equal num_attention_heads under MLA")

    h = {k: 0 for k in HEADER_INTS}
    h.update({k: 0.0 for k in HEADER_FLOATS})
    h["dim"] = need("hidden_size")
    h["n_layers"] = need("num_hidden_layers")
    h["n_heads"] = heads
    h["vocab_size"] = need("vocab_size")
    h["q_lora_rank"] = c.get("q_lora_rank") or 0
    for k in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
              "intermediate_size", "moe_intermediate_size", "n_routed_experts",
              "max_position_embeddings"):
        h[k] = need(k)
    h["n_shared_experts"] = c.get("n_shared_experts") or 0
    h["n_experts_per_tok"] = need("num_experts_per_tok")
    h["first_k_dense_replace"] = c.get("first_k_dense_replace", 0)
    h["moe_layer_freq"] = c.get("moe_layer_freq", 1)
    h["topk_method"] = TOPK_METHODS[method]
    h["n_group"] = c.get("n_group") or 1
    h["topk_group"] = c.get("topk_group") or 1
    h["norm_topk_prob"] = int(bool(c.get("norm_topk_prob", False)))
    h["bos_token_id"] = c["bos_token_id"] if isinstance(c.get("bos_token_id"), int) else -1
    eos = c.get("eos_token_id")
    h["eos_token_id"] = eos if isinstance(eos, int) else (eos[0] if isinstance(eos, list) and eos else -1)
    h["rms_norm_eps"] = c.get("rms_norm_eps", 1e-6)
    h["rope_theta"] = c.get("rope_theta", 10000.0)
    h["routed_scaling_factor"] = c.get("routed_scaling_factor", 1.0)

    rs = c.get("rope_scaling") or c.get("rope_parameters")
    rtype = (rs or {}).get("type", (rs or {}).get("rope_type", "default"))
    if rs and "rope_theta" in rs:
        h["rope_theta"] = rs["rope_theta"]
    if rtype == "yarn":
        h["rope_yarn"] = 1
        h["rope_factor"] = need_in(rs, "factor", path)
        h["original_max_position_embeddings"] = need_in(rs, "original_max_position_embeddings", path)
        h["beta_fast"] = rs.get("beta_fast") or 32.0
        h["beta_slow"] = rs.get("beta_slow") or 1.0
        h["mscale"] = rs.get("mscale") or 0.0
        h["mscale_all_dim"] = rs.get("mscale_all_dim") or 0.0
        h["attention_factor"] = rs.get("attention_factor") or 0.0
    elif rtype not in (None, "default"):
        fail(f"{path}: rope_scaling type {rtype!r} is not supported (none or yarn)")

    if h["n_routed_experts"] % h["n_group"]:
        fail(f"{path}: n_routed_experts {h['n_routed_experts']} is not divisible by n_group {h['n_group']}")
    if not 0 < h["topk_group"] <= h["n_group"] or not 0 < h["n_experts_per_tok"] <= h["n_routed_experts"]:
        fail(f"{path}: topk_group / num_experts_per_tok out of range")
    if h["qk_rope_head_dim"] % 2:
        fail(f"{path}: qk_rope_head_dim must be even")
    if h["moe_layer_freq"] < 1:
        fail(f"{path}: moe_layer_freq must be >= 1")
    h["tie_word_embeddings"] = bool(c.get("tie_word_embeddings", False))
    return h


def need_in(d, key, path):
    if d.get(key) is None:
        fail(f"{path}: rope_scaling has no '{key}'")
    return d[key]


def is_moe_layer(h, l):
    # the original hub code's rule (transformers' native class ignores moe_layer_freq)
    return l >= h["first_k_dense_replace"] and l % h["moe_layer_freq"] == 0


def tensor_names(h):
    """(hub tensor name, shape) in file order; dsv2.c's map_weights() walks the same order."""
    d, nh = h["dim"], h["n_heads"]
    qk_head = h["qk_nope_head_dim"] + h["qk_rope_head_dim"]
    out = [("model.embed_tokens.weight", (h["vocab_size"], d))]
    for l in range(h["n_layers"]):
        p = f"model.layers.{l}."
        out.append((p + "input_layernorm.weight", (d,)))
        if h["q_lora_rank"]:
            out.append((p + "self_attn.q_a_proj.weight", (h["q_lora_rank"], d)))
            out.append((p + "self_attn.q_a_layernorm.weight", (h["q_lora_rank"],)))
            out.append((p + "self_attn.q_b_proj.weight", (nh * qk_head, h["q_lora_rank"])))
        else:
            out.append((p + "self_attn.q_proj.weight", (nh * qk_head, d)))
        out.append((p + "self_attn.kv_a_proj_with_mqa.weight", (h["kv_lora_rank"] + h["qk_rope_head_dim"], d)))
        out.append((p + "self_attn.kv_a_layernorm.weight", (h["kv_lora_rank"],)))
        out.append((p + "self_attn.kv_b_proj.weight",
                    (nh * (h["qk_nope_head_dim"] + h["v_head_dim"]), h["kv_lora_rank"])))
        out.append((p + "self_attn.o_proj.weight", (d, nh * h["v_head_dim"])))
        out.append((p + "post_attention_layernorm.weight", (d,)))
        if is_moe_layer(h, l):
            mi = h["moe_intermediate_size"]
            out.append((p + "mlp.gate.weight", (h["n_routed_experts"], d)))
            for e in range(h["n_routed_experts"]):
                q = f"{p}mlp.experts.{e}."
                out += [(q + "gate_proj.weight", (mi, d)), (q + "up_proj.weight", (mi, d)),
                        (q + "down_proj.weight", (d, mi))]
            if h["n_shared_experts"]:
                si = mi * h["n_shared_experts"]
                q = p + "mlp.shared_experts."
                out += [(q + "gate_proj.weight", (si, d)), (q + "up_proj.weight", (si, d)),
                        (q + "down_proj.weight", (d, si))]
        else:
            fi = h["intermediate_size"]
            q = p + "mlp."
            out += [(q + "gate_proj.weight", (fi, d)), (q + "up_proj.weight", (fi, d)),
                    (q + "down_proj.weight", (d, fi))]
    out.append(("model.norm.weight", (d,)))
    out.append(("lm_head.weight", (h["vocab_size"], d)))
    return out


def pack_header(h, dtype):
    h = dict(h, dtype=DTYPES[dtype])
    body = MAGIC + struct.pack("<I", VERSION)
    body += struct.pack(f"<{len(HEADER_INTS)}i", *[int(h[k]) for k in HEADER_INTS])
    body += struct.pack(f"<{len(HEADER_FLOATS)}f", *[float(h[k]) for k in HEADER_FLOATS])
    assert len(body) <= HEADER_BYTES
    return body + b"\0" * (HEADER_BYTES - len(body))


class SafeTensors:
    """Index of the tensors in model.safetensors or model-*.safetensors; reads one at a time."""

    def __init__(self, hf_dir):
        index = os.path.join(hf_dir, "model.safetensors.index.json")
        single = os.path.join(hf_dir, "model.safetensors")
        if os.path.exists(index):
            try:
                with open(index, encoding="utf-8") as f:
                    files = sorted(set(json.load(f)["weight_map"].values()))
            except (OSError, ValueError, KeyError) as e:
                fail(f"{index}: cannot read the shard index ({e})")
        elif os.path.exists(single):
            files = ["model.safetensors"]
        else:
            fail(f"{hf_dir}: no model.safetensors or model.safetensors.index.json")
        self.where = {}  # name -> (path, dtype, shape, start, end)
        for name in files:
            path = os.path.join(hf_dir, name)
            try:
                size = os.path.getsize(path)
                with open(path, "rb") as f:
                    n = struct.unpack("<Q", f.read(8))[0]
                    if n > size - 8:
                        raise ValueError("header longer than the file")
                    header = json.loads(f.read(n))
            except (OSError, ValueError, struct.error) as e:
                fail(f"{path}: not a readable safetensors file ({e})")
            for key, t in header.items():
                if key == "__metadata__":
                    continue
                start, end = t["data_offsets"]
                if 8 + n + end > size:
                    fail(f"{path}: tensor {key} runs past the end of the file (truncated?)")
                self.where[key] = (path, t["dtype"], tuple(t["shape"]), 8 + n + start, 8 + n + end)

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


def bf16_to_f32(raw):
    """bf16 -> fp32 is a byte shuffle: the bf16 bits are the high half of the fp32 bits."""
    out = bytearray(2 * len(raw))
    out[2::4] = raw[0::2]
    out[3::4] = raw[1::2]
    return bytes(out)


def f32_to_bf16(raw):
    """fp32 -> bf16, rounding to nearest even (as torch does); NaN stays NaN."""
    words = array.array("I", raw)
    if sys.byteorder == "big":
        words.byteswap()
    out = array.array("H", bytes(2 * len(words)))
    for i, w in enumerate(words):
        if (w & 0x7F800000) == 0x7F800000 and (w & 0x7FFFFF):
            out[i] = (w >> 16) | 0x40
        else:
            out[i] = ((w + 0x7FFF + ((w >> 16) & 1)) >> 16) & 0xFFFF
    if sys.byteorder == "big":
        out.byteswap()
    return out.tobytes()


def f16_to_f32(raw):
    vals = struct.unpack(f"<{len(raw) // 2}e", raw)
    return struct.pack(f"<{len(vals)}f", *vals)


def convert(dtype_in, raw, dtype_out):
    if dtype_out == "bf16":
        if dtype_in == "BF16":
            return raw
        return f32_to_bf16(raw if dtype_in == "F32" else f16_to_f32(raw))
    if dtype_in == "F32":
        return raw
    return bf16_to_f32(raw) if dtype_in == "BF16" else f16_to_f32(raw)


def export_model(hf_dir, out_path, dtype):
    h = read_config(hf_dir)
    st = SafeTensors(hf_dir)
    names = tensor_names(h)
    if h["tie_word_embeddings"] and "lm_head.weight" not in st:
        names[-1] = ("model.embed_tokens.weight", names[-1][1])  # tied: the head is the embedding
    for l in range(h["n_layers"]):  # the checkpoint must agree with the dense/MoE layer rule
        has_gate = f"model.layers.{l}.mlp.gate.weight" in st
        if has_gate != is_moe_layer(h, l):
            fail(f"layer {l}: config.json says {'MoE' if is_moe_layer(h, l) else 'dense'} "
                 f"but the checkpoint {'has' if has_gate else 'lacks'} mlp.gate.weight")
    total = sum(_numel(s) for _, s in names)
    width = 2 if dtype == "bf16" else 4
    tmp = out_path + ".tmp"
    done, t0, last = 0, time.time(), 0.0
    try:
        with open(tmp, "wb") as out:
            out.write(pack_header(h, dtype))
            for name, shape in names:
                out.write(b"\0" * (-out.tell() % ALIGN))
                for dt, raw in st.stream(name, shape):
                    out.write(convert(dt, raw, dtype))
                done += _numel(shape)
                if time.time() - last > 1.0 or done == total:
                    last = time.time()
                    print(f"\rexport.py: {done / total:6.1%} of {total / 1e6:.1f}M parameters, "
                          f"{done * width / max(last - t0, 1e-9) / 1e6:.0f} MB/s", end="", file=sys.stderr)
        os.replace(tmp, out_path)
    except OSError as e:
        fail(f"{out_path}: cannot write ({e.strerror})")
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    print(f"\nexport.py: wrote {out_path} ({os.path.getsize(out_path) / 2**20:.1f} MiB, {dtype})",
          file=sys.stderr)


def _numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("hf_dir", help="Hugging Face model directory (config.json, *.safetensors, tokenizer.json)")
    ap.add_argument("model_out", nargs="?", help="output model file")
    ap.add_argument("--tokenizer", metavar="TOK_OUT", help="also write tokenizer.bin here")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="weight type in the model file")
    args = ap.parse_args()
    if not args.model_out and not args.tokenizer:
        fail("nothing to do: give MODEL_OUT and/or --tokenizer TOK_OUT")
    if not os.path.isdir(args.hf_dir):
        fail(f"{args.hf_dir}: not a directory")
    if args.tokenizer:
        export_tokenizer(args.hf_dir, args.tokenizer)
    if args.model_out:
        export_model(args.hf_dir, args.model_out, args.dtype)


if __name__ == "__main__":
    main()
