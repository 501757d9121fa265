"""SFT: chat-template formatting, loss only on responses, responses rounded up to whole diffusion blocks."""

import copy

import numpy as np
import pytest

from ar2dlm.data.loader import build_datasets
from ar2dlm.data.sft import DEFAULT_CHAT_TEMPLATE, encode_conversations
from ar2dlm.data.sources import Record
from ar2dlm.errors import UserError

CHAT = [
    {"role": "system", "content": "alpha beta"},
    {"role": "user", "content": "what is gamma"},
    {"role": "assistant", "content": "gamma is delta epsilon"},
    {"role": "user", "content": "what is zeta"},
    {"role": "assistant", "content": "eta"},
]
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def _spans(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each run of True."""
    edges = np.diff(np.concatenate([[0], mask.astype(int), [0]]))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1), strict=True))


def _encode(tokenizer, block_size, chat=CHAT):
    batch = encode_conversations(tokenizer, [Record(chat, "chat.jsonl:1")], block_size)
    return batch.tokens, batch.loss_mask


@pytest.mark.parametrize("block_size", [1, 4, 8])
def test_default_template_masks_prompts_and_rounds_responses_to_blocks(tokenizer, block_size):
    assert tokenizer.chat_template is None
    tokens, mask = _encode(tokenizer, block_size)
    eos = tokenizer.eos_token_id
    spans = _spans(mask)
    assert len(spans) == 2
    for (start, end), reply in zip(spans, ["gamma is delta epsilon", "eta"], strict=True):
        assert (end - start) % block_size == 0
        response = tokenizer(reply, add_special_tokens=False)["input_ids"] + [eos]
        assert tokens[start:start + len(response)].tolist() == response
        assert (tokens[start + len(response):end] == eos).all()
        assert end - start - len(response) == (-len(response)) % block_size
    prompt_text = tokenizer.decode(tokens[~mask])
    assert "<|user|>\nwhat is gamma\n" in prompt_text and "<|system|>\nalpha beta\n" in prompt_text
    assert "delta epsilon" not in prompt_text


def test_tokenizer_template_is_used_when_it_has_one(tokenizer):
    chatml = copy.deepcopy(tokenizer)
    chatml.chat_template = CHATML
    tokens, mask = _encode(chatml, 4)
    text = chatml.decode(tokens)
    assert text.startswith("<|im_start|>system\nalpha beta<|im_end|>\n") and "<|user|>" not in text
    responses = [chatml.decode(tokens[s:e]) for s, e in _spans(mask)]
    assert responses[0].startswith("gamma is delta epsilon<|im_end|>\n")
    assert responses[1].startswith("eta<|im_end|>\n")
    assert all((e - s) % 4 == 0 for s, e in _spans(mask))
    assert DEFAULT_CHAT_TEMPLATE != CHATML


def test_sft_rows_keep_conversations_whole(tokenizer, write_jsonl, data_cfg):
    chats = [{"messages": [{"role": "user", "content": f"what is {w}"}, {"role": "assistant", "content": w}]}
             for w in ["alpha", "beta", "gamma delta", "epsilon", "zeta eta theta"]]
    path = write_jsonl("chat.jsonl", chats)
    train, _ = build_datasets(data_cfg([{"path": str(path)}], sft=True, seq_length=64), tokenizer,
                              seq_length=64, block_size=4, seed=0)
    rows = [train[i] for i in range(len(train))]
    conversations = sum(len(np.unique(r.document_ids[r.loss_mask])) for r in rows)
    assert conversations == len(chats)
    for row in rows:
        for doc in np.unique(row.document_ids[row.loss_mask]):
            decoded = tokenizer.decode(row.input_ids[row.document_ids == doc])
            assert decoded.startswith("<|user|>\nwhat is ")
        assert all((e - s) % 4 == 0 for s, e in _spans(row.loss_mask))


def test_pad_mode_sft_has_no_document_ids(tokenizer, write_jsonl, data_cfg):
    from ar2dlm.data.loader import TrainDataLoader

    path = write_jsonl("chat.jsonl", [{"messages": CHAT}] * 3)
    cfg = data_cfg([{"path": str(path)}], sft=True, pack=False, seq_length=256)
    train, _ = build_datasets(cfg, tokenizer, seq_length=256, block_size=4, seed=0)
    assert len(train) == 3
    batch = TrainDataLoader(train, global_batch_size=2, micro_batch_size=2, dp_rank=0, dp_size=1,
                            seed=0).next_step()[0]
    assert batch.document_ids is None
    assert (batch.input_ids[:, -1] == tokenizer.pad_token_id).all() and not batch.loss_mask[:, -1].any()


@pytest.mark.parametrize("record, message", [
    ({"text": "no chat"}, r"chat.jsonl:2: record has no 'messages' field \(fields: text\)"),
    ({"messages": "hello"}, r"chat.jsonl:2: 'messages' must be a non-empty list"),
    ({"messages": [{"role": "user"}]}, r"chat.jsonl:2: 'messages' must be a non-empty list"),
    ({"messages": [{"role": "user", "content": "what"}]}, r"chat.jsonl:2: the conversation has no assistant"),
])
def test_bad_chat_records_are_named(tokenizer, write_jsonl, data_cfg, record, message):
    path = write_jsonl("chat.jsonl", [{"messages": CHAT}, record])
    with pytest.raises(UserError, match=message) as error:
        build_datasets(data_cfg([{"path": str(path)}], sft=True), tokenizer, seq_length=64, block_size=4,
                       seed=0)
    assert "\n" not in str(error.value)
