import io
import logging

from ar2dlm.log import MetricSinks, logger, progress, setup_logging


def test_progress_yields_every_item():
    assert list(progress(range(5), desc="x")) == [0, 1, 2, 3, 4]


def test_logger_is_configured_once(capsys):
    setup_logging("INFO")
    before = list(logger.handlers)
    setup_logging("INFO")
    assert logger.handlers == before and before
    assert logger.level == logging.INFO


def test_tensorboard_sink_writes_events(tmp_path):
    sinks = MetricSinks(tmp_path, tensorboard=True, wandb=False, project="t", run_name=None)
    sinks.log({"loss": 1.5}, step=1)
    sinks.close()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_wandb_works_offline_without_an_api_key(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    sinks = MetricSinks(tmp_path, tensorboard=False, wandb=True, project="t", run_name="r")
    assert sinks._wandb is not None
    sinks.log({"loss": 2.0}, step=1)
    sinks.close()
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_wandb_failure_never_fails_the_run(tmp_path, monkeypatch):
    import wandb

    def broken(**kwargs):
        raise RuntimeError("no network")

    monkeypatch.setattr(wandb, "init", broken)
    sinks = MetricSinks(tmp_path, tensorboard=False, wandb=True, project="t", run_name=None)
    assert sinks._wandb is None  # wandb is switched off, the run goes on
    sinks.log({"loss": 1.0}, step=1)
    sinks.close()


def _progress_in_a_log_file(tmp_path, body: str) -> list[str]:
    """Run ``body`` in a fresh process whose stderr is a file (as `make demo 2>log` does); the file's lines."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import time
        import tqdm
        from ar2dlm import log
        from ar2dlm.log import progress, setup_logging
        tqdm.tqdm.monitor_interval = 0.05  # tqdm's monitor thread (it redrew stale bars) wakes at once
        log.LOG_FILE_INTERVAL_S = 0.3
        setup_logging("INFO")
    """) + textwrap.dedent(body)
    log_file = tmp_path / "log"
    with log_file.open("w") as stderr:
        subprocess.run([sys.executable, "-c", script], stderr=stderr, check=True, timeout=120)
    text = log_file.read_bytes().decode()
    assert "\r" not in text  # no bar redraws: a file cannot undo a carriage return
    return text.splitlines()


def test_each_progress_update_is_one_line_when_stderr_is_a_file(tmp_path):
    lines = _progress_in_a_log_file(tmp_path, """
        for item in progress(range(12), desc="work", total=12, unit="doc"):
            time.sleep(0.1)
    """)
    counts = [line.split("work: ")[1].split(" ")[0] for line in lines]
    assert len(counts) == len(set(counts)) >= 3, lines  # one line every ~0.3 s, never the same count twice
    assert counts[-1] == "12/12"


def test_training_progress_logs_metrics_every_interval_when_stderr_is_a_file(tmp_path):
    lines = _progress_in_a_log_file(tmp_path, """
        from ar2dlm.training.loop import step_display
        bar = progress(range(1, 26), desc="train (joint)", total=25, unit="step", log_every=10)
        for step in bar:
            bar.set_postfix(step_display({"loss": 2.5 / step, "ar_loss": 2.0 / step, "dlm_loss": 4.0 / step,
                                          "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 12345.6}, "joint"))
    """)
    lines = [line for line in lines if " INFO " in line]
    assert len(lines) == 3, lines  # steps 10, 20 and the last one
    assert "INFO train (joint): 10/25 steps | loss 0.2500 | AR 0.2000 | diffusion 0.4000 | lr 1.00e-03 | " \
           "grad norm 0.500 | tokens/s 12,346 | " in lines[0]
    assert "20/25 steps | loss 0.1250" in lines[1] and "25/25 steps | loss 0.1000" in lines[2]


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_training_progress_in_a_terminal_shows_the_metrics_on_the_bar(monkeypatch):
    stream = FakeTerminal()
    monkeypatch.setattr("sys.stderr", stream)
    bar = progress(range(1, 3), desc="train (ar)", total=2, unit="step", log_every=10)
    for step in bar:
        bar.set_postfix({"loss": f"{1.0 / step:.4f}", "grad norm": "0.250"})
    bar.close()
    assert "loss=0.5000, grad norm=0.250" in stream.getvalue()


def test_step_display_shows_the_loss_terms_of_the_objective():
    from ar2dlm.training.loop import step_display

    metrics = {"loss": 1.0, "ar_loss": 0.5, "dlm_loss": 2.0, "lr": 2e-4, "grad_norm": 1.25, "tokens_per_s": 999.9}
    assert list(step_display(metrics, "joint")) == ["loss", "AR", "diffusion", "lr", "grad norm", "tokens/s"]
    assert list(step_display(metrics, "ar")) == ["loss", "lr", "grad norm", "tokens/s"]


def test_log_records_do_not_glue_onto_a_bar(monkeypatch):
    stream = FakeTerminal()
    monkeypatch.setattr("sys.stderr", stream)
    monkeypatch.setattr(logger, "handlers", [])
    setup_logging("INFO")
    logger.handlers[0].setFormatter(logging.Formatter("%(message)s"))
    bar = progress(range(2), desc="bar", total=2)
    for _ in bar:
        logger.warning("a message")
    bar.close()
    # the bar's line is cleared and the record starts at column 0, not after the bar's text
    assert stream.getvalue().count("\ra message\n") == 2


def test_logged_progress_names_its_units_in_the_plural():
    from ar2dlm.log import LoggedProgress

    assert LoggedProgress([], "continuing", 1250, "batch", 1).line(3, 0.0) == "continuing: 3/1250 batches"
    assert LoggedProgress([], "tokenizing", 8, "doc", 1).line(3, 0.0) == "tokenizing: 3/8 docs"
