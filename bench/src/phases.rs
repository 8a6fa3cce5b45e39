//! Where one request's time goes: a closed loop whose requests ask torchfn for
//! `Server-Timing` (`x-torchfn-timing`), averaged per phase, beside what the client measured.
//! What the client sees beyond torchfn's `total` is the HTTP layer's parsing and writing, the
//! kernel's loopback and the client itself.

use std::time::Instant;

use anyhow::Context;
use http_body_util::{BodyExt, Full};
use hyper::header::{CONTENT_TYPE, HOST};
use hyper::{Method, Request, StatusCode};
use serde::Serialize;

use crate::load::{connect, percentile, Target};

/// Mean time per phase over `requests` answers at one concurrency.
#[derive(Clone, Debug, Serialize)]
pub struct Breakdown {
    pub model: String,
    pub batching: String,
    pub concurrency: usize,
    pub requests: usize,
    pub client_mean_us: f64,
    pub client_p50_us: f64,
    /// Server-Timing phases in torchfn's order, mean µs.
    pub phases_us: Vec<(String, f64)>,
    /// Client mean minus torchfn's `total`: HTTP parsing and writing, loopback, client.
    pub outside_us: f64,
}

/// `requests` answers counted after `warmup` more, spread over `concurrency` connections.
pub async fn breakdown(
    target: &Target,
    model: &str,
    batching: &str,
    concurrency: usize,
    warmup: usize,
    requests: usize,
) -> anyhow::Result<Breakdown> {
    let per_conn = requests.div_ceil(concurrency.max(1));
    let warm_per_conn = warmup.div_ceil(concurrency.max(1));
    let mut tasks = Vec::new();
    for _ in 0..concurrency.max(1) {
        let target = target.clone();
        tasks.push(tokio::spawn(async move {
            connection(&target, warm_per_conn, per_conn).await
        }));
    }
    let mut latencies = Vec::new();
    let mut sums: Vec<(String, f64)> = Vec::new();
    for t in tasks {
        let (lat, phases) = t.await.context("a breakdown connection failed")??;
        latencies.extend(lat);
        for answer in phases {
            if sums.is_empty() {
                sums = answer.iter().map(|(k, _)| (k.clone(), 0.0)).collect();
            }
            anyhow::ensure!(
                answer.len() == sums.len()
                    && answer.iter().zip(&sums).all(|((a, _), (b, _))| a == b),
                "answers differ in their Server-Timing phases"
            );
            for ((_, ms), (_, sum)) in answer.iter().zip(sums.iter_mut()) {
                *sum += ms * 1e3;
            }
        }
    }
    anyhow::ensure!(!latencies.is_empty(), "no answers");
    let n = latencies.len() as f64;
    let phases_us: Vec<(String, f64)> = sums.into_iter().map(|(k, s)| (k, s / n)).collect();
    let client_mean_us = latencies.iter().sum::<f64>() / n;
    latencies.sort_by(f64::total_cmp);
    let total = phases_us
        .iter()
        .find(|(k, _)| k == "total")
        .map(|(_, v)| *v)
        .context("torchfn's answers carry no Server-Timing total")?;
    Ok(Breakdown {
        model: model.into(),
        batching: batching.into(),
        concurrency,
        requests: latencies.len(),
        client_mean_us,
        client_p50_us: percentile(&latencies, 0.5),
        phases_us,
        outside_us: client_mean_us - total,
    })
}

type Phases = Vec<(String, f64)>;

async fn connection(
    target: &Target,
    warmup: usize,
    count: usize,
) -> anyhow::Result<(Vec<f64>, Vec<Phases>)> {
    let mut sender = connect(target.addr).await?;
    let host = target.addr.to_string();
    let mut latencies = Vec::with_capacity(count);
    let mut phases = Vec::with_capacity(count);
    for i in 0..warmup + count {
        sender.ready().await?;
        let req = Request::builder()
            .method(Method::POST)
            .uri(&target.path)
            .header(HOST, &host)
            .header(CONTENT_TYPE, "application/json")
            .header("x-torchfn-timing", "1")
            .body(Full::new(target.body.clone()))?;
        let sent = Instant::now();
        let resp = sender.send_request(req).await?;
        let (parts, body) = resp.into_parts();
        body.collect().await?;
        let us = sent.elapsed().as_secs_f64() * 1e6;
        anyhow::ensure!(parts.status == StatusCode::OK, "status {}", parts.status);
        if i < warmup {
            continue;
        }
        let header = parts
            .headers
            .get("server-timing")
            .and_then(|v| v.to_str().ok())
            .context("no Server-Timing header in torchfn's answer")?;
        latencies.push(us);
        phases.push(parse(header)?);
    }
    Ok((latencies, phases))
}

/// `name;dur=ms, ...` → (name, ms) in order.
fn parse(header: &str) -> anyhow::Result<Phases> {
    header
        .split(',')
        .map(|part| {
            let (name, rest) = part
                .trim()
                .split_once(";dur=")
                .with_context(|| format!("malformed Server-Timing entry `{part}`"))?;
            let ms: f64 = rest
                .parse()
                .with_context(|| format!("malformed duration in `{part}`"))?;
            Ok((name.to_string(), ms))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_server_timing() {
        let p = super::parse("route;dur=0.005, total;dur=0.132").expect("parses");
        assert_eq!(p, vec![("route".into(), 0.005), ("total".into(), 0.132)]);
        assert!(super::parse("route=1").is_err());
    }
}
