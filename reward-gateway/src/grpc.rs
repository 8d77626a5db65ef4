//! The gRPC face of the engine (`sana_rl.reward.v1.RewardGateway`).

use crate::engine::{Answer, Engine, EngineError, FailureKind};
use proto::reward::v1::reward_gateway_server::{RewardGateway, RewardGatewayServer};
use proto::reward::v1::{FetchReply, FetchRequest, ScoreRequest, ScoreResult, SubmitReply};
use std::time::Duration;
use tonic::{Request, Response, Status};

pub struct GatewayService {
    engine: Engine,
}

fn status(e: EngineError) -> Status {
    match e {
        EngineError::Invalid(m) => Status::invalid_argument(m),
        EngineError::NotFound(m) => Status::not_found(format!(
            "no request {m:?} (never submitted, or its answer expired)"
        )),
        EngineError::Persist(e) => Status::unavailable(e.to_string()),
    }
}

fn answer(a: Answer) -> Result<ScoreResult, Status> {
    a.map_err(|f| match f.kind {
        FailureKind::Invalid => Status::invalid_argument(f.message),
        FailureKind::Refused => Status::failed_precondition(f.message),
        FailureKind::Deadline => Status::deadline_exceeded(f.message),
    })
}

#[tonic::async_trait]
impl RewardGateway for GatewayService {
    async fn submit(&self, req: Request<ScoreRequest>) -> Result<Response<SubmitReply>, Status> {
        let id = self.engine.submit(req.into_inner()).await.map_err(status)?;
        Ok(Response::new(SubmitReply { request_id: id }))
    }

    async fn fetch(&self, req: Request<FetchRequest>) -> Result<Response<FetchReply>, Status> {
        let r = req.into_inner();
        let wait = Duration::from_millis(r.wait_ms.min(60_000) as u64);
        match self
            .engine
            .fetch(&r.request_id, wait)
            .await
            .map_err(status)?
        {
            Some(a) => Ok(Response::new(FetchReply {
                done: true,
                result: Some(answer(a)?),
            })),
            None => Ok(Response::new(FetchReply {
                done: false,
                result: None,
            })),
        }
    }

    async fn score(&self, req: Request<ScoreRequest>) -> Result<Response<ScoreResult>, Status> {
        let id = self.engine.submit(req.into_inner()).await.map_err(status)?;
        loop {
            if let Some(a) = self
                .engine
                .fetch(&id, Duration::from_secs(30))
                .await
                .map_err(status)?
            {
                return Ok(Response::new(answer(a)?));
            }
        }
    }
}

/// The tonic service, with message limits sized for media batches.
pub fn service(engine: Engine, max_message_bytes: usize) -> RewardGatewayServer<GatewayService> {
    RewardGatewayServer::new(GatewayService { engine })
        .max_decoding_message_size(max_message_bytes)
        .max_encoding_message_size(max_message_bytes)
}

/// Serve on `listener` until `shutdown` resolves.
pub async fn serve(
    engine: Engine,
    listener: tokio::net::TcpListener,
    max_message_bytes: usize,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .add_service(service(engine, max_message_bytes))
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener),
            shutdown,
        )
        .await
}
