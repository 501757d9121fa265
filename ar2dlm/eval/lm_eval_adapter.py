"""An lm-evaluation-harness model named ``ar2dlm``: loglikelihood tasks through the AR forward,
``generate_until`` through the chosen decoding mode.

Needs lm-eval (``pip install 'ar2dlm[eval]'``). lm-eval's own CLI does not import third-party modules, so
register the model by running lm-eval through this module (same arguments as ``lm_eval``)::

    python -m ar2dlm.eval.lm_eval_adapter --model ar2dlm \\
        --model_args pretrained=HF_DIR,mode=diffusion,block_length=32,threshold=0.9 --tasks gsm8k

or, from Python, ``import ar2dlm.eval.lm_eval_adapter`` before ``lm_eval.simple_evaluate(model="ar2dlm", ...)``,
or ``ar2dlm eval tasks=[lm_eval:TASK]`` (:mod:`ar2dlm.eval.harness`).
``model_args``: pretrained (an ar2dlm export), mode (ar | diffusion | self_spec | quad_spec; default self_spec),
draft_length (quad_spec; default block_length - 1),
block_length and threshold (default: the export's config), max_gen_toks (256; a task's own ``max_gen_toks``
wins), batch_size (1), device (auto; lm-eval's ``--device``, default cuda:0, when not in model_args).
Generation is greedy (temperature 0); sampling arguments are ignored with a warning.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as error:  # lm-eval is an optional dependency
    raise ImportError("ar2dlm.eval.lm_eval_adapter needs lm-evaluation-harness, which is not installed: "
                      "pip install 'ar2dlm[eval]'") from error

from ar2dlm.eval.generation import DecodeConfig, generate_texts
from ar2dlm.eval.likelihood import continuation_logprobs, encode_pair, prefix_token_id
from ar2dlm.generation.modes import MODES
from ar2dlm.log import logger

DEFAULT_MAX_GEN_TOKS = 256


def _as_int(value, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"ar2dlm model_args: {name}={value!r} is not an integer") from None


@register_model("ar2dlm")
class Ar2dlmLM(LM):
    """lm-eval wrapper around an exported ar2dlm checkpoint."""

    def __init__(self, pretrained: str, mode: str = "self_spec", block_length=None, threshold=None,
                 max_gen_toks=DEFAULT_MAX_GEN_TOKS, batch_size=1, device: str = "auto", draft_length=None,
                 **unused) -> None:
        super().__init__()
        from ar2dlm.generation.loading import check_export, load_export, resolve_device

        if mode not in MODES:
            raise ValueError(f"ar2dlm model_args: mode={mode!r} is not one of {', '.join(MODES)}")
        if unused:
            logger.warning("ar2dlm lm-eval model ignores model_args %s", ", ".join(sorted(unused)))
        config = check_export(Path(pretrained).expanduser())
        tokenizer, model = load_export(Path(pretrained).expanduser(), resolve_device(str(device)))
        self._attach(model, tokenizer, max_gen_toks, batch_size)
        self.decode_with(mode, _as_int(block_length or config.get("block_size", 32), "block_length"),
                         float(threshold if threshold is not None else config.get("diffusion_threshold", 0.9)),
                         None if draft_length is None else _as_int(draft_length, "draft_length"))

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> Ar2dlmLM:
        """As lm-eval's, except that ``model_args`` win over the ``additional_config`` lm-eval adds (its
        command line always passes ``device``, default cuda:0, and ``batch_size``) instead of clashing."""
        extra = {key: value for key, value in (additional_config or {}).items()
                 if value is not None and key not in arg_dict}
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> Ar2dlmLM:
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def around(cls, model, tokenizer, *, max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, batch_size: int = 1
               ) -> Ar2dlmLM:
        """The harness model of an export already loaded (by ``ar2dlm eval``); it decodes in AR until
        :meth:`decode_with` says otherwise."""
        lm = cls.__new__(cls)
        LM.__init__(lm)
        lm._attach(model, tokenizer, max_gen_toks, batch_size)
        lm.decode_with("ar")
        return lm

    def _attach(self, model, tokenizer, max_gen_toks, batch_size) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.max_gen_toks = _as_int(max_gen_toks, "max_gen_toks")
        self.batch_size = max(1, _as_int(batch_size if batch_size != "auto" else 1, "batch_size"))
        self.max_length = int(getattr(self.model.config, "max_position_embeddings", 4096) or 4096)

    def decode_with(self, mode: str, block_length: int | None = None, threshold: float | None = None,
                    draft_length: int | None = None) -> None:
        """Decoding of ``generate_until`` requests from now on (loglikelihoods always use the AR forward)."""
        self.decoding = DecodeConfig(mode, self.max_gen_toks, None if mode == "ar" else block_length,
                                     threshold if mode == "diffusion" else None,
                                     draft_length=draft_length if mode == "quad_spec" else None)

    def _decode_config(self, max_new_tokens: int) -> DecodeConfig:
        return replace(self.decoding, max_new_tokens=max_new_tokens)

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = [encode_pair(self.tokenizer, *request.args) for request in requests]
        pairs = [self._fit(context, continuation) for context, continuation in pairs]
        return continuation_logprobs(self.model, pairs, self.batch_size)

    def _fit(self, context: list[int], continuation: list[int]) -> tuple[list[int], list[int]]:
        """Keep the last ``max_length`` tokens of context + continuation (the continuation whole)."""
        room = self.max_length - len(continuation)
        return (context[-room:] if room > 0 else context[-1:]), continuation

    def loglikelihood_rolling(self, requests) -> list[float]:
        from lm_eval import utils

        results = []
        for request in requests:
            tokens = self.tokenizer(request.args[0], add_special_tokens=False)["input_ids"]
            windows = [utils.make_disjoint_window(window) for window in utils.get_rolling_token_windows(
                token_list=tokens, prefix_token=prefix_token_id(self.tokenizer), max_seq_len=self.max_length,
                context_len=1)]
            results.append(sum(logprob for logprob, _ in continuation_logprobs(self.model, windows,
                                                                               self.batch_size)))
        return results

    def generate_until(self, requests) -> list[str]:
        outputs: list[str | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for index, request in enumerate(requests):
            kwargs = dict(request.args[1] or {})
            if kwargs.get("do_sample") or float(kwargs.get("temperature", 0.0) or 0.0) > 0:
                logger.warning("ar2dlm lm-eval model decodes greedily; ignoring sampling arguments")
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            groups.setdefault((tuple(until), max_new), []).append(index)
        for (until, max_new), indices in groups.items():
            room = max(self.max_length - max_new, 1)
            prompts = [self.tokenizer(requests[i].args[0], add_special_tokens=True)["input_ids"][-room:]
                       or [prefix_token_id(self.tokenizer)] for i in indices]
            texts = generate_texts(self.model, self.tokenizer, prompts, self._decode_config(max_new),
                                   self.batch_size, until)
            for index, text in zip(indices, texts, strict=True):
                outputs[index] = text
        return outputs


def main() -> None:
    """``python -m ar2dlm.eval.lm_eval_adapter ARGS``: lm-eval's CLI with the ``ar2dlm`` model registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
