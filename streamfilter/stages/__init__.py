"""The three stages of the flow, one module each: score (pass 1), sketch (the aggregator), route (pass 2).

`ScoreTransform` and `RouteTransform` map a micro-batch of Kafka records to output
records and run inside `kafka_loop.TransactionalLoop`; `SketchAggregator` consumes
`crawl.scored` into a `SketchState` and writes snapshots that carry the offsets they
cover. The scoring, the sketch and the policy themselves live in `streamfilter.models` and
`streamfilter.density`; these modules only wire records to them.
"""

from streamfilter.stages.dlq import add_dlq_output
from streamfilter.stages.route import RouteTransform, decide_scored, decision_headers
from streamfilter.stages.score import ScoreTransform
from streamfilter.stages.sketch import SketchAggregator

__all__ = ["RouteTransform", "ScoreTransform", "SketchAggregator", "add_dlq_output", "decide_scored",
           "decision_headers"]
