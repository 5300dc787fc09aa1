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


# ---------------------------------------------------------------- later stages: caught before any work


def _jsonl(path, records):
    import json
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


PAIRS = [{"prompt": f"What is {i} plus 5?", "chosen": f"It is {i + 5}.", "rejected": f"It is {i + 6}."} for i in range(8)]


def _reward(run, *extra):
    return alignloop("reward", "--preset", "micro", "--out", run, "--init", run / "pretrain", *extra, check=False)


def test_reward_demonstrations_are_checked_before_training(micro_copy, tmp_path):
    pairs = _jsonl(tmp_path / "pairs.jsonl", PAIRS)
    demos = _jsonl(tmp_path / "demos.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                            {"role": "assistant", "content": "hello"}]},
                                              {"completion": "an answer without its prompt"}])
    proc = _reward(micro_copy, "--data", pairs, "--demonstrations", demos)
    assert proc.returncode == 2 and "demos.jsonl:2 field 'prompt'" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not (micro_copy / "round-1").exists()
    proc = _reward(micro_copy, "--data", pairs, "--demonstrations", tmp_path / "nope.jsonl")
    assert proc.returncode == 2 and "nope.jsonl" in proc.stderr and not (micro_copy / "round-1").exists()


@pytest.mark.parametrize("ties", [[1], [[0, 7]], "0,1", [[0, 1], [1, 2]], [["a"]]])
def test_reward_malformed_ties(micro_copy, tmp_path, ties):
    rec = {"prompt": "Say hi", "completions": ["hi", "hello", "hey"], "ranking": [0, 1, 2], "ties": ties}
    data = _jsonl(tmp_path / "r.jsonl", [rec])
    proc = _reward(micro_copy, "--data", data)
    assert proc.returncode == 2 and "r.jsonl:1 field 'ties'" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_reward_unknown_source(micro_copy, tmp_path):
    proc = _reward(micro_copy, "--data", _jsonl(tmp_path / "p.jsonl", PAIRS), "--sources", "label,twitter")
    assert proc.returncode == 2 and "field 'sources'" in proc.stderr and "twitter" in proc.stderr


def test_rank_sample_without_completions(micro_copy, tmp_path):
    import json
    first = json.loads((micro_copy / "world" / "prompts-train.jsonl").read_text().splitlines()[0])
    good = {"prompt_id": first["id"], "prompt": first["messages"], "completions": ["one", "two"]}
    samples = _jsonl(tmp_path / "samples.jsonl", [good, {k: v for k, v in good.items() if k != "completions"}])
    proc = alignloop("rank", "--preset", "micro", "--out", micro_copy, "--samples", samples, check=False)
    assert proc.returncode == 2 and "samples.jsonl:2 field 'completions'" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not (micro_copy / "round-1").exists()
