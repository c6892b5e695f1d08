"""Private helpers shared by the packages; they import nothing else from dassdp.

``io``         atomic file writes (temp file, fsync, rename)
``allocator``  the memory allocator: the choice, the libraries, what this process runs with
``recompute``  whether a forward is an activation-checkpointing recomputation
``env``        on/off switches read from the environment
"""
