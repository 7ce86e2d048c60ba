"""http-gateway: the HTTP/JSON face of TrackingService and DispatchService (routes from
the protos' google.api.http options), Server-Sent Events and NDJSON for the streams,
the public tracking page `/t/{token}` and the dispatch board `/dispatch`."""
