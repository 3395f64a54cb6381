"""Clients joined to the named run the test servers hold (``t``), so a test can also look at
what they did over plain HTTP (``/v1/runs/t/...``)."""

from __future__ import annotations

from typing import Any

from stepd.client import connect

RUN = "t"


def connect_shared(url: Any, *args: Any, **kwargs: Any) -> Any:
    """``connect`` into the run ``t`` (``local://`` keeps its optimizer to itself)."""
    local = isinstance(url, str) and url.startswith("local://")
    if not local:
        kwargs.setdefault("run", RUN)
    return connect(url, *args, **kwargs)
