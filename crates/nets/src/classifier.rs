//! Noise-conditioned classifiers as log-probability terms for guidance.

use crate::config::NetConfig;
use crate::precond::{AnyNet, NoiseNet};
use candle_core::{bail, Result, Tensor};
use candle_nn::VarBuilder;
use scoreguide_guidance::{check_batch, log_sigmoid, LogProb, Score};
use serde::{Deserialize, Serialize};

/// A classifier p(y | x; σ) over σ-space inputs: logits = F(c_in x, ¼ ln σ) with EDM's
/// c_in = 1/sqrt(σ² + σd²), so inputs stay of unit scale at every noise level (ours;
/// the Gen-neG paper conditions its classifier on the diffusion time the same way as
/// its score network).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassifierConfig {
    pub net: NetConfig,
    pub sigma_data: f64,
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
        }
    }

    pub fn build(&self, vb: &VarBuilder) -> Result<Classifier> {
        if !(self.sigma_data > 0.0 && self.sigma_data.is_finite()) {
            bail!(
                "classifier: sigma_data must be positive, got {}",
                self.sigma_data
            );
        }
        Ok(Classifier {
            net: self.net.build(vb)?,
            sigma_data: self.sigma_data,
        })
    }
}

/// See [`ClassifierConfig`]. As a [`LogProb`] it is binary: log C(x; σ) = log sigmoid(logit).
pub struct Classifier {
    net: AnyNet,
    sigma_data: f64,
}

impl Classifier {
    /// (c_in shaped to broadcast over x, c_noise).
    fn conditioning(&self, x: &Tensor, sigma: &Tensor) -> Result<(Tensor, Tensor)> {
        check_batch(x, sigma)?;
        let s = sigma.to_dtype(x.dtype())?;
        let c_in = (s.sqr()? + self.sigma_data * self.sigma_data)?
            .sqrt()?
            .recip()?;
        let mut shape = vec![1usize; x.rank()];
        shape[0] = x.dim(0)?;
        Ok((c_in.reshape(shape)?, (s.log()? * 0.25)?))
    }

    /// Logits `[B, K]` (K = 1 for a binary classifier).
    pub fn logits(&self, x: &Tensor, sigma: &Tensor) -> Result<Tensor> {
        let (c_in, c_noise) = self.conditioning(x, sigma)?;
        self.net.forward(&x.broadcast_mul(&c_in)?, &c_noise)
    }

    pub fn out_dim(&self) -> usize {
        self.net.out_dim()
    }
}

impl LogProb for Classifier {
    fn log_prob(&self, x: &Tensor, sigma: &Tensor) -> Result<Tensor> {
        if self.out_dim() != 1 {
            bail!(
                "classifier guidance: a binary classifier needs out_dim 1, this one has {}",
                self.out_dim()
            );
        }
        log_sigmoid(&self.logits(x, sigma)?)?.squeeze(1)
    }

    /// ∇x log sigmoid(F(c_in x, c_noise)) = sigmoid(−F) c_in ∂F/∂x_in, by the network's
    /// hand-written backward pass.
    fn input_gradient(&self, x: &Tensor, sigma: &Tensor) -> Result<Option<Tensor>> {
        let AnyNet::ResMlp(net) = &self.net;
        if self.out_dim() != 1 || x.rank() != 2 {
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
    fn log_prob(&self, x: &Tensor, sigma: &Tensor) -> Result<Tensor> {
        let x0 = self.base.denoise(x, sigma)?;
        let clean =
            Tensor::full(self.sigma_clean, x.dim(0)?, x.device())?.to_dtype(sigma.dtype())?;
        self.classifier.log_prob(&x0, &clean)
    }
}
