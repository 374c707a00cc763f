//! Gen-neG's cheaper synthetic sets on the checkerboard (App. D.2, Fig. 9): two Gen-neG
//! chains from one baseline, one drawing each iteration's set from its current model
//! (the standard set), the other from a proposal (the baseline, or the current stack at
//! a fraction of its guidance) with sequential importance weights for the current model
//! (the SIS set); per iteration, the set's sampling time and the
//! new model's infraction rate.

use super::{label, sample_with, BaselineConfig};
use crate::config::Preset;
use crate::plot::{line_chart, BLUE, ORANGE};
use candle_core::{bail, Device, Result};
use scoreguide_genneg::{
    collect_from, train_classifier, ClassifierKind, ClassifierTrainConfig, CollectConfig,
    LabelledSet, Source, Stack, StackedClassifier, Task,
};
use scoreguide_guidance::Score;
use scoreguide_samplers::Sampler;
use scoreguide_sde::{append_zero, derive_seed, log_linear};
use scoreguide_train::{Checkpoint, Progress};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::Instant;

/// The `genneg_sis` run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SisCheckerboardConfig {
    /// Trained when no `--baseline` is given.
    pub baseline: BaselineConfig,
    /// Gen-neG iterations of each chain.
    pub iterations: usize,
    /// Valid and invalid samples per classifier.
    pub per_class: usize,
    /// Most rows drawn for one set.
    pub budget: usize,
    pub min_negatives: usize,
    /// Rows per sampler call.
    pub batch: usize,
    pub classifier: ClassifierTrainConfig,
    /// DDPM ancestral steps on EDM's log-linear grid 80 → 2e-3 (SIS needs Gaussian steps;
    /// both chains and every evaluation use the same sampler).
    pub steps: usize,
    /// Samples per model for the infraction rate.
    pub samples: usize,
    /// Size each SIS set by its effective invalid count instead of its raw count: a
    /// pilot set of `per_class` shows how many effective invalid samples it holds, and
    /// the set is drawn again with `per_class` scaled so that this count reaches
    /// `per_class` (the standard set's; at most `budget` rows).
    #[serde(default)]
    pub sis_effective: bool,
    /// The SIS proposal: the baseline guided by the current stack with every
    /// classifier's weight times this (0: the baseline itself). Between 0 and 1 the
    /// proposal keeps more invalid mass than the target, in the regions the target
    /// still puts it, at the cost of evaluating the stack twice per step.
    #[serde(default)]
    pub proposal_guidance: f64,
}

impl Preset for SisCheckerboardConfig {
    fn quick() -> Self {
        let full = Self::full();
        Self {
            baseline: BaselineConfig {
                iters: 3_000,
                ..BaselineConfig::default()
            },
            iterations: 3,
            per_class: 300,
            budget: 60_000,
            min_negatives: 50,
            batch: 5_000,
            classifier: ClassifierTrainConfig {
                iters: 200,
                batch: 1024,
                ..full.classifier.clone()
            },
            steps: 24,
            samples: 4_000,
            sis_effective: false,
            proposal_guidance: 0.0,
        }
    }

    fn full() -> Self {
        Self {
            baseline: BaselineConfig {
                iters: 10_000,
                ..BaselineConfig::default()
            },
            iterations: 5,
            per_class: 1_000,
            budget: 400_000,
            min_negatives: 200,
            batch: 10_000,
            classifier: ClassifierTrainConfig {
                iters: 1_500,
                batch: 2048,
                ..ClassifierTrainConfig::default()
            },
            steps: 40,
            samples: 10_000,
            sis_effective: false,
            proposal_guidance: 0.0,
        }
    }

    fn validate(&self) -> Result<()> {
        if self.iterations == 0 || self.per_class == 0 || self.samples == 0 || self.steps < 2 {
            bail!("genneg_sis config: iterations, per_class and samples must be positive and steps ≥ 2, got {self:?}");
        }
        if !(0.0..=1.0).contains(&self.proposal_guidance) {
            bail!(
                "genneg_sis config: proposal_guidance must lie in [0, 1], got {}",
                self.proposal_guidance
            );
        }
        self.collect(0).validate()?;
        self.classifier.sigma.validate()
    }
}

impl SisCheckerboardConfig {
    pub fn seeded(mut self, seed: u64) -> Self {
        self.baseline.data_seed = seed;
        self.baseline.train.seed = seed;
        self.classifier.train.seed = seed;
        self
    }

    /// The sampler of every set and evaluation, and its σ grid.
    pub fn sampler(&self) -> Result<(Sampler, Vec<f64>)> {
        Ok((
            Sampler::DdpmAncestral,
            append_zero(log_linear(self.steps, 2e-3, 80.0)?),
        ))
    }

    pub fn collect(&self, seed: u64) -> CollectConfig {
        CollectConfig {
            per_class: Some(self.per_class),
            batch: self.batch,
            budget: self.budget,
            min_negatives: self.min_negatives,
            seed,
        }
    }
}

/// How a chain draws its synthetic sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SetMethod {
    /// From the current model.
    Standard,
    /// From a proposal (the baseline, or the stack at `proposal_guidance`), weighted
    /// for the current model.
    Sis,
}

impl SetMethod {
    pub fn name(self) -> &'static str {
        match self {
            Self::Standard => "standard",
            Self::Sis => "sis",
        }
    }
}

/// One iteration of one chain: its set and the model it made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SisRow {
    pub method: SetMethod,
    pub iteration: usize,
    /// Rows drawn for the set, and the classes found among them.
    pub drawn: usize,
    pub valid_found: usize,
    pub invalid_found: usize,
    /// α of the current model (weighted for SIS), and SIS's effective sample size.
    pub alpha: f64,
    pub ess: Option<f64>,
    /// SIS: the effective number of the kept invalid samples (of `per_class`).
    #[serde(default)]
    pub ess_invalid: Option<f64>,
    /// Wall-clock seconds drawing and labelling the set.
    pub sampling_seconds: f64,
    /// The new model's infraction rate and its 95% interval, over `samples` draws.
    pub infraction: f64,
    pub ci95: (f64, f64),
}

const ROW_META: &str = "sis_row";

/// Runs one chain for `cfg.iterations` iterations from `baseline`, keeping each
/// iteration's stack (with its row) as `out/<method>_<it>.safetensors`; with `reuse`,
/// iterations already there are read back, not redone.
#[allow(clippy::too_many_arguments)]
pub fn chain(
    method: SetMethod,
    cfg: &SisCheckerboardConfig,
    baseline: &Stack,
    task: &dyn Task,
    seed: u64,
    out: &Path,
    reuse: bool,
    dev: &Device,
) -> Result<Vec<SisRow>> {
    let (sampler, sigmas) = cfg.sampler()?;
    let mut current = baseline.clone();
    let mut rows = Vec::new();
    for it in 1..=cfg.iterations {
        let name = method.name();
        let path = out.join(format!("{name}_{it}.safetensors"));
        if reuse && path.exists() {
            let ck = Checkpoint::load(&path)?;
            let row: SisRow = ck.meta(ROW_META)?;
            let stack = Stack::from_checkpoint(&ck)?;
            if stack.classifiers.len() != it || ck.meta::<SisCheckerboardConfig>("run")? != *cfg {
                bail!(
                    "{} was made by another run; use another --out or drop --reuse",
                    path.display()
                );
            }
            eprintln!("{name} iteration {it}: reusing {}", path.display());
            current = stack;
            rows.push(row);
            continue;
        }
        let target = current.guided(dev)?;
        // Iteration 1's target is the baseline itself: no weights to compute, and the
        // standard chain needs no proposal.
        let proposal = match method {
            SetMethod::Sis if it > 1 => Some(current.tempered(cfg.proposal_guidance)?.guided(dev)?),
            _ => None,
        };
        let source = match &proposal {
            Some(proposal) => Source::Sis {
                target: &target,
                proposal,
            },
            None => Source::Model(&target),
        };
        let mut collect_cfg = cfg.collect(derive_seed(seed, 100 + it as u64));
        let t0 = Instant::now();
        let draw = |c: &CollectConfig| {
            let mut progress = Progress::new(&format!("{name} {it}: drawing"), c.budget);
            collect_from(
                source,
                &sampler,
                &sigmas,
                task,
                &[2],
                c,
                dev,
                &mut |drawn, p, n| progress.update(drawn, &format!("{p} valid, {n} invalid")),
            )
        };
        let mut draws = draw(&collect_cfg)?;
        if let (true, Some((_, ess))) = (cfg.sis_effective, draws.class_ess()) {
            // The pilot's rows are the first rows of the larger set (same seed).
            let n = cfg.per_class as f64;
            let scaled = (n * n / ess.max(1.0)).ceil() as usize;
            collect_cfg.per_class = Some(scaled.max(cfg.per_class));
            eprintln!(
                "{name} {it}: {} effective invalid of {}; drawing for {} per class",
                ess.round(),
                cfg.per_class,
                scaled
            );
            draws = draw(&collect_cfg)?;
        }
        let sampling_seconds = t0.elapsed().as_secs_f64();
        eprintln!(
            "{name} {it}: {} in {sampling_seconds:.1} s",
            draws.summary()
        );
        let set = LabelledSet::new(&draws, ClassifierKind::IsBalanced)?;
        let ccfg = ClassifierTrainConfig {
            train: scoreguide_train::TrainConfig {
                seed: seed + it as u64,
                ..cfg.classifier.train.clone()
            },
            ..cfg.classifier.clone()
        };
        let mut progress = Progress::new(&format!("{name} {it}: classifier"), ccfg.iters as usize);
        let trained = train_classifier(&set, task, true, &ccfg, dev, &mut progress)?;
        let next = current.with(StackedClassifier::from_checkpoint(&trained.checkpoint)?);
        let guided = next.guided(dev)?;
        let (rate, _) = evaluate(&guided, cfg, seed, &format!("{name} {it}: evaluating"), dev)?;
        let row = SisRow {
            method,
            iteration: it,
            drawn: draws.drawn,
            valid_found: draws.valid_found,
            invalid_found: draws.invalid_found,
            alpha: draws.alpha(),
            ess: draws.sis.as_ref().map(|s| s.ess),
            ess_invalid: draws.class_ess().map(|(_, invalid)| invalid),
            sampling_seconds,
            infraction: rate.rate,
            ci95: rate.ci95,
        };
        let mut ck = next.to_checkpoint()?;
        ck.set_meta(ROW_META, &row)?;
        ck.set_meta("run", cfg)?;
        ck.save(&path)?;
        current = next;
        rows.push(row);
    }
    Ok(rows)
}

/// The infraction rate of `model` over `cfg.samples` draws (the same noise for every
/// model of the run).
pub fn evaluate(
    model: &dyn Score,
    cfg: &SisCheckerboardConfig,
    seed: u64,
    what: &str,
    dev: &Device,
) -> Result<(scoreguide_metrics::Rate, candle_core::Tensor)> {
    let (sampler, sigmas) = cfg.sampler()?;
    let x = sample_with(
        model,
        &sampler,
        &sigmas,
        cfg.samples,
        derive_seed(seed, 7),
        cfg.batch,
        dev,
        what,
    )?;
    Ok((label(&x)?.0, x))
}

/// Fig. 9 as a markdown table: per iteration, each chain's rows drawn, sampling time
/// and infraction rate.
pub fn table(baseline: &scoreguide_metrics::Rate, rows: &[SisRow]) -> String {
    let mut s = format!(
        "baseline infraction {:.3}% [{:.3}, {:.3}]\n\n",
        100.0 * baseline.rate,
        100.0 * baseline.ci95.0,
        100.0 * baseline.ci95.1
    );
    s.push_str("| iteration | set | drawn | valid / invalid | α | ESS | invalid kept, effective | sampling s | infraction % | 95% interval |\n");
    s.push_str("|---|---|---|---|---|---|---|---|---|---|\n");
    let mut sorted: Vec<&SisRow> = rows.iter().collect();
    sorted.sort_by_key(|r| (r.iteration, r.method.name()));
    for r in sorted {
        s.push_str(&format!(
            "| {} | {} | {} | {} / {} | {:.5} | {} | {} | {:.1} | {:.3} | [{:.3}, {:.3}] |\n",
            r.iteration,
            r.method.name(),
            r.drawn,
            r.valid_found,
            r.invalid_found,
            r.alpha,
            r.ess.map_or("—".into(), |e| format!("{e:.0}")),
            r.ess_invalid.map_or("—".into(), |e| format!("{e:.0}")),
            r.sampling_seconds,
            100.0 * r.infraction,
            100.0 * r.ci95.0,
            100.0 * r.ci95.1
        ));
    }
    s
}

/// Fig. 9's two panels: sampling time per iteration and infraction rate per iteration,
/// one line per chain.
pub fn plot(dir: &Path, rows: &[SisRow]) -> Result<()> {
    let series = |m: SetMethod, f: &dyn Fn(&SisRow) -> f64| {
        rows.iter()
            .filter(|r| r.method == m)
            .map(|r| (r.iteration as f64, f(r)))
            .collect::<Vec<_>>()
    };
    let ticks: Vec<f64> = rows.iter().map(|r| r.iteration as f64).collect();
    line_chart(
        &dir.join("sampling_time.png"),
        "synthetic set sampling time (s): standard (blue), SIS (orange)",
        &ticks,
        &[
            (BLUE, series(SetMethod::Standard, &|r| r.sampling_seconds)),
            (ORANGE, series(SetMethod::Sis, &|r| r.sampling_seconds)),
        ],
    )?;
    line_chart(
        &dir.join("infraction.png"),
        "infraction % after each iteration: standard (blue), SIS (orange)",
        &ticks,
        &[
            (BLUE, series(SetMethod::Standard, &|r| 100.0 * r.infraction)),
            (ORANGE, series(SetMethod::Sis, &|r| 100.0 * r.infraction)),
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proposal_guidance_outside_the_unit_interval_is_refused() {
        for g in [-0.1, 1.5, f64::NAN] {
            let cfg = SisCheckerboardConfig {
                proposal_guidance: g,
                ..SisCheckerboardConfig::quick()
            };
            let err = cfg.validate().unwrap_err().to_string();
            assert!(err.contains("proposal_guidance"), "{err}");
        }
        let cfg = SisCheckerboardConfig {
            proposal_guidance: 0.5,
            ..SisCheckerboardConfig::quick()
        };
        cfg.validate().unwrap();
    }
}
