"""The gRPC front end: the pass-through of VisionService and DiffusionService
(proxy.py) and the gateway's own UsageService and AdminService (servicers.py,
whose protobufs convert.py builds)."""
