"""Private helpers shared by the packages; they import nothing else from dassdp.

``io``         atomic file writes (temp file, fsync, rename)
``allocator``  the memory allocator: the choice, the libraries, what this process runs with
``recompute``  whether a forward is an activation-checkpointing recomputation
``env``        on/off switches read from the environment
``native``     build, cache, verify and load a small C library shipped as source (ctypes)
``yamlfile``   strict YAML reading: UTF-8 text only, no key given twice
"""
