//! Sampling and labelling until both classes are in hand, under a budget; from the model
//! itself or, by sequential importance sampling, from a proposal (App. D.2); in one
//! process or in shards merged afterwards.

use crate::task::Task;
use candle_core::{bail, DType, Device, Result, Tensor};
use scoreguide_guidance::Score;
use scoreguide_samplers::{initial_noise, sample_sis, Sampler};
use scoreguide_sde::SampleNoise;
use scoreguide_train::Checkpoint;
use serde::{Deserialize, Serialize};
use std::ops::Range;

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

/// Where a collection's rows come from.
#[derive(Clone, Copy)]
pub enum Source<'a> {
    /// The model itself: the standard synthetic set.
    Model(&'a dyn Score),
    /// Chains of `proposal` (an earlier, more often invalid model), each weighted for
    /// `target` by its sampler's transition densities (Gen-neG App. D.2); the sampler
    /// must be stochastic with Gaussian steps ([`sample_sis`]).
    Sis {
        target: &'a dyn Score,
        proposal: &'a dyn Score,
    },
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
    /// Sequential importance sampling: each kept row's log weight, and the weighted
    /// summary of everything drawn.
    pub sis: Option<SisWeights>,
}

/// The importance weights of rows drawn from a proposal ([`Source::Sis`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SisWeights {
    /// Log weight of each kept row (up to one constant for the whole collection).
    pub log_weights: Vec<f64>,
    /// α under the target: the weighted valid fraction of every component drawn.
    pub alpha: f64,
    /// Kish's effective sample size of everything drawn, (Σw)² / Σw².
    pub ess: f64,
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
            sis: None,
        })
    }

    /// α = p_θ(valid): the valid fraction of every component drawn (weighted for the
    /// target when the rows came from a proposal).
    pub fn alpha(&self) -> f64 {
        match &self.sis {
            Some(s) => s.alpha,
            None => self.valid_found as f64 / (self.drawn * self.components).max(1) as f64,
        }
    }

    /// N of the balanced set: `per_class`, capped by each class's count.
    pub fn balanced_count(&self) -> usize {
        let rarer = self.valid_found.min(self.invalid_found);
        self.per_class.map_or(rarer, |n| n.min(rarer))
    }

    /// Kish's effective sample size of the first N valid and the first N invalid
    /// components (what a balanced set keeps) under their importance weights; `None`
    /// for unweighted draws. An effective count far below N means the class's weights
    /// have degenerated: the set stands for fewer samples than it holds.
    pub fn class_ess(&self) -> Option<(f64, f64)> {
        let sis = self.sis.as_ref()?;
        let n = self.balanced_count();
        let k = self.components;
        let ess = |class: bool| {
            let lw: Vec<f64> = self
                .valid
                .iter()
                .enumerate()
                .filter(|(_, &v)| v == class)
                .take(n)
                .map(|(i, _)| sis.log_weights[i / k])
                .collect();
            let top = lw.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = lw.iter().map(|l| (l - top).exp()).collect();
            let (s, s2) = (w.iter().sum::<f64>(), w.iter().map(|v| v * v).sum::<f64>());
            if s2 > 0.0 {
                s * s / s2
            } else {
                0.0
            }
        };
        Some((ess(true), ess(false)))
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
            "drew {} rows: {} valid, {} invalid {unit} (α = {:.5}",
            self.drawn,
            self.valid_found,
            self.invalid_found,
            self.alpha()
        );
        if let (Some(w), Some((ev, ei))) = (&self.sis, self.class_ess()) {
            s.push_str(&format!(
                " for the target, weighted; ESS {:.0} of {}; of the {n} + {n} kept, effective {ev:.0} valid and {ei:.0} invalid",
                w.ess, self.drawn
            ));
        }
        s.push_str(&format!("); training on {n} + {n}"));
        if self.budget_exhausted {
            s.push_str(" — sample budget exhausted, going on with the invalid samples found");
        }
        s
    }

    /// The draws as one checkpoint (rows as the tensor `x`; keys, labels, counts and
    /// weights as metadata), equal draws giving equal bytes.
    pub fn to_checkpoint(&self) -> Result<Checkpoint> {
        let mut c = Checkpoint::new();
        c.tensors
            .insert("x".into(), self.x.to_device(&Device::Cpu)?);
        c.set_meta("keys", &self.keys)?;
        c.set_meta("valid", &self.valid)?;
        c.set_meta("components", &self.components)?;
        c.set_meta("per_class", &self.per_class)?;
        c.set_meta("drawn", &self.drawn)?;
        c.set_meta("valid_found", &self.valid_found)?;
        c.set_meta("invalid_found", &self.invalid_found)?;
        c.set_meta("budget_exhausted", &self.budget_exhausted)?;
        c.set_meta("sis", &self.sis)?;
        Ok(c)
    }

    /// Draws saved by [`Draws::to_checkpoint`] (files from before `components`,
    /// `per_class` and `sis` were kept read as K = 1, no N, no weights).
    pub fn from_checkpoint(c: &Checkpoint, device: &Device) -> Result<Self> {
        let optional = |key: &str| c.metadata.contains_key(key);
        let x = c
            .tensors
            .get("x")
            .ok_or_else(|| candle_core::Error::msg("Gen-neG draws: no tensor `x`"))?;
        let components = if optional("components") {
            c.meta("components")?
        } else {
            1
        };
        let mut d = Self::from_rows(
            x.to_device(device)?,
            c.meta("keys")?,
            c.meta("valid")?,
            components,
        )?;
        d.drawn = c.meta("drawn")?;
        d.valid_found = c.meta("valid_found")?;
        d.invalid_found = c.meta("invalid_found")?;
        d.budget_exhausted = c.meta("budget_exhausted")?;
        if optional("per_class") {
            d.per_class = c.meta("per_class")?;
        }
        if optional("sis") {
            d.sis = c.meta("sis")?;
        }
        if let Some(w) = &d.sis {
            if w.log_weights.len() != d.rows() {
                bail!(
                    "Gen-neG draws: {} log weights for {} rows",
                    w.log_weights.len(),
                    d.rows()
                );
            }
        }
        Ok(d)
    }
}

/// One batch of a collection: rows `first .. first + b`, labelled.
struct Batch {
    x: Tensor,
    keys: Vec<u32>,
    valid: Vec<bool>,
    log_weights: Option<Vec<f64>>,
}

/// `parts` stacked, or no rows of `sample_shape` when there are none.
fn cat_rows(parts: &[Tensor], sample_shape: &[usize], device: &Device) -> Result<Tensor> {
    if parts.is_empty() {
        let mut shape = vec![0];
        shape.extend_from_slice(sample_shape);
        Tensor::zeros(shape, DType::F32, device)
    } else {
        Tensor::cat(parts, 0)
    }
}

/// Everything a batch is drawn from.
struct Drawer<'a> {
    source: Source<'a>,
    sampler: &'a Sampler,
    sigmas: &'a [f64],
    task: &'a dyn Task,
    sample_shape: &'a [usize],
    cfg: &'a CollectConfig,
    device: &'a Device,
    keys: Vec<u32>,
}

impl Drawer<'_> {
    /// Rows `first .. first + b`: row i from noise stream (seed, i) under key i.
    fn batch(&self, first: usize, b: usize) -> Result<Batch> {
        let keys = self.keys[first..first + b].to_vec();
        let mut noise = SampleNoise::new(self.cfg.seed, first, b);
        let mut shape = vec![b];
        shape.extend_from_slice(self.sample_shape);
        let x0 = initial_noise(&mut noise, &shape, self.sigmas[0], DType::F32, self.device)?;
        let cond = self.task.cond(&keys)?;
        let (x, log_weights) = match self.source {
            Source::Model(model) => (
                self.sampler
                    .sample_with(model, x0, self.sigmas, &cond, &mut noise, None)?,
                None,
            ),
            Source::Sis { target, proposal } => {
                let (x, w) = sample_sis(
                    self.sampler,
                    target,
                    proposal,
                    x0,
                    self.sigmas,
                    &cond,
                    &mut noise,
                    None,
                )?;
                (x, Some(w))
            }
        };
        let x = x.to_dtype(DType::F32)?;
        let valid = self.task.label(&x, &keys)?;
        let k = self.task.components();
        if valid.len() != b * k {
            bail!(
                "Gen-neG labelling: {} labels for {b} rows of {k} components",
                valid.len()
            );
        }
        Ok(Batch {
            x,
            keys,
            valid,
            log_weights,
        })
    }
}

/// log Σ exp(v), accumulated in drawing order.
#[derive(Clone, Copy)]
struct LogSum {
    max: f64,
    sum: f64,
}

impl LogSum {
    const EMPTY: Self = Self {
        max: f64::NEG_INFINITY,
        sum: 0.0,
    };

    fn add(&mut self, v: f64) {
        if v > self.max {
            self.sum = self.sum * (self.max - v).exp() + 1.0;
            self.max = v;
        } else {
            self.sum += (v - self.max).exp();
        }
    }

    fn value(self) -> f64 {
        self.max + self.sum.ln()
    }
}

/// Takes batches in drawing order and keeps what the classifier sets need; a
/// collection's outcome depends only on the sequence of rows, not on who drew them.
struct Selector {
    k: usize,
    target: usize,
    /// Components of the natural-proportion prefix still to keep.
    prefix: usize,
    n_pos: usize,
    n_neg: usize,
    drawn: usize,
    rows: Vec<Tensor>,
    keys: Vec<u32>,
    valid: Vec<bool>,
    log_weights: Vec<f64>,
    weighted: bool,
    mass: LogSum,
    valid_mass: LogSum,
    square_mass: LogSum,
}

impl Selector {
    fn new(cfg: &CollectConfig, k: usize, weighted: bool) -> Self {
        Self {
            k,
            target: cfg.per_class.unwrap_or(usize::MAX),
            prefix: cfg.per_class.map_or(usize::MAX, |n| 2 * n),
            n_pos: 0,
            n_neg: 0,
            drawn: 0,
            rows: Vec::new(),
            keys: Vec::new(),
            valid: Vec::new(),
            log_weights: Vec::new(),
            weighted,
            mass: LogSum::EMPTY,
            valid_mass: LogSum::EMPTY,
            square_mass: LogSum::EMPTY,
        }
    }

    fn wants_more(&self, budget: usize) -> bool {
        (self.n_pos < self.target || self.n_neg < self.target) && self.drawn < budget
    }

    fn push(&mut self, batch: &Batch) -> Result<()> {
        let k = self.k;
        if batch.log_weights.is_some() != self.weighted {
            bail!("Gen-neG collection: weighted and unweighted batches mixed");
        }
        let mut keep = Vec::new();
        for (i, row) in batch.valid.chunks_exact(k).enumerate() {
            let mut kept = self.prefix > 0;
            self.prefix = self.prefix.saturating_sub(k);
            for &v in row {
                let count = if v { &mut self.n_pos } else { &mut self.n_neg };
                kept |= *count < self.target;
                *count += 1;
            }
            if let Some(w) = &batch.log_weights {
                let valid = row.iter().filter(|&&v| v).count();
                self.mass.add(w[i]);
                self.square_mass.add(2.0 * w[i]);
                if valid > 0 {
                    self.valid_mass.add(w[i] + (valid as f64 / k as f64).ln());
                }
            }
            if kept {
                keep.push(i as u32);
                self.keys.push(batch.keys[i]);
                self.valid.extend_from_slice(row);
                if let Some(w) = &batch.log_weights {
                    self.log_weights.push(w[i]);
                }
            }
        }
        if !keep.is_empty() {
            let n = keep.len();
            let idx = Tensor::from_vec(keep, n, batch.x.device())?;
            self.rows.push(batch.x.index_select(&idx, 0)?);
        }
        self.drawn += batch.keys.len();
        Ok(())
    }

    fn finish(self, cfg: &CollectConfig, sample_shape: &[usize], device: &Device) -> Result<Draws> {
        let (n_pos, n_neg) = (self.n_pos, self.n_neg);
        let budget_exhausted = n_pos < self.target || n_neg < self.target;
        let short = n_neg < cfg.min_negatives || n_pos < cfg.min_negatives;
        if cfg.per_class.is_some() && budget_exhausted && short {
            bail!(
                "Gen-neG collection: the budget of {} rows found {n_neg} invalid and {n_pos} valid components, fewer than the minimum {} of each; raise the budget or lower min_negatives",
                cfg.budget,
                cfg.min_negatives
            );
        }
        let x = cat_rows(&self.rows, sample_shape, device)?;
        let sis = self.weighted.then(|| {
            let alpha = if n_pos == 0 {
                0.0
            } else {
                (self.valid_mass.value() - self.mass.value()).exp()
            };
            SisWeights {
                log_weights: self.log_weights,
                alpha,
                ess: (2.0 * self.mass.value() - self.square_mass.value()).exp(),
            }
        });
        Ok(Draws {
            x,
            keys: self.keys,
            valid: self.valid,
            components: self.k,
            per_class: cfg.per_class,
            drawn: self.drawn,
            valid_found: n_pos,
            invalid_found: n_neg,
            budget_exhausted: cfg.per_class.is_some() && budget_exhausted,
            sis,
        })
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
    collect_from(
        Source::Model(model),
        sampler,
        sigmas,
        task,
        sample_shape,
        cfg,
        device,
        on_batch,
    )
}

/// [`collect`] from any [`Source`]: with [`Source::Sis`] the rows are the proposal's
/// and [`Draws::sis`] holds their weights for the target.
#[allow(clippy::too_many_arguments)]
pub fn collect_from(
    source: Source,
    sampler: &Sampler,
    sigmas: &[f64],
    task: &dyn Task,
    sample_shape: &[usize],
    cfg: &CollectConfig,
    device: &Device,
    on_batch: &mut dyn FnMut(usize, usize, usize),
) -> Result<Draws> {
    cfg.validate()?;
    let drawer = Drawer {
        source,
        sampler,
        sigmas,
        task,
        sample_shape,
        cfg,
        device,
        keys: task.draw_keys(cfg.budget, cfg.seed)?,
    };
    let mut selector = Selector::new(cfg, task.components(), matches!(source, Source::Sis { .. }));
    while selector.wants_more(cfg.budget) {
        let first = selector.drawn;
        let batch = drawer.batch(first, cfg.batch.min(cfg.budget - first))?;
        selector.push(&batch)?;
        on_batch(selector.drawn, selector.n_pos, selector.n_neg);
    }
    selector.finish(cfg, sample_shape, device)
}

/// Shard `index` of `count` (`--shard i/n`, counted from 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl std::str::FromStr for Shard {
    type Err = String;

    /// `"i/n"` with i < n.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad = || format!("shard `{s}`: expected i/n with 0 ≤ i < n, e.g. 0/4");
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let (index, count) = (
            i.trim().parse().map_err(|_| bad())?,
            n.trim().parse().map_err(|_| bad())?,
        );
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Self { index, count })
    }
}

impl Shard {
    /// This shard's batches of a collection's `batches`: a contiguous range, the first
    /// `batches mod count` shards one batch longer.
    pub fn batches(&self, batches: usize) -> Range<usize> {
        let (q, r) = (batches / self.count, batches % self.count);
        let start = self.index * q + self.index.min(r);
        start..start + q + usize::from(self.index < r)
    }

    /// `parts` in shard order, when they are shards 0 … n − 1 of one n, each once (in
    /// any order); otherwise an error saying which shard is missing, repeated or of
    /// another count.
    pub fn in_order<T>(mut parts: Vec<(Shard, T)>) -> Result<Vec<T>> {
        let Some(count) = parts.first().map(|(s, _)| s.count) else {
            bail!("no shards given");
        };
        parts.sort_by_key(|(s, _)| s.index);
        for (i, (s, _)) in parts.iter().enumerate() {
            if s.count != count {
                bail!("shard {}/{} among shards of {count}", s.index, s.count);
            }
            if s.index != i {
                let what = if s.index < i {
                    "given twice"
                } else {
                    "missing"
                };
                bail!("shard {i}/{count} is {what}");
            }
        }
        if parts.len() != count {
            bail!("{} of {count} shards given", parts.len());
        }
        Ok(parts.into_iter().map(|(_, t)| t).collect())
    }
}

/// A shard's part of a collection: every row of its batches, labelled, with the
/// configuration it was drawn under. [`merge_shards`] turns all of them into the
/// [`Draws`] a single process would have made.
#[derive(Debug, Clone)]
pub struct ShardDraws {
    pub shard: Shard,
    pub cfg: CollectConfig,
    /// The collection's row of this shard's first row.
    pub first_row: usize,
    /// Every row drawn, labels and (SIS) log weights, kept whole.
    pub draws: Draws,
    pub log_weights: Option<Vec<f64>>,
}

impl ShardDraws {
    pub fn to_checkpoint(&self) -> Result<Checkpoint> {
        let mut c = self.draws.to_checkpoint()?;
        c.set_meta("shard", &self.shard)?;
        c.set_meta("collect", &self.cfg)?;
        c.set_meta("first_row", &self.first_row)?;
        c.set_meta("shard_log_weights", &self.log_weights)?;
        Ok(c)
    }

    pub fn from_checkpoint(c: &Checkpoint, device: &Device) -> Result<Self> {
        if !c.metadata.contains_key("shard") {
            bail!("not a Gen-neG shard (no `shard` metadata): a merged set or another file?");
        }
        Ok(Self {
            shard: c.meta("shard")?,
            cfg: c.meta("collect")?,
            first_row: c.meta("first_row")?,
            draws: Draws::from_checkpoint(c, device)?,
            log_weights: c.meta("shard_log_weights")?,
        })
    }
}

/// Shard `shard` of the collection [`collect_from`] would make with `cfg`: every batch
/// of the budget in the shard's range ([`Shard::batches`]), drawn and labelled exactly
/// as the single process draws them. A sharded collection draws its whole budget (a
/// shard cannot know when the others have found enough): size the budget to the
/// expected need.
#[allow(clippy::too_many_arguments)]
pub fn collect_shard(
    source: Source,
    sampler: &Sampler,
    sigmas: &[f64],
    task: &dyn Task,
    sample_shape: &[usize],
    cfg: &CollectConfig,
    shard: Shard,
    device: &Device,
    on_batch: &mut dyn FnMut(usize, usize),
) -> Result<ShardDraws> {
    cfg.validate()?;
    let drawer = Drawer {
        source,
        sampler,
        sigmas,
        task,
        sample_shape,
        cfg,
        device,
        keys: task.draw_keys(cfg.budget, cfg.seed)?,
    };
    let range = shard.batches(cfg.budget.div_ceil(cfg.batch));
    let first_row = range.start * cfg.batch;
    let (mut parts, mut keys, mut valid, mut weights) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (done, j) in range.clone().enumerate() {
        let first = j * cfg.batch;
        let b = drawer.batch(first, cfg.batch.min(cfg.budget - first))?;
        parts.push(b.x);
        keys.extend(b.keys);
        valid.extend(b.valid);
        if let Some(w) = b.log_weights {
            weights.extend(w);
        }
        on_batch(done + 1, range.len());
    }
    let x = cat_rows(&parts, sample_shape, device)?;
    let mut draws = Draws::from_rows(x, keys, valid, task.components())?;
    draws.per_class = cfg.per_class;
    Ok(ShardDraws {
        shard,
        cfg: cfg.clone(),
        first_row,
        draws,
        log_weights: matches!(source, Source::Sis { .. }).then_some(weights),
    })
}

/// The collection the single process would have made, from shards of one collection
/// (any order): their batches are taken in drawing order until the classes are in hand
/// or the budget is spent, as [`collect_from`] takes its own. Shards of another
/// collection, a missing or repeated shard, are errors.
pub fn merge_shards(
    shards: &[ShardDraws],
    sample_shape: &[usize],
    device: &Device,
) -> Result<Draws> {
    let Some(first) = shards.first() else {
        bail!("Gen-neG merge: no shards given");
    };
    let (cfg, count) = (&first.cfg, first.shard.count);
    if let Some(s) = shards.iter().find(|s| s.cfg != *cfg) {
        bail!(
            "Gen-neG merge: shard {}/{} was drawn under {:?}, shard {}/{count} under {cfg:?}",
            s.shard.index,
            s.shard.count,
            s.cfg,
            first.shard.index
        );
    }
    let order = Shard::in_order(shards.iter().map(|s| (s.shard, s)).collect())
        .map_err(|e| candle_core::Error::msg(format!("Gen-neG merge: {e}")))?;
    let k = first.draws.components;
    let weighted = first.log_weights.is_some();
    let mut selector = Selector::new(cfg, k, weighted);
    for s in order {
        let rows = s.draws.rows();
        let mut at = 0;
        while at < rows && selector.wants_more(cfg.budget) {
            if s.first_row + at != selector.drawn {
                bail!(
                    "Gen-neG merge: shard {}/{count} starts at row {}, expected {}",
                    s.shard.index,
                    s.first_row + at,
                    selector.drawn
                );
            }
            let b = cfg.batch.min(rows - at);
            selector.push(&Batch {
                x: s.draws.x.narrow(0, at, b)?,
                keys: s.draws.keys[at..at + b].to_vec(),
                valid: s.draws.valid[at * k..(at + b) * k].to_vec(),
                log_weights: s.log_weights.as_ref().map(|w| w[at..at + b].to_vec()),
            })?;
            at += b;
        }
    }
    selector.finish(cfg, sample_shape, device)
}
