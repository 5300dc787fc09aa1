"""Reading user data files and writing run-directory files safely.

Readers return `(line, record)` pairs so that every later check can name file, line and field.
Writers are atomic: a file or folder appears complete under its final name or not at all, so a run
stopped half-way (Ctrl-C, a crash, bad input) never leaves a half-written artefact behind.
"""
from __future__ import annotations

import contextlib
import gzip
import json
import os
import shutil
import tempfile
from pathlib import Path

from alignloop.errors import InputError

Record = tuple[int, dict]


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise InputError(f"not UTF-8 text (byte {e.start})", file=path, line=line) from None


def read_records(path: str | Path) -> list[Record]:
    """Read JSONL (.jsonl, .jsonl.gz), JSON (a list of objects), Parquet, plain text or a saved
    Hugging Face `datasets` folder into (line, record) pairs. Plain text is one `{"text"}` record."""
    path = Path(path)
    if not path.exists():
        raise InputError("file not found", file=path)
    if path.is_dir():
        return _read_hf_dataset(path)
    name = path.name.lower()
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq
        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises several types for a broken file
            raise InputError(f"not a readable Parquet file: {e}", file=path) from None
        records = [(i + 1, r) for i, r in enumerate(rows)]
    else:
        text = _read_text(path)
        if not text.strip():
            raise InputError("file is empty", file=path)
        if name.endswith(".txt"):
            return [(1, {"text": text})]
        if name.endswith(".json"):
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise InputError(f"not valid JSON: {e.msg}", file=path, line=e.lineno) from None
            if isinstance(data, dict):
                data = [data]
            if not isinstance(data, list):
                raise InputError("expected a JSON list of objects", file=path)
            records = [(i + 1, r) for i, r in enumerate(data)]
        else:
            records = []
            for i, line in enumerate(text.splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    records.append((i, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise InputError(f"not valid JSON: {e.msg}", file=path, line=i) from None
    for line, rec in records:
        if not isinstance(rec, dict):
            raise InputError("expected a JSON object", file=path, line=line)
    if not records:
        raise InputError("file has no records", file=path)
    return records


def _read_hf_dataset(path: Path) -> list[Record]:
    if not (path / "dataset_info.json").exists() and not (path / "dataset_dict.json").exists():
        raise InputError("a folder must be a saved Hugging Face `datasets` folder (save_to_disk)", file=path)
    import datasets
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
    records = [(i + 1, dict(r)) for i, r in enumerate(ds)]
    if not records:
        raise InputError("dataset has no rows", file=path)
    return records


def require(rec: dict, field: str, types, file, line: int, *, nonempty: bool = True):
    """Return rec[field], or raise an InputError naming file, line and field."""
    if field not in rec or rec[field] is None:
        raise InputError("missing field", file=file, line=line, field=field)
    value = rec[field]
    if not isinstance(value, types):
        names = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise InputError(f"expected {names}, got {type(value).__name__}", file=file, line=line, field=field)
    if nonempty and isinstance(value, (str, list)) and not (value.strip() if isinstance(value, str) else value):
        raise InputError("is empty", file=file, line=line, field=field)
    return value


# ---------------------------------------------------------------- atomic writing


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes 0600; run files are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_jsonl(path: str | Path, records) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def append_jsonl(path: str | Path, record: dict) -> None:
    """Append one line (metrics logs). A torn last line is tolerated by `read_jsonl_tolerant`."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")


def read_jsonl_tolerant(path: str | Path) -> list[dict]:
    """Our own logs: skip a last line torn by a kill."""
    out = []
    if Path(path).exists():
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                out.append(json.loads(line))
    return out


@contextlib.contextmanager
def atomic_dir(path: str | Path):
    """Yield a temporary sibling folder; on success it replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~umask())
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
