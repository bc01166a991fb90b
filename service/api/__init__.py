"""The REST API: `app.py` builds it, `routes/` holds one router per resource, `deps.py` the dependencies."""
