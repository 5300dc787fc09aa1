"""Where the benchmarks' real data sets come from, in this order:

1. `--data PATH`: the user's own copy (a file, or a folder laid out as the data set ships);
2. this project's shared folder `../shared/data/<file>`, where it exists (the figures in docs/ came from it);
3. the public copy through the `datasets` library (`load_dataset`), as a user with internet would.

Any failure is an `InputError` naming file, line and field; `or_exit` turns it into one line on stderr
and exit code 2. Nothing here reads a file at import time, so every benchmark's `--help` works from a
fresh clone.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from alignloop.errors import InputError  # noqa: E402
from alignloop.io import read_records, require  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"

HH = {"shared": "hh-rlhf-harmless-base-test-part1.jsonl.gz",
      "hub": ("Anthropic/hh-rlhf", {"data_dir": "harmless-base", "split": "test"}),
      "get": "download harmless-base/test.jsonl.gz of Anthropic's hh-rlhf and pass --data PATH",
      "folder": ("test.jsonl.gz", "test.jsonl", "train.jsonl.gz", "train.jsonl")}
SHAKESPEARE = {"shared": "tinyshakespeare.txt",
               "hub": ("karpathy/tiny_shakespeare", {}),
               "get": "download tinyshakespeare's input.txt (karpathy/char-rnn, data/tinyshakespeare) and pass --data PATH",
               "folder": ("input.txt", "tinyshakespeare.txt")}
HH_FORMAT = 'HH-RLHF: one JSON object a line, {"chosen": "\\n\\nHuman: ... \\n\\nAssistant: ...", "rejected": ...}'


def add_data_args(ap: argparse.ArgumentParser, what: str) -> None:
    """`--data PATH` and `--check-data` for a benchmark that reads `what`."""
    ap.add_argument("--data", metavar="PATH", help=f"{what} (default: ../shared/data where it exists, else "
                    "the public copy through the `datasets` library)")
    ap.add_argument("--check-data", action="store_true",
                    help="read and check the data, print what was read, and stop (no training)")


def or_exit(load, *args, **kwargs):
    """`load(*args, **kwargs)`, or one line `<script>: error: <file:line field: what>` and exit code 2."""
    try:
        return load(*args, **kwargs)
    except InputError as e:
        print(f"{Path(sys.argv[0]).name}: error: {e}", file=sys.stderr)
        sys.exit(2)


# ---------------------------------------------------------------- HH-RLHF


def hh_pairs(path: str | Path | None = None, n: int | None = None) -> tuple[list[dict], str]:
    """(the first `n` pairs, all when None, as {"chosen", "rejected"} dialogue strings; where they came from).

    PATH: Anthropic's `.jsonl.gz` / `.jsonl`, a `.parquet` / `.json` with the same fields, a saved
    `datasets` folder, or a folder holding test.jsonl.gz (Anthropic's `harmless-base/` layout)."""
    if path is None and not (SHARED / HH["shared"]).exists():
        ds, source = _hub(HH)
        if n is not None:
            ds = ds.select(range(min(n, len(ds))))
        return _check_hh([(i + 1, dict(r)) for i, r in enumerate(ds)], source, n), source
    file = _file(Path(path) if path is not None else SHARED / HH["shared"], HH["folder"], "test*.parquet")
    return _check_hh(_read(file), file, n), str(file)


def _check_hh(records: list[tuple[int, dict]], file, n: int | None) -> list[dict]:
    pairs = []
    for line, rec in records[:n]:
        pair = {}
        for field in ("chosen", "rejected"):
            try:
                text = require(rec, field, str, file, line)
            except InputError as e:
                raise InputError(f"{e.message} (expected {HH_FORMAT})", file=file, line=line, field=field) from None
            if "Human:" not in text or "Assistant:" not in text:
                raise InputError('not an HH-RLHF dialogue (no "Human:" and "Assistant:" turns)',
                                 file=file, line=line, field=field)
            pair[field] = text
        pairs.append(pair)
    if n is not None and len(pairs) < n:
        raise InputError(f"{len(pairs):,} pair{'s' * (len(pairs) != 1)}; this benchmark uses the first {n:,}",
                         file=file)
    return pairs


# ---------------------------------------------------------------- tinyshakespeare


def shakespeare_text(path: str | Path | None = None) -> tuple[str, str]:
    """(the whole of tinyshakespeare's input.txt, where it came from). PATH: a UTF-8 text file, or a
    folder holding input.txt."""
    if path is None and not (SHARED / SHAKESPEARE["shared"]).exists():
        ds, source = _hub(SHAKESPEARE)
        try:  # the Hub's copy is input.txt cut 90/5/5 into three one-row splits: put back together
            text = "".join(ds[split][0]["text"] for split in ("train", "validation", "test"))
        except (KeyError, IndexError, TypeError) as e:
            raise InputError(f"not the expected train/validation/test splits of one 'text' each ({e!r}); "
                             f"{SHAKESPEARE['get']}", file=source) from None
        return text, source
    file = _file(Path(path) if path is not None else SHARED / SHAKESPEARE["shared"], SHAKESPEARE["folder"])
    kind = next((k for k in (".jsonl", ".json", ".parquet", ".gz", ".zip") if file.name.lower().endswith(k)), None)
    if kind:
        raise InputError(f"a {kind} file; expected plain text such as tinyshakespeare's input.txt", file=file)
    try:
        raw = file.read_bytes()
    except OSError as e:
        raise InputError(f"cannot read: {e.strerror or e}", file=file) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"not UTF-8 text (byte {e.start}); expected plain text such as tinyshakespeare's input.txt",
                         file=file, line=raw[: e.start].count(b"\n") + 1) from None
    if "\0" in text:
        raise InputError("not plain text (a NUL byte); expected plain text such as tinyshakespeare's input.txt",
                         file=file, line=text[: text.index("\0")].count("\n") + 1)
    if not text.strip():
        raise InputError("file is empty", file=file)
    return text, str(file)


# ---------------------------------------------------------------- shared


def _file(path: Path, names: tuple[str, ...], pattern: str | None = None) -> Path:
    """`path` itself, or the data set's file inside the folder `path`."""
    if not path.exists():
        raise InputError("file not found", file=path)
    if not path.is_dir() or (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
        return path
    found = [path / name for name in names if (path / name).is_file()]
    if not found and pattern:
        found = sorted(path.glob(pattern))
        if len(found) > 1:
            raise InputError(f"{len(found)} files match {pattern}: pass one of them", file=path)
    if not found:
        wanted = ", ".join(names + ((pattern,) if pattern else ()))
        raise InputError(f"a folder without {wanted}", file=path)
    return found[0]


def _read(file: Path) -> list[tuple[int, dict]]:
    try:
        return read_records(file)
    except (OSError, EOFError, zlib.error) as e:  # a truncated or corrupt .gz, an unreadable file
        raise InputError(f"cannot read: {e}", file=file) from None
    except ImportError as e:  # .parquet without pyarrow, a datasets folder without datasets
        raise InputError(f"reading this file needs the {e.name or 'missing'} package", file=file) from None


@contextlib.contextmanager
def _quiet(*names: str):
    """No retry warnings from the Hub clients: a failure is said once, by us."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _hub(spec: dict):
    """(`datasets.load_dataset` of the data set's public copy, the call), or an InputError saying what was tried."""
    name, kw = spec["hub"]
    call = f"load_dataset({', '.join([repr(name)] + [f'{k}={v!r}' for k, v in kw.items()])})"
    tried = f"no --data given and no {SHARED / spec['shared']}"
    try:
        import datasets
    except Exception as e:  # not installed, or broken
        raise InputError(f"{tried}; {call} needs the `datasets` library ({type(e).__name__}: {e}); "
                         f"pip install datasets, or {spec['get']}") from None
    with _quiet("datasets", "huggingface_hub", "fsspec", "urllib3"):
        try:
            return datasets.load_dataset(name, **kw), call
        except Exception as e:  # no network, a renamed data set, a full disk: every kind ends here
            why = " ".join(f"{type(e).__name__}: {e}".split())
            raise InputError(f"{tried}; {call} failed ({why[:300]}); {spec['get']}") from None
