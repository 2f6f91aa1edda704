"""polyak for peft: :class:`AdapterEMA`, the EMA of a LoRA (or any peft) adapter only (``pip install "polyak[peft]"``).

``EMA(peft_model, trainable_only=True)`` already averages the adapter alone and shares the frozen base with the
model (4 bytes per adapter parameter in float32, nothing of the base). :class:`AdapterEMA` is that, for the
adapter named (the active one by default, with its ``modules_to_save`` copies), and knows what peft does to a
model beside the tensors: it refuses an update after ``set_adapter`` switched the model to another adapter, or
after ``add_adapter``/``load_adapter`` gave the model an adapter the EMA model lacks, saying what to do; and its
:meth:`~AdapterEMA.merge_and_unload` merges the EMA's weights into a copy, because peft's own merges into the
EMA model would write into the base weights it shares with the model.
"""

from __future__ import annotations

import contextlib
import copy
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

from polyak._extras import require

require("peft", "polyak.peft")

import torch  # noqa: E402
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from polyak.ema import EMA  # noqa: E402

__all__ = ["AdapterEMA"]

_DEFAULT_MOMENTUM = 0.0002


def _unwrap(model: nn.Module) -> nn.Module:
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def _active_adapters(model: nn.Module) -> list[str]:
    active: Any = getattr(model, "active_adapters", None)
    if callable(active):  # transformers' PeftAdapterMixin has it as a method, peft's PeftModel as a property
        active = active()
    return [active] if isinstance(active, str) else list(active or [])


def _adapter_parameters(model: nn.Module, names: Sequence[str]) -> dict[int, str]:
    """The parameters of the adapters ``names``, by id: every entry under one of these names in a ``ModuleDict``
    or ``ParameterDict`` of a peft module (``lora_A.<name>``, ``lora_B.<name>``, ``lora_magnitude_vector.<name>``,
    ``modules_to_save.<name>``, ``prompt_encoder.<name>``, ...), which is how peft keeps each adapter apart."""
    found: dict[int, str] = {}
    for prefix, module in model.named_modules():
        if not type(module).__module__.startswith("peft."):
            continue
        for child_name, child in module.named_children():
            if not isinstance(child, (nn.ModuleDict, nn.ParameterDict)):
                continue
            for name in names:
                if name not in child:
                    continue
                entry = child[name]
                where = ".".join(s for s in (prefix, child_name, name) if s)
                if isinstance(entry, nn.Parameter):
                    found.setdefault(id(entry), where)
                elif isinstance(entry, nn.Module):
                    for n, p in entry.named_parameters(prefix=where):
                        found.setdefault(id(p), n)
    return found


class AdapterEMA(EMA):
    r"""The EMA of a peft adapter: its weights are averaged, the frozen base is shared with the model.

    Built from a peft model (``peft.get_peft_model``, ``PeftModel.from_pretrained``, or a transformers model
    given adapters with its ``add_adapter``), it averages the parameters of the adapter ``adapter_name``
    (by default the active adapter): its LoRA matrices (``lora_A``, ``lora_B``, DoRA's magnitudes, ...) and its
    ``modules_to_save`` copies. Every other parameter is shared: :attr:`~polyak.EMA.ema_model` holds the model's own
    tensor, so the EMA costs 4 bytes per adapter parameter in float32 (its buffers aside, which are copied as
    ``handle_buffers`` says), and nothing of the base. :attr:`~polyak.EMA.ema_model` is a peft model: its
    ``save_pretrained`` writes the averaged adapter, which ``PeftModel.from_pretrained`` loads onto a fresh base.

    What peft does beside the tensors, the EMA follows or refuses, before changing anything:

    * ``model.set_adapter(other)`` (the model now trains another adapter): :meth:`update` and :meth:`swapped`
      raise until the model's active adapters are the EMA's again. A switch inside a step (a reference
      adapter for a loss, as TRL's DPO does) that is undone before the update is fine.
    * ``model.add_adapter(...)`` / ``model.load_adapter(...)`` after the EMA was built: the model has tensors
      the EMA model lacks, and :meth:`update` raises, naming the adapter; do the same to :attr:`~polyak.EMA.ema_model`
      (``ema.ema_model.add_adapter(name, config)``): the new adapter is then shared, not averaged.
    * ``merge_and_unload()`` or ``merge_adapter()`` on :attr:`~polyak.EMA.ema_model` would add the EMA's delta into the
      base weights it shares with the model, i.e. into the model being trained: use :meth:`merge_and_unload`
      here, which merges into a copy. Merging into the *model* (``model.merge_adapter()``) merges into the
      EMA model's base too: :meth:`merge_and_unload` refuses while the model is merged.

    Args:
        model: the peft model being trained.
        momentum: as for :class:`polyak.EMA`.
        adapter_name: the adapter to average, or several (by default the model's active adapters); each must be
            active.
        **kwargs: any other argument of :class:`polyak.EMA` (``schedule``, ``copy_first``, ``dtype``, ...). A
            ``predicate``, ``include`` or ``exclude`` narrows the adapter's parameters further. With
            ``device=`` the EMA model lives elsewhere and holds a copy of the base, refreshed at each update.

    Attributes:
        adapter_names: the adapters averaged, as a tuple.

    Example:
        >>> import torch
        >>> from peft import LoraConfig, get_peft_model
        >>> from torch import nn
        >>> from polyak.peft import AdapterEMA
        >>> base = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
        >>> model = get_peft_model(base, LoraConfig(r=2, target_modules=["0", "2"]))
        >>> ema = AdapterEMA(model, momentum=0.1)
        >>> optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        >>> for _ in range(3):
        ...     optimizer.zero_grad()
        ...     model(torch.randn(4, 16)).pow(2).mean().backward()
        ...     optimizer.step()
        ...     _ = ema.update()
        >>> ema.adapter_names, ema.num_updates
        (('default',), 3)
        >>> shared = {p.data_ptr() for p in model.parameters()}
        >>> sorted(n for n, p in ema.ema_model.named_parameters() if p.data_ptr() not in shared)[:2]
        ['base_model.model.0.lora_A.default.weight', 'base_model.model.0.lora_B.default.weight']
        >>> merged = ema.merge_and_unload()  # a plain nn.Sequential with the EMA's adapter merged in
        >>> type(merged).__name__
        'Sequential'
    """

    def __init__(
        self,
        model: nn.Module,
        momentum: float = _DEFAULT_MOMENTUM,
        *,
        adapter_name: str | Sequence[str] | None = None,
        **kwargs: Any,
    ) -> None:
        online = _unwrap(model)
        configs = getattr(online, "peft_config", None)
        if not isinstance(configs, dict) or not configs:
            raise TypeError(
                f"model must be a peft model (peft.get_peft_model, PeftModel.from_pretrained, or a transformers "
                f"model after add_adapter), got {type(online).__name__} without adapters"
            )
        active = _active_adapters(online)
        if adapter_name is None:
            names = list(active)
        elif isinstance(adapter_name, str):
            names = [adapter_name]
        elif isinstance(adapter_name, Sequence) and all(isinstance(n, str) for n in adapter_name):
            names = list(adapter_name)
        else:
            raise TypeError(f"adapter_name must be a str, a sequence of str or None, got {adapter_name!r}")
        unknown = [n for n in names if n not in configs]
        if not names or unknown:
            raise ValueError(f"adapter_name must name adapters of the model ({sorted(configs)}), got {adapter_name!r}")
        inactive = [n for n in names if n not in active]
        if inactive:
            raise ValueError(
                f"adapter_name={adapter_name!r}: adapter {inactive[0]!r} is not active (the model's active adapters "
                f"are {active}); call model.set_adapter({inactive[0]!r}) before building its EMA"
            )
        averaged = _adapter_parameters(online, names)
        if not averaged:
            raise ValueError(f"the model holds no parameters of adapter(s) {names}: nothing to average")
        narrower = kwargs.pop("predicate", None)
        if narrower is not None and not callable(narrower):
            raise TypeError(f"predicate must be a callable (name, parameter) -> bool, got {narrower!r}")

        def predicate(name: str, p: Tensor) -> bool:
            return id(p) in averaged and (narrower is None or bool(narrower(name, p)))

        self.adapter_names: tuple[str, ...] = tuple(names)
        self._active = tuple(active)
        super().__init__(model, momentum, predicate=predicate, **kwargs)

    def _check_adapters(self, what: str) -> None:
        """Refuse ``what`` where peft changed the model in a way the tensors alone do not show."""
        active = tuple(_active_adapters(_unwrap(self.model)))
        if active != self._active:
            raise RuntimeError(
                f"{what} refused: the model's active adapters are now {list(active)}, but this EMA was built with "
                f"{list(self._active)} active and averages {list(self.adapter_names)}; switch back with "
                f"model.set_adapter({self._active[0]!r}) before {what}, or build an AdapterEMA for the adapter "
                "trained now"
            )
        ours = getattr(_unwrap(self.ema_model), "peft_config", {})
        added = [n for n in getattr(_unwrap(self.model), "peft_config", {}) if n not in ours]
        if added:
            raise RuntimeError(
                f"{what} refused: the model has adapter {added[0]!r}, which the EMA model has not (added with "
                f"add_adapter or load_adapter after the EMA was built); do the same to the EMA model, e.g. "
                f"ema.ema_model.add_adapter({added[0]!r}, config) or ema.ema_model.load_adapter(path, "
                f"adapter_name={added[0]!r}) (it is then shared with the model, not averaged), or build the "
                "EMA after adding adapters"
            )

    def update(self, steps: int = 1, *, momentum: float | None = None) -> float:
        """:meth:`polyak.EMA.update`, refused (changing nothing) after a ``set_adapter`` to another adapter or
        an ``add_adapter``/``load_adapter`` that the EMA model did not follow (see the class docstring).

        Example:
            >>> import pytest
            >>> from peft import LoraConfig, get_peft_model
            >>> from torch import nn
            >>> from polyak.peft import AdapterEMA
            >>> model = get_peft_model(nn.Sequential(nn.Linear(4, 4)), LoraConfig(r=2, target_modules=["0"]))
            >>> ema = AdapterEMA(model, momentum=0.5)
            >>> model.add_adapter("other", LoraConfig(r=2, target_modules=["0"]))
            >>> with pytest.raises(RuntimeError, match="the model has adapter 'other'"):
            ...     _ = ema.update()
            >>> ema.ema_model.add_adapter("other", LoraConfig(r=2, target_modules=["0"]))  # followed
            >>> ema.update()
            0.5
            >>> model.set_adapter("other")
            >>> with pytest.raises(RuntimeError, match=r"active adapters are now \\['other'\\]"):
            ...     _ = ema.update()
        """
        self._check_adapters("update()")
        return super().update(steps, momentum=momentum)

    def swapped(self) -> contextlib.AbstractContextManager[nn.Module]:  # type: ignore[override]
        """:meth:`polyak.EMA.swapped`, refused like :meth:`update` after a ``set_adapter`` to another adapter.

        Example:
            >>> import torch
            >>> from peft import LoraConfig, get_peft_model
            >>> from torch import nn
            >>> from polyak.peft import AdapterEMA
            >>> model = get_peft_model(nn.Sequential(nn.Linear(4, 4)), LoraConfig(r=2, target_modules=["0"]))
            >>> ema = AdapterEMA(model)
            >>> x = torch.ones(1, 4)
            >>> with ema.swapped() as m, torch.no_grad():
            ...     torch.equal(m(x), ema.ema_model(x))
            True
        """
        self._check_adapters("swapped()")
        return super().swapped()

    def _shared_keys(self, state: Mapping[str, Any]) -> set[str]:
        """The keys of an EMA model's state dict that hold the model's own data (the frozen base)."""
        online = {p.untyped_storage().data_ptr() for p in self.model.parameters() if p.device.type != "meta"}
        return {
            k
            for k, v in state.items()
            if isinstance(v, Tensor) and v.device.type != "meta" and v.untyped_storage().data_ptr() in online
        }

    def state_dict(self) -> dict[str, Any]:
        """:meth:`polyak.EMA.state_dict` without the frozen base: ``state["ema_model"]`` holds the adapter's
        averaged tensors and the buffers, not the parameters the EMA model shares with the model (which would
        make every checkpoint as large as the model). :meth:`load_state_dict` takes them from the model.

        Example:
            >>> from peft import LoraConfig, get_peft_model
            >>> from torch import nn
            >>> from polyak.peft import AdapterEMA
            >>> model = get_peft_model(nn.Sequential(nn.Linear(4, 4)), LoraConfig(r=2, target_modules=["0"]))
            >>> ema = AdapterEMA(model)
            >>> sorted(ema.state_dict()["ema_model"])
            ['base_model.model.0.lora_A.default.weight', 'base_model.model.0.lora_B.default.weight']
            >>> ema.load_state_dict(ema.state_dict())
        """
        state = super().state_dict()
        shared = self._shared_keys(state["ema_model"])
        state["ema_model"] = OrderedDict((k, v) for k, v in state["ema_model"].items() if k not in shared)
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """:meth:`polyak.EMA.load_state_dict`, of a state from :meth:`state_dict` (the shared base is taken from
        the model) or a whole one (from :class:`polyak.EMA`)."""
        given = state_dict.get("ema_model") if isinstance(state_dict, Mapping) else None
        if isinstance(given, Mapping):
            own = _unwrap(self.ema_model).state_dict()
            shared = self._shared_keys(own)
            whole = OrderedDict((k, given.get(k, v)) for k, v in own.items() if k in given or k in shared)
            whole.update((k, v) for k, v in given.items() if k not in whole)  # unexpected: the EMA's load says so
            state_dict = {**state_dict, "ema_model": whole}
        super().load_state_dict(state_dict)

    @torch.no_grad()
    def merge_and_unload(self, **kwargs: Any) -> nn.Module:
        """The base model with the EMA's adapter merged into its weights: a new module, built from a copy of
        :attr:`~polyak.EMA.ema_model`; the model and the EMA are left as they are (the EMA goes on updating).

        peft's own ``ema.ema_model.merge_and_unload()`` would add the EMA's delta into base weights that the
        EMA model shares with the model being trained. The copy costs one model's memory on the EMA model's
        device; for a model too large for that, ``ema.ema_model.save_pretrained(folder)`` writes the adapter,
        which merges onto a base loaded elsewhere. Refused while adapters are merged into the model
        (``model.merge_adapter()``): the shared base then holds the model's delta.

        Args:
            **kwargs: peft's ``merge_and_unload`` arguments (``safe_merge``, ``adapter_names``).

        Example:
            >>> import torch
            >>> from peft import LoraConfig, get_peft_model
            >>> from torch import nn
            >>> from polyak.peft import AdapterEMA
            >>> model = get_peft_model(nn.Sequential(nn.Linear(4, 4)), LoraConfig(r=2, target_modules=["0"]))
            >>> ema = AdapterEMA(model)
            >>> weight = model.base_model.model[0].base_layer.weight
            >>> base = weight.clone()
            >>> merged = ema.merge_and_unload()
            >>> x = torch.ones(1, 4)
            >>> torch.allclose(merged(x), ema.ema_model(x)), torch.equal(weight, base)
            (True, True)
        """
        self._refuse_when_swapped("merge_and_unload()")
        self._check_adapters("merge_and_unload()")
        merged = [n for n, m in _unwrap(self.model).named_modules() if isinstance(m, BaseTunerLayer) and m.merged]
        if merged:
            raise RuntimeError(
                f"merge_and_unload() refused: the model has adapters merged into its weights ({merged[0]!r}: "
                "model.merge_adapter()), and the EMA model shares those weights; call model.unmerge_adapter() first"
            )
        return copy.deepcopy(_unwrap(self.ema_model)).merge_and_unload(**kwargs)
