"""No silent path (issue 25): a failed generation in the server is logged with its traceback and request id;
a model folder of the wrong kind is refused by name; eval's kl_exact is measured at the sampling temperature;
the report says which reward-model file it could not read; the engine says when a model runs with static
batches. Real tiny models and files, built here."""
from __future__ import annotations

import asyncio
import json
import logging

import pytest
import torch

from alignloop.errors import InputError
from alignloop.tokenizer import ChatTokenizer, train_tokenizer
from tests.conftest import alignloop

TEXT = ("The capital of Valdoria is Mirenth. Quiz night! What is the currency of Skagaresh? "
        "7 plus 5 is 12. Tell me about the national animal of Kivis, please.\n") * 20
HI = [{"role": "user", "content": "What is the capital of Valdoria?"}]


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> ChatTokenizer:
    path = tmp_path_factory.mktemp("tok")
    train_tokenizer([TEXT], vocab_size=400).save(path)
    return ChatTokenizer.load(path)


def llama(tok, seed: int, noise: float = 0.0, **config):
    """A micro Llama on `tok`'s vocabulary; `noise` makes its next-token distributions less flat than a fresh
    model's, `config` overrides fields of its config (vocab_size, tie_word_embeddings, …)."""
    from transformers import LlamaForCausalLM

    from alignloop.model import llama_config
    torch.manual_seed(seed)
    cfg = llama_config("micro", tok.vocab_size, tok)
    for k, v in config.items():
        setattr(cfg, k, v)
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * noise)
    return model


# ---------------------------------------------------------------- 1. the server's failed generations


def test_a_failed_generation_is_logged_with_its_traceback_and_request_id(tok, caplog):
    """A model whose embedding table is smaller than its tokenizer's vocabulary (a mismatched tokenizer)
    fails inside the engine on the first prompt token beyond its table: the request gets a clean 500 that
    names its id, the server's log has the traceback under that id, and the worker lives on (another
    model's request completes)."""
    from alignloop.engine import Engine
    from alignloop.serve.errors import APIError
    from alignloop.serve.scheduler import Generator
    from alignloop.serve.settings import Served, Settings

    bad = llama(tok, 0, vocab_size=16)  # 16 embedding rows for a 400-token vocabulary
    good = llama(tok, 0)
    gen = Generator({"bad": Served("bad", None, Engine(bad, tok, max_batch=4), tok),
                     "good": Served("good", None, Engine(good, tok, max_batch=4), tok)},
                    Settings(max_batch=4, gather_s=0.001))
    job = gen.job("bad", HI, max_tokens=4)
    assert max(job.prompt) >= 16  # the prompt holds ids beyond the model's embedding table

    async def answer(j):
        run = await gen.start(j)
        return await run.completions()
    try:
        with caplog.at_level(logging.ERROR, logger="alignloop.serve"):
            with pytest.raises(APIError) as failed:
                asyncio.run(answer(job))
            outs = asyncio.run(answer(gen.job("good", HI, max_tokens=4)))  # the worker still serves
    finally:
        gen.scheduler.close()
    assert failed.value.status == 500 and job.id in failed.value.message and "IndexError" in failed.value.message
    assert len(outs) == 1 and 1 <= len(outs[0].ids) <= 4
    mine = [r for r in caplog.records if r.name == "alignloop.serve" and job.id in r.getMessage()]
    assert len(mine) == 1 and mine[0].levelno == logging.ERROR
    assert mine[0].exc_info and mine[0].exc_info[0] is IndexError and mine[0].exc_info[2] is not None
    assert "'bad'" in mine[0].getMessage()
    assert "Traceback (most recent call last)" in caplog.text and "embedding" in caplog.text


def test_a_request_whose_cache_cannot_be_allocated_fails_and_is_logged(tok, caplog):
    """A model with a 2⁴⁰-token context, and a request for as many tokens: its slot's KV cache cannot be
    allocated (8 TB). The request fails with a 500 naming it, and the log has why — it does not wait forever
    (the engine had taken it out of its queue before the allocation, into no slot)."""
    from alignloop.engine import Engine
    from alignloop.serve.errors import APIError
    from alignloop.serve.scheduler import Generator
    from alignloop.serve.settings import Served, Settings

    huge = llama(tok, 0, max_position_embeddings=2**40)
    gen = Generator({"huge": Served("huge", None, Engine(huge, tok, max_batch=2), tok)},
                    Settings(max_batch=2, gather_s=0.001, max_tokens_limit=2**40))
    job = gen.job("huge", HI, max_tokens=2**40 - 100)

    async def answer():
        run = await gen.start(job)
        return await asyncio.wait_for(run.completions(), 60)
    try:
        with caplog.at_level(logging.ERROR, logger="alignloop.serve"):
            with pytest.raises(APIError) as failed:
                asyncio.run(answer())
    finally:
        gen.scheduler.close()
    assert failed.value.status == 500 and job.id in failed.value.message
    mine = [r for r in caplog.records if job.id in r.getMessage()]
    assert len(mine) == 1 and "can't allocate memory" in mine[0].getMessage() and mine[0].exc_info[2] is not None
    assert gen.models["huge"].engine.idle


# ---------------------------------------------------------------- 2. a folder of the wrong kind


@pytest.fixture(scope="module")
def folders(tok, tmp_path_factory):
    """A causal LM folder and the reward model folder trained from it would be (its trunk, a scalar head),
    each tied as alignloop's models are; and an untied pair whose config.json names no architecture."""
    from alignloop.model import load_scalar_model, save_model
    root = tmp_path_factory.mktemp("folders")
    for name, tied in (("", True), ("-untied", False)):
        save_model(llama(tok, 1, tie_word_embeddings=tied), tok, root / f"lm{name}")
        rm = load_scalar_model(root / f"lm{name}")
        with torch.no_grad():
            rm.score.weight.normal_()  # as trained: not the fresh head's zeros
        save_model(rm, tok, root / f"rm{name}")
    for name in ("lm-untied", "rm-untied"):
        cfg = json.loads((root / name / "config.json").read_text())
        del cfg["architectures"]
        (root / name / "config.json").write_text(json.dumps(cfg))
    return root


def test_a_reward_model_folder_is_refused_as_a_policy(folders):
    from alignloop.model import load_causal_lm
    with pytest.raises(InputError) as e:
        load_causal_lm(folders / "rm")
    assert str(folders / "rm") in str(e.value) and "LlamaForSequenceClassification" in str(e.value)
    assert "not a causal LM" in str(e.value)
    # no architectures to go by: the weights tell (its LM head would start at random)
    with pytest.raises(InputError) as e:
        load_causal_lm(folders / "rm-untied")
    assert str(folders / "rm-untied") in str(e.value)
    assert "missing lm_head.weight" in str(e.value) and "unexpected score.weight" in str(e.value)
    load_causal_lm(folders / "lm")  # the right kind loads
    load_causal_lm(folders / "lm-untied")


def test_a_causal_lm_folder_is_refused_as_a_reward_model(folders):
    from alignloop.model import load_reward_model, load_scalar_model
    with pytest.raises(InputError) as e:
        load_reward_model(folders / "lm")
    assert str(folders / "lm") in str(e.value) and "LlamaForCausalLM" in str(e.value)
    assert "no trained score head" in str(e.value)
    with pytest.raises(InputError) as e:
        load_scalar_model(folders / "lm-untied", trained=True)
    assert "missing score.weight" in str(e.value) and "unexpected lm_head.weight" in str(e.value)
    assert load_reward_model(folders / "rm").score.weight.abs().sum() > 0  # a trained head loads as it is
    load_reward_model(folders / "rm-untied")
    # a training's start (reward model, value model) from a causal LM still gets its fresh zero head
    assert load_scalar_model(folders / "lm").score.weight.abs().sum() == 0
    assert load_scalar_model(folders / "lm-untied").score.weight.abs().sum() == 0


def test_the_cli_refuses_a_reward_model_as_a_policy_in_one_line(folders):
    proc = alignloop("chat", folders / "rm", "--device", "cpu", check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(folders / "rm") in lines[0] and "LlamaForSequenceClassification" in lines[0]


# ---------------------------------------------------------------- 3. kl_exact at the sampling temperature


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from alignloop.cli import run_stage
    from alignloop.world import load_world
    run = tmp_path_factory.mktemp("world") / "run"
    run_stage("world", ["--preset", "micro", "--out", str(run)])
    return load_world(run)


def test_kl_exact_is_measured_at_the_sampling_temperature(tok, world):
    """The policy samples token t of an answer from π_T(·|x<t) = softmax(z_π/T) over the allowed tokens
    (the engine's vocabulary), z_π the policy's logits. kl_exact is the mean over answers of
    Σ_t KL(π_T(·|x<t) ‖ ρ_T(·|x<t)), ρ_T = softmax(z_ρ/T) the reference at the same temperature, where
    KL(p‖q) = Σ_v p_v (log p_v − log q_v) and log p_v = z_v/T − logsumexp(z/T). Here it is computed by
    hand: each answer is re-sampled with eval's seeds (the same tokens: checked against eval's answers),
    then both models run on prompt + answer alone (no batch, no padding), and the KL of each position's
    two distributions is summed over the answer."""
    from alignloop.engine import Engine, row_seed
    from alignloop.evaluate import Config, evaluate_policy
    from alignloop.forward import allowed_tokens
    policy, reference = llama(tok, 2, noise=0.05), llama(tok, 3, noise=0.05)
    T = 0.7
    cfg = Config(temperature=T, max_prompts=5, max_new_tokens=8, seed=11, batch_size=8)
    res = evaluate_policy(policy, tok, world, cfg, "cpu", reference)
    assert res["kl_exact"] is not None

    prompts = [tok.render_prompt(p["messages"]) for p in world.prompts("test")[:5]]
    outs = Engine(policy, tok).generate(prompts, max_new_tokens=8, temperature=T,
                                        seed=[row_seed(cfg.seed, i) for i in range(len(prompts))])
    assert [o.text.strip() for o in outs] == [e["answer"] for e in res["examples"]]
    allowed = allowed_tokens(tok, policy.config.vocab_size)

    def by_hand(temp: float) -> float:
        total = 0.0
        for p, o in zip(prompts, outs):
            ids = torch.tensor([p + o.ids])
            with torch.no_grad():
                zp = policy(input_ids=ids).logits[0].float()[len(p) - 1: len(p) - 1 + len(o.ids)]
                zq = reference(input_ids=ids).logits[0].float()[len(p) - 1: len(p) - 1 + len(o.ids)]
            lp = torch.log_softmax(zp[:, allowed] / temp, -1)
            lq = torch.log_softmax(zq[:, allowed] / temp, -1)
            total += float((lp.exp() * (lp - lq)).sum())
        return total / len(outs)
    assert res["kl_exact"] == pytest.approx(by_hand(T), rel=1e-4)
    assert abs(by_hand(T) - by_hand(1.0)) > 0.05 * by_hand(T)  # the temperature matters here: T = 1 would fail

    greedy = evaluate_policy(policy, tok, world, Config(temperature=0.0, max_prompts=2, max_new_tokens=4), "cpu",
                             reference)
    assert greedy["kl_exact"] is None  # greedy answers come from no distribution to compare


# ---------------------------------------------------------------- 4. the report's unreadable reward-model file


def test_the_report_names_a_reward_model_file_it_cannot_read(tmp_path, capsys):
    from alignloop.report import write_report
    run = tmp_path / "run"
    for i, text in ((1, '{"pair_accuracy": 0.61, "n_pairs": 40'), (2, '{"pair_accuracy": 0.66, "n_pairs": 40}')):
        (run / f"round-{i}" / "reward").mkdir(parents=True)
        (run / f"round-{i}" / "reward" / "eval.json").write_text(text)
    (run / "eval.json").write_text(json.dumps({"stages": {}, "reward_model": {}}))
    page = write_report(run).read_text(encoding="utf-8")
    bad = run / "round-1" / "reward" / "eval.json"
    err = capsys.readouterr().err
    assert f"{bad}: not valid JSON" in err and "left out" in err
    assert f"<b>{bad}</b>: not valid JSON: Expecting" in page and "results are left out" in page
    assert "0.660" in page and "0.610" not in page  # round 2 is in the table, round 1 is not


# ---------------------------------------------------------------- 5. static batches, said once


def test_a_model_without_the_fast_path_says_once_that_it_runs_static_batches(tok, caplog):
    from transformers import GPT2Config, GPT2LMHeadModel

    from alignloop.engine import Engine
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=tok.vocab_size, n_positions=128, n_embd=32, n_layer=2,
                                      n_head=2)).eval()
    with caplog.at_level(logging.WARNING, logger="alignloop.engine"):
        eng = Engine(gpt2, tok, max_batch=2)
        ps = [tok.render_prompt(HI), tok.render_prompt([{"role": "user", "content": "7 plus 5?"}])] * 2
        outs = eng.generate(ps, max_new_tokens=3, temperature=0)
        Engine(llama(tok, 0), tok)  # a fast-path model says nothing
    assert not eng.fast and len(outs) == 4
    said = [r for r in caplog.records if r.name == "alignloop.engine"]
    assert len(said) == 1 and said[0].levelno == logging.WARNING
    msg = said[0].getMessage()
    assert "gpt2 models run with static batches" in msg and "llama, mistral, qwen2, qwen3" in msg
    assert "waits until every row" in msg


def test_saved_model_files_are_readable_by_the_team(folders):
    """A run's files are shared (the labeling app, the chat server and a teammate read them): every file
    save_model writes takes the umask's permissions, as the run's other files do, not safetensors' 0600."""
    import os
    from alignloop.io import umask
    want = 0o666 & ~umask()
    for f in (folders / "lm").iterdir():
        if f.is_file():
            assert os.stat(f).st_mode & 0o777 == want, (f.name, oct(os.stat(f).st_mode & 0o777))
