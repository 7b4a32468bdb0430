"""Celery entry point for `celery -A worker.celery worker`: the app built from SYNTHGUARD_* settings."""

from worker.app import create_celery_app
from worker.settings import SettingsError, load_settings

try:
    app = create_celery_app(load_settings())
except SettingsError as exc:  # one clear line instead of a traceback
    raise SystemExit(f"synthguard: {exc}") from None
