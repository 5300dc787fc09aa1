"""The end-of-turn contract on a real tokenizer: SmolLM2-135M-Instruct's (ChatML, from its GGUF) as it is,
and the same with `eos` = <|endoftext|> as base checkpoints have it (eos is then NOT the end of a turn).
Tiny random-weight Llama models built from configs carry them through SFT → reward model → PPO.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from alignloop.engine import Engine
from alignloop.errors import InputError
from alignloop.tokenizer import ChatTokenizer
from tests.conftest import alignloop

CONV = [{"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome, since 1871."}]


@pytest.fixture(scope="module")
def smol_tokenizer(smollm2_gguf, tmp_path_factory):
    """SmolLM2's tokenizer and template, read from its GGUF (no model weights needed)."""
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    path = tmp_path_factory.mktemp("smol-tok") / "as-is"
    hf.save_pretrained(str(path))
    base = path.parent / "eos-differs"   # a base checkpoint's tokenizer: eos is <|endoftext|>, not <|im_end|>
    hf.eos_token = "<|endoftext|>"
    hf.save_pretrained(str(base))
    (base / "generation_config.json").write_text(json.dumps({"eos_token_id": 0, "bos_token_id": 1}))
    return {"as-is": path, "eos-differs": base}


def tiny_model(tok_dir, out, seed=0, tie=True):
    """A 2-layer Llama with SmolLM2's vocabulary and random weights, saved with the tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM
    tok = ChatTokenizer.load(tok_dir)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=tie, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(str(out))
    for f in tok_dir.iterdir():
        shutil.copy(f, out / f.name)
    return out


@pytest.mark.parametrize("variant", ["as-is", "eos-differs"])
def test_end_of_turn_is_the_templates_and_every_eos_stops(smol_tokenizer, variant):
    tok = ChatTokenizer.load(smol_tokenizer[variant])
    im_end, nl = tok.hf.convert_tokens_to_ids("<|im_end|>"), tok.encode("\n")
    assert tok.turn_suffix == [im_end] + nl           # ChatML writes "<|im_end|>\n" after an answer
    assert tok.end_id == im_end
    assert im_end in tok.stop_ids
    if variant == "eos-differs":
        assert tok.eos_id == 0 and 0 in tok.stop_ids   # <|endoftext|> from the tokenizer and generation_config


@pytest.mark.parametrize("variant", ["as-is", "eos-differs"])
def test_mask_is_exactly_each_answer_and_its_end_of_turn(smol_tokenizer, variant):
    tok = ChatTokenizer.load(smol_tokenizer[variant])
    ids, mask = tok.render(CONV)
    assert ids == tok.hf.apply_chat_template(CONV, tokenize=True, return_dict=False)
    learned = [i for i, m in zip(ids, mask) if m]
    assert learned == tok.encode("Paris.") + [tok.end_id] + tok.encode("Rome, since 1871.") + [tok.end_id]


@pytest.mark.parametrize("variant", ["as-is", "eos-differs"])
def test_reward_is_read_where_it_was_trained(smol_tokenizer, variant):
    """PPO scores prompt + sampled ids; the RM trained on rendered conversations: the same sequence, so
    the same last token — whether the answer ended on <|im_end|>, on <|endoftext|>, or was cut off."""
    tok = ChatTokenizer.load(smol_tokenizer[variant])
    prompt = tok.render_prompt(CONV[:3])
    trained_on = tok.render(CONV)[0]
    answer = tok.encode("Rome, since 1871.")
    for stop in tok.stop_ids:
        assert tok.scored_ids(prompt, answer + [stop]) == trained_on
    assert tok.scored_ids(prompt, answer) == trained_on


def test_a_template_that_rewrites_history_is_refused(smol_tokenizer, tmp_path):
    """Qwen3-style: earlier assistant turns lose their reasoning when a new turn is added."""
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(str(smol_tokenizer["as-is"]))
    hf.chat_template = (
        "{% for m in messages %}{% set c = m['content'] %}"
        "{% if m['role'] == 'assistant' and not loop.last %}{% set c = c.split('</think>')[-1] %}{% endif %}"
        "{{ '<|im_start|>' + m['role'] + '\n' + c + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    hf.save_pretrained(str(tmp_path))
    tok = ChatTokenizer.load(tmp_path)
    conv = [CONV[0], {"role": "assistant", "content": "<think>easy</think>Paris."}, CONV[2], CONV[3]]
    with pytest.raises(InputError) as e:
        tok.render(conv)
    assert e.value.field == "chat_template" and "prefix property" in str(e.value)


def test_engine_stops_at_the_templates_end_of_turn_when_eos_differs(smol_tokenizer, tmp_path):
    """A model that says <|im_end|> first: the engine must stop there (finish "stop", no text), although
    the tokenizer's eos is <|endoftext|> — stopping on eos alone ran past the turn."""
    from alignloop.model import load_causal_lm
    path = tiny_model(smol_tokenizer["eos-differs"], tmp_path / "m", tie=False)
    model = load_causal_lm(path)
    tok = ChatTokenizer.load(path)
    with torch.no_grad():  # the residual stream is the token's embedding alone, and only <|im_end|> scores
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight[:] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[tok.end_id] = 1.0
    out = Engine(model, tok).chat(CONV[:1], max_new_tokens=8, temperature=0)
    assert out.ids == [tok.end_id] and out.finish_reason == "stop" and out.text == ""


# ---------------------------------------------------------------- SFT → reward model → PPO


@pytest.fixture(scope="module")
def smol_run(smol_tokenizer, tmp_path_factory):
    """SFT and a reward model on the eos-differs tokenizer, tiny random weights."""
    root = tmp_path_factory.mktemp("smol-run")
    base = tiny_model(smol_tokenizer["eos-differs"], root / "base")
    demos = [{"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                           {"role": "assistant", "content": f"It is {a + b}."}]} for a in range(6) for b in range(5)]
    (root / "demos.jsonl").write_text("".join(json.dumps(d) + "\n" for d in demos))
    pairs = [{"prompt": f"What is {a} plus {b}?", "chosen": f"It is {a + b}.", "rejected": f"It is {a + b + 3}."}
             for a in range(6) for b in range(5)]
    (root / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"What is {a} times 2?"}) + "\n" for a in range(20)))
    run = root / "run"
    alignloop("sft", "--preset", "micro", "--out", run, "--init", base, "--data", root / "demos.jsonl", "--epochs", "2")
    alignloop("reward", "--preset", "micro", "--out", run, "--data", root / "pairs.jsonl", "--demonstrations", "none")
    return run


def test_sft_saves_a_model_whose_end_of_turn_still_stops(smol_run):
    tok = ChatTokenizer.load(smol_run / "sft")
    assert tok.end_id == tok.hf.convert_tokens_to_ids("<|im_end|>") and 0 in tok.stop_ids


def _ppo(run, prompts, **flags):
    """One PPO stage in this process (a subprocess would reload transformers for each case)."""
    from alignloop.config import resolve
    from alignloop.train import ppo as P
    base = dict(prompts=str(prompts), iterations=1, batch_size=8, minibatch_size=4, max_new_tokens=8, probe_prompts=0)
    P.run(resolve(P.Config, "ppo", preset="micro", presets=P.PRESETS, flags=base | flags), run)
    return [json.loads(x) for x in (run / "round-1" / "ppo" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("dtype,temperature", [("float32", 1.0), ("float32", 0.7), ("bfloat16", 1.0), ("bfloat16", 0.7)])
def test_first_ppo_ratio_is_one(smol_run, tmp_path, dtype, temperature):
    """Old, reference and new log-probs under one autocast and from logits / τ: on the first minibatch the
    policy has not moved, so π/π_old must be 1 (|ratio − 1| < 1e-5), in fp32 and under bf16 autocast."""
    run = tmp_path / "run"
    shutil.copytree(smol_run, run)
    rec = _ppo(run, smol_run.parent / "prompts.jsonl", dtype=dtype, temperature=temperature)[-1]
    assert rec["first_ratio_error"] < 1e-5, rec
    assert rec["peak_memory_gb"] > 0


def test_ppo_with_lora_trains_adapters_and_saves_a_plain_merged_folder(smol_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(smol_run, run)
    recs = _ppo(run, smol_run.parent / "prompts.jsonl", iterations=2, lora_rank=4, lr=1e-2)
    from safetensors.torch import load_file
    sft = load_file(str(run / "sft" / "model.safetensors"))
    ppo = load_file(str(run / "round-1" / "ppo" / "model.safetensors"))
    assert sft.keys() == ppo.keys()                              # no LoRA keys: an ordinary HF folder
    changed = [k for k in sft if not torch.equal(sft[k], ppo[k])]
    assert any("q_proj" in k for k in changed) and not any("embed_tokens" in k for k in changed)
    assert recs[0]["first_ratio_error"] < 1e-5
    assert recs[-1]["kl_sampled"] != 0.0                          # the reference (adapters off) differs from the policy


def test_incremental_detokenisation_with_a_real_tokenizer(smol_tokenizer):
    """SmolLM2's byte-level BPE: streamed pieces add up to the full decoding on multibyte text."""
    from alignloop.engine import Detokenizer
    from alignloop.tokenizer import ChatTokenizer
    tok = ChatTokenizer.load(smol_tokenizer["as-is"])
    text = "naïve café — Ünïcödé 東京タワー 🙂🚀 ok, and a plain sentence after it."
    ids = tok.encode(text)
    d = Detokenizer(tok)
    pieces = [d.push(i) for i in ids]
    assert "".join(pieces) == tok.decode(ids) == text and not any("\ufffd" in p for p in pieces)
