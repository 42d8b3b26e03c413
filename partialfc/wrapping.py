"""Keep data-parallel wrappers away from the head's rows.

A :class:`~partialfc.PartialFC` head holds *different* rows on every rank. A wrapper that treats
every parameter of the model it wraps as replicated corrupts them:

- ``DistributedDataParallel`` broadcasts rank 0's parameters at construction (every rank then holds
  rank 0's classes, or the shape check crashes when the shards differ in size) and averages the
  gradients of different classes' rows every step;
- FSDP2's ``fully_shard`` re-shards the rows as if they were one replicated matrix.

DDP reads the fully qualified names to skip from the wrapped module's
``_ddp_params_and_buffers_to_ignore``. This module keeps that list right without a call from the
user: a global module-registration hook (installed when ``partialfc`` is imported) runs whenever a
module is assigned as a child of another. When the child is a head, or has heads below it, the
parent's ignore list becomes a :class:`HeadStateNames`, which lists the names the user put there and
then, each time DDP reads it, the parameter and buffer names of the heads below. Models are built
bottom-up (a child is constructed before it is assigned), so every ancestor of a head carries it,
whichever module is finally wrapped — the model, Lightning's wrapper around it, or a module two
levels up — and a head replaced or removed later is never listed stale.

Trees built top-down (an empty container attached first and the head put into it later) miss the
update; for those, and for an ignore list a user overwrote, the head's first forward under DDP
raises a clear error that names :func:`ignore_heads_for_ddp`. FSDP2 is handled by the head itself:
assigning a DTensor to its weight raises an error naming ``fully_shard(..., ignored_params=...)``.
"""
from __future__ import annotations

from torch import nn

_DDP_IGNORE = "_ddp_params_and_buffers_to_ignore"


def _is_head(module: nn.Module) -> bool:
    from .head import PartialFC
    return isinstance(module, PartialFC)


def head_state_names(model: nn.Module) -> list[str]:
    """Fully qualified names of every parameter and buffer of every head inside ``model``."""
    names = []
    for prefix, module in model.named_modules():
        if _is_head(module):
            own = [n for n, _ in module.named_parameters()] + [n for n, _ in module.named_buffers()]
            names += [f"{prefix}.{n}" if prefix else n for n in own]
    return names


def head_parameters(model: nn.Module) -> set[nn.Parameter]:
    """The parameters of every head inside ``model`` (for ``fully_shard(ignored_params=...)``)."""
    return {p for m in model.modules() if _is_head(m) for p in m.parameters()}


class HeadStateNames:
    """A module's DDP ignore list that is always current: the names a user listed, then the heads'
    parameter and buffer names found below the module *when DDP reads it* (a replaced or removed
    head is never listed stale). Iterable like the list DDP expects."""

    def __init__(self, owner: nn.Module, extra=()):
        self.owner, self.extra = owner, list(extra)

    def __iter__(self):
        seen = set(self.extra)
        yield from self.extra
        yield from (n for n in head_state_names(self.owner) if n not in seen)

    def __len__(self):
        return len(list(iter(self)))

    def __contains__(self, name):
        return name in set(iter(self))

    def __repr__(self):
        return f"HeadStateNames({list(self)})"


def _install(module: nn.Module) -> None:
    current = module.__dict__.get(_DDP_IGNORE)
    if not isinstance(current, HeadStateNames):
        module.__dict__[_DDP_IGNORE] = HeadStateNames(module, current or ())


def ignore_heads_for_ddp(model: nn.Module) -> nn.Module:
    """Make DDP skip every head's parameters and buffers inside ``model``; returns ``model``.

    Needed only for a model whose heads were attached after their container joined the tree
    (the head's first forward under DDP says so); idempotent, keeps names already listed.
    """
    _install(model)
    return model


def _on_module_registration(parent: nn.Module, name: str, child):
    """Global registration hook: a parent of a head, or of a module with heads below, gets the live list."""
    if isinstance(child, nn.Module) and (_is_head(child) or isinstance(child.__dict__.get(_DDP_IGNORE), HeadStateNames)):
        _install(parent)
    return None


_HOOK = nn.modules.module.register_module_module_registration_hook(_on_module_registration)


def check_not_replicated_by_ddp(head: nn.Module) -> None:
    """Raise if the head runs inside a DDP forward whose reducer manages its weight."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    get_active = getattr(DDP, "_get_active_ddp_module", None)
    ddp = get_active() if get_active is not None else None
    if ddp is None or head.__dict__.get("_ddp_checked") == id(ddp):
        return
    for name, param in ddp.module.named_parameters():
        if param is head.weight and name not in ddp.parameters_to_ignore:
            raise RuntimeError(
                f"PartialFC: the head's sharded weight '{name}' is managed by DistributedDataParallel, "
                "which broadcast rank 0's rows to every rank and would average different classes' "
                "gradients. This happens when a head is attached after its container joined the model "
                "(or the model's DDP ignore list was overwritten). Call "
                "partialfc.ignore_heads_for_ddp(model) before wrapping the model in DDP.")
    head.__dict__["_ddp_checked"] = id(ddp)
