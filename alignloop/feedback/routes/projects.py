"""A project's page (`/projects/{pid}`, staff): progress, agreement, the items (or only those the
labelers disagree on); and the admin's actions on it: importing prompts, sampling K answers from a
model of the run, releasing tasks left open. `/projects/{pid}/sampling` is the sampling job's state,
polled by the page while it runs."""
from __future__ import annotations

import tempfile
from pathlib import Path

from fastapi import Depends, HTTPException, Request
from fastapi.responses import JSONResponse, RedirectResponse
from sqlalchemy import select

from alignloop.errors import InputError
from alignloop.feedback import store
from alignloop.feedback.models import Item, Project
from alignloop.feedback.sampling import models_of
from alignloop.feedback.web import STAFF, Id, Me, Page, Site, message, read_form, read_upload, site_of
from alignloop.routing import Routes

routes = Routes()


def get_project(db, pid: int) -> Project:
    p = db.get(Project, pid)
    if p is None:
        raise HTTPException(404, "No such project.")
    return p


def project_ctx(site: Site, m: Me, request: Request, pid: int, **kw) -> dict:
    """What project.html shows (also under an error of one of its forms)."""
    offset = int(request.query_params.get("offset", "0") or 0) if request.query_params.get(
        "offset", "0").isdigit() else 0
    disagreements = request.query_params.get("disagreements") == "1"
    with site.Sess() as db:
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
                   offset=offset, message=message(request), models=list(models_of(site.run_dir)),
                   disagreements=disagreements,
                   sampling=site.sampler.status if site.sampler.status.get("project") == pid else None)
    return m.ctx(**ctx, **kw)


@routes.get("/projects/{pid}")
def project_page(pid: Id, request: Request):
    site = site_of(request)
    m = site.me(request, STAFF)
    return site.render("project.html", **project_ctx(site, m, request, pid))


@routes.post("/projects/{pid}/import")
def import_prompts(pid: Id, request: Request, form=Depends(read_upload)):
    site = site_of(request)
    cap = site.max_upload_bytes
    if form is None:  # too big: the form was not parsed, so check the session without CSRF first
        m = site.me(request, ("admin",))
        raise Page(413, "project.html", **project_ctx(
            site, m, request, pid, error=f"The file is too large (at most {cap // 1024} KiB)."))
    m = site.me(request, ("admin",), form)
    upload = form.get("file")
    with site.Sess() as db:
        kind, k = get_project(db, pid).kind, get_project(db, pid).k
    try:
        if upload is None or not hasattr(upload, "read") or not upload.filename:
            raise InputError("choose a file to import", field="file")
        # the whole file is checked before anything is stored, so it is read from a private file
        with tempfile.TemporaryDirectory(prefix="alignloop-upload-") as tmp:
            path = Path(tmp) / "upload"
            path.write_bytes(upload.file.read())
            if path.stat().st_size > cap:
                raise InputError(f"the file is too large (at most {cap // 1024} KiB)", file=upload.filename)
            parsed = store.parse_import(path, upload.filename, kind)
    except InputError as e:
        raise Page(400, "project.html", **project_ctx(site, m, request, pid, error=f"Nothing imported: {e}"))
    n = store.import_items(site.Sess, pid, parsed, source=f"import:{upload.filename}"[:300])
    # imported answers are ranked as they come (2–9 of them), but a K other than the project's is
    # most often the wrong file: say so
    other = sum(1 for _, answers in parsed if answers is not None and len(answers) != k)
    return RedirectResponse(f"/projects/{pid}?m={'imported_k' if other else 'imported'}&n={n}&w={other}",
                            status_code=303)


@routes.post("/projects/{pid}/sample")
def sample(pid: Id, request: Request, form=Depends(read_form)):
    site = site_of(request)
    m = site.me(request, ("admin",), form)
    with site.Sess() as db:
        project = get_project(db, pid)
    try:
        if project.kind != "ranking":
            raise ValueError("only ranking projects have answers to sample")
        k = store._int(form.get("k") or project.k, "k", store.K_MIN, store.K_MAX)
        max_new = store._int(form.get("max_new_tokens") or 64, "max_new_tokens", 1, 2048)
        temperature = float(form.get("temperature") or 1.0)
        if not 0 <= temperature <= 5:
            raise ValueError("temperature must be between 0 and 5")
        site.sampler.start(pid, form.get("model") or "current", k, max_new, temperature)
    except (ValueError, InputError) as e:
        raise Page(400, "project.html", **project_ctx(site, m, request, pid, error=str(e)))
    return RedirectResponse(f"/projects/{pid}?m=sampling", status_code=303)


@routes.post("/projects/{pid}/release")
def release(pid: Id, request: Request, form=Depends(read_form)):
    site = site_of(request)
    m = site.me(request, ("admin",), form)
    try:
        hours = float(form.get("hours") or "")
        if not 0 <= hours <= 10_000:
            raise ValueError
    except ValueError:
        raise Page(400, "project.html", **project_ctx(site, m, request, pid, error="Give the hours as a number."))
    with site.Sess() as db:
        get_project(db, pid)
    n = store.release_stale(site.Sess, pid, hours)
    return RedirectResponse(f"/projects/{pid}?m=released&n={n}", status_code=303)


@routes.get("/projects/{pid}/sampling")
def sampling_status(pid: Id, request: Request):
    site = site_of(request)
    site.me(request, STAFF)
    st = site.sampler.status
    return JSONResponse(st if st.get("project") == pid else {"state": "idle"})
