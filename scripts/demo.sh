#!/usr/bin/env bash
# The two-stage demo on the embedded digits: train the tokenizer, train the generator (both with
# `accelerate launch`), export the pipeline, sample a grid, score it (FID against the digits).
#   bash scripts/demo.sh [--quick] [RUNS_DIR]
#     --quick: a smoke run of every step in about a minute on a CPU (few steps: not a result)
#     ACCELERATE_ARGS="--multi_gpu --num_processes 2": the launcher's flags, for GPUs
set -euo pipefail
quick=0
if [ "${1:-}" = "--quick" ]; then quick=1; shift; fi
runs=${1:-runs}
launch="accelerate launch ${ACCELERATE_ARGS:---num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no --num_cpu_threads_per_process $(nproc)}"
tokenizer=() diffusion=() images=64 samples=500 sample_steps=()
if [ "$quick" = 1 ]; then
    tokenizer=(train.max_steps=20 train.validation_steps=20 train.image_every=20)
    diffusion=(train.max_steps=20 train.validation_steps=20 train.sample_every=20
        train.sample_steps=5)
    images=16 samples=32 sample_steps=(--steps 5)
fi
$launch scripts/train_tokenizer.py --config configs/tokenizer/digits_demo.yaml \
    --output_dir "$runs/demo_tokenizer" "${tokenizer[@]}"
$launch scripts/train_diffusion.py --config configs/diffusion/digits_uncond.yaml \
    --tokenizer "$runs/demo_tokenizer/tokenizer" --output_dir "$runs/demo_diffusion" "${diffusion[@]}"
python scripts/sample.py --pipeline "$runs/demo_diffusion/pipeline" --num-images "$images" \
    --out "$runs/demo_diffusion/samples" "${sample_steps[@]}"
echo "samples: $runs/demo_diffusion/samples/grid.png; pipeline: $runs/demo_diffusion/pipeline"
# FID of 500 samples against 500 training digits (the full protocol, 1,500 against 1,500, is
# the config's eval section). Exit status 3: no Inception weights on this machine.
status=0
python scripts/eval_fid.py --pipeline "$runs/demo_diffusion/pipeline" --num-samples "$samples" \
    --reference-images "$samples" --out "$runs/demo_diffusion/fid.json" "${sample_steps[@]}" \
    || status=$?
if [ "$status" -eq 3 ]; then
    echo "FID skipped: this machine has no Inception weights (see above for the file and where to put it)."
elif [ "$status" -ne 0 ]; then
    exit "$status"
fi
