use candle_core::{bail, Result, Tensor};
use scoreguide_oracles::{Oracle, Verdict};
use serde::{Deserialize, Serialize};

/// A proportion `count / n` with its Wilson score 95% interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Rate {
    pub count: usize,
    pub n: usize,
    pub rate: f64,
    pub ci95: (f64, f64),
}

impl Rate {
    pub fn new(count: usize, n: usize) -> Result<Self> {
        if n == 0 {
            bail!("rate: no samples to count");
        }
        if count > n {
            bail!("rate: count {count} exceeds n {n}");
        }
        Ok(Self {
            count,
            n,
            rate: count as f64 / n as f64,
            ci95: wilson_interval(count, n, 1.959_963_984_540_054),
        })
    }
}

/// Wilson's score interval for the proportion `count / n` (n > 0) at the normal
/// quantile `z` (1.96 for 95%), clamped to [0, 1].
pub fn wilson_interval(count: usize, n: usize, z: f64) -> (f64, f64) {
    let nf = n as f64;
    let p = count as f64 / nf;
    let den = 1.0 + z * z / nf;
    let centre = (p + z * z / (2.0 * nf)) / den;
    let half = z * (p * (1.0 - p) / nf + z * z / (4.0 * nf * nf)).sqrt() / den;
    ((centre - half).max(0.0), (centre + half).min(1.0))
}

/// Labels the rows of `samples: [N, D]` with `oracle` and returns the rejected fraction
/// together with the verdicts.
pub fn infraction_rate(oracle: &dyn Oracle, samples: &Tensor) -> Result<(Rate, Vec<Verdict>)> {
    let (_, d) = samples.dims2().map_err(|_| {
        candle_core::Error::msg(format!(
            "infraction rate: samples must be [N, D], got {:?}",
            samples.dims()
        ))
    })?;
    let flat = samples
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let verdicts = oracle
        .check_rows(&flat, d)
        .map_err(|e| candle_core::Error::msg(format!("infraction rate: {e}")))?;
    let bad = verdicts.iter().filter(|v| !v.valid).count();
    Ok((Rate::new(bad, verdicts.len())?, verdicts))
}

/// Parallel samples needed so that at least one is valid with probability 1 − δ when
/// each is invalid with probability ε: ⌈log δ / log ε⌉ (Gen-neG §1, App. D.1).
/// `None` when ε = 1 (no number suffices); 1 when ε = 0.
pub fn parallel_samples_needed(infraction: f64, delta: f64) -> Option<u64> {
    if infraction >= 1.0 {
        return None;
    }
    if infraction <= 0.0 {
        return Some(1);
    }
    Some((delta.ln() / infraction.ln()).ceil().max(1.0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parallel_samples_match_paper_formula() {
        // ε = 0.1, δ = 1e-9: log(1e-9)/log(0.1) = 9.
        assert_eq!(parallel_samples_needed(0.1, 1e-9), Some(9));
        assert_eq!(parallel_samples_needed(0.0, 1e-9), Some(1));
        assert_eq!(parallel_samples_needed(1.0, 1e-9), None);
    }

    #[test]
    fn empty_is_an_error() {
        assert!(Rate::new(0, 0).is_err());
    }

    proptest! {
        #[test]
        fn interval_contains_estimate(n in 1usize..100_000, frac in 0.0f64..=1.0) {
            let k = ((n as f64) * frac).round() as usize;
            let r = Rate::new(k.min(n), n).unwrap();
            prop_assert!(r.ci95.0 <= r.rate + 1e-12 && r.rate <= r.ci95.1 + 1e-12);
            prop_assert!(r.ci95.0 >= 0.0 && r.ci95.1 <= 1.0);
        }
    }
}
