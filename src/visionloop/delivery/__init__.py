"""Delivery: the container images (deploy/docker/), their wheelhouses, a base image without a public registry, and
pushing them to a registry. ``visionloop images …`` is the command line of ``images.py``."""
