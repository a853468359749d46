"""Generated protobuf package; regenerate with scripts/gen_protos.py."""
