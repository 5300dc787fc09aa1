"""The one generator. Evaluation, PPO rollouts, the labeling app and the chat server all call it.

Sampling with a KV cache: greedy, temperature, top-k, top-p; stops on end-of-turn or on stop strings;
returns text, token ids and per-token log-probs under the sampling distribution.

Continuous batching: the engine holds a pool of `max_batch` slots, each with its own region of a static
KV cache. Every `step()` decodes one token for every live slot; a row that ends (end-of-turn, stop
string, length, cancelled) frees its slot at once, and at the next step a waiting request takes it: its
prompt rides in that step's forward beside the running rows' next tokens (`_step_fast`), and its first
token comes out of it. A
row's tokens sit at cache positions 0.. of its own slot (its rotary positions restart at 0), and its
keys are masked to its own length, so its result does not depend on who runs beside it, joins or leaves.
`generate()` is a call of this scheduler: submit every prompt, step until all are done.

Two model paths, one scheduler:
- fast path (Llama, Mistral, Qwen2/3 — the architectures alignloop creates and most open models): our
  own forward over the model's own modules with the slot cache (no per-step concatenation, one mask per
  step). `transformers`' `generate` re-creates masks, processors and cache bookkeeping every step; for
  small models that overhead IS the cost.
- any other causal LM: its own forward with a `DynamicCache`, left-padded. A `DynamicCache` has one
  length for all rows, so there a batch is static: newcomers wait until every row of it has ended.
"""
from __future__ import annotations

import inspect
import logging
import os
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

FAST_TYPES = {"llama", "mistral", "qwen2", "qwen3"}
log = logging.getLogger("alignloop.engine")


@dataclass
class Completion:
    text: str                      # decoded answer, stop token / stop string excluded
    ids: list[int]                 # sampled ids, the end-of-turn token included when it was sampled
    logprobs: list[float]          # log-prob of each sampled id under the sampling distribution
    finish_reason: str             # "stop" (end token or stop string), "length" or "cancelled"
    prompt_tokens: int = 0
    extra: dict = field(default_factory=dict)


class Request:
    """One prompt in the scheduler: the handle `Engine.submit` returns. `completion` is set when it ends;
    `cancel()` may be called from any thread (the row leaves at the engine's next step)."""

    def __init__(self, prompt: list[int], params: Params, tok, ctx: int,
                 on_token: Callable[[str], bool | None] | None = None,
                 on_done: Callable[[Request], None] | None = None):
        self.prompt, self.params, self.tok = list(prompt), params, tok
        self.on_token, self.on_done = on_token, on_done
        # the row may use the context left after ITS prompt (positions restart at 0 per row)
        self.limit = max(0, min(int(params.max_new_tokens), ctx - len(prompt)))
        self.ids: list[int] = []
        self.logprobs: list[float] = []
        self.completion: Completion | None = None
        self.error: BaseException | None = None     # set when the engine failed while this row was in it
        self.cancelled = False
        self._stop_ids = set(tok.stop_ids)
        self._stops = _stops(params.stop)
        self._reach = max(map(len, self._stops), default=0)  # a stop string completes within this of the new text
        self._detok = Detokenizer(tok) if self._stops or on_token else None
        self._streamed = ""       # what on_token was given so far
        self._cut_text = None     # the answer up to a stop string (its last token may run past it)
        self.slot = -1            # its slot while it runs
        self.cached = 0           # tokens of it in its slot's cache
        self.last = -1            # the last sampled token, the input of its next decode step

    @property
    def done(self) -> bool:
        return self.completion is not None

    def cancel(self) -> None:
        self.cancelled = True

    def _push(self, token: int, logprob: float) -> str | None:
        """Take a sampled token; return the finish reason when the row ends with it, else None."""
        self.ids.append(token)
        self.logprobs.append(logprob)
        self.last = token
        if token in self._stop_ids:
            return "stop"
        reason = None
        if self._detok is not None and (piece := self._detok.push(token)):  # "" while a character is incomplete
            # Decode only the new token's window (linear in the answer's length, not quadratic); a stop
            # string can only have completed within reach of the new piece.
            text = self._detok.text
            cut = _find_stop(text, self._stops, start=max(0, len(text) - len(piece) - self._reach + 1))
            if cut is not None:
                reason, text = "stop", text[:cut]
                self._cut_text = text
                self.ids, self.logprobs = _trim_to_text(self.tok, self.ids, self.logprobs, text)
            if self.on_token and text != self._streamed:
                if self.on_token(text[len(self._streamed):]) is False:
                    reason = "cancelled"
                self._streamed = text
        if reason is None and len(self.ids) >= self.limit:
            reason = "length"
        return reason

    def _finish(self, reason: str) -> None:
        text = self.tok.decode([i for i in self.ids if i not in self._stop_ids])
        cut = _find_stop(text, self._stops)
        text = self._cut_text if self._cut_text is not None else text if cut is None else text[:cut]
        if (self.on_token and reason not in ("cancelled", "error") and text.startswith(self._streamed)
                and len(text) > len(self._streamed)):
            self.on_token(text[len(self._streamed):])  # flush what was held back
        self.slot = -1
        self.completion = Completion(text=text, ids=self.ids, logprobs=self.logprobs, finish_reason=reason,
                                     prompt_tokens=len(self.prompt))
        if self.on_done:
            self.on_done(self)


class Engine:
    """Continuous batching over `max_batch` slots. Call `generate` (blocking, a list of prompts), or
    `submit` requests and drive the scheduler with `step()` / `run_until_idle()` from ONE thread (the
    model is not re-entrant); `submit` and `Request.cancel` are safe from other threads."""

    def __init__(self, model, tok, device=None, max_batch: int = 64):
        self.model, self.tok = model, tok
        self.device = torch.device(device) if device is not None else next(model.parameters()).device  # ("cpu" too)
        self.max_batch = max_batch
        cfg = model.config
        self.ctx = getattr(cfg, "max_position_embeddings", 2048)
        self.fast = cfg.model_type in FAST_TYPES and hasattr(model, "model") and hasattr(model.model, "layers")
        if not self.fast:  # said once per engine: its requests queue behind whole batches, not behind slots
            why = (f"the fast path covers {', '.join(sorted(FAST_TYPES))}" if cfg.model_type not in FAST_TYPES
                   else "its modules are not laid out as transformers' own (no model.layers)")
            log.warning("engine: %s models run with static batches (%s): a request that arrives while a batch "
                        "runs waits until every row of that batch has ended", cfg.model_type, why)
        # padded embedding rows beyond the tokenizer, and <|pad|>, are never sampled (the one vocabulary
        # mask: PPO's and evaluation's log-probs use the same)
        from alignloop.forward import allowed_tokens
        self.allowed = allowed_tokens(tok, model.get_output_embeddings().weight.shape[0])
        self._waiting: deque[Request] = deque()
        self._lock = threading.Lock()
        self._rows: list[Request | None] = []   # slot -> the request running in it
        self._sampler = None                    # the decode step's sampler, rebuilt when the rows change
        self._kv: KVCache | None = None         # the fast path's slot cache (allocated on first use)
        self._hf: _StaticBatch | None = None    # the generic path's static batch
        # the fast path's fused weights (`_fused_layers`), and the weights' versions they were built from
        self._fused: list[_FusedLayer] | None = None
        self._fused_key = None
        self._layers: list[_FusedLayer] | None = None  # the fused weights of the current busy period

    # ------------------------------------------------------------------ public

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens=64, temperature=1.0, top_p=1.0, top_k=0,
                 stop=None, seed=None, on_token=None) -> list[Completion]:
        """Sample one completion per prompt (pass a prompt n times for n samples).

        Every sampling parameter is either one value for all prompts or a list with one per prompt, so
        one call can serve requests with different settings. temperature 0 is greedy. Row i samples
        from its own generator seeded by (seed, i): its tokens do not depend on its batch-mates.
        `on_token(i, new_text)` streams text as it is produced; returning False cancels row i
        (finish_reason "cancelled")."""
        if not prompts:
            return []
        n_prompts = len(prompts)

        def per_row(value):  # one value for all rows, or already one per row
            if isinstance(value, (list, tuple)) and len(value) == n_prompts:
                return list(value)
            return [value] * n_prompts
        # `stop` may itself be a list (of stop strings for every row): it is per row only as a list of lists
        stops = stop if isinstance(stop, (list, tuple)) and len(stop) == n_prompts and all(
            s is None or isinstance(s, (list, tuple)) for s in stop) and n_prompts > 0 and any(
            isinstance(s, (list, tuple)) for s in stop) else [stop] * n_prompts
        params = [Params(*row) for row in zip(per_row(max_new_tokens), per_row(temperature), per_row(top_p),
                                              per_row(top_k), stops, per_row(seed))]
        for prompt in prompts:
            self._check(prompt)
        # One seed for the call: row i draws from (seed, i). A list of seeds: row i draws from its own seed
        # exactly, so a request's tokens do not depend on where a server placed it in the batch.
        base_seed = int.from_bytes(os.urandom(5), "little") if any(p.seed is None for p in params) else 0
        own_seeds = isinstance(seed, (list, tuple))
        for i, row_params in enumerate(params):
            if own_seeds and row_params.seed is not None:
                seed_i = row_params.seed
            else:
                seed_i = row_seed(row_params.seed if row_params.seed is not None else base_seed, i)
            row_params.gen = torch.Generator().manual_seed(seed_i)
        reqs = [Request(prompt, params[i], self.tok, self.ctx, on_token and (lambda t, i=i: on_token(i, t)))
                for i, prompt in enumerate(prompts)]
        if self.fast:  # one cache for the whole call, sized for its longest row
            self._reserve(min(n_prompts, self.max_batch), max(len(r.prompt) + r.limit for r in reqs))
        with self._lock:
            # shortest prompts first: on the generic path's static batches that is less padding per batch
            self._waiting.extend(sorted(reqs, key=lambda r: len(r.prompt)))
        was_training = self.model.training
        self.model.eval()
        try:
            while not all(r.done for r in reqs):
                self.step()
        except BaseException:
            for r in reqs:  # a failed or interrupted call leaves nothing of its own behind in the queue
                r.cancel()
            self._drop_cancelled_waiting()
            raise
        finally:
            self.model.train(was_training)
            if self.idle:  # the cache is not kept between calls (PPO trains between them)
                self._kv = None
        return [r.completion for r in reqs]

    def chat(self, messages: list[dict], **kw) -> Completion:
        return self.generate([self.tok.render_prompt(messages)], **kw)[0]

    def submit(self, prompt: list[int], params: Params | None = None,
               on_token: Callable[[str], bool | None] | None = None,
               on_done: Callable[[Request], None] | None = None) -> Request:
        """Queue one prompt; it starts at a step when a slot is free. `on_token(new_text)` streams its text
        (returning False cancels it), `on_done(request)` is called once it has its `completion` (or an
        `error`). Both are called from the thread that runs `step()`. Its generator is seeded by
        `params.seed` exactly (random when None)."""
        params = replace(params) if params else Params()  # its generator is its own, not a shared object's
        self._check(prompt)
        if params.gen is None:
            seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(5), "little")
            params.gen = torch.Generator().manual_seed(int(seed))
        req = Request(prompt, params, self.tok, self.ctx, on_token, on_done)
        with self._lock:
            self._waiting.append(req)
        return req

    @property
    def waiting(self) -> int:
        """Requests queued and not started."""
        return len(self._waiting)

    @property
    def running(self) -> int:
        """Requests in a slot."""
        return sum(r is not None for r in self._rows)

    @property
    def idle(self) -> bool:
        return not self._waiting and not self.running

    def release(self) -> None:
        """Drop the fused weights (and the KV cache when idle) until the next call rebuilds them: a caller
        that holds whole weights only while sampling (PPO under FSDP2) keeps no copy of them in between."""
        self._fused = self._fused_key = None
        if self.idle:
            self._kv = None

    def run_until_idle(self) -> None:
        while not self.idle:
            self.step()

    @torch.inference_mode()
    def step(self) -> list[Request]:
        """One round of the scheduler: cancelled requests leave; waiting requests take the free slots; then
        one forward gives every live row its next token — on the fast path the newcomers' prompts ride in
        the same forward as the running rows' decode (their first token), on the generic path a prefill
        forward starts a static batch. A row that ends frees its slot at once. Returns the requests that
        ended in this round."""
        ended: list[Request] = []
        was_training = self.model.training  # (generate switches once per call, not per step)
        if was_training:
            self.model.eval()
        try:
            ended += self._drop_cancelled_waiting()
            for r in self._rows:
                if r is not None and r.cancelled:
                    ended.append(self._end(r, "cancelled"))
            if self.fast:
                self._compact()  # before `_take`: the newcomers then sit right above the running rows
            new, gone = self._take()
            ended += gone
            if self.fast and self.running:
                ended += self._step_fast(new)
            elif not self.fast:
                if new:
                    ended += self._sample(new, self._prefill_hf(new), _Sampler([r.params for r in new], self.allowed))
                if self.running:
                    ended += self._decode_hf_step()
        except BaseException as e:
            # The cache is in an unknown state: every row in it fails (the caller hears of it), the pool
            # starts afresh, and the queue is kept.
            for r in self._rows:
                if r is not None:
                    r.error = e
                    ended.append(self._end(r, "error"))
            self._rows, self._hf, self._sampler = [], None, None
            raise
        finally:
            if was_training:
                self.model.train()
        return ended

    # ------------------------------------------------------------------ scheduling

    def _check(self, prompt: list[int]) -> None:
        if not prompt:
            raise ValueError("empty prompt")
        if len(prompt) >= self.ctx:  # no room left for even one new token
            raise ValueError(f"prompt of {len(prompt)} tokens does not fit the context of {self.ctx}")

    def _drop_cancelled_waiting(self) -> list[Request]:
        with self._lock:
            gone = [r for r in self._waiting if r.cancelled]
            if gone:
                self._waiting = deque(r for r in self._waiting if not r.cancelled)
        for r in gone:
            r._finish("cancelled")
        return gone

    def _end(self, r: Request, reason: str) -> Request:
        self._rows[r.slot] = None
        self._sampler = None
        r._finish(reason)
        return r

    def _take(self) -> tuple[list[Request], list[Request]]:
        """Waiting requests into free slots, lowest first (on the fast path, after `_compact`, that is
        right above the running rows). On the generic path only into an empty pool (its cache has one
        length for all rows). Returns (the newcomers, requests that ended without needing a slot)."""
        if not self._waiting or (not self.fast and self.running):
            return [], []
        if len(self._rows) < self.max_batch:
            self._rows += [None] * (self.max_batch - len(self._rows))
        free = [slot for slot, r in enumerate(self._rows) if r is None]
        new, ended = [], []
        with self._lock:
            while free and self._waiting:
                r = self._waiting.popleft()
                if r.limit == 0:  # nothing to generate: no slot needed
                    r._finish("length")
                    ended.append(r)
                    continue
                r.slot = free.pop(0)
                new.append(r)
        if not new:
            return new, ended
        fresh = not self.running  # a new busy period: the weights may have changed since the last one
        for r in new:  # in their slots first: should the cache below fail (out of memory), `step` fails them
            self._rows[r.slot] = r  # with the rest instead of leaving them in no slot and no queue, never ending
        self._sampler = None
        if self.fast:
            if fresh:
                self._layers = self._fused_layers()
            self._reserve(max(r.slot for r in new) + 1, max(len(r.prompt) + r.limit for r in new))
        return new, ended

    def _compact(self) -> None:
        """Live rows into the lowest slots, so that a decode step runs over slots [0, live) of the cache
        (views, no gather): the highest row moves into the lowest hole (its cache region is copied)."""
        rows = self._rows
        while True:
            holes = [slot for slot, r in enumerate(rows) if r is None]
            top = max((slot for slot, r in enumerate(rows) if r is not None), default=-1)
            if not holes or holes[0] > top:
                return
            dst, r = holes[0], rows[top]
            self._kv.move_slot(dst, top, r.cached)
            rows[dst], rows[top], r.slot = r, None, dst
            self._sampler = None

    def _sample(self, rows, logits, sampler) -> list[Request]:
        tokens, logprobs = sampler(logits)
        ended = []
        for r, token, logprob in zip(rows, tokens.tolist(), logprobs.tolist()):
            if r is not None and (reason := r._push(token, logprob)):
                ended.append(self._end(r, reason))
        return ended

    # ------------------------------------------------------------------ fast path: the slot cache

    def _reserve(self, slots: int, length: int) -> None:
        """A cache of at least `slots` slots of `length` positions (grown by copying; its length at least
        doubled, up to the context, so that a stream of newcomers does not reallocate at every join)."""
        old = self._kv
        if old is not None and old.fits(slots, length):
            return
        if old is not None:
            slots = max(slots, old.slots)
            length = max(length, min(self.ctx, 2 * old.capacity))
        new = KVCache.allocate(self.model, slots, length, self.device)
        if old is not None:
            new.copy_from(old)
        self._kv = new

    def _step_fast(self, new: list[Request]) -> list[Request]:
        """One forward for every live row. After `_compact` and `_take` the rows sit in the lowest slots:
        the running rows first (one token each: their last sampled one), then the newcomers (their whole
        prompt). All their tokens go through the model as ONE flat batch (`_flat_batch`: each newcomer
        right-padded to the longest new prompt): the linear layers, norms and rotary run once for all of
        them; only attention is split (`_attend`) — a running row's query reads its slot's cache up to its
        own position, a newcomer's prompt attends causally within itself. Each row's keys and values are
        written at (its slot, its position); a pad position's are overwritten before any query sees them."""
        backbone = self.model.model
        rows = self._rows[: self.running]
        batch = self._flat_batch(rows, new)
        plain = not torch.is_autocast_enabled(self.device.type)  # fused adds / norms only where they mean the same
        hidden = backbone.embed_tokens(batch.ids)                                    # (tokens, hidden size)
        for i, layer in enumerate(backbone.layers):
            hidden = self._layer_step(i, layer, self._layers[i], hidden, batch, plain)
        for r in rows[:batch.n_running]:
            r.cached += 1
        for r in new:
            r.cached = len(r.prompt)
        # a row's next token comes from its last position: a running row's one token, a newcomer's last
        # real prompt token (not its padding)
        if batch.n_tokens == batch.n_running:
            last_hidden = hidden
        else:
            last = list(range(batch.n_running)) + [batch.n_running + b * batch.prompt_len + len(r.prompt) - 1
                                                   for b, r in enumerate(new)]
            last_hidden = hidden[torch.tensor(last, device=self.device)]
        logits = self.model.lm_head(_norm(backbone.norm, last_hidden, plain))
        if self._sampler is None:
            self._sampler = _Sampler([r.params for r in rows], self.allowed)
        return self._sample(rows, logits, self._sampler)

    def _flat_batch(self, rows: list[Request], new: list[Request]) -> _FlatBatch:
        """The inputs of one fast-path forward: token ids, (slot, position) of each token, its rotary
        rows, and the two attention masks. `rows` are the live rows in slot order, `new` the newcomers among
        them (its last ones)."""
        cache, dev = self._kv, self.device
        n_running, n_new = len(rows) - len(new), len(new)
        prompt_len = max((len(r.prompt) for r in new), default=0)
        ids = [r.last for r in rows[:n_running]]
        slots, positions = list(range(n_running)), [r.cached for r in rows[:n_running]]
        for r in new:
            ids += r.prompt + [self.tok.pad_id] * (prompt_len - len(r.prompt))
            slots += [r.slot] * prompt_len
            positions += range(prompt_len)
        n_tokens = len(ids)
        ids_t, slots_t, positions_t = (torch.tensor(v, device=dev) for v in (ids, slots, positions))
        batch = _FlatBatch(n_running=n_running, n_new=n_new, prompt_len=prompt_len, n_tokens=n_tokens,
                           ids=ids_t, slots=slots_t, positions=positions_t,
                           cos=cache.cos[positions_t][:, None], sin=cache.sin[positions_t][:, None])  # (tokens, 1, hd)
        if n_running:
            # the running rows read keys [0, span) of their slots; each masks the positions past its own
            batch.span = max(positions[:n_running]) + 1
            batch.group = self.model.model.config.num_attention_heads // cache.kv_heads  # GQA group size
            current = positions_t[:n_running]
            # the additive mask of the running rows' queries over their slots' positions, one per step
            bias = torch.zeros(n_running, batch.span, dtype=cache.keys.dtype, device=dev).masked_fill(
                cache.positions[None, :batch.span] > current[:, None], float("-inf"))
            batch.decode_bias = bias[:, None, None].expand(n_running, cache.kv_heads, batch.group, batch.span) \
                .reshape(n_running * cache.kv_heads, batch.group, batch.span)
        if n_new:
            lengths = torch.tensor([len(r.prompt) for r in new], device=dev)
            at = cache.positions[:prompt_len]
            # causal, own prompt only; a pad query sees the prompt (no empty row)
            batch.prefill_mask = ((at[:, None] >= at[None, :])[None]
                                  & (at[None, None, :] < lengths[:, None, None]))[:, None]
        return batch

    def _layer_step(self, i: int, layer, weights: _FusedLayer, hidden, batch: _FlatBatch, plain: bool):
        """Decoder layer `i` over the flat batch, as the model's own forward computes it: attention (its
        keys and values into the cache first) and the MLP, each with its residual add. q, k, v are the
        usual notation: queries (tokens, heads, hd), keys and values (tokens, kv heads, hd)."""
        cache = self._kv
        head_dim, n_tokens = cache.head_dim, batch.n_tokens
        qkv = F.linear(_norm(layer.input_layernorm, hidden, plain), weights.qkv_w, weights.qkv_b)
        q_width, k_width = weights.q_width, weights.k_width
        attn = layer.self_attn
        if hasattr(attn, "q_norm"):  # Qwen3 normalises q and k per head before the rotation
            q = attn.q_norm(qkv[:, :q_width].view(n_tokens, -1, head_dim))
            k = attn.k_norm(qkv[:, q_width:q_width + k_width].view(n_tokens, -1, head_dim))
            qk = _rope(torch.cat([q, k], 1), batch.cos, batch.sin)
        else:  # q and k are side by side in the fused output: rotated together
            qk = _rope(qkv[:, :q_width + k_width].view(n_tokens, -1, head_dim), batch.cos, batch.sin)
        n_heads = q_width // head_dim
        q, k = qk[:, :n_heads], qk[:, n_heads:]
        v = qkv[:, q_width + k_width:].view(n_tokens, cache.kv_heads, head_dim)
        if qkv.dtype != cache.keys.dtype:  # (autocast computes the projections in bf16)
            k, v = k.to(cache.keys.dtype), v.to(cache.values.dtype)
        cache.write(i, batch.slots, batch.positions, k, v)
        hidden = _add_linear(hidden, self._attend(i, q, k, v, batch), weights.o_w, weights.o_b, plain)
        gate, up = F.linear(_norm(layer.post_attention_layernorm, hidden, plain), weights.gate_up_w,
                            weights.gate_up_b).split(weights.ff_width, -1)
        return _add_linear(hidden, layer.mlp.act_fn(gate) * up, weights.down_w, weights.down_b, plain)

    def _attend(self, i: int, q, k, v, batch: _FlatBatch):
        """Attention of layer `i` for the flat batch's tokens: the running rows' one query each over their
        slots' cached keys (this step's included), the newcomers' prompts causally over themselves.
        Returns (tokens, heads · head_dim)."""
        cache, head_dim = self._kv, self._kv.head_dim
        n_running, n_new, prompt_len = batch.n_running, batch.n_new, batch.prompt_len
        out = []
        if n_running:
            # one query per row: a masked product with the slot's keys and one with its values
            keys, values = cache.history(i, n_running, batch.span)        # (rows · kv heads, span, hd)
            queries = q[:n_running].reshape(n_running * cache.kv_heads, batch.group, head_dim)
            scores = torch.baddbmm(batch.decode_bias, queries, keys.transpose(1, 2), alpha=head_dim ** -0.5)
            probs = torch.softmax(scores, -1) if scores.dtype == torch.float32 else \
                torch.softmax(scores.float(), -1).to(values.dtype)
            out.append(torch.bmm(probs, values).view(n_running, -1))
        if n_new:  # (newcomers, heads, prompt length, hd)
            q_new, k_new, v_new = (t[n_running:].view(n_new, prompt_len, -1, head_dim).transpose(1, 2)
                                   for t in (q, k, v))
            prefill = F.scaled_dot_product_attention(q_new, k_new, v_new, attn_mask=batch.prefill_mask,
                                                     enable_gqa=k_new.shape[1] != q_new.shape[1])
            out.append(prefill.transpose(1, 2).reshape(n_new * prompt_len, -1))
        return out[0] if len(out) == 1 else torch.cat(out)

    def _fused_layers(self) -> list[_FusedLayer]:
        """Each layer's weights as the engine uses them: q/k/v and gate/up concatenated (2 matmuls where
        the model does 5), o and down as they act now. Built once per version of the weights: PPO's
        optimizer updates the policy in place between calls, which bumps every updated tensor's version
        counter (LoRA adapters included), so the key below changes exactly then; a LoRA layer's adapters
        switched off or merged (the reference policy) change it too."""
        key = (tuple((id(param), param._version) for param in self.model.parameters()),
               tuple((mod.disable_adapters, mod.merged, tuple(mod.active_adapters)) for mod in self.model.modules()
                     if hasattr(mod, "base_layer") and hasattr(mod, "get_delta_weight")))
        if self._fused_key == key:
            return self._fused
        self._fused_key, self._fused = key, self._build_fused_layers()
        return self._fused

    def _build_fused_layers(self) -> list[_FusedLayer]:
        def stacked(linears, attr: str):  # the linears' weights (or biases) one above the other, as one linear
            if _effective(linears[0], attr) is None:
                return None
            return torch.cat([_effective(linear, attr) for linear in linears])

        out = []
        for layer in self.model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            qkv, gate_up = (attn.q_proj, attn.k_proj, attn.v_proj), (mlp.gate_proj, mlp.up_proj)
            out.append(_FusedLayer(
                qkv_w=stacked(qkv, "weight"), qkv_b=stacked(qkv, "bias"),
                q_width=attn.q_proj.weight.shape[0], k_width=attn.k_proj.weight.shape[0],
                gate_up_w=stacked(gate_up, "weight"), gate_up_b=stacked(gate_up, "bias"),
                ff_width=mlp.gate_proj.weight.shape[0],
                o_w=_effective(attn.o_proj, "weight"), o_b=_effective(attn.o_proj, "bias"),
                down_w=_effective(mlp.down_proj, "weight"), down_b=_effective(mlp.down_proj, "bias")))
        return out

    # ------------------------------------------------------------------ generic path: a static batch

    def _decode_hf_step(self) -> list[Request]:
        """One token for every slot of the static batch (an ended row's slot decodes a pad token until
        its batch ends)."""
        top = max(slot for slot, r in enumerate(self._rows) if r is not None) + 1
        rows = self._rows[:top]
        if self._sampler is None:
            self._sampler = _Sampler([r.params if r is not None else _IDLE for r in rows], self.allowed)
        ids = torch.tensor([r.last if r is not None else self.tok.pad_id for r in rows], device=self.device)
        logits = self._decode_hf(rows, ids)
        return self._sample(rows, logits, self._sampler)

    def _prefill_hf(self, new: list[Request]):
        """The batch's prompts LEFT-padded into a fresh `DynamicCache`: row b's pad keys are masked, its
        rotary positions start at 0 at its first real token. The batch's rows take slots 0..len(new)-1."""
        from transformers import DynamicCache
        dev, n_rows = self.device, len(new)
        width = max(len(r.prompt) for r in new)  # the longest prompt: every row is padded to it
        assert [r.slot for r in new] == list(range(n_rows))
        pad = torch.tensor([width - len(r.prompt) for r in new], device=dev)
        ids = torch.full((n_rows, width), self.tok.pad_id, dtype=torch.long)
        for b, r in enumerate(new):
            ids[b, width - len(r.prompt):] = torch.tensor(r.prompt)
        key_ok = torch.arange(width, device=dev)[None] >= pad[:, None]
        positions = (torch.arange(width, device=dev)[None] - pad[:, None]).clamp(min=0)
        self._hf = _StaticBatch(cache=DynamicCache(config=self.model.config), key_ok=key_ok, pad=pad, length=width)
        return self._forward_hf(ids.to(dev), positions)

    def _decode_hf(self, rows, ids):
        batch = self._hf
        n_rows = batch.pad.shape[0]
        if len(ids) < n_rows:  # the batch's highest rows have ended: they still decode (a pad token)
            ids = torch.cat([ids, ids.new_full((n_rows - len(ids),), self.tok.pad_id)])
        batch.key_ok = torch.cat([batch.key_ok, batch.key_ok.new_ones(n_rows, 1)], 1)
        positions = (batch.length - batch.pad).clamp(min=0).view(n_rows, 1)
        batch.length += 1
        return self._forward_hf(ids.view(n_rows, 1), positions)[:len(rows)]

    def _forward_hf(self, ids, positions):
        # A 2-D padding mask over every position so far; the model builds its own causal mask from it.
        batch = self._hf
        out = self.model(input_ids=ids, attention_mask=batch.key_ok.long(), position_ids=positions,
                         **{_cache_kwarg(self.model): batch.cache}, use_cache=True)
        return out.logits[:, -1]


def _cache_kwarg(model) -> str:
    """The name this model's forward takes its KV cache by: transformers renamed `past_key_values` to
    `cache` (the old name warns from 5.2x and goes in 5.40), and a model of an older release or of its own
    code may know only the old one."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


# ---------------------------------------------------------------------- the engine's state


@dataclass(eq=False)
class KVCache:
    """The fast path's slot cache: for every layer, `slots` regions of `capacity` positions. A row's keys
    and values sit in its slot at positions 0.. and every query masks the keys past its own position, so
    releasing a slot is forgetting its row (`Engine._end`): nothing is cleared, the next row in the slot
    writes each position before any query reads it. It also holds the rotary table of every position it
    has room for, so that a step looks its tokens' rows up instead of computing them."""

    keys: torch.Tensor         # (layers, slots, kv heads, capacity, head dim)
    values: torch.Tensor       # same shape as keys
    cos: torch.Tensor          # (capacity, head dim): the model's rotary cosine of each position
    sin: torch.Tensor          # (capacity, head dim): its sine, rotate_half's sign folded in (`_rope`)
    positions: torch.Tensor    # arange(capacity), kept to build each step's masks without a new tensor
    head_dim: int
    kv_heads: int              # key/value heads (fewer than query heads under grouped-query attention)

    @classmethod
    def allocate(cls, model, slots: int, length: int, device) -> KVCache:
        """An empty cache of `slots` slots of `length` positions for `model`, in the model's dtype."""
        cfg = model.config
        kv_heads = cfg.num_key_value_heads or cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        dtype = next(model.parameters()).dtype
        shape = (cfg.num_hidden_layers, slots, kv_heads, length, head_dim)
        # Rotary table for every position once (the model's own rotary module: scaling types included).
        # rotate_half(x) = [-x2, x1] = roll(x, hd/2) * [-1…, 1…]: the sign goes into the sine table, so
        # that the rotation is one roll and one multiply-add per step (`_rope`).
        probe = torch.zeros(1, 1, dtype=dtype, device=device)  # only its dtype and device are read
        cos, sin = model.model.rotary_emb(probe, torch.arange(length, device=device)[None])
        sign = torch.ones(head_dim, dtype=sin.dtype, device=device)
        sign[: head_dim // 2] = -1
        return cls(keys=torch.zeros(shape, dtype=dtype, device=device),
                   values=torch.zeros(shape, dtype=dtype, device=device),
                   cos=cos[0], sin=sin[0] * sign, positions=torch.arange(length, device=device),
                   head_dim=head_dim, kv_heads=kv_heads)

    @property
    def slots(self) -> int:
        return self.keys.shape[1]

    @property
    def capacity(self) -> int:
        """Positions per slot."""
        return self.keys.shape[3]

    def fits(self, slots: int, length: int) -> bool:
        return self.slots >= slots and self.capacity >= length

    def copy_from(self, old: KVCache) -> None:
        """Grow: the contents of a smaller cache into this one's first slots and positions (the running
        rows keep their cache across a reallocation)."""
        self.keys[:, :old.slots, :, :old.capacity] = old.keys
        self.values[:, :old.slots, :, :old.capacity] = old.values

    def write(self, layer: int, slots: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor,
              values: torch.Tensor) -> None:
        """One step's keys and values of `layer`: token j's (kv heads, head dim) at (slots[j], positions[j])."""
        self.keys[layer, slots, :, positions] = keys
        self.values[layer, slots, :, positions] = values

    def history(self, layer: int, rows: int, span: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of `layer` in slots [0, rows), positions [0, span), as (rows · kv heads, span,
        head dim) for a batched matmul (the live rows are compacted into the lowest slots: a view)."""
        shape = (rows * self.kv_heads, span, self.head_dim)
        return (self.keys[layer, :rows, :, :span].reshape(shape),
                self.values[layer, :rows, :, :span].reshape(shape))

    def move_slot(self, dst: int, src: int, length: int) -> None:
        """A row's first `length` positions from slot `src` into slot `dst` (`Engine._compact`)."""
        self.keys[:, dst, :, :length] = self.keys[:, src, :, :length]
        self.values[:, dst, :, :length] = self.values[:, src, :, :length]


@dataclass(eq=False)
class _FusedLayer:
    """One decoder layer's weights as the fast path applies them (`Engine._build_fused_layers`)."""
    qkv_w: torch.Tensor              # q, k and v projections stacked: one matmul for all three
    qkv_b: torch.Tensor | None
    q_width: int                     # output rows of qkv_w that are q's; the next k_width are k's, then v's
    k_width: int
    gate_up_w: torch.Tensor          # the MLP's gate and up projections stacked
    gate_up_b: torch.Tensor | None
    ff_width: int                    # output rows of gate_up_w that are the gate's
    o_w: torch.Tensor
    o_b: torch.Tensor | None
    down_w: torch.Tensor
    down_b: torch.Tensor | None


@dataclass(eq=False)
class _FlatBatch:
    """The inputs of one fast-path forward (`Engine._flat_batch`): the running rows' next tokens, then each
    newcomer's prompt right-padded to the longest, as one flat sequence of tokens."""
    n_running: int                   # rows decoding one token each, in slots [0, n_running)
    n_new: int                       # newcomers, their whole prompt each
    prompt_len: int                  # the longest newcomer's prompt: every newcomer's share of the tokens
    n_tokens: int                    # n_running + n_new · prompt_len
    ids: torch.Tensor                # (n_tokens,) token ids
    slots: torch.Tensor              # (n_tokens,) the cache slot of each token
    positions: torch.Tensor          # (n_tokens,) its position in its row: cache position and rotary angle
    cos: torch.Tensor                # (n_tokens, 1, head dim): rotary rows of those positions
    sin: torch.Tensor
    span: int = 0                    # cache positions the running rows read: the furthest of them + 1
    group: int = 1                   # query heads per key/value head (grouped-query attention)
    decode_bias: torch.Tensor | None = None   # (n_running · kv heads, group, span): −inf past a row's position
    prefill_mask: torch.Tensor | None = None  # (n_new, 1, prompt_len, prompt_len): causal within own prompt


@dataclass(eq=False)
class _StaticBatch:
    """The generic path's batch: one `DynamicCache` for all its rows, left-padded to a common length."""
    cache: object                    # transformers' DynamicCache
    key_ok: torch.Tensor             # (rows, length) bool: False at a row's left padding
    pad: torch.Tensor                # (rows,) left padding of each row (its rotary positions start after it)
    length: int                      # positions in the cache so far, padding included


def _effective(linear, attr: str):
    """A linear layer's weight or bias as it acts now. A `peft` LoRA layer (PPO with --lora-rank) keeps
    its base weight aside: its update B·A·scale is added for each active adapter, so the engine samples
    from the policy being trained, not from its frozen base."""
    if hasattr(linear, "base_layer") and hasattr(linear, "get_delta_weight"):
        value = getattr(linear.base_layer, attr)
        if attr == "weight" and not linear.disable_adapters and not linear.merged:
            for name in linear.active_adapters:
                if name in linear.lora_A:
                    value = value + linear.get_delta_weight(name)
        return value
    return getattr(linear, attr, None)


def row_seed(seed: int, i: int) -> int:
    """The seed of row i of a call given one `seed`. A caller that splits such a call (a share of the rows
    per process under torchrun) passes each row `row_seed(seed, i)` of its place i in the whole call, as a
    list of seeds: every row then draws exactly what it draws in one process."""
    return (seed * 1_000_003 + i) % 2**63


@dataclass
class Params:
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: list | str | None = None
    seed: int | None = None
    gen: torch.Generator | None = None


_IDLE = Params(temperature=0)  # an ended row's slot on the generic path: greedy, draws nothing


class _Sampler:
    """Per-row temperature / top-k / top-p, vectorised; one uniform draw per row from its own generator."""

    def __init__(self, params: list[Params], allowed: torch.Tensor):
        self.temp = torch.tensor([max(float(p.temperature), 1e-6) for p in params])[:, None]
        self.greedy_l = [p.temperature <= 0 for p in params]
        self.greedy = torch.tensor(self.greedy_l)
        self.top_p = torch.tensor([float(p.top_p) for p in params])[:, None]
        self.top_k = [int(p.top_k or 0) for p in params]
        self.gens = [p.gen for p in params]
        self.blocked = ~allowed

    def __call__(self, logits: torch.Tensor):
        # Sampled where the logits are (a GPU keeps its rows×vocabulary logits; only one uniform per row
        # from the rows' own CPU generators travels, and one id per row comes back for the stop checks).
        dev = logits.device
        if self.blocked.device != dev:
            self.blocked, self.temp, self.greedy, self.top_p = (x.to(dev) for x in (self.blocked, self.temp, self.greedy, self.top_p))
        logits = logits.float().masked_fill(self.blocked, float("-inf"))
        if any(self.greedy_l):
            greedy_ids = logits.argmax(-1)
            greedy_lp = torch.log_softmax(logits, -1).gather(-1, greedy_ids[:, None]).squeeze(-1)
            if all(self.greedy_l):
                return greedy_ids, greedy_lp
        scaled = logits / self.temp
        vocab = scaled.shape[-1]
        if any(self.top_k):
            ks = torch.tensor([k if 0 < k < vocab else vocab for k in self.top_k], device=dev)
            # the k-th largest of each row from a top-k of the largest k asked, not a sort of the vocabulary
            kth = torch.topk(scaled, int(ks.max()), dim=-1).values.gather(-1, (ks - 1)[:, None])
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        if bool((self.top_p < 1).any()):
            scaled = scaled.masked_fill(scaled < self._nucleus_cut(scaled), float("-inf"))
        logp = torch.log_softmax(scaled, -1)
        # One uniform per sampled row from its own generator (a greedy row draws nothing): a row's draws
        # depend on that row alone, not on who runs beside it.
        uniform = torch.stack([torch.rand((), generator=gen) if not greedy else torch.zeros(())
                               for gen, greedy in zip(self.gens, self.greedy_l)]).to(dev)       # (rows,)
        # inverse-CDF sampling: the first token whose cumulative mass reaches the row's uniform
        cdf = logp.exp().cumsum(-1)
        sampled = torch.searchsorted(cdf, (uniform * cdf[:, -1])[:, None]).squeeze(-1).clamp(max=vocab - 1)
        sampled_lp = logp.gather(-1, sampled[:, None]).squeeze(-1)
        if not any(self.greedy_l):
            return sampled, sampled_lp
        return torch.where(self.greedy, greedy_ids, sampled), torch.where(self.greedy, greedy_lp, sampled_lp)

    # Candidates among which top-p looks for its cut first: a trained model's nucleus at p ≈ 0.9 is mostly
    # narrower; a row whose candidates hold less than its mass p is looked at again with 16 times as many,
    # and then over all its tokens. (A width not under a quarter of the vocabulary is skipped: there a sort
    # of the row costs about as much.)
    NUCLEUS = 256

    def _nucleus_cut(self, scaled: torch.Tensor) -> torch.Tensor:
        """Each row's smallest logit inside its nucleus (−inf for a row with top_p = 1): the most likely
        tokens whose mass before them is below p. Found among the row's largest NUCLEUS logits (a top-k,
        not a sort of the vocabulary: on a 49k vocabulary that sort was most of a decode step); only the
        rows whose candidates do not reach their p (flat distributions) look further. Tokens tied with the
        cut stay together."""
        vocab = scaled.shape[-1]
        # with top-k on every row nothing outside the largest max(k) survives: no row needs more
        widest = max(self.top_k) if all(0 < k < vocab for k in self.top_k) else vocab
        widths = [w for w in (self.NUCLEUS, 16 * self.NUCLEUS) if 4 * w <= widest] + [widest]
        cut = torch.full_like(scaled[:, :1], float("-inf"))
        rows = torch.nonzero(self.top_p[:, 0] < 1).squeeze(-1)
        for width in widths:
            row_logits, row_p = scaled[rows], self.top_p[rows]
            cand = torch.topk(row_logits, width, dim=-1).values   # (rows, width), descending
            if width == vocab:
                probs = torch.softmax(cand, -1)
            else:  # the first candidate is the row's largest logit; the denominator is the whole row's
                probs = (cand - cand[:, :1]).exp() / (row_logits - cand[:, :1]).exp().sum(-1, keepdim=True)
            before = probs.cumsum(-1) - probs
            # the nucleus: the mass before a token is below p (the top token always stays)
            row_cut = cand.masked_fill(before >= row_p, float("inf")).amin(-1, keepdim=True)
            done = (before[:, -1] + probs[:, -1] >= row_p[:, 0]) | (width == widest)  # the candidates hold p
            cut[rows[done]] = row_cut[done]
            rows = rows[~done]
            if not len(rows):
                break
        return cut


def _rope(x, cos, sin):
    """Rotary embedding as `transformers`' Llama applies it (rotate-half convention), with the sign of
    rotate_half folded into the sine table (`KVCache.allocate`): x·cos + roll(x, hd/2)·sin'."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin)


# The RMSNorm classes of the fast architectures: x·rsqrt(mean(x²) + ε)·w in fp32, which `F.rms_norm`
# computes in one call (their own forward is seven).
_RMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"}


def _norm(mod, x, plain: bool):
    if plain and x.dtype == torch.float32 and type(mod).__name__ in _RMS:
        return F.rms_norm(x, mod.weight.shape, mod.weight, mod.variance_epsilon)
    return mod(x)


def _add_linear(x, y, w, b, plain: bool):
    """x + y·wᵀ (+ b): the residual add inside the matmul (`addmm`) when no autocast would change the
    residual's precision by it."""
    if plain and b is None:
        return torch.addmm(x, y, w.t())
    return x + F.linear(y, w, b)


def _stops(stop) -> list[str]:
    return [s for s in ([stop] if isinstance(stop, str) else stop or []) if s]


def _find_stop(text: str, stop, start: int = 0) -> int | None:
    """Where the first stop string begins in text[start:] (an index into text), or None."""
    hits = [i for i in (text.find(s, start) for s in _stops(stop)) if i >= 0]
    return min(hits) if hits else None


class Detokenizer:
    """Token ids → text, one token at a time, decoding only a short window: the text of the tokens since
    the last emitted piece, minus the text they had before the new one. Decoding a window from a token
    boundary keeps tokenizers that drop a word's leading space at the start of a decode (SentencePiece)
    right, since both decodes start at the same token; a window ending in a partial UTF-8 character
    decodes to U+FFFD and is held back until the character completes. `text` equals decoding all ids."""

    def __init__(self, tok):
        self.tok, self.ids, self.text = tok, [], ""
        self.prefix = self.read = 0  # ids[prefix:read] was decoded last time; ids[read:] not yet emitted

    def push(self, token: int) -> str:
        """Add a token; return the new text it completes ("" while a character is incomplete)."""
        self.ids.append(token)
        old = self.tok.decode(self.ids[self.prefix:self.read])
        now = self.tok.decode(self.ids[self.prefix:])
        if len(now) <= len(old) or now.endswith("\ufffd"):
            return ""
        new = now[len(old):]
        self.prefix, self.read = self.read, len(self.ids)
        self.text += new
        return new


def _trim_to_text(tok, ids, logprobs, text):
    """Keep the shortest prefix of ids whose decoding covers `text` (drop tokens after a stop string)."""
    for kept in range(1, len(ids) + 1):
        if len(tok.decode(ids[:kept])) >= len(text):
            return ids[:kept], logprobs[:kept]
    return ids, logprobs
