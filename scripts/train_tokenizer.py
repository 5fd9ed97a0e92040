#!/usr/bin/env python
"""Train the MiniMind-V byte-level BPE tokenizer fully offline.

The tokenizer mirrors upstream MiniMind's tokenizer layout so that upstream's
``tokenizer.json`` / ``tokenizer_config.json`` dropped into the same folder work
with the same code:

* byte-level BPE (HF ``tokenizers``), no normalizer, ``ByteLevel(add_prefix_space=False)``
  pre-tokenizer and ``ByteLevel`` decoder;
* vocab size 6400 with special tokens ``<unk>``=0, ``<s>``=1, ``</s>``=2;
* a chat template producing ``<s>system\\n..</s>\\n<s>user\\n..</s>\\n<s>assistant\\n..</s>\\n``.

Training text is synthesised from the ``wordfreq`` package's English and Chinese
word lists (words sampled by frequency and joined into pseudo-sentences), plus
numbers / ASCII punctuation / code-like snippets.  Everything is deterministic
given ``--seed``.

The image placeholder of MiniMind-V is ``'<' * 25 + '>' * 25``; it must always
encode to exactly 25 ids of '<' followed by 25 ids of '>'.  To guarantee that,
'<' and '>' are removed from the training text (so no merge can ever contain
them) and this is verified after training.

Usage::

    python scripts/train_tokenizer.py                 # writes model/minimind_tokenizer/
    python scripts/train_tokenizer.py --out_dir /tmp/tok --vocab_size 6400
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from bisect import bisect_left
from itertools import accumulate

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model.cli import HelpFormatter  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT_DIR = os.path.join(REPO_ROOT, "model", "minimind_tokenizer")

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2 (in this order)
IMAGE_PLACEHOLDER = "<" * 25 + ">" * 25
FORBIDDEN_CHARS = "<>"

# Jinja chat template (same format as upstream MiniMind-V).  The user turn already
# ends with the assistant prefix, so add_generation_prompt has no extra effect.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{{ '<s>system\\n' + message['content'] + '</s>\\n' }}"
    "{%- elif message['role'] == 'user' -%}"
    "{{ '<s>user\\n' + message['content'] + '</s>\\n<s>assistant\\n' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ message['content'] + '</s>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

EN_END_PUNCT = [".", ".", ".", ".", "?", "!", "...", ";", ":"]
ZH_END_PUNCT = ["。", "。", "。", "。", "？", "！", "……", "；", "："]
ZH_MID_PUNCT = ["，", "，", "，", "、", "；", "："]
EN_WRAPPERS = [('"', '"'), ("'", "'"), ("(", ")"), ("[", "]"), ("{", "}"), ("`", "`"), ("*", "*"), ("**", "**")]
ZH_WRAPPERS = [("“", "”"), ("《", "》"), ("（", "）"), ("「", "」"), ("‘", "’"), ("【", "】")]
CODE_SNIPPETS = [
    "x = y + 1", "a[i] = b[j] * 2;", "if (a == b) { return c; }", "for i in range(10):",
    "print(\"hello, world!\")", "def f(x): return x ** 2", "s = 'abc' + \"def\"", "# comment",
    "// comment", "/* block */", "x += 1; y -= 2; z *= 3; w /= 4;", "a && b || !c", "n % 2 == 0",
    "path/to/file.txt", "C:\\Users\\name", "https://www.example.com/index.html?q=1&p=2",
    "user@example.com", "#include \"stdio.h\"", "import numpy as np", "@decorator", "$HOME ~/.bashrc",
    "key: value", "{\"a\": 1, \"b\": [2, 3]}", "x ^ y | z & w", "a != b", "i++; j--;", "f(a, b, c)",
    "### Title", "- item", "1. first", "| a | b |", "---", "===", "___", "~~~", "...", "!!!", "???",
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train the MiniMind-V byte-level BPE tokenizer offline (wordfreq text).",
                                formatter_class=HelpFormatter)
    p.add_argument("--out_dir", default=DEFAULT_OUT_DIR, help="output folder")
    p.add_argument("--vocab_size", type=int, default=6400, help="total vocab size incl. special tokens")
    p.add_argument("--n_words_en", type=int, default=40000, help="number of most frequent English words to sample from")
    p.add_argument("--n_words_zh", type=int, default=40000, help="number of most frequent Chinese words to sample from")
    p.add_argument("--n_sent_en", type=int, default=120000, help="number of English pseudo-sentences")
    p.add_argument("--n_sent_zh", type=int, default=160000, help="number of Chinese pseudo-sentences")
    p.add_argument("--n_misc", type=int, default=30000, help="number of digit/punctuation/code lines")
    p.add_argument("--alpha", type=float, default=0.6,
                   help="sampling weight = frequency**alpha (<1 flattens the Zipf curve for wider coverage)")
    p.add_argument("--seed", type=int, default=42, help="random seed (training text is fully deterministic)")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- corpus
def _is_cjk_word(w: str) -> bool:
    return all("\u3400" <= c <= "\u9fff" or "\uf900" <= c <= "\ufaff" for c in w)


def _is_en_word(w: str) -> bool:
    return all(c.isascii() and (c.isalpha() or c in "'-") for c in w) and any(c.isalpha() for c in w)


def load_words(lang: str, n: int, alpha: float, keep):
    import wordfreq

    freqs = wordfreq.get_frequency_dict(lang)  # word -> frequency (no jieba needed for zh)
    words = [w for w in wordfreq.top_n_list(lang, n) if keep(w) and not any(c in w for c in FORBIDDEN_CHARS)]
    weights = [freqs.get(w, 1e-9) ** alpha for w in words]
    return words, list(accumulate(weights))


class Sampler:
    def __init__(self, rng: random.Random, words, cum):
        self.rng, self.words, self.cum, self.total = rng, words, cum, cum[-1]

    def sample(self, k: int):
        r, cum, tot, words = self.rng.random, self.cum, self.total, self.words
        return [words[bisect_left(cum, r() * tot)] for _ in range(k)]


def rand_number(rng: random.Random) -> str:
    kind = rng.randrange(12)
    if kind == 0:
        return str(rng.randrange(10))
    if kind == 1:
        return str(rng.randrange(100))
    if kind == 2:
        return str(rng.randrange(10000))
    if kind == 3:
        return str(rng.randrange(10 ** rng.randrange(1, 12)))
    if kind == 4:
        return f"{rng.uniform(0, 1000):.{rng.randrange(1, 4)}f}"
    if kind == 5:
        return str(rng.randrange(1900, 2031))
    if kind == 6:
        return f"{rng.randrange(1900, 2031)}-{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d}"
    if kind == 7:
        return f"{rng.randrange(24):02d}:{rng.randrange(60):02d}"
    if kind == 8:
        return f"{rng.randrange(101)}%"
    if kind == 9:
        return f"${rng.randrange(1000)}.{rng.randrange(100):02d}"
    if kind == 10:
        return f"{rng.randrange(1, 1000):,}" if rng.random() < 0.5 else f"{rng.randrange(1000, 10 ** 7):,}"
    return f"{rng.randrange(100)}/{rng.randrange(1, 100)}"


def en_sentence(rng: random.Random, s: Sampler) -> str:
    words = s.sample(rng.randint(3, 20))
    out = []
    for i, w in enumerate(words):
        r = rng.random()
        if r < 0.04:
            w = rand_number(rng)
        elif r < 0.10:
            w = w.capitalize()
        elif r < 0.11:
            w = w.upper()
        if rng.random() < 0.02:
            a, b = rng.choice(EN_WRAPPERS)
            w = a + w + b
        if i < len(words) - 1 and rng.random() < 0.08:
            w += rng.choice([",", ",", ",", ";", ":", " -", " --"])
        out.append(w)
    out[0] = out[0][:1].upper() + out[0][1:]
    return " ".join(out) + rng.choice(EN_END_PUNCT)


def zh_sentence(rng: random.Random, s: Sampler, s_en: Sampler) -> str:
    words = s.sample(rng.randint(3, 16))
    out = []
    for i, w in enumerate(words):
        r = rng.random()
        if r < 0.03:
            w = rand_number(rng)
        elif r < 0.04:
            w = s_en.sample(1)[0]
            w = (" " + w + " ") if rng.random() < 0.5 else w
        if rng.random() < 0.02:
            a, b = rng.choice(ZH_WRAPPERS)
            w = a + w + b
        out.append(w)
        if i < len(words) - 1 and rng.random() < 0.12:
            out.append(rng.choice(ZH_MID_PUNCT))
    return "".join(out) + rng.choice(ZH_END_PUNCT)


def misc_line(rng: random.Random, s_en: Sampler) -> str:
    kind = rng.randrange(5)
    if kind == 0:  # numbers
        return " ".join(rand_number(rng) for _ in range(rng.randint(1, 8)))
    if kind == 1:  # arithmetic
        ops = ["+", "-", "*", "/", "=", "^", "%"]
        return " ".join(rand_number(rng) if i % 2 == 0 else rng.choice(ops) for i in range(rng.randint(3, 9)))
    if kind == 2:  # code-like
        return rng.choice(CODE_SNIPPETS)
    if kind == 3:  # identifiers
        ws = s_en.sample(rng.randint(1, 3))
        return rng.choice(["_".join(ws), "".join(w.capitalize() for w in ws), ".".join(ws), "-".join(ws)]) + \
            rng.choice(["()", "", ":", ";", ",", "[0]", " = 0", "'s"])
    # raw ASCII punctuation / digits runs (no '<' or '>')
    pool = "".join(chr(c) for c in range(33, 127) if chr(c) not in FORBIDDEN_CHARS and not chr(c).isalpha())
    return "".join(rng.choice(pool) for _ in range(rng.randint(1, 6)))


def build_corpus(args):
    """Return a list of training documents (each a few pseudo-sentences)."""
    rng = random.Random(args.seed)
    t0 = time.time()
    en_words, en_cum = load_words("en", args.n_words_en, args.alpha, _is_en_word)
    zh_words, zh_cum = load_words("zh", args.n_words_zh, args.alpha, _is_cjk_word)
    print(f"[corpus] wordfreq lists: en={len(en_words)} words, zh={len(zh_words)} words ({time.time() - t0:.1f}s)")
    s_en, s_zh = Sampler(rng, en_words, en_cum), Sampler(rng, zh_words, zh_cum)

    lines = []
    # also make sure every listed word is seen at least once (as a standalone line chunk)
    lines.extend(" ".join(en_words[i:i + 16]) for i in range(0, len(en_words), 16))
    lines.extend("".join(zh_words[i:i + 8]) for i in range(0, len(zh_words), 8))
    for name, n, fn in (("en", args.n_sent_en, lambda: en_sentence(rng, s_en)),
                        ("zh", args.n_sent_zh, lambda: zh_sentence(rng, s_zh, s_en)),
                        ("misc", args.n_misc, lambda: misc_line(rng, s_en))):
        t1 = time.time()
        for i in range(n):
            lines.append(fn())
            if (i + 1) % 50000 == 0:
                print(f"[corpus] {name}: {i + 1}/{n} lines", flush=True)
        print(f"[corpus] {name}: {n} lines in {time.time() - t1:.1f}s", flush=True)
    rng.shuffle(lines)

    # group lines into small documents separated by newlines / spaces
    docs, i = [], 0
    while i < len(lines):
        k = rng.randint(1, 8)
        sep = rng.choice(["\n", "\n", " ", "\n\n"])
        doc = sep.join(lines[i:i + k])
        if rng.random() < 0.1 and k > 1:  # chat-shaped text so role names become single tokens
            doc = (rng.choice(["", "system\n" + lines[i] + "\n"]) + "user\n" + lines[i] +
                   "\nassistant\n" + sep.join(lines[i + 1:i + k]))
        docs.append(doc)
        i += k
    # CRITICAL: strip '<' and '>' so that no merge can ever contain them
    table = str.maketrans("", "", FORBIDDEN_CHARS)
    docs = [d.translate(table) for d in docs]
    n_chars = sum(len(d) for d in docs)
    print(f"[corpus] {len(docs)} documents, {n_chars / 1e6:.1f}M chars ({time.time() - t0:.1f}s total)")
    return docs


# --------------------------------------------------------------------------- training
def train(docs, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        show_progress=True,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(docs, trainer=trainer, length=len(docs))
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def verify_raw(tokenizer, vocab_size: int):
    """Checks on the raw `tokenizers` object; raises SystemExit on failure."""
    errors = []
    vocab = tokenizer.get_vocab()
    if len(vocab) != vocab_size:
        errors.append(f"vocab size {len(vocab)} != {vocab_size}")
    for i, t in enumerate(SPECIAL_TOKENS):
        if tokenizer.token_to_id(t) != i:
            errors.append(f"special token {t!r} has id {tokenizer.token_to_id(t)}, expected {i}")
    bad = sorted(t for t in vocab if any(c in t for c in FORBIDDEN_CHARS) and t not in ("<", ">", *SPECIAL_TOKENS))
    if bad:
        errors.append(f"vocab entries containing '<' or '>': {bad[:20]}")
    lt, gt = tokenizer.token_to_id("<"), tokenizer.token_to_id(">")
    expected = [lt] * 25 + [gt] * 25
    P = IMAGE_PLACEHOLDER
    for text in placeholder_contexts():
        ids = tokenizer.encode(text).ids
        n_found = sum(1 for j in range(len(ids) - 49) if ids[j:j + 50] == expected)
        if n_found != text.count(P) or ids.count(lt) != 25 * text.count(P):
            errors.append(f"placeholder not encoded as 25x'<' + 25x'>' in {text!r}: {ids}")
    if errors:
        for e in errors:
            print("[verify] ERROR:", e)
        raise SystemExit(1)
    print(f"[verify] raw tokenizer OK: vocab={len(vocab)}, id('<')={lt}, id('>')={gt}")


def placeholder_contexts():
    P = IMAGE_PLACEHOLDER
    return [
        P, P + " describe", "hello " + P, "hello\n" + P, "<s>user\n" + P, "<s>user\n" + P + "What is this?",
        P + "What is this?", P + "\n", P + P, "x" + P + "\nDescribe the image.</s>\n",
        "图片：" + P + "这是什么？", "hi." + P + ".", "<s>user\n" + P + "\n" + P + "比较两张图</s>\n<s>assistant\n",
    ]


def write_files(tokenizer, out_dir: str):
    os.makedirs(out_dir, exist_ok=True)
    tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
    added_tokens_decoder = {
        str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                 "single_word": False, "special": True}
        for i, t in enumerate(SPECIAL_TOKENS)
    }
    config = {
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added_tokens_decoder,
        "bos_token": "<s>",
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "extra_special_tokens": [],
        "legacy": True,
        "model_max_length": 32768,
        "pad_token": "<unk>",
        "spaces_between_special_tokens": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": "<unk>",
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, ensure_ascii=False, indent=2)
        f.write("\n")
    print(f"[save] wrote {out_dir}/tokenizer.json and tokenizer_config.json")


def check_with_transformers(out_dir: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out_dir)
    print(f"[check] loaded {type(tok).__name__}: len={len(tok)}, bos={tok.bos_token}({tok.bos_token_id}) "
          f"eos={tok.eos_token}({tok.eos_token_id}) unk={tok.unk_token}({tok.unk_token_id}) "
          f"pad={tok.pad_token}({tok.pad_token_id}) model_max_length={tok.model_max_length}")
    errors = []
    if tok("hello")["input_ids"] != tok.encode("hello", add_special_tokens=False):
        errors.append("encoding adds special tokens")
    msgs = [{"role": "user", "content": "hi"}]
    for gen in (True, False):
        s = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        if s != "<s>user\nhi</s>\n<s>assistant\n":
            errors.append(f"chat template (gen={gen}) gave {s!r}")
    s = tok.apply_chat_template(msgs + [{"role": "assistant", "content": "yo"}], tokenize=False)
    if s != "<s>user\nhi</s>\n<s>assistant\nyo</s>\n":
        errors.append(f"chat template with assistant gave {s!r}")
    text = "Hello, 世界! 🤖 MiniMind-V 看图说话：3.14 + 42 = 45.14…\n\t“引号” (parens) [x] {y} ~!@#$%^&*_+|"
    if tok.decode(tok.encode(text)) != text:
        errors.append("round trip failed")
    if errors:
        for e in errors:
            print("[check] ERROR:", e)
        raise SystemExit(1)

    samples = [
        "Hello world! How are you today?",
        "你好，世界！今天天气怎么样？",
        "<s>user\n" + IMAGE_PLACEHOLDER + "What is in the image?</s>\n<s>assistant\n",
        "The price is $19.99 (2024-05-01, 12:30).",
        "MiniMind-V是一个小型视觉语言模型。",
    ]
    for s in samples:
        ids = tok.encode(s)
        print(f"[sample] {s!r}\n         -> {len(ids)} ids: {ids[:60]}{' ...' if len(ids) > 60 else ''}\n"
              f"         -> tokens: {tok.convert_ids_to_tokens(ids)[:30]}")
    print(f"[check] transformers checks OK; chat: {tok.apply_chat_template(msgs, tokenize=False)!r}")


def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    docs = build_corpus(args)
    t1 = time.time()
    print(f"[train] training BPE (vocab_size={args.vocab_size}) on {len(docs)} documents ...", flush=True)
    tokenizer = train(docs, args.vocab_size)
    t2 = time.time()
    print(f"[train] done in {t2 - t1:.1f}s")
    verify_raw(tokenizer, args.vocab_size)
    write_files(tokenizer, args.out_dir)
    check_with_transformers(args.out_dir)
    vocab = tokenizer.get_vocab()
    n_cjk = sum(1 for t in vocab if any("\u4e00" <= c <= "\u9fff" for c in tokenizer.decode([vocab[t]])))
    print(f"[done] vocab_size={tokenizer.get_vocab_size()} merges={tokenizer.get_vocab_size() - 256 - len(SPECIAL_TOKENS)} "
          f"tokens_with_CJK={n_cjk}; corpus {t1 - t0:.1f}s, train {t2 - t1:.1f}s, total {time.time() - t0:.1f}s")


if __name__ == "__main__":
    sys.exit(main())
