"""Feedback in and out of Kafka, the HTTP endpoint, the event store and the vote table."""
