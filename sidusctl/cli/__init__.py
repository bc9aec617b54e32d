"""The click command-line interface: the only layer that prints, exits or maps errors to exit
codes."""
