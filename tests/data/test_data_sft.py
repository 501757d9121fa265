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


THREE_TURNS = [
    ("what is alpha", "alpha is beta"),
    ("what is gamma", "gamma is delta epsilon"),
    ("what is zeta", "eta"),
]


@pytest.mark.parametrize("block_size", [1, 4, 8, 32])
def test_three_turn_chat_token_by_token(tokenizer, block_size):
    """Prompts unscored, each response scored with its end-of-turn EOS, and one EOS fill, after the last turn,
    to the chat's next block boundary."""
    chat = [message for question, answer in THREE_TURNS
            for message in ({"role": "user", "content": question}, {"role": "assistant", "content": answer})]
    tokens, mask = _encode(tokenizer, block_size, chat)
    eos = tokenizer.eos_token_id

    def ids(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    expected_tokens, expected_mask = [], []
    for question, answer in THREE_TURNS:
        prompt, response = ids(f"<|user|>\n{question}\n<|assistant|>\n"), ids(answer) + [eos]
        expected_tokens += prompt + response
        expected_mask += [False] * len(prompt) + [True] * len(response)
    whole = "".join(f"<|user|>\n{q}\n<|assistant|>\n{a}<|eos|>" for q, a in THREE_TURNS)
    assert ids(whole) == expected_tokens  # the pieces tokenise as the whole chat does
    fill = (-len(expected_tokens)) % block_size
    expected_tokens += [eos] * fill
    expected_mask += [True] * fill
    assert tokens.tolist() == expected_tokens
    assert mask.tolist() == expected_mask
    assert len(tokens) % block_size == 0


def test_prompt_tokens_of_a_chat_are_never_noised_nor_ar_targets(tokenizer):
    import torch

    from ar2dlm.training.loss import ar_target_mask
    from ar2dlm.training.noise import NoiseConfig, sample_noise

    tokens, mask = _encode(tokenizer, 4)
    ids, loss_mask = torch.from_numpy(tokens.astype("int64"))[None], torch.from_numpy(mask)[None]
    config = NoiseConfig(mask_token_id=399, block_size=4)
    masked = torch.stack([sample_noise(ids, [0], step, 0, config, loss_mask).masked[0] for step in range(50)])
    assert masked.any(dim=0).tolist() == mask.tolist()  # every response token gets noised at some step, no other
    targets = torch.nonzero(ar_target_mask(loss_mask)[0]).flatten() + 1  # the token each AR query predicts
    assert mask[targets.numpy()].all() and len(targets) == mask[1:].sum()


def test_tokenizer_template_is_used_when_it_has_one(tokenizer):
    chatml = copy.deepcopy(tokenizer)
    chatml.chat_template = CHATML
    tokens, mask = _encode(chatml, 4)
    text = chatml.decode(tokens)
    assert text.startswith("<|im_start|>system\nalpha beta<|im_end|>\n") and "<|user|>" not in text
    spans = _spans(mask)
    responses = [chatml.decode(tokens[s:e]) for s, e in spans]
    assert responses[0] == "gamma is delta epsilon<|im_end|>\n"
    fill = (-(spans[1][0] + len(chatml("eta<|im_end|>\n", add_special_tokens=False)["input_ids"]))) % 4
    assert responses[1] == "eta<|im_end|>\n" + "<|eos|>" * fill
    assert spans[-1][1] % 4 == 0 and spans[-1][1] == len(tokens)
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
            positions = np.flatnonzero(row.document_ids == doc)
            assert (positions[row.loss_mask[positions]][-1] + 1 - positions[0]) % 4 == 0  # fill to a block end


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
