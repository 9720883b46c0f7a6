"""The Density sampler (paper sections 3.2, A.2): the sketch and its state.

- `race.RaceSketch`: the RACE kernel-density sketch over embeddings (p-stable LSH, K-tuples, debiased).
- `quantiles.ScoreQuantiles`: mergeable KLL quantiles of Ask-LLM scores.
- `snapshot.Snapshot` / `SnapshotStore`: one checksummed, atomically written file of the state.
- `state.SketchState`: what the `sketch` aggregator holds (no Kafka).
- `calibrate`: choosing the bandwidth w from a sample of embeddings.

The sampling policies (askllm, density (inverse propensity, section 3.3), random, ...) that
decide with a snapshot live in `streamfilter.policies`.

Submodules are imported on use; this package imports nothing heavy.
"""
