"""Submit any ralflow workflow to a Ray cluster through Ray Jobs: ships this working directory
as the job's runtime environment, carries Ray's auth token when the cluster uses token
authentication, and follows the job's logs (--no-wait returns the job id).

    ralflow submit --address http://head:8265 train --data /shared/data --num-workers 4 ..."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from workflows.common import main_for

DESCRIPTION = "Submit a workflow (train, tune, prepare, ...) to a Ray cluster via Ray Jobs and follow it."
WORKFLOWS = ("prepare", "train", "tune", "promote", "predict", "synth", "run")
EXCLUDES = [".venv/", ".git/", "mlruns/", "mlartifacts/", "*.db", "ralflow-runs/", "__pycache__/", ".pytest_cache/",
            ".hypothesis/", "*.egg-info/"]


def add_arguments(parser) -> None:
    parser.add_argument("--address", help="Ray Jobs address, e.g. http://127.0.0.1:8265 (default: RAY_ADDRESS)")
    parser.add_argument("--no-wait", action="store_true", help="print the job id and return")
    parser.add_argument("--working-dir", default=str(Path(__file__).resolve().parents[1]), help="code shipped with the job")
    parser.add_argument("--python", default="python", help="python executable on the cluster nodes")
    parser.add_argument("--env", action="append", metavar="K=V", help="environment variable for the job (repeatable)")
    parser.add_argument("--pip", action="append", help="extra pip requirement installed for the job (repeatable)")
    parser.add_argument("--job-id", help="submission id (default: generated)")
    parser.add_argument("workflow", choices=WORKFLOWS, help="the workflow to run on the cluster")
    parser.add_argument("workflow_args", nargs=argparse.REMAINDER, help="the workflow's own flags")


def auth_env() -> dict:
    """Ray token authentication: use it when a token is available (file or RAY_AUTH_TOKEN)."""
    token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    if os.environ.get("RAY_AUTH_TOKEN") or token_file.is_file():
        return {"RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token")}
    return {}


def check_reachable(address: str, timeout: float = 5.0) -> None:
    import urllib.error
    import urllib.request

    from components.errors import UserError

    url = address.rstrip("/") + "/api/version"
    try:
        urllib.request.urlopen(url, timeout=timeout).close()
    except urllib.error.HTTPError:
        return  # something answered (e.g. 401 before the token is attached): reachable
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise UserError(f"cannot reach the Ray cluster at {address} ({getattr(exc, 'reason', exc)}); "
                        f"is it up, and is this the dashboard/Jobs address (usually port 8265)?") from None


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


def run(args) -> int:
    import asyncio
    import shlex

    from components.errors import UserError

    address = args.address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise UserError("--address (or RAY_ADDRESS) is required, e.g. http://127.0.0.1:8265")
    if not address.startswith(("http://", "https://")):
        address = f"http://{address}"
    check_reachable(address)
    os.environ.update(auth_env())
    from ray.job_submission import JobStatus, JobSubmissionClient

    env_vars = {}
    for item in args.env or []:
        k, sep, v = item.partition("=")
        if not sep:
            raise UserError(f"--env expects K=V, got {item!r}")
        env_vars[k] = v
    runtime_env = {"working_dir": args.working_dir, "excludes": EXCLUDES, "env_vars": env_vars}
    if args.pip:
        runtime_env["pip"] = args.pip
    workflow_args = args.workflow_args[1:] if args.workflow_args[:1] == ["--"] else args.workflow_args
    entrypoint = " ".join([shlex.quote(args.python), "-m", f"workflows.{args.workflow}", *map(shlex.quote, workflow_args)])
    client = JobSubmissionClient(address)
    job_id = submit_with_retry(client, entrypoint, runtime_env, args.job_id)
    print(f"submit: job {job_id} on {address}: {entrypoint}", flush=True)
    if args.no_wait:
        print(job_id)
        return 0

    async def follow() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    asyncio.run(follow())
    status = client.get_job_status(job_id)
    print(f"submit: job {job_id} {status}", flush=True)
    return 0 if status == JobStatus.SUCCEEDED else 1


if __name__ == "__main__":
    sys.exit(main_for(__name__))
