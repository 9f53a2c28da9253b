"""Register a trained model and promote it: it gets the `champion` alias only if its validation
mAP beats the current champion's on the same validation data (same dataset checksum) by
--margin; otherwise `challenger`. --force --reason overrides and records why."""

from __future__ import annotations

import sys

from workflows.cli import main_for

DESCRIPTION = "Register a model version; move the champion alias if it beats the current champion."


def add_arguments(parser) -> None:
    from components.flags import add_dataclass_flags
    from components.promote import PromoteOptions

    add_dataclass_flags(parser, PromoteOptions)


def run(args) -> int:
    from components.flags import dataclass_values
    from components.promote import PromoteOptions, promote

    out = promote(PromoteOptions(**dataclass_values(args, PromoteOptions)))
    done = "already registered as" if out["already"] else "registered"
    print(f"{done} {args.model_name} version {out['version']} from run {out['run_id']} (val mAP {out['val_mAP']:.4f})")
    print(f"alias: {out['alias']} ({out['reason']})")
    return 0


if __name__ == "__main__":
    sys.exit(main_for(__name__))
