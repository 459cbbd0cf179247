#!/usr/bin/env bash
# Delete the TPU VM (or its queued resource, node included) without a confirmation prompt.
#
#   launch/delete.sh --project=P --zone=Z --name=bridle-v4 [--queued] [--dry-run]
#
# The workdir in the bucket is untouched: checkpoints, metrics and encoders outlive the VM.

SCRIPT_FLAGS="project zone name queued dry-run"
SCRIPT_SUMMARY="Deletes TPU VM NAME (gcloud compute tpus tpu-vm delete --quiet), or with --queued the queued resource
NAME and its node (gcloud compute tpus queued-resources delete --force --quiet). A TPU bills until it is deleted."
ACCEPTS_OVERRIDES=0
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_flags "$@"
require PROJECT ZONE TPU_NAME
tpu_args
if [[ $QUEUED == 1 ]]; then
    run gcloud compute tpus queued-resources delete "$TPU_NAME" "${TPU_ARGS[@]}" --force --quiet
else
    run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${TPU_ARGS[@]}" --quiet
fi
