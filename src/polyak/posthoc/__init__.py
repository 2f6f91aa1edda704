"""Post-hoc EMA (Karras et al., EDM2, arXiv 2312.02696): choose the EMA length after training.

During training, :class:`PostHocEMA` tracks a few power-function EMAs (EDM2's defaults: ``sigma_rel`` 0.05
and 0.10) and every ``snapshot_every`` updates writes one snapshot of each into a folder. After training,
:func:`synthesize` rebuilds the power-function EMA of *any* ``sigma_rel`` in (0, 1/sqrt(12)), at any snapshot
time, as the least-squares combination of the snapshots' averaging profiles::

    A_ij = <p_i, p_j>,  b_i = <p_i, p_r>,  A x = b (float64, least squares),  x <- x / sum(x)
    weights = sum_i x_i * weights_i

where ``p`` is the profile of a power-function EMA at time ``t``, ``(gamma + 1) tau**gamma / t**(gamma + 1)``
on ``(0, t]``. Normalising ``x`` makes a constant model come out exactly.

Snapshots are `safetensors <https://github.com/huggingface/safetensors>`_ files, never pickles: reading a
snapshot folder cannot run code. Each file holds one profile at one time ``t`` (the update count), named
``ema-{sigma_rel:.4f}-{t:010d}.safetensors`` so that names sort by profile, then time; its metadata holds the
format marker (``format="polyak.posthoc"``, ``format_version="1"``), ``t``, ``gamma``, ``sigma_rel`` and,
for each tensor, the model's dtype and whether it is averaged. The averaged tensors are written from the
accumulator (the float32 master of a float16 or bfloat16 model), widened to float32 where narrower; buffers
and integer tensors are written as they are, and :func:`synthesize` copies them from the latest snapshot.

A write is atomic: the file is written under a temporary name that does not end in ``.safetensors`` (a
hidden ``.ema-....safetensors.tmp-PID`` in the same folder), flushed to disk, renamed over the final name,
and the folder is flushed too. A crash mid-write leaves every earlier snapshot intact and no half-written
file that looks like a snapshot (a stale ``*.tmp-*`` file may remain; delete it at will).

A snapshot folder belongs to one run, and one object writes into it at a time (an exclusive lock on the
folder, taken at the first write and dropped by :meth:`PostHocEMA.close`, garbage collection or the end of
the process); a run resumed from an earlier checkpoint moves the abandoned timeline's later snapshots aside
(see :meth:`PostHocEMA.load_state_dict`).

The command line, ``python -m polyak posthoc``, is :func:`posthoc_main` (see :func:`add_posthoc_arguments`).
"""

from polyak.posthoc._cli import CLI_DESCRIPTION, add_posthoc_arguments, posthoc_command, posthoc_main
from polyak.posthoc._files import FORMAT, FORMAT_VERSION, Snapshot, list_snapshots, save_synthesized, snapshot_name
from polyak.posthoc._ignite import PostHocEMAHandler
from polyak.posthoc._lock import FolderInUse
from polyak.posthoc._math import profile_inner_product, solve_weights
from polyak.posthoc._synthesis import synthesize
from polyak.posthoc._tracking import PostHocEMA

__all__ = [
    "CLI_DESCRIPTION",
    "FORMAT",
    "FORMAT_VERSION",
    "FolderInUse",
    "PostHocEMA",
    "PostHocEMAHandler",
    "Snapshot",
    "add_posthoc_arguments",
    "list_snapshots",
    "posthoc_command",
    "posthoc_main",
    "profile_inner_product",
    "save_synthesized",
    "snapshot_name",
    "solve_weights",
    "synthesize",
]
