"""Readers: RecBole atomic files and CSV/TSV/Parquet logs -> normalised frames (docs/architecture.md).

Every reader returns `interactions` with columns `user` (str), `item` (str), `time` (int64) and an
optional `rating` (float64), so nothing downstream knows the file format. Parsing goes through
pyarrow (about ten times faster than pandas' C parser on 10M rows); pandas is used only where it is
the better tool (date parsing). Problems are raised as `DataError`s that name the file, the column,
the 1-based file line (the header is line 1) and the fix; suspicious but usable data gives a
`DataWarning`.
"""

from __future__ import annotations

import csv
import difflib
import io
import re
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from training.data.errors import DataError, DataWarning

__all__ = ["AtomicData", "DEFAULT_COLUMNS", "read_atomic", "read_items_table", "read_table", "read_users_table"]

DEFAULT_COLUMNS: dict[str, str] = {
    "user": "user_id",
    "item": "item_id",
    "time": "timestamp",
    "rating": "rating",
}
ATOMIC_TYPES = ("token", "float", "token_seq", "float_seq")
ROLES = ("user", "item", "time", "rating")
_NUMBER = r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$"
_FLOAT = r"^\s*([-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|[-+]?(?i:nan|inf|infinity))\s*$"
_MISSING_IDS = ("", "nan", "NaN")  # "nan": a missing value that went through astype(str) before being written
_SUFFIX_SEP = {".csv": ",", ".tsv": "\t", ".txt": "\t"}
_PARQUET = (".parquet", ".pq")
_COMPRESSED = (".gz", ".bz2", ".zst", ".lz4")
_EXAMPLES = 5


@dataclass
class AtomicData:
    """A RecBole dataset: normalised interactions plus the optional side tables (None when absent).

    `items` has column `item` plus the `.item` fields (names without `:type`), `users` has `user` plus
    the `.user` fields, `link` has `item` plus the entity column, `kg` keeps its own field names.
    """

    interactions: pd.DataFrame
    items: pd.DataFrame | None = None
    users: pd.DataFrame | None = None
    kg: pd.DataFrame | None = None
    link: pd.DataFrame | None = None


# ----------------------------------------------------------------------------------------- files
class _File:
    """One input file: knows how to turn a 0-based data-row index into a 1-based file line."""

    def __init__(self, path: Path, sep: str | None, quoted: bool):
        self.path, self.sep, self.quoted = path, sep, quoted
        self.nrows: int | None = None
        self._plain: bool | None = None

    @property
    def parquet(self) -> bool:
        return self.sep is None

    def where(self, row: int) -> str:
        """'line N' for text files (header = line 1), 'row N' (1-based) for Parquet."""
        return f"row {row + 1}" if self.parquet else f"line {self.line(row)}"

    def line(self, row: int) -> int:
        # Fast path: one physical line per record and no blank lines -> pure arithmetic.
        if self._plain is None:
            newlines = _count_newlines(self.path)
            self._plain = self.nrows is not None and newlines in (self.nrows, self.nrows + 1)
        if self._plain:
            return row + 2
        seen = -1
        for line_num, fields in self.records():
            if line_num == 1 or not fields:
                continue  # header, blank line (the parser skips blank lines too)
            seen += 1
            if seen == row:
                return line_num
        return row + 2

    def records(self) -> Iterator[tuple[int, list[str]]]:
        """(line number of the record's last line, fields) for every record, header included."""
        with _open_text(self.path) as handle:
            quoting = csv.QUOTE_MINIMAL if self.quoted else csv.QUOTE_NONE
            reader = csv.reader(handle, delimiter=self.sep or ",", quoting=quoting)
            for fields in reader:
                yield reader.line_num, fields


def _open_text(path: Path) -> io.TextIOWrapper:
    stream = pa.input_stream(str(path), compression="detect")
    return io.TextIOWrapper(stream, encoding="utf-8-sig", errors="replace", newline="")


def _count_newlines(path: Path) -> int:
    count = 0
    with pa.input_stream(str(path), compression="detect") as stream:
        while chunk := stream.read(1 << 24):
            count += chunk.count(b"\n")
    return count


def _listing(directory: Path, limit: int = 30) -> str:
    if not directory.is_dir():
        return f"the directory {directory} does not exist"
    names = sorted(p.name for p in directory.iterdir())
    if not names:
        return f"{directory} is empty"
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return f"{directory} contains: {', '.join(names[:limit])}{more}"


def _require_file(path: Path, what: str, fix: str) -> None:
    if not path.is_file():
        raise DataError(f"{path}: {what} does not exist ({_listing(path.parent)}). {fix}")


def _first_line(path: Path) -> str:
    """The header line (BOM and line ending stripped); DataError for an empty file."""
    try:
        with pa.input_stream(str(path), compression="detect") as stream:
            raw = io.BufferedReader(stream).readline()
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc}).") from exc
    if not raw.strip():
        raise DataError(
            f"{path}: the file is empty (no header line). Check that the file was written completely."
        )
    try:
        return raw.decode("utf-8-sig").rstrip("\r\n")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path}: line 1 is not valid UTF-8; re-encode the file, e.g. "
            f"`iconv -f latin1 -t utf-8 {path.name} > fixed`."
        ) from exc


def _check_unique_names(path: Path, names: list[str]) -> None:
    seen: dict[str, int] = {}
    for position, name in enumerate(names, 1):
        if name in seen:
            raise DataError(
                f"{path}: line 1 (header) names column {name!r} twice (fields {seen[name]} and "
                f"{position}); rename one of them so every column name is unique."
            )
        seen[name] = position


def _parse_atomic_header(path: Path) -> tuple[list[str], list[str]]:
    line = _first_line(path)
    fields = line.split("\t")
    names, types = [], []
    for position, field in enumerate(fields, 1):
        name, colon, kind = field.rpartition(":")
        joined = any(f":{t}" in name for t in ATOMIC_TYPES)  # several fields glued by a non-TAB separator
        if not colon or not name or kind not in ATOMIC_TYPES or joined:
            hint = ""
            if joined or (len(fields) == 1 and ("," in line or " " in line)):
                hint = " It looks like several fields: atomic files are TAB-separated (not commas/spaces)."
            raise DataError(
                f"{path}: line 1 (header), field {position} {field!r} is not of the form name:type with "
                f"type one of {', '.join(ATOMIC_TYPES)} (e.g. 'user_id:token', 'rating:float').{hint} "
                "Fix the header."
            )
        names.append(name)
        types.append(kind)
    _check_unique_names(path, names)
    return names, types


def _text_header(path: Path, sep: str) -> list[str]:
    line = _first_line(path)
    names = next(csv.reader([line], delimiter=sep))
    _check_unique_names(path, names)
    return names


def _suggest(name: str, available: list[str]) -> str:
    close = difflib.get_close_matches(name, available, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _missing_column(path: Path, key: str, name: str, available: list[str], setting: str) -> DataError:
    return DataError(
        f"{path}: column {name!r} ({setting}) does not exist{_suggest(name, available)}; available columns: "
        f"{', '.join(map(repr, available))}. Set {setting} to one of them."
    )


def _mapping(
    columns: Mapping | None, defaults: Mapping[str, str] | None, where: str
) -> dict[str, str | None]:
    given = dict(columns or {})
    unknown = sorted(set(given) - set(ROLES))
    if unknown:
        raise DataError(
            f"{where}: unknown key(s) {unknown} in the column mapping; use {', '.join(ROLES)} "
            "(e.g. {user: user_id, item: item_id, time: timestamp, rating: rating})."
        )
    merged: dict[str, str | None] = dict(defaults or {})
    merged.update(given)
    return merged


def _read_text(file: _File, names: list[str], include: list[str], multiline: bool = False) -> pa.Table:
    """Parse a delimited file with every included column as a string (typed conversion comes later)."""
    try:
        table = pacsv.read_csv(
            str(file.path),
            read_options=pacsv.ReadOptions(skip_rows=1, column_names=names, block_size=1 << 24),
            parse_options=pacsv.ParseOptions(
                delimiter=file.sep, quote_char='"' if file.quoted else False, newlines_in_values=multiline
            ),
            convert_options=pacsv.ConvertOptions(
                column_types={n: pa.string() for n in include},
                include_columns=include,
                strings_can_be_null=False,
                quoted_strings_can_be_null=False,
            ),
        )
    except pa.ArrowInvalid as exc:
        raise _parse_error(file, names, exc) from exc
    file.nrows = table.num_rows
    return table


def _parse_error(file: _File, names: list[str], exc: Exception) -> DataError:
    """Locate the offending line of a parse error (slow path: a plain Python scan of the file)."""
    if "UTF8" in str(exc) or "utf8" in str(exc).lower():
        with pa.input_stream(str(file.path), compression="detect") as stream:
            for number, raw in enumerate(io.BufferedReader(stream), 1):
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError:
                    return DataError(
                        f"{file.path}: line {number} is not valid UTF-8; re-encode the file, e.g. "
                        f"`iconv -f latin1 -t utf-8 {file.path.name} > fixed`."
                    )
    separator = "TAB" if file.sep == "\t" else repr(file.sep)
    for line_num, fields in file.records():
        if line_num > 1 and fields and len(fields) != len(names):
            return DataError(
                f"{file.path}: line {line_num} has {len(fields)} fields but the header has {len(names)} "
                f"({', '.join(names)}); fields are separated by {separator}. Fix or remove that line."
            )
    return DataError(f"{file.path}: cannot be parsed ({exc}).")


def _as_numpy_bool(mask: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return np.asarray(mask.to_numpy(zero_copy_only=False), dtype=bool)


def _first_true(mask: pa.ChunkedArray | pa.Array) -> int | None:
    mask = pc.fill_null(mask, True)
    if not pc.any(mask).as_py():
        return None
    return int(np.argmax(_as_numpy_bool(mask)))


# ------------------------------------------------------------------------------------ conversions
def _ids(file: _File, arr: pa.ChunkedArray, column: str, role: str) -> pa.ChunkedArray:
    """Ids as strings; DataError for empty/NaN ids (naming the first bad line)."""
    if pa.types.is_dictionary(arr.type):
        arr = arr.cast(arr.type.value_type)
    if pa.types.is_floating(arr.type):
        missing = pc.or_kleene(pc.is_null(arr), pc.is_nan(arr))
    elif pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        missing = pc.or_kleene(
            pc.is_null(arr), pc.is_in(pc.utf8_trim_whitespace(arr), pa.array(_MISSING_IDS))
        )
    else:
        missing = pc.is_null(arr)
    bad = _first_true(missing)
    if bad is not None:
        count = int(pc.sum(pc.cast(pc.fill_null(missing, True), pa.int64())).as_py())
        value = arr[bad].as_py()
        raise DataError(
            f"{file.path}: column {column!r} ({role}), {file.where(bad)}: missing {role} id "
            f"({'empty' if value in (None, '') else repr(value)}); {count} row(s) like this. Every row needs "
            f"{'an' if role == 'item' else 'a'} {role} id: fill it in or drop those rows."
        )
    if pa.types.is_floating(arr.type):
        values = arr.to_numpy()
        if np.all(values == np.round(values)):
            arr = pa.chunked_array([pa.array(values.astype(np.int64))])
    if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
        arr = arr.cast(pa.string())
    return arr


def _number_error(
    file: _File, arr: pa.ChunkedArray, column: str, role: str, pattern: str, fix: str
) -> DataError:
    bad = _first_true(pc.invert(pc.match_substring_regex(arr, pattern)))
    if bad is None:  # the regex accepted everything but arrow did not: report without a line
        return DataError(f"{file.path}: column {column!r} ({role}) holds values that are not numbers. {fix}")
    return DataError(
        f"{file.path}: column {column!r} ({role}), {file.where(bad)}: {role} {arr[bad].as_py()!r} "
        f"is not a number. {fix}"
    )


def _floats(file: _File, arr: pa.ChunkedArray, column: str, role: str, fix: str) -> np.ndarray:
    """Float64 values; empty cells become NaN, anything else non-numeric is a DataError."""
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        trimmed = pc.utf8_trim_whitespace(arr)
        nulled = pc.if_else(pc.equal(trimmed, ""), pa.scalar(None, arr.type), trimmed)
        try:
            arr = pc.cast(nulled, pa.float64())
        except pa.ArrowInvalid as exc:
            raise _number_error(file, nulled, column, role, _FLOAT, fix) from exc
    elif pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type) or pa.types.is_boolean(arr.type):
        arr = pc.cast(arr, pa.float64())
    else:
        raise DataError(f"{file.path}: column {column!r} ({role}) has type {arr.type}, not a number. {fix}")
    return np.asarray(arr.to_numpy(zero_copy_only=False), dtype=np.float64)


def _datetime_seconds(parsed: pd.Series) -> np.ndarray:
    return ((parsed - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)).to_numpy(dtype=np.int64)


def _times(file: _File, arr: pa.ChunkedArray, column: str, time_format: str | None) -> np.ndarray:
    """int64 seconds: integers pass through, floats are floored, strings/datetimes parsed (naive = UTC)."""
    where = f"{file.path}: column {column!r} (time)"
    kind = arr.type
    is_text = pa.types.is_string(kind) or pa.types.is_large_string(kind)
    if pa.types.is_dictionary(kind):
        arr, kind = arr.cast(kind.value_type), kind.value_type
        is_text = pa.types.is_string(kind) or pa.types.is_large_string(kind)
    if time_format is not None and not is_text and (pa.types.is_integer(kind) or pa.types.is_floating(kind)):
        arr = pc.cast(pc.cast(arr, pa.int64()), pa.string())  # e.g. 20240131 with time_format="%Y%m%d"
        kind, is_text = arr.type, True
    empty = pc.is_null(arr)
    if is_text:
        arr = pc.utf8_trim_whitespace(arr)
        empty = pc.or_kleene(empty, pc.equal(arr, ""))
    elif pa.types.is_floating(kind):
        empty = pc.or_kleene(empty, pc.is_nan(arr))
    bad = _first_true(empty)
    if bad is not None:
        raise DataError(
            f"{where}, {file.where(bad)}: empty timestamp. Every interaction needs a time: fill it "
            "in or drop the row."
        )
    if pa.types.is_integer(kind):
        return np.asarray(arr.to_numpy(), dtype=np.int64)
    if pa.types.is_floating(kind):
        values = arr.to_numpy()
        if not np.isfinite(values).all():
            bad = int(np.argmax(~np.isfinite(values)))
            raise DataError(
                f"{where}, {file.where(bad)}: timestamp {values[bad]} is not finite; fix the value."
            )
        return np.floor(values).astype(np.int64)
    if pa.types.is_timestamp(kind) or pa.types.is_date(kind):
        return _datetime_seconds(pd.to_datetime(arr.to_pandas(), utc=True))
    if not is_text:
        raise DataError(
            f"{where} has type {kind}; use integer epoch seconds, a datetime type or date strings."
        )
    if time_format is None and re.match(_NUMBER, arr[0].as_py()):
        # The first value is a number: the whole column is epoch seconds (or any monotone integer).
        try:
            return np.asarray(pc.cast(arr, pa.int64()).to_numpy(), dtype=np.int64)
        except pa.ArrowInvalid:
            pass
        try:
            return np.floor(pc.cast(arr, pa.float64()).to_numpy()).astype(np.int64)
        except pa.ArrowInvalid as exc:
            bad = _first_true(pc.invert(pc.match_substring_regex(arr, _NUMBER)))
            row = file.where(bad) if bad is not None else "some row"
            value = arr[bad].as_py() if bad is not None else "?"
            raise DataError(
                f"{where}, {row}: timestamp {value!r} cannot be parsed: the column's first value "
                f"{arr[0].as_py()!r} is a number, so every value must be (epoch seconds). Fix the value, "
                "or for date strings throughout pass time_format (data.source.time_format)."
            ) from exc
    strings = arr.to_pandas()
    try:
        parsed = pd.to_datetime(strings, format=time_format, errors="coerce", utc=True)
    except (ValueError, TypeError) as exc:
        raise DataError(
            f"{where}: time_format={time_format!r} is not a valid format ({exc}); use strftime codes, "
            "e.g. '%Y-%m-%d %H:%M:%S'."
        ) from exc
    failed = parsed.isna().to_numpy()
    if failed.any():
        bad = int(np.argmax(failed))
        fmt = (
            f"the format {time_format!r}"
            if time_format
            else "a date/time (format inferred from the first value)"
        )
        raise DataError(
            f"{where}, {file.where(bad)}: timestamp {strings.iloc[bad]!r} cannot be parsed as {fmt}; "
            f"{int(failed.sum())} value(s) fail. Fix the values or set time_format "
            "(data.source.time_format), e.g. '%Y-%m-%d %H:%M:%S'."
        )
    return _datetime_seconds(parsed)


def _interactions(
    file: _File, table: pa.Table, mapping: dict[str, str | None], time_format: str | None, setting: str
) -> pd.DataFrame:
    users = _ids(file, table.column(mapping["user"]), mapping["user"], "user")
    items = _ids(file, table.column(mapping["item"]), mapping["item"], "item")
    frame = pd.DataFrame({"user": users.to_pandas(), "item": items.to_pandas()})
    frame["time"] = _times(file, table.column(mapping["time"]), mapping["time"], time_format)
    if mapping.get("rating"):
        fix = f"Fix the value, or set {setting}.rating=null to read implicit feedback without ratings."
        frame["rating"] = _floats(file, table.column(mapping["rating"]), mapping["rating"], "rating", fix)
    _warn_duplicates(file, frame, users, items)
    return frame


def _codes(values: pa.ChunkedArray) -> tuple[np.ndarray, int]:
    """Dense integer codes of string values (arrow's hash kernel: several times faster than pandas')."""
    encoded = pc.dictionary_encode(values)
    if encoded.num_chunks == 0:
        return np.zeros(0, dtype=np.int64), 0
    codes = np.concatenate([chunk.indices.to_numpy(zero_copy_only=False) for chunk in encoded.chunks])
    return codes.astype(np.int64), len(encoded.chunk(0).dictionary)


def _repeated_sorted(ordered: np.ndarray) -> np.ndarray:
    """Distinct values occurring more than once in a sorted array (no hashing: it is sorted already)."""
    repeated = ordered[1:][ordered[1:] == ordered[:-1]]
    return repeated[np.r_[True, repeated[1:] != repeated[:-1]]] if repeated.size else repeated


def _warn_duplicates(file: _File, frame: pd.DataFrame, user: pa.ChunkedArray, item: pa.ChunkedArray) -> None:
    """Warn about repeated (user, item, time) rows.

    Cheap screens first (only rows sharing a timestamp can repeat; then a 64-bit row hash), an exact
    check only on the few colliding rows, so a clean 10M-row log costs about one sort.
    """
    n = len(frame)
    if n < 2:
        return
    times = frame["time"].to_numpy(dtype=np.int64)
    shared = _repeated_sorted(np.sort(times))
    if shared.size == 0:
        return
    rows = np.arange(n)
    if shared.size < n // 4:
        rows = np.flatnonzero(pd.Series(times).isin(shared).to_numpy())
        user, item = pc.take(user, rows), pc.take(item, rows)
    users, _ = _codes(user)
    items, n_items = _codes(item)
    times = times[rows]
    with np.errstate(over="ignore"):
        key = (users * np.int64(max(n_items, 1)) + items).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        key ^= times.astype(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F)
    collide = _repeated_sorted(np.sort(key))
    if collide.size == 0:
        return
    candidates = np.flatnonzero(pd.Series(key).isin(collide).to_numpy())
    sub = pd.DataFrame({"u": users[candidates], "i": items[candidates], "t": times[candidates]})
    dup = sub.duplicated(keep="first").to_numpy()
    if not dup.any():
        return
    candidates = rows[candidates]
    first = int(candidates[np.argmax(dup)])
    row = frame.iloc[first]
    warnings.warn(
        f"{file.path}: {int(dup.sum())} duplicate interaction row(s) with the same (user, item, time), e.g. "
        f"user={row['user']!r} item={row['item']!r} time={row['time']} at {file.where(first)}. They are kept "
        "as separate events; deduplicate the file if they are logging artefacts.",
        DataWarning,
        stacklevel=3,
    )


def _frame(file: _File, table: pa.Table, names: list[str], types: list[str] | None) -> pd.DataFrame:
    """A side table as pandas: atomic `float` fields as float64, everything else as read."""
    columns = {}
    for position, name in enumerate(names):
        arr = table.column(name)
        if types is not None and types[position] == "float":
            columns[name] = _floats(
                file, arr, name, "float field", "Fix the value or declare the field :token."
            )
        else:
            columns[name] = arr.to_pandas()
    return pd.DataFrame(columns)


def _keyed(file: _File, frame: pd.DataFrame, table: pa.Table, column: str, role: str) -> pd.DataFrame:
    """Rename the id column to `role`, validate the ids and drop repeated ids (keeping the first)."""
    if role in frame.columns and column != role:
        raise DataError(
            f"{file.path}: has both a column {role!r} and the {role}-id column {column!r}; rename "
            f"the column {role!r} (it would clash with the normalised id column)."
        )
    ids = _ids(file, table.column(column), column, role).to_pandas()
    frame = frame.drop(columns=[column])
    frame.insert(0, role, ids.to_numpy())
    repeated = frame[role].duplicated().to_numpy()
    if repeated.any():
        first = int(np.argmax(repeated))
        warnings.warn(
            f"{file.path}: {int(repeated.sum())} repeated {role} id(s), e.g. {frame[role].iloc[first]!r} "
            f"at {file.where(first)}; keeping the first row of each.",
            DataWarning,
            stacklevel=3,
        )
        frame = frame.loc[~repeated].reset_index(drop=True)
    return frame


def _arrow_strings(values: pd.Series) -> pa.Array | pa.ChunkedArray:
    """Zero-copy for arrow-backed string columns; object columns are converted once."""
    return pa.array(values) if hasattr(values.array, "__arrow_array__") else pa.array(values.astype(str))


def _warn_item_coverage(
    inter_file: _File, items_file: _File, inter_items: pd.Series, item_ids: pd.Series
) -> None:
    """Warn about items on one side only (arrow hash sets: pandas' isin on arrow strings loops in Python)."""
    known = _arrow_strings(item_ids)
    used_values = _arrow_strings(inter_items)
    used = pc.unique(used_values)
    unknown = pc.invert(pc.is_in(used, value_set=known))
    n_unknown = int(pc.sum(pc.cast(unknown, pa.int64())).as_py() or 0)
    if n_unknown:
        rows = int(pc.sum(pc.cast(pc.invert(pc.is_in(used_values, value_set=known)), pa.int64())).as_py())
        examples = ", ".join(repr(x) for x in pc.filter(used, unknown)[:_EXAMPLES].to_pylist())
        warnings.warn(
            f"{inter_file.path}: {rows} interaction(s) ({n_unknown} distinct items, e.g. "
            f"{examples}) refer to items missing from {items_file.path.name}; those items will have no "
            f"text/features. Add them to {items_file.path.name} or check the item-id column.",
            DataWarning,
            stacklevel=3,
        )
    unused = pc.invert(pc.is_in(known, value_set=used))
    n_unused = int(pc.sum(pc.cast(unused, pa.int64())).as_py() or 0)
    if n_unused:
        examples = ", ".join(repr(x) for x in pc.filter(known, unused)[:_EXAMPLES].to_pylist())
        warnings.warn(
            f"{items_file.path}: {n_unused} of {len(known)} items never occur in "
            f"{inter_file.path.name} (e.g. {examples}); they get no training signal and are left out of the "
            "item vocabulary.",
            DataWarning,
            stacklevel=3,
        )


# ------------------------------------------------------------------------------------ public API
def read_atomic(directory: str | Path, dataset: str, columns: Mapping | None = None) -> AtomicData:
    """Read RecBole atomic files `<directory>/<dataset>.inter` (+ optional .item/.user/.kg/.link).

    `columns` maps roles to `.inter` field names (defaults: user_id, item_id, timestamp, rating); the
    default rating field is optional, any other mapped field must exist.
    """
    directory = Path(directory).expanduser()
    mapping = _mapping(columns, DEFAULT_COLUMNS, f"{directory}/{dataset}")
    for role in ("user", "item", "time"):
        if not mapping.get(role):
            raise DataError(
                f"{directory}/{dataset}: columns.{role} is empty; every interaction needs a {role} "
                f"column (default {DEFAULT_COLUMNS[role]!r})."
            )
    inter_path = directory / f"{dataset}.inter"
    _require_file(
        inter_path,
        "the interaction file",
        "Pass the directory holding <name>.inter "
        "(data.source.path) and the dataset name without extension (data.source.name).",
    )
    names, types = _parse_atomic_header(inter_path)
    for role in ("user", "item", "time", "rating"):
        name = mapping.get(role)
        if not name or name in names:
            continue
        if role == "rating" and name == DEFAULT_COLUMNS["rating"]:
            mapping["rating"] = None  # ratings are optional unless asked for by a non-default name
            continue
        raise _missing_column(inter_path, role, name, names, f"columns.{role}")
    inter_file = _File(inter_path, "\t", quoted=False)
    include = [mapping[r] for r in ROLES if mapping.get(r)]
    table = _read_text(inter_file, names, list(dict.fromkeys(include)))
    if table.num_rows == 0:
        raise DataError(f"{inter_path}: has a header but no interaction rows; the dataset is empty.")
    interactions = _interactions(inter_file, table, mapping, None, "columns")

    side: dict[str, pd.DataFrame | None] = {}
    files: dict[str, _File] = {}
    for suffix, role in (("item", "item"), ("user", "user"), ("link", "item"), ("kg", None)):
        path = directory / f"{dataset}.{suffix}"
        if not path.is_file():
            side[suffix] = None
            continue
        names, types = _parse_atomic_header(path)
        file = files[suffix] = _File(path, "\t", quoted=False)
        table = _read_text(file, names, names)
        frame = _frame(file, table, names, types)
        if role is not None:
            column = mapping[role] if mapping[role] in names else None
            if column is None:
                if suffix != "link":
                    raise _missing_column(path, role, mapping[role], names, f"columns.{role}")
            else:
                frame = _keyed(file, frame, table, column, role)
        side[suffix] = frame
    if side["item"] is not None:
        _warn_item_coverage(inter_file, files["item"], interactions["item"], side["item"]["item"])
    return AtomicData(interactions, side["item"], side["user"], side["kg"], side["link"])


def _table_file(path: str | Path, sep: str | None) -> _File:
    path = Path(path).expanduser()
    _require_file(path, "the table", "Check data.source.path.")
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSED:
        suffixes = suffixes[:-1]
    suffix = suffixes[-1] if suffixes else ""
    if suffix in _PARQUET:
        return _File(path, None, quoted=False)
    if sep is None:
        if suffix not in _SUFFIX_SEP:
            raise DataError(
                f"{path}: unknown table format {suffix or '(no suffix)'!r}; use .csv, .tsv/.txt or "
                ".parquet/.pq, or pass the field separator with sep (data.source.sep)."
            )
        sep = _SUFFIX_SEP[suffix]
    return _File(path, sep, quoted=True)


def _table_columns(file: _File) -> list[str]:
    if file.parquet:
        try:
            names = list(pq.read_schema(file.path).names)
        except (pa.ArrowInvalid, OSError) as exc:
            raise DataError(f"{file.path}: not a readable Parquet file ({exc}).") from exc
        if not names:
            raise DataError(f"{file.path}: the Parquet file has no columns.")
        _check_unique_names(file.path, names)
        return names
    return _text_header(file.path, file.sep)


def _load_table(file: _File, names: list[str], include: list[str], multiline: bool) -> pa.Table:
    if file.parquet:
        table = pq.read_table(file.path, columns=include)
        file.nrows = table.num_rows
        return table
    return _read_text(file, names, include, multiline=multiline)


def read_table(
    path: str | Path, columns: Mapping, sep: str | None = None, time_format: str | None = None
) -> pd.DataFrame:
    """Read an interaction log (CSV/TSV/Parquet by suffix) with a mapping {user, item, time, rating?}.

    Integer timestamps pass through; strings/datetimes are parsed (with `time_format` if given) into
    int64 epoch seconds, naive times taken as UTC.
    """
    file = _table_file(path, sep)
    mapping = _mapping(columns, None, str(file.path))
    for role in ("user", "item", "time"):
        if not mapping.get(role):
            raise DataError(
                f"{file.path}: the column mapping lacks {role!r}; give columns "
                "{user: ..., item: ..., time: ..., rating: optional} (data.source.columns)."
            )
    names = _table_columns(file)
    for role in ROLES:
        name = mapping.get(role)
        if name and name not in names:
            raise _missing_column(file.path, role, name, names, f"data.source.columns.{role}")
    include = list(dict.fromkeys(mapping[r] for r in ROLES if mapping.get(r)))
    table = _load_table(file, names, include, multiline=False)
    if table.num_rows == 0:
        raise DataError(f"{file.path}: has a header but no interaction rows; the table is empty.")
    return _interactions(file, table, mapping, time_format, "data.source.columns")


def _read_keyed_table(path: str | Path, column: str, role: str, sep: str | None) -> tuple[_File, pd.DataFrame]:
    """A side table (CSV/TSV/Parquet) whose id column `column` becomes `role` (str); other columns unchanged."""
    file = _table_file(path, sep)
    names = _table_columns(file)
    if column not in names:
        raise _missing_column(file.path, role, column, names, f"data.source.{role}_column")
    table = _load_table(file, names, names, multiline=True)
    frame = table.to_pandas() if file.parquet else _frame(file, table, names, None)
    return file, _keyed(file, frame, table, column, role)


def read_items_table(
    path: str | Path, item_column: str, sep: str | None = None, interactions: pd.DataFrame | None = None
) -> pd.DataFrame:
    """Read an item table (CSV/TSV/Parquet) -> frame with `item` (str) and the other columns unchanged.

    With `interactions`, warns about items on one side only (as `read_atomic` does for `.item`).
    """
    file, frame = _read_keyed_table(path, item_column, "item", sep)
    if interactions is not None:
        _warn_item_coverage(
            _File(Path("interactions"), None, False), file, interactions["item"], frame["item"]
        )
    return frame


def read_users_table(path: str | Path, user_column: str, sep: str | None = None) -> pd.DataFrame:
    """Read a user table (CSV/TSV/Parquet; profile fields for `model.user_profile`) -> frame with `user` (str)
    and the other columns unchanged."""
    return _read_keyed_table(path, user_column, "user", sep)[1]
