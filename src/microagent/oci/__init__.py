"""OCI content: documents, registry and layout repositories behind one transport protocol."""
