"""The commands besides `run`: parse (dry run), send (load generator), appender-xml,
check-config."""
