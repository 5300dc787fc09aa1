"""Accounts in the labeling app: admins list, add, (de)activate and unlock accounts and set their
passwords (`/admin/users…`); everyone changes their own password (`/account…`). These are the
run's accounts for both apps (`alignloop.accounts`): a change here holds in the chat server too."""
from __future__ import annotations

from fastapi import Depends, HTTPException, Request
from fastapi.responses import RedirectResponse
from sqlalchemy import select

from alignloop.accounts.models import User
from alignloop.accounts.security import close_sessions_of, hash_password, verify_password
from alignloop.accounts.users import check_password, create_user
from alignloop.errors import InputError
from alignloop.feedback.web import Id, Me, Site, message, read_form, site_of
from alignloop.routing import Routes

routes = Routes()


def users_page(site: Site, m: Me, request: Request, status: int = 200, **kw):
    with site.Sess() as db:
        users = db.scalars(select(User).order_by(User.id)).all()
    return site.render("users.html", status, **m.ctx(users=users, message=message(request), **kw))


@routes.get("/admin/users")
def users(request: Request):
    site = site_of(request)
    return users_page(site, site.me(request, ("admin",)), request)


@routes.post("/admin/users")
def new_user(request: Request, form=Depends(read_form)):
    site = site_of(request)
    m = site.me(request, ("admin",), form)
    _, error = site.write(lambda db: create_user(db, form.get("username"), form.get("password"),
                                                 form.get("role", "labeler")))
    if error:
        return users_page(site, m, request, 400, error=error)
    return RedirectResponse("/admin/users?m=created", status_code=303)


@routes.post("/admin/users/{uid}/active")
def toggle_user(uid: Id, request: Request, form=Depends(read_form)):
    site = site_of(request)
    m = site.me(request, ("admin",), form)
    if uid == m.id:  # the last admin must not lock everyone out
        return users_page(site, m, request, 400, error="You cannot deactivate your own account.")
    with site.Sess.begin() as db:
        user = db.get(User, uid)
        if user is None:
            raise HTTPException(404, "No such account.")
        user.active = not user.active
    return RedirectResponse("/admin/users?m=saved", status_code=303)


@routes.post("/admin/users/{uid}/unlock")
def unlock_user(uid: Id, request: Request, form=Depends(read_form)):
    site = site_of(request)
    site.me(request, ("admin",), form)
    with site.Sess() as db:
        user = db.get(User, uid)
        if user is None:
            raise HTTPException(404, "No such account.")
    site.throttle.unlock(user.username)
    return RedirectResponse("/admin/users?m=unlocked", status_code=303)


@routes.post("/admin/users/{uid}/password")
def reset_password(uid: Id, request: Request, form=Depends(read_form)):
    site = site_of(request)
    m = site.me(request, ("admin",), form)
    try:
        check_password(form.get("password") or "")
    except InputError as e:
        return users_page(site, m, request, 400, error=str(e))
    with site.Sess.begin() as db:
        user = db.get(User, uid)
        if user is None:
            raise HTTPException(404, "No such account.")
        user.password_hash = hash_password(form.get("password"))
        if user.id != m.id:  # whoever knew the old password is logged out (the admin stays logged in)
            close_sessions_of(db, user.id)
    site.throttle.unlock(user.username)
    return RedirectResponse("/admin/users?m=reset", status_code=303)


@routes.get("/account")
def account(request: Request):
    site = site_of(request)
    m = site.me(request)
    return site.render("account.html", **m.ctx(message=message(request)))


@routes.post("/account/password")
def change_password(request: Request, form=Depends(read_form)):
    site = site_of(request)
    m = site.me(request, form=form)
    try:
        with site.Sess() as db:
            user = db.get(User, m.id)
            if not verify_password(user, form.get("current") or ""):
                raise InputError("the current password is wrong", field="current")
        if (form.get("password") or "") != (form.get("again") or ""):
            raise InputError("the two new passwords differ", field="again")
        check_password(form.get("password") or "")
    except InputError as e:
        return site.render("account.html", 400, **m.ctx(error=str(e)))
    with site.Sess.begin() as db:
        db.get(User, m.id).password_hash = hash_password(form.get("password"))
        close_sessions_of(db, m.id, keep=m.token)  # other devices must log in with the new password
    return RedirectResponse("/account?m=password", status_code=303)
