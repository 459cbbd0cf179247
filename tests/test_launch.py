"""launch/*.sh: dry runs print the exact gcloud commands, bad input fails naming the flag, the loops recover.

Nothing here reaches Google Cloud: every script runs with a stub `gcloud` first on PATH. For dry runs the stub fails
and records the call, so a dry run that executed anything is caught; the watch/create loops run against a stub that
plays a slice's states (preempted -> deleted -> created -> READY). The remote shell commands that ssh would run on
the workers are executed here with a stub venv python, so the quoting of workdirs and overrides is checked end to
end through both shell levels (local command line, then the worker's `bash -c`); the same goes for the data staging
commands (stub sudo/lsblk/gcsfuse) and the log wrapper (a stub gcloud that "uploads" to a local folder).
"""

import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

LAUNCH = Path(__file__).resolve().parents[1] / "launch"
SCRIPTS = ["create.sh", "setup.sh", "train.sh", "watch.sh", "fetch.sh", "delete.sh"]
BASE = ["--project=my-proj", "--zone=us-central2-b", "--name=bridle-v4"]
LOC = ["--zone=us-central2-b", "--project=my-proj"]
URL = "https://github.com/someone/bridle_jax.git"
FIND_LINKS = "https://storage.googleapis.com/jax-releases/libtpu_releases.html"


def tpu(*words: str) -> list[str]:
    return ["gcloud", "compute", "tpus", *words]


def line(words: list[str]) -> str:
    return shlex.join(words)


def describe(queued: bool = False) -> str:
    if queued:
        return line(tpu("queued-resources", "describe", "bridle-v4", *LOC, "--format=value(state.state)"))
    return line(tpu("tpu-vm", "describe", "bridle-v4", *LOC, "--format=value(state)"))


FAILING_GCLOUD = """#!/usr/bin/env bash
printf '%s\\n' "$*" >> "$STUB_DIR/calls"
exit 99
"""

# Plays one slice. Node and queued-resource states live in files; the DONE marker appears once training starts.
STATEFUL_GCLOUD = """#!/usr/bin/env bash
d=$STUB_DIR
printf '%s\\n' "$*" >> "$d/calls"
missing() { echo "ERROR: (gcloud) NOT_FOUND: Resource 'bridle-v4' was not found" >&2; exit 1; }
case "$*" in
    "storage ls "*) [ -e "$d/done" ] || { echo "ERROR: One or more URLs matched no objects." >&2; exit 1; } ;;
    "compute tpus tpu-vm describe "*) s=$(cat "$d/node"); [ "$s" != MISSING ] || missing; echo "$s" ;;
    "compute tpus queued-resources describe "*) s=$(cat "$d/queued"); [ "$s" != MISSING ] || missing; echo "$s" ;;
    "compute tpus tpu-vm delete "* | "compute tpus queued-resources delete "*) echo MISSING > "$d/node"
        echo MISSING > "$d/queued" ;;
    "compute tpus tpu-vm create "*) [ ! -e "$d/no_capacity" ] || { echo "ERROR: no capacity" >&2; exit 1; }
        echo READY > "$d/node" ;;
    "compute tpus queued-resources create "*) echo ACTIVE > "$d/queued"; echo READY > "$d/node" ;;
    "compute tpus tpu-vm ssh "*"echo RUNNING"*) echo STOPPED ;;
    "compute tpus tpu-vm ssh "*"-m bridle_jax.main"*) touch "$d/done" ;;
    "compute tpus tpu-vm ssh "*) [ ! -e "$d/setup_fails" ] || { rm "$d/setup_fails"; exit 1; } ;;
    *) echo "stub gcloud: unexpected call: $*" >&2; exit 3 ;;
esac
"""


@pytest.fixture
def stub(tmp_path):
    """A private PATH/TMPDIR/environment with a failing stub gcloud; `stub.calls()` lists what reached it."""
    stub_dir = tmp_path / "stub"
    stub_dir.mkdir()

    class Stub:
        dir = stub_dir

        def __init__(self):
            self.env = {k: v for k, v in os.environ.items() if not k.startswith(("BRIDLE_", "CLOUDSDK_"))}
            self.env.update(PATH=f"{stub_dir}:{os.environ['PATH']}", STUB_DIR=str(stub_dir), TMPDIR=str(tmp_path))
            self.gcloud(FAILING_GCLOUD)

        def gcloud(self, text: str) -> None:
            path = stub_dir / "gcloud"
            path.write_text(text)
            path.chmod(0o755)

        def calls(self) -> list[str]:
            path = stub_dir / "calls"
            return path.read_text().splitlines() if path.exists() else []

        def run(self, script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
            full_env = {**self.env, **(env or {})}
            return subprocess.run(
                [str(LAUNCH / script), *args], check=False, env=full_env, capture_output=True, text=True, timeout=60
            )

        def dry(self, script: str, *args: str, env: dict | None = None) -> list[str]:
            """stdout lines of a successful dry run that executed nothing."""
            result = self.run(script, "--dry-run", *args, env=env)
            assert result.returncode == 0, result.stderr
            assert self.calls() == [], "a dry run called gcloud"
            return result.stdout.splitlines()

    return Stub()


def remote_command(printed: str) -> str:
    """The shell command a printed `gcloud ... ssh --command=...` line hands to the workers."""
    (command,) = [w[len("--command=") :] for w in shlex.split(printed) if w.startswith("--command=")]
    return command


# ----------------------------------------------------------------------------------------------------------- help


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_lists_flags_and_env_vars(stub, script):
    result = stub.run(script, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"Usage: {script} [flags]")
    assert "--dry-run" in result.stdout and "BRIDLE_DRY_RUN" in result.stdout
    expected = {"fetch.sh": ["--workdir", "--local-dir", "--logs"], "delete.sh": ["--queued", "BRIDLE_TPU_NAME"]}
    expected.setdefault(script, ["--project", "BRIDLE_PROJECT", "--zone", "--name"])
    for word in expected[script]:
        assert word in result.stdout
    assert stub.calls() == []


# --------------------------------------------------------------------------------------------------------- create


@pytest.mark.parametrize(
    "accelerator,runtime",
    [("v4-8", "tpu-ubuntu2204-base"), ("v5p-16", "v2-alpha-tpuv5"), ("v5litepod-8", "v2-alpha-tpuv5-lite"),
     ("v6e-8", "v2-alpha-tpuv6e")],
)  # fmt: skip
def test_create_tpu_vm_default_runtime(stub, accelerator, runtime):
    lines = stub.dry("create.sh", *BASE, f"--accelerator-type={accelerator}")
    create = tpu("tpu-vm", "create", "bridle-v4", *LOC, f"--accelerator-type={accelerator}", f"--version={runtime}")
    assert lines == [line(create), describe()]


def test_create_spot_with_explicit_runtime(stub):
    lines = stub.dry("create.sh", *BASE, "--accelerator-type", "v4-32", "--runtime-version", "v2-alpha-tpuv4", "--spot")
    create = tpu("tpu-vm", "create", "bridle-v4", *LOC, "--accelerator-type=v4-32", "--version=v2-alpha-tpuv4")
    assert lines == [line([*create, "--spot"]), describe()]


def test_create_queued_spot(stub):
    lines = stub.dry("create.sh", *BASE, "--accelerator-type=v5p-16", "--queued", "--spot")
    create = tpu("queued-resources", "create", "bridle-v4", *LOC, "--node-id=bridle-v4", "--accelerator-type=v5p-16")
    assert lines == [line([*create, "--runtime-version=v2-alpha-tpuv5", "--spot"]), describe(True), describe()]


def test_create_queued_best_effort_uses_alpha(stub):
    lines = stub.dry("create.sh", *BASE, "--accelerator-type=v5litepod-8", "--queued", "--best-effort")
    create = ["gcloud", "alpha", "compute", "tpus", "queued-resources", "create", "bridle-v4", *LOC]
    create += ["--node-id=bridle-v4", "--accelerator-type=v5litepod-8", "--runtime-version=v2-alpha-tpuv5-lite"]
    assert lines == [line([*create, "--best-effort"]), describe(True), describe()]


def test_create_waits_until_ready(stub):
    """Real (stubbed) run: the queue goes WAITING -> ACTIVE, then the node CREATING -> READY."""
    stub.gcloud(
        """#!/usr/bin/env bash
printf '%s\\n' "$*" >> "$STUB_DIR/calls"
n=$(grep -c describe "$STUB_DIR/calls")
case "$*" in
    *"queued-resources describe"*) [ "$n" -ge 2 ] && echo ACTIVE || echo WAITING_FOR_RESOURCES ;;
    *"tpu-vm describe"*) [ "$n" -ge 4 ] && echo READY || echo CREATING ;;
esac
"""
    )
    result = stub.run("create.sh", *BASE, "--accelerator-type=v4-8", "--queued", "--poll-interval=0")
    assert result.returncode == 0, result.stderr
    calls = stub.calls()
    expected = ["queued-resources create"] + ["queued-resources describe"] * 2 + ["tpu-vm describe"] * 2
    assert [" ".join(c.split()[2:4]) for c in calls] == expected
    assert "bridle-v4 is READY" in result.stderr


def test_create_fails_on_a_failed_queued_resource(stub):
    stub.gcloud('#!/usr/bin/env bash\ncase "$*" in *describe*) echo FAILED ;; esac\n')
    result = stub.run("create.sh", *BASE, "--accelerator-type=v4-8", "--queued", "--poll-interval=0")
    assert result.returncode == 2 and "bridle-v4 is FAILED" in result.stderr and "delete.sh --queued" in result.stderr


# ---------------------------------------------------------------------------------------------------------- setup


def test_setup_clones_a_git_url_on_all_workers(stub):
    (printed,) = stub.dry("setup.sh", *BASE, f"--repo={URL}", "--ref=v0.1.0")
    words = shlex.split(printed)
    assert words[:8] == tpu("tpu-vm", "ssh", "bridle-v4", *LOC) and words[8] == "--worker=all"
    remote = remote_command(printed)
    assert f"git clone --quiet {URL} \"$HOME\"/bridle_jax" in remote
    assert 'git -C "$HOME"/bridle_jax fetch --quiet origin v0.1.0' in remote
    assert 'checkout --quiet --detach FETCH_HEAD' in remote
    assert 'python3.11 -m venv "$HOME"/bridle_venv' in remote
    assert "install -y -qq python3.11 python3.11-venv" in remote
    install = f"\"$HOME\"/bridle_venv/bin/python -m pip install -U -e '.[tpu]' -f {FIND_LINKS}"
    assert install in remote
    assert remote.index("cd \"$HOME\"/bridle_jax") < remote.index(install)
    assert subprocess.run(["bash", "-n", "-c", remote], check=False).returncode == 0


def test_setup_copies_a_local_checkout(stub, tmp_path):
    repo = tmp_path / "src"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "setup.py").write_text("# placeholder\n")
    subprocess.run([*git, "add", "setup.py"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "one"], check=True)
    lines = stub.dry("setup.sh", *BASE, f"--repo={repo}", "--remote-dir=/opt/bridle", "--python=python3.12")
    tarball = str(tmp_path / "bridle_jax-src-bridle-v4.tar.gz")
    assert lines[0] == line(["git", "-C", str(repo), "archive", "--format=tar.gz", f"--output={tarball}", "HEAD"])
    scp = tpu("tpu-vm", "scp", tarball, "bridle-v4:bridle_jax-src.tar.gz", *LOC, "--worker=all")
    assert lines[1] == line(scp)
    assert shlex.split(lines[2])[8] == "--worker=all"
    remote = remote_command(lines[2])
    assert "tar -xzf bridle_jax-src.tar.gz -C /opt/bridle" in remote and "git clone" not in remote
    assert "python3.12 -m venv" in remote
    assert lines[3:] == [line(["rm", "-f", tarball])]


# ------------------------------------------------------------------------------------------------- data staging

DISK_SOURCE = "--data-disk=source=projects/my-proj/zones/us-central2-b/disks/in1k-ro,mode=read-only"


@pytest.mark.parametrize("queued", [False, True])
def test_create_attaches_the_data_disk_read_only(stub, queued):
    queue = ["--queued"] if queued else []
    lines = stub.dry("create.sh", *BASE, "--accelerator-type=v4-32", "--data-disk=in1k-ro", *queue)
    words = shlex.split(lines[0])
    assert words[:6] == tpu("queued-resources" if queued else "tpu-vm", "create", "bridle-v4")
    assert [w for w in words if w.startswith("--data-disk")] == [DISK_SOURCE]
    full = "projects/other/zones/us-central2-b/disks/shared"  # a full resource path is taken as it is
    (create, _) = stub.dry("create.sh", *BASE, "--accelerator-type=v4-8", f"--data-disk={full}")
    assert f"--data-disk=source={full},mode=read-only" in shlex.split(create)


def test_setup_mounts_a_bucket_prefix_with_gcsfuse_before_installing(stub):
    result = stub.run("setup.sh", "--dry-run", *BASE, f"--repo={URL}", "--data-bucket=gs://my-data/tfds/in1k/")
    assert result.returncode == 0, result.stderr
    staging, install = result.stdout.splitlines()
    assert shlex.split(staging)[8] == "--worker=all" and "git clone" in remote_command(install)
    remote = remote_command(staging)
    mount = ("gcsfuse -o ro --implicit-dirs --metadata-cache-ttl-secs=-1 --stat-cache-max-size-mb=-1"
             " --type-cache-max-size-mb=-1 --only-dir=tfds/in1k my-data /mnt/data")  # fmt: skip
    assert mount in remote and "--cache-dir" not in remote
    assert "if mountpoint -q /mnt/data; then" in remote.split(mount)[0]
    assert "gcsfuse-$(lsb_release -c -s) main" in remote and "apt-get -o DPkg::Lock::Timeout=600 install" in remote
    assert "--config.data.data_dir=/mnt/data" in result.stderr
    assert subprocess.run(["bash", "-n", "-c", remote], check=False).returncode == 0


def test_setup_bucket_without_prefix_with_a_file_cache_and_another_mount_point(stub):
    lines = stub.dry("setup.sh", *BASE, f"--repo={URL}", "--data-bucket=gs://my-data", "--data-cache-mb=20000",
                     "--data-mount=/mnt/disks/data/")  # fmt: skip
    remote = remote_command(lines[0])
    assert "--only-dir" not in remote
    cache = '--cache-dir="$HOME"/gcsfuse_cache --file-cache-max-size-mb=20000 --file-cache-cache-file-for-range-read'
    assert f"{cache} my-data /mnt/disks/data;" in remote
    assert remote.endswith('echo "data ready on $(hostname): --config.data.data_dir=/mnt/disks/data"')


def test_setup_mounts_the_data_disk(stub):
    lines = stub.dry("setup.sh", *BASE, f"--repo={URL}", "--data-disk=in1k-ro")
    assert len(lines) == 2 and "gcsfuse" not in lines[0]
    remote = remote_command(lines[0])
    assert "sudo mount -o $opts $dev /mnt/data" in remote and "ext*) opts=ro,noload" in remote
    assert "attach-disk bridle-v4 --disk=in1k-ro --mode=read-only" in remote


def _staging_worker(tmp_path) -> tuple[dict, Path]:
    """Stub sudo/mountpoint/lsblk/curl/lsb_release that record what the staging command does on a worker."""
    home, bin_dir = tmp_path / "home", tmp_path / "bin"
    home.mkdir()
    bin_dir.mkdir()
    stubs = {
        "sudo": 'printf \'%s\\n\' "$*" >> "$HOME/sudo"\ncase "$1" in blkid) echo ext4 ;; tee) cat >/dev/null ;; esac\n'
                'case "$*" in *"install -y -qq gcsfuse") cp "$HOME/gcsfuse.stub" "$STUB_BIN/gcsfuse" ;; esac',
        "mountpoint": '[ -e "$HOME/mounted" ]',
        "curl": "echo KEY",
        "lsb_release": "echo jammy",
        "lsblk": 'case "$*" in "-dn -o NAME,TYPE") printf "loop0 loop\\nsda disk\\nsdb disk\\n" ;;\n'
                 '"-n -o MOUNTPOINT /dev/sda") printf "\\n/\\n/boot/efi\\n" ;; "-n -o MOUNTPOINT /dev/sdb") echo ;;\n'
                 '"-ln -o NAME,TYPE /dev/sdb") echo "sdb disk" ;; *) echo "lsblk $*" ;; esac',
    }  # fmt: skip
    for name, body in stubs.items():
        (bin_dir / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    (home / "gcsfuse.stub").write_text('#!/usr/bin/env bash\nprintf \'%s\\n\' "$*" >> "$HOME/gcsfuse"\n')
    (home / "gcsfuse.stub").chmod(0o755)
    env = {"HOME": str(home), "STUB_BIN": str(bin_dir), "PATH": f"{bin_dir}:/usr/bin:/bin"}
    return env, home


@pytest.mark.skipif(shutil.which("gcsfuse", path="/usr/bin:/bin") is not None, reason="a real gcsfuse is installed")
def test_staging_commands_run_on_a_worker_and_are_idempotent(stub, tmp_path):
    """The printed worker commands, run with stubs: install + mount once, and nothing but a note when mounted."""
    (bucket, _) = stub.dry("setup.sh", *BASE, f"--repo={URL}", "--data-bucket=gs://my-data/tfds")
    env, home = _staging_worker(tmp_path)

    def run(printed: str) -> subprocess.CompletedProcess:
        command = ["bash", "-c", remote_command(printed)]
        return subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=30)

    first = run(bucket)
    assert first.returncode == 0, first.stderr
    sudo = (home / "sudo").read_text().splitlines()
    assert "tee /etc/apt/sources.list.d/gcsfuse.list" in sudo and "mkdir -p /mnt/data" in sudo
    assert any(s.endswith("install -y -qq gcsfuse") for s in sudo)
    assert (home / "gcsfuse").read_text().splitlines() == [
        (
            "-o ro --implicit-dirs --metadata-cache-ttl-secs=-1 --stat-cache-max-size-mb=-1"
            " --type-cache-max-size-mb=-1 --only-dir=tfds my-data /mnt/data"
        )
    ]
    assert "--config.data.data_dir=/mnt/data" in first.stdout

    (home / "mounted").touch()  # setup.sh again on a live VM: the mount stays, nothing is installed or mounted
    (home / "sudo").unlink()
    again = run(bucket)
    assert again.returncode == 0 and "already mounted, kept" in again.stdout
    assert not (home / "sudo").exists() and len((home / "gcsfuse").read_text().splitlines()) == 1

    (home / "mounted").unlink()
    (disk, _) = stub.dry("setup.sh", *BASE, f"--repo={URL}", "--data-disk=in1k-ro")
    result = run(disk)
    assert result.returncode == 0, result.stderr
    assert (home / "sudo").read_text().splitlines() == [
        "blkid -o value -s TYPE /dev/sdb", "mkdir -p /mnt/data", "mount -o ro,noload /dev/sdb /mnt/data"
    ]  # fmt: skip

    (Path(env["STUB_BIN"]) / "lsblk").write_text("#!/usr/bin/env bash\necho\n")  # no data disk at all
    missing = run(disk)
    assert missing.returncode == 1 and "expected one unmounted data disk, found 0" in missing.stderr
    assert "create.sh --data-disk" in missing.stderr


def test_watch_recovery_stages_the_data_again(stub):
    lines = stub.dry("watch.sh", *WATCH, "--data-disk=in1k-ro")
    creates = [x for x in lines if " create " in x]
    assert len(creates) == 1 and DISK_SOURCE in shlex.split(creates[0])
    ssh = [remote_command(x) for x in lines if " ssh " in x]
    assert "mount -o $opts $dev /mnt/data" in ssh[0] and "git clone" in ssh[1] and "bridle_jax.main" in ssh[2]
    lines = stub.dry("watch.sh", *WATCH, env={"BRIDLE_DATA_BUCKET": "gs://my-data"})
    assert not any("--data-disk" in x for x in lines)
    assert "gcsfuse -o ro" in remote_command(next(x for x in lines if " ssh " in x))


# ---------------------------------------------------------------------------------------------------------- train

WORKDIR = "gs://my-bucket/runs/in1k run #1 \"q\" it's $HOME;echo x"
OVERRIDES = ["--config.data.data_dir=gs://b/tfds dir/it's", "--config.optim.lr=0.001"]


TRAINING = 'printf \'%s\\0\' "$PWD" "$@" > "$HOME/argv.tmp"\nmv "$HOME/argv.tmp" "$HOME/argv"\necho training output\n'
STAMP = r"\d{8}-\d{6}"


def _fake_worker(tmp_path, pgrep_status: int, training: str = TRAINING, worker: str | None = "3",
                 hostname: str = "w-0", upload: str = "") -> dict:  # fmt: skip
    """A worker's $HOME with the code dir, a venv python running `training` (by default: record its cwd and argv,
    NUL-separated, and print a line), the metadata server's worker number (None: unreachable) and a gcloud whose
    `storage cp SRC DEST` copies SRC, runs `upload`, then puts the copy in $HOME/uploads/<ns> and DEST's name in
    $HOME/uploads/<ns>.dest (<ns>: when the copy completed, as the object that stays is the last one completed)."""
    home = tmp_path / "home"
    (home / "bridle_jax").mkdir(parents=True)
    (home / "bridle_venv" / "bin").mkdir(parents=True)
    (home / "uploads").mkdir()
    python = home / "bridle_venv" / "bin" / "python"
    python.write_text(f"#!/usr/bin/env bash\n{training}")
    python.chmod(0o755)
    bin_dir = tmp_path / "worker_bin"
    bin_dir.mkdir()
    gcloud = (  # each copy complete or absent: a SIGTERM may interrupt one
        f'[ "$1 $2 $3" = "storage cp --quiet" ] || exit 3; t=$(mktemp "$HOME/up.XXXXXX"); cp "$4" "$t"; {upload}\n'
        'u=$HOME/uploads/$(date +%s%N); mv "$t" "$u" && printf %s "$5" > "$u.dest.tmp" && mv "$u.dest.tmp" "$u.dest"'
    )  # fmt: skip
    stubs = [("pgrep", f"exit {pgrep_status}"), ("hostname", f"echo {hostname}"), ("gcloud", gcloud),
             ("curl", f"echo {worker}" if worker is not None else "exit 7")]  # fmt: skip
    for name, body in stubs:
        (bin_dir / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    return {"HOME": str(home), "PATH": f"{bin_dir}:{os.environ['PATH']}"}


def _argv(home: Path, timeout: float = 10.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while not (home / "argv").exists():
        assert time.monotonic() < deadline, "the worker command never started python"
        time.sleep(0.02)
    return (home / "argv").read_text().split("\0")[:-1]


def _uploaded(home: Path, text: str, timeout: float = 15.0) -> tuple[str, str]:
    """(destination, content) of the first upload whose content contains `text`, waiting for it."""
    deadline = time.monotonic() + timeout
    while True:
        for dest in sorted((home / "uploads").glob("*.dest"), key=lambda p: int(p.name.split(".")[0])):
            content = (home / "uploads" / dest.stem).read_text()
            if text in content:
                return dest.read_text(), content
        assert time.monotonic() < deadline, f"no upload of the log contains {text!r}"
        time.sleep(0.05)


def test_train_background_passes_workdir_and_overrides_verbatim(stub, tmp_path):
    args = [*BASE, "--config=configs/imagenet.py", f"--workdir={WORKDIR}", *OVERRIDES, "--", "--config.note=a b"]
    (printed,) = stub.dry("train.sh", *args)
    words = shlex.split(printed)
    assert words[:9] == [*tpu("tpu-vm", "ssh", "bridle-v4", *LOC), "--worker=all"]
    remote = remote_command(printed)
    assert "nohup setsid" in remote and "</dev/null &" in remote

    env = _fake_worker(tmp_path, pgrep_status=1)
    result = subprocess.run(["bash", "-c", remote], check=False, env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "started on w-0 (worker 3, pid" in result.stdout
    home = Path(env["HOME"])
    cwd, *argv = _argv(home)
    assert cwd == str(home / "bridle_jax")
    assert argv == ["-m", "bridle_jax.main", "--config=configs/imagenet.py", f"--workdir={WORKDIR}", *OVERRIDES,
                    "--config.note=a b"]  # fmt: skip
    # The log, in the workdir (quoted through both shells) once training exits, with the exit status last.
    dest, content = _uploaded(home, "training exited with status 0")
    assert re.fullmatch(re.escape(f"{WORKDIR}/logs/worker-3-") + STAMP + r"\.log", dest), dest
    assert content.startswith("training output\n")
    (local,) = (home / "bridle_logs").iterdir()
    assert local.name == dest.rsplit("/", 1)[1] and local.read_text() == content


def test_train_foreground_and_the_already_running_guard(stub, tmp_path):
    (printed,) = stub.dry("train.sh", *BASE, "--config=configs/x.py", "--workdir=gs://b/w", "--foreground")
    remote = remote_command(printed)
    assert "nohup" not in remote

    env = _fake_worker(tmp_path, pgrep_status=0)  # training already runs on this worker
    refused = subprocess.run(["bash", "-c", remote], check=False, env=env, capture_output=True, text=True, timeout=30)
    assert refused.returncode == 1 and "already running on w-0" in refused.stderr
    assert not (Path(env["HOME"]) / "argv").exists()

    (Path(env["PATH"].split(":")[0]) / "pgrep").write_text("#!/usr/bin/env bash\nexit 1\n")
    result = subprocess.run(["bash", "-c", remote], check=False, env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and result.stdout == "training output\n"
    assert _argv(Path(env["HOME"]))[1:] == ["-m", "bridle_jax.main", "--config=configs/x.py", "--workdir=gs://b/w"]
    dest, content = _uploaded(Path(env["HOME"]), "training exited with status 0", timeout=0)
    assert dest.startswith("gs://b/w/logs/worker-3-") and content.startswith("training output\n")


def test_train_log_reaches_the_bucket_periodically_and_on_sigterm(stub, tmp_path):
    """A preemption: SIGTERM to the whole process group. Lines written before it are already in the bucket (periodic
    copy); those the training writes while it shuts down, and its exit status, follow once it has exited."""
    (printed,) = stub.dry("train.sh", *BASE, "--config=c.py", "--workdir=gs://b/w", "--log-upload-interval=1")
    training = "trap 'echo saving checkpoint; exit 143' TERM\necho step 1\nwhile :; do sleep 0.1; done\n"
    env = _fake_worker(tmp_path, pgrep_status=1, training=training)
    result = subprocess.run(["bash", "-c", remote_command(printed)], check=False, env=env, capture_output=True,
                            text=True, timeout=30)  # fmt: skip
    assert result.returncode == 0, result.stderr
    pgid = int(re.search(r"pid (\d+)\)", result.stdout).group(1))
    home = Path(env["HOME"])
    try:
        _, content = _uploaded(home, "step 1")  # the periodic copy, while training runs
        assert "exited" not in content
    finally:  # the stub training loops forever: never leave it behind, even when an assertion fails
        os.killpg(pgid, signal.SIGTERM)
    dest, content = _uploaded(home, "training exited with status 143")
    lines = content.splitlines()  # (bash may add a "Terminated" of its own sleep)
    assert lines[0] == "step 1" and "saving checkpoint" in lines and lines[-1].endswith("exited with status 143")
    assert dest.startswith("gs://b/w/logs/worker-3-")
    deadline = time.monotonic() + 10
    while subprocess.run(["pgrep", "-g", str(pgid)], check=False, capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, "the wrapper or its uploader outlived the training"
        time.sleep(0.05)


def test_train_log_last_copy_is_the_complete_one(stub, tmp_path):
    """A periodic copy still under way when training exits must not finish after (and overwrite) the final copy."""
    (printed,) = stub.dry("train.sh", *BASE, "--config=c.py", "--workdir=gs://b/w", "--log-upload-interval=1")
    env = _fake_worker(tmp_path, pgrep_status=1, training="echo a\nsleep 1.5\necho b\n",
                       upload='grep -q "exited with" "$t" || sleep 1.5')  # fmt: skip
    result = subprocess.run(["bash", "-c", remote_command(printed)], check=False, env=env, capture_output=True,
                            text=True, timeout=30)  # fmt: skip
    assert result.returncode == 0, result.stderr
    home = Path(env["HOME"])
    _uploaded(home, "exited with status 0")
    pgid = int(re.search(r"pid (\d+)\)", result.stdout).group(1))
    deadline = time.monotonic() + 10
    while subprocess.run(["pgrep", "-g", str(pgid)], check=False, capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, "the wrapper or its uploader outlived the training"
        time.sleep(0.05)
    copies = sorted((home / "uploads").glob("*[0-9]"), key=lambda p: int(p.name))
    assert len(copies) >= 2 and copies[-1].read_text().startswith("a\nb\n[launch/train.sh]")


def test_train_log_goes_straight_into_a_local_workdir(stub, tmp_path):
    workdir = tmp_path / "shared fs" / "run 1"
    (printed,) = stub.dry("train.sh", *BASE, "--config=c.py", f"--workdir={workdir}")
    env = _fake_worker(tmp_path, pgrep_status=1, worker=None, hostname="t1v-n-8e6c-w-12")  # no metadata server
    result = subprocess.run(["bash", "-c", remote_command(printed)], check=False, env=env, capture_output=True,
                            text=True, timeout=30)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "(worker 12, pid" in result.stdout
    deadline = time.monotonic() + 10
    while not list((workdir / "logs").glob("worker-12-*.log")) or "exited" not in _only_log(workdir):
        assert time.monotonic() < deadline, "the log never reached the workdir"
        time.sleep(0.05)
    assert _only_log(workdir).startswith("training output\n")
    assert not list(Path(env["HOME"], "uploads").iterdir()) and not Path(env["HOME"], "bridle_logs").exists()


def _only_log(workdir: Path) -> str:
    (log,) = (workdir / "logs").glob("worker-12-*.log")
    assert re.fullmatch(r"worker-12-" + STAMP + r"\.log", log.name)
    return log.read_text()


def test_train_guard_pattern_matches_training_but_not_the_ssh_shell(stub):
    """With the real pgrep: a `python -m bridle_jax.main` process matches; the `bash -c` carrying the command
    doesn't."""
    (printed,) = stub.dry("train.sh", *BASE, "--config=c.py", "--workdir=gs://b/w")
    pattern = re.search(r"pgrep -f '([^']*)'", remote_command(printed)).group(1)
    fake = subprocess.Popen(["bash", "-c", 'exec -a "/venv/bin/python -m bridle_jax.main" sleep 20'])
    try:
        time.sleep(0.2)
        script = f"echo $$; pgrep -f {shlex.quote(pattern)}; true python -m bridle_jax.main"
        shell_pid, *matches = subprocess.run(
            ["bash", "-c", script], check=False, capture_output=True, text=True
        ).stdout.split()
        assert str(fake.pid) in matches and shell_pid not in matches
    finally:
        fake.kill()
        fake.wait()


# ---------------------------------------------------------------------------------------------------------- watch

WATCH = [
    *BASE,
    "--accelerator-type=v4-8",
    "--config=configs/imagenet.py",
    "--workdir=gs://b/runs/in1k/",
    f"--repo={URL}",
]


@pytest.mark.parametrize("queued", [False, True])
def test_watch_dry_run_prints_checks_and_one_recovery(stub, queued):
    extra = ["--queued", "--spot"] if queued else []
    lines = stub.dry("watch.sh", *WATCH, *extra, "--config.optim.lr=3e-4", "--restart-crashed")
    kind = "queued-resources" if queued else "tpu-vm"
    assert lines[0] == line(["gcloud", "storage", "ls", "gs://b/runs/in1k/DONE"])
    assert lines[1] == describe(queued)
    assert shlex.split(lines[2])[8:10] == ["--worker=0", "--command=" + remote_command(lines[2])]
    delete = tpu(kind, "delete", "bridle-v4", *LOC, *(["--force"] if queued else []), "--quiet")
    assert lines[3] == line(delete)
    assert shlex.split(lines[4])[:6] == ["gcloud", "compute", "tpus", kind, "create", "bridle-v4"]
    assert ("--spot" in shlex.split(lines[4])) == queued
    waits = [describe(True), describe()] if queued else [describe()]
    assert lines[5 : 5 + len(waits)] == waits
    setup, train = lines[5 + len(waits) :]
    assert "git clone" in remote_command(setup)
    train_words = shlex.split(remote_command(train).split(" bridle-train ")[1].split(" >/dev/null")[0])
    assert train_words[-3:] == ["--config=configs/imagenet.py", "--workdir=gs://b/runs/in1k", "--config.optim.lr=3e-4"]


@pytest.mark.parametrize("queued", [False, True])
def test_watch_recreates_a_preempted_slice_and_stops_at_done(stub, queued):
    stub.gcloud(STATEFUL_GCLOUD)
    (stub.dir / "node").write_text("PREEMPTED\n" if not queued else "READY\n")
    (stub.dir / "queued").write_text("SUSPENDED\n")
    extra = ["--queued", "--spot"] if queued else []
    result = stub.run("watch.sh", *WATCH, *extra, "--poll-interval=0", "--config.x=1")
    assert result.returncode == 0, result.stderr
    kind = "queued-resources" if queued else "tpu-vm"
    waits = ["queued-resources describe", "tpu-vm describe"] if queued else ["tpu-vm describe"]
    expected = ["storage ls", f"{kind} describe", f"{kind} delete", f"{kind} create", *waits]
    expected += ["tpu-vm ssh", "tpu-vm ssh", "storage ls"]
    calls = stub.calls()
    assert [" ".join(c.split()[:2]) if c.startswith("storage") else " ".join(c.split()[2:4]) for c in calls] == expected
    assert "git clone" in calls[-3] and "-m bridle_jax.main" in calls[-2] and "--config.x=1" in calls[-2]
    assert "the run is complete" in result.stderr


def test_watch_finishes_a_recovery_that_failed_in_setup(stub):
    stub.gcloud(STATEFUL_GCLOUD)
    (stub.dir / "node").write_text("TERMINATED\n")
    (stub.dir / "setup_fails").touch()
    result = stub.run("watch.sh", *WATCH, "--poll-interval=0")
    assert result.returncode == 0, result.stderr
    assert "setup.sh failed" in result.stderr and "recovery failed" in result.stderr
    calls = [" ".join(c.split()[:2]) if c.startswith("storage") else " ".join(c.split()[2:4]) for c in stub.calls()]
    first = ["storage ls", "tpu-vm describe", "tpu-vm delete", "tpu-vm create", "tpu-vm describe", "tpu-vm ssh"]
    assert calls == [*first, "storage ls", "tpu-vm describe", "tpu-vm ssh", "tpu-vm ssh", "storage ls"]


def test_watch_restarts_crashed_training_on_a_ready_vm(stub):
    stub.gcloud(STATEFUL_GCLOUD)
    (stub.dir / "node").write_text("READY\n")
    result = stub.run("watch.sh", *WATCH, "--poll-interval=0", "--restart-crashed", "--delete-when-done")
    assert result.returncode == 0, result.stderr
    calls = stub.calls()
    assert "echo RUNNING" in calls[2] and "--worker=0" in calls[2]
    assert "-m bridle_jax.main" in calls[3]
    assert calls[-1].startswith("compute tpus tpu-vm delete bridle-v4") and calls[-1].endswith("--quiet")
    assert not any("create" in c for c in calls)


def test_watch_gives_up_after_max_restarts(stub):
    stub.gcloud(STATEFUL_GCLOUD)
    (stub.dir / "node").write_text("PREEMPTED\n")
    (stub.dir / "no_capacity").touch()
    result = stub.run("watch.sh", *WATCH, "--poll-interval=0", "--max-restarts=2")
    assert result.returncode == 2
    assert "--max-restarts=2 is used up" in result.stderr
    assert sum(" create " in c for c in stub.calls()) == 2


# ------------------------------------------------------------------------------------------------- fetch / delete


@pytest.mark.parametrize("logs", [False, True])
def test_fetch_copies_results_and_logs_from_the_workdir(stub, logs):
    lines = stub.dry("fetch.sh", "--workdir=gs://b/runs/in1k/", *(["--logs"] if logs else []))
    items = ["metrics.jsonl", "linear_probe.json", "config.json", "encoders"] + (["logs"] if logs else [])
    sources = [f"gs://b/runs/in1k/{f}" for f in items]
    assert lines == [
        line(["mkdir", "-p", "runs/in1k"]),
        line(["gcloud", "storage", "cp", "-r", "--continue-on-error", *sources, "runs/in1k"]),
    ]


def test_fetch_quotes_a_local_dir_with_spaces(stub):
    lines = stub.dry("fetch.sh", "--workdir=gs://b/w", "--local-dir=my results/w 1")
    assert lines[0] == "mkdir -p 'my results/w 1'" and lines[1].endswith(" 'my results/w 1'")


@pytest.mark.parametrize("queued", [False, True])
def test_delete(stub, queued):
    lines = stub.dry("delete.sh", *BASE, *(["--queued"] if queued else []))
    if queued:
        assert lines == [line(tpu("queued-resources", "delete", "bridle-v4", *LOC, "--force", "--quiet"))]
    else:
        assert lines == [line(tpu("tpu-vm", "delete", "bridle-v4", *LOC, "--quiet"))]


# ------------------------------------------------------------------------------------ parameters and bad input


def test_env_vars_with_flags_taking_precedence(stub):
    env = {"BRIDLE_PROJECT": "env-proj", "BRIDLE_ZONE": "europe-west4-a", "BRIDLE_TPU_NAME": "env-tpu",
           "BRIDLE_ACCELERATOR_TYPE": "v5litepod-8", "BRIDLE_SPOT": "true"}  # fmt: skip
    (create, _) = stub.dry("create.sh", env=env)
    assert create == line(tpu("tpu-vm", "create", "env-tpu", "--zone=europe-west4-a", "--project=env-proj",
                              "--accelerator-type=v5litepod-8", "--version=v2-alpha-tpuv5-lite", "--spot"))  # fmt: skip
    (delete,) = stub.dry("delete.sh", "--project=flag-proj", env=env)
    assert delete == line(tpu("tpu-vm", "delete", "env-tpu", "--zone=europe-west4-a", "--project=flag-proj", "--quiet"))
    env = {"CLOUDSDK_CORE_PROJECT": "sdk-proj", "CLOUDSDK_COMPUTE_ZONE": "us-east5-a", "BRIDLE_TPU_NAME": "t"}
    assert stub.dry("delete.sh", env=env) == [line(tpu("tpu-vm", "delete", "t", "--zone=us-east5-a",
                                                        "--project=sdk-proj", "--quiet"))]  # fmt: skip


@pytest.mark.parametrize(
    "script,args,names",
    [
        ("create.sh", [], ["--project", "BRIDLE_PROJECT", "--zone", "BRIDLE_ZONE", "--name", "BRIDLE_TPU_NAME",
                           "--accelerator-type", "BRIDLE_ACCELERATOR_TYPE"]),
        ("setup.sh", ["--zone=z"], ["--project", "--name"]),
        ("train.sh", BASE, ["--config", "BRIDLE_CONFIG", "--workdir", "BRIDLE_WORKDIR"]),
        ("watch.sh", [*BASE, "--config=c.py"], ["--accelerator-type", "--workdir"]),
        ("fetch.sh", [], ["--workdir", "BRIDLE_WORKDIR"]),
        ("delete.sh", ["--project=p"], ["--zone", "--name"]),
    ],
)  # fmt: skip
def test_missing_parameters_are_named(stub, script, args, names):
    result = stub.run(script, "--dry-run", *args)
    assert result.returncode == 2 and result.stdout == ""
    assert "missing required parameter(s)" in result.stderr
    for name in names:
        assert name in result.stderr
    assert stub.calls() == []


@pytest.mark.parametrize(
    "script,args,message",
    [
        ("delete.sh", [*BASE, "--bogus"], "unknown flag --bogus"),
        ("delete.sh", [*BASE, "--config=c.py"], "unknown flag --config"),
        ("delete.sh", [*BASE, "--zone"], "--zone needs a value"),
        ("delete.sh", ["--zone", *BASE], "--zone needs a value"),
        ("delete.sh", [*BASE, "--queued=yes"], "--queued is a switch"),
        ("delete.sh", [*BASE, "stray"], "unexpected argument 'stray'"),
        ("delete.sh", [*BASE, "--config.x=1"], "takes no --config.* overrides"),
        ("train.sh", [*BASE, "--config=c.py", "--workdir=gs://b/w", "--config.x", "1"], "--config.key=value"),
        ("train.sh", [*BASE, "--config=c.py", "--workdir=runs/w"], "--workdir (BRIDLE_WORKDIR) must be gs://"),
        ("fetch.sh", ["--workdir=/tmp/w"], "--workdir (BRIDLE_WORKDIR) must be a gs://bucket/path"),
        ("create.sh", [*BASE, "--accelerator-type=v9x-8"], "no default --runtime-version"),
        ("create.sh", [*BASE, "--accelerator-type=v4-8", "--spot", "--queued", "--best-effort"], "--spot and --best"),
        ("create.sh", [*BASE, "--accelerator-type=v4-8", "--best-effort"], "add --queued"),
        ("create.sh", [*BASE, "--accelerator-type=v4-8", "--poll-interval=soon"], "--poll-interval (BRIDLE_POLL_INT"),
        ("setup.sh", [*BASE, "--repo=/no/such/dir"], "--repo (BRIDLE_REPO) '/no/such/dir' is neither"),
        ("setup.sh", [*BASE, "--ref=no-such-ref"], "--ref (BRIDLE_REF) 'no-such-ref' is not a commit"),
        ("setup.sh", [*BASE, "--ref=a b"], "is not a branch, tag or commit"),
        ("setup.sh", [*BASE, f"--repo={URL}", "--remote-dir=my code"], "--remote-dir: 'my code' may use only"),
        ("setup.sh", [*BASE, f"--repo={URL}", "--venv=../x"], "--venv: '../x' must name a directory"),
        ("setup.sh", [*BASE, f"--repo={URL}", "--python=/usr/bin/python3"], "--python (BRIDLE_PYTHON)"),
        ("setup.sh", [*BASE, "--data-bucket=gs://b", "--data-disk=d"], "(BRIDLE_DATA_BUCKET) and --data-disk"),
        ("watch.sh", [*WATCH, "--data-bucket=gs://b/x", "--data-disk=d"], "(BRIDLE_DATA_BUCKET) and --data"),
        ("setup.sh", [*BASE, "--data-bucket=my-bucket/tfds"], "--data-bucket (BRIDLE_DATA_BUCKET) must be gs://bucket"),
        ("watch.sh", [*WATCH, "--data-bucket=/mnt/tfds"], "--data-bucket (BRIDLE_DATA_BUCKET) must be gs://bucket"),
        ("setup.sh", [*BASE, "--data-bucket=gs://"], "--data-bucket (BRIDLE_DATA_BUCKET) must be gs://bucket"),
        ("create.sh", [*BASE, "--accelerator-type=v4-8", "--data-disk=My_Disk"], "--data-disk (BRIDLE_DATA_DISK) must"),
        ("train.sh", [*BASE, "--config=c.py", "--workdir=gs://b/w", "--log-upload-interval=0"], "--log-upload-interv"),
        ("fetch.sh", ["--workdir=gs://b/w", "--logs", "--name=bridle-v4"], "unknown flag --name"),
        ("setup.sh", [*BASE, "--data-disk=d", "--data-mount=data"], "--data-mount (BRIDLE_DATA_MOUNT) must be an abs"),
        ("setup.sh", [*BASE, "--data-disk=d", "--data-mount=/mnt/../etc"], "--data-mount (BRIDLE_DATA_MOUNT) must be"),
        ("setup.sh", [*BASE, "--data-disk=d", "--data-mount=/home"], "must not hide a system directory"),
        ("setup.sh", [*BASE, "--data-mount=/mnt/data"], "--data-mount (BRIDLE_DATA_MOUNT) needs --data-bucket or"),
        ("setup.sh", [*BASE, "--data-disk=d", "--data-cache-mb=100"], "--data-cache-mb (BRIDLE_DATA_CACHE_MB) caches"),
        ("setup.sh", [*BASE, "--data-bucket=gs://bkt", "--data-cache-mb=lots"], "(BRIDLE_DATA_CACHE_MB)"),
    ],
)  # fmt: skip
def test_bad_input_fails_with_a_clear_message(stub, script, args, message):
    result = stub.run(script, "--dry-run", *args)
    assert result.returncode == 2 and result.stdout == ""
    assert message in result.stderr
    assert stub.calls() == []


def test_bad_boolean_environment_value(stub):
    result = stub.run("delete.sh", *BASE, "--dry-run", env={"BRIDLE_QUEUED": "maybe"})
    assert result.returncode == 2 and "BRIDLE_QUEUED='maybe'" in result.stderr


def test_shellcheck_clean():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("the shellcheck binary is not installed")
    scripts = sorted(str(p) for p in LAUNCH.glob("*.sh"))
    assert len(scripts) == 7
    result = subprocess.run(
        [shellcheck, "-x", *scripts], check=False, capture_output=True, text=True, cwd=LAUNCH.parent
    )
    assert result.returncode == 0, result.stdout + result.stderr
