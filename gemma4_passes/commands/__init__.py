"""``gemma4-passes`` subcommands that live in modules of their own (see ``cli.COMMAND_MODULES``)."""
