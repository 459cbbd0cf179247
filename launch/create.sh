#!/usr/bin/env bash
# Create a Cloud TPU VM slice (directly, or through a queued resource) and wait until it is READY.
#
#   launch/create.sh --project=P --zone=us-central2-b --name=bridle-v4 --accelerator-type=v4-32 [--spot]
#   launch/create.sh ... --accelerator-type=v5p-16 --queued --spot        # wait in the queue for Spot capacity
#   launch/create.sh ... --data-disk=imagenet-ro       # attach an existing persistent disk read-only to all workers
#   launch/create.sh ... --dry-run                                       # print the gcloud commands only

SCRIPT_FLAGS="project zone name accelerator-type runtime-version spot queued best-effort data-disk poll-interval
wait-timeout dry-run"
SCRIPT_SUMMARY="Creates the TPU VM NAME (or the queued resource NAME with node NAME) and polls until it is READY.
Spot and best-effort capacity is cheaper but can be preempted: run watch.sh to recreate it and resume. With
--data-disk the disk is attached read-only to every worker (setup.sh mounts it)."
ACCEPTS_OVERRIDES=0
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

default_runtime_version() {
    case $ACCELERATOR_TYPE in
        v6e-*) echo v2-alpha-tpuv6e ;;
        v5p-*) echo v2-alpha-tpuv5 ;;
        v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
        v2-* | v3-* | v4-*) echo tpu-ubuntu2204-base ;;
        *) return 1 ;;
    esac
}

# wait_for node|queued WANTED: polls the state until WANTED; a failed, suspended or preempted resource is an error.
wait_for() {
    local kind=$1 wanted=$2 state start=$SECONDS
    describe_cmd "$kind"
    if [[ $DRY_RUN == 1 ]]; then
        run "${CMD[@]}"
        return 0
    fi
    while :; do
        state=$(query_state "$kind")
        case $state in
            "$wanted")
                log "$TPU_NAME is $state"
                return 0
                ;;
            FAILED | SUSPENDING | SUSPENDED | PREEMPTED | TERMINATED)
                die "$TPU_NAME is $state; delete it (launch/delete.sh$([[ $QUEUED == 1 ]] && echo ' --queued')) and retry"
                ;;
        esac
        if ((WAIT_TIMEOUT > 0 && SECONDS - start >= WAIT_TIMEOUT)); then
            die "$TPU_NAME still $state after ${WAIT_TIMEOUT}s (--wait-timeout)"
        fi
        log "$TPU_NAME is $state; checking again in ${POLL_INTERVAL}s"
        sleep "$POLL_INTERVAL"
    done
}

parse_flags "$@"
require PROJECT ZONE TPU_NAME ACCELERATOR_TYPE
set_poll_defaults
if [[ -z $RUNTIME_VERSION ]]; then
    RUNTIME_VERSION=$(default_runtime_version) ||
        die "no default --runtime-version (BRIDLE_RUNTIME_VERSION) for accelerator type '$ACCELERATOR_TYPE'; pass one"
fi
[[ $SPOT == 1 && $BEST_EFFORT == 1 ]] && die "--spot and --best-effort exclude each other: pick one"
[[ $BEST_EFFORT == 1 && $QUEUED == 0 ]] && die "--best-effort exists only for queued resources: add --queued"
check_data_flags
tpu_args
disk=()
if [[ $STAGING == disk ]]; then
    # Read-only: the only mode in which one disk can be attached to every worker of a slice (and to a recreated one).
    source=$DATA_DISK
    [[ $source == projects/* ]] || source=projects/$PROJECT/zones/$ZONE/disks/$DATA_DISK
    disk=(--data-disk="source=$source,mode=read-only")
fi

if [[ $QUEUED == 1 ]]; then
    gcloud_cmd=(gcloud)
    [[ $BEST_EFFORT == 1 ]] && gcloud_cmd+=(alpha) # best-effort queued resources are alpha-only
    create=("${gcloud_cmd[@]}" compute tpus queued-resources create "$TPU_NAME" "${TPU_ARGS[@]}" --node-id="$TPU_NAME"
        --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION" ${disk[@]+"${disk[@]}"})
    [[ $SPOT == 1 ]] && create+=(--spot)
    [[ $BEST_EFFORT == 1 ]] && create+=(--best-effort)
    run "${create[@]}"
    wait_for queued ACTIVE # ACTIVE: the queue handed out the capacity and created node NAME
else
    create=(gcloud compute tpus tpu-vm create "$TPU_NAME" "${TPU_ARGS[@]}" --accelerator-type="$ACCELERATOR_TYPE"
        --version="$RUNTIME_VERSION" ${disk[@]+"${disk[@]}"})
    [[ $SPOT == 1 ]] && create+=(--spot)
    run "${create[@]}"
fi
wait_for node READY
