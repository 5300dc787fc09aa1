"""Bad input to the early stages: one message naming file, line and field; exit code 2; nothing written."""
from __future__ import annotations

import pytest

from tests.conftest import alignloop


def _pretrain(run, data, *extra):
    return alignloop("pretrain", "--preset", "micro", "--out", run, "--data", data, *extra, check=False)


@pytest.mark.parametrize("name,content,expect", [
    ("missing.jsonl", None, "missing.jsonl: file not found"),
    ("empty.jsonl", b"", "empty.jsonl: file is empty"),
    ("latin1.txt", "café au lait\n".encode("latin-1"), "latin1.txt:1: not UTF-8"),
    ("notjson.jsonl", b'{"text": "fine"}\n{"text": oops}\n', "notjson.jsonl:2: not valid JSON"),
    ("nofield.jsonl", b'{"text": "fine"}\n{"title": "no text"}\n', "nofield.jsonl:2 field 'text'"),
])
def test_bad_corpus(micro_copy, tmp_path, name, content, expect):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    (micro_copy / "pretrain").rename(micro_copy / "pretrain-old")
    before = sorted(str(p.relative_to(micro_copy)) for p in micro_copy.rglob("*"))
    proc = _pretrain(micro_copy, path)
    assert proc.returncode == 2, proc.stderr
    assert expect in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(str(p.relative_to(micro_copy)) for p in micro_copy.rglob("*")) == before, "nothing half-written"


@pytest.mark.parametrize("flag,value,field", [("--lr", "-1", "lr"), ("--batch-size", "0", "batch_size"),
                                              ("--max-steps", "abc", "max_steps"), ("--size", "huge", "size")])
def test_flag_out_of_range(micro_copy, flag, value, field):
    proc = alignloop("pretrain", "--preset", "micro", "--out", micro_copy, flag, value, check=False)
    assert proc.returncode == 2 and f"field '{field}'" in proc.stderr and "Traceback" not in proc.stderr


def test_bad_toml_config(micro_copy, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[pretrain]\nlearning_rate = 3\n")
    proc = alignloop("pretrain", "--preset", "micro", "--out", micro_copy, "--config", cfg, check=False)
    assert proc.returncode == 2 and "c.toml [pretrain] field 'learning_rate'" in proc.stderr


def test_world_is_written_whole_or_not_at_all(tmp_path):
    proc = alignloop("world", "--preset", "micro", "--out", tmp_path / "run", "--n-entities", "1", check=False)
    assert proc.returncode == 2 and "n_entities" in proc.stderr
    assert not (tmp_path / "run" / "world").exists()
