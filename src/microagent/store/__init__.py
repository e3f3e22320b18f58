"""The content-addressed store: verified blobs, typed step records, built entries, retention."""
