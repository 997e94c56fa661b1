#!/usr/bin/env bash
# The offline demo: sweep the 2,000 real textile images with a tiny, randomly initialised
# open_clip backbone on a local Ray, track in ./mlflow.db, promote the best adapter, classify.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ca-flow sweep --config examples/demo.toml
ca-flow report
ca-flow promote
ca-flow predict --dataset textile \
    "$(python -c 'import conformal_clip_data as d; print(d.local_dir() / "textile_0001.jpg")')"
echo
echo "The runs in the MLflow UI (experiment 'demo', grouped by dataset and method; clip-adapter-textile@champion under"
echo "Models), until Ctrl-C:"
echo "    cd $PWD && . .venv/bin/activate && ca-flow ui"
