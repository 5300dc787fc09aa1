"""Tokenizer training and THE chat format.

`ChatTokenizer.render(messages)` is the only place in alignloop that knows how a conversation becomes
token ids: every stage (pretraining on forum threads, SFT, reward model, PPO, serving) calls it. The
saved Hugging Face tokenizer carries a Jinja chat template that produces the same ids, so outside
tools (`AutoTokenizer.apply_chat_template`, vLLM, TRL) agree with alignloop.

alignloop's own format:
    <|bos|><|system|>…<|end|><|user|>…<|end|><|assistant|>…<|end|>
The loss mask is 1 on an assistant turn's content and its closing <|end|> (the model must learn to
stop), 0 elsewhere. Generation starts after a bare `<|assistant|>` and stops at <|end|>.

A tokenizer of someone else's model (its own template, e.g. ChatML) is rendered through its template;
the mask is found by rendering growing prefixes of the conversation, which is only right when each
rendering extends the previous one (the "prefix property": checked, an InputError names the template
when it fails — templates that rewrite history, e.g. drop earlier `<think>` blocks, cannot be trained on).

The end-of-turn contract, one place for every stage:
- `turn_suffix`: the ids the template writes after an assistant turn's content (`<|end|>`; ChatML
  `<|im_end|>` + "\n"; Llama-3 `<|eot_id|>`). Its first id is the end-of-turn token.
- `stop_ids`: the end-of-turn token, plus every id of the model's `generation_config.eos_token_id`
  and the tokenizer's `eos`. Base checkpoints (Qwen2.5, Llama-3, SmolLM2) have an `eos` that is not
  their template's end of turn: stopping on `eos` alone runs past the turn.
- `scored_ids(prompt_ids, response_ids)`: the sequence a reward or value model scores — prompt, answer
  without its stop token, then `turn_suffix` — the same ids `render` gives for the conversation that
  the reward model was trained on, so the score is read at the same position in RM training, PPO,
  evaluation and serving (the sequence's last token).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from alignloop.config import option
from alignloop.errors import InputError

BOS, END, PAD = "<|bos|>", "<|end|>", "<|pad|>"
ROLES = ("system", "user", "assistant")
SPECIAL_TOKENS = [PAD, BOS, END] + [f"<|{r}|>" for r in ROLES]

# `{% generation %}` marks what `return_assistant_tokens_mask=True` reports: the same tokens as our mask.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>' }}{% generation %}{{ message['content'] + '<|end|>' }}{% endgeneration %}"
    "{% else %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def validate_messages(messages, file=None, line=None) -> list[dict]:
    """A conversation: a non-empty list of {role, content} with known roles and non-empty content."""
    if not isinstance(messages, list) or not messages:
        raise InputError("a conversation must be a non-empty list of messages", file=file, line=line, field="messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InputError("a message must be an object", file=file, line=line, field=f"messages[{i}]")
        if m.get("role") not in ROLES:
            raise InputError(f"unknown role {m.get('role')!r} (expected system, user or assistant)",
                             file=file, line=line, field=f"messages[{i}].role")
        if not isinstance(m.get("content"), str) or not m["content"].strip():
            raise InputError("empty message", file=file, line=line, field=f"messages[{i}].content")
    return messages


class ChatTokenizer:
    """A Hugging Face fast tokenizer plus the chat format."""

    def __init__(self, hf, eos_ids=(), name: str = "tokenizer"):
        """`eos_ids`: the model's `generation_config.eos_token_id` (one id or a list), also stops."""
        self.hf, self.name = hf, name
        vocab = hf.get_vocab()
        self.native = all(t in vocab for t in SPECIAL_TOKENS)
        # A tokenizer without a chat template can still tokenize plain text (pretraining); `render`
        # refuses it, and `with_chat_format` gives it alignloop's format explicitly.
        self.has_chat = self.native or bool(getattr(hf, "chat_template", None))
        self.pad_id = vocab[PAD] if self.native else (hf.pad_token_id if hf.pad_token_id is not None else hf.eos_token_id)
        self.bos_id = vocab.get(BOS, hf.bos_token_id)
        self.eos_id = vocab[END] if self.native else hf.eos_token_id
        self.role_ids = {r: vocab[f"<|{r}|>"] for r in ROLES} if self.native else {}
        # Content is encoded with special tokens as plain text: a user typing "<|assistant|>" must not
        # be able to forge a turn (prompt injection through the chat format).
        self._content = hf.backend_tokenizer if hasattr(hf, "backend_tokenizer") else hf._tokenizer
        self._content = self._content.__class__.from_str(self._content.to_str())
        self._content.encode_special_tokens = True
        self.turn_suffix = self._find_turn_suffix() if self.has_chat else []
        self.end_id = self.turn_suffix[0] if self.turn_suffix else self.eos_id
        eos_ids = [eos_ids] if isinstance(eos_ids, int) else list(eos_ids or [])
        self.stop_ids = sorted({i for i in (self.end_id, self.eos_id, *eos_ids) if i is not None})

    @classmethod
    def load(cls, path: str | Path) -> "ChatTokenizer":
        """A tokenizer folder; a model folder's `generation_config.json` adds its end-of-sequence ids."""
        import json
        from transformers import AutoTokenizer
        path = Path(path)
        if not path.exists():
            raise InputError("tokenizer folder not found", file=path)
        try:
            hf = AutoTokenizer.from_pretrained(str(path))
        except (OSError, ValueError) as e:
            raise InputError(f"not a Hugging Face tokenizer folder: {e}", file=path) from None
        eos = []
        gen = path / "generation_config.json"
        if gen.exists():
            eos = json.loads(gen.read_text(encoding="utf-8")).get("eos_token_id") or []
        return cls(hf, eos, name=str(path))

    def _find_turn_suffix(self) -> list[int]:
        """What the template writes after an assistant turn's content, found by rendering one."""
        if self.native:
            return [self.eos_id]
        probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Qx7"}]
        head = self._apply(probe[:1], True)
        full = self._apply(probe, False)
        if full[:len(head)] != head:
            raise InputError(f"the chat template of {self.name} does not extend the generation prompt with the "
                             "answer (prefix property), so alignloop cannot tell which tokens are the answer",
                             field="chat_template")
        body = full[len(head):]
        # the shortest prefix of the body that decodes to the content; what follows closes the turn
        for n in range(1, len(body) + 1):
            if self.hf.decode(body[:n], skip_special_tokens=False).strip().endswith("Qx7"):
                return body[n:]
        raise InputError(f"the chat template of {self.name} does not write an assistant turn's content verbatim",
                         field="chat_template")

    def _apply(self, msgs, gen: bool) -> list[int]:
        if not msgs:
            return []
        out = self.hf.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen, return_dict=False)
        return list(out)

    def scored_ids(self, prompt_ids: list[int], response_ids: list[int]) -> list[int]:
        """What a reward/value model scores: prompt + answer without its stop token + `turn_suffix` (the
        ids `render` writes after an assistant turn). An answer cut at the length limit is closed the
        same way, so its score is read at the same place (PPO adds a penalty for never ending)."""
        body = list(response_ids)
        if body and body[-1] in self.stop_ids:
            body = body[:-1]
        return list(prompt_ids) + body + self.turn_suffix

    def vocab_fits(self, model_vocab: int) -> bool:
        """Every id the tokenizer can produce has an embedding row (rows beyond it are padding)."""
        return self.vocab_size <= model_vocab

    @property
    def bos_ids(self) -> list[int]:
        """What starts a plain-text document: [<|bos|>], or nothing for a tokenizer without one."""
        return [self.bos_id] if self.bos_id is not None else []

    def document(self, ids: list[int]) -> list[int]:
        """A plain-text document as it goes into a packed stream: after BOS, or — for a tokenizer without
        BOS (Qwen, GPT-2) — followed by EOS, so that documents are never glued together."""
        if self.bos_id is not None:
            return [self.bos_id] + ids
        return ids + ([self.eos_id] if self.eos_id is not None else [])

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def encode(self, text: str) -> list[int]:
        """Plain text, special-token strings kept as text."""
        return self._content.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._content.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids, skip_special: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special)

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
        """Conversation → (ids, loss_mask). THE chat format; see the module docstring."""
        if not self.has_chat:
            raise InputError(f"{self.name} has no chat template: plain-text pretraining works, but a conversation "
                             "needs one (give SFT --chat-format alignloop to add alignloop's format)",
                             field="chat_template")
        if not self.native:
            return self._render_foreign(messages, add_generation_prompt)
        ids, mask = [self.bos_id], [0]
        for m in messages:
            body = self.encode(m["content"]) + [self.end_id]
            learn = 1 if m["role"] == "assistant" else 0
            ids += [self.role_ids[m["role"]]] + body
            mask += [0] + [learn] * len(body)
        if add_generation_prompt:
            ids.append(self.role_ids["assistant"])
            mask.append(0)
        return ids, mask

    def render_prompt(self, messages: list[dict]) -> list[int]:
        """The ids to generate the next assistant turn from."""
        return self.render(messages, add_generation_prompt=True)[0]

    def _render_foreign(self, messages, add_generation_prompt):
        """Render growing prefixes; the new tokens of prefix i belong to message i. An assistant turn's
        header comes from the previous prefix rendered with a generation prompt; the loss covers its
        content and the end-of-turn token, not what the template writes after that (e.g. ChatML's "\n")."""
        ids, mask = [], []
        tail = len(self.turn_suffix) - 1
        for i, m in enumerate(messages):
            if m["role"] == "assistant":
                head = self._extend(ids, self._apply(messages[:i], True), messages[:i])
                full = self._extend(head, self._apply(messages[: i + 1], False), messages[: i + 1])
                n = len(full) - len(head)
                mask += [0] * (len(head) - len(ids)) + [1] * (n - tail) + [0] * min(tail, n)
            else:
                full = self._extend(ids, self._apply(messages[: i + 1], False), messages[: i + 1])
                mask += [0] * (len(full) - len(ids))
            ids = full
        if add_generation_prompt:
            full = self._extend(ids, self._apply(messages, True), messages)
            mask += [0] * (len(full) - len(ids))
            ids = full
        return ids, mask

    def _extend(self, before: list[int], after: list[int], msgs) -> list[int]:
        if after[:len(before)] != before:
            raise InputError(f"the chat template of {self.name} rewrites earlier turns when turn {len(msgs)} is added "
                             "(it breaks the prefix property), so the loss mask cannot be found; use a template "
                             "that only appends", field="chat_template")
        return after

    def save(self, path: str | Path) -> None:
        self.hf.save_pretrained(str(path))


def with_chat_format(tok: ChatTokenizer) -> ChatTokenizer:
    """A foreign tokenizer (e.g. a base model's, without a chat template) given alignloop's chat format:
    its special tokens are added (the model's embeddings must grow to match: `resize_token_embeddings`)
    and its template becomes alignloop's. Explicit (SFT's `--chat-format alignloop`), never implied."""
    if tok.native:
        return tok
    hf = tok.hf
    hf.add_special_tokens({"additional_special_tokens": [t for t in SPECIAL_TOKENS if t not in hf.get_vocab()]})
    hf.bos_token, hf.eos_token, hf.pad_token = BOS, END, PAD
    hf.chat_template = CHAT_TEMPLATE
    return ChatTokenizer(hf, name=tok.name)


# ---------------------------------------------------------------- training (`alignloop tokenizer`)

SECTION = "tokenizer"


@dataclass
class Config:
    data: str = option("", "text corpus to train on (default: the run's world/corpus.jsonl)")
    vocab_size: int = option(4096, "vocabulary size including special tokens (padded to 64 in the model)",
                             min=300, max=262144)
    min_frequency: int = option(2, "a merge must occur at least this often", min=1)
    max_chars: int = option(20_000_000, "train on at most this many characters of the corpus", min=1000)


PRESETS = {"micro": {"vocab_size": 1024}, "tiny": {"vocab_size": 4096}, "small": {"vocab_size": 16384}}


def train_tokenizer(texts, vocab_size: int, min_frequency: int = 2) -> ChatTokenizer:
    """Byte-level BPE (GPT-2 style: no unknown tokens, any UTF-8 round-trips)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=END, pad_token=PAD,
                                 chat_template=CHAT_TEMPLATE, clean_up_tokenization_spaces=False)
    return ChatTokenizer(hf)


def corpus_texts(records, max_chars: int):
    """The training text of each record: `text`, or the contents of a conversation's messages."""
    n = 0
    for _, rec in records:
        parts = [rec["text"]] if isinstance(rec.get("text"), str) else [m.get("content", "") for m in rec.get("messages", [])]
        for t in parts:
            if n >= max_chars:
                return
            n += len(t)
            yield t


def run(cfg: Config, out: Path) -> None:
    from alignloop.io import atomic_dir, read_records
    from alignloop.rundir import resolve_path, save_stage_config

    path = resolve_path(cfg.data, out, "world/corpus.jsonl")
    records = read_records(path)
    for line, rec in records:
        if not isinstance(rec.get("text"), str) and not isinstance(rec.get("messages"), list):
            raise InputError("expected a 'text' string or a 'messages' list", file=path, line=line, field="text")
    tok = train_tokenizer(corpus_texts(records, cfg.max_chars), cfg.vocab_size, cfg.min_frequency)
    with atomic_dir(out / "tokenizer") as tmp:
        tok.save(tmp)
    save_stage_config(out, SECTION, cfg)
    print(f"tokenizer: {tok.vocab_size} tokens → {out / 'tokenizer'}")
