from tests.helpers import tiny_config
from training.bench import HEADER, append_to_doc, markdown_row, run_bench


def test_bench_reports_every_quantity(tmp_path):
    cfg = tiny_config(tmp_path, "sasrec", ["+bench.steps=3", "+bench.warmup=1", "+bench.eval=true", "+bench.bf16=false",
                                           "+bench.item_chunk_size=16", "+bench.write_doc=false"])
    r = run_bench(cfg)
    for key in ("step_ms", "data_wait_share", "seq_per_s", "items_per_s", "epoch_s", "flops_per_step", "mfu",
                "eval_users_per_s", "peak_rss_gb"):
        assert r[key] > 0 or key == "data_wait_share", key
    assert 0 <= r["data_wait_share"] < 1 and r["eval_queries"] == 60
    doc = tmp_path / "benchmarks.md"
    append_to_doc(markdown_row(r, "python -m training.bench"), doc)
    append_to_doc(markdown_row(r, "again"), doc)
    text = doc.read_text()
    assert text.count(HEADER.splitlines()[0]) == 1 and "`again`" in text
