"""Joining Ray: a new local cluster by default, or the one at --address / RAY_ADDRESS, checked fast."""

from __future__ import annotations

import logging
import math
import os
import socket
import sys
import threading
from collections.abc import Callable
from contextlib import contextmanager

from .errors import SweepError, first_line

CONNECT_TIMEOUT_S = 10


def check_address(address: str) -> None:
    """Refuse addresses Tune cannot drive, and fail within seconds where nothing answers."""
    if address.startswith("ray://"):
        raise SweepError(
            f"--address {address}: Ray Client (ray://) cannot run Tune; submit the sweep as a "
            f"Ray job instead: ca-flow sweep ... --submit --address http://HEAD:8265"
        )
    if address.startswith(("http://", "https://")):
        raise SweepError(
            f"--address {address} is a Ray job API address: add --submit to send the sweep "
            f"there, or give the cluster's GCS address (HEAD:6379) to drive it from here"
        )
    if address in ("auto", "local"):
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise SweepError(
            f"--address {address!r} is not HOST:PORT (e.g. 10.0.0.5:6379), auto, or an "
            f"http://HEAD:8265 job API address with --submit"
        )
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise SweepError(
            f"nothing answers at Ray address {address} ({exc.strerror or exc}); start the "
            f"cluster (ray start --head) or fix --address / RAY_ADDRESS"
        ) from None


def connect_ray(address: str | None, meanwhile: Callable[[], None] = lambda: None) -> None:
    """Join Ray or start it; `meanwhile` runs in a thread while a new Ray starts, once the address has
    been checked (a bad one fails before anything else loads)."""
    import ray
    from ray.data import DataContext

    # Tune's and Ray Data's own chatter (experiment-state saves, execution plans) would bury the
    # progress; errors still surface through the ResultGrid, the pipeline and MLflow.
    logging.getLogger("ray.tune").setLevel(logging.CRITICAL)  # "Trials did not complete": ca-flow says which
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    # "Token authentication is enabled ... set ... to opt out": the opposite of what a user should do;
    # README (Security) says what the token guards.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    context = DataContext.get_current()
    context.enable_progress_bars = False  # ca-flow prints its own progress
    context.issue_detectors_config.detectors = []  # its hints (hanging tasks...) are for tuning Ray Data
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        check_address(address)  # even where Ray is already up: a bad address is the user's to fix
    if ray.is_initialized():
        return
    threading.Thread(target=meanwhile, daemon=True, name="ca-flow-meanwhile").start()
    try:
        if address:
            with _held_fd2():
                ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        else:
            ray.init(
                address="local", include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING
            )
    except Exception as exc:
        if _refused_for_auth(exc):
            raise SweepError(
                f"the Ray cluster at {address} refused this client: it needs the cluster's token "
                f"and token mode, see cluster/README.md (Token authentication)"
            ) from None
        raise SweepError(
            f"cannot connect to Ray at {address or 'a new local cluster'}: {first_line(exc, 10_000)}; "
            f"check --address / RAY_ADDRESS"
        ) from None


@contextmanager
def _held_fd2():
    """Ray's C++ client logs every failed GCS attempt straight to file descriptor 2 (one line a second
    for about 20 s when the token is missing); joining a cluster says nothing useful there, and a
    failure is told in one line by the caller."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as sink:
            os.dup2(sink.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _refused_for_auth(exc: BaseException | None) -> bool:
    """Ray reports a missing or wrong token as a ConnectionError whose cause says so."""
    while exc is not None:
        if "InvalidAuthToken" in str(exc) or type(exc).__name__ == "AuthenticationError":
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def check_resources(cpus: float, gpus: float) -> int:
    """Refuse a per-trial request no node can meet (Tune would leave it PENDING forever).

    Returns how many trials can run at once.
    """
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    fits = [n for n in nodes if n.get("CPU", 0) >= cpus and n.get("GPU", 0) >= gpus]
    if not fits:
        total = ray.cluster_resources()
        raise SweepError(
            f"no Ray node can give a trial {cpus:g} CPU and {gpus:g} GPU (cluster: "
            f"{total.get('CPU', 0):g} CPU, {total.get('GPU', 0):g} GPU); lower "
            f"--cpus-per-trial / --gpus-per-trial or add nodes"
        )
    return max(
        1, sum(int(min(n.get("CPU", 0) / cpus, n.get("GPU", 0) / gpus if gpus else math.inf)) for n in fits)
    )
