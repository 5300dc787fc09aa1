"""Review (reviewers and admins): `/items/{iid}` shows every labeler's answer on one item; a
reviewer settles the item's ranking (`resolve`), an admin marks the gold one (`gold`) that measures
the labelers."""
from __future__ import annotations

from fastapi import Depends, HTTPException, Request
from fastapi.responses import RedirectResponse
from sqlalchemy import select

from alignloop.accounts.models import User
from alignloop.errors import InputError
from alignloop.feedback import store
from alignloop.feedback.models import Item, Project, Task, now
from alignloop.feedback.web import STAFF, Id, Me, Site, read_form, site_of
from alignloop.routing import Routes

routes = Routes()


def item_page(site: Site, m: Me, iid: int, status: int = 200, **kw):
    with site.Sess() as db:
        item = db.get(Item, iid)
        if item is None:
            raise HTTPException(404, "No such item.")
        project = db.get(Project, item.project_id)
        tasks = db.execute(select(Task, User.username).join(User, User.id == Task.user_id)
                           .where(Task.item_id == iid).order_by(Task.id)).all()
        resolver = db.get(User, item.resolved_by) if item.resolved_by else None
    return site.render("item.html", status, **m.ctx(item=item, project=project, tasks=tasks, resolver=resolver, **kw))


@routes.get("/items/{iid}")
def show_item(iid: Id, request: Request):
    site = site_of(request)
    return item_page(site, site.me(request, STAFF), iid)


@routes.post("/items/{iid}/{what}")
def settle(iid: Id, what: str, request: Request, form=Depends(read_form)):
    site = site_of(request)
    m = site.me(request, STAFF if what == "resolve" else ("admin",), form)  # the session first, as everywhere
    if what not in ("resolve", "gold"):
        raise HTTPException(404, "Not found.")
    with site.Sess() as db:
        item = db.get(Item, iid)
        if item is None or not item.completions:
            raise HTTPException(404, "No such item with answers.")
        k = len(item.completions)
    try:
        value = None if form.get("clear") else store.ranking_of(form, k)
    except InputError as e:
        return item_page(site, m, iid, 400, error=str(e))
    with site.Sess.begin() as db:
        item = db.get(Item, iid)
        if what == "gold":
            item.gold = value
        else:
            item.resolution, item.resolved_by = value, (m.id if value else None)
            item.resolved_at = now() if value else None
    return RedirectResponse(f"/items/{iid}?m=saved", status_code=303)
