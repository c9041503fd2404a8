"""The champion watchdog's heartbeat body (``POST /admin/watchdog/heartbeat``).

One pydantic model, so the server validates against the same schema the OpenAPI document shows.
The model name becomes a Prometheus label value: it is bounded and limited to safe characters.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, StrictBool

__all__ = ["MAX_DETAIL_CHARS", "WatchdogHeartbeat"]

MAX_DETAIL_CHARS = 1000


class WatchdogHeartbeat(BaseModel):
    """``{"model": "m", "healthy": true, "detail": "..."}``; unknown fields are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    healthy: StrictBool
    detail: str = Field(default="", max_length=MAX_DETAIL_CHARS)
