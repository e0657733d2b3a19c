"""scripts/popularity_prior.py: a popularity prior added to a trained model's scores, chosen on validation."""

import numpy as np
import pytest

from tests.helpers import load_script, tiny_config
from training.train import train


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("prior") / "sasrec" / "seed1"
    results, _ = train(tiny_config(run, "sasrec"))
    return run, results


def test_prior_of_zero_reproduces_the_run_and_a_large_one_ranks_by_popularity(run_dir):
    pp = load_script("popularity_prior")
    run, results = run_dir
    out = pp.run_scores(run, [0.0, 1000.0])
    assert set(out["valid"]) == {0.0, 1000.0} and out["chosen"] in out["valid"]
    plain = out["test"][0.0]
    assert pp.ndcg(plain["rank"]).mean() == pytest.approx(results["test/ndcg@10"], abs=1e-6)
    if out["chosen"] == 1000.0:
        by_popularity = out["test"][1000.0]
    else:  # validation preferred no prior: score the test split with the large one anyway
        by_popularity = pp.run_scores(run, [1000.0])["test"][1000.0]
    counts = out["item_counts"]
    target_counts = counts[by_popularity["target"]]
    above = (counts[None, 1:] > target_counts[:, None]).sum(1)  # row 0 is the padding
    level = (counts[None, 1:] >= target_counts[:, None]).sum(1) - 1
    # the prior dominates: a target is ranked below every more popular item and above every less popular one
    assert ((by_popularity["rank"] >= above) & (by_popularity["rank"] <= level)).all()


def test_summary_splits_short_histories_and_their_head_targets():
    pp = load_script("popularity_prior")
    test = {"rank": np.array([0, 20, 1, 0]), "history": np.array([3, 3, 30, 30]),
            "target": np.array([1, 2, 3, 4]), "head": np.array([True, False, True, True])}
    better = {**test, "rank": np.array([0, 0, 1, 0])}
    s = pp.summary({"chosen": 0.3, "test": {0.0: test, 0.3: better}}, bound=3)
    assert s["none_short"] == pytest.approx(0.5) and s["prior_short"] == pytest.approx(1.0)
    assert s["none_short_head"] == s["prior_short_head"] == pytest.approx(1.0)
    assert s["none_short_tail"] == 0.0 and s["prior_short_tail"] == pytest.approx(1.0)
    assert s["none_all"] == pytest.approx((2 + 1 / np.log2(3)) / 4)
