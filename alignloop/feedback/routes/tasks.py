"""A labeler's own tasks: `/projects/{pid}/next` hands out the next one (or says the project is
done), `/tasks/{tid}` shows it (the ranking screen with its ratings, flags, critique and correction,
or the demonstration form) and takes the answer or a skip. Another person's task answers 404, as if
it did not exist."""
from __future__ import annotations

from fastapi import Depends, HTTPException, Request
from fastapi.responses import RedirectResponse
from sqlalchemy import func, select

from alignloop.errors import InputError
from alignloop.feedback import store
from alignloop.feedback.models import Item, Project, Task
from alignloop.feedback.routes.projects import get_project
from alignloop.feedback.web import LETTERS, Id, Me, Site, read_form, site_of
from alignloop.routing import Routes

routes = Routes()


@routes.get("/projects/{pid}/next")
def next_task(pid: Id, request: Request):
    site = site_of(request)
    m = site.me(request)
    task = store.next_task(site.Sess, m.id, pid)
    if task is None:
        with site.Sess() as db:
            return site.render("done.html", **m.ctx(project=get_project(db, pid)))
    return RedirectResponse(f"/tasks/{task.id}", status_code=303)


def own_task(db, tid: int, m: Me) -> tuple[Task, Item, Project]:
    task = db.get(Task, tid)
    if task is None or task.user_id != m.id:  # another person's task does not exist for you
        raise HTTPException(404, "No such task.")
    return task, db.get(Item, task.item_id), db.get(Project, task.project_id)


def task_page(site: Site, m: Me, tid: int, status: int = 200, **kw):
    """The task's page; a task no longer open shows "done" (409 when it came back with an error)."""
    with site.Sess() as db:
        task, item, project = own_task(db, tid, m)
        if task.status != "assigned":
            return site.render("done.html", 409 if status != 200 else 200, **m.ctx(
                project=project, note=f"This task is {task.status} already.", **kw))
        mine = db.scalar(select(func.count()).where(Task.user_id == m.id, Task.project_id == project.id,
                                                    Task.status == "submitted"))
    if project.kind == "demonstration":
        return site.render("demo.html", status, **m.ctx(task=task, item=item, project=project, done=mine, **kw))
    answers = [(p, LETTERS[p], item.completions[i]) for p, i in enumerate(task.shown)]
    return site.render("rank.html", status, **m.ctx(task=task, item=item, project=project, answers=answers,
                                                     done=mine, **kw))


@routes.get("/tasks/{tid}")
def show_task(tid: Id, request: Request):
    site = site_of(request)
    return task_page(site, site.me(request), tid)


@routes.post("/tasks/{tid}")
def submit_task(tid: Id, request: Request, form=Depends(read_form)):
    site = site_of(request)
    m = site.me(request, form=form)
    with site.Sess() as db:
        task, item, project = own_task(db, tid, m)
    try:
        if task.status != "assigned":
            raise store.Conflict(f"this task is {task.status} already")
        answer = (store.demonstration_answer(form) if project.kind == "demonstration"
                  else store.ranking_answer(task.shown, form, item.completions))
        store.submit(site.Sess, tid, m.id, answer, store.elapsed_of(form))
    except InputError as e:  # the page comes back with the time spent so far, so the timer goes on
        return task_page(site, m, tid, 400, error=str(e), elapsed_before=store.elapsed_of(form))
    except store.Conflict as e:
        return site.render("done.html", 409, **m.ctx(project=project, note=f"Not saved: {e}."))
    return RedirectResponse(f"/projects/{project.id}/next", status_code=303)


@routes.post("/tasks/{tid}/skip")
def skip_task(tid: Id, request: Request, form=Depends(read_form)):
    site = site_of(request)
    m = site.me(request, form=form)
    with site.Sess() as db:
        task, item, project = own_task(db, tid, m)
    try:
        store.skip(site.Sess, tid, m.id, form.get("reason"))
    except InputError as e:
        return task_page(site, m, tid, 400, error=str(e))
    except store.Conflict as e:
        return site.render("done.html", 409, **m.ctx(project=project, note=f"Not skipped: {e}."))
    return RedirectResponse(f"/projects/{project.id}/next", status_code=303)
