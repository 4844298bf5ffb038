"""Output formats, one module each: rich table, JSON, Markdown, HDF5 (and, for ``check``, JUnit and GitHub)."""
