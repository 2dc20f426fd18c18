"""The reference design's API, written for the benchmark the way that design writes it (never shipped).

`gunicorn bench.stack.refapp:app` serves it, three instances behind nginx
(bench/stack/nginx.conf.tmpl). Flask with a Flask-JWT-Extended-style
`jwt_required` decorator: every protected view decodes the bearer token itself
(HS256, exp, the blocklist in Redis as JWT_BLACKLIST_ENABLED does), so a call
through nginx decodes twice: in the auth_request subrequest to /auth/validate
and in the view. Users are rows of a plain `users` table read with psycopg2
(a pool per process); login checks bcrypt, issues an access and a refresh
token and stores the session in Redis; /tasks/submit calls Celery
(bench/stack/reftasks.py). Settings come from REF_* environment variables that
bench/stack/reference.py sets.
"""

from __future__ import annotations

import datetime as dt
import functools
import os
import threading
import time
import uuid

import bcrypt
import jwt
import psycopg2.pool
import redis
from flask import Flask, g, jsonify, request

from bench.stack import reftasks

SECRET = os.environ.get("REF_JWT_SECRET", "reference-bench-secret")
PG_DSN = os.environ.get("REF_PG_DSN", "")
INSTANCE = os.environ.get("REF_INSTANCE", "api1")
THREADS = int(os.environ.get("REF_THREADS", "8"))
ACCESS_TTL = dt.timedelta(hours=1)
REFRESH_TTL = dt.timedelta(days=30)

SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    id SERIAL PRIMARY KEY,
    username VARCHAR(80) UNIQUE NOT NULL,
    email VARCHAR(120) UNIQUE NOT NULL,
    password_hash VARCHAR(255) NOT NULL,
    role VARCHAR(20) NOT NULL DEFAULT 'user',
    is_active BOOLEAN NOT NULL DEFAULT TRUE,
    full_name VARCHAR(200) NOT NULL DEFAULT '',
    department VARCHAR(100) NOT NULL DEFAULT '',
    login_count INTEGER NOT NULL DEFAULT 0,
    last_login TIMESTAMP NULL,
    created_at TIMESTAMP NOT NULL DEFAULT now()
)
"""
USER_COLUMNS = "id, username, email, role, is_active, full_name, department, login_count, last_login, created_at"

app = Flask(__name__)
_pool: psycopg2.pool.ThreadedConnectionPool | None = None
_pool_lock = threading.Lock()
_redis = redis.Redis.from_url(reftasks.REDIS_URL)


def pool() -> psycopg2.pool.ThreadedConnectionPool:
    """The process's connection pool, made after gunicorn forked: one kept per thread (SQLAlchemy keeps pool_size).

    (psycopg2's pool closes a returned connection beyond minconn, so minconn is the pool size.)
    """
    global _pool
    if _pool is None:
        with _pool_lock:
            if _pool is None:
                _pool = psycopg2.pool.ThreadedConnectionPool(THREADS, THREADS, PG_DSN)
    return _pool


def query_one(sql: str, args: tuple) -> tuple | None:
    conn = pool().getconn()
    try:
        with conn.cursor() as cur:
            cur.execute(sql, args)
            row = cur.fetchone() if cur.description else None
        conn.commit()
        return row
    except Exception:
        conn.rollback()
        raise
    finally:
        pool().putconn(conn)


def user_dict(row: tuple) -> dict:
    names = [c.strip() for c in USER_COLUMNS.split(",")]
    out = dict(zip(names, row, strict=True))
    for key in ("last_login", "created_at"):
        out[key] = out[key].isoformat() if out[key] else None
    return out


def error(status: int, code: str, message: str):
    return jsonify({"status": "error", "error": {"code": code, "message": message}}), status


def make_token(user_id: int, role: str, kind: str, ttl: dt.timedelta) -> tuple[str, str]:
    now = dt.datetime.now(dt.UTC)
    jti = uuid.uuid4().hex
    claims = {"sub": str(user_id), "role": role, "type": kind, "jti": jti, "iat": now, "nbf": now, "exp": now + ttl}
    return jwt.encode(claims, SECRET, algorithm="HS256"), jti


def jwt_required(view):
    """Flask-JWT-Extended's decorator, reduced to what it does per call: decode, verify, blocklist."""

    @functools.wraps(view)
    def wrapper(*args, **kwargs):
        header = request.headers.get("Authorization", "")
        if not header.startswith("Bearer "):
            return error(401, "authorization_required", "Missing Authorization Header")
        try:
            claims = jwt.decode(header[7:], SECRET, algorithms=["HS256"])
        except jwt.ExpiredSignatureError:
            return error(401, "token_expired", "Token has expired")
        except jwt.InvalidTokenError:
            return error(422, "invalid_token", "Invalid token")
        if claims.get("type") != "access":
            return error(422, "invalid_token", "Only access tokens are allowed")
        if _redis.exists(f"token_blacklist:{claims['jti']}"):
            return error(401, "token_revoked", "Token has been revoked")
        g.jwt = claims
        return view(*args, **kwargs)

    return wrapper


@app.get("/health/ping")
def ping():
    return jsonify({"status": "success", "message": "pong", "instance": INSTANCE, "timestamp": time.time()})


@app.post("/auth/login")
def login():
    body = request.get_json(silent=True) or {}
    username, password = body.get("username"), body.get("password")
    if not isinstance(username, str) or not isinstance(password, str):
        return error(400, "validation_error", "username and password are required")
    row = query_one("SELECT id, password_hash, role, is_active FROM users WHERE username = %s", (username,))
    if row is None or not row[3] or not bcrypt.checkpw(password.encode(), row[1].encode()):
        return error(401, "invalid_credentials", "Invalid username or password")
    user_id, role = row[0], row[2]
    user = query_one(
        f"UPDATE users SET last_login = now(), login_count = login_count + 1 WHERE id = %s RETURNING {USER_COLUMNS}", (user_id,)
    )
    access, _ = make_token(user_id, role, "access", ACCESS_TTL)
    refresh, refresh_jti = make_token(user_id, role, "refresh", REFRESH_TTL)
    _redis.setex(f"session:{user_id}:{refresh_jti}", int(REFRESH_TTL.total_seconds()), INSTANCE)
    return jsonify({"status": "success", "data": {"access_token": access, "refresh_token": refresh, "user": user_dict(user)}})


@app.get("/auth/validate")
@jwt_required
def validate():
    resp = jsonify({"status": "success", "data": {"valid": True, "user_id": g.jwt["sub"]}})
    resp.headers["X-User-ID"] = g.jwt["sub"]
    resp.headers["X-User-Role"] = g.jwt.get("role", "user")
    return resp


@app.get("/api/protected")
@jwt_required
def protected():
    row = query_one(f"SELECT {USER_COLUMNS} FROM users WHERE id = %s", (int(g.jwt["sub"]),))
    if row is None or not row[4]:
        return error(401, "account_disabled", "User not found or inactive")
    user = user_dict(row)
    return jsonify({"status": "success", "data": {"user": user, "message": f"Hello {user['username']}, this is a protected resource"}})


@app.post("/tasks/submit")
@jwt_required
def submit():
    body = request.get_json(silent=True) or {}
    if body.get("task_type") != "sample" or not isinstance(body.get("data", {}), dict):
        return error(400, "validation_error", "task_type must be sample and data an object")
    priority = int(body.get("priority", 5))
    result = reftasks.sample.apply_async(args=[body.get("data", {})], priority=priority)
    return jsonify({"status": "success", "data": {"task_id": result.id, "status": "queued", "priority": priority}})


@app.get("/tasks/status/<task_id>")
@jwt_required
def status(task_id: str):
    result = reftasks.app.AsyncResult(task_id)
    return jsonify({"status": "success", "data": {"task_id": task_id, "status": result.state.lower()}})
