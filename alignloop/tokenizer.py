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
the mask is found by rendering growing prefixes of the conversation.
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

    def __init__(self, hf):
        self.hf = hf
        self.native = all(t in hf.get_vocab() for t in SPECIAL_TOKENS)
        if not self.native and not getattr(hf, "chat_template", None):
            raise InputError("tokenizer has no chat template and is not an alignloop tokenizer",
                             field="chat_template")
        vocab = hf.get_vocab()
        self.pad_id = vocab[PAD] if self.native else (hf.pad_token_id if hf.pad_token_id is not None else hf.eos_token_id)
        self.bos_id = vocab.get(BOS, hf.bos_token_id)
        self.end_id = vocab[END] if self.native else hf.eos_token_id
        self.role_ids = {r: vocab[f"<|{r}|>"] for r in ROLES} if self.native else {}
        self.stop_ids = sorted({i for i in (self.end_id, hf.eos_token_id) if i is not None})
        # Content is encoded with special tokens as plain text: a user typing "<|assistant|>" must not
        # be able to forge a turn (prompt injection through the chat format).
        self._content = hf.backend_tokenizer if hasattr(hf, "backend_tokenizer") else hf._tokenizer
        self._content = self._content.__class__.from_str(self._content.to_str())
        self._content.encode_special_tokens = True

    @classmethod
    def load(cls, path: str | Path) -> "ChatTokenizer":
        from transformers import AutoTokenizer
        path = Path(path)
        if not path.exists():
            raise InputError("tokenizer folder not found", file=path)
        try:
            return cls(AutoTokenizer.from_pretrained(str(path)))
        except (OSError, ValueError) as e:
            raise InputError(f"not a Hugging Face tokenizer folder: {e}", file=path) from None

    @property
    def bos_ids(self) -> list[int]:
        """What starts a plain-text document: [<|bos|>], or nothing for a tokenizer without one."""
        return [self.bos_id] if self.bos_id is not None else []

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
        def ids_of(msgs, gen):
            out = self.hf.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen, return_dict=False)
            return list(out)
        ids, mask = [], []
        for i, m in enumerate(messages):
            # Render up to and including message i; the new tokens belong to message i. For an assistant
            # turn the header comes from the previous prefix rendered with a generation prompt.
            if m["role"] == "assistant":
                head = ids_of(messages[:i], True) if i else []
                full = ids_of(messages[: i + 1], False)
                mask += [0] * (len(head) - len(ids)) + [1] * (len(full) - len(head))
            else:
                full = ids_of(messages[: i + 1], False)
                mask += [0] * (len(full) - len(ids))
            ids = full
        if add_generation_prompt:
            full = ids_of(messages, True)
            mask += [0] * (len(full) - len(ids))
            ids = full
        return ids, mask

    def save(self, path: str | Path) -> None:
        self.hf.save_pretrained(str(path))


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
