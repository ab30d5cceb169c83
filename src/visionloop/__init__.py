"""visionloop: the whole production loop of an image classifier in one repository."""

__version__ = "0.1.0"
