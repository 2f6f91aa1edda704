"""``PostHocEMAHandler``: :class:`~polyak.posthoc.PostHocEMA` on an ignite ``Engine`` (ignite imported on use)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from polyak.posthoc._tracking import PostHocEMA

if TYPE_CHECKING:
    from ignite.engine import CallableEventWithFilter, Engine, Events, EventsList
    from ignite.engine.events import RemovableEventHandle


class PostHocEMAHandler:
    """:class:`PostHocEMA` on an ignite ``Engine``'s events (ignite is imported only by :meth:`attach`).

    Takes the arguments of :class:`PostHocEMA`. Put the handler in ``Checkpoint(to_save=...)`` to resume:
    its :meth:`state_dict` is the :class:`PostHocEMA`'s.

    Attributes:
        posthoc: the :class:`PostHocEMA` underneath.

    Example:
        >>> import tempfile
        >>> import torch
        >>> from torch import nn
        >>> from ignite.engine import Engine
        >>> from polyak.posthoc import PostHocEMAHandler
        >>> model = nn.Linear(2, 1)
        >>> trainer = Engine(lambda engine, batch: None)
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     handler = PostHocEMAHandler(model, snapshot_every=4, directory=folder)
        ...     handle = handler.attach(trainer)
        ...     _ = trainer.run(range(10), max_epochs=1)
        ...     len(list(handler.posthoc.directory.glob("*.safetensors"))), handler.posthoc.num_updates
        (4, 10)
    """

    def __init__(
        self,
        model: nn.Module,
        sigma_rels: Sequence[float] = (0.05, 0.10),
        snapshot_every: int = 1000,
        directory: str | os.PathLike[str] = "posthoc_ema",
        *,
        handle_buffers: str = "copy",
        dtype: torch.dtype | None = None,
        skip_nonfinite: bool = False,
        device: torch.device | str | None = None,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        predicate: Callable[[str, torch.Tensor], bool] | None = None,
        trainable_only: bool = False,
    ) -> None:
        self.posthoc = PostHocEMA(
            model,
            sigma_rels,
            snapshot_every,
            directory,
            handle_buffers=handle_buffers,
            dtype=dtype,
            skip_nonfinite=skip_nonfinite,
            device=device,
            include=include,
            exclude=exclude,
            predicate=predicate,
            trainable_only=trainable_only,
        )

    @property
    def ema_models(self) -> list[nn.Module]:
        """The averaged model of each profile."""
        return self.posthoc.ema_models

    def attach(
        self,
        engine: Engine,
        event: str | Events | CallableEventWithFilter | EventsList | None = None,
    ) -> RemovableEventHandle:
        """Update (and snapshot) on ``event`` of ``engine``, ``Events.ITERATION_COMPLETED`` by default.

        Returns:
            The removable handle of the registered handler; ``handle.remove()`` detaches it.
        """
        from ignite.engine import Engine, Events

        if not isinstance(engine, Engine):
            raise TypeError(f"engine must be an ignite Engine, got {type(engine).__name__}")
        return engine.add_event_handler(Events.ITERATION_COMPLETED if event is None else event, self._update)

    def _update(self, engine: Engine) -> None:
        self.posthoc.update()

    def state_dict(self) -> dict[str, Any]:
        """The :meth:`PostHocEMA.state_dict`."""
        return self.posthoc.state_dict()

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict`."""
        self.posthoc.load_state_dict(state_dict)

    def close(self) -> None:
        """Give the snapshot folder back (:meth:`PostHocEMA.close`)."""
        self.posthoc.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.posthoc!r})"
