#!/usr/bin/env bash
# Install bridle_jax on every worker of a TPU VM slice: Python venv, jax[tpu], the code at a ref, `pip install -e`.
#
#   launch/setup.sh --project=P --zone=Z --name=bridle-v4                                  # copy this checkout's HEAD
#   launch/setup.sh ... --repo=https://github.com/you/bridle_jax.git --ref=v0.1.0           # clone on the workers
#   launch/setup.sh ... --data-bucket=gs://b/tfds          # also mount the data read-only at /mnt/data (gcsfuse)
#   launch/setup.sh ... --data-disk=imagenet-ro             # or mount the disk create.sh --data-disk attached
#   launch/setup.sh ... --dry-run
#
# Safe to re-run (e.g. to move the workers to another ref): the venv is reused, the code replaced, and a data mount
# already in place is kept. watch.sh re-runs it on every recreated VM, which is what redoes the mount there.

SCRIPT_FLAGS="project zone name repo ref remote-dir venv python extras data-bucket data-disk data-mount data-cache-mb
dry-run"
SCRIPT_SUMMARY="Runs one shell command on all workers (gcloud ... ssh --worker=all): apt-installs PYTHON if absent,
creates the venv, gets the code (git clone+fetch of REF for a URL; for a local checkout, git archive of REF copied
with scp), then pip install -U -e '.[EXTRAS]' with the libtpu find-links page. Local copies take committed files only.
Optional data staging, first and on every worker: --data-bucket mounts gs://bucket[/prefix] read-only with gcsfuse
(apt-installed from Google's repository if missing), --data-disk mounts the disk create.sh attached read-only; both
at DATA_MOUNT (default /mnt/data), left alone when something is mounted there already. Then train with
--config.data.data_dir=DATA_MOUNT."
ACCEPTS_OVERRIDES=0
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_flags "$@"
require PROJECT ZONE TPU_NAME
REPO=${REPO:-$REPO_ROOT}
REF=${REF:-HEAD}
PYTHON=${PYTHON:-python3.11}
EXTRAS=${EXTRAS:-tpu}
set_remote_defaults
[[ $PYTHON =~ ^python3(\.[0-9]+)?$ ]] || die "--python (BRIDLE_PYTHON) must be an apt-installable name like python3.11, got '$PYTHON'"
[[ $EXTRAS =~ ^[A-Za-z0-9_,-]+$ ]] || die "--extras (BRIDLE_EXTRAS) must be a comma-separated list of extras, got '$EXTRAS'"
[[ $REF =~ ^[A-Za-z0-9_./@^~-]+$ ]] || die "--ref (BRIDLE_REF) '$REF' is not a branch, tag or commit name"
check_data_flags
tpu_args
apt="sudo apt-get -o DPkg::Lock::Timeout=600" # fresh VMs run unattended-upgrades at boot, holding the dpkg lock

# staging_command: the worker-side shell command that mounts the data at DATA_MOUNT, or does nothing if something is
# mounted there already (a re-run on a live VM must not pull the data from under a running training).
staging_command() {
    local m=$DATA_MOUNT mount repo key hint
    if [[ $STAGING == bucket ]]; then
        # Read-only, and the metadata of a data set that does not change cached for the life of the mount: listing and
        # opening many small files (ArrayRecord shards, audio/video clips) is what gcsfuse is slowest at.
        mount="gcsfuse -o ro --implicit-dirs --metadata-cache-ttl-secs=-1 --stat-cache-max-size-mb=-1"
        mount="$mount --type-cache-max-size-mb=-1"
        [[ -z $DATA_PREFIX ]] || mount="$mount --only-dir=$(shell_quote "$DATA_PREFIX")"
        if ((DATA_CACHE_MB > 0)); then
            mount="$mount --cache-dir=\"\$HOME\"/gcsfuse_cache --file-cache-max-size-mb=$DATA_CACHE_MB"
            mount="$mount --file-cache-cache-file-for-range-read"
        fi
        mount="$mount $(shell_quote "$DATA_BUCKET_NAME") $m"
        # Google's instructions for Ubuntu: their apt repository for this release, signed by their key.
        repo="https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -c -s) main"
        key=/usr/share/keyrings/cloud.google.asc
        printf '%s' "set -e; if mountpoint -q $m; then echo \"$m on \$(hostname): already mounted, kept\"; else"
        printf '%s' " if ! command -v gcsfuse >/dev/null 2>&1; then"
        printf '%s' " curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee $key >/dev/null;"
        printf '%s' " echo \"deb [signed-by=$key] $repo\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null;"
        printf '%s' " $apt update -qq; $apt install -y -qq gcsfuse; fi;"
        printf '%s' " sudo mkdir -p $m; sudo chown \"\$(id -u):\$(id -g)\" $m; $mount; fi"
    else
        # The data disk is the one whole disk with nothing mounted on it or its partitions (the boot disk holds /),
        # or its first partition if it has any; ext4 needs noload (no journal replay) and xfs norecovery to mount a
        # read-only device.
        hint="was the TPU created with create.sh --data-disk? (an existing TPU: gcloud alpha compute tpus tpu-vm"
        hint="$hint attach-disk $TPU_NAME --disk=$DATA_DISK --mode=read-only --zone=$ZONE --project=$PROJECT)"
        printf '%s' "set -e; if mountpoint -q $m; then echo \"$m on \$(hostname): already mounted, kept\"; else"
        printf '%s' " dev=; n=0; for d in \$(lsblk -dn -o NAME,TYPE | awk '\$2 == \"disk\" {print \$1}'); do"
        printf '%s' " if [ -z \"\$(lsblk -n -o MOUNTPOINT /dev/\$d | tr -d '[:space:]')\" ]; then"
        printf '%s' " dev=/dev/\$d; n=\$((n + 1)); fi; done;"
        printf '%s' " if [ \$n -ne 1 ]; then echo \"\$(hostname): expected one unmounted data disk, found \$n:\""
        printf '%s' " $(shell_quote "$hint") >&2; lsblk >&2; exit 1; fi;"
        printf '%s' " part=\$(lsblk -ln -o NAME,TYPE \$dev | awk '\$2 == \"part\" {print \$1}' | head -n 1);"
        printf '%s' " if [ -n \"\$part\" ]; then dev=/dev/\$part; fi;"
        printf '%s' " case \$(sudo blkid -o value -s TYPE \$dev) in ext*) opts=ro,noload ;; xfs) opts=ro,norecovery ;;"
        printf '%s' " *) opts=ro ;; esac; sudo mkdir -p $m; sudo mount -o \$opts \$dev $m; fi"
    fi
    printf '%s' "; echo \"data ready on \$(hostname): --config.data.data_dir=$m\""
}

if [[ -n $STAGING ]]; then
    ssh_cmd "$(staging_command)"
    run "${CMD[@]}"
    log "the data appears at $DATA_MOUNT on every worker: train with --config.data.data_dir=$DATA_MOUNT"
fi

q_ref=$(shell_quote "$REF")
if [[ -d $REPO ]]; then
    # A local checkout: ship `git archive REF` (reproducible: exactly that commit, no venvs or caches).
    git -C "$REPO" rev-parse --git-dir >/dev/null 2>&1 || die "--repo (BRIDLE_REPO) '$REPO' is not a git checkout"
    git -C "$REPO" rev-parse --verify --quiet "$REF^{commit}" >/dev/null ||
        die "--ref (BRIDLE_REF) '$REF' is not a commit of $REPO"
    if [[ $REF == HEAD && -n $(git -C "$REPO" status --porcelain --untracked-files=no) ]]; then
        log "warning: $REPO has uncommitted changes; only the committed HEAD is copied"
    fi
    tarball=${TMPDIR:-/tmp}/bridle_jax-src-$TPU_NAME.tar.gz
    remote_tarball=bridle_jax-src.tar.gz
    run git -C "$REPO" archive --format=tar.gz --output="$tarball" "$REF"
    run gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:$remote_tarball" "${TPU_ARGS[@]}" --worker=all
    get_code="rm -rf $R_DIR; mkdir -p $R_DIR; tar -xzf $remote_tarball -C $R_DIR; rm -f $remote_tarball"
else
    [[ $REPO == *://* || $REPO == *@*:* ]] ||
        die "--repo (BRIDLE_REPO) '$REPO' is neither a local directory nor a git URL"
    q_url=$(shell_quote "$REPO")
    get_code="if [ ! -d $R_DIR/.git ]; then rm -rf $R_DIR; git clone --quiet $q_url $R_DIR; fi"
    get_code="$get_code; git -C $R_DIR remote set-url origin $q_url; git -C $R_DIR fetch --quiet origin $q_ref"
    get_code="$get_code; git -C $R_DIR checkout --quiet --detach FETCH_HEAD"
fi

pip="$R_VENV/bin/python -m pip"
remote="set -e"
remote="$remote; if ! $PYTHON -c 'import ensurepip, venv' >/dev/null 2>&1; then"
remote="$remote $apt update -qq && $apt install -y -qq $PYTHON $PYTHON-venv; fi"
remote="$remote; $get_code"
remote="$remote; $PYTHON -m venv $R_VENV"
remote="$remote; $pip install -q -U pip"
remote="$remote; cd $R_DIR"
remote="$remote; $pip install -U -e '.[$EXTRAS]' -f $JAX_TPU_FIND_LINKS"
remote="$remote; $R_VENV/bin/python -c 'import bridle_jax, jax; print(\"bridle_jax ready, jax\", jax.__version__)'"
ssh_cmd "$remote"
run "${CMD[@]}"
if [[ -d $REPO ]]; then
    run rm -f "$tarball"
fi
