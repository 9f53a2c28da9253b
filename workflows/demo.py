"""Loss demo: train a linear multi-label classifier on random long-tailed data with several
losses under the same budget and print a comparison table (macro and head/medium/tail mAP).

The data: Gaussian features, 26 classes whose prevalences follow the CXR-LT 2023 training
frequencies, each class a noisy linear concept in feature space, plus a little label noise.
It runs on CPU in well under a minute and shows how the losses treat the long tail.
"""
from __future__ import annotations

import sys
import time

from workflows.common import main_for, parse_key_values

DESCRIPTION = "Loss demo: a linear multi-label classifier on random long-tailed data, losses compared."


def add_arguments(parser) -> None:
    parser.add_argument("--losses", default="bce,asl,ral", help="comma-separated loss names to compare")
    parser.add_argument("--num-train", type=int, default=20000, help="training samples")
    parser.add_argument("--num-test", type=int, default=10000, help="held-out samples")
    parser.add_argument("--features", type=int, default=64, help="feature dimension")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--label-noise", type=float, default=0.02, help="fraction of positives dropped (missing labels)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--loss-param", action="append", metavar="LOSS.k=v",
                        help="override a loss parameter, e.g. ral.lamb=2.0 (repeatable)")


def make_long_tailed_data(num: int, features: int, seed: int, label_noise: float, generator_seed: int = 1234):
    """Features and labels with CXR-LT 2023 class prevalences; the concept is fixed by
    ``generator_seed`` so train and test draw from the same task."""
    import torch

    from components.data.labels import CXR_LT_2023_COUNTS, CXR_LT_2023_NUM_TRAIN

    prevalence = torch.tensor(list(CXR_LT_2023_COUNTS.values()), dtype=torch.float64) / CXR_LT_2023_NUM_TRAIN
    g = torch.Generator().manual_seed(generator_seed)
    w = torch.randn(features, len(prevalence), generator=g, dtype=torch.float64) / features**0.5
    # threshold each class's score at the normal quantile matching its prevalence
    thresholds = torch.distributions.Normal(0.0, 1.0).icdf(1 - prevalence)
    gd = torch.Generator().manual_seed(seed)
    x = torch.randn(num, features, generator=gd, dtype=torch.float64)
    score = x @ w / w.norm(dim=0) + 0.35 * torch.randn(num, len(prevalence), generator=gd, dtype=torch.float64)
    y = (score > thresholds * (1 + 0.35**2) ** 0.5).double()
    drop = torch.rand(y.shape, generator=gd, dtype=torch.float64) < label_noise
    y_noisy = torch.where(drop, torch.zeros_like(y), y)
    return x.float(), y.float(), y_noisy.float(), prevalence


def train_linear(loss_fn, x, y, epochs: int, batch_size: int, lr: float, seed: int):
    import torch

    torch.manual_seed(seed)
    model = torch.nn.Linear(x.shape[1], y.shape[1])
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(epochs):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), batch_size):
            idx = perm[i : i + batch_size]
            loss = loss_fn(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model


def run(args) -> int:
    import torch

    from components.data.labels import frequency_groups
    from components.losses import build_loss
    from components.metrics import multilabel_metrics

    names = [n.strip() for n in args.losses.split(",") if n.strip()]
    overrides = parse_key_values(args.loss_param, "--loss-param")
    per_loss: dict[str, dict] = {n: {} for n in names}
    for key, value in overrides.items():
        loss_name, _, param = key.partition(".")
        if loss_name not in per_loss or not param:
            raise ValueError(f"--loss-param {key}: expected LOSS.param with LOSS one of {', '.join(names)}")
        per_loss[loss_name][param] = value
    losses = {n: build_loss(n, **per_loss[n]) for n in names}  # fail on bad names before training

    x_tr, _, y_tr, prevalence = make_long_tailed_data(args.num_train, args.features, args.seed, args.label_noise)
    x_te, y_te, _, _ = make_long_tailed_data(args.num_test, args.features, args.seed + 1, 0.0)
    counts = y_tr.sum(0)
    groups = frequency_groups(counts.tolist(), len(y_tr))
    print(f"data: {args.num_train} train / {args.num_test} test, {y_tr.shape[1]} classes "
          f"({groups.count('head')} head, {groups.count('medium')} medium, {groups.count('tail')} tail), "
          f"{y_tr.sum(1).mean():.2f} labels per sample")

    rows = []
    for name, loss_fn in losses.items():
        t0 = time.perf_counter()
        model = train_linear(loss_fn, x_tr, y_tr, args.epochs, args.batch_size, args.lr, args.seed)
        with torch.no_grad():
            probs = torch.sigmoid(model(x_te)).numpy()
        m = multilabel_metrics(probs, y_te.numpy(), groups)
        rows.append((name, m["mAP"], m["mAP_head"], m["mAP_medium"], m["mAP_tail"], m["AUROC"], time.perf_counter() - t0))
        print(f"  trained {name:<6} in {rows[-1][-1]:.1f}s", flush=True)

    print()
    print(f"{'loss':<8}{'mAP':>8}{'head':>8}{'medium':>8}{'tail':>8}{'AUROC':>8}{'time s':>8}")
    for name, *vals, secs in rows:
        print(f"{name:<8}" + "".join(f"{v:>8.4f}" for v in vals) + f"{secs:>8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main_for(__name__))
