#!/usr/bin/env bash
# Start `python -m bridle_jax.main --config=... --workdir=gs://...` on every worker of the slice at once.
#
#   launch/train.sh --project=P --zone=Z --name=bridle-v4 --config=configs/imagenet.py --workdir=gs://b/runs/in1k \
#       --config.data.data_dir=gs://b/tfds                    # extra --config.key=value overrides pass through
#   launch/train.sh ... --foreground                          # stay attached, output of all workers streamed here
#   launch/train.sh ... --dry-run
#
# Re-running the same command resumes from the newest checkpoint in the workdir, which is why the workdir must be a
# gs:// URL every worker (and every re-created VM) sees. The workers' logs go there too (WORKDIR/logs/), since a
# recreated VM starts from a blank boot disk.

SCRIPT_FLAGS="project zone name config workdir remote-dir venv log-dir log-upload-interval foreground dry-run"
SCRIPT_SUMMARY="Runs bridle_jax.main on all workers (gcloud ... ssh --worker=all). By default each worker starts it
with nohup and the command returns at once; a worker where training already runs refuses to start a second copy.
Worker i writes its output to LOG_DIR/worker-<i>-<UTC time>.log and copies that file to
WORKDIR/logs/worker-<i>-<UTC time>.log every LOG_UPLOAD_INTERVAL seconds, when it is sent SIGTERM (a preemption) and
when training exits (gcloud storage cp); with a local WORKDIR it writes there directly. --foreground streams the same
lines here. --config.key=value arguments (and anything after --) go to main."
ACCEPTS_OVERRIDES=1
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# log_wrapper: the worker-side program, one line of shell, that runs `bash -c "$(log_wrapper)" bridle-train LOG DEST
# INTERVAL FOLLOW COMMAND...`. COMMAND appends its output to LOG. When DEST differs from LOG (a gs:// URL), DEST gets a
# copy of LOG every INTERVAL seconds, on SIGTERM/SIGHUP/SIGINT (which the wrapper does not die of: it goes on waiting
# for COMMAND, which may be saving a checkpoint) and after COMMAND exits, once a last line giving its exit status is
# appended. The periodic copier is stopped between two copies (never during one) before that last copy, which is
# therefore the one that stays. FOLLOW=1 also streams the new lines to stdout. Exits with COMMAND's status.
# shellcheck disable=SC2016 # everything here is for the worker's shell to expand
log_wrapper() {
    local w
    w='log=$1 dest=$2 every=$3 follow=$4; shift 4; up=; tailer=; warned='
    w+='; upload() { if [ "$dest" != "$log" ]; then if command -v gcloud >/dev/null 2>&1; then'
    w+=' gcloud storage cp --quiet "$log" "$dest"; else gsutil -q cp "$log" "$dest"; fi >/dev/null 2>&1 </dev/null'
    w+=' || if [ -z "$warned" ]; then warned=1; echo "[launch/train.sh] $(date -u +%FT%TZ) $(hostname):'
    w+=' could not copy this log to $dest (will retry)" >>"$log"; fi; fi; }'
    w+='; : >>"$log"; skip=$(($(wc -c <"$log") + 1))'
    w+='; "$@" >>"$log" 2>&1 </dev/null & pid=$!'
    w+='; if [ "$follow" = 1 ]; then tail -c "+$skip" -f --pid="$pid" "$log" & tailer=$!; fi'
    w+='; if [ "$dest" != "$log" ]; then (trap '"'"'kill $! 2>/dev/null; exit 0'"'"' TERM; while :; do'
    w+=' sleep "$every" & wait $!; upload; done) >/dev/null 2>&1 </dev/null & up=$!; fi'
    w+='; trap upload TERM HUP INT'
    w+='; while :; do wait "$pid"; rc=$?; if ! kill -0 "$pid" 2>/dev/null; then break; fi; done'
    w+='; if [ -n "$tailer" ]; then wait "$tailer"; fi'
    w+='; if [ -n "$up" ]; then kill "$up" 2>/dev/null; while kill -0 "$up" 2>/dev/null; do wait "$up"; done; fi'
    w+='; echo "[launch/train.sh] $(date -u +%FT%TZ) $(hostname): training exited with status $rc" >>"$log"'
    w+='; upload; exit "$rc"'
    printf '%s' "$w"
}

# worker_id: sets the worker's $w: the TPU VM metadata's agent-worker-number, else the <i> of a TPU VM hostname's
# -w-<i> ending, else the hostname.
# shellcheck disable=SC2016 # for the worker's shell to expand
worker_id() {
    local url=http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number
    printf '%s' "w=\$(curl -sf -m 5 -H Metadata-Flavor:Google $url 2>/dev/null) || w="
    printf '%s' '; case $w in "" | *[!0-9]*) w=$(hostname); case $w in w-[0-9]* | *-w-[0-9]*) w=${w##*w-} ;; esac ;; esac'
}

parse_flags "$@"
require PROJECT ZONE TPU_NAME CONFIG WORKDIR
set_remote_defaults
LOG_UPLOAD_INTERVAL=${LOG_UPLOAD_INTERVAL:-60}
[[ $LOG_UPLOAD_INTERVAL =~ ^[1-9][0-9]*$ ]] ||
    die "--log-upload-interval (BRIDLE_LOG_UPLOAD_INTERVAL) must be a whole number of seconds >= 1, got '$LOG_UPLOAD_INTERVAL'"
case $WORKDIR in
    gs://?*) WORKDIR=${WORKDIR%/} ;;
    /*) log "warning: --workdir '$WORKDIR' is a local path: every worker must see the same directory (NFS mount)" ;;
    *) die "--workdir (BRIDLE_WORKDIR) must be gs://bucket/path (or an absolute shared mount), got '$WORKDIR'" ;;
esac
tpu_args

main="$R_VENV/bin/python -m bridle_jax.main $(quote_cmd "--config=$CONFIG" "--workdir=$WORKDIR")"
if ((${#PASSTHROUGH[@]} > 0)); then
    main="$main $(quote_cmd "${PASSTHROUGH[@]}")"
fi
# One time stamp for all workers of this start, so that worker-*-<stamp>.log are the logs of one attempt.
stamp=$(date -u +%Y%m%d-%H%M%S)
log_name="worker-\"\$w\"-$stamp.log"
logs=$(shell_quote "$WORKDIR/logs")
guard="if pgrep -f '$TRAIN_PATTERN' >/dev/null; then"
guard="$guard echo \"bridle_jax.main is already running on \$(hostname); not starting another\" >&2; exit 1; fi"
remote="set -e; $guard; $(worker_id)"
if [[ $WORKDIR == gs://* ]]; then # written on the worker's disk, copied to the bucket
    remote="$remote; mkdir -p $R_LOGS; log=$R_LOGS/$log_name; dest=$logs/$log_name"
    where="log: \$log, copied to \$dest every ${LOG_UPLOAD_INTERVAL}s"
else # a shared filesystem: written there directly
    remote="$remote; mkdir -p $logs; log=$logs/$log_name; dest=\$log"
    where="log: \$log"
fi
remote="$remote; cd $R_DIR"
wrapped="bash -c $(shell_quote "$(log_wrapper)") bridle-train \"\$log\" \"\$dest\" $LOG_UPLOAD_INTERVAL $FOREGROUND $main"
if [[ $FOREGROUND == 1 ]]; then
    remote="$remote; $wrapped"
else
    remote="$remote; nohup setsid $wrapped >/dev/null 2>&1 </dev/null &"
    remote="$remote echo \"started on \$(hostname) (worker \$w, pid \$!), $where\""
fi
ssh_cmd "$remote"
run "${CMD[@]}"
if [[ $FOREGROUND == 0 && $DRY_RUN == 0 ]]; then
    log "follow worker 0: gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --project=$PROJECT --worker=0" \
        "--command='tail -f $LOG_DIR/worker-*-$stamp.log' (or: gcloud storage cat '$WORKDIR/logs/worker-0-$stamp.log')"
fi
