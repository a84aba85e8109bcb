"""What ASGI servers load: ``fastapi_counter.main:app``."""

from . import create_app

app = create_app()
