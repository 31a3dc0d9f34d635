"""Named exit codes of the `senseflow` command and of its child processes."""

OK = 0
FAILURE = 1
CONFIG_ERROR = 2
BIND_ERROR = 3
DESTINATION_UNREACHABLE = 4
BOOT_FAILURE = 5
INTERRUPTED = 130
