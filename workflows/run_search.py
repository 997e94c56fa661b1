"""Finding runs again: filter-string literals, search page by page, a sweep's trial runs, and which
runs are done."""

from __future__ import annotations

from .errors import TrackingError
from .names import DONE_METRICS, PARENT


def quoted(value: str) -> str:
    """`value` as an MLflow filter-string literal (MLflow has no escapes: pick the other quote)."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise TrackingError(f"{value!r} holds both kinds of quote, which MLflow search cannot express; rename it")


def all_runs(client, exp_ids: list[str], where: str, order_by: list[str] | None = None) -> list:
    """Every run matching `where`, page by page (one search returns at most a page)."""
    runs, token = [], None
    while True:
        page = client.search_runs(exp_ids, where, max_results=5000, page_token=token, order_by=order_by)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def children(client, exp_id: str, parent_id: str) -> list:
    return all_runs(client, [exp_id], f"tags.`{PARENT}` = '{parent_id}'")


def is_done(run) -> bool:
    """Done means FINISHED with its metrics: the only runs a resume skips and a table may show."""
    return run.info.status == "FINISHED" and DONE_METRICS <= set(run.data.metrics)
