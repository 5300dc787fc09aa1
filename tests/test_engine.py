"""The one engine: KV cache equals naive recomputation, batch-mates do not matter (nor who joins or leaves
the continuous batch), log-probs are true."""
from __future__ import annotations

import pytest
import torch

from alignloop.engine import Engine, Params, row_seed
from alignloop.model import load_causal_lm
from alignloop.tokenizer import ChatTokenizer
from tests.conftest import naive_greedy

QUESTIONS = ["What is the capital of Valdoria?", "hi", "Tell me, please, what is 7 plus 5 and why does it matter?"]


@pytest.fixture(scope="module")
def lm(micro_run):
    torch.manual_seed(0)
    model = load_causal_lm(micro_run / "pretrain").eval()
    # A barely trained model is too peaked to notice a broken cache: randomise it a little more.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model, ChatTokenizer.load(micro_run / "pretrain")


def prompts(tok):
    return [tok.render_prompt([{"role": "user", "content": q}]) for q in QUESTIONS]


def test_kv_cache_equals_naive_recompute(lm):
    model, tok = lm
    outs = Engine(model, tok).generate(prompts(tok), max_new_tokens=20, temperature=0)
    for p, o in zip(prompts(tok), outs):
        assert o.ids == naive_greedy(model, tok, p, 20)


def test_generic_path_equals_fast_path(lm):
    model, tok = lm
    fast = Engine(model, tok)
    slow = Engine(model, tok)
    slow.fast = False  # the DynamicCache path used for architectures without a fast path
    a = fast.generate(prompts(tok), max_new_tokens=16, temperature=0)
    b = slow.generate(prompts(tok), max_new_tokens=16, temperature=0)
    assert [o.ids for o in a] == [o.ids for o in b]
    slow.max_batch = 2  # more prompts than slots: static batches one after the other on this path
    c = slow.generate(prompts(tok), max_new_tokens=[16, 5, 9], temperature=0)
    assert [o.ids for o in c] == [o.ids[:n] for o, n in zip(a, [16, 5, 9])]


def test_output_does_not_depend_on_batch_mates(lm):
    model, tok = lm
    eng = Engine(model, tok)
    ps = prompts(tok)
    together = eng.generate(ps, max_new_tokens=16, temperature=0.8, seed=7)
    alone = [eng.generate([p], max_new_tokens=16, temperature=0.8, seed=7)[0] for p in ps[:1]]
    assert together[0].ids == alone[0].ids  # row 0 has the same seed stream alone or in a batch
    # and greedy rows are identical whatever the padding around them
    g_batch = eng.generate(ps, max_new_tokens=16, temperature=0)
    g_alone = [eng.generate([p], max_new_tokens=16, temperature=0)[0] for p in ps]
    assert [o.ids for o in g_batch] == [o.ids for o in g_alone]


def test_logprobs_equal_a_separate_forward_pass(lm):
    model, tok = lm
    outs = Engine(model, tok).generate(prompts(tok), max_new_tokens=12, temperature=1.0, seed=3)
    for p, o in zip(prompts(tok), outs):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([p + o.ids])).logits[0].float()
        # the engine's vocabulary: the tokenizer's rows, less <|pad|>, <|bos|> and the role tokens
        banned = [tok.pad_id, tok.bos_id, *tok.role_ids.values()]
        logits[:, tok.vocab_size:] = float("-inf")
        logits[:, banned] = float("-inf")
        lp = torch.log_softmax(logits[len(p) - 1:-1], -1).gather(-1, torch.tensor(o.ids)[:, None]).squeeze(-1)
        torch.testing.assert_close(torch.tensor(o.logprobs), lp, atol=1e-4, rtol=0)


def test_seed_reproducible_and_stop_strings(lm):
    """Same seed, same tokens; a stop string — a whole word, and one that spans two tokens — is cut at its
    first occurrence and never emitted, and what comes before it is what the unstopped row said."""
    model, tok = lm
    eng = Engine(model, tok)
    ps = prompts(tok)
    a = eng.generate(ps, max_new_tokens=16, temperature=1.0, seed=11)
    b = eng.generate(ps, max_new_tokens=16, temperature=1.0, seed=11)
    assert [o.ids for o in a] == [o.ids for o in b]
    i, full = next((i, o) for i, o in enumerate(a) if len(o.text.split()) > 1 and len(o.ids) > 2)
    pieces = [tok.decode(full.ids[:k]) for k in range(len(full.ids) + 1)]
    k = next(k for k in range(1, len(full.ids)) if len(pieces[k]) > len(pieces[k - 1]) and len(pieces[k + 1]) > len(pieces[k]))
    across = pieces[k][-1] + pieces[k + 1][len(pieces[k])]   # last character of token k, first of token k + 1
    for stop in (full.text.split()[1], across):
        streamed = []
        c = eng.generate([ps[i]], max_new_tokens=16, temperature=1.0, seed=[row_seed(11, i)], stop=[stop],
                         on_token=lambda _, t, out=streamed: out.append(t))[0]
        assert c.finish_reason == "stop" and stop not in c.text, stop
        assert c.text == full.text[:full.text.index(stop)], stop
        assert "".join(streamed) == c.text, stop   # never streamed either, not even its first part


def test_top_k_one_is_greedy_and_per_row_params(lm):
    model, tok = lm
    eng = Engine(model, tok)
    ps = prompts(tok)
    greedy = eng.generate(ps, max_new_tokens=10, temperature=0)
    topk1 = eng.generate(ps, max_new_tokens=10, temperature=1.5, top_k=1, seed=5)
    assert [o.ids for o in greedy] == [o.ids for o in topk1]
    mixed = eng.generate(ps, max_new_tokens=[3, 10, 5], temperature=[0, 0, 0])
    assert [o.ids for o in mixed] == [g.ids[:n] for n, g in zip([3, 10, 5], greedy)]   # each a prefix, of its length


def test_streaming_and_cancel(lm):
    model, tok = lm
    pieces = []
    out = Engine(model, tok).generate(prompts(tok)[:1], max_new_tokens=12, temperature=0,
                                      on_token=lambda i, t: pieces.append(t))
    assert "".join(pieces) == out[0].text
    out = Engine(model, tok).generate(prompts(tok)[:1], max_new_tokens=12, temperature=0, on_token=lambda i, t: False)
    assert out[0].finish_reason == "cancelled" and len(out[0].ids) <= 2


def test_per_row_seeds_are_used_as_given(lm):
    model, tok = lm
    eng = Engine(model, tok)
    ps = prompts(tok)
    alone = eng.generate([ps[1]], max_new_tokens=12, temperature=1.0, seed=[42])[0]
    placed_last = eng.generate([ps[0], ps[2], ps[1]], max_new_tokens=12, temperature=1.0, seed=[1, 2, 42])[2]
    assert alone.ids == placed_last.ids


def test_short_prompt_beside_a_long_one_keeps_its_token_budget(lm):
    model, tok = lm
    eng = Engine(model, tok)
    eng.tok.stop_ids, saved = [], eng.tok.stop_ids
    try:
        long_prompt = tok.render_prompt([{"role": "user", "content": "word " * eng.ctx}])[: eng.ctx - 10]
        short = prompts(tok)[1]
        outs = eng.generate([long_prompt, short], max_new_tokens=30, temperature=0)
        assert len(outs[0].ids) == eng.ctx - len(long_prompt)   # capped by the context
        assert len(outs[1].ids) == 30                            # not by its batch-mate
    finally:
        eng.tok.stop_ids = saved


MULTIBYTE = "naïve café — Ünïcödé 東京タワー 🙂🚀 ok"


def test_incremental_detokenisation_equals_full_decoding_on_multibyte_text(lm):
    """Pushed one token at a time, the pieces add up to decoding all ids at once — also where a character's
    bytes span several tokens (held back until complete: no piece is ever U+FFFD)."""
    from alignloop.engine import Detokenizer
    _, tok = lm
    ids = tok.encode(MULTIBYTE)
    assert len(ids) > len(MULTIBYTE.split())               # the tiny BPE splits the rare characters into bytes
    d = Detokenizer(tok)
    pieces = [d.push(i) for i in ids]
    assert "".join(pieces) == d.text == tok.decode(ids) == MULTIBYTE
    assert not any("\ufffd" in p for p in pieces) and "" in pieces   # some token completed no character


def test_stream_and_stop_string_on_multibyte_answers(lm):
    """Whatever the sampled answer (hot sampling: bytes of rare characters included), the streamed pieces
    add up to the final text."""
    model, tok = lm
    eng = Engine(model, tok)
    ps = prompts(tok)
    pieces = {i: [] for i in range(len(ps))}
    outs = eng.generate(ps, max_new_tokens=24, temperature=1.5, seed=3, on_token=lambda i, t: pieces[i].append(t))
    for i, o in enumerate(outs):
        assert "".join(pieces[i]) == o.text


def test_fused_weights_follow_in_place_updates(lm):
    """The fused q/k/v and gate/up weights are built once and rebuilt when the weights change in place (as
    PPO's optimizer changes them): after an update, one engine answers as a fresh one does."""
    import copy
    model, tok = lm
    model = copy.deepcopy(model)
    eng = Engine(model, tok)
    ps = prompts(tok)
    before = eng.generate(ps, max_new_tokens=12, temperature=0)
    assert eng._fused_layers() is eng._fused_layers()          # cached while nothing changes
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loss = model(input_ids=torch.tensor([ps[0]])).logits.float().pow(2).mean()
    loss.backward()
    opt.step()
    after = eng.generate(ps, max_new_tokens=12, temperature=0)
    fresh = Engine(model, tok).generate(ps, max_new_tokens=12, temperature=0)
    assert [o.ids for o in after] == [o.ids for o in fresh] != [o.ids for o in before]
    eng.release()                                              # PPO under FSDP2: no fused copy kept between calls
    assert eng._fused is None and eng._kv is None
    assert [o.ids for o in eng.generate(ps, max_new_tokens=12, temperature=0)] == [o.ids for o in after]


MORE = QUESTIONS + ["Sort these numbers: 9 2 5 11.", "And its currency?", "Do you know the population of Vrodavia?",
                    "Why?", "Tell me the national animal of Skagaresh, please, and what it eats in winter."]
BUDGETS = [40, 3, 25, 1, 12, 33, 6, 2]   # very different answer lengths: rows leave at very different steps


@pytest.mark.parametrize("temperature", [0, 1.0])
def test_continuous_batching_gives_each_request_what_it_gets_alone(lm, temperature):
    """Eight requests through three slots: rows leave at their own length and waiting requests take their
    slots, yet each request's tokens (greedy, or sampled with its seed) are the ones it gets alone."""
    model, tok = lm
    ps = [tok.render_prompt([{"role": "user", "content": q}]) for q in MORE]
    eng = Engine(model, tok, max_batch=3)
    together = eng.generate(ps, max_new_tokens=BUDGETS, temperature=temperature, seed=5)
    alone = Engine(model, tok, max_batch=1)
    for i, (p, n, o) in enumerate(zip(ps, BUDGETS, together)):
        a = alone.generate([p], max_new_tokens=n, temperature=temperature, seed=[row_seed(5, i)])[0]
        assert (o.ids, o.text, o.finish_reason) == (a.ids, a.text, a.finish_reason), i
        torch.testing.assert_close(torch.tensor(o.logprobs), torch.tensor(a.logprobs), atol=1e-4, rtol=0)
        if temperature == 0:
            assert o.ids == naive_greedy(model, tok, p, n)
    assert len({len(o.ids) for o in together}) > 3   # the rows did end at different steps


def test_no_slot_idles_while_a_request_waits(lm):
    """Driven step by step: in every step the pool holds min(slots, requests outstanding) rows — a row that
    ends frees its slot and the next waiting request runs in it at the very next step."""
    model, tok = lm
    eng = Engine(model, tok, max_batch=2)
    reqs = [eng.submit(tok.render_prompt([{"role": "user", "content": q}]), Params(max_new_tokens=n, temperature=0))
            for q, n in zip(MORE, BUDGETS)]
    first_step = {}
    step = 0
    while not eng.idle:
        outstanding = eng.waiting + eng.running
        ended = eng.step()
        assert eng.running + len(ended) == min(2, outstanding), step
        for r in reqs:
            if r.ids and id(r) not in first_step:
                first_step[id(r)] = step
        step += 1
    assert all(r.done and r.completion.ids == r.ids for r in reqs)
    # the 1-token and 2-token requests came and went while the 40-token one was running
    assert first_step[id(reqs[3])] < first_step[id(reqs[0])] + len(reqs[0].ids)


def test_cancelled_stream_frees_its_slot_at_once(lm):
    """One slot, two requests: the running one is cancelled (from outside, or by its on_token returning
    False) and at the next step the waiting one is generating in its slot; the cancelled one stops there."""
    model, tok = lm
    ps = prompts(tok)
    saved, tok.stop_ids = tok.stop_ids, []   # no early end of turn: only the cancel can end the long rows
    try:
        eng = Engine(model, tok, max_batch=1)
        a = eng.submit(ps[0], Params(max_new_tokens=50, temperature=0))
        b = eng.submit(ps[1], Params(max_new_tokens=50, temperature=0))
        eng.step()
        assert a.ids and not a.done and not b.ids and eng.waiting == 1
        n = len(a.ids)
        a.cancel()
        ended = eng.step()
        assert ended == [a] and a.completion.finish_reason == "cancelled" and len(a.ids) == n
        assert b.ids and eng.running == 1 and eng.waiting == 0
        # cancelled by its stream: on_token returns False at the third piece
        pieces = []
        c = eng.submit(ps[2], Params(max_new_tokens=50, temperature=0), on_token=lambda t: pieces.append(t) or len(pieces) < 3)
        b.cancel()
        eng.step()
        assert c.ids and not c.done
        while not c.done:
            eng.step()
        assert c.completion.finish_reason == "cancelled" and len(pieces) == 3 and len(c.ids) < 50
        d = eng.submit(ps[1], Params(max_new_tokens=4, temperature=0))
        eng.step()
        assert d.ids and eng.running == 1
        eng.run_until_idle()
        assert d.completion.ids == Engine(model, tok).generate([ps[1]], max_new_tokens=4, temperature=0)[0].ids
    finally:
        tok.stop_ids = saved


def test_submit_from_other_threads_while_one_worker_steps(lm):
    """The server's pattern: one worker thread drives step(); requests arrive from other threads at any
    time, stream their text and are told when they are done; each gets what it gets alone."""
    import threading
    import time
    model, tok = lm
    eng = Engine(model, tok, max_batch=2)
    wake, closing = threading.Event(), threading.Event()

    def worker():
        while not closing.is_set():
            if eng.idle:
                wake.wait(0.05)
                wake.clear()
            else:
                eng.step()
    t = threading.Thread(target=worker)
    t.start()
    try:
        ps = [tok.render_prompt([{"role": "user", "content": q}]) for q in MORE[:5]]
        finished, streamed, reqs = [], {}, []
        for i, p in enumerate(ps):
            streamed[i] = []
            reqs.append(eng.submit(p, Params(max_new_tokens=BUDGETS[i], temperature=1.0, seed=100 + i),
                                   on_token=streamed[i].append, on_done=finished.append))
            wake.set()
        deadline = time.monotonic() + 60
        while len(finished) < len(ps) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sorted(map(id, finished)) == sorted(map(id, reqs))
    finally:
        closing.set()
        t.join()
    alone = Engine(model, tok, max_batch=1)
    for i, (p, r) in enumerate(zip(ps, reqs)):
        a = alone.generate([p], max_new_tokens=BUDGETS[i], temperature=1.0, seed=[100 + i])[0]
        assert r.completion.ids == a.ids and "".join(streamed[i]) == r.completion.text == a.text


def test_top_p_within_top_k_samples_from_the_hand_computed_nucleus():
    """With top-k on every row, top-p orders only the k largest logits (no sort of the vocabulary): every
    draw lies in the nucleus worked out here from a full sort, with its renormalised log-prob."""
    from alignloop.engine import Params, _Sampler
    g = torch.Generator().manual_seed(3)
    V, ks, p = 50, [5, 10, 3, 7], 0.7
    logits = torch.randn(len(ks), V, generator=g) * 2
    sampler = _Sampler([Params(top_k=k, top_p=p, gen=torch.Generator().manual_seed(i)) for i, k in enumerate(ks)],
                       torch.ones(V, dtype=torch.bool))
    for _ in range(200):
        nxt, lp = sampler(logits)
        for b, k in enumerate(ks):
            order = torch.sort(logits[b], descending=True).indices[:k]
            probs = torch.softmax(logits[b][order], -1)
            keep = order[(probs.cumsum(-1) - probs) < p]              # the mass before a token is below p
            expected = torch.log_softmax(logits[b][keep], -1)
            assert int(nxt[b]) in keep.tolist()
            assert float(lp[b]) == pytest.approx(float(expected[keep.tolist().index(int(nxt[b]))]), abs=1e-5)


@pytest.mark.parametrize("spread", [5.0, 0.01])  # 5: every nucleus inside the 256 candidates (their mass ≥ 0.99); 0.01: none
def test_top_p_over_a_large_vocabulary_keeps_the_hand_computed_nucleus(spread):
    """Without top-k, top-p finds its cut among each row's largest logits (no sort of the vocabulary), or,
    for a flat row whose candidates hold less than p (spread 0.01: 256 of 5,000 near-equal logits), over the
    whole row: either way every draw lies in the nucleus worked out here from a full sort, with its
    renormalised log-prob; rows with p = 1 and greedy rows beside them are untouched."""
    from alignloop.engine import Params, _Sampler
    g = torch.Generator().manual_seed(4)
    V, ps = 5000, [0.9, 0.5, 1.0, 0.95]
    logits = torch.randn(len(ps) + 1, V, generator=g) * spread
    params = [Params(top_p=p, gen=torch.Generator().manual_seed(i)) for i, p in enumerate(ps)] + [Params(temperature=0)]
    sampler = _Sampler(params, torch.ones(V, dtype=torch.bool))
    for _ in range(100):
        nxt, lp = sampler(logits)
        assert int(nxt[-1]) == int(logits[-1].argmax())                # the greedy row
        for b, p in enumerate(ps):
            order = torch.sort(logits[b], descending=True).indices
            probs = torch.softmax(logits[b][order], -1)
            keep = order[(probs.cumsum(-1) - probs) < p]
            expected = torch.log_softmax(logits[b][keep], -1)
            assert int(nxt[b]) in keep.tolist()
            assert float(lp[b]) == pytest.approx(float(expected[keep.tolist().index(int(nxt[b]))]), abs=1e-4)


def _arch(kind: str, vocab: int):
    """A fresh small model of each fast-path architecture with the features the engine must honour:
    grouped-query attention (2 key/value heads for 4 query heads), Qwen2's q/k/v biases, Qwen3's per-head
    q/k norms, an untied head."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM
    cfg, cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
                "qwen3": (Qwen3Config, Qwen3ForCausalLM)}[kind]
    torch.manual_seed(1)
    model = cls(cfg(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                    tie_word_embeddings=False)).eval()
    with torch.no_grad():
        for p in model.parameters():  # random norms and biases too, so that each must really be applied
            p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_every_fast_architecture_equals_naive_recompute_as_rows_join_and_leave(lm, kind):
    """Greedy tokens of the fast path (its own forward: fused projections, folded rotary, one flat batch of
    running rows and newcomers' prompts) equal full recomputation by the model's own forward — for GQA,
    biases and Qwen3's q/k norms — with two slots and rows of different lengths joining and leaving."""
    _, tok = lm
    model = _arch(kind, tok.vocab_size)
    eng = Engine(model, tok, max_batch=2)
    assert eng.fast
    ps = [tok.render_prompt([{"role": "user", "content": q}]) for q in MORE[:5]]
    budgets = [9, 2, 6, 1, 4]
    outs = eng.generate(ps, max_new_tokens=budgets, temperature=0)
    for p, n, o in zip(ps, budgets, outs):
        assert o.ids == naive_greedy(model, tok, p, n)


def test_a_newcomers_prompt_rides_in_the_running_rows_forward(lm):
    """A step that admits a request while others decode runs the model ONCE (its prompt and their next
    tokens in one flat batch), and gives the newcomer its first token and each running row one token."""
    model, tok = lm
    eng = Engine(model, tok, max_batch=3)
    ps = prompts(tok)
    a = eng.submit(ps[0], Params(max_new_tokens=30, temperature=0))
    b = eng.submit(ps[2], Params(max_new_tokens=30, temperature=0))
    eng.step()
    eng.step()
    calls = []
    hook = model.model.embed_tokens.register_forward_hook(lambda *_: calls.append(1))
    try:
        c = eng.submit(ps[1], Params(max_new_tokens=30, temperature=0))
        before = (len(a.ids), len(b.ids))
        eng.step()
    finally:
        hook.remove()
    assert len(calls) == 1
    assert (len(a.ids), len(b.ids), len(c.ids)) == (before[0] + 1, before[1] + 1, 1)
    eng.run_until_idle()
    assert c.completion.ids == Engine(model, tok).generate([ps[1]], max_new_tokens=30, temperature=0)[0].ids


def test_device_given_as_a_string(lm):
    """`Engine(model, tok, "cpu")`, as callers write it, works like a torch.device."""
    model, tok = lm
    a = Engine(model, tok, "cpu").generate(prompts(tok)[:2], max_new_tokens=6, temperature=0)
    b = Engine(model, tok, torch.device("cpu")).generate(prompts(tok)[:2], max_new_tokens=6, temperature=0)
    assert [o.ids for o in a] == [o.ids for o in b]
