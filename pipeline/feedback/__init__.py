"""What users said: the feedback event, the vote rules, snapshots, lineage and the
importers' parsing."""
