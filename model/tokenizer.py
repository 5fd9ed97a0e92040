"""The tokenizer and the chat format: how a conversation becomes the text the model reads.

The format is upstream MiniMind's (its tokenizer_config.json chat template renders exactly this):

    <s>system\\n{system}</s>\\n                     optional, first
    <s>user\\n{question}</s>\\n<s>assistant\\n       a prompt
    {answer}</s>\\n                                 an answer; training takes the loss on `{answer}</s>`

Training (trainer/data.py) and inference (model/engine.py) both render through the functions here, so the
two can never drift apart. `<image>` in any message becomes the 50-token placeholder.
"""
from pathlib import Path

from .LMConfig import IMAGE_MARKER, IMAGE_PLACEHOLDER, N_IMAGE_TOKENS

DEFAULT_TOKENIZER = "model/minimind_tokenizer"
ASSISTANT_PREFIX = "<s>assistant\n"
ANSWER_END = "\n"  # after an answer's </s>; carries no loss


def load_tokenizer(path: str = DEFAULT_TOKENIZER):
    from transformers import AutoTokenizer
    if not Path(path, "tokenizer.json").is_file() and not Path(path, "tokenizer_config.json").is_file():
        raise FileNotFoundError(f"no tokenizer in {path}: expected tokenizer.json and tokenizer_config.json "
                                "(train one with scripts/train_tokenizer.py, or copy upstream's minimind_tokenizer)")
    return AutoTokenizer.from_pretrained(path)


def image_token_ids(tokenizer) -> list:
    """The ids the placeholder tokenizes to. They must be 50 (one per CLIP token) or the splice cannot work."""
    ids = tokenizer(IMAGE_PLACEHOLDER, add_special_tokens=False).input_ids
    if len(ids) != N_IMAGE_TOKENS:
        raise ValueError(f"the tokenizer encodes the image placeholder to {len(ids)} ids, not {N_IMAGE_TOKENS}: "
                         "it must not merge '<' or '>' (see scripts/train_tokenizer.py)")
    return ids


# -- the chat format ---------------------------------------------------------------------------------------

def _with_placeholders(text: str) -> str:
    return text.replace(IMAGE_MARKER, IMAGE_PLACEHOLDER)


def system_text(content: str) -> str:
    return f"<s>system\n{_with_placeholders(content)}</s>\n"


def prompt_text(question: str) -> str:
    return f"<s>user\n{_with_placeholders(question)}</s>\n{ASSISTANT_PREFIX}"


def answer_text(answer: str) -> str:
    return f"{_with_placeholders(answer)}</s>"


def build_prompt(messages) -> str:
    """The text the model continues to answer [{"role", "content"}, ...] (system / user / assistant): every
    message rendered in order, ending with the assistant prefix."""
    render = {"system": system_text, "user": prompt_text, "assistant": lambda a: answer_text(a) + ANSWER_END}
    text = "".join(render[m["role"]](m["content"]) for m in messages)
    return text if text.endswith(ASSISTANT_PREFIX) else text + ASSISTANT_PREFIX


# The chat format above as a Jinja chat template, for transformers' apply_chat_template (the exports' processors and
# tokenizers): a message's content is a string or a list of {"type": "image"} and {"type": "text", "text": ...}
# parts; an image part becomes `<image>\n`, which the processor then expands (into the placeholder, or LLaVA's
# image tokens).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set content = message['content'] -%}"
    "{%- else -%}{%- set content = namespace(text='') -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{%- set content.text = content.text + '" + IMAGE_MARKER + "\\n' -%}"
    "{%- elif part['type'] == 'text' -%}{%- set content.text = content.text + part['text'] -%}{%- endif -%}"
    "{%- endfor -%}{%- set content = content.text -%}{%- endif -%}"
    "{%- if message['role'] == 'system' -%}{{ '<s>system\\n' + content + '</s>\\n' }}"
    "{%- elif message['role'] == 'user' -%}{{ '<s>user\\n' + content + '</s>\\n' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ '<s>assistant\\n' + content + '</s>\\n' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<s>assistant\\n' }}{%- endif -%}")


class ChatFormatError(ValueError):
    """Messages that are not (user, assistant) pairs after optional system messages."""


def split_turns(messages):
    """(system text, [(question, answer), ...]) of a chat for training, or ChatFormatError."""
    system, turns, pending = "", [], None
    for m in messages:
        if m["role"] == "system":
            system += system_text(m["content"])
        elif m["role"] == "user":
            if pending is not None:
                raise ChatFormatError("two user turns in a row")
            pending = m["content"]
        else:
            if pending is None:
                raise ChatFormatError("an assistant turn without a user turn before it")
            turns.append((pending, m["content"]))
            pending = None
    if not turns:
        raise ChatFormatError("no (user, assistant) pair")
    return system, turns


def turn_texts(system, turns) -> list:
    """The chat in pieces, [prompt 0, answer 0, prompt 1, answer 1, ...]: prompt k is the (system text and)
    question, answer k is `{answer}</s>`. Joined with ANSWER_END after each answer, they are build_prompt's
    text of the whole conversation."""
    texts = []
    for k, (question, answer) in enumerate(turns):
        texts += [(system if k == 0 else "") + prompt_text(question), answer_text(answer)]
    return texts
