"""Fixtures of the training tests."""

import pytest


@pytest.fixture
def wrapped_model(tiny_provider):
    """The tiny model configured as the trainer configures it (default train config), data-parallel wrapped."""
    from ar2dlm.config import compose_stage
    from ar2dlm.model.gpt import build_model
    from ar2dlm.training.data_parallel import wrap_data_parallel
    from ar2dlm.training.parallel_setup import configure_provider

    cfg = compose_stage("train", ["init=a", "output=b"], require_complete=False)
    return wrap_data_parallel(build_model(configure_provider(tiny_provider, cfg)), cfg)

