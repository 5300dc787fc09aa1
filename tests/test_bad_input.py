"""Bad input to the early stages: one message naming file, line and field; exit code 2; nothing written."""
from __future__ import annotations

import pytest

from tests.conftest import alignloop, alignloop_here


def _pretrain(run, data, *extra):
    return alignloop_here("pretrain", "--preset", "micro", "--out", run, "--data", data, *extra)


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
    proc = alignloop_here("pretrain", "--preset", "micro", "--out", micro_copy, flag, value)
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


def _reward(run, *extra, here=True):
    args = ("reward", "--preset", "micro", "--out", run, "--init", run / "pretrain", *extra)
    return alignloop_here(*args) if here else alignloop(*args, check=False)


def test_reward_demonstrations_are_checked_before_training(micro_copy, tmp_path):
    pairs = _jsonl(tmp_path / "pairs.jsonl", PAIRS)
    demos = _jsonl(tmp_path / "demos.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                            {"role": "assistant", "content": "hello"}]},
                                              {"completion": "an answer without its prompt"}])
    proc = _reward(micro_copy, "--data", pairs, "--demonstrations", demos, here=False)  # a real process
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


# ---------------------------------------------------------------- issue 25: every command, one line, exit 2


def _one_line(proc, *says):
    """Exit 2 and a single stderr line that names the value (each of `says`), no traceback."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert all(s in lines[0] for s in says), lines[0]
    return lines[0]


def _files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("args,says", [
    (["ppo", "--lr", "nan"], ("field 'lr'", "nan is not a finite number", "0.0 to 1.0")),
    (["ppo", "--kl-coef", "nan"], ("field 'kl_coef'", "nan is not a finite number")),
    (["ppo", "--kl-coef", "inf"], ("field 'kl_coef'", "inf is not a finite number")),
    (["dpo", "--beta=-inf"], ("field 'beta'", "-inf is not a finite number")),       # no bounds: finite all the same
    (["pretrain", "--max-steps", "1e999"], ("field 'max_steps'", "'1e999'")),       # an int: no OverflowError
])
def test_non_finite_config_numbers(tmp_path, args, says):
    proc = alignloop_here(args[0], "--preset", "micro", "--out", tmp_path / "run", *args[1:])
    _one_line(proc, *says)
    assert not (tmp_path / "run").exists()


def test_non_finite_number_in_toml(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[pretrain]\nlr = nan\n")
    proc = alignloop("pretrain", "--preset", "micro", "--out", tmp_path / "run", "--config", cfg, check=False)
    _one_line(proc, "c.toml [pretrain] field 'lr': nan is not a finite number")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command,flag,value,allowed", [
    ("serve", "--temperature", "nan", "0 to 2"), ("serve", "--top-p", "nan", "0.01 to 1"),
    ("serve", "--request-timeout", "inf", "0 or more"), ("serve", "--port", "70000", "1 to 65535"),
    ("serve", "--port", "0", "1 to 65535"),
    ("chat", "--temperature", "nan", "0 to 2"), ("chat", "--top-p", "nan", "0.01 to 1"),
    ("chat", "--max-new-tokens", "-1", "1 or more"),
    ("label", "--port", "70000", "1 to 65535"), ("label", "--port", "0", "1 to 65535"),
    ("label", "--max-upload-mb", "nan", "0.001 or more"), ("label", "--max-upload-mb", "0", "0.001 or more"),
])
def test_server_and_chat_flags(micro_copy, command, flag, value, allowed):
    before = _files(micro_copy)
    proc = alignloop_here(command, micro_copy, flag, value)
    line = _one_line(proc, f"field '{flag}'", f"allowed: {allowed}")
    assert value in line or str(float(value)) in line
    assert _files(micro_copy) == before, "nothing written (no database)"


@pytest.mark.parametrize("argv", [["serve", "{run}"], ["serve", "export", "{run}"], ["label", "{run}"],
                                  ["label", "export", "{run}"],
                                  ["label", "create-admin", "{run}", "--username", "bob", "--password-file", "{pw}"]])
@pytest.mark.parametrize("url,says", [
    ("notaurl", "'notaurl' is not a database URL"),
    ("mysql://bob:hunter2@localhost/x", "'mysql://bob:***@localhost/x' is not a database URL"),
])
def test_db_url_that_is_not_one(micro_copy, tmp_path, argv, url, says):
    pw = tmp_path / "pw"
    pw.write_text("a long enough password\n")
    before = _files(micro_copy)
    proc = alignloop_here(*[a.format(run=micro_copy, pw=pw) for a in argv], "--db", url)
    line = _one_line(proc, "field '--db'", says, "expected sqlite:///PATH or postgresql://")
    assert "hunter2" not in line
    assert _files(micro_copy) == before


@pytest.mark.parametrize("argv", [["serve", "export", "{run}"], ["label", "export", "{run}"]])
def test_db_that_cannot_be_reached(micro_copy, argv):
    url = "postgresql://bob:hunter2@127.0.0.1:1/alignloop"  # port 1: nothing listens there
    before = _files(micro_copy)
    proc = alignloop(*[a.format(run=micro_copy) for a in argv], "--db", url, check=False, timeout=120)
    line = _one_line(proc, "field '--db'", "cannot open the database 'postgresql://bob:***@127.0.0.1:1/alignloop'")
    assert "hunter2" not in line
    assert _files(micro_copy) == before


@pytest.mark.parametrize("out,says", [("afile", "afile field '--out': a file, not a folder"),
                                      ("afile/run", "afile is a file, not a folder")])
def test_out_is_a_file(tmp_path, out, says):
    (tmp_path / "afile").write_text("keep me\n")
    proc = alignloop_here("world", "--preset", "micro", "--out", tmp_path / out)
    _one_line(proc, says)
    assert _files(tmp_path) == ["afile"] and (tmp_path / "afile").read_text() == "keep me\n"


def test_run_until_unknown_step(tmp_path):
    proc = alignloop("run", "--preset", "micro", "--out", tmp_path / "run", "--until", "rewards", check=False)
    _one_line(proc, "field 'until'", "'rewards' is not one of", "world, tokenizer, pretrain, sft, reward, ppo")
    assert not (tmp_path / "run").exists()


def test_pipeline_imports_the_report_plainly():
    from alignloop import pipeline, report
    assert pipeline.report is report


def test_every_command_help_prints_its_options_as_written(capsys):
    """`alignloop X --help` for every command: exit 0 and each option's text as written — a "%" in a help
    text once made argparse print a dict of its internals ("~30{'option_strings': …") instead."""
    from alignloop import cli
    for name in cli.COMMANDS:
        with pytest.raises(SystemExit) as e:
            cli.main([name, "--help"])
        out = capsys.readouterr().out
        assert e.value.code == 0, name
        assert "option_strings" not in out and "usage:" in out, (name, out[:300])
        if "--gradient-checkpointing" in out:
            assert "~30%" in out, name
