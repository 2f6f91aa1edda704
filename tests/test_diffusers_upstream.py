"""polyak.diffusers.EMAModel held to what diffusers' own EMA tests check (``tests/others/test_ema.py``: seven
tests, run once with ``foreach=False`` and once with ``foreach=True``), side by side with diffusers' EMAModel on
the same run of a tiny UNet2DConditionModel built from a config, asserting numbers.

Upstream's checks that cannot fail are replaced by ones that can: ``assert ~torch.allclose(a, b)`` is the bitwise
not of a bool (-1 or -2: always true), and two of its comparisons are of ``ema.shadow_params`` with itself (a
list updated in place, taken before and after a step). What those tests meant is asserted here, and where the
meaning was wrong (the first step copies, decay 0 follows the model) the numbers say what happens.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.training_utils import EMAModel as DiffusersEMAModel

from polyak.diffusers import EMAModel


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One thread, as under ``make test``'s workers: tiny models on two busy threads run ~25x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(8, 16),
    layers_per_block=1,
    norm_num_groups=4,
    cross_attention_dim=8,
    attention_head_dim=2,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)
FOREACH = pytest.mark.parametrize("foreach", [False, True], ids=["loop", "foreach"])


def models(decay: float = 0.9999, foreach: bool = False) -> tuple[UNet2DConditionModel, dict[str, object]]:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**CONFIG)
    kwargs = dict(decay=decay, model_cls=UNet2DConditionModel, model_config=unet.config, foreach=foreach)
    return unet, {
        "polyak": EMAModel(unet.parameters(), **kwargs),
        "diffusers": DiffusersEMAModel(unet.parameters(), **kwargs),
    }


def new_weights(unet: UNet2DConditionModel, seed: int) -> list[torch.Tensor]:
    """Upstream's stand-in for training: every tensor replaced by ``noise + value * noise`` through
    ``load_state_dict`` (in place); returns the new parameters, cloned."""
    g = torch.Generator().manual_seed(seed)
    state = {
        k: torch.randn(v.shape, generator=g) + v * torch.randn(v.shape, generator=g)
        for k, v in unet.state_dict().items()
    }
    unet.load_state_dict(state)
    return [p.detach().clone() for p in unet.parameters()]


def step_all(emas: dict[str, object], unet: UNet2DConditionModel) -> None:
    for ema in emas.values():
        ema.step(unet.parameters())


def max_gap(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x.double() - y.double()).abs().max().item() for x, y in zip(a, b, strict=True))


@FOREACH
def test_from_pretrained_keeps_shadows_step_and_decay(tmp_path: Path, foreach: bool) -> None:
    """Upstream saves before any step (the shadows are then the model's own weights); here after three steps of
    new weights, so that a folder holding the model's weights instead of the EMA's is caught."""
    unet, emas = models(foreach=foreach)
    for seed in range(3):
        new_weights(unet, seed)
        step_all(emas, unet)
    assert max_gap(emas["polyak"].shadow_params, list(unet.parameters())) > 0.1  # the EMA is not the model
    loaded = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # diffusers' unused-config-key notices
        for writer, ema in emas.items():
            ema.save_pretrained(tmp_path / writer)
            for reader, cls in (("polyak", EMAModel), ("diffusers", DiffusersEMAModel)):
                loaded[writer, reader] = cls.from_pretrained(
                    tmp_path / writer, model_cls=UNet2DConditionModel, foreach=foreach
                )
    for (writer, reader), ema in loaded.items():
        for a, b in zip(ema.shadow_params, emas[writer].shadow_params, strict=True):
            assert torch.equal(a, b), (writer, reader)
        assert ema.optimization_step == 3 and ema.decay == 0.9999, (writer, reader)
    # the two EMAs agree to float32 rounding (polyak's lerp, diffusers' s - (1 - d) * (s - p))
    assert max_gap(emas["polyak"].shadow_params, emas["diffusers"].shadow_params) < 1e-6


@FOREACH
def test_optimization_step_and_decay_of_each_step(foreach: bool) -> None:
    unet, emas = models(foreach=foreach)
    decays: dict[str, list[float]] = {name: [] for name in emas}
    for _ in range(3):
        step_all(emas, unet)
        for name, ema in emas.items():
            decays[name].append(ema.cur_decay_value)
    for name, ema in emas.items():
        assert ema.optimization_step == 3, name
    # get_decay: 0 at the first step (a copy), then (1 + t) / (10 + t) with t = step - 1, under decay=0.9999
    assert decays["polyak"] == decays["diffusers"] == [0.0, 2 / 11, 3 / 12]


@FOREACH
def test_an_unchanged_model_keeps_the_shadows_equal_to_it(foreach: bool) -> None:
    unet, emas = models(foreach=foreach)
    for steps in (1, 4):
        for _ in range(steps):
            step_all(emas, unet)
        for name, ema in emas.items():
            for s, p in zip(ema.shadow_params, unet.parameters(), strict=True):
                assert torch.equal(s, p), name  # exactly: s - (1 - d) * (s - p) with s == p is p


@FOREACH
def test_new_weights_the_first_step_copies_then_the_ema_lags(foreach: bool) -> None:
    """Upstream asserts (through ``~``, so it cannot fail) that after new weights and one step the shadows differ
    from the weights. They do not: the first step's decay is 0, a copy. polyak copies exactly; diffusers computes
    ``s - 1.0 * (s - p)``, which is ``p`` only to float32 rounding. The second step of new weights is where the
    EMA lags: ``s = d * p1 + (1 - d) * p2`` with ``d = 2 / 11``."""
    unet, emas = models(foreach=foreach)
    p1 = new_weights(unet, 0)
    step_all(emas, unet)
    for s, p in zip(emas["polyak"].shadow_params, p1, strict=True):
        assert torch.equal(s, p)
    rounding = max_gap(emas["diffusers"].shadow_params, p1)
    assert 0 < rounding < 1e-6, rounding  # diffusers' copy is off by float32 rounding (measured: ~2e-7)
    for _ in range(4):  # the model unchanged: the shadows stay
        step_all(emas, unet)
    assert max_gap(emas["polyak"].shadow_params, p1) == 0.0

    p2 = new_weights(unet, 1)
    step_all(emas, unet)
    d = 6 / 15  # the sixth step: (1 + 5) / (10 + 5)
    expected = [d * a.double() + (1 - d) * b.double() for a, b in zip(p1, p2, strict=True)]
    for name, ema in emas.items():
        assert max_gap(ema.shadow_params, expected) < 1e-5, name
        assert max_gap(ema.shadow_params, p2) > 0.5, name  # behind the model, as an EMA is


@FOREACH
def test_consecutive_steps_of_new_weights_move_the_shadows(foreach: bool) -> None:
    """Upstream compares ``ema.shadow_params`` taken after step one with itself after step two (the same
    tensors, updated in place): here step one's values are cloned, and the move is the closed form."""
    unet, emas = models(foreach=foreach)
    p1 = new_weights(unet, 0)
    step_all(emas, unet)
    after_one = {name: [s.clone() for s in ema.shadow_params] for name, ema in emas.items()}
    listed = emas["diffusers"].shadow_params
    p2 = new_weights(unet, 1)
    step_all(emas, unet)
    assert all(a is b for a, b in zip(listed, emas["diffusers"].shadow_params, strict=True))  # upstream's "two"
    d = 2 / 11
    for name, ema in emas.items():
        moved = [s.double() - o.double() for s, o in zip(ema.shadow_params, after_one[name], strict=True)]
        expected = [(1 - d) * (b.double() - a.double()) for a, b in zip(p1, p2, strict=True)]
        assert max_gap(moved, expected) < 1e-5, name
        assert max_gap(ema.shadow_params, after_one[name]) > 0.5, name


@FOREACH
def test_zero_decay_follows_the_model(foreach: bool) -> None:
    """Upstream says that with decay 0 "EMA steps won't take any effect i.e. the shadow params would remain the
    same", checked on the list compared with itself. With decay 0 every step copies: the shadows are the model's
    current weights (polyak's exactly, diffusers' to float32 rounding), and they move with it."""
    unet, emas = models(decay=0.0, foreach=foreach)
    p1 = new_weights(unet, 0)
    step_all(emas, unet)
    after_one = [s.clone() for s in emas["polyak"].shadow_params]
    p2 = new_weights(unet, 1)
    step_all(emas, unet)
    assert emas["polyak"].cur_decay_value == emas["diffusers"].cur_decay_value == 0.0
    for s, p in zip(emas["polyak"].shadow_params, p2, strict=True):
        assert torch.equal(s, p)
    assert max_gap(emas["diffusers"].shadow_params, p2) < 1e-6
    assert max_gap(after_one, p1) == 0.0 and max_gap(after_one, emas["polyak"].shadow_params) > 0.5


@FOREACH
def test_serialization_before_any_step_gives_the_models_output(tmp_path: Path, foreach: bool) -> None:
    unet, emas = models(foreach=foreach)
    g = torch.Generator().manual_seed(0)
    sample, t, encoder = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500]), torch.randn(1, 5, 8, generator=g)
    with torch.no_grad():
        expected = unet(sample, t, encoder).sample
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, ema in emas.items():
            ema.save_pretrained(tmp_path / name)
            loaded = UNet2DConditionModel.from_pretrained(tmp_path / name)
            with torch.no_grad():
                assert torch.equal(loaded(sample, t, encoder).sample, expected), name
            assert loaded.config["decay"] == 0.9999 and loaded.config["optimization_step"] == 0, name
