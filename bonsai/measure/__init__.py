"""Measurement: the one evaluator every stage output goes through (`evaluate`), batch-1 latency
and its defaults (`latency`), the deployable footprint (`footprint`), the side-by-side comparison
and its table and plot (`compare`), and the single-task cuts of multi-task models
(`single_task`)."""
