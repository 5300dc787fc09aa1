"""Users bring their own Hugging Face model: a Qwen2-architecture model (GQA, q/k/v biases) with a
ChatML tokenizer, and a GPT-2 (no fast path), both made here — no download."""
from __future__ import annotations

import json

import pytest
import torch

from alignloop.engine import Engine
from alignloop.tokenizer import ChatTokenizer
from tests.conftest import alignloop, naive_greedy

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TEXT = "The capital of Valdoria is Mirenth. What is 7 plus 5? It is 12. Hello there, how are you today? " * 40


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator([TEXT], trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHATML)


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    hf = _tokenizer()
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(hf), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False, eos_token_id=hf.eos_token_id, pad_token_id=hf.pad_token_id)
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():  # random biases, so that the fast path must really apply them
        for layer in model.model.layers:
            for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                lin.bias.normal_(0, 0.5)
    path = tmp_path_factory.mktemp("qwen") / "model"
    model.save_pretrained(str(path))
    hf.save_pretrained(str(path))
    return path





def test_foreign_chat_template_renders_and_masks(qwen_dir):
    tok = ChatTokenizer.load(qwen_dir)
    assert not tok.native
    ids, mask = tok.render([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}])
    assert "Hello there" in tok.decode([i for i, m in zip(ids, mask) if m])
    assert "Hi" not in tok.decode([i for i, m in zip(ids, mask) if m])


def test_engine_fast_path_on_qwen2_equals_naive(qwen_dir):
    from alignloop.model import load_causal_lm
    model, tok = load_causal_lm(qwen_dir).eval(), ChatTokenizer.load(qwen_dir)
    eng = Engine(model, tok)
    assert eng.fast
    prompts = [tok.render_prompt([{"role": "user", "content": q}]) for q in ("Hi", "What is 7 plus 5? Tell me.")]
    for p, o in zip(prompts, eng.generate(prompts, max_new_tokens=12, temperature=0)):
        assert o.ids == naive_greedy(model, tok, p, 12)


def test_engine_generic_path_on_gpt2(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    hf = _tokenizer()
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(hf), n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                       eos_token_id=hf.eos_token_id)).eval()
    tok = ChatTokenizer(hf)
    eng = Engine(model, tok)
    assert not eng.fast
    prompts = [tok.render_prompt([{"role": "user", "content": q}]) for q in ("Hi", "What is 7 plus 5? Tell me.")]
    for p, o in zip(prompts, eng.generate(prompts, max_new_tokens=10, temperature=0)):
        assert o.ids == naive_greedy(model, tok, p, 10)


def test_sft_and_reward_on_your_own_model(qwen_dir, tmp_path):
    demos = tmp_path / "demos.jsonl"
    demos.write_text("".join(json.dumps({"prompt": f"What is {i} plus 5?", "completion": f"It is {i + 5}."}) + "\n"
                             for i in range(20)))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"What is {i} plus 5?", "chosen": f"It is {i + 5}.",
                                         "rejected": f"It is {i + 6}."}) + "\n" for i in range(20)))
    run = tmp_path / "run"
    alignloop("sft", "--preset", "micro", "--out", run, "--init", qwen_dir, "--data", demos, "--ptx-fraction", 0,
              "--epochs", 2)
    assert ChatTokenizer.load(run / "sft").hf.chat_template == CHATML
    alignloop("reward", "--preset", "micro", "--out", run, "--data", pairs, "--demonstrations", demos)
    assert (run / "round-1" / "reward" / "config.json").exists()
