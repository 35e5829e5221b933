"""The application keys of the service's web app: what ``app.make_app`` sets up and the
handlers use, typed (``web.AppKey``)."""

from __future__ import annotations

from aiohttp import web

from ..settings import Settings
from .feed import Feeds, Topic
from .logins import LoginLimit
from .runner import Runner
from .store import Store

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", Store)
RUNNER = web.AppKey("runner", Runner)
FEEDS = web.AppKey("feeds", Feeds)
EVENTS = web.AppKey("events", Topic)
LOGINS = web.AppKey("logins", LoginLimit)
