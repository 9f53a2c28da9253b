"""The sweep's report: one row per trial (its MLflow child run, status, epochs, best val mAP
and sampled values), written as ``trials.csv`` and plotted as ``trials.png`` on the parent run."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path


def trials_table(results, sweep: str, client, exp_id: str) -> list[dict]:
    rows = []
    for r in results:
        if r.metrics is None:
            continue
        trial_id = r.metrics.get("trial_id") or Path(r.path).name
        df = r.metrics_dataframe
        best = float(df["val_mAP"].max()) if df is not None and "val_mAP" in df else math.nan
        epochs = int(df["epoch"].max()) if df is not None and "epoch" in df else 0
        child = client.search_runs(
            [exp_id], filter_string=f"tags.`ralflow.run_name` = '{sweep}-{trial_id}'", max_results=1
        )
        row = {
            "trial_id": trial_id,
            "run_id": child[0].info.run_id if child else "",
            "status": "error" if r.error else "ok",
            "epochs": epochs,
            "best_val_mAP": best,
        }
        if r.error:
            text = str(r.error).strip()
            row["error"] = f"{type(r.error).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")
        row.update({k: v for k, v in (r.config or {}).items()})
        rows.append(row)
    return rows


def trials_csv(rows: list[dict]) -> str:
    first = ("trial_id", "run_id", "status", "epochs", "best_val_mAP")
    fields = sorted({k for r in rows for k in r}, key=lambda k: (k not in first, k))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields)
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def trials_plot(rows: list[dict], keys: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in keys if any(k in r for r in rows)] or ["trial"]
    cols = min(4, len(keys))
    nrows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.8 * nrows), dpi=100, squeeze=False)
    for ax, key in zip(axes.flat, keys):
        xs = [r.get(key, i) for i, r in enumerate(rows)]
        ys = [r["best_val_mAP"] for r in rows]
        ax.scatter(xs, ys, c=[r["epochs"] for r in rows], cmap="viridis", s=30)
        if key == "optim.lr":
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel("best val mAP")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    fig.suptitle(f"{title} (colour: epochs run before ASHA stopped the trial)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
