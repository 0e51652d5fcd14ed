#!/usr/bin/env bash
# Start the cloudscreen MLflow tracking server, configured by environment variables.
#
# The same script is the container's entrypoint in production and what `make tracking`, the tests and the demo run
# locally (through ops/tracking_server.py). Artifacts are proxied: clients send them to this server, which writes
# them to the object store, so clients need MLFLOW_TRACKING_URI and no storage credentials.
#
# Variables (MLflow's own names: `mlflow server` reads them as well) and their defaults:
#   MLFLOW_BACKEND_STORE_URI      runs, metrics and the model registry
#                                 default sqlite:///<repo>/.local/mlflow.db; production e.g.
#                                 postgresql+psycopg2://USER:PASSWORD@HOST:5432/mlflow (needs psycopg2 installed)
#   MLFLOW_ARTIFACTS_DESTINATION  where proxied artifacts are written; default gs://cloudscreen/mlflow
#   MLFLOW_HOST                   interface to bind; default 127.0.0.1 (0.0.0.0 in a container)
#   MLFLOW_PORT                   default 5000
#   MLFLOW_WORKERS                uvicorn worker processes; default 1 (production: about 2 per core)
#   MLFLOW_SERVER_ENABLE_JOB_EXECUTION
#                                 MLflow's background job runner (about 7 huey processes, used only by GenAI
#                                 features: judges, prompt optimisation, trace rollups); default false
#   MLFLOW_SERVER_ALLOWED_HOSTS   Host headers accepted besides localhost and private IPs, e.g. mlflow.example.com
#                                 (read by MLflow itself; needed behind a DNS name)
#   MLFLOW_DISABLE_TELEMETRY      MLflow's usage telemetry (the server's and its UI's); default true (off); false
#                                 turns it on, unless DO_NOT_TRACK=true or a CI variable is set (MLflow's own rules)
#   STORAGE_EMULATOR_HOST         e.g. http://127.0.0.1:9023: gs:// goes to gcp-storage-emulator, anonymously.
#                                 Unset in production: google-cloud-storage then uses Application Default
#                                 Credentials (Workload Identity on GKE, the VM's service account).
set -euo pipefail

die() {
    echo "mlflow/server.sh: $*" >&2
    exit 2
}

# user:password@ never reaches a log line.
redact() {
    sed -E 's#(://[^/:@]*):[^/@]*@#\1:***@#' <<<"$1"
}

# Exit 0 when something accepts TCP connections on host $1, port $2.
listening() {
    (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null
}

command -v mlflow >/dev/null || die "mlflow is not on PATH; activate the project's environment (.venv/bin) or install mlflow"

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
backend="${MLFLOW_BACKEND_STORE_URI:-sqlite:///${repo}/.local/mlflow.db}"
artifacts="${MLFLOW_ARTIFACTS_DESTINATION:-gs://cloudscreen/mlflow}"
host="${MLFLOW_HOST:-127.0.0.1}"
port="${MLFLOW_PORT:-5000}"
workers="${MLFLOW_WORKERS:-1}"
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
export MLFLOW_DISABLE_TELEMETRY="${MLFLOW_DISABLE_TELEMETRY:-true}"

case "$backend" in
    sqlite:////*)
        # MLflow creates the database file, not always its directory.
        db="${backend#sqlite:///}"
        mkdir -p "$(dirname "$db")" || die "MLFLOW_BACKEND_STORE_URI: cannot create the directory of $db"
        ;;
    sqlite:*)
        die "MLFLOW_BACKEND_STORE_URI=$backend: give an absolute path, sqlite:////ABSOLUTE/PATH/mlflow.db"
        ;;
    postgresql:* | postgresql+*:* | mysql:* | mysql+*:* | mssql:* | mssql+*:*) ;;
    *)
        die "MLFLOW_BACKEND_STORE_URI: unsupported scheme '${backend%%:*}'; expected sqlite:////ABSOLUTE/PATH.db" \
            "or postgresql+psycopg2://USER:PASSWORD@HOST:PORT/DB"
        ;;
esac
[[ -n "$artifacts" ]] || die "MLFLOW_ARTIFACTS_DESTINATION is empty; expected gs://BUCKET/PATH"
if ! [[ "$port" =~ ^[0-9]{1,5}$ ]] || ((10#$port < 1 || 10#$port > 65535)); then
    die "MLFLOW_PORT=$port: expected a port number"
fi
port=$((10#$port))
[[ "$workers" =~ ^[1-9][0-9]*$ ]] || die "MLFLOW_WORKERS=$workers: expected a positive integer"

probe_host="$host"
[[ "$host" == "0.0.0.0" ]] && probe_host=127.0.0.1
# uvicorn reports a taken port in its log but MLflow then exits with status 0: say it here, clearly, and fail.
if listening "$probe_host" "$port"; then
    die "port $port on $host is already in use (another MLflow server?); set MLFLOW_PORT"
fi

store="Google Cloud Storage (Application Default Credentials)"
if [[ -n "${STORAGE_EMULATOR_HOST:-}" ]]; then
    # google-cloud-storage sends every gs:// request there with anonymous credentials; nothing else is needed.
    hostport="${STORAGE_EMULATOR_HOST#*://}"
    hostport="${hostport%%/*}"
    if [[ "$hostport" == *:* ]] && ! listening "${hostport%:*}" "${hostport##*:}"; then
        die "STORAGE_EMULATOR_HOST=$STORAGE_EMULATOR_HOST: nothing listens there; start the emulator" \
            "(python -m ops.tracking_server --with-emulator DIR starts one with the server)"
    fi
    store="the GCS emulator at $STORAGE_EMULATOR_HOST"
fi

client_host="$host"
[[ "$host" == "0.0.0.0" ]] && client_host="$(hostname)"
echo "mlflow/server.sh: MLFLOW_TRACKING_URI=http://${client_host}:${port}" \
    "backend $(redact "$backend"), artifacts $artifacts on $store, $workers worker(s)" >&2

exec mlflow server \
    --backend-store-uri "$backend" \
    --serve-artifacts \
    --artifacts-destination "$artifacts" \
    --host "$host" \
    --port "$port" \
    --workers "$workers"
