"""megatron-core's checkpoint writer without its helper process.

megatron-core's ``torch_dist`` writer collects write results in a queue served by a ``multiprocessing``
manager process, spawned at the first save, so that asynchronous saves can use it from another process.
ar2dlm saves synchronously: the results are put and taken in the saving process itself, so an in-process
queue does the same job. The manager process was in the trainer's process group: the SIGTERM that Slurm
(or ``kill -TERM -- -PGID``) sends to every process of a job killed it, which broke the save the trainer
makes on SIGTERM, and it outlived a ``kill -9`` of the trainer. With the in-process queue it never exists.
Asynchronous saves (not used by ar2dlm) would need megatron's own queue back.
"""

from __future__ import annotations

import queue


def use_in_process_result_queue() -> None:
    """Give megatron-core's synchronous checkpoint writer an in-process result queue (idempotent)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", None) is None:
        filesystem_async._results_queue = queue.Queue()
