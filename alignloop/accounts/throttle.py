"""Rate limits kept in memory: each app runs as one server process (`alignloop label`, `alignloop
serve`), so a table of recent events per key is enough.

`LoginThrottle` counts failed logins (both apps' login forms); `RateLimiter` is also what the chat
server counts messages, battles and votes with."""
from __future__ import annotations

import threading
import time
from collections import deque


class RateLimiter:
    """At most `limit` events (failed logins, or actions) per `window` seconds per key (a username,
    or a client address)."""

    def __init__(self, limit: int, window: float = 300.0):
        self.limit, self.window = limit, window
        self._fails: dict[str, deque] = {}
        self._lock = threading.Lock()

    def _recent(self, key: str, t: float) -> deque:
        q = self._fails.setdefault(key, deque())
        while q and q[0] < t - self.window:
            q.popleft()
        if not q:
            del self._fails[key]  # the table does not grow with every address ever seen
            return deque()
        return q

    def wait(self, key: str) -> float:
        """Seconds until `key` may try again (0: now)."""
        t = time.monotonic()
        with self._lock:
            q = self._recent(key, t)
            return q[0] + self.window - t if len(q) >= self.limit else 0.0

    def take(self, key: str) -> float:
        """Count one use of `key` if it has room: 0.0 when it had (the use is counted), else the seconds
        until it has (nothing counted). For rate limits on actions: messages, battles, votes."""
        t = time.monotonic()
        with self._lock:
            q = self._recent(key, t)
            if len(q) >= self.limit:
                return q[0] + self.window - t
            self._fails.setdefault(key, deque()).append(t)
            return 0.0

    def clear_prefix(self, prefix: str) -> int:
        with self._lock:
            keys = [k for k in self._fails if k.startswith(prefix)]
            for k in keys:
                del self._fails[k]
            return len(keys)

    def failed(self, key: str) -> None:
        with self._lock:
            self._fails.setdefault(key, deque()).append(time.monotonic())

    def clear(self, key: str) -> None:
        with self._lock:
            self._fails.pop(key, None)


class LoginThrottle:
    """Failed logins are counted per (account, client address) and per address. A stranger who types
    wrong passwords for a real user's name blocks only that pair (and, past a higher limit, their own
    address); the real user, from their own address, still logs in. `unlock` (an admin's button)
    forgets the failures of one account."""

    def __init__(self, limit: int = 5, window: float = 300.0, per_address: int = 20):
        self.pair, self.addr = RateLimiter(limit, window), RateLimiter(per_address, window)

    @staticmethod
    def _keys(username: str, address: str) -> tuple[str, str]:
        return f"u:{username.lower()}|a:{address}", f"a:{address}"

    def wait(self, username: str, address: str) -> float:
        pk, ak = self._keys(username, address)
        return max(self.pair.wait(pk), self.addr.wait(ak))

    def failed(self, username: str, address: str) -> None:
        pk, ak = self._keys(username, address)
        self.pair.failed(pk)
        self.addr.failed(ak)

    def succeeded(self, username: str, address: str) -> None:
        self.pair.clear(self._keys(username, address)[0])

    def unlock(self, username: str) -> int:
        return self.pair.clear_prefix(f"u:{username.lower()}|")


def client_address(request) -> str:
    return request.client.host if request.client else "?"
