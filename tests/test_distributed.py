import pytest
import torch.distributed as dist

from ar2dlm.distributed import ParallelLayout, ParallelLayoutError, is_rank_zero


def test_layout_data_parallel_size():
    assert ParallelLayout(tensor=2, pipeline=2).data_parallel(8) == 2
    assert ParallelLayout().data_parallel(3) == 3
    with pytest.raises(ParallelLayoutError, match="world size 6 is not divisible by .* = 4"):
        ParallelLayout(tensor=2, context=2).data_parallel(6)


def test_single_process_group_without_torchrun(megatron_ready):
    from megatron.core import parallel_state

    assert dist.is_initialized()
    assert dist.get_backend() in ("gloo", "nccl")
    assert dist.get_world_size() == 1
    assert parallel_state.get_tensor_model_parallel_world_size() == 1
    assert parallel_state.get_data_parallel_world_size() == 1
    assert is_rank_zero()
