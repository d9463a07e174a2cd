"""Tests that try to break otel-dl, and the runner that writes docs/reliability.md."""
