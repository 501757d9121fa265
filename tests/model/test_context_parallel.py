import pytest
import torch

from ar2dlm.model.context_parallel import local_positions, shard_index
from ar2dlm.model.masks import dense_mask


@pytest.mark.parametrize("size", [1, 2, 4])
def test_ranks_partition_the_sequence_with_balanced_causal_work(size):
    length = 32
    shares = [local_positions(length, rank, size) for rank in range(size)]
    assert torch.equal(torch.sort(torch.cat(shares)).values, torch.arange(length))
    causal = dense_mask("causal", length, 1)
    work = [int(causal[share].sum()) for share in shares]  # attended pairs of each rank's queries
    assert max(work) == min(work)


def test_doubled_layouts_shard_both_streams_at_the_same_positions():
    index = shard_index("doubled_causal", 16, rank=1, size=2)
    positions = local_positions(16, 1, 2)
    assert torch.equal(index, torch.cat([positions, positions + 16]))
    assert torch.equal(positions, torch.tensor([4, 5, 6, 7, 8, 9, 10, 11]))
    assert torch.equal(shard_index("causal", 16, 1, 2), positions)


def test_sequence_must_split_into_two_chunks_per_rank():
    with pytest.raises(ValueError, match="divisible by 2 x context parallel size = 4"):
        local_positions(10, 0, 2)
