"""Version of the phantom generator: part of every UID and recorded in every ground truth."""

GENERATOR_VERSION = "1.0.0"
