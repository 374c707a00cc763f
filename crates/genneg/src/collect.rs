//! Sampling and labelling until both classes are in hand, under a budget.

use candle_core::{bail, DType, Device, Result, Tensor};
use scoreguide_guidance::Score;
use scoreguide_oracles::Oracle;
use scoreguide_samplers::{initial_noise, Sampler};
use scoreguide_sde::SampleNoise;
use serde::{Deserialize, Serialize};

/// How many samples of each class to gather, and how many draws that may cost.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CollectConfig {
    /// N: wanted valid and invalid samples each.
    pub per_class: usize,
    /// Samples drawn per sampler call.
    pub batch: usize,
    /// Most samples to draw in all; drawing stops here even if a class is short.
    pub budget: usize,
    /// With the budget spent, go on if at least this many invalid samples were found
    /// (balancing down to that many of each); below it, fail.
    pub min_negatives: usize,
    /// Seed of the sampling noise; sample i of this collection uses stream (seed, i).
    pub seed: u64,
}

impl Default for CollectConfig {
    fn default() -> Self {
        Self {
            per_class: 50_000,
            batch: 10_000,
            budget: 2_000_000,
            min_negatives: 1_000,
            seed: 0,
        }
    }
}

impl CollectConfig {
    pub fn validate(&self) -> Result<()> {
        if self.per_class == 0 || self.batch == 0 || self.min_negatives == 0 {
            bail!("Gen-neG collection: per_class, batch and min_negatives must be positive, got {self:?}");
        }
        if self.min_negatives > self.per_class {
            bail!(
                "Gen-neG collection: min_negatives {} exceeds per_class {}",
                self.min_negatives,
                self.per_class
            );
        }
        if self.budget < 2 * self.per_class {
            bail!(
                "Gen-neG collection: a budget of {} samples cannot hold {} per class",
                self.budget,
                self.per_class
            );
        }
        Ok(())
    }
}

/// What a collection found.
pub struct Collected {
    /// Valid samples, `[n, ...]`, n = the balanced count.
    pub positives: Tensor,
    /// Invalid samples, as many as `positives`.
    pub negatives: Tensor,
    /// The first draws in their natural proportions (for the "imbalanced" ablation),
    /// as many as positives and negatives together, with labels (1 = valid).
    pub unbalanced: Tensor,
    pub unbalanced_labels: Vec<u32>,
    /// Valid fraction of everything drawn: the model's α = p_θ(y = 1).
    pub alpha: f64,
    pub drawn: usize,
    pub positives_found: usize,
    pub negatives_found: usize,
    /// The budget ran out before N of each class were found.
    pub budget_exhausted: bool,
}

impl Collected {
    /// One line for logs and tables.
    pub fn summary(&self) -> String {
        let n = self.positives.dim(0).unwrap_or(0);
        let mut s = format!(
            "drew {} samples: {} valid, {} invalid (α = {:.5}); training on {n} + {n}",
            self.drawn, self.positives_found, self.negatives_found, self.alpha
        );
        if self.budget_exhausted {
            s.push_str(" — sample budget exhausted, going on with the invalid samples found");
        }
        s
    }
}

/// Draws from `model` in batches until `per_class` valid and invalid samples are found or
/// the budget is spent. `on_batch(drawn, valid, invalid)` is called after every batch.
#[allow(clippy::too_many_arguments)]
pub fn collect(
    model: &dyn Score,
    sampler: &Sampler,
    sigmas: &[f64],
    oracle: &dyn Oracle,
    sample_shape: &[usize],
    cfg: &CollectConfig,
    device: &Device,
    on_batch: &mut dyn FnMut(usize, usize, usize),
) -> Result<Collected> {
    cfg.validate()?;
    let dim: usize = sample_shape.iter().product();
    if dim != oracle.dim() {
        bail!(
            "Gen-neG collection: samples of {dim} values but the oracle judges {}",
            oracle.dim()
        );
    }
    let n = cfg.per_class;
    let (mut pos, mut neg, mut unb, mut unb_labels) = (
        Vec::<f32>::new(),
        Vec::<f32>::new(),
        Vec::<f32>::new(),
        Vec::new(),
    );
    let (mut n_pos, mut n_neg, mut drawn) = (0usize, 0usize, 0usize);
    while (n_pos < n || n_neg < n) && drawn < cfg.budget {
        let b = cfg.batch.min(cfg.budget - drawn);
        let mut noise = SampleNoise::new(cfg.seed, drawn, b);
        let mut shape = vec![b];
        shape.extend_from_slice(sample_shape);
        let x0 = initial_noise(&mut noise, &shape, sigmas[0], DType::F32, device)?;
        let x = sampler.sample(model, x0, sigmas, &mut noise, None)?;
        let flat = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let verdicts = oracle
            .check_rows(&flat, dim)
            .map_err(|e| candle_core::Error::msg(format!("Gen-neG collection: {e}")))?;
        for (row, v) in flat.chunks_exact(dim).zip(&verdicts) {
            if unb_labels.len() < 2 * n {
                unb.extend_from_slice(row);
                unb_labels.push(u32::from(v.valid));
            }
            if v.valid {
                if n_pos < n {
                    pos.extend_from_slice(row);
                }
                n_pos += 1;
            } else {
                if n_neg < n {
                    neg.extend_from_slice(row);
                }
                n_neg += 1;
            }
        }
        drawn += b;
        on_batch(drawn, n_pos, n_neg);
    }
    let budget_exhausted = n_pos < n || n_neg < n;
    let keep = n.min(n_pos).min(n_neg);
    if budget_exhausted && (n_neg < cfg.min_negatives || n_pos < cfg.min_negatives) {
        bail!(
            "Gen-neG collection: the budget of {} samples found {n_neg} invalid and {n_pos} valid samples, fewer than the minimum {} of each; raise the budget or lower min_negatives",
            cfg.budget,
            cfg.min_negatives
        );
    }
    let mk = |v: Vec<f32>, rows: usize| -> Result<Tensor> {
        let mut shape = vec![rows];
        shape.extend_from_slice(sample_shape);
        Tensor::from_vec(v[..rows * dim].to_vec(), shape, device)
    };
    let n_unb = unb_labels.len();
    Ok(Collected {
        positives: mk(pos, keep)?,
        negatives: mk(neg, keep)?,
        unbalanced: mk(unb, n_unb)?,
        unbalanced_labels: unb_labels,
        alpha: n_pos as f64 / drawn as f64,
        drawn,
        positives_found: n_pos,
        negatives_found: n_neg,
        budget_exhausted,
    })
}
