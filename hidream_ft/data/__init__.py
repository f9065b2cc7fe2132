"""Data pipeline: local folders or WebDataset shards → bucketed, collated micro-batches per optimizer step.

See docs/data.md for the configuration keys, the policies for bad data and the counters.
"""

from hidream_ft.data.pipeline import Pipeline, build_pipeline, list_of_samples
from hidream_ft.data.samples import Sample

__all__ = ["Pipeline", "Sample", "build_pipeline", "list_of_samples"]
