//! Training losses for score models.
//!
//! * [`dsm`]: denoising score matching (below).
//! * [`weighted_binary_cross_entropy`]: Gen-neG's IS-balanced loss (Eq. 11) and its
//!   ablations, with a weight per (row, component): a vehicle of a scene, a point;
//!   [`binary_cross_entropy`] with [`ClassWeights`] is its one-component form.
//!
//! Losses of score models take the rows' condition ([`Cond`]) and hand it to the model.
//! * [`distillation`]: a student score regressed on a (guided) teacher (Gen-neG Eq. 12).
//! * [`cross_entropy`] and [`dlsm`]: DLSM's classifier losses (L_total = L_DLSM + c L_CE).
//!
//! [`dsm`] is denoising score matching, E[λ(σ) ‖s(x0 + σz; σ) + z/σ‖²], computed through
//! the model's denoiser view (‖s + z/σ‖² = ‖D − x0‖²/σ⁴) so that no network output is
//! divided by a tiny σ². The weighting is a parameter ([`DsmWeighting`]).
//!
//! ```
//! use candle_core::{Device, Tensor, Result};
//! use scoreguide_guidance::{Cond, Score, per_sample};
//! use scoreguide_losses::{dsm, DsmWeighting};
//!
//! /// The exact score of data concentrated at 0: s = −x/σ².
//! struct Origin;
//! impl Score for Origin {
//!     fn score_with(&self, x: &Tensor, sigma: &Tensor, _cond: &Cond) -> Result<Tensor> {
//!         x.neg()?.broadcast_div(&per_sample(sigma, x)?.sqr()?)
//!     }
//! }
//! let dev = Device::Cpu;
//! let x0 = Tensor::zeros((3, 2), candle_core::DType::F32, &dev)?;
//! let z = Tensor::new(&[[1f32, -2.0], [0.5, 0.5], [3.0, 0.0]], &dev)?;
//! let sigma = Tensor::new(&[0.1f32, 1.0, 10.0], &dev)?;
//! let loss = dsm(&Origin, &x0, &sigma, &z, &Cond::none(), DsmWeighting::SigmaSquared)?;
//! assert!(loss.to_scalar::<f32>()?.abs() < 1e-6); // the exact score has zero DSM loss here
//! # Ok::<(), candle_core::Error>(())
//! ```

use candle_core::{bail, Result, Tensor};
use scoreguide_guidance::{
    check_batch, log_sigmoid, log_softmax, one_hot, per_sample, Cond, Score,
};
use serde::{Deserialize, Serialize};

/// λ(σ) of denoising score matching, stated on the score error ‖s + z/σ‖².
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DsmWeighting {
    /// EDM: λ_D(σ) = (σ² + σd²)/(σ σd)² on the denoiser error ‖D − x0‖², i.e. λ_D σ⁴ on the score error.
    Edm { sigma_data: f64 },
    /// λ = σ² (score_sde image models: ‖σ s + z‖²).
    SigmaSquared,
    /// λ = σ⁴ (the DLSM toy code: ‖σ² s + σ z‖²).
    SigmaFourth,
    /// λ = 1.
    Unit,
}

impl DsmWeighting {
    /// The weight on the denoiser error ‖D − x0‖² at noise level σ.
    pub fn denoiser_weight(&self, sigma: f64) -> f64 {
        match *self {
            Self::Edm { sigma_data: sd } => (sigma * sigma + sd * sd) / (sigma * sd).powi(2),
            Self::SigmaSquared => 1.0 / (sigma * sigma),
            Self::SigmaFourth => 1.0,
            Self::Unit => 1.0 / sigma.powi(4),
        }
    }
}

/// Denoising score matching: the batch mean over samples of
/// λ(σ) ‖s(x0 + σ z; σ) + z/σ‖², summed over data dimensions.
///
/// `x0` and `noise` are `[B, ...]` of the same shape, `sigma` is `[B]`.
pub fn dsm(
    model: &dyn Score,
    x0: &Tensor,
    sigma: &Tensor,
    noise: &Tensor,
    cond: &Cond,
    weighting: DsmWeighting,
) -> Result<Tensor> {
    let x = noised(x0, sigma, noise, "DSM loss")?;
    weighted_error(
        &model.denoise_with(&x, sigma, cond)?,
        x0,
        sigma,
        cond,
        weighting,
    )
}

/// x0 + σ z, after checking the shapes (`what` names the loss in errors).
fn noised(x0: &Tensor, sigma: &Tensor, noise: &Tensor, what: &str) -> Result<Tensor> {
    check_batch(x0, sigma)?;
    if noise.dims() != x0.dims() {
        bail!(
            "{what}: noise has shape {:?}, data has {:?}",
            noise.dims(),
            x0.dims()
        );
    }
    x0 + noise.broadcast_mul(&per_sample(sigma, x0)?)?
}

/// Batch mean of λ_D(σ) ‖d − target‖² summed over data dimensions; where the condition
/// has a mask `[B, M]` (M frames or agents of D/M values each), only the values of
/// present parts (mask 1) count.
fn weighted_error(
    d: &Tensor,
    target: &Tensor,
    sigma: &Tensor,
    cond: &Cond,
    weighting: DsmWeighting,
) -> Result<Tensor> {
    let w = denoiser_weights(sigma, weighting, target)?;
    let sq = (d - target)?.sqr()?.flatten_from(1)?;
    let sq = match &cond.mask {
        None => sq,
        Some(mask) => {
            let (b, dim) = sq.dims2()?;
            let parts = match mask.dims() {
                &[mb, m] if mb == b && m > 0 && dim % m == 0 => m,
                dims => bail!(
                    "loss mask: must be [{b}, M] with M dividing the {dim} values of a row, got {dims:?}"
                ),
            };
            sq.reshape((b, parts, dim / parts))?
                .broadcast_mul(&mask.to_dtype(sq.dtype())?.unsqueeze(2)?)?
                .flatten_from(1)?
        }
    };
    (sq.sum(1)? * w)?.mean_all()
}

/// Per-class weights of a binary cross-entropy.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ClassWeights {
    pub positive: f64,
    pub negative: f64,
}

impl ClassWeights {
    /// Plain cross-entropy.
    pub const UNIT: ClassWeights = ClassWeights {
        positive: 1.0,
        negative: 1.0,
    };

    /// Gen-neG Eq. 11: on a balanced sample (N positives, N negatives) of a model whose
    /// positive rate is α, weighting positives by α and negatives by 1 − α makes the
    /// minimiser the Bayes classifier for the model's own class prior.
    pub fn importance(alpha: f64) -> Result<Self> {
        if !(0.0..=1.0).contains(&alpha) {
            bail!("importance weights: the positive rate alpha must be in [0, 1], got {alpha}");
        }
        Ok(Self {
            positive: alpha,
            negative: 1.0 - alpha,
        })
    }
}

/// Mean over the batch of −w_y [y log σ(z) + (1 − y) log(1 − σ(z))] for logits `z: [B]`
/// and labels `y: [B]` in {0, 1}, computed stably (log σ(z) = min(z, 0) − ln(1 + e^{−|z|})).
pub fn binary_cross_entropy(
    logits: &Tensor,
    labels: &Tensor,
    weights: ClassWeights,
) -> Result<Tensor> {
    if logits.rank() != 1 || logits.dims() != labels.dims() {
        bail!(
            "binary cross-entropy: logits {:?} and labels {:?} must both be [batch]",
            logits.dims(),
            labels.dims()
        );
    }
    let y = labels.to_dtype(logits.dtype())?;
    let lp = log_sigmoid(logits)?;
    let ln = log_sigmoid(&logits.neg()?)?;
    let pos = (y.clone() * weights.positive)?;
    let neg = ((y.affine(-1.0, 1.0))? * weights.negative)?;
    ((pos * lp)? + (neg * ln)?)?.neg()?.mean_all()
}

/// Binary cross-entropy with a weight per (row, component):
/// Σ w · −[y log σ(l) + (1 − y) log σ(−l)] / #{w > 0}, for logits, labels (1 = valid) and
/// weights all `[B, K]`. A weight of 0 leaves a component out (balancing); Gen-neG's
/// IS-balanced set weights valid components α and invalid ones 1 − α (Eq. 11).
pub fn weighted_binary_cross_entropy(
    logits: &Tensor,
    labels: &Tensor,
    weights: &Tensor,
) -> Result<Tensor> {
    if logits.rank() != 2 || labels.dims() != logits.dims() || weights.dims() != logits.dims() {
        bail!(
            "weighted cross-entropy: logits {:?}, labels {:?} and weights {:?} must all be [batch, components]",
            logits.dims(),
            labels.dims(),
            weights.dims()
        );
    }
    let y = labels.to_dtype(logits.dtype())?;
    let w = weights.to_dtype(logits.dtype())?;
    let nll = ((&y * log_sigmoid(logits)?)?
        + (y.affine(-1.0, 1.0)? * log_sigmoid(&logits.neg()?)?)?)?
    .neg()?;
    let kept = w
        .gt(0.0)?
        .to_dtype(logits.dtype())?
        .sum_all()?
        .maximum(1.0)?;
    (nll * w)?.sum_all()?.broadcast_div(&kept)
}

/// Distillation (Gen-neG Eq. 12): λ(σ) ‖s_teacher(x; σ) − s_student(x; σ)‖² at
/// x = x0 + σ z on true data x0, computed on denoisers like [`dsm`]; the teacher's output
/// is a constant (detached).
pub fn distillation(
    student: &dyn Score,
    teacher: &dyn Score,
    x0: &Tensor,
    sigma: &Tensor,
    noise: &Tensor,
    cond: &Cond,
    weighting: DsmWeighting,
) -> Result<Tensor> {
    let x = noised(x0, sigma, noise, "distillation loss")?;
    let target = teacher.denoise_with(&x, sigma, cond)?.detach();
    weighted_error(
        &student.denoise_with(&x, sigma, cond)?,
        &target,
        sigma,
        cond,
        weighting,
    )
}

fn denoiser_weights(sigma: &Tensor, weighting: DsmWeighting, like: &Tensor) -> Result<Tensor> {
    let w: Vec<f64> = sigma
        .to_dtype(candle_core::DType::F64)?
        .to_vec1::<f64>()?
        .into_iter()
        .map(|s| weighting.denoiser_weight(s))
        .collect();
    Tensor::from_vec(w, sigma.dims(), sigma.device())?.to_dtype(like.dtype())
}

/// Mean over the batch of −log p(y | x) for `logits: [B, K]` and labels `[B]` (u32).
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    if logits.rank() != 2 || labels.rank() != 1 || labels.dim(0)? != logits.dim(0)? {
        bail!(
            "cross-entropy: logits {:?} must be [batch, classes] and labels {:?} [batch]",
            logits.dims(),
            labels.dims()
        );
    }
    let onehot = one_hot(labels, logits.dim(1)?, logits.dtype())?;
    (log_softmax(logits)? * onehot)?.sum(1)?.neg()?.mean_all()
}

/// DLSM (paper Eq. 10–11): the batch mean of
/// ½ λ(σ) ‖∇x log p_φ(y | x; σ) + s_θ(x; σ) + z/σ‖² for x = x0 + σ z, with the score
/// model's `prior_score` s_θ(x; σ) frozen (detach it) and `likelihood_grad` = ∇x log p_φ
/// computed so that it is differentiable in φ (e.g.
/// `ToyClassifier::log_prob_and_input_grad`). Like [`dsm`], it is computed on the
/// denoiser-scale error σ² (∇ + s) + σ z, weighted by `weighting`'s λ_D.
pub fn dlsm(
    likelihood_grad: &Tensor,
    prior_score: &Tensor,
    x0: &Tensor,
    sigma: &Tensor,
    noise: &Tensor,
    weighting: DsmWeighting,
) -> Result<Tensor> {
    let x = noised(x0, sigma, noise, "DLSM loss")?;
    for (t, what) in [
        (likelihood_grad, "likelihood gradient"),
        (prior_score, "prior score"),
    ] {
        if t.dims() != x0.dims() {
            bail!(
                "DLSM loss: {what} has shape {:?}, data has {:?}",
                t.dims(),
                x0.dims()
            );
        }
    }
    let s2 = per_sample(sigma, x0)?.sqr()?;
    let posterior = (likelihood_grad + prior_score)?;
    let denoised = (x + posterior.broadcast_mul(&s2)?)?;
    weighted_error(&denoised, x0, sigma, &Cond::none(), weighting)? * 0.5
}
