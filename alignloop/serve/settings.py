"""What a server serves (`Served`) and how (`Settings`, filled from `alignloop serve`'s flags). Plain data,
here so that the API (`app.py`), the pages (`web.py`) and the scheduler share them without importing
one another."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Settings:
    api_keys: list[str] = field(default_factory=list)  # empty: the API is open
    max_batch: int = 32                                 # rows per engine call (a request with n=k is k rows)
    max_queue: int = 256                                # requests waiting to start; one more is answered 429
    request_timeout: float = 300.0                      # seconds a request may wait to start (then 503); 0: no limit
    max_tokens_limit: int = 1024                        # the largest `max_tokens` a request may ask for
    max_n: int = 8                                      # the largest `n`
    max_body_bytes: int = 8 * 2**20                     # a larger request body is answered 413
    gather_s: float = 0.005                             # wait this long after a first request for others
    temperature: float = 1.0                            # for a request that sets none (the chat page never does);
    top_p: float = 1.0                                  # 1.0 and 1.0 are the OpenAI API's own defaults
    # The chat page and the arena: behind the run's accounts (the labeling app's) unless `open`.
    open: bool = False                                  # anonymous use (a private demo), clearly labelled
    messages_per_minute: int = 20                       # per account: chat messages and regenerations
    battles_per_minute: int = 10                        # per account: arena battles
    votes_per_minute: int = 20                          # per account: arena votes
    per_address_factor: int = 4                         # per client address: this many times the above


@dataclass
class Served:
    name: str
    path: Path
    engine: object  # alignloop.engine.Engine
    tok: object     # alignloop.tokenizer.ChatTokenizer
