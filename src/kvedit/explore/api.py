"""The explorer's HTTP API (FastAPI) and the page it serves.

Every error is JSON `{"error": message}`: 400 for bad input (nothing changed), 403 for a request that changes
or starts something without coming from the explorer's own page (`security.PageOnly`), 404 for an unknown
edit or job, 409 when the model is busy (with a job, or another request) or an edit cannot be reverted on its
own. Long work (edits, mining) answers 202 with a job to poll at `/api/jobs/{id}` and to cancel with
`DELETE /api/jobs/{id}` (or `POST /api/jobs/{id}/cancel`).
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Collection
from contextlib import asynccontextmanager
from html import escape
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.middleware.trustedhost import TrustedHostMiddleware

from ..analysis.inspect import Intervention
from .edits import RevertConflict
from .jobs import Busy, JobFinished, NotFound
from .security import PageOnly, new_token
from .forms import EditForm
from .session import ExploreSession

STATIC = Path(str(resources.files("kvedit.explore") / "static"))


class PromptBody(BaseModel):
    prompt: str
    watch: str | None = Field(None, description="one vocabulary token to follow across layers")


class MemoryBody(BaseModel):
    layer: int
    key: int
    prompt: str | None = None


class InterventionBody(BaseModel):
    layer: int
    key: int
    factor: float = Field(0.0, description="0 switches the memory off; 2 doubles its coefficient")


class InterveneBody(BaseModel):
    prompt: str
    interventions: list[InterventionBody]
    watch: str | None = None


class MineBody(BaseModel):
    layer: int
    tokens: int | None = Field(None, description="corpus tokens to read (default: the session's)")


class EditBody(BaseModel):
    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    paraphrases: list[str] = []
    neighbours: list[str] = []
    method: str = "ft-keys"
    layers: list[int] | None = None
    lr: float | None = Field(None, description="learning rate (default: the method's preset)")
    max_steps: int | None = Field(None, description="step limit (default: the method's preset)")


class NeuronsBody(BaseModel):
    prompts: list[str] = Field(description="prompts that ask for the answer (the fact's phrasings)")
    answer: str
    steps: int = Field(20, description="integration steps (the paper's 20)")


class RevertBody(BaseModel):
    cascade: bool = Field(False, description="also revert the newer edits that changed the same weights")


def jsonable(value: Any) -> Any:
    """`value` with NaN/±Inf floats as None (JSON has no such numbers) and dict keys as strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def create_app(
    session: ExploreSession,
    allowed_hosts: list[str] | None = None,
    origins: Collection[str] | None = None,
    token: str | None = None,
) -> FastAPI:
    """The web app over `session`. `allowed_hosts`: Host headers to accept (None: any), which keeps pages
    of other sites from reaching a loopback server through DNS rebinding. `origins`: the page's origins, the
    only ones whose requests may change anything (None: the origin the Host header names); `token`: the
    secret the page sends with every such request (None: a new random one; it is `app.state.token`).
    When the server shuts down, the running job is cancelled and its thread joined."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await run_in_threadpool(session.jobs.shutdown)

    # no /docs or /redoc pages: FastAPI's load their scripts from a CDN; the schema stays at /openapi.json
    app = FastAPI(
        title="kvedit explore",
        description="FFN key-value memories of one model: look, intervene, edit",
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.session = session
    app.state.token = token or new_token()
    app.add_middleware(PageOnly, token=app.state.token, origins=origins)
    if allowed_hosts:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)
    page = (STATIC / "index.html").read_text(encoding="utf-8").replace("{{KVEDIT_TOKEN}}", escape(app.state.token))

    @app.exception_handler(Busy)
    @app.exception_handler(JobFinished)
    @app.exception_handler(RevertConflict)
    async def conflict(request: Request, err: Exception) -> JSONResponse:
        return _error(409, str(err))

    @app.exception_handler(NotFound)
    async def not_found(request: Request, err: NotFound) -> JSONResponse:
        return _error(404, str(err.args[0]) if err.args else "not found")

    @app.exception_handler(ValueError)
    @app.exception_handler(FileNotFoundError)
    async def bad_input(request: Request, err: Exception) -> JSONResponse:
        return _error(400, str(err))

    @app.exception_handler(RequestValidationError)
    async def bad_body(request: Request, err: RequestValidationError) -> JSONResponse:
        parts = []
        for e in err.errors():
            where = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            parts.append(f"{where or 'request body'}: {e.get('msg')}")
        return _error(400, "; ".join(parts))

    @app.get("/", include_in_schema=False)
    def index() -> HTMLResponse:
        """The page, with this server's token in it (a page of another site cannot read it: no CORS)."""
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/api/info")
    def info() -> JSONResponse:
        return JSONResponse(jsonable(session.info()))

    @app.post("/api/prompt")
    def prompt(body: PromptBody) -> JSONResponse:
        return JSONResponse(jsonable(session.prompt(body.prompt, body.watch or None)))

    @app.post("/api/memory")
    def memory(body: MemoryBody) -> JSONResponse:
        return JSONResponse(jsonable(session.memory(body.layer, body.key, body.prompt)))

    @app.post("/api/intervene")
    def intervene(body: InterveneBody) -> JSONResponse:
        ivs = [Intervention(i.layer, i.key, i.factor) for i in body.interventions]
        return JSONResponse(jsonable(session.intervene(body.prompt, ivs, body.watch or None)))

    @app.post("/api/mine", status_code=202)
    def mine(body: MineBody) -> JSONResponse:
        return JSONResponse(jsonable(session.start_mining(body.layer, body.tokens).to_dict()), status_code=202)

    @app.get("/api/jobs/{job_id}")
    def job(job_id: int) -> JSONResponse:
        return JSONResponse(jsonable(session.jobs.get(job_id).to_dict()))

    @app.delete("/api/jobs/{job_id}")
    @app.post("/api/jobs/{job_id}/cancel")
    def cancel(job_id: int) -> JSONResponse:
        """Stop a running job at its next step; the weights end as they were before it."""
        return JSONResponse(jsonable(session.cancel(job_id)))

    @app.post("/api/edits", status_code=202)
    def start_edit(body: EditBody) -> JSONResponse:
        form = EditForm(
            body.prompt,
            body.subject,
            body.target_new,
            body.target_true or None,
            tuple(p for p in body.paraphrases if p.strip()),
            tuple(p for p in body.neighbours if p.strip()),
            body.method,
            tuple(body.layers) if body.layers else None,
            body.lr,
            body.max_steps,
        )
        return JSONResponse(jsonable(session.start_edit(form).to_dict()), status_code=202)

    @app.post("/api/neurons", status_code=202)
    def neurons(body: NeuronsBody) -> JSONResponse:
        prompts = [p for p in body.prompts if p.strip()]
        return JSONResponse(
            jsonable(session.start_neurons(prompts, body.answer, body.steps).to_dict()), status_code=202
        )

    @app.get("/api/edits")
    def edits() -> JSONResponse:
        return JSONResponse(jsonable([e.to_dict() for e in session.edits.entries]))

    @app.get("/api/edits/{edit_id}")
    def edit_detail(edit_id: int) -> JSONResponse:
        return JSONResponse(jsonable(session.edits.get(edit_id).to_dict(detail=True)))

    @app.post("/api/edits/{edit_id}/revert")
    def revert(edit_id: int, body: RevertBody | None = None) -> JSONResponse:
        return JSONResponse(jsonable(session.revert(edit_id, body.cascade if body else False)))

    @app.get("/api/edits/{edit_id}/patch")
    def download(edit_id: int) -> FileResponse:
        path = session.patch_file(edit_id)
        return FileResponse(path, media_type="application/octet-stream", filename=path.name)

    @app.post("/api/patches")
    async def upload(request: Request) -> JSONResponse:
        """The body is the patch file's bytes; `X-Filename` names it."""
        limit = session.patch_size_limit()
        too_large = _error(
            413,
            f"the patch is larger than {limit:,} bytes (twice this model's weights); a kvedit "
            "patch of this model is never that large",
        )
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            return too_large
        chunks, size = [], 0
        async for chunk in request.stream():  # counted as it arrives: a body without a length is bounded too
            size += len(chunk)
            if size > limit:
                return too_large
            chunks.append(chunk)
        data = b"".join(chunks)
        name = request.headers.get("x-filename", "patch.safetensors")
        return JSONResponse(jsonable(await run_in_threadpool(session.load_patch, data, name)))

    return app
