"""A real 2-node Ray cluster and a real MLflow server started by cluster/local.sh; a tiny training
job submitted with `ralflow submit` must spread its workers over both nodes, checkpoint into the
shared storage path, and its model must land in the server's registry. Stops what it started."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from components.tracking import client

from .conftest import ROOT, run_cli

pytestmark = [pytest.mark.cluster, pytest.mark.ray]

PORTS = {"RALFLOW_RAY_PORT": "6391", "RALFLOW_DASHBOARD_PORT": "8291", "RALFLOW_MLFLOW_PORT": "5056"}


def bystander(state: Path) -> subprocess.Popen:
    """An unrelated process whose command line names the cluster's folder: `down` must spare it."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(7200)", str(state / "ray")])


@pytest.fixture(scope="module")
def local_cluster(tmp_path_factory):
    """One cluster for this module's tests (each uses its own experiment and run names); the node
    loss test comes last, as it takes a node away."""
    state = Path(f"/tmp/rfc-{os.getpid()}")  # short: Ray's socket paths must stay < 108 chars
    env = {
        **{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},  # the session's Ray, when it already runs
        **PORTS,
        "RALFLOW_CLUSTER_DIR": str(state),
        "RALFLOW_WORKER_NODES": "1",
        "RALFLOW_HEAD_CPUS": "1",
        "RALFLOW_WORKER_CPUS": "1",
        "RALFLOW_OBJECT_STORE_MB": "300",
    }
    script = str(ROOT / "cluster" / "local.sh")
    before = bystander(state)  # already running when `up` starts
    up = subprocess.run(["bash", script, "up"], env=env, capture_output=True, text=True, timeout=300)
    after = bystander(state)  # started while the cluster runs
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield state, env, up.stdout + up.stderr
    finally:
        down = subprocess.run(["bash", script, "down"], env=env, capture_output=True, text=True, timeout=120)
        try:
            assert down.returncode == 0, down.stderr
            assert before.poll() is None and after.poll() is None, "down stopped a process it had not started"
        finally:
            before.kill(), after.kill()
        left = subprocess.run(["pgrep", "-f", str(state / "ray")], capture_output=True, text=True)
        assert set(left.stdout.split()) <= {str(before.pid), str(after.pid)}, f"processes left: {left.stdout}"
        listening = subprocess.run(["ss", "-ltn"], capture_output=True, text=True).stdout
        client_port = str(int(PORTS["RALFLOW_RAY_PORT"]) + 1)  # the Ray Client server
        for port in (*PORTS.values(), client_port, "8301", "8302"):  # GCS, dashboard, MLflow, client, the nodes' agents
            assert f":{port} " not in listening, f"port {port} still in use after down"
        assert (
            subprocess.run(["curl", "-sf", f"http://127.0.0.1:{PORTS['RALFLOW_MLFLOW_PORT']}/health"]).returncode != 0
        )


def test_submit_to_two_node_cluster_with_mlflow_server(local_cluster, tiny_dataset, tmp_path):
    state, env, up_out = local_cluster
    assert "RAY_ADDRESS=http://127.0.0.1:8291" in up_out and "MLFLOW_TRACKING_URI=http://127.0.0.1:5056" in up_out
    assert "listening on every interface" in up_out  # what is exposed is said plainly
    token = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    assert token.stat().st_mode & 0o777 == 0o600  # the token is a secret: owner only
    status = subprocess.run(
        ["bash", str(ROOT / "cluster" / "local.sh"), "status"], env=env, capture_output=True, text=True
    )
    assert len(re.findall(r"\d+ node_", status.stdout)) == 2 or status.stdout.count("node_") >= 2, status.stdout
    uri, address, storage = "http://127.0.0.1:5056", "http://127.0.0.1:8291", state / "shared"
    spread = tmp_path / "spread.yaml"
    spread.write_text("train: {placement_strategy: SPREAD}\n")
    r = run_cli(
        "submit",
        "--address",
        address,
        "--env",
        "RALFLOW_DEBUG=1",
        "train",
        "--data",
        str(tiny_dataset),
        "--model",
        "resnet10t",
        "--epochs",
        "1",
        "--batch-size",
        "32",
        "--num-workers",
        "2",
        "--cpus-per-worker",
        "0.5",
        "--image-size",
        "32",
        "--config",
        str(spread),  # no --tracking-uri: the cluster's MLFLOW_TRACKING_URI is the default, as on KubeRay
        "--storage-path",
        storage.name,  # relative to where the user is: the job's own folder is elsewhere
        "--run-name",
        "cluster-test",
        "--experiment",
        "cluster",
        env={**env, "RAY_ADDRESS": "http://127.0.0.1:9"},  # an exported address elsewhere: --address wins
        cwd=storage.parent,
        timeout=900,
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert f"submit: --storage-path {storage.name} -> {storage} (the job runs in a copy" in r.stdout
    run_id = re.search(r"run id: (\w+)", r.stdout).group(1)
    assert re.search(r"job \S+ SUCCEEDED", r.stdout)

    c = client(uri)  # this store's registry too, whatever an earlier test left process-wide
    run = c.get_run(run_id)
    nodes = run.data.tags["ralflow.worker_nodes"].split(",")
    assert len(set(nodes)) == 2, "the two training workers should run on the two nodes"
    assert run.info.status == "FINISHED"
    assert list((storage / "cluster-test").glob("epoch-0000/state.pt")), "checkpoint in the shared storage path"

    r = run_cli(
        "submit",
        "--address",
        address,
        "promote",
        "--tracking-uri",
        uri,
        "--model-name",
        "cluster-cxr",
        "--run-id",
        run_id,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    mv = c.get_model_version_by_alias("cluster-cxr", "champion")
    assert mv.tags["source_run_id"] == run_id and int(mv.version) == 1

    # The champion behind HTTP on the cluster: deployed by a job that returns, serving after it.
    r = run_cli("submit", "--address", address, "serve", "--model-name", "cluster-cxr", "--tracking-uri", uri,
                "--port", "8391", "--cpus-per-replica", "0.25", "--detach", env=env, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    try:
        from components.data.images import encode_dicom

        film = encode_dicom(np.random.default_rng(0).integers(0, 4096, (64, 64)).astype(np.uint16))
        request = urllib.request.Request("http://127.0.0.1:8391/predict", data=film)
        with urllib.request.urlopen(request, timeout=60) as resp:
            answer = json.loads(resp.read())
        assert answer["version"] == "1" and len(answer["findings"]) == 26
    finally:
        serve_cli = str(Path(sys.executable).with_name("serve"))
        subprocess.run([serve_cli, "shutdown", "-a", address, "-y"], env={**env, "RAY_AUTH_MODE": "token"},
                       capture_output=True, timeout=120)  # fmt: skip


def test_submit_to_unreachable_address_fails_fast():
    t0 = time.monotonic()
    r = run_cli("submit", "--address", "http://127.0.0.1:9", "train", "--data", "x")
    assert r.returncode == 2 and time.monotonic() - t0 < 30
    assert "cannot reach the Ray cluster at http://127.0.0.1:9" in r.stderr.strip().splitlines()[-1]


def processes(pattern: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def train_until_first_epoch(env, address, uri, storage, data, run_name, experiment, log, *extra):
    """Submit a 4-epoch 2-worker training job in the background; wait for its first logged epoch.
    Returns (the submitting process, the MLflow run id, a client)."""
    args = ["submit", "--address", address, "train", "--data", str(data), "--model", "resnet10t",
            "--epochs", "4", "--batch-size", "32", "--num-workers", "2", "--cpus-per-worker", "0.5",
            "--image-size", "32", "--tracking-uri", uri, "--storage-path", str(storage), "--run-name", run_name,
            "--experiment", experiment, *extra]  # fmt: skip
    with log.open("w") as out:
        proc = subprocess.Popen([str(Path(sys.executable).with_name("ralflow")), *args], cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    c = client(uri)
    run_id, deadline = None, time.monotonic() + 400
    while time.monotonic() < deadline and proc.poll() is None and run_id is None:
        time.sleep(2)
        exp = c.get_experiment_by_name(experiment)
        runs = c.search_runs([exp.experiment_id]) if exp else []
        if runs and c.get_metric_history(runs[0].info.run_id, "val_mAP"):
            run_id = runs[0].info.run_id
    assert run_id, log.read_text()[-4000:]
    return proc, run_id, c


def test_a_sweep_killed_then_stopped_resumes_each_time_without_rerunning_finished_trials(
    local_cluster, tiny_dataset, tmp_path
):
    """One 3-trial sweep submitted as a job and interrupted twice, as sweeps are in real use:
    first its driver is killed outright (SIGKILL: a lost node or the OOM killer; nothing is closed),
    then `ray job stop` stops the resumed job (SIGTERM), which must leave no MLflow run RUNNING.
    Each `--resume` job goes on from the saved state: no finished trial runs again, the trials stay
    nested under one parent with one run each, and the best trial's model is logged."""
    import mlflow

    state, env, _ = local_cluster
    uri, address, storage = "http://127.0.0.1:5056", "http://127.0.0.1:8291", state / "shared"
    sweep = ["tune", "--data", str(tiny_dataset), "--loss", "ral", "--model", "resnet10t", "--num-samples", "3",
             "--max-epochs", "1", "--image-size", "32", "--batch-size", "32", "--num-workers", "1",
             "--tracking-uri", uri, "--storage-path", str(storage), "--name", "cluster-sweep",
             "--experiment", "sweeps"]  # fmt: skip
    ray_cli = str(Path(sys.executable).with_name("ray"))
    token_env = {**env, "RAY_AUTH_MODE": "token"}
    c = client(uri)

    def runs():
        exp = c.get_experiment_by_name("sweeps")
        return c.search_runs([exp.experiment_id]) if exp else []

    def finished_trials() -> dict:  # trials only: a sweep that got further may also have closed its parent
        return {
            x.info.run_id: x.info.end_time
            for x in runs()
            if x.info.status == "FINISHED" and "ralflow.trial_id" in x.data.tags
        }

    def submit_until_finished(job_id: str, count: int, *extra) -> dict:
        r = run_cli("submit", "--address", address, "--no-wait", "--job-id", job_id, *sweep, *extra, env=env,
                    timeout=300)  # fmt: skip
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and len(finished_trials()) < count:
            time.sleep(2)
        done = {  # each finished trial's end and how many epochs it logged: neither may change later
            run_id: (end_time, len(c.get_metric_history(run_id, "val_mAP")))
            for run_id, end_time in finished_trials().items()
        }
        if len(done) < count:
            logs = subprocess.run([ray_cli, "job", "logs", "--address", address, job_id], env=token_env,
                                  capture_output=True, text=True, timeout=120)  # fmt: skip
            pytest.fail(f"{job_id}: {len(done)} of {count} trials finished in time; its log:\n" + logs.stdout[-4000:])
        return done

    # 1. SIGKILL to the job's driver and its process group (the job runs its entrypoint in a session)
    first = submit_until_finished("sweep-1", 1)
    drivers = processes("workflows.tune .*cluster-sweep")  # the job's shell and its python
    assert drivers
    for pgid in {os.getpgid(pid) for pid in drivers}:
        os.killpg(pgid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and processes("workflows.tune .*cluster-sweep"):
        time.sleep(1)
    # nothing closed the parent run: the resume must take over a run whose driver is gone
    assert [x.info.status for x in runs() if x.data.tags.get("ralflow.sweep_parent") == "true"] == ["RUNNING"]

    # 2. resumed; stopped with `ray job stop` once one more trial has finished
    second = submit_until_finished("sweep-2", len(first) + 1, "--resume")
    for run_id, finished in first.items():  # the trial finished before the kill was not run again
        assert second.get(run_id) == finished, c.get_run(run_id).info
    stop = subprocess.run([ray_cli, "job", "stop", "--address", address, "sweep-2"], env=token_env,
                          capture_output=True, text=True, timeout=180)  # fmt: skip
    assert stop.returncode == 0, stop.stdout[-2000:] + stop.stderr[-2000:]
    time.sleep(5)
    assert [x.info.run_name for x in runs() if x.info.status == "RUNNING"] == []  # everything closed on SIGTERM

    # 3. resumed to the end
    r = run_cli("submit", "--address", address, "--job-id", "sweep-3", *sweep, "--resume", env=env, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    after = runs()
    assert [x.info.run_name for x in after if x.info.status == "RUNNING"] == []
    for run_id, (end_time, epochs) in second.items():  # finished trials were not run again
        assert c.get_run(run_id).info.end_time == end_time
        assert len(c.get_metric_history(run_id, "val_mAP")) == epochs
    (parent,) = [x for x in after if x.data.tags.get("ralflow.sweep_parent") == "true"]
    assert re.search(r"parent run id: (\w+)", r.stdout).group(1) == parent.info.run_id
    assert re.search(r"best trial: \w+ val mAP [\d.]+ run \w+", r.stdout), r.stdout[-3000:]
    children = [x for x in after if x.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    seen = [(x.info.run_name, x.info.status, x.data.tags.get("ralflow.trial_lost")) for x in children]
    # A trial started in the seconds between Tune's last save and a kill is unknown to the resumed
    # sweep, which runs a new one in its place: the lost trial's run is tagged, closed, not counted.
    lost = [x for x in children if x.data.tags.get("ralflow.trial_lost") == "true"]
    trials = [x for x in children if x not in lost]
    assert len(trials) == 3 and len({x.data.tags["ralflow.trial_id"] for x in trials}) == 3, seen  # one run each
    assert len(lost) <= 2 and all(x.info.status in ("KILLED", "FINISHED") for x in lost), seen  # one per kill
    assert all(x.info.run_name in r.stdout for x in lost), r.stdout[-3000:]  # the sweep said which
    assert {x.info.run_id for x in after} == {parent.info.run_id, *(x.info.run_id for x in children)}  # no strays
    assert all(x.info.status == "FINISHED" for x in trials), [(x.info.status, x.data.tags) for x in trials]
    assert parent.info.status == "FINISHED" and parent.data.params["best.trial_id"] in {
        x.data.tags["ralflow.trial_id"] for x in trials
    }
    assert {a.path for a in c.list_artifacts(parent.info.run_id)} == {"search_space.yaml", "trials.csv", "trials.png"}
    best_child = c.get_run(parent.data.params["best.run_id"])
    assert best_child.data.metrics["best_val_mAP"] == pytest.approx(parent.data.metrics["best_val_mAP"], abs=1e-9)
    mlflow.set_tracking_uri(uri)  # the best trial's model is logged, ready for promotion
    assert mlflow.pyfunc.load_model(f"runs:/{best_child.info.run_id}/model") is not None


def test_a_paused_mlflow_server_then_a_lost_worker_node_leave_one_finished_run(local_cluster, tiny_dataset, tmp_path):
    """Two faults in one 4-epoch 2-node training run (the last test here: it takes a node away).
    First the MLflow server stops answering for 30 s: the workers' MLflow calls wait it out.
    Then the worker node's raylet is killed: Ray Train restarts the group on the head, whose one
    CPU the two workers would fill (Ray Data then never runs and the run would wait forever); the
    driver instead continues with fewer CPUs per worker. The run finishes in the same MLflow run,
    with every epoch logged exactly once."""
    state, env, _ = local_cluster
    uri, address, storage = "http://127.0.0.1:5056", "http://127.0.0.1:8291", state / "shared"
    spread = tmp_path / "spread.yaml"
    spread.write_text("train: {placement_strategy: SPREAD, stall_warn_s: 30}\n")
    log = tmp_path / "submit.log"
    proc, run_id, c = train_until_first_epoch(
        env, address, uri, storage, tiny_dataset, "faults", "faults", log, "--config", str(spread)
    )
    server = processes(f"mlflow.*--port {uri.rsplit(':', 1)[1]}") + processes("uvicorn.*mlflow")
    assert server
    for pid in server:
        os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(30)
    finally:
        for pid in server:
            os.kill(pid, signal.SIGCONT)
    assert proc.poll() is None, "the run should still be going: " + log.read_text()[-4000:]
    raylets = [p for p in processes("raylet") if f"{state}/ray-w1" in Path(f"/proc/{p}/cmdline").read_text()]
    assert len(raylets) == 1, raylets
    os.kill(raylets[0], signal.SIGKILL)
    assert proc.wait(timeout=900) == 0, log.read_text()[-6000:]
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED", run.data.tags
    assert "train.cpus_per_worker 0.5 -> 0.25" in run.data.tags["ralflow.rescaled"], log.read_text()[-4000:]
    assert sorted(m.step for m in c.get_metric_history(run_id, "val_mAP")) == [1, 2, 3, 4]  # each epoch once
    assert [r.info.run_id for r in c.search_runs([run.info.experiment_id])] == [run_id]
