"""The chat page (`/`), the arena (`/arena`) and the small JSON/SSE API behind them (`/api/…`).

Pages are rendered on the server (Jinja, autoescaped) and driven by a little plain JS that reads
server-sent events from `fetch`; every user or model text reaches the DOM through `textContent`, and a
Content-Security-Policy allows only this server's own scripts.

Who may use them: the run's accounts — the labeling app's users, roles and sessions (one account
system, see `alignloop.feedback.security`). `Gate` lets no request through to a page or `/api/…`
without a session (pages redirect to `/login`, the API answers 401); a POST also needs the session's
CSRF token in `X-CSRF-Token`. With `--open` (a private demo) anyone may use them, anonymously: a random
cookie, stored only as its pseudonym (a hash), owns the visitor's conversations, and every page says so.
The OpenAPI schema, `/static/` and `/login` are public; `/v1` keeps its API keys.

Rate limits (429 with Retry-After): per account `messages_per_minute` (20) chat messages and
regenerations, `battles_per_minute` (10) battles and `votes_per_minute` (20) votes; per client address
four times as many (`per_address_factor`), which is what bounds anonymous cookies on an open server.
One vote per battle, and a battle belongs to the account that started it.

Streams (`text/event-stream`): `meta` (ids), `delta` ({text} or {side, text}), `done`, or `error`.
"""
from __future__ import annotations

import hashlib
import json
import random
import secrets
from pathlib import Path
from typing import Literal

from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, Field
from sqlalchemy import select

from alignloop.db import sessions
from alignloop.feedback import security as S
from alignloop.feedback.models import User
from alignloop.serve import arena
from alignloop.serve.errors import BUSY, APIError, error_body
from alignloop.serve.errors import PAGE_ERRORS as ERRORS
from alignloop.serve.scheduler import Generator, Job, Run
from alignloop.serve.tables import Battle, Conversation, Feedback, Message, Vote, now

HERE = Path(__file__).parent
COOKIE = "alignloop_user"
# Everything else needs a session (or --open). /favicon.ico answers 404 like any unknown path: a login
# redirect there would make the browser fetch a fresh login page behind the user's back.
PUBLIC = ("/login", "/logout", "/static/", "/openapi.json", "/v1/", "/favicon.ico")
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
       "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


class SendBody(BaseModel):
    model: str
    content: str = Field(min_length=1, max_length=20_000)
    conversation_id: str | None = Field(None, max_length=64, description="none: start a new conversation")
    parent_id: str | None = Field(None, max_length=64, description="the message this one follows (none: the "
                                  "first turn); the parent of an edited message makes the edit its sibling")
    temperature: float | None = Field(None, ge=0, le=2)
    max_tokens: int | None = Field(None, ge=1, le=1_000_000)


class RegenerateBody(BaseModel):
    message_id: str = Field(max_length=64, description="an assistant message (its question is answered again) or "
                            "a user message (answered once more, e.g. after a failed answer)")
    model: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)


class FeedbackBody(BaseModel):
    rating: Literal["up", "down"]
    reason: str = Field("", max_length=2000)


class BattleBody(BaseModel):
    content: str = Field(min_length=1, max_length=20_000)


class VoteBody(BaseModel):
    winner: Literal["a", "b", "tie", "both_bad"]


class Account:
    def __init__(self, user: User, csrf: str):
        self.name, self.role, self.csrf = user.username, user.role, csrf


class Gate:
    """No page and no `/api/…` without a session of the run's accounts (unless the server is open): a
    pure ASGI middleware in front of every route, so a route added later is guarded too. It puts the
    account (or None) into `request.state.account`."""

    def __init__(self, app, Session, open_: bool):
        self.app, self.Session, self.open = app, Session, open_

    def _lookup(self, token: str) -> Account | None:
        with self.Session() as s:
            found = S.session_user(s, token)
            return Account(found[0], found[1].csrf) if found else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request = Request(scope)
        token = request.cookies.get(S.SESSION_COOKIE)
        account = await run_in_threadpool(self._lookup, token) if token and len(token) < 200 else None
        scope.setdefault("state", {})["account"] = account
        path = scope["path"]
        if path.startswith(PUBLIC) or path == "/v1":
            return await self.app(scope, receive, send)
        if account is None and not self.open:
            if path.startswith("/api/") or scope["method"] not in ("GET", "HEAD"):
                resp = JSONResponse(error_body("Log in first: the chat page and the arena need an account of "
                                               "this run (POST /login)", "invalid_request_error",
                                               code="not_logged_in"), status_code=401)
            else:
                resp = RedirectResponse(f"/login?next={quote(path)}", status_code=303)
            return await resp(scope, receive, send)
        if account is not None and scope["method"] == "POST" and not S.same(
                request.headers.get("x-csrf-token"), account.csrf):
            resp = JSONResponse(error_body("Missing or wrong CSRF token (X-CSRF-Token): reload the page",
                                           "invalid_request_error", code="csrf"), status_code=403)
            return await resp(scope, receive, send)
        return await self.app(scope, receive, send)


def visitor(request: Request) -> tuple[str, str | None]:
    """(who, new cookie token or None): the account's username, or on an open server without a login
    the pseudonym `anon:<hash>` of a random cookie (":" is never in a username)."""
    account = getattr(request.state, "account", None)
    if account is not None:
        return account.name, None
    token = request.cookies.get(COOKIE)
    fresh = None
    if not token or len(token) > 100:
        token = fresh = secrets.token_urlsafe(24)
    return "anon:" + hashlib.sha256(token.encode()).hexdigest()[:12], fresh


def with_cookie(resp: Response, fresh: str | None) -> Response:
    if fresh:
        resp.set_cookie(COOKIE, fresh, max_age=365 * 86400, httponly=True, samesite="strict")
    return resp


def sse(event: str, data) -> str:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


def message_json(m: Message, fb: Feedback | None = None) -> dict:
    return {"id": m.id, "parent_id": m.parent_id, "role": m.role, "content": m.content, "model": m.model,
            "finish_reason": m.finish_reason,
            "feedback": {"rating": fb.rating, "reason": fb.reason} if fb else None}


def add_pages(app: FastAPI, gen: Generator, db) -> None:
    Session = sessions(db)
    settings = gen.settings
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    app.add_middleware(Gate, Session=Session, open_=settings.open)
    throttle = S.LoginThrottle()
    app.state.throttle = throttle
    limits = {kind: (S.RateLimiter(n, 60.0), S.RateLimiter(n * settings.per_address_factor, 60.0))
              for kind, n in (("messages", settings.messages_per_minute), ("battles", settings.battles_per_minute),
                              ("votes", settings.votes_per_minute))}

    def limit(request: Request, kind: str, who: str) -> None:
        """Count one action; 429 with Retry-After when the account or the address is over its limit."""
        per_account, per_address = limits[kind]
        addr = S.client_address(request)
        wait = max(per_account.wait(who), per_address.wait(addr))
        if wait <= 0:
            wait = per_account.take(who) or per_address.take(addr)
        if wait > 0:
            n = per_account.limit
            raise APIError(429, f"Too many {kind}: at most {n} a minute per account ({n * settings.per_address_factor} "
                           f"per address); try again in {int(wait) + 1} s", code="rate_limit_exceeded",
                           headers={"Retry-After": str(int(wait) + 1)})
    names = list(gen.models)
    # The arena and its leaderboard skip the `ppo` alias of a run's newest round: "round-N/ppo" names
    # the same model and keeps its meaning when more rounds are added.
    fighters = [n for n in names if not (n == "ppo" and any(
        o != n and gen.models[o].path.resolve() == gen.models[n].path.resolve() for o in names))]

    # The chat page starts on the newest policy (the last round's PPO, under its round name), else SFT,
    # else the first model served: the one people most want to talk to.
    newest = next((n for n in ("ppo", "sft", "base") if n in names), names[0] if names else None)
    if newest == "ppo" and "ppo" not in fighters:
        same = [o for o in fighters if gen.models[o].path.resolve() == gen.models["ppo"].path.resolve()]
        newest = next((o for o in reversed(same) if o.startswith("round-")), same[-1])

    def page(request: Request, name: str, status: int = 200, **ctx) -> Response:
        account = getattr(request.state, "account", None)
        user, fresh = visitor(request)
        resp = templates.TemplateResponse(request, name, {"models": names, "newest": newest, "account": account,
                                                          "min_battles": arena.MIN_BATTLES, "open": settings.open,
                                                          "csrf": account.csrf if account else "", **ctx},
                                          status_code=status)
        resp.headers["Content-Security-Policy"] = CSP
        return with_cookie(resp, fresh)

    # ------------------------------------------------------------ login (the labeling app's accounts)

    def back(path: str) -> str:
        return path if path.startswith("/") and not path.startswith("//") and "\\" not in path else "/"

    @app.get("/login", response_class=HTMLResponse, include_in_schema=False)
    def login_page(request: Request):
        # the token of an earlier visit is kept: a second tab (or a stray request) must not void the first
        token = request.cookies.get(S.LOGIN_CSRF_COOKIE)
        if not token or len(token) > 100:
            token = secrets.token_urlsafe(32)
        resp = page(request, "login.html", login_csrf=token, next=back(request.query_params.get("next", "/")))
        resp.set_cookie(S.LOGIN_CSRF_COOKIE, token, httponly=True, samesite="strict", path="/login")
        return resp

    @app.post("/login", response_class=HTMLResponse, include_in_schema=False)
    async def login(request: Request):
        form = await request.form()
        nxt = back(str(form.get("next") or "/"))
        if not S.same(form.get("csrf"), request.cookies.get(S.LOGIN_CSRF_COOKIE)):
            return page(request, "login.html", 403, login_csrf="", next=nxt,
                        error="Missing or invalid token: reload the login page and try again.")
        username, password = str(form.get("username") or "").strip(), str(form.get("password") or "")
        addr = S.client_address(request)
        wait = throttle.wait(username, addr)
        if wait > 0:
            resp = page(request, "login.html", 429, login_csrf=form.get("csrf"), next=nxt,
                        error=f"Too many failed logins from here: try again in {int(wait) + 1} seconds.")
            resp.headers["Retry-After"] = str(int(wait) + 1)
            return resp

        def check():
            with Session() as s:
                user = s.scalar(select(User).where(User.username == username))
                if not S.verify_password(user, password) or not user.active:
                    return None
                token = S.open_session(s, user)
                s.commit()
                return token
        token = await run_in_threadpool(check)
        if token is None:
            throttle.failed(username, addr)
            return page(request, "login.html", 401, login_csrf=form.get("csrf"), next=nxt,
                        error="Wrong username or password.")
        throttle.succeeded(username, addr)
        resp = RedirectResponse(nxt, status_code=303)
        resp.set_cookie(S.SESSION_COOKIE, token, httponly=True, samesite="lax", max_age=S.SESSION_DAYS * 86400,
                        path="/", secure=request.url.scheme == "https")
        resp.delete_cookie(S.LOGIN_CSRF_COOKIE, path="/login")
        return resp

    @app.post("/logout", include_in_schema=False)
    async def logout(request: Request):
        account = getattr(request.state, "account", None)
        form = await request.form()
        if account is not None and S.same(form.get("csrf"), account.csrf):
            def close():
                with Session.begin() as s:
                    S.close_session(s, request.cookies.get(S.SESSION_COOKIE))
            await run_in_threadpool(close)
        resp = RedirectResponse("/login", status_code=303)
        resp.delete_cookie(S.SESSION_COOKIE, path="/")
        return resp

    # ------------------------------------------------------------ pages

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def chat_page(request: Request):
        return page(request, "chat.html")

    @app.get("/arena", response_class=HTMLResponse, include_in_schema=False)
    def arena_page(request: Request):
        return page(request, "arena.html", board=board(), enough=len(fighters) >= 2)

    # ------------------------------------------------------------ conversations

    def path_to(s, conv_id: str, message_id: str | None) -> list[Message]:
        """The messages from the root down to `message_id` (inclusive)."""
        if message_id is None:
            return []
        by_id = {m.id: m for m in s.scalars(select(Message).where(Message.conversation_id == conv_id))}
        if message_id not in by_id:
            raise APIError(404, "no such message in this conversation", param="parent_id")
        out, cur = [], by_id[message_id]
        while cur is not None:
            out.append(cur)
            cur = by_id.get(cur.parent_id) if cur.parent_id else None
        return out[::-1]

    def own_conversation(s, conv_id: str, user: str) -> Conversation:
        conv = s.get(Conversation, conv_id)
        if conv is None or conv.user != user:
            raise APIError(404, "no such conversation", param="conversation_id")
        return conv

    @app.get("/api/conversations", tags=["chat page"], responses=ERRORS)
    def list_conversations(request: Request):
        user, fresh = visitor(request)
        with Session() as s:
            convs = s.scalars(select(Conversation).where(Conversation.user == user)
                              .order_by(Conversation.updated_at.desc()).limit(200)).all()
            data = [{"id": c.id, "title": c.title, "model": c.model} for c in convs]
        return with_cookie(JSONResponse(data), fresh)

    @app.get("/api/conversations/{conversation_id}", tags=["chat page"], responses=ERRORS)
    def get_conversation(conversation_id: str, request: Request):
        user, _ = visitor(request)
        with Session() as s:
            conv = own_conversation(s, conversation_id, user)
            msgs = s.scalars(select(Message).where(Message.conversation_id == conv.id)
                             .order_by(Message.created_at, Message.id)).all()
            fbs = {f.message_id: f for f in s.scalars(select(Feedback).join(Message).where(
                Message.conversation_id == conv.id, Feedback.user == user))}
            return {"id": conv.id, "title": conv.title, "model": conv.model,
                    "messages": [message_json(m, fbs.get(m.id)) for m in msgs]}

    @app.post("/api/chat/send", tags=["chat page"], responses={**ERRORS, **BUSY, 200: {
        "description": "server-sent events: meta, delta…, done", "content": {"text/event-stream": {}}}})
    async def send(body: SendBody, request: Request):
        user, fresh = visitor(request)
        limit(request, "messages", user)
        gen.model(body.model)

        def prepare():
            with Session() as s:
                if body.conversation_id:
                    conv = own_conversation(s, body.conversation_id, user)
                else:
                    if body.parent_id:
                        raise APIError(400, "a new conversation has no parent message", param="parent_id")
                    conv = Conversation(user=user, model=body.model, title=body.content.strip()[:60])
                    s.add(conv)
                    s.flush()
                history = path_to(s, conv.id, body.parent_id)
                if history and history[-1].role == "user":
                    raise APIError(400, "a user message must follow an assistant message", param="parent_id")
                msgs = [{"role": m.role, "content": m.content} for m in history]
                msgs.append({"role": "user", "content": body.content})
                job = gen.job(body.model, msgs, max_tokens=body.max_tokens, temperature=body.temperature)
                um = Message(conversation_id=conv.id, parent_id=body.parent_id, role="user", content=body.content)
                s.add(um)
                conv.updated_at = now()
                s.commit()
                return conv.id, um, job
        conv_id, um, job = await run_in_threadpool(prepare)
        meta = {"conversation_id": conv_id, "user_message": message_json(um), "parent_id": um.id}
        # A busy server answers 429/503 here; the question stays saved, to be answered by a regenerate.
        run = await gen.start(job)
        return with_cookie(answer_stream(conv_id, um.id, body.model, job, run, meta), fresh)

    @app.post("/api/chat/regenerate", tags=["chat page"], responses={**ERRORS, **BUSY, 200: {
        "description": "server-sent events: meta, delta…, done", "content": {"text/event-stream": {}}}})
    async def regenerate(body: RegenerateBody, request: Request):
        user, _ = visitor(request)
        limit(request, "messages", user)

        def prepare():
            with Session() as s:
                old = s.get(Message, body.message_id)
                if old is None:
                    raise APIError(404, "no such message", param="message_id")
                conv = own_conversation(s, old.conversation_id, user)
                model = body.model or old.model or conv.model
                question = old.parent_id if old.role == "assistant" else old.id  # a user message: answer it again
                history = path_to(s, conv.id, question)
                if not history or history[-1].role != "user":
                    raise APIError(400, "only an answer to a user message can be regenerated", param="message_id")
                job = gen.job(model, [{"role": m.role, "content": m.content} for m in history],
                              temperature=body.temperature)
                return conv.id, question, model, job
        conv_id, parent_id, model, job = await run_in_threadpool(prepare)
        run = await gen.start(job)
        return answer_stream(conv_id, parent_id, model, job, run, {"conversation_id": conv_id, "parent_id": parent_id})

    def answer_stream(conv_id: str, parent_id: str, model: str, job: Job, run: Run, meta: dict) -> StreamingResponse:
        async def events():
            yield sse("meta", meta)
            try:
                async for items in run:
                    text = "".join(payload[1] for _, event, payload in items if event == "delta")
                    if text:
                        yield sse("delta", {"text": text})
                    for _, event, payload in items:
                        if event == "done":
                            msg = await run_in_threadpool(save_answer, conv_id, parent_id, model, job, payload[0])
                            yield sse("done", {"message": message_json(msg)})
            except APIError as e:
                yield sse("error", {"message": e.message})
        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    def save_answer(conv_id, parent_id, model, job, o) -> Message:
        with Session() as s:
            m = Message(conversation_id=conv_id, parent_id=parent_id, role="assistant", content=o.text, model=model,
                        finish_reason=o.finish_reason, prompt_tokens=len(job.prompt), completion_tokens=len(o.ids))
            s.add(m)
            conv = s.get(Conversation, conv_id)
            conv.updated_at = now()
            s.commit()
            return m

    @app.post("/api/messages/{message_id}/feedback", tags=["chat page"], responses=ERRORS)
    def feedback(message_id: str, body: FeedbackBody, request: Request):
        user, _ = visitor(request)
        with Session() as s:
            m = s.get(Message, message_id)
            if m is None or m.role != "assistant":
                raise APIError(404, "no such assistant message", param="message_id")
            own_conversation(s, m.conversation_id, user)
            fb = s.scalars(select(Feedback).where(Feedback.message_id == m.id, Feedback.user == user)).first()
            if fb is None:
                fb = Feedback(message_id=m.id, user=user, rating=body.rating)
                s.add(fb)
            fb.rating, fb.reason, fb.created_at = body.rating, body.reason.strip(), now()
            s.commit()
            return {"message_id": m.id, "rating": fb.rating, "reason": fb.reason}

    # ------------------------------------------------------------ arena

    def board() -> list[dict]:
        with Session() as s:
            votes = [(b.model_a, b.model_b, v.winner) for b, v in s.execute(select(Battle, Vote).join(Vote))]
        return arena.leaderboard(votes, fighters)

    @app.get("/api/arena/leaderboard", tags=["arena"], responses=ERRORS)
    def leaderboard():
        return board()

    @app.post("/api/arena/battles", tags=["arena"], responses={**ERRORS, **BUSY, 200: {
        "description": "server-sent events: meta, delta… ({side, text}), done", "content": {"text/event-stream": {}}}})
    async def battle(body: BattleBody, request: Request):
        user, fresh = visitor(request)
        limit(request, "battles", user)
        if len(fighters) < 2:
            raise APIError(400, "the arena needs at least two models (serve a run, or pass --model twice)")
        model_a, model_b = random.sample(fighters, 2)
        msgs = [{"role": "user", "content": body.content}]
        run = await gen.start(gen.job(model_a, msgs), gen.job(model_b, msgs))  # before the battle is saved

        def create():
            with Session() as s:
                b = Battle(user=user, prompt=msgs, model_a=model_a, model_b=model_b)
                s.add(b)
                s.commit()
                return b.id
        battle_id = await run_in_threadpool(create)

        async def events():
            yield sse("meta", {"battle_id": battle_id})
            answers = {}
            try:
                async for items in run:
                    out = []
                    for k, event, payload in items:
                        side = "ab"[k]
                        if event == "delta":
                            out.append(sse("delta", {"side": side, "text": payload[1]}))
                        else:
                            answers[side] = payload[0].text
                            out.append(sse("done", {"side": side, "finish_reason": payload[0].finish_reason}))
                    yield "".join(out)
            except APIError as e:
                yield sse("error", {"message": e.message})
                return
            await run_in_threadpool(save_battle, battle_id, answers)
            # Two identical answers carry no preference: say so (no vote is taken) instead of
            # accepting a vote that the export would have to drop.
            yield sse("end", {"battle_id": battle_id, "identical": answers["a"].strip() == answers["b"].strip()})
        return with_cookie(StreamingResponse(events(), media_type="text/event-stream",
                                             headers={"Cache-Control": "no-cache"}), fresh)

    def save_battle(battle_id: str, answers: dict) -> None:
        with Session() as s:
            b = s.get(Battle, battle_id)
            b.answer_a, b.answer_b = answers["a"], answers["b"]
            s.commit()

    @app.post("/api/arena/battles/{battle_id}/vote", tags=["arena"], responses={**ERRORS, 409: {
        "description": "already voted, the answers are not finished, or they are identical"}})
    def vote(battle_id: str, body: VoteBody, request: Request):
        user, _ = visitor(request)
        limit(request, "votes", user)
        with Session() as s:
            b = s.get(Battle, battle_id)
            if b is None or b.user != user:
                raise APIError(404, "no such battle", param="battle_id")
            if b.answer_a is None or b.answer_b is None:
                raise APIError(409, "the answers of this battle are not finished", param="battle_id")
            if s.scalars(select(Vote).where(Vote.battle_id == b.id)).first() is not None:
                raise APIError(409, "this battle already has a vote", param="battle_id")
            if b.answer_a.strip() == b.answer_b.strip():
                raise APIError(409, "the two answers are identical: there is nothing to vote on", param="battle_id",
                               code="identical_answers")
            s.add(Vote(battle_id=b.id, user=user, winner=body.winner))
            s.commit()
            return {"battle_id": b.id, "winner": body.winner, "model_a": b.model_a, "model_b": b.model_b}
