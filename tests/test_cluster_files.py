"""Every manifest and YAML under cluster/ parses, and every Ray version pin agrees with the
Ray pinned in pyproject.toml."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def pinned_ray() -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (pin,) = [re.search(r"==([\d.]+)", d).group(1) for d in deps if d.startswith("ray[")]
    return pin


def test_cluster_yaml_parses_and_ray_pins_agree():
    files = sorted((ROOT / "cluster").rglob("*.yaml"))
    assert {f.name for f in files} >= {
        "raycluster.yaml",
        "rayjob-train.yaml",
        "rayjob-tune.yaml",
        "aws.yaml",
        "mlflow-server.yaml",
        "rayservice.yaml",
    }
    version = pinned_ray()
    seen = 0
    for f in files:
        text = f.read_text()
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
        assert docs, f
        for v in re.findall(r'rayVersion:\s*"?([\d.]+)', text):
            assert v == version, f"{f}: rayVersion {v} != {version}"
            seen += 1
        for tag in re.findall(r"(?:rayproject/ray|ralflow):([\d.]+)", text):
            assert tag == version, f"{f}: image tag {tag} != {version}"
            seen += 1
    assert seen >= 8


def test_kuberay_manifests_have_the_three_node_types():
    cluster = yaml.safe_load((ROOT / "cluster/kuberay/raycluster.yaml").read_text())
    assert cluster["kind"] == "RayCluster"
    groups = {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}
    assert set(groups) == {"cpu-data", "gpu-train"}
    assert groups["gpu-train"]["rayStartParams"]["num-gpus"] == "1"
    assert cluster["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    for name, workflow in (("rayjob-train.yaml", "workflows.train"), ("rayjob-tune.yaml", "workflows.tune")):
        job = yaml.safe_load((ROOT / "cluster/kuberay" / name).read_text())
        assert job["kind"] == "RayJob" and workflow in job["spec"]["entrypoint"]
        assert {g["groupName"] for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]} == {"cpu-data", "gpu-train"}
    launcher = yaml.safe_load((ROOT / "cluster/launcher/aws.yaml").read_text())
    assert set(launcher["available_node_types"]) == {"head", "cpu_data", "gpu_train"}
    assert launcher["available_node_types"]["gpu_train"]["resources"]["GPU"] == 1


def test_every_cluster_recipe_keeps_idle_workers_like_local_ray():
    """The idle-worker timeout that keeps Ray Data's per-epoch tasks warm (workflows/raylib.py)
    is set, with the same value, wherever cluster/ starts a Ray head."""
    from components.runtime import SYSTEM_CONFIG

    ((key, value),) = SYSTEM_CONFIG.items()
    for rel in ("cluster/local.sh", "cluster/kuberay/raycluster.yaml", "cluster/launcher/aws.yaml"):
        text = (ROOT / rel).read_text()
        found = re.findall(rf'{key}\\?"?:\s*(\d+)', text)
        assert found == [str(value)], f"{rel}: {key} = {found}, want [{value}]"


def test_the_rayservice_builds_the_serve_app_from_known_settings(monkeypatch):
    import dataclasses
    import importlib

    import components.serve as serve_module
    from components.errors import UserError

    svc = yaml.safe_load((ROOT / "cluster/kuberay/rayservice.yaml").read_text())
    assert svc["kind"] == "RayService"
    (app,) = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"]
    module, name = app["import_path"].split(":")
    builder = getattr(importlib.import_module(module), name)
    assert set(app["args"]) <= {f.name for f in dataclasses.fields(serve_module.ServeOptions)}
    built = []
    monkeypatch.setattr(serve_module, "build_app", lambda opts, uri, gpu: built.append((opts, uri, gpu)))
    builder({**app["args"], "replicas": "2", "gpu": "false", "refresh_s": "5"})  # `serve run` passes strings
    opts, uri, gpu = built[0]
    assert (opts.replicas, opts.max_replicas, opts.refresh_s, gpu) == (2, 4, 5.0, False)
    assert uri == "http://mlflow.mlflow.svc.cluster.local:5000"
    with pytest.raises(UserError, match="unknown serve settings: replica"):
        builder({"model_name": "x", "replica": 2})
