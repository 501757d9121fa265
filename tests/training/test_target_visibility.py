"""No loss target is visible to the query that predicts it, under every configuration `train` accepts.

For each objective x clean-stream pattern that config validation lets through, a batch (a prompt that is never
scored, two packed documents) is prepared as the trainer prepares it; then, through any number of attention
layers (the transitive closure of the layout's mask), the query that predicts a token must not reach an input
position that holds that token: the clean copy, or the noisy copy where it is not masked.
"""

from itertools import product

import pytest
import torch

from ar2dlm.config import ConfigError, compose_stage
from ar2dlm.config.validate import CHOICES
from ar2dlm.data.loader import Batch
from ar2dlm.model.masks import LAYOUTS, dense_mask
from ar2dlm.training.forward import ObjectiveSettings, prepare_batch
from ar2dlm.training.loss import objective_weights
from ar2dlm.training.noise import NoiseConfig

LENGTH, BLOCK, MASK_ID = 16, 4, 127



def _batch(packed: bool) -> Batch:
    ids = torch.randint(1, 120, (2, LENGTH), generator=torch.Generator().manual_seed(5))
    loss_mask = torch.ones_like(ids, dtype=torch.bool)
    loss_mask[0, :5] = False  # a prompt
    documents = None
    if packed:
        documents = torch.zeros_like(ids)
        documents[:, 6:] = 1  # the second document starts inside a block
    return Batch(ids, loss_mask, documents, torch.tensor([3, 4]))


def _settings(cfg) -> ObjectiveSettings:
    """Built from a validated train config as the trainer builds it."""
    return ObjectiveSettings(
        objective_weights(cfg.train.objective, cfg.diffusion.dlm_loss_weight, cfg.diffusion.ar_loss_weight),
        NoiseConfig(mask_token_id=MASK_ID, schedule=cfg.diffusion.noise_schedule, block_size=cfg.diffusion.block_size),
        cfg.diffusion.clean_pattern, "sdpa", seed=11, pad_id=0)


def _reachable(allowed: torch.Tensor) -> torch.Tensor:
    """[S, S]: whether query q's output can depend on input k through any number of attention layers."""
    reach = allowed.clone()
    while True:
        wider = reach | ((reach.double() @ allowed.double()) > 0)
        if torch.equal(wider, reach):
            return reach
        reach = wider


def _scored_queries(prepared, batch) -> list[tuple[int, int, int]]:
    """(row, query position, data position of the token it predicts) of every scored prediction.

    Diffusion predictions are unshifted (noisy-stream position i predicts x_0[i]), AR predictions shifted
    (clean-stream position j predicts x_0[j+1]); the labels the loss uses must agree.
    """
    streams = prepared.input_ids.shape[1] // LENGTH
    scored = []
    for row in range(batch.input_ids.shape[0]):
        if prepared.noise is not None:
            for i in torch.nonzero(prepared.noise.masked[row]).flatten().tolist():
                scored.append((row, i, i))
        if prepared.ar_mask is not None:
            offset = LENGTH if streams == 2 else 0
            for j in torch.nonzero(prepared.ar_mask[row]).flatten().tolist():
                scored.append((row, offset + j, j + 1))
    for row, query, target in scored:
        assert prepared.labels[row, query] == batch.input_ids[row, target]
    return scored


def _holders(prepared, row: int, target: int) -> list[int]:
    """Input positions that hold x_0[target] itself (not the mask token)."""
    streams = prepared.input_ids.shape[1] // LENGTH
    positions = [s * LENGTH + target for s in range(streams)]
    return [p for p in positions if prepared.input_ids[row, p] != MASK_ID]


def _accepted_configs():
    accepted, refused = [], {}
    for objective, pattern in product(CHOICES["train.objective"], CHOICES["diffusion.clean_pattern"]):
        overrides = ["init=x", "output=y", f"train.objective={objective}", f"diffusion.clean_pattern={pattern}",
                     f"data.seq_length={LENGTH}", f"diffusion.block_size={BLOCK}"]
        try:
            accepted.append(compose_stage("train", overrides))
        except ConfigError as error:
            refused[(objective, pattern)] = str(error)
    return accepted, refused


@pytest.mark.parametrize("packed", [False, True])
def test_no_scored_token_is_visible_to_the_query_that_predicts_it(packed):
    accepted, _ = _accepted_configs()
    batch = _batch(packed)
    layouts_checked = set()
    for cfg in accepted:
        settings = _settings(cfg)
        prepared = prepare_batch(batch, 3, settings)
        layout = prepared.layout.layout
        allowed = dense_mask(layout, LENGTH, BLOCK, batch.document_ids)
        allowed = allowed if packed else allowed.expand(2, -1, -1)
        reach = [_reachable(allowed[row]) for row in range(2)]
        scored = _scored_queries(prepared, batch)
        assert scored
        leaks = [(row, query, target) for row, query, target in scored
                 if any(reach[row][query, k] for k in _holders(prepared, row, target))]
        assert not leaks, (f"train.objective={cfg.train.objective} diffusion.clean_pattern="
                           f"{cfg.diffusion.clean_pattern}: (row, query, target) {leaks[:5]} see their targets")
        layouts_checked.add(layout)
    assert layouts_checked == set(LAYOUTS)  # every attention layout training can use was checked


def test_block_causal_clean_stream_with_an_ar_loss_is_refused_naming_both_keys():
    _, refused = _accepted_configs()
    message = refused[("joint", "block_causal")]
    assert "diffusion.clean_pattern=block_causal" in message and "train.objective=joint" in message
    assert "\n" not in message
    assert ("diffusion", "block_causal") not in refused and ("ar", "block_causal") not in refused
