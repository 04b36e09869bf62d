"""Training: the shared loop, the DiT and codec trainers, goodput."""
