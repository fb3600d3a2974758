"""Email-parsing gateway: helpdesk notification mail -> parsing rules -> PagerDuty Events API v2."""

__version__ = "0.1.0"
