"""lm-evaluation-harness for real (the set-up script installs it, so a missing lm-eval fails here, it is not
skipped): the registered ``ar2dlm`` model runs a local task folder (a multiple-choice part scored by
loglikelihood, a ``generate_until`` part) through ``lm_eval.simple_evaluate`` in every decoding mode, and
`ar2dlm eval tasks=[lm_eval:...]` runs the same tasks.

References: loglikelihoods from the plain transformers ``LlamaForCausalLM`` forward of the same weights (one
unpadded sequence at a time, not ar2dlm's code); generated answers from `ar2dlm eval` on the same prompts,
and for AR from the known-answer model's rule."""

from __future__ import annotations

import importlib
import json
import math
import sys
from types import SimpleNamespace

import pytest
import torch

from ar2dlm.cli import main
from ar2dlm.errors import UserError
from ar2dlm.eval.intervals import wilson_interval
from ar2dlm.generation.modes import MODES

ADAPTER = "ar2dlm.eval.lm_eval_adapter"
BLOCK, THRESHOLD, MAX_NEW, BATCH = 4, 0.9, 6, 2
CHOICES = [{"question": "copy: a b =", "choices": ["EFG", "EFH", "I"], "label": 0},
           {"question": "reverse F", "choices": ["GHI", "EF", "GH I"], "label": 2},
           {"question": "the quick", "choices": ["fox", "E"], "label": 0}]
ANSWERS = [{"prompt": "copy: a b =", "answer": " EFGHII"}, {"prompt": "reverse F", "answer": "GHIII"},
           {"prompt": "the quick brown", "answer": "EFGHII"}]
CHOICE_TASK = """task: toy_choice
dataset_path: json
dataset_kwargs: {{data_files: {{test: {data}}}, cache_dir: {cache}}}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list: [{{metric: acc, aggregation: mean, higher_is_better: true}}]
"""
ANSWER_TASK = """task: toy_answer
dataset_path: json
dataset_kwargs: {{data_files: {{test: {data}}}, cache_dir: {cache}}}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs: {{until: ["\\n"], max_gen_toks: {max_new}, do_sample: false}}
metric_list: [{{metric: exact_match, aggregation: mean, higher_is_better: true, regexes_to_ignore: ["^\\\\s+", "\\\\s+$"]}}]
"""
GROUP = "group: toy_group\ntask: [toy_choice, toy_answer]\n"


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    import datasets
    import huggingface_hub.constants

    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def task_folder(tmp_path_factory):
    """lm-eval task YAMLs (toy_choice, toy_answer, toy_group of both; toy_missing reads no file) reading JSONL
    files, and answers.jsonl for `ar2dlm eval`."""
    root = tmp_path_factory.mktemp("lm_eval_tasks")
    folder, cache = root / "tasks", root / "datasets_cache"
    folder.mkdir()
    choices = write_jsonl(root / "choices.jsonl", CHOICES)
    answers = write_jsonl(root / "answers.jsonl", ANSWERS)
    (folder / "toy_choice.yaml").write_text(CHOICE_TASK.format(data=choices, cache=cache))
    (folder / "toy_answer.yaml").write_text(ANSWER_TASK.format(data=answers, cache=cache, max_new=MAX_NEW))
    (folder / "toy_group.yaml").write_text(GROUP)
    missing = CHOICE_TASK.replace("toy_choice", "toy_missing").format(data=root / "missing.jsonl", cache=cache)
    (folder / "toy_missing.yaml").write_text(missing)
    return SimpleNamespace(folder=folder, answers=answers)


@pytest.fixture(scope="module")
def plain_llama(known):
    """The known-answer export's weights in transformers' own LlamaForCausalLM (no ar2dlm code)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(known.path).eval(), AutoTokenizer.from_pretrained(known.path)


def reference(plain, context: str, continuation: str) -> tuple[float, bool]:
    """log p(continuation | context) and whether greedy decoding gives the continuation: the whole text
    encoded once, its forward without padding, the continuation's tokens summed."""
    model, tokenizer = plain
    whole = tokenizer(context + continuation)["input_ids"]
    start = len(tokenizer(context)["input_ids"])
    assert whole[:start] == tokenizer(context)["input_ids"]  # the prompts split cleanly at the context
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), dim=-1)
    positions = range(start, len(whole))
    return (sum(logprobs[p - 1, whole[p]].item() for p in positions),
            all(logprobs[p - 1].argmax().item() == whole[p] for p in positions))


def ar_answer(known, tokenizer, prompt: str) -> str:
    """What AR decoding of the known-answer model generates: the successor rule from the last prompt token."""
    tokens = [tokenizer(prompt)["input_ids"][-1]]
    for _ in range(MAX_NEW):
        tokens.append(known.successor(tokens[-1]))
    return tokenizer.decode(tokens[1:]).strip()


def harness_run(known, task_folder, mode: str) -> dict:
    from lm_eval import simple_evaluate

    from ar2dlm.eval.harness import task_manager

    importlib.import_module(ADAPTER)
    return simple_evaluate(
        model="ar2dlm", model_args=f"pretrained={known.path},mode={mode},block_length={BLOCK},threshold={THRESHOLD},"
        f"batch_size={BATCH},device=cpu", tasks=["toy_choice", "toy_answer"], log_samples=True,
        task_manager=task_manager(str(task_folder.folder.resolve())))


@pytest.fixture(scope="module")
def ar2dlm_eval_report(known, task_folder, tmp_path_factory):
    """`ar2dlm eval` of answers.jsonl and of both harness tasks: (report.json, predictions.jsonl rows)."""
    output = tmp_path_factory.mktemp("lm_eval_report") / "report"
    assert main(["eval", f"model={known.path}", f"output={output}", f"lm_eval_include={task_folder.folder}",
                 f"tasks=[jsonl:{task_folder.answers},lm_eval:toy_choice,lm_eval:toy_answer]", f"block_length={BLOCK}",
                 f"thresholds=[{THRESHOLD}]", f"max_new_tokens={MAX_NEW}", f"batch_size={BATCH}", "perplexity=false",
                 "device=cpu"]) == 0
    rows = [json.loads(line) for line in (output / "predictions.jsonl").read_text().splitlines()]
    return json.loads((output / "report.json").read_text()), rows


@pytest.mark.parametrize("mode", MODES)
def test_local_tasks_through_the_harness_in_every_mode(mode, known, plain_llama, task_folder, ar2dlm_eval_report):
    results = harness_run(known, task_folder, mode)
    samples = {task: sorted(rows, key=lambda row: row["doc_id"]) for task, rows in results["samples"].items()}

    # multiple choice: each choice's loglikelihood is the plain transformers one; accuracy follows from them
    correct = 0
    for record, sample in zip(CHOICES, samples["toy_choice"], strict=True):
        scores = [response[0] for response in sample["filtered_resps"]]
        expected = [reference(plain_llama, record["question"], " " + choice)[0] for choice in record["choices"]]
        assert scores == pytest.approx(expected, abs=1e-4)
        correct += max(range(len(expected)), key=expected.__getitem__) == record["label"]
    assert results["results"]["toy_choice"]["acc,none"] == pytest.approx(correct / len(CHOICES))
    assert 0 < correct < len(CHOICES)

    # generation: the answers `ar2dlm eval` decodes for the same prompts in the same setting
    report, rows = ar2dlm_eval_report
    setting = {"mode": mode, "block_length": None if mode == "ar" else BLOCK,
               "threshold": THRESHOLD if mode == "diffusion" else None}
    native = [row for row in rows if all(row[key] == value for key, value in setting.items())]
    generated = [sample["filtered_resps"][0].strip() for sample in samples["toy_answer"]]
    assert [sample["arguments"][0][0] for sample in samples["toy_answer"]] == [row["prompt"] for row in native]
    assert generated == [row["prediction"] for row in native]
    accuracy = results["results"]["toy_answer"]["exact_match,none"]
    assert accuracy == pytest.approx(sum(row["correct"] for row in native) / len(native))
    if mode != "diffusion":  # self-speculation returns exactly the AR tokens
        _, tokenizer = plain_llama
        assert generated == [ar_answer(known, tokenizer, record["prompt"]) for record in ANSWERS]
        assert accuracy == pytest.approx(2 / 3)

    # `ar2dlm eval tasks=[lm_eval:...]` reported the same numbers
    lm_eval_rows = {(row["task"], row["mode"]): row for row in report["lm_eval"]}
    answer_row = lm_eval_rows["toy_answer", mode]
    assert answer_row["metrics"]["exact_match,none"] == pytest.approx(accuracy)
    assert {key: answer_row[key] for key in setting} == setting
    assert lm_eval_rows["toy_choice", None]["metrics"]["acc,none"] == pytest.approx(correct / len(CHOICES))


def test_ar2dlm_eval_report_of_harness_tasks(ar2dlm_eval_report):
    report, rows = ar2dlm_eval_report
    # the loglikelihood task once (no decoding mode), the generation task in each setting of the sweep
    assert [(row["task"], row["mode"], row["output_type"], row["samples"]) for row in report["lm_eval"]] == [
        ("toy_choice", None, "multiple_choice", 3)] + [("toy_answer", mode, "generate_until", 3) for mode in MODES]
    assert len(report["results"]) == len(MODES) and len(rows) == len(MODES) * len(ANSWERS)
    assert report["settings"]["tasks"][1:] == ["lm_eval:toy_choice", "lm_eval:toy_answer"]


def test_harness_tasks_alone_and_the_printed_table(known, task_folder, tmp_path, capsys):
    output = tmp_path / "out"
    assert main(["eval", f"model={known.path}", f"output={output}", f"lm_eval_include={task_folder.folder}",
                 "tasks=[lm_eval:toy_choice]", "device=cpu"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[0].startswith("| lm-eval task | mode |") and printed[2].startswith("| toy_choice | loglikelihood |")
    report = json.loads((output / "report.json").read_text())
    assert report["results"] == [] and report["perplexity"] is None and len(report["lm_eval"]) == 1
    assert "| toy_choice | loglikelihood |" in (output / "report.md").read_text()
    assert not (output / "accuracy_vs_tpf.png").exists()
    samples, acc = report["lm_eval"][0]["samples"], report["lm_eval"][0]["metrics"]["acc,none"]
    low, high = wilson_interval(round(acc * samples), samples)  # accuracies carry samples and a 95% interval
    assert f"| acc | {acc:.4f} |" in printed[2] and printed[2].endswith(f"| {samples} | [{low:.4f}, {high:.4f}] |")


def test_a_group_holding_a_generation_task_runs_whole_in_each_setting(known, task_folder, tmp_path):
    output = tmp_path / "out"
    assert main(["eval", f"model={known.path}", f"output={output}", f"lm_eval_include={task_folder.folder}",
                 "tasks=[lm_eval:toy_group]", "modes=[ar,self_spec]", f"block_length={BLOCK}",
                 f"max_new_tokens={MAX_NEW}", "device=cpu"]) == 0
    report = json.loads((output / "report.json").read_text())
    rows = {(row["task"], row["mode"]): row for row in report["lm_eval"]}
    assert set(rows) == {(task, mode) for task in ("toy_group", "toy_choice", "toy_answer") for mode in ("ar", "self_spec")}
    assert rows["toy_group", "ar"]["output_type"] is None and rows["toy_answer", "ar"]["output_type"] == "generate_until"
    assert rows["toy_answer", "ar"]["metrics"] == rows["toy_answer", "self_spec"]["metrics"]  # lossless
    assert rows["toy_answer", "ar"]["metrics"]["exact_match,none"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("change, message", [
    ("tasks=[lm_eval:no_such_task]", "lm_eval:no_such_task: Spec 'no_such_task' is not a registered task/group/tag "
                                     "name or valid YAML path"),
    ("tasks=[lm_eval:]", "needs a name: lm_eval:TASK"),
    ("tasks=[lm_eval:toy_missing]", "lm_eval:toy_missing: Unable to find"),
    ("lm_eval_include=/nonexistent/tasks", "lm_eval_include=/nonexistent/tasks: no such folder"),
    ("tasks=[lm_eval:toy_group,lm_eval:toy_choice]", "lm-eval task toy_choice is in both lm_eval:toy_group and "
                                                     "lm_eval:toy_choice"),
    ("tasks=[lm_eval:toy_choice,lm_eval:toy_choice]", "lm_eval:toy_choice is listed twice in tasks"),
])
def test_bad_harness_tasks_exit_with_one_line(known, task_folder, tmp_path, capsys, change, message):
    args = ["eval", f"model={known.path}", f"output={tmp_path / 'out'}", f"lm_eval_include={task_folder.folder}",
            "tasks=[lm_eval:toy_choice]", "device=cpu"]
    assert main(args + [change]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1].startswith("ar2dlm eval: error: ") and message in error[-1]
    assert sum(line.startswith("ar2dlm eval:") for line in error) == 1 and not any("Traceback" in e for e in error)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("export", ["known", "tiny_export"])
def test_adapter_loglikelihoods_match_plain_transformers(export, request):
    """Direct calls, with requests of different lengths batched together, an empty context, and a rolling one;
    on the known-answer model and on a random one (whose log-probabilities are all different)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    path = getattr(request.getfixturevalue(export), "path", request.getfixturevalue(export))
    plain = LlamaForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    adapter = importlib.import_module(ADAPTER)
    lm = adapter.Ar2dlmLM.create_from_arg_string(f"pretrained={path},mode=ar,batch_size=3,device=cpu")
    pairs = [("copy: a b =", " EFGH"), ("reverse F", "GHI"), ("the quick brown fox", " jumps"), ("", "E F")]
    scores = lm.loglikelihood([SimpleNamespace(args=pair) for pair in pairs])
    bos = plain[1].bos_token  # an empty context stands for the BOS token
    expected = [reference(plain, context or bos, continuation) for context, continuation in pairs]
    assert [score for score, _ in scores] == pytest.approx([score for score, _ in expected], abs=1e-4)
    assert [greedy for _, greedy in scores] == [greedy for _, greedy in expected]
    if export == "known":
        assert any(greedy for _, greedy in expected) and not all(greedy for _, greedy in expected)
    text = "the quick brown fox"
    rolling = lm.loglikelihood_rolling([SimpleNamespace(args=(text,))])
    assert rolling == pytest.approx([reference(plain, bos, text)[0]], abs=1e-4) and math.isfinite(rolling[0])


def test_adapter_generates_until_a_stop_string(known):
    adapter = importlib.import_module(ADAPTER)
    # lm-eval's command line adds device (default cuda:0) and batch_size; model_args win instead of clashing
    lm = adapter.Ar2dlmLM.create_from_arg_string(f"pretrained={known.path},mode=self_spec,block_length=4,device=cpu",
                                                 {"device": "cuda:0", "batch_size": 3, "max_batch_size": None})
    assert lm.model.device.type == "cpu" and lm.batch_size == 3
    texts = lm.generate_until([SimpleNamespace(args=("copy: a b =", {"until": ["H"], "max_gen_toks": 6})),
                               SimpleNamespace(args=("reverse F", {"until": "I", "max_gen_toks": 4}))])
    assert texts == ["EFG", "GH"]


def test_missing_lm_eval_gives_a_clear_error(monkeypatch):
    for name in ("lm_eval", "lm_eval.api", "lm_eval.api.model", "lm_eval.api.registry", "lm_eval.tasks"):
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules: the import fails
    monkeypatch.delitem(sys.modules, ADAPTER, raising=False)
    with pytest.raises(ImportError, match=r"pip install 'ar2dlm\[eval\]'"):
        importlib.import_module(ADAPTER)
    from ar2dlm.eval.harness import check_harness_tasks

    with pytest.raises(UserError, match=r"lm_eval: tasks need lm-evaluation-harness.*pip install 'ar2dlm\[eval\]'"):
        check_harness_tasks(["toy_choice"], None)
    import ar2dlm.eval.run  # noqa: F401  (the rest of ar2dlm.eval never needs lm-eval)


def test_lm_eval_command_line_through_the_adapter_module(known, task_folder, tmp_path, monkeypatch, capsys):
    adapter = importlib.import_module(ADAPTER)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lm_eval", "--model", "ar2dlm", "--model_args",
                                      f"pretrained={known.path},mode=self_spec,block_length={BLOCK},device=cpu",
                                      "--tasks", "toy_choice,toy_answer", "--include_path", str(task_folder.folder)])
    adapter.main()
    table = {line.split("|")[1].strip(): line.split("|") for line in capsys.readouterr().out.splitlines()
             if line.startswith("|toy_")}
    assert float(table["toy_answer"][7]) == pytest.approx(2 / 3, abs=1e-4)
    assert float(table["toy_choice"][7]) == pytest.approx(1 / 3, abs=1e-4)
