#!/usr/bin/env bash
# Copy a run's results from its gs:// workdir to this machine (checkpoints stay in the bucket).
#
#   launch/fetch.sh --workdir=gs://b/runs/in1k [--local-dir=runs/in1k] [--dry-run]
#   launch/fetch.sh ... --logs                                # plus every worker's log (WORKDIR/logs/)

SCRIPT_FLAGS="workdir local-dir logs dry-run"
SCRIPT_SUMMARY="Copies metrics.jsonl, linear_probe.json, config.json and encoders/ from WORKDIR into LOCAL_DIR with
gcloud storage cp -r --continue-on-error (files a run has not written yet are reported and skipped); with --logs also
WORKDIR/logs/ into LOCAL_DIR/logs/ (worker-<i>-<UTC time>.log: one per worker and start of train.sh, which copies
them there; the TPU need not exist any more)."
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
    sources+=("$WORKDIR/logs")
fi

run mkdir -p "$LOCAL_DIR"
run gcloud storage cp -r --continue-on-error "${sources[@]}" "$LOCAL_DIR"
