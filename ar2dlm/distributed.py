"""Process-group and model-parallel setup: gloo on CPU, NCCL on GPU, torchrun or a single process."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ar2dlm.compat import configure_torch_for_cpu, seed_model_parallel_rng


class ParallelLayoutError(ValueError):
    """The requested parallel layout does not fit the world size."""


@dataclass(frozen=True)
class ParallelLayout:
    tensor: int = 1
    pipeline: int = 1
    context: int = 1

    @property
    def model_parallel(self) -> int:
        return self.tensor * self.pipeline * self.context

    def data_parallel(self, world_size: int) -> int:
        if world_size % self.model_parallel:
            raise ParallelLayoutError(
                f"world size {world_size} is not divisible by tensor x pipeline x context = "
                f"{self.tensor} x {self.pipeline} x {self.context} = {self.model_parallel}"
            )
        return world_size // self.model_parallel


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(layout: ParallelLayout, seed: int = 1234) -> int:
    """Start the process group (if needed) and megatron-core's model-parallel groups.

    Under torchrun the usual RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT variables are used; without
    them a single-process group is created. Returns the data-parallel size.
    """
    from megatron.core import parallel_state

    configure_torch_for_cpu()  # process start for a script that runs megatron-core itself (the CLI did it already)
    world_size = world_size_from_env()
    data_parallel = layout.data_parallel(world_size)
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if launched_by_torchrun():
            dist.init_process_group(backend)
        else:
            store = dist.TCPStore("127.0.0.1", _free_port(), 1, is_master=True)
            dist.init_process_group(backend, store=store, rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=layout.tensor,
            pipeline_model_parallel_size=layout.pipeline,
            context_parallel_size=layout.context,
        )
    seed_model_parallel_rng(seed)
    return data_parallel


def is_rank_zero() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0
