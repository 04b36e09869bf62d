"""Ahead-of-time compilation of the train step and the sampling program for a topology."""
