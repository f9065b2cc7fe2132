"""Run-time services of a training job: checkpoints and preemption signals."""
