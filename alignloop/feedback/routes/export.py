"""POST /export (admins): the labels written as new files into a round folder of the run, as
`alignloop label export` writes them (`alignloop.feedback.export`); the home page reports where."""
from __future__ import annotations

from fastapi import Depends, Request

from alignloop.errors import InputError
from alignloop.feedback.export import export as export_round
from alignloop.feedback import store
from alignloop.feedback.routes.home import home_ctx
from alignloop.feedback.web import Page, read_form, site_of
from alignloop.routing import Routes

routes = Routes()


@routes.post("/export")
def export(request: Request, form=Depends(read_form)):
    site = site_of(request)
    m = site.me(request, ("admin",), form)
    try:
        rnd = form.get("round") or None
        rnd = store._int(rnd, "round", 1, 10_000) if rnd else None
        out = export_round(site.Sess, site.run_dir, rnd, pseudonymize=bool(form.get("pseudonymize")),
                       project=form.get("project") or None)
    except InputError as e:
        raise Page(400, "home.html", **home_ctx(site, m, request, error=str(e)))
    done = ", ".join(f"{n} records in {name}" for name, n in out["counts"].items())
    return site.render("home.html", **home_ctx(site, m, request, exported=f"Exported into round {out['round']} "
                                              f"({out['dir']}), as new files: {done}. Earlier files are unchanged."))
