"""What the three dreamsight servers share: lifecycle, health, errors, metrics,
image limits and the demo-model marker. Imports no protobuf-free heavy
dependencies (no torch) so the gateway stays light."""
