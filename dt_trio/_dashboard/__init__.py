"""The web dashboard: pages, a JSON API and live updates over the hub's store and client,
served by hypercorn's trio worker inside the hub's nursery (`_server.serve_dashboard`;
imported only where a dashboard is served, as its web stack takes a while to import)."""

from dt_trio._dashboard._address import DEFAULT_UI, is_loopback, parse_address

__all__ = ["DEFAULT_UI", "is_loopback", "parse_address"]
