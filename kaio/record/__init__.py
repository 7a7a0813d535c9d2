"""The run's record: its declared types, the journal (source of truth), the derived index, the project's files."""
