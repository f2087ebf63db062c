"""The HTTP server: OpenAI-compatible routes, schemas, errors, auth, metrics and the CLI."""
