"""The HTTP API and the steering page (FastAPI). Routes only: generation lives in generation.py, jobs in jobs.py."""
from __future__ import annotations

from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Optional

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from sse_starlette import EventSourceResponse

from ..steering.hooks import BOTTLENECK, DEFAULT_HOOK_STYLE, HOOK_STYLES
from .generation import MAX_N, MAX_TOP_K, GenerateRequest, GenerationService, HookRequestError
from .jobs import JobManager, JobNotFound, JobStateError
from .stages import STAGE_SCRIPTS, JobOptionError

STATIC = Path(__file__).parent / "static"
MAX_BODY_BYTES = 64 * 1024


class JobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    stage: str = Field(description=f"one of {sorted(STAGE_SCRIPTS)}")
    options: dict[str, Any] = Field(default_factory=dict, description="the stage's flags without dashes")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"detail": message}, status_code=status)


def _validation_message(err: RequestValidationError) -> str:
    """Pydantic's errors as one line: 'n: Input should be less than or equal to 64; ...'."""
    parts = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"] if p != "body")
        parts.append(f"{where}: {e['msg']}" if where else e["msg"])
    return "; ".join(parts)


class BodyLimit:
    """Refuses request bodies over ``limit`` bytes (413), whether or not they announce their length."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await _error(413, f"request body over {self.limit} bytes")(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge()
            return message
        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await _error(413, f"request body over {self.limit} bytes")(scope, receive, send)


class _TooLarge(Exception):
    pass


def create_app(service: GenerationService, jobs: JobManager, info: dict) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app):
        yield
        jobs.shutdown()  # a stopping server stops its jobs, recorded as interrupted (resumable)

    app = FastAPI(title="Direct Decoder", description="Steer and attribute one-step generations; run the stages as "
                  "jobs with streamed progress.", version="1", lifespan=lifespan)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError):
        return _error(422, _validation_message(err))

    @app.exception_handler(HookRequestError)
    @app.exception_handler(JobOptionError)
    async def refused(request: Request, err):
        return _error(422, str(err))

    @app.exception_handler(JobNotFound)
    async def not_found(request: Request, err):
        return _error(404, str(err))

    @app.exception_handler(JobStateError)
    async def conflict(request: Request, err):
        return _error(409, str(err))

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/v1/info")
    def server_info():
        return info | {"limits": {"n": MAX_N, "top_k": MAX_TOP_K, "body_bytes": MAX_BODY_BYTES},
                       "stages": sorted(STAGE_SCRIPTS), "hook_styles": list(HOOK_STYLES),
                       "default_hook_style": DEFAULT_HOOK_STYLE, "hook_layers": service.hook_layers(),
                       "default_hook_layer": BOTTLENECK}

    @app.post("/v1/generate")
    def generate(request: GenerateRequest):
        return service.generate(request)

    @app.get("/v1/train_images")
    def train_images(label: Optional[int] = Query(None, ge=0, le=1000), offset: int = Query(0, ge=0),
                     limit: int = Query(48, ge=1, le=500)):
        return service.training_images(label, offset, limit)

    @app.get("/v1/train_images/{index}", responses={200: {"content": {"image/png": {}}}})
    def train_image(index: int):
        if index < 0:
            return _error(422, f"index must be >= 0, got {index}")
        try:
            png, label = service.training_image_png(index)
        except IndexError as err:
            return _error(404, str(err))
        return Response(png, media_type="image/png", headers={"X-Label": str(label)})

    @app.post("/v1/jobs", status_code=201)
    def start_job(request: JobRequest):
        return jobs.start(request.stage, request.options)

    @app.get("/v1/jobs")
    def list_jobs():
        return {"jobs": jobs.list()}

    @app.get("/v1/jobs/{job_id}")
    def get_job(job_id: str):
        return jobs.get(job_id)

    @app.get("/v1/jobs/{job_id}/events")
    def job_events(job_id: str):
        jobs.get(job_id)  # 404 before the stream starts
        return EventSourceResponse(jobs.events(job_id), ping=15)

    @app.delete("/v1/jobs/{job_id}")
    def cancel_job(job_id: str):
        return jobs.cancel(job_id)

    @app.post("/v1/jobs/{job_id}/resume")
    def resume_job(job_id: str):
        return jobs.resume(job_id)

    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)
    return app
