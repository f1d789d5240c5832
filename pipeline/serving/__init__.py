"""What serves: version names and the adapter files' checks."""
