"""The one error type that crosses the CLI boundary (exit code 2, one line on stderr)."""


class ConfigError(ValueError):
    """Bad user input: names the offending flag and what is allowed."""

    def __init__(self, flag: str, message: str):
        super().__init__(f"{flag}: {message}")
        self.flag = flag
        self.message = message


class Busy(ConfigError):
    """A folder that another fedbench process is writing (``fedbench.launch.exclusive``)."""
