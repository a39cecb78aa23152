"""The pipeline layer's user error, importable without kfp (``palp pipeline`` reports it as one line)."""


class PipelineError(ValueError):
    """A backend, accelerator or experiment the pipeline cannot take; the message says what to fix."""
