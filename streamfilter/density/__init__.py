"""The Density sampler and the sampling policies (paper sections 3.2, 3.3, A.2).

- `race.RaceSketch`: the RACE kernel-density sketch over embeddings (p-stable LSH, K-tuples, debiased).
- `quantiles.ScoreQuantiles`: mergeable KLL quantiles of Ask-LLM scores.
- `snapshot.Snapshot` / `SnapshotStore`: one checksummed, atomically written file of the state.
- `state.SketchState`: what the `sketch` aggregator holds (no Kafka).
- `policy`: askllm / density (inverse propensity) / random / askllm+density decisions.
- `calibrate`: choosing the bandwidth w from a sample of embeddings.

Submodules are imported on use; this package imports nothing heavy.
"""
