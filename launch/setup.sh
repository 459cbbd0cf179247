#!/usr/bin/env bash
# Install bridle_jax on every worker of a TPU VM slice: Python venv, jax[tpu], the code at a ref, `pip install -e`.
#
#   launch/setup.sh --project=P --zone=Z --name=bridle-v4                                  # copy this checkout's HEAD
#   launch/setup.sh ... --repo=https://github.com/you/bridle_jax.git --ref=v0.1.0           # clone on the workers
#   launch/setup.sh ... --dry-run
#
# Safe to re-run (e.g. to move the workers to another ref): the venv is reused and the code replaced.

SCRIPT_FLAGS="project zone name repo ref remote-dir venv python extras dry-run"
SCRIPT_SUMMARY="Runs one shell command on all workers (gcloud ... ssh --worker=all): apt-installs PYTHON if absent,
creates the venv, gets the code (git clone+fetch of REF for a URL; for a local checkout, git archive of REF copied
with scp), then pip install -U -e '.[EXTRAS]' with the libtpu find-links page. Local copies take committed files only."
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
tpu_args

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

apt="sudo apt-get -o DPkg::Lock::Timeout=600" # fresh VMs run unattended-upgrades at boot, holding the dpkg lock
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
