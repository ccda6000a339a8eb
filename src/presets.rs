//! Ready-made layers for common webhook senders.
//!
//! Webhook senders name each delivery themselves, retry for hours or days, and treat anything
//! but a 2xx answer (or no answer in time) as a failure to retry. Each preset reads the
//! sender's delivery id, keeps records for longer than the sender retries, waits briefly for an
//! in-flight duplicate instead of answering `409` (which the sender would only retry), and adds
//! the sender's name to the scope so two senders' ids never collide.
//!
//! Presets keep the default fingerprint (method, path, query, whole body): these senders resend
//! a delivery's body unchanged, and what varies between attempts (signature timestamps) is in
//! headers, which the fingerprint never covers.
//!
//! Verify the sender's signature **before** this layer (place the verifying layer outside it),
//! so that unsigned requests cannot claim keys; see the `webhook_signature` example.

use std::time::Duration;

use http::HeaderName;

use crate::layer::IdempotencyLayer;
use crate::source::KeySource;

const HOUR: u64 = 60 * 60;
const DAY: u64 = 24 * HOUR;

impl<St> IdempotencyLayer<St> {
    fn webhook_preset(
        store: St,
        namespace: &str,
        source: KeySource,
        record_ttl: Duration,
        wait: Duration,
    ) -> Self {
        Self::new(store)
            .key_source(source)
            .namespace(namespace)
            .record_ttl(record_ttl)
            .wait_for_in_flight(wait)
    }

    /// Standard Webhooks and Svix: the `webhook-id` header (else `svix-id`).
    ///
    /// Records are kept 3 days (Svix retries over about 28 hours); an in-flight duplicate waits
    /// up to 10 s (Svix gives a receiver 15 s). Namespace `standard-webhooks`.
    pub fn standard_webhooks(store: St) -> Self {
        let source = KeySource::first_header_of([
            HeaderName::from_static("webhook-id"),
            HeaderName::from_static("svix-id"),
        ]);
        let ttl = Duration::from_secs(3 * DAY);
        Self::webhook_preset(
            store,
            "standard-webhooks",
            source,
            ttl,
            Duration::from_secs(10),
        )
    }

    /// Stripe: the event `id` in the JSON body (`evt_...`); Stripe sends no delivery header.
    ///
    /// Records are kept 4 days (Stripe retries live-mode events for up to 3 days); an in-flight
    /// duplicate waits up to 8 s. Namespace `stripe`.
    #[cfg(feature = "json")]
    pub fn stripe_webhooks(store: St) -> Self {
        let ttl = Duration::from_secs(4 * DAY);
        let source = KeySource::json_field("id");
        Self::webhook_preset(store, "stripe", source, ttl, Duration::from_secs(8))
    }

    /// GitHub: the `X-GitHub-Delivery` header (a GUID per delivery, kept on redelivery).
    ///
    /// Records are kept 4 days (deliveries can be redelivered for 3 days); an in-flight
    /// duplicate waits up to 8 s (GitHub gives a receiver 10 s). Namespace `github`.
    pub fn github_webhooks(store: St) -> Self {
        let source = KeySource::header(HeaderName::from_static("x-github-delivery"));
        let ttl = Duration::from_secs(4 * DAY);
        Self::webhook_preset(store, "github", source, ttl, Duration::from_secs(8))
    }

    /// Shopify: the `X-Shopify-Event-Id` header (else `X-Shopify-Webhook-Id`).
    ///
    /// Shopify's guidance is to deduplicate on the event id, which is the same for every
    /// delivery of one event, retries included; the webhook id names one delivery and is the
    /// fallback for older API versions without an event id. Records are kept 1 day (Shopify
    /// retries 8 times over 4 hours); an in-flight duplicate waits up to 4 s (Shopify gives a
    /// receiver 5 s). Namespace `shopify`.
    pub fn shopify_webhooks(store: St) -> Self {
        let source = KeySource::first_header_of([
            HeaderName::from_static("x-shopify-event-id"),
            HeaderName::from_static("x-shopify-webhook-id"),
        ]);
        let ttl = Duration::from_secs(DAY);
        Self::webhook_preset(store, "shopify", source, ttl, Duration::from_secs(4))
    }

    /// Any sender following the common convention: `X-Idempotency-Key` (or `Idempotency-Key`),
    /// both read as by [`IdempotencyLayer::new`].
    ///
    /// Records are kept 3 days; an in-flight duplicate waits up to 8 s. Namespace `webhook`.
    pub fn generic_webhooks(store: St) -> Self {
        let ttl = Duration::from_secs(3 * DAY);
        Self::webhook_preset(
            store,
            "webhook",
            KeySource::default(),
            ttl,
            Duration::from_secs(8),
        )
    }
}
