//! `Server-Timing` for predictions: where one request's time went inside torchfn, in the
//! standard header (durations in milliseconds), sent only when the request asks for it with an
//! `x-torchfn-timing` header so that ordinary answers stay as they are.
//!
//! The phases, in order: `route` (request handed over by the HTTP layer → prediction handler:
//! request id, span, routing), `read` (body), `decode` (body → instances), `queue` (waiting for
//! a worker), `batch` (taken, waiting for the rest of the batch), `pre`, `forward`, `post` (the
//! handler's steps in the forward pass), `wake` (answer handed over by the worker → request
//! task running again), `encode` (answer → response, headers), `total` (the whole time inside
//! torchfn, from the HTTP layer's hand-over to the response going back to it). What a client
//! measures beyond `total` is the HTTP layer's parsing and writing, the kernel and itself.

use std::fmt::Write;
use std::time::{Duration, Instant};

use axum::http::{HeaderName, HeaderValue};
use torchfn_engine::batcher::Phases;

/// The request header that asks for `Server-Timing` (any value).
pub static TIMING_REQUEST: HeaderName = HeaderName::from_static("x-torchfn-timing");

/// A prediction's timings, put in its response's extensions by the handler; the common layer
/// turns them into the header once it knows the total.
#[derive(Debug, Clone, Copy)]
pub struct ServerTiming {
    pub handler_start: Instant,
    pub read: Duration,
    pub decode: Duration,
    pub phases: Phases,
    /// When the request's task ran again after the worker's answer.
    pub resumed: Instant,
}

impl ServerTiming {
    /// The `Server-Timing` value for a request the HTTP layer handed over at `entered`,
    /// leaving torchfn at `left`.
    pub fn header(&self, entered: Instant, left: Instant) -> Option<HeaderValue> {
        let p = &self.phases;
        let wake = p.replied.map_or(Duration::ZERO, |r| {
            self.resumed.saturating_duration_since(r)
        });
        let phases = [
            (
                "route",
                self.handler_start.saturating_duration_since(entered),
            ),
            ("read", self.read),
            ("decode", self.decode),
            ("queue", p.queue),
            ("batch", p.batch_wait),
            ("pre", p.preprocess),
            ("forward", p.forward),
            ("post", p.postprocess),
            ("wake", wake),
            ("encode", left.saturating_duration_since(self.resumed)),
            ("total", left.saturating_duration_since(entered)),
        ];
        let mut out = String::with_capacity(200);
        for (i, (name, d)) in phases.iter().enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            let _ = write!(out, "{sep}{name};dur={:.3}", d.as_secs_f64() * 1e3);
        }
        HeaderValue::from_str(&out).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_in_order_in_milliseconds() {
        let entered = Instant::now();
        let handler_start = entered + Duration::from_micros(5);
        let replied = handler_start + Duration::from_micros(100);
        let resumed = replied + Duration::from_micros(20);
        let t = ServerTiming {
            handler_start,
            read: Duration::from_micros(3),
            decode: Duration::from_micros(4),
            phases: Phases {
                queue: Duration::from_micros(10),
                batch_wait: Duration::from_micros(1),
                preprocess: Duration::from_micros(2),
                forward: Duration::from_micros(30),
                postprocess: Duration::from_micros(6),
                replied: Some(replied),
            },
            resumed,
        };
        let left = resumed + Duration::from_micros(7);
        let v = t.header(entered, left).expect("a valid header value");
        assert_eq!(
            v.to_str().expect("ASCII"),
            "route;dur=0.005, read;dur=0.003, decode;dur=0.004, queue;dur=0.010, \
             batch;dur=0.001, pre;dur=0.002, forward;dur=0.030, post;dur=0.006, \
             wake;dur=0.020, encode;dur=0.007, total;dur=0.132"
        );
    }
}
