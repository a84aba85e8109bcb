"""What WSGI servers load: ``flask_counter.wsgi:app``."""

from . import create_app

app = create_app()
