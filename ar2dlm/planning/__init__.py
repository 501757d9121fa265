"""`ar2dlm plan`: memory, FLOPs, time and communication of a training run, computed before it is submitted.

shape.py          the architecture that is sized (init checkpoint, or the recipe's ``model.*`` description)
run.py            the facts of the run the formulas need (layout, micro-batches, sequence, kernel, device)
parameters.py     parameters per GPU of megatron-core's GPT model
attention_work.py query-key pairs each layout attends to and each kernel computes
memory.py         parameter, gradient, optimizer, activation and attention-mask bytes per GPU
flops.py          FLOPs per step (model and kernel conventions) and time at an assumed MFU
communication.py  bytes each GPU sends per step for tensor, pipeline, context and data parallelism
report.py         the plan of a train config, as text or JSON; the `plan` stage's entry point
"""
