"""optim.sparse_item_grad: row-sparse item-table gradients with a lazy Adam (training/optim.py)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import tiny_config
from training.optim import DenseSparseAdam, sparse_grad_norm_clip_
from training.train import train


def _pair(seed: int = 0):
    torch.manual_seed(seed)
    table = torch.nn.Parameter(torch.randn(50, 8))
    lin = torch.nn.Parameter(torch.randn(8, 8))
    return table, lin


def _loss(table, lin, ids, sparse):
    return (F.embedding(ids, table, sparse=sparse) @ lin).square().mean()


def test_first_step_equals_adamw_and_untouched_rows_stay():
    ids = torch.tensor([3, 7, 7, 11])
    t1, l1 = _pair()
    t2, l2 = _pair()
    dense = torch.optim.AdamW([t1, l1], lr=0.1, weight_decay=0.0)
    mixed = DenseSparseAdam([{"params": [l2], "weight_decay": 0.0}], [t2], lr=0.1, betas=(0.9, 0.999))
    _loss(t1, l1, ids, False).backward()
    _loss(t2, l2, ids, True).backward()
    assert t2.grad.is_sparse
    dense.step()
    mixed.step()
    torch.testing.assert_close(t2, t1)
    torch.testing.assert_close(l2, l1)
    untouched = torch.ones(50, dtype=torch.bool)
    untouched[ids] = False
    assert torch.equal(t2.detach()[untouched], _pair()[0].detach()[untouched])


def test_state_dict_round_trip_continues_identically():
    ids = torch.tensor([1, 2, 30])
    t1, l1 = _pair()
    a = DenseSparseAdam([{"params": [l1]}], [t1], lr=0.05, betas=(0.9, 0.999))
    for _ in range(2):
        a.zero_grad()
        _loss(t1, l1, ids, True).backward()
        a.step()
    t2, l2 = (torch.nn.Parameter(p.detach().clone()) for p in (t1, l1))
    b = DenseSparseAdam([{"params": [l2]}], [t2], lr=0.05, betas=(0.9, 0.999))
    b.load_state_dict(copy.deepcopy(a.state_dict()))  # as a checkpoint file would (no shared tensors)
    assert len(b.state) == 2 and t2 in b.state and l2 in b.state
    for opt, t, lin in ((a, t1, l1), (b, t2, l2)):
        opt.zero_grad()
        _loss(t, lin, ids, True).backward()
        opt.step()
    torch.testing.assert_close(t2, t1)
    with pytest.raises(ValueError, match="sparse_item_grad"):
        b.load_state_dict(torch.optim.AdamW([l2]).state_dict())


def test_scheduler_lr_reaches_both_inner_optimisers():
    t, lin = _pair()
    opt = DenseSparseAdam([{"params": [lin]}], [t], lr=1.0, betas=(0.9, 0.999))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** step)
    opt.step()
    sched.step()
    assert opt.dense.param_groups[0]["lr"] == opt.sparse.param_groups[0]["lr"] == 0.5


def test_norm_clipping_counts_sparse_rows():
    t, lin = _pair()
    _loss(t, lin, torch.tensor([4, 4, 9]), True).backward()
    dense_norm = torch.linalg.vector_norm(torch.stack([t.grad.to_dense().norm(), lin.grad.norm()]))
    total = sparse_grad_norm_clip_([t, lin], 1e-3)
    torch.testing.assert_close(total, dense_norm)
    clipped = torch.linalg.vector_norm(torch.stack([t.grad.to_dense().norm(), lin.grad.norm()]))
    assert clipped <= 1e-3 * 1.0001


def test_training_with_sparse_item_grad_runs_and_learns(tmp_path):
    over = ["loss.name=sampled", "loss.num_negatives=16", "optim.sparse_item_grad=true", "trainer.max_epochs=3"]
    results, _ = train(tiny_config(tmp_path / "s", "sasrec", over))
    assert json.loads((tmp_path / "s" / "metrics.json").read_text())["test/ndcg@10"] == results["test/ndcg@10"]
    assert results["test/ndcg@10"] > 0


@pytest.mark.parametrize("over,match", [(["loss.name=ce"], "loss.name=sampled"),
                                        (["loss.name=sampled", "model=lsti"], "plain embedding")])
def test_sparse_item_grad_refuses_what_cannot_work(tmp_path, over, match):
    model = "lsti" if "model=lsti" in over else "sasrec"
    over = [o for o in over if not o.startswith("model=")] + ["optim.sparse_item_grad=true"]
    with pytest.raises(ValueError, match=match):
        train(tiny_config(tmp_path, model, over))
