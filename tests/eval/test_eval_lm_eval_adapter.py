"""The lm-evaluation-harness adapter: a clear error without lm-eval; with it, the registered ``ar2dlm``
model scores loglikelihoods through the AR forward and generates through the chosen mode."""

from __future__ import annotations

import importlib
import math
import sys
from types import SimpleNamespace

import pytest

ADAPTER = "ar2dlm.eval.lm_eval_adapter"


def test_missing_lm_eval_gives_a_clear_error(monkeypatch):
    for name in ("lm_eval", "lm_eval.api", "lm_eval.api.model", "lm_eval.api.registry"):
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules: the import fails
    monkeypatch.delitem(sys.modules, ADAPTER, raising=False)
    with pytest.raises(ImportError, match=r"pip install 'ar2dlm\[eval\]'"):
        importlib.import_module(ADAPTER)
    import ar2dlm.eval.run  # noqa: F401  (the rest of ar2dlm.eval never needs lm-eval)


def test_lm_eval_model(tiny_export):
    pytest.importorskip("lm_eval")
    from lm_eval.api.registry import get_model

    from ar2dlm.eval.likelihood import continuation_logprobs, encode_pair

    adapter = importlib.import_module(ADAPTER)
    assert get_model("ar2dlm") is adapter.Ar2dlmLM
    lm = adapter.Ar2dlmLM.create_from_arg_string(
        f"pretrained={tiny_export},mode=diffusion,block_length=4,threshold=0.9,batch_size=2,device=cpu")
    pairs = [("copy: a b =", " a b"), ("sort: 2 1 =", " 1 2"), ("", "x")]
    scores = lm.loglikelihood([SimpleNamespace(args=pair) for pair in pairs])
    expected = continuation_logprobs(lm.model, [encode_pair(lm.tokenizer, *pair) for pair in pairs])
    assert [s[0] for s in scores] == pytest.approx([e[0] for e in expected])
    rolling = lm.loglikelihood_rolling([SimpleNamespace(args=("copy: a b = a b",))])
    assert len(rolling) == 1 and rolling[0] < 0 and math.isfinite(rolling[0])
    requests = [SimpleNamespace(args=("copy: a =", {"until": ["\n"], "max_gen_toks": 6})),
                SimpleNamespace(args=("add: 1 + 2 =", {"until": "=", "max_gen_toks": 4}))]
    texts = lm.generate_until(requests)
    assert len(texts) == 2 and all(isinstance(t, str) and "\n" not in t for t in texts) and "=" not in texts[1]
