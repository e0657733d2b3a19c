"""LSTI with text_mode=lora: the language model is fine-tuned end to end with PEFT LoRA (issue 3)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import tiny_config
from training.data.sequences import DataInfo
from training.losses import candidate_softmax_loss
from training.models.lsti import LSTIConfig

# MiniLM (the bundled default LM), 16 tokens per item, a few optimisation steps
LORA = ["model.text.max_length=16", "model.lora_negatives=16", "model.lora_r=4", "trainer.max_epochs=1",
        "data.batch_size=16", "+trainer.limit_train_batches=3"]


def test_lora_trains_end_to_end_and_checkpoint_reloads(tmp_path, monkeypatch):
    import training.train as train_mod
    from training.checkpoints import load_module
    from training.module import LitRecommender

    built = []  # the module train() builds, to compare with its reloaded checkpoint
    monkeypatch.setattr(train_mod, "LitRecommender", lambda **kw: built.append(LitRecommender(**kw)) or built[-1])
    results, value = train_mod.train(tiny_config(tmp_path, "lsti_lora", LORA))
    assert 0.0 <= results["test/ndcg@10"] <= 1.0 and value == results["val/ndcg@10"]

    lit = built[0]  # holds the best checkpoint's weights (validate/test loaded it)
    model = lit.model
    assert model.trains_on_candidates and not hasattr(model, "item_text")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    lora = [n for n in trainable if n.startswith("text_encoder.")]
    assert lora and all("lora_" in n for n in lora)  # inside the LM only LoRA trains
    assert len(lora) == 6 * 2 * 2  # MiniLM: 6 layers x (query, value) x (A, B)
    assert any(n.startswith("adapter.") for n in trainable) and any(n.startswith("item_emb") for n in trainable)
    assert all(float(p.detach().abs().sum()) > 0 for n, p in model.named_parameters() if "lora_B" in n)  # B starts at 0

    best = tmp_path / "checkpoints" / "best.ckpt"
    state = torch.load(best, map_location="cpu", weights_only=False)["state_dict"]
    lm_keys = [k for k in state if ".text_encoder." in k]
    assert lm_keys and all("lora_" in k for k in lm_keys)  # frozen base LM weights are not in the checkpoint
    assert state["model.item_input_ids"].shape == (51, 16)

    again = load_module(best)
    base = {n: p for n, p in model.text_encoder.model.named_parameters() if "lora_" not in n}
    reloaded = dict(again.model.text_encoder.model.named_parameters())
    for n, p in base.items():  # the reloaded base comes from disk: training left the base LM untouched
        assert torch.equal(p, reloaded[n]), n
    again.load_state_dict(lit.state_dict(), strict=True)  # how Lightning resumes: the base LM may be absent
    lit.eval(), again.eval()
    with torch.no_grad():
        table = model.item_table()
        torch.testing.assert_close(again.model.item_table(), table, rtol=0, atol=0)
        ids = torch.tensor([0, 3, 7, 50])
        torch.testing.assert_close(model.candidate_table(ids), table[ids], rtol=1e-5, atol=1e-6)
        items = torch.tensor([[0, 0, 4, 9, 2], [5, 6, 7, 8, 1]])
        times = torch.arange(10).reshape(2, 5) * 100
        users = torch.tensor([0, 1])
        scores = model.score(model(items, times, users)[:, -1])
        torch.testing.assert_close(again.model.score(again.model(items, times, users)[:, -1]), scores,
                                   rtol=0, atol=0)


def test_frozen_mode_never_builds_or_runs_the_encoder():
    cfg = LSTIConfig(hidden=8, inner=16, short_len=2, layers=1)
    assert cfg.needs_text and not cfg.needs_item_texts
    info = DataInfo(num_items=12, num_users=3, max_len=5, item_counts=torch.arange(13), item_text=torch.randn(13, 6),
                    text_dim=6)
    model = cfg.build(info)
    assert not model.trains_on_candidates and not hasattr(model, "text_encoder")
    assert "item_text" in model.state_dict()
    # candidate_table works on the cached embeddings too and agrees with the full table
    model.eval()
    ids = torch.tensor([1, 5, 12])
    torch.testing.assert_close(model.candidate_table(ids), model.item_table()[ids])
    with pytest.raises(ValueError, match="uses no text"):
        LSTIConfig(fusion="id", text_mode="lora")
    with pytest.raises(ValueError, match="text_mode"):
        LSTIConfig(text_mode="full")


def test_candidate_softmax_over_every_item_is_full_cross_entropy():
    g = torch.Generator().manual_seed(0)
    table = torch.randn(9, 4, generator=g)
    states, targets = torch.randn(5, 4, generator=g), torch.tensor([1, 8, 3, 3, 5])
    full = torch.nn.functional.cross_entropy(states @ table[1:].T / 0.5, targets - 1)
    candidates = torch.arange(1, 9)
    torch.testing.assert_close(candidate_softmax_loss(states, targets, candidates, table[candidates], 0.5), full)
    # a smaller set: the target's logit against the other candidates only
    cand = torch.tensor([2, 3, 5, 8])
    sub = candidate_softmax_loss(states[1:], targets[1:], cand, table[cand])
    logits = states[1:] @ table[cand].T
    torch.testing.assert_close(sub, torch.nn.functional.cross_entropy(logits, torch.tensor([3, 1, 1, 2])))
