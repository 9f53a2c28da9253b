"""Serve the registered champion over HTTP on Ray Serve: POST an image file (PNG, JPEG or DICOM)
to /predict and get each finding's probability and the model version that answered; GET /health.
Replicas batch concurrent requests and follow the alias: a newly promoted champion is served
without a restart. Runs on local Ray until Ctrl-C, or deploys to a cluster (--address, --detach)."""

from __future__ import annotations

import sys

from workflows.cli import add_address_flag, main_for

DESCRIPTION = "Serve models:/NAME@champion over HTTP with Ray Serve (PNG/JPEG/DICOM in, probabilities out)."


def add_arguments(parser) -> None:
    from components.flags import add_dataclass_flags
    from components.serve import ServeOptions

    add_dataclass_flags(parser, ServeOptions)
    add_address_flag(parser)


def run(args) -> int:
    from components.flags import dataclass_values
    from components.serve import ServeOptions, serve_champion

    out = serve_champion(ServeOptions(**dataclass_values(args, ServeOptions)), address=args.address)
    print(f"serve: deployed version {out['version']} at {out['url']}")
    return 0


if __name__ == "__main__":
    sys.exit(main_for(__name__))
