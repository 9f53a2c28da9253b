"""``ralflow serve``: the registered champion behind HTTP, on Ray Serve.

``POST /predict`` with an image file as the body (PNG, JPEG or DICOM; ``curl --data-binary
@film.dcm``) answers ``{"model", "version", "findings": {label: probability}}``; an image that
cannot be used answers 422 with the reason, and the service keeps serving. ``GET /health``
names the version being served. Each replica batches concurrent requests (``serve.batch``) and
follows the alias: when ``champion`` moves to another version, replicas load it within
``refresh_s`` seconds, without a restart. The model does its own decoding, resizing and
normalisation (``components.models.pyfunc``), so the replica (``serve_replica``) only moves
bytes and JSON. This module imports no Ray at import time: ``ralflow --help`` stays fast.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from .config import TRACKING_URI_DEFAULT, default_tracking_uri, setting
from .errors import UserError


@dataclass
class ServeOptions:
    model_name: str = setting(help="registered model to serve")
    alias: str = setting("champion", help="registry alias to serve (followed as it moves)")
    tracking_uri: str | None = setting(None, help=f"MLflow tracking/registry URI {TRACKING_URI_DEFAULT}")
    host: str = setting("127.0.0.1", help="HTTP host (0.0.0.0 to listen on every interface)")
    port: int = setting(8000, help="HTTP port")
    route_prefix: str = setting("/", help="URL prefix of the application")
    replicas: int = setting(1, help="replicas (the minimum when --max-replicas is larger: autoscaling)")
    max_replicas: int | None = setting(None, help="autoscale between --replicas and this many replicas")
    cpus_per_replica: float = setting(1.0, help="CPUs each replica holds")
    gpu: bool | None = setting(None, help="a GPU per replica (default: when the cluster has GPUs)")
    max_batch_size: int = setting(16, help="concurrent requests scored in one model call")
    batch_wait_ms: float = setting(10.0, help="how long a replica waits to fill a batch")
    refresh_s: float = setting(30.0, help="how often replicas check where the alias points")
    detach: bool = setting(False, help="deploy and return (on a cluster); default: serve until Ctrl-C")


def check_model(opts: ServeOptions, uri: str) -> str:
    """The version the alias points at now; a clear error when the model or alias is missing."""
    from .tracking import client

    try:
        return str(client(uri).get_model_version_by_alias(opts.model_name, opts.alias).version)
    except Exception as exc:  # noqa: BLE001 - unknown name or alias: say which
        raise UserError(
            f"model_name {opts.model_name}@{opts.alias} is not in the registry at {uri} "
            f"({str(exc).splitlines()[0][:200]}); promote a run first (`ralflow promote`)",
            field="model_name",
        ) from None


def build_app(opts: ServeOptions, uri: str, use_gpu: bool):
    from ray import serve

    from .serve_replica import ChampionService

    scaling: dict = {"num_replicas": opts.replicas}
    if opts.max_replicas and opts.max_replicas > opts.replicas:
        scaling = {
            "autoscaling_config": {
                "min_replicas": opts.replicas,
                "max_replicas": opts.max_replicas,
                "target_ongoing_requests": max(2, opts.max_batch_size // 2),
            }
        }
    deployment = serve.deployment(
        ChampionService,
        name="champion",
        ray_actor_options={"num_cpus": opts.cpus_per_replica, "num_gpus": 1 if use_gpu else 0},
        max_ongoing_requests=max(8, 2 * opts.max_batch_size),
        **scaling,
    )
    return deployment.bind(opts, uri)


def app_from_args(args: dict):
    """A Ray Serve application builder, for ``serve run components.serve:app_from_args
    model_name=cxr tracking_uri=...`` and KubeRay's RayService (``import_path`` with ``args``):
    the same application as ``ralflow serve``, from ``ServeOptions`` given by name."""
    import dataclasses

    import ray

    fields = {f.name: f for f in dataclasses.fields(ServeOptions)}
    unknown = sorted(set(args) - set(fields))
    if unknown:
        raise UserError(f"unknown serve settings: {', '.join(unknown)}; known: {', '.join(fields)}")
    values = {}
    for key, value in args.items():
        kind = str(fields[key].type).split(" |")[0]
        if isinstance(value, str) and kind in ("int", "float"):
            value = {"int": int, "float": float}[kind](value)
        elif isinstance(value, str) and kind == "bool":
            value = value.strip().lower() in ("1", "true", "yes", "on")
        values[key] = value
    opts = ServeOptions(**values)
    uri = opts.tracking_uri or default_tracking_uri()
    use_gpu = opts.gpu if opts.gpu is not None else ray.cluster_resources().get("GPU", 0) >= 1
    return build_app(opts, uri, use_gpu)


def port_in_use(host: str, port: int) -> UserError:
    return UserError(
        f"port={port}: {host}:{port} is already in use; choose another --port, or stop what listens there",
        field="port",
    )


def check_replicas_fit(opts: ServeOptions, use_gpu: bool, log=print) -> None:
    """Replicas that cannot fit ralflow's embedded Ray (a fixed size) are refused before Serve
    waits for them forever; on a cluster, which may autoscale, say what they wait for."""
    from .runtime import describe, refuse_or_wait

    def refusal(short):
        each = f"{opts.cpus_per_replica:g} CPU{' + 1 GPU' if use_gpu else ''} each"
        return UserError(
            f"replicas={opts.replicas}: {opts.replicas} replica(s) x {each} need {describe(short)} on this machine; "
            f"lower --replicas or --cpus-per-replica{', use --no-gpu' if 'GPU' in short else ''}, or serve on a "
            "cluster (--address)",
            field="replicas",
        )

    need = {"CPU": opts.replicas * opts.cpus_per_replica, **({"GPU": opts.replicas} if use_gpu else {})}
    refuse_or_wait(need, refusal, lambda short: f"serve: waiting for resources: {opts.replicas} replica(s) need "
                   f"{short}; an autoscaling cluster adds nodes", log)  # fmt: skip


def check_serve_port(port: int) -> None:
    """Serve already running on the cluster keeps its HTTP port and ignores the one asked for (with
    a log line on the cluster): refuse, rather than say a URL that nothing answers."""
    from ray.serve.context import _get_global_client

    running = _get_global_client().http_config.port
    if running != port:
        raise UserError(
            f"port={port}: Serve already runs on this Ray cluster with its HTTP proxy on port {running}, and "
            f"keeps it: use --port {running}, or stop Serve there first (`serve shutdown`)",
            field="port",
        )


def check_port_free(host: str, port: int) -> None:
    """Refuse a port something already listens on (as the proxy will bind it: address reuse on,
    so a socket in TIME_WAIT from a server just stopped does not count)."""
    import socket

    try:
        socket.create_server((host, port)).close()
    except OSError:
        raise port_in_use(host, port) from None


def serve_champion(opts: ServeOptions, address: str | None = None, log=print, ready=None) -> dict:
    """Deploy the service; serve until interrupted (or return at once with ``detach``)."""
    import ray
    from ray import serve

    from .runtime import cluster_address, init_ray
    from .tracking import check_tracking_uri

    for name, value, ok, allowed in (
        ("replicas", opts.replicas, opts.replicas >= 1, ">= 1"),
        ("max_batch_size", opts.max_batch_size, opts.max_batch_size >= 1, ">= 1"),
        ("refresh_s", opts.refresh_s, opts.refresh_s > 0, "> 0"),
        ("port", opts.port, 0 < opts.port < 65536, "1..65535"),
    ):
        if not ok:
            raise UserError(f"{name}={value} is invalid; allowed: {allowed}", field=name)
    uri = opts.tracking_uri or default_tracking_uri()
    check_tracking_uri(uri)
    version = check_model(opts, uri)
    if not cluster_address(address):  # a local Ray: its HTTP proxy will listen here
        if opts.detach:
            raise UserError("detach needs a Ray cluster (--address or RAY_ADDRESS): local Ray ends with this process")
        check_port_free(opts.host, opts.port)
    init_ray(address, log=log)
    use_gpu = opts.gpu if opts.gpu is not None else ray.cluster_resources().get("GPU", 0) >= 1
    check_replicas_fit(opts, use_gpu, log)
    try:
        serve.start(http_options={"host": opts.host, "port": opts.port})
    except RuntimeError as exc:  # Ray wraps the proxy's bind failure in a RayTaskError(RuntimeError)
        if "Failed to bind" not in str(exc):
            raise
        serve.shutdown()  # the Serve instance this call started, which has no proxy
        raise port_in_use(opts.host, opts.port) from None
    check_serve_port(opts.port)
    serve.run(build_app(opts, uri, use_gpu), name="ralflow", route_prefix=opts.route_prefix, blocking=False)
    url = f"http://{opts.host}:{opts.port}{opts.route_prefix.rstrip('/')}"
    log(
        f"serve: {opts.model_name}@{opts.alias} (version {version}) at {url}/predict "
        f"({opts.replicas}{'-' + str(opts.max_replicas) if opts.max_replicas else ''} replica(s), "
        f"{'GPU' if use_gpu else 'CPU'}); health: {url}/health"
    )
    log(f"serve: try  curl --data-binary @film.dcm {url}/predict")
    out = {"url": url, "version": version}
    if ready:
        ready(out)
    if opts.detach:
        return out
    try:
        while True:
            time.sleep(1)
    finally:
        log("serve: shutting down")
        serve.shutdown()
