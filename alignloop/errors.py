"""One kind of user-facing error: bad input, named by file, line and field (exit code 2)."""


class InputError(Exception):
    """Bad input from the user: a file, a line in it, a field of that line, and what is wrong."""

    def __init__(self, message: str, file=None, line: int | None = None, field: str | None = None):
        super().__init__(message)
        self.message, self.file, self.line, self.field = message, file, line, field

    def __str__(self) -> str:
        where = str(self.file) if self.file is not None else ""
        if self.line is not None:
            where += f":{self.line}"
        if self.field is not None:
            where += f"{' ' if where else ''}field '{self.field}'"
        return f"{where}: {self.message}" if where else self.message
