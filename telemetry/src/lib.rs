//! Logging and tracing for sana-rl's processes. Always: `tracing` to stderr
//! (filter from `RUST_LOG`). With an OTLP endpoint (`--otlp-endpoint`, or
//! `OTEL_EXPORTER_OTLP_ENDPOINT`): spans also go to an OpenTelemetry
//! collector over gRPC, and a process started with `TRACEPARENT` (W3C trace
//! context; the controller sets it for the workers it launches) puts its spans
//! under that parent, so a whole run is one trace across processes.

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// The environment variable that carries the parent span to child processes.
pub const TRACEPARENT: &str = "TRACEPARENT";

/// Keeps the exporter alive; dropping it flushes the spans not sent yet.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    /// The process's root span (a child of `TRACEPARENT` when given).
    pub root: tracing::Span,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        // Close the root span before the flush, so it is exported too.
        self.root = tracing::Span::none();
        if let Some(p) = self.provider.take() {
            let _ = p.shutdown();
        }
    }
}

/// Sets up logging (default filter `default_filter` unless `RUST_LOG` says
/// otherwise) and, with an endpoint, OTLP span export as `service`.
pub fn init(service: &str, default_filter: &str, otlp_endpoint: Option<&str>) -> Telemetry {
    let filter = || {
        tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| default_filter.into())
    };
    let endpoint = otlp_endpoint
        .map(String::from)
        .or_else(|| std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok())
        .filter(|e| !e.is_empty());
    let Some(endpoint) = endpoint else {
        tracing_subscriber::registry()
            .with(filter())
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
            .init();
        return Telemetry {
            provider: None,
            root: tracing::Span::none(),
        };
    };
    let exporter = match opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(&endpoint)
        .build()
    {
        Ok(e) => e,
        Err(e) => {
            tracing_subscriber::registry()
                .with(filter())
                .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
                .init();
            tracing::error!(endpoint, "OTLP exporter not started: {e}");
            return Telemetry {
                provider: None,
                root: tracing::Span::none(),
            };
        }
    };
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service.to_string())
        .build();
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build();
    let tracer = provider.tracer(service.to_string());
    // Spans at info and above go to the collector, whatever the console shows.
    let otel = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(tracing_subscriber::filter::LevelFilter::INFO);
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_filter(filter()),
        )
        .with(otel)
        .init();
    let root = tracing::info_span!("process", service, pid = std::process::id());
    if let Ok(tp) = std::env::var(TRACEPARENT) {
        let carrier = HashMap::from([("traceparent".to_string(), tp)]);
        let cx = TraceContextPropagator::new().extract(&carrier);
        let _ = root.set_parent(cx);
    }
    tracing::info!(endpoint, "exporting spans over OTLP");
    Telemetry {
        provider: Some(provider),
        root,
    }
}

/// The W3C `traceparent` of `span`, for a child process's `TRACEPARENT`.
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    carrier.remove("traceparent")
}

use tracing_subscriber::Layer as _;
