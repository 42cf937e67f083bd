"""`bpwopt serve`: the optimizer as a local web service (a JSON API over the state files under some roots)."""
