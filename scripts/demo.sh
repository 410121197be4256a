#!/usr/bin/env bash
# The two-stage demo on the embedded digits: train the tokenizer, train the generator (both with
# `accelerate launch`), export the pipeline, sample a grid, score it (FID against the digits).
#   bash scripts/demo.sh [RUNS_DIR]      (ACCELERATE_ARGS="--multi_gpu --num_processes 2" for GPUs)
set -euo pipefail
runs=${1:-runs}
launch="accelerate launch ${ACCELERATE_ARGS:---num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no --num_cpu_threads_per_process $(nproc)}"
$launch scripts/train_tokenizer.py --config configs/tokenizer/digits_demo.yaml --output_dir "$runs/demo_tokenizer"
$launch scripts/train_diffusion.py --config configs/diffusion/digits_uncond.yaml \
    --tokenizer "$runs/demo_tokenizer/tokenizer" --output_dir "$runs/demo_diffusion"
python scripts/sample.py --pipeline "$runs/demo_diffusion/pipeline" --num-images 64 \
    --out "$runs/demo_diffusion/samples"
echo "samples: $runs/demo_diffusion/samples/grid.png; pipeline: $runs/demo_diffusion/pipeline"
# FID of 500 samples against 500 training digits (the full protocol, 1,500 against 1,500, is
# the config's eval section). Exit status 3: no Inception weights on this machine.
status=0
python scripts/eval_fid.py --pipeline "$runs/demo_diffusion/pipeline" --num-samples 500 \
    --reference-images 500 --out "$runs/demo_diffusion/fid.json" || status=$?
if [ "$status" -eq 3 ]; then
    echo "FID skipped: this machine has no Inception weights (see above for the file and where to put it)."
elif [ "$status" -ne 0 ]; then
    exit "$status"
fi
