// Second opinion for the tokenizer tests: encodes every case of a corpus with @lenml/tokenizers
// (an independent JavaScript port of Hugging Face tokenizers, via transformers.js).
// usage: node lenml_encode.js LENML_DIR HF_DIR CORPUS SEP > ids.txt   (one line of ids per case,
// encoded without special tokens added, like tests/make_tok_golden.py)
const fs = require("fs");
const path = require("path");
const [lenmlDir, hfDir, corpus, sep] = process.argv.slice(2);
const { TokenizerLoader } = require(path.resolve(lenmlDir, "node_modules/@lenml/tokenizers"));
const read = (f) => JSON.parse(fs.readFileSync(path.join(hfDir, f), "utf8"));
const tok = TokenizerLoader.fromPreTrained({ tokenizerJSON: read("tokenizer.json"), tokenizerConfig: read("tokenizer_config.json") });
// lenml's Digits pre-tokenizer uses JS \d (ASCII 0-9); Rust tokenizers uses char::is_numeric,
// i.e. \p{N} (llama.cpp's reference case "ied 4 ½ months" shows "½" split off). Match Rust.
for (const p of tok.pre_tokenizer?.tokenizers ?? [])
    if (p.config?.type === "Digits")
        p.pattern = new RegExp(p.config.individual_digits ? "[^\\p{N}]+|\\p{N}" : "[^\\p{N}]+|\\p{N}+", "gu");
// JS \s is WhiteSpace + LineTerminator (has U+FEFF, lacks U+0085); Oniguruma's \s is the
// Unicode White_Space property. Rebuild each Split regex with Oniguruma's \s and \S.
const WS = "\\t-\\r \\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000";
function onigSpaces(re) {
    let out = "", inClass = false;
    for (let i = 0; i < re.length; i++) {
        const c = re[i];
        if (c === "\\" && (re[i + 1] === "s" || re[i + 1] === "S")) {
            const neg = re[i + 1] === "S";
            if (inClass && neg) throw new Error("\\S inside a class is not handled");
            out += inClass ? WS : neg ? `[^${WS}]` : `[${WS}]`;
            i++;
        } else if (c === "\\") { out += c + re[i + 1]; i++; }
        else { if (c === "[") inClass = true; else if (c === "]") inClass = false; out += c; }
    }
    return out;
}
for (const p of tok.pre_tokenizer?.tokenizers ?? [])
    if (p.config?.type === "Split" && p.pattern instanceof RegExp)
        p.pattern = new RegExp(onigSpaces(p.pattern.source), "gu");
const cases = fs.readFileSync(corpus, "utf8").split("\n" + sep + "\n");
cases.pop();  // the text after the last separator
const lines = cases.map((c) => tok.encode(c, { add_special_tokens: false }).join(" "));
fs.writeFileSync(1, lines.join("\n") + "\n");
