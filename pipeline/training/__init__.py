"""KTO training: encoding, batching, the loss, held-out scoring, the judge and the trainer."""
