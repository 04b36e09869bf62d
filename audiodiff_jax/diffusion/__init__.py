"""The diffusion math: the v-objective and time schedules (objective.py), the samplers (samplers.py)."""
