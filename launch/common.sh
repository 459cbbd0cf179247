# shellcheck shell=bash disable=SC2034 # the globals set here are read by the scripts that source this file
# Shared by the launch scripts (sourced, never run): flags with environment-variable defaults, shell quoting, the
# `run` wrapper that prints (--dry-run) or executes, and the gcloud pieces several scripts need.
#
# Every parameter comes from a flag or from BRIDLE_<NAME> in the environment (the flag wins), so a shell profile can
# hold a slice's coordinates while one-off choices go on the command line. Kept to bash 3.2 features (no associative
# arrays, no ${x,,}, guarded empty-array expansions) because macOS still ships that bash.

set -euo pipefail

SCRIPT_NAME=$(basename "$0")
LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(dirname "$LAUNCH_DIR")
# The libtpu wheels are also on PyPI now; the find-links page keeps older jax/libtpu pairs installable.
JAX_TPU_FIND_LINKS=https://storage.googleapis.com/jax-releases/libtpu_releases.html
# Written by train at the end of the whole plan; watch.sh stops when it exists.
DONE_MARKER_NAME=DONE
# The workdir files fetch.sh copies back (checkpoints stay in the bucket: they are large and only needed to resume).
FETCH_ITEMS="metrics.jsonl linear_probe.json config.json encoders"

ALL_FLAGS="project zone name accelerator-type runtime-version spot queued best-effort poll-interval wait-timeout
repo ref remote-dir venv python extras data-bucket data-disk data-mount data-cache-mb config workdir log-dir
log-upload-interval foreground local-dir logs max-restarts restart-crashed delete-when-done dry-run"

# flag_spec NAME: sets _VAR (the shell variable; its environment variable is BRIDLE_$_VAR), _BOOL and _HELP.
flag_spec() {
    _BOOL=0
    case $1 in
        project) _VAR=PROJECT _HELP="Google Cloud project (falls back to CLOUDSDK_CORE_PROJECT)" ;;
        zone) _VAR=ZONE _HELP="zone of the slice, e.g. us-central2-b (falls back to CLOUDSDK_COMPUTE_ZONE)" ;;
        name) _VAR=TPU_NAME _HELP="TPU VM name (also the queued-resource id)" ;;
        accelerator-type) _VAR=ACCELERATOR_TYPE _HELP="e.g. v4-8, v5p-16, v5litepod-8, v6e-8" ;;
        runtime-version) _VAR=RUNTIME_VERSION _HELP="TPU software version; default from the accelerator family" ;;
        spot) _VAR=SPOT _BOOL=1 _HELP="Spot capacity: cheaper, preemptible at any time" ;;
        queued) _VAR=QUEUED _BOOL=1 _HELP="go through a queued resource (waits in the queue for capacity)" ;;
        best-effort) _VAR=BEST_EFFORT _BOOL=1 _HELP="best-effort queued resource (gcloud alpha; needs --queued)" ;;
        poll-interval) _VAR=POLL_INTERVAL _HELP="seconds between state checks (default 60)" ;;
        wait-timeout) _VAR=WAIT_TIMEOUT _HELP="give up waiting for READY after this many seconds (default 0: never)" ;;
        repo) _VAR=REPO _HELP="git URL to clone on the workers, or a local git checkout to copy (default: this one)" ;;
        ref) _VAR=REF _HELP="branch, tag or commit to install (default HEAD)" ;;
        remote-dir) _VAR=REMOTE_DIR _HELP="code directory on the workers, relative to \$HOME (default bridle_jax)" ;;
        venv) _VAR=VENV _HELP="virtualenv on the workers, relative to \$HOME (default bridle_venv)" ;;
        python) _VAR=PYTHON _HELP="interpreter for the venv, apt-installed if missing (default python3.11)" ;;
        extras) _VAR=EXTRAS _HELP="pip extras of the package (default tpu)" ;;
        data-bucket) _VAR=DATA_BUCKET _HELP="stage data: gcsfuse-mount gs://bucket[/prefix] read-only on every worker" ;;
        data-disk) _VAR=DATA_DISK _HELP="stage data: attach this persistent disk read-only to all workers and mount it" ;;
        data-mount) _VAR=DATA_MOUNT _HELP="where the staged data appears on the workers (default /mnt/data)" ;;
        data-cache-mb) _VAR=DATA_CACHE_MB _HELP="gcsfuse file cache on the boot disk, in MiB (default 0: none)" ;;
        config) _VAR=CONFIG _HELP="config file relative to the repo, e.g. configs/imagenet.py" ;;
        workdir) _VAR=WORKDIR _HELP="run directory every worker sees: gs://bucket/path" ;;
        log-dir) _VAR=LOG_DIR _HELP="local log directory on each worker, relative to \$HOME (default bridle_logs)" ;;
        log-upload-interval) _VAR=LOG_UPLOAD_INTERVAL _HELP="seconds between copies of the logs to WORKDIR/logs (default 60)" ;;
        foreground) _VAR=FOREGROUND _BOOL=1 _HELP="stay attached and stream the output (the log is kept all the same)" ;;
        local-dir) _VAR=LOCAL_DIR _HELP="where results go (default runs/<last part of the workdir>)" ;;
        logs) _VAR=FETCH_LOGS _BOOL=1 _HELP="also copy the workers' logs (WORKDIR/logs/, kept there by train.sh)" ;;
        max-restarts) _VAR=MAX_RESTARTS _HELP="give up after this many recoveries (default 20)" ;;
        restart-crashed) _VAR=RESTART_CRASHED _BOOL=1 _HELP="also restart training when the VM is up but it died" ;;
        delete-when-done) _VAR=DELETE_WHEN_DONE _BOOL=1 _HELP="delete the TPU once the DONE marker appears" ;;
        dry-run) _VAR=DRY_RUN _BOOL=1 _HELP="print the commands, one per line, shell-quoted; run nothing" ;;
        *) return 1 ;;
    esac
}

die() {
    echo "$SCRIPT_NAME: error: $*" >&2
    exit 2
}

log() {
    echo "[$SCRIPT_NAME $(date +%H:%M:%S)] $*" >&2
}

is_true() {
    case ${1:-} in
        1 | true | True | TRUE | yes | on) return 0 ;;
        *) return 1 ;;
    esac
}

# Every variable starts from its BRIDLE_* environment variable.
for _flag in $ALL_FLAGS; do
    flag_spec "$_flag"
    _env=BRIDLE_$_VAR
    printf -v "$_VAR" '%s' "${!_env:-}"
done
PROJECT=${PROJECT:-${CLOUDSDK_CORE_PROJECT:-}}
ZONE=${ZONE:-${CLOUDSDK_COMPUTE_ZONE:-}}
PASSTHROUGH=()
SCRIPT_FLAGS=${SCRIPT_FLAGS:-}
ACCEPTS_OVERRIDES=${ACCEPTS_OVERRIDES:-0}

print_usage() {
    local flag arg
    printf 'Usage: %s [flags]%s\n\n%s\n\nFlags (each can instead be set as the environment variable in brackets):\n' \
        "$SCRIPT_NAME" "$([[ $ACCEPTS_OVERRIDES == 1 ]] && echo ' [--config.key=value ...] [-- extra args]')" \
        "$SCRIPT_SUMMARY"
    for flag in $SCRIPT_FLAGS; do
        flag_spec "$flag"
        arg=" X"
        [[ $_BOOL == 1 ]] && arg=""
        printf '  --%-22s %s [BRIDLE_%s]\n' "$flag$arg" "$_HELP" "$_VAR"
    done
    printf '  --%-22s %s\n' "help" "this text"
}

# parse_flags "$@": --name value, --name=value, boolean --name; --config.key=value and everything after `--` are
# kept in PASSTHROUGH for bridle_jax.main when the script takes them (ACCEPTS_OVERRIDES=1).
parse_flags() {
    local arg name value has_value
    while (($# > 0)); do
        arg=$1
        shift
        case $arg in
            -h | --help)
                print_usage
                exit 0
                ;;
            --)
                [[ $ACCEPTS_OVERRIDES == 1 ]] || die "'--': $SCRIPT_NAME passes nothing on to bridle_jax.main"
                PASSTHROUGH+=("$@")
                break
                ;;
            --config.*)
                [[ $ACCEPTS_OVERRIDES == 1 ]] || die "$arg: $SCRIPT_NAME takes no --config.* overrides (train.sh does)"
                [[ $arg == *=* ]] || die "$arg: write config overrides as one argument, --config.key=value"
                PASSTHROUGH+=("$arg")
                continue
                ;;
            --*=*)
                name=${arg%%=*}
                value=${arg#*=}
                has_value=1
                ;;
            --*)
                name=$arg
                value=
                has_value=0
                ;;
            *) die "unexpected argument '$arg' (flags are --name value or --name=value; see $SCRIPT_NAME --help)" ;;
        esac
        name=${name#--}
        if [[ " $(echo "$SCRIPT_FLAGS" | tr '\n' ' ') " != *" $name "* ]] || ! flag_spec "$name"; then
            die "unknown flag --$name (see $SCRIPT_NAME --help)"
        fi
        if [[ $_BOOL == 1 ]]; then
            [[ $has_value == 0 ]] || die "--$name is a switch and takes no value"
            value=1
        elif [[ $has_value == 0 ]]; then
            # A missing value must not swallow the next flag (think `--zone --dry-run`); --name=--x still works.
            (($# > 0)) && [[ $1 != --* ]] || die "--$name needs a value"
            value=$1
            shift
        fi
        printf -v "$_VAR" '%s' "$value"
    done
    for name in $ALL_FLAGS; do # switches from the environment: 1/true/yes/on or 0/false/no/off/empty
        flag_spec "$name"
        [[ $_BOOL == 1 ]] || continue
        case ${!_VAR} in
            1 | true | True | TRUE | yes | on) printf -v "$_VAR" 1 ;;
            "" | 0 | false | False | FALSE | no | off) printf -v "$_VAR" 0 ;;
            *) die "BRIDLE_$_VAR='${!_VAR}': expected 1/true/yes/on or 0/false/no/off" ;;
        esac
    done
}

flag_of_var() {
    local flag
    for flag in $ALL_FLAGS; do
        flag_spec "$flag"
        if [[ $_VAR == "$1" ]]; then
            echo "--$flag"
            return 0
        fi
    done
    echo "$1"
}

# require VAR...: fails naming every missing parameter at once, with its flag and environment variable.
require() {
    local var missing=""
    for var in "$@"; do
        [[ -n ${!var:-} ]] || missing="$missing, $(flag_of_var "$var") (or BRIDLE_$var)"
    done
    [[ -z $missing ]] || die "missing required parameter(s): ${missing#, }"
}

require_uint() {
    local var=$1
    [[ ${!var} =~ ^[0-9]+$ ]] || die "$(flag_of_var "$var") (BRIDLE_$var) must be a whole number of seconds/times, got '${!var}'"
}

require_gs_workdir() {
    [[ $WORKDIR == gs://?* ]] || die "--workdir (BRIDLE_WORKDIR) must be a gs://bucket/path URL, got '$WORKDIR'"
    WORKDIR=${WORKDIR%/}
}

# check_data_flags: validates the optional data staging (--data-bucket or --data-disk, --data-mount, --data-cache-mb)
# and sets STAGING (bucket, disk or empty), DATA_MOUNT (default /mnt/data), DATA_BUCKET_NAME and DATA_PREFIX. Every
# script that reads these parameters calls it, so a bad combination stops whichever script sees it first.
check_data_flags() {
    local bucket_re='^gs://[a-z0-9][a-z0-9._-]{1,220}[a-z0-9](/[^[:cntrl:]]*)?$'
    local disk_re='^(projects/[^/]+/(zones|regions)/[^/]+/disks/)?[a-z]([-a-z0-9]{0,61}[a-z0-9])?$'
    local mount_re='^/[A-Za-z0-9_./-]+$' rest
    STAGING=""
    if [[ -n $DATA_BUCKET && -n $DATA_DISK ]]; then
        die "--data-bucket (BRIDLE_DATA_BUCKET) and --data-disk (BRIDLE_DATA_DISK) exclude each other: stage from one"
    elif [[ -n $DATA_BUCKET ]]; then
        [[ $DATA_BUCKET =~ $bucket_re ]] ||
            die "--data-bucket (BRIDLE_DATA_BUCKET) must be gs://bucket or gs://bucket/prefix, got '$DATA_BUCKET'"
        STAGING=bucket
        rest=${DATA_BUCKET#gs://}
        DATA_BUCKET_NAME=${rest%%/*}
        DATA_PREFIX=""
        [[ $rest != */* ]] || DATA_PREFIX=${rest#*/}
        while [[ $DATA_PREFIX == */ ]]; do DATA_PREFIX=${DATA_PREFIX%/}; done
    elif [[ -n $DATA_DISK ]]; then
        [[ $DATA_DISK =~ $disk_re ]] || die "--data-disk (BRIDLE_DATA_DISK) must be a disk name (lowercase letters," \
            "digits, -) or projects/P/zones/Z/disks/NAME, got '$DATA_DISK'"
        STAGING=disk
    fi
    DATA_CACHE_MB=${DATA_CACHE_MB:-0}
    [[ $DATA_CACHE_MB =~ ^[0-9]+$ ]] ||
        die "--data-cache-mb (BRIDLE_DATA_CACHE_MB) must be a whole number of MiB, got '$DATA_CACHE_MB'"
    if [[ $STAGING != bucket && $DATA_CACHE_MB != 0 ]]; then
        die "--data-cache-mb (BRIDLE_DATA_CACHE_MB) caches a gcsfuse mount: it needs --data-bucket"
    fi
    if [[ -z $STAGING ]]; then
        [[ -z $DATA_MOUNT ]] || die "--data-mount (BRIDLE_DATA_MOUNT) needs --data-bucket or --data-disk: what to mount"
        return 0
    fi
    DATA_MOUNT=${DATA_MOUNT:-/mnt/data}
    [[ $DATA_MOUNT == / ]] || DATA_MOUNT=${DATA_MOUNT%/}
    if ! [[ $DATA_MOUNT =~ $mount_re ]] || [[ "$DATA_MOUNT/" == */../* || "$DATA_MOUNT/" == */./* ]]; then
        die "--data-mount (BRIDLE_DATA_MOUNT) must be an absolute path of letters, digits and _ . / -, got '$DATA_MOUNT'"
    fi
    case $DATA_MOUNT in
        / | /bin | /boot | /dev | /etc | /home | /lib | /opt | /proc | /root | /run | /sys | /tmp | /usr | /var | /mnt)
            die "--data-mount (BRIDLE_DATA_MOUNT) must not hide a system directory, got '$DATA_MOUNT' (try /mnt/data)"
            ;;
    esac
}

# shell_quote WORD: the word as POSIX shell source; identical to Python's shlex.quote so tests can compare exactly.
shell_quote() {
    local LC_ALL=C
    if [[ -z $1 ]]; then
        printf "''"
    elif [[ $1 =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
        printf '%s' "$1"
    else
        printf "'%s'" "${1//\'/\'\"\'\"\'}"
    fi
}

quote_cmd() {
    local word sep=""
    for word in "$@"; do
        printf '%s' "$sep"
        shell_quote "$word"
        sep=" "
    done
}

# run CMD...: in a dry run print it (stdout, one line); otherwise log it to stderr and execute it.
run() {
    if [[ $DRY_RUN == 1 ]]; then
        quote_cmd "$@"
        echo
        return 0
    fi
    log "+ $(quote_cmd "$@")"
    "$@"
}

# remote_path PATH: a worker path as shell source, relative to the remote $HOME unless absolute. Restricted to
# characters that need no quoting, since the same paths also go through scp and nohup redirections.
remote_path() {
    local path=$1 flag=$2
    [[ $path =~ ^[A-Za-z0-9_./-]+$ ]] || die "$flag: '$path' may use only letters, digits and _ . / -"
    [[ "/$path/" != */../* && $path != "." && $path != "/" && $path != "./" ]] ||
        die "$flag: '$path' must name a directory of its own"
    if [[ $path == /* ]]; then
        printf '%s' "$path"
    else
        # shellcheck disable=SC2016 # $HOME is for the worker's shell to expand
        printf '"$HOME"/%s' "${path#./}"
    fi
}

set_remote_defaults() {
    REMOTE_DIR=${REMOTE_DIR:-bridle_jax}
    VENV=${VENV:-bridle_venv}
    LOG_DIR=${LOG_DIR:-bridle_logs}
    R_DIR=$(remote_path "$REMOTE_DIR" --remote-dir)
    R_VENV=$(remote_path "$VENV" --venv)
    R_LOGS=$(remote_path "$LOG_DIR" --log-dir)
}

set_poll_defaults() {
    POLL_INTERVAL=${POLL_INTERVAL:-60}
    WAIT_TIMEOUT=${WAIT_TIMEOUT:-0}
    require_uint POLL_INTERVAL
    require_uint WAIT_TIMEOUT
}

# The --zone/--project pair every gcloud tpus call gets (set once the parameters are checked).
tpu_args() {
    TPU_ARGS=(--zone="$ZONE" --project="$PROJECT")
}

# ssh_cmd REMOTE_COMMAND [WORKER]: the command line that runs a shell command on every worker (or on one).
ssh_cmd() {
    CMD=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${TPU_ARGS[@]}" --worker="${2:-all}" --command="$1")
}

# describe_cmd node|queued: the state query (one word on stdout) of the TPU VM or of its queued resource.
describe_cmd() {
    if [[ $1 == queued ]]; then
        CMD=(gcloud compute tpus queued-resources describe "$TPU_NAME" "${TPU_ARGS[@]}" "--format=value(state.state)")
    else
        CMD=(gcloud compute tpus tpu-vm describe "$TPU_NAME" "${TPU_ARGS[@]}" "--format=value(state)")
    fi
}

# query_state node|queued: prints the state, MISSING when gcloud reports NOT_FOUND, UNKNOWN on any other failure
# (a network blip must not look like a deleted TPU).
query_state() {
    local out err_file
    describe_cmd "$1"
    err_file=$(mktemp)
    if out=$("${CMD[@]}" 2>"$err_file"); then
        out=$(echo "$out" | tr -d '[:space:]')
        echo "${out:-UNKNOWN}"
    elif grep -qiE 'NOT_FOUND|not found' "$err_file"; then
        echo MISSING
    else
        log "state query failed: $(tail -n 1 "$err_file")"
        echo UNKNOWN
    fi
    rm -f "$err_file"
}

# Training is recognised by its command line, anchored at the start: the `bash -c '...'` that ssh runs also contains
# "bridle_jax.main" (and this pattern), and must not count as a running training process.
TRAIN_PATTERN='^[^ ]*python[^ ]* -m bridle_jax[.]main'
