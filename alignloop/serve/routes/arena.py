"""The arena (`/arena`): one prompt, two anonymous models drawn at random answering side by side,
one vote per battle by the person who started it; the leaderboard (Bradley–Terry, `serve/arena.py`)
counts every vote. The models' names are saved with the battle, never shown before the vote."""
from __future__ import annotations

import random
from typing import Literal

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, StreamingResponse
from pydantic import BaseModel, Field
from sqlalchemy import select

from alignloop.routing import Routes
from alignloop.serve.arena import leaderboard as bradley_terry
from alignloop.serve.errors import BUSY, APIError
from alignloop.serve.errors import PAGE_ERRORS as ERRORS
from alignloop.serve.scheduler import Run
from alignloop.serve.tables import Battle, Vote
from alignloop.serve.web import Site, site_of, sse, visitor, with_cookie

routes = Routes()


class BattleBody(BaseModel):
    content: str = Field(min_length=1, max_length=20_000)


class VoteBody(BaseModel):
    winner: Literal["a", "b", "tie", "both_bad"]


def board(site: Site) -> list[dict]:
    with site.Session() as s:
        votes = [(b.model_a, b.model_b, v.winner) for b, v in s.execute(select(Battle, Vote).join(Vote))]
    return bradley_terry(votes, site.fighters)


@routes.get("/arena", response_class=HTMLResponse, include_in_schema=False)
def arena_page(request: Request):
    site = site_of(request)
    return site.page(request, "arena.html", board=board(site), enough=len(site.fighters) >= 2)


@routes.get("/api/arena/leaderboard", tags=["arena"], responses=ERRORS)
def leaderboard(request: Request):
    return board(site_of(request))


@routes.post("/api/arena/battles", tags=["arena"], responses={**ERRORS, **BUSY, 200: {
    "description": "server-sent events: meta, delta… ({side, text}), done", "content": {"text/event-stream": {}}}})
async def battle(body: BattleBody, request: Request):
    site = site_of(request)
    user, fresh = visitor(request)
    site.limit(request, "battles", user)
    if len(site.fighters) < 2:
        raise APIError(400, "the arena needs at least two models (serve a run, or pass --model twice)")
    model_a, model_b = random.sample(site.fighters, 2)
    msgs = [{"role": "user", "content": body.content}]
    run = await site.gen.start(site.gen.job(model_a, msgs), site.gen.job(model_b, msgs))  # before the battle is saved

    def create():
        with site.Session() as s:
            b = Battle(user=user, prompt=msgs, model_a=model_a, model_b=model_b)
            s.add(b)
            s.commit()
            return b.id
    battle_id = await run_in_threadpool(create)
    return with_cookie(StreamingResponse(battle_events(site, battle_id, run), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache"}), fresh)


async def battle_events(site: Site, battle_id: str, run: Run):
    """Both answers as they are generated (`side` a or b); saved when both are done."""
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
    await run_in_threadpool(save_battle, site, battle_id, answers)
    # Two identical answers carry no preference: say so (no vote is taken) instead of
    # accepting a vote that the export would have to drop.
    yield sse("end", {"battle_id": battle_id, "identical": answers["a"].strip() == answers["b"].strip()})


def save_battle(site: Site, battle_id: str, answers: dict) -> None:
    with site.Session() as s:
        b = s.get(Battle, battle_id)
        b.answer_a, b.answer_b = answers["a"], answers["b"]
        s.commit()


@routes.post("/api/arena/battles/{battle_id}/vote", tags=["arena"], responses={**ERRORS, 409: {
    "description": "already voted, the answers are not finished, or they are identical"}})
def vote(battle_id: str, body: VoteBody, request: Request):
    site = site_of(request)
    user, _ = visitor(request)
    site.limit(request, "votes", user)
    with site.Session() as s:
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

