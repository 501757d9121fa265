"""Make megatron-core and megatron-bridge usable on machines without CUDA or Transformer Engine.

Everything here is a no-op when CUDA and Transformer Engine are present, so the same model,
conversion and training code runs on a GPU cluster and on a CPU laptop. Installed packages are
never edited; the adjustments are:

* :func:`configure_torch_for_cpu`, called at process start: by the command line's ``main``, the test suite's
  conftest, and :func:`ar2dlm.distributed.init_distributed` (which a script that runs megatron-core itself
  calls first). Without CUDA, ``torch.cuda.current_device`` returns the CPU device and
  ``torch.cuda.synchronize`` does nothing (megatron-core moves rotary tables and checkpoint buffers to
  ``current_device()`` and synchronises around checkpoint writes). It patches ``torch.cuda`` for the whole
  process, so building a model, importing megatron-bridge or seeding never do it on the side.
* megatron-core's RNG tracker is seeded with the flags that work without CUDA, and the CUDA
  random state that activation recompute saves and restores is empty (there is no CUDA
  generator; the CPU generator, which CPU dropout uses, is saved by megatron-core separately).
* megatron-core's pipeline schedules allocate bookkeeping tensors with ``device="cuda"``, and a
  pipeline-parallel model moves its tied embedding with ``.cuda()``; :func:`cuda_allocations_on_cpu`
  keeps both on the CPU while a schedule runs or a model is built.
* megatron-bridge imports ``transformer_engine`` and ``triton`` at import time (for fused LoRA
  layers and inference kernels that a CPU run never calls). When they are missing, a stand-in is
  importable only while ``megatron.bridge`` itself is imported, after megatron-core has recorded
  that Transformer Engine is absent; the stand-ins are removed again right after.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from contextlib import nullcontext
from functools import cache

import torch
from torch.overrides import TorchFunctionMode

_STANDIN_ROOTS = ("transformer_engine", "triton")


def cuda_available() -> bool:
    return torch.cuda.is_available()


def transformer_engine_available() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


@cache
def configure_torch_for_cpu() -> None:
    """Route megatron-core's ``torch.cuda`` device queries to the CPU when there is no GPU (process-wide; a
    second call does nothing). Call it at process start, before megatron-core runs."""
    if cuda_available():
        return
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *args, **kwargs: None
    no_cuda_rng_state = lambda *args, **kwargs: torch.empty(0, dtype=torch.uint8)  # noqa: E731
    torch.cuda.get_rng_state = torch.cuda.random.get_rng_state = no_cuda_rng_state


def seed_model_parallel_rng(seed: int) -> None:
    """Seed megatron-core's tensor-parallel RNG tracker (CPU-safe)."""
    from megatron.core import tensor_parallel

    if cuda_available():
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    else:
        tensor_parallel.model_parallel_cuda_manual_seed(seed, inference_rng_tracker=True, force_reset_rng=True)


class _CudaAllocationsOnCpu(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        device = kwargs.get("device")
        if device is not None and torch.device(device).type == "cuda":
            kwargs = {**kwargs, "device": "cpu"}
        return func(*args, **kwargs)


def cuda_allocations_on_cpu():
    """Without a GPU: a context in which ``device="cuda"`` allocations and ``tensor.cuda()`` stay on the CPU."""
    return nullcontext() if cuda_available() else _CudaAllocationsOnCpu()


class _StandInType(type):
    """A class whose every attribute is another stand-in class; calling it as a decorator is identity."""

    def __getattr__(cls, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _StandInType(name, (), {})

    def __call__(cls, *args, **kwargs):
        if len(args) == 1 and callable(args[0]) and not kwargs:
            return args[0]
        return _StandInType(cls.__name__, (), {})


class _StandInModule(types.ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        value = _StandInType(name, (), {})
        setattr(self, name, value)
        return value


class _StandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, roots: tuple[str, ...]):
        self.roots = roots

    def find_spec(self, fullname, path, target=None):
        if fullname.split(".")[0] in self.roots:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StandInModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def _import_megatron_core_first() -> None:
    """Import the megatron-core modules that record whether Transformer Engine exists."""
    import megatron.core.extensions  # noqa: F401
    import megatron.core.models.gpt.gpt_layer_specs  # noqa: F401
    import megatron.core.transformer.attention  # noqa: F401


@cache
def import_megatron_bridge() -> types.ModuleType:
    """Import and return ``megatron.bridge``, with stand-ins for missing GPU-only packages."""
    missing = tuple(root for root in _STANDIN_ROOTS if importlib.util.find_spec(root) is None)
    if not missing:
        import megatron.bridge

        return megatron.bridge
    _import_megatron_core_first()
    finder = _StandInFinder(missing)
    sys.meta_path.insert(0, finder)
    try:
        import megatron.bridge
    finally:
        sys.meta_path.remove(finder)
        for name in [n for n in sys.modules if n.split(".")[0] in missing]:
            del sys.modules[name]
    return megatron.bridge
