#!/usr/bin/env bash
# Copy a run's results from its gs:// workdir to this machine (checkpoints stay in the bucket).
#
#   launch/fetch.sh --workdir=gs://b/runs/in1k [--local-dir=runs/in1k] [--dry-run]
#   launch/fetch.sh ... --logs --project=P --zone=Z --name=bridle-v4      # plus every worker's training log

SCRIPT_FLAGS="workdir local-dir logs project zone name log-dir dry-run"
SCRIPT_SUMMARY="Copies metrics.jsonl, linear_probe.json, config.json and encoders/ from WORKDIR into LOCAL_DIR with
gcloud storage cp -r --continue-on-error (files a run has not written yet are reported and skipped); with --logs also
scp's LOG_DIR from all workers into LOCAL_DIR/<log dir>/ (one train_<hostname>.log per worker)."
ACCEPTS_OVERRIDES=0
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_flags "$@"
require WORKDIR
require_gs_workdir
LOCAL_DIR=${LOCAL_DIR:-runs/${WORKDIR##*/}}
sources=()
for item in $FETCH_ITEMS; do
    sources+=("$WORKDIR/$item")
done
if [[ $FETCH_LOGS == 1 ]]; then
    require PROJECT ZONE TPU_NAME
    set_remote_defaults
    tpu_args
fi

run mkdir -p "$LOCAL_DIR"
run gcloud storage cp -r --continue-on-error "${sources[@]}" "$LOCAL_DIR"
if [[ $FETCH_LOGS == 1 ]]; then
    run gcloud compute tpus tpu-vm scp --recurse "$TPU_NAME:$LOG_DIR" "$LOCAL_DIR" "${TPU_ARGS[@]}" --worker=all
fi
