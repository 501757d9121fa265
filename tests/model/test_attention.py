"""block_diffusion_attention: kernels agree (flex, sdpa, split), GQA, documents, dtype, errors."""

from __future__ import annotations

import pytest
import torch

from ar2dlm.model import attention
from ar2dlm.model.attention import block_diffusion_attention, select_kernel
from ar2dlm.model.masks import dense_mask, total_length


def make_qkv(
    layout: str,
    seq_len: int,
    q_heads: int = 4,
    kv_heads: int = 4,
    batch: int = 2,
    head_dim: int = 16,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    size = total_length(layout, seq_len)
    q = torch.randn(batch, q_heads, size, head_dim, dtype=dtype)
    k = torch.randn(batch, kv_heads, size, head_dim, dtype=dtype)
    v = torch.randn(batch, kv_heads, size, head_dim, dtype=dtype)
    return q, k, v


def packed_ids(batch: int, seq_len: int) -> torch.Tensor:
    starts = torch.rand(batch, seq_len) < 0.1
    starts[:, 0] = False
    return starts.long().cumsum(dim=1)


def reference_attention(q, k, v, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Softmax attention written out by hand (mask True = attend), kv heads repeated for GQA."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-1, -2)) * scale
    return scores.masked_fill(~mask, float("-inf")).softmax(dim=-1) @ v


FLEX_CASES = [  # (layout, seq_len, block_size, with documents)
    ("causal", 40, 1, False),
    ("bidirectional", 40, 8, True),
    ("doubled_causal", 24, 4, False),
    ("doubled_block_causal", 24, 8, False),
    ("doubled_causal", 96, 16, True),
    ("doubled_block_causal", 96, 32, True),
]


@pytest.mark.parametrize("layout,seq_len,block_size,with_docs", FLEX_CASES)
def test_flex_equals_sdpa_forward(layout: str, seq_len: int, block_size: int, with_docs: bool) -> None:
    torch.manual_seed(0)
    q, k, v = make_qkv(layout, seq_len, q_heads=4, kv_heads=2)
    docs = packed_ids(2, seq_len) if with_docs else None
    kw = dict(layout=layout, block_size=block_size, seq_len=seq_len, document_ids=docs)
    flex = block_diffusion_attention(q, k, v, kernel="flex", **kw)
    sdpa = block_diffusion_attention(q, k, v, kernel="sdpa", **kw)
    torch.testing.assert_close(flex, sdpa, atol=1e-5, rtol=1e-5)


def test_flex_runs_under_no_grad_with_grad_requiring_inputs() -> None:
    torch.manual_seed(0)
    q, k, v = (t.requires_grad_() for t in make_qkv("doubled_causal", 16))
    kw = dict(layout="doubled_causal", block_size=4, seq_len=16)
    with torch.no_grad():
        flex = block_diffusion_attention(q, k, v, kernel="flex", **kw)
        sdpa = block_diffusion_attention(q, k, v, kernel="sdpa", **kw)
    torch.testing.assert_close(flex, sdpa, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["causal", "bidirectional", "doubled_causal", "doubled_block_causal"])
def test_sdpa_equals_hand_written_attention(layout: str) -> None:
    torch.manual_seed(1)
    seq_len, block_size, scale = 12, 4, 0.3
    q, k, v = make_qkv(layout, seq_len, q_heads=6, kv_heads=2, dtype=torch.float64)
    docs = torch.tensor([[0] * 5 + [1] * 7, [0] * 12])
    out = block_diffusion_attention(
        q, k, v, layout=layout, block_size=block_size, seq_len=seq_len, document_ids=docs, scale=scale
    )
    mask = dense_mask(layout, seq_len, block_size, docs)[:, None]
    torch.testing.assert_close(out, reference_attention(q, k, v, mask, scale), atol=1e-12, rtol=1e-12)


def unaligned_ids(batch: int, seq_len: int, block_size: int) -> torch.Tensor:
    """Documents starting off the block grid (row 0) and at every chunk-edge offset (row 1)."""
    pos = torch.arange(seq_len)
    rows = [(pos + block_size // 2 + 1) // (3 * block_size + 1), (pos * 7) // (2 * block_size + 3)]
    return torch.stack([rows[i % 2] for i in range(batch)])


def doc_ids(kind: str | None, seq_len: int, block_size: int, batch: int = 2) -> torch.Tensor | None:
    if kind is None:
        return None
    return packed_ids(batch, seq_len) if kind == "random" else unaligned_ids(batch, seq_len, block_size)


@pytest.fixture(params=["default", "one block"])
def split_chunking(request, monkeypatch):
    """The split kernel's chunking as shipped (one chunk below 256 tokens) and down to one block per chunk."""
    if request.param == "one block":
        monkeypatch.setattr(attention, "_MIN_CHUNK", 1)
    attention._cached_split_plan.cache_clear()
    yield request.param
    attention._cached_split_plan.cache_clear()


SPLIT_CASES = [  # (layout, seq_len, block_size, kv_heads, documents); with one-block chunks allowed:
    # at most 8 chunks, uneven from 9 blocks
    ("doubled_causal", 32, 8, 4, None),
    ("doubled_causal", 32, 8, 1, None),
    ("doubled_causal", 8, 8, 2, None),  # L = B: one chunk of one block
    ("doubled_causal", 24, 8, 2, "random"),  # L = 3B
    ("doubled_causal", 40, 8, 4, "unaligned"),
    ("doubled_causal", 40, 2, 2, None),  # 20 blocks: chunks of 3 blocks, the last of 2
    ("doubled_causal", 72, 4, 1, "unaligned"),
    ("doubled_causal", 96, 4, 2, "random"),
    ("doubled_block_causal", 32, 8, 2, None),
    ("doubled_block_causal", 8, 8, 4, "random"),
    ("doubled_block_causal", 24, 8, 1, None),
    ("doubled_block_causal", 40, 8, 4, "random"),
    ("doubled_block_causal", 40, 2, 2, "unaligned"),
    ("doubled_block_causal", 72, 4, 2, None),
    ("doubled_causal", 520, 8, 2, "unaligned"),  # several chunks as shipped too
    ("doubled_block_causal", 520, 8, 1, None),
]


@pytest.mark.parametrize("layout,seq_len,block_size,kv_heads,docs_kind", SPLIT_CASES)
def test_split_equals_sdpa_forward_and_gradients(
    layout: str, seq_len: int, block_size: int, kv_heads: int, docs_kind: str | None, split_chunking: str
) -> None:
    torch.manual_seed(2)
    base = make_qkv(layout, seq_len, q_heads=4, kv_heads=kv_heads, dtype=torch.float64)
    docs = doc_ids(docs_kind, seq_len, block_size)
    grad_out = torch.randn(2, 4, 2 * seq_len, 16, dtype=torch.float64)
    results = {}
    for kernel in ("sdpa", "split"):
        qkv = [t.clone().requires_grad_() for t in base]
        out = block_diffusion_attention(
            *qkv, layout=layout, block_size=block_size, seq_len=seq_len, document_ids=docs, kernel=kernel,
            scale=0.2,
        )
        out.backward(grad_out)
        results[kernel] = [out.detach()] + [t.grad for t in qkv]
    for got, want in zip(results["split"], results["sdpa"], strict=True):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("layout", ["doubled_causal", "doubled_block_causal"])
@pytest.mark.parametrize("seq_len,block_size", [(8, 8), (24, 8), (40, 8), (40, 2), (72, 4), (96, 4), (520, 8)])
@pytest.mark.parametrize("docs_kind", [None, "random", "unaligned"])
def test_split_chunks_drop_no_allowed_key(
    layout: str, seq_len: int, block_size: int, docs_kind, split_chunking: str
) -> None:
    """Each noisy chunk keeps every key its rows may see (itself included), so no row is all-masked."""
    torch.manual_seed(8)
    docs = doc_ids(docs_kind, seq_len, block_size)
    full = dense_mask(layout, seq_len, block_size, docs)
    full = full[None] if docs is None else full
    chunks = attention._split_plan(full, seq_len, block_size, documents=docs is not None).chunks
    covered = 0
    for (q0, q1, k0, k1), mask in chunks:
        assert q0 == covered and q0 % block_size == 0 and q1 > q0
        covered = q1
        rows = full[:, q0:q1]
        kept = rows[..., seq_len : seq_len + q1].sum() + rows[..., k0:k1].sum()
        assert kept == rows.sum() == mask.sum()  # nothing allowed lies outside the chosen keys
        assert mask.any(dim=-1).all()
        own = torch.arange(q0, q1)
        assert mask[..., own - q0, q1 + own - k0].all()  # the noisy self key
    assert covered == seq_len and len(chunks) <= 8
    assert split_chunking != "default" or len(chunks) == 1 + (seq_len - 1) // 256


def test_clean_half_is_a_plain_causal_forward() -> None:
    torch.manual_seed(3)
    seq_len, block_size = 16, 4
    q, k, v = make_qkv("doubled_causal", seq_len, dtype=torch.float64)
    kw = dict(layout="doubled_causal", block_size=block_size, seq_len=seq_len)
    causal = torch.nn.functional.scaled_dot_product_attention(
        q[:, :, seq_len:], k[:, :, seq_len:], v[:, :, seq_len:], is_causal=True
    )
    noisy_changed = [t.clone() for t in (q, k, v)]
    for t in noisy_changed:
        t[:, :, :seq_len] = torch.randn_like(t[:, :, :seq_len])
    for kernel in ("sdpa", "split", "flex"):
        for inputs in ((q, k, v), noisy_changed):
            out = block_diffusion_attention(*inputs, kernel=kernel, **kw)
            torch.testing.assert_close(out[:, :, seq_len:], causal, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kernel", ["sdpa", "split"])
def test_output_dtype_matches_input(kernel: str) -> None:
    torch.manual_seed(4)
    q, k, v = make_qkv("doubled_causal", 8, dtype=torch.bfloat16)
    out = block_diffusion_attention(q, k, v, layout="doubled_causal", block_size=4, seq_len=8, kernel=kernel)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape


@pytest.mark.parametrize("kernel", ["sdpa", "split", "flex"])
def test_core_attention_applies_the_layer_softmax_scale(kernel: str, tiny_provider) -> None:
    """megatron-core hands ``config.softmax_scale`` to our core attention, which must reach every kernel:
    attention at scale s equals attention at the default 1/sqrt(d) of the queries times s * sqrt(d)."""
    from ar2dlm.model.core_attention import AttentionLayout, BlockDiffusionCoreAttention
    from ar2dlm.model.gpt import build_model

    tiny_provider.softmax_scale = 0.05
    layers = build_model(tiny_provider)[0].decoder.layers
    assert [layer.self_attention.core_attention.softmax_scale for layer in layers] == [0.05, 0.05]
    scaled, default = layers[0].self_attention.core_attention, BlockDiffusionCoreAttention(tiny_provider, 1)
    torch.manual_seed(5)
    seq_len, head_dim = 8, tiny_provider.kv_channels
    q = torch.randn(2 * seq_len, 2, 4, head_dim)  # Megatron's [s, b, heads, d]; 2 query groups
    k, v = torch.randn(2 * seq_len, 2, 2, head_dim), torch.randn(2 * seq_len, 2, 2, head_dim)

    def layout():
        return AttentionLayout("doubled_causal", seq_len, block_size=4, kernel=kernel)

    with torch.no_grad():
        out = scaled(q, k, v, layout())
        torch.testing.assert_close(out, default(q * 0.05 * head_dim**0.5, k, v, layout()), atol=1e-5, rtol=1e-5)
        assert (out - default(q, k, v, layout())).abs().max() > 1e-2


def test_auto_kernel_selection() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert select_kernel("auto", "doubled_causal", cuda, True) == "flex"
    assert select_kernel("auto", "causal", cuda, False) == "flex"
    assert select_kernel("auto", "doubled_causal", cpu, True) == "split"
    assert select_kernel("auto", "doubled_block_causal", cpu, False) == "split"
    assert select_kernel("auto", "causal", cpu, True) == "sdpa"
    assert select_kernel("auto", "bidirectional", cpu, False) == "sdpa"
    assert select_kernel("flex", "causal", cpu, False) == "flex"


def test_auto_trains_on_cpu() -> None:
    torch.manual_seed(6)
    q, k, v = (t.requires_grad_() for t in make_qkv("doubled_causal", 8))
    block_diffusion_attention(q, k, v, layout="doubled_causal", block_size=4, seq_len=8).sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def qkv_of(shape_q, shape_kv, dtype_k=torch.float32):
    return torch.randn(shape_q), torch.randn(shape_kv, dtype=dtype_k), torch.randn(shape_kv)


@pytest.mark.parametrize(
    "tensors,kwargs,message",
    [
        (qkv_of((1, 2, 8, 4), (1, 2, 8, 4)), dict(kernel="fast"), "unknown attention kernel 'fast'"),
        (
            qkv_of((1, 2, 4, 4), (1, 2, 4, 4)),
            dict(layout="causal", kernel="split"),
            "'split' needs a doubled layout",
        ),
        (
            qkv_of((1, 2, 8, 4), (1, 2, 6, 4)),
            dict(),
            r"key has shape \(1, 2, 6, 4\).*needs \[batch=1, heads, 8",
        ),
        (
            qkv_of((1, 3, 8, 4), (1, 2, 8, 4)),
            dict(),
            r"query heads \(3\) must be a multiple of key/value heads \(2\)",
        ),
        (qkv_of((1, 2, 8, 4), (1, 2, 8, 4), torch.float64), dict(), "must share a dtype"),
        ((torch.randn(2, 8, 4),) * 3, dict(), r"query must be a 4-D tensor.*got \(2, 8, 4\)"),
        (qkv_of((1, 2, 8, 4), (1, 2, 8, 8)), dict(), "query and key head_dim differ: 4 vs 8"),
        (
            qkv_of((1, 2, 8, 4), (1, 2, 8, 4)),
            dict(seq_len=4, block_size=3),
            r"seq_len \(4\) must be a multiple",
        ),
        (
            qkv_of((1, 2, 8, 4), (1, 2, 8, 4)),
            dict(document_ids=torch.zeros(2, 4, dtype=torch.long)),
            r"document_ids batch \(2\) != query batch \(1\)",
        ),
    ],
)
def test_bad_inputs_raise(tensors, kwargs: dict, message: str) -> None:
    kw = dict(layout="doubled_causal", block_size=2, seq_len=4) | kwargs
    torch.manual_seed(7)
    with pytest.raises(ValueError, match=message):
        block_diffusion_attention(*tensors, **kw)


def test_flex_with_grad_on_cpu_raises() -> None:
    q, k, v = (t.requires_grad_() for t in make_qkv("doubled_causal", 4))
    with pytest.raises(ValueError, match="'flex' has no backward on CPU"):
        block_diffusion_attention(q, k, v, layout="doubled_causal", block_size=2, seq_len=4, kernel="flex")


@pytest.mark.parametrize("kernel", ["sdpa", "split"])
def test_a_forward_cache_builds_document_masks_once(kernel: str) -> None:
    torch.manual_seed(5)
    q, k, v = (torch.randn(2, 2, 16, 8, dtype=torch.float64) for _ in range(3))
    docs = torch.tensor([[0] * 3 + [1] * 5, [0] * 8])
    args = dict(layout="doubled_causal", block_size=4, seq_len=8, document_ids=docs, kernel=kernel)
    cache: dict = {}
    first = block_diffusion_attention(q, k, v, cache=cache, **args)
    built = dict(cache)
    second = block_diffusion_attention(q, k, v, cache=cache, **args)
    assert cache.keys() == built.keys() and all(cache[key] is built[key] for key in built)
    assert any(isinstance(key, tuple) and key[0] == "dense" for key in cache)
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    torch.testing.assert_close(first, block_diffusion_attention(q, k, v, **args), rtol=0, atol=0)
