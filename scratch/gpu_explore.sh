#!/bin/bash
# exploration on the device machine (not committed)
set -e
pip install --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD/src
python -c "import matplotlib, scipy" 2>&1 || true
nvidia-smi --query-gpu=name --format=csv,noheader
NAME=$1; shift
python -m robustface.cli experiment configs/experiment_noise.yaml --quiet \
  --set output_dir=/tmp/$NAME --set base.train.device=cuda --set base.data.num_workers=6 "$@" \
  > /tmp/$NAME.log 2>&1 || true
tail -60 /tmp/$NAME.log
mkdir -p $OUT/$NAME
cp /tmp/$NAME/results.md /tmp/$NAME/summary.csv /tmp/$NAME/results.csv /tmp/$NAME/experiment.png $OUT/$NAME/ 2>/dev/null || true
for d in /tmp/$NAME/runs/*/*/s0; do
  m=$(echo $d | cut -d/ -f5); n=$(echo $d | cut -d/ -f6)
  mkdir -p $OUT/$NAME/$m-$n; cp $d/analysis/summary.json $OUT/$NAME/$m-$n/ 2>/dev/null || true
done
