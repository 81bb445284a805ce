"""Data: dataset scanning and the report, image decoding, the torch dataset the loop reads."""
