"""The conversion's checkpoint writer holds one staged tensor at a time and writes the usual torch_dist format."""

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ar2dlm.model.checkpoint import load_weights, save_weights
from ar2dlm.model.gpt import build_model


class LiveCopies(TorchDispatchMode):
    """Bytes of tensor copies (``clone``) alive at once while the mode is active."""

    def __init__(self):
        super().__init__()
        self.count = self.live = self.peak = self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.clone.default:
            size = result.untyped_storage().nbytes()
            self.count += 1
            self.live += size
            self.peak, self.largest = max(self.peak, self.live), max(self.largest, size)
            weakref.finalize(result, self._release, size)
        return result

    def _release(self, size: int) -> None:
        self.live -= size


def test_the_writer_copies_one_tensor_at_a_time_and_round_trips(tiny_provider, tmp_path):
    chunks = build_model(tiny_provider)
    with LiveCopies() as copies:
        save_weights(chunks, tmp_path / "weights")
    assert copies.count >= 2, "SwiGLU fc1 halves are views: the writer should have copied them"
    assert copies.peak == copies.largest, f"{copies.peak} bytes of copies alive at once, largest {copies.largest}"
    assert [p.name for p in (tmp_path / "weights").glob("*.distcp")] == ["__0_0.distcp"]

    loaded = build_model(tiny_provider)
    with torch.no_grad():
        for parameter in loaded[0].parameters():
            parameter.zero_()
    load_weights(loaded, tmp_path / "weights")
    expected = dict(chunks[0].named_parameters())
    for name, parameter in loaded[0].named_parameters():
        assert torch.equal(parameter, expected[name]), name
