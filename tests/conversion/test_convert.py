"""Conversion is exact at step 0 and reversible, for every supported family."""

import pytest
import torch
import transformers
from safetensors.torch import load_file

from ar2dlm.conversion.convert import convert
from ar2dlm.conversion.hf_source import SUPPORTED_ARCHITECTURES
from ar2dlm.conversion.hf_weights import export_bridge, hf_tensors
from ar2dlm.model.checkpoint import HF_DIR, load_model, read_metadata
from ar2dlm.model.core_attention import AttentionLayout

CASES = [(arch, tied) for arch in SUPPORTED_ARCHITECTURES for tied in (False, True)]


def _ar_logits(chunks, ids):
    with torch.no_grad():
        return chunks[0].eval()(ids, None, AttentionLayout("causal", ids.shape[1]))


def _hf_logits(path, ids):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("architecture, tied", CASES, ids=[f"{a}-{'tied' if t else 'untied'}" for a, t in CASES])
def test_converted_model_is_exact_and_round_trips(architecture, tied, make_tiny_hf, tmp_path, megatron_ready):
    source = make_tiny_hf(architecture, tied=tied)
    metadata = convert(source, tmp_path / "converted")
    assert metadata.mask_token == "<|fim_pad|>" and metadata.mask_token_reason == "unused special token"
    chunks, loaded, _ = load_model(tmp_path / "converted")
    assert loaded.mask_token_id == metadata.mask_token_id
    ids = torch.randint(0, loaded.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_ar_logits(chunks, ids), _hf_logits(source, ids), rtol=0, atol=1e-4)

    bridge = export_bridge(tmp_path / "converted" / HF_DIR, loaded.hf_tensor_names)
    exported = dict(hf_tensors(bridge, chunks))
    original = load_file(str(source / "model.safetensors"))
    assert set(exported) == set(original)
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype and torch.equal(exported[name], tensor), name


def test_llama3_rope_scaling_is_exact(make_tiny_hf, tmp_path, megatron_ready):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    source = make_tiny_hf("LlamaForCausalLM", rope_scaling=scaling, rope_theta=50000.0, name="llama3")
    convert(source, tmp_path / "converted")
    chunks, _, _ = load_model(tmp_path / "converted")
    ids = torch.randint(0, 200, (1, 96), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(_ar_logits(chunks, ids), _hf_logits(source, ids), rtol=0, atol=1e-4)


def test_new_mask_token_grows_the_vocabulary_with_the_mean_row(tmp_path, megatron_ready):
    from ar2dlm.model.hf_factory import make_hf_model, train_tokenizer

    tokenizer = train_tokenizer(["a b c d e f g h i j k l m n o p"] * 5, vocab_size=280)
    source = make_hf_model("Qwen2ForCausalLM", tmp_path / "src", vocab_size=len(tokenizer), tokenizer=tokenizer)
    metadata = convert(source, tmp_path / "converted")
    assert metadata.mask_token_reason == "new token"
    assert metadata.vocab_size == len(tokenizer) + 1 == metadata.mask_token_id + 1
    chunks, _, _ = load_model(tmp_path / "converted")
    embedding = chunks[0].embedding.word_embeddings.weight
    original = load_file(str(source / "model.safetensors"))
    torch.testing.assert_close(embedding[-1], original["model.embed_tokens.weight"].mean(0), rtol=0, atol=1e-6)
    torch.testing.assert_close(chunks[0].output_layer.weight[-1], original["lm_head.weight"].mean(0),
                               rtol=0, atol=1e-6)
    ids = torch.randint(0, len(tokenizer), (1, 16), generator=torch.Generator().manual_seed(2))
    logits = _ar_logits(chunks, ids)
    assert logits.shape[-1] == metadata.vocab_size
    torch.testing.assert_close(logits[..., :-1], _hf_logits(source, ids), rtol=0, atol=1e-4)
    saved_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "converted" / HF_DIR)
    assert saved_tokenizer.mask_token_id == metadata.mask_token_id
    assert read_metadata(tmp_path / "converted").vocab_size == metadata.vocab_size


def test_new_mask_token_uses_a_padded_row_when_there_is_one(tmp_path, megatron_ready):
    from ar2dlm.model.hf_factory import make_hf_model, train_tokenizer

    tokenizer = train_tokenizer(["a b c d e f g h i j k l m n o p"] * 5, vocab_size=280)
    source = make_hf_model("LlamaForCausalLM", tmp_path / "src", vocab_size=len(tokenizer) + 8, tokenizer=tokenizer,
                           tie_word_embeddings=True)
    metadata = convert(source, tmp_path / "converted")
    assert metadata.mask_token_reason == "new token in a padded embedding row"
    assert metadata.vocab_size == len(tokenizer) + 8 and metadata.mask_token_id == len(tokenizer)
    chunks, _, _ = load_model(tmp_path / "converted")
    original = load_file(str(source / "model.safetensors"))["model.embed_tokens.weight"]
    embedding = chunks[0].embedding.word_embeddings.weight
    torch.testing.assert_close(embedding[len(tokenizer)], original[: len(tokenizer)].mean(0), rtol=0, atol=1e-6)
    assert torch.equal(embedding[: len(tokenizer)], original[: len(tokenizer)])


def test_requested_mask_token_is_used(make_tiny_hf, tmp_path, megatron_ready):
    metadata = convert(make_tiny_hf("Qwen3ForCausalLM"), tmp_path / "converted", mask_token_id=5)
    assert metadata.mask_token_id == 5 and metadata.mask_token_reason == "requested"
