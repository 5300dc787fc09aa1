"""The labeling app's routes, one router per area; `alignloop.feedback.app.create_app` includes them
in this order (the order of the paths in /openapi.json):

    login.py     /healthz, /login, /logout: everyone
    home.py      / (the projects, one's own tasks) and POST /projects (an admin creates one)
    people.py    /admin/users…: accounts (admins); /account…: one's own password (everyone)
    projects.py  /projects/{pid}…: a project's page, importing prompts, sampling answers, releasing
                 stale tasks (staff see, admins act)
    tasks.py     /projects/{pid}/next and /tasks/{tid}…: a labeler's own tasks, answered or skipped
    review.py    /items/{iid}…: every answer on an item; settling a ranking, marking a gold one (staff)
    export.py    POST /export: the labels as new files in a round folder (admins)

Shared plumbing (the session check, rendering, forms) is `alignloop.feedback.web`.
"""
