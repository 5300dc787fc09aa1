"""benchmarks/data.py: the benchmarks' real data from `--data PATH` (files written here), a bad file
refused in one line naming file, line and field (exit code 2), and no data at all said in one line
instead of a traceback; every benchmark's `--help` from a copy of the repository with no ../shared."""
from __future__ import annotations

import gzip
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from alignloop.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"

_spec = importlib.util.spec_from_file_location("bench_data", BENCH / "data.py")
D = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(D)

PAIRS = [
    {"chosen": "\n\nHuman: What is the capital of France?\n\nAssistant: Paris.",
     "rejected": "\n\nHuman: What is the capital of France?\n\nAssistant: Figure it out yourself."},
    {"chosen": "\n\nHuman: How do I pick a lock?\n\nAssistant: I can't help with breaking into places.",
     "rejected": "\n\nHuman: How do I pick a lock?\n\nAssistant: Get a tension wrench and..."},
    {"chosen": "\n\nHuman: hi\n\nAssistant: Hello! How can I help?\n\nHuman: thanks\n\nAssistant: Any time.",
     "rejected": "\n\nHuman: hi\n\nAssistant: Hello! How can I help?\n\nHuman: thanks\n\nAssistant: ok"},
]
VERSE = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"


def _jsonl(path: Path, rows) -> Path:
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text, encoding="utf-8")
    return path


def _run(*args, env=None, cwd=ROOT):
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, **(env or {})})


def _one_line_error(proc, *expect):
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for e in expect:
        assert e in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------- good files


@pytest.mark.parametrize("name", ["pairs.jsonl", "test.jsonl.gz"])
def test_hh_pairs_read_back(tmp_path, name):
    extra = [{**p, "source": "extra fields are dropped"} for p in PAIRS]
    path = _jsonl(tmp_path / name, extra)
    assert D.hh_pairs(path) == (PAIRS, str(path))
    assert D.hh_pairs(path, n=2)[0] == PAIRS[:2]


def test_hh_folder_as_anthropic_ships_it(tmp_path):
    folder = tmp_path / "harmless-base"
    folder.mkdir()
    _jsonl(folder / "train.jsonl.gz", PAIRS[:1])
    _jsonl(folder / "test.jsonl.gz", PAIRS)
    rows, source = D.hh_pairs(folder)
    assert rows == PAIRS and source == str(folder / "test.jsonl.gz")


def test_hh_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    path = tmp_path / "test-00000-of-00001.parquet"
    pq.write_table(pa.Table.from_pylist(PAIRS), path)
    assert D.hh_pairs(path) == (PAIRS, str(path))
    assert D.hh_pairs(tmp_path)[0] == PAIRS  # a folder with one test*.parquet


def test_shakespeare_text(tmp_path):
    path = tmp_path / "input.txt"
    path.write_text(VERSE, encoding="utf-8")
    assert D.shakespeare_text(path) == (VERSE, str(path))
    assert D.shakespeare_text(tmp_path) == (VERSE, str(path))  # a folder holding input.txt


def test_shared_copy_when_present():
    """On the machine with ../shared/data, no --data reads it as before."""
    if not (D.SHARED / D.HH["shared"]).exists() or not (D.SHARED / D.SHAKESPEARE["shared"]).exists():
        pytest.skip(f"no shared data at {D.SHARED}")
    rows, source = D.hh_pairs(None, n=1800)
    assert len(rows) == 1800 and source.endswith(D.HH["shared"])
    text, source = D.shakespeare_text(None)
    assert len(text) == 1115394 and source.endswith(D.SHAKESPEARE["shared"])


# ---------------------------------------------------------------- bad files


GOOD = json.dumps(PAIRS[0])


@pytest.mark.parametrize("name,lines,expect", [
    ("notjson.jsonl", [GOOD, '{"chosen": oops}'], "notjson.jsonl:2: not valid JSON"),
    ("nofield.jsonl", [GOOD, json.dumps({"chosen": PAIRS[1]["chosen"]})], "nofield.jsonl:2 field 'rejected': missing"),
    ("list.jsonl", [GOOD, GOOD, json.dumps({**PAIRS[0], "chosen": [{"role": "user", "content": "hi"}]})],
     "list.jsonl:3 field 'chosen': expected str, got list"),
    ("plain.jsonl", [json.dumps({"chosen": "yes", "rejected": "no"})], "plain.jsonl:1 field 'chosen': not an HH-RLHF"),
    ("notobject.jsonl", [GOOD, "[1, 2]"], "notobject.jsonl:2: expected a JSON object"),
])
def test_hh_bad_records(tmp_path, name, lines, expect):
    path = _jsonl(tmp_path / name, lines)
    with pytest.raises(InputError) as e:
        D.hh_pairs(path)
    assert expect in str(e.value) and str(tmp_path) in str(e.value)


def test_hh_bad_files(tmp_path):
    with pytest.raises(InputError, match="missing.jsonl: file not found"):
        D.hh_pairs(tmp_path / "missing.jsonl")
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(gzip.compress(("\n".join([GOOD] * 50)).encode())[:40])
    with pytest.raises(InputError, match="cut.jsonl.gz: cannot read"):
        D.hh_pairs(cut)
    with pytest.raises(InputError, match="3 pairs; this benchmark uses the first 1,800"):
        D.hh_pairs(_jsonl(tmp_path / "few.jsonl", PAIRS), n=1800)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="empty: a folder without test.jsonl.gz"):
        D.hh_pairs(tmp_path / "empty")


def test_shakespeare_bad_files(tmp_path):
    latin = tmp_path / "latin.txt"
    latin.write_bytes("To be\nor not to be, café\n".encode("latin-1"))
    with pytest.raises(InputError, match=r"latin.txt:2: not UTF-8"):
        D.shakespeare_text(latin)
    with pytest.raises(InputError, match=r"pairs.jsonl: a .jsonl file; expected plain text"):
        D.shakespeare_text(_jsonl(tmp_path / "pairs.jsonl", PAIRS))
    (tmp_path / "blank.txt").write_text("\n \n")
    with pytest.raises(InputError, match="blank.txt: file is empty"):
        D.shakespeare_text(tmp_path / "blank.txt")


# ---------------------------------------------------------------- the scripts


@pytest.mark.parametrize("script", ["hh_rlhf.py", "smollm2_hh.py", "ppo_breakdown.py"])
def test_script_refuses_bad_hh_file(tmp_path, script):
    bad = _jsonl(tmp_path / "bad.jsonl", [GOOD, GOOD, json.dumps({"chosen": PAIRS[2]["chosen"]})])
    proc = _run(BENCH / script, "--data", bad, "--check-data")
    _one_line_error(proc, f"{script}: error: {bad}:3 field 'rejected'")


def test_script_refuses_bad_text(tmp_path):
    bad = tmp_path / "input.txt"
    bad.write_bytes(b"fine\n\xff\xfe\n")
    _one_line_error(_run(BENCH / "shakespeare.py", "--data", bad, "--check-data"),
                    f"shakespeare.py: error: {bad}:2: not UTF-8")


def test_smollm2_hh_refuses_an_unknown_variant(tmp_path):
    proc = _run(BENCH / "smollm2_hh.py", "--model", tmp_path / "m.gguf", "--steps", "variants",
                "--variants", "top8-3ep,top5", "--work", tmp_path / "w")
    assert proc.returncode == 2 and "--variants: no variant top5 (there are top4-4ep-seed0," in proc.stderr, proc.stderr
    assert not (tmp_path / "w").exists(), "refused before anything is written"


def test_script_reads_good_file(tmp_path):
    good = _jsonl(tmp_path / "test.jsonl.gz", [PAIRS[i % 3] for i in range(1800)])
    proc = _run(BENCH / "hh_rlhf.py", "--data", good, "--check-data", "--out", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"data": str(good), "pairs": 1800, "train": 1500, "test": 300}
    assert not (tmp_path / "run").exists(), "--check-data trains nothing and writes nothing"
    text = tmp_path / "input.txt"
    text.write_text(VERSE * 10)
    proc = _run(BENCH / "shakespeare.py", "--data", text, "--check-data")
    assert proc.returncode == 0 and json.loads(proc.stdout)["characters"] == len(VERSE) * 10, proc.stderr


# A benchmark run with no --data where ../shared/data is absent: `datasets` missing, or the Hub unreachable.
NO_SHARED = """
import runpy, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
if sys.argv[2] == "no-datasets":
    sys.modules["datasets"] = None
import data
data.SHARED = Path(sys.argv[3])
sys.argv = sys.argv[4:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("how,script,expect", [
    ("no-datasets", "hh_rlhf.py", "load_dataset('Anthropic/hh-rlhf', data_dir='harmless-base', split='test') needs"),
    ("no-datasets", "shakespeare.py", "load_dataset('karpathy/tiny_shakespeare') needs the `datasets` library"),
    ("offline", "smollm2_hh.py", "load_dataset('Anthropic/hh-rlhf', data_dir='harmless-base', split='test') failed"),
])
def test_no_data_anywhere(tmp_path, how, script, expect):
    cache = str(tmp_path / "hf")  # an empty cache: nothing downloaded before can answer
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": cache, "HF_DATASETS_CACHE": cache}
    model = ["--model", "m.gguf"] if script == "smollm2_hh.py" else []  # read before the model is
    proc = _run("-c", NO_SHARED, BENCH, how, tmp_path / "shared", BENCH / script, *model, env=env)
    line = _one_line_error(proc, f"{script}: error: no --data given and no {tmp_path / 'shared'}", expect)
    assert line.endswith("and pass --data PATH")


def _scripts() -> list[str]:
    return sorted(p.name for p in BENCH.glob("*.py") if 'if __name__ == "__main__"' in p.read_text())


def test_help_from_a_clone_without_shared(tmp_path):
    """`--help` of every benchmark from a copy of the repository with no folder beside it. The three that
    read data sets each run as their own process; the others (most import torch, seconds each) run in one."""
    clone = tmp_path / "clone" / "repo"
    for part in ("alignloop", "benchmarks"):  # with their __pycache__ (kept valid by the copied times)
        shutil.copytree(ROOT / part, clone / part)
    scripts = _scripts()
    data_scripts = ["hh_rlhf.py", "shakespeare.py", "smollm2_hh.py", "ppo_breakdown.py"]
    assert set(data_scripts) <= set(scripts)
    for s in data_scripts:
        proc = _run(clone / "benchmarks" / s, "--help", cwd=clone)
        assert proc.returncode == 0 and "--data PATH" in proc.stdout, proc.stderr
    rest = [s for s in scripts if s not in data_scripts]
    each = ("import runpy, sys\nsys.path.insert(0, 'benchmarks')\nfor s in sys.argv[1:]:\n"
            "    sys.argv = ['benchmarks/' + s, '--help']\n"
            "    try:\n        runpy.run_path(sys.argv[0], run_name='__main__')\n"
            "    except SystemExit as e:\n        assert e.code in (0, None), (s, e.code)\n"
            "    else:\n        raise AssertionError(s + ': --help did not exit')\n    print('ok', s)\n")
    proc = _run("-c", each, *rest, cwd=clone)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("ok ")] == rest
    assert not (tmp_path / "clone" / "shared").exists()


def test_smollm2_hh_held_out_prompts_and_length_control(tmp_path):
    """The PPO report's pieces: each held-out prompt comes with HH's rejected answer to it (a pair whose
    conversation does not parse is left out, not shifted), and the length-controlled score takes out a
    straight line in length fitted by hand: scores 1, 2, 3 at lengths 10, 20, 30 lie on it (slope 0.1),
    so all three become their mean, 2."""
    sys.path.insert(0, str(BENCH))
    try:
        import smollm2_hh as S
    finally:
        sys.path.remove(str(BENCH))

    class Tok:  # the one call hh_prompts makes of a tokenizer: the prompt's length in tokens
        def render_prompt(self, msgs):
            return " ".join(m["content"] for m in msgs).split()
    rows = [PAIRS[0], {"chosen": "no turns here", "rejected": "none"}, PAIRS[1]]
    got = S.hh_prompts(rows, Tok(), 100)
    assert [(m[-1]["content"], r) for m, r in got] == [
        ("What is the capital of France?", "Figure it out yourself."),
        ("How do I pick a lock?", "Get a tension wrench and...")]
    assert S.hh_prompts(rows, Tok(), 6) == got and S.hh_prompts(rows, Tok(), 5) == []  # both prompts: 6 words
    scores, slope = S.length_controlled([1.0, 2.0, 3.0], [10, 20, 30])
    assert slope == pytest.approx(0.1) and scores == pytest.approx([2.0, 2.0, 2.0])
    scores, slope = S.length_controlled([1.0, 0.0, 1.0, 0.0], [10, 10, 20, 20])  # no trend in length
    assert slope == pytest.approx(0.0) and scores == pytest.approx([1.0, 0.0, 1.0, 0.0])


def test_smollm2_hh_summary_of_seeds_by_hand(tmp_path):
    """`--summary s0,s1`: two runs' gains side by side, their mean ± sd (+0.01 and +0.03: +0.020 ± 0.014)
    and how many intervals lie above 0 (one); a run not in the results is named (field 'summary')."""
    sys.path.insert(0, str(BENCH))
    try:
        import smollm2_hh as S
    finally:
        sys.path.remove(str(BENCH))
    from alignloop.errors import InputError

    def gain(m, lo, hi):
        return {"mean": m, "lo": lo, "hi": hi, "n": 69}
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"s0": {"rm_b_gain": gain(0.01, -0.01, 0.03), "length_ratio": 0.9},
                                "s1": {"rm_b_gain": gain(0.03, 0.01, 0.05), "length_ratio": 1.1}}))
    lines = S.summary(path, ["s0", "s1"]).splitlines()
    assert lines[0] == "| figure | `s0` | `s1` | mean ± sd | interval above 0 |"
    assert lines[2] == ("| RM B (never optimised), after − before | +0.010 [-0.010, +0.030] | +0.030 [+0.010, +0.050] "
                        "| +0.020 ± 0.014 | 1 of 2 |")
    assert lines[3] == "| length after / before | 0.90 | 1.10 | 1.00 ± 0.14 | |"
    assert len(lines) == 4                                          # figures no run has are left out
    with pytest.raises(InputError, match="no run s2 in .*there: s0, s1") as e:
        S.summary(path, ["s0", "s2"])
    assert e.value.field == "summary"


def test_ppo_breakdown_flops_by_hand():
    """benchmarks/ppo_breakdown.py's FLOP model on numbers small enough to add by hand: N = 10 weights per
    token, d = 2, V = 3, L = 2 blocks; B = 1 row of P = 2 prompt and R = 1 answer tokens, 3 padded
    positions (T = 3). Forward per token 2·10 + 4·2·3·2 = 68; logits 2·2·3 = 12 per answer token.
    Log-probs: 3·68 + 12 = 216; an update (2 epochs): forward + backward = 2× → 864; the value update with
    the adapters on 1 of the 2 blocks, whose bottom block's output the values pass kept: forward and
    backward through the top block only, 2 · 2 · (1/2) · 204 = 408."""
    sys.path.insert(0, str(BENCH))
    try:
        import ppo_breakdown as PB
    finally:
        sys.path.remove(str(BENCH))
    rec = {"prompt_length": 2, "response_length": 1, "padded_tokens": 3}
    shape = {"n": 10, "d": 2, "vocab": 3, "layers": 2}
    full = PB.flops(rec, shape, 1, 2)
    assert full["policy_logprobs"] == 216 and full["values"] == 204
    assert full["policy_update"] == 864 and full["value_update"] == 816
    assert full["generate"] == 3 * 68 + 12 and full["reward_model"] == 204
    assert PB.flops(rec, shape, 1, 2, value_layers=1)["value_update"] == 408
