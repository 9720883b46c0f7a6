"""streamfilter: a streaming data-curation daemon for LLM pre-training.

Implements the two samplers of "How to Train Data-Efficient LLMs" (Sachdeva et al.,
2024) on a Kafka stream: Ask-LLM (quality) and Density (coverage).
"""

__version__ = "0.1.0"
