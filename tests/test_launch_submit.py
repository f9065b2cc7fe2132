"""launch.submit without a cluster: --dry-run output, SLURM parameters, [slurm] validation, the task environment,
and the preemption logic the sbatch scripts share (slurm/lib.sh) against stand-in SLURM commands."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import submitit

from helpers import write_config
from hidream_ft.config import load_config
from launch import submit
from launch.jobs import distributed_env, master_port

REPO = Path(__file__).resolve().parents[1]


def sbatch_options(dry_run_output: str) -> dict[str, str | bool]:
    """``#SBATCH --key=value`` lines of the printed script → {key: value}; flags map to True."""
    options = {}
    for key, _, value in re.findall(r"^#SBATCH --([\w-]+)(=(.*))?$", dry_run_output, flags=re.M):
        options[key] = value if value else True
    return options


def dry_run(capsys, *argv) -> str:
    assert submit.main([*argv, "--dry-run"]) == 0
    return capsys.readouterr().out


def test_dry_run_of_a_four_node_job(tmp_path, capsys):
    config = write_config(tmp_path, '[slurm]\npartition = "gpu"\naccount = "proj"\nqos = "high"\n'
                                    'constraint = "h100"\nmem = "0"\ntime_min = 720\n'
                                    'sbatch = { reservation = "big", mail-type = "END" }\n')
    out = dry_run(capsys, "--config", str(config), "--set", "slurm.nodes=4", "--set", "optim.lr=5e-5")
    options = sbatch_options(out)
    expected = {"nodes": "4", "ntasks-per-node": "8", "gpus-per-node": "8", "signal": "USR2@120", "requeue": True,
                "partition": "gpu", "account": "proj", "qos": "high", "constraint": "h100", "mem": "0",
                "time": "720", "reservation": "big", "mail-type": "END", "job-name": "hidream-ft"}
    assert {k: options.get(k) for k in expected} == expected
    assert "array" not in options and "dependency" not in options
    assert "export SUBMITIT_PREEMPT_SIGNAL=USR2" in out
    assert "4 node(s) x 8 task(s) = 32 ranks" in out
    call = f"python -m hidream_ft.train --config {config} --set slurm.nodes=4 --set optim.lr=5e-5"
    assert call in out


def test_dry_run_of_a_sweep_is_one_array_job(tmp_path, capsys):
    config = write_config(tmp_path, '[slurm]\narray_parallelism = 2\n[sweep]\n"optim.lr" = [1e-4, 3e-4, 1e-3]\n')
    out = dry_run(capsys, "--config", str(config))
    assert sbatch_options(out)["array"] == "0-2%2"
    for index, lr in enumerate(["0.0001", "0.0003", "0.001"]):
        run_dir = tmp_path / "runs" / f"lr={lr}"
        assert f"[{index}] lr={lr}: " in out
        assert f"--set optim.lr={lr} --set 'logging.output_dir=\"{run_dir}\"'" in out


def test_dry_run_with_an_export_after_training(tmp_path, capsys):
    config = write_config(tmp_path, "[slurm]\nexport_gpus = 0\n")
    out = dry_run(capsys, "--config", str(config), "--then-export", "comfyui")
    assert re.search(r"then \(afterok:<training job>\): \S+ -m hidream_ft.convert", out)
    assert str(tmp_path / "runs") in out.splitlines()[-1]


def test_dry_run_shows_the_export_jobs_resources(tmp_path, capsys):
    config = write_config(tmp_path, "[slurm]\nexport_gpus = 2\nexport_time_min = 30\n")
    out = dry_run(capsys, "--config", str(config), "--then-export", "comfyui")
    assert "export: 1 node(s) x 1 task(s), 2 GPU(s) per node, 30 min" in out
    export_script = out.split("--- export sbatch script ---")[1].split("\n---")[0]
    assert {k: sbatch_options(export_script).get(k) for k in ("gpus-per-node", "time", "job-name")} == {
        "gpus-per-node": "2", "time": "30", "job-name": "hidream-ft-export"}


@pytest.fixture()
def fake_slurm(tmp_path, monkeypatch):
    """srun, sbatch and scancel stand-ins; sbatch keeps each script it is given and answers with job ids 1000, 1001,
    …; ``sbatch --test-only`` accepts every script; scancel records its arguments in scancel.log."""
    bin_dir, scripts = tmp_path / "bin", tmp_path / "sbatch-scripts"
    bin_dir.mkdir()
    scripts.mkdir()
    (bin_dir / "srun").write_text("#!/bin/bash\nexit 1\n")
    (bin_dir / "sbatch").write_text(f'#!/bin/bash\n[[ $1 == --test-only ]] && exit 0\n'
                                    f'n=$(ls {scripts} | wc -l)\ncp "$1" {scripts}/$n.sh\n'
                                    f'echo "Submitted batch job $((1000 + n))"\n')
    (bin_dir / "scancel").write_text(f'#!/bin/bash\necho "$*" >> {tmp_path / "scancel.log"}\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return lambda: [(scripts / f"{i}.sh").read_text() for i in range(len(list(scripts.iterdir())))]


def test_sweep_with_exports_submits_one_array_then_dependent_exports(tmp_path, capsys, fake_slurm):
    config = write_config(tmp_path, '[slurm]\npartition = "gpu"\n')
    assert submit.main(["--config", str(config), "--sweep", "optim.lr=[1e-4, 3e-4]", "--then-export", "comfyui"]) == 0
    training, *exports = fake_slurm()
    assert sbatch_options(training)["array"] == "0-1%2" and sbatch_options(training)["partition"] == "gpu"
    assert [sbatch_options(e)["dependency"] for e in exports] == ["afterok:1000_0", "afterok:1000_1"]
    assert all(sbatch_options(e)["ntasks-per-node"] == "1" for e in exports)
    manifest = json.loads((tmp_path / "runs" / "sweep.json").read_text())
    assert manifest["job_ids"] == ["1000_0", "1000_1"] and manifest["cluster"] == "slurm"
    out = capsys.readouterr().out
    assert "submitted 1001: export comfyui of" in out and "after 1000_1 succeeds" in out


def refuse(fake_bin: Path, condition: str, message: str):
    """Make the stand-in sbatch refuse, with ``message``, the calls where the bash ``condition`` holds."""
    sbatch = fake_bin / "sbatch"
    lines = sbatch.read_text().splitlines()
    lines.insert(1, f'if {condition}; then echo "sbatch: error: {message}" >&2; exit 1; fi')
    sbatch.write_text("\n".join(lines) + "\n")


def test_a_job_sbatch_would_refuse_submits_nothing(tmp_path, capsys, fake_slurm):
    # A partition without GPUs: --test-only refuses every script that asks for some.
    refuse(tmp_path / "bin", '[[ $1 == --test-only ]] && grep -q gpus-per-node "$2"', "Invalid generic resource")
    config = write_config(tmp_path, "[slurm]\ngpus_per_node = 0\n")
    assert submit.main(["--config", str(config), "--then-export", "comfyui"]) == 2
    err = capsys.readouterr().err
    assert "SLURM would not run the export job (1 node(s) x 1 task(s), 1 GPU(s) per node" in err
    assert "Invalid generic resource" in err and "nothing was submitted" in err and err.count("\n") == 1
    assert fake_slurm() == [] and not (tmp_path / "runs" / "submitit").exists()


def test_a_refusal_after_the_check_cancels_what_was_submitted(tmp_path, capsys, fake_slurm):
    refuse(tmp_path / "bin", f'[[ -e {tmp_path / "sbatch-scripts" / "0.sh"} && $1 != --test-only ]]',
           "QOSMaxSubmitJobPerUserLimit")
    config = write_config(tmp_path, "[slurm]\nexport_gpus = 0\n")
    assert submit.main(["--config", str(config), "--then-export", "comfyui"]) == 2
    err = capsys.readouterr().err
    assert "QOSMaxSubmitJobPerUserLimit" in err and "cancelled the jobs already submitted (1000)" in err
    assert (tmp_path / "scancel.log").read_text() == "1000\n"
    staging = tmp_path / "runs" / "submitit"
    assert [p.name for p in staging.iterdir() if p.is_file() and not p.is_symlink()] == []


def test_export_job_parameters(tmp_path):
    cfg = load_config(write_config(tmp_path, '[slurm]\nexport_gpus = 1\nexport_time_min = 30\npartition = "p"\n'))
    params = submit.sbatch_parameters(cfg.slurm, submit.export_resources(cfg.slurm, "1234_2"))
    assert params["dependency"] == "afterok:1234_2"
    assert (params["nodes"], params["ntasks_per_node"], params["gpus_per_node"], params["time"]) == (1, 1, 1, 30)
    assert params["partition"] == "p" and params["job_name"] == "hidream-ft-export"


def test_cpu_only_jobs_run_one_task_per_node_unless_told(tmp_path):
    cfg = load_config(write_config(tmp_path), ["slurm.gpus_per_node=0"])
    assert cfg.slurm.tasks == 1 and "gpus_per_node" not in submit.sbatch_parameters(
        cfg.slurm, submit.training_resources(cfg.slurm))
    assert load_config(None, ["slurm.gpus_per_node=0", "slurm.tasks_per_node=4"]).slurm.tasks == 4


@pytest.mark.parametrize("override, message", [
    ("slurm.nodes=0", "slurm.nodes: must be ≥ 1"),
    ("slurm.signal_delay_s=600", "signal_delay_s: 600 s leaves no run time within time_min = 10"),
    ("slurm.sbatch.signal='USR1@60'", "slurm.sbatch.signal: set by the launcher"),
    ("slurm.sbatch.ntasks_per_node=2", "slurm.sbatch.ntasks_per_node: set by the launcher"),
    ("slurm.sbatch.comment=[1]", "expected a string, integer or boolean"),
    ("slurm.partion='gpu'", "did you mean 'partition'"),
])
def test_bad_slurm_settings_are_one_line_errors(tmp_path, capsys, override, message):
    config = write_config(tmp_path, "[slurm]\ntime_min = 10\n")
    assert submit.main(["--config", str(config), "--set", override, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_local_cluster_refuses_several_nodes(tmp_path, capsys):
    config = write_config(tmp_path, "[slurm]\nnodes = 2\n")
    assert submit.main(["--config", str(config), "--cluster", "local", "--dry-run"]) == 2
    assert "set slurm.nodes = 1" in capsys.readouterr().err


def test_slurm_cluster_without_srun_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert submit.main(["--config", str(write_config(tmp_path))]) == 2
    assert "no srun on this machine" in capsys.readouterr().err


def test_usr1_as_preemption_signal_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(submitit.JobEnvironment, "USR_SIG", "USR1")
    assert submit.main(["--config", str(write_config(tmp_path)), "--dry-run"]) == 2
    assert "NCCL uses USR1" in capsys.readouterr().err


def test_check_refuses_a_sweep(tmp_path, capsys):
    config = write_config(tmp_path)
    assert submit.main(["--config", str(config), "--check", "--sweep", "optim.lr=[1, 2]", "--dry-run"]) == 2
    assert "--check runs one communication test" in capsys.readouterr().err


def test_task_environment_from_the_slurm_view():
    job = SimpleNamespace(num_tasks=16, num_nodes=2, global_rank=11, local_rank=3, job_id="4242_1",
                          hostnames=["gpu-a17", "gpu-a18"])
    assert distributed_env(job) == {"RANK": "11", "WORLD_SIZE": "16", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "8",
                                    "MASTER_ADDR": "gpu-a17", "MASTER_PORT": str(master_port("4242_1"))}
    single = SimpleNamespace(num_tasks=8, num_nodes=1, global_rank=0, local_rank=0, job_id="7", hostnames=["n"])
    assert distributed_env(single)["MASTER_ADDR"] == "127.0.0.1"


def test_master_port_is_stable_per_job_and_spread_across_jobs():
    assert master_port("123") == master_port("123")
    ports = {master_port(str(job)) for job in range(200)}
    assert len(ports) > 190 and all(20000 <= p < 40000 for p in ports)


# slurm/lib.sh: run_preemptible against stand-in srun/scancel/scontrol that log their calls.

STEP = r"""
import os, signal, sys, time
stop = []
signal.signal(signal.SIGUSR2, lambda *a: stop.append("USR2"))
signal.signal(signal.SIGTERM, lambda *a: stop.append("TERM"))
open(sys.argv[1], "w").write(str(os.getpid()))
deadline = time.time() + 30
while not stop and time.time() < deadline:
    time.sleep(0.01)
sys.exit(75 if stop else 0)
"""


def run_batch_script(tmp_path, deliver):
    """Run a batch shell that sources lib.sh and runs a fake step; ``deliver(shell_pid, step_pid)`` plays SLURM."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    # scancel --signal=SIG JOB signals the job's steps (here: the step process), as SLURM does.
    (bin_dir / "scancel").write_text(f'#!/bin/bash\necho "scancel $*" >> {log}\n'
                                     f'kill -"${{1#--signal=}}" "$(cat {tmp_path / "step.pid"})"\n')
    (bin_dir / "scontrol").write_text(f'#!/bin/bash\necho "scontrol $*" >> {log}\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    (tmp_path / "step.py").write_text(STEP)
    script = (f'source {REPO / "slurm" / "lib.sh"}\n'
              f'run_preemptible {sys.executable} {tmp_path / "step.py"} {tmp_path / "step.pid"}\n'
              f'echo "status $?" >> {log}\n')
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="777")
    shell = subprocess.Popen(["bash", "-c", script], env=env, stdout=subprocess.PIPE, text=True)
    pid_file = tmp_path / "step.pid"
    deadline = time.time() + 30
    while not (pid_file.exists() and pid_file.read_text()) and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.2)  # let the step install its handlers
    deliver(shell.pid, int(pid_file.read_text()))
    shell.communicate(timeout=60)
    return log.read_text().splitlines()


def test_batch_script_forwards_the_time_limit_warning_then_requeues(tmp_path):
    calls = run_batch_script(tmp_path, lambda shell, step: os.kill(shell, signal.SIGUSR2))
    assert calls == ["scancel --signal=USR2 777", "scontrol requeue 777", "status 75"]


def test_batch_script_outlives_preemption_without_requeueing(tmp_path):
    def preempt(shell, step):  # SLURM signals the batch shell and the steps alike
        os.kill(shell, signal.SIGTERM)
        os.kill(step, signal.SIGTERM)

    assert run_batch_script(tmp_path, preempt) == ["status 75"]


@pytest.mark.parametrize("script", sorted((REPO / "slurm").glob("*.sbatch")), ids=lambda p: p.name)
def test_sbatch_scripts_parse_and_ask_for_the_warning_and_requeue(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "#SBATCH --signal=B:USR2@120" in text and "#SBATCH --requeue" in text
    assert "run_preemptible srun" in text and "TORCHRUN_PREEMPTION_OPTS" in text


def run_sbatch_script(tmp_path, name, args, **slurm_env):
    """Run slurm/<name> as SLURM would, with srun replaced by a recorder; returns srun's argument list."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "srun.args"
    (bin_dir / "srun").write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" > {record}\n')
    (bin_dir / "scontrol").write_text('#!/bin/bash\n[[ "$1 $2" == "show hostnames" ]] && printf "gpu-a7\\ngpu-a8\\n"\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    # Submitted from elsewhere than the repository: the scripts find lib.sh beside themselves.
    env = dict(os.environ, PATH=f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
               SLURM_SUBMIT_DIR=str(tmp_path), SLURM_JOB_ID="4321", SLURM_GPUS_ON_NODE="8",
               SLURM_CPUS_ON_NODE="64", **slurm_env)
    done = subprocess.run(["bash", str(REPO / "slurm" / name), *args], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return record.read_text().splitlines()


def test_single_node_script_runs_one_torchrun_with_a_worker_per_gpu(tmp_path):
    argv = run_sbatch_script(tmp_path, "single-node.sbatch", ["cfg.toml", "--set", "optim.lr=5e-5"])
    assert argv[:2] == ["--ntasks=1", "--cpus-per-task=64"]  # the step gets every CPU of the job
    torchrun = argv[argv.index("launch.torchrun"):]
    assert "--standalone" in torchrun and "--nproc-per-node=8" in torchrun
    assert "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR2" in torchrun
    assert torchrun[-6:] == ["-m", "hidream_ft.train", "--config", "cfg.toml", "--set", "optim.lr=5e-5"]


def test_multi_node_script_meets_on_the_first_node(tmp_path):
    argv = run_sbatch_script(tmp_path, "multi-node.sbatch", ["cfg.toml"], SLURM_JOB_NODELIST="gpu-a[7-8]",
                             SLURM_JOB_NUM_NODES="2")
    assert argv[:2] == ["--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert {"--nnodes=2", "--rdzv-backend=c10d", f"--rdzv-endpoint=gpu-a7:{20000 + 4321}",
            "--rdzv-id=4321"} <= set(argv)


def test_array_script_trains_its_own_sweep_point(tmp_path):
    config = write_config(tmp_path, '[sweep]\n"optim.lr" = [1e-4, 3e-4]\n')
    argv = run_sbatch_script(tmp_path, "array.sbatch", [str(config), "--sweep", "lora.rank=[4, 8]"],
                             SLURM_ARRAY_TASK_ID="2")
    trainer = argv[argv.index("hidream_ft.train") + 1:]
    run_dir = tmp_path / "runs" / "lr=0.0003,rank=4"
    assert trainer == ["--config", str(config), "--set", "optim.lr=0.0003", "--set", "lora.rank=4",
                       "--set", f'logging.output_dir="{run_dir}"', "--set", "sweep={}"]


@pytest.mark.distributed
@pytest.mark.parametrize("worker_status, status", [(75, 75), (3, 1)])
def test_sbatch_torchrun_reports_a_preempted_run_quietly_and_a_failure_as_torchrun_does(tmp_path, worker_status,
                                                                                       status):
    worker = tmp_path / "worker.py"
    worker.write_text(f"import sys\nsys.exit({worker_status})\n")
    done = subprocess.run([sys.executable, "-m", "launch.torchrun", "--standalone", "--nproc-per-node=1",
                           str(worker)], capture_output=True, text=True, timeout=120)
    assert done.returncode == status
    assert ("Traceback" in done.stderr) == (worker_status != 75), done.stderr

