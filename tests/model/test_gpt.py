import pytest
import torch

from ar2dlm.model.core_attention import AttentionLayout, BlockDiffusionCoreAttention
from ar2dlm.model.gpt import build_model


def _positions(batch: int, length: int) -> torch.Tensor:
    return torch.arange(length).expand(batch, length)


def test_model_uses_block_diffusion_attention(tiny_provider):
    model = build_model(tiny_provider)[0]
    cores = [layer.self_attention.core_attention for layer in model.decoder.layers]
    assert all(isinstance(core, BlockDiffusionCoreAttention) for core in cores)
    assert next(model.parameters()).device.type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_forward_backward_step_with_arbitrary_mask(tiny_provider):
    torch.manual_seed(0)
    model = build_model(tiny_provider)[0]
    ids = torch.randint(0, 128, (2, 16))
    blocked = torch.rand(2, 1, 16, 16) > 0.5  # Megatron convention: True = masked out
    blocked[..., torch.arange(16), torch.arange(16)] = False
    labels = torch.randint(0, 128, (2, 16))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(3):
        optimizer.zero_grad()
        loss = model(ids, _positions(2, 16), blocked, labels=labels).mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert losses[-1] < losses[0]


def test_the_mask_is_honoured(tiny_provider):
    torch.manual_seed(0)
    model = build_model(tiny_provider)[0].eval()
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(0))

    def causal(n):
        return torch.triu(torch.ones(n, n, dtype=torch.bool), 1)[None, None]

    with torch.no_grad():
        whole = model(ids, _positions(1, 16), causal(16))
        prefix = model(ids[:, :8], _positions(1, 8), causal(8))
        full = model(ids, _positions(1, 16), torch.zeros(1, 1, 16, 16, dtype=torch.bool))
    torch.testing.assert_close(whole[:, :8], prefix, rtol=0, atol=1e-5)  # causal: the future is invisible
    assert (whole[:, 0] - full[:, 0]).abs().max() > 1e-3  # without the mask, position 0 sees the future


def test_doubled_forward_clean_half_equals_causal_forward(tiny_provider):
    torch.manual_seed(1)
    model = build_model(tiny_provider)[0].eval()
    length = 16
    clean = torch.randint(0, 128, (2, length))
    noisy = torch.where(torch.rand(2, length) < 0.5, torch.full_like(clean, 127), clean)
    doubled = torch.cat([noisy, clean], dim=1)
    with torch.no_grad():
        joint = model(doubled, None, AttentionLayout("doubled_causal", length, block_size=4, kernel="sdpa"))
        plain = model(clean, None, AttentionLayout("causal", length))
    torch.testing.assert_close(joint[:, length:], plain, rtol=0, atol=1e-5)


def test_missing_mask_is_refused(tiny_provider):
    model = build_model(tiny_provider)[0]
    with pytest.raises(ValueError, match="needs an AttentionLayout"):
        model(torch.randint(0, 128, (1, 8)), _positions(1, 8), None)


def test_both_halves_share_rotary_positions(tiny_provider):
    """Block size 1, nothing masked: noisy token i sees itself and clean tokens < i, which is exactly a
    causal forward — but only if noisy position i has the same rotary position as clean position i."""
    torch.manual_seed(2)
    model = build_model(tiny_provider)[0].eval()
    length = 12
    clean = torch.randint(0, 128, (2, length))
    with torch.no_grad():
        joint = model(torch.cat([clean, clean], 1), None,
                      AttentionLayout("doubled_causal", length, block_size=1, kernel="sdpa"))
        plain = model(clean, None, AttentionLayout("causal", length))
    torch.testing.assert_close(joint[:, :length], plain, rtol=0, atol=1e-5)
