"""``polyak.diffusers.EMAModel``: a drop-in for diffusers' ``EMAModel`` (``diffusers.training_utils``).

A diffusers training script runs with only the import changed, and the folders and state dicts it writes load
with either class. The decay is diffusers' (``get_decay``: the warm-up, ``update_after_step``, the clamps),
to the last bit. What differs is what diffusers gets wrong: float16/bfloat16 parameters are averaged in a
float32 master (diffusers' EMA, kept in the parameters' dtype, drops every update that rounds away), the
update is polyak's fused, allocation-free one, and an EMA moved to the CPU stays there and is updated from
pinned staging copies, instead of the scripts' ``--offload_ema`` moving it back to the GPU at every step.
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from polyak._sharding import is_zero3, local
from polyak._tracking import UNAVERAGEABLE, averaged_kind
from polyak.ema import EMA

__all__ = ["EMAModel"]

MASTER_FILE = "polyak_master.safetensors"  # in a save_pretrained folder: the float32 masters, by position

_CONFIG_KEYS = ("decay", "min_decay", "optimization_step", "update_after_step", "use_ema_warmup", "inv_gamma", "power")


class _Tracked(nn.Module):
    """The tracked tensors as a module: parameters under their position's name, other tensors as buffers."""

    def __init__(self, tensors: list[Tensor]) -> None:
        super().__init__()
        for i, t in enumerate(tensors):
            if not isinstance(t, Tensor):
                raise TypeError(f"parameters must be tensors, got {type(t).__name__} at position {i}")
            if isinstance(t, nn.Parameter):
                self.register_parameter(str(i), t)
            else:
                self.register_buffer(str(i), t)

    def tensors(self) -> list[Tensor]:
        count = len(self._parameters) + len(self._buffers)
        return [self._parameters.get(str(i), self._buffers.get(str(i))) for i in range(count)]  # type: ignore[misc]


def _clone(t: Tensor) -> Tensor:
    copy = t.detach().clone()
    return nn.Parameter(copy, requires_grad=False) if isinstance(t, nn.Parameter) else copy


def _positions(requires_grad: tuple[bool, ...]) -> Callable[[str, Tensor], bool]:
    """The selector of the positions averaged: those whose tensor requires grad."""
    averaged = {str(i) for i, g in enumerate(requires_grad) if g}
    return lambda name, _: name in averaged


def _parameters(parameters: Any, what: str) -> list[Tensor]:
    if isinstance(parameters, nn.Module):
        warnings.warn(
            f"Passing a `torch.nn.Module` to `EMAModel.{what}` is deprecated (as in diffusers): pass its "
            "parameters() instead",
            FutureWarning,
            stacklevel=3,
        )
        parameters = parameters.parameters()
    if isinstance(parameters, Tensor) or not isinstance(parameters, Iterable):
        raise TypeError(f"parameters must be an iterable of tensors, got {type(parameters).__name__}")
    return list(parameters)


def _shape(t: Tensor) -> tuple[int, ...]:
    """The shape a tensor is paired by (a ZeRO-3 parameter: its partition's)."""
    return tuple(local(t).shape if is_zero3(t) else t.shape)


def _check_against(
    what: str,
    tensors: list[Tensor],
    reference: list[Tensor],
    name: str,
    hint: str = "one for each parameter the EMA was built from, in that order",
) -> None:
    """Refuse ``tensors`` (the ``parameters`` given to ``what``) unless they pair, one to one, with ``reference``
    (the list called ``name``): as many, each a tensor of the same shape. Checked before anything is written."""
    if len(tensors) != len(reference):
        raise ValueError(
            f"{what}: parameters has {len(tensors)} tensors but {name} has {len(reference)} ({hint}); nothing was "
            "changed"
        )
    for i, (t, r) in enumerate(zip(tensors, reference, strict=True)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{what}: parameters[{i}] must be a tensor, got {type(t).__name__}; nothing was changed")
        if _shape(t) != tuple(r.shape):
            raise ValueError(
                f"{what}: parameters[{i}] has shape {_shape(t)} but {name}[{i}] has shape {tuple(r.shape)} (another "
                "model, or its parameters in another order?); nothing was changed"
            )


class EMAModel:
    """Exponential moving average of model weights, with diffusers' ``EMAModel`` interface.

    Args:
        parameters: the parameters to track (``unet.parameters()``), in the order ``step`` will get them.
            As in diffusers, each :meth:`step` averages those with ``requires_grad=True`` at that step and
            copies the others into their shadows (a part frozen or unfrozen mid-run is followed).
        decay: the largest decay (``momentum = 1 - decay`` in polyak's words).
        min_decay: the smallest decay.
        update_after_step: steps before the EMA starts averaging (until then it copies the weights).
        use_ema_warmup: diffusers' warm-up ``1 - (1 + step / inv_gamma) ** -power``; otherwise
            ``(1 + step) / (10 + step)``.
        inv_gamma, power: of the warm-up.
        foreach: accepted for compatibility; polyak's update is always the fused one.
        model_cls, model_config: for :meth:`save_pretrained` (a diffusers ``ModelMixin`` class and its config).
        dtype: keyword-only, polyak's: the dtype the average is accumulated in; by default float32 for
            float16/bfloat16 parameters (see :class:`polyak.EMA`).

    Attributes:
        optimization_step: how many times :meth:`step` ran.
        cur_decay_value: the decay of the last step.
        ema: the :class:`polyak.EMA` underneath.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from polyak.diffusers import EMAModel
        >>> model = nn.Linear(2, 1)
        >>> ema = EMAModel(model.parameters(), decay=0.9)
        >>> for _ in range(3):
        ...     with torch.no_grad():
        ...         _ = model.weight.add_(1.0)
        ...     ema.step(model.parameters())
        >>> ema.optimization_step, round(ema.cur_decay_value, 4)
        (3, 0.25)
    """

    def __init__(
        self,
        parameters: Iterable[nn.Parameter],
        decay: float = 0.9999,
        min_decay: float = 0.0,
        update_after_step: int = 0,
        use_ema_warmup: bool = False,
        inv_gamma: float | int = 1.0,
        power: float | int = 2 / 3,
        foreach: bool = False,
        model_cls: Any | None = None,
        model_config: dict[str, Any] | None = None,
        *,
        dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> None:
        if isinstance(parameters, nn.Module):
            use_ema_warmup = True  # as diffusers does for a module (deprecated there too)
        tensors = _parameters(parameters, "__init__")
        if kwargs.get("max_value") is not None:
            decay = kwargs.pop("max_value")
        if kwargs.get("min_value") is not None:
            min_decay = kwargs.pop("min_value")
        device = kwargs.pop("device", None)
        kwargs.pop("max_value", None)
        kwargs.pop("min_value", None)
        if kwargs:
            raise TypeError(f"EMAModel got unexpected arguments {sorted(kwargs)}")
        self._set_config(
            dict(
                decay=decay,
                min_decay=min_decay,
                optimization_step=0,
                update_after_step=update_after_step,
                use_ema_warmup=use_ema_warmup,
                inv_gamma=inv_gamma,
                power=power,
            )
        )
        self.foreach = foreach
        self.model_cls = model_cls
        self.model_config = model_config
        self.cur_decay_value: float | None = None
        self.temp_stored_params: list[Tensor] | None = None
        self._tracked = _Tracked(tensors)
        self._tensors = tensors  # what step() compares the parameters it gets with: the same objects, in order
        self._requires_grad = tuple([t.requires_grad for t in tensors])
        # shadows of their own for every tensor, as diffusers' clones: a frozen parameter's shadow is its value at
        # the last step (copied then), and one unfrozen later is averaged from there
        shadows = _Tracked([_clone(t) for t in tensors])
        self.ema = EMA(
            self._tracked,
            handle_buffers="update",
            dtype=dtype,
            ema_model=shadows,
            predicate=_positions(self._requires_grad),
        )
        if device is not None:
            self.to(device=device)

    # -- diffusers' configuration, checked as diffusers checks it -----------------------------------------------
    def _set_config(self, state: Mapping[str, Any]) -> None:
        decay = state["decay"]
        if not isinstance(decay, (int, float)) or isinstance(decay, bool) or not 0.0 <= decay <= 1.0:
            raise ValueError(f"Decay must be between 0 and 1, got {decay!r}")
        if not isinstance(state["min_decay"], float):
            raise ValueError(f"Invalid min_decay: {state['min_decay']!r}")
        for key in ("optimization_step", "update_after_step"):
            if not isinstance(state[key], int) or isinstance(state[key], bool) or state[key] < 0:
                raise ValueError(f"Invalid {key}: {state[key]!r}")
        if not isinstance(state["use_ema_warmup"], bool):
            raise ValueError(f"Invalid use_ema_warmup: {state['use_ema_warmup']!r}")
        for key in ("inv_gamma", "power"):
            if not isinstance(state[key], (float, int)) or isinstance(state[key], bool):
                raise ValueError(f"Invalid {key}: {state[key]!r}")
        self.decay = float(decay)
        self.min_decay = state["min_decay"]
        self.optimization_step = state["optimization_step"]
        self.update_after_step = state["update_after_step"]
        self.use_ema_warmup = state["use_ema_warmup"]
        self.inv_gamma = state["inv_gamma"]
        self.power = state["power"]

    def get_decay(self, optimization_step: int) -> float:
        """The decay of step ``optimization_step``, as diffusers computes it (0 until ``update_after_step``)."""
        step = max(0, optimization_step - self.update_after_step - 1)
        if step <= 0:
            return 0.0
        warm = 1 - (1 + step / self.inv_gamma) ** -self.power if self.use_ema_warmup else (1 + step) / (10 + step)
        return max(min(warm, self.decay), self.min_decay)

    # -- the average --------------------------------------------------------------------------------------------------
    @property
    def shadow_params(self) -> list[Tensor]:
        """The averaged tensors, in the order of the parameters given (as diffusers'); assigning a list copies
        its values in."""
        return self.ema.ema_model.tensors()  # type: ignore[operator]

    @shadow_params.setter
    def shadow_params(self, values: list[Tensor]) -> None:
        self._load_shadow(values)

    def _load_shadow(self, values: object, masters: object = None) -> None:
        own = self.shadow_params
        if not isinstance(values, (list, tuple)) or len(values) != len(own):
            raise ValueError(f"shadow_params must be a list of {len(own)} tensors, got {type(values).__name__}")
        for i, (v, o) in enumerate(zip(values, own, strict=True)):
            if not isinstance(v, Tensor) or v.shape != o.shape:
                got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
                raise ValueError(f"shadow_params[{i}] must be a tensor of shape {tuple(o.shape)}, got {got}")
        state = self.ema.state_dict()
        state["ema_model"] = {str(i): v for i, v in enumerate(values)}
        needed = state.get("master", {})
        if (
            isinstance(masters, (list, tuple))
            and len(masters) == len(own)
            and all(masters[int(k)] is not None for k in needed)
        ):
            state["master"] = {k: masters[int(k)] for k in needed}
        else:
            state.pop("master", None)
        self.ema.load_state_dict(state)

    def step(self, parameters: Iterable[nn.Parameter]) -> None:
        """One EMA update with the decay of the next step, as diffusers': each parameter with
        ``requires_grad=True`` *now* is averaged, each other one copied into its shadow.

        ``parameters`` must pair with :attr:`shadow_params` (as many, in the same order, each of the same shape;
        diffusers zips them silently): a step refused changes nothing, neither the counters nor a tensor."""
        tensors = _parameters(parameters, "step")
        same = len(tensors) == len(self._tensors) and all(map(operator.is_, tensors, self._tensors))
        if not same:
            self._check_step(tensors)
        # diffusers decides averaged-or-copied from requires_grad at every step: one tuple compare here, a new
        # pairing only when the pattern changed (a part frozen or unfrozen)
        requires_grad = tuple([t.requires_grad for t in tensors])
        decay = self.get_decay(self.optimization_step + 1)  # the counters move once the update is done
        if same and requires_grad == self._requires_grad:
            try:
                self.ema.update(momentum=1.0 - decay)  # checks before it writes: refused, it changes nothing
            except BaseException:
                self._check_step(tensors)  # a tensor's .data replaced by hand: said in diffusers' terms
                raise
        else:
            tracked = self._tracked
            saved = (
                tracked._parameters.copy(),
                tracked._buffers.copy(),
                self._tensors,
                self._requires_grad,
                self.ema._plan,
                self.ema._options,
            )
            try:
                if not same:
                    self._follow(tensors)
                if requires_grad != self._requires_grad:
                    self._select(requires_grad)
                self.ema.update(momentum=1.0 - decay)
            except BaseException:
                # back to the pairing of the last step (a plan is replaced only once built: the old one is whole)
                tracked._parameters.clear()
                tracked._parameters.update(saved[0])
                tracked._buffers.clear()
                tracked._buffers.update(saved[1])
                self._tensors, self._requires_grad, self.ema._plan, self.ema._options = saved[2:]
                raise
        self.optimization_step += 1
        self.cur_decay_value = decay

    def _check_step(self, tensors: list[Tensor]) -> None:
        """Refuse, in diffusers' terms, ``parameters`` that ``step`` could not pair with ``shadow_params``."""
        shadows = self.shadow_params
        _check_against("step()", tensors, shadows, "shadow_params")
        for i, (t, s) in enumerate(zip(tensors, shadows, strict=True)):
            if t is s:
                raise ValueError(
                    f"step(): parameters[{i}] is the EMA's own shadow_params[{i}]; step() takes the model's "
                    "parameters (model.parameters()); nothing was changed"
                )
            if averaged_kind(t) != averaged_kind(s):
                raise ValueError(
                    f"step(): parameters[{i}] is a {t.dtype} tensor but shadow_params[{i}] a {s.dtype} one (floating "
                    "point and integer tensors cannot pair); nothing was changed"
                )
            if isinstance(t, nn.Parameter) != isinstance(s, nn.Parameter):
                kinds = ("an nn.Parameter", "a plain tensor (not an nn.Parameter)")
                raise ValueError(
                    f"step(): parameters[{i}] is {kinds[not isinstance(t, nn.Parameter)]} but the EMA was built "
                    f"from {kinds[not isinstance(s, nn.Parameter)]} there; pass the same kind (model.parameters(), "
                    "not detached copies); nothing was changed"
                )
            if t.requires_grad and t.dtype in UNAVERAGEABLE:
                raise TypeError(
                    f"step(): parameters[{i}] requires grad (so diffusers averages it) but is {t.dtype}, which "
                    "torch has no arithmetic for; nothing was changed"
                )
            if t.device.type == "meta":
                raise ValueError(
                    f"step(): parameters[{i}] is on the meta device (no values to average yet); nothing was changed"
                )

    def _follow(self, tensors: list[Tensor]) -> None:
        """Other objects than last time (a model rebuilt, say): the EMA follows them from now on (checked by
        ``_check_step``: each of the kind of the one it replaces)."""
        for i, t in enumerate(tensors):
            if t is not self._tensors[i]:
                if isinstance(t, nn.Parameter):
                    self._tracked._parameters[str(i)] = t
                else:
                    self._tracked._buffers[str(i)] = t
        self._tensors = tensors

    def _select(self, requires_grad: tuple[bool, ...]) -> None:
        """Average the positions that require grad, copy the others (masters kept where they stay averaged; a
        newly averaged one starts from its shadow, as diffusers' does)."""
        # polyak.EMA decides its selection at construction; the adapter re-decides it (core: EMA._selected)
        self.ema._selected = _positions(requires_grad)
        self.ema.refresh()
        self._requires_grad = requires_grad

    @torch.no_grad()
    def copy_to(self, parameters: Iterable[nn.Parameter]) -> None:
        """Copy the averaged weights into ``parameters`` (checked first: as many as :attr:`shadow_params`, each of
        its shape; refused, nothing is written)."""
        tensors = _parameters(parameters, "copy_to")
        shadows = self.shadow_params
        _check_against("copy_to()", tensors, shadows, "shadow_params")
        for s, p in zip(shadows, tensors, strict=True):
            p.data.copy_(s.to(p.device))

    def store(self, parameters: Iterable[nn.Parameter]) -> None:
        """Keep a copy (on the CPU) of ``parameters``, for :meth:`restore` after an evaluation with the EMA."""
        tensors = _parameters(parameters, "store")
        for i, p in enumerate(tensors):
            if not isinstance(p, Tensor):
                raise TypeError(f"store(): parameters[{i}] must be a tensor, got {type(p).__name__}")
        self.temp_stored_params = [p.detach().cpu().clone() for p in tensors]

    @torch.no_grad()
    def restore(self, parameters: Iterable[nn.Parameter]) -> None:
        """Put back what :meth:`store` kept (checked first: as many as were stored, each of its shape; refused,
        nothing is written and the stored copy is kept)."""
        if self.temp_stored_params is None:
            raise RuntimeError("This ExponentialMovingAverage has no `store()`ed weights to `restore()`")
        tensors = _parameters(parameters, "restore")
        _check_against(
            "restore()",
            tensors,
            self.temp_stored_params,
            "temp_stored_params",
            "one for each parameter given to store()",
        )
        for c, p in zip(self.temp_stored_params, tensors, strict=True):
            p.data.copy_(c.data)
        self.temp_stored_params = None

    def to(self, device: Any = None, dtype: torch.dtype | None = None, non_blocking: bool = False) -> None:
        """Move the EMA (``to("cpu")`` keeps it off the GPU: each step then stages the GPU's values through
        pinned memory and updates it on the CPU) and/or convert its floating tensors (a float32 master keeps
        the average's precision under ``dtype=torch.bfloat16``)."""
        self.ema.ema_model.to(device=device, dtype=dtype, non_blocking=non_blocking)

    def pin_memory(self) -> None:
        """Put the EMA's CPU tensors in pinned memory (faster, non-blocking copies to and from a GPU)."""
        if not torch.cuda.is_available():
            return  # pinning needs an accelerator; without one it has nothing to speed up
        for t in self.shadow_params:
            if t.device.type == "cpu":
                t.data = t.data.pin_memory()

    # -- checkpoints ------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """diffusers' state dict (the configuration and ``shadow_params``, loadable by diffusers' EMAModel too),
        plus ``"polyak_master"``: the float32 masters where there are any, so that resuming is exact."""
        state: dict[str, Any] = {key: getattr(self, key) for key in _CONFIG_KEYS}
        state["shadow_params"] = self.shadow_params
        masters = self.ema.state_dict().get("master")
        if masters:
            state["polyak_master"] = [masters.get(str(i)) for i in range(len(state["shadow_params"]))]
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a state of this class or of diffusers' ``EMAModel``; checked before anything changes."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
        config = {key: state_dict.get(key, getattr(self, key)) for key in _CONFIG_KEYS}
        before = {key: getattr(self, key) for key in _CONFIG_KEYS}
        self._set_config(config)  # checks, then sets
        try:
            shadow = state_dict.get("shadow_params")
            if shadow is not None:
                self._load_shadow(shadow, state_dict.get("polyak_master"))
        except BaseException:
            self._set_config(before)
            raise

    def save_pretrained(self, path: str) -> None:
        """Save the averaged model as diffusers does: ``model_cls.from_config(model_config)`` with the EMA's
        weights and, in its config, the EMA's configuration; loadable by either class's ``from_pretrained``."""
        if self.model_cls is None:
            raise ValueError("`save_pretrained` can only be used if `model_cls` was defined at __init__.")
        if self.model_config is None:
            raise ValueError("`save_pretrained` can only be used if `model_config` was defined at __init__.")
        model = self.model_cls.from_config(self.model_config)
        model.register_to_config(**{key: getattr(self, key) for key in _CONFIG_KEYS})
        self.copy_to(model.parameters())
        model.save_pretrained(path)
        masters = self.ema.state_dict().get("master")
        if masters:  # the float32 average of bf16/fp16 weights, beside the model (which diffusers' loaders ignore)
            from safetensors.torch import save_file

            save_file({k: v.detach().cpu().contiguous() for k, v in masters.items()}, str(Path(path) / MASTER_FILE))

    @classmethod
    def from_pretrained(cls, path: str, model_cls: Any, foreach: bool = False) -> EMAModel:
        """Load what :meth:`save_pretrained` (of this class or of diffusers') wrote; with the float32 masters it
        saved beside the model, so that a bf16/fp16 run resumed from the folder continues exactly."""
        _, ema_kwargs = model_cls.from_config(path, return_unused_kwargs=True)
        model = model_cls.from_pretrained(path)
        ema = cls(model.parameters(), model_cls=model_cls, model_config=model.config, foreach=foreach)
        ema.load_state_dict(ema_kwargs)
        master_file = Path(path) / MASTER_FILE
        if master_file.is_file():
            from safetensors.torch import load_file

            saved = load_file(str(master_file))
            # where this EMA has masters (bf16 again) they take them; where it keeps the average in its own dtype
            # (diffusers' loaders give a float32 model) its shadows do: the float32 average, not its bf16 rounding
            has_master = set(ema.ema.state_dict().get("master", {}))
            values = [
                saved[str(i)].to(s.dtype) if str(i) in saved and str(i) not in has_master else s.detach().clone()
                for i, s in enumerate(ema.shadow_params)
            ]
            ema._load_shadow(values, [saved.get(str(i)) for i in range(len(values))])
        return ema

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(decay={self.decay}, optimization_step={self.optimization_step}, ema={self.ema!r})"
        )
