"""SFT: assistant-only loss, packing without leaks, loss falls, real data shapes, bad input."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from alignloop.model import load_causal_lm
from alignloop.tokenizer import ChatTokenizer
from alignloop.train import sft as S
from tests.conftest import alignloop, alignloop_here, need_shared

CONVS = [
    [{"role": "user", "content": "What is the capital of Valdoria?"}, {"role": "assistant", "content": "It is Mirenth."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
     {"role": "user", "content": "Sort 3 1 2."}, {"role": "assistant", "content": "1 2 3."}],
    [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Steal?"},
     {"role": "assistant", "content": "I'm sorry, but I can't help with that."}],
]


@pytest.fixture(scope="module")
def lm(micro_run):
    return load_causal_lm(micro_run / "pretrain").eval(), ChatTokenizer.load(micro_run / "pretrain")


def test_targets_are_assistant_tokens_only(lm):
    _, tok = lm
    x, y = S.encode(tok, CONVS[1])
    learned = [t for t in y if t != S.IGNORE]
    assert learned == tok.encode("Hello!") + [tok.end_id] + tok.encode("1 2 3.") + [tok.end_id]
    assert len(x) == len(y)


def test_packing_does_not_leak(lm):
    """A packed row gives each conversation exactly the loss it gets alone."""
    model, tok = lm
    examples = [S.encode(tok, c) for c in CONVS]
    ids, tgt, pos, seg = S.pack(examples, seq_len=128, pad_id=tok.pad_id)
    assert ids.shape[0] == 1  # all three share one row
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=S.block_mask(seg), position_ids=pos).logits[0]
        for s, (x, y) in enumerate(examples):
            sel = seg[0] == s
            packed = F.cross_entropy(logits[sel], tgt[0, sel], ignore_index=S.IGNORE)
            alone_logits = model(input_ids=torch.tensor([x])).logits[0]
            alone = F.cross_entropy(alone_logits, torch.tensor(y), ignore_index=S.IGNORE)
            torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)


def test_sft_loss_falls_on_micro(micro_copy):
    alignloop("sft", "--preset", "micro", "--out", micro_copy, "--epochs", 6, "--patience", 0)
    recs = [json.loads(line) for line in (micro_copy / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert recs[-1]["loss"] < recs[0]["loss"]
    vals = [r["val_loss"] for r in recs if "val_loss" in r]
    assert vals[-1] < vals[0]
    assert (micro_copy / "sft" / "chat_template.jinja").exists() or \
        "chat_template" in (micro_copy / "sft" / "tokenizer_config.json").read_text()


def test_self_instruct_field_mapping(micro_copy):
    path = need_shared("self-instruct-seed-tasks.jsonl")
    cfg = S.Config(prompt_field="instruction", input_field="instances[].input", completion_field="instances[].output")
    convs = S.conversations(path, cfg)
    assert len(convs) >= 175
    first = json.loads(path.read_text().splitlines()[0])
    assert convs[0][0]["content"].startswith(first["instruction"])
    assert convs[0][1]["content"] == first["instances"][0]["output"]
    proc = alignloop("sft", "--preset", "micro", "--out", micro_copy, "--data", path, "--epochs", 1,
                     "--prompt-field", "instruction", "--input-field", "instances[].input",
                     "--completion-field", "instances[].output", "--seq-len", 96, "--ptx-fraction", 0)
    assert "were left out" in proc.stdout  # some real demonstrations exceed 96 tokens: counted, one line


@pytest.mark.parametrize("record,field", [
    ({"messages": [{"role": "user", "content": "only a question"}]}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "y"}]}, "messages[0].content"),
    ({"question": "q", "answer": "a"}, "messages"),
])
def test_bad_demonstrations_exit_2_naming_line_and_field(micro_copy, record, field):
    bad = micro_copy / "bad.jsonl"
    good = json.dumps({"prompt": "hi", "completion": "hello"})
    bad.write_text(good + "\n" + json.dumps(record) + "\n")
    proc = alignloop_here("sft", "--preset", "micro", "--out", micro_copy, "--data", bad)
    assert proc.returncode == 2
    assert "bad.jsonl:2" in proc.stderr and field in proc.stderr
    assert not (micro_copy / "sft").exists()


def test_tokenizer_without_chat_template_is_refused(micro_copy):
    """A model folder whose tokenizer is someone else's and carries no chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        (micro_copy / "pretrain" / f).unlink(missing_ok=True)
    raw = Tokenizer(models.BPE(unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator(["plain text with no chat format"] * 10, trainers.BpeTrainer(vocab_size=60, special_tokens=["[UNK]"]))
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="[UNK]").save_pretrained(str(micro_copy / "pretrain"))
    (micro_copy / "tokenizer").rename(micro_copy / "tokenizer-moved")
    proc = alignloop("sft", "--preset", "micro", "--out", micro_copy, check=False)
    assert proc.returncode == 2 and "chat template" in proc.stderr
    assert not (micro_copy / "sft").exists()
