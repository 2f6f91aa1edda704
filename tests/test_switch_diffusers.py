"""docs/switching/diffusers.md: diffusers' EMAModel, polyak's drop-in and a plain polyak.EMA give the same average
on the page's training run; the table's schedule rows checked against diffusers' ``get_decay``. (Where diffusers is
wrong, bf16, the numbers are in tests/test_diffusers.py.)"""

from __future__ import annotations

import pytest
import torch
from diffusers.training_utils import EMAModel as DiffusersEMAModel
from torch import nn

from _docs import DOCS, named, run_block
from polyak import EMA
from polyak.schedules import inverse_gamma, ratio_warmup

PAGE = DOCS / "switching" / "diffusers.md"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.chdir(tmp_path_factory.mktemp("diffusers"))
        return {name: run_block(named(PAGE, name)) for name in ("before", "after", "plain")}


def assert_same_average(ours: nn.Module, theirs: nn.Module) -> None:
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys()
    for k, v in a.items():
        torch.testing.assert_close(v, b[k], rtol=1e-5, atol=1e-6, msg=k)


def test_the_drop_in_gives_diffusers_average(runs: dict[str, dict]) -> None:
    assert_same_average(runs["after"]["averaged"], runs["before"]["averaged"])
    assert runs["after"]["ema"].cur_decay_value == runs["before"]["ema"].cur_decay_value == 20 / 29
    assert runs["after"]["ema"].optimization_step == runs["before"]["ema"].optimization_step == 20
    # and the online models trained alike
    for a, b in zip(runs["after"]["unet"].parameters(), runs["before"]["unet"].parameters(), strict=True):
        assert torch.equal(a, b)


def test_plain_ema_gives_diffusers_average(runs: dict[str, dict]) -> None:
    assert_same_average(runs["plain"]["averaged"], runs["before"]["averaged"])
    assert runs["plain"]["ema"].num_updates == 20


@pytest.mark.parametrize("update_after_step", [0, 3])
@pytest.mark.parametrize("min_decay", [0.0, 0.5])
def test_ratio_warmup_with_copy_first_is_diffusers_default_decay(update_after_step: int, min_decay: float) -> None:
    theirs = DiffusersEMAModel(
        nn.Linear(2, 1).parameters(), decay=0.999, min_decay=min_decay, update_after_step=update_after_step
    )
    ours = EMA(nn.Linear(2, 1), schedule=ratio_warmup(0.999, min_decay), copy_first=update_after_step + 1)
    for k in range(1, 3000, 7):
        assert ours.momentum_at(k) == 1.0 - theirs.get_decay(k), k


@pytest.mark.parametrize("update_after_step", [0, 3])
def test_inverse_gamma_with_copy_first_is_diffusers_ema_warmup(update_after_step: int) -> None:
    kwargs = dict(decay=0.9999, use_ema_warmup=True, inv_gamma=2.0, power=3 / 4, update_after_step=update_after_step)
    theirs = DiffusersEMAModel(nn.Linear(2, 1).parameters(), **kwargs)
    schedule = inverse_gamma(gamma=2.0, power=3 / 4, max_decay=0.9999)
    ours = EMA(nn.Linear(2, 1), schedule=schedule, copy_first=update_after_step)
    for k in range(1, 3000, 7):
        assert ours.momentum_at(k) == pytest.approx(1.0 - theirs.get_decay(k), abs=1e-15), k
