"""Low-level operators on visible tokens: window geometry, group window attention (and sparse convs)."""
