"""A ``torch_dist`` checkpoint writer that holds at most one staged tensor at a time (every ar2dlm save).

megatron-core's writer is built for asynchronous saves: it stages every tensor before it forks a writer
process, and stages a tensor that is a view into a larger storage as a copy (a SwiGLU ``linear_fc1`` is
saved as its gate and up halves), so about a third of a Llama model is held twice while it saves. This
writer resolves, copies when needed and writes one tensor at a time in the saving process, in the same
format (one ``__RANK_0.distcp`` file per rank, read by ``dist_checkpointing.load`` under any layout).
"""

from __future__ import annotations

import inspect
import os
import queue

from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync
from megatron.core.dist_checkpointing.strategies.state_dict_saver import save_state_dict_async_plan
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    TorchDistSaveShardedStrategy,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX, _write_item
from torch.distributed.checkpoint.planner import WriteItemType


def _write_item_options() -> dict:
    from torch.distributed.checkpoint.filesystem import SerializationFormat

    if "serialization_format" in inspect.signature(_write_item).parameters:  # torch >= 2.7
        return {"serialization_format": SerializationFormat.TORCH_SAVE}
    return {}


def with_own_storage(tensor):
    """``tensor``, or a copy of it when it is a view into a larger storage (torch.save writes whole storages)."""
    if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        return tensor.clone()
    return tensor


class StreamingWriter(FileSystemWriterAsync):
    """megatron-core's ``torch_dist`` writer, writing each tensor as soon as it is resolved."""

    def prepare_write_data(self, plan, planner) -> None:
        self._items = sorted(plan.items, key=lambda item: item.type != WriteItemType.BYTE_IO)
        self._planner = planner
        self._file_name = f"{plan.storage_data.prefix}0{DEFAULT_SUFFIX}"
        self.write_buckets = [self._file_name] if self._items else []  # megatron-core counts results per bucket
        self.results_queue = queue.Queue() if self._items else None

    def get_save_function_and_args(self):
        if not self._items:
            return None, None, []
        return self._write_all, None, []

    def _write_all(self) -> None:
        transforms = [self.transforms] if hasattr(self, "transforms") else []  # torch >= 2.6
        options = _write_item_options()
        results = []
        try:
            with open(os.path.join(self.checkpoint_dir, self._file_name), "wb") as stream:
                for item in self._items:
                    data = self._planner.resolve_data(item)
                    if item.type != WriteItemType.BYTE_IO:
                        data = with_own_storage(data.detach().to("cpu"))
                    results.append(_write_item(*transforms, stream, data, item, self._file_name, **options))
                    del data
                stream.flush()
                os.fsync(stream.fileno())
        except Exception as error:  # megatron-core's finalisation reports it on every rank, as for its own writer
            self.results_queue.put(error)
            return
        self.results_queue.put({0: results})


class StreamingSaveStrategy(TorchDistSaveShardedStrategy):
    """``torch_dist`` saving through :class:`StreamingWriter` (each save is planned afresh: no cached plans)."""

    def __init__(self):
        super().__init__("torch_dist", 1, thread_count=1)

    def async_save(self, sharded_state_dict, checkpoint_dir):
        sharded_state_dict, _, _ = _replace_state_dict_keys_with_sharded_keys(
            sharded_state_dict, self.keep_only_main_replica)
        writer = StreamingWriter(checkpoint_dir, thread_count=1)
        planner = MCoreSavePlanner(dedup_replicated_tensors=not self.keep_only_main_replica, flatten_state_dict=False)
        planned = save_state_dict_async_plan(mcore_to_pyt_state_dict(sharded_state_dict, False), writer, None, 0,
                                             planner=planner)
        return self._get_save_and_finalize_callbacks(writer, planned[0])
