"""Items with no training interaction in the fused (id+text) LSTI: ranked from their text alone, and ID dropout."""

import pytest
import torch

from training.data.sequences import DataInfo
from training.models.lsti import LSTIConfig
from training.module import LitRecommender

N = 30
COLD = torch.tensor([4, 9, 17, 28])


def _info(train_items: torch.Tensor | None = None) -> DataInfo:
    g = torch.Generator().manual_seed(0)
    counts = torch.randint(1, 9, (N + 1,), generator=g)
    counts[0] = 0
    counts[COLD] = 0
    return DataInfo(num_items=N, num_users=5, max_len=8, item_counts=counts,
                    item_text=torch.randn(N + 1, 12, generator=g), text_dim=12, train_items=train_items)


def _trained_mask() -> torch.Tensor:
    mask = torch.ones(N + 1, dtype=torch.bool)
    mask[0] = False
    mask[COLD] = False
    return mask


@pytest.mark.parametrize("combine", ["gate", "sum"])
def test_untrained_items_are_represented_by_text_alone(combine):
    torch.manual_seed(0)
    model = LSTIConfig(hidden=16, heads=2, inner=32, combine=combine).build(_info(_trained_mask())).eval()
    before = model.item_table().detach().clone()
    with torch.no_grad():
        model.item_emb.weight.add_(torch.randn_like(model.item_emb.weight))
    after = model.item_table().detach()
    cold = torch.zeros(N + 1, dtype=torch.bool)
    cold[COLD] = True
    assert torch.equal(after[cold], before[cold])  # the (random) ID vector of a cold item plays no part
    warm = _trained_mask()
    assert not torch.allclose(after[warm], before[warm])
    # the same representation through the per-candidate path (LoRA-style training and serving)
    ids = torch.arange(1, N + 1)
    assert torch.allclose(model.candidate_table(ids), after[1:], atol=1e-6)


def test_id_dropout_zeroes_a_share_of_trained_ids_in_training_only():
    torch.manual_seed(0)
    model = LSTIConfig(hidden=16, heads=2, inner=32, id_dropout=0.3).build(_info(_trained_mask()))
    n = 4000
    ids = torch.randint(1, N + 1, (n,))
    model.train()
    dropped = model._id_vectors(ids).abs().sum(-1) == 0
    trained = _trained_mask()[ids]
    assert dropped[~trained].all()  # never-trained items: always text alone
    share = dropped[trained].float().mean().item()
    assert abs(share - 0.3) < 0.03
    table_a, table_b = model.item_table(), model.item_table()
    assert not torch.equal(table_a, table_b)  # a fresh draw per step
    model.eval()
    assert torch.equal(model.item_table(), model.item_table())
    assert not (model._id_vectors(ids)[trained].abs().sum(-1) == 0).any()


def test_id_dropout_trains_end_to_end():
    torch.manual_seed(0)
    model = LSTIConfig(hidden=16, heads=2, inner=32, id_dropout=0.5).build(_info(_trained_mask())).train()
    items = torch.randint(1, N + 1, (4, 8))
    times = torch.cumsum(torch.randint(1, 100, (4, 8)), 1)
    table = model.item_table()
    states = model(items, times, torch.arange(4), item_table=table)
    loss = torch.nn.functional.cross_entropy(states[:, -1] @ table.T, items[:, 0])
    loss.backward()
    grad = model.item_emb.weight.grad
    assert grad[COLD].abs().sum() == 0  # no gradient reaches a vector that is never used
    assert model.adapter.parameters().__next__().grad is not None


@pytest.mark.parametrize("kwargs, match", [
    ({"id_dropout": 1.0}, r"model.id_dropout=1.0 must be in \[0, 1\)"),
    ({"id_dropout": -0.1}, r"model.id_dropout=-0.1"),
    ({"id_dropout": 0.2, "fusion": "text"}, r"only fusion=id\+text has"),
    ({"id_dropout": 0.2, "fusion": "id"}, r"only fusion=id\+text has"),
])
def test_bad_id_dropout_is_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LSTIConfig(**kwargs)


def test_wrong_size_train_items_is_named():
    with pytest.raises(ValueError, match="train_items has 5 entries for 31"):
        LSTIConfig(hidden=16).build(_info(torch.ones(5, dtype=torch.bool)))


def test_module_passes_the_training_catalogue_and_checkpoints_keep_it():
    info = _info()
    tensors = {"item_counts": info.item_counts, "item_text": info.item_text, "train_items": info.item_counts > 0}
    kwargs = dict(model={"_target_": "training.models.lsti.LSTIConfig", "hidden": 16, "heads": 2, "inner": 32},
                  info={"num_items": N, "num_users": 5, "max_len": 8, "text_dim": 12})
    module = LitRecommender(item_tensors=tensors, **kwargs)
    assert torch.equal(module.model.id_trained, _trained_mask())
    state = module.state_dict()
    rebuilt = LitRecommender(**kwargs)  # as a checkpoint reload builds it: no training data at hand
    assert rebuilt.model.id_trained.all()
    rebuilt.load_state_dict(state)
    assert torch.equal(rebuilt.model.id_trained, _trained_mask())
    # a checkpoint from before the buffer existed loads, with every item counted as trained (its old behaviour)
    old = {k: v for k, v in state.items() if not k.endswith("id_trained")}
    legacy = LitRecommender(**kwargs)
    legacy.load_state_dict(old)
    assert legacy.model.id_trained.all()


def test_other_fusions_have_no_trained_mask():
    assert not hasattr(LSTIConfig(hidden=16, fusion="text").build(_info(_trained_mask())), "id_trained")
    assert not hasattr(LSTIConfig(hidden=16, fusion="id").build(_info(_trained_mask())), "id_trained")
