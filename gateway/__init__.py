"""The dreamsight gateway: keys, tiers, metering, the gRPC and HTTP front ends, metrics."""
