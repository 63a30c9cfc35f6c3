"""Sampling defaults and input limits, in a module without torch so that the CLI's `--help`
and the database commands start without importing it."""

DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 7.5
DEFAULT_IMAGE_GUIDANCE = 1.5
DEFAULT_MASK_THRESHOLD = 0.0  # local blend off (hive.local_blend); a model folder may turn it on
MAX_VARIANTS = 8
