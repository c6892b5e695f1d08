from dassdp.cli import entry

entry()
