"""The long/short-term model on data whose ground truth we know (training/data/synthetic.py)."""

from tests.helpers import load_script, tiny_config
from training.train import train

planted = load_script("planted")


def test_fused_model_beats_long_only_and_short_only_on_planted_data(tmp_path):
    """Users mix stable long-term groups with drifting sessions of 2-4 events (scripts/planted.py): the fused model
    beats each encoder alone, and it does so where the planted structure says it should: on targets that open a
    new session, where its gate (which sees the time since the last event) weighs the encoders differently than
    within a session. Without that time input the fused model does not beat long-only (`--no-elapsed`)."""
    rows = planted.compare(tmp_path, [*planted.planted_overrides(), "seed=42"])
    fused = rows["lsti"]
    assert 0.2 < fused["share at start"] < 0.5
    for ablation in ("lsti_long_only", "lsti_short_only"):
        other = rows[ablation]
        assert fused["all"] > other["all"], rows
        gain_at_start = fused["session start"] - other["session start"]
        assert gain_at_start > 0 and gain_at_start > fused["within session"] - other["within session"], rows
    assert abs(fused["gate at start"] - fused["gate within"]) > 0.1, rows


def test_decompose_reads_out_the_encoders_against_the_ground_truth(tmp_path):
    """`scripts/planted.py --decompose`: the target kinds follow the generator's truth, the fused readout ranks as
    the evaluation did (decompose checks that itself), and each state's group masses are shares of one softmax."""
    overrides = [*planted.planted_overrides(num_users=300), "trainer.max_epochs=1", "seed=3"]
    r = planted.decompose(tmp_path, overrides)
    truth = planted.target_truth(planted.compose_config(tmp_path / "t", ["model=lsti", *overrides]))
    assert len(r) == len(truth) and set(r["kind"]) <= {"within", "favourite", "drift kept", "drift fresh"}
    assert (r["kind"].eq("within").to_numpy() == ~truth.loc[r["user"], "opens"].to_numpy()).all()
    assert {"within", "favourite"} <= set(r["kind"])
    for state in ("fused", "long", "short"):
        for mass in ("last", "fav"):
            assert r[f"{mass}_{state}"].between(0, 1 + 1e-6).all()
        other_group = (truth.loc[r["user"], "drift_group"].to_numpy() >= 0) & (
            truth.loc[r["user"], "drift_group"].to_numpy() != truth.loc[r["user"], "last_group"].to_numpy())
        assert (r[f"last_{state}"] + r[f"drift_{state}"].where(other_group, 0.0) <= 1 + 1e-5).all()


def test_text_only_model_ranks_cold_items(tmp_path):
    """Held-out items are never trained on; text-only LSTI can still rank them, popularity cannot."""
    over = ["data.preprocess.cold_item_fraction=0.2", "trainer.max_epochs=3"]
    text, _ = train(tiny_config(tmp_path / "text", "lsti_text_only", over))
    pop, _ = train(tiny_config(tmp_path / "pop", "pop", over))
    assert text["test/items_unseen/count"] > 0
    assert pop["test/items_unseen/hr@10"] == 0.0
    assert text["test/items_unseen/hr@10"] > 0.0
