"""Dependencies the routes share: the service state, as ``ServiceDep``."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from visionloop.serving.service import Service


def get_service(request: Request) -> Service:
    """The app's one Service (``create_app`` puts it on ``app.state``)."""
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]
