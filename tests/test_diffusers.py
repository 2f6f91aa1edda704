"""polyak.diffusers.EMAModel side by side with diffusers' own, in a diffusers-style training loop on a tiny
UNet2DModel built from a config (nothing downloaded)."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DModel
from diffusers.training_utils import EMAModel as DiffusersEMAModel

from polyak import _kernels
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
    in_channels=1,
    out_channels=1,
    block_out_channels=(8, 16),
    layers_per_block=1,
    norm_num_groups=4,
    down_block_types=("DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D"),
)


def unet(dtype: torch.dtype = torch.float32) -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(**CONFIG).to(dtype)


def train(model: UNet2DModel, emas: list, steps: int = 12, lr: float = 1e-2) -> None:
    """The loop of diffusers' training scripts: a denoising loss, an optimizer step, then ema.step()."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(1)
    dtype, device = next(model.parameters()).dtype, next(model.parameters()).device
    for _ in range(steps):
        clean = torch.randn(4, 1, 8, 8, generator=g).to(device, dtype)
        noise = torch.randn(4, 1, 8, 8, generator=g).to(device, dtype)
        t = torch.randint(0, 100, (4,), generator=g).to(device)
        loss = (model(clean + noise, t).sample.float() - noise.float()).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        for ema in emas:
            ema.step(model.parameters())


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(decay=0.9),
        dict(decay=0.99, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4),
        dict(decay=0.95, update_after_step=4, min_decay=0.5),
    ],
    ids=["plain", "warmup", "update_after_step"],
)
def test_equal_to_diffusers_in_float32(kwargs: dict) -> None:
    model = unet()
    ours, theirs = EMAModel(model.parameters(), **kwargs), DiffusersEMAModel(model.parameters(), **kwargs)
    train(model, [ours, theirs])
    assert ours.optimization_step == theirs.optimization_step == 12
    assert ours.cur_decay_value == theirs.cur_decay_value
    assert [ours.get_decay(k) for k in range(1, 40)] == [theirs.get_decay(k) for k in range(1, 40)]
    for a, b in zip(ours.shadow_params, theirs.shadow_params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_in_bf16_diffusers_freezes_and_polyak_averages() -> None:
    """bf16 parameters, decay 0.999: diffusers' shadow params are bf16 and drop the updates that round away."""
    model = unet(torch.bfloat16)
    reference = [p.detach().double().clone() for p in model.parameters()]
    kwargs = dict(decay=0.999, min_decay=0.999)  # 0.999 from the second step on (the first copies)
    ours, theirs = EMAModel(model.parameters(), **kwargs), DiffusersEMAModel(model.parameters(), **kwargs)

    class Exact:  # a float64 reference with diffusers' decay schedule
        step_count = 0

        def step(self, parameters) -> None:
            self.step_count += 1
            d = theirs.get_decay(self.step_count)
            for r, p in zip(reference, parameters, strict=True):
                r.mul_(d).add_(p.detach().double(), alpha=1 - d)
            if self.step_count == 1:  # the first step copies: what the EMA moves is measured from here
                self.first = [r.clone() for r in reference]

    exact = Exact()
    train(model, [ours, theirs, exact], steps=40, lr=1e-3)
    error = {
        name: sum((s.double() - r).abs().sum().item() for s, r in zip(shadow, reference, strict=True))
        for name, shadow in (("ours", ours.ema.state_dict()["master"].values()), ("theirs", theirs.shadow_params))
    }
    moved = sum((r - f).abs().sum().item() for r, f in zip(reference, exact.first, strict=True))
    # measured (sums of |error| over the 41,609 weights): polyak's master 2.2e-4 (float32 rounding),
    # diffusers' 6.2, 96% of the 6.5 that an exact EMA moved after its first copy: nearly every update of
    # decay 0.999 rounds away in bf16
    assert error["ours"] < 1e-4 * moved, (error, moved)
    assert error["theirs"] > 0.5 * moved, (error, moved)
    assert all(s.dtype == torch.bfloat16 for s in ours.shadow_params)  # what the model gets stays bf16


def test_state_dicts_load_both_ways_and_resume_exactly(tmp_path: Path) -> None:
    model = unet()
    ours, theirs = EMAModel(model.parameters(), decay=0.9), DiffusersEMAModel(model.parameters(), decay=0.9)
    train(model, [ours, theirs], steps=5)
    buffer = io.BytesIO()
    torch.save(ours.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # plain values and tensors
    into_theirs = DiffusersEMAModel(unet().parameters(), decay=0.9)
    into_theirs.load_state_dict(saved)
    into_ours = EMAModel(unet().parameters(), decay=0.9)
    into_ours.load_state_dict(theirs.state_dict())
    for a, b, c in zip(into_theirs.shadow_params, ours.shadow_params, into_ours.shadow_params, strict=True):
        assert torch.equal(a, b)
        torch.testing.assert_close(c, b, rtol=1e-5, atol=1e-6)
    assert into_theirs.optimization_step == into_ours.optimization_step == 5

    # resumed from its own state, polyak's continues bit for bit (bf16: the float32 masters are in the state)
    for dtype in (torch.float32, torch.bfloat16):
        full_model, part_model = unet(dtype), unet(dtype)
        full, part = EMAModel(full_model.parameters(), decay=0.9), EMAModel(part_model.parameters(), decay=0.9)
        train(full_model, [full], steps=8)
        train(part_model, [part], steps=8)
        resumed = EMAModel(part_model.parameters(), decay=0.9)
        resumed.load_state_dict(part.state_dict())
        for m in (full_model, part_model):
            with torch.no_grad():
                for p in m.parameters():
                    p.add_(0.01)
        full.step(full_model.parameters())
        resumed.step(part_model.parameters())
        for a, b in zip(full.shadow_params, resumed.shadow_params, strict=True):
            assert torch.equal(a, b)


def test_save_pretrained_folders_load_with_either_class(tmp_path: Path) -> None:
    model = unet()
    ours = EMAModel(model.parameters(), decay=0.9, model_cls=UNet2DModel, model_config=model.config)
    theirs = DiffusersEMAModel(model.parameters(), decay=0.9, model_cls=UNet2DModel, model_config=model.config)
    train(model, [ours, theirs], steps=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours.save_pretrained(tmp_path / "ours")
        theirs.save_pretrained(tmp_path / "theirs")
        loaded = {
            "ours<-theirs": EMAModel.from_pretrained(tmp_path / "theirs", UNet2DModel),
            "theirs<-ours": DiffusersEMAModel.from_pretrained(tmp_path / "ours", UNet2DModel),
        }
        averaged = UNet2DModel.from_pretrained(tmp_path / "ours")  # the averaged model, for inference
    for a, b in zip(averaged.parameters(), ours.shadow_params, strict=True):
        assert torch.equal(a, b)
    for ema in loaded.values():
        assert ema.optimization_step == 5 and ema.decay == 0.9
    for a, b in zip(loaded["theirs<-ours"].shadow_params, ours.shadow_params, strict=True):
        assert torch.equal(a, b)


def test_store_copy_to_restore_and_frozen_parameters_as_diffusers() -> None:
    model = unet()
    model.conv_in.requires_grad_(False)  # frozen: diffusers copies it, polyak shows the model's own
    ours, theirs = EMAModel(model.parameters(), decay=0.9), DiffusersEMAModel(model.parameters(), decay=0.9)
    train(model, [ours, theirs], steps=4)
    with torch.no_grad():
        model.conv_in.weight.add_(1.0)
    ours.step(model.parameters())
    theirs.step(model.parameters())
    for a, b in zip(ours.shadow_params, theirs.shadow_params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    online = [p.detach().clone() for p in model.parameters()]
    ours.store(model.parameters())
    ours.copy_to(model.parameters())
    for p, s in zip(model.parameters(), ours.shadow_params, strict=True):
        assert torch.equal(p, s)
    ours.restore(model.parameters())
    for p, o in zip(model.parameters(), online, strict=True):
        assert torch.equal(p, o)
    with pytest.raises(RuntimeError, match="no `store\\(\\)`ed weights"):
        ours.restore(model.parameters())


def test_to_cpu_keeps_the_ema_there_and_to_dtype_keeps_the_master() -> None:
    model = unet()
    ema = EMAModel(model.parameters(), decay=0.9)
    ema.to(device="cpu", dtype=torch.bfloat16)  # a bf16 EMA of a float32 model: the average stays in float32
    train(model, [ema], steps=4)
    assert all(s.dtype == torch.bfloat16 and s.device.type == "cpu" for s in ema.shadow_params)
    reference = EMAModel(unet().parameters(), decay=0.9)
    train(unet(), [reference], steps=4)
    for a, b in zip(ema.shadow_params, reference.shadow_params, strict=True):
        assert torch.equal(a, b.to(torch.bfloat16))  # the float32 average, rounded once


@pytest.mark.parametrize(
    ("state", "match"),
    [
        ({"decay": 1.5}, "Decay must be between 0 and 1"),
        ({"min_decay": 1}, "Invalid min_decay"),
        ({"optimization_step": -1}, "Invalid optimization_step"),
        ({"shadow_params": [torch.zeros(1)]}, "shadow_params must be a list of 114 tensors"),
    ],
)
def test_bad_states_are_refused_and_change_nothing(state: dict, match: str) -> None:
    model = unet()
    ema = EMAModel(model.parameters(), decay=0.9)
    train(model, [ema], steps=2)
    before = [s.clone() for s in ema.shadow_params]
    with pytest.raises(ValueError, match=match):
        ema.load_state_dict(state)
    assert ema.decay == 0.9 and ema.optimization_step == 2
    for a, b in zip(ema.shadow_params, before, strict=True):
        assert torch.equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_offloaded_to_the_cpu_it_stays_there_and_stages_through_pinned_memory() -> None:
    model = unet().cuda()
    offloaded, on_gpu = EMAModel(model.parameters(), decay=0.9), EMAModel(model.parameters(), decay=0.9)
    offloaded.to("cpu")
    train(model, [offloaded, on_gpu], steps=4)
    assert all(s.device.type == "cpu" for s in offloaded.shadow_params)
    scratch = [b for k in offloaded.ema._kernels for b in getattr(k, "scratch", [])]
    assert scratch and all(b.is_pinned() and b.numel() <= _kernels.CHUNK for b in scratch)
    for a, b in zip(offloaded.shadow_params, on_gpu.shadow_params, strict=True):
        torch.testing.assert_close(a, b.cpu(), rtol=1e-5, atol=1e-6)


def test_requires_grad_is_read_at_every_step_as_diffusers() -> None:
    """diffusers decides at each step() from ``requires_grad`` whether a parameter is averaged or copied: a part
    frozen mid-run is copied from then on, a part unfrozen mid-run is averaged from its last copy."""
    model = unet()
    model.time_embedding.requires_grad_(False)  # frozen at construction, unfrozen at step 4
    ours, theirs = EMAModel(model.parameters(), decay=0.9), DiffusersEMAModel(model.parameters(), decay=0.9)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    for step in range(8):
        if step == 3:
            model.conv_in.requires_grad_(False)
            model.time_embedding.requires_grad_(True)
            with torch.no_grad():
                model.conv_in.weight.add_(0.5)  # a frozen part changed (loaded, say): copied, not averaged
        clean, noise = torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, 1, 8, 8, generator=g)
        t = torch.randint(0, 100, (4,), generator=g)
        loss = (model(clean + noise, t).sample - noise).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ours.step(model.parameters())
        theirs.step(model.parameters())
        for i, (a, b) in enumerate(zip(ours.shadow_params, theirs.shadow_params, strict=True)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"step {step + 1}, shadow {i}")
    index = {id(p): i for i, p in enumerate(model.parameters())}
    frozen, unfrozen = index[id(model.conv_in.weight)], index[id(model.time_embedding.linear_1.weight)]
    assert torch.equal(ours.shadow_params[frozen], model.conv_in.weight)  # copied at each step since step 4
    # averaged since step 4, from its last copy: 0.9 ** 5 of the gap to its step-3 value is still there
    lag = (ours.shadow_params[unfrozen] - model.time_embedding.linear_1.weight).abs().max().item()
    assert lag > 1e-3, lag


def test_requires_grad_follow_keeps_bf16_masters_and_costs_one_tuple_compare() -> None:
    """bf16: the float32 masters of the parameters that stay averaged survive a freeze elsewhere (bit for bit what
    an EMA that saw no freeze holds); a step with an unchanged pattern re-pairs nothing."""
    model, twin = unet(torch.bfloat16), unet(torch.bfloat16)
    ema, reference = EMAModel(model.parameters(), decay=0.9), EMAModel(twin.parameters(), decay=0.9)
    train(model, [ema], steps=3)
    train(twin, [reference], steps=3)
    model.conv_out.requires_grad_(False)
    for m in (model, twin):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.125)
    ema.step(model.parameters())
    reference.step(twin.parameters())
    index = {id(p): i for i, p in enumerate(model.parameters())}
    frozen = {index[id(model.conv_out.weight)], index[id(model.conv_out.bias)]}
    ours, theirs = ema.ema.state_dict()["master"], reference.ema.state_dict()["master"]
    assert set(theirs) - set(ours) == {str(i) for i in frozen}  # copied now: no master
    for i, (a, b) in enumerate(zip(ema.shadow_params, reference.shadow_params, strict=True)):
        if i in frozen:
            assert torch.equal(a, list(model.parameters())[i]) and not torch.equal(a, b)
        else:
            assert torch.equal(a, b) and torch.equal(ours[str(i)], theirs[str(i)]), i
    builds = []
    original = ema.ema.refresh
    ema.ema.refresh = lambda: builds.append(1) or original()
    ema.step(model.parameters())
    assert builds == []


# -- refusals: checked before anything is written -------------------------------------------------------------------
def _state(ema: EMAModel) -> dict:
    """Everything the state dict holds (counters, shadows, masters), plus the decay of the last step, as copies."""
    state = {k: v for k, v in ema.state_dict().items() if k not in ("shadow_params", "polyak_master")}
    state["cur_decay_value"] = ema.cur_decay_value
    state["shadow_params"] = [s.detach().clone() for s in ema.shadow_params]
    state["polyak_master"] = [None if m is None else m.clone() for m in ema.state_dict().get("polyak_master", [])]
    return state


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if key in ("shadow_params", "polyak_master"):
            assert len(a[key]) == len(b[key]), key
            for x, y in zip(a[key], b[key], strict=True):
                assert (x is None and y is None) or (torch.equal(x, y) and x.dtype == y.dtype), key
        else:
            assert a[key] == b[key] and type(a[key]) is type(b[key]), (key, a[key], b[key])


def _twins(dtype: torch.dtype = torch.float32) -> tuple:
    """A model and its EMA after three steps, and an identical pair that will never see a refused call."""
    pairs = []
    for _ in range(2):
        model = unet(dtype)
        ema = EMAModel(model.parameters(), decay=0.9)
        train(model, [ema], steps=3)
        pairs.append((model, ema))
    return (*pairs[0], *pairs[1])


def _next_step_as_twin(model, ema, twin_model, twin) -> None:
    for m in (model, twin_model):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.125)
    ema.step(model.parameters())
    twin.step(twin_model.parameters())
    _assert_same_state(_state(ema), _state(twin))


def _other_shapes() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(**{**CONFIG, "block_out_channels": (4, 8)})  # as many parameters, other shapes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bf16"])
@pytest.mark.parametrize(
    ("given", "error", "match"),
    [
        pytest.param(
            "other shapes",
            ValueError,
            r"step\(\): parameters\[0\] has shape \(4, 1, 3, 3\) but shadow_params\[0\] ",
            id="other shapes",
        ),
        pytest.param(
            "one short", ValueError, r"step\(\): parameters has 113 tensors but shadow_params has 114", id="one short"
        ),
        pytest.param(
            "one more", ValueError, r"step\(\): parameters has 115 tensors but shadow_params has 114", id="one more"
        ),
        pytest.param(
            "last one detached",
            ValueError,
            r"parameters\[113\] is a plain tensor \(not an nn.Parameter\)",
            id="last one detached",
        ),
        pytest.param(
            "last one integer",
            ValueError,
            r"parameters\[113\] is a torch.int64 tensor but shadow_params\[113\]",
            id="last one integer",
        ),
        pytest.param(
            "last one not a tensor",
            TypeError,
            r"step\(\): parameters\[113\] must be a tensor, got float",
            id="last one not a tensor",
        ),
        pytest.param(
            "the shadows", ValueError, r"parameters\[0\] is the EMA's own shadow_params\[0\]", id="the shadows"
        ),
    ],
)
def test_a_refused_step_changes_nothing(given: str, error: type, match: str, dtype: torch.dtype) -> None:
    """A step given parameters it cannot pair with shadow_params is refused before anything moves: the
    counters (optimization_step, cur_decay_value), the shadows and masters and the model are bit for bit
    what they were, and the next step is the one an EMA that never saw the refused call takes."""
    model, ema, twin_model, twin = _twins(dtype)
    params = list(model.parameters())
    bad = {
        "other shapes": lambda: list(_other_shapes().to(dtype).parameters()),
        "one short": lambda: params[:-1],
        "one more": lambda: [*params, torch.nn.Parameter(torch.zeros(1, dtype=dtype))],
        "last one detached": lambda: [*params[:-1], params[-1].detach()],
        "last one integer": lambda: [*params[:-1], torch.nn.Parameter(params[-1].detach().long(), False)],
        "last one not a tensor": lambda: [*params[:-1], 1.0],
        "the shadows": lambda: ema.shadow_params,
    }[given]()
    before, online = _state(ema), [p.detach().clone() for p in model.parameters()]
    with pytest.raises(error, match=match):
        ema.step(bad)
    _assert_same_state(_state(ema), before)
    for p, o in zip(model.parameters(), online, strict=True):
        assert torch.equal(p, o)
    _next_step_as_twin(model, ema, twin_model, twin)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bf16"])
def test_a_step_refused_after_the_pairing_moved_is_rolled_back(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype
) -> None:
    """A step with other (valid) objects and a part frozen, refused inside the update: the EMA keeps following
    the objects of its last step, with their selection (bf16: and the float32 masters of the part frozen), and
    its next step is its twin's."""
    model, ema, twin_model, twin = _twins(dtype)
    rebuilt = unet(dtype)  # the same shapes: valid, and followed from the step that succeeds
    rebuilt.conv_in.requires_grad_(False)
    before = _state(ema)

    def refuse(**_: object) -> None:
        raise RuntimeError("refused inside the update")

    monkeypatch.setattr(ema.ema, "update", refuse)
    with pytest.raises(RuntimeError, match="refused inside the update"):
        ema.step(rebuilt.parameters())
    monkeypatch.undo()
    _assert_same_state(_state(ema), before)
    assert all(a is b for a, b in zip(ema._tensors, model.parameters(), strict=True))
    assert all(a is b for a, b in zip(ema._tracked.tensors(), model.parameters(), strict=True))
    _next_step_as_twin(model, ema, twin_model, twin)


@pytest.mark.parametrize("method", ["copy_to", "restore"])
@pytest.mark.parametrize("given", ["one short", "one more", "other shapes"])
def test_copy_to_and_restore_refuse_a_list_that_does_not_pair_and_write_nothing(method: str, given: str) -> None:
    model, ema, twin_model, twin = _twins()
    for m in (model, twin_model):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(1.0)  # the model now differs from the shadows: a partial copy would show
    ema.store(model.parameters())
    stored = [t.clone() for t in ema.temp_stored_params]
    if method == "restore":
        ema.copy_to(model.parameters())  # as in an evaluation with the EMA's weights, before restore()
    params = list(model.parameters())
    bad = {
        "one short": params[:-1],
        "one more": [*params, torch.nn.Parameter(torch.zeros(1))],
        "other shapes": list(_other_shapes().parameters()),
    }[given]
    online = [p.detach().clone() for p in bad]
    before = _state(ema)
    expected = "shadow_params" if method == "copy_to" else "temp_stored_params"
    match = {
        "one short": rf"{method}\(\): parameters has 113 tensors but {expected} has 114",
        "one more": rf"{method}\(\): parameters has 115 tensors but {expected} has 114",
        "other shapes": rf"{method}\(\): parameters\[0\] has shape \(4, 1, 3, 3\) but {expected}\[0\] has shape",
    }[given]
    with pytest.raises(ValueError, match=match):
        getattr(ema, method)(bad)
    for p, o in zip(bad, online, strict=True):
        assert torch.equal(p, o)  # nothing written
    _assert_same_state(_state(ema), before)
    assert ema.temp_stored_params is not None  # the stored copy is kept for a correct restore()
    for a, b in zip(ema.temp_stored_params, stored, strict=True):
        assert torch.equal(a, b)
    ema.restore(model.parameters())
    for p, s in zip(model.parameters(), stored, strict=True):
        assert torch.equal(p, s)
    _next_step_as_twin(model, ema, twin_model, twin)
