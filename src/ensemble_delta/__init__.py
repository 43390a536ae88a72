"""ensemble-delta: do the weight deltas of fine-tuned specialists predict what combining them gains?"""

__version__ = "0.1.0"
