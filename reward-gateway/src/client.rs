//! What a rollout worker uses to talk to the gateway.

use proto::reward::v1::reward_gateway_client::RewardGatewayClient;
use proto::reward::v1::{
    Dtype as PbDtype, FetchRequest, Media, MediaType, PromptGroup, ScoreRequest, ScoreResult,
};
use std::time::Duration;
use tonic::transport::Channel;

#[derive(Clone)]
pub struct GatewayClient {
    inner: RewardGatewayClient<Channel>,
}

impl GatewayClient {
    /// Connect to `http://host:port`, with message limits for media batches.
    pub async fn connect(
        url: String,
        max_message_bytes: usize,
    ) -> Result<Self, tonic::transport::Error> {
        let ch = tonic::transport::Endpoint::from_shared(url)?
            .connect_timeout(Duration::from_secs(10))
            .connect()
            .await?;
        Ok(GatewayClient {
            inner: RewardGatewayClient::new(ch)
                .max_decoding_message_size(max_message_bytes)
                .max_encoding_message_size(max_message_bytes),
        })
    }

    /// Submit and wait for the answer.
    pub async fn score(&mut self, req: ScoreRequest) -> Result<ScoreResult, tonic::Status> {
        Ok(self.inner.score(req).await?.into_inner())
    }

    /// Queue a request; returns its id.
    pub async fn submit(&mut self, req: ScoreRequest) -> Result<String, tonic::Status> {
        Ok(self.inner.submit(req).await?.into_inner().request_id)
    }

    /// Wait up to `wait` for an answer; `None` while pending.
    pub async fn fetch(
        &mut self,
        id: &str,
        wait: Duration,
    ) -> Result<Option<ScoreResult>, tonic::Status> {
        let r = self
            .inner
            .fetch(FetchRequest {
                request_id: id.to_string(),
                wait_ms: wait.as_millis().min(u32::MAX as u128) as u32,
            })
            .await?
            .into_inner();
        Ok(if r.done { r.result } else { None })
    }
}

/// A request for uint8 images `[B, H, W, C]`, `groups` of (prompt, items).
pub fn image_request(
    request_id: impl Into<String>,
    groups: &[(&str, u32)],
    shape: [u64; 4],
    data: Vec<u8>,
) -> ScoreRequest {
    media_request(
        request_id,
        groups,
        MediaType::Image,
        shape.to_vec(),
        data,
        Vec::new(),
    )
}

/// A request for uint8 videos `[B, C, T, H, W]` (the protocol's video layout),
/// each played at `fps`.
pub fn video_request(
    request_id: impl Into<String>,
    groups: &[(&str, u32)],
    shape: [u64; 5],
    data: Vec<u8>,
    fps: f64,
) -> ScoreRequest {
    let fps = vec![fps; shape[0] as usize];
    media_request(
        request_id,
        groups,
        MediaType::Video,
        shape.to_vec(),
        data,
        fps,
    )
}

fn media_request(
    request_id: impl Into<String>,
    groups: &[(&str, u32)],
    media_type: MediaType,
    shape: Vec<u64>,
    data: Vec<u8>,
    video_fps: Vec<f64>,
) -> ScoreRequest {
    ScoreRequest {
        request_id: request_id.into(),
        groups: groups
            .iter()
            .map(|(p, n)| PromptGroup {
                prompt: p.to_string(),
                num_items: *n,
            })
            .collect(),
        media: Some(Media {
            media_type: media_type as i32,
            dtype: PbDtype::Uint8 as i32,
            shape,
            data,
            video_fps,
        }),
        ..Default::default()
    }
}
