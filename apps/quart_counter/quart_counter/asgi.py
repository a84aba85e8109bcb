"""What ASGI servers load: ``quart_counter.asgi:app``."""

from . import create_app

app = create_app()
