//! The training loop.

use crate::optim::{clip_grad_norm, grad_norm, Adam, AdamConfig, Ema};
use crate::progress::Progress;
use candle_core::{bail, DType, Result, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;
use scoreguide_checkpoint::Checkpoint;
use scoreguide_nets::ParamStore;
use scoreguide_sde::derive_seed;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Saving in stages and resuming, for a training that must survive an interruption
/// ([`Trainer::fit`]).
pub struct Staged<'a> {
    /// A state saved by an earlier run of the same training, to continue.
    pub resume: Option<&'a Checkpoint>,
    pub save_every: u64,
    /// Called with the whole (described) training state every `save_every` steps and at
    /// the end; write it atomically (`Checkpoint::save` does).
    pub save: &'a mut dyn FnMut(&Checkpoint) -> Result<()>,
}

/// Optimisation settings; all of it is recorded in checkpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub lr: f64,
    pub adam: AdamConfig,
    /// EMA decay per step (0 keeps the EMA equal to the weights).
    pub ema_decay: f64,
    /// Clip the global gradient norm to this value.
    pub grad_clip: Option<f64>,
    /// Linear learning-rate warm-up over this many steps.
    pub warmup_steps: u64,
    /// Seed of the per-step generators (noise levels, noise, batches).
    pub seed: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            lr: 3e-4,
            adam: AdamConfig::default(),
            ema_decay: 0.999,
            grad_clip: None,
            warmup_steps: 0,
            seed: 0,
        }
    }
}

impl TrainConfig {
    pub fn validate(&self) -> Result<()> {
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            bail!(
                "training: learning rate must be positive and finite, got {}",
                self.lr
            );
        }
        let a = &self.adam;
        if !((0.0..1.0).contains(&a.beta1)
            && (0.0..1.0).contains(&a.beta2)
            && a.eps > 0.0
            && a.weight_decay >= 0.0)
        {
            bail!("training: Adam needs β1, β2 in [0, 1), eps > 0, weight_decay ≥ 0, got {a:?}");
        }
        if let Some(c) = self.grad_clip {
            if !(c > 0.0) {
                bail!("training: grad_clip must be positive, got {c}");
            }
        }
        if !(0.0..1.0).contains(&self.ema_decay) {
            bail!(
                "training: ema_decay must be in [0, 1), got {}",
                self.ema_decay
            );
        }
        Ok(())
    }
}

/// What one step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    pub step: u64,
    pub loss: f32,
    pub lr: f64,
    pub grad_norm: Option<f64>,
}

/// Averages each parameter's gradient over the processes of a data-parallel run before
/// the optimiser sees it (`DataParallel`, feature `nccl`: NCCL's all-reduce).
pub trait GradientSync {
    fn sync(
        &self,
        grads: &mut candle_core::backprop::GradStore,
        vars: &[(String, candle_core::Var)],
    ) -> Result<()>;
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
}

/// Owns the optimisation state of a [`ParamStore`].
pub struct Trainer {
    config: TrainConfig,
    store: ParamStore,
    adam: Adam,
    ema: Ema,
    step: u64,
    sync: Option<Box<dyn GradientSync>>,
}

impl Trainer {
    /// Call after the model is built on `store.var_builder(..)`, so its parameters exist.
    pub fn new(store: ParamStore, config: TrainConfig) -> Result<Self> {
        config.validate()?;
        if store.is_empty() {
            bail!("training: the parameter store is empty; build the model before the trainer");
        }
        let vars = store.vars();
        let ema = Ema::new(&vars, config.ema_decay)?;
        let adam = Adam::new(vars, config.adam)?;
        Ok(Self {
            config,
            store,
            adam,
            ema,
            step: 0,
            sync: None,
        })
    }

    /// This trainer as one rank of a data-parallel run: every step's gradients are
    /// averaged over the ranks, and each rank draws its own step randomness (rank r's
    /// noise stream is (seed, step, r)), so W ranks together take one step on W times the
    /// noise draws of a single process. Every rank must start from the same parameters
    /// (the same `ParamStore` seed) and save only from rank 0.
    pub fn with_gradient_sync(mut self, sync: Box<dyn GradientSync>) -> Self {
        self.sync = Some(sync);
        self
    }

    /// (rank, world) of a data-parallel run; (0, 1) otherwise.
    pub fn rank_and_world(&self) -> (usize, usize) {
        self.sync.as_ref().map_or((0, 1), |s| (s.rank(), s.world()))
    }

    pub fn config(&self) -> &TrainConfig {
        &self.config
    }
    pub fn store(&self) -> &ParamStore {
        &self.store
    }
    /// Steps taken so far.
    pub fn steps_done(&self) -> u64 {
        self.step
    }
    pub fn ema(&self) -> &Ema {
        &self.ema
    }

    /// Learning rate of the next step (after warm-up).
    pub fn lr(&self) -> f64 {
        let w = self.config.warmup_steps;
        if w == 0 {
            self.config.lr
        } else {
            self.config.lr * ((self.step + 1) as f64 / w as f64).min(1.0)
        }
    }

    /// The generator of the next step: a function of (seed, step) only.
    pub fn step_rng(&self) -> StdRng {
        let seed = derive_seed(self.config.seed, self.step);
        match self.rank_and_world() {
            (_, 1) => StdRng::seed_from_u64(seed),
            (rank, _) => StdRng::seed_from_u64(derive_seed(seed, rank as u64)),
        }
    }

    /// Backward pass, optional clipping, Adam update, EMA update.
    pub fn step(&mut self, loss: &Tensor) -> Result<StepStats> {
        let value = loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        if !value.is_finite() {
            bail!("training step {}: loss is {value}", self.step);
        }
        let mut grads = loss.backward()?;
        if let Some(sync) = &self.sync {
            sync.sync(&mut grads, self.adam.vars())?;
        }
        // A non-finite gradient would poison Adam's moments and every step after it; the
        // last saved state stays the last good one.
        let named = |e: candle_core::Error| {
            candle_core::Error::msg(format!("training step {} (loss {value}): {e}", self.step))
        };
        let grad_norm = match self.config.grad_clip {
            Some(c) => Some(clip_grad_norm(&mut grads, self.adam.vars(), c).map_err(named)?),
            None => {
                grad_norm(&grads, self.adam.vars()).map_err(named)?;
                None
            }
        };
        let lr = self.lr();
        self.adam.step(&grads, lr)?;
        self.ema.update(self.adam.vars())?;
        self.step += 1;
        Ok(StepStats {
            step: self.step,
            loss: value,
            lr,
            grad_norm,
        })
    }

    /// Steps until `until` steps are done; `loss_fn(step, rng)` builds each loss from the
    /// step's own generator. Returns the losses of the steps taken.
    pub fn run<F>(
        &mut self,
        until: u64,
        progress: &mut Progress,
        mut loss_fn: F,
    ) -> Result<Vec<f32>>
    where
        F: FnMut(u64, &mut StdRng) -> Result<Tensor>,
    {
        let mut losses = Vec::new();
        let mut smooth = None::<f64>;
        progress.starting_at(self.step as usize);
        while self.step < until {
            let mut rng = self.step_rng();
            let loss = loss_fn(self.step, &mut rng)?;
            let s = self.step(&loss)?;
            losses.push(s.loss);
            let sm = smooth.map_or(s.loss as f64, |m| 0.98 * m + 0.02 * s.loss as f64);
            smooth = Some(sm);
            progress.update(self.step as usize, &format!("loss {sm:.4}"));
        }
        Ok(losses)
    }

    /// [`Trainer::run`] in stages that survive an interruption: every `save_every` steps,
    /// and at `until`, `save` is given the trainer (save its [`Trainer::checkpoint`]
    /// atomically; [`Trainer::restore`] continues from it). Each step's randomness
    /// depends on the step alone, so a resumed run ends where the uninterrupted one does,
    /// to the bit.
    pub fn run_staged<F>(
        &mut self,
        until: u64,
        save_every: u64,
        progress: &mut Progress,
        mut loss_fn: F,
        save: &mut dyn FnMut(&Trainer) -> Result<()>,
    ) -> Result<Vec<f32>>
    where
        F: FnMut(u64, &mut StdRng) -> Result<Tensor>,
    {
        if save_every == 0 {
            bail!("staged training: save_every must be at least 1 step");
        }
        let mut losses = Vec::new();
        while self.step < until {
            let stage_end = (self.step / save_every + 1) * save_every;
            losses.extend(self.run(stage_end.min(until), progress, &mut loss_fn)?);
            save(self)?;
        }
        Ok(losses)
    }

    /// Trains to `until` steps, the one loop every experiment's training goes through:
    /// plainly, or with `staged` continuing a saved state and saving the state every
    /// `save_every` steps and at the end. `describe` completes a [`Trainer::checkpoint`]
    /// with what the caller's loaders read (the model's configuration, ...); the
    /// described final checkpoint is returned with the losses of the steps taken. A saved
    /// state further along than `until` is refused.
    pub fn fit<F>(
        &mut self,
        until: u64,
        staged: Option<Staged>,
        progress: &mut Progress,
        loss_fn: F,
        describe: &dyn Fn(Checkpoint) -> Result<Checkpoint>,
    ) -> Result<(Checkpoint, Vec<f32>)>
    where
        F: FnMut(u64, &mut StdRng) -> Result<Tensor>,
    {
        let losses = match staged {
            None => self.run(until, progress, loss_fn)?,
            Some(st) => {
                if let Some(c) = st.resume {
                    let step: u64 = c.meta("step")?;
                    if step > until {
                        bail!(
                            "the saved state has done {step} steps, more than the {until} asked for"
                        );
                    }
                    self.restore(c)?;
                }
                self.run_staged(until, st.save_every, progress, loss_fn, &mut |t| {
                    (st.save)(&describe(t.checkpoint()?)?)
                })?
            }
        };
        Ok((describe(self.checkpoint()?)?, losses))
    }

    /// Weights, EMA, Adam moments and step, plus the training configuration, in one
    /// checkpoint; callers add the model description (`model` metadata) and anything else.
    pub fn checkpoint(&self) -> Result<Checkpoint> {
        let mut c = Checkpoint::new();
        c.insert_section("model", &self.store.tensors()?);
        c.insert_section("ema", &self.ema.shadow);
        c.insert_section("adam.m", &self.adam.m);
        c.insert_section("adam.v", &self.adam.v);
        c.set_meta("train", &self.config)?;
        c.set_meta("step", &self.step)?;
        c.set_meta("adam_t", &self.adam.t)?;
        Ok(c)
    }

    /// Restores the state of [`Trainer::checkpoint`]. Fails without changing anything if a
    /// tensor is missing, extra or of another shape (a checkpoint of another architecture).
    pub fn restore(&mut self, ckpt: &Checkpoint) -> Result<()> {
        let step: u64 = ckpt.meta("step")?;
        let adam_t: u64 = ckpt.meta("adam_t")?;
        let config: TrainConfig = ckpt.meta("train")?;
        let check = |prefix: &str| -> Result<std::collections::BTreeMap<String, Tensor>> {
            let sec = ckpt.section(prefix);
            for (name, var) in self.adam.vars() {
                match sec.get(name) {
                    None => bail!("checkpoint `{prefix}` section lacks tensor `{name}`"),
                    Some(t) if t.dims() != var.dims() => bail!(
                        "checkpoint tensor `{prefix}.{name}` has shape {:?}, the model expects {:?}",
                        t.dims(),
                        var.dims()
                    ),
                    _ => {}
                }
            }
            Ok(sec)
        };
        let (m, v, ema) = (check("adam.m")?, check("adam.v")?, check("ema")?);
        let device = self.adam.vars()[0].1.device().clone();
        let dtype = self.adam.vars()[0].1.dtype();
        let prep = |s: std::collections::BTreeMap<String, Tensor>| -> Result<std::collections::BTreeMap<String, Tensor>> {
            s.into_iter()
                .filter(|(k, _)| self.adam.m.contains_key(k))
                .map(|(k, t)| Ok((k, t.to_dtype(dtype)?.to_device(&device)?)))
                .collect()
        };
        let (m, v, ema) = (prep(m)?, prep(v)?, prep(ema)?);
        self.store
            .assign(&ckpt.section("model"), "checkpoint `model` weights")?;
        self.adam.m = m;
        self.adam.v = v;
        self.adam.t = adam_t;
        self.ema.shadow = ema;
        self.ema.decay = config.ema_decay;
        self.ema.updates = step;
        self.adam.config = config.adam;
        self.config = config;
        self.step = step;
        Ok(())
    }
}

/// A training that may be cut off and continued, kept in `dir` as `NAME.safetensors`
/// once finished and meanwhile as `NAME.partial.safetensors`, its whole state saved every
/// `save_every` steps (0: only at the end of `iters`). With `reuse`, a finished model is
/// returned as it is and a saved state is continued exactly; without, training starts
/// afresh. `train` runs the training with the [`Staged`] it is given.
pub fn train_resumable(
    dir: &Path,
    name: &str,
    reuse: bool,
    save_every: u64,
    iters: u64,
    train: impl FnOnce(Staged) -> Result<Checkpoint>,
) -> Result<Checkpoint> {
    let path = dir.join(format!("{name}.safetensors"));
    let partial = dir.join(format!("{name}.partial.safetensors"));
    if reuse && path.exists() {
        eprintln!("{name}: reusing {}", path.display());
        return Checkpoint::load(&path);
    }
    let resume = match reuse && partial.exists() {
        true => Some(Checkpoint::load(&partial)?),
        false => None,
    };
    let mut save = |c: &Checkpoint| c.save(&partial);
    let c = train(Staged {
        resume: resume.as_ref(),
        save_every: if save_every == 0 {
            iters.max(1)
        } else {
            save_every
        },
        save: &mut save,
    })?;
    c.save(&path)?;
    // The finished model supersedes the saved state.
    std::fs::remove_file(&partial).ok();
    Ok(c)
}

#[cfg(test)]
mod resumable_tests {
    use super::*;

    fn at_step(step: u64) -> Checkpoint {
        let mut c = Checkpoint::new();
        c.set_meta("step", &step).unwrap();
        c
    }

    #[test]
    fn finished_models_are_reused_and_saved_states_continued() {
        let dir = std::env::temp_dir().join(format!("sg-resumable-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let partial = dir.join("m.partial.safetensors");
        // A run cut off after saving its state at step 4 of 10…
        at_step(4).save(&partial).unwrap();
        // …is continued from it with `reuse`, saving every 5 steps.
        let c = train_resumable(&dir, "m", true, 5, 10, |staged| {
            let from: u64 = staged.resume.unwrap().meta("step").unwrap();
            assert_eq!((from, staged.save_every), (4, 5));
            (staged.save)(&at_step(5))?;
            Ok(at_step(10))
        })
        .unwrap();
        assert_eq!(c.meta::<u64>("step").unwrap(), 10);
        assert!(
            !partial.exists(),
            "the finished model supersedes the saved state"
        );
        // The finished model is reused as it is.
        let again = train_resumable(&dir, "m", true, 5, 10, |_| panic!("trained again")).unwrap();
        assert_eq!(again.meta::<u64>("step").unwrap(), 10);
        // Without `reuse`, training starts afresh (no state), saving once at the end.
        let fresh = train_resumable(&dir, "m", false, 0, 10, |staged| {
            assert!(staged.resume.is_none());
            assert_eq!(staged.save_every, 10);
            Ok(at_step(3))
        })
        .unwrap();
        assert_eq!(fresh.meta::<u64>("step").unwrap(), 3);
        std::fs::remove_dir_all(&dir).ok();
    }
}

#[cfg(test)]
mod nonfinite_tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn an_infinite_gradient_stops_training_naming_the_step_and_parameter() {
        let store = ParamStore::new(0);
        let w = store
            .var_builder(DType::F32, &Device::Cpu)
            .get_with_hints(3, "w", candle_nn::Init::Const(0.0))
            .unwrap();
        let mut t = Trainer::new(store, TrainConfig::default()).unwrap();
        // √w at w = 0: a finite loss (0) with an infinite gradient.
        let e = t
            .step(&w.sqrt().unwrap().sum_all().unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("training step 0") && e.contains("`w`"), "{e}");
        assert_eq!(t.steps_done(), 0);
        // The same with clipping on.
        let mut t = Trainer::new(
            t.store().clone(),
            TrainConfig {
                grad_clip: Some(1.0),
                ..TrainConfig::default()
            },
        )
        .unwrap();
        let e = t
            .step(&w.sqrt().unwrap().sum_all().unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("`w`"), "{e}");
    }
}

#[cfg(test)]
mod sync_tests {
    use super::*;
    use candle_core::backprop::GradStore;
    use candle_core::{Device, Var};
    use rand::Rng;

    /// Stands in for the ranks' average: scales every gradient.
    struct Scale {
        factor: f64,
        world: usize,
    }

    impl GradientSync for Scale {
        fn sync(&self, grads: &mut GradStore, vars: &[(String, Var)]) -> Result<()> {
            for (_, v) in vars {
                if let Some(g) = grads.get(v.as_tensor()) {
                    let scaled = (g * self.factor)?;
                    grads.insert(v.as_tensor(), scaled);
                }
            }
            Ok(())
        }
        fn rank(&self) -> usize {
            1
        }
        fn world(&self) -> usize {
            self.world
        }
    }

    fn trainer(sync: Option<Scale>) -> (Trainer, Tensor) {
        let store = ParamStore::new(0);
        let w = store
            .var_builder(DType::F32, &Device::Cpu)
            .get_with_hints(3, "w", candle_nn::Init::Const(1.0))
            .unwrap();
        let mut t = Trainer::new(store, TrainConfig::default()).unwrap();
        if let Some(s) = sync {
            t = t.with_gradient_sync(Box::new(s));
        }
        (t, w)
    }

    /// The optimiser sees the synced gradients: zeroed ones leave the parameters where
    /// they were, and the rank draws its own step noise.
    #[test]
    fn gradients_pass_through_the_sync_before_the_optimiser() {
        let (mut plain, w) = trainer(None);
        plain.step(&w.sqr().unwrap().sum_all().unwrap()).unwrap();
        let moved = plain.store().vars()[0]
            .1
            .as_tensor()
            .to_vec1::<f32>()
            .unwrap();
        assert!(moved.iter().all(|&v| v < 1.0), "{moved:?}");

        let zero = Scale {
            factor: 0.0,
            world: 2,
        };
        let (mut synced, w) = trainer(Some(zero));
        assert_eq!(synced.rank_and_world(), (1, 2));
        let rng_rank1 = synced.step_rng().random::<u64>();
        synced.step(&w.sqr().unwrap().sum_all().unwrap()).unwrap();
        let kept = synced.store().vars()[0]
            .1
            .as_tensor()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(kept, vec![1.0; 3]);
        let (single, _) = trainer(None);
        let mut rng_single = single.step_rng();
        assert_ne!(rng_rank1, rng_single.random::<u64>());
    }
}
