#!/usr/bin/env bash
# A real multi-node Ray cluster and a real MLflow tracking server on this machine, for
# development and the cluster tests:
#
#   cluster/local.sh up       # head + $RALFLOW_WORKER_NODES worker nodes + mlflow server
#   cluster/local.sh status
#   cluster/local.sh down     # stops exactly the processes `up` started (recorded by PID)
#
# Settings (environment variables, defaults in brackets):
#   RALFLOW_CLUSTER_DIR   state, logs, shared storage, MLflow store  [a new folder from mktemp,
#                         remembered in ~/.ralflow/local-cluster-dir for status and down]
#   RALFLOW_RAY_PORT      head GCS port (Ray Client server: this + 1) [6390]
#   RALFLOW_DASHBOARD_PORT  dashboard / Jobs API port                [8290]
#   RALFLOW_WORKER_NODES  worker nodes joining the head              [1]
#   RALFLOW_HEAD_CPUS / RALFLOW_WORKER_CPUS   CPUs per node          [1 / 1]
#   RALFLOW_OBJECT_STORE_MB   object store per node (MiB)            [512]
#   RALFLOW_MLFLOW_PORT   MLflow server port (0 = no server)         [5055]
#   RALFLOW_PYTHON        python with ralflow installed              [the repo's .venv, else python3]
#
# Each node's dashboard agent gets its own port (DASHBOARD_PORT+10+i): two Ray nodes, or another
# Ray instance, on one machine would otherwise fight over the default 52365 and the Jobs API
# answers "No available agent to submit job".
# Ray token authentication stays on: `up` makes sure ~/.ray/auth_token exists (mode 0600); worker
# nodes and `ralflow submit` join with RAY_AUTH_MODE=token.
#
# What is exposed: the dashboard / Jobs API and MLflow listen on 127.0.0.1 only, and the nodes
# advertise 127.0.0.1. Ray itself has no setting to bind its other servers to one address: the GCS
# (RALFLOW_RAY_PORT), each raylet and object manager, the dashboard agents and the Ray Client
# server listen on every interface of this machine. Every Ray endpoint requires the auth token, but
# on a shared or reachable machine firewall those ports (`up` lists them) or use a container.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
POINTER="$HOME/.ralflow/local-cluster-dir"   # where the default (mktemp) folder of the last `up` is
if [ -n "${RALFLOW_CLUSTER_DIR:-}" ]; then DIR=$RALFLOW_CLUSTER_DIR
elif [ "${1:-}" = up ] && ! [ -s "$POINTER" ]; then
    mkdir -p -m 700 "$(dirname "$POINTER")"
    DIR=$(mktemp -d /tmp/ralflow-cluster.XXXXXX)
    echo "$DIR" > "$POINTER"
elif [ -s "$POINTER" ]; then DIR=$(cat "$POINTER")
else DIR=""; fi
RAY_PORT=${RALFLOW_RAY_PORT:-6390}
DASH_PORT=${RALFLOW_DASHBOARD_PORT:-8290}
WORKERS=${RALFLOW_WORKER_NODES:-1}
HEAD_CPUS=${RALFLOW_HEAD_CPUS:-1}
WORKER_CPUS=${RALFLOW_WORKER_CPUS:-1}
OBJ_MB=${RALFLOW_OBJECT_STORE_MB:-512}
MLFLOW_PORT=${RALFLOW_MLFLOW_PORT:-5055}
if [ -n "${RALFLOW_PYTHON:-}" ]; then PY=$RALFLOW_PYTHON
elif [ -x "$here/.venv/bin/python" ]; then PY=$here/.venv/bin/python
else PY=$(command -v python3); fi
BIN=$(dirname "$PY")
export PATH="$BIN:$PATH"   # jobs' `python` is this python on every node
# Inherited by every process of this cluster: Ray Train's placement-group cleaner finds its
# cluster through it (with several Ray instances on one machine it cannot guess).
export RAY_ADDRESS="http://127.0.0.1:$DASH_PORT"
# Jobs without --tracking-uri report to this cluster's MLflow server, as on KubeRay (whose pods
# set it), not to a SQLite file in a job's temporary working directory.
if [ "$MLFLOW_PORT" != 0 ]; then export MLFLOW_TRACKING_URI="http://127.0.0.1:$MLFLOW_PORT"; fi
RAY="$BIN/ray"
TMP="$DIR/ray"             # Ray's temp dir (worker nodes: $TMP-wN): marks every process of this cluster
# Each node needs its own temp dir even on one machine: nodes sharing one would unpack the same
# runtime-env package over each other, deleting a running job's working directory.
obj_bytes=$((OBJ_MB * 1024 * 1024))
CLIENT_PORT=$((RAY_PORT + 1))
PIDS="$DIR/pids"           # "PID<tab>command line" of every process `up` started

say() { echo "[local.sh] $*" >&2; }

write_env() {
    cat > "$DIR/cluster.env" <<ENV
RAY_GCS_ADDRESS=127.0.0.1:$RAY_PORT
RAY_ADDRESS=http://127.0.0.1:$DASH_PORT
MLFLOW_TRACKING_URI=$( [ "$MLFLOW_PORT" != 0 ] && echo "http://127.0.0.1:$MLFLOW_PORT" )
RALFLOW_SHARED_STORAGE=$DIR/shared
RAY_AUTH_MODE=token
ENV
}

up() {
    if [ -f "$DIR/cluster.env" ] && RAY_AUTH_MODE=token "$RAY" status --address "127.0.0.1:$RAY_PORT" >/dev/null 2>&1; then
        say "already up (cluster/local.sh down first)"; cat "$DIR/cluster.env"; return 0
    fi
    mkdir -p "$DIR/shared" "$DIR/logs" "$TMP"
    : > "$PIDS"
    UP_STARTED=$(awk '{print $22}' /proc/$$/stat)  # this shell's start, in the same clock ticks
    for i in $(seq 1 "$WORKERS"); do mkdir -p "$TMP-w$i"; done
    # `ray start --head` turns token auth on only when a token already exists (else it starts
    # unauthenticated and the worker nodes, joining with RAY_AUTH_MODE=token, are refused):
    # make sure there is one (kept if present: ~/.ray/auth_token, RAY_AUTH_TOKEN[_PATH]).
    RAY_AUTH_MODE=token "$RAY" get-auth-token --generate >/dev/null
    chmod 600 "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}" 2>/dev/null || true  # a secret: owner only
    say "starting Ray head on 127.0.0.1:$RAY_PORT ($HEAD_CPUS CPU, dashboard 127.0.0.1:$DASH_PORT, token auth)"
    # --system-config: keep idle task workers 60 s (default 1 s), or every epoch's Ray Data tasks
    # start fresh Python processes while training waits (see components/runtime.py SYSTEM_CONFIG).
    RAY_AUTH_MODE=token "$RAY" start --head --node-ip-address=127.0.0.1 --port="$RAY_PORT" --num-cpus="$HEAD_CPUS" \
        --ray-client-server-port="$CLIENT_PORT" \
        --system-config='{"idle_worker_killing_time_threshold_ms": 60000}' \
        --object-store-memory="$obj_bytes" --dashboard-host=127.0.0.1 --dashboard-port="$DASH_PORT" \
        --dashboard-agent-listen-port="$((DASH_PORT + 10))" \
        --temp-dir="$TMP" --disable-usage-stats > "$DIR/logs/head.log" 2>&1 || { cat "$DIR/logs/head.log" >&2; exit 1; }
    for i in $(seq 1 "$WORKERS"); do
        say "starting Ray worker node $i ($WORKER_CPUS CPU)"
        RAY_AUTH_MODE=token "$RAY" start --address="127.0.0.1:$RAY_PORT" --node-ip-address=127.0.0.1 \
            --num-cpus="$WORKER_CPUS" --object-store-memory="$obj_bytes" --temp-dir="$TMP-w$i" \
            --dashboard-agent-listen-port="$((DASH_PORT + 10 + i))" \
            > "$DIR/logs/worker-$i.log" 2>&1 || { cat "$DIR/logs/worker-$i.log" >&2; exit 1; }
    done
    if [ "$MLFLOW_PORT" != 0 ]; then
        say "starting MLflow server on 127.0.0.1:$MLFLOW_PORT (SQLite backend, proxied local artifacts)"
        nohup "$BIN/mlflow" server --host 127.0.0.1 --port "$MLFLOW_PORT" \
            --backend-store-uri "sqlite:///$DIR/mlflow.db" --artifacts-destination "$DIR/mlartifacts" \
            --serve-artifacts --workers 1 > "$DIR/logs/mlflow.log" 2>&1 &
        mlflow_pid=$!
        record "$mlflow_pid"
        for _ in $(seq 1 120); do
            curl -sf "http://127.0.0.1:$MLFLOW_PORT/health" >/dev/null 2>&1 && break
            kill -0 "$mlflow_pid" 2>/dev/null || { cat "$DIR/logs/mlflow.log" >&2; exit 1; }
            sleep 0.5
        done
        curl -sf "http://127.0.0.1:$MLFLOW_PORT/health" >/dev/null || { say "MLflow did not become healthy"; exit 1; }
    fi
    # The Ray daemons carry this cluster's session folders on their command line.
    for pid in $(pgrep -f -- "$TMP(-w[0-9]+)?/session_" || true) $(client_server); do
        record "$pid"
    done
    write_env
    say "listening on every interface (token auth, see the top of this script): $(exposed_ports)"
    status
}

cmdline() { { tr '\0' ' ' < "/proc/$1/cmdline"; } 2>/dev/null; }

# The Ray Client server names this cluster by its GCS port (on the machine's address), not by
# its folder, and may start after `up` has returned.
client_server() { pgrep -f -- "ray.util.client.server --address=[^ ]*:$RAY_PORT " || true; }

record() {  # remember a process this `up` started (none older than `up`), with its command line, once
    local pid=$1 cmd started
    started=$(awk '{print $22}' "/proc/$pid/stat" 2>/dev/null) || return 0  # clock ticks after boot
    [ -n "$started" ] && [ "$started" -ge "$UP_STARTED" ] || return 0
    cmd=$(cmdline "$pid") || return 0
    [ -n "$cmd" ] || return 0
    grep -q "^$pid	" "$PIDS" 2>/dev/null || printf '%s\t%s\n' "$pid" "$cmd" >> "$PIDS"
}

exposed_ports() {  # TCP ports the recorded processes listen on outside the loopback address
    local pids
    pids=$(cut -f1 "$PIDS" 2>/dev/null | paste -sd'|')
    [ -n "$pids" ] || return 0
    ss -ltnpH 2>/dev/null | grep -E "pid=($pids)," | awk '{print $4}' | grep -v '^127\.' | grep -v '^\[::1\]' \
        | sed 's/.*://' | sort -un | paste -sd' ' || true
}

status() {
    [ -n "$DIR" ] && [ -f "$DIR/cluster.env" ] || { say "not up"; return 1; }
    cat "$DIR/cluster.env"
    if [ -f "$HOME/.ray/auth_token" ]; then echo "RAY_AUTH_TOKEN_FILE=$HOME/.ray/auth_token"; fi
    RAY_AUTH_MODE=token "$RAY" status --address "127.0.0.1:$RAY_PORT" 2>/dev/null | sed -n '/Node status/,/Pending/p' || true
}

tree_pids() {  # the given pids and all their descendants
    local p
    for p in "$@"; do
        echo "$p"
        tree_pids $(pgrep -P "$p" || true)
    done
}

alive() { local p; for p in "$@"; do kill -0 "$p" 2>/dev/null && return 0; done; return 1; }

recorded_alive() {  # recorded PIDs whose process still has the recorded command line
    local pid cmd
    [ -f "$PIDS" ] || return 0
    while IFS=$'\t' read -r pid cmd; do
        [ "$(cmdline "$pid")" = "$cmd" ] && echo "$pid"
    done < "$PIDS"
}

down() {
    [ -n "$DIR" ] && [ -d "$DIR" ] || { say "no cluster recorded (set RALFLOW_CLUSTER_DIR to its folder)"; return 0; }
    # Exactly what `up` started (a PID is trusted only while its command line is the recorded one),
    # with the processes those started since (workers, agents: they rename themselves, so take
    # whole trees). Look again after each round: a daemon can start a process after the list was
    # taken, and that one would outlive `down`.
    for _round in 1 2 3; do
        pids=$(tree_pids $(recorded_alive) $(client_server))
        [ -n "$pids" ] || break
        say "stopping $(echo $pids | wc -w) processes of the cluster in $DIR"
        kill -TERM $pids 2>/dev/null || true
        for _ in $(seq 1 20); do alive $pids || break; sleep 0.5; done
        kill -KILL $pids 2>/dev/null || true
        for _ in $(seq 1 10); do alive $pids || break; sleep 0.2; done
    done
    rm -f "$DIR/cluster.env" "$PIDS"
    if [ -z "${RALFLOW_CLUSTER_DIR:-}" ] && [ "$(cat "$POINTER" 2>/dev/null)" = "$DIR" ]; then rm -f "$POINTER"; fi
    say "down"
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    *) echo "usage: $0 up|down|status   (settings: see the comment at the top)" >&2; exit 2 ;;
esac
