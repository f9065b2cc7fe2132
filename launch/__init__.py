"""Cluster launch for hidream-ft: ``python -m launch.submit`` (submitit: SLURM jobs, sweeps as job arrays,
export afterwards), and for the plain sbatch scripts in ``slurm/`` ``python -m launch.sweep`` (sweep points) and
``python -m launch.torchrun`` (torchrun that ends a preempted run with the requeue status). See docs/cluster.md."""
