"""Silence the third-party warnings that every ar2dlm command would print although nothing is wrong.

Each entry is a fallback or a deprecation inside megatron-core, megatron-bridge, torch or transformers that
ar2dlm relies on knowingly; the reason is next to it. Anything else still shows.
"""

from __future__ import annotations

import logging
import warnings
from functools import cache

# (category, message regex, why it is expected)
_WARNINGS: tuple[tuple[type[Warning], str, str], ...] = (
    (UserWarning, r"Transformer Engine and Apex are not installed",
     "CPU (and GPU without Transformer Engine): megatron-core falls back to torch optimizers and kernels"),
    (UserWarning, r"Apex is not installed", "megatron-core's torch norm replaces Apex's fused one"),
    (UserWarning, r"The legacy GroupedMLP will be deprecated",
     "printed by megatron-core's Transformer Engine spec module on import; ar2dlm builds no MoE layers"),
    (UserWarning, r"full scope is deprecated",
     "megatron-bridge's provider default cuda_graph_scope='full', which megatron-core maps to the same thing"),
    (FutureWarning, r"`load_state_dict` is deprecated",
     "megatron-core's distributed-checkpoint loader calls torch's old name"),
    (FutureWarning, r"Please use DTensor instead and we are deprecating ShardedTensor",
     "megatron-core's distributed checkpoints are made of ShardedTensors"),
)

# logger name -> (message prefix, why it is expected)
_LOG_RECORDS: dict[str, tuple[str, str]] = {
    "megatron.bridge.utils.fusions": ("gradient_accumulation_fusion requires",
                                      "Apex's fused weight-gradient kernel: absent on CPU, optional on GPU"),
    "transformers.configuration_utils": ("`torch_dtype` is deprecated",
                                         "megatron-bridge reads config.torch_dtype, transformers' old name"),
}


class _DropRecordsStartingWith(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


@cache
def silence_expected_warnings() -> None:
    """Install the filters (once per process); call it before megatron is imported."""
    for category, message, _why in _WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, (prefix, _why) in _LOG_RECORDS.items():
        logging.getLogger(name).addFilter(_DropRecordsStartingWith(prefix))
