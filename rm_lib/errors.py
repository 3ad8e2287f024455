"""Errors a user can act on. The CLI prints them as one paragraph, without a traceback."""
from __future__ import annotations


class UserError(Exception):
    """A mistake in input or settings that the user fixes; never a bug of ours.

    `transient` is set where the error is raised: True when the same call may succeed later
    unchanged (a Hub that cannot be reached, a 5xx answer, no answer within the time limit), False
    for anything the user must fix first (a misspelt name, a 404, a refused token, bad data).
    Retrying layers (rm_lib.network) read it instead of guessing from the message."""

    def __init__(self, *args: object, transient: bool = False) -> None:
        super().__init__(*args)
        self.transient = transient
        # raised alike by every process of a launch (a check they agreed on): the first says it for all
        self.every_process = False


class SettingsError(UserError):
    """An invalid value in params.yaml or a --set override, found before any work starts."""


class DataError(UserError):
    """Bad input data, located by file, row and field so the user can find it."""

    def __init__(self, message: str, *, file: str | None = None, row: int | None = None,
                 field: str | None = None, transient: bool = False) -> None:
        self.file, self.row, self.field = file, row, field
        where = []
        if file is not None:
            where.append(f"file {file}")
        if row is not None:
            where.append(f"row {row}")
        if field is not None:
            where.append(f"field '{field}'")
        prefix = (", ".join(where) + ": ") if where else ""
        super().__init__(prefix + message, transient=transient)


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class DevicePathError(UserError):
    """The planned kernel path cannot run as planned on this device; the message names the setting
    that avoids it. Checkpoints are kept."""
