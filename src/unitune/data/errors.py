"""Data errors and the load report.

`DataError` is what users see: it names the file, the 1-based line (JSONL) or record (other
sources) and the field. `RecordError` is raised by the per-record steps (validation,
tokenization), which do not know where the record came from; the loader turns it into a
`DataError` with the location, or counts it as skipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class DataError(ValueError):
    """A problem with the data, located by file (`path`), 1-based `record` and `field`.

    `record` and `field` are None when the problem concerns the whole file or record.
    `reason` is a short key (e.g. "missing_field"), the one `DataReport.skipped` counts.
    """

    def __init__(
        self,
        path: str,
        record: int | None,
        field: str | None,
        detail: str,
        *,
        reason: str = "invalid",
        unit: str = "record",
    ) -> None:
        self.path = path
        self.record = record
        self.field = field
        self.detail = detail
        self.reason = reason
        self.unit = unit
        where = path
        if record is not None:
            where += f": {unit} {record}"
        if field is not None:
            where += f", field '{field}'" if record is not None else f": field '{field}'"
        super().__init__(f"{where}: {detail}")

    def __reduce__(self):  # keep the keyword arguments when pickled (e.g. across processes)
        args = (self.path, self.record, self.field, self.detail)
        return (_rebuild, (args, {"reason": self.reason, "unit": self.unit}))


def _rebuild(args: tuple, kwargs: dict) -> DataError:
    return DataError(*args, **kwargs)


class RecordError(Exception):
    """A bad record, before its location is known. Internal to `unitune.data`.

    `fatal` marks problems that are not the record's fault (no chat template, a template
    that breaks the prefix property): they are raised even with `on_bad_record="skip"`.
    """

    def __init__(self, field: str | None, reason: str, detail: str, *, fatal: bool = False):
        super().__init__(detail)
        self.field = field
        self.reason = reason
        self.detail = detail
        self.fatal = fatal

    def __reduce__(self):  # keep every argument when sent back from a tokenizing process
        return (_record_error, (self.field, self.reason, self.detail, self.fatal))

    def located(self, path: str, record: int, unit: str) -> DataError:
        return DataError(path, record, self.field, self.detail, reason=self.reason, unit=unit)


def _record_error(field: str | None, reason: str, detail: str, fatal: bool) -> RecordError:
    return RecordError(field, reason, detail, fatal=fatal)


@dataclass
class DataReport:
    """Everything skipped or truncated while loading one source is counted here, and every
    column the format leaves unused: `unused_columns[name]` is the number of kept records that
    have `name` (with a value other than None) although their format does not read it."""

    source: str
    n_records: int
    n_kept: int
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    truncated: int = 0  # records whose response was cut (a pair counts once)
    unused_columns: dict[str, int] = field(default_factory=dict)  # column -> kept records
    cached: bool = False  # read back from the tokenized-data cache (the counts are its build's)

    def summary(self) -> str:
        text = f"{self.source}: kept {self.n_kept} of {self.n_records} records"
        if self.skipped:
            reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items()))
            text += f", skipped {sum(self.skipped.values())} ({reasons})"
        if self.truncated:
            text += f", truncated {self.truncated}"
        if self.unused_columns:
            text += f", unused columns: {format_unused(self.unused_columns)}"
        if self.cached:
            text += " (from the tokenized-data cache)"
        return text


def format_unused(unused: dict[str, int]) -> str:
    """`unused_columns` as text, by name: "messages (3), prompt_id (3)"."""
    return ", ".join(f"{name} ({n})" for name, n in sorted(unused.items()))
