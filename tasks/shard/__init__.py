"""Inside one shard: read (fetch + decode), embed, write; the runner that joins them."""
