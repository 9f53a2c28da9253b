"""Submitting a workflow to a Ray cluster through Ray Jobs: the working directory shipped as the
job's runtime environment, Ray's auth token carried when the cluster uses token
authentication, a retry while a fresh cluster's job agent starts, and the job's logs followed."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .errors import UserError

WORKFLOWS = ("prepare", "train", "tune", "promote", "predict", "synth", "run")
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


def auth_env() -> dict:
    """Ray token authentication: use it when a token is available (file or RAY_AUTH_TOKEN)."""
    token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    if os.environ.get("RAY_AUTH_TOKEN") or token_file.is_file():
        return {"RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token")}
    return {}


def check_reachable(address: str, timeout: float = 5.0) -> None:
    import urllib.error
    import urllib.request

    url = address.rstrip("/") + "/api/version"
    try:
        urllib.request.urlopen(url, timeout=timeout).close()
    except urllib.error.HTTPError:
        return  # something answered (e.g. 401 before the token is attached): reachable
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise UserError(
            f"cannot reach the Ray cluster at {address} ({getattr(exc, 'reason', exc)}); "
            f"is it up, and is this the dashboard/Jobs address (usually port 8265)?"
        ) from None


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

    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise UserError("address (or RAY_ADDRESS) is required, e.g. http://127.0.0.1:8265", field="address")
    if not address.startswith(("http://", "https://")):
        address = f"http://{address}"
    check_reachable(address)
    os.environ.update(auth_env())
    from ray.job_submission import JobSubmissionClient

    env_vars = {}
    for item in env or []:
        k, sep, v = item.partition("=")
        if not sep:
            raise UserError(f"env expects K=V, got {item!r}", field="env")
        env_vars[k] = v
    runtime_env = {"working_dir": working_dir, "excludes": EXCLUDES, "env_vars": env_vars}
    if pip:
        runtime_env["pip"] = pip
    workflow_args = workflow_args[1:] if workflow_args[:1] == ["--"] else workflow_args
    entrypoint = " ".join([shlex.quote(python), "-m", f"workflows.{workflow}", *map(shlex.quote, workflow_args)])
    client = JobSubmissionClient(address)
    job_id = submit_with_retry(client, entrypoint, runtime_env, job_id)
    print(f"submit: job {job_id} on {address}: {entrypoint}", flush=True)
    if not wait:
        return job_id, None

    async def follow() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    asyncio.run(follow())
    return job_id, client.get_job_status(job_id).value
