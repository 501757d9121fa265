"""Commands print what the user needs, not the fallback notices of megatron / torch / transformers on CPU."""

from __future__ import annotations

import subprocess
import sys

# what the commands printed before (about 20 lines on every command)
NOISE = ("Apex", "Transformer Engine", "warnings.warn(", "UserWarning", "FutureWarning", "Shape mismatch",
         "torch_dtype", "gradient_accumulation_fusion", "GroupedMLP", "ShardedTensor")


def ar2dlm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ar2dlm.cli", *args], capture_output=True, text=True, timeout=300)


def test_convert_and_export_print_no_expected_warnings(tmp_path):
    from ar2dlm.model.hf_factory import make_hf_model, train_tokenizer

    tokenizer = train_tokenizer(["a b c d e f g h i j k l m n o p"] * 5, vocab_size=280)  # no spare token
    source = make_hf_model("Qwen2ForCausalLM", tmp_path / "src", vocab_size=len(tokenizer), tokenizer=tokenizer)
    converted = ar2dlm("convert", f"source={source}", f"output={tmp_path / 'converted'}")
    assert converted.returncode == 0, converted.stderr[-3000:]
    exported = ar2dlm("export", f"checkpoint={tmp_path / 'converted'}", f"output={tmp_path / 'export'}")
    assert exported.returncode == 0, exported.stderr[-3000:]
    for result in (converted, exported):
        printed = result.stdout + result.stderr
        assert not [word for word in NOISE if word in printed], printed
    # the grown embedding is explained in our words instead of megatron-bridge's "Skipping"
    assert f"vocabulary {len(tokenizer)} -> {len(tokenizer) + 1} rows" in converted.stderr


def test_unexpected_warnings_still_show():
    import warnings

    from ar2dlm.expected_warnings import silence_expected_warnings

    silence_expected_warnings()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        silence_expected_warnings.__wrapped__()
        warnings.warn("Apex is not installed. Falling back to Torch Norm", UserWarning, stacklevel=1)
        warnings.warn("something else is wrong", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["something else is wrong"]
