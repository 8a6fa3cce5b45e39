//! Two torchfn-local builds compared while both serve: they take turns in short windows, and
//! each round's ratio is taken. On a shared VM the machine's speed drifts by 10–20% between
//! points measured one after the other, more than most changes are worth; taking turns puts
//! that drift on both sides alike, so a few percent shows (`--against`).

use std::time::Duration;

use serde::Serialize;

/// Rounds per concurrency, and each side's warm-up and measuring window in a round (new
/// connections each time): 12 of 0.2 + 0.5 s, or with `--quick` 3 of 0.1 + 0.2 s.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Schedule {
    pub rounds: usize,
    pub warmup_s: f64,
    pub window_s: f64,
}

impl Schedule {
    pub fn new(quick: bool) -> Self {
        let (rounds, warmup_s, window_s) = if quick { (3, 0.1, 0.2) } else { (12, 0.2, 0.5) };
        Self {
            rounds,
            warmup_s,
            window_s,
        }
    }

    /// For a floor taking turns with torchfn: 8 rounds of 0.5 + 1 s, or with `--quick` 3 of
    /// 0.1 + 0.2 s. Longer windows than two builds get: torchfn's threads take a while to
    /// settle on the two CPUs after a window of idleness, which a floor with no model does
    /// not, so shorter windows would weigh that settling against torchfn alone.
    pub fn floors(quick: bool) -> Self {
        let (rounds, warmup_s, window_s) = if quick { (3, 0.1, 0.2) } else { (8, 0.5, 1.0) };
        Self {
            rounds,
            warmup_s,
            window_s,
        }
    }

    pub fn warmup(&self) -> Duration {
        Duration::from_secs_f64(self.warmup_s)
    }

    pub fn window(&self) -> Duration {
        Duration::from_secs_f64(self.window_s)
    }
}

/// One model and concurrency, both builds serving with batching on.
#[derive(Clone, Debug, Serialize)]
pub struct Turns {
    pub model: String,
    pub concurrency: usize,
    /// The other side: another build's path (`--against`), or the floor taking turns.
    pub other: String,
    pub schedule: Schedule,
    /// Per round, this build's and the other's throughput (answers per second).
    pub rounds: Vec<[f64; 2]>,
}

impl Turns {
    /// The rounds' ratios (the other build over this one), ascending.
    pub fn ratios(&self) -> Vec<f64> {
        self.sorted(|this, other| (this > 0.0).then(|| other / this))
    }

    /// The rounds' ratios the other way round (this side over the other), ascending.
    pub fn shares(&self) -> Vec<f64> {
        self.sorted(|this, other| (other > 0.0).then(|| this / other))
    }

    /// `ratio` of each round's two throughputs (this side's, the other's), where it has one,
    /// ascending.
    fn sorted(&self, ratio: impl Fn(f64, f64) -> Option<f64>) -> Vec<f64> {
        let mut r: Vec<f64> = self
            .rounds
            .iter()
            .filter_map(|&[this, other]| ratio(this, other))
            .collect();
        r.sort_by(f64::total_cmp);
        r
    }

    /// Median and range of [`Turns::shares`].
    pub fn share_summary(&self) -> Option<(f64, f64, f64)> {
        let shares = self.shares();
        let (lo, hi) = (*shares.first()?, *shares.last()?);
        Some((crate::stats::median(shares)?, lo, hi))
    }

    /// Mean throughput of each side over the rounds: (this, other).
    pub fn means(&self) -> (f64, f64) {
        let n = self.rounds.len().max(1) as f64;
        let mean = |i: usize| self.rounds.iter().map(|r| r[i]).sum::<f64>() / n;
        (mean(0), mean(1))
    }
}

/// Runs `rounds` rounds of one window of `this` and one of `other`, each giving its
/// throughput; the side that goes first alternates, so neither always follows the other.
pub fn take(
    rounds: usize,
    mut this: impl FnMut() -> anyhow::Result<f64>,
    mut other: impl FnMut() -> anyhow::Result<f64>,
) -> anyhow::Result<Vec<[f64; 2]>> {
    let mut out = Vec::with_capacity(rounds);
    for round in 0..rounds {
        let pair = if round % 2 == 0 {
            let a = this()?;
            [a, other()?]
        } else {
            let b = other()?;
            [this()?, b]
        };
        out.push(pair);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn ratios_and_means_of_the_rounds() {
        let t = Turns {
            model: "seed".into(),
            concurrency: 16,
            other: "b".into(),
            schedule: Schedule::new(true),
            rounds: vec![[100.0, 110.0], [100.0, 90.0], [80.0, 100.0]],
        };
        assert_eq!(t.ratios(), vec![0.9, 1.1, 1.25]);
        assert_eq!(t.shares(), vec![0.8, 1.0 / 1.1, 100.0 / 90.0]);
        assert_eq!(t.share_summary(), Some((1.0 / 1.1, 0.8, 100.0 / 90.0)));
        assert_eq!(crate::stats::median(t.ratios()), Some(1.1));
        let (a, b) = t.means();
        assert!((a - 93.333).abs() < 0.01 && (b - 100.0).abs() < 0.01);
    }

    #[test]
    fn the_side_that_goes_first_alternates() {
        let order = std::cell::RefCell::new(Vec::new());
        let rounds = take(
            3,
            || {
                order.borrow_mut().push('a');
                Ok(2.0)
            },
            || {
                order.borrow_mut().push('b');
                Ok(4.0)
            },
        )
        .unwrap();
        assert_eq!(rounds, vec![[2.0, 4.0]; 3]);
        assert_eq!(order.into_inner(), vec!['a', 'b', 'b', 'a', 'a', 'b']);
    }

    #[test]
    fn a_failing_side_stops_the_comparison() {
        let err = take(2, || Ok(1.0), || anyhow::bail!("other failed")).unwrap_err();
        assert!(err.to_string().contains("other failed"));
    }
}
