"""Training-job endpoints (placeholder until the jobs part lands; see docs/service_api.md)."""

from __future__ import annotations

from typing import Any


def build_jobs_router(config: Any) -> Any:
    """The ``/v1/jobs`` and ``/v1/uploads`` routes for ``config`` (a ServiceConfig)."""
    from fastapi import APIRouter

    return APIRouter()
