"""Replay: re-route or re-score a fixed range of a topic under another policy or snapshot.

- `ranges`: `--from`/`--to` positions (offsets, message timestamps, earliest/latest) resolved
  to a fixed [start, end) per partition.
- `job`: a replay job's identity (group and transactional id) and its description, stored
  in the metadata of the group's committed offsets so that a restart resumes the same range.
- `reader`: reads a fixed range without a group (dry-run and comparisons).
- `compare`: keep rates, overlap, score distributions and kept shares of policies (pure).
- `progress`: a progress bar on a terminal, periodic log lines otherwise.
- `cli`: `streamfilter replay` and `streamfilter compare`.

The transactional path itself is `kafka_loop.TransactionalLoop` with `RangeBounds`, and the
decisions are `stages.RouteTransform`'s: a replay decides exactly as the live route does.
"""
