#!/usr/bin/env bash
# Start `python -m bridle_jax.main --config=... --workdir=gs://...` on every worker of the slice at once.
#
#   launch/train.sh --project=P --zone=Z --name=bridle-v4 --config=configs/imagenet.py --workdir=gs://b/runs/in1k \
#       --config.data.data_dir=gs://b/tfds                    # extra --config.key=value overrides pass through
#   launch/train.sh ... --foreground                          # stay attached, output of all workers streamed here
#   launch/train.sh ... --dry-run
#
# Re-running the same command resumes from the newest checkpoint in the workdir, which is why the workdir must be a
# gs:// URL every worker (and every re-created VM) sees.

SCRIPT_FLAGS="project zone name config workdir remote-dir venv log-dir foreground dry-run"
SCRIPT_SUMMARY="Runs bridle_jax.main on all workers (gcloud ... ssh --worker=all). By default each worker starts it
with nohup and appends to LOG_DIR/train_<hostname>.log, and the command returns at once; a worker where training
already runs refuses to start a second copy. --config.key=value arguments (and anything after --) go to main."
ACCEPTS_OVERRIDES=1
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_flags "$@"
require PROJECT ZONE TPU_NAME CONFIG WORKDIR
set_remote_defaults
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
guard="if pgrep -f '$TRAIN_PATTERN' >/dev/null; then"
guard="$guard echo \"bridle_jax.main is already running on \$(hostname); not starting another\" >&2; exit 1; fi"
if [[ $FOREGROUND == 1 ]]; then
    remote="set -e; $guard; cd $R_DIR; $main"
else
    log_file="$R_LOGS/train_\"\$(hostname)\".log"
    remote="set -e; $guard; mkdir -p $R_LOGS; cd $R_DIR"
    remote="$remote; nohup setsid $main >>$log_file 2>&1 </dev/null &"
    remote="$remote echo \"started on \$(hostname) (pid \$!), log: $log_file\""
fi
ssh_cmd "$remote"
run "${CMD[@]}"
if [[ $FOREGROUND == 0 && $DRY_RUN == 0 ]]; then
    log "follow worker 0: gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --project=$PROJECT --worker=0" \
        "--command='tail -f $LOG_DIR/train_*.log'"
fi
