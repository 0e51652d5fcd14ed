"""Release and operations tooling around the pipeline: the trainer image, the MLflow server launcher, the local GCS
emulator. Nothing in tasks/ imports from here."""
