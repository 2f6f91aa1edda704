"""The EMA of a peft adapter: a real LoRA model (a tiny Llama built from its config), averaged side by side with a
float64 reference, holding nothing of the frozen base; saved with peft's ``save_pretrained``, merged without
touching the model; and what ``add_adapter``/``set_adapter``/``load_adapter`` after construction do."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from polyak import EMA  # noqa: E402
from polyak.peft import AdapterEMA  # noqa: E402

CONFIG = LlamaConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=32,
)
IDS = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))


def base(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(CONFIG)


def lora(r: int = 4, **kwargs) -> LoraConfig:
    kwargs.setdefault("target_modules", ["q_proj", "v_proj"])
    return LoraConfig(r=r, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False, **kwargs)


def peft_model(seed: int = 0, **kwargs) -> PeftModel:
    return get_peft_model(base(seed), lora(**kwargs))


def train(model: nn.Module, ema: EMA, steps: int, after: Callable[[], None] = lambda: None) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(steps):
        optimizer.zero_grad()
        model(input_ids=IDS, labels=IDS).loss.backward()
        optimizer.step()
        ema.update()
        after()


def trainable(model: nn.Module) -> dict[str, Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def storages(module: nn.Module) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()]}


def own_bytes(ema: EMA) -> tuple[int, int, list[str]]:
    """The EMA's own memory: (bytes of its parameters and masters, bytes of its buffers, names of the EMA
    model's parameters that do not share the model's storage)."""
    online = storages(ema.model)
    seen: set[int] = set()
    params = buffers = 0
    names = []
    for kind, items in (("p", ema.ema_model.named_parameters()), ("b", ema.ema_model.named_buffers())):
        for name, t in items:
            s = t.untyped_storage()
            if s.data_ptr() in online or s.data_ptr() in seen:
                continue
            seen.add(s.data_ptr())
            if kind == "p":
                params += s.nbytes()
                names.append(name)
            else:
                buffers += s.nbytes()
    for t in ema.state_dict().get("master", {}).values():
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            params += s.nbytes()
    return params, buffers, names


def adapter_ema(model: nn.Module, how: str, **kwargs) -> EMA:
    return AdapterEMA(model, **kwargs) if how == "AdapterEMA" else EMA(model, trainable_only=True, **kwargs)


HOW = ["AdapterEMA", "trainable_only"]


@pytest.mark.parametrize("how", HOW)
def test_the_adapter_is_averaged_like_a_float64_reference_and_the_base_is_shared(how: str) -> None:
    model = peft_model(modules_to_save=["lm_head"])
    ema = adapter_ema(model, how, momentum=0.3)
    adapter = trainable(model)
    assert any(".modules_to_save.default." in n for n in adapter) and any(".lora_B.default." in n for n in adapter)
    reference = {n: p.detach().double().clone() for n, p in adapter.items()}

    def step() -> None:
        for n, p in adapter.items():
            reference[n].lerp_(p.detach().double(), 0.3)

    train(model, ema, 4, step)
    averaged = dict(ema.ema_model.named_parameters())
    for n, r in reference.items():
        torch.testing.assert_close(averaged[n].double(), r, rtol=0, atol=1e-6)
        assert not torch.equal(averaged[n], adapter[n])  # the AdamW steps moved the model away from its EMA
    online = dict(model.named_parameters())
    for n, p in averaged.items():
        if n not in adapter:
            assert p.data_ptr() == online[n].data_ptr(), n  # the frozen base: the model's own tensor


@pytest.mark.parametrize(
    "kwargs",
    [
        {"use_dora": True},  # lora_magnitude_vector
        {"target_modules": ["embed_tokens", "o_proj"]},  # lora_embedding_A/B: ParameterDicts
        {"target_modules": ["q_proj"], "trainable_token_indices": [1, 2]},  # a trainable-tokens delta
    ],
    ids=["dora", "embedding", "trainable-tokens"],
)
def test_every_kind_of_adapter_tensor_is_averaged_and_nothing_else(kwargs: dict) -> None:
    model = peft_model(**kwargs)
    ema = AdapterEMA(model, momentum=0.5)
    assert sorted(own_bytes(ema)[2]) == sorted(trainable(model))
    train(model, ema, 1)


@pytest.mark.parametrize(
    ("dtype", "per_parameter"),
    [(torch.float32, 4), (torch.bfloat16, 6)],  # bfloat16: its own 2 bytes and a float32 master's 4
    ids=["float32", "bfloat16"],
)
def test_the_ema_holds_the_adapter_only(dtype: torch.dtype, per_parameter: int) -> None:
    model = peft_model(modules_to_save=["lm_head"]).to(dtype)
    ema = AdapterEMA(model, momentum=0.1)
    ema.update()
    adapter = trainable(model)
    count = sum(p.numel() for p in adapter.values())
    params, buffers, names = own_bytes(ema)
    assert sorted(names) == sorted(adapter)  # no base weight is copied
    assert params == per_parameter * count, (params, count)
    assert buffers <= 64  # the rotary embedding's inverse frequencies, copied as handle_buffers="copy" says
    base_count = sum(p.numel() for n, p in model.named_parameters() if n not in adapter)
    assert base_count > 5 * count  # what is not copied


def test_saved_with_peft_save_pretrained_and_loaded_onto_a_fresh_base(tmp_path: Path) -> None:
    model = peft_model(modules_to_save=["lm_head"])
    ema = AdapterEMA(model, momentum=0.3)
    train(model, ema, 3)
    ema.ema_model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(base(), tmp_path)  # same config, same seed: the same base
    mine, theirs = ema.ema_model.state_dict(), loaded.state_dict()
    assert set(mine) == set(theirs)
    for n in trainable(model):
        assert torch.equal(theirs[n], mine[n]), n
        assert not torch.equal(theirs[n], model.state_dict()[n])  # the EMA's weights, not the model's
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=IDS).logits, ema.ema_model(input_ids=IDS).logits)


def test_peft_merge_into_the_ema_model_would_write_the_models_base() -> None:
    """Why AdapterEMA.merge_and_unload merges a copy: peft adds the delta into base_layer.weight in place, and the
    EMA model's base_layer.weight is the model's tensor."""
    model = peft_model()
    ema = EMA(model, momentum=0.5, trainable_only=True)
    weight = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    before = weight.detach().clone()
    ema.ema_model.merge_and_unload()
    assert not torch.equal(weight, before)


@pytest.mark.parametrize("way", ["AdapterEMA.merge_and_unload", "deepcopy"])
def test_merged_with_the_emas_weights_and_the_model_untouched(way: str) -> None:
    model = peft_model()
    ema = adapter_ema(model, "trainable_only" if way == "deepcopy" else "AdapterEMA", momentum=0.3)
    train(model, ema, 3)
    online = {n: t.detach().clone() for n, t in model.state_dict().items()}
    averaged = {n: t.detach().clone() for n, t in ema.ema_model.state_dict().items()}
    # copy.deepcopy: the documented way for a plain EMA
    merged = copy.deepcopy(ema.ema_model).merge_and_unload() if way == "deepcopy" else ema.merge_and_unload()
    assert type(merged) is LlamaForCausalLM
    assert not storages(merged) & storages(model)
    for before, module in ((online, model), (averaged, ema.ema_model)):
        now = module.state_dict()
        assert set(now) == set(before) and all(torch.equal(now[n], t) for n, t in before.items())
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=IDS).logits, ema.ema_model(input_ids=IDS).logits)
        assert not torch.allclose(merged(input_ids=IDS).logits, model(input_ids=IDS).logits)
    train(model, ema, 1)  # the EMA goes on


def test_merge_and_unload_is_refused_while_the_model_is_merged_or_swapped() -> None:
    model = peft_model()
    ema = AdapterEMA(model, momentum=0.3)
    model.merge_adapter()
    with pytest.raises(RuntimeError, match=r"adapters merged into its weights .*model.unmerge_adapter\(\) first"):
        ema.merge_and_unload()
    model.unmerge_adapter()
    with ema.swapped(), pytest.raises(RuntimeError, match="merge_and_unload"):
        ema.merge_and_unload()
    ema.merge_and_unload()


def _state(ema: EMA) -> dict[str, Tensor]:
    return {n: t.detach().clone() for n, t in ema.ema_model.state_dict().items()}


def _unchanged(ema: EMA, before: dict[str, Tensor], count: int) -> None:
    now = ema.ema_model.state_dict()
    assert ema.num_updates == count and all(torch.equal(now[n], t) for n, t in before.items())


def test_add_adapter_is_refused_naming_it_then_followed_once_the_ema_model_has_it() -> None:
    model = peft_model()
    ema = AdapterEMA(model, momentum=0.5)
    train(model, ema, 1)
    before = _state(ema)
    model.add_adapter("second", lora(r=2, target_modules=["q_proj"]))
    with pytest.raises(RuntimeError, match=r"the model has adapter 'second'.*ema.ema_model.add_adapter\('second'"):
        ema.update()
    _unchanged(ema, before, 1)
    ema.ema_model.add_adapter("second", lora(r=2, target_modules=["q_proj"]))
    train(model, ema, 1)
    assert ema.num_updates == 2
    online = dict(model.named_parameters())
    for n, p in ema.ema_model.named_parameters():
        if ".second." in n:
            assert p.data_ptr() == online[n].data_ptr()  # shared, not averaged


def test_add_adapter_with_a_plain_ema_is_refused_naming_the_new_tensors() -> None:
    model = peft_model()
    ema = EMA(model, momentum=0.5, trainable_only=True)
    before = _state(ema)
    model.add_adapter("second", lora(r=2, target_modules=["q_proj"]))
    with pytest.raises(RuntimeError, match=r"missing \[.*lora_A\.second\.weight.*build a new EMA"):
        ema.update()
    _unchanged(ema, before, 0)


def test_set_adapter_is_refused_until_switched_back_and_a_switch_within_a_step_is_fine() -> None:
    model = peft_model()
    model.add_adapter("reference", lora(r=2))
    ema = AdapterEMA(model, momentum=0.5)
    assert ema.adapter_names == ("default",)
    train(model, ema, 1)
    before = _state(ema)
    model.set_adapter("reference")
    for call in (ema.update, ema.swapped, ema.merge_and_unload):
        with pytest.raises(RuntimeError, match=r"active adapters are now \['reference'\].*set_adapter\('default'\)"):
            call()
    _unchanged(ema, before, 1)
    model.set_adapter("default")
    optimizer = torch.optim.SGD(trainable(model).values(), lr=0.1)
    optimizer.zero_grad()
    model(input_ids=IDS, labels=IDS).loss.backward()
    optimizer.step()
    model.set_adapter("reference")  # e.g. the reference log-probabilities of DPO, under no_grad
    with torch.no_grad():
        model(input_ids=IDS)
    model.set_adapter("default")
    ema.update()
    assert ema.num_updates == 2


def test_load_adapter_is_refused_then_followed(tmp_path: Path) -> None:
    peft_model(seed=3).save_pretrained(tmp_path)
    model = peft_model()
    ema = AdapterEMA(model, momentum=0.5)
    before = _state(ema)
    model.load_adapter(tmp_path, adapter_name="ref", is_trainable=False)
    with pytest.raises(RuntimeError, match=r"adapter 'ref'.*load_adapter\(path, adapter_name='ref'\)"):
        ema.update()
    _unchanged(ema, before, 0)
    ema.ema_model.load_adapter(tmp_path, adapter_name="ref", is_trainable=False)
    train(model, ema, 1)


def test_the_adapter_named_and_the_errors() -> None:
    model = peft_model()
    model.add_adapter("other", lora(r=2))
    with pytest.raises(ValueError, match=r"adapter 'other' is not active .*model.set_adapter\('other'\)"):
        AdapterEMA(model, adapter_name="other")
    with pytest.raises(ValueError, match=r"adapter_name must name adapters of the model \(\['default', 'other'\]\)"):
        AdapterEMA(model, adapter_name="nope")
    with pytest.raises(TypeError, match="adapter_name must be a str"):
        AdapterEMA(model, adapter_name=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="model must be a peft model"):
        AdapterEMA(base())
    model.set_adapter("other")
    ema = AdapterEMA(model, adapter_name="other", predicate=lambda name, p: "lora_B" in name)
    assert ema.adapter_names == ("other",)
    names = own_bytes(ema)[2]
    assert names and all(".lora_B.other." in n for n in names)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_checkpoint_holds_the_adapter_not_the_base_and_resumes_exactly(dtype: torch.dtype, tmp_path: Path) -> None:
    model = peft_model(modules_to_save=["lm_head"]).to(dtype)
    ema = AdapterEMA(model, momentum=0.3)
    train(model, ema, 2)
    torch.save(ema.state_dict(), tmp_path / "ema.pt")
    state = torch.load(tmp_path / "ema.pt", weights_only=True)
    buffers = {n for n, _ in model.named_buffers() if n in model.state_dict()}
    assert set(state["ema_model"]) == set(trainable(model)) | buffers
    assert set(state.get("master", {})) == (set(trainable(model)) if dtype == torch.bfloat16 else set())
    other = AdapterEMA(model, momentum=0.3)
    other.load_state_dict(state)
    assert other.num_updates == 2
    train(model, ema, 2, after=other.update)
    mine, theirs = ema.ema_model.state_dict(), other.ema_model.state_dict()
    assert set(mine) == set(theirs) and all(torch.equal(mine[n], theirs[n]) for n in mine)
    whole = EMA(model, momentum=0.3, trainable_only=True)
    other.load_state_dict(whole.state_dict())  # the whole state of a plain EMA loads too
    assert other.num_updates == 0
