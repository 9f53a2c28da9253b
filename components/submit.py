"""Submitting a workflow to a Ray cluster through Ray Jobs: the working directory shipped as the
job's runtime environment, Ray's auth token carried when the cluster uses token
authentication, a retry while a fresh cluster's job agent starts, and the job's logs followed."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .config import SUBMITTED_ENV
from .errors import UserError
from .runtime import auth_env, token_available

WORKFLOWS = ("prepare", "verify", "train", "tune", "promote", "predict", "serve", "synth", "run")
EXCLUDES = [
    ".venv/",
    ".git/",
    "mlruns/",
    "mlartifacts/",
    "*.db",
    "ralflow-runs/",
    "__pycache__/",
    ".pytest_cache/",
    ".hypothesis/",
    "*.egg-info/",
]
PROJECT_ROOT = str(Path(__file__).resolve().parents[1])
# Flags whose value is a local path the job reads or writes. The job runs in a copy of the code,
# not in the folder the user typed them in, so relative ones are made absolute here.
PATH_FLAGS = ("--data", "--source", "--out", "--storage-path", "--workdir", "--pretrained-path", "--search-space")


def absolute_paths(args: list[str], here: Path) -> tuple[list[str], list[str]]:
    """``args`` with relative paths made absolute against ``here`` (the submitter's folder):
    path flags, ``--config`` files (not recipe names) and ``sqlite:///`` stores. Returns the
    new arguments and one note per change."""
    takes_path = (*PATH_FLAGS, "--config", "--tracking-uri")
    out, notes, flag = [], [], None
    for arg in args:
        if flag is not None:  # the value of the flag before it
            name, value, prefix = flag, arg, ""
        elif arg.startswith("--") and "=" in arg:  # --data=DIR
            name, value = arg.split("=", 1)
            prefix = f"{name}="
        else:
            out.append(arg)
            flag = arg if arg in takes_path else None
            continue
        flag = None
        new = absolute_value(name, value, here)
        out.append(prefix + new)
        if new != value:
            notes.append(f"{name} {value} -> {new}")
    return out, notes


def absolute_value(flag: str, value: str, here: Path) -> str:
    if flag == "--tracking-uri":
        rest = value[len("sqlite:///") :] if value.startswith("sqlite:///") else None
        return value if rest is None or rest.startswith("/") else f"sqlite:///{here / rest}"
    if flag == "--config" and not value.endswith((".yaml", ".yml")) and "/" not in value:
        return value  # a packaged recipe's name
    if "://" in value or value.startswith(("/", "~")) or flag not in (*PATH_FLAGS, "--config"):
        return value
    return str(here / value)


def jobs_address(address: str | None) -> str:
    """The Ray Jobs (dashboard) address as a URL; ``HOST:PORT`` gets ``http://``."""
    import urllib.parse

    address = (address or os.environ.get("RAY_ADDRESS") or "").strip()
    if not address:
        raise UserError("address (or RAY_ADDRESS) is required, e.g. http://127.0.0.1:8265", field="address")
    url = address if "://" in address else f"http://{address}"
    parsed = urllib.parse.urlparse(url)
    try:
        parsed.port  # noqa: B018 - raises on a port that is not a number
        ok = parsed.scheme in ("http", "https") and bool(parsed.hostname) and not any(c.isspace() for c in url)
    except ValueError:
        ok = False
    if not ok:
        raise UserError(f"address {address!r} is not a URL like http://HOST:8265 (the Ray dashboard)", field="address")
    return url


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """The address must answer as a Ray dashboard (its Jobs API), and a cluster that wants the
    auth token must have one to get here."""
    import json
    import urllib.error
    import urllib.request

    url = address.rstrip("/") + "/api/version"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            body = r.read(65536)
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):  # token authentication: ralflow attaches the token when it has one
            if token_available():
                return
            raise UserError(
                f"address {address}: the Ray cluster requires its auth token; copy the head node's "
                "~/.ray/auth_token here (or set RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH)",
                field="address",
            ) from None
        raise UserError(
            f"address {address} answered HTTP {exc.code} at /api/version: not a Ray dashboard / Jobs address "
            "(usually port 8265)",
            field="address",
        ) from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise UserError(
            f"cannot reach the Ray cluster at {address} ({getattr(exc, 'reason', exc)}); "
            f"is it up, and is this the dashboard/Jobs address (usually port 8265)?"
        ) from None
    try:
        info = json.loads(body)
    except ValueError:
        info = None
    if not isinstance(info, dict) or "ray_version" not in info:
        raise UserError(
            f"address {address} answered, but not as a Ray dashboard / Jobs address (usually port 8265)",
            field="address",
        )


def jobs_client(client_cls, address: str):
    """A Ray Jobs client for ``address`` itself. Ray's client prefers RAY_API_SERVER_ADDRESS, then
    RAY_ADDRESS, over the address it is given: with either exported for another cluster (or for an
    embedded Ray on this machine), `--address` would be checked and then the job sent elsewhere."""
    saved = {k: os.environ.pop(k) for k in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if k in os.environ}
    try:
        return client_cls(address)
    finally:
        os.environ.update(saved)


def submit_with_retry(client, entrypoint: str, runtime_env: dict, job_id: str | None, wait_s: float = 120.0) -> str:
    """A cluster that just started answers "No available agent ... try again later" until its
    job agent is up: retry that answer (only that one) for a while."""
    import time

    deadline = time.monotonic() + wait_s
    while True:
        try:
            return client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, submission_id=job_id)
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise
            print("submit: the cluster's job agent is not ready yet; retrying", file=sys.stderr, flush=True)
            time.sleep(3)


def submit(
    address: str | None,
    workflow: str,
    workflow_args: list[str],
    working_dir: str = PROJECT_ROOT,
    python: str = "python",
    env: list[str] | None = None,
    pip: list[str] | None = None,
    job_id: str | None = None,
    wait: bool = True,
) -> tuple[str, str | None]:
    """Submit ``python -m workflows.<workflow> ARGS`` and (with ``wait``) follow its logs to
    stdout. Returns (job id, final status or None when not waiting)."""
    import asyncio
    import shlex

    address = jobs_address(address)
    check_reachable(address)
    os.environ.update(auth_env())
    from ray.job_submission import JobSubmissionClient

    # `ray job stop` sends SIGTERM, then SIGKILL after this many seconds (Ray's default, 3, is too
    # short for a sweep to let Tune stop its trials and close their MLflow runs).
    env_vars = {"RAY_JOB_STOP_WAIT_TIME_S": "30", SUBMITTED_ENV: "1"}
    for item in env or []:
        k, sep, v = item.partition("=")
        if not sep:
            raise UserError(f"env expects K=V, got {item!r}", field="env")
        env_vars[k] = v
    runtime_env = {"working_dir": working_dir, "excludes": EXCLUDES, "env_vars": env_vars}
    if pip:
        runtime_env["pip"] = pip
    workflow_args = workflow_args[1:] if workflow_args[:1] == ["--"] else workflow_args
    workflow_args, notes = absolute_paths(workflow_args, Path.cwd())
    for note in notes:
        print(f"submit: {note} (the job runs in a copy of the code, not in this folder)", flush=True)
    entrypoint = " ".join([shlex.quote(python), "-m", f"workflows.{workflow}", *map(shlex.quote, workflow_args)])
    client = jobs_client(JobSubmissionClient, address)
    job_id = submit_with_retry(client, entrypoint, runtime_env, job_id)
    print(f"submit: job {job_id} on {address}: {entrypoint}", flush=True)
    if not wait:
        return job_id, None

    async def follow() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    asyncio.run(follow())
    return job_id, client.get_job_status(job_id).value
