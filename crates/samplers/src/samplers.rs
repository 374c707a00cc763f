use candle_core::{bail, DType, Device, Result, Tensor};
use scoreguide_guidance::{Cond, Score, NO_COND};
use scoreguide_sde::SampleNoise;
use serde::{Deserialize, Serialize};
use std::ops::ControlFlow;

/// What a sampler reports after each step.
pub struct Step<'a> {
    /// Step index, from 0 to `steps − 1`.
    pub index: usize,
    pub steps: usize,
    pub sigma: f64,
    pub sigma_next: f64,
    /// The state after the step (at `sigma_next`).
    pub x: &'a Tensor,
    /// The model's estimate of the clean data at this step.
    pub denoised: &'a Tensor,
}

/// Called after every step; `ControlFlow::Break` stops sampling and returns the current state.
pub type Callback<'a> = &'a mut dyn FnMut(&Step<'_>) -> ControlFlow<()>;

/// EDM's stochastic Heun sampler options (Karras et al. 2022, Alg. 2).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct HeunOptions {
    pub churn: f64,
    pub s_tmin: f64,
    pub s_tmax: f64,
    pub s_noise: f64,
}

impl Default for HeunOptions {
    /// Deterministic Heun (no churn).
    fn default() -> Self {
        Self {
            churn: 0.0,
            s_tmin: 0.0,
            s_tmax: f64::INFINITY,
            s_noise: 1.0,
        }
    }
}

/// Predictor–corrector options (Song et al. 2021, VE): Langevin corrector with signal-to-noise ratio `snr`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PcOptions {
    pub snr: f64,
    pub corrector_steps: usize,
}

impl Default for PcOptions {
    fn default() -> Self {
        Self {
            snr: 0.16,
            corrector_steps: 1,
        }
    }
}

/// Integrator for the probability-flow ODE.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OdeSolver {
    Euler,
    Heun,
    Rk4,
}

/// Every sampler with its options.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Sampler {
    Heun(HeunOptions),
    Euler,
    EulerMaruyama,
    PredictorCorrector(PcOptions),
    Ddim { eta: f64 },
    DdpmAncestral,
    ProbabilityFlow { solver: OdeSolver },
}

impl Sampler {
    /// Model evaluations per step (for timing per evaluation).
    pub fn evaluations_per_step(&self) -> usize {
        match self {
            Self::Heun(_) => 2,
            Self::PredictorCorrector(o) => 1 + o.corrector_steps,
            Self::ProbabilityFlow {
                solver: OdeSolver::Heun,
            } => 2,
            Self::ProbabilityFlow {
                solver: OdeSolver::Rk4,
            } => 4,
            _ => 1,
        }
    }

    /// Samples from `model` without a condition: see [`Sampler::sample_with`].
    pub fn sample(
        &self,
        model: &dyn Score,
        x: Tensor,
        sigmas: &[f64],
        noise: &mut SampleNoise,
        callback: Option<Callback>,
    ) -> Result<Tensor> {
        self.sample_with(model, x, sigmas, &NO_COND, noise, callback)
    }

    /// Runs this sampler from `x` at `sigmas[0]` down the grid, the model seeing each
    /// row's condition `cond` at every step.
    pub fn sample_with(
        &self,
        model: &dyn Score,
        x: Tensor,
        sigmas: &[f64],
        cond: &Cond,
        noise: &mut SampleNoise,
        callback: Option<Callback>,
    ) -> Result<Tensor> {
        match *self {
            Self::Heun(o) => heun(model, x, sigmas, cond, noise, o, callback),
            Self::Euler => euler(model, x, sigmas, cond, noise, callback),
            Self::EulerMaruyama => euler_maruyama(model, x, sigmas, cond, noise, callback),
            Self::PredictorCorrector(o) => {
                predictor_corrector(model, x, sigmas, cond, noise, o, callback)
            }
            Self::Ddim { eta } => ddim(model, x, sigmas, cond, noise, eta, callback),
            Self::DdpmAncestral => ddpm_ancestral(model, x, sigmas, cond, noise, callback),
            Self::ProbabilityFlow { solver } => {
                probability_flow(model, x, sigmas, cond, solver, callback)
            }
        }
    }
}

/// Standard normal noise of `shape` times `sigma_max`: the prior a sampler starts from.
pub fn initial_noise(
    noise: &mut SampleNoise,
    shape: &[usize],
    sigma_max: f64,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    noise.randn(shape, dtype, device)? * sigma_max
}

pub(crate) fn check_grid(sigmas: &[f64], descending_only: bool) -> Result<()> {
    if sigmas.len() < 2 {
        bail!("σ grid: need at least 2 noise levels, got {}", sigmas.len());
    }
    if let Some(s) = sigmas.iter().find(|s| !(s.is_finite() && **s >= 0.0)) {
        bail!("σ grid: every level must be finite and non-negative, found {s}");
    }
    if sigmas[..sigmas.len() - 1].contains(&0.0) {
        bail!("σ grid: only the last level may be 0");
    }
    let desc = sigmas.windows(2).all(|w| w[1] < w[0]);
    let asc = sigmas.windows(2).all(|w| w[1] > w[0]);
    if descending_only && !desc {
        bail!(
            "σ grid: levels must be strictly decreasing, got {:?}…",
            &sigmas[..sigmas.len().min(4)]
        );
    }
    if !(desc || asc) {
        bail!("σ grid: levels must be strictly monotone");
    }
    Ok(())
}

pub(crate) fn check_state(x: &Tensor, noise: &SampleNoise, cond: &Cond) -> Result<()> {
    if x.rank() < 2 {
        bail!("sampler: x must be [batch, ...], got {:?}", x.dims());
    }
    cond.check(x.dim(0)?)?;
    if x.dim(0)? != noise.len() {
        bail!(
            "sampler: batch of {} samples but {} noise generators",
            x.dim(0)?,
            noise.len()
        );
    }
    Ok(())
}

pub(crate) fn sigma_vec(x: &Tensor, sigma: f64) -> Result<Tensor> {
    Tensor::full(sigma as f32, x.dim(0)?, x.device())?.to_dtype(x.dtype())
}

fn denoise(model: &dyn Score, x: &Tensor, sigma: f64, cond: &Cond) -> Result<Tensor> {
    model.denoise_with(x, &sigma_vec(x, sigma)?, cond)
}

/// dx/dσ of the probability-flow ODE: (x − D(x; σ))/σ.
fn ode_derivative(
    model: &dyn Score,
    x: &Tensor,
    sigma: f64,
    cond: &Cond,
) -> Result<(Tensor, Tensor)> {
    let d = denoise(model, x, sigma, cond)?;
    Ok((((x - &d)? / sigma)?, d))
}

/// Tells the callback about step `index` of `sigmas` (σ_index → σ_index+1); true to stop.
pub(crate) fn report(
    callback: &mut Option<Callback>,
    sigmas: &[f64],
    index: usize,
    x: &Tensor,
    denoised: &Tensor,
) -> bool {
    let Some(cb) = callback else {
        return false;
    };
    let step = Step {
        index,
        steps: sigmas.len() - 1,
        sigma: sigmas[index],
        sigma_next: sigmas[index + 1],
        x,
        denoised,
    };
    cb(&step).is_break()
}

/// EDM's Heun sampler with churn: γ_i = min(churn/N, √2 − 1) for σ_i in [s_tmin, s_tmax];
/// the step raises σ_i to σ̂ = σ_i (1 + γ) with fresh noise, then takes a Heun step to
/// σ_{i+1} (an Euler step when σ_{i+1} = 0).
pub fn heun(
    model: &dyn Score,
    mut x: Tensor,
    sigmas: &[f64],
    cond: &Cond,
    noise: &mut SampleNoise,
    opts: HeunOptions,
    mut callback: Option<Callback>,
) -> Result<Tensor> {
    check_grid(sigmas, true)?;
    check_state(&x, noise, cond)?;
    let n = sigmas.len() - 1;
    for i in 0..n {
        let (s_cur, s_next) = (sigmas[i], sigmas[i + 1]);
        let gamma = if opts.churn > 0.0 && opts.s_tmin <= s_cur && s_cur <= opts.s_tmax {
            (opts.churn / n as f64).min(2f64.sqrt() - 1.0)
        } else {
            0.0
        };
        let s_hat = s_cur * (1.0 + gamma);
        let x_hat = if gamma > 0.0 {
            let z = noise.randn_like(&x)?;
            (&x + (z * ((s_hat * s_hat - s_cur * s_cur).sqrt() * opts.s_noise))?)?
        } else {
            x.clone()
        };
        let (d, mut denoised) = ode_derivative(model, &x_hat, s_hat, cond)?;
        x = (&x_hat + (&d * (s_next - s_hat))?)?;
        if s_next > 0.0 {
            let (d2, den2) = ode_derivative(model, &x, s_next, cond)?;
            x = (&x_hat + ((d + d2)? * (0.5 * (s_next - s_hat)))?)?;
            denoised = den2;
        }
        if report(&mut callback, sigmas, i, &x, &denoised) {
            break;
        }
    }
    Ok(x)
}

/// Euler's method on the probability-flow ODE (deterministic; `noise` is not drawn from).
pub fn euler(
    model: &dyn Score,
    x: Tensor,
    sigmas: &[f64],
    cond: &Cond,
    noise: &mut SampleNoise,
    callback: Option<Callback>,
) -> Result<Tensor> {
    check_grid(sigmas, true)?;
    check_state(&x, noise, cond)?;
    probability_flow(model, x, sigmas, cond, OdeSolver::Euler, callback)
}

/// Euler–Maruyama on the reverse-time SDE of σ(t) = t:
/// dx = −2σ ∇log p dσ + sqrt(2σ) dw̄, i.e. x ← x + h s + sqrt(h) z with h = 2σ_i (σ_i − σ_{i+1}).
/// The step to σ = 0 returns its mean (no noise), as score_sde does.
pub fn euler_maruyama(
    model: &dyn Score,
    mut x: Tensor,
    sigmas: &[f64],
    cond: &Cond,
    noise: &mut SampleNoise,
    mut callback: Option<Callback>,
) -> Result<Tensor> {
    check_grid(sigmas, true)?;
    check_state(&x, noise, cond)?;
    let n = sigmas.len() - 1;
    for i in 0..n {
        let (s, s_next) = (sigmas[i], sigmas[i + 1]);
        let sv = sigma_vec(&x, s)?;
        let score = model.score_with(&x, &sv, cond)?;
        let denoised = (&x + (&score * (s * s))?)?;
        let h = 2.0 * s * (s - s_next);
        x = (&x + (score * h)?)?;
        if s_next > 0.0 {
            x = (&x + (noise.randn_like(&x)? * h.sqrt())?)?;
        }
        if report(&mut callback, sigmas, i, &x, &denoised) {
            break;
        }
    }
    Ok(x)
}

/// Song et al.'s predictor–corrector sampler for VE: at each σ_i, `corrector_steps`
/// Langevin steps with ε = 2 (snr ‖z‖/‖s‖)² (batch means of per-sample norms), then the
/// reverse-diffusion predictor x ← x + (σ_i² − σ_{i+1}²) s + sqrt(σ_i² − σ_{i+1}²) z.
/// The last step returns the predictor's mean.
pub fn predictor_corrector(
    model: &dyn Score,
    mut x: Tensor,
    sigmas: &[f64],
    cond: &Cond,
    noise: &mut SampleNoise,
    opts: PcOptions,
    mut callback: Option<Callback>,
) -> Result<Tensor> {
    check_grid(sigmas, true)?;
    check_state(&x, noise, cond)?;
    if !(opts.snr > 0.0 && opts.snr.is_finite()) {
        bail!(
            "predictor–corrector: snr must be positive, got {}",
            opts.snr
        );
    }
    let n = sigmas.len() - 1;
    let batch_norm = |t: &Tensor| -> Result<f64> {
        t.sqr()?
            .flatten_from(1)?
            .sum(1)?
            .sqrt()?
            .mean_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()
    };
    for i in 0..n {
        let (s, s_next) = (sigmas[i], sigmas[i + 1]);
        let sv = sigma_vec(&x, s)?;
        for _ in 0..opts.corrector_steps {
            let g = model.score_with(&x, &sv, cond)?;
            let z = noise.randn_like(&x)?;
            let (gn, zn) = (batch_norm(&g)?, batch_norm(&z)?);
            let eps = if gn > 0.0 {
                2.0 * (opts.snr * zn / gn).powi(2)
            } else {
                0.0
            };
            x = ((&x + (g * eps)?)? + (z * (2.0 * eps).sqrt())?)?;
        }
        let score = model.score_with(&x, &sv, cond)?;
        let denoised = (&x + (&score * (s * s))?)?;
        let g2 = s * s - s_next * s_next;
        let mean = (&x + (score * g2)?)?;
        x = if i + 1 < n {
            (&mean + (noise.randn_like(&mean)? * g2.sqrt())?)?
        } else {
            mean
        };
        if report(&mut callback, sigmas, i, &x, &denoised) {
            break;
        }
    }
    Ok(x)
}

/// DDIM (Song, Meng & Ermon 2021) in σ-space: with D = D(x; σ) and ε̂ = (x − D)/σ,
/// x ← D + σ_down ε̂ + σ_up z, σ_up = η σ' sqrt((σ² − σ'²)/σ²), σ_down = sqrt(σ'² − σ_up²).
/// η = 0 is deterministic (and equals Euler on the ODE); η = 1 is DDPM's ancestral sampler.
pub fn ddim(
    model: &dyn Score,
    mut x: Tensor,
    sigmas: &[f64],
    cond: &Cond,
    noise: &mut SampleNoise,
    eta: f64,
    mut callback: Option<Callback>,
) -> Result<Tensor> {
    check_grid(sigmas, true)?;
    check_state(&x, noise, cond)?;
    if !(0.0..=1.0).contains(&eta) {
        bail!("DDIM: eta must be in [0, 1], got {eta}");
    }
    let n = sigmas.len() - 1;
    for i in 0..n {
        let (s, s_next) = (sigmas[i], sigmas[i + 1]);
        let denoised = denoise(model, &x, s, cond)?;
        x = if s_next > 0.0 {
            let s_up = (eta * s_next * ((s * s - s_next * s_next) / (s * s)).sqrt()).min(s_next);
            let s_down = (s_next * s_next - s_up * s_up).sqrt();
            let eps = ((&x - &denoised)? / s)?;
            let mut nx = (&denoised + (eps * s_down)?)?;
            if s_up > 0.0 {
                nx = (nx + (noise.randn_like(&x)? * s_up)?)?;
            }
            nx
        } else {
            denoised.clone()
        };
        if report(&mut callback, sigmas, i, &x, &denoised) {
            break;
        }
    }
    Ok(x)
}

/// DDPM's ancestral sampler (Ho et al. 2020): its posterior variance β̃ is DDIM's at
/// η = 1, so on a DDPM process's own σ grid this is exactly the ancestral chain.
pub fn ddpm_ancestral(
    model: &dyn Score,
    x: Tensor,
    sigmas: &[f64],
    cond: &Cond,
    noise: &mut SampleNoise,
    callback: Option<Callback>,
) -> Result<Tensor> {
    ddim(model, x, sigmas, cond, noise, 1.0, callback)
}

/// The probability-flow ODE dx/dσ = (x − D(x; σ))/σ integrated along `sigmas`, which may
/// descend (sampling) or ascend (encoding data to noise). A step ending at σ = 0 is an
/// Euler step (x = D), since the derivative is undefined there.
pub fn probability_flow(
    model: &dyn Score,
    mut x: Tensor,
    sigmas: &[f64],
    cond: &Cond,
    solver: OdeSolver,
    mut callback: Option<Callback>,
) -> Result<Tensor> {
    check_grid(sigmas, false)?;
    if x.rank() < 2 {
        bail!(
            "probability-flow ODE: x must be [batch, ...], got {:?}",
            x.dims()
        );
    }
    cond.check(x.dim(0)?)?;
    let n = sigmas.len() - 1;
    for i in 0..n {
        let (s, s_next) = (sigmas[i], sigmas[i + 1]);
        let h = s_next - s;
        let (k1, denoised) = ode_derivative(model, &x, s, cond)?;
        x = if s_next == 0.0 || solver == OdeSolver::Euler {
            (&x + (k1 * h)?)?
        } else if solver == OdeSolver::Heun {
            let xe = (&x + (&k1 * h)?)?;
            let (k2, _) = ode_derivative(model, &xe, s_next, cond)?;
            (&x + ((k1 + k2)? * (0.5 * h))?)?
        } else {
            let sm = s + 0.5 * h;
            let (k2, _) = ode_derivative(model, &(&x + (&k1 * (0.5 * h))?)?, sm, cond)?;
            let (k3, _) = ode_derivative(model, &(&x + (&k2 * (0.5 * h))?)?, sm, cond)?;
            let (k4, _) = ode_derivative(model, &(&x + (&k3 * h)?)?, s_next, cond)?;
            let sum = (((k1 + (k2 * 2.0)?)? + (k3 * 2.0)?)? + k4)?;
            (&x + (sum * (h / 6.0))?)?
        };
        if report(&mut callback, sigmas, i, &x, &denoised) {
            break;
        }
    }
    Ok(x)
}

/// Draws `n` samples of shape `sample_shape` in batches of at most `batch_size`, sample i
/// on row i of `cond` (which has n rows, or is empty). Sample i always gets the noise
/// stream `(seed, i)`, so the result does not depend on `batch_size`. `on_step` is told
/// the number of (batch, step) pairs finished so far.
#[allow(clippy::too_many_arguments)]
pub fn sample_many(
    sampler: &Sampler,
    model: &dyn Score,
    cond: &Cond,
    n: usize,
    sample_shape: &[usize],
    sigmas: &[f64],
    seed: u64,
    batch_size: usize,
    device: &Device,
    on_step: &mut dyn FnMut(usize),
) -> Result<Tensor> {
    if n == 0 || batch_size == 0 {
        bail!("sample_many: need n > 0 and batch_size > 0, got n = {n}, batch_size = {batch_size}");
    }
    check_grid(sigmas, true)?;
    if !cond.is_none() {
        cond.check(n)?;
    }
    let mut parts = Vec::new();
    let mut done_steps = 0;
    let mut first = 0;
    while first < n {
        let b = batch_size.min(n - first);
        let mut noise = SampleNoise::new(seed, first, b);
        let mut shape = vec![b];
        shape.extend_from_slice(sample_shape);
        let x = initial_noise(&mut noise, &shape, sigmas[0], DType::F32, device)?;
        let mut cb = |_: &Step<'_>| {
            done_steps += 1;
            on_step(done_steps);
            ControlFlow::Continue(())
        };
        let rows = if cond.is_none() {
            Cond::none()
        } else {
            cond.narrow(first, b)?
        };
        parts.push(sampler.sample_with(model, x, sigmas, &rows, &mut noise, Some(&mut cb))?);
        first += b;
    }
    Tensor::cat(&parts, 0)
}
