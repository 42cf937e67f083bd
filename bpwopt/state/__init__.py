"""The state file: measurements, plans and evaluations in SQLite, resumable and migrated forward."""
