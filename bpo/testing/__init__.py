"""Test doubles that are real servers: for tests, benchmarks and dry runs."""
