"""Connecting to Ray the way users expect: the cluster from RAY_ADDRESS or an explicit address
(what ``ray job submit`` sets), else a local Ray started for this process. The one place that
knows how ralflow starts and configures Ray."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from .errors import UserError

# Ray kills idle task workers after 1 s by default, so each epoch's Ray Data tasks would start new
# Python processes (torch, PIL imports) while the training loop waits (bench/train.py shows the
# data wait). cluster/ passes the same to `ray start`.
SYSTEM_CONFIG = {"idle_worker_killing_time_threshold_ms": 60_000}


def auth_env() -> dict:
    """Ray token authentication: use it when a token is available (file or RAY_AUTH_TOKEN).
    A client in token mode also connects to a cluster without authentication."""
    return {"RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token")} if token_available() else {}


def token_available() -> bool:
    token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    return bool(os.environ.get("RAY_AUTH_TOKEN")) or token_file.is_file()


def cluster_address(address: str | None) -> str | None:
    """The Ray cluster a driver joins: ``--address``, else RAY_ADDRESS; None: ralflow starts its
    own local Ray (see init_ray)."""
    return address or os.environ.get("RAY_ADDRESS") or None


def use_token_for_cluster(address: str | None) -> None:
    """Before Ray is imported (it reads RAY_AUTH_MODE then): Ray turns token authentication on by
    itself only for a cluster it finds alone, never for an explicit address (--address or
    RAY_ADDRESS), where a token-auth cluster would refuse it for 20 s and then fail."""
    if cluster_address(address):
        os.environ.update(auth_env())


def check_ray_address(where: str, address: str, timeout: float = 5.0, field: str | None = None) -> None:
    """An address a driver can join, and something listening there: Ray would wait minutes on an
    address where nothing listens. Errors say ``where`` (the address and where it came from)."""
    import socket
    import urllib.parse

    if address.startswith(("http://", "https://")):  # what `ray job submit` and local.sh's cluster.env use
        raise UserError(
            f"{where} is a Ray Jobs (dashboard) address: run on that cluster with `ralflow submit "
            "--address URL ...`, or join it with its GCS address (head:6379)",
            field=field,
        )
    parsed = urllib.parse.urlparse(address if "://" in address else f"ray-gcs://{address}")
    try:
        host, port = parsed.hostname, parsed.port
    except ValueError:
        host, port = None, None
    if not host or not port:  # "auto", "local": Ray looks for a cluster on this machine itself
        return
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        raise UserError(
            f"cannot reach the Ray cluster at {where} ({exc.strerror or exc}): is it up, and is this its "
            "GCS address (head:6379)?",
            field=field,
        ) from None


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Set when this process started ralflow's embedded single-node Ray (not a cluster connection).
_embedded = False


def missing(need: dict, have: dict) -> dict:
    """``{resource: (needed, present)}`` for what ``have`` (cluster totals) lacks of ``need``."""
    return {k: (v, have.get(k, 0.0)) for k, v in need.items() if v > have.get(k, 0.0) + 1e-9}


def describe(short: dict) -> str:
    return ", ".join(f"{need:g} {k} (the cluster has {got:g})" for k, (need, got) in short.items())


def refuse_or_wait(need: dict, refusal, waiting, log=print) -> None:
    """What a job ``need``s beyond the cluster's totals (``short = missing(need, totals)``): on
    ralflow's embedded Ray (a fixed size: nothing will be added, so the job would wait forever)
    raise ``refusal(short)``, a UserError; on a cluster, which may autoscale, log
    ``waiting(describe(short))`` and go on."""
    import ray

    short = missing(need, ray.cluster_resources())
    if not short:
        return
    if embedded_ray():
        raise refusal(short)
    log(waiting(describe(short)))


def embedded_ray() -> bool:
    """True when this process runs ralflow's embedded local Ray (so its settings for Ray Data,
    which Tune trials do not inherit, are passed on to them)."""
    return _embedded


def init_ray(address: str | None = None, num_cpus: int | None = None, log=print) -> None:
    import ray

    global _embedded
    if ray.is_initialized():
        return
    field = "address" if address else None  # else from RAY_ADDRESS, which the messages say
    address = cluster_address(address)
    quiet = {"log_to_driver": True, "configure_logging": True, "logging_level": "WARNING"}
    with own_sigterm_handler():
        if address:
            where = address if field else f"{address} (RAY_ADDRESS)"
            check_ray_address(where, address, field=field)
            try:
                ray.init(address=address, **quiet)
            except ConnectionError:
                raise UserError(
                    f"cannot connect to the Ray cluster at {where}: the port answers, but not as a Ray cluster "
                    "this client may join: is it the GCS address (head:6379), and, with token authentication, "
                    "is the cluster's token here (~/.ray/auth_token or RAY_AUTH_TOKEN)?",
                    field=field,
                ) from None
            log(f"ray: connected to cluster at {address}")
            return
        start_local_ray(num_cpus, **quiet)
    _embedded = True
    use_all_local_cpus_for_data()
    log(
        f"ray: started a local Ray instance ({int(ray.cluster_resources().get('CPU', 0))} CPUs, "
        f"dashboard {os.environ['RAY_ADDRESS']})"
    )


class Terminated(KeyboardInterrupt):
    """SIGTERM (``ray job stop``, a scheduler, ``kill``), raised like Ctrl-C so that every run
    in progress is closed as KILLED on the way out."""


def raise_terminated(signum, frame) -> None:
    """The CLI's SIGTERM handler."""
    raise Terminated("terminated (SIGTERM)")


REDELIVER_AFTER_S = 0.1  # the dropped signal is sent again once the finalizer has returned


def redeliver_dropped_interrupts() -> None:
    """Send again the Ctrl-C or SIGTERM that Python drops. One that lands while Python runs a
    finalizer or a weakref callback (seen: SQLAlchemy's, while a run's params were logged) cannot
    be raised there: Python prints "Exception ignored" through ``sys.unraisablehook`` and goes on,
    and training ran to its end. Wraps that hook (once) so that the same signal reaches the main
    thread again a moment later, in ordinary code, wherever that is: a fit, a sweep, a model being
    logged. An interrupt raised as usual is not touched."""
    import signal
    import sys
    import threading

    previous = sys.unraisablehook
    if getattr(previous, "redelivers_interrupts", False):
        return

    def hook(unraisable) -> None:
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            signum = signal.SIGTERM if isinstance(unraisable.exc_value, Terminated) else signal.SIGINT
            resend = threading.Timer(REDELIVER_AFTER_S, signal.pthread_kill, (threading.main_thread().ident, signum))
            resend.daemon = True
            try:
                resend.start()
            except RuntimeError:  # the interpreter is shutting down: it is ending anyway
                pass
        previous(unraisable)

    hook.redelivers_interrupts = True
    sys.unraisablehook = hook


@contextlib.contextmanager
def interrupts_held():
    """Hold Ctrl-C and SIGTERM back in the block; yields ``deliver``, which puts the handlers back
    and delivers what was held (KeyboardInterrupt, or ``Terminated`` from ``raise_terminated``).
    The block's end delivers what is still held. For a step that must not be cut in two, such as
    creating an MLflow run: call ``deliver`` once the caller can close the run, so an interrupt
    never leaves it RUNNING. Outside the main thread (a Tune trial) Python runs no signal
    handlers: nothing is held."""
    import signal
    import threading

    signums = (signal.SIGINT, signal.SIGTERM)
    # a handler set outside Python (getsignal: None) could not be put back
    if threading.current_thread() is not threading.main_thread() or None in map(signal.getsignal, signums):
        yield lambda: None
        return
    held: list[int] = []
    before = {signum: signal.signal(signum, lambda signum, frame: held.append(signum)) for signum in signums}
    restored = False

    def deliver() -> None:
        nonlocal restored
        if restored:
            return
        restored = True
        for signum, handler in before.items():
            signal.signal(signum, handler)
        if held:  # the handler the process had (a default one ends it, as the signal would have)
            signal.raise_signal(held[0])

    try:
        yield deliver
    finally:
        deliver()


@contextlib.contextmanager
def own_sigterm_handler():
    """Keep the caller's SIGTERM handler: ``ray.init`` installs one that exits the driver at once
    (``sys.exit(15)``), before the runs in progress can be closed."""
    import signal
    import threading

    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if main and before is not None:
            signal.signal(signal.SIGTERM, before)


def start_local_ray(num_cpus: int | None = None, **kwargs) -> str:
    """Start a new local Ray (never join another) and return its GCS address.

    The dashboard serves the State API that Ray Train's placement-group cleaner uses to release
    a finished run's resources (without it sequential Tune trials starve). The cleaner finds
    the cluster through RAY_ADDRESS, inherited by every Ray process started from here: with
    more than one Ray instance on a machine it would otherwise not know which is its own.
    """
    import ray

    port = free_port()
    os.environ["RAY_ADDRESS"] = f"http://127.0.0.1:{port}"
    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=port,
        _system_config=dict(SYSTEM_CONFIG),
        **kwargs,
    )
    return ray.get_runtime_context().gcs_address


def use_all_local_cpus_for_data() -> None:
    """On the embedded single-node Ray, let Ray Data schedule by free CPUs alone.

    Ray 2.60's per-operator reservation sizes Data's CPU budget from an autoscaling coordinator
    that answers asynchronously: every epoch (a new execution) starts with a zero budget, and on a
    small node decode often ran on one CPU (bench/ingest.py compares both settings). On a cluster
    ralflow keeps Ray's default: there the coordinator is how Ray Data asks the autoscaler for
    nodes."""
    from ray.data import DataContext

    DataContext.get_current().op_resource_reservation_enabled = False


def map_with_ray_data(fn, items: list, num_cpus: float = 1.0) -> list:
    """Run ``fn`` over ``items`` as Ray Data map tasks spread over the cluster's CPUs
    (one block per item), with Ray Data's progress bar; returns results in item order."""
    import pickle

    import ray.data

    if not items:
        return []
    payload = [{"i": i, "item": pickle.dumps(x)} for i, x in enumerate(items)]
    ds = ray.data.from_items(payload, override_num_blocks=len(items))
    ds = ds.map(lambda row: {"i": row["i"], "result": pickle.dumps(fn(pickle.loads(row["item"])))}, num_cpus=num_cpus)
    rows = sorted(ds.take_all(), key=lambda r: r["i"])
    return [pickle.loads(r["result"]) for r in rows]


def alive_nodes() -> list[dict]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def check_shared_path(path: str, what: str, field: str | None = None) -> None:
    """On a multi-node cluster a local path must be the same shared folder on every node
    (NFS or similar); URIs (s3://, gs://, ...) are shared by construction. Checked by writing
    a probe file here and looking for it from a task pinned to each node."""
    import uuid

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from .errors import UserError

    if "://" in path:
        return
    nodes = alive_nodes()
    if len(nodes) <= 1:
        return
    os.makedirs(path, exist_ok=True)
    probe = os.path.join(path, f".ralflow-probe-{uuid.uuid4().hex}")
    with open(probe, "w") as f:
        f.write("probe")
    try:

        @ray.remote(num_cpus=0)
        def exists(p):
            return os.path.exists(p)

        refs = [
            exists.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(probe)
            for n in nodes
        ]
        seen = ray.get(refs, timeout=60)
    finally:
        os.remove(probe)
    missing = [n["NodeManagerAddress"] for n, ok in zip(nodes, seen) if not ok]
    if missing:
        raise UserError(
            f"{what} {path} is a local folder not shared with node(s) {', '.join(missing)} of this "
            f"{len(nodes)}-node cluster; use shared storage (an NFS mount on every node, or s3://, gs://)",
            field=field,
        )
