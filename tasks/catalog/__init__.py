"""The catalogue: versions (manifest, commit, history), the reader, the one builder of versions, leases, gc and the runs log; `layout` names every key."""
