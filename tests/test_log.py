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
