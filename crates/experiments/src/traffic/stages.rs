//! The `genneg_traffic` run stage by stage — data, baseline, Gen-neG iterations (with
//! each classifier's check), distillation, control, evaluation — each reusing what an
//! earlier run left in the output folder when asked.

use super::run::{
    check_teacher, describe_sigma, feature_summary, fnv1a, load_baseline, or_dash, print_check,
    recorded_genneg_seed, CheckReport, DistillTeacher, DrawSource, Row, RunRecord,
    TrafficRunConfig, CHECK_SIGMAS, DISTILL_TEACHER_KEY, RUN_KEY, SIGMA_CLEAN,
};
use super::{
    check_agent_classifier, distill, distill_resumable, draw_scenes, label_scenes,
    load_agent_classifier, offroad_pull, r_elbo, sample_scenes, scene_panel,
    train_agent_classifier, train_more, train_score, train_score_resumable, FeatureScaler,
    JudgedScenes, TrafficConfig, TrafficData, TrafficModel,
};
use crate::plot::save_grid;
use crate::runtime::sampler_step_ms;
use candle_core::{bail, DType, Device, Result};
use scoreguide_data::{SceneConfig, SceneSet, Split};
use scoreguide_genneg::{ClassifierKind, LabelledSet, Stack, StackedClassifier};
use scoreguide_guidance::Score;
use scoreguide_samplers::Sampler;
use scoreguide_sde::{append_zero, karras};
use scoreguide_train::{Checkpoint, Progress};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// A run: its configuration, where it writes, and its seeds.
pub struct Run {
    pub cfg: TrafficRunConfig,
    pub out: PathBuf,
    pub dev: Device,
    /// Data and baseline.
    pub seed: u64,
    /// Gen-neG's draws, classifiers and checks.
    pub genneg_seed: u64,
    /// The evaluation split.
    pub eval_seed: u64,
    /// Reuse models and continue saved training states found in `out`.
    pub reuse: bool,
    pub sampler: Sampler,
    pub scene_cfg: SceneConfig,
}

/// The scenes: training and held-out, on their maps.
pub struct Prepared {
    pub train: TrafficData,
    pub test: TrafficData,
    /// The oracle's speed on the training scenes.
    pub labelled_per_second: f64,
    /// A baseline to reuse, and the configuration a baseline is trained with here.
    reused: Option<Checkpoint>,
    cfg: TrafficConfig,
}

/// The baseline and what every later stage derives from it.
pub struct Baseline {
    pub ckpt: Checkpoint,
    pub model: TrafficModel,
    /// The sampling grid.
    pub sigmas: Vec<f64>,
    /// The classifiers' settings: the baseline's network and process, their own noise
    /// levels if asked.
    pub classifier_cfg: TrafficConfig,
    /// How far the map probe reads from a vehicle's centre, metres (0 without a probe):
    /// an offroad vehicle farther than this sees the road only through the map tokens.
    pub probe_reach_m: f64,
}

/// What the Gen-neG iterations produced.
pub struct GennegOutcome {
    /// Iteration k's classifier is `classifiers[k - 1]`.
    pub classifiers: Vec<StackedClassifier>,
    pub ablations: Vec<(String, StackedClassifier)>,
    pub checks: Vec<CheckReport>,
}

impl Run {
    pub fn new(cfg: TrafficRunConfig, seed: u64, out: PathBuf, dev: Device, reuse: bool) -> Self {
        Self {
            genneg_seed: cfg.genneg.seed.unwrap_or(seed),
            eval_seed: cfg.eval.seed.unwrap_or(seed),
            sampler: cfg.sampler(),
            scene_cfg: cfg.scenes(),
            cfg,
            out,
            dev,
            seed,
            reuse,
        }
    }

    /// What the run's models record of it ([`RUN_KEY`]).
    fn record(&self) -> RunRecord {
        RunRecord {
            config: self.cfg.clone(),
            seed: self.seed,
            genneg_seed: self.genneg_seed,
            eval_seed: self.eval_seed,
        }
    }

    fn file_of(&self, it: usize, name: &str) -> PathBuf {
        self.out.join(if name == "genneg" {
            format!("genneg_{it}.safetensors")
        } else {
            format!("{name}.safetensors")
        })
    }

    /// Generates and saves the training and held-out scenes, checks that the oracle
    /// passes the training scenes (and times it), and finds the baseline to reuse
    /// (`baseline`, or the output folder's with `reuse`), whose configuration decides how
    /// the maps are drawn for every network of the run.
    pub fn data(&self, baseline: Option<&Path>) -> Result<Prepared> {
        let Run {
            dev,
            out,
            seed,
            eval_seed,
            scene_cfg,
            ..
        } = self;
        let (seed, eval_seed) = (*seed, *eval_seed);
        let (n_maps, n_train, n_samples) = (
            self.cfg.data.maps,
            self.cfg.data.train_scenes,
            self.cfg.eval.samples,
        );
        // Data: train and test splits on their own maps.
        let t0 = Instant::now();
        let train_set = SceneSet::generate(scene_cfg, Split::Train, n_maps, n_train, seed)?;
        let test_set = SceneSet::generate(
            scene_cfg,
            self.cfg.eval.split.split(),
            (n_maps / 4).max(1),
            n_samples,
            eval_seed,
        )?;
        eprintln!(
            "generated {} training scenes on {n_maps} maps and {} {} scenes in {:.1}s",
            train_set.len(),
            test_set.len(),
            self.cfg.eval.split.name(),
            t0.elapsed().as_secs_f64()
        );
        crate::runtime::ensure_parent(&out.join("x"))?;
        train_set.save(out.join("scenes_train.safetensors"))?;
        test_set.save(out.join(format!("scenes_{}.safetensors", self.cfg.eval.split.name())))?;

        // The baseline's configuration: from the arguments, or a reused baseline's own
        // (which decides how the maps are drawn for every network of the run).
        let scaler = FeatureScaler::fit(&train_set.agents)?;
        let cfg = self.cfg.baseline_config(&scaler, seed);
        let baseline_path = out.join("baseline.safetensors");
        let reused = match baseline {
            Some(p) => Some(load_baseline(p, scene_cfg)?),
            None if self.reuse && baseline_path.exists() => {
                eprintln!("reusing {}", baseline_path.display());
                Some(load_baseline(&baseline_path, scene_cfg)?)
            }
            None => None,
        };
        let data_cfg: TrafficConfig = match &reused {
            Some(c) => c.meta("traffic")?,
            None => cfg.clone(),
        };

        // The oracle's speed: label the training scenes (all valid by construction).
        let all: Vec<u32> = (0..train_set.len() as u32).collect();
        let train = TrafficData::new(train_set, scaler.clone(), &data_cfg, dev)?;
        let t0 = Instant::now();
        let (rates, _) = label_scenes(&train, &all, &train.set.agents)?;
        let labelled_per_second = train.set.len() as f64 / t0.elapsed().as_secs_f64();
        eprintln!(
            "oracle: {} training scenes labelled, {:.2}% infracting, {:.0} scenes/s on one core",
            rates.scenes,
            100.0 * rates.infraction,
            labelled_per_second
        );
        if rates.infraction > 0.0 {
            bail!("the generator made infracting scenes: {rates:?}");
        }
        let test = TrafficData::new(test_set, scaler, &data_cfg, dev)?;
        Ok(Prepared {
            train,
            test,
            labelled_per_second,
            reused,
            cfg,
        })
    }

    /// The baseline: reused, or trained here (continuing a saved state with `reuse`),
    /// and the sampling grid and classifier settings it implies.
    pub fn baseline(&self, data: &mut Prepared) -> Result<Baseline> {
        let Run {
            dev,
            out,
            scene_cfg,
            ..
        } = self;
        let (train, cfg, reused) = (&data.train, &data.cfg, data.reused.take());
        let baseline_path = out.join("baseline.safetensors");
        let ckpt = match reused {
            Some(c) => c,
            None => {
                let partial_path = out.join("baseline.partial.safetensors");
                let resume = if self.reuse && partial_path.exists() {
                    let c = load_baseline(&partial_path, scene_cfg)?;
                    eprintln!(
                        "resuming the baseline from {} (step {})",
                        partial_path.display(),
                        c.meta::<u64>("step")?
                    );
                    Some(c)
                } else {
                    None
                };
                let mut progress = Progress::new("baseline", cfg.iters as usize);
                let mut c = match self.cfg.save_every {
                    0 => train_score(cfg, train, dev, &mut progress)?,
                    every => train_score_resumable(
                        cfg,
                        train,
                        resume.as_ref(),
                        every,
                        &mut |c| {
                            let mut c = c.clone();
                            c.set_meta(RUN_KEY, &self.record())?;
                            c.save(&partial_path)
                        },
                        dev,
                        &mut progress,
                    )?,
                };
                c.set_meta(RUN_KEY, &self.record())?;
                c.save(&baseline_path)?;
                if partial_path.exists() {
                    std::fs::remove_file(&partial_path)?;
                }
                c
            }
        };
        let baseline = TrafficModel::load(&ckpt, DType::F32, dev)?;

        let sigma_max = baseline.config.process.sigma(1.0);
        let sigma_min = self.cfg.sampler.sigma_min;
        if !(sigma_min > 0.0 && sigma_min < sigma_max) {
            bail!("sampler.sigma_min {sigma_min} must be in (0, {sigma_max})");
        }
        let sigmas = append_zero(karras(self.cfg.sampler.steps, sigma_min, sigma_max, 7.0)?);
        // The classifiers' settings: the baseline's network and process, their own noise
        // levels if asked.
        let classifier_cfg = with_sigma(
            &baseline,
            sigma_max,
            "genneg.classifier_log_uniform_sigma",
            self.cfg.genneg.classifier_log_uniform_sigma,
        )?;

        // How far the map probe reads from a vehicle's centre, metres (0 without a probe):
        // an offroad vehicle farther than this sees the road only through the map tokens.
        let probe_reach_m = baseline.config.net.map_probe.map_or(0.0, |p| {
            let cell = 2.0 * scene_cfg.half_size / baseline.config.net.map_input_side() as f64;
            p.spacing * (p.side - 1) as f64 / 2.0 * cell
        });
        Ok(Baseline {
            ckpt,
            model: baseline,
            sigmas,
            classifier_cfg,
            probe_reach_m,
        })
    }

    /// Gen-neG iterations: draw from the current stack on training maps, label, train a
    /// per-vehicle IS-balanced classifier, stack it; check each classifier on other
    /// draws. The ablations reuse iteration 1's draws.
    pub fn genneg(&self, data: &Prepared, base: &Baseline) -> Result<GennegOutcome> {
        let Run {
            dev,
            seed,
            genneg_seed,
            sampler,
            ..
        } = self;
        let (seed, genneg_seed) = (*seed, *genneg_seed);
        let (train, baseline, sigmas) = (&data.train, &base.model, &base.sigmas);
        let (classifier_cfg, probe_reach_m) = (&base.classifier_cfg, base.probe_reach_m);
        let (n_draws, n_check_draws) = (self.cfg.genneg.draws, self.cfg.genneg.check_draws);
        let n_classifier_iters = self.cfg.genneg.classifier_iters;
        let mut classifiers: Vec<StackedClassifier> = Vec::new();
        let mut ablations: Vec<(String, StackedClassifier)> = Vec::new();
        let mut checks: Vec<CheckReport> = Vec::new();
        let file_of = |it: usize, name: &str| self.file_of(it, name);
        for it in 1..=self.cfg.genneg.iterations {
            // (name, training set, σ of a time-independent classifier)
            let mut kinds = vec![("genneg".to_string(), ClassifierKind::IsBalanced, None)];
            if it == 1 && self.cfg.genneg.ablations {
                kinds.push(("wo_is".into(), ClassifierKind::WithoutIs, None));
                kinds.push(("imbalanced".into(), ClassifierKind::Imbalanced, None));
                kinds.push((
                    "time_independent".into(),
                    ClassifierKind::TimeIndependent,
                    Some(SIGMA_CLEAN),
                ));
            }
            let stack = baseline
                .with_classifiers(&classifiers, self.cfg.genneg.guidance_sigma_max)
                .guided(dev)?;
            let mut trained: Vec<(String, Checkpoint)> = Vec::new();
            if self.reuse && kinds.iter().all(|(n, _, _)| file_of(it, n).exists()) {
                for (name, _, _) in &kinds {
                    let path = file_of(it, name);
                    eprintln!("iteration {it}: reusing {}", path.display());
                    let c = Checkpoint::load(&path)?;
                    // Files that record no seed were all seeded by the run's seed.
                    let then = match recorded_genneg_seed(&c)? {
                        Some(s) => s,
                        None => seed,
                    };
                    if then != genneg_seed {
                        bail!(
                            "classifier {} was trained with Gen-neG seed {then}, this run's Gen-neG seed (genneg.seed) is {genneg_seed}; use another --out or drop --reuse",
                            path.display()
                        );
                    }
                    // A classifier trained at other noise levels than this command asks for
                    // would make its table rows lie about their command.
                    let fitted: TrafficConfig = c.meta("traffic")?;
                    if fitted.train_sigma != classifier_cfg.train_sigma {
                        bail!(
                            "classifier {} was trained at noise levels {}, this run's genneg.classifier_log_uniform_sigma asks for {}; use another --out or drop --reuse",
                            path.display(),
                            describe_sigma(&fitted.train_sigma),
                            describe_sigma(&classifier_cfg.train_sigma)
                        );
                    }
                    trained.push((name.clone(), c));
                }
            } else {
                let drawn = {
                    let mut progress = Progress::new(&format!("iteration {it}: drawing"), n_draws);
                    draw_scenes(
                        &stack,
                        train,
                        n_draws,
                        sampler,
                        sigmas,
                        genneg_seed.wrapping_add(100 + it as u64),
                        500,
                        &mut |d| progress.update(d, "scenes"),
                    )?
                };
                eprintln!("iteration {it}: {}", drawn.summary());
                let (valid, invalid) = (drawn.valid_found, drawn.invalid_found);
                if valid == 0 || invalid == 0 {
                    eprintln!(
                        "iteration {it}: {valid} valid and {invalid} invalid vehicles drawn: a classifier needs both; stopping Gen-neG after {} iteration(s)",
                        it - 1
                    );
                    break;
                }
                for (name, kind, sigma_clean) in kinds {
                    let set = LabelledSet::new(&drawn, kind)?;
                    eprintln!(
                        "iteration {it}: {name} classifier on {} valid + {} invalid vehicles (vehicle α = {:.4})",
                        set.kept.0, set.kept.1, set.alpha
                    );
                    let mut c = train_agent_classifier(
                        classifier_cfg,
                        &set,
                        train,
                        n_classifier_iters,
                        genneg_seed.wrapping_add(it as u64),
                        sigma_clean,
                        dev,
                        &mut Progress::new(
                            &format!("iteration {it}: {name} classifier"),
                            n_classifier_iters as usize,
                        ),
                    )?;
                    c.set_meta(RUN_KEY, &self.record())?;
                    c.save(file_of(it, &name))?;
                    trained.push((name, c));
                }
            }
            // The check set: more scenes from the same stack, apart from the training draws.
            let check_set = match n_check_draws {
                0 => None,
                n => {
                    let mut progress = Progress::new(&format!("iteration {it}: check draws"), n);
                    Some(draw_scenes(
                        &stack,
                        train,
                        n,
                        sampler,
                        sigmas,
                        genneg_seed.wrapping_add(200 + it as u64),
                        500,
                        &mut |d| progress.update(d, "scenes"),
                    )?)
                }
            };
            drop(stack);
            let check_set = match check_set {
                Some(drawn) => Some(JudgedScenes::new(drawn, train)?),
                None => None,
            };
            for (name, c) in trained {
                let clf = load_agent_classifier(&c)?;
                if let Some(check) = &check_set {
                    let rows = check_agent_classifier(
                        &clf,
                        baseline,
                        check,
                        train,
                        &CHECK_SIGMAS,
                        genneg_seed.wrapping_add(300 + it as u64),
                        500,
                    )?;
                    let name = format!("{name}_{it}");
                    print_check(&name, check.scenes(), &rows);
                    let mut pulls = Vec::new();
                    for s in [0.01, 0.1] {
                        let p = offroad_pull(&clf, baseline, check, train, s, probe_reach_m, 100)?;
                        let f = or_dash;
                        eprintln!(
                            "{name} pull on offroad vehicles at σ = {s}: {} with the centre on the road; {} within {probe_reach_m} m of it (cos to the road {}, |∇| {} /m), {} beyond (cos {}, |∇| {} /m); median distance {} m",
                            p.centre_on_road, p.near, f(p.cos_near), f(p.pull_near), p.far, f(p.cos_far), f(p.pull_far), f(p.median_distance_m)
                        );
                        pulls.push(p);
                    }
                    checks.push(CheckReport {
                        name,
                        scenes: check.scenes(),
                        rows,
                        offroad_pull: pulls,
                    });
                }
                if name == "genneg" {
                    classifiers.push(clf);
                } else {
                    ablations.push((name, clf));
                }
            }
        }
        Ok(GennegOutcome {
            classifiers,
            ablations,
            checks,
        })
    }

    /// Distils the last iteration's stack into the baseline's network (continuing or
    /// extending a saved distillation of the same teacher with `reuse`).
    pub fn distill(
        &self,
        data: &Prepared,
        base: &Baseline,
        genneg: &GennegOutcome,
    ) -> Result<Option<TrafficModel>> {
        let Run {
            dev,
            out,
            seed,
            sampler,
            ..
        } = self;
        let seed = *seed;
        let (train, baseline, sigmas, ckpt) = (&data.train, &base.model, &base.sigmas, &base.ckpt);
        let classifiers = &genneg.classifiers;
        let sigma_max = baseline.config.process.sigma(1.0);
        let file_of = |it: usize, name: &str| self.file_of(it, name);
        // Distillation of the last iteration into the baseline's architecture.
        let distilled = match (classifiers.len(), &self.cfg.distill) {
            (0, _) | (_, None) => None,
            (k, Some(dsec)) => {
                // The distillation's noise levels and learning rate, if its own.
                let mut distill_cfg = with_sigma(
                    baseline,
                    sigma_max,
                    "distill.log_uniform_sigma",
                    dsec.log_uniform_sigma,
                )?;
                if let Some(lr) = dsec.lr {
                    distill_cfg.lr = lr;
                }
                let n_distill_iters = dsec.iters;
                let teacher = baseline
                    .with_classifiers(classifiers, self.cfg.genneg.guidance_sigma_max)
                    .guided(dev)?;
                let dcfg = TrafficConfig {
                    iters: n_distill_iters,
                    ..distill_cfg.clone()
                };
                let path = out.join("distilled.safetensors");
                let partial_path = out.join("distilled.partial.safetensors");
                let record = DistillTeacher {
                    iterations: k,
                    guidance_sigma_max: self.cfg.genneg.guidance_sigma_max,
                    classifiers_fnv1a: (1..=k)
                        .map(|it| std::fs::read(file_of(it, "genneg")).map(|b| fnv1a(&b)))
                        .collect::<std::io::Result<_>>()?,
                    draws: dsec.draws,
                    draws_from: match (dsec.draws, dsec.draws_from) {
                        (0, _) => "none",
                        (_, DrawSource::Teacher) => "teacher",
                        (_, DrawSource::Baseline) => "baseline",
                    }
                    .into(),
                };
                // A finished distillation of fewer steps than asked, or an interrupted one,
                // is continued (the result is the uninterrupted run's), the further of the
                // two. Both are checked first, as this run's saves overwrite them: one of
                // another teacher, or further along than asked, is refused, not lost.
                let mut found = None::<(u64, PathBuf, Checkpoint)>;
                for p in [&path, &partial_path] {
                    if self.reuse && p.exists() {
                        let c = Checkpoint::load(p)?;
                        check_teacher(&c, p, &record)?;
                        let step: u64 = c.meta("step")?;
                        if step > n_distill_iters {
                            bail!(
                                "distilled model {} has done {step} steps, more than distill.iters = {n_distill_iters}; set distill.iters={step} to evaluate it, or use another --out",
                                p.display()
                            );
                        }
                        if found.as_ref().is_none_or(|(s, _, _)| step > *s) {
                            found = Some((step, p.clone(), c));
                        }
                    }
                }
                // (a finished distillation to reuse, a saved state to continue from)
                let (reused, resume) = match found {
                    Some((step, p, c)) if step == n_distill_iters => {
                        eprintln!("reusing {}", p.display());
                        (Some(c), None)
                    }
                    Some((step, p, c)) => {
                        eprintln!(
                            "continuing the distillation in {} from step {step} to {n_distill_iters}",
                            p.display()
                        );
                        (None, Some(c))
                    }
                    None => (None, None),
                };
                let c = if let Some(c) = reused {
                    c
                } else {
                    let with_draws = match dsec.draws {
                        0 => None,
                        n => {
                            let baseline_alone = baseline.stack().guided(dev)?;
                            let (who, source): (_, &dyn Score) = match dsec.draws_from {
                                DrawSource::Teacher => ("teacher", &teacher),
                                DrawSource::Baseline => ("baseline", &baseline_alone),
                            };
                            let mut progress =
                                Progress::new(&format!("distillation: {who} drawing"), n);
                            let drawn = draw_scenes(
                                source,
                                train,
                                n,
                                sampler,
                                sigmas,
                                seed.wrapping_add(300),
                                500,
                                &mut |d| progress.update(d, "scenes"),
                            )?;
                            eprintln!("distillation: {who}'s {}", drawn.summary());
                            let agents = baseline
                                .scaler
                                .denormalize(&drawn.x.flatten_all()?.to_vec1::<f32>()?);
                            let copies = (train.set.len() / n).max(1);
                            Some(train.with_scenes(&drawn.keys, &agents, copies)?)
                        }
                    };
                    let mut progress =
                        Progress::new(&format!("distil {k}"), n_distill_iters as usize);
                    let data = with_draws.as_ref().unwrap_or(train);
                    let mut c = match (self.cfg.save_every, &resume) {
                        (0, None) => distill(&dcfg, &teacher, ckpt, data, dev, &mut progress)?,
                        (every, _) => distill_resumable(
                            &dcfg,
                            &teacher,
                            ckpt,
                            data,
                            resume.as_ref(),
                            if every == 0 {
                                n_distill_iters.max(1)
                            } else {
                                every
                            },
                            &mut |c| {
                                let mut c = c.clone();
                                c.set_meta(DISTILL_TEACHER_KEY, &record)?;
                                c.save(&partial_path)
                            },
                            dev,
                            &mut progress,
                        )?,
                    };
                    c.set_meta(DISTILL_TEACHER_KEY, &record)?;
                    c.set_meta(RUN_KEY, &self.record())?;
                    c.save(&path)?;
                    if partial_path.exists() {
                        std::fs::remove_file(&partial_path)?;
                    }
                    c
                };
                Some(TrafficModel::load(&c, DType::F32, dev)?)
            }
        };
        Ok(distilled)
    }

    /// The control: `control_iters` more steps of plain training from the baseline.
    pub fn control(&self, data: &Prepared, base: &Baseline) -> Result<Option<TrafficModel>> {
        let (train, baseline, ckpt) = (&data.train, &base.model, &base.ckpt);
        let (dev, out) = (&self.dev, &self.out);
        // The control: as many more steps of plain training as the distillation took.
        let control = match self.cfg.control_iters {
            None => None,
            Some(n) => {
                let path = out.join("baseline_more.safetensors");
                let c = if self.reuse && path.exists() {
                    eprintln!("reusing {}", path.display());
                    Checkpoint::load(&path)?
                } else {
                    let ccfg = TrafficConfig {
                        iters: n,
                        ..baseline.config.clone()
                    };
                    let mut progress = Progress::new("baseline, more steps", n as usize);
                    let c = train_more(&ccfg, ckpt, train, dev, &mut progress)?;
                    c.save(&path)?;
                    c
                };
                Some(TrafficModel::load(&c, DType::F32, dev)?)
            }
        };
        Ok(control)
    }

    /// Evaluates every model on the held-out split's maps (only `eval.models` when
    /// given): rates, r-ELBO, step time, parameters; writes `scenes.png`.
    pub fn evaluate(
        &self,
        data: &Prepared,
        base: &Baseline,
        genneg: &GennegOutcome,
        distilled: Option<&TrafficModel>,
        control: Option<&TrafficModel>,
    ) -> Result<Vec<Row>> {
        let Run {
            dev,
            out,
            seed,
            sampler,
            ..
        } = self;
        let seed = *seed;
        let (test, baseline, sigmas) = (&data.test, &base.model, &base.sigmas);
        let (classifiers, ablations) = (&genneg.classifiers, &genneg.ablations);
        // Evaluation on the held-out split's maps (test unless eval.split says otherwise).
        let gate = self.cfg.genneg.guidance_sigma_max;
        let mut models: Vec<(String, Stack)> = vec![("baseline".into(), baseline.stack())];
        if let Some(c) = &control {
            models.push(("baseline_more".into(), c.stack()));
        }
        for k in 1..=classifiers.len() {
            let stack = baseline.with_classifiers(&classifiers[..k], gate);
            models.push((format!("genneg_{k}"), stack));
        }
        if let Some(d) = &distilled {
            models.push(("distilled".into(), d.stack()));
        }
        for (name, c) in ablations {
            let stack = baseline.with_classifiers(std::slice::from_ref(c), gate);
            models.push((name.clone(), stack));
        }
        if let Some(keep) = &self.cfg.eval.models {
            if let Some(unknown) = keep.iter().find(|k| !models.iter().any(|(n, _)| n == *k)) {
                let names: Vec<&str> = models.iter().map(|(n, _)| n.as_str()).collect();
                bail!(
                    "eval.models: no model {unknown:?} in this run (it has {})",
                    names.join(", ")
                );
            }
            models.retain(|(n, _)| keep.contains(n));
        }
        let idx: Vec<u32> = (0..test.set.len() as u32).collect();
        let dim = test.set.scene_dim();
        let mut rows = Vec::new();
        let mut panels = Vec::new();
        for (name, stack) in &models {
            let model = stack.guided(dev)?;
            let mut progress = Progress::new(&format!("{name}: sampling"), idx.len());
            let t0 = Instant::now();
            let scenes = sample_scenes(
                &model,
                test,
                &idx,
                sampler,
                sigmas,
                seed.wrapping_add(7),
                500,
                &mut |done| progress.update(done, "scenes"),
            )?;
            let (rates, _) = label_scenes(test, &idx, &scenes)?;
            eprintln!("{name}: features {}", feature_summary(&scenes)?);
            let step_ms = {
                let b = idx.len().min(500);
                let cond = test.cond_of(&idx[..b])?;
                let x = test.x.rows(&idx[..b])?;
                sampler_step_ms(&model, sampler, &x, &cond, 1.0, 0.9, 5)?
            };
            let process = &baseline.config.process;
            let elbo = r_elbo(&model, process, test, 8, seed.wrapping_add(11), 500)?;
            eprintln!(
                "{name}: {:.2}% infractions ({:.2}% collision, {:.2}% offroad; vehicles {:.2}% / {:.2}% / {:.2}%), r-ELBO {elbo:.3}, {} scenes in {:.0}s",
                100.0 * rates.infraction,
                100.0 * rates.collision,
                100.0 * rates.offroad,
                100.0 * rates.vehicle_infraction,
                100.0 * rates.vehicle_collision,
                100.0 * rates.vehicle_offroad,
                rates.scenes,
                t0.elapsed().as_secs_f64()
            );
            for i in 0..4.min(idx.len()) {
                panels.push(scene_panel(
                    &format!("{name} {i}"),
                    test.set.map_of(i),
                    &scenes[i * dim..(i + 1) * dim],
                    300,
                ));
            }
            rows.push(Row {
                name: name.clone(),
                collision_rate: rates.collision,
                offroad_rate: rates.offroad,
                infraction_rate: rates.infraction,
                vehicle_infraction_rate: rates.vehicle_infraction,
                r_elbo: elbo,
                step_ms,
                params: stack.params(),
            });
        }
        eprintln!("data: features {}", feature_summary(&test.set.agents)?);
        for i in 0..4.min(idx.len()) {
            panels.push(scene_panel(
                &format!("data {i}"),
                test.set.map_of(i),
                test.set.scene(i),
                300,
            ));
        }
        save_grid(&out.join("scenes.png"), &panels, 4)?;
        eprintln!("wrote {}", out.join("scenes.png").display());
        Ok(rows)
    }
}

/// The baseline's configuration trained at ln σ uniform from `sigma` (checked to lie
/// below the process's largest σ, `key` naming the setting), or as it is.
fn with_sigma(
    baseline: &TrafficModel,
    sigma_max: f64,
    key: &str,
    sigma: Option<f64>,
) -> Result<TrafficConfig> {
    match sigma {
        Some(s) if !(s > 0.0 && s < sigma_max) => bail!("{key} {s} must be in (0, {sigma_max})"),
        Some(s) => Ok(baseline.config.clone().with_log_uniform_sigma(s)),
        None => Ok(baseline.config.clone()),
    }
}
