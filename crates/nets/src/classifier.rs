//! Noise-conditioned classifiers as log-probability terms for guidance.

use crate::config::{AnyNet, NetConfig};
use crate::net::NoiseNet;
use candle_core::{bail, DType, Result, Tensor};
use candle_nn::VarBuilder;
use scoreguide_guidance::{check_batch, log_sigmoid, log_softmax, one_hot, Cond, LogProb, Score};
use scoreguide_sde::Process;
use serde::{Deserialize, Serialize};

/// A time-dependent binary classifier C(x; σ) over σ-space inputs, with one logit per
/// component of a row (K = 1 for a point; K = agents for a scene, each vehicle valid or
/// not): log C = Σ_k log sigmoid(l_k), a row being valid iff each component is.
///
/// Inputs: logits = F(c_in x, ¼ ln σ) with EDM's c_in = 1/sqrt(σ² + σd²), so inputs stay
/// of unit scale at every noise level (ours); or, with a `process`, the process's own
/// x_t = α(σ) x and noise condition, as a score network of that process sees them (the
/// Gen-neG paper conditions its classifier on the diffusion time as its score network).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassifierConfig {
    pub net: NetConfig,
    pub sigma_data: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<Process>,
    #[serde(default, skip_serializing_if = "ClassifierHead::is_sigmoid")]
    pub head: ClassifierHead,
}

/// How a [`Classifier`]'s logits become the log-probability that guides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ClassifierHead {
    /// One binary logit per component of a row: log C = Σ_k log sigmoid(l_k) (Gen-neG).
    #[default]
    Sigmoid,
    /// K class logits: log p(y | x; σ) = log_softmax(l)_y for each row's label y in the
    /// condition (DLSM's class-conditional guidance).
    Softmax,
}

impl ClassifierHead {
    fn is_sigmoid(&self) -> bool {
        *self == Self::Sigmoid
    }
}

impl ClassifierConfig {
    /// Gen-neG's checkerboard classifier: the residual MLP with a 1-d output.
    pub fn checkerboard() -> Self {
        Self {
            net: NetConfig::ResMlp(crate::ResMlpConfig {
                out_dim: 1,
                ..Default::default()
            }),
            sigma_data: 1.0,
            process: None,
            head: ClassifierHead::Sigmoid,
        }
    }

    /// A K-class classifier (log_softmax head) on `net`, EDM-scaled inputs.
    pub fn categorical(net: NetConfig) -> Self {
        Self {
            net,
            sigma_data: 1.0,
            process: None,
            head: ClassifierHead::Softmax,
        }
    }

    /// A classifier of a score model's architecture (one logit per component) that sees
    /// its inputs as a network of `process` does.
    pub fn of_architecture(net: &NetConfig, process: Process) -> Self {
        Self {
            net: net.with_outputs(1),
            sigma_data: 1.0,
            process: Some(process),
            head: ClassifierHead::Sigmoid,
        }
    }

    pub fn build(&self, vb: &VarBuilder) -> Result<Classifier> {
        if !(self.sigma_data > 0.0 && self.sigma_data.is_finite()) {
            bail!(
                "classifier: sigma_data must be positive, got {}",
                self.sigma_data
            );
        }
        if let Some(p) = &self.process {
            p.validate()?;
        }
        Ok(Classifier {
            net: self.net.build(vb)?,
            sigma_data: self.sigma_data,
            process: self.process.clone(),
            head: self.head,
        })
    }
}

/// See [`ClassifierConfig`]; a [`LogProb`] guidance term.
pub struct Classifier {
    net: AnyNet,
    sigma_data: f64,
    process: Option<Process>,
    head: ClassifierHead,
}

impl Classifier {
    /// (c_in shaped to broadcast over x, c_noise).
    fn conditioning(&self, x: &Tensor, sigma: &Tensor) -> Result<(Tensor, Tensor)> {
        check_batch(x, sigma)?;
        let mut shape = vec![1usize; x.rank()];
        shape[0] = x.dim(0)?;
        if let Some(process) = &self.process {
            let s: Vec<f64> = sigma.to_dtype(DType::F64)?.to_vec1()?;
            let alpha: Vec<f64> = s.iter().map(|&v| process.alpha_at_sigma(v)).collect();
            let c: Vec<f64> = s.iter().map(|&v| process.noise_condition(v)).collect();
            let dev = x.device();
            let alpha = Tensor::from_vec(alpha, shape, dev)?.to_dtype(x.dtype())?;
            let c_noise = Tensor::from_vec(c, s.len(), dev)?.to_dtype(x.dtype())?;
            return Ok((alpha, c_noise));
        }
        let s = sigma.to_dtype(x.dtype())?;
        let c_in = (s.sqr()? + self.sigma_data * self.sigma_data)?
            .sqrt()?
            .recip()?;
        Ok((c_in.reshape(shape)?, (s.log()? * 0.25)?))
    }

    /// Logits `[B, K]`, one per component of a row.
    pub fn logits(&self, x: &Tensor, sigma: &Tensor, cond: &Cond) -> Result<Tensor> {
        let (c_in, c_noise) = self.conditioning(x, sigma)?;
        cond.check(x.dim(0)?)?;
        self.net.forward(&x.broadcast_mul(&c_in)?, &c_noise, cond)
    }

    /// The network under the classifier's input scaling.
    pub fn net(&self) -> &AnyNet {
        &self.net
    }

    /// K: logits per row.
    pub fn out_dim(&self) -> usize {
        self.net.out_dim()
    }
}

impl LogProb for Classifier {
    fn log_prob_with(&self, x: &Tensor, sigma: &Tensor, cond: &Cond) -> Result<Tensor> {
        let logits = self.logits(x, sigma, cond)?;
        match self.head {
            ClassifierHead::Sigmoid => log_sigmoid(&logits)?.sum(1),
            ClassifierHead::Softmax => {
                let labels = cond.require_labels("categorical classifier guidance")?;
                let onehot = one_hot(labels, self.out_dim(), logits.dtype())?;
                (log_softmax(&logits)? * onehot)?.sum(1)
            }
        }
    }

    /// ∇x Σ_k log sigmoid(F_k(c_in x, c_noise)) = c_in Σ_k sigmoid(−F_k) ∂F_k/∂x_in, by
    /// the residual MLP's hand-written backward pass (other networks use autograd).
    fn input_gradient(&self, x: &Tensor, sigma: &Tensor, _cond: &Cond) -> Result<Option<Tensor>> {
        let (AnyNet::ResMlp(net), ClassifierHead::Sigmoid) = (&self.net, self.head) else {
            return Ok(None);
        };
        if x.rank() != 2 {
            return Ok(None);
        }
        let (c_in, c_noise) = self.conditioning(x, sigma)?;
        let (_, g) = net.forward_with_input_grad(&x.broadcast_mul(&c_in)?, &c_noise, |out| {
            candle_nn::ops::sigmoid(&out.neg()?)
        })?;
        Ok(Some(g.broadcast_mul(&c_in)?))
    }
}

/// A classifier of clean data guiding through the one-step estimate
/// x̂0 = D(x; σ) = x + σ² s(x; σ) of a base model (Gen-neG's "time-independent"
/// ablation): log C(x̂0(x); σ_clean). Its gradient flows through the base model.
pub struct OnDenoised<S, C> {
    pub base: S,
    pub classifier: C,
    /// The noise level the classifier was trained at (clean data: a tiny σ).
    pub sigma_clean: f64,
}

impl<S: Score, C: LogProb> LogProb for OnDenoised<S, C> {
    fn log_prob_with(&self, x: &Tensor, sigma: &Tensor, cond: &Cond) -> Result<Tensor> {
        let x0 = self.base.denoise_with(x, sigma, cond)?;
        let clean =
            Tensor::full(self.sigma_clean, x.dim(0)?, x.device())?.to_dtype(sigma.dtype())?;
        self.classifier.log_prob_with(&x0, &clean, cond)
    }
}
