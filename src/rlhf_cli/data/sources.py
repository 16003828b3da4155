"""Dataset sources: `synthetic:<task>`, local files and directories, hub names -> lists of dicts.

No formatting or tokenization here; see `formats.py` and `tokenize.py`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from ..hub import hub_error, hub_reachable, offline_mode
from . import chat as chat_mod
from . import formats, synthetic

_LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
GLOB_CHARS = "*?"  # not "[": a folder may be named so


@dataclass
class Split:
    """Rows of one source, split into train and held-out, with where they came from."""

    train: list[dict]
    eval: list[dict]
    source: str
    synthetic_task: str | None = None
    notes: list[str] = field(default_factory=list)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for row in self.train:
            h.update(json.dumps(row, sort_keys=True, default=str).encode())
        return h.hexdigest()[:16]


_IN_MEMORY: dict[str, list[dict]] = {}


def in_memory(rows: list[dict], name: str) -> str:
    """Register rows held in memory (the Python API's prompts or dataset) as the source `memory:<name>`."""
    if not rows or not all(isinstance(r, dict) for r in rows):
        raise UserError(f"the in-memory data '{name}' must be a non-empty list of rows (dicts)")
    _IN_MEMORY[name] = [dict(r) for r in rows]
    return f"memory:{name}"


def is_hub_name(source: str) -> bool:
    return not source.startswith("synthetic:") and not Path(source).expanduser().exists() and (
        "/" in source and not source.startswith((".", "/", "~")) and source.count("/") == 1
        and Path(source).suffix.lower() not in {*_LOCAL_BUILDERS, ".gz"}
    )


def _builder_for(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in {".gz", ".bz2", ".xz", ".zst"}:
        suffixes = suffixes[:-1]
    ext = suffixes[-1] if suffixes else ""
    if ext not in _LOCAL_BUILDERS:
        raise UserError(f"cannot read {path}: expected a .json, .jsonl, .parquet, .csv or .arrow file (optionally .gz), "
                        "or data.format: text for plain text with one example per line")
    return _LOCAL_BUILDERS[ext]


def _to_rows(ds) -> list[dict]:
    return [dict(r) for r in ds]


def _text_lines(path: Path) -> list[dict]:
    """A plain-text file (optionally .gz): one {"text"} row per non-empty line."""
    import gzip

    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            return [{"text": line.strip()} for line in f if line.strip()]
    except UnicodeDecodeError:
        line = _first_non_utf8_line(path)
        raise UserError(f"line {line} of {path} is not UTF-8 text; re-encode the file as UTF-8") from None


def _open_text(path: Path):
    import gzip

    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def _jsonl_rows(path: Path) -> list[dict]:
    """A JSON-lines file read one line at a time (memory follows the longest line, not a parser's blocks);
    every row gets every column, None where it has none (as `datasets` gives them)."""
    rows, columns = [], {}
    try:
        with _open_text(path) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as e:
                    raise UserError(f"line {n} of {path} is not valid JSON: {getattr(e, 'msg', e)}") from None
                if not isinstance(row, dict):
                    raise UserError(f"line {n} of {path} is a JSON {type(row).__name__}, not an object of columns")
                columns.update(dict.fromkeys(row))
                rows.append(row)
    except UnicodeDecodeError:
        raise UserError(f"line {_first_non_utf8_line(path)} of {path} is not UTF-8 text; re-encode the file as "
                        "UTF-8") from None
    return [r if len(r) == len(columns) else {c: r.get(c) for c in columns} for r in rows]


def _load_local_file(path: Path, plain_text: bool = False) -> list[dict]:
    import datasets

    if path.stat().st_size == 0:
        raise UserError(f"dataset {path} is empty: it has no rows")
    if plain_text and Path(path.name.removesuffix(".gz")).suffix.lower() not in _LOCAL_BUILDERS:
        return _text_lines(path)
    builder = _builder_for(path)
    if ".jsonl" in [s.lower() for s in path.suffixes]:
        return _jsonl_rows(path)
    try:
        return _to_rows(datasets.load_dataset(builder, data_files=str(path), split="train"))
    except Exception as e:  # datasets wraps parse errors in its own DatasetGenerationError
        cause = e.__cause__ or e
        if isinstance(cause, UnicodeDecodeError) or "utf-8" in str(cause).lower():
            line = _first_non_utf8_line(path)
            where = f"line {line} of {path}" if line else str(path)
            raise UserError(f"{where} is not UTF-8 text; re-encode the file as UTF-8") from None
        raise UserError(f"cannot read {path} as {builder}: {_first_line(cause)}") from None


def _first_non_utf8_line(path: Path) -> int | None:
    import gzip

    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError:
                    return n
    except OSError:
        return None
    return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _split(rows: list[dict], eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Deterministic train/held-out split of one list of rows."""
    import random

    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(rows) * eval_fraction)) if len(rows) > 1 else 0
    held = set(order[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)]


def load_source(data_cfg, kind: str, seed: int) -> Split:
    """Load `data_cfg.source` into train and held-out rows.

    kind: "sft" or "pairs" — which synthetic rows to generate (ignored for real data).
    """
    src = data_cfg.source.strip()
    if src.startswith("synthetic:"):
        return _synthetic(src, data_cfg.synthetic, kind)

    if src.startswith("memory:"):
        if src[len("memory:"):] not in _IN_MEMORY:
            raise UserError(f"data source '{src}' names rows held by another process; pass them to rlhf_cli.train")
        train, held = _split(_IN_MEMORY[src[len("memory:"):]], data_cfg.eval_fraction, seed)
        return _with_notes(Split(train, held, src), data_cfg)
    path = Path(src).expanduser()
    if path.exists():
        if path.is_dir():
            rows_by_split = _load_dir(path, data_cfg)
        else:
            rows_by_split = {"train": _load_local_file(path, plain_text=data_cfg.format == "text")}
    elif any(c in src for c in GLOB_CHARS):
        rows_by_split = _load_shards(src)
    elif is_hub_name(src):
        rows_by_split = _load_hub(src, data_cfg)
    else:
        raise UserError(f"data source '{src}' is not a file, a directory, a hub dataset name or synthetic:*")
    return _with_notes(_pick_splits(rows_by_split, data_cfg, seed, src), data_cfg)


def _synthetic(src: str, s, kind: str) -> Split:
    task = src.split(":", 1)[1]
    if task not in synthetic.SOURCES:
        raise UserError(f"unknown synthetic source '{src}'; choose synthetic:tldr, synthetic:hh, synthetic:reviews "
                        "or synthetic:arith")
    if task == "reviews" and kind != "sft":
        raise UserError("synthetic:reviews holds plain movie reviews, not preference pairs")
    if task == "arith" and kind != "sft":
        raise UserError("synthetic:arith holds problems with answers (SFT, GRPO), not preference pairs")
    rows = synthetic.generate(task, s.num_train + s.num_eval, s.seed, kind=kind, label_noise=s.label_noise)
    if s.conversational:
        if task != "tldr":
            raise UserError(f"data.synthetic.conversational is for synthetic:tldr, not {src}")
        rows = synthetic.conversational(rows)
    return Split(rows[: s.num_train], rows[s.num_train:], src, synthetic_task=task)


def _with_notes(split: Split, data_cfg) -> Split:
    """Cut enormous texts before tokenization, and say so; warn of a held-out set too small to measure."""
    cap = CHARS_PER_TOKEN * data_cfg.max_length
    cut = cut_long_texts(split.train, cap) + cut_long_texts(split.eval, cap)
    if cut:
        split.notes.append(f"{cut} rows had a text over {cap:,} characters (data.max_length {data_cfg.max_length} "
                           "tokens and more); cut to their first and last half of that before tokenization")
    if 0 < len(split.eval) < MIN_HELD_OUT:
        split.notes.append(f"warning: only {len(split.eval)} held-out rows; eval metrics this noisy cannot tell "
                           f"models apart (give {MIN_HELD_OUT}+: raise data.eval_fraction or add a test split)")
    return split


# fewer held-out rows than this and a metric's standard error is about as large as the differences we report
MIN_HELD_OUT = 20


# a text this many characters per token of data.max_length is cut before it is tokenized: far more than
# any truncation keeps (a token is ~4 characters), while a 200 MB line no longer costs gigabytes
CHARS_PER_TOKEN = 32


def cut_long_texts(rows: list[dict], cap: int) -> int:
    """Cut, in place, every text column longer than `cap` characters to its first and last cap/2
    (truncation later keeps a post's beginning or a dialogue's end: both are in what is left).
    Returns how many rows were cut."""
    cut = 0
    for row in rows:
        long = [k for k, v in row.items() if isinstance(v, str) and len(v) > cap]
        for k in long:
            row[k] = row[k][: cap // 2] + row[k][-(cap // 2):]
        cut += bool(long)
    return cut


def load_formatted(data_cfg, kind: str, seed: int, chat=None) -> tuple[Split, str]:
    """`load_source`, then `data.columns` renaming and the format (given or detected from the columns);
    conversational rows are rendered by the chat template of `chat()` (a `chat.Renderer`) into the
    standard format they mirror."""
    split = load_source(data_cfg, kind, seed)
    split.train = formats.rename_columns(split.train, data_cfg.columns)
    split.eval = formats.rename_columns(split.eval, data_cfg.columns)
    if not split.train:
        raise UserError(f"dataset '{data_cfg.source}' has no training rows")
    fmt = formats.resolve_format(split.train, data_cfg.format, data_cfg.source)
    formats.check_one_format(split.eval, fmt, data_cfg.source, "held-out", first=split.train[0])
    if data_cfg.system_prompt is not None:
        if fmt not in ("completion", "prompt"):
            raise UserError(f"data.system_prompt opens the conversation of prompt or prompt-completion rows; "
                            f"'{data_cfg.source}' is {fmt} data")
        split.train = chat_mod.with_system_prompt(split.train, fmt, data_cfg.system_prompt)
        split.eval = chat_mod.with_system_prompt(split.eval, fmt, data_cfg.system_prompt)
    if fmt != "messages" and not chat_mod.conversational_columns(split.train[0], formats.REQUIRED[fmt]):
        return split, fmt
    if fmt not in chat_mod.STANDARD:
        raise UserError(f"'{data_cfg.source}' holds conversations in {fmt} format, which has no conversational form; "
                        "give text")
    if chat is None:
        raise UserError(f"'{data_cfg.source}' is conversational, but no tokenizer is known here to render it")
    renderer = chat()
    split.train = chat_mod.render_rows(split.train, fmt, renderer, data_cfg.source, "training")
    split.eval = chat_mod.render_rows(split.eval, fmt, renderer, data_cfg.source, "held-out")
    split.notes.append(f"conversational rows rendered by the chat template of {renderer.where}")
    return split, chat_mod.STANDARD[fmt]


@dataclass
class PairData:
    train: list  # formats.PairExample
    eval: list
    fmt: str
    fingerprint: str
    dropped_malformed: int
    dropped_equal: int
    notes: list[str]


def load_pair_data(cfg, stage: str, chat=None) -> PairData:
    """Preference pairs of `cfg.data` for `stage` (train-rm, dpo): comparisons or HH format (conversational
    pairs are rendered by `chat()` into comparisons)."""
    split, fmt = load_formatted(cfg.data, kind="pairs", seed=cfg.seed, chat=chat)
    if fmt not in ("comparisons", "hh"):
        raise UserError(f"{stage} needs preference pairs (comparisons or hh format), but '{cfg.data.source}' "
                        f"is in {fmt} format")
    train, bad, equal = formats.pair_examples(split.train, fmt)
    held, bad_e, equal_e = formats.pair_examples(split.eval, fmt)
    if cfg.data.max_examples:
        train = train[: cfg.data.max_examples]
    reason = next(((i, r) for i, row in enumerate(split.train) if (r := formats.why_malformed(row, fmt))), None)
    example = f"; e.g. training row {reason[0]}: {reason[1]}" if reason else ""
    if not train:
        raise UserError(f"dataset '{cfg.data.source}' has no usable pairs ({bad} malformed, {equal} with "
                        f"chosen == rejected){example}")
    if bad + bad_e:
        split.notes.append(f"dropped {bad + bad_e} malformed pairs{example}")
    return PairData(train, held, fmt, split.fingerprint(), bad + bad_e, equal + equal_e, split.notes)


def _pick_splits(rows_by_split: dict[str, list[dict]], data_cfg, seed: int, src: str) -> Split:
    if data_cfg.split not in rows_by_split:
        raise UserError(f"dataset '{src}' has no split '{data_cfg.split}' (it has: {', '.join(rows_by_split)})")
    train = rows_by_split[data_cfg.split]
    eval_name = data_cfg.eval_split or next(
        (s for s in ("test", "valid", "validation") if s in rows_by_split and s != data_cfg.split), None
    )
    notes = []
    if data_cfg.eval_split and data_cfg.eval_split not in rows_by_split:
        raise UserError(f"dataset '{src}' has no split '{data_cfg.eval_split}' (it has: {', '.join(rows_by_split)})")
    if eval_name:
        held = rows_by_split[eval_name]
        notes.append(f"held-out split: '{eval_name}'")
    else:
        train, held = _split(train, data_cfg.eval_fraction, seed)
        notes.append(f"held-out: {len(held)} rows ({data_cfg.eval_fraction:.0%}) taken from '{data_cfg.split}'")
    return Split(train, held, src, notes=notes)


def _load_dir(path: Path, data_cfg) -> dict[str, list[dict]]:
    import datasets

    if (path / "dataset_dict.json").exists() or (path / "state.json").exists() or (path / "dataset_info.json").exists():
        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:
            raise UserError(f"cannot load the saved dataset in {path}: {_first_line(e)}") from None
        if isinstance(ds, datasets.DatasetDict):
            return {k: _to_rows(v) for k, v in ds.items()}
        return {"train": _to_rows(ds)}
    out = _load_files(sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")))
    if not out:
        raise UserError(f"directory {path} holds no saved dataset and no .json/.jsonl/.parquet/.csv/.arrow files")
    return out


def _load_shards(pattern: str) -> dict[str, list[dict]]:
    """A glob of shards (`data/train-*.parquet`), read in name order, split by name as a directory's files."""
    import glob

    files = [Path(p) for p in sorted(glob.glob(str(Path(pattern).expanduser()))) if Path(p).is_file()]
    out = _load_files(files, default_split="train")
    if not out:
        raise UserError(f"data source '{pattern}' matches no .json/.jsonl/.parquet/.csv/.arrow file")
    return out


def _load_files(files: list[Path], default_split: str | None = None) -> dict[str, list[dict]]:
    """Rows of each readable file, grouped by the split its name holds (train-00001.parquet: train), else
    `default_split`, else its own name."""
    out: dict[str, list[dict]] = {}
    for f in files:
        try:
            _builder_for(f)
        except UserError:
            continue
        name = f.name.split(".")[0]
        split = next((s for s in ("train", "test", "valid", "validation") if s in name), default_split or name)
        out.setdefault(split, []).extend(_load_local_file(f))
    return out


def _load_hub(name: str, data_cfg) -> dict[str, list[dict]]:
    import datasets

    if not offline_mode() and not hub_reachable():
        raise hub_error("dataset", name)  # fail in seconds, not after datasets' retries
    try:
        dsd = datasets.load_dataset(name, data_cfg.subset)
    except Exception as e:
        raise hub_error("dataset", name, e) from None
    return {k: _to_rows(v) for k, v in dsd.items()}

