"""Replay: re-route or re-score a fixed range of a topic under another policy or snapshot.

- `ranges`: `--from`/`--to` positions (offsets, message timestamps, earliest/latest) resolved
  to a fixed [start, end) per partition.
- `job`: a replay job's identity (group and transactional id) and its description, stored
  in the metadata of the group's committed offsets so that a restart resumes the same range.
- `reader`: reads a fixed range without a group (dry-run and comparisons).
- `compare`: keep rates, overlap, score distributions and kept shares of policies (pure).
- `progress`: a progress bar on a terminal, periodic log lines otherwise.
- `spec`: what a replay or a comparison was asked to do (frozen; the arguments as values).
- `checks`: what is checked before anything is read or written (topics, snapshot, outputs).
- `run`: `ReplayJob`, one route or rescore replay: prepare (check, fix or resume the range,
  load the snapshot, record the start), then run it exactly once to a `ReplayResult`.
- `decide`: a dry-run and a comparison of policies: a range decided without writing.

The command line (`streamfilter replay`, `streamfilter compare`) is `streamfilter.commands.replay`;
nothing here parses arguments or changes the configuration it is given.

The transactional path itself is `kafka_loop.TransactionalLoop` with `RangeBounds`, and the
decisions are `stages.RouteTransform`'s: a replay decides exactly as the live route does.
"""
