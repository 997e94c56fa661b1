#!/usr/bin/env bash
# Start an MLflow tracking server for ca-flow (SQLite + local artifacts by default).
#
#   mlflow/serve.sh [extra `mlflow server` options...]
#
# Environment overrides:
#   STORE_DIR              base dir for the default store   (default: ~/.cache/ca-flow/mlflow)
#   BACKEND_STORE_URI      backend store                     (default: sqlite:////$STORE_DIR/mlflow.db)
#   ARTIFACTS_DESTINATION  where proxied artifacts go        (default: $STORE_DIR/mlartifacts; s3://, gs://, ... allowed)
#   HOST                   bind address                      (default: 127.0.0.1)
#   PORT                   port                              (default: 5000)
#   WORKERS                uvicorn worker processes          (default: mlflow's, 4)
#   ALLOWED_HOSTS          Host headers accepted; only used when HOST is not loopback
#                          (default: localhost, this host's names, private IP ranges)
#   INIT_DB                auto | always | never             (default: auto)
#                          auto: run `mlflow db upgrade` only for a SQLite file that does not exist yet.
#                          always: run it every start (use once for a fresh Postgres/MySQL database).
#   MLFLOW_BIN             mlflow executable                 (default: mlflow on PATH)
#   MLFLOW_SERVER_ENABLE_JOB_EXECUTION  MLflow's GenAI job runner (default here: false)
set -euo pipefail

# The job runner serves MLflow's GenAI jobs, which ca-flow never submits; on, it starts six more
# processes that each load MLflow (about 20 CPU-seconds at every start).
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}

MLFLOW_BIN=${MLFLOW_BIN:-mlflow}
STORE_DIR=${STORE_DIR:-$HOME/.cache/ca-flow/mlflow}
HOST=${HOST:-127.0.0.1}
PORT=${PORT:-5000}
INIT_DB=${INIT_DB:-auto}

abspath() {  # absolute path without requiring it to exist
  case "$1" in
    /*) printf '%s\n' "$1" ;;
    *) printf '%s/%s\n' "$PWD" "$1" ;;
  esac
}

STORE_DIR=$(abspath "$STORE_DIR")
BACKEND_STORE_URI=${BACKEND_STORE_URI:-sqlite:///$STORE_DIR/mlflow.db}
ARTIFACTS_DESTINATION=${ARTIFACTS_DESTINATION:-$STORE_DIR/mlartifacts}

# A relative sqlite path (sqlite:///rel.db) would depend on the cwd: make it absolute.
sqlite_file=""
case "$BACKEND_STORE_URI" in
  sqlite:///*)
    sqlite_file=$(abspath "${BACKEND_STORE_URI#sqlite:///}")
    BACKEND_STORE_URI="sqlite:///$sqlite_file"
    mkdir -p "$(dirname "$sqlite_file")"
    ;;
esac

# A local artifacts destination (no URI scheme) is made absolute.
case "$ARTIFACTS_DESTINATION" in
  *://*) ;;
  *)
    ARTIFACTS_DESTINATION=$(abspath "$ARTIFACTS_DESTINATION")
    mkdir -p "$ARTIFACTS_DESTINATION"
    ;;
esac

# Initialise the schema once, before the server's worker processes start: several processes
# creating a fresh SQLite store at the same time fail (migration race).
case "$INIT_DB" in
  always) "$MLFLOW_BIN" db upgrade "$BACKEND_STORE_URI" ;;
  auto)
    if [[ -n "$sqlite_file" && ! -s "$sqlite_file" ]]; then
      "$MLFLOW_BIN" db upgrade "$BACKEND_STORE_URI"
    fi
    ;;
  never) ;;
  *) echo "serve.sh: INIT_DB must be auto, always or never (got '$INIT_DB')" >&2; exit 2 ;;
esac

args=(
  --backend-store-uri "$BACKEND_STORE_URI"
  --serve-artifacts
  --artifacts-destination "$ARTIFACTS_DESTINATION"
  --host "$HOST"
  --port "$PORT"
)
if [[ -n "${WORKERS:-}" ]]; then args+=(--workers "$WORKERS"); fi

case "$HOST" in
  127.0.0.1|localhost|::1) ;;
  *)
    # Binding beyond loopback: requests carry a Host header such as "mlflow.example:5000".
    # mlflow's default accepts only localhost and private IPs; --allowed-hosts replaces that
    # list, so the default below keeps those and adds this machine's names.
    if [[ -z "${ALLOWED_HOSTS:-}" ]]; then
      hosts="localhost,localhost:*,127.0.0.1,127.0.0.1:*,10.*,192.168.*"
      for i in $(seq 16 31); do hosts+=",172.$i.*"; done
      for h in $(hostname 2>/dev/null) $(hostname -f 2>/dev/null); do
        case ",$hosts," in *",$h,"*) ;; *) hosts+=",$h,$h:*" ;; esac
      done
      ALLOWED_HOSTS=$hosts
    fi
    args+=(--allowed-hosts "$ALLOWED_HOSTS")
    ;;
esac

echo "serve.sh: backend=$BACKEND_STORE_URI artifacts=$ARTIFACTS_DESTINATION on http://$HOST:$PORT" >&2
exec "$MLFLOW_BIN" server "${args[@]}" "$@"
