# Shared by the slurm/*.sbatch scripts (sourced, not run).
#
# run_preemptible COMMAND...   runs COMMAND (an srun step) and waits for it, surviving SLURM's warnings:
#   USR2 (time-limit warning, sent to this batch shell by `#SBATCH --signal=B:USR2@120`): forwarded to every
#        process of the job's steps; the training checkpoints at the end of its step and exits; once the step
#        has ended, the job is requeued and resumes from that checkpoint (checkpoint.resume = "auto").
#   TERM (preemption or scancel): SLURM has signalled the steps already; the training checkpoints and exits,
#        and this shell waits for it instead of dying first. A preempted job submitted with --requeue is
#        requeued by SLURM itself; a cancelled one is not.
# Returns the step's exit status.
run_preemptible() {
    local requeue=0 step status
    # Forward once: a second USR2 (SLURM may repeat it) must not start another round.
    trap 'if (( ! requeue )); then requeue=1;
              echo "$(date +%T) USR2: time limit near, asking the training to checkpoint and stop";
              scancel --signal=USR2 "$SLURM_JOB_ID"; fi' USR2
    trap 'echo "$(date +%T) TERM: the training checkpoints and stops"' TERM
    "$@" &
    step=$!
    # A trapped signal interrupts `wait`; keep waiting until the step has really ended.
    while kill -0 "$step" 2>/dev/null; do
        wait "$step"
    done
    wait "$step"
    status=$?
    trap - USR2 TERM
    if (( requeue )); then
        echo "$(date +%T) requeueing job $SLURM_JOB_ID (step exit status $status)"
        scontrol requeue "$SLURM_JOB_ID"
    fi
    return "$status"
}

# The torchrun options every script uses: forward USR2 to the workers (torchrun forwards only TERM, INT, HUP and
# QUIT by default, and would die on USR2), and give them time to checkpoint before it kills them (honoured by
# torch >= 2.12; older versions kill 30 s after forwarding).
TORCHRUN_PREEMPTION_OPTS=(--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR2)
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-100}"

# Training processes per node: $NPROC_PER_NODE if set, else the GPUs SLURM granted on this node, else 1.
nproc_per_node() {
    echo "${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}"
}
