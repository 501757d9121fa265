"""ar2dlm: turn a pretrained autoregressive LLM into a tri-mode diffusion LM on Megatron."""

__version__ = "0.1.0"
