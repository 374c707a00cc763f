//! Sampling and labelling until both classes are in hand, under a budget.

use crate::task::Task;
use candle_core::{bail, DType, Device, Result, Tensor};
use scoreguide_guidance::Score;
use scoreguide_samplers::{initial_noise, Sampler};
use scoreguide_sde::SampleNoise;
use serde::{Deserialize, Serialize};

/// How many components of each class to gather, and how many draws that may cost.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CollectConfig {
    /// N: wanted valid and invalid components each; `None` draws the whole budget and
    /// balances down to the rarer class.
    pub per_class: Option<usize>,
    /// Rows drawn per sampler call.
    pub batch: usize,
    /// Most rows to draw in all; drawing stops here even if a class is short.
    pub budget: usize,
    /// With the budget spent short of `per_class`, go on if at least this many components
    /// of each class were found (balancing down to that many of each); below it, fail.
    pub min_negatives: usize,
    /// Seed of the sampling noise (row i of this collection uses stream (seed, i)) and of
    /// the task's keys.
    pub seed: u64,
}

impl Default for CollectConfig {
    fn default() -> Self {
        Self {
            per_class: Some(50_000),
            batch: 10_000,
            budget: 2_000_000,
            min_negatives: 1_000,
            seed: 0,
        }
    }
}

impl CollectConfig {
    pub fn validate(&self) -> Result<()> {
        if self.per_class == Some(0) || self.batch == 0 || self.min_negatives == 0 {
            bail!("Gen-neG collection: per_class, batch and min_negatives must be positive, got {self:?}");
        }
        if let Some(n) = self.per_class {
            if self.min_negatives > n {
                bail!(
                    "Gen-neG collection: min_negatives {} exceeds per_class {n}",
                    self.min_negatives
                );
            }
        }
        if self.budget == 0 {
            bail!("Gen-neG collection: the budget must be positive");
        }
        Ok(())
    }
}

/// Rows a model drew and their labels: the rows holding one of the first N valid or N
/// invalid components, or one of the first rows drawn (the natural-proportion prefix of
/// the "imbalanced" ablation), in drawing order; and counts over everything drawn.
#[derive(Debug, Clone)]
pub struct Draws {
    /// `[M, ...]` rows in the model's space (f32).
    pub x: Tensor,
    /// The key each row was drawn under ([`Task::draw_keys`]).
    pub keys: Vec<u32>,
    /// M·K validity bits, row-major.
    pub valid: Vec<bool>,
    /// K, components per row.
    pub components: usize,
    /// N asked for (`None`: the rarer class's count).
    pub per_class: Option<usize>,
    /// Rows drawn in all, and valid / invalid components among them.
    pub drawn: usize,
    pub valid_found: usize,
    pub invalid_found: usize,
    /// The budget ran out before N of each class were found.
    pub budget_exhausted: bool,
}

impl Draws {
    /// Labelled rows taken as they are (all kept): e.g. scenes drawn elsewhere.
    pub fn from_rows(
        x: Tensor,
        keys: Vec<u32>,
        valid: Vec<bool>,
        components: usize,
    ) -> Result<Self> {
        let rows = x.dim(0)?;
        if keys.len() != rows || valid.len() != rows * components || components == 0 {
            bail!(
                "Gen-neG draws: {rows} rows, {} keys and {} labels for {components} components per row",
                keys.len(),
                valid.len()
            );
        }
        let v = valid.iter().filter(|&&b| b).count();
        Ok(Self {
            x,
            keys,
            components,
            per_class: None,
            drawn: rows,
            valid_found: v,
            invalid_found: valid.len() - v,
            valid,
            budget_exhausted: false,
        })
    }

    /// α = p_θ(valid): the valid fraction of every component drawn.
    pub fn alpha(&self) -> f64 {
        self.valid_found as f64 / (self.drawn * self.components).max(1) as f64
    }

    /// N of the balanced set: `per_class`, capped by each class's count.
    pub fn balanced_count(&self) -> usize {
        let rarer = self.valid_found.min(self.invalid_found);
        self.per_class.map_or(rarer, |n| n.min(rarer))
    }

    /// Rows kept.
    pub fn rows(&self) -> usize {
        self.x.dim(0).unwrap_or(0)
    }

    /// One line for logs and tables.
    pub fn summary(&self) -> String {
        let n = self.balanced_count();
        let unit = if self.components == 1 {
            "samples"
        } else {
            "components"
        };
        let mut s = format!(
            "drew {} rows: {} valid, {} invalid {unit} (α = {:.5}); training on {n} + {n}",
            self.drawn,
            self.valid_found,
            self.invalid_found,
            self.alpha()
        );
        if self.budget_exhausted {
            s.push_str(" — sample budget exhausted, going on with the invalid samples found");
        }
        s
    }
}

/// Draws from `model` in batches (row i under key i of the task's keys, with the
/// condition those keys give) until `per_class` valid and invalid components are found
/// or the budget is spent. `on_batch(drawn, valid, invalid)` is called after every batch.
#[allow(clippy::too_many_arguments)]
pub fn collect(
    model: &dyn Score,
    sampler: &Sampler,
    sigmas: &[f64],
    task: &dyn Task,
    sample_shape: &[usize],
    cfg: &CollectConfig,
    device: &Device,
    on_batch: &mut dyn FnMut(usize, usize, usize),
) -> Result<Draws> {
    cfg.validate()?;
    let k = task.components();
    let target = cfg.per_class.unwrap_or(usize::MAX);
    let all_keys = task.draw_keys(cfg.budget, cfg.seed)?;
    let (mut rows, mut keys, mut valid) = (Vec::new(), Vec::new(), Vec::new());
    let (mut n_pos, mut n_neg, mut drawn) = (0usize, 0usize, 0usize);
    // Components of the natural-proportion prefix still to keep.
    let mut prefix = cfg.per_class.map_or(usize::MAX, |n| 2 * n);
    while (n_pos < target || n_neg < target) && drawn < cfg.budget {
        let b = cfg.batch.min(cfg.budget - drawn);
        let batch_keys = &all_keys[drawn..drawn + b];
        let mut noise = SampleNoise::new(cfg.seed, drawn, b);
        let mut shape = vec![b];
        shape.extend_from_slice(sample_shape);
        let x0 = initial_noise(&mut noise, &shape, sigmas[0], DType::F32, device)?;
        let cond = task.cond(batch_keys)?;
        let x = sampler
            .sample_with(model, x0, sigmas, &cond, &mut noise, None)?
            .to_dtype(DType::F32)?;
        let labels = task.label(&x, batch_keys)?;
        if labels.len() != b * k {
            bail!(
                "Gen-neG labelling: {} labels for {b} rows of {k} components",
                labels.len()
            );
        }
        let mut keep = Vec::new();
        for (i, row) in labels.chunks_exact(k).enumerate() {
            let mut kept = prefix > 0;
            prefix = prefix.saturating_sub(k);
            for &v in row {
                let count = if v { &mut n_pos } else { &mut n_neg };
                kept |= *count < target;
                *count += 1;
            }
            if kept {
                keep.push(i as u32);
                keys.push(batch_keys[i]);
                valid.extend_from_slice(row);
            }
        }
        if !keep.is_empty() {
            let n = keep.len();
            rows.push(x.index_select(&Tensor::from_vec(keep, n, x.device())?, 0)?);
        }
        drawn += b;
        on_batch(drawn, n_pos, n_neg);
    }
    let budget_exhausted = n_pos < target || n_neg < target;
    let short = n_neg < cfg.min_negatives || n_pos < cfg.min_negatives;
    if cfg.per_class.is_some() && budget_exhausted && short {
        bail!(
            "Gen-neG collection: the budget of {} rows found {n_neg} invalid and {n_pos} valid components, fewer than the minimum {} of each; raise the budget or lower min_negatives",
            cfg.budget,
            cfg.min_negatives
        );
    }
    let x = if rows.is_empty() {
        let mut shape = vec![0];
        shape.extend_from_slice(sample_shape);
        Tensor::zeros(shape, DType::F32, device)?
    } else {
        Tensor::cat(&rows, 0)?
    };
    Ok(Draws {
        x,
        keys,
        valid,
        components: k,
        per_class: cfg.per_class,
        drawn,
        valid_found: n_pos,
        invalid_found: n_neg,
        budget_exhausted: cfg.per_class.is_some() && budget_exhausted,
    })
}
