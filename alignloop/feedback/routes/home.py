"""The home page (`/`): the projects, and for each one's own tasks; staff see every project's
progress, admins the export form and the new-project form (POST /projects)."""
from __future__ import annotations

from fastapi import Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from sqlalchemy import func, select

from alignloop.feedback.export import default_round
from alignloop.feedback import store
from alignloop.feedback.models import Item, Project, Task
from alignloop.feedback.web import STAFF, Me, Page, Site, message, read_form, site_of
from alignloop.routing import Routes

routes = Routes()


def home_ctx(site: Site, m: Me, request: Request, **kw) -> dict:
    """What home.html shows to `m` (also under an error of its forms, and after an export)."""
    with site.Sess() as db:
        projects = db.scalars(select(Project).order_by(Project.id)).all()
        mine = {(pid, st): n for pid, st, n in db.execute(
            select(Task.project_id, Task.status, func.count()).where(Task.user_id == m.id)
            .group_by(Task.project_id, Task.status)).all()}
        prog = {p.id: store.progress(db, p) for p in projects} if m.role in STAFF else {}
        counts = {"submitted": db.scalar(select(func.count()).where(Task.status == "submitted")),
                  "reviews": db.scalar(select(func.count()).where(Item.resolution.is_not(None)))
                  } if m.role == "admin" else {}
    return m.ctx(projects=projects, mine=mine, progress=prog, message=message(request),
                 sampling=site.sampler.status, export_round=default_round(site.run_dir), export_counts=counts, **kw)


@routes.get("/", response_class=HTMLResponse)
def home(request: Request):
    site = site_of(request)
    m = site.me(request)
    return site.render("home.html", **home_ctx(site, m, request))


@routes.post("/projects")
def new_project(request: Request, form=Depends(read_form)):
    site = site_of(request)
    m = site.me(request, ("admin",), form)
    p, error = site.write(lambda db: store.create_project(db, form.get("name"), form.get("kind", "ranking"),
                                                          form.get("k", 4), form.get("overlap", 1),
                                                          form.get("instructions", "")))
    if error:
        raise Page(400, "home.html", **home_ctx(site, m, request, error=error))
    return RedirectResponse(f"/projects/{p.id}?m=created", status_code=303)
