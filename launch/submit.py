"""Submit training with submitit: one job on N nodes × G GPUs, a job array for a sweep, an export afterwards.

    python -m launch.submit --config configs/lora.toml --set slurm.nodes=4 --set slurm.partition=gpu
    python -m launch.submit --config configs/lora.toml --sweep 'optim.lr=[1e-4, 3e-4]' --dry-run
    python -m launch.submit --config configs/lora.toml --then-export comfyui
    python -m launch.submit --config configs/lora.toml --cluster local --set slurm.gpus_per_node=2

Resources come from the config's [slurm] table (override any key with --set slurm.KEY=VALUE); every key is in
docs/cluster.md. Each task sets the torchrun variables from the SLURM environment and runs the trainer in-process.
SLURM jobs are submitted and left to run; --cluster local and debug wait for the result.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import submitit
from submitit.core.utils import FailedJobError, FailedSubmissionError, JobPaths
from submitit.slurm.slurm import _make_sbatch_string

from hidream_ft.cli import entry_point
from hidream_ft.config import Config, ConfigError, SlurmConfig, TrainConfig
from hidream_ft.errors import UserError
from launch.jobs import CHECK_ENTRYPOINT, TRAIN_ENTRYPOINT, DistributedJob
from launch.sweep import Plan, plan

CLUSTERS = ("slurm", "local", "debug")
PREEMPT_SIGNAL = "USR2"


@dataclass(frozen=True)
class Resources:
    """One job's shape, in the launcher's own terms (translated per cluster below)."""

    job_name: str
    nodes: int
    tasks_per_node: int
    gpus_per_node: int
    time_min: int
    dependency: str | None = None

    def summary(self) -> str:
        return (f"{self.nodes} node(s) x {self.tasks_per_node} task(s), {self.gpus_per_node} GPU(s) per node, "
                f"{self.time_min} min")


@dataclass(frozen=True)
class PlannedJob:
    """One kind of sbatch submission of a launch: the training job (an array for a sweep) or the export jobs."""

    label: str
    resources: Resources
    array_size: int | None = None


def training_resources(slurm: SlurmConfig) -> Resources:
    return Resources(slurm.job_name, slurm.nodes, slurm.tasks, slurm.gpus_per_node, slurm.time_min)


def export_resources(slurm: SlurmConfig, after_job_id: str | None) -> Resources:
    """One task; on SLURM it starts only once the training job ``after_job_id`` has succeeded."""
    return Resources(f"{slurm.job_name}-export", 1, 1, slurm.export_gpus, slurm.export_time_min,
                     dependency=f"afterok:{after_job_id}" if after_job_id else None)


def sbatch_parameters(slurm: SlurmConfig, resources: Resources) -> dict[str, Any]:
    """Parameters for :class:`submitit.SlurmExecutor` (submitit writes the sbatch script from them)."""
    params: dict[str, Any] = {
        "job_name": resources.job_name,
        "nodes": resources.nodes,
        "ntasks_per_node": resources.tasks_per_node,
        "time": resources.time_min,
        # submitit turns this into --signal=USR2@<delay>: the time-limit warning PreemptionHandler acts on.
        "signal_delay_s": slurm.signal_delay_s,
        "array_parallelism": slurm.array_parallelism,
        # The job's own submitit must listen to USR2 too, whatever the submitting shell had exported.
        "setup": [f"export SUBMITIT_PREEMPT_SIGNAL={PREEMPT_SIGNAL}", *slurm.setup],
        "additional_parameters": {"requeue": True, **slurm.sbatch},
    }
    optional = {
        "gpus_per_node": resources.gpus_per_node, "cpus_per_task": slurm.cpus_per_task,
        "partition": slurm.partition, "account": slurm.account, "qos": slurm.qos, "constraint": slurm.constraint,
        "mem": slurm.mem, "exclusive": slurm.exclusive, "srun_args": slurm.srun_args,
        "dependency": resources.dependency,
    }
    params.update({k: v for k, v in optional.items() if v})
    return params


def local_parameters(slurm: SlurmConfig, resources: Resources) -> dict[str, Any]:
    if resources.nodes > 1:
        raise ConfigError(f"slurm.nodes = {resources.nodes}: --cluster local runs on this machine only; "
                          f"set slurm.nodes = 1")
    return {"tasks_per_node": resources.tasks_per_node, "gpus_per_node": resources.gpus_per_node,
            "timeout_min": resources.time_min, "signal_delay_s": slurm.signal_delay_s}


def make_executor(cluster: str, folder: str, slurm: SlurmConfig, resources: Resources) -> submitit.Executor:
    if cluster != "slurm":
        # Local jobs name their files after the job id already; a literal "%j" folder would be left behind.
        folder = folder.removesuffix("/%j")
    if cluster == "slurm":
        if shutil.which("srun") is None:
            raise ConfigError("--cluster slurm: no srun on this machine; submit from a SLURM login node, or use "
                              "--cluster local / --dry-run")
        executor = submitit.SlurmExecutor(folder, max_num_timeout=slurm.max_timeouts)
        executor.update_parameters(**sbatch_parameters(slurm, resources))
    elif cluster == "local":
        executor = submitit.LocalExecutor(folder, max_num_timeout=slurm.max_timeouts)
        executor.update_parameters(**local_parameters(slurm, resources))
    else:
        executor = submitit.DebugExecutor(folder)
    return executor


def sbatch_script(slurm: SlurmConfig, resources: Resources, folder: str, array_size: int | None) -> str:
    """The sbatch script submitit will write for these resources (for --dry-run; submits nothing)."""
    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(folder)])
    return _make_sbatch_string(command=command, folder=folder, map_count=array_size,
                               **sbatch_parameters(slurm, resources))


def slurm_submissions(the_plan: Plan, entrypoint: str, then_export: str | None) -> list[PlannedJob]:
    """Every kind of job a launch submits to SLURM; the export jobs of a sweep all have one shape."""
    slurm = the_plan.config.slurm
    runs = len(task_jobs(the_plan, entrypoint))
    planned = [PlannedJob("training job", training_resources(slurm), runs if runs > 1 else None)]
    if then_export:
        planned.append(PlannedJob("export job", export_resources(slurm, "<training job>")))
    return planned


def partition_offer(partition: str) -> str:
    """What the partition's nodes have, as sinfo tells it (empty where it cannot)."""
    try:
        shown = subprocess.run(["sinfo", "--noheader", "--format=%P|%D|%c|%m|%G",
                                *(["--partition", partition] if partition else [])],
                               capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""
    offers = []
    for line in shown.splitlines():
        name, nodes, cpus, memory, gres = line.split("|")
        if partition or name.endswith("*"):  # sinfo marks the default partition with *
            gpus = "no GPUs" if gres in ("(null)", "") else f"gres {gres}"
            offers.append(f"partition {name.rstrip('*')} has {nodes} node(s) with {cpus} CPUs, {memory} MB, {gpus}")
    return "; ".join(offers)


def check_with_sbatch(slurm: SlurmConfig, planned: list[PlannedJob]) -> None:
    """Ask SLURM whether it would ever run each job (``sbatch --test-only``), before any is submitted.

    SLURM accepts a job the partition can never run and leaves it PENDING (Reason=PartitionConfig) for good;
    --test-only refuses it at once, with SLURM's own reason.
    """
    refusals = []
    with tempfile.TemporaryDirectory() as scratch:
        for job in planned:
            script = Path(scratch) / "job.sh"
            # The dependency names a job that does not exist yet; the shape is what is checked.
            resources = replace(job.resources, dependency=None)
            script.write_text(sbatch_script(slurm, resources, scratch, job.array_size))
            answer = subprocess.run(["sbatch", "--test-only", str(script)], capture_output=True, text=True)
            if answer.returncode != 0:
                refusals.append(f"the {job.label} ({resources.summary()}): {' '.join(answer.stderr.split())}")
    if refusals:
        offer = partition_offer(slurm.partition)
        raise UserError(f"SLURM would not run {'; '.join(refusals)}{'; ' + offer if offer else ''}; "
                        f"nothing was submitted")


def withdraw(job_ids: list[str], folder: str, files_before: set[Path]) -> None:
    """Cancel the jobs a failed launch submitted and remove submitit's files of the job it could not submit."""
    if job_ids:
        subprocess.run(["scancel", *job_ids], capture_output=True)
    staging = JobPaths.get_first_id_independent_folder(folder)
    for leftover in set(staging.glob("*.pkl")) | set(staging.glob(".submission_file_*")):
        if leftover not in files_before:
            leftover.unlink(missing_ok=True)


def trainer_argv(config_path: Path, overrides: list[str]) -> list[str]:
    argv = ["--config", str(config_path)]
    for item in overrides:
        argv += ["--set", item]
    return argv


def task_jobs(the_plan: Plan, entrypoint: str) -> list[DistributedJob]:
    """The callable every task of each run executes: the trainer with that run's overrides, or the check."""
    if entrypoint != TRAIN_ENTRYPOINT:
        return [DistributedJob(entrypoint)]
    return [DistributedJob(entrypoint, trainer_argv(the_plan.config_path, overrides))
            for overrides in the_plan.run_overrides()]


def shown_call(job: DistributedJob) -> str:
    """A task's call as a user would type it."""
    if job.entrypoint == TRAIN_ENTRYPOINT:
        return shlex.join(["python", "-m", "hidream_ft.train", *job.args[0]])
    return f"{job.entrypoint.replace(':', '.')}()"


def export_command(export_format: str, run_dir: str) -> list[str]:
    """``hidream_ft.convert export`` of a finished LoRA run into ``<run_dir>/export/``."""
    name = "peft" if export_format == "peft" else f"lora-{export_format}.safetensors"
    return [sys.executable, "-m", "hidream_ft.convert", "export", run_dir, "--to", export_format,
            "--out", str(Path(run_dir) / "export" / name)]


def check_export(train: TrainConfig, export_format: str) -> None:
    from hidream_ft.lora import WRITABLE_STYLES  # imports torch: only when an export is asked for

    if export_format not in WRITABLE_STYLES:
        raise ConfigError(f"--then-export {export_format!r}: not a LoRA format this project writes; choose one of "
                          f"{', '.join(WRITABLE_STYLES)}")
    if train.mode != "lora":
        raise ConfigError(f"--then-export writes LoRA files, but train.mode = {train.mode!r}; fold a full "
                          f"fine-tune into the base model with `python -m hidream_ft.convert merge`")


def submitit_folder(cfg: Config) -> str:
    """Where submitit keeps pickles and per-task logs; %j becomes the job id (array: <job>_<task>)."""
    return str(Path(cfg.slurm.folder or Path(cfg.logging.output_dir) / "submitit") / "%j")


def run_dirs(the_plan: Plan) -> list[str]:
    if not the_plan.points:
        return [the_plan.config.logging.output_dir]
    return [p.output_dir for p in the_plan.points]


def check_preempt_signal() -> None:
    if submitit.JobEnvironment.USR_SIG != PREEMPT_SIGNAL:
        raise ConfigError(f"SUBMITIT_PREEMPT_SIGNAL={submitit.JobEnvironment.USR_SIG} in this environment: NCCL "
                          f"uses USR1 and hidream-ft checkpoints on {PREEMPT_SIGNAL}; unset the variable")


def describe(the_plan: Plan, cluster: str, entrypoint: str, then_export: str | None) -> str:
    """Everything --dry-run shows: resources, the sbatch script, each task's call, sweep points, exports."""
    cfg = the_plan.config
    slurm = cfg.slurm
    resources = training_resources(slurm)
    folder = submitit_folder(cfg)
    tasks = task_jobs(the_plan, entrypoint)
    array_size = len(tasks) if len(tasks) > 1 else None
    lines = [f"cluster: {cluster}    submitit folder: {folder}"]
    if cluster == "slurm":
        world = resources.nodes * resources.tasks_per_node
        lines.append(f"training: {resources.nodes} node(s) x {resources.tasks_per_node} task(s) = {world} ranks, "
                     f"{resources.gpus_per_node} GPU(s) per node, {resources.time_min} min, "
                     f"{'one array job of ' + str(array_size) + ' tasks' if array_size else 'one job'}")
        lines += ["--- sbatch script (generated by submitit) ---",
                  sbatch_script(slurm, resources, folder, array_size), "---"]
        if then_export:
            export = export_resources(slurm, "<training job>")
            lines += [f"export: {export.summary()}, one job per training run, each once its run has succeeded",
                      "--- export sbatch script ---", sbatch_script(slurm, export, folder, None), "---"]
    elif cluster == "local":
        params = local_parameters(slurm, resources)
        lines.append("local executor: " + ", ".join(f"{k}={v}" for k, v in params.items()))
    else:
        lines.append("debug executor: one task, in this process")
    lines.append("each task sets RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE MASTER_ADDR MASTER_PORT, then runs "
                 "in-process the equivalent of:")
    for index, (task, run_dir) in enumerate(zip(tasks, run_dirs(the_plan))):
        label = f"[{index}] {the_plan.points[index].name}: " if the_plan.points else ""
        lines.append(f"  {label}{shown_call(task)}")
        if then_export:
            job = f"<training job{'_' + str(index) if array_size else ''}>"
            dependency = export_resources(slurm, job).dependency if cluster == "slurm" else "after success"
            lines.append(f"      then ({dependency}): {shlex.join(export_command(then_export, run_dir))}")
    return "\n".join(lines)


def submit(the_plan: Plan, cluster: str, entrypoint: str, then_export: str | None) -> list[submitit.Job]:
    """Submit the training job (an array for a sweep) and, on SLURM, the dependent export jobs."""
    cfg = the_plan.config
    folder = submitit_folder(cfg)
    executor = make_executor(cluster, folder, cfg.slurm, training_resources(cfg.slurm))
    if cluster == "slurm":
        check_with_sbatch(cfg.slurm, slurm_submissions(the_plan, entrypoint, then_export))
    staging = JobPaths.get_first_id_independent_folder(folder)
    files_before = set(staging.glob("*")) if staging.exists() else set()
    submitted: list[str] = []
    try:
        return submit_jobs(the_plan, cluster, entrypoint, then_export, executor, submitted)
    except (FailedJobError, FailedSubmissionError) as e:  # refused despite the check (a quota, a race)
        withdraw(submitted, folder, files_before)
        cancelled = f"; cancelled the jobs already submitted ({', '.join(submitted)})" if submitted else ""
        raise UserError(f"sbatch refused a job: {' '.join(str(e).split())}{cancelled}") from None


def submit_jobs(the_plan: Plan, cluster: str, entrypoint: str, then_export: str | None,
                executor: submitit.Executor, submitted: list[str]) -> list[submitit.Job]:
    """The submissions themselves, each job id added to ``submitted`` as soon as it is accepted."""
    cfg = the_plan.config
    folder = submitit_folder(cfg)
    tasks = task_jobs(the_plan, entrypoint)
    jobs = [executor.submit(tasks[0])] if len(tasks) == 1 else executor.submit_array(tasks)
    submitted += [job.job_id for job in jobs]
    for job, run_dir in zip(jobs, run_dirs(the_plan)):
        print(f"submitted {job.job_id}: {run_dir}  (logs: {job.paths.stdout.parent})")
    if the_plan.points:
        manifest = the_plan.manifest() | {"cluster": cluster, "job_ids": [job.job_id for job in jobs]}
        path = Path(cfg.logging.output_dir) / "sweep.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(manifest, indent=2) + "\n")
        print(f"sweep manifest: {path}")
    if then_export and cluster == "slurm":
        for job, run_dir in zip(jobs, run_dirs(the_plan)):
            export = make_executor(cluster, folder, cfg.slurm, export_resources(cfg.slurm, job.job_id))
            export_job = export.submit(submitit.helpers.CommandFunction(export_command(then_export, run_dir)))
            submitted.append(export_job.job_id)
            print(f"submitted {export_job.job_id}: export {then_export} of {run_dir} after {job.job_id} succeeds")
    return jobs


def wait_and_export(the_plan: Plan, cluster: str, jobs: list[submitit.Job], then_export: str | None) -> int:
    """Local and debug clusters: wait for every job, report failures, run the exports of the successful runs."""
    status = 0
    for job, run_dir in zip(jobs, run_dirs(the_plan)):
        try:
            results = job.results()  # one per task
        except RuntimeError as e:  # submitit's FailedJobError / UncompletedJobError
            print(f"job {job.job_id} ({run_dir}) failed:\n{e}", file=sys.stderr)
            status = 1
            continue
        print(f"job {job.job_id} ({run_dir}) finished: {results}")
        if then_export:
            folder = submitit_folder(the_plan.config)
            export = make_executor(cluster, folder, the_plan.config.slurm,
                                   export_resources(the_plan.config.slurm, after_job_id=None))
            export_job = export.submit(submitit.helpers.CommandFunction(export_command(then_export, run_dir)))
            try:
                export_job.result()
                print(f"exported {then_export} from {run_dir}")
            except RuntimeError as e:
                print(f"export of {run_dir} failed:\n{e}", file=sys.stderr)
                status = 1
    return status


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m launch.submit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="training TOML file (with an optional [slurm] table)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, slurm.* included (repeatable)")
    parser.add_argument("--sweep", action="append", default=[], metavar="KEY=[V1,V2]",
                        help="sweep a config key over a TOML list, e.g. 'optim.lr=[1e-4, 3e-4]' (repeatable; "
                             "combined with the config's [sweep] table as a cartesian product)")
    parser.add_argument("--cluster", choices=CLUSTERS, default="slurm",
                        help="slurm (default), local (subprocesses on this machine) or debug (in this process)")
    parser.add_argument("--dry-run", action="store_true", help="print the sbatch parameters and commands, submit nothing")
    parser.add_argument("--then-export", metavar="FORMAT",
                        help="after each training run succeeds, run hidream_ft.convert export FORMAT on it")
    parser.add_argument("--check", action="store_true",
                        help="instead of training, form the process group with these resources and all-reduce once")
    return parser.parse_args(argv)


@entry_point
def main(argv: list[str]) -> int:
    args = parse_args(argv)
    entrypoint = CHECK_ENTRYPOINT if args.check else TRAIN_ENTRYPOINT
    check_preempt_signal()
    the_plan = plan(args.config, args.set, args.sweep)
    if args.check and (the_plan.points or args.then_export):
        raise ConfigError("--check runs one communication test; drop --sweep/[sweep] and --then-export")
    if args.then_export:
        check_export(the_plan.config.train, args.then_export)
    if args.dry_run:
        print(describe(the_plan, args.cluster, entrypoint, args.then_export))
        return 0
    jobs = submit(the_plan, args.cluster, entrypoint, args.then_export)
    if args.cluster == "slurm":
        return 0
    return wait_and_export(the_plan, args.cluster, jobs, args.then_export)


if __name__ == "__main__":
    sys.exit(main())
