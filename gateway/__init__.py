"""The dreamsight gateway: keys, tiers, metering, proxy and metrics (to come)."""
