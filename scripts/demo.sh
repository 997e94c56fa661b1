#!/usr/bin/env bash
# The offline demo: sweep the 2,000 real textile images with a tiny, randomly initialised
# open_clip backbone on a local Ray, track in ./mlflow.db, promote the best adapter.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ca-flow sweep --datasets textile --backbone ca-flow-tiny --pretrained random \
    --shots 1,2,4,8 --seeds 1,2 --alphas 0.2,0.6 --experiment demo
ca-flow promote --experiment demo
ca-flow predict --dataset textile \
    "$(python -c 'import conformal_clip_data as d; print(d.local_dir() / "textile_0001.jpg")')"
echo
echo "Browse the runs:  cd $PWD && . .venv/bin/activate && mlflow ui --port 5000"
echo "then open http://127.0.0.1:5000 (experiment 'demo'; model clip-adapter-textile@champion)."
