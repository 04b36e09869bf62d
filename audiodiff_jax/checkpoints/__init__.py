"""Weights on disk: Orbax run checkpoints, exports, and the weights source that reads either."""
