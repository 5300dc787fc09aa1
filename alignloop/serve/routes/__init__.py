"""The routes of the chat server's pages, one router per area; `alignloop.serve.app.add_pages`
includes them in this order:

    login.py  /login, /logout: the run's accounts (`alignloop.accounts`), as in the labeling app
    chat.py   / (the chat page) and /api/conversations…, /api/chat/…, /api/messages/…/feedback
    arena.py  /arena (the page) and /api/arena/…: battles of two anonymous models, votes, the leaderboard

What they share (the `Site`, the `Gate` in front of them, the visitor, rendering, rate limits, the
event stream format) is `alignloop.serve.web`. The OpenAI API (`/v1`) is `alignloop.serve.app`.
"""
