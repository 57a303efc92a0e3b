"""OCI distribution-spec grammar, media types and manifest parsing."""
