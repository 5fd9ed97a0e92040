"""The shipped tokenizer (model/minimind_tokenizer/): 6400 ids; special tokens 0/1/2; no merge containing
`<` or `>`, so the image placeholder encodes to 25 + 25 ids in many contexts; no special tokens added
silently; the chat template; lossless round trips of mixed English, Chinese, emoji and code text.
"""
import json
import os

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOK_DIR = os.path.join(REPO_ROOT, "model", "minimind_tokenizer")
PLACEHOLDER = "<" * 25 + ">" * 25


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOK_DIR)


def _find_runs(ids, pattern):
    """Start positions of every occurrence of `pattern` inside `ids`."""
    n = len(pattern)
    return [i for i in range(len(ids) - n + 1) if ids[i:i + n] == pattern]


def test_vocab_size(tok):
    assert len(tok) == 6400
    assert len(tok.get_vocab()) == 6400
    assert tok.backend_tokenizer.get_vocab_size() == 6400


def test_fast_tokenizer_class(tok):
    from transformers import PreTrainedTokenizerFast

    assert isinstance(tok, PreTrainedTokenizerFast)
    assert tok.is_fast


def test_special_tokens(tok):
    assert tok.convert_tokens_to_ids(["<unk>", "<s>", "</s>"]) == [0, 1, 2]
    assert (tok.unk_token, tok.unk_token_id) == ("<unk>", 0)
    assert (tok.bos_token, tok.bos_token_id) == ("<s>", 1)
    assert (tok.eos_token, tok.eos_token_id) == ("</s>", 2)
    assert (tok.pad_token, tok.pad_token_id) == ("<unk>", 0)
    assert tok.model_max_length == 32768


def test_config_file_flags():
    with open(os.path.join(TOK_DIR, "tokenizer_config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    assert cfg["add_bos_token"] is False
    assert cfg["add_eos_token"] is False
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert "chat_template" in cfg


def test_tokenizer_json_structure():
    with open(os.path.join(TOK_DIR, "tokenizer.json"), encoding="utf-8") as f:
        tj = json.load(f)
    assert tj["model"]["type"] == "BPE"
    assert tj["pre_tokenizer"]["type"] == "ByteLevel"
    assert tj["pre_tokenizer"]["add_prefix_space"] is False
    assert tj["decoder"]["type"] == "ByteLevel"
    assert [(t["id"], t["content"], t["special"]) for t in tj["added_tokens"]] == [
        (0, "<unk>", True), (1, "<s>", True), (2, "</s>", True)]


def test_no_merge_touches_angle_brackets(tok):
    vocab = tok.get_vocab()
    bad = [t for t in vocab if ("<" in t or ">" in t) and t not in ("<", ">", "<unk>", "<s>", "</s>")]
    assert bad == []
    with open(os.path.join(TOK_DIR, "tokenizer.json"), encoding="utf-8") as f:
        merges = json.load(f)["model"]["merges"]
    merges = [m.split(" ") if isinstance(m, str) else m for m in merges]
    assert len(merges) == 6400 - 256 - 3
    assert not [m for m in merges if any("<" in p or ">" in p for p in m)]


def test_angle_bracket_ids_are_single_bytes(tok):
    lt, gt = tok.convert_tokens_to_ids(["<", ">"])
    assert lt not in (0, None) and gt not in (0, None) and lt != gt
    assert tok.encode("<", add_special_tokens=False) == [lt]
    assert tok.encode(">", add_special_tokens=False) == [gt]


PLACEHOLDER_CONTEXTS = [
    ("alone", PLACEHOLDER, 1),
    ("start of text", PLACEHOLDER + " Describe this image.", 1),
    ("after space", "Look at this: " + PLACEHOLDER, 1),
    ("after newline", "Look at this:\n" + PLACEHOLDER, 1),
    ("after chat prefix", "<s>user\n" + PLACEHOLDER, 1),
    ("followed by text", PLACEHOLDER + "What is this?", 1),
    ("chat prefix + text", "<s>user\n" + PLACEHOLDER + "What is this?</s>\n<s>assistant\n", 1),
    ("followed by newline", PLACEHOLDER + "\nWhat is this?", 1),
    ("after punctuation", "Image." + PLACEHOLDER + ".", 1),
    ("chinese around", "图片：" + PLACEHOLDER + "这是什么？", 1),
    ("back to back", PLACEHOLDER + PLACEHOLDER, 2),
    ("back to back with text", "<s>user\n" + PLACEHOLDER + PLACEHOLDER + "Compare them.", 2),
    ("separated by newline", PLACEHOLDER + "\n" + PLACEHOLDER + "\n", 2),
    ("after space, followed by newline", "x " + PLACEHOLDER + "\n", 1),
]


@pytest.mark.parametrize("name,text,count", PLACEHOLDER_CONTEXTS, ids=[c[0] for c in PLACEHOLDER_CONTEXTS])
def test_image_placeholder_tokenization(tok, name, text, count):
    lt, gt = tok.convert_tokens_to_ids(["<", ">"])
    expected = [lt] * 25 + [gt] * 25
    ids = tok.encode(text, add_special_tokens=False)
    assert tok(text)["input_ids"] == ids
    starts = _find_runs(ids, expected)
    assert len(starts) == count, (name, ids)
    # the only '<' / '>' ids in the encoding are the placeholder's own
    assert ids.count(lt) == 25 * count and ids.count(gt) == 25 * count
    assert tok.decode(ids) == text


def test_placeholder_alone_exact(tok):
    lt, gt = tok.convert_tokens_to_ids(["<", ">"])
    assert tok.encode(PLACEHOLDER) == [lt] * 25 + [gt] * 25


def test_no_special_tokens_added(tok):
    for text in ["hello", "你好", "Hello, world!"]:
        ids = tok.encode(text)
        assert ids == tok.encode(text, add_special_tokens=False)
        assert tok(text)["input_ids"] == ids
        assert 1 not in ids and 2 not in ids and 0 not in ids
    assert tok.encode("") == []


def test_special_tokens_in_text(tok):
    assert tok.encode("<s>") == [1]
    assert tok.encode("</s>") == [2]
    ids = tok.encode("<s>user\nhi</s>\n<s>assistant\n")
    assert ids[0] == 1 and ids.count(1) == 2 and ids.count(2) == 1
    assert ids == [1] + tok.encode("user\nhi") + [2] + tok.encode("\n") + [1] + tok.encode("assistant\n")


def test_chat_template(tok):
    msgs = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        "<s>user\nhi</s>\n<s>assistant\n"
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False) == \
        "<s>user\nhi</s>\n<s>assistant\n"
    msgs2 = msgs + [{"role": "assistant", "content": "yo"}]
    for gen in (False, True):
        assert tok.apply_chat_template(msgs2, tokenize=False, add_generation_prompt=gen) == \
            "<s>user\nhi</s>\n<s>assistant\nyo</s>\n"
    sys_msgs = [{"role": "system", "content": "Be brief."}] + msgs2 + [{"role": "user", "content": "again"}]
    assert tok.apply_chat_template(sys_msgs, tokenize=False, add_generation_prompt=True) == (
        "<s>system\nBe brief.</s>\n<s>user\nhi</s>\n<s>assistant\nyo</s>\n<s>user\nagain</s>\n<s>assistant\n")


def test_chat_template_with_placeholder(tok):
    lt, gt = tok.convert_tokens_to_ids(["<", ">"])
    s = tok.apply_chat_template([{"role": "user", "content": PLACEHOLDER + "\nWhat is this?"}],
                                tokenize=False, add_generation_prompt=True)
    ids = tok.encode(s)
    assert len(_find_runs(ids, [lt] * 25 + [gt] * 25)) == 1
    assert ids[0] == 1 and ids[-len(tok.encode("assistant\n")) - 1] == 1


ROUND_TRIP_TEXTS = [
    "Hello, world! MiniMind-V 是一个小型视觉语言模型。",
    "混合 text：English + 中文 + emoji 🤖🎉👍🏽 + 日本語 + 한국어 + Ελληνικά.",
    "  leading spaces, trailing spaces  \n\n\tTabs\tand\r\nCRLF  ",
    "Punctuation: ~!@#$%^&*()_+`-={}|[]\\:\";'<>?,./ “quotes” ‘single’ 《书名》（括号）……——",
    "Numbers 0123456789 3.14159 -42 1e-5 2024-05-01 12:30:45 50% $9.99",
    "Code: def f(x):\n    return x ** 2  # comment <tag attr=\"v\">",
    "<s>user\n" + PLACEHOLDER + "这张图片里有什么？</s>\n<s>assistant\n一只猫。</s>\n",
]


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert 0 not in ids  # byte-level BPE never needs <unk>
