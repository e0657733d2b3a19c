"""Readers: atomic/CSV/TSV/Parquet round trips and every validation error and warning."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from training.data.errors import DataError, DataWarning
from training.data.readers import read_atomic, read_items_table, read_table
from training.data.synthetic import generate, write_atomic

INTER_HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float"


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def make_atomic(
    directory: Path,
    inter: list[str] | None = None,
    item: list[str] | None = None,
    name: str = "toy",
    header: str = INTER_HEADER,
) -> Path:
    rows = (
        inter
        if inter is not None
        else ["u1\ti1\t4\t100", "u1\ti2\t3\t200", "u2\ti1\t5\t150", "u2\ti3\t1\t90"]
    )
    write(directory / f"{name}.inter", [header, *rows])
    if item is not None:
        write(directory / f"{name}.item", ["item_id:token\ttitle:token_seq\tyear:float", *item])
    return directory


ITEMS = ["i1\tThe First\t1990", "i2\tSecond Film\t1991", "i3\tThird One\t"]


# ------------------------------------------------------------------------------------ round trips
def test_atomic_all_files(tmp_path):
    make_atomic(tmp_path, item=ITEMS)
    write(tmp_path / "toy.user", ["user_id:token\tage:float\tgender:token", "u1\t24\tM", "u2\t53\tF"])
    write(tmp_path / "toy.kg", ["head_id:token\trelation_id:token\ttail_id:token", "m.1\tfilm.actor\tm.2"])
    write(tmp_path / "toy.link", ["item_id:token\tentity_id:token", "i1\tm.1"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        data = read_atomic(tmp_path, "toy")
    inter = data.interactions
    assert list(inter.columns) == ["user", "item", "time", "rating"]
    assert inter["time"].dtype == np.int64 and inter["rating"].dtype == np.float64
    assert inter["user"].tolist() == ["u1", "u1", "u2", "u2"]
    assert inter["item"].tolist() == ["i1", "i2", "i1", "i3"]
    assert inter["time"].tolist() == [100, 200, 150, 90]
    assert inter["rating"].tolist() == [4.0, 3.0, 5.0, 1.0]
    assert list(data.items.columns) == ["item", "title", "year"]
    assert data.items["title"].tolist() == ["The First", "Second Film", "Third One"]
    assert data.items["year"].dtype == np.float64 and np.isnan(data.items["year"].iloc[2])
    assert list(data.users.columns) == ["user", "age", "gender"] and data.users["age"].tolist() == [
        24.0,
        53.0,
    ]
    assert list(data.kg.columns) == ["head_id", "relation_id", "tail_id"]
    assert list(data.link.columns) == ["item", "entity_id"]


def test_atomic_optional_files_absent_and_no_rating(tmp_path):
    write(
        tmp_path / "x.inter",
        ["user_id:token\titem_id:token\ttimestamp:float", "a\tb\t881250949.0", "a\tc\t7.9"],
    )
    data = read_atomic(tmp_path, "x")
    assert data.items is None and data.users is None and data.kg is None and data.link is None
    assert list(data.interactions.columns) == ["user", "item", "time"]
    assert data.interactions["time"].tolist() == [881250949, 7]  # floats are floored to int64


def test_atomic_custom_columns(tmp_path):
    write(tmp_path / "c.inter", ["uid:token\tiid:token\tts:token\tscore:float", "1\t10\t5\t2.5"])
    frame = read_atomic(
        tmp_path, "c", columns={"user": "uid", "item": "iid", "time": "ts", "rating": "score"}
    ).interactions
    assert frame.iloc[0].tolist() == ["1", "10", 5, 2.5]


def test_atomic_rating_can_be_disabled(tmp_path):
    make_atomic(tmp_path)
    assert "rating" not in read_atomic(tmp_path, "toy", columns={"rating": None}).interactions.columns


def test_synthetic_round_trip(tmp_path):
    data = generate(50, 40, num_groups=5, mean_length=8, seed=3)
    write_atomic(data, tmp_path, "syn")
    back = read_atomic(tmp_path, "syn")
    pd.testing.assert_frame_equal(back.interactions, data.interactions, check_dtype=False)
    assert back.items["item"].tolist() == data.items["item"].tolist()
    assert back.items["title"].tolist() == data.items["title"].tolist()
    assert back.items["group"].astype(int).tolist() == data.items["group"].tolist()


def test_blank_lines_keep_line_numbers(tmp_path):
    write(tmp_path / "b.inter", [INTER_HEADER, "u1\ti1\t4\t100", "", "u2\ti2\t5\t200", "", "u3\ti3\t3\tsoon"])
    with pytest.raises(DataError, match=r"line 6: timestamp 'soon'"):
        read_atomic(tmp_path, "b")
    write(tmp_path / "c.inter", [INTER_HEADER, "u1\ti1\t4\t100", "", "u2\ti2\t5\t200"])
    assert len(read_atomic(tmp_path, "c").interactions) == 2


def test_csv_with_mapping(tmp_path):
    path = tmp_path / "log.csv"
    pd.DataFrame(
        {
            "uid": [1, 2, 2],
            "sku": ["a", "b", "c"],
            "ts": [30, 10, 20],
            "stars": [1.5, 2, 3],
            "extra": ["x", "y", "z"],
        }
    ).to_csv(path, index=False)
    frame = read_table(path, {"user": "uid", "item": "sku", "time": "ts", "rating": "stars"})
    assert list(frame.columns) == ["user", "item", "time", "rating"]
    assert frame["user"].tolist() == ["1", "2", "2"] and frame["time"].tolist() == [30, 10, 20]
    assert frame["time"].dtype == np.int64 and frame["rating"].tolist() == [1.5, 2.0, 3.0]


@pytest.mark.parametrize("suffix", [".tsv", ".txt"])
def test_tsv(tmp_path, suffix):
    path = write(tmp_path / f"log{suffix}", ["u\ti\tt", "a\tx, y\t5", "b\ty\t6"])
    frame = read_table(path, {"user": "u", "item": "i", "time": "t"})
    assert frame["item"].tolist() == ["x, y", "y"] and "rating" not in frame.columns


def test_sep_override_and_unknown_suffix(tmp_path):
    path = write(tmp_path / "log.dat", ["u|i|t", "a|x|5"])
    with pytest.raises(DataError, match=r"log\.dat: unknown table format '\.dat'.*sep"):
        read_table(path, {"user": "u", "item": "i", "time": "t"})
    assert read_table(path, {"user": "u", "item": "i", "time": "t"}, sep="|")["item"].tolist() == ["x"]


def test_parquet_with_datetimes_and_int_ids(tmp_path):
    path = tmp_path / "log.parquet"
    pd.DataFrame(
        {
            "user": [7, 8],
            "item": [1.0, 2.0],
            "when": pd.to_datetime(["2024-01-01 00:00:01", "2024-01-02 00:00:00"]),
        }
    ).to_parquet(path)
    frame = read_table(path, {"user": "user", "item": "item", "time": "when"})
    assert frame["user"].tolist() == ["7", "8"] and frame["item"].tolist() == ["1", "2"]
    assert frame["time"].tolist() == [1704067201, 1704153600]


def test_pq_suffix_and_tz_aware(tmp_path):
    path = tmp_path / "log.pq"
    when = pd.to_datetime(["2024-01-01 01:00:00", "2024-01-01 01:00:00"]).tz_localize("Europe/Berlin")
    pd.DataFrame({"u": ["a", "b"], "i": ["x", "y"], "t": when}).to_parquet(path)
    assert read_table(path, {"user": "u", "item": "i", "time": "t"})["time"].tolist() == [1704067200] * 2


def test_datetime_strings(tmp_path):
    path = write(
        tmp_path / "log.csv",
        ["u,i,t", "a,x,2024-01-01 00:00:00", "a,y,2024-01-01 00:01:00", "b,x,2024-01-01T02:00:00+02:00"],
    )
    frame = read_table(path, {"user": "u", "item": "i", "time": "t"}, time_format="ISO8601")
    assert frame["time"].tolist() == [1704067200, 1704067260, 1704067200]


def test_datetime_strings_with_format(tmp_path):
    path = write(tmp_path / "log.csv", ["u,i,t", "a,x,02/01/2024 10:30", "a,y,03/01/2024 10:30"])
    frame = read_table(path, {"user": "u", "item": "i", "time": "t"}, time_format="%d/%m/%Y %H:%M")
    assert frame["time"].tolist() == [1704191400, 1704277800]
    inferred = write(tmp_path / "d.csv", ["u,i,t", "a,x,2024-01-02", "a,y,2024-01-03"])
    assert read_table(inferred, {"user": "u", "item": "i", "time": "t"})["time"].tolist() == [
        1704153600,
        1704240000,
    ]


def test_integer_dates_with_format(tmp_path):
    path = tmp_path / "log.parquet"
    pd.DataFrame({"u": ["a"], "i": ["x"], "t": [20240102]}).to_parquet(path)
    assert read_table(path, {"user": "u", "item": "i", "time": "t"}, time_format="%Y%m%d")[
        "time"
    ].tolist() == [1704153600]


def test_items_table_csv_quoted_and_parquet(tmp_path):
    path = tmp_path / "items.csv"
    path.write_text('sku,title,price\na,"Red, big\nshoe",3.5\nb,Blue,4\n', encoding="utf-8")
    frame = read_items_table(path, "sku")
    assert frame.columns.tolist() == ["item", "title", "price"]
    assert frame["item"].tolist() == ["a", "b"] and frame["title"].tolist() == ["Red, big\nshoe", "Blue"]
    pq_path = tmp_path / "items.parquet"
    pd.DataFrame({"sku": [1, 2], "title": ["t1", "t2"]}).to_parquet(pq_path)
    assert read_items_table(pq_path, "sku")["item"].tolist() == ["1", "2"]


# ------------------------------------------------------------------------------------- errors
def test_missing_inter_lists_directory(tmp_path):
    make_atomic(tmp_path, name="other")
    with pytest.raises(DataError) as info:
        read_atomic(tmp_path, "toy")
    message = str(info.value)
    assert (
        str(tmp_path / "toy.inter") in message and "other.inter" in message and "data.source.name" in message
    )


def test_missing_directory(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_atomic(tmp_path / "nope", "toy")


def test_missing_table_file(tmp_path):
    (tmp_path / "real.csv").write_text("u,i,t\n")
    with pytest.raises(DataError, match=r"log\.csv: the table does not exist.*real\.csv"):
        read_table(tmp_path / "log.csv", {"user": "u", "item": "i", "time": "t"})


def test_missing_column_in_inter(tmp_path):
    make_atomic(tmp_path, header="user_id:token\titem_id:token\trating:float\tstamp:float")
    with pytest.raises(DataError) as info:
        read_atomic(tmp_path, "toy")
    message = str(info.value)
    assert "toy.inter" in message and "'timestamp'" in message and "columns.time" in message
    assert "'user_id', 'item_id', 'rating', 'stamp'" in message


def test_mapping_to_absent_column(tmp_path):
    path = write(tmp_path / "log.csv", ["uid,sku,ts", "a,x,1"])
    with pytest.raises(DataError) as info:
        read_table(path, {"user": "uid", "item": "skus", "time": "ts"})
    message = str(info.value)
    assert "log.csv" in message and "'skus'" in message and "data.source.columns.item" in message
    assert "did you mean 'sku'" in message and "'uid', 'sku', 'ts'" in message
    with pytest.raises(DataError, match=r"'stars' \(data\.source\.columns\.rating\) does not exist"):
        read_table(path, {"user": "uid", "item": "sku", "time": "ts", "rating": "stars"})
    with pytest.raises(DataError, match=r"'score' \(columns\.rating\) does not exist"):
        read_atomic(make_atomic(tmp_path), "toy", columns={"rating": "score"})


def test_mapping_keys(tmp_path):
    path = write(tmp_path / "log.csv", ["u,i,t", "a,x,1"])
    with pytest.raises(DataError, match=r"log\.csv: the column mapping lacks 'time'"):
        read_table(path, {"user": "u", "item": "i"})
    with pytest.raises(DataError, match=r"unknown key\(s\) \['usr'\]"):
        read_table(path, {"usr": "u", "user": "u", "item": "i", "time": "t"})


def test_atomic_required_roles(tmp_path):
    with pytest.raises(DataError, match=r"columns\.time is empty"):
        read_atomic(make_atomic(tmp_path), "toy", columns={"time": None})


def test_duplicated_header(tmp_path):
    make_atomic(tmp_path, header="user_id:token\titem_id:token\tuser_id:token\ttimestamp:float")
    with pytest.raises(
        DataError, match=r"toy\.inter: line 1 \(header\) names column 'user_id' twice \(fields 1 and 3\)"
    ):
        read_atomic(tmp_path, "toy")
    path = write(tmp_path / "log.csv", ["u,i,t,u", "a,x,1,b"])
    with pytest.raises(DataError, match=r"log\.csv: line 1 \(header\) names column 'u' twice"):
        read_table(path, {"user": "u", "item": "i", "time": "t"})


@pytest.mark.parametrize(
    "header, expect",
    [
        ("user_id\titem_id:token\ttimestamp:float", r"field 1 'user_id' is not of the form name:type"),
        ("user_id:token\titem_id:tokn\ttimestamp:float", r"field 2 'item_id:tokn'"),
        ("user_id:token\t:token\ttimestamp:float", r"field 2 ':token'"),
        ("user_id:token,item_id:token,timestamp:float", r"TAB-separated"),
    ],
)
def test_malformed_header(tmp_path, header, expect):
    make_atomic(tmp_path, header=header, inter=["a\tb\t1"])
    with pytest.raises(DataError, match=r"toy\.inter: line 1 \(header\).*" + expect):
        read_atomic(tmp_path, "toy")


def test_unparsable_numeric_timestamp(tmp_path):
    make_atomic(tmp_path, inter=["u1\ti1\t4\t100", "u1\ti2\t3\t200", "u2\ti1\t5\t12:30", "u2\ti3\t1\tnever"])
    with pytest.raises(DataError) as info:
        read_atomic(tmp_path, "toy")
    message = str(info.value)
    assert (
        "toy.inter" in message
        and "'timestamp' (time)" in message
        and "line 4" in message
        and "'12:30'" in message
    )


def test_unparsable_datetime(tmp_path):
    path = write(tmp_path / "log.csv", ["u,i,t", "a,x,2024-01-01 10:00:00", "a,y,2024-13-45 99:00:00"])
    with pytest.raises(DataError) as info:
        read_table(path, {"user": "u", "item": "i", "time": "t"}, time_format="%Y-%m-%d %H:%M:%S")
    message = str(info.value)
    assert "log.csv" in message and "'t' (time)" in message and "line 3" in message
    assert "'2024-13-45 99:00:00'" in message and "time_format" in message


def test_empty_timestamp(tmp_path):
    make_atomic(tmp_path, inter=["u1\ti1\t4\t100", "u1\ti2\t3\t"])
    with pytest.raises(DataError, match=r"toy\.inter: column 'timestamp' \(time\), line 3: empty timestamp"):
        read_atomic(tmp_path, "toy")


@pytest.mark.parametrize(
    "row, role, column",
    [
        ("\ti1\t4\t100", "user", "user_id"),
        ("u1\t\t4\t100", "item", "item_id"),
        ("u1\tnan\t4\t100", "item", "item_id"),
    ],
)
def test_empty_ids(tmp_path, row, role, column):
    make_atomic(tmp_path, inter=["u1\ti1\t4\t100", "u2\ti2\t4\t100", row])
    with pytest.raises(DataError) as info:
        read_atomic(tmp_path, "toy")
    message = str(info.value)
    assert (
        f"toy.inter: column '{column}' ({role}), line 4: missing {role} id" in message
        and "1 row(s)" in message
    )


def test_null_id_in_parquet_names_row(tmp_path):
    path = tmp_path / "log.parquet"
    pd.DataFrame({"u": ["a", None, None], "i": ["x", "y", "z"], "t": [1, 2, 3]}).to_parquet(path)
    with pytest.raises(DataError, match=r"log\.parquet: column 'u' \(user\), row 2: missing user id.*2 row"):
        read_table(path, {"user": "u", "item": "i", "time": "t"})


def test_nan_id_in_csv(tmp_path):
    path = write(tmp_path / "log.csv", ["u,i,t", "a,x,1", "b,,2"])
    with pytest.raises(DataError, match=r"log\.csv: column 'i' \(item\), line 3: missing item id \(empty\)"):
        read_table(path, {"user": "u", "item": "i", "time": "t"})


def test_non_numeric_rating(tmp_path):
    make_atomic(tmp_path, inter=["u1\ti1\t4\t100", "u1\ti2\tgood\t200"])
    with pytest.raises(DataError) as info:
        read_atomic(tmp_path, "toy")
    message = str(info.value)
    assert "toy.inter: column 'rating' (rating), line 3: rating 'good' is not a number" in message
    assert "columns.rating=null" in message


def test_empty_rating_is_nan(tmp_path):
    make_atomic(tmp_path, inter=["u1\ti1\t4\t100", "u1\ti2\t\t200"])
    assert np.isnan(read_atomic(tmp_path, "toy").interactions["rating"].iloc[1])


def test_non_numeric_float_field(tmp_path):
    make_atomic(tmp_path, item=["i1\tA\t1990", "i2\tB\tninety"])
    with pytest.raises(
        DataError, match=r"toy\.item: column 'year' \(float field\), line 3: float field 'ninety'"
    ):
        read_atomic(tmp_path, "toy")


def test_empty_files(tmp_path):
    (tmp_path / "toy.inter").write_bytes(b"")
    with pytest.raises(DataError, match=r"toy\.inter: the file is empty"):
        read_atomic(tmp_path, "toy")
    write(tmp_path / "toy.inter", [INTER_HEADER])
    with pytest.raises(DataError, match=r"toy\.inter: has a header but no interaction rows"):
        read_atomic(tmp_path, "toy")
    path = tmp_path / "log.csv"
    path.write_text("")
    with pytest.raises(DataError, match=r"log\.csv: the file is empty"):
        read_table(path, {"user": "u", "item": "i", "time": "t"})
    path.write_text("u,i,t\n")
    with pytest.raises(DataError, match=r"log\.csv: has a header but no interaction rows"):
        read_table(path, {"user": "u", "item": "i", "time": "t"})


def test_wrong_field_count(tmp_path):
    make_atomic(tmp_path, inter=["u1\ti1\t4\t100", "u1\ti2\t3\t200\textra", "u2\ti2\t3"])
    with pytest.raises(DataError, match=r"toy\.inter: line 3 has 5 fields but the header has 4.*TAB"):
        read_atomic(tmp_path, "toy")


def test_invalid_utf8(tmp_path):
    (tmp_path / "toy.inter").write_bytes(
        (INTER_HEADER + "\nu1\ti1\t4\t100\nu\xe9\ti2\t3\t200\n").encode("latin-1")
    )
    with pytest.raises(DataError, match=r"toy\.inter: line 3 is not valid UTF-8.*iconv"):
        read_atomic(tmp_path, "toy")


def test_items_table_missing_column(tmp_path):
    path = write(tmp_path / "items.csv", ["sku,title", "a,A"])
    with pytest.raises(
        DataError, match=r"items\.csv: column 'item_id' \(data\.source\.item_column\) does not exist.*'sku'"
    ):
        read_items_table(path, "item_id")


def test_item_file_missing_item_column(tmp_path):
    make_atomic(tmp_path)
    write(tmp_path / "toy.item", ["movie:token\ttitle:token_seq", "i1\tA"])
    with pytest.raises(
        DataError, match=r"toy\.item: column 'item_id' \(columns\.item\) does not exist.*'movie'"
    ):
        read_atomic(tmp_path, "toy")


# ------------------------------------------------------------------------------------ warnings
def test_warn_items_never_interacted(tmp_path):
    make_atomic(tmp_path, item=[*ITEMS, "i9\tNine\t2000", "i8\tEight\t2001"])
    with pytest.warns(DataWarning) as record:
        read_atomic(tmp_path, "toy")
    messages = [str(w.message) for w in record]
    assert any(
        "toy.item: 2 of 5 items never occur in toy.inter" in m and "'i9'" in m and "'i8'" in m
        for m in messages
    ), messages


def test_warn_interactions_with_unknown_items(tmp_path):
    make_atomic(tmp_path, item=ITEMS[:2])
    with pytest.warns(
        DataWarning,
        match=r"toy\.inter: 1 interaction\(s\) \(1 distinct items, e\.g\. 'i3'\) refer to "
        r"items missing from toy\.item",
    ):
        read_atomic(tmp_path, "toy")


def test_warn_duplicate_events(tmp_path):
    make_atomic(
        tmp_path,
        inter=["u1\ti1\t4\t100", "u1\ti2\t3\t200", "u1\ti1\t5\t100", "u1\ti1\t2\t100", "u2\ti1\t4\t100"],
    )
    with pytest.warns(
        DataWarning,
        match=r"toy\.inter: 2 duplicate interaction row\(s\).*user='u1' item='i1' "
        r"time=100 at line 4",
    ):
        read_atomic(tmp_path, "toy")


def test_warn_duplicate_events_csv(tmp_path):
    path = write(tmp_path / "log.csv", ["u,i,t", "a,x,1", "a,x,1"])
    with pytest.warns(DataWarning, match=r"log\.csv: 1 duplicate"):
        assert len(read_table(path, {"user": "u", "item": "i", "time": "t"})) == 2


def test_warn_repeated_item_ids(tmp_path):
    make_atomic(tmp_path, item=[*ITEMS, "i1\tAgain\t1999"])
    with pytest.warns(DataWarning, match=r"toy\.item: 1 repeated item id\(s\), e\.g\. 'i1' at line 5"):
        items = read_atomic(tmp_path, "toy").items
    assert items["title"].tolist() == ["The First", "Second Film", "Third One"]


def test_items_table_coverage_warning(tmp_path):
    path = write(tmp_path / "items.csv", ["sku,title", "a,A", "b,B"])
    inter = pd.DataFrame({"user": ["u"], "item": ["a"], "time": [1]})
    with pytest.warns(DataWarning, match=r"items\.csv: 1 of 2 items never occur"):
        read_items_table(path, "sku", interactions=inter)


def test_clean_data_has_no_warnings(tmp_path):
    make_atomic(tmp_path, item=ITEMS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_atomic(tmp_path, "toy")


def test_large_file_is_vectorised(tmp_path):
    """A 200k-row file parses quickly and exactly (a per-row Python loop would be obvious here)."""
    rng = np.random.default_rng(0)
    n = 200_000
    frame = pd.DataFrame(
        {
            "user_id": rng.integers(0, 5000, n).astype(str),
            "item_id": rng.integers(0, 9000, n).astype(str),
            "timestamp": np.arange(n, dtype=np.int64) * 7,
        }
    )
    path = tmp_path / "big.inter"
    path.write_text("user_id:token\titem_id:token\ttimestamp:float\n")
    frame.to_csv(path, sep="\t", header=False, index=False, mode="a")
    inter = read_atomic(tmp_path, "big").interactions
    assert (
        inter["user"].tolist() == frame["user_id"].tolist()
        and inter["time"].tolist() == frame["timestamp"].tolist()
    )
    assert re.fullmatch(r"\d+", inter["item"].iloc[0])


def test_compressed_csv(tmp_path):
    import gzip

    path = tmp_path / "log.csv.gz"
    path.write_bytes(gzip.compress(b"u,i,t\na,x,1\n\nb,y,zz\n"))
    with pytest.raises(DataError, match=r"log\.csv\.gz: column 't' \(time\), line 4: timestamp 'zz'"):
        read_table(path, {"user": "u", "item": "i", "time": "t"})
