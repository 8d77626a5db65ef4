//! `controller --otlp-endpoint`: the spans of the controller and of the workers
//! it launches reach an OpenTelemetry collector as one trace.

use e2e::*;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

/// (service, span name, trace id) of one exported span.
type SpanSeen = (String, String, Vec<u8>);

/// A collector that keeps every span it receives.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<SpanSeen>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut out = self.spans.lock().unwrap();
        for rs in req.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|a| a.key == "service.name")
                .and_then(|a| a.value.as_ref())
                .map(|v| format!("{:?}", v.value))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    out.push((service.clone(), s.name, s.trace_id));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[test]
fn spans_of_every_process_form_one_trace() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let collector = Collector::default();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let svc = collector.clone();
    rt.spawn(async move {
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(svc))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
            .await
            .unwrap();
    });

    let dir = tempfile::tempdir().unwrap();
    let cfg = demo_config(dir.path(), &dir.path().join("runs"), &[]);
    let res = std::process::Command::new(bin("controller"))
        .arg("--config")
        .arg(&cfg)
        .args([
            "--max-steps",
            "2",
            "--otlp-endpoint",
            &format!("http://{addr}"),
        ])
        .current_dir(repo_root())
        .output()
        .unwrap();
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );

    let spans = collector.spans.lock().unwrap().clone();
    let mut by_service: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (svc, name, _) in &spans {
        by_service
            .entry(svc.clone())
            .or_default()
            .insert(name.clone());
    }
    eprintln!("{by_service:?}");
    let services: Vec<&String> = by_service.keys().collect();
    for want in ["controller", "policy-worker", "rollout-worker"] {
        assert!(
            services.iter().any(|s| s.contains(want)),
            "no spans from {want}: {services:?}"
        );
    }
    let names: BTreeSet<&str> = spans.iter().map(|s| s.1.as_str()).collect();
    for want in ["step", "nft_step", "call"] {
        assert!(names.contains(want), "no {want} span: {names:?}");
    }
    let traces: BTreeSet<&Vec<u8>> = spans.iter().map(|s| &s.2).collect();
    assert_eq!(traces.len(), 1, "the run is one trace across its processes");
}
