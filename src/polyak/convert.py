"""Load another library's saved EMA into a :class:`~polyak.EMA`, to switch without losing a run.

Each library saves its average under its own names. :func:`load_state_dict` reads these (its ``source``),
taking the update count from the state where it holds one:

- ``"polyak"``: :meth:`polyak.EMA.state_dict`, passed through.
- ``"model"``: a plain state dict of the averaged model, such as ``ema_model.state_dict()`` of any library or
  ``checkpoint["state_dict_ema"]`` of timm's training script. No count: pass ``num_updates``.
- ``"averaged_model"``: ``torch.optim.swa_utils.AveragedModel.state_dict()``: ``module.<name>`` and the count
  ``n_averaged``.
- ``"timm"``: ``state_dict()`` of timm's ``ModelEmaV2``/``ModelEmaV3``: ``module.<name>``. No count (timm's is
  the ``step`` your loop passes to ``update``): pass ``num_updates``.
- ``"ema_pytorch"``: ``state_dict()`` of ema-pytorch's ``EMA`` (or ``KarrasEMA``): ``ema_model.<name>``, the
  count ``step`` and ``initted``; the online model's ``online_model.<name>`` are ignored.
- ``"torch_ema"``: torch-ema's ``ExponentialMovingAverage.state_dict()``: ``shadow_params``, a list in the
  order of the parameters it was built on, and the count ``num_updates``.

The loaded weights become the average: for a float16/bfloat16 model, its float32 masters take the saved
values as they are (a float32 average saved by another library loses nothing), and :attr:`~polyak.EMA.ema_model`
holds them rounded to its dtype. The update count becomes :attr:`~polyak.EMA.num_updates`, so that a
schedule continues where the other library's was (the conversions of each library's schedule are in the
switching guides). A state that does not fit the EMA model (a name missing or unexpected, a shape that
differs) is refused with a ``ValueError`` that names it, and nothing is changed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from numbers import Integral
from typing import Any

from torch import Tensor

from polyak._tracking import unwrap_model
from polyak.ema import EMA

__all__ = ["SOURCES", "convert_state_dict", "detect_source", "load_state_dict"]

SOURCES = ("polyak", "model", "averaged_model", "timm", "ema_pytorch", "torch_ema")
"""The formats :func:`convert_state_dict` reads, as its ``source`` names them."""
# the update count each source saves, where it saves one
_COUNT_KEYS = {
    "polyak": "num_updates",
    "averaged_model": "n_averaged",
    "ema_pytorch": "step",
    "torch_ema": "num_updates",
}
_PREFIXES = {"averaged_model": "module.", "timm": "module.", "ema_pytorch": "ema_model."}


def detect_source(state_dict: Mapping[str, Any]) -> str:
    """Which library saved ``state_dict``: one of :data:`SOURCES`, told by the keys each one writes.

    A state dict with none of the others' marks is taken for a plain ``"model"`` state dict.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from polyak.convert import detect_source
        >>> averaged = torch.optim.swa_utils.AveragedModel(nn.Linear(2, 1))
        >>> detect_source(averaged.state_dict()), detect_source(nn.Linear(2, 1).state_dict())
        ('averaged_model', 'model')
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
    keys = set(state_dict)
    if "shadow_params" in keys:
        return "torch_ema"
    if {"num_updates", "ema_model"} <= keys and isinstance(state_dict["ema_model"], Mapping):
        return "polyak"
    if {"step", "initted"} <= keys and any(isinstance(k, str) and k.startswith("ema_model.") for k in keys):
        return "ema_pytorch"
    module_keys = {k for k in keys if isinstance(k, str) and k.startswith("module.")}
    if "n_averaged" in keys and module_keys:
        return "averaged_model"
    if keys and module_keys == keys:
        return "timm"
    return "model"


def convert_state_dict(
    ema: EMA,
    state_dict: Mapping[str, Any],
    *,
    source: str = "auto",
    num_updates: int | None = None,
    names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Translate another library's saved EMA into what ``ema.load_state_dict`` takes; ``ema`` is not changed.

    Args:
        ema: the EMA to load into, built on the same model (its :attr:`~polyak.EMA.ema_model` decides the
            names and shapes that must fit).
        state_dict: the other library's state dict (see the module docstring for the formats).
        source: one of :data:`SOURCES`, or ``"auto"`` (the default): a state dict whose names are exactly the
            EMA model's is a ``"model"`` state dict, others are told by :func:`detect_source`.
        num_updates: the update count to continue from; by default the one the state saves. Sources that save
            none (``"model"``, ``"timm"``: timm's count is the ``step`` your loop passes to ``update``) need it.
            ema-pytorch's ``step`` counts its ``update()`` calls: with ``update_every=E``, the polyak EMA that
            updates every ``E`` steps has made ``ceil(step / E)`` updates; pass that.
        names: for ``"torch_ema"``: the names of the parameters its ``shadow_params`` follow, in their order;
            by default all parameters of the EMA model (``ExponentialMovingAverage(model.parameters())``).
            Buffers, which torch-ema does not keep, keep the EMA's current values.

    Returns:
        A state dict for :meth:`polyak.EMA.load_state_dict`: ``num_updates``, ``ema_model`` and, where the EMA
        keeps float32 masters, ``master`` (the saved values, widened, so that none of their bits are lost).

    Raises:
        ValueError: the state does not fit the EMA model (naming the key, or the list index, and the shapes),
            ``source`` is unknown, or the update count is missing or not an int >= 0.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from polyak import EMA
        >>> from polyak.convert import convert_state_dict
        >>> averaged = torch.optim.swa_utils.AveragedModel(nn.Linear(2, 1))
        >>> averaged.update_parameters(nn.Linear(2, 1))
        >>> state = convert_state_dict(EMA(nn.Linear(2, 1)), averaged.state_dict())
        >>> state["num_updates"], sorted(state["ema_model"])
        (1, ['bias', 'weight'])
    """
    return _convert(ema, state_dict, source, num_updates, names)[1]


def load_state_dict(
    ema: EMA,
    state_dict: Mapping[str, Any],
    *,
    source: str = "auto",
    num_updates: int | None = None,
    names: Sequence[str] | None = None,
) -> str:
    """Load another library's saved EMA into ``ema``; returns the source it was read as.

    :func:`convert_state_dict` then :meth:`polyak.EMA.load_state_dict`, with the same arguments. Everything
    is checked first: a state that does not fit changes nothing.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from polyak import EMA
        >>> from polyak.convert import load_state_dict
        >>> model = nn.Linear(2, 1)
        >>> timm_like = {f"module.{k}": v + 1 for k, v in model.state_dict().items()}  # ModelEmaV3().state_dict()
        >>> ema = EMA(model, momentum=0.001)
        >>> load_state_dict(ema, timm_like, num_updates=500)
        'timm'
        >>> ema.num_updates, torch.equal(ema.ema_model.weight, model.weight + 1)
        (500, True)
    """
    source, converted = _convert(ema, state_dict, source, num_updates, names)
    ema.load_state_dict(converted)
    return source


# -- helpers ------------------------------------------------------------------------------------------------
def _convert(
    ema: EMA, state_dict: Mapping[str, Any], source: str, num_updates: object, names: Sequence[str] | None
) -> tuple[str, dict[str, Any]]:
    """The source, resolved, and the state dict for ``ema.load_state_dict``."""
    if not isinstance(ema, EMA):
        raise TypeError(f"ema must be a polyak.EMA, got {type(ema).__name__}")
    ema._refuse_when_swapped("converting a state with polyak.convert")  # named so, not as ema.state_dict()
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
    if source != "auto" and source not in SOURCES:
        raise ValueError(f"source must be 'auto' or one of {', '.join(map(repr, SOURCES))}, got {source!r}")
    current = ema.state_dict()
    own: Mapping[str, Any] = current["ema_model"]
    if source == "auto":
        source = "model" if set(state_dict) == set(own) else detect_source(state_dict)
    if names is not None and source != "torch_ema":
        raise ValueError(f"names is for torch-ema states (with shadow_params), but this state is {source!r}")

    if source == "polyak":
        values = state_dict.get("ema_model")
        _check_fit(source, values, own, lambda name: name)
    elif source == "torch_ema":
        values = _torch_ema_values(state_dict, ema, own, names)
        saved = set(values)
        values = {**own, **values}
    else:
        prefix = _PREFIXES.get(source, "")
        values = {k[len(prefix) :]: v for k, v in state_dict.items() if isinstance(k, str) and k.startswith(prefix)}
        _check_fit(source, values, own, lambda name: prefix + name)
    if source != "torch_ema":
        saved = set(values)
    count = _count(source, state_dict, num_updates)

    out: dict[str, Any] = {"num_updates": count, "ema_model": dict(values)}
    if source == "polyak":
        out = {**state_dict, "num_updates": count}
    elif "master" in current:  # each master from the saved value, widened: the other library's bits, all of them
        out["master"] = {
            k: values[k].detach().to(device=m.device, dtype=m.dtype) if k in saved else m
            for k, m in current["master"].items()
        }
    return source, out


def _check_fit(source: str, values: Mapping[str, Any], own: Mapping[str, Any], saved_as: Any) -> None:
    """``values`` must name exactly the EMA model's entries, each tensor of its shape; errors use the saved keys."""
    if not isinstance(values, Mapping):
        raise ValueError(f"the {source} state's weights must be a mapping, got {type(values).__name__}")
    missing = [saved_as(k) for k in own if k not in values]
    unexpected = [saved_as(k) for k in values if k not in own]
    if missing or unexpected:
        raise ValueError(
            f"the {source} state does not fit the EMA model: missing {missing}, unexpected {unexpected}"
            + _advice(source, values, own)
        )
    for name, target in own.items():
        got = _misfit(values[name], target) if isinstance(target, Tensor) else None
        if got:
            raise ValueError(
                f"the {source} state's {saved_as(name)!r} has {got}, but the EMA model's {name!r} has shape "
                f"{tuple(target.shape)} and dtype {target.dtype}"
            )


def _misfit(value: object, target: Tensor) -> str | None:
    """What keeps ``value`` from standing for ``target`` (another shape, integers for floats, ...), or None.
    Floating values of another precision fit: they are rounded, or widened into the float32 masters."""

    def kind(t: Tensor) -> str:
        return "complex" if t.is_complex() else "floating" if t.is_floating_point() else "integer"

    if not isinstance(value, Tensor):
        return type(value).__name__
    if value.shape != target.shape:
        return f"shape {tuple(value.shape)}"
    if kind(value) != kind(target):
        return f"{kind(value)} values ({value.dtype})"
    return None


def _advice(source: str, values: Mapping[str, Any], own: Mapping[str, Any]) -> str:
    if source == "model" and any(isinstance(k, str) and k.startswith("module.") for k in values):
        return " (its names start with 'module.': pass source='timm' or 'averaged_model')"
    twice = [k[len("module.") :] for k in values if isinstance(k, str) and k.startswith("module.")]
    if source != "model" and len(twice) == len(values) and set(twice) == set(own):
        return (
            " (its names hold 'module.' once more: the averaged model was a DistributedDataParallel or DataParallel "
            "model; remove that from each name first)"
        )
    return ""


def _torch_ema_values(
    state_dict: Mapping[str, Any], ema: EMA, own: Mapping[str, Any], names: Sequence[str] | None
) -> dict[str, Any]:
    """torch-ema's positional ``shadow_params``, by name."""
    shadow = state_dict.get("shadow_params")
    if not isinstance(shadow, (list, tuple)):
        raise ValueError(f"the torch_ema state's 'shadow_params' must be a list, got {type(shadow).__name__}")
    if names is None:
        names = [n for n, _ in unwrap_model(ema.ema_model).named_parameters()]
    else:
        if isinstance(names, str) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"names must be a sequence of parameter names, got {names!r}")
        names = list(names)
        unknown = [n for n in names if n not in own]
        if unknown or len(set(names)) != len(names):
            raise ValueError(f"names must be distinct names of the EMA model's tensors, got unknown {unknown}")
    if len(shadow) != len(names):
        raise ValueError(
            f"the torch_ema state has {len(shadow)} shadow_params, but the EMA model has {len(names)} parameters "
            f"to match them with ({', '.join(names[:8])}{', ...' if len(names) > 8 else ''}): pass names=, the "
            "names of the parameters the ExponentialMovingAverage was built on, in order"
        )
    for i, (name, value) in enumerate(zip(names, shadow, strict=True)):
        got = _misfit(value, own[name])
        if got:
            raise ValueError(
                f"the torch_ema state's shadow_params[{i}] has {got}, but the EMA model's parameter {name!r} "
                f"(number {i} in order) has shape {tuple(own[name].shape)} and dtype {own[name].dtype}"
            )
    return dict(zip(names, shadow, strict=True))


def _count(source: str, state_dict: Mapping[str, Any], num_updates: object) -> int:
    key = _COUNT_KEYS.get(source)
    if num_updates is None:
        value = state_dict.get(key) if key is not None else None
        if value is None:
            why = {
                "timm": "timm saves none: give the step your loop last passed to ModelEmaV3.update (names that all "
                "start with 'module.' are read as timm's ModelEmaV2/V3; for the state of a DistributedDataParallel "
                "model, remove 'module.' from each name and pass source='model')",
                "torch_ema": "this one was built with use_num_updates=False",
            }.get(source, "a plain state dict holds none")
            raise ValueError(f"pass num_updates= (the number of EMA updates so far): {why}")
        where = f"the {source} state's {key!r}"
    else:
        value, where = num_updates, "num_updates"
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_floating_point() and value.dtype.is_signed:
        value = int(value)
    if isinstance(value, Tensor) and value.numel() == 1 and value.is_floating_point() and float(value).is_integer():
        value = int(value)  # ema-pytorch's PostHocEMA saves its step in float16
    if isinstance(value, Integral) and not isinstance(value, bool):
        value = int(value)  # a numpy integer: the int it is (np.bool_ is no Integral)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{where} must be an int >= 0, got {value!r}")
    return value
