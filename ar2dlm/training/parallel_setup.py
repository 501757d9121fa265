"""Training settings that live on the megatron model config: parallel sizes, precision, FP8, recompute."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from ar2dlm.compat import cuda_available
from ar2dlm.errors import UserError

PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def configure_provider(provider, cfg: DictConfig):
    """Apply the run's layout and precision to a megatron-bridge provider (before the model is built)."""
    parallel, train = cfg.parallel, cfg.train
    provider.tensor_model_parallel_size = parallel.tensor
    provider.pipeline_model_parallel_size = parallel.pipeline
    provider.context_parallel_size = parallel.context
    provider.sequence_parallel = parallel.sequence_parallel
    provider.calculate_per_token_loss = True  # the loss is summed and divided by the global token count
    if parallel.sequence_parallel and not cuda_available():
        raise UserError("parallel.sequence_parallel needs a GPU: megatron-core's CPU layer norm (torch) does not "
                        "support sequence parallelism")
    if train.fp8 is not None:
        if not cuda_available():
            raise UserError(f"train.fp8={train.fp8} needs a CUDA GPU with Transformer Engine")
        provider.fp8 = train.fp8
        provider.fp8_recipe = train.fp8_recipe
        provider.fp8_param = False
    if train.recompute == "full":
        provider.recompute_granularity = "full"
        provider.recompute_method = "uniform"
        provider.recompute_num_layers = 1
    elif train.recompute == "selective":
        provider.recompute_granularity = "selective"
        provider.recompute_modules = ["core_attn"]
    return provider
