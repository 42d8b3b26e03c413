"""Collective traffic of one step, recorded with torch's own ``CommDebugMode``.

``torch.distributed.tensor.debug.CommDebugMode`` is a TorchDispatchMode that counts the c10d ops
the torch.distributed functions dispatch to. On gloo/CPU (torch 2.13) it sees every collective
the heads make: ``dist.all_reduce`` (``c10d.allreduce_``), ``all_gather_single`` /
``all_gather_into_tensor`` (``c10d._allgather_base_``), ``reduce_scatter_single`` /
``reduce_scatter_tensor`` (``c10d._reduce_scatter_base_``), list ``all_gather``
(``c10d.allgather_``) and ``broadcast``; it does not count ``dist.barrier``. It counts calls
only, so :class:`CommCounter` also reads the payload sizes from the arguments of the same ops.
"""
from __future__ import annotations

import torch
from torch.distributed.tensor.debug import CommDebugMode

_c10d = torch.ops.c10d
_KINDS = {_c10d.allreduce_: "all_reduce", _c10d._allgather_base_: "all_gather", _c10d.allgather_: "all_gather",
          _c10d._reduce_scatter_base_: "reduce_scatter", _c10d.reduce_scatter_: "reduce_scatter"}


def _bytes(x) -> int:
    """Bytes of a tensor or of a (nested) list of tensors."""
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_bytes(t) for t in x)
    return 0


class CommCounter(CommDebugMode):
    """CommDebugMode that also keeps ``(kind, input bytes, output bytes)`` per collective call.

    ``get_total_counts()`` is CommDebugMode's count of every collective; ``calls`` holds the
    all-reduce / all-gather / reduce-scatter calls the byte model covers, in call order.
    """

    def __init__(self, world_size: int):
        super().__init__()
        self.world = world_size
        self.calls: list[tuple[str, int, int]] = []

    def __enter__(self):
        self.calls = []
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kind = _KINDS.get(getattr(func, "_overloadpacket", None))
        if kind == "all_reduce":  # (tensors, ...)
            self.calls.append((kind, _bytes(args[0]), _bytes(args[0])))
        elif kind is not None:  # (output, input, ...)
            self.calls.append((kind, _bytes(args[1]), _bytes(args[0])))
        return super().__torch_dispatch__(func, types, args, kwargs)

    def sent_bytes(self) -> int:
        """Bytes one rank sends under ring algorithms: all-gather (W-1)*in,
        reduce-scatter (W-1)*out, all-reduce 2(W-1)/W*n."""
        w, total = self.world, 0.0
        for kind, nin, nout in self.calls:
            if kind == "all_gather":
                total += (w - 1) * nin
            elif kind == "reduce_scatter":
                total += (w - 1) * nout
            else:
                total += 2 * (w - 1) / w * nin
        return int(round(total))

    def detail(self) -> str:
        """``kind:payload`` of every call (the output for reduce-scatter, else the input)."""
        return " ".join(f"{kind}:{nin if kind != 'reduce_scatter' else nout}" for kind, nin, nout in self.calls)
