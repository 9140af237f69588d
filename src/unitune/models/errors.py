"""The one error every model failure becomes: a line that names the config key, the model, the
problem and what to do (the CLI prints it without a traceback)."""


class ModelLoadError(ValueError):
    """A model or tokenizer could not be loaded; the message says why and what to do."""
