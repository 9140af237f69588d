"""The one error of `unitune merge`."""


class MergeError(ValueError):
    """The inputs cannot be merged; the message names the tensor and the sources involved."""
