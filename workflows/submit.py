"""Submit any ralflow workflow to a Ray cluster through Ray Jobs: ships this working directory
as the job's runtime environment, carries Ray's auth token when the cluster uses token
authentication, and follows the job's logs (--no-wait returns the job id).

    ralflow submit --address http://head:8265 train --data /shared/data --num-workers 4 ..."""

from __future__ import annotations

import argparse
import sys

from workflows.cli import main_for

DESCRIPTION = "Submit a workflow (train, tune, prepare, ...) to a Ray cluster via Ray Jobs and follow it."


def add_arguments(parser) -> None:
    from components.submit import PROJECT_ROOT, WORKFLOWS

    parser.add_argument("--address", help="Ray Jobs address, e.g. http://127.0.0.1:8265 (default: RAY_ADDRESS)")
    parser.add_argument("--no-wait", action="store_true", help="print the job id and return")
    parser.add_argument("--working-dir", default=PROJECT_ROOT, help="code shipped with the job")
    parser.add_argument("--python", default="python", help="python executable on the cluster nodes")
    parser.add_argument("--env", action="append", metavar="K=V", help="environment variable for the job (repeatable)")
    parser.add_argument("--pip", action="append", help="extra pip requirement installed for the job (repeatable)")
    parser.add_argument("--job-id", help="submission id (default: generated)")
    parser.add_argument("workflow", choices=WORKFLOWS, help="the workflow to run on the cluster")
    parser.add_argument("workflow_args", nargs=argparse.REMAINDER, help="the workflow's own flags")


def run(args) -> int:
    from components.submit import submit

    job_id, status = submit(
        args.address,
        args.workflow,
        args.workflow_args,
        working_dir=args.working_dir,
        python=args.python,
        env=args.env,
        pip=args.pip,
        job_id=args.job_id,
        wait=not args.no_wait,
    )
    if status is None:
        print(job_id)
        return 0
    print(f"submit: job {job_id} {status}", flush=True)
    return 0 if status == "SUCCEEDED" else 1


if __name__ == "__main__":
    sys.exit(main_for(__name__))
