"""One optimiser over dense parameters (AdamW) and a row-sparse item table (SparseAdam).

With sampled softmax a step touches a few thousand rows of the item table, but a dense gradient and a dense
AdamW step cost O(catalogue) anyway: at 10^6 items that is most of the step. `optim.sparse_item_grad=true`
gives the table row-sparse gradients (every lookup through `F.embedding(..., sparse=True)`) and updates only
the touched rows with `torch.optim.SparseAdam` (lazy Adam: untouched rows keep their moments), so step
time stays flat in the catalogue size. Everything else keeps (fused) AdamW.

Lightning and the LR scheduler see a single `torch.optim.Optimizer`: its `param_groups` are the inner
optimisers' group dicts (a scheduler's lr changes reach both) and its `state` a view of both states.
"""

from __future__ import annotations

from collections.abc import MutableMapping

import torch


class _StateView(MutableMapping):
    """The two inner optimisers' per-parameter state as one mapping (each keeps its own for state_dict)."""

    def __init__(self, dense: dict, sparse: dict):
        self.dense, self.sparse = dense, sparse

    def _owner(self, key) -> dict:
        return self.sparse if key in self.sparse else self.dense

    def __getitem__(self, key):
        return self._owner(key)[key]

    def __setitem__(self, key, value) -> None:
        self._owner(key)[key] = value

    def __delitem__(self, key) -> None:
        del self._owner(key)[key]

    def __iter__(self):
        yield from self.dense
        yield from self.sparse

    def __len__(self) -> int:
        return len(self.dense) + len(self.sparse)


class DenseSparseAdam(torch.optim.Optimizer):
    def __init__(self, dense_groups: list[dict], sparse_params: list[torch.nn.Parameter], lr: float,
                 betas: tuple[float, float], eps: float = 1e-8, fused: bool | None = None):
        self.dense = torch.optim.AdamW(dense_groups, lr=lr, betas=betas, eps=eps, fused=fused)
        self.sparse = torch.optim.SparseAdam(sparse_params, lr=lr, betas=betas, eps=eps)
        super().__init__([{"params": [p for g in dense_groups for p in g["params"]] + list(sparse_params)}],
                         {"lr": lr})
        self._link()

    def _link(self) -> None:
        self.state = _StateView(self.dense.state, self.sparse.state)
        self.param_groups = self.dense.param_groups + self.sparse.param_groups

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.dense.step()
        self.sparse.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.dense.zero_grad(set_to_none)
        self.sparse.zero_grad(set_to_none)

    def state_dict(self) -> dict:
        return {"dense": self.dense.state_dict(), "sparse": self.sparse.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        if set(state_dict) != {"dense", "sparse"}:
            raise ValueError("this checkpoint's optimiser state was not saved with optim.sparse_item_grad=true; "
                             "resume with the setting it was trained with (or load weights only).")
        self.dense.load_state_dict(state_dict["dense"])
        self.sparse.load_state_dict(state_dict["sparse"])
        self._link()  # the inner optimisers replaced their group dicts and state


def sparse_grad_norm_clip_(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """`clip_grad_norm_` that also takes row-sparse gradients (coalesced values count once)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norms = [(g.coalesce()._values() if g.is_sparse else g).norm() for g in grads]
    total = torch.linalg.vector_norm(torch.stack(norms))
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale)
    return total
