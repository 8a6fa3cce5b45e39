//! Model and handler faults at the batcher, in-process: a handler that panics fails only its
//! batch and the worker carries on; a model answering NaN answers `null`; passes that run past
//! the response timeout are detached and replaced, at most `MAX_STUCK` at a time; an async
//! thread about to sleep waits for a lone request's answer only when its pass is short.

#![allow(clippy::unwrap_used)]

use torchfn_test_support as common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tch::{Device, IValue, Tensor};
use torchfn_engine::batcher::{BatchConfig, BatchMetrics, Batcher, Outcome, MAX_STUCK};
use torchfn_engine::error::{ErrorKind, ServeError};
use torchfn_engine::handler::{batch_rows, Answer, Decoded, Handler, Instance, Request};
use torchfn_engine::session::{Session, SessionError};

/// A handler whose "model" is the instance itself: `[sleep_ms, value]` sleeps that long, then
/// answers `value` (NaN for value -1); value 13 makes the handler panic.
struct Faulty;

impl Handler for Faulty {
    fn name(&self) -> &'static str {
        "faulty"
    }

    fn decode(&self, request: &Request<'_>) -> Result<Decoded, ServeError> {
        let v: Vec<f32> = serde_json::from_slice(request.body).unwrap();
        Ok(Decoded {
            instances: vec![Instance::f32(v, vec![2])],
            is_list: false,
        })
    }

    fn preprocess(&self, items: &[&Instance], _: Device) -> Result<Vec<IValue>, SessionError> {
        let values: Vec<f32> = items
            .iter()
            .flat_map(|i| i.as_f32().unwrap().to_vec())
            .collect();
        Ok(vec![IValue::Tensor(
            Tensor::from_slice(&values).view([items.len() as i64, 2]),
        )])
    }

    fn inference(&self, _: &Session, inputs: &[IValue]) -> Result<IValue, SessionError> {
        let IValue::Tensor(t) = &inputs[0] else {
            unreachable!()
        };
        let sleep = t.double_value(&[0, 0]);
        std::thread::sleep(Duration::from_millis(sleep as u64));
        let value = t.select(1, 1);
        if value.double_value(&[0]) == 13.0 {
            panic!("a handler bug");
        }
        let nan = Tensor::from_slice(&[f32::NAN]).expand_as(&value);
        Ok(IValue::Tensor(nan.where_self(&value.eq(-1.0), &value)))
    }

    fn postprocess(&self, output: IValue, rows: usize) -> Result<Vec<Value>, SessionError> {
        batch_rows(&output, rows)
    }
}

fn batcher(stuck_after: Duration) -> (Batcher, BatchMetrics) {
    let fx = common::fixtures();
    let session =
        Arc::new(Session::load(&fx.join("models/model_scripted.pt"), Device::Cpu).unwrap());
    let metrics = BatchMetrics {
        batch_size: prometheus::Histogram::with_opts(prometheus::HistogramOpts::new("b", "b"))
            .unwrap(),
        queue_length: prometheus::IntGauge::new("q", "q").unwrap(),
        abandoned: prometheus::IntCounter::new("a", "a").unwrap(),
        stuck_workers: prometheus::IntCounter::new("s", "s").unwrap(),
    };
    let config = BatchConfig {
        batch_size: 1,
        max_batch_delay: Duration::ZERO,
        workers: 1,
        queue_size: 100,
        threads_per_worker: 1,
        lone_pass: None,
        stuck_after,
    };
    let b = Batcher::start("faulty", Arc::new(Faulty), session, config, metrics.clone()).unwrap();
    (b, metrics)
}

fn submit(b: &Batcher, sleep_ms: f32, value: f32) -> tokio::sync::oneshot::Receiver<Outcome> {
    let inst = Instance::f32(vec![sleep_ms, value], vec![2]);
    b.submit("faulty", vec![inst]).unwrap()
}

fn wait(rx: tokio::sync::oneshot::Receiver<Outcome>) -> Result<Vec<Value>, ServeError> {
    rx.blocking_recv()
        .unwrap()
        .outputs?
        .into_iter()
        .map(Answer::into_value)
        .collect()
}

#[test]
fn a_panicking_handler_fails_its_batch_only_and_nan_is_null() {
    let _alone = alone();
    let (b, _) = batcher(Duration::from_secs(60));
    let err = wait(submit(&b, 0.0, 13.0)).unwrap_err();
    assert_eq!(err.kind, ErrorKind::PredictionFailed);
    assert_eq!(err.message, "Prediction failed");
    // The same worker serves the next request.
    assert_eq!(wait(submit(&b, 0.0, 2.5)).unwrap(), vec![json!(2.5)]);
    assert_eq!(wait(submit(&b, 0.0, -1.0)).unwrap(), vec![Value::Null]);
    assert_eq!(b.workers(), 1);
}

#[test]
fn stuck_passes_are_replaced_up_to_the_cap() {
    let _alone = alone();
    let (b, metrics) = batcher(Duration::from_millis(200));
    // Each of these passes runs 2.5 s, far past the 200 ms limit.
    let mut long = vec![submit(&b, 2500.0, 1.0)];
    for _ in 0..MAX_STUCK {
        std::thread::sleep(Duration::from_millis(350));
        // This request finds the running pass stuck: its worker is detached and a new one
        // takes this request (and gets stuck in turn).
        long.push(submit(&b, 2500.0, 1.0));
    }
    assert_eq!(metrics.stuck_workers.get(), MAX_STUCK as u64);
    std::thread::sleep(Duration::from_millis(350));
    // MAX_STUCK detached workers still run: the third stuck one is not replaced, so a quick
    // request waits for it.
    let started = Instant::now();
    let quick = submit(&b, 0.0, 7.0);
    assert_eq!(metrics.stuck_workers.get(), MAX_STUCK as u64);
    assert_eq!(b.workers(), 1);
    assert_eq!(wait(quick).unwrap(), vec![json!(7.0)]);
    assert!(
        started.elapsed() > Duration::from_millis(1000),
        "answered after {:?}: a worker was replaced past the cap",
        started.elapsed()
    );
    // Every long request is answered in the end (the API answers its caller at the deadline).
    for rx in long {
        assert_eq!(wait(rx).unwrap(), vec![json!(1.0)]);
    }
}

#[test]
fn an_async_thread_waits_only_for_a_lone_short_request() {
    use torchfn_engine::batcher::{requests_due, wait_for_lone_answer, LoneWait};
    let _alone = alone();
    let (b, metrics) = batcher(Duration::from_secs(60));
    assert_eq!(requests_due(), 0);
    assert_eq!(
        wait_for_lone_answer(),
        LoneWait::Skipped,
        "nothing in flight"
    );
    // One request in a 1.5 s pass (the first: no earlier pass says it is long). The waiting
    // thread polls for the spin time (300 µs), then gives up.
    let a = submit(&b, 1500.0, 1.0);
    assert_eq!(requests_due(), 1);
    assert_eq!(wait_for_lone_answer(), LoneWait::TimedOut);
    // Two more, one of them abandoned by its caller: no waiting with more than one in flight.
    let c = submit(&b, 0.0, 2.0);
    drop(submit(&b, 0.0, 3.0));
    assert_eq!(requests_due(), 3);
    assert_eq!(wait_for_lone_answer(), LoneWait::Skipped);
    assert_eq!(wait(a).unwrap(), vec![json!(1.0)]);
    assert_eq!(wait(c).unwrap(), vec![json!(2.0)]);
    // The abandoned request is skipped by the worker, and counted out all the same.
    let deadline = Instant::now() + Duration::from_secs(10);
    while metrics.abandoned.get() < 1 || requests_due() > 0 {
        assert!(
            Instant::now() < deadline,
            "{} requests still counted in flight",
            requests_due()
        );
        std::thread::yield_now();
    }
    // A lone request after a short pass: when the wait says it was answered, it was.
    let mut d = submit(&b, 0.0, 4.0);
    if wait_for_lone_answer() == LoneWait::Answered {
        let outcome = d.try_recv().expect("answered before the wait returned");
        assert_eq!(outcome.outputs.unwrap(), vec![Answer::Value(json!(4.0))]);
    } else {
        assert_eq!(wait(d).unwrap(), vec![json!(4.0)]);
    }
    // A pass after a long one (1 s) is expected to be long: no waiting for it.
    let passes = metrics.batch_size.get_sample_count();
    let e = submit(&b, 1000.0, 5.0);
    let f = submit(&b, 1000.0, 6.0);
    assert_eq!(wait(e).unwrap(), vec![json!(5.0)]);
    // f's pass has started once the batch-size histogram counts it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while metrics.batch_size.get_sample_count() < passes + 2 || requests_due() > 1 {
        assert!(Instant::now() < deadline, "the second pass did not start");
        std::thread::yield_now();
    }
    assert_eq!(requests_due(), 1);
    assert_eq!(
        wait_for_lone_answer(),
        LoneWait::Skipped,
        "its previous pass took 1 s"
    );
    assert_eq!(wait(f).unwrap(), vec![json!(6.0)]);
    while requests_due() > 0 {
        assert!(
            Instant::now() < deadline,
            "the last request is still counted in flight"
        );
        std::thread::yield_now();
    }
}

/// The tests of this file one at a time: the count of requests in flight is the process's.
fn alone() -> std::sync::MutexGuard<'static, ()> {
    static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    ONE.lock().unwrap_or_else(|e| e.into_inner())
}
