"""The feedback web app: HTTP routes over a `FeedbackStore` fed by a `PairQueue`.

Browsers sign in once with their token and get a random session id (kept server-side, revoked
at sign-out, expiring after `session_hours`) in an HttpOnly, SameSite=Strict cookie; they post
forms with a CSRF token. Scripts send `Authorization: Bearer TOKEN` to the JSON API (a header
a foreign page cannot make a browser send, so no CSRF token is needed there). The JSON API
takes only `application/json` bodies and the forms only form bodies (415 otherwise); failed
sign-ins are limited per client (429), and `Guard` refuses unknown Host headers (400).

Routes: `/` the judging page, `/judge` its form post (works without JavaScript),
`/api/next` and `/api/judge` the JSON twins the page's script uses, `/stats`, `/api/stats`,
`/login`, `/logout`, `/healthz`.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from jinja2 import Environment, FileSystemLoader
from starlette.concurrency import run_in_threadpool

from .auth import SignInLimiter, csrf_ok, csrf_token, find_rater
from .guard import Guard
from .pairs import PairQueue
from .stats import compute_stats
from .store import FeedbackStore, JudgementRejected

log = logging.getLogger(__name__)
HERE = Path(__file__).parent
SESSION_COOKIE = "palm_rlhf_session"
LOGIN_CSRF_COOKIE = "palm_rlhf_login_csrf"
FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")
CHOICE_LABELS = [("a", "1", "A is better"), ("b", "2", "B is better"), ("tie", "3", "Tie"),
                 ("both_bad", "4", "Both bad")]


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def _no_constants(name: str):
    raise ValueError(f"{name} is not JSON")


def parse_json_object(body: bytes) -> dict:
    """The request body as a JSON object; ValueError (a 400) for anything else, including
    NaN/Infinity (not JSON) and nesting too deep for the parser."""
    try:
        value = json.loads(body, parse_constant=_no_constants)
    except RecursionError:
        raise ValueError("the JSON is nested too deeply") from None
    if not isinstance(value, dict):
        raise ValueError("the body must be a JSON object")
    return value


def create_app(store: FeedbackStore, queue: PairQueue, raters: dict[str, str], *, shared_fraction: float = 0.1,
               max_body_bytes: int = 64 * 1024, wait_s: float = 10.0, secure_cookies: bool = False,
               allowed_hosts=(), session_hours: float = 12.0, limiter: SignInLimiter | None = None):
    """The ASGI app. `raters` maps token -> rater name (see `auth.read_raters`); `allowed_hosts`
    are the names (besides IP addresses and localhost) the server answers to."""
    secret = store.secret()
    names = set(raters.values())
    limiter = limiter or SignInLimiter()
    session_s = session_hours * 3600.0
    env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=True)
    templates = Jinja2Templates(env=env)

    @asynccontextmanager
    async def lifespan(app):
        queue.start()
        try:
            yield
        finally:
            queue.stop()

    app = FastAPI(title="palm-rlhf feedback", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    # ------------------------------------------------------------------ helpers

    def client(request: Request) -> str:
        return request.client.host if request.client else "unknown"

    async def rater_of(request: Request) -> tuple[str | None, str]:
        """(rater or None, how they authenticated: "bearer" | "cookie" | "none" | "limited").

        A wrong bearer token counts as a failed sign-in; past the limit, "limited" (429)."""
        header = request.headers.get("authorization", "")
        if header:
            if limiter.retry_after(client(request)):
                return None, "limited"
            scheme, _, token = header.partition(" ")
            rater = find_rater(raters, token.strip()) if scheme.lower() == "bearer" else None
            if rater is None:
                limiter.failed(client(request))
            return rater, "bearer"
        session = request.cookies.get(SESSION_COOKIE)
        if not session:
            return None, "none"
        rater = await run_in_threadpool(store.session_rater, session)
        return (rater if rater in names else None), "cookie"  # a rater removed from --raters is out

    def same_origin(request: Request) -> bool:
        """Browsers send Origin on every POST; a foreign page's Origin never matches our Host."""
        origin = request.headers.get("origin")
        if origin is None:  # a non-browser client; the CSRF token or bearer token still applies
            return True
        return origin.split("://", 1)[-1] == request.headers.get("host", "")

    def unauthorized_json(request: Request, how: str) -> JSONResponse:
        if how == "limited":
            return too_many(request)
        return JSONResponse({"error": "missing or unknown rater token; send Authorization: Bearer TOKEN"},
                            status_code=401, headers={"www-authenticate": "Bearer"})

    def too_many(request: Request) -> JSONResponse:
        wait = limiter.retry_after(client(request))
        return JSONResponse({"error": f"too many failed sign-ins from your address; try again in {wait} s"},
                            status_code=429, headers={"retry-after": str(wait)})

    def wrong_type(request: Request, expected: str) -> JSONResponse | None:
        """415 unless the body's Content-Type is `expected` ("json" or "form")."""
        kind = media_type(request)
        if (kind == "application/json") if expected == "json" else (kind in FORM_TYPES):
            return None
        want = "application/json" if expected == "json" else " or ".join(FORM_TYPES)
        return JSONResponse({"error": f"send the body as Content-Type: {want} (got {kind or 'none'!r})"},
                            status_code=415)

    def progress(rater: str) -> dict:
        return {"you": store.judged_count(rater), "total": store.judged_count(), "ready": store.ready_count()}

    def next_pair(rater: str, wait: float):
        """The rater's pair, waiting up to `wait` seconds for the generator (runs in a worker thread)."""
        deadline = time.monotonic() + wait
        shared = store.draw_shared(shared_fraction)  # once per request, however often it waits
        while True:
            pair = store.next_pair(rater, shared=shared)
            if pair is not None:
                queue.taken()
                return pair
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            queue.wait_ready(min(left, 1.0))

    def login_page(request: Request, status: int, error: str = ""):
        token = secrets.token_urlsafe(24)
        response = templates.TemplateResponse(request, "login.html", {"csrf": token, "error": error},
                                              status_code=status)
        response.set_cookie(LOGIN_CSRF_COOKIE, token, httponly=True, samesite="strict", secure=secure_cookies)
        return response

    async def judging_page(request: Request, rater: str, status: int = 200, error: str = ""):
        pair = await run_in_threadpool(next_pair, rater, wait_s)
        context = {"rater": rater, "pair": pair, "csrf": csrf_token(secret, rater), "error": error,
                   "progress": await run_in_threadpool(progress, rater), "choices": CHOICE_LABELS,
                   "generator_error": queue.last_error}
        return templates.TemplateResponse(request, "index.html", context, status_code=status)

    # ------------------------------------------------------------------ pages

    @app.get("/healthz")
    async def healthz():
        return {"ok": True}

    @app.get("/login")
    async def login_form(request: Request):
        return login_page(request, 200)

    @app.post("/login")
    async def login(request: Request):
        if (refused := wrong_type(request, "form")) is not None:
            return refused
        form = await request.form()
        expected = request.cookies.get(LOGIN_CSRF_COOKIE)
        if not same_origin(request) or not expected or not secrets.compare_digest(
                expected, str(form.get("csrf", ""))):
            return login_page(request, 403, "The sign-in form expired; please try again.")
        if wait := limiter.retry_after(client(request)):
            response = login_page(request, 429, f"Too many failed sign-ins; try again in {wait} s.")
            response.headers["retry-after"] = str(wait)
            return response
        rater = find_rater(raters, str(form.get("token", "")).strip())
        if rater is None:
            limiter.failed(client(request))
            return login_page(request, 401, "Unknown token.")
        session = await run_in_threadpool(store.create_session, rater, session_s)
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(SESSION_COOKIE, session, httponly=True, samesite="strict", secure=secure_cookies,
                            max_age=int(session_s))
        response.delete_cookie(LOGIN_CSRF_COOKIE)
        return response

    @app.post("/logout")
    async def logout(request: Request):
        if (refused := wrong_type(request, "form")) is not None:
            return refused
        rater, how = await rater_of(request)
        form = await request.form()
        if rater is None or not same_origin(request) or not csrf_ok(secret, rater, form.get("csrf")):
            return JSONResponse({"error": "missing or invalid CSRF token"}, status_code=403)
        if how == "cookie":  # revoked on the server: a copy of the cookie is worthless from now on
            await run_in_threadpool(store.end_session, request.cookies[SESSION_COOKIE])
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE)
        return response

    @app.get("/")
    async def index(request: Request):
        rater, _ = await rater_of(request)
        if rater is None:
            return login_page(request, 401)
        return await judging_page(request, rater)

    @app.post("/judge")
    async def judge_form(request: Request):
        """The no-JavaScript path: post the form, get redirected to the next pair."""
        rater, _ = await rater_of(request)
        if rater is None:
            return login_page(request, 401)
        if (refused := wrong_type(request, "form")) is not None:
            return refused
        form = await request.form()
        if not same_origin(request) or not csrf_ok(secret, rater, form.get("csrf")):
            return JSONResponse({"error": "missing or invalid CSRF token; reload the page"}, status_code=403)
        try:
            await run_in_threadpool(store.judge, rater, str(form.get("pair_id", "")), form.get("choice"),
                                    form.get("rating"), form.get("comment"))
        except JudgementRejected as e:
            return await judging_page(request, rater, status=e.status, error=str(e))
        return RedirectResponse("/", status_code=303)

    @app.get("/stats")
    async def stats_page(request: Request):
        rater, _ = await rater_of(request)
        if rater is None:
            return login_page(request, 401)
        stats = compute_stats(await run_in_threadpool(store.judgements))
        return templates.TemplateResponse(request, "stats.html", {"rater": rater, "stats": stats,
                                                                  "csrf": csrf_token(secret, rater)})

    # ------------------------------------------------------------------ JSON API

    @app.get("/api/next")
    async def api_next(request: Request, wait: float = 2.0):
        rater, how = await rater_of(request)
        if rater is None:
            return unauthorized_json(request, how)
        pair = await run_in_threadpool(next_pair, rater, max(0.0, min(wait, wait_s)))
        return {"pair": pair and pair.to_json(), "progress": await run_in_threadpool(progress, rater),
                "generator_error": queue.last_error}

    @app.post("/api/judge")
    async def api_judge(request: Request):
        rater, how = await rater_of(request)
        if rater is None:
            return unauthorized_json(request, how)
        if how == "cookie" and (not same_origin(request)
                                or not csrf_ok(secret, rater, request.headers.get("x-csrf-token"))):
            return JSONResponse({"error": "missing or invalid X-CSRF-Token header; reload the page"},
                                status_code=403)
        if (refused := wrong_type(request, "json")) is not None:
            return refused
        try:
            body = parse_json_object(await request.body())
        except ValueError as e:  # UnicodeDecodeError and JSONDecodeError included
            return JSONResponse({"error": f"{str(e)[:200]}; send a JSON object"}, status_code=400)
        try:
            judgement = await run_in_threadpool(store.judge, rater, body.get("pair_id"), body.get("choice"),
                                                body.get("rating"), body.get("comment"))
        except JudgementRejected as e:
            return JSONResponse({"error": str(e)}, status_code=e.status)
        pair = await run_in_threadpool(next_pair, rater, 2.0) if body.get("next", True) else None
        return {"ok": True, "judgement_id": judgement.id, "next": pair and pair.to_json(),
                "progress": await run_in_threadpool(progress, rater)}

    @app.get("/api/stats")
    async def api_stats(request: Request):
        rater, how = await rater_of(request)
        if rater is None:
            return unauthorized_json(request, how)
        s = compute_stats(await run_in_threadpool(store.judgements))
        return {"total": s.total, "agreement": s.agreement, "shared_items": s.shared_items,
                "compared_pairs": s.compared_pairs,
                "raters": [{"rater": r.rater, "judged": r.judged, "choices": r.choices} for r in s.raters],
                "checkpoints": [{"checkpoint": c.checkpoint, "wins": c.wins, "losses": c.losses, "ties": c.ties,
                                 "both_bad": c.both_bad, "win_rate": c.win_rate} for c in s.checkpoints]}

    return Guard(app, max_body_bytes, allowed_hosts)
