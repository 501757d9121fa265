"""SFT records: chats formatted with the tokenizer's chat template, with loss on the assistant responses only.

A conversation is rendered once with ``tokenizer.apply_chat_template``. The characters of assistant turn i are
those that ``render(messages[:i+1])`` adds to ``render(messages[:i], add_generation_prompt=True)``; the
tokens that overlap them get loss_mask 1, every other token (system, user, template headers) 0: prompts are
never noised nor scored. The final response alone is followed by EOS tokens (loss_mask 1) up to the next
multiple of ``block_size`` counted from the start of the chat (where training counts its blocks), as
ZHZisZZ/dllm's EOS-block collator does, so the model learns to fill the rest of its last block with EOS;
earlier responses get none, since inference never sees EOS runs inside a conversation.

A chat cannot be cut into pieces without losing its turns: one longer than ``max_chars`` characters
(``data.max_document_chars``) is refused with its location instead of exhausting the memory.
"""

from __future__ import annotations

import numpy as np

from ar2dlm.data.sources import Record
from ar2dlm.data.tokenize import (
    DEFAULT_MAX_DOCUMENT_CHARS,
    TOKEN_DTYPE,
    EncodedBatch,
    char_bounded_groups,
    eos_id,
)
from ar2dlm.errors import UserError

# Used only when the tokenizer has no chat template of its own. Renders
#   <|system|>\n{content}\n<|user|>\n{content}\n<|assistant|>\n{content}{eos} ...
# (an assistant turn ends with EOS, any other with a newline) and, with add_generation_prompt, ends with
# "<|assistant|>\n", so that a prompt is a prefix of the whole chat.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def chat_template(tokenizer) -> str | None:
    """None to use the tokenizer's own template, else the default one."""
    return None if getattr(tokenizer, "chat_template", None) else DEFAULT_CHAT_TEMPLATE


def render_conversation(tokenizer, messages: list[dict], where: str,
                        template: str | None = None) -> tuple[str, list[tuple[int, int]]]:
    """The rendered chat and the character spans ``[start, end)`` of its assistant responses."""

    def render(part: list[dict], generation_prompt: bool) -> str:
        try:
            return tokenizer.apply_chat_template(part, tokenize=False, chat_template=template,
                                                 add_generation_prompt=generation_prompt)
        except Exception as error:  # jinja2 TemplateError, or a template's raise_exception(...)
            raise UserError(f"{where}: the chat template failed: {error}".splitlines()[0]) from None

    text = render(messages, False)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt, upto = render(messages[:index], True), render(messages[:index + 1], False)
        if not (upto.startswith(prompt) and text.startswith(upto)):
            raise UserError(f"{where}: the chat template does not render this conversation's prefixes as "
                            "prefixes of it, so its assistant turns cannot be found")
        spans.append((len(prompt), len(upto)))
    if not spans:
        raise UserError(f"{where}: the conversation has no assistant message (nothing to train on)")
    return text, spans


def _check_chat_length(length: int, where: str, max_chars: int) -> None:
    if length > max_chars:
        raise UserError(f"{where}: the conversation has {length:,} characters, more than "
                        f"data.max_document_chars={max_chars:,}; a chat cannot be split into pieces: shorten "
                        "or drop it, or raise data.max_document_chars if the memory allows")


def encode_conversations(tokenizer, records: list[Record], block_size: int,
                         max_chars: int = DEFAULT_MAX_DOCUMENT_CHARS) -> EncodedBatch:
    """Tokenise a batch of chats, at most ``max_chars`` characters per tokenizer call; loss mask on the
    responses and on the EOS fill after the last one."""
    if not tokenizer.is_fast:
        raise UserError("SFT needs a fast (Rust) tokenizer: it maps responses to tokens by character offsets")
    template = chat_template(tokenizer)
    rendered = []
    for record in records:
        contents = sum(len(message["content"]) for message in record.value)
        _check_chat_length(contents, record.where, max_chars)  # before rendering it several times
        text, spans = render_conversation(tokenizer, record.value, record.where, template)
        _check_chat_length(len(text), record.where, max_chars)
        rendered.append((text, spans))
    eos = eos_id(tokenizer)
    tokens, masks = [], []
    for group in char_bounded_groups(rendered, lambda chat: len(chat[0]), max_chars):
        encoded = tokenizer([text for text, _ in group], add_special_tokens=False,
                            return_offsets_mapping=True, return_attention_mask=False, verbose=False)
        for ids, offsets, (_, spans) in zip(encoded["input_ids"], encoded["offset_mapping"], group,
                                            strict=True):
            ids, mask = _mask_and_fill(np.asarray(ids, dtype=TOKEN_DTYPE),
                                       np.asarray(offsets).reshape(-1, 2), spans, block_size, eos)
            tokens.append(ids)
            masks.append(mask)
    lengths = np.array([len(t) for t in tokens], dtype=np.int64)
    return EncodedBatch(np.concatenate(tokens), lengths, np.concatenate(masks))


def _mask_and_fill(ids: np.ndarray, offsets: np.ndarray, spans: list[tuple[int, int]], block_size: int,
                   eos: int) -> tuple[np.ndarray, np.ndarray]:
    mask = np.zeros(len(ids), bool)
    end_of_responses = 0
    for start, end in spans:
        inside = np.flatnonzero((offsets[:, 0] < end) & (offsets[:, 1] > start))
        if len(inside):
            mask[inside[0]:inside[-1] + 1] = True
            end_of_responses = int(inside[-1]) + 1
    fill = (-end_of_responses) % block_size
    return (np.concatenate([ids[:end_of_responses], np.full(fill, eos, dtype=ids.dtype), ids[end_of_responses:]]),
            np.concatenate([mask[:end_of_responses], np.ones(fill, bool), mask[end_of_responses:]]))
