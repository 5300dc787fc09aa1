"""The labeling web app: server-rendered pages (Jinja2, autoescaped) and one small script for ranking.

Every page checks the session and the role; every POST checks the session's CSRF token. Labelers
see only their own tasks (another person's task answers 404, as if it did not exist); reviewers and
admins see every answer on an item. Prompts and model outputs are untrusted text: autoescaping plus
a Content-Security-Policy without inline scripts.
"""
from __future__ import annotations

import secrets
import tempfile
from pathlib import Path
from urllib.parse import quote

from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader
from starlette.exceptions import HTTPException as StarletteHTTPException
from sqlalchemy import func, select
from sqlalchemy.orm import sessionmaker

from alignloop.errors import InputError
from alignloop.feedback import export as X
from alignloop.feedback import store
from alignloop.feedback.models import KINDS, ROLES, Item, Project, Task, User, now
from alignloop.feedback.sampling import Sampler, models_of
from alignloop.feedback.security import (LOGIN_CSRF_COOKIE, SESSION_COOKIE, SESSION_DAYS, LoginThrottle,
                                         client_address, close_session, close_sessions_of, hash_password,
                                         open_session, same, session_user, verify_password)

HERE = Path(__file__).parent
# Ids in paths: a number a database column can hold (a larger one is a 422, not a crash of the driver).
Id = Annotated[int, PathParam(ge=1, le=2**31 - 1)]
LETTERS = "ABCDEFGHI"
STAFF = ("admin", "reviewer")
MESSAGES = {"imported": "Imported {n} items.",
            "imported_k": "Imported {n} items. Warning: {w} of them do not have this project's K answers; they are "
                          "shown with the answers they have.", "created": "Created.", "sampling": "Sampling started.",
            "saved": "Saved.", "released": "Released {n} open tasks.", "unlocked": "Unlocked: failed logins forgotten.",
            "reset": "New password set; the account's sessions were closed.", "password": "Your password was changed."}
# What 1 and 7 mean on each rating scale (shown once above the answers, read by screen readers with
# every menu): anchors make one labeler's 5 mean what another's does.
RATING_ANCHORS = (("helpful", "no help", "fully does what was asked"), ("truthful", "false claims", "all true"),
                  ("harmless", "harmful", "no harm"))
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; object-src 'none'; "
       "base-uri 'none'; frame-ancestors 'none'; form-action 'self'")


class SecurityHeaders:
    """CSP, no sniffing, no framing, no caching of pages (a plain ASGI middleware: Starlette's
    BaseHTTPMiddleware costs a task group and two streams per request)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        static = scope["path"].startswith("/static/")

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"cache-control" or static]
                headers += [(b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
                            (b"x-frame-options", b"DENY"), (b"referrer-policy", b"same-origin")]
                if not static:
                    headers.append((b"cache-control", b"no-store"))
                message = {**message, "headers": headers}
            await send(message)
        await self.app(scope, receive, send_with_headers)


class NeedLogin(Exception):
    pass


class Page(Exception):
    """Answer with a rendered page (an error shown where the user is)."""

    def __init__(self, status: int, template: str, **ctx):
        self.status, self.template, self.ctx = status, template, ctx


def ranking_text(r: dict) -> str:
    """{"ranking": [1, 0, 2], "ties": [[0, 1]]} → "2 = 1 > 3" (answer numbers from 1)."""
    group = {i: n for n, g in enumerate(r.get("ties") or []) for i in g}
    out = str(r["ranking"][0] + 1)
    for a, b in zip(r["ranking"], r["ranking"][1:]):
        out += (" = " if a in group and group[a] == group.get(b) else " > ") + str(b + 1)
    return out


def create_app(run_dir, db_url: str | None = None, *, max_upload_bytes: int = 20 << 20,
               login_limit: int = 5, login_window: float = 300.0, throttle: LoginThrottle | None = None,
               device: str = "auto", dtype: str = "auto") -> FastAPI:
    run_dir = Path(run_dir)
    Sess: sessionmaker = store.open_db(run_dir, db_url)
    sampler = Sampler(run_dir, Sess, device, dtype)
    throttle = throttle or LoginThrottle(login_limit, login_window, login_limit * 4)
    env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=True, trim_blocks=True,
                      lstrip_blocks=True)
    env.filters["ranking_text"] = ranking_text
    env.globals.update(letters=LETTERS, roles=ROLES, kinds=KINDS, criteria=store.CRITERIA, flags=store.FLAGS,
                       rating_anchors=RATING_ANCHORS)

    # The schema lists every route (forms are read by hand, so their fields are not in it); no /docs,
    # whose page would load scripts from a CDN.
    app = FastAPI(title="alignloop label", docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.state.Sess, app.state.run_dir, app.state.sampler = Sess, run_dir, sampler
    app.state.throttle = throttle
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    def render(template: str, status: int = 200, **ctx) -> HTMLResponse:
        return HTMLResponse(env.get_template(template).render(**ctx), status_code=status)

    app.add_middleware(SecurityHeaders)

    @app.exception_handler(NeedLogin)
    async def need_login(request: Request, _):
        nxt = request.url.path if request.method == "GET" else "/"
        return RedirectResponse(f"/login?next={quote(nxt)}", status_code=303)

    @app.exception_handler(StarletteHTTPException)  # FastAPI's HTTPException and Starlette's own 404/405
    async def http_error(request: Request, e: StarletteHTTPException):
        return render("error.html", e.status_code, title="Error", message=e.detail, user=None, csrf=None)

    @app.exception_handler(Page)
    async def page(request: Request, e: Page):
        return render(e.template, e.status, **e.ctx)

    # ------------------------------------------------------------ sessions

    class Me:
        def __init__(self, user: User, csrf: str, token: str):
            self.user, self.csrf, self.token = user, csrf, token
            self.id, self.role, self.name = user.id, user.role, user.username

        def ctx(self, **kw) -> dict:
            return {"user": self.user, "csrf": self.csrf, **kw}

    def me(request: Request, roles=None, form=None) -> Me:
        token = request.cookies.get(SESSION_COOKIE)
        with Sess() as db:
            found = session_user(db, token)
        if found is None:
            raise NeedLogin()
        user, sess = found
        if form is not None and not same(form.get("csrf") or request.headers.get("x-csrf-token"), sess.csrf):
            raise HTTPException(403, "Missing or invalid CSRF token: reload the page and try again.")
        if roles and user.role not in roles:
            raise HTTPException(403, "Your role may not open this page.")
        return Me(user, sess.csrf, token)

    async def read_form(request: Request):
        return await request.form()

    async def read_upload(request: Request):
        """The form of an upload, its body capped at max_upload_bytes (+ room for the other fields)."""
        cap = max_upload_bytes + 64 * 1024
        declared = request.headers.get("content-length")
        body, too_big = bytearray(), declared is not None and declared.isdigit() and int(declared) > cap
        async for chunk in request.stream():
            if not too_big:
                body += chunk
                too_big = len(body) > cap
            if too_big and len(body) > 4 * cap:  # drain a little so the browser sees the answer
                break
        if too_big:
            return None
        request._body = bytes(body)  # Starlette re-reads a cached body when parsing the form
        return await request.form(max_files=1)

    def message(request: Request) -> str | None:
        m, n, w = (request.query_params.get(k, "") for k in ("m", "n", "w"))
        return MESSAGES[m].format(n=int(n) if n.isdigit() else 0, w=int(w) if w.isdigit() else 0) if m in MESSAGES else None

    def back(path: str) -> str:
        return path if path.startswith("/") and not path.startswith("//") and "\\" not in path else "/"

    # ------------------------------------------------------------ login

    @app.get("/healthz")
    def healthz():
        return PlainTextResponse("ok")

    @app.get("/login")
    def login_page(request: Request):
        token = secrets.token_urlsafe(32)
        resp = render("login.html", csrf=token, user=None, next=back(request.query_params.get("next", "/")))
        resp.set_cookie(LOGIN_CSRF_COOKIE, token, httponly=True, samesite="strict", path="/login",
                        secure=request.url.scheme == "https")
        return resp

    @app.post("/login")
    def login(request: Request, form=Depends(read_form)):
        if not same(form.get("csrf"), request.cookies.get(LOGIN_CSRF_COOKIE)):
            raise HTTPException(403, "Missing or invalid CSRF token: reload the login page and try again.")
        username, password = (form.get("username") or "").strip(), form.get("password") or ""
        nxt = back(form.get("next") or "/")
        addr = client_address(request)
        wait = throttle.wait(username, addr)
        if wait > 0:
            resp = render("login.html", 429, csrf=form.get("csrf"), user=None, next=nxt,
                          error=f"Too many failed logins from here: try again in {int(wait) + 1} seconds.")
            resp.headers["Retry-After"] = str(int(wait) + 1)
            return resp
        with Sess() as db:
            user = db.scalar(select(User).where(User.username == username))
            if not verify_password(user, password) or not user.active:
                throttle.failed(username, addr)
                return render("login.html", 401, csrf=form.get("csrf"), user=None, next=nxt,
                              error="Wrong username or password.")
            token = open_session(db, user)
            db.commit()
        throttle.succeeded(username, addr)
        resp = RedirectResponse(nxt, status_code=303)
        resp.set_cookie(SESSION_COOKIE, token, httponly=True, samesite="lax", max_age=SESSION_DAYS * 86400,
                        path="/", secure=request.url.scheme == "https")
        resp.delete_cookie(LOGIN_CSRF_COOKIE, path="/login")
        return resp

    @app.post("/logout")
    def logout(request: Request, form=Depends(read_form)):
        m = me(request, form=form)
        with Sess.begin() as db:
            close_session(db, m.token)
        resp = RedirectResponse("/login", status_code=303)
        resp.delete_cookie(SESSION_COOKIE, path="/")
        return resp

    # ------------------------------------------------------------ home, accounts, projects

    def home_ctx(m: Me, request: Request, **kw) -> dict:
        with Sess() as db:
            projects = db.scalars(select(Project).order_by(Project.id)).all()
            mine = {(pid, st): n for pid, st, n in db.execute(
                select(Task.project_id, Task.status, func.count()).where(Task.user_id == m.id)
                .group_by(Task.project_id, Task.status)).all()}
            prog = {p.id: store.progress(db, p) for p in projects} if m.role in STAFF else {}
            counts = {"submitted": db.scalar(select(func.count()).where(Task.status == "submitted")),
                      "reviews": db.scalar(select(func.count()).where(Item.resolution.is_not(None)))
                      } if m.role == "admin" else {}
        return m.ctx(projects=projects, mine=mine, progress=prog, message=message(request),
                     sampling=sampler.status, export_round=X.default_round(run_dir), export_counts=counts, **kw)

    @app.get("/", response_class=HTMLResponse)
    def home(request: Request):
        m = me(request)
        return render("home.html", **home_ctx(m, request))

    @app.post("/projects")
    def new_project(request: Request, form=Depends(read_form)):
        m = me(request, ("admin",), form)
        try:
            with Sess.begin() as db:
                p = store.create_project(db, form.get("name"), form.get("kind", "ranking"), form.get("k", 4),
                                         form.get("overlap", 1), form.get("instructions", ""))
        except InputError as e:
            raise Page(400, "home.html", **home_ctx(m, request, error=str(e)))
        return RedirectResponse(f"/projects/{p.id}?m=created", status_code=303)

    def users_page(m: Me, request: Request, status: int = 200, **kw):
        with Sess() as db:
            users = db.scalars(select(User).order_by(User.id)).all()
        return render("users.html", status, **m.ctx(users=users, message=message(request), **kw))

    @app.get("/admin/users")
    def users(request: Request):
        return users_page(me(request, ("admin",)), request)

    @app.post("/admin/users")
    def new_user(request: Request, form=Depends(read_form)):
        m = me(request, ("admin",), form)
        try:
            with Sess.begin() as db:
                store.create_user(db, form.get("username"), form.get("password"), form.get("role", "labeler"))
        except InputError as e:
            return users_page(m, request, 400, error=str(e))
        return RedirectResponse("/admin/users?m=created", status_code=303)

    @app.post("/admin/users/{uid}/active")
    def toggle_user(uid: Id, request: Request, form=Depends(read_form)):
        m = me(request, ("admin",), form)
        if uid == m.id:
            return users_page(m, request, 400, error="You cannot deactivate your own account.")
        with Sess.begin() as db:
            user = db.get(User, uid)
            if user is None:
                raise HTTPException(404, "No such account.")
            user.active = not user.active
        return RedirectResponse("/admin/users?m=saved", status_code=303)

    @app.post("/admin/users/{uid}/unlock")
    def unlock_user(uid: Id, request: Request, form=Depends(read_form)):
        me(request, ("admin",), form)
        with Sess() as db:
            user = db.get(User, uid)
            if user is None:
                raise HTTPException(404, "No such account.")
        throttle.unlock(user.username)
        return RedirectResponse("/admin/users?m=unlocked", status_code=303)

    @app.post("/admin/users/{uid}/password")
    def reset_password(uid: Id, request: Request, form=Depends(read_form)):
        m = me(request, ("admin",), form)
        try:
            store.check_password(form.get("password") or "")
        except InputError as e:
            return users_page(m, request, 400, error=str(e))
        with Sess.begin() as db:
            user = db.get(User, uid)
            if user is None:
                raise HTTPException(404, "No such account.")
            user.password_hash = hash_password(form.get("password"))
            if user.id != m.id:
                close_sessions_of(db, user.id)
        throttle.unlock(user.username)
        return RedirectResponse("/admin/users?m=reset", status_code=303)

    @app.get("/account")
    def account(request: Request):
        m = me(request)
        return render("account.html", **m.ctx(message=message(request)))

    @app.post("/account/password")
    def change_password(request: Request, form=Depends(read_form)):
        m = me(request, form=form)
        try:
            with Sess() as db:
                user = db.get(User, m.id)
                if not verify_password(user, form.get("current") or ""):
                    raise InputError("the current password is wrong", field="current")
            if (form.get("password") or "") != (form.get("again") or ""):
                raise InputError("the two new passwords differ", field="again")
            store.check_password(form.get("password") or "")
        except InputError as e:
            return render("account.html", 400, **m.ctx(error=str(e)))
        with Sess.begin() as db:
            db.get(User, m.id).password_hash = hash_password(form.get("password"))
            close_sessions_of(db, m.id, keep=m.token)  # other devices must log in with the new password
        return RedirectResponse("/account?m=password", status_code=303)

    def get_project(db, pid: int) -> Project:
        p = db.get(Project, pid)
        if p is None:
            raise HTTPException(404, "No such project.")
        return p

    def project_ctx(m: Me, request: Request, pid: int, **kw) -> dict:
        offset = int(request.query_params.get("offset", "0") or 0) if request.query_params.get(
            "offset", "0").isdigit() else 0
        disagreements = request.query_params.get("disagreements") == "1"
        with Sess() as db:
            p = get_project(db, pid)
            agreement = store.agreement(db, p)
            q = select(Item).where(Item.project_id == pid).order_by(Item.id)
            if disagreements:  # items whose labelers did not all order every pair alike, worst first
                worst = sorted((a, i) for i, a in agreement["items"].items() if a is not None and a < 1)
                q = q.where(Item.id.in_([i for _, i in worst]))
            items = db.scalars(q.offset(offset).limit(200)).all()
            if disagreements:
                items.sort(key=lambda it: agreement["items"][it.id])
            ctx = dict(project=p, progress=store.progress(db, p), agreement=agreement, items=items,
                       offset=offset, message=message(request), models=list(models_of(run_dir)),
                       disagreements=disagreements,
                       sampling=sampler.status if sampler.status.get("project") == pid else None)
        return m.ctx(**ctx, **kw)

    @app.get("/projects/{pid}")
    def project_page(pid: Id, request: Request):
        m = me(request, STAFF)
        return render("project.html", **project_ctx(m, request, pid))

    @app.post("/projects/{pid}/import")
    def import_prompts(pid: Id, request: Request, form=Depends(read_upload)):
        if form is None:  # too big: the form was not parsed, so check the session without CSRF first
            m = me(request, ("admin",))
            raise Page(413, "project.html", **project_ctx(
                m, request, pid, error=f"The file is too large (at most {max_upload_bytes // 1024} KiB)."))
        m = me(request, ("admin",), form)
        upload = form.get("file")
        with Sess() as db:
            kind, k = get_project(db, pid).kind, get_project(db, pid).k
        try:
            if upload is None or not hasattr(upload, "read") or not upload.filename:
                raise InputError("choose a file to import", field="file")
            with tempfile.TemporaryDirectory(prefix="alignloop-upload-") as tmp:
                path = Path(tmp) / "upload"
                path.write_bytes(upload.file.read())
                if path.stat().st_size > max_upload_bytes:
                    raise InputError(f"the file is too large (at most {max_upload_bytes // 1024} KiB)",
                                     file=upload.filename)
                parsed = store.parse_import(path, upload.filename, kind)
        except InputError as e:
            raise Page(400, "project.html", **project_ctx(m, request, pid, error=f"Nothing imported: {e}"))
        n = store.import_items(Sess, pid, parsed, source=f"import:{upload.filename}"[:300])
        # imported answers are ranked as they come (2–9 of them), but a K other than the project's is
        # most often the wrong file: say so
        other = sum(1 for _, answers in parsed if answers is not None and len(answers) != k)
        return RedirectResponse(f"/projects/{pid}?m={'imported_k' if other else 'imported'}&n={n}&w={other}",
                                status_code=303)

    @app.post("/projects/{pid}/sample")
    def sample(pid: Id, request: Request, form=Depends(read_form)):
        m = me(request, ("admin",), form)
        with Sess() as db:
            project = get_project(db, pid)
        try:
            if project.kind != "ranking":
                raise ValueError("only ranking projects have answers to sample")
            k = store._int(form.get("k") or project.k, "k", store.K_MIN, store.K_MAX)
            max_new = store._int(form.get("max_new_tokens") or 64, "max_new_tokens", 1, 2048)
            temperature = float(form.get("temperature") or 1.0)
            if not 0 <= temperature <= 5:
                raise ValueError("temperature must be between 0 and 5")
            sampler.start(pid, form.get("model") or "current", k, max_new, temperature)
        except (ValueError, InputError) as e:
            raise Page(400, "project.html", **project_ctx(m, request, pid, error=str(e)))
        return RedirectResponse(f"/projects/{pid}?m=sampling", status_code=303)

    @app.post("/projects/{pid}/release")
    def release(pid: Id, request: Request, form=Depends(read_form)):
        m = me(request, ("admin",), form)
        try:
            hours = float(form.get("hours") or "")
            if not 0 <= hours <= 10_000:
                raise ValueError
        except ValueError:
            raise Page(400, "project.html", **project_ctx(m, request, pid, error="Give the hours as a number."))
        with Sess() as db:
            get_project(db, pid)
        n = store.release_stale(Sess, pid, hours)
        return RedirectResponse(f"/projects/{pid}?m=released&n={n}", status_code=303)

    @app.get("/projects/{pid}/sampling")
    def sampling_status(pid: Id, request: Request):
        me(request, STAFF)
        st = sampler.status
        return JSONResponse(st if st.get("project") == pid else {"state": "idle"})

    # ------------------------------------------------------------ tasks

    @app.get("/projects/{pid}/next")
    def next_task(pid: Id, request: Request):
        m = me(request)
        task = store.next_task(Sess, m.id, pid)
        if task is None:
            with Sess() as db:
                return render("done.html", **m.ctx(project=get_project(db, pid)))
        return RedirectResponse(f"/tasks/{task.id}", status_code=303)

    def own_task(db, tid: int, m: Me) -> tuple[Task, Item, Project]:
        task = db.get(Task, tid)
        if task is None or task.user_id != m.id:  # another person's task does not exist for you
            raise HTTPException(404, "No such task.")
        return task, db.get(Item, task.item_id), db.get(Project, task.project_id)

    def task_page(m: Me, tid: int, status: int = 200, **kw):
        with Sess() as db:
            task, item, project = own_task(db, tid, m)
            if task.status != "assigned":
                return render("done.html", 409 if status != 200 else 200, **m.ctx(
                    project=project, note=f"This task is {task.status} already.", **kw))
            mine = db.scalar(select(func.count()).where(Task.user_id == m.id, Task.project_id == project.id,
                                                        Task.status == "submitted"))
        if project.kind == "demonstration":
            return render("demo.html", status, **m.ctx(task=task, item=item, project=project, done=mine, **kw))
        answers = [(p, LETTERS[p], item.completions[i]) for p, i in enumerate(task.shown)]
        return render("rank.html", status, **m.ctx(task=task, item=item, project=project, answers=answers,
                                                    done=mine, **kw))

    @app.get("/tasks/{tid}")
    def show_task(tid: Id, request: Request):
        return task_page(me(request), tid)

    @app.post("/tasks/{tid}")
    def submit_task(tid: Id, request: Request, form=Depends(read_form)):
        m = me(request, form=form)
        with Sess() as db:
            task, item, project = own_task(db, tid, m)
        try:
            if task.status != "assigned":
                raise store.Conflict(f"this task is {task.status} already")
            answer = (store.demonstration_answer(form) if project.kind == "demonstration"
                      else store.ranking_answer(task.shown, form, item.completions))
            store.submit(Sess, tid, m.id, answer, store.elapsed_of(form))
        except InputError as e:  # the page comes back with the time spent so far, so the timer goes on
            return task_page(m, tid, 400, error=str(e), elapsed_before=store.elapsed_of(form))
        except store.Conflict as e:
            return render("done.html", 409, **m.ctx(project=project, note=f"Not saved: {e}."))
        return RedirectResponse(f"/projects/{project.id}/next", status_code=303)

    @app.post("/tasks/{tid}/skip")
    def skip_task(tid: Id, request: Request, form=Depends(read_form)):
        m = me(request, form=form)
        with Sess() as db:
            task, item, project = own_task(db, tid, m)
        try:
            store.skip(Sess, tid, m.id, form.get("reason"))
        except InputError as e:
            return task_page(m, tid, 400, error=str(e))
        except store.Conflict as e:
            return render("done.html", 409, **m.ctx(project=project, note=f"Not skipped: {e}."))
        return RedirectResponse(f"/projects/{project.id}/next", status_code=303)

    # ------------------------------------------------------------ review (reviewers and admins)

    def item_page(m: Me, iid: int, status: int = 200, **kw):
        with Sess() as db:
            item = db.get(Item, iid)
            if item is None:
                raise HTTPException(404, "No such item.")
            project = db.get(Project, item.project_id)
            tasks = db.execute(select(Task, User.username).join(User, User.id == Task.user_id)
                               .where(Task.item_id == iid).order_by(Task.id)).all()
            resolver = db.get(User, item.resolved_by) if item.resolved_by else None
        return render("item.html", status, **m.ctx(item=item, project=project, tasks=tasks, resolver=resolver, **kw))

    @app.get("/items/{iid}")
    def show_item(iid: Id, request: Request):
        return item_page(me(request, STAFF), iid)

    @app.post("/items/{iid}/{what}")
    def settle(iid: Id, what: str, request: Request, form=Depends(read_form)):
        m = me(request, STAFF if what == "resolve" else ("admin",), form)  # the session first, as everywhere
        if what not in ("resolve", "gold"):
            raise HTTPException(404, "Not found.")
        with Sess() as db:
            item = db.get(Item, iid)
            if item is None or not item.completions:
                raise HTTPException(404, "No such item with answers.")
            k = len(item.completions)
        try:
            value = None if form.get("clear") else store.ranking_of(form, k)
        except InputError as e:
            return item_page(m, iid, 400, error=str(e))
        with Sess.begin() as db:
            item = db.get(Item, iid)
            if what == "gold":
                item.gold = value
            else:
                item.resolution, item.resolved_by = value, (m.id if value else None)
                item.resolved_at = now() if value else None
        return RedirectResponse(f"/items/{iid}?m=saved", status_code=303)

    # ------------------------------------------------------------ export

    @app.post("/export")
    def export(request: Request, form=Depends(read_form)):
        m = me(request, ("admin",), form)
        try:
            rnd = form.get("round") or None
            rnd = store._int(rnd, "round", 1, 10_000) if rnd else None
            out = X.export(Sess, run_dir, rnd, pseudonymize=bool(form.get("pseudonymize")),
                           project=form.get("project") or None)
        except InputError as e:
            raise Page(400, "home.html", **home_ctx(m, request, error=str(e)))
        done = ", ".join(f"{n} records in {name}" for name, n in out["counts"].items())
        return render("home.html", **home_ctx(m, request, exported=f"Exported into round {out['round']} "
                                              f"({out['dir']}), as new files: {done}. Earlier files are unchanged."))

    return app
