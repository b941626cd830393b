"""Serving: models as Ray Serve applications (deploy, stat, routing, the worker)."""
