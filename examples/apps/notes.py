"""Example operator app: a small CRUD resource on its own peewee model.

Drop this file into the directory named by `[api] apps_dir` and every API
worker serves /api/notes and /api/notes/{note_id}: behind the same balancer,
token check, rate limits, error envelope and metrics as the built-in routes,
and listed in /openapi.json. Each user sees and edits only their own notes.
"""

from __future__ import annotations

from typing import Annotated

import falcon
import msgspec
import peewee as pw
from msgspec import Meta

from appliance.api import Page, ok, operation, paginate, read_json, read_query, require_user
from appliance.db.models import BaseModel
from appliance.errors import NotFound
from appliance.times import iso, utcnow


class Note(BaseModel):
    """Bound to the appliance's database (SQLite or PostgreSQL) like every built-in model."""

    owner_id = pw.IntegerField(index=True)
    title = pw.CharField(max_length=200)
    body = pw.TextField(default="")
    created_at = pw.DateTimeField(default=utcnow)
    updated_at = pw.DateTimeField(default=utcnow)

    class Meta:
        table_name = "example_note"


class NoteIn(msgspec.Struct, kw_only=True):
    title: Annotated[str, Meta(min_length=1, max_length=200)]
    body: Annotated[str, Meta(max_length=10000)] = ""


class NoteOut(msgspec.Struct, kw_only=True):
    id: int
    title: str
    body: str
    created_at: str
    updated_at: str


def _out(note: Note) -> NoteOut:
    return NoteOut(id=note.id, title=note.title, body=note.body, created_at=iso(note.created_at), updated_at=iso(note.updated_at))


def _mine(req: falcon.Request, note_id: int) -> Note:
    note = Note.get_or_none((Note.id == note_id) & (Note.owner_id == require_user(req).user_id))
    if note is None:
        raise NotFound(f"no note {note_id}", code="note_not_found")
    return note


class Notes:
    @operation("List my notes", query=Page, response=list[NoteOut], auth="user", paginated=True, tags=("notes",))
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        page = read_query(req, Page)
        rows, meta = paginate(Note.select().where(Note.owner_id == require_user(req).user_id).order_by(Note.id), page)
        ok(resp, [_out(n) for n in rows], metadata=meta)

    @operation("Create a note", request=NoteIn, response=NoteOut, auth="user", status=201, tags=("notes",))
    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        body = read_json(req, NoteIn)
        note = Note.create(owner_id=require_user(req).user_id, title=body.title, body=body.body)
        ok(resp, _out(note), status=201, links={"self": f"/api/notes/{note.id}"})


class OneNote:
    @operation("Read one of my notes", response=NoteOut, auth="user", errors=(404,), tags=("notes",))
    def on_get(self, req: falcon.Request, resp: falcon.Response, note_id: int) -> None:
        ok(resp, _out(_mine(req, note_id)))

    @operation("Replace one of my notes", request=NoteIn, response=NoteOut, auth="user", errors=(404,), tags=("notes",))
    def on_put(self, req: falcon.Request, resp: falcon.Response, note_id: int) -> None:
        note = _mine(req, note_id)
        body = read_json(req, NoteIn)
        note.title, note.body, note.updated_at = body.title, body.body, utcnow()
        note.save()
        ok(resp, _out(note))

    @operation("Delete one of my notes", response=NoteOut, auth="user", errors=(404,), tags=("notes",))
    def on_delete(self, req: falcon.Request, resp: falcon.Response, note_id: int) -> None:
        note = _mine(req, note_id)
        note.delete_instance()
        ok(resp, _out(note))


def setup(app: falcon.App, ctx) -> None:
    """Called once per worker: create the table if needed and add the routes."""
    try:
        ctx.db.create_tables([Note], safe=True)
    except pw.DatabaseError:  # every worker starts at once: on PostgreSQL another one may have created it just now
        ctx.db.rollback()
        if not Note.table_exists():
            raise
    app.add_route("/api/notes", Notes())
    app.add_route("/api/notes/{note_id:int}", OneNote())
