"""lm-evaluation-harness tasks inside `ar2dlm eval`: ``tasks=[lm_eval:NAME,...]``.

NAME is what lm-eval's ``--tasks`` takes: a task, group or tag name, or the path of a task YAML file;
``lm_eval_include=DIR`` adds a folder of task YAMLs (lm-eval's ``--include_path``). The tasks are checked
(names resolved, datasets loaded) before the model is; an unknown name ends the command with lm-eval's
own message. Tasks scored by loglikelihood run once: the harness scores them with the AR forward whatever
the decoding mode. A task that generates (``generate_until``, or a group holding one) runs in every
setting of the sweep, through :class:`ar2dlm.eval.lm_eval_adapter.Ar2dlmLM` around the loaded model;
its generation length is the task's ``max_gen_toks``, else ``max_new_tokens``. Few-shot counts and seeds
are the harness's defaults, so the numbers are those of ``lm_eval --tasks NAME`` with the same model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from numbers import Real
from pathlib import Path

from ar2dlm.errors import UserError
from ar2dlm.eval.generation import DecodeConfig
from ar2dlm.log import logger

PREFIX = "lm_eval:"
GENERATION = "generate_until"


@dataclass(frozen=True)
class HarnessTask:
    """One ``lm_eval:NAME`` spec, checked."""

    name: str
    output_types: tuple[str, ...]  # of its leaf tasks

    @property
    def generates(self) -> bool:
        return GENERATION in self.output_types


def split_task_specs(specs: Sequence[str]) -> tuple[list[str], list[str]]:
    """(ar2dlm's own task specs, the NAMEs of the ``lm_eval:NAME`` ones), each in order."""
    native, names = [], []
    for spec in specs:
        if isinstance(spec, str) and spec.strip().startswith(PREFIX):
            name = spec.strip().removeprefix(PREFIX).strip()
            if not name:
                raise UserError(f"task spec {spec!r} needs a name: lm_eval:TASK (e.g. lm_eval:gsm8k)")
            names.append(name)
        else:
            native.append(spec)
    return native, names


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError("lm_eval: tasks need lm-evaluation-harness, which is not installed: "
                        "pip install 'ar2dlm[eval]'") from None
    import ar2dlm.eval.lm_eval_adapter  # noqa: F401  (registers the ar2dlm model)

    return lm_eval, TaskManager


@lru_cache(maxsize=4)
def task_manager(include: str | None):
    """lm-eval's index of its own tasks and those in ``include`` (built once per process: it reads every
    task YAML the harness ships, a few seconds)."""
    _, TaskManager = _lm_eval()
    return TaskManager(include_path=include)


def _include_folder(include: str | None) -> str | None:
    if include is None:
        return None
    folder = Path(include).expanduser()
    if not folder.is_dir():
        raise UserError(f"lm_eval_include={include}: no such folder (give a folder of lm-eval task YAMLs)")
    return str(folder.resolve())


def check_harness_tasks(names: Sequence[str], include: str | None) -> list[HarnessTask]:
    """Resolve every name with lm-eval (loading its data); UserError with lm-eval's (or datasets') message for
    one it does not know or whose data it cannot load."""
    _lm_eval()
    manager = task_manager(_include_folder(include))
    checked, owners = [], {}
    for name in names:
        if name in (task.name for task in checked):
            raise UserError(f"lm_eval:{name} is listed twice in tasks")
        try:
            loaded = manager.load([name])
        # lm-eval's unknown-name and bad-config errors; datasets' for data it cannot find or download
        except (KeyError, ValueError, FileNotFoundError, ConnectionError) as error:
            message = error.args[0] if error.args else repr(error)
            raise UserError(f"lm_eval:{name}: {message}") from None
        for leaf in loaded["tasks"]:
            if owners.setdefault(leaf, name) != name:
                raise UserError(f"lm-eval task {leaf} is in both lm_eval:{owners[leaf]} and lm_eval:{name}")
        types = tuple(sorted({task.get_config("output_type") for task in loaded["tasks"].values()}))
        checked.append(HarnessTask(name, types))
    return checked


def _metrics(values: dict) -> dict[str, float]:
    """The numeric results of one task ("acc,none": ...); the harness writes "N/A" for missing stderrs."""
    return {key: float(value) for key, value in values.items()
            if "," in key and isinstance(value, Real) and not isinstance(value, bool)}


def _run(lm, tasks: Sequence[HarnessTask], manager, limit: int | None) -> dict[str, dict]:
    lm_eval, _ = _lm_eval()
    results = lm_eval.simple_evaluate(model=lm, tasks=[task.name for task in tasks], task_manager=manager,
                                      limit=limit, log_samples=False)
    scored = {**results["results"], **results.get("groups", {})}
    configs, counts = results.get("configs", {}), results.get("n-samples", {})
    return {name: {"output_type": configs.get(name, {}).get("output_type"),  # None for a group
                   "samples": counts.get(name, {}).get("effective"), "metrics": _metrics(values)}
            for name, values in scored.items()}


def _rows(scored: dict[str, dict], config: DecodeConfig | None) -> list[dict]:
    setting = {"mode": config.mode if config else None, "block_length": config.block_length if config else None,
               "threshold": config.threshold if config else None}
    return [{"task": name, **setting, **values} for name, values in scored.items()]


def evaluate_harness(model, tokenizer, tasks: Sequence[HarnessTask], configs: Sequence[DecodeConfig], *,
                     include: str | None, batch_size: int, max_new_tokens: int, limit: int | None) -> list[dict]:
    """One row per harness task (and group) and setting: ``task``, ``mode``, ``block_length``, ``threshold``
    (all None for loglikelihood tasks: the AR forward, once), ``output_type``, ``samples`` and ``metrics``
    (lm-eval's "metric,filter" keys)."""
    from ar2dlm.eval.lm_eval_adapter import Ar2dlmLM

    manager = task_manager(_include_folder(include))
    lm = Ar2dlmLM.around(model, tokenizer, max_gen_toks=max_new_tokens, batch_size=batch_size)
    rows = []
    scored_once = [task for task in tasks if not task.generates]
    if scored_once:
        logger.info("lm-eval: %s (loglikelihood, AR forward)", ", ".join(task.name for task in scored_once))
        rows += _rows(_run(lm, scored_once, manager, limit), None)
    generating = [task for task in tasks if task.generates]
    for config in configs if generating else ():
        logger.info("lm-eval: %s in %s block=%s threshold=%s", ", ".join(task.name for task in generating),
                    config.mode, config.block_length, config.threshold)
        lm.decode_with(config.mode, config.block_length, config.threshold, config.draft_length)
        rows += _rows(_run(lm, generating, manager, limit), config)
    return rows
