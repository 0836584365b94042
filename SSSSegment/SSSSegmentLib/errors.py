"""Errors the SSSSegment panel shows to the user as they are (no traceback)."""


class UserFacingError(RuntimeError):
    """Something the user can fix; the message says what and how."""


class TaskModelRequiredError(UserFacingError):
    """Auto-segment was asked for without a usable task model."""


class NeedsNewerSlicerError(UserFacingError):
    """This Slicer's Python is too old for sss_lib (Slicer 5.10+ is needed)."""


class TorchUpgradeNeedsRestartError(UserFacingError):
    """torch (or torchvision) is already imported in this Slicer and older than SSS needs."""


class InstallationError(UserFacingError):
    """Installing a package failed; the message says why (offline, disk full, ...) and what to do."""
