"""The cluster routes against a real SLURM (`.ci/start-slurm.sh` starts a single-node one): submissions SLURM
refuses, a job array with its exports, and a submitit job and an sbatch-script job each preempted once and
requeued, which must end with the losses of the array's uninterrupted run of the same training.

Skipped where no SLURM controller answers, unless HIDREAM_FT_REQUIRE_SLURM=1 (CI), where that is a failure.
"""

import io
import os
import re
import shutil
import subprocess
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from helpers import tensorboard_scalars, wait_for
from hidream_ft.data.demo import write_demo_dataset
from launch import submit
from test_launch_local import complete_steps

pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parents[1]
STEPS = 8  # long enough that the signal sent at the start lands before the end
RANK = 4  # the LoRA rank of every run here; the array sweeps it over [RANK, 8]
POLL_S = 0.5  # each look at a job is a call to the controller, on the machine the jobs run on


def slurm_is_up() -> bool:
    if shutil.which("scontrol") is None:
        return False
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True)
    return ping.returncode == 0 and "is UP" in ping.stdout


@pytest.fixture(scope="module", autouse=True)
def slurm():
    if not slurm_is_up():
        if os.environ.get("HIDREAM_FT_REQUIRE_SLURM") == "1":
            pytest.fail("HIDREAM_FT_REQUIRE_SLURM=1 but no SLURM controller answers (bash .ci/start-slurm.sh)")
        pytest.skip("no SLURM controller answers here (bash .ci/start-slurm.sh starts one)")


def job_field(job_id: str, name: str) -> str:
    shown = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    found = re.search(rf"\b{name}=(\S+)", shown)
    return found.group(1) if found else ""


def wait_for_state(job_id: str, *states: str, timeout: float = 240.0) -> str:
    wait_for(lambda: job_field(job_id, "JobState") in states, f"job {job_id} to reach {'/'.join(states)}", timeout,
             interval=POLL_S)
    return job_field(job_id, "JobState")


def wait_for_requeue(job_id: str):
    """A requeued job waits (Reason=BeginTime) until its previous run's credential has expired; SLURM starts it
    again then, after 15 s here (.ci/start-slurm.sh sets cred_expire). Starting it sooner makes SLURM kill it
    ("Job credential revoked")."""
    wait_for(lambda: job_field(job_id, "Reason") == "BeginTime", f"job {job_id} to be requeued", timeout=240,
             interval=POLL_S)
    assert job_field(job_id, "Restarts") == "1"


def completion_records(job_id: str) -> list[str]:
    """The job completion log's line for each run of the job (requeued runs included), where SLURM keeps one."""
    config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True).stdout
    location = re.search(r"^JobCompLoc\s*=\s*(/\S+)", config, flags=re.M)
    if "jobcomp/filetxt" not in config or not location or not Path(location.group(1)).exists():
        return []
    return [line for line in Path(location.group(1)).read_text().splitlines() if line.startswith(f"JobId={job_id} ")]


def our_jobs(name: str) -> list[str]:
    return subprocess.run(["squeue", "--noheader", "--name", name, "--format=%i"], capture_output=True,
                          text=True).stdout.split()


@pytest.fixture(scope="module")
def write_config(tmp_path_factory, tiny_checkpoint):
    """write(name, **slurm) → a config for a tiny LoRA run of STEPS steps on one CPU rank, into runs/<name>."""
    root = tmp_path_factory.mktemp("slurm-real")
    data = write_demo_dataset(root / "data", n=8)

    def write(name: str, slurm: str = "") -> Path:
        config = root / f"{name}.toml"
        config.write_text(
            f'[model]\npath = "{tiny_checkpoint}"\ndtype = "float32"\n[parallel]\nparam_dtype = "float32"\n'
            f'[data]\nfolders = ["{data}"]\nbuckets = [[64, 64]]\nnum_workers = 1\n'
            f'[train]\nmax_steps = {STEPS}\n[optim]\nlr = 3e-3\n[lora]\nrank = {RANK}\n[checkpoint]\nevery = 1000\n'
            f'[logging]\noutput_dir = "{root / "runs" / name}"\nlog_every = 1\n'
            f'[slurm]\njob_name = "hidream-ft-ci-{name}"\ngpus_per_node = 0\ntasks_per_node = 1\ntime_min = 10\n'
            f'{slurm}')
        return config

    return write


def losses(run_dir: Path) -> dict[int, float]:
    return tensorboard_scalars(run_dir, "train/loss")


def run_dir_of(config: Path) -> Path:
    return config.parent / "runs" / config.stem


@pytest.fixture(scope="module")
def sweep_with_exports(write_config):
    """A sweep over the LoRA rank as one job array, each task with a dependent export job; waits for the exports.

    Returns the run directory of each rank."""
    config = write_config("array", slurm="export_gpus = 0\nexport_time_min = 10\n")
    out = io.StringIO()
    with redirect_stdout(out):
        assert submit.main(["--config", str(config), "--sweep", f"lora.rank=[{RANK}, 8]",
                            "--then-export", "comfyui"]) == 0
    export_ids = re.findall(r"submitted (\d+): export comfyui", out.getvalue())
    assert len(export_ids) == 2, out.getvalue()
    for export_id in export_ids:  # each waits for its array task (Reason=Dependency), then runs
        assert wait_for_state(export_id, "COMPLETED", "FAILED", "CANCELLED") == "COMPLETED"
    return {rank: run_dir_of(config) / f"rank={rank}" for rank in (RANK, 8)}


@pytest.fixture(scope="module")
def reference_losses(sweep_with_exports):
    """The array's run at RANK: the same training as the preempted runs, uninterrupted."""
    return losses(sweep_with_exports[RANK])


def preempt_when_training(config: Path, signal_job):
    """Signal once the trainer has installed its handler (config.toml is written after it), before its first
    step, so that the run stops early (at the end of the step the signal reaches it in) and really resumes."""
    wait_for(lambda: (run_dir_of(config) / "config.toml").exists(), "the trainer to start", timeout=240,
             interval=POLL_S / 5)
    signal_job()


def preempted_and_completed(run_dir: Path) -> int:
    """The step the preempted run stopped at: it checkpointed there, before the end, and the requeued run
    finished. Which step that is depends on when the signal arrived; tests/test_reliability.py pins the rule."""
    stopped_at, last = complete_steps(run_dir)
    assert 1 <= stopped_at < STEPS and last == STEPS
    return stopped_at


# Submissions SLURM would refuse: nothing is submitted, nothing is left behind.

def test_an_export_job_slurm_refuses_submits_nothing(write_config, capsys):
    config = write_config("refused-export")  # the export asks for slurm.export_gpus = 1; this node has none
    assert submit.main(["--config", str(config), "--then-export", "comfyui"]) == 2
    err = capsys.readouterr().err
    assert "export job" in err and "nothing was submitted" in err and err.count("\n") == 1
    assert our_jobs("hidream-ft-ci-refused-export") == []
    folder = run_dir_of(config) / "submitit"
    assert not folder.exists() or list(folder.iterdir()) == []


def test_resources_the_partition_cannot_offer_are_refused_not_left_pending(write_config, capsys):
    config = write_config("too-many-cpus", slurm=f"cpus_per_task = {4 * os.cpu_count()}\n")
    assert submit.main(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "training job" in err and f"{os.cpu_count()} CPUs" in err and "nothing was submitted" in err
    assert our_jobs("hidream-ft-ci-too-many-cpus") == []


def test_job_array_with_dependent_exports_completes(sweep_with_exports):
    for run_dir in sweep_with_exports.values():
        assert complete_steps(run_dir) == [STEPS]
        assert (run_dir / "export" / "lora-comfyui.safetensors").stat().st_size > 0


# Preemption and requeue, by each route.

def test_submitit_job_preempted_once_requeues_and_matches_an_uninterrupted_run(write_config, reference_losses):
    config = write_config("submitit-preempted")
    jobs = submit.submit(submit.plan(config, [], []), "slurm", submit.TRAIN_ENTRYPOINT, None)
    (job,) = jobs
    # Like SLURM's time-limit warning: USR2 to the job's tasks (submitit's and the trainer's handlers).
    preempt_when_training(config, lambda: subprocess.run(["scancel", "--signal=USR2", job.job_id], check=True))
    wait_for_requeue(job.job_id)
    assert wait_for_state(job.job_id, "COMPLETED", "FAILED", "CANCELLED") == "COMPLETED", job.stderr()
    run_dir = run_dir_of(config)
    stopped_at = preempted_and_completed(run_dir)
    assert f"resumed at step {stopped_at}" in job.stderr() + job.stdout()
    assert losses(run_dir) == reference_losses


def test_sbatch_script_from_another_directory_preempted_once_requeues_quietly_and_matches(
        write_config, reference_losses, tmp_path):
    config = write_config("sbatch-preempted")
    log = tmp_path / "job.out"
    submitted = subprocess.run(
        ["sbatch", "--parsable", "--gpus-per-node=0", "--time=10", "--job-name=hidream-ft-ci-sbatch",
         f"--output={log}", str(REPO / "slurm" / "single-node.sbatch"), str(config)],
        cwd=tmp_path, capture_output=True, text=True, check=True)
    job_id = submitted.stdout.strip()
    # The time-limit warning as --signal=B:USR2@120 delivers it: to the batch shell alone.
    preempt_when_training(config, lambda: subprocess.run(["scancel", "--batch", "--signal=USR2", job_id],
                                                         check=True))
    wait_for_requeue(job_id)
    state = wait_for_state(job_id, "COMPLETED", "FAILED", "CANCELLED")
    text = log.read_text(errors="replace")
    assert state == "COMPLETED", text
    assert "Traceback" not in text and "requeueing job" in text and "step exit status 75" in text
    runs = completion_records(job_id)  # the preempted run ended with the requeue status, not as a failure
    assert not runs or ("DerivedExitCode=75:0" in runs[0] and "JobState=COMPLETED" in runs[-1]), runs
    run_dir = run_dir_of(config)
    stopped_at = preempted_and_completed(run_dir)
    assert f"resumed at step {stopped_at}" in text
    assert losses(run_dir) == reference_losses
