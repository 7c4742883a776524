"""Embedded stand-ins for the platform's services (Postgres, Redis, a Kafka-compatible broker), started under
the state directory when no external service is configured."""
