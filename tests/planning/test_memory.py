"""The planned bytes of a CPU run against what a real Trainer allocates.

Model states: the bytes of the parameters, gradients and optimizer state a Trainer holds after a step, to
the byte. Activations: the peak of memory allocated during the forward and backward of one micro-batch (the
step's second, so gradients already exist, as in megatron-core's gradient buffer on GPU), above what existed
before, tracked tensor by tensor by torch's MemTracker; and the bytes of the tensors autograd keeps at the
end of the forward pass (parameters excluded).
"""

import pytest
import torch

FAMILIES = [("Qwen3ForCausalLM", True), ("LlamaForCausalLM", False), ("Qwen2ForCausalLM", False)]


def _storage_bytes(tensors) -> int:
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("architecture,tied", FAMILIES)
def test_planned_model_states_are_what_the_trainer_allocates(planned_step, architecture, tied, precision):
    step = planned_step(f"train.precision={precision}", architecture=architecture, tied=tied)
    trainer = step.trainer
    trainer._train_step(1)
    parameters = [p for chunk in trainer.model for p in chunk.parameters()]
    optimizer_state = [value for state in trainer.optimizer.optimizer.state.values() for value in state.values()]
    measured = (_storage_bytes(parameters), _storage_bytes(p.grad for p in parameters),
                _storage_bytes(optimizer_state))
    states = step.plan.memory.states
    assert (states.parameters, states.gradients, states.optimizer) == measured


def _activation_peak(step) -> int:
    from torch.distributed._tools.mem_tracker import MemTracker

    step.forward_backward()  # the gradients exist from here on
    tracker = MemTracker()
    tracker.track_external(*step.trainer.unwrapped_model)
    with tracker:
        step.forward_backward(micro_batches=1)
    peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    return peak["Total"] - peak["Parameter"] - peak["Gradient"]


def _saved_at_end_of_forward(step) -> int:
    from ar2dlm.training.forward import loss_parts, model_inputs

    model = step.trainer.model[0]
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def keep(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    batch = step.batches[0]
    input_ids, labels, layout = model_inputs(batch, torch.device("cpu"))
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        parts = loss_parts(model(input_ids, None, layout, labels=labels), batch, step.trainer.settings,
                           torch.device("cpu"))
    del parts
    return sum(saved.values())


ACTIVATION_CASES = [
    ("train.objective=ar",),
    ("diffusion.attention_kernel=sdpa",),
    ("diffusion.attention_kernel=split",),
    ("diffusion.attention_kernel=sdpa", "train.recompute=selective"),
    ("diffusion.attention_kernel=split", "train.recompute=full"),
    ("diffusion.attention_kernel=split", "train.precision=bf16"),
]


@pytest.mark.parametrize("overrides", ACTIVATION_CASES, ids=lambda o: ",".join(x.split(".")[-1] for x in o))
def test_planned_activation_peak_is_the_measured_peak(planned_step, overrides):
    step = planned_step(*overrides)
    memory = step.plan.memory
    planned = memory.activations.peak + memory.mask.held
    measured = _activation_peak(step)
    print(f"{overrides}: planned {planned / 1e6:.2f} MB, measured {measured / 1e6:.2f} MB")
    assert abs(planned - measured) <= 0.25 * measured


@pytest.mark.parametrize("overrides", ACTIVATION_CASES, ids=lambda o: ",".join(x.split(".")[-1] for x in o))
def test_planned_kept_tensors_are_what_autograd_keeps(planned_step, overrides):
    """The per-tensor tables of ar2dlm/planning/memory.py: what the forward pass leaves for the backward."""
    from ar2dlm.planning.memory import loss_bytes

    step = planned_step(*overrides)
    planned = step.plan.memory.activations.layers + loss_bytes(step.plan.run)[0]
    measured = _saved_at_end_of_forward(step)
    print(f"{overrides}: planned {planned / 1e6:.3f} MB, measured {measured / 1e6:.3f} MB")
    assert abs(planned - measured) <= 0.05 * measured


@pytest.mark.parametrize("distributed", [True, False])
@pytest.mark.parametrize("recipe,gpus", [("qwen3_8b_joint", 64), ("llama3_2_3b_joint", 8), ("qwen3_14b_ar", 16)])
def test_gpu_model_states_are_megatron_bridges_theoretical_memory(bridge_model, recipe, gpus, distributed):
    """megatron-bridge's compute_weight_and_optimizer_memory (18 or 6 + 12 / DP bytes per parameter of the most
    loaded GPU; it counts LayerNorm biases and no q/k norms, a few parameters per layer apart)."""
    from types import SimpleNamespace

    from megatron.bridge.training.utils.theoretical_memory_utils import compute_weight_and_optimizer_memory

    from ar2dlm.config import compose_stage
    from ar2dlm.planning.report import make_plan

    plan = make_plan(compose_stage("plan", [f"recipe={recipe}", f"plan.gpus={gpus}",
                                            f"parallel.distributed_optimizer={distributed}"]))
    config = SimpleNamespace(model=bridge_model(plan), data_parallel_size=plan.run.data,
                             optimizer=SimpleNamespace(use_distributed_optimizer=distributed))
    assert plan.memory.states.total == pytest.approx(compute_weight_and_optimizer_memory(config), rel=1e-3)
