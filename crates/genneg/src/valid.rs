//! `sample_valid(k, δ)`: k valid samples from a guided model in few batched draws.

use crate::task::Task;
use candle_core::{bail, DType, Device, Result, Tensor};
use scoreguide_guidance::Score;
use scoreguide_samplers::{initial_noise, Sampler};
use scoreguide_sde::SampleNoise;
use serde::{Deserialize, Serialize};

/// How [`sample_valid`] sizes its batches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ValidConfig {
    /// k: valid rows wanted.
    pub k: usize,
    /// Each batch after the first is sized to finish the job with probability ≥ 1 − δ
    /// if the acceptance rate is at least its lower (1 − δ) confidence bound.
    pub delta: f64,
    /// Fewest and most rows per sampler call.
    pub min_batch: usize,
    pub max_batch: usize,
    /// Most rows to draw in all; fewer than k valid by then is an error.
    pub budget: usize,
    /// Row i of the draws uses noise stream (seed, i) and key i of the task's keys.
    pub seed: u64,
}

impl ValidConfig {
    pub fn new(k: usize, delta: f64) -> Self {
        Self {
            k,
            delta,
            min_batch: 1,
            max_batch: 10_000,
            budget: 100 * k.max(1_000),
            seed: 0,
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.k == 0 || self.min_batch == 0 || self.max_batch < self.min_batch {
            bail!("sample_valid: need k > 0 and 0 < min_batch ≤ max_batch, got {self:?}");
        }
        if !(self.delta > 0.0 && self.delta < 1.0) {
            bail!("sample_valid: δ must be in (0, 1), got {}", self.delta);
        }
        if self.budget < self.k {
            bail!(
                "sample_valid: a budget of {} rows cannot hold {} valid ones",
                self.budget,
                self.k
            );
        }
        Ok(())
    }
}

/// What [`valid_draws`] did: the first k valid rows' positions in the draw sequence and
/// what finding them cost.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ValidReport {
    /// Positions (row numbers of the draw sequence) of the k rows returned.
    pub rows: Vec<usize>,
    /// Rows drawn, valid rows among them, and sampler calls.
    pub drawn: usize,
    pub valid: usize,
    pub batches: usize,
    /// The batch sizes, in order.
    pub sizes: Vec<usize>,
}

impl ValidReport {
    /// Valid rows per row drawn.
    pub fn acceptance(&self) -> f64 {
        self.valid as f64 / self.drawn.max(1) as f64
    }

    /// Rows drawn over the ideal k / (1 − ε) at the measured acceptance rate.
    pub fn overhead(&self, k: usize) -> f64 {
        self.drawn as f64 * self.acceptance() / k as f64
    }

    /// One line for logs.
    pub fn summary(&self, k: usize) -> String {
        format!(
            "{k} valid from {} draws in {} batches ({:?}): acceptance {:.4}, {:.3}× the ideal k / acceptance",
            self.drawn,
            self.batches,
            self.sizes,
            self.acceptance(),
            self.overhead(k)
        )
    }
}

/// The batch-sizing rule of [`sample_valid`] over any source of rows: `draw(first, n)`
/// draws rows `first .. first + n` of a fixed sequence and says which are valid.
///
/// The first batch is k rows (all of them valid is the best case). Each later batch is
/// the smallest n for which, at the lower confidence bound p̂ of the acceptance rate so
/// far (Wilson, level 1 − δ), n p̂ − z √(n p̂ (1 − p̂)) covers the valid rows still
/// missing; and at most as many rows as were drawn before (so the draws at most double
/// per batch), within `min_batch ..= max_batch`. Hence, deterministically,
/// drawn ≤ 2·G_k + min_batch, where G_k is the position of the k-th valid row in the
/// sequence (whose mean is the ideal k / (1 − ε)); in practice a second batch finishes
/// with probability about 1 − δ and the draws come to about (1 + O(√(1/k))) k / (1 − ε).
pub fn valid_draws(
    cfg: &ValidConfig,
    draw: &mut dyn FnMut(usize, usize) -> Result<Vec<bool>>,
) -> Result<ValidReport> {
    cfg.validate()?;
    let z = normal_quantile(1.0 - cfg.delta);
    let (mut rows, mut sizes, mut drawn) = (Vec::new(), Vec::new(), 0usize);
    let mut valid = 0usize;
    while rows.len() < cfg.k {
        if drawn >= cfg.budget {
            bail!(
                "sample_valid: {drawn} draws gave {} valid of the {} wanted (acceptance {:.3e}); raise the budget or guide the model better",
                rows.len(),
                cfg.k,
                valid as f64 / drawn.max(1) as f64
            );
        }
        let need = cfg.k - rows.len();
        let n = if drawn == 0 {
            cfg.k
        } else if valid == 0 {
            drawn
        } else {
            let p = wilson_lower(valid, drawn, z);
            rows_for(need, p, z).min(drawn)
        };
        let n = n
            .clamp(cfg.min_batch, cfg.max_batch)
            .min(cfg.budget - drawn);
        let labels = draw(drawn, n)?;
        if labels.len() != n {
            bail!(
                "sample_valid: {} labels for a batch of {n} rows",
                labels.len()
            );
        }
        for (i, &v) in labels.iter().enumerate() {
            if v {
                valid += 1;
                if rows.len() < cfg.k {
                    rows.push(drawn + i);
                }
            }
        }
        drawn += n;
        sizes.push(n);
    }
    Ok(ValidReport {
        rows,
        drawn,
        valid,
        batches: sizes.len(),
        sizes,
    })
}

/// Wilson's lower bound for a binomial proportion `s / n` at the normal quantile `z`,
/// kept above 0 so that batch sizes stay finite.
fn wilson_lower(s: usize, n: usize, z: f64) -> f64 {
    scoreguide_metrics::wilson_interval(s, n, z)
        .0
        .max(f64::MIN_POSITIVE)
}

/// The smallest n with n p − z √(n p (1 − p)) ≥ need: a quadratic in √n.
fn rows_for(need: usize, p: f64, z: f64) -> usize {
    let b = z * (p * (1.0 - p)).sqrt();
    let root = (b + (b * b + 4.0 * p * need as f64).sqrt()) / (2.0 * p);
    let n = (root * root).ceil();
    if n.is_finite() && n < usize::MAX as f64 {
        n as usize
    } else {
        usize::MAX
    }
}

/// Φ⁻¹(q) by Acklam's rational approximation (relative error < 1.2e-9).
fn normal_quantile(q: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969683028665376e1,
        2.209460984245205e2,
        -2.759285104469687e2,
        1.38357751867269e2,
        -3.066479806614716e1,
        2.506628277459239,
    ];
    const B: [f64; 5] = [
        -5.447609879822406e1,
        1.615858368580409e2,
        -1.556989798598866e2,
        6.680131188771972e1,
        -1.328068155288572e1,
    ];
    const C: [f64; 6] = [
        -7.784894002430293e-3,
        -3.223964580411365e-1,
        -2.400758277161838,
        -2.549732539343734,
        4.374664141464968,
        2.938163982698783,
    ];
    const D: [f64; 4] = [
        7.784695709041462e-3,
        3.224671290700398e-1,
        2.445134137142996,
        3.754408661907416,
    ];
    let tail = |r: f64| {
        let t = (-2.0 * r.ln()).sqrt();
        (((((C[0] * t + C[1]) * t + C[2]) * t + C[3]) * t + C[4]) * t + C[5])
            / ((((D[0] * t + D[1]) * t + D[2]) * t + D[3]) * t + 1.0)
    };
    if q < 0.02425 {
        tail(q)
    } else if q > 1.0 - 0.02425 {
        -tail(1.0 - q)
    } else {
        let r = q - 0.5;
        let t = r * r;
        (((((A[0] * t + A[1]) * t + A[2]) * t + A[3]) * t + A[4]) * t + A[5]) * r
            / (((((B[0] * t + B[1]) * t + B[2]) * t + B[3]) * t + B[4]) * t + 1.0)
    }
}

/// k valid rows of `model` and what they cost.
pub struct ValidSamples {
    /// `[k, ...]` rows, all valid, in drawing order.
    pub x: Tensor,
    /// The key each was drawn under.
    pub keys: Vec<u32>,
    pub report: ValidReport,
}

/// k valid samples of `model` (a row is valid iff all its components are): batches
/// sized by [`valid_draws`]; row i from noise stream (`cfg.seed`, i) under key i of the
/// task's keys. `on_batch(drawn, valid)` is called after every batch.
#[allow(clippy::too_many_arguments)]
pub fn sample_valid(
    model: &dyn Score,
    sampler: &Sampler,
    sigmas: &[f64],
    task: &dyn Task,
    sample_shape: &[usize],
    cfg: &ValidConfig,
    device: &Device,
    on_batch: &mut dyn FnMut(usize, usize),
) -> Result<ValidSamples> {
    cfg.validate()?;
    let k = task.components();
    let all_keys = task.draw_keys(cfg.budget, cfg.seed)?;
    let (mut parts, mut keys, mut found) = (Vec::new(), Vec::new(), 0usize);
    let report = valid_draws(cfg, &mut |first, n| {
        let batch_keys = &all_keys[first..first + n];
        let mut noise = SampleNoise::new(cfg.seed, first, n);
        let mut shape = vec![n];
        shape.extend_from_slice(sample_shape);
        let x0 = initial_noise(&mut noise, &shape, sigmas[0], DType::F32, device)?;
        let cond = task.cond(batch_keys)?;
        let x = sampler
            .sample_with(model, x0, sigmas, &cond, &mut noise, None)?
            .to_dtype(DType::F32)?;
        let labels = task.label(&x, batch_keys)?;
        if labels.len() != n * k {
            bail!(
                "sample_valid: {} labels for {n} rows of {k} components",
                labels.len()
            );
        }
        let ok: Vec<bool> = labels
            .chunks_exact(k)
            .map(|r| r.iter().all(|&v| v))
            .collect();
        let keep: Vec<u32> = (0..n as u32)
            .filter(|&i| ok[i as usize])
            .take(cfg.k.saturating_sub(keys.len()))
            .collect();
        keys.extend(keep.iter().map(|&i| batch_keys[i as usize]));
        if !keep.is_empty() {
            let m = keep.len();
            parts.push(x.index_select(&Tensor::from_vec(keep, m, device)?, 0)?);
        }
        found += ok.iter().filter(|&&v| v).count();
        on_batch(first + n, found);
        Ok(ok)
    })?;
    Ok(ValidSamples {
        x: Tensor::cat(&parts, 0)?,
        keys,
        report,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_quantiles() {
        for (q, z) in [
            (0.5, 0.0),
            (0.975, 1.959963985),
            (0.999, 3.090232306),
            (0.01, -2.326347874),
        ] {
            assert!((normal_quantile(q) - z).abs() < 1e-8, "{q}");
        }
    }

    #[test]
    fn wilson_bound_is_below_the_rate_and_tightens() {
        let z = normal_quantile(0.999);
        let a = wilson_lower(90, 100, z);
        let b = wilson_lower(9000, 10000, z);
        assert!(a < b && b < 0.9 && a > 0.7, "{a} {b}");
    }
}
