"""Item-text embeddings: model paths, templates, pooling (encoder and decoder LMs), the disk cache."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from training import text as T
from training.data.errors import DataWarning
from training.text import TextEncoder, TextModelError


@pytest.fixture(scope="module")
def minilm() -> TextEncoder:
    return TextEncoder(None, pooling="mean", max_length=64, device="cpu")


@pytest.fixture(scope="module")
def tiny_decoder(tmp_path_factory) -> str:
    """A 2-layer random Llama plus a word-level tokenizer without a pad token, saved like a hub model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaModel, PreTrainedTokenizerFast

    words = "action movie thriller film cooking recipe a the of and comedy drama".split()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>")
    assert tokenizer.pad_token is None
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer.save_pretrained(folder)
    LlamaModel(config).save_pretrained(folder)
    return str(folder)


def _items() -> pd.DataFrame:
    return pd.DataFrame({
        "item": ["10", "11", "12"],
        "movie_title": ["Toy Story", "GoldenEye", np.nan],
        "release_year": [1995.0, np.nan, 1996.0],
        "class": ["Animation Comedy", "Action Thriller", "Drama"],
    })


# ----------------------------------------------------------------------------- paths
def test_default_path_resolves_to_local_folder():
    path = T.resolve_model_path(None)
    assert path == T.resolve_model_path("default") == T.resolve_model_path(T.default_model_path())
    assert (Path(path) / "config.json").is_file()


def test_missing_path_names_the_path(tmp_path):
    bad = tmp_path / "no-such-model"
    with pytest.raises(TextModelError, match="no-such-model") as e:
        T.resolve_model_path(bad)
    assert "config.json" in str(e.value) and "downloads are disabled" in str(e.value)
    with pytest.raises(TextModelError, match="sentence-transformers/all-MiniLM"):
        T.resolve_model_path("sentence-transformers/all-MiniLM-L6-v2")  # hub ids are not fetched


def test_dir_without_config_is_refused(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(TextModelError, match="no config.json") as e:
        T.resolve_model_path(tmp_path)
    assert str(tmp_path) in str(e.value)


def test_load_failure_is_wrapped_with_the_path(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(TextModelError, match="could not load") as e:
        TextEncoder(tmp_path, device="cpu")
    assert str(tmp_path) in str(e.value)


def test_bad_settings_are_refused():
    with pytest.raises(TextModelError, match="pooling"):
        TextEncoder(None, pooling="max")
    with pytest.raises(TextModelError, match="dtype"):
        T.resolve_dtype("int8", torch.device("cpu"))
    assert T.resolve_dtype(None, torch.device("cpu")) == torch.float32


# ----------------------------------------------------------------------------- templates
def test_render_item_texts_aligns_with_item_ids():
    ids = ["<pad>", "11", "10", "12", "99"]
    with pytest.warns(DataWarning, match="1 of 4 items have no row"):
        texts = T.render_item_texts(_items(), "{movie_title} ({release_year}). Genres: {class}", ids)
    assert texts == ["", "GoldenEye (). Genres: Action Thriller", "Toy Story (1995). Genres: Animation Comedy",
                     " (1996). Genres: Drama", "item 99"]


def test_render_without_item_table_uses_raw_ids():
    with pytest.warns(DataWarning, match="2 of 2"):
        assert T.render_item_texts(None, "{movie_title}", ["<pad>", "a", "b"]) == ["", "item a", "item b"]


def test_template_with_bad_field_names_field_and_columns():
    with pytest.raises(TextModelError, match="genre") as e:
        T.render_item_texts(_items(), "{movie_title}: {genre}", ["<pad>", "10"])
    assert "movie_title" in str(e.value) and "release_year" in str(e.value)
    with pytest.raises(TextModelError, match="positional"):
        T.render_item_texts(_items(), "{} {0}", ["<pad>", "10"])


# ----------------------------------------------------------------------------- encoding (MiniLM)
def test_encode_shape_dtype_and_determinism(minilm):
    texts = ["Toy Story (1995)", "GoldenEye (1995). Genres: Action Adventure Thriller", "Heat"]
    a = minilm.encode(texts, progress=False)
    b = minilm.encode(texts, progress=False)
    assert a.shape == (3, 384) and a.dtype == torch.float32 and a.device.type == "cpu"
    assert minilm.dim == 384
    assert torch.equal(a, b)
    assert minilm.encode([], progress=False).shape == (0, 384)


def test_order_is_restored_and_padding_does_not_matter(minilm):
    texts = ["a", "a much longer movie title with many many words in it (1999)", "medium title here", ""]
    batched = minilm.encode(texts, batch_size=4, progress=False)
    single = torch.cat([minilm.encode([t], progress=False) for t in texts])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-4)
    rev = minilm.encode(texts[::-1], batch_size=3, progress=False)
    torch.testing.assert_close(rev, batched.flip(0), atol=1e-5, rtol=1e-4)


def test_mean_and_cls_pooling_differ(minilm, monkeypatch):
    texts = ["Toy Story (1995)", "Heat (1995)"]
    mean = minilm.encode(texts, progress=False)
    monkeypatch.setattr(minilm, "pooling", "cls")
    cls = minilm.encode(texts, progress=False)
    assert cls.shape == mean.shape and not torch.allclose(cls, mean, atol=1e-3)


def test_normalize_gives_unit_vectors(minilm, monkeypatch):
    monkeypatch.setattr(minilm, "normalize", True)
    out = minilm.encode(["Toy Story", "Heat"], progress=False)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(2))


def test_semantic_sanity(minilm):
    a, b, c = minilm.encode(["action movie", "thriller film", "cooking recipe"], progress=False)
    assert F.cosine_similarity(a, b, dim=0) > F.cosine_similarity(a, c, dim=0) + 0.1


def test_forward_has_gradients(minilm):
    batch = minilm.tokenize(["Toy Story", "Heat (1995)"])
    assert set(batch) == {"input_ids", "attention_mask"} and batch["input_ids"].shape[0] == 2
    minilm.model.zero_grad()
    out = minilm(**batch)
    assert out.shape == (2, 384) and out.requires_grad
    out.pow(2).sum().backward()
    grads = [p.grad for p in minilm.model.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    minilm.model.zero_grad()


# ----------------------------------------------------------------------------- last-token pooling (decoder LM)
def test_pool_last_and_cls_under_left_and_right_padding(minilm, monkeypatch):
    hidden = torch.arange(2 * 4, dtype=torch.float32).reshape(2, 4, 1)  # value = flat token index
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]])
    monkeypatch.setattr(minilm, "pooling", "last")
    assert minilm.pool(hidden, right).flatten().tolist() == [2.0, 7.0]
    assert minilm.pool(hidden, left).flatten().tolist() == [3.0, 7.0]
    monkeypatch.setattr(minilm, "pooling", "cls")
    assert minilm.pool(hidden, right).flatten().tolist() == [0.0, 4.0]
    assert minilm.pool(hidden, left).flatten().tolist() == [1.0, 6.0]
    monkeypatch.setattr(minilm, "pooling", "mean")
    assert minilm.pool(hidden, left).flatten().tolist() == [2.0, 6.5]


@pytest.mark.parametrize("side", ["left", "right"])
def test_decoder_last_token_pooling_offline(tiny_decoder, side):
    enc = TextEncoder(tiny_decoder, pooling="last", max_length=16, device="cpu", padding_side=side)
    assert enc.tokenizer.pad_token is not None and enc.padding_side == side and enc.dim == 32
    texts = ["action movie thriller film", "a", "the comedy of drama"]
    batch = enc.tokenize(texts)
    mask = batch["attention_mask"]
    assert mask.shape[1] == 4 and mask.sum(1).tolist() == [4, 1, 4]
    assert (mask[1, 0] == (1 if side == "right" else 0)).item()
    # Pooled vector == the model's hidden state at each text's last real token, and == the text alone.
    with torch.inference_mode():
        pos = (mask.cumsum(-1) - 1).clamp(min=0) if side == "left" else None
        hidden = enc.model(**batch, position_ids=pos).last_hidden_state
        last = [3, 0, 3] if side == "right" else [3, 3, 3]
        expected = hidden[torch.arange(3), torch.tensor(last)]
    batched = enc.encode(texts, batch_size=3, progress=False)
    torch.testing.assert_close(batched, expected)
    alone = torch.cat([enc.encode([t], progress=False) for t in texts])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-4)


def test_decoder_left_and_right_padding_agree(tiny_decoder):
    texts = ["action movie", "a", "the comedy of drama film"]
    left = TextEncoder(tiny_decoder, pooling="last", device="cpu", padding_side="left").encode(texts, progress=False)
    right = TextEncoder(tiny_decoder, pooling="last", device="cpu", padding_side="right").encode(texts, progress=False)
    torch.testing.assert_close(left, right, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- cached item table
def _counting_loader(monkeypatch) -> list[str]:
    calls: list[str] = []
    real = T.load_text_model

    def loader(path, *args, **kwargs):
        calls.append(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(T, "load_text_model", loader)
    return calls


def test_item_text_embeddings_cache(tmp_path, monkeypatch):
    calls = _counting_loader(monkeypatch)
    ids = ["<pad>", "10", "11", "12"]
    template = "{movie_title} ({release_year}). Genres: {class}"
    first = T.item_text_embeddings(_items(), ids, template, cache_dir=tmp_path, progress=False)
    assert first.shape == (4, 384) and torch.equal(first[0], torch.zeros(384)) and first[1:].abs().sum() > 0
    assert len(calls) == 1
    sidecars = list(tmp_path.glob("*.json"))
    assert len(sidecars) == 1 and len(list(tmp_path.glob("*.pt"))) == 1
    meta = json.loads(sidecars[0].read_text())
    assert meta["template"] == template and meta["pooling"] == "mean" and meta["rows"] == 4 and meta["dim"] == 384
    assert not list(tmp_path.glob("*.tmp"))

    def refuse(*args, **kwargs):
        raise AssertionError("the model must not be loaded on a cache hit")

    monkeypatch.setattr(T, "load_text_model", refuse)
    again = T.item_text_embeddings(_items(), ids, template, cache_dir=tmp_path, progress=False)
    assert torch.equal(first, again)

    with pytest.raises(AssertionError, match="cache hit"):  # a new template is a new key -> model needed
        T.item_text_embeddings(_items(), ids, "{movie_title}", cache_dir=tmp_path, progress=False)


def test_cache_key_covers_settings():
    path = T.resolve_model_path(None)
    texts = ["", "Toy Story"]
    base = T.embedding_cache_key(path, "mean", 64, False, "{t}", texts)[0]
    variants = [
        T.embedding_cache_key(path, "cls", 64, False, "{t}", texts)[0],
        T.embedding_cache_key(path, "mean", 32, False, "{t}", texts)[0],
        T.embedding_cache_key(path, "mean", 64, True, "{t}", texts)[0],
        T.embedding_cache_key(path, "mean", 64, False, "{t} ", texts)[0],
        T.embedding_cache_key(path, "mean", 64, False, "{t}", ["", "Toy Story 2"])[0],
    ]
    assert base == T.embedding_cache_key(path, "mean", 64, False, "{t}", list(texts))[0]
    assert len({base, *variants}) == 6


def test_default_cache_dir_honours_env(tmp_path, monkeypatch):
    monkeypatch.setenv("LSTI_CACHE_DIR", str(tmp_path / "c"))
    ids = ["<pad>", "10", "11"]
    T.item_text_embeddings(_items(), ids, "{class}", progress=False)
    assert len(list((tmp_path / "c" / "embeddings").glob("*.pt"))) == 1


@pytest.mark.slow
def test_throughput_movielens_like_titles(minilm):
    rng = np.random.default_rng(0)
    words = ("Story Night Love Man Return Dead Star Last Day Life City Girl King Dark War Blue House "
             "Wild Time Lost Heart Secret Road Game").split()
    genres = "Action Adventure Animation Children's Comedy Crime Drama Horror Romance Thriller".split()
    titles = [f"{' '.join(rng.choice(words, rng.integers(1, 5)))} ({rng.integers(1930, 1999)}). Genres: "
              f"{' '.join(rng.choice(genres, rng.integers(1, 4), replace=False))}" for _ in range(1682)]
    start = time.perf_counter()
    out = minilm.encode(titles, batch_size=64, progress=False)
    seconds = time.perf_counter() - start
    print(f"\nMiniLM CPU: {len(titles)} titles in {seconds:.2f} s = {len(titles) / seconds:.0f} titles/s "
          f"({torch.get_num_threads()} threads)")
    assert out.shape == (1682, 384)
