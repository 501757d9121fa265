import subprocess
import sys

import torch


def _printed_words(script: str) -> list[str]:
    """What ``script`` prints when run in a fresh interpreter (the patches under test are process-wide)."""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.split()


def test_bridge_imports_without_leaving_stand_ins_behind():
    script = (
        "import sys, torch\n"
        "from ar2dlm.compat import import_megatron_bridge, transformer_engine_available\n"
        "had_te = transformer_engine_available()\n"
        "bridge = import_megatron_bridge()\n"
        "from megatron.bridge import AutoBridge\n"
        "left = [n for n in sys.modules if n.split('.')[0] in ('transformer_engine', 'triton')]\n"
        "from megatron.core.models.gpt import gpt_layer_specs\n"
        "print(had_te, transformer_engine_available(), bool(left), gpt_layer_specs.HAVE_TE)\n"
    )
    had_te, has_te_after, left_behind, megatron_thinks_te = _printed_words(script)[-4:]
    assert has_te_after == had_te  # the stand-in is gone once the bridge is imported
    if had_te == "False":
        assert left_behind == "False"
        assert megatron_thinks_te == "False"  # megatron-core must not believe the stand-in is TE


def test_only_process_start_patches_torch_cuda():
    """Importing megatron-bridge and preparing a provider leave torch.cuda alone; configure_torch_for_cpu, the
    process-start call, patches it once (on a GPU machine: never)."""
    script = (
        "import torch\n"
        "original = torch.cuda.current_device\n"
        "from ar2dlm.compat import configure_torch_for_cpu, cuda_available, import_megatron_bridge\n"
        "import_megatron_bridge()\n"
        "from megatron.bridge.models.gpt_provider import GPTModelProvider\n"
        "from ar2dlm.model.gpt import prepare_provider\n"
        "prepare_provider(GPTModelProvider(num_layers=1, hidden_size=8, num_attention_heads=2, vocab_size=16, "
        "position_embedding_type=\"rope\"))\n"
        "untouched = torch.cuda.current_device is original\n"
        "configure_torch_for_cpu()\n"
        "patched = torch.cuda.current_device\n"
        "configure_torch_for_cpu()\n"
        "print(untouched, (patched is original) == cuda_available(), torch.cuda.current_device is patched)\n"
    )
    assert _printed_words(script)[-3:] == ["True", "True", "True"]


CUDA_QUERIES = ("current_device", "synchronize", "get_rng_state")


def test_cuda_device_queries_are_safe_on_cpu(monkeypatch):
    """Both branches on every machine: without a GPU the queries answer for the CPU; with one, torch.cuda is
    left exactly as it is."""
    from ar2dlm import compat

    forget = getattr(compat.configure_torch_for_cpu, "cache_clear", lambda: None)  # it runs once per process
    for name in CUDA_QUERIES:  # restored to what torch.cuda holds now when the test ends
        monkeypatch.setattr(torch.cuda, name, getattr(torch.cuda, name))
    monkeypatch.setattr(torch.cuda.random, "get_rng_state", torch.cuda.random.get_rng_state)
    try:
        monkeypatch.setattr(compat, "cuda_available", lambda: True)
        untouched = {name: getattr(torch.cuda, name) for name in CUDA_QUERIES}
        forget()
        compat.configure_torch_for_cpu()
        assert {name: getattr(torch.cuda, name) for name in CUDA_QUERIES} == untouched

        monkeypatch.setattr(compat, "cuda_available", lambda: False)
        forget()
        compat.configure_torch_for_cpu()
        assert torch.zeros(1, device=torch.cuda.current_device()).device.type == "cpu"
        assert torch.cuda.synchronize() is None
        assert torch.cuda.get_rng_state().numel() == 0
    finally:
        monkeypatch.undo()
        forget()  # the next call configures torch.cuda again, if this machine needs it
