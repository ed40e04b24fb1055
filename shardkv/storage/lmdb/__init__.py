"""The LMDB storage engine: records that survive restarts, crashes and power loss.

L{engine} is the engine itself; L{layout} says how records and hints are kept
in LMDB, L{datadir} owns the locked data directory, L{committer} is the one
thread that writes, and L{capacity} is how it grows the map and tells a full
disk from a failing one.
"""
