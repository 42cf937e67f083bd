"""The JSON API of `bpwopt serve`: the models and states under the roots, a state's trade-off curve, plans.

Every answer comes from the state files the optimizer writes, through the same
functions the command line calls (`optimize_file` for a plan, `read_plot_data`
for the curve), so what a script gets here is what `bpwopt --dry-run --json`
and `bpwopt plot` would give for the same state. Paths in requests are
confined to the roots (`bpwopt.serve.roots`); errors a request caused come back
as a 4xx with one line in `detail`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint

from bpwopt.errors import BpwoptError
from bpwopt.jobs.optimize import OptimizeJob, optimize_file
from bpwopt.jobs.report import report_as_dict
from bpwopt.policy.llama import QuantizeOptions
from bpwopt.quality.plots import MarkedPoint, read_plot_data
from bpwopt.serve.access import COOKIE, token_matches
from bpwopt.serve.roots import PathRefusedError, Roots, file_id
from bpwopt.solve.targets import Target, parse_size
from bpwopt.state.store import StateFile, read_identity


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


class PlanRequest(BaseModel):
    """A budget to solve from a state alone: nothing is measured, nothing is written or stored."""

    model_config = ConfigDict(extra="forbid")

    state: str = Field(description="a state's id from GET /api/states")
    model: str = Field(description="the model the state measured, a path under the roots")
    imatrix: str | None = Field(default=None, description="its imatrix, if the state was measured with one")
    target_size: str | None = Field(default=None, description="whole file size, e.g. 80MB or 1.5gb")
    target_bpw: float | None = Field(default=None, gt=0, le=32)
    objective: str | None = None
    allow_requantize: bool = False

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


def create_app(roots: Roots, token: str | None = None) -> FastAPI:
    """The API over the files under roots; with token, every request must carry it."""
    app = FastAPI(title="bpwopt", summary="Per-tensor quantization types for a GGUF model under a budget")
    if token is not None:
        app.add_middleware(TokenCheck, token=token)

    @app.exception_handler(BpwoptError)
    async def one_line(_: Request, error: BpwoptError) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=404 if isinstance(error, PathRefusedError) else 400)

    def state_path(state_id: str) -> Path:
        for path in roots.states():
            if file_id(path) == state_id:
                return path
        raise HTTPException(404, f"no state {state_id} under the server's folders (GET /api/states lists them)")

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
                             sampling=identity.sampling, rounding=identity.rounding, **_counts(path, identity))
            )  # fmt: skip
        return summaries

    @app.get("/api/states/{state_id}/front")
    def front(state_id: str, model: Annotated[str | None, Query(description="its model, for presets")] = None) -> Front:
        """The trade-off curve of a state under its objective, its stored plans and (with model) the presets."""
        data = read_plot_data(state_path(state_id), roots.inside(model) if model else None)
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
        job = OptimizeJob(
            input_path=roots.inside(request.model),
            output_path=None,
            target=target or Target(bits_per_weight=request.target_bpw),
            options=QuantizeOptions(allow_requantize=request.allow_requantize),
            imatrix_path=roots.inside(request.imatrix) if request.imatrix else None,
            state_path=state_path(request.state),
            objective=request.objective,
            compare_presets=True,
            record_plan=False,
            measure_missing=False,
            dry_run=True,
            progress=False,
        )
        return report_as_dict(optimize_file(job))

    return app


def _counts(path: Path, identity) -> dict[str, int | None]:
    """Measurements and plans in a state; None for both while another process (a running job) holds it."""
    try:
        with StateFile.open(path, identity, create=False) as state:
            return {"measurements": len(state.measurements()), "plans": len(state.plans())}
    except BpwoptError:
        return {"measurements": None, "plans": None}


def _point(point: MarkedPoint) -> Point:
    finite = not math.isnan(point.kld)
    return Point(label=point.label, bits_per_weight=point.bits_per_weight, error=point.error,
                 kld=point.kld if finite else None, kld_stderr=point.kld_stderr if finite else None)  # fmt: skip
