"""Bonsai tried as a hostile world would: bad input, damaged and edited files, races, moves, full
disks, interrupts. Each file, the faults it covers:

- test_bad_input.py: every kind of bad config, graph and data refused before any work with one
  message and exit 2 (unknown keys, wrong types, out-of-range values, float epochs that slipped
  past the debug cap, lr=inf, a negative split seed, cycles, missing or mismatched stages, unsafe
  stage names such as ../../../evil, /abs/path, 300 characters or unicode, missing or unbalanced
  or unreadable data, models that do not fit the data), and a diverging loss that fails its stage
  at the step it happens instead of caching NaN weights.
- test_files.py: artifacts on disk are never trusted blindly: checksums, no pickle anywhere in the
  code, ONNX external data that escapes its folder, corrupt ONNX files.
- test_store_tampering.py: cache records edited by hand: a pickle planted as a record (its payload
  must never run), a record pointing at another stage's artifact, a record naming its own path,
  truncated, empty or garbled records, a truncated timed model.
- test_store_concurrency.py: commands racing on one store: three creating a new store at once
  (MLflow's migrations), three needing the same uncached stage (built once, reused by the others),
  three identical commands at once through the CLI; a half-migrated database repaired when empty
  and refused with the repair command when it holds runs.
- test_store_relocation.py: a store copied (cp -a) and then moved (mv): every cached stage reused,
  new artifacts written only into the store in use.
- test_store_checks.py: a store path that is a file, a truncated or garbled mlflow.db, a read-only
  store, a tracking server that does not answer: each refused in seconds with exit 2.
- test_kill.py: SIGTERM, Ctrl-C (SIGINT to the process group) and SIGINT to the process alone stop
  the running stage within seconds, end the runs KILLED, cache nothing and exit 128+signal;
  SIGKILL leaves runs that the next start marks KILLED before recomputing.
- test_disk_full.py: the disk fills during evaluation: one message naming the full disk, runs
  FAILED, no half-written file trusted later, and the same command finishes once there is space.
"""
