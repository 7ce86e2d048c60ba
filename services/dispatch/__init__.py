"""The dispatch service: dispatchers subscribe to their tenant's delay alerts.

`hub` reads the alerts topic once per process and fans out to subscriptions;
`tokens` encodes resume positions; `filters` compiles a subscriber's filter;
`servicer` is the gRPC surface; `app` wires the process. See docs/alerts.md.
"""
