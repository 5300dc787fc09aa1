"""The shared database layer: text with NUL characters is stored, on SQLite and on PostgreSQL alike.

A byte-level model can sample the 0x00 byte (an untrained one did, in the chat-server test on
PostgreSQL, which refuses NUL in text and broke the stream), and users can type it.
"""
from __future__ import annotations

import pytest

from alignloop.db import connect, migrate, sessions
from alignloop.feedback.models import Item, Project
from alignloop.serve.tables import Conversation, Message

NUL_TEXT = "the capital is w\x00Qbr"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'alignloop.db'}"
        return
    from alignloop.feedback.testing import postgres_database
    with postgres_database(request.getfixturevalue("pg_url")) as url:
        yield url


def test_text_with_nul_is_stored_with_a_replacement_character(db_url):
    engine = connect(db_url)
    try:
        migrate(engine)
        Session = sessions(engine)
        with Session.begin() as s:
            conv = Conversation(user="u", model="m", title=NUL_TEXT)
            s.add(conv)
            s.flush()
            s.add(Message(conversation_id=conv.id, role="assistant", content=NUL_TEXT))
            project = Project(name="p", kind="ranking")
            s.add(project)
            s.flush()
            s.add(Item(project_id=project.id, prompt=[{"role": "user", "content": NUL_TEXT}],
                       completions=[NUL_TEXT, "fine"]))
        with Session() as s:
            assert s.query(Message).one().content == "the capital is w\ufffdQbr"
            assert s.query(Conversation).one().title == "the capital is w\ufffdQbr"
            item = s.query(Item).one()
            # JSON columns carry NUL escaped ("\u0000"): it comes back as it went in
            assert item.completions == [NUL_TEXT, "fine"] and item.prompt[0]["content"] == NUL_TEXT
            # text without NUL is untouched
            assert s.query(Project).one().name == "p"
    finally:
        engine.dispose()
