"""The JSON API of `bpwopt serve`: the models and states under the roots, a state's trade-off curve, plans.

Every answer comes from the state files the optimizer writes, through the same
functions the command line calls (`optimize_file` for a plan, `read_plot_data`
for the curve), so what a script gets here is what `bpwopt --dry-run --json`
and `bpwopt plot` would give for the same state. Paths in requests are
confined to the roots (`bpwopt.serve.roots`); errors a request caused come back
as a 4xx with one line in `detail`.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint

from bpwopt.errors import BpwoptError
from bpwopt.formats.output_paths import with_budget
from bpwopt.jobs.optimize import OptimizeJob, optimize_file
from bpwopt.jobs.report import report_as_dict
from bpwopt.policy.llama import QuantizeOptions
from bpwopt.quality.plots import MarkedPoint, read_plot_data
from bpwopt.serve.access import COOKIE, token_matches
from bpwopt.serve.jobs import Job, JobRunner
from bpwopt.serve.journal import Journal
from bpwopt.serve.roots import STATE_SUFFIX, PathRefusedError, Roots, file_id
from bpwopt.solve.targets import Target, parse_size
from bpwopt.state.store import StateFile, read_identity

STATIC = Path(__file__).parent / "static"
FRONT_POINTS = 200  # budgets traced for the page's curve, whose control snaps to them


class ModelFile(BaseModel):
    path: str = Field(description="relative to the root that holds it")
    bytes: int


class StateSummary(BaseModel):
    id: str = Field(description="the state's id in /api/states/{id}/…")
    path: str
    model_name: str
    model_sha256: str
    imatrix_sha256: str | None
    sampling: str
    rounding: str
    measurements: int | None = Field(description="None while another process holds the state (a job running)")
    plans: int | None


class Point(BaseModel):
    label: str
    bits_per_weight: float
    error: float
    kld: float | None = None
    kld_stderr: float | None = None


class Front(BaseModel):
    """The solver's least predicted error at each traced size: what `bpwopt plot` draws as the trade-off."""

    model_name: str
    objective: str
    error_label: str
    bits_per_weight: list[float]
    error: list[float]
    presets: list[Point] = Field(description="llama.cpp's presets, where the model was given")
    plans: list[Point] = Field(description="the plans stored in the state, with their measured KLD if evaluated")
    note: str


class JobRequest(BaseModel):
    """A background job: write files for sizes (a ladder), measure into a state, or evaluate a file."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["write", "measure", "evaluate"]
    model: str = Field(description="the model to quantize, or for evaluate the base it is compared with")
    imatrix: str | None = None
    state: str | None = Field(default=None, description="a state's id or a path under the roots (made if missing); "
                              "default: MODEL.bpw_state beside the model (evaluate: none)")  # fmt: skip
    target_sizes: list[str] = Field(default=[], max_length=64, description="one file per size, e.g. ['1gb', '2gb']")
    target_bpw: float | None = Field(default=None, gt=0, le=32)
    output: str | None = Field(default=None, description="write: OUT under the roots, the size appended to its "
                               "name; default: MODEL-bpwopt-SIZE.gguf beside the model")  # fmt: skip
    quant: str | None = Field(default=None, description="evaluate: the quantized file")
    chunks: int | None = Field(default=None, ge=1, le=10_000, description="evaluate: windows of the text")
    allow_requantize: bool = False
    threads: int | None = Field(default=None, ge=1, le=1024)

    @model_validator(mode="after")
    def fits_its_kind(self) -> JobRequest:
        if self.kind == "evaluate":
            if self.quant is None:
                raise ValueError("an evaluate job needs quant, the quantized file")
        elif bool(self.target_sizes) == (self.target_bpw is not None):
            raise ValueError("give exactly one of target_sizes and target_bpw")
        return self


class PlanRequest(BaseModel):
    """A budget to solve from a state alone: nothing is measured, nothing is written or stored."""

    model_config = ConfigDict(extra="forbid")

    state: str = Field(description="a state's id from GET /api/states, or its path under the roots")
    model: str = Field(description="the model the state measured, a path under the roots")
    imatrix: str | None = Field(default=None, description="its imatrix, if the state was measured with one")
    target_size: str | None = Field(default=None, description="whole file size, e.g. 80MB or 1.5gb")
    target_bpw: float | None = Field(default=None, gt=0, le=32)
    objective: str | None = None
    allow_requantize: bool = False
    compare_presets: bool = Field(default=True, description="also solve at the nearest presets' sizes (as the "
                                  "command line reports them); false answers faster")  # fmt: skip

    @model_validator(mode="after")
    def one_target(self) -> PlanRequest:
        if (self.target_size is None) == (self.target_bpw is None):
            raise ValueError("give exactly one of target_size and target_bpw")
        return self


class TokenCheck(BaseHTTPMiddleware):
    """401 for any request without the token; a token given in the query is kept in a cookie."""

    def __init__(self, app, token: str) -> None:
        super().__init__(app)
        self.token = token

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        header = request.headers.get("authorization", "")
        bearer = header[len("Bearer "):] if header.startswith("Bearer ") else None
        query = request.query_params.get("token")
        offered = [t for t in (bearer, query, request.cookies.get(COOKIE)) if t]
        if not token_matches(offered, self.token):
            return JSONResponse({"detail": "this server needs its token (printed when it started)"}, status_code=401)
        response = await call_next(request)
        if query:
            response.set_cookie(COOKIE, self.token, httponly=True, samesite="strict")
        return response


def create_app(roots: Roots, token: str | None = None, journal: Path | None = None) -> FastAPI:
    """The API over the files under roots; with token, every request must carry it.

    journal: the file that keeps the job list across restarts (none: forgotten at exit);
    the jobs a stop interrupted are resumed now.
    """
    runner = JobRunner(journal=Journal(journal) if journal else None)
    in_use = _StateLocks()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        runner.stop_all()  # a job's state keeps what it measured; the same job resumes from it

    app = FastAPI(title="bpwopt", summary="Per-tensor quantization types for a GGUF model under a budget",
                  lifespan=lifespan)  # fmt: skip
    if token is not None:
        app.add_middleware(TokenCheck, token=token)

    @app.exception_handler(BpwoptError)
    async def one_line(_: Request, error: BpwoptError) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=404 if isinstance(error, PathRefusedError) else 400)

    def state_path(state: str, create: bool = False) -> Path:
        """A state by its id, or by its path (relative to a root, or absolute, as a job shows it) under the roots;
        one to be made where create is set."""
        for path in roots.states():
            if state in (file_id(path), roots.relative(path), str(path)):
                return path
        if create and state.endswith(STATE_SUFFIX):
            return roots.inside(state, must_exist=False)
        raise HTTPException(404, f"no state {state} under the server's folders (GET /api/states lists them)")

    def job_or_404(job_id: str) -> Job:
        job = runner.get(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id}")
        return job

    def command(request: JobRequest) -> tuple[list[str], Path | None]:
        """The bpwopt command line a job runs, and the state whose queue it joins; refused paths raise."""
        model = roots.inside(request.model)
        if request.kind == "evaluate":
            argv = ["eval", str(model), str(roots.inside(request.quant)), "--json"]
            argv += ["--chunks", str(request.chunks)] if request.chunks else []
            argv += ["--threads", str(request.threads)] if request.threads else []
            state = state_path(request.state) if request.state else None
            return argv + (["--state-file", str(state)] if state else []), state
        state = state_path(request.state, create=True) if request.state else model.with_suffix(STATE_SUFFIX)
        argv = ["--state-file", str(state)] + (["--allow-requantize"] if request.allow_requantize else [])
        argv += ["--imatrix", str(roots.inside(request.imatrix))] if request.imatrix else []
        if request.target_sizes:
            sizes = [str(parse_size(size)) for size in request.target_sizes]  # a bad size is a 400 now, not later
            argv += ["--target-size", ",".join(request.target_sizes if len(sizes) > 1 else sizes)]
        else:
            argv += ["--target-bpw", repr(request.target_bpw)]
        argv += ["--threads", str(request.threads)] if request.threads else []
        argv += [str(model), "--dry-run" if request.kind == "measure" else str(_output(roots, request, model))]
        return argv, state

    for interrupted in runner.restore():  # checked against today's roots: they may not be the last start's
        try:
            runner.resume(interrupted, *command(JobRequest.model_validate(interrupted.request)))
        except ValidationError as refused:  # a journal edited by hand, or written by another version
            runner.fail(interrupted, f"not resumed: {'; '.join(e['msg'] for e in refused.errors())}")
        except (BpwoptError, HTTPException) as refused:
            runner.fail(interrupted, f"not resumed: {getattr(refused, 'detail', refused)}")

    @app.post("/api/jobs", status_code=202)
    def submit(request: JobRequest) -> dict:
        """Start a job; it runs after the jobs already queued on its state. Follow it at /api/jobs/{id}/events."""
        argv, state = command(request)
        return runner.submit(request.kind, argv, state, request.model_dump()).view()

    @app.post("/api/jobs/{job_id}/cancel")
    def cancel(job_id: str) -> dict:
        """Stop a job: a queued one never runs, a running one is stopped (a measurement keeps what it measured)."""
        job = job_or_404(job_id)
        if not runner.cancel(job):
            raise HTTPException(409, f"job {job_id} has already ended ({job.status})")
        return job.view()

    @app.get("/api/jobs")
    def jobs() -> list[dict]:
        """Every job since the server started, oldest first."""
        return [job.view() for job in runner.all()]

    @app.get("/api/jobs/{job_id}")
    def job(job_id: str) -> dict:
        return job_or_404(job_id).view()

    @app.get("/api/jobs/{job_id}/events")
    def events(job_id: str) -> StreamingResponse:
        """Server-sent events: the job's view at each change, until it is done, failed or stopped."""
        views = runner.views(job_or_404(job_id))
        stream = (f"data: {json.dumps(view)}\n\n" for view in views)
        return StreamingResponse(stream, media_type="text/event-stream", headers={"Cache-Control": "no-store"})

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/static/plotly.min.js", include_in_schema=False)
    def plotly_bundle() -> FileResponse:
        """plotly's own bundle, from the plotly package the serve extra installs: the page loads nothing remote."""
        try:
            bundle = resources.files("plotly") / "package_data" / "plotly.min.js"
        except ModuleNotFoundError:
            raise HTTPException(404, "the page's charts need plotly: pip install 'bpwopt[serve]'") from None
        return FileResponse(str(bundle), media_type="text/javascript")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/api/models")
    def models() -> list[ModelFile]:
        """GGUF files under the roots (a split model by its first file)."""
        return [ModelFile(path=roots.relative(p), bytes=p.stat().st_size) for p in roots.models()]

    @app.get("/api/states")
    def states() -> list[StateSummary]:
        """State files under the roots, with what they were measured for and how much they hold."""
        summaries = []
        for path in roots.states():
            try:
                identity = read_identity(path)
            except BpwoptError:
                continue  # a .bpw_state that is not one (or is unreadable) is not offered
            summaries.append(
                StateSummary(id=file_id(path), path=roots.relative(path), model_name=identity.model_name,
                             model_sha256=identity.model_sha256, imatrix_sha256=identity.imatrix_sha256,
                             sampling=identity.sampling, rounding=identity.rounding,
                             **_counts(path, identity, in_use))
            )  # fmt: skip
        return summaries

    @app.get("/api/states/{state_id}/front")
    def front(state_id: str, model: Annotated[str | None, Query(description="its model, for presets")] = None) -> Front:
        """The trade-off curve of a state under its objective, its stored plans and (with model) the presets.

        Traced with the solver's fast (Lagrangian) plans; POST /api/plans solves one budget exactly.
        """
        path = state_path(state_id)
        with in_use(path):
            data = read_plot_data(path, roots.inside(model) if model else None, points=FRONT_POINTS, exact=False)
        if data.tradeoff is None:
            raise HTTPException(409, "; ".join(data.skipped))
        curve = data.tradeoff
        return Front(model_name=curve.model_name, objective=curve.objective, error_label=curve.error_label,
                     bits_per_weight=curve.bits_per_weight.tolist(), error=curve.error.tolist(),
                     presets=[_point(p) for p in curve.presets], plans=[_point(p) for p in curve.plans],
                     note=curve.note)  # fmt: skip

    @app.post("/api/plans")
    def plan(request: PlanRequest) -> dict:
        """The plan for a budget, exactly as `bpwopt --dry-run --json` reports it, from the state alone."""
        target = Target(file_bytes=parse_size(request.target_size)) if request.target_size else None
        state = state_path(request.state)
        job = OptimizeJob(
            input_path=roots.inside(request.model),
            output_path=None,
            target=target or Target(bits_per_weight=request.target_bpw),
            options=QuantizeOptions(allow_requantize=request.allow_requantize),
            imatrix_path=roots.inside(request.imatrix) if request.imatrix else None,
            state_path=state,
            objective=request.objective,
            compare_presets=request.compare_presets,
            record_plan=False,
            measure_missing=False,
            dry_run=True,
            progress=False,
        )
        with in_use(state):
            return report_as_dict(optimize_file(job))

    return app


def _output(roots: Roots, request: JobRequest, model: Path) -> Path:
    """OUT for a write job: as asked, or MODEL-bpwopt.gguf, with the budget in its name as a ladder's rungs have it
    (MODEL-bpwopt-80MB.gguf, MODEL-bpwopt-4.9828bpw.gguf); a ladder's names are the command's to make."""
    default = model.with_name(f"{model.stem}-bpwopt.gguf")
    output = roots.inside(request.output, must_exist=False) if request.output else default
    if len(request.target_sizes) > 1:
        return output
    return with_budget(output, request.target_sizes[0] if request.target_sizes else f"{request.target_bpw:.4f}bpw")


class _StateLocks:
    """One lock per state file for the requests of this server that open it (plans, curves, counts).

    A state is open in one place at a time (its flock refuses a second opener,
    in this process too), so requests on one state wait for each other here
    instead of one being refused; a job's child process is another process,
    and a request meanwhile gets the state's own one-line refusal.
    """

    def __init__(self) -> None:
        self._locks: dict[Path, threading.Lock] = {}
        self._guard = threading.Lock()

    def __call__(self, path: Path) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(path, threading.Lock())


def _counts(path: Path, identity, in_use: _StateLocks) -> dict[str, int | None]:
    """Measurements and plans in a state; None for both while another process (a running job) holds it."""
    try:
        with in_use(path), StateFile.open(path, identity, create=False) as state:
            return {"measurements": len(state.measurements()), "plans": len(state.plans())}
    except BpwoptError:
        return {"measurements": None, "plans": None}


def _point(point: MarkedPoint) -> Point:
    finite = not math.isnan(point.kld)
    return Point(label=point.label, bits_per_weight=point.bits_per_weight, error=point.error,
                 kld=point.kld if finite else None, kld_stderr=point.kld_stderr if finite else None)  # fmt: skip
