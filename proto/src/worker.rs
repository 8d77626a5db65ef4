//! What every worker's gRPC server shares: its state, used by one call at a
//! time on a blocking thread (tensor work must not stall the async runtime),
//! with what it is doing for Health replies; and stopping on SIGTERM or Ctrl-C.

use std::sync::{Arc, Mutex};

use tonic::Status;

struct Busy<S> {
    state: S,
    activity: String,
}

/// A worker's state behind one lock.
pub struct WorkerState<S> {
    inner: Arc<Mutex<Busy<S>>>,
}

impl<S: Send + 'static> WorkerState<S> {
    pub fn new(state: S) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Busy {
                state,
                activity: "idle".into(),
            })),
        }
    }

    /// Runs `f` on the state on a blocking thread, inside `span`, with
    /// `activity` shown in Health replies meanwhile.
    pub async fn call<T: Send + 'static>(
        &self,
        span: tracing::Span,
        activity: String,
        f: impl FnOnce(&mut S) -> Result<T, Status> + Send + 'static,
    ) -> Result<T, Status> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let _in_call = span.enter();
            let mut b = inner
                .lock()
                .map_err(|_| Status::internal("a previous call panicked"))?;
            b.activity = activity;
            let out = f(&mut b.state);
            b.activity = "idle".into();
            out
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
    }

    /// `f(state, activity)` when no call holds the state, else `None` (busy):
    /// Health answers without waiting for a training step.
    pub fn peek<T>(&self, f: impl FnOnce(&S, &str) -> T) -> Option<T> {
        self.inner.try_lock().ok().map(|b| f(&b.state, &b.activity))
    }
}

/// Sends `true` on `stop` at SIGTERM or Ctrl-C.
pub fn stop_on_signals(stop: tokio::sync::watch::Sender<bool>) {
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {},
                _ = term.recv() => {},
            }
        }
        let _ = stop.send(true);
    });
}
