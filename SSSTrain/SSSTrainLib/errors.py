"""Errors the SSSTrain panel shows as they are (no traceback): each message says what to do."""


class TrainUserError(RuntimeError):
    """Something the user can fix."""


class SettingsError(TrainUserError):
    """A setting is missing or out of range."""


class SceneDataError(TrainUserError):
    """The scene's cases cannot be written out for training (pairing, transforms, class names)."""


class RunFolderError(TrainUserError):
    """The run folder cannot be used as asked (not writable, no run to resume, no model yet)."""
