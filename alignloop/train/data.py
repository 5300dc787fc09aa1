"""The data helpers the training stages share: a corpus read into token streams (pretraining; the
pretraining-text mix of SFT and PPO-ptx), streams packed into rows, the model a stage starts from, and
the check that a tokenizer belongs to that model.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from alignloop.errors import InputError
from alignloop.io import read_records
from alignloop.tokenizer import ChatTokenizer, validate_messages


def load_corpus(path: Path, tok: ChatTokenizer, val_fraction: float):
    """Documents → (train ids, val ids, val UTF-8 bytes, val chars). Conversations in the corpus
    (forum threads) go through the one chat renderer; text documents start with <|bos|>."""
    records = read_records(path)
    texts, convs = [], []
    for line, rec in records:
        if isinstance(rec.get("text"), str) and rec["text"].strip():
            texts.append((len(texts) + len(convs), rec["text"]))
        elif "messages" in rec:
            convs.append((len(texts) + len(convs), validate_messages(rec["messages"], path, line)))
        else:
            raise InputError("expected a non-empty 'text' string or a 'messages' list", file=path, line=line, field="text")
    if len(records) == 1 and texts:  # one text: hold out its tail, split by characters (as nanoGPT does)
        text = texts[0][1]
        cut = int(len(text) * (1 - val_fraction))
        train_docs, val_docs = [text[:cut]], [text[cut:]] if val_fraction > 0 else []
    else:
        docs = [None] * len(records)
        for i, t in texts:
            docs[i] = t
        for i, m in convs:
            docs[i] = m
        n_val = max(1, int(len(docs) * val_fraction)) if val_fraction > 0 else 0
        train_docs, val_docs = docs[: len(docs) - n_val], docs[len(docs) - n_val:]

    def ids_of(docs):
        out, n_bytes, n_chars = [], 0, 0
        plain = [d for d in docs if isinstance(d, str)]
        encoded = iter(tok.encode_batch(plain))
        for d in docs:
            if isinstance(d, str):
                out += tok.document(next(encoded))
                n_bytes, n_chars = n_bytes + len(d.encode()), n_chars + len(d)
            else:
                out += tok.render(d)[0]
                body = "".join(m["content"] for m in d)
                n_bytes, n_chars = n_bytes + len(body.encode()), n_chars + len(body)
        return out, n_bytes, n_chars

    train, _, _ = ids_of(train_docs)
    val, val_bytes, val_chars = ids_of(val_docs)
    return torch.tensor(train, dtype=torch.long), torch.tensor(val, dtype=torch.long), val_bytes, val_chars


def rows_of(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Pack a token stream into (N, seq_len + 1) rows: inputs are [:, :-1], targets [:, 1:]."""
    n = (len(stream) - 1) // seq_len
    return torch.stack([stream[i * seq_len: i * seq_len + seq_len + 1] for i in range(n)]) if n else stream[:0].view(0, seq_len + 1)


def resolve_init(init: str, out: Path) -> Path:
    """A model to start from: a Hugging Face folder or a .gguf file (converted once into the run)."""
    from alignloop.sources import resolve_model
    return resolve_model(Path(init), out, field="init")


def check_vocab(model_dir: Path, tok: ChatTokenizer, tok_dir: Path) -> None:
    """A tokenizer whose ids do not fit the model's embeddings: stop before any work."""
    cfg_path = Path(model_dir) / "config.json"
    if not cfg_path.exists():
        raise InputError("not a Hugging Face model folder (no config.json)", file=model_dir)
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    n = cfg.get("vocab_size") or cfg.get("text_config", {}).get("vocab_size")
    if n is not None and not tok.vocab_fits(n):
        raise InputError(f"the tokenizer has {tok.vocab_size} tokens but the model {model_dir} has {n} embedding rows: "
                         "they do not belong together (give the model's own tokenizer)", file=tok_dir, field="tokenizer")
