"""The one exception the data layer raises for bad user data, and the skip-or-raise policy for bad records."""

from __future__ import annotations

SKIP_HINT = "or pass skip_bad_records=True to skip such records"


class DataError(ValueError):
    """Bad training data; the one-line message says where (file:line or file[index]), what and what to do."""


class BadRecords:
    """Called with each bad record's error: raises it, or counts it when ``skip`` is set."""

    def __init__(self, skip: bool) -> None:
        self.skip = skip
        self.count = 0

    def __call__(self, error: DataError) -> None:
        if not self.skip:
            raise error
        self.count += 1
