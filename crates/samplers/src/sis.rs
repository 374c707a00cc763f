//! Sequential importance sampling along a stochastic sampler's chain (Gen-neG App. D.2).
//!
//! A stochastic sampler's step is a Gaussian transition x' ~ N(μ(x), s² I) whose mean
//! comes from the model and whose variance does not. Drawing the chain with a proposal
//! model π and weighting it by Π_i p(x_{i+1} | x_i) / π(x_{i+1} | x_i) makes the
//! weighted draws stand for the target model p's: both transitions share s², so each
//! factor is exp((|x' − μ_π|² − |x' − μ_p|²) / 2s²). The last step (to σ = 0) has no
//! noise; it is taken with the target's mean, a deterministic function of the chain.

use crate::samplers::{check_grid, check_state, report, sigma_vec, Callback, Sampler};
use candle_core::{bail, DType, Result, Tensor, D};
use scoreguide_guidance::{Cond, Score};
use scoreguide_sde::SampleNoise;

/// What one step of a sampler with Gaussian transitions needs from the model.
#[derive(Clone, Copy)]
enum Transition {
    /// DDIM with η > 0 (η = 1: DDPM's ancestral sampler): mean D + σ_down (x − D)/σ.
    Ddim { eta: f64 },
    /// Euler–Maruyama on the reverse SDE: mean x + h s(x), h = 2σ (σ − σ').
    EulerMaruyama,
}

impl Transition {
    fn of(sampler: &Sampler) -> Result<Self> {
        Ok(match *sampler {
            Sampler::Ddim { eta } if eta > 0.0 && eta <= 1.0 => Self::Ddim { eta },
            Sampler::DdpmAncestral => Self::Ddim { eta: 1.0 },
            Sampler::EulerMaruyama => Self::EulerMaruyama,
            other => bail!(
                "sequential importance sampling needs a sampler whose steps are Gaussian with a model-free variance (euler_maruyama, ddpm_ancestral, ddim with eta > 0), got {other:?}"
            ),
        })
    }

    /// The step's mean at `x` under `model`, its standard deviation, and the model's
    /// estimate of the clean data.
    fn step(
        self,
        model: &dyn Score,
        x: &Tensor,
        s: f64,
        s_next: f64,
        cond: &Cond,
    ) -> Result<(Tensor, f64, Tensor)> {
        let sv = sigma_vec(x, s)?;
        match self {
            Self::Ddim { eta } => {
                let denoised = model.denoise_with(x, &sv, cond)?;
                if s_next == 0.0 {
                    return Ok((denoised.clone(), 0.0, denoised));
                }
                let s_up =
                    (eta * s_next * ((s * s - s_next * s_next) / (s * s)).sqrt()).min(s_next);
                let s_down = (s_next * s_next - s_up * s_up).sqrt();
                let eps = ((x - &denoised)? / s)?;
                Ok(((&denoised + (eps * s_down)?)?, s_up, denoised))
            }
            Self::EulerMaruyama => {
                let score = model.score_with(x, &sv, cond)?;
                let denoised = (x + (&score * (s * s))?)?;
                let h = 2.0 * s * (s - s_next);
                let std = if s_next > 0.0 { h.sqrt() } else { 0.0 };
                Ok(((x + (score * h)?)?, std, denoised))
            }
        }
    }
}

/// Runs `sampler` with `proposal`'s transitions and returns the final state and each
/// row's log importance weight log Π p(x_{i+1} | x_i) / π(x_{i+1} | x_i) for `target`.
///
/// With `target` and `proposal` the same model this is `sampler.sample_with` to the bit,
/// with every weight 0. A mask in `cond` (`[B, M]` over x's first two dimensions) leaves
/// absent frames or agents out of the weights.
#[allow(clippy::too_many_arguments)]
pub fn sample_sis(
    sampler: &Sampler,
    target: &dyn Score,
    proposal: &dyn Score,
    mut x: Tensor,
    sigmas: &[f64],
    cond: &Cond,
    noise: &mut SampleNoise,
    mut callback: Option<Callback>,
) -> Result<(Tensor, Vec<f64>)> {
    let transition = Transition::of(sampler)?;
    check_grid(sigmas, true)?;
    check_state(&x, noise, cond)?;
    let rows = x.dim(0)?;
    let mask = row_mask(&x, cond)?;
    let mut log_w = vec![0f64; rows];
    for i in 0..sigmas.len() - 1 {
        let (s, s_next) = (sigmas[i], sigmas[i + 1]);
        let (mean_p, std, target_denoised) = transition.step(target, &x, s, s_next, cond)?;
        // The noise-free last step is the target's alone: no proposal evaluation.
        let denoised = if std > 0.0 {
            let (mean_q, _, denoised) = transition.step(proposal, &x, s, s_next, cond)?;
            let next = (&mean_q + (noise.randn_like(&x)? * std)?)?;
            let dq = (&next - &mean_q)?.to_dtype(DType::F64)?.sqr()?;
            let dp = (&next - &mean_p)?.to_dtype(DType::F64)?.sqr()?;
            let mut diff = (dq - dp)?;
            if let Some(m) = &mask {
                diff = diff.broadcast_mul(m)?;
            }
            let step = (diff.flatten_from(1)?.sum(D::Minus1)? / (2.0 * std * std))?;
            for (w, d) in log_w.iter_mut().zip(step.to_vec1::<f64>()?) {
                *w += d;
            }
            x = next;
            denoised
        } else {
            x = mean_p;
            target_denoised
        };
        if report(&mut callback, sigmas, i, &x, &denoised) {
            break;
        }
    }
    if let Some(bad) = log_w.iter().position(|w| !w.is_finite()) {
        bail!(
            "sequential importance sampling: row {bad}'s log weight is {} (the proposal and target disagree beyond f64)",
            log_w[bad]
        );
    }
    Ok((x, log_w))
}

/// The condition's mask as f64, shaped to broadcast over x (`[B, M, 1, …]`), when it
/// covers x's first two dimensions.
fn row_mask(x: &Tensor, cond: &Cond) -> Result<Option<Tensor>> {
    let Some(m) = &cond.mask else {
        return Ok(None);
    };
    if m.rank() != 2 || x.rank() < 2 || m.dims() != &x.dims()[..2] {
        bail!(
            "sequential importance sampling: a mask of {:?} does not cover samples of {:?}",
            m.dims(),
            x.dims()
        );
    }
    let mut shape = m.dims().to_vec();
    shape.resize(x.rank(), 1);
    Ok(Some(m.to_dtype(DType::F64)?.reshape(shape)?))
}
