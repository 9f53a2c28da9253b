"""The loss demo: a linear multi-label classifier trained on random long-tailed data with several
losses under the same budget, scored by macro and head/medium/tail mAP.

The data: Gaussian features, 26 classes whose prevalences follow the CXR-LT 2023 training
frequencies, each class a noisy linear concept in feature space, plus a little label noise. It
runs on CPU in seconds and shows how the losses treat the long tail.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ..config import setting
from ..errors import UserError


@dataclass
class DemoOptions:
    losses: str = setting("bce,asl,ral", help="comma-separated loss names to compare")
    num_train: int = setting(20000, help="training samples")
    num_test: int = setting(10000, help="held-out samples")
    features: int = setting(64, help="feature dimension")
    epochs: int = setting(15, help="training epochs")
    batch_size: int = setting(256, help="batch size")
    lr: float = setting(3e-3, help="learning rate")
    label_noise: float = setting(0.02, help="fraction of positives dropped (missing labels)")
    seed: int = setting(0, help="random seed")
    loss_param: dict = setting(factory=dict, help="override a loss parameter, e.g. ral.lamb=2.0 (repeatable)")


def make_long_tailed_data(num: int, features: int, seed: int, label_noise: float, generator_seed: int = 1234):
    """Features and labels with CXR-LT 2023 class prevalences; the concept is fixed by
    ``generator_seed`` so train and test draw from the same task."""
    import torch

    from ..data.labels import CXR_LT_2023_COUNTS, CXR_LT_2023_NUM_TRAIN

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


def compare_losses(opts: DemoOptions, log=print) -> list[dict]:
    """Train one classifier per loss; returns a row per loss (mAP, head, medium, tail, AUROC, seconds)."""
    import torch

    from ..data.labels import frequency_groups
    from ..metrics import multilabel_metrics
    from . import build_loss

    names = [n.strip() for n in opts.losses.split(",") if n.strip()]
    per_loss: dict[str, dict] = {n: {} for n in names}
    for key, value in opts.loss_param.items():
        loss_name, _, param = key.partition(".")
        if loss_name not in per_loss or not param:
            raise UserError(
                f"loss_param {key}: expected LOSS.param with LOSS one of {', '.join(names)}", field="loss_param"
            )
        per_loss[loss_name][param] = value
    losses = {n: build_loss(n, **per_loss[n]) for n in names}  # fail on bad names before training

    x_tr, _, y_tr, prevalence = make_long_tailed_data(opts.num_train, opts.features, opts.seed, opts.label_noise)
    x_te, y_te, _, _ = make_long_tailed_data(opts.num_test, opts.features, opts.seed + 1, 0.0)
    groups = frequency_groups(y_tr.sum(0).tolist(), len(y_tr))
    log(
        f"data: {opts.num_train} train / {opts.num_test} test, {y_tr.shape[1]} classes "
        f"({groups.count('head')} head, {groups.count('medium')} medium, {groups.count('tail')} tail), "
        f"{y_tr.sum(1).mean():.2f} labels per sample"
    )
    rows = []
    for name, loss_fn in losses.items():
        t0 = time.perf_counter()
        model = train_linear(loss_fn, x_tr, y_tr, opts.epochs, opts.batch_size, opts.lr, opts.seed)
        with torch.no_grad():
            probs = torch.sigmoid(model(x_te)).numpy()
        m = multilabel_metrics(probs, y_te.numpy(), groups)
        rows.append(
            {
                "loss": name,
                **{k: m[k] for k in ("mAP", "mAP_head", "mAP_medium", "mAP_tail", "AUROC")},
                "seconds": time.perf_counter() - t0,
            }
        )
        log(f"  trained {name:<6} in {rows[-1]['seconds']:.1f}s")
    return rows
