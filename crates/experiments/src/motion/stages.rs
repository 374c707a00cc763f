//! The `genneg_motion` run stage by stage — data, baseline, motion encoder, Gen-neG's
//! draws, classifiers (with the ablations), distillation, evaluation and figures — each
//! kept in the output folder and reused by `--reuse` (trainings continue exactly).

use super::{
    check_trained_on, features_of, motion_strip, r_elbo, sample_motions, score_draws,
    train_baseline, train_encoder, ModelRow, MotionData, MotionEncoder, MotionRunConfig,
    MotionSampler, MotionTask, SeedScores,
};
use crate::plot::save_grid;
use crate::runtime::write_json;
use candle_core::{bail, DType, Device, Result, Tensor};
use scoreguide_data::Dataset;
use scoreguide_genneg::{
    collect, distill, train_classifier, ClassifierKind, Draws, LabelledSet, Stack,
    StackedClassifier,
};
use scoreguide_guidance::Score;
use scoreguide_oracles::motion::GroundOracle;
use scoreguide_sde::derive_seed;
use scoreguide_train::{load_score_model, train_resumable, Checkpoint, Progress, Weights};
use std::path::PathBuf;

/// One model drawn with one sampler (the sampler comparison).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SamplerRow {
    pub model: String,
    pub sampler: String,
    pub samples: usize,
    pub infraction_rate: f64,
    pub infraction_ci95: (f64, f64),
    pub infraction_per_frame: f64,
    pub fid: f64,
    pub kid: f64,
    /// Wall time of the drawing.
    pub seconds: f64,
}

/// The comparison as markdown.
pub fn sampler_table(rows: &[SamplerRow]) -> String {
    let mut s = "| model | sampler | motions | infraction % (95% interval) | per frame % | FID | KID ×10³ | seconds |\n|---|---|---|---|---|---|---|---|\n".to_string();
    for r in rows {
        s += &format!(
            "| {} | {} | {} | {:.2} [{:.2}, {:.2}] | {:.2} | {:.3} | {:.2} | {:.0} |\n",
            r.model,
            r.sampler,
            r.samples,
            100.0 * r.infraction_rate,
            100.0 * r.infraction_ci95.0,
            100.0 * r.infraction_ci95.1,
            100.0 * r.infraction_per_frame,
            r.fid,
            1e3 * r.kid,
            r.seconds
        );
    }
    s
}

/// The noise level a time-independent classifier is trained and conditioned at: the
/// DDPM process's smallest.
fn sigma_clean(cfg: &MotionRunConfig) -> f64 {
    cfg.process().sigma_range().0
}

/// A run: its configuration, where it keeps its stages, and its seed.
pub struct Run {
    pub cfg: MotionRunConfig,
    pub out: PathBuf,
    pub dev: Device,
    pub seed: u64,
    pub reuse: bool,
}

/// The models of the table, by name.
pub struct Models {
    pub base: Checkpoint,
    pub classifiers: Vec<(String, StackedClassifier)>,
    pub distilled: Option<Checkpoint>,
    pub alpha: f64,
}

/// A run carried through every stage: its data, its encoder, its models and the table.
pub struct Outcome {
    pub train: MotionData,
    pub test: MotionData,
    pub encoder: MotionEncoder,
    pub models: Models,
    pub rows: Vec<ModelRow>,
    /// Motions Gen-neG drew from the baseline.
    pub drawn: usize,
}

impl Run {
    /// Every stage in order (each reusing what the output folder keeps, with `reuse`):
    /// data, baseline, encoder, draws, classifiers, distillation, evaluation.
    pub fn run_all(&self) -> Result<Outcome> {
        let (train, test) = self.data()?;
        let base = self.baseline(&train)?;
        let encoder = self.encoder(&train, &test)?;
        let (model, _) = load_score_model(&base, Weights::Ema, DType::F32, &self.dev)?;
        let draws = self.draws(&train, &model)?;
        let classifiers = self.classifiers(&train, &draws)?;
        let distilled = self.distill(&train, &base, &classifiers[0].1)?;
        let models = Models {
            base,
            classifiers,
            distilled,
            alpha: draws.alpha(),
        };
        let rows = self.evaluate(&test, &encoder, &models)?;
        Ok(Outcome {
            train,
            test,
            encoder,
            models,
            rows,
            drawn: draws.drawn,
        })
    }

    fn oracle(&self) -> GroundOracle {
        self.cfg.oracle()
    }

    /// Training and test motions; checks that none of the data infracts.
    pub fn data(&self) -> Result<(MotionData, MotionData)> {
        std::fs::create_dir_all(&self.out)
            .map_err(|e| candle_core::Error::msg(format!("{}: {e}", self.out.display())))?;
        let (train, test) = MotionData::load(&self.cfg, self.seed, &self.dev)?;
        for (name, d) in [("training", &train), ("test", &test)] {
            let all: Vec<u32> = (0..d.len() as u32).collect();
            let bad = d
                .judge(&self.oracle(), &d.rows(&all)?, &all)?
                .iter()
                .filter(|v| v.infracting())
                .count();
            eprintln!(
                "{name} motions: {} ({} frames at most, {} infract)",
                d.len(),
                d.set.frames,
                bad
            );
        }
        Ok((train, test))
    }

    /// The baseline (resumable).
    pub fn baseline(&self, train: &MotionData) -> Result<Checkpoint> {
        let m = &self.cfg.model;
        let c = train_resumable(
            &self.out,
            "baseline",
            self.reuse,
            m.save_every,
            m.iters,
            |staged| {
                let mut p = Progress::new(
                    &format!("baseline ({} prediction)", m.prediction.name()),
                    m.iters as usize,
                );
                train_baseline(&self.cfg, train, self.seed, Some(staged), &mut p)
            },
        )?;
        check_trained_on(&c, &self.cfg, train, "the kept baseline")?;
        Ok(c)
    }

    /// The motion encoder of the metrics (resumable), and its accuracy on the test set.
    pub fn encoder(&self, train: &MotionData, test: &MotionData) -> Result<MotionEncoder> {
        let e = &self.cfg.encoder;
        let c = train_resumable(&self.out, "encoder", self.reuse, 0, e.iters, |staged| {
            let mut p = Progress::new("motion encoder", e.iters as usize);
            train_encoder(
                &self.cfg,
                train,
                derive_seed(self.seed, 2),
                Some(staged),
                &mut p,
            )
        })?;
        let norm: scoreguide_data::motion::Normalizer = c.meta("normalizer")?;
        if norm != train.norm {
            bail!("the kept motion encoder was trained on other motions; use another --out or drop --reuse");
        }
        let encoder = MotionEncoder::load(&c, &self.dev)?;
        let all: Vec<u32> = (0..test.len() as u32).collect();
        let acc = encoder.accuracy(
            &test.rows(&all)?,
            &test.set.masks(&all, &self.dev)?,
            &test.set.actions,
        )?;
        eprintln!("motion encoder: action accuracy {acc:.3} on the test motions");
        Ok(encoder)
    }

    /// Gen-neG's draws from the baseline: until N valid and N invalid motions are in hand
    /// or the budget is spent (kept as `draws.safetensors`).
    pub fn draws(&self, train: &MotionData, base: &dyn Score) -> Result<Draws> {
        let path = self.out.join("draws.safetensors");
        let task = MotionTask {
            data: train,
            oracle: self.oracle(),
        };
        let cc = self.cfg.collect(derive_seed(self.seed, 3));
        if self.reuse && path.exists() {
            let c = Checkpoint::load(&path)?;
            let kept: scoreguide_genneg::CollectConfig = c.meta("collect")?;
            if kept != cc || c.meta::<f64>("tolerance")? != self.cfg.tolerance {
                bail!(
                    "{} was drawn otherwise ({kept:?}); use another --out or drop --reuse",
                    path.display()
                );
            }
            let mut d = Draws::from_checkpoint(&c, &self.dev)
                .map_err(|e| candle_core::Error::msg(format!("{}: {e}", path.display())))?;
            d.per_class = cc.per_class;
            eprintln!(
                "Gen-neG draws: reusing {} ({})",
                path.display(),
                d.summary()
            );
            return Ok(d);
        }
        let (sampler, sigmas) = self.cfg.sampler()?;
        let mut p = Progress::new("Gen-neG draws", cc.budget);
        let d = collect(
            base,
            &sampler,
            &sigmas,
            &task,
            &[train.set.row_dim()],
            &cc,
            &self.dev,
            &mut |drawn, valid, invalid| {
                p.update(drawn, &format!("{valid} valid, {invalid} invalid"))
            },
        )?;
        eprintln!("Gen-neG draws: {}", d.summary());
        let mut c = d.to_checkpoint()?;
        c.set_meta("collect", &cc)?;
        c.set_meta("tolerance", &self.cfg.tolerance)?;
        c.save(&path)?;
        Ok(d)
    }

    /// Gen-neG's IS-balanced classifier and, if asked, the ablations (each kept as
    /// `classifier_<name>.safetensors`).
    pub fn classifiers(
        &self,
        train: &MotionData,
        draws: &Draws,
    ) -> Result<Vec<(String, StackedClassifier)>> {
        let mut kinds = vec![("genneg_1", ClassifierKind::IsBalanced)];
        if self.cfg.genneg.ablations {
            kinds.extend([
                ("wo_is", ClassifierKind::WithoutIs),
                ("imbalanced", ClassifierKind::Imbalanced),
                ("time_independent", ClassifierKind::TimeIndependent),
            ]);
        }
        let task = MotionTask {
            data: train,
            oracle: self.oracle(),
        };
        let mut out = Vec::new();
        for (i, (name, kind)) in kinds.into_iter().enumerate() {
            let path = self.out.join(format!("classifier_{name}.safetensors"));
            let tcfg = self.cfg.classifier_training(
                derive_seed(self.seed, 10 + i as u64),
                sigma_clean(&self.cfg),
            );
            let c = if self.reuse && path.exists() {
                let c = Checkpoint::load(&path)?;
                if c.meta::<scoreguide_genneg::ClassifierTrainConfig>("training")? != tcfg {
                    bail!(
                        "{} was trained otherwise; use another --out or drop --reuse",
                        path.display()
                    );
                }
                eprintln!("classifier {name}: reusing {}", path.display());
                c
            } else {
                let set = LabelledSet::new(draws, kind)?;
                let mut p = Progress::new(&format!("classifier {name}"), tcfg.iters as usize);
                let mut c =
                    train_classifier(&set, &task, kind.time_dependent(), &tcfg, &self.dev, &mut p)?
                        .checkpoint;
                c.set_meta("training", &tcfg)?;
                c.save(&path)?;
                c
            };
            out.push((name.to_string(), StackedClassifier::from_checkpoint(&c)?));
        }
        Ok(out)
    }

    /// The baseline guided by `classifier`.
    pub fn stack(&self, base: &Checkpoint, classifier: &StackedClassifier) -> Stack {
        Stack::new(self.cfg.score_model(), base.section("ema")).with(classifier.clone())
    }

    /// The Gen-neG stack distilled into the baseline's architecture (resumable), warm
    /// started from the baseline, on the training motions.
    pub fn distill(
        &self,
        train: &MotionData,
        base: &Checkpoint,
        genneg: &StackedClassifier,
    ) -> Result<Option<Checkpoint>> {
        let dcfg = self.cfg.distillation()?;
        if dcfg.iters == 0 {
            return Ok(None);
        }
        let all: Vec<u32> = (0..train.len() as u32).collect();
        let rows = Dataset::new(train.rows(&all)?, "training motions")?;
        let teacher = self.stack(base, genneg).guided(&self.dev)?;
        let init = base.section("ema");
        let c = train_resumable(
            &self.out,
            "distilled",
            self.reuse,
            500,
            dcfg.iters,
            |staged| {
                let mut p = Progress::new("distillation", dcfg.iters as usize);
                distill(
                    &teacher,
                    &rows,
                    &|idx| train.cond_of(idx),
                    &self.cfg.score_model(),
                    Some(&init),
                    &dcfg,
                    Some(staged),
                    &self.dev,
                    &mut p,
                )
            },
        )?;
        Ok(Some(c))
    }

    /// Every model of the table, by name, as a score model.
    fn scorers(&self, models: &Models) -> Result<Vec<(String, Box<dyn Score>)>> {
        let (base, _) = load_score_model(&models.base, Weights::Ema, DType::F32, &self.dev)?;
        let mut out: Vec<(String, Box<dyn Score>)> = vec![("baseline".into(), Box::new(base))];
        for (name, c) in &models.classifiers {
            out.push((
                name.clone(),
                Box::new(self.stack(&models.base, c).guided(&self.dev)?),
            ));
        }
        if let Some(d) = &models.distilled {
            let (m, _) = load_score_model(d, Weights::Ema, DType::F32, &self.dev)?;
            out.push(("distilled".into(), Box::new(m)));
        }
        Ok(out)
    }

    /// Scores every model over the sampling seeds (each (model, seed) kept as
    /// `eval/<model>-seed<s>.json`, its first draws as `eval/<model>-seed<s>.safetensors`),
    /// and draws the strips figure.
    pub fn evaluate(
        &self,
        test: &MotionData,
        encoder: &MotionEncoder,
        models: &Models,
    ) -> Result<Vec<ModelRow>> {
        let dir = self.out.join("eval");
        std::fs::create_dir_all(&dir)
            .map_err(|e| candle_core::Error::msg(format!("{}: {e}", dir.display())))?;
        let all: Vec<u32> = (0..test.len() as u32).collect();
        let real = features_of(encoder, test, &test.rows(&all)?, &all)?;
        let e = &self.cfg.eval;
        let mut rows = Vec::new();
        let mut strips = self.strip(test, &test.rows(&all[..3.min(test.len())])?, &all, "data")?;
        for (name, model) in self.scorers(models)? {
            let mut seeds = Vec::new();
            for s in 0..e.seeds as u64 {
                let json = dir.join(format!("{name}-seed{s}.json"));
                let first = dir.join(format!("{name}-seed{s}.safetensors"));
                let seed = derive_seed(self.seed, 100 + s);
                if self.reuse && json.exists() && first.exists() {
                    let kept: SeedScores =
                        serde_json::from_slice(&std::fs::read(&json).map_err(|e| {
                            candle_core::Error::msg(format!("{}: {e}", json.display()))
                        })?)
                        .map_err(|e| candle_core::Error::msg(format!("{}: {e}", json.display())))?;
                    if kept.seed == seed && kept.motions == e.samples {
                        eprintln!("{name} seed {s}: reusing {}", json.display());
                        seeds.push(kept);
                        continue;
                    }
                }
                let mut p = Progress::new(&format!("{name} seed {s}: sampling"), e.samples);
                let (x, keys) =
                    sample_motions(model.as_ref(), &self.cfg, test, e.samples, seed, &mut p)?;
                let elbo = r_elbo(model.as_ref(), &self.cfg, test, e.r_elbo_draws, seed)?;
                let scores = score_draws(&self.cfg, test, encoder, &real, &x, &keys, seed, elbo)?;
                eprintln!(
                    "{name} seed {s}: infraction {:.2}%, per frame {:.2}%, FID {:.3}, r-ELBO {:.4}",
                    100.0 * scores.infraction.rate,
                    100.0 * scores.infraction_per_frame.rate,
                    scores.fid,
                    scores.r_elbo
                );
                let mut c = Checkpoint::new();
                c.tensors.insert(
                    "x".into(),
                    x.narrow(0, 0, 3.min(e.samples))?.to_device(&Device::Cpu)?,
                );
                c.set_meta("keys", &keys[..3.min(e.samples)].to_vec())?;
                c.save(&first)?;
                write_json(&json, &scores)?;
                seeds.push(scores);
            }
            let c = Checkpoint::load(dir.join(format!("{name}-seed0.safetensors")))?;
            let x = c.tensors.get("x").cloned().ok_or_else(|| {
                candle_core::Error::msg(format!("{name}-seed0.safetensors: no `x`"))
            })?;
            strips.extend(self.strip(
                test,
                &x.to_device(&self.dev)?,
                &c.meta::<Vec<u32>>("keys")?,
                &name,
            )?);
            rows.push(ModelRow::new(&name, seeds, e.delta)?);
        }
        let png = self.out.join("motions.png");
        save_grid(&png, &strips, 3)?;
        eprintln!("wrote {}", png.display());
        Ok(rows)
    }

    /// The baseline and Gen-neG iteration 1 drawn with the configured sampler and with
    /// DDPM's ancestral one on the same motions and noise seed (`eval.sampler_comparison`;
    /// each kept as `eval/sampler-<model>-<sampler>.json`).
    pub fn compare_samplers(
        &self,
        test: &MotionData,
        encoder: &MotionEncoder,
        models: &Models,
    ) -> Result<Vec<SamplerRow>> {
        let scorers = self
            .scorers(models)?
            .into_iter()
            .filter(|(name, _)| name == "baseline" || name == "genneg_1")
            .collect();
        self.compare_samplers_of(test, encoder, scorers)
    }

    /// The baseline alone through [`Run::compare_samplers`]: whether its samples are
    /// sound under both samplers before Gen-neG draws from it.
    pub fn check_baseline(
        &self,
        test: &MotionData,
        encoder: &MotionEncoder,
        base: &Checkpoint,
    ) -> Result<Vec<SamplerRow>> {
        let (m, _) = load_score_model(base, Weights::Ema, DType::F32, &self.dev)?;
        self.compare_samplers_of(test, encoder, vec![("baseline".into(), Box::new(m))])
    }

    /// The baseline's denoising error on `motions` rows of `data` at step indices over
    /// the process, noise seeded by the run's seed: (t, σ, mean squared error of D
    /// against the clean motion per real value, the same for D = x (no denoising)). Where
    /// it is large, so is what a sampler carries forward from that level.
    pub fn denoise_profile(
        &self,
        data: &MotionData,
        base: &Checkpoint,
        motions: usize,
    ) -> Result<Vec<[f64; 4]>> {
        let (model, _) = load_score_model(base, Weights::Ema, DType::F32, &self.dev)?;
        let idx: Vec<u32> = (0..motions.min(data.len()) as u32).collect();
        let x0 = data.rows(&idx)?;
        let cond = data.cond_of(&idx)?;
        let mask = data.set.masks(&idx, &self.dev)?;
        let process = self.cfg.process();
        let steps = self.cfg.model.diffusion_steps;
        let mut rng =
            <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(derive_seed(self.seed, 200));
        let mut rows = Vec::new();
        for frac in [0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 0.97, 1.0] {
            let t = (frac * (steps - 1) as f64).round();
            let sigma = process.sigma(t);
            let z = scoreguide_sde::randn(&mut rng, x0.dims(), &self.dev)?;
            let x = (&x0 + (&z * sigma)?)?;
            let s = Tensor::full(sigma as f32, idx.len(), &self.dev)?;
            let d = model.denoise_with(&x, &s, &cond)?;
            // Real frames only: padding is no motion's, and the ε-predicting network's
            // masked output leaves it as noisy as x.
            let mse = |a: &Tensor| -> Result<f64> {
                let sq = (a - &x0)?
                    .sqr()?
                    .reshape((idx.len(), mask.dim(1)?, ()))?
                    .broadcast_mul(&mask.unsqueeze(2)?)?;
                let values = (mask.sum_all()?.to_scalar::<f32>()? as usize * sq.dim(2)?) as f64;
                Ok(sq.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()? / values)
            };
            rows.push([t, sigma, mse(&d)?, mse(&x)?]);
        }
        Ok(rows)
    }

    fn compare_samplers_of(
        &self,
        test: &MotionData,
        encoder: &MotionEncoder,
        scorers: Vec<(String, Box<dyn Score>)>,
    ) -> Result<Vec<SamplerRow>> {
        let Some(cmp) = self.cfg.eval.sampler_comparison else {
            return Ok(Vec::new());
        };
        let all: Vec<u32> = (0..test.len() as u32).collect();
        let real = features_of(encoder, test, &test.rows(&all)?, &all)?;
        let ddpm = MotionRunConfig {
            sampler: MotionSampler::Ddpm {
                steps: cmp.ddpm_steps,
            },
            ..self.cfg.clone()
        };
        let seed = derive_seed(self.seed, 100);
        let mut rows = Vec::new();
        for (name, model) in scorers {
            for cfg in [&self.cfg, &ddpm] {
                let sampler = match cfg.sampler {
                    MotionSampler::Heun { steps } => format!("heun-{steps}"),
                    MotionSampler::Ddpm { steps } => format!("ddpm-{steps}"),
                };
                let json = self
                    .out
                    .join("eval")
                    .join(format!("sampler-{name}-{sampler}.json"));
                if self.reuse && json.exists() {
                    let kept: SamplerRow =
                        serde_json::from_slice(&std::fs::read(&json).map_err(|e| {
                            candle_core::Error::msg(format!("{}: {e}", json.display()))
                        })?)
                        .map_err(|e| candle_core::Error::msg(format!("{}: {e}", json.display())))?;
                    if kept.samples == cmp.samples {
                        rows.push(kept);
                        continue;
                    }
                }
                let t0 = std::time::Instant::now();
                let mut p = Progress::new(&format!("{name} with {sampler}"), cmp.samples);
                let (x, keys) =
                    sample_motions(model.as_ref(), cfg, test, cmp.samples, seed, &mut p)?;
                let seconds = t0.elapsed().as_secs_f64();
                let s = score_draws(cfg, test, encoder, &real, &x, &keys, seed, f64::NAN)?;
                let row = SamplerRow {
                    model: name.clone(),
                    sampler,
                    samples: cmp.samples,
                    infraction_rate: s.infraction.rate,
                    infraction_ci95: s.infraction.ci95,
                    infraction_per_frame: s.infraction_per_frame.rate,
                    fid: s.fid,
                    kid: s.kid,
                    seconds,
                };
                write_json(&json, &row)?;
                rows.push(row);
            }
        }
        Ok(rows)
    }

    /// The first three motions of `x` (keys into `test`) as stick-figure strips.
    fn strip(
        &self,
        test: &MotionData,
        x: &Tensor,
        keys: &[u32],
        name: &str,
    ) -> Result<Vec<crate::plot::Canvas>> {
        let values = test
            .norm
            .denormalize(&x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
        let d = test.set.row_dim();
        let n = x.dim(0)?.min(3);
        let verdicts = test.judge(&self.oracle(), x, &keys[..x.dim(0)?])?;
        Ok((0..n)
            .map(|r| {
                let k = keys[r] as usize;
                let action = scoreguide_data::motion::Action::ALL
                    .get(test.set.actions[k] as usize)
                    .map_or("motion", |a| a.name());
                let v = &verdicts[r];
                let title = format!(
                    "{name}: {action}, {} frames, {} penetrating",
                    test.set.lengths[k],
                    v.penetrating_frames()
                );
                motion_strip(
                    &values[r * d..(r + 1) * d],
                    test.set.lengths[k],
                    self.cfg.tolerance as f32,
                    &title,
                )
            })
            .collect())
    }
}
