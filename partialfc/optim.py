"""Optimizers for very wide classification heads.

:class:`SparseSGD` is SGD with momentum and weight decay that, for parameters
whose gradient is a row-sparse COO tensor, updates only the rows that carry a
gradient.

When to use which
-----------------
*Dense* ``torch.optim.SGD``: momentum and weight decay touch every element on
every step, so a class-centre row that was not sampled this step still moves
(its momentum keeps pushing it, weight decay keeps shrinking it), and each step
costs O(num_classes x embedding_size) no matter how few rows were used.

``SparseSGD`` with sparse gradients: only the sampled rows move; the value and
the momentum of every other row stay bit-identical. This is the update of the
Partial FC paper (only the sampled class centres are updated), and a step costs
O(sampled rows x embedding_size), which is what makes heads with 10M+ classes
practical. Parameters with ordinary dense gradients get exactly the
``torch.optim.SGD`` update, so a single ``SparseSGD`` can drive a whole model.

Momentum buffer initialisation (sparse path)
--------------------------------------------
``torch.optim.SGD`` sets ``buf = g`` the first time a parameter is stepped and
``buf = momentum * buf + (1 - dampening) * g`` afterwards. ``SparseSGD`` applies
that rule *per row*: it keeps a boolean ``row_initialized`` vector next to the
momentum buffer, so a row's buffer is set to its gradient the first time the
row is present and follows the momentum recurrence afterwards. On a step where
every row is present this is exactly ``torch.optim.SGD``, including the very
first step and including ``dampening != 0``.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["SparseSGD"]

_BUF = "momentum_buffer"
_ROWS = "row_initialized"


class SparseSGD(Optimizer):
    """SGD (momentum, weight decay, Nesterov, dampening) with lazy row-sparse updates.

    For a parameter whose ``.grad`` is a sparse COO tensor in the
    ``nn.Embedding(sparse=True)`` layout (one sparse dimension indexing rows of
    dim 0, dense row values; duplicates allowed and summed), each present row
    ``r`` is updated as::

        g      = grad_r + weight_decay * p_r
        buf_r  = g                                        # first time row r is present
        buf_r  = momentum * buf_r + (1 - dampening) * g   # afterwards
        update = g + momentum * buf_r if nesterov else buf_r   (g if momentum == 0)
        p_r   -= lr * update

    Rows absent from the gradient are not read or written. Dense gradients get
    the plain ``torch.optim.SGD`` update.

    Args:
        params: iterable of parameters or of param-group dicts.
        lr: learning rate (read from ``param_groups`` at every step, so
            ``torch.optim.lr_scheduler`` schedulers work).
        momentum: momentum factor (0 disables the buffer).
        weight_decay: L2 penalty added to the gradient (lazily, present rows only,
            for sparse gradients).
        nesterov: use Nesterov momentum (needs ``momentum > 0`` and ``dampening == 0``).
        dampening: dampening for momentum.
    """

    def __init__(
        self,
        params: Any,
        lr: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        dampening: float = 0.0,
    ) -> None:
        if lr < 0.0:
            raise ValueError(f"SparseSGD: invalid learning rate {lr!r}, must be >= 0")
        if momentum < 0.0:
            raise ValueError(f"SparseSGD: invalid momentum {momentum!r}, must be >= 0")
        if weight_decay < 0.0:
            raise ValueError(
                f"SparseSGD: invalid weight_decay {weight_decay!r}, must be >= 0"
            )
        if nesterov and (momentum <= 0.0 or dampening != 0.0):
            raise ValueError(
                "SparseSGD: nesterov=True requires momentum > 0 and dampening == 0 "
                f"(got momentum={momentum!r}, dampening={dampening!r})"
            )
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            nesterov=nesterov,
            dampening=dampening,
        )
        super().__init__(params, defaults)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load optimizer state; restores the boolean dtype of ``row_initialized``.

        ``Optimizer.load_state_dict`` casts every state tensor of a floating-point
        parameter to the parameter's dtype, which would turn the row mask into
        floats; it is cast back here.
        """
        super().load_state_dict(state_dict)
        for state in self.state.values():
            rows = state.get(_ROWS)
            if isinstance(rows, Tensor) and rows.dtype != torch.bool:
                state[_ROWS] = rows.bool()

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """Perform one optimisation step.

        Args:
            closure: optional callable that re-evaluates the model and returns
                the loss; it is run with gradients enabled.

        Returns:
            The closure's return value, or ``None``.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    self._sparse_step(p, p.grad, group)
                else:
                    self._dense_step(p, p.grad, group)
        return loss

    def _dense_step(self, p: Tensor, grad: Tensor, group: dict[str, Any]) -> None:
        """``torch.optim.SGD`` update for a dense gradient."""
        lr, momentum = group["lr"], group["momentum"]
        wd, dampening = group["weight_decay"], group["dampening"]
        if wd != 0:
            grad = grad.add(p, alpha=wd)
        if momentum != 0:
            state = self.state[p]
            buf = state.get(_BUF)
            if buf is None:
                buf = torch.clone(grad).detach()
                state[_BUF] = buf
            else:
                buf.mul_(momentum).add_(grad, alpha=1 - dampening)
                rows = state.get(_ROWS)
                if rows is not None:
                    # Rows never touched by an earlier sparse step start as `g`.
                    fresh = ~rows
                    if bool(fresh.any()):
                        shape = (-1,) + (1,) * (p.dim() - 1)
                        buf.copy_(torch.where(fresh.view(shape), grad, buf))
                    state.pop(_ROWS)
            if group["nesterov"]:
                grad = grad.add(buf, alpha=momentum)
            else:
                grad = buf
        p.add_(grad, alpha=-lr)

    def _sparse_step(self, p: Tensor, grad: Tensor, group: dict[str, Any]) -> None:
        """Lazy update of the rows present in a row-sparse COO gradient."""
        if grad.sparse_dim() != 1 or p.dim() < 1:
            raise ValueError(
                "SparseSGD: sparse gradients must index rows of dim 0 only "
                "(sparse_dim == 1, as produced by nn.Embedding(sparse=True)); "
                f"got sparse_dim={grad.sparse_dim()} for a parameter of shape "
                f"{tuple(p.shape)}"
            )
        grad = grad.coalesce()  # sums duplicate rows
        idx = grad.indices()[0]
        if idx.numel() == 0:
            return
        g = grad.values()
        lr, momentum = group["lr"], group["momentum"]
        wd, dampening = group["weight_decay"], group["dampening"]

        p_rows = p.index_select(0, idx)
        if wd != 0:
            g = g.add(p_rows, alpha=wd)
        if momentum != 0:
            state = self.state[p]
            buf = state.get(_BUF)
            if buf is None:
                # Allocated once; afterwards only present rows are read/written.
                buf = torch.zeros_like(p, memory_format=torch.preserve_format)
                state[_BUF] = buf
                state[_ROWS] = torch.zeros(p.shape[0], dtype=torch.bool, device=p.device)
            rows = state.get(_ROWS)
            buf_rows = buf.index_select(0, idx)
            buf_rows.mul_(momentum).add_(g, alpha=1 - dampening)
            if rows is not None:
                seen = rows.index_select(0, idx)
                shape = (-1,) + (1,) * (p.dim() - 1)
                buf_rows = torch.where(seen.view(shape), buf_rows, g)
                rows.index_fill_(0, idx, True)
            buf.index_copy_(0, idx, buf_rows)
            if group["nesterov"]:
                g = g.add(buf_rows, alpha=momentum)
            else:
                g = buf_rows
        p.index_copy_(0, idx, p_rows.add(g, alpha=-lr))
