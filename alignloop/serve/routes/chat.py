"""The chat page (`/`) and its API: a person's conversations (a tree of messages: an edit or a
regenerated answer is a sibling, not a replacement), sending a message and streaming the answer,
answering a question again, and a thumb up or down on an answer. Conversations belong to the
visitor (`web.visitor`): another person's answers 404, as if they did not exist."""
from __future__ import annotations

from typing import Literal

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from sqlalchemy import select

from alignloop.routing import Routes
from alignloop.serve.errors import BUSY, APIError
from alignloop.serve.errors import PAGE_ERRORS as ERRORS
from alignloop.serve.scheduler import Job, Run
from alignloop.serve.tables import Conversation, Feedback, Message, now
from alignloop.serve.web import Site, message_json, site_of, sse, visitor, with_cookie

routes = Routes()
STREAM = {200: {"description": "server-sent events: meta, delta…, done", "content": {"text/event-stream": {}}}}


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


@routes.get("/", response_class=HTMLResponse, include_in_schema=False)
def chat_page(request: Request):
    return site_of(request).page(request, "chat.html")


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


@routes.get("/api/conversations", tags=["chat page"], responses=ERRORS)
def list_conversations(request: Request):
    user, fresh = visitor(request)
    with site_of(request).Session() as s:
        convs = s.scalars(select(Conversation).where(Conversation.user == user)
                          .order_by(Conversation.updated_at.desc()).limit(200)).all()
        data = [{"id": c.id, "title": c.title, "model": c.model} for c in convs]
    return with_cookie(JSONResponse(data), fresh)


@routes.get("/api/conversations/{conversation_id}", tags=["chat page"], responses=ERRORS)
def get_conversation(conversation_id: str, request: Request):
    user, _ = visitor(request)
    with site_of(request).Session() as s:
        conv = own_conversation(s, conversation_id, user)
        msgs = s.scalars(select(Message).where(Message.conversation_id == conv.id)
                         .order_by(Message.created_at, Message.id)).all()
        fbs = {f.message_id: f for f in s.scalars(select(Feedback).join(Message).where(
            Message.conversation_id == conv.id, Feedback.user == user))}
        return {"id": conv.id, "title": conv.title, "model": conv.model,
                "messages": [message_json(m, fbs.get(m.id)) for m in msgs]}


@routes.post("/api/chat/send", tags=["chat page"], responses={**ERRORS, **BUSY, **STREAM})
async def send(body: SendBody, request: Request):
    site = site_of(request)
    user, fresh = visitor(request)
    site.limit(request, "messages", user)
    site.gen.model(body.model)
    conv_id, um, job = await run_in_threadpool(save_question, site, body, user)
    meta = {"conversation_id": conv_id, "user_message": message_json(um), "parent_id": um.id}
    # A busy server answers 429/503 here; the question stays saved, to be answered by a regenerate.
    run = await site.gen.start(job)
    return with_cookie(answer_stream(site, conv_id, um.id, body.model, job, run, meta), fresh)


def save_question(site: Site, body: SendBody, user: str) -> tuple[str, Message, Job]:
    """Store the user's message (in a new conversation, or under its parent) and make its job."""
    with site.Session() as s:
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
        job = site.gen.job(body.model, msgs, max_tokens=body.max_tokens, temperature=body.temperature)
        um = Message(conversation_id=conv.id, parent_id=body.parent_id, role="user", content=body.content)
        s.add(um)
        conv.updated_at = now()
        s.commit()
        return conv.id, um, job


@routes.post("/api/chat/regenerate", tags=["chat page"], responses={**ERRORS, **BUSY, **STREAM})
async def regenerate(body: RegenerateBody, request: Request):
    site = site_of(request)
    user, _ = visitor(request)
    site.limit(request, "messages", user)
    conv_id, parent_id, model, job = await run_in_threadpool(regenerate_job, site, body, user)
    run = await site.gen.start(job)
    return answer_stream(site, conv_id, parent_id, model, job, run,
                         {"conversation_id": conv_id, "parent_id": parent_id})


def regenerate_job(site: Site, body: RegenerateBody, user: str) -> tuple[str, str, str, Job]:
    """The job that answers the question of `body.message_id` again, and where its answer goes."""
    with site.Session() as s:
        old = s.get(Message, body.message_id)
        if old is None:
            raise APIError(404, "no such message", param="message_id")
        conv = own_conversation(s, old.conversation_id, user)
        model = body.model or old.model or conv.model
        question = old.parent_id if old.role == "assistant" else old.id  # a user message: answer it again
        history = path_to(s, conv.id, question)
        if not history or history[-1].role != "user":
            raise APIError(400, "only an answer to a user message can be regenerated", param="message_id")
        job = site.gen.job(model, [{"role": m.role, "content": m.content} for m in history],
                           temperature=body.temperature)
        return conv.id, question, model, job


def answer_stream(site: Site, conv_id: str, parent_id: str, model: str, job: Job, run: Run,
                  meta: dict) -> StreamingResponse:
    """The answer as it is generated; saved (under `parent_id`) when it is done."""
    async def events():
        yield sse("meta", meta)
        try:
            async for items in run:
                text = "".join(payload[1] for _, event, payload in items if event == "delta")
                if text:
                    yield sse("delta", {"text": text})
                for _, event, payload in items:
                    if event == "done":
                        msg = await run_in_threadpool(save_answer, site, conv_id, parent_id, model, job, payload[0])
                        yield sse("done", {"message": message_json(msg)})
        except APIError as e:
            yield sse("error", {"message": e.message})
    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def save_answer(site: Site, conv_id, parent_id, model, job, o) -> Message:
    with site.Session() as s:
        m = Message(conversation_id=conv_id, parent_id=parent_id, role="assistant", content=o.text, model=model,
                    finish_reason=o.finish_reason, prompt_tokens=len(job.prompt), completion_tokens=len(o.ids))
        s.add(m)
        conv = s.get(Conversation, conv_id)
        conv.updated_at = now()
        s.commit()
        return m


@routes.post("/api/messages/{message_id}/feedback", tags=["chat page"], responses=ERRORS)
def feedback(message_id: str, body: FeedbackBody, request: Request):
    user, _ = visitor(request)
    with site_of(request).Session() as s:
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
