from dassdp.commands._launch import entry

entry()
