//! Whether a peer answers the same JSON as torchfn for the same body, checked once before
//! its load runs: a peer that answers something else is not serving the same thing, and its
//! figures would not compare.

use std::net::SocketAddr;

use anyhow::{bail, Context};
use hyper::{Method, StatusCode};
use serde::Serialize;
use serde_json::Value;

use crate::load;
use crate::workload::Workload;

/// Two floats are the same value when within this relative distance: a float32 rounded
/// differently by another build of the same arithmetic (a few ulps, 6e-8 each).
const RELATIVE_TOLERANCE: f64 = 1e-6;

/// The outcome of one comparison.
#[derive(Clone, Debug, Serialize)]
pub struct AnswerCheck {
    pub model: String,
    pub batching: String,
    /// The same keys, arrays, integers and strings, and floats within 1e-6 relative.
    pub same: bool,
    /// `identical`, how far the floats are apart, or where the answers part.
    pub detail: String,
}

/// One POST of `workload`'s body to a server, its answer parsed as JSON (any status but
/// 200 is an error).
pub fn fetch(
    addr: SocketAddr,
    workload: &Workload,
    rt: &tokio::runtime::Runtime,
) -> anyhow::Result<Value> {
    let (status, _, body) = rt.block_on(load::once(
        addr,
        Method::POST,
        &workload.path(),
        workload.body.clone(),
    ))?;
    if status != StatusCode::OK {
        bail!(
            "{} answered {status}: {}",
            workload.path(),
            String::from_utf8_lossy(&body)
        );
    }
    serde_json::from_slice(&body)
        .with_context(|| format!("not JSON: {}", String::from_utf8_lossy(&body)))
}

/// Compares `peer` with `torchfn`'s answer: `Ok(largest relative float difference)`, or
/// `Err(where and how they differ)`.
pub fn compare(torchfn: &Value, peer: &Value) -> Result<f64, String> {
    let mut worst = 0.0;
    walk(torchfn, peer, "", &mut worst)?;
    Ok(worst)
}

/// What [`compare`] says, in words for the report.
pub fn describe(result: &Result<f64, String>) -> String {
    match result {
        Ok(d) if *d == 0.0 => "identical to torchfn's".into(),
        Ok(d) => format!("the same as torchfn's, floats within {d:.1e} relative"),
        Err(why) => format!("differs from torchfn's: {why}"),
    }
}

fn walk(a: &Value, b: &Value, at: &str, worst: &mut f64) -> Result<(), String> {
    let at_or_root = || if at.is_empty() { "/" } else { at };
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let mut xk: Vec<&String> = x.keys().collect();
            let mut yk: Vec<&String> = y.keys().collect();
            xk.sort();
            yk.sort();
            if xk != yk {
                return Err(format!("keys {xk:?} vs {yk:?} at {}", at_or_root()));
            }
            for (k, v) in x {
                walk(v, &y[k], &format!("{at}/{k}"), worst)?;
            }
            Ok(())
        }
        (Value::Array(x), Value::Array(y)) => {
            if x.len() != y.len() {
                return Err(format!(
                    "{} vs {} items at {}",
                    x.len(),
                    y.len(),
                    at_or_root()
                ));
            }
            for (i, (v, w)) in x.iter().zip(y).enumerate() {
                walk(v, w, &format!("{at}/{i}"), worst)?;
            }
            Ok(())
        }
        (Value::Number(x), Value::Number(y)) => {
            // An integer (a class index) must be an integer there too, and equal.
            if x.is_f64() != y.is_f64() {
                return Err(format!("{x} vs {y} (integer vs float) at {}", at_or_root()));
            }
            let (p, q) = (x.as_f64().unwrap_or(0.0), y.as_f64().unwrap_or(0.0));
            let scale = p.abs().max(q.abs());
            let d = if scale == 0.0 {
                0.0
            } else {
                (p - q).abs() / scale
            };
            if (!x.is_f64() && p != q) || d > RELATIVE_TOLERANCE {
                return Err(format!("{x} vs {y} at {}", at_or_root()));
            }
            *worst = f64::max(*worst, d);
            Ok(())
        }
        _ if a == b => Ok(()),
        _ => Err(format!("{a} vs {b} at {}", at_or_root())),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    #[test]
    fn the_same_answer_in_another_key_order_is_identical() {
        let a = json!({"predicted_class": 1, "confidence": 0.5, "class_name": "b"});
        let b = json!({"class_name": "b", "confidence": 0.5, "predicted_class": 1});
        assert_eq!(compare(&a, &b), Ok(0.0));
    }

    #[test]
    fn floats_a_few_ulps_apart_are_the_same_and_measured() {
        let a = json!([0.1, 0.25]);
        let b = json!([0.100_000_01, 0.25]);
        let d = compare(&a, &b).unwrap();
        assert!(d > 0.0 && d < 1e-6, "{d}");
    }

    #[test]
    fn a_different_class_a_float_too_far_or_a_missing_key_differs() {
        let a = json!({"predicted_class": 1, "probabilities": [0.2, 0.8]});
        for b in [
            json!({"predicted_class": 0, "probabilities": [0.2, 0.8]}),
            json!({"predicted_class": 1, "probabilities": [0.2, 0.81]}),
            json!({"predicted_class": 1.0, "probabilities": [0.2, 0.8]}),
            json!({"predicted_class": 1}),
            json!({"predicted_class": 1, "probabilities": [0.2]}),
        ] {
            let e = compare(&a, &b).unwrap_err();
            assert!(!e.is_empty());
        }
        assert!(compare(
            &a,
            &json!({"predicted_class": 1, "probabilities": [0.2, 0.81]})
        )
        .unwrap_err()
        .contains("/probabilities/1"));
    }
}
