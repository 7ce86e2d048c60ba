"""The webhooks service: WebhookService on gRPC, and the delivery worker (docs/webhooks.md)."""
