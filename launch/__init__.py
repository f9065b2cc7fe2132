"""Cluster launch for hidream-ft: ``python -m launch.submit`` (submitit: SLURM jobs, sweeps as job arrays,
export afterwards) and ``python -m launch.sweep`` (sweep points for the plain sbatch scripts in ``slurm/``).
See docs/cluster.md."""
