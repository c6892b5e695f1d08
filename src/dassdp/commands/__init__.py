"""One module per ``dassdp`` sub-command (see :mod:`dassdp.cli`)."""
