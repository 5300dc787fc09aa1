"""The run's accounts: one account system for both web apps.

The labeling app (`alignloop label`) and the chat server's pages (`alignloop serve`) read the same
`label_users` and `label_sessions` tables of the run's database, so a person has one account, one
role and one password for both. (The tables keep their `label_` names: the labeling app's first
migration created them, and a rename would be a schema change.)

    models.py    the two tables, User and Session, and the roles
    users.py     creating accounts, the rules for names and passwords, checking a login
    security.py  password hashing (argon2id), session tokens, CSRF comparison, the cookie names
    throttle.py  rate limits: failed logins per (account, address), and actions per key
    web.py       what both apps' login and logout routes share: the safe `next`, the session cookie

Nothing here imports either app; both apps import this package.
"""
