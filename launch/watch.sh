#!/usr/bin/env bash
# Keep a (Spot / queued) run alive until it finishes: recreate the TPU after a preemption and resume training.
#
#   launch/watch.sh --project=P --zone=Z --name=bridle-v5p --accelerator-type=v5p-16 --queued --spot \
#       --config=configs/imagenet.py --workdir=gs://b/runs/in1k [--config.key=value ...] [--delete-when-done]
#
# Run it from a machine that stays up (a small VM, inside tmux). Resuming needs nothing special: train.sh re-runs
# the same command and bridle_jax.main continues from the newest checkpoint in the gs:// workdir.

SCRIPT_FLAGS="project zone name accelerator-type runtime-version spot queued best-effort poll-interval wait-timeout
repo ref remote-dir venv python extras data-bucket data-disk data-mount data-cache-mb config workdir log-dir
log-upload-interval max-restarts restart-crashed delete-when-done dry-run"
SCRIPT_SUMMARY="Every POLL_INTERVAL seconds: stop when WORKDIR/DONE exists (the marker train writes after the last phase
of the plan; checked with gcloud storage ls); otherwise read the TPU VM state (with --queued, the queued resource's).
PREEMPTED/TERMINATED (queued: SUSPENDED/FAILED) -> delete.sh, create.sh, setup.sh, train.sh; missing -> the same
without delete.sh; READY after a recovery failed half-way -> setup.sh, train.sh. Other states (CREATING,
WAITING_FOR_RESOURCES, ...) are waited out. With --restart-crashed a READY VM whose worker 0 runs no bridle_jax.main
gets train.sh again. Failed recoveries are retried next round; MAX_RESTARTS bounds them. Data staging
(--data-bucket/--data-disk) goes to create.sh and setup.sh, so every recreated VM mounts the data again. --dry-run
prints the checks of one round and one full recovery."
ACCEPTS_OVERRIDES=1
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_flags "$@"
require PROJECT ZONE TPU_NAME ACCELERATOR_TYPE CONFIG WORKDIR
require_gs_workdir
set_poll_defaults
MAX_RESTARTS=${MAX_RESTARTS:-20}
require_uint MAX_RESTARTS
set_remote_defaults
check_data_flags
tpu_args
marker=$WORKDIR/$DONE_MARKER_NAME
kind=node
[[ $QUEUED == 1 ]] && kind=queued

# The child scripts take every parameter from the environment, so they see exactly what this one resolved.
for flag in $ALL_FLAGS; do
    flag_spec "$flag"
    export "BRIDLE_$_VAR=${!_VAR}"
done
export BRIDLE_FOREGROUND=0 # a foreground train.sh would block this loop

step() { # step SCRIPT [ARGS]: run a sibling script, reporting (not dying on) its failure
    if "$LAUNCH_DIR/$1" "${@:2}"; then
        return 0
    fi
    log "$1 failed"
    return 1
}

train() {
    step train.sh -- ${PASSTHROUGH[@]+"${PASSTHROUGH[@]}"}
}

marker_cmd() {
    CMD=(gcloud storage ls "$marker")
}

training_check_cmd() {
    ssh_cmd "if pgrep -f '$TRAIN_PATTERN' >/dev/null; then echo RUNNING; else echo STOPPED; fi" 0
}

# recover STATE: delete what is left of a preempted slice, create it, set it up and start training again. From
# READY/ACTIVE (a recovery that failed half-way, e.g. in setup) only the last two steps remain.
recover() {
    case $1 in
        READY | ACTIVE) ;;
        MISSING) step create.sh || return 1 ;;
        *) step delete.sh && step create.sh || return 1 ;;
    esac
    step setup.sh && train
}

if [[ $DRY_RUN == 1 ]]; then
    log "dry run: the checks of one round, then the recovery a preemption triggers"
    marker_cmd
    run "${CMD[@]}"
    describe_cmd "$kind"
    run "${CMD[@]}"
    if [[ $RESTART_CRASHED == 1 ]]; then
        training_check_cmd
        run "${CMD[@]}"
    fi
    recover PREEMPTED
    if [[ $DELETE_WHEN_DONE == 1 ]]; then
        step delete.sh
    fi
    exit 0
fi

restarts=0
unfinished=0 # 1 while a recovery has failed: a READY slice then still needs setup and training
log "watching $TPU_NAME ($kind) until $marker exists; checking every ${POLL_INTERVAL}s"
while :; do
    marker_cmd
    if "${CMD[@]}" >/dev/null 2>&1; then
        log "found $marker: the run is complete"
        if [[ $DELETE_WHEN_DONE == 1 ]]; then
            step delete.sh || die "could not delete $TPU_NAME: delete it by hand, it bills until deleted"
        fi
        exit 0
    fi
    state=$(query_state "$kind")
    action=""
    case $kind:$state in
        node:PREEMPTED | node:TERMINATED | queued:SUSPENDED | queued:FAILED | *:MISSING) action=recover ;;
        node:READY | queued:ACTIVE)
            if [[ $unfinished == 1 ]]; then
                action=recover
            elif [[ $RESTART_CRASHED == 1 ]]; then
                training_check_cmd
                if [[ $("${CMD[@]}" 2>/dev/null | tail -n 1) == STOPPED ]]; then
                    action=restart
                fi
            fi
            ;;
        *) log "$TPU_NAME is $state; waiting" ;;
    esac
    if [[ -n $action ]]; then
        if ((restarts >= MAX_RESTARTS)); then
            die "$TPU_NAME needs a $action (state $state) but --max-restarts=$MAX_RESTARTS is used up"
        fi
        restarts=$((restarts + 1))
        log "$TPU_NAME is $state: $action $restarts of at most $MAX_RESTARTS"
        if [[ $action == recover ]]; then
            unfinished=1
            if recover "$state"; then
                unfinished=0
            else
                log "recovery failed; trying again in ${POLL_INTERVAL}s"
            fi
        else
            train || log "restart failed; trying again in ${POLL_INTERVAL}s"
        fi
    fi
    sleep "$POLL_INTERVAL"
done
