"""The planned FLOPs of a step against torch's FLOP counter on the real training step of the same model.

``torch.utils.flop_counter.FlopCounterMode`` counts every matmul and attention call the step dispatches
(forward, backward and what activation recompute repeats). CPU attention runs through
``_scaled_dot_product_flash_attention_for_cpu``, which torch's counter does not list; it is counted with
torch's own SDPA formulas (``sdpa_flop_count`` and ``sdpa_backward_flop_count``).
"""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

CPU_ATTENTION = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
        lambda query, key, value, *args, out_shape=None, **kwargs: sdpa_flop_count(query, key, value),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda grad, query, key, value, *args, out_shape=None, **kwargs:
            sdpa_backward_flop_count(grad, query, key, value),
}

CASES = [
    ("train.objective=ar",),
    ("diffusion.attention_kernel=sdpa",),
    ("diffusion.attention_kernel=split",),
    ("diffusion.attention_kernel=split", "data.seq_length=512"),  # two noisy chunks
    ("diffusion.attention_kernel=sdpa", "train.recompute=selective"),
    ("diffusion.attention_kernel=split", "train.recompute=full"),
]


@pytest.mark.parametrize("overrides", CASES, ids=lambda o: ",".join(x.split(".")[-1] for x in o))
def test_planned_kernel_flops_are_what_the_step_computes(planned_step, overrides):
    step = planned_step(*overrides)
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION) as counter:
        step.forward_backward()
    planned, counted = step.plan.flops.kernel, counter.get_total_flops()
    print(f"{overrides}: planned {planned:.4e}, counted {counted:.4e}")
    assert abs(planned - counted) <= 0.05 * counted


def test_model_flops_of_the_joint_step_double_the_ar_step_on_the_same_data(planned_step):
    """Twice the positions through every GEMM; attention over about twice the pairs (L^2 + L B / 2 against
    L (L + 1) / 2), whatever the kernel computes."""
    plan = planned_step("diffusion.attention_kernel=sdpa").plan
    assert plan.flops.data_tokens == plan.ar_flops.data_tokens
    assert 1.95 < plan.flops.model / plan.ar_flops.model < 2.05
    assert plan.flops.kernel > plan.flops.model  # the dense square and the backward's recomputed scores



@pytest.mark.parametrize("recipe", ["qwen3_8b_ar", "llama3_1_8b_ar", "qwen2_5_7b_ar", "llama3_2_3b_ar"])
def test_model_flops_of_an_ar_step_are_megatron_bridges(bridge_model, recipe):
    """megatron-bridge's FLOP count (Narayanan et al. 2021, half the square for a causal mask) of the AR stage."""
    from types import SimpleNamespace

    from megatron.bridge.training.utils.flop_utils import num_floating_point_operations

    from ar2dlm.config import compose_stage
    from ar2dlm.planning.report import make_plan

    plan = make_plan(compose_stage("plan", [f"recipe={recipe}", "plan.gpus=64"]))
    config = SimpleNamespace(model=bridge_model(plan))
    theirs = num_floating_point_operations(config, batch_size=plan.run.global_batch_size)
    assert plan.flops.model == pytest.approx(theirs, rel=1e-3)
