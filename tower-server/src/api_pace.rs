//! The pace of this server's requests to the host's Kubernetes API: a token bucket of
//! `--kube-api-qps` per second and `--kube-api-burst` at once, in front of every request
//! the client sends (the Cluster list and watch, condition and spec writes, the Service,
//! ConfigMap and user lookups), as client-go's `rest.Config.QPS`/`Burst` are. With
//! 10,000 Clusters a restart owes up to 10,000 condition writes; paced, the API server
//! sees them spread at the configured rate instead of as fast as one task can send.
//!
//! [`ApiPace`] is the bucket (reservations, so waiters go in order); [`PaceLayer`] puts it
//! in front of a `tower` service stack (kube's `ClientBuilder::with_layer`).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

/// Requests per second and at once; client-go's defaults are 5 and 10, KubeSphere's
/// tower used 50 and 100 (this server's defaults).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ApiRate {
    /// Sustained requests per second (> 0).
    pub qps: f64,
    /// Requests that may go at once after a quiet spell (>= 1).
    pub burst: u32,
}

impl Default for ApiRate {
    fn default() -> Self {
        ApiRate {
            qps: 50.0,
            burst: 100,
        }
    }
}

/// A token bucket: `burst` tokens, refilled at `qps` per second.
#[derive(Debug)]
pub struct ApiPace {
    rate: ApiRate,
    /// Tokens now (negative: reserved ahead by callers still waiting) and when counted.
    state: Mutex<(f64, Instant)>,
}

impl ApiPace {
    /// A full bucket.
    pub fn new(rate: ApiRate) -> Arc<Self> {
        Arc::new(ApiPace {
            rate,
            state: Mutex::new((f64::from(rate.burst), Instant::now())),
        })
    }

    /// Takes a token and says how long to wait before using it (zero when one was there).
    /// Reservations are served in the order they were made.
    pub fn reserve(&self) -> Duration {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (tokens, at) = &mut *state;
        let now = Instant::now();
        let refill = now.duration_since(*at).as_secs_f64() * self.rate.qps;
        *tokens = (*tokens + refill).min(f64::from(self.rate.burst));
        *at = now;
        *tokens -= 1.0;
        if *tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-*tokens / self.rate.qps)
        }
    }

    /// Waits for a token.
    pub async fn acquire(&self) {
        let wait = self.reserve();
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

/// Puts an [`ApiPace`] in front of a service: each request waits for its token in
/// `poll_ready`.
#[derive(Debug, Clone)]
pub struct PaceLayer(pub Arc<ApiPace>);

impl<S> tower_layer::Layer<S> for PaceLayer {
    type Service = Paced<S>;

    fn layer(&self, inner: S) -> Paced<S> {
        Paced {
            inner,
            pace: self.0.clone(),
            wait: None,
            granted: false,
        }
    }
}

/// A service whose requests keep to an [`ApiPace`].
#[derive(Debug)]
pub struct Paced<S> {
    inner: S,
    pace: Arc<ApiPace>,
    wait: Option<Pin<Box<Sleep>>>,
    /// A token is held for the next `call`.
    granted: bool,
}

impl<S, R> tower_service::Service<R> for Paced<S>
where
    S: tower_service::Service<R>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        if !self.granted {
            if self.wait.is_none() {
                let wait = self.pace.reserve();
                if !wait.is_zero() {
                    self.wait = Some(Box::pin(tokio::time::sleep(wait)));
                }
            }
            if let Some(wait) = self.wait.as_mut() {
                ready!(wait.as_mut().poll(cx));
                self.wait = None;
            }
            self.granted = true;
        }
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: R) -> Self::Future {
        self.granted = false;
        self.inner.call(request)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_burst_goes_at_once_then_the_rate_holds() {
        let pace = ApiPace::new(ApiRate {
            qps: 20.0,
            burst: 10,
        });
        let start = Instant::now();
        for _ in 0..10 {
            pace.acquire().await;
        }
        assert_eq!(
            start.elapsed(),
            Duration::ZERO,
            "the burst waits for nothing"
        );
        // 40 more at 20 per second: 2 s.
        for _ in 0..40 {
            pace.acquire().await;
        }
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(1990) && took <= Duration::from_millis(2010),
            "{took:?}"
        );
        // A quiet spell refills the bucket, up to the burst and no further.
        tokio::time::sleep(Duration::from_secs(60)).await;
        let again = Instant::now();
        for _ in 0..10 {
            pace.acquire().await;
        }
        assert_eq!(again.elapsed(), Duration::ZERO);
        pace.acquire().await;
        assert_eq!(again.elapsed(), Duration::from_millis(50));
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_at_once_are_spread_in_order() {
        let pace = ApiPace::new(ApiRate {
            qps: 10.0,
            burst: 1,
        });
        let start = Instant::now();
        let waits: Vec<Duration> = (0..5).map(|_| pace.reserve()).collect();
        let ms: Vec<u128> = waits.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, [0, 100, 200, 300, 400]);
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn the_layer_paces_a_service() {
        use tower_layer::Layer as _;
        use tower_service::Service as _;
        let pace = ApiPace::new(ApiRate { qps: 4.0, burst: 2 });
        let mut service = PaceLayer(pace).layer(tower_service_fn(|n: u32| async move {
            Ok::<_, std::convert::Infallible>(n)
        }));
        let start = Instant::now();
        let mut at = Vec::new();
        for n in 0..6 {
            std::future::poll_fn(|cx| service.poll_ready(cx))
                .await
                .unwrap();
            assert_eq!(service.call(n).await.unwrap(), n);
            at.push(start.elapsed().as_millis());
        }
        assert_eq!(at, [0, 0, 250, 500, 750, 1000]);
    }

    /// A service from a closure (tower's `service_fn`, without the dependency).
    fn tower_service_fn<F, Fut>(f: F) -> FnService<F>
    where
        F: FnMut(u32) -> Fut,
    {
        FnService(f)
    }

    struct FnService<F>(F);

    impl<F, Fut> tower_service::Service<u32> for FnService<F>
    where
        F: FnMut(u32) -> Fut,
        Fut: Future<Output = Result<u32, std::convert::Infallible>>,
    {
        type Response = u32;
        type Error = std::convert::Infallible;
        type Future = Fut;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, n: u32) -> Fut {
            (self.0)(n)
        }
    }
}
